"""The text GRPO claim (studies/dvc.yaml `text_rl_claim`): the stage run as a process at toy size, two seeds in two
worker processes (the ar objective: a toy masked model learns too erratically for RFT to find accepted completions
in every batch; tests/text/test_text_grpo.py runs each method on both objectives); its CSV, PNG, summary and MLflow
run; each cell's figures as the library's own functions give them; its one-line errors before anything is written;
its deps and params in studies/dvc.yaml."""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pytest
import yaml

from pipeline_lib.core.claims import paired_interval
from pipeline_lib.params import load_params
from pipeline_lib.text.data.corpus import prepare_text
from pipeline_lib.text.data.task_data import prepare_task
from pipeline_lib.text.rl_claim import DIFFERENCES, MODELS, Cell, ClaimPaths, metric_names, run_cell

ROOT = Path(__file__).resolve().parents[2]
SEEDS = [3, 5]
CLAIM = [sys.executable, "-m", "stages.text_rl_claim"]

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A character tokenizer over the letters, reversals of one or two letters (200 train, 32 rl, 32 test), and the
    project's params at toy size: a tiny model, 1,000 SFT steps, 8 steps of each post-training method, 16 samples per
    test prompt."""
    root = tmp_path_factory.mktemp("text_rl_claim")
    (root / "corpus").mkdir()
    (root / "corpus" / "a.txt").write_text("reverse the quick brown fox jumps over a lazy dog=\n" * 40)
    prepare_text("folder", path=root / "corpus", val_fraction=0.2, tokenizer="char", out_dir=root / "prepared",
                 cache_dir=root / "c")
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["device"] = "cpu"
    params["text_model"].update(d_model=32, n_layer=2, n_head=2, seq_len=16)
    params["text_task"].update(kind="reversal", min_len=1, max_len=2, train_size=200, rl_size=32, test_size=32,
                               answer_tokens=5)
    params["text_sft"].update(epochs=40, batch_size=8, base_lr=0.1, warmup_epochs=0.0, stop_at_accuracy=None)
    params["text_rl"].update(batch_size=8, group_size=8, block_length=6, min_signal=0.0)
    params["text_task_evaluate"].update(pass_k=16, block_length=6)
    params["text_rl_claim"].update(seeds=SEEDS, objectives=["ar"], pretrained=[], rl_epochs=2, jobs=2)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    prepare_task(load_params(root / "params.yaml"), root / "task")
    return root


def _paths(root: Path) -> ClaimPaths:
    return ClaimPaths(root / "task", root / "prepared", root / "models", root / "plots", root / "metrics/claim.json")


def _run_claim(params: Path, root: Path, store: Path) -> subprocess.CompletedProcess[str]:
    """`python -m stages.text_rl_claim` from the project root, as DVC runs it, logging to `store`/mlflow.db."""
    paths = _paths(root)
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{store}/mlflow.db", "OMP_NUM_THREADS": "1"}
    arguments = ["--params", str(params), "--task", str(paths.task), "--data", str(paths.data), "--pretrained",
                 str(paths.pretrained), "--plots", str(paths.plots), "--metrics", str(paths.metrics)]
    return subprocess.run([*CLAIM, *arguments], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def claim(workspace: Path) -> list[dict[str, str]]:
    """The stage run once, as DVC runs it: its CSV rows."""
    done = _run_claim(workspace / "params.yaml", workspace, workspace)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "text_rl_claim: ar: grpo - shuffled greedy" in done.stdout, done.stdout
    with open(workspace / "plots" / "runs.csv", newline="") as handle:
        return list(csv.DictReader(handle))


def test_claim_rows_summary_figure_and_mlflow_run(workspace: Path, claim: list[dict[str, str]]) -> None:
    names = metric_names(16)
    assert names[:4] == ["accuracy", "pass_at_1", "pass_at_2", "pass_at_4"] and "maj_at_4" in names
    assert [(r["objective"], int(r["seed"]), r["model"]) for r in claim] == [
        ("ar", seed, model) for seed in SEEDS for model in MODELS]
    for row in claim:
        assert all(0.0 <= float(row[name]) <= 1.0 for name in names)
        assert int(row["sft_steps"]) == 40 * 25  # 200 examples, batch 8: no early stop asked
        assert row["steps"] == ("" if row["model"] == "sft" else "8")  # rl_epochs 2 of 32 prompts / 8
    summary = json.loads((workspace / "metrics" / "claim.json").read_text())
    assert set(summary) == {"ar", "seconds"}
    for objective in ("ar",):
        found = summary[objective]
        assert found["seeds"] == SEEDS
        rows = {(r["model"], int(r["seed"])): r for r in claim if r["objective"] == objective}
        for treatment, control in DIFFERENCES:
            for name in names:
                per_seed = [float(rows[treatment, s][name]) - float(rows[control, s][name]) for s in SEEDS]
                expected = paired_interval(per_seed)
                got = found["differences"][f"{treatment}_minus_{control}"][name]
                assert got["seeds"] == pytest.approx(per_seed)
                assert (got["mean"], got["low"], got["high"], got["minimum"]) == pytest.approx(
                    (expected.mean, expected.low, expected.high, expected.minimum))
        assert found["models"]["grpo"]["accuracy"]["mean"] == pytest.approx(
            sum(float(rows["grpo", s]["accuracy"]) for s in SEEDS) / 2)
        assert found["sft"]["steps"] == [1000, 1000]
    assert (workspace / "plots" / "claim.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    from pipeline_lib.report import HEADLINE, lookup

    (table,) = [table for table in HEADLINE if table.study == "text_rl_claim"]  # what the report reads is written
    keys = [key for row in table.rows for key in row.keys if key and key.startswith("ar.")] + ["ar.sft.accuracy"]
    assert keys and [key for key in keys if lookup(summary, key) is None] == []

    with sqlite3.connect(workspace / "mlflow.db") as db:
        (run_id, artifacts), = db.execute("SELECT run_uuid, artifact_uri FROM runs WHERE name = 'text_rl_claim' "
                                          "AND status = 'FINISHED'").fetchall()
        params = dict(db.execute("SELECT key, value FROM params WHERE run_uuid = ?", (run_id,)))
        latest = dict(db.execute("SELECT key, value FROM latest_metrics WHERE run_uuid = ?", (run_id,)))
        per_seed = db.execute("SELECT step, value FROM metrics WHERE run_uuid = ? AND key = 'ar.grpo.accuracy' "
                              "ORDER BY step", (run_id,)).fetchall()
    db.close()
    assert params["text_rl_claim.rl_epochs"] == "2" and "text_rl.epochs" not in params
    assert "text_rl.method" not in params and params["text_rl.lr"] == "0.00025"
    grpo = [r for r in claim if r["objective"] == "ar" and r["model"] == "grpo"]
    assert per_seed == [(int(r["seed"]), pytest.approx(float(r["accuracy"]))) for r in grpo]  # step = seed
    difference = summary["ar"]["differences"]["grpo_minus_shuffled"]["accuracy"]
    assert latest["ar.grpo_minus_shuffled.accuracy.mean"] == pytest.approx(difference["mean"])
    assert {"runs.csv", "claim.png", "claim.json"} <= {p.name for p in Path(urlparse(artifacts).path).iterdir()}


def test_a_cell_is_the_library_run_of_its_seed(workspace: Path, claim: list[dict[str, str]]) -> None:
    """One cell run again in this process gives the figures the study's worker wrote: SFT, the three methods and the
    scores are the library's, seeded by the cell (one thread, as the worker had)."""
    params = load_params(workspace / "params.yaml")
    rows = run_cell(Cell(params, _paths(workspace), "ar", SEEDS[1], "cpu", threads=1))
    written = [r for r in claim if r["objective"] == "ar" and int(r["seed"]) == SEEDS[1]]
    assert [r["model"] for r in rows] == [r["model"] for r in written] == list(MODELS)
    for mine, theirs in zip(rows, written, strict=True):
        for name in metric_names(16):
            assert mine[name] == pytest.approx(float(theirs[name])), (mine["model"], name)


