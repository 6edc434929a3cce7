"""The pretrain stage as a process: killed with SIGKILL and resumed, and run on 2 processes with torchrun."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file

from pipeline_lib.vision.config import DataParams
from pipeline_lib.vision.data.prepare import prepare_dataset

ROOT = Path(__file__).resolve().parents[2]
HOOK = Path(__file__).resolve().parent / "stop_at_checkpoint"  # see its sitecustomize.py


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Prepared digits and a params file for a short MAE run with a checkpoint every step."""
    root = tmp_path_factory.mktemp("pretrain")
    prepare_dataset(DataParams(max_images=300), 0, root / "prepared", root / "cache")
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["device"] = "cpu"
    params["model"].update(embed_dim=32, depth=2, num_heads=2)
    params["pretrain"].update(epochs=30, batch_size=32, warmup_epochs=1.0, base_lr=1.0e-3, decoder_embed_dim=32,
                              decoder_depth=1, decoder_num_heads=2, checkpoint_every=1, log_every=1)
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    return root


def _command(root: Path, name: str, launcher: list[str]) -> list[str]:
    return [*launcher, "-m", "stages.pretrain", "--params", str(root / "params.yaml"),
            "--data", str(root / "prepared"), "--out", str(root / name / "model"),
            "--metrics", str(root / name / "metrics.json"), "--plots", str(root / name / "plots"),
            "--checkpoints", str(root / name / "checkpoints")]


def _env(root: Path) -> dict[str, str]:
    return {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{root}/mlflow.db", "OMP_NUM_THREADS": "1"}


def _run(root: Path, name: str, launcher: list[str] | None = None) -> None:
    done = subprocess.run(_command(root, name, launcher or [sys.executable]), cwd=ROOT, env=_env(root),
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr


def _losses(root: Path, name: str) -> list[float]:
    with open(root / name / "plots" / "loss.csv") as handle:
        return [float(row["loss"]) for row in csv.DictReader(handle)]


def _checkpoint_step(path: Path) -> int:
    return int(torch.load(path, map_location="cpu", weights_only=True)["step"])


@pytest.fixture(scope="module")
def straight(workspace: Path) -> str:
    """One uninterrupted run on one process: the reference of both tests."""
    _run(workspace, "straight")
    return "straight"


def test_kill_and_resume_gives_the_uninterrupted_weights(workspace: Path, straight: str) -> None:
    # The run stops itself (the kill drills' hook) as it is about to replace checkpoint 12 with 13; kill -9 there.
    record = workspace / "killed-at.json"
    env = {**_env(workspace), "PYTHONPATH": os.pathsep.join(filter(None, [str(HOOK), os.environ.get("PYTHONPATH")])),
           "STOP_AT_CHECKPOINT": json.dumps({"paths": [str(workspace / "killed" / "checkpoints" / "last.pt")],
                                             "step": 12, "record": str(record)})}
    process = subprocess.Popen(_command(workspace, "killed", [sys.executable]), cwd=ROOT, env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 300  # a guard against a hang, not a race: the run waits for the kill
        while not record.is_file() and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
    assert process.returncode == -signal.SIGKILL, "the run must be killed mid-training"
    checkpoint = workspace / "killed" / "checkpoints" / "last.pt"
    assert json.loads(record.read_text())["step"] == _checkpoint_step(checkpoint) == 12
    assert not (workspace / "killed" / "model").exists()

    _run(workspace, "killed")  # the same command again: resumes from the checkpoint
    reference = load_file(workspace / straight / "model" / "encoder.safetensors")
    resumed = load_file(workspace / "killed" / "model" / "encoder.safetensors")
    assert reference.keys() == resumed.keys()
    for key in reference:
        assert torch.equal(reference[key], resumed[key]), key
    assert _losses(workspace, "killed") == _losses(workspace, straight)


def test_torchrun_two_processes_match_one(workspace: Path, straight: str) -> None:
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    _run(workspace, "two", launcher=torchrun)
    one, two = _losses(workspace, straight), _losses(workspace, "two")
    assert len(one) == len(two) == 30 * (240 // 32)
    np.testing.assert_allclose(two, one, rtol=1e-4, atol=1e-5)
