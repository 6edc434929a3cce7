"""The failure drill: kill -9 each training stage mid-run under `dvc repro`, run `dvc repro` again, and the
pipeline completes with exactly the metrics, models and loss curves of an uninterrupted run.

Two copies of one committed project with tiny params: `reference` runs `dvc repro` once; `drill` runs it
again and again, each time SIGKILLing the whole process group (dvc and the stage) as soon as the next training
stage has checkpointed part of its run: pretrain, finetune and finetune_scratch (in the order DVC picks), rl
during GRPO and rl during a baseline. A last `dvc repro` finishes. Both copies run at the same time, one
thread each, to keep the module near three minutes on two cores; every stage process pays ~11 s of imports.
"""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import mlflow
import pytest
import torch
import yaml

TRAINING_STAGES = ("pretrain", "finetune", "finetune_scratch", "rl")
OUTS = {"pretrain": "models/pretrain", "finetune": "models/finetune", "finetune_scratch": "models/finetune_scratch",
        "rl": "models/rl"}
# Each round of the drill kills the first of its targets (stage, checkpoint) to checkpoint an odd step past a
# quarter of its run: inside a logging window of 2 steps, and for rl between the two updates of a batch (GRPO
# resumes with the batch's sampled actions from the checkpoint). finetune and finetune_scratch are independent,
# so DVC may run either first: whichever it runs is killed, and the other in the next round. rl is killed twice:
# in GRPO (which carries the stage's MLflow run), then in the expected-reward baseline, after GRPO finished.
ROUNDS = [
    {"pretrain": "checkpoints/pretrain/last.pt"},
    {"finetune": "checkpoints/finetune/last.pt", "finetune_scratch": "checkpoints/finetune_scratch/last.pt"},
    {"finetune": "checkpoints/finetune/last.pt", "finetune_scratch": "checkpoints/finetune_scratch/last.pt"},
    {"rl": "checkpoints/rl/grpo/last.pt"},
    {"rl": "checkpoints/rl/expected_reward/last.pt"},
]
TOTAL_STEPS = 40  # of every trainer, with the params below
# Keys that measure the machine, not the model: throughput and wall-clock seconds. `resumed_from_step` is
# compared with where the kill landed instead.
UNTIMED = re.compile(r"(^|\.)(images_per_second|samples_per_second|tokens_per_second|train_seconds)(\.|$)")


def _run(repo: Path, *command: str) -> str:
    done = subprocess.run(command, cwd=repo, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"{' '.join(command)} failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout + done.stderr


def _tiny(params: dict[str, Any]) -> None:
    """Every trainer takes 40 steps, checkpointing each."""
    params["device"] = "cpu"
    params["data"]["max_images"] = 200  # 160 unlabeled, 16 labeled, 16 rl, 40 test images
    params["model"].update(embed_dim=32, depth=1, num_heads=2)
    # log_every 2 and a checkpoint every step: a kill at an odd step would cut a logging window in two, were a
    # checkpoint not to close the window (the base trainer's rule)
    params["pretrain"].update(epochs=8, batch_size=32, warmup_epochs=1.0, decoder_embed_dim=32, decoder_depth=1,
                              decoder_num_heads=2, checkpoint_every=1, log_every=2, knn_k=5)  # 8 x 5 steps
    params["finetune"].update(epochs=20, batch_size=8, warmup_epochs=1.0, checkpoint_every=1, log_every=2)  # 20 x 2
    params["evaluate"].update(knn_k=5)
    params["rl"].update(epochs=10, batch_size=8, group_size=4, num_iterations=2, checkpoint_every=1,
                        log_every=2)  # 10 x 2 batches x 2 updates, for GRPO and each baseline


def _checkpoint_step(path: Path) -> int:
    try:
        return int(torch.load(path, map_location="cpu", weights_only=True)["step"])
    except Exception:  # not written yet
        return 0


def _stamp(path: Path) -> tuple[int, int]:
    """Changes with every checkpoint written: each is a new file renamed into place."""
    try:
        stat = path.stat()
    except FileNotFoundError:
        return 0, 0
    return stat.st_ino, stat.st_mtime_ns


def _start_repro(repo: Path, log: IO[str]) -> subprocess.Popen:
    """`dvc repro` in its own session: its process group holds dvc and the stage command it runs."""
    return subprocess.Popen(["dvc", "repro"], cwd=repo, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)


def _kill_group(process: subprocess.Popen) -> None:
    """SIGKILL every process of the group, then wait until none is left (the stage must not write on)."""
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        return
    process.wait()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            os.killpg(process.pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.05)
    raise AssertionError(f"processes of group {process.pid} outlived SIGKILL")


def _locked_stages(repo: Path) -> set[str]:
    """Stages DVC recorded as complete in dvc.lock."""
    lock = repo / "dvc.lock"
    return set(yaml.safe_load(lock.read_text())["stages"]) if lock.is_file() else set()


def _ran(output: str) -> list[str]:
    """The stages a `dvc repro` ran (not those it skipped as unchanged)."""
    return re.findall(r"Running stage '(\w+)'", output)


@dataclass
class Kill:
    """Where one round of the drill killed `dvc repro`."""

    stage: str
    checkpoint: str
    step: int
    ran: list[str]
    seconds: float


@dataclass
class Drill:
    reference: Path
    drill: Path
    kills: list[Kill] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)