@pytest.mark.parametrize(("edit", "message"), [
    ({"text_rl_claim": {"seeds": [3]}}, "text_rl_claim.seeds=[3]: must list at least 2 distinct seeds"),
    ({"text_rl_claim": {"objectives": ["gpt"]}}, "text_rl_claim.objectives[0]='gpt': must be one of 'ar', 'mdm'"),
    ({"text_rl_claim": {"rl_epochs": 0}}, "text_rl_claim.rl_epochs=0: must be a positive integer"),
    ({"text_rl_claim": {"pretrained": ["ar"]}}, "models/ar/config.json"),
    ({"text_sft": {"stop_at_accuracy": 0.3, "holdout": 196}},
     "text_sft.holdout=196: leaves 4 of the 200 train examples"),
    ({"text_rl": {"batch_size": 64}}, "text_rl.batch_size=64: is larger than the 32 rl prompts"),
])
def test_bad_params_stop_in_one_line_before_anything_is_written(workspace: Path, tmp_path: Path,
                                                                edit: dict[str, Any], message: str) -> None:
    params = yaml.safe_load((workspace / "params.yaml").read_text())
    for section, values in edit.items():
        params[section].update(values)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    for name in ("task", "prepared"):
        (tmp_path / name).symlink_to(workspace / name)
    done = _run_claim(tmp_path / "params.yaml", tmp_path, tmp_path)
    assert done.returncode == 1
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("text_rl_claim: ") and message in last, done.stderr
    assert not (tmp_path / "plots").exists() and not (tmp_path / "metrics").exists()
    if (tmp_path / "mlflow.db").exists():
        with sqlite3.connect(tmp_path / "mlflow.db") as db:
            assert db.execute("SELECT COUNT(*) FROM runs").fetchone() == (0,)
        db.close()


def test_the_study_declares_what_it_reads() -> None:
    stage = yaml.safe_load((ROOT / "studies/dvc.yaml").read_text())["stages"]["text_rl_claim"]
    deps, params = set(stage["deps"]), stage["params"]
    assert {"data/text/task", "data/text/prepared", "models/text/ar", "models/text/mdm",
            "pipeline_lib/text/rl_claim.py", "pipeline_lib/core/claims.py"} <= deps
    assert {"text_model", "text_task", "text_sft", "text_task_evaluate", "text_rl_claim"} <= set(params)
    rl = {key.removeprefix("text_rl.") for key in params if str(key).startswith("text_rl.")}
    fields = {field.name for field in dataclasses.fields(load_params(ROOT / "params.yaml").text_rl)}
    assert rl == fields - {"method", "epochs"}  # every text_rl key the study reads, and only those
    outs = [next(iter(out)) for out in stage["outs"]] + [next(iter(out)) for out in stage["metrics"]]
    assert outs == ["plots/text_rl_claim/runs.csv", "plots/text_rl_claim/claim.png", "metrics/text/rl_claim.json"]
