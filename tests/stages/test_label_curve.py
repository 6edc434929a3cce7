"""The label-efficiency curve (studies/dvc.yaml): drawn by `dvc repro studies/dvc.yaml` in a copy of the reproduced
toy project, never by the default `dvc repro`; its CSVs, PNG, MLflow run, DVC plot and one-line errors."""

from __future__ import annotations

import csv
import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
import pytest
import yaml

from pipeline_lib.params import load_params
from pipeline_lib.vision.data.prepare import split_indices
from pipeline_lib.vision.data.sources import load_source
from pipeline_lib.vision.data.store import read_split
from pipeline_lib.vision.label_curve import CURVE_COLUMNS, METHODS, RUN_COLUMNS, draw_sets, unlabeled_pool

ROOT = Path(__file__).resolve().parents[2]
FRACTIONS, REPEATS = ("0.1", "0.25"), ("2", "1")  # 16 and 40 of the toy project's 160 training images
CURVE = ["python", "-m", "stages.label_curve", "--params", "params.yaml", "--encoder", "models/pretrain",
         "--cache-dir", "data/cache"]


def _run(repo: Path, *command: str, status: int = 0, stdout: bool = False) -> str:
    """Run `command` in `repo` as a user does (the project's own MLflow store); its output (`stdout`: stdout alone),
    once it exits `status`."""
    env = {name: value for name, value in os.environ.items() if name != "MLFLOW_TRACKING_URI"}
    done = subprocess.run(command, cwd=repo, capture_output=True, text=True, timeout=900, env=env)
    assert done.returncode == status, f"{' '.join(command)} exited {done.returncode}:\n{done.stdout}\n{done.stderr}"
    return done.stdout if stdout else done.stdout + done.stderr