def _interrupt(repo: Path, targets: dict[str, str], log_path: Path) -> Kill:
    """Run `dvc repro` until a target's checkpoint holds an odd step past a quarter of the run, then kill -9 its
    process group. The group is stopped (SIGSTOP) while the checkpoint is read, so the kill lands right there."""
    started = time.monotonic()
    done_before = _locked_stages(repo)
    targets = {stage: path for stage, path in targets.items() if not (repo / path).exists()}  # not killed yet
    with open(log_path, "w") as log:
        process = _start_repro(repo, log)
        try:
            seen: dict[str, tuple[int, int]] = {}
            hit = None
            while hit is None:
                for stage, checkpoint in targets.items():
                    stamp = _stamp(repo / checkpoint)
                    if stamp == seen.get(checkpoint) or _checkpoint_step(repo / checkpoint) < TOTAL_STEPS // 4:
                        seen[checkpoint] = stamp
                        continue
                    os.killpg(process.pid, signal.SIGSTOP)
                    seen[checkpoint] = _stamp(repo / checkpoint)
                    if _checkpoint_step(repo / checkpoint) % 2:
                        hit = stage, checkpoint
                        break
                    os.killpg(process.pid, signal.SIGCONT)
                assert process.poll() is None, f"dvc repro ended before a kill:\n{log_path.read_text()[-3000:]}"
                assert time.monotonic() - started < 300, f"no checkpoint of {sorted(targets)} within 300 s"
                time.sleep(0.01)
        finally:
            _kill_group(process)
    stage, checkpoint = hit
    step = _checkpoint_step(repo / checkpoint)
    assert TOTAL_STEPS // 4 <= step < TOTAL_STEPS and step % 2, f"{checkpoint}: the kill landed at step {step}"
    assert stage not in _locked_stages(repo) and not (repo / OUTS[stage]).exists(), f"{stage} wrote its out"
    assert not (repo / f"metrics/{stage}.json").exists(), f"{stage} wrote its metrics"
    ran = _ran(log_path.read_text())
    assert not set(ran) & done_before, f"stages complete before this round ran again: {ran}"
    return Kill(stage, checkpoint, step, ran, time.monotonic() - started)


@pytest.fixture(scope="module")
def drill(tmp_path_factory: pytest.TempPathFactory, make_project: Callable[..., Path]) -> Iterator[Drill]:
    """The uninterrupted reference and the drill, run side by side; timings of each phase."""
    started = time.monotonic()
    base = tmp_path_factory.mktemp("drill")
    template = make_project(base / "template", _tiny)  # one snapshot of the working tree for both copies
    result = Drill(shutil.copytree(template, base / "reference", symlinks=True),
                   shutil.copytree(template, base / "drill", symlinks=True))
    result.timings["setup"] = time.monotonic() - started

    reference_log = open(base / "reference.log", "w")  # noqa: SIM115 - closed below, after the drill
    reference = _start_repro(result.reference, reference_log)
    try:
        for index, targets in enumerate(ROUNDS):
            kill = _interrupt(result.drill, targets, base / f"round{index}.log")
            result.kills.append(kill)
            result.timings[f"round {index}: kill {kill.stage} ({Path(kill.checkpoint).parent.name})"] = kill.seconds
        resumed, done_before = time.monotonic(), _locked_stages(result.drill)
        final = _run(result.drill, "dvc", "repro")
        result.timings["final dvc repro"] = time.monotonic() - resumed
        assert not set(_ran(final)) & done_before, final
        waited = time.monotonic()
        assert reference.wait(timeout=600) == 0, (base / "reference.log").read_text()[-3000:]
        result.timings["waiting for the reference after the drill"] = time.monotonic() - waited
    finally:
        _kill_group(reference)
        reference_log.close()
    result.timings["module total"] = time.monotonic() - started
    print("\nkill drill:")
    for kill in result.kills:
        print(f"  killed {kill.stage:<16} at {kill.checkpoint} step {kill.step}/{TOTAL_STEPS} "
              f"(this round ran {', '.join(kill.ran)})")
    for phase, seconds in result.timings.items():
        print(f"  {phase:<52} {seconds:6.1f} s")
    yield result


