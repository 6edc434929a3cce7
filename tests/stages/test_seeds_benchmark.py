"""benchmarks/seeds.py: a real `dvc repro` per seed in copies of a toy project, the mean and spread it prints
against each copy's metrics files, a failing seed's error line, and bad input stopped before any run."""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
SEEDS = ROOT / "benchmarks/seeds.py"


def _seeds(project: Path, *args: str, status: int = 0) -> str:
    env = {name: value for name, value in os.environ.items() if name != "MLFLOW_TRACKING_URI"}
    done = subprocess.run([sys.executable, str(SEEDS), "--project", str(project), *args], capture_output=True,
                          text=True, timeout=900, env=env)
    assert done.returncode == status, f"seeds.py {' '.join(args)} exited {done.returncode}:\n{done.stdout}{done.stderr}"
    return done.stdout + done.stderr


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory, make_project: Callable[..., Path],
            toy_params: Callable[[dict[str, Any]], None]) -> Path:
    """The toy project (vision track), committed, as a user's checkout: nothing reproduced yet."""
    return make_project(tmp_path_factory.mktemp("seeds") / "project", toy_params, text=False)


def _printed(output: str, metric: str) -> list[str]:
    """The printed row of `metric`: mean, std, min, max, n, then each seed's value."""
    row = next(line.split() for line in output.splitlines() if line.startswith(metric + " "))
    return row[1:]


def test_two_seeds_report_mean_and_spread_of_their_metrics_files(project: Path, tmp_path: Path) -> None:
    work, table, markdown = tmp_path / "copies", tmp_path / "seeds.csv", tmp_path / "seeds.md"
    output = _seeds(project, "--seeds", "0", "1", "--targets", "finetune_scratch", "--jobs", "2",
                    "--workdir", str(work), "--out", str(table), "--markdown", str(markdown))
    assert "2 at a time with 1 thread(s) each" in output  # 2 cores (the tests' affinity) / 2 jobs, or 1 core
    values = {}
    for seed in (0, 1):
        copy = work / f"seed-{seed}"
        assert yaml.safe_load((copy / "params.yaml").read_text())["seed"] == seed
        assert (copy / "data/cache").is_symlink() and (copy / "data/cache").resolve() == (project / "data/cache")
        assert not subprocess.run(["git", "status", "--porcelain", "params.yaml"], cwd=copy, capture_output=True,
                                  text=True, check=True).stdout  # the seed is in the committed copy
        values[seed] = json.loads((copy / "metrics/finetune_scratch.json").read_text())
        assert "Running stage 'finetune_scratch'" in (copy / "repro.log").read_text()
    assert values[0]["train_accuracy"] != values[1]["train_accuracy"] or values[0]["loss"] != values[1]["loss"]
    # Default metrics of a file without headlines: its results, not its bookkeeping (timings, steps).
    printed = {line.split()[0] for line in output.splitlines() if line.startswith("finetune_scratch.json:")}
    assert printed == {"finetune_scratch.json:loss", "finetune_scratch.json:train_accuracy"}
    for key in ("loss", "train_accuracy"):
        seeds = [values[0][key], values[1][key]]
        mean, std, low, high, count, first, second = _printed(output, f"finetune_scratch.json:{key}")
        assert float(mean) == pytest.approx(sum(seeds) / 2, abs=6e-5)
        assert float(std) == pytest.approx(abs(seeds[0] - seeds[1]) / math.sqrt(2), abs=6e-5)  # sample std
        assert (float(low), float(high)) == pytest.approx((min(seeds), max(seeds)), abs=6e-5)
        assert count == "2" and (float(first), float(second)) == pytest.approx(seeds, abs=6e-5)
    with open(table, newline="") as handle:
        rows = {row["metric"]: row for row in csv.DictReader(handle)}
    assert float(rows["finetune_scratch.json:loss"]["seed_1"]) == values[1]["loss"]
    assert "| `finetune_scratch.json:loss` |" in markdown.read_text()
    assert not (project / "mlflow.db").exists() and not (project / "dvc.lock").exists()  # the project is untouched


def test_a_failing_seed_is_reported_with_its_stages_error_line(project: Path, tmp_path: Path) -> None:
    missing = tmp_path / "no-such-folder"
    output = _seeds(project, "--seeds", "3", "4", "--targets", "fetch", "--jobs", "2", "-S", "data.source=imagefolder",
                    "-S", f"data.path={missing}", status=1)
    for seed in (3, 4):
        line = next(line for line in output.splitlines() if line.startswith(f"seed {seed} failed: "))
        assert line.startswith(f"seed {seed} failed: fetch: data.path=") and str(missing) in line, output


@pytest.mark.parametrize(("args", "message"), [
    (["--targets", "evaluat"], "seeds: --targets evaluat: Stage 'evaluat' not found"),
    (["--targets", "evaluate", "-S", "pretrain.epoch=3"], "seeds: -S pretrain.epoch=3: params.yaml has no key "
                                                          "'pretrain.epoch'"),
    (["--targets", "evaluate", "-S", "pretrain.epochs=0"], "pretrain.epochs=0: must be a positive integer"),
    (["--targets", "evaluate", "--metric", "rl.json:*"], "seeds: --metric 'rl.json:*': no metrics file of the "
                                                         "targets' stages matches 'rl.json'"),
    (["--targets", "evaluate", "--metric", "evaluate.json"], "seeds: --metric 'evaluate.json': expected FILE:KEY"),
])
def test_bad_input_stops_before_any_run(project: Path, tmp_path: Path, args: list[str], message: str) -> None:
    output = _seeds(project, "--seeds", "0", "1", "--workdir", str(tmp_path / "copies"), *args, status=2)
    assert message in output and len(output.strip().splitlines()) == 1, output
    assert not (tmp_path / "copies").exists()


def test_a_metric_that_the_last_run_does_not_have_is_refused(project: Path, tmp_path: Path) -> None:
    (project / "metrics").mkdir(exist_ok=True)
    (project / "metrics/finetune_scratch.json").write_text(json.dumps({"loss": 1.0, "train_accuracy": 0.5}))
    try:
        output = _seeds(project, "--seeds", "0", "--targets", "finetune_scratch", "--metric",
                        "finetune_scratch.json:top*", status=2)
    finally:
        (project / "metrics/finetune_scratch.json").unlink()
    assert "--metric 'finetune_scratch.json:top*': matches no metric of finetune_scratch.json" in output
