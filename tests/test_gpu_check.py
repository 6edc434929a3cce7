"""benchmarks/gpu_check.py: its whole code path on the CPU at toy size (`--smoke`), and its refusals before any work."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.py"


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    """The script with `args`, its stages logging to their own project's store (no MLFLOW_TRACKING_URI)."""
    env = {**os.environ, "DVC_NO_ANALYTICS": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=900, env=env)


@pytest.fixture(scope="module")
def smoke(tmp_path_factory: pytest.TempPathFactory) -> tuple[subprocess.CompletedProcess[str], Path]:
    out = tmp_path_factory.mktemp("gpu-check") / "out"
    return _run("--smoke", "--out", str(out)), out


def test_smoke_run_succeeds_and_writes_both_reports(smoke: tuple[subprocess.CompletedProcess[str], Path]) -> None:
    done, out = smoke
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads((out / "gpu_check.json").read_text())
    assert report["smoke"] is True and report["device"] == "cpu"
    assert report["total_seconds"] > 0
    assert sorted(path.name for path in out.iterdir()) == ["gpu_check.json", "gpu_check.md"]  # no temporary left
    table = (out / "gpu_check.md").read_text()
    assert "| pretrain |" in table and "| vit 32px/4 | compiled |" in table and "Failed" not in table


def test_smoke_pipeline_reproduces_fetch_and_pretrain(smoke: tuple[subprocess.CompletedProcess[str], Path]) -> None:
    pipeline = json.loads((smoke[1] / "gpu_check.json").read_text())["pipeline"]
    assert pipeline["error"] is None and pipeline["params"] == {"device": "cpu"}
    assert list(pipeline["stages"]) == ["fetch", "pretrain"]
    assert all(stage["seconds"] > 0 for stage in pipeline["stages"].values())
    assert pipeline["total_seconds"] == pytest.approx(sum(stage["seconds"] for stage in pipeline["stages"].values()))
    pretrain = pipeline["stages"]["pretrain"]["metrics"]
    assert set(pretrain) == {"loss", "images_per_second", "train_seconds"}
    assert all(value > 0 for value in pretrain.values())


def test_smoke_mae_steps_with_compile_off_and_on(smoke: tuple[subprocess.CompletedProcess[str], Path]) -> None:
    steps = json.loads((smoke[1] / "gpu_check.json").read_text())["mae_steps"]
    assert steps["error"] is None
    for name, compiled in (("eager", False), ("compiled", True)):
        done = steps[name]
        assert (done["compiled"], done["precision"], done["fused_adamw"], done["batch"]) == (compiled, "bf16", True, 8)
        assert done["threads"] >= 1 and done["wall_seconds"] > 0
        mae, mfu = done["methods"]["mae"], done["mfu"]
        assert mae["seconds_per_step"] > 0 and mae["warmup_seconds"] > 0
        assert mae["images_per_second"] == pytest.approx(8 / mae["seconds_per_step"])
        assert min(mfu["gflop_per_image"], mfu["matmul_peak_tflops"], mfu["share_of_matmul_peak"]) > 0
        assert mfu["matmul_size"] == 256 and mfu["matmul_peak_tflops"] == max(mfu["matmul_tflops_before_after"])
        # FLOP/s = FLOPs per step / seconds per step, and its share of the matmul peak
        assert mfu["achieved_tflops"] == pytest.approx(mfu["gflop_per_image"] * 8 / mae["seconds_per_step"] / 1e3)
        assert mfu["share_of_matmul_peak"] == pytest.approx(mfu["achieved_tflops"] / mfu["matmul_peak_tflops"])
        assert mfu["table_peak_tflops"] is None and mfu["mfu"] is None  # no data-sheet peak for a CPU


@pytest.mark.skipif(torch.cuda.is_available(), reason="without --smoke it runs the whole check on this GPU")
def test_without_cuda_it_refuses_in_one_line_and_writes_nothing(tmp_path: Path) -> None:
    done = _run("--out", str(tmp_path / "out"))
    assert done.returncode == 2 and "CUDA is not available on this machine" in done.stderr.splitlines()[-1]
    assert not (tmp_path / "out").exists()


def test_an_out_that_is_a_file_is_refused(tmp_path: Path) -> None:
    (tmp_path / "out").write_text("a file")
    done = _run("--smoke", "--out", str(tmp_path / "out"))
    assert done.returncode == 2 and "--out" in done.stderr.splitlines()[-1] and "is a file" in done.stderr
    assert (tmp_path / "out").read_text() == "a file"
