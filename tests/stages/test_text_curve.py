"""The text compute curve (studies/dvc.yaml `text_curve`): the stage run as a process on a tiny corpus with the toy
project's text architecture (mixture of experts, multi-token prediction); its CSV, PNG and MLflow run; training and
scoring exactly as the text_pretrain, text_ngram and text_evaluate stages do; its one-line errors before anything is
written; its deps and params in studies/dvc.yaml."""

from __future__ import annotations

import csv
import os
import sqlite3
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlparse

import pytest
import torch
import yaml

from pipeline_lib.core.config import apply_overrides
from pipeline_lib.core.tracking import Tracker
from pipeline_lib.params import load_params
from pipeline_lib.text.curve import COLUMNS, curve_figure, evaluation_steps, summarise
from pipeline_lib.text.data.corpus import prepare_text, read_text_meta
from pipeline_lib.text.evaluate import score
from pipeline_lib.text.hparams import flops_per_token
from pipeline_lib.text.models.saved import load_lm
from pipeline_lib.text.ngram import run_text_ngram
from pipeline_lib.text.pretrain import LMPaths, build_lm, run_text_pretrain

ROOT = Path(__file__).resolve().parents[2]
EPOCHS, POINTS, BATCH, SEQ_LEN = {"ar": 3, "mdm": 2, "mdm_from_ar": 1}, 6, 8, 8
CURVE = [sys.executable, "-m", "stages.text_curve"]

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A prepared character corpus (1,716 training and 414 validation tokens: 214 windows of 8, 26 steps of 8 per
    epoch) and the project's params at toy size. The n-gram is a weak add-k bigram, so that ar goes below it within
    its 78 steps and the crossover is drawn and logged; mdm stays above it."""
    root = tmp_path_factory.mktemp("text_curve")
    (root / "corpus").mkdir()
    (root / "corpus" / "a.txt").write_text("the cat sat on the mat.\n" * 60 + "a dog ran to the park.\n" * 30)
    meta = prepare_text("folder", path=root / "corpus", val_fraction=0.2, out_dir=root / "prepared",
                        cache_dir=root / "c")
    assert meta["num_tokens"] == {"train": 1716, "val": 414}  # the counts the error messages below quote
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["device"] = "cpu"
    params["text_model"].update(d_model=16, n_layer=1, n_head=2, seq_len=SEQ_LEN)
    params["text_model"]["moe"].update(enabled=True, routed_experts=4, top_k=2)
    params["text_pretrain"].update(batch_size=BATCH, base_lr=1.0, warmup_epochs=0.0, mtp_depth=1, log_every=2,
                                   checkpoint_every=5)
    params["text_ngram"].update(order=2, method="add_k", k=1.0)
    params["text_evaluate"].update(mdm_samples=1)
    params["text_curve"].update(ar_epochs=EPOCHS["ar"], mdm_epochs=EPOCHS["mdm"], mdm_ar_epochs=EPOCHS["mdm_from_ar"],
                                points=POINTS, val_windows=None)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return root


def _run_curve(params: Path, data: Path, plots: Path, store: Path) -> subprocess.CompletedProcess[str]:
    """`python -m stages.text_curve` from the project root, as DVC runs it, logging to `store`/mlflow.db."""
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{store}/mlflow.db", "OMP_NUM_THREADS": "1"}
    return subprocess.run([*CURVE, "--params", str(params), "--data", str(data), "--plots", str(plots)], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def curve(workspace: Path) -> list[dict[str, str]]:
    """The stage run once, as DVC runs it: its CSV rows."""
    done = _run_curve(workspace / "params.yaml", workspace / "prepared", workspace / "plots", workspace)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "text_curve: n-gram " in done.stdout and "ar final bpc" in done.stdout, done.stdout
    with open(workspace / "plots" / "curve.csv", newline="") as handle:
        return list(csv.DictReader(handle))


def _flops_per_token(workspace: Path) -> float:
    """The toy model's training FLOPs per token: one layer of d_model 16 over windows of 8, counting the experts a
    token passes through."""
    params = load_params(workspace / "params.yaml")
    model = build_lm(read_text_meta(workspace / "prepared")["vocab_size"], params, "ar")
    return flops_per_token(n_layer=1, d_model=16, seq_len=SEQ_LEN, mlp_active_params=round(model.active_mlp_params()))


def test_curve_rows_figure_and_mlflow_run(workspace: Path, curve: list[dict[str, str]]) -> None:
    assert list(curve[0]) == COLUMNS
    steps_per_epoch = (1716 - 1) // SEQ_LEN // BATCH  # 214 windows
    per_token = _flops_per_token(workspace)
    ngram = {row["ngram_bpc"] for row in curve}
    assert len(ngram) == 1
    ngram_bpc = float(ngram.pop())
    ar_end = [row for row in curve if row["model"] == "ar"][-1]
    for name, epochs in EPOCHS.items():
        rows = [row for row in curve if row["model"] == name]
        assert {row["objective"] for row in rows} == {name[:3] if name != "ar" else "ar"}
        steps = [int(row["step"]) for row in rows]
        assert steps == evaluation_steps(epochs * steps_per_epoch, POINTS) and steps[-1] == epochs * steps_per_epoch
        tokens, seconds = [int(row["tokens"]) for row in rows], [float(row["seconds"]) for row in rows]
        assert tokens == [step * BATCH * SEQ_LEN for step in steps]
        assert tokens == sorted(set(tokens)) and seconds == sorted(set(seconds)) and seconds[0] > 0  # increasing
        # the adapted line continues from the ar line's end: its seconds and FLOPs include the ar run's
        origin = ar_end if name == "mdm_from_ar" else None
        flops = [per_token * t + (float(origin["flops"]) if origin else 0.0) for t in tokens]
        assert [float(row["flops"]) for row in rows] == pytest.approx(flops)
        assert origin is None or seconds[0] > float(origin["seconds"])
        assert all(0 < float(row["bpc"]) < 10 for row in rows)
    assert float(ar_end["bpc"]) < ngram_bpc  # the crossover is drawn
    assert (workspace / "plots" / "curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    with sqlite3.connect(workspace / "mlflow.db") as db:
        (run_id, artifacts), = db.execute("SELECT run_uuid, artifact_uri FROM runs WHERE name = 'text_curve' "
                                          "AND status = 'FINISHED'").fetchall()
        params = dict(db.execute("SELECT key, value FROM params WHERE run_uuid = ?", (run_id,)))
        latest = dict(db.execute("SELECT key, value FROM latest_metrics WHERE run_uuid = ?", (run_id,)))
        history = db.execute("SELECT step, value FROM metrics WHERE run_uuid = ? AND key = 'mdm.bpc_bound' "
                             "ORDER BY step", (run_id,)).fetchall()
    db.close()
    assert params["text_curve.points"] == str(POINTS) and params["text_curve.ar_epochs"] == "3"
    assert params["text_pretrain.batch_size"] == str(BATCH) and "text_pretrain.epochs" not in params
    assert "text_pretrain.mdm_init" not in params and params["text_curve.mdm_ar_epochs"] == "1"
    mdm = [row for row in curve if row["model"] == "mdm"]
    assert history == [(int(r["step"]), pytest.approx(float(r["bpc"]))) for r in mdm]  # per point, at its step
    assert {"ar.loss", "mdm.loss", "ar.mtp1_loss", "ar.train_seconds"} <= set(latest) and "loss" not in latest
    assert latest["ngram_bpc"] == pytest.approx(ngram_bpc)
    for line, key in (("ar", "bpc"), ("mdm", "bpc_bound"), ("mdm_from_ar", "bpc_bound")):
        scores = [float(row["bpc"]) for row in curve if row["model"] == line]
        assert latest[f"{line}.final_{key}"] == pytest.approx(scores[-1])
        assert latest[f"{line}.best_{key}"] == pytest.approx(min(scores))
        below = next((row for row in curve if row["model"] == line and float(row["bpc"]) < ngram_bpc), None)
        for name in ("seconds", "flops"):
            if below is None:
                assert f"{line}.crossover_{name}" not in latest
            else:
                assert latest[f"{line}.crossover_{name}"] == pytest.approx(float(below[name]))
    assert "ar.crossover_seconds" in latest and "mdm.crossover_seconds" not in latest
    assert latest["mdm_over_ar_final_bpc"] == pytest.approx(float(mdm[-1]["bpc"]) / latest["ar.final_bpc"])
    adapted = [row for row in curve if row["model"] == "mdm_from_ar"]
    assert latest["mdm_from_ar_over_ar_final_bpc"] == pytest.approx(float(adapted[-1]["bpc"]) / latest["ar.final_bpc"])
    assert float(adapted[-1]["bpc"]) < float(mdm[-1]["bpc"])  # the AR weights are a better start than fresh ones
    assert {"curve.csv", "curve.png"} <= {p.name for p in Path(urlparse(artifacts).path).iterdir()}


def test_curve_trains_and_scores_as_the_stages_do(workspace: Path, curve: list[dict[str, str]],
                                                   tmp_path: Path) -> None:
    """The n-gram's line is the text_ngram stage's figure, and each run's last point is what text_pretrain trains
    for that many epochs and text_evaluate scores (the adapted line: text_pretrain@mdm with mdm_init ar from the ar
    stage's model): the evaluations along the way change nothing."""
    data = workspace / "prepared"
    ngram = run_text_ngram(load_params(workspace / "params.yaml"), Tracker(), data, tmp_path / "ngram.json")
    assert float(curve[0]["ngram_bpc"]) == pytest.approx(ngram["bpc"], rel=1e-12)
    for line, objective, init in (("ar", "ar", "scratch"), ("mdm", "mdm", "scratch"), ("mdm_from_ar", "mdm", "ar")):
        params = load_params(workspace / "params.yaml", [f"text_pretrain.epochs={EPOCHS[line]}",
                                                         "text_pretrain.mdm_epochs=null",
                                                         f"text_pretrain.mdm_init={init}"])
        paths = LMPaths(data, tmp_path / line, tmp_path / f"{line}.json", tmp_path / f"{line}_plots",
                        tmp_path / f"{line}_checkpoints", tmp_path / "ar")
        run_text_pretrain(params, paths, objective, Tracker(), torch.device("cpu"))
        model, _, _ = load_lm(paths.out)
        scored = score(model, objective, data, params)
        last = [row for row in curve if row["model"] == line][-1]
        assert float(last["bpc"]) == pytest.approx(scored["bpc" if objective == "ar" else "bpc_bound"], rel=1e-6)


@pytest.mark.parametrize(("overrides", "message"), [
    (["text_curve.points=0"], "text_curve: text_curve.points=0: must be a positive integer"),
    (["text_curve.points=79"], "text_curve: text_curve.points=79: ar trains 78 steps (text_curve.ar_epochs=3 of 26) "
                               "and is scored at most once a step (accepted: at most 78)"),
    (["text_curve.val_windows=52"], "text_curve: text_curve.val_windows=52: the validation split holds 51 windows of "
                                    "text_model.seq_len=8 tokens (accepted: at most 51, or null for all)"),
    (["text_pretrain.warmup_epochs=2.5"], "text_curve: text_curve.mdm_epochs=2: the text_pretrain keys refuse it as "
                                          "their epochs (text_pretrain.warmup_epochs=2.5: must be in [0, "
                                          "text_pretrain.epochs=2])"),
], ids=["points=0", "points>steps", "val_windows>windows", "warmup>mdm_epochs"])
def test_bad_params_stop_in_one_line_before_anything_is_written(workspace: Path, tmp_path: Path,
                                                                 overrides: list[str], message: str) -> None:
    raw = yaml.safe_load((workspace / "params.yaml").read_text())
    apply_overrides(raw, overrides)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    done = _run_curve(tmp_path / "params.yaml", workspace / "prepared", tmp_path / "plots", tmp_path)
    assert done.returncode != 0 and done.stderr.strip().splitlines()[-1] == message, done.stdout + done.stderr
    assert not (tmp_path / "plots").exists() and not (tmp_path / "mlflow.db").exists()  # no output, no MLflow run


def test_the_first_point_below_the_ngram_is_the_crossover() -> None:
    rows = [{"model": objective, "objective": objective, "step": step, "tokens": 10 * step, "seconds": float(step),
             "flops": 1e9 * step, "bpc": bpc}
            for objective, scores in (("ar", [3.0, 1.9, 2.1, 1.5]), ("mdm", [4.0, 3.5, 3.0, 2.5]))
            for step, bpc in enumerate(scores, start=1)]
    summary = summarise(rows, 2.0)
    assert summary["ar"] == {"final_bpc": 1.5, "best_bpc": 1.5, "crossover_seconds": 2.0, "crossover_flops": 2e9}
    assert summary["mdm"] == {"final_bpc_bound": 2.5, "best_bpc_bound": 2.5, "crossover_seconds": None,
                              "crossover_flops": None}
    assert summary["mdm_over_ar_final_bpc"] == pytest.approx(2.5 / 1.5)
    figure = curve_figure(rows, 2.0, "5-gram kneser_ney 2.000")
    labels = [text.get_text() for axis in figure.axes for text in axis.get_legend().get_texts()]
    assert "ar first below the n-gram: 2 s" in labels and "ar first below the n-gram: 2e+09 FLOPs" in labels
    assert not any(label.startswith("mdm first below") for label in labels)
    assert [axis.get_xscale() for axis in figure.axes] == ["log", "log"]
    assert evaluation_steps(5, 5) == [1, 2, 3, 4, 5] and evaluation_steps(78, 1) == [78]


def test_study_depends_on_every_file_it_imports_and_declares_every_param_it_logs() -> None:
    sys.path.insert(0, str(Path(__file__).parent))
    from test_dvc_yaml import _closure, _module_file

    from pipeline_lib.text.curve import logged_params

    spec = yaml.safe_load((ROOT / "studies/dvc.yaml").read_text())["stages"]["text_curve"]
    deps = [ROOT / dep for dep in spec["deps"]]
    missing = [str(path.relative_to(ROOT)) for path in sorted(_closure(_module_file("stages.text_curve")))
               if not any(path == dep or dep in path.parents for dep in deps)]
    assert not missing, f"studies/dvc.yaml text_curve imports files it does not list in deps: {missing}"
    assert "data/text/stdlib" in spec["deps"]
    # ... the standard library's source, prepared by the study's own text_fetch with the source set for that run
    fetch = yaml.safe_load((ROOT / "studies/dvc.yaml").read_text())["stages"]["text_fetch_stdlib"]
    assert fetch["outs"] == ["data/text/stdlib"] and "--set text_data.source=stdlib" in fetch["cmd"]
    missing = [str(path.relative_to(ROOT)) for path in sorted(_closure(_module_file("stages.text_fetch")))
               if str(path.relative_to(ROOT)) not in fetch["deps"]]
    assert not missing, f"studies/dvc.yaml text_fetch_stdlib imports files it does not list in deps: {missing}"
    overridden = {part.split("=")[0] for part in fetch["cmd"].split() if part.startswith("text_data.")}
    assert {f"text_data.{key}" for key in ("source", "url", "sha256", "path", "modules", "val_fraction", "tokenizer",
                                            "vocab_size")} == overridden | set(fetch["params"])
    declared = spec["params"]
    logged = logged_params(load_params(ROOT / "params.yaml"))
    assert all(any(key == p or key.startswith(f"{p}.") for p in declared) for key in logged), (logged, declared)
    assert all(any(key == p or key.startswith(f"{p}.") for key in logged) for p in declared), (logged, declared)
    assert [next(iter(out)) for out in spec["outs"]] == ["plots/text_curve/curve.csv", "plots/text_curve/curve.png"]
    assert all(out[name] == {"cache": False} for out in spec["outs"] for name in out)