def _flat(document: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(document, dict):
        return {k: v for key, value in document.items() for k, v in _flat(value, f"{prefix}{key}.").items()}
    return {prefix.rstrip("."): document}


def _metrics(repo: Path, stage: str) -> dict[str, Any]:
    flat = _flat(json.loads((repo / f"metrics/{stage}.json").read_text()))
    return {key: value for key, value in flat.items() if not UNTIMED.search(key) and key != "resumed_from_step"}


@pytest.mark.parametrize("stage", ["pretrain", "finetune", "finetune_scratch", "evaluate", "rl"])
def test_metrics_equal_the_uninterrupted_run(drill: Drill, stage: str) -> None:
    expected, actual = _metrics(drill.reference, stage), _metrics(drill.drill, stage)
    assert expected and actual == expected


def test_resumed_from_where_the_kill_landed(drill: Drill) -> None:
    for kill in drill.kills:
        if kill.stage != "rl":  # the rl report has no resumed_from_step (three trainers)
            metrics = json.loads((drill.drill / f"metrics/{kill.stage}.json").read_text())
            assert metrics["resumed_from_step"] == kill.step, kill
            assert json.loads((drill.reference / f"metrics/{kill.stage}.json").read_text())["resumed_from_step"] == 0
    assert sorted({kill.stage for kill in drill.kills}) == sorted(TRAINING_STAGES)


@pytest.mark.parametrize("path", ["models/pretrain/encoder.safetensors", "models/finetune/classifier.safetensors",
                                  "models/finetune_scratch/classifier.safetensors", "models/rl/classifier.safetensors"])
def test_models_are_bit_identical(drill: Drill, path: str) -> None:
    assert (drill.drill / path).read_bytes() == (drill.reference / path).read_bytes()


@pytest.mark.parametrize("stage", ["pretrain", "finetune", "finetune_scratch"])
def test_loss_curves_are_identical(drill: Drill, stage: str) -> None:
    """Every logged window, including the ones a kill cut, averages the same steps as without the kill."""
    def curve(repo: Path) -> list[dict[str, str]]:
        with open(repo / f"plots/{stage}/loss.csv") as handle:
            return [{k: v for k, v in row.items() if not UNTIMED.search(k)} for row in csv.DictReader(handle)]

    assert curve(drill.drill) == curve(drill.reference)


def test_pipeline_is_up_to_date(drill: Drill) -> None:
    assert "up to date" in _run(drill.drill, "dvc", "status")
    assert _locked_stages(drill.drill) == _locked_stages(drill.reference)


def test_each_killed_stage_resumed_its_mlflow_run(drill: Drill) -> None:
    """One run per stage: the killed execution's run was reopened (tag resumed) and finished; none is left
    RUNNING, and the model each stage registered points at that run."""
    client = mlflow.MlflowClient(f"sqlite:///{drill.drill}/mlflow.db")
    experiment = client.get_experiment_by_name("ssl-pipeline").experiment_id
    runs = client.search_runs([experiment])
    assert not [run.info.run_name for run in runs if run.info.status != "FINISHED"]
    by_stage: dict[str, list[Any]] = {}
    for run in runs:
        by_stage.setdefault(run.info.run_name, []).append(run)
    vision = ("fetch", *TRAINING_STAGES, "evaluate")
    assert {stage: len(by_stage.get(stage, [])) for stage in vision} == dict.fromkeys(vision, 1)
    for stage in TRAINING_STAGES:
        run = by_stage[stage][0]
        assert run.data.tags.get("resumed") == "true", stage
        assert json.loads((drill.drill / OUTS[stage] / "run.json").read_text())["run_id"] == run.info.run_id
    assert "resumed" not in by_stage["fetch"][0].data.tags and "resumed" not in by_stage["evaluate"][0].data.tags