def _add_studies(repo: Path) -> None:
    """studies/dvc.yaml as the project has it, its curve cut to the toy size's fractions, committed."""
    text = (ROOT / "studies/dvc.yaml").read_text()
    option = "--plots plots/label_curve"
    assert text.count(option) == 1
    text = text.replace(option, f"{option} --fractions {' '.join(FRACTIONS)} --repeats {' '.join(REPEATS)}")
    (repo / "studies").mkdir()
    (repo / "studies/dvc.yaml").write_text(text)
    _run(repo, "git", "add", "-A")
    _run(repo, "git", "commit", "-q", "-m", "studies")


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def test_study_draws_the_curve_outside_the_default_pipeline(toy_clone: Path) -> None:
    repo = toy_clone
    _add_studies(repo)
    status = _run(repo, "dvc", "status")  # the default repro is done: only the studies are left, never run
    assert status.startswith("studies/dvc.yaml:label_curve:") and "studies/dvc.yaml:text_curve:" in status, status
    assert not any(f"\n{stage}:" in status for stage in ("fetch", "pretrain", "finetune", "evaluate")), status
    assert "up to date" in _run(repo, "dvc", "status", "dvc.yaml")
    assert "up to date" in _run(repo, "dvc", "repro") and not (repo / "plots/label_curve").exists()

    output = _run(repo, "dvc", "repro", "studies/dvc.yaml:label_curve")
    assert "Stage 'pretrain' didn't change, skipping" in output  # the one pretrained encoder, not a new one
    assert "label_curve" not in _run(repo, "dvc", "status")

    runs, curve = _rows(repo / "plots/label_curve/runs.csv"), _rows(repo / "plots/label_curve/curve.csv")
    assert list(runs[0]) == RUN_COLUMNS and list(curve[0]) == CURVE_COLUMNS
    assert [(p["label_fraction"], p["labeled_images"], p["repeats"]) for p in curve] == [
        ("0.1", "16", "2"), ("0.25", "40", "1")]
    assert len(runs) == 3 * len(METHODS)  # 2 + 1 draws, 6 methods each
    for point in curve:
        for method in METHODS:
            scores = [float(r["top1"]) for r in runs if r["label_fraction"] == point["label_fraction"]
                      and r["method"] == method]
            assert float(point[method]) == pytest.approx(np.mean(scores))
            assert float(point[f"{method}_min"]) == min(scores) and float(point[f"{method}_max"]) == max(scores)
            std = point[f"{method}_std"]
            assert std == "" if len(scores) == 1 else float(std) == pytest.approx(np.std(scores, ddof=1))

    # The first draw at data.label_fraction is the pipeline's labeled split, trained as its stages train it.
    evaluate = json.loads((repo / "metrics/evaluate.json").read_text())
    first = {r["method"]: float(r["top1"]) for r in runs if r["label_fraction"] == "0.1" and r["repeat"] == "0"}
    assert first["ssl"] == pytest.approx(evaluate["ssl"]["top1"])
    assert first["scratch"] == pytest.approx(evaluate["scratch"]["top1"])
    assert first["semi"] == pytest.approx(evaluate["semi"]["top1"])  # the semi stage's training, from that model
    for name in ("pixels_logreg", "pixels_svm", "pixels_label_spreading"):  # the same pool as evaluate's, too
        assert first[name] == pytest.approx(evaluate["baselines"][name]["top1"])
    assert (repo / "plots/label_curve/curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    claims = json.loads((repo / "metrics/label_curve.json").read_text())["points"]  # what the report reads
    assert sorted(claims) == ["p10", "p25"] and claims["p10"]["draws"] == 2
    for treatment, control in (("ssl", "scratch"), ("semi", "ssl"), ("semi", "scratch")):
        by_draw = {m: {r["repeat"]: float(r["top1"]) for r in runs if r["label_fraction"] == "0.1"
                       and r["method"] == m} for m in (treatment, control)}
        pair = claims["p10"][f"{treatment}_minus_{control}"]
        expected = [by_draw[treatment][d] - by_draw[control][d] for d in ("0", "1")]
        assert pair["per_draw"] == pytest.approx(expected) and pair["n"] == 2
        assert pair["mean"] == pytest.approx(np.mean(expected)) and pair["low"] <= pair["mean"] <= pair["high"]
        assert claims["p25"][f"{treatment}_minus_{control}"]["n"] == 1  # one draw: no interval

    with sqlite3.connect(repo / "mlflow.db") as db:
        (run_id, artifacts), = db.execute("SELECT run_uuid, artifact_uri FROM runs WHERE name = 'label_curve' "
                                          "AND status = 'FINISHED'").fetchall()
        params = dict(db.execute("SELECT key, value FROM params WHERE run_uuid = ?", (run_id,)))
        steps = db.execute("SELECT step, value FROM metrics WHERE run_uuid = ? AND key = 'ssl.top1' ORDER BY step",
                           (run_id,)).fetchall()
    db.close()
    assert params["curve.fractions"] == "0.1 0.25" and params["curve.repeats"] == "2 1"
    assert params["finetune.epochs"] and params["finetune_scratch.epochs"] and params["seed"] == "0"
    assert [step for step, _ in steps] == [16, 40]  # the curve, against the labeled-image count
    with sqlite3.connect(repo / "mlflow.db") as db:
        draws = db.execute("SELECT step, value FROM metrics WHERE run_uuid = ? AND key = 'draws' ORDER BY step",
                           (run_id,)).fetchall()
    db.close()
    assert draws == [(16, 2.0), (40, 1.0)]
    assert [value for _, value in steps] == pytest.approx([float(p["ssl"]) for p in curve])
    stored = Path(urlparse(artifacts).path)
    assert {"curve.csv", "curve.png", "runs.csv"} <= {p.name for p in stored.iterdir()}

    shown = json.loads(_run(repo, "dvc", "plots", "show", "--json", stdout=True))["data"]  # with the pipeline's
    curve_plot = json.dumps(shown["label_curve"])
    assert all(f'"{method}"' in curve_plot for method in METHODS) and "plots/label_curve/curve.png" in shown


@pytest.mark.parametrize(("options", "message"), [
    (["--fractions", "0.95"], "label_curve: --fractions 0.95: must be in (0, 0.9]"),
    (["--fractions", "0.01"], "label_curve: --fractions 0.01: 2 labeled images of the 160 in the training pool, "
                              "fewer than its 10 classes"),
    (["--fractions", "0.1", "0.25", "--repeats", "1", "2", "3"], "label_curve: --repeats 1 2 3: give one count"),
])
def test_bad_options_stop_with_one_line_and_write_nothing(toy_project: Path, tmp_path: Path, options: list[str],
                                                          message: str) -> None:
    output = _run(toy_project, sys.executable, *CURVE[1:], "--plots", str(tmp_path / "curve"), "--metrics",
                  str(tmp_path / "curve.json"), *options, status=1)
    assert output.strip().startswith(message) and len(output.strip().splitlines()) == 1, output
    assert not (tmp_path / "curve").exists()


def test_first_draws_are_the_fetch_stages_splits(toy_project: Path) -> None:
    params = load_params(toy_project / "params.yaml")
    raw = load_source(params.data, toy_project / "data/cache")
    splits = ("labeled", "rl", "test", "unlabeled")
    prepared = {name: read_split(toy_project / "data/prepared", name) for name in splits}
    split = split_indices(raw, params.data, params.seed)
    np.testing.assert_array_equal(raw.train_images[split["rl"]], prepared["rl"].images)  # the fetch stage's rl rows
    np.testing.assert_array_equal(unlabeled_pool(raw, params), prepared["unlabeled"].images)  # LabelSpreading's

    draws, test = draw_sets(raw, params, [params.data.label_fraction, 0.25], [3, 1])
    assert [(d.fraction, d.repeat, len(d.rows)) for d in draws] == [(0.1, 0, 16), (0.1, 1, 16), (0.1, 2, 16),
                                                                      (0.25, 0, 40)]
    np.testing.assert_array_equal(raw.train_images[draws[0].rows], prepared["labeled"].images)
    np.testing.assert_array_equal(raw.train_labels[draws[0].rows], prepared["labeled"].labels)
    np.testing.assert_array_equal(raw.train_images[test], prepared["test"].images)  # digits: test carved from train
    for draw in draws:
        assert not np.intersect1d(draw.rows, test).size and not np.intersect1d(draw.rows, split["rl"]).size
        assert np.array_equal(np.bincount(raw.train_labels[draw.rows], minlength=10),
                              np.bincount(raw.train_labels[draws[0].rows if draw.fraction == 0.1 else draw.rows],
                                          minlength=10))  # stratified: the same class counts in every draw
    assert len({tuple(d.rows) for d in draws[:3]}) == 3  # three different labeled sets of 16
    defaults, _ = draw_sets(raw, params, [0.1, 0.5], None)  # 16 and 80 images: 5 and 3 draws by default
    assert [(d.fraction, d.repeat) for d in defaults] == [(0.1, r) for r in range(5)] + [(0.5, r) for r in range(3)]


def test_study_depends_on_every_file_its_stage_imports() -> None:
    sys.path.insert(0, str(Path(__file__).parent))
    from test_dvc_yaml import _closure, _module_file

    spec = yaml.safe_load((ROOT / "studies/dvc.yaml").read_text())["stages"]["label_curve"]
    deps = [ROOT / dep for dep in spec["deps"]]
    missing = [str(path.relative_to(ROOT)) for path in sorted(_closure(_module_file("stages.label_curve")))
               if not any(path == dep or dep in path.parents for dep in deps)]
    assert not missing, f"studies/dvc.yaml label_curve imports files it does not list in deps: {missing}"
