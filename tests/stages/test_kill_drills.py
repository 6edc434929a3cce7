"""The failure drill: kill -9 each training stage mid-run under `dvc repro`, run `dvc repro` again, and the
pipeline completes with exactly the metrics, models and loss curves of an uninterrupted run.

The drill is a committed copy of the toy project's vision track (`toy_params`: every trainer takes 40 steps and
checkpoints every 3rd); the uninterrupted reference is the toy project, reproduced once for all the stage tests
(`toy_project`). `dvc repro` runs in the drill again and again, each time SIGKILLed with its whole process group
(dvc and the stage) once the next training stage has checkpointed step 15 and trained on to step 18: pretrain,
finetune and finetune_scratch (in the order DVC picks), semi, rl during GRPO and rl during a baseline. A last
`dvc repro` finishes. The kill lands at that point every time, not wherever a watcher catches a fast stage: the
stage runs with the test hook in `stop_at_checkpoint/`, which stops it (SIGSTOP) as it is about to replace
checkpoint 15 with checkpoint 18, and the test, waiting for the hook's record, kills the group there.
"""

from __future__ import annotations

import csv
import json
import os
import re
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

TRAINING_STAGES = ("pretrain", "finetune", "finetune_scratch", "semi", "rl")
OUTS = {"pretrain": "models/pretrain", "finetune": "models/finetune", "finetune_scratch": "models/finetune_scratch",
        "semi": "models/semi", "rl": "models/rl"}
# Each round of the drill kills the first of its targets (stage, checkpoint) to reach the kill point: inside a
# logging window of 2 steps (an odd step, where the checkpoint closed the window early), and for rl between the two
# updates of a batch (GRPO resumes with the batch's sampled actions from the checkpoint). finetune and
# finetune_scratch are independent, so DVC may run either first: whichever it runs is killed, and the other in the
# next round. rl is killed twice: in GRPO (which carries the stage's MLflow run), then in the expected-reward
# baseline, after GRPO finished.
ROUNDS = [
    {"pretrain": "checkpoints/pretrain/last.pt"},
    {"finetune": "checkpoints/finetune/last.pt", "finetune_scratch": "checkpoints/finetune_scratch/last.pt"},
    {"finetune": "checkpoints/finetune/last.pt", "finetune_scratch": "checkpoints/finetune_scratch/last.pt"},
    {"semi": "checkpoints/semi/last.pt"},
    {"rl": "checkpoints/rl/grpo/last.pt"},
    {"rl": "checkpoints/rl/expected_reward/last.pt"},
]
TOTAL_STEPS = 40  # of every trainer, with `toy_params`
KILLED_AT = 15  # the checkpoint a killed stage leaves (an odd step, past a quarter of the run); steps 16-18 are lost
HOOK = Path(__file__).resolve().parent / "stop_at_checkpoint"
# Keys that measure the machine, not the model: throughput, wall-clock seconds, seconds a step. `resumed_from_step` is
# compared with where the kill landed instead.
UNTIMED = re.compile(r"(^|\.)(images_per_second|samples_per_second|tokens_per_second|train_seconds|step_time)(\.|$)")


def _env(**extra: str) -> dict[str, str]:
    """The commands' environment: stages log to the project's own store (mlflow.db beside dvc.yaml)."""
    return {**{name: value for name, value in os.environ.items() if name != "MLFLOW_TRACKING_URI"}, **extra}


def _run(repo: Path, *command: str) -> str:
    done = subprocess.run(command, cwd=repo, capture_output=True, text=True, timeout=600, env=_env())
    assert done.returncode == 0, f"{' '.join(command)} failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout + done.stderr


def _checkpoint_step(path: Path) -> int:
    return int(torch.load(path, map_location="cpu", weights_only=True)["step"])


def _start_repro(repo: Path, log: IO[str], env: dict[str, str]) -> subprocess.Popen:
    """`dvc repro` in its own session: its process group holds dvc and the stage command it runs."""
    return subprocess.Popen(["dvc", "repro"], cwd=repo, stdout=log, stderr=subprocess.STDOUT, env=env,
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


def _gone(pid: int) -> bool:
    """Whether process `pid` has ended (a zombie waiting for its reaper counts as ended)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except (FileNotFoundError, ProcessLookupError):
        return True


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
    """Run `dvc repro` until the first target not killed yet is about to write its checkpoint after KILLED_AT,
    then kill -9 the process group: the stage waits there, stopped by the hook, for the kill."""
    started = time.monotonic()
    done_before = _locked_stages(repo)
    targets = {stage: path for stage, path in targets.items() if not (repo / path).exists()}  # not killed yet
    record = log_path.with_suffix(".stopped.json")
    env = _env(PYTHONPATH=os.pathsep.join(filter(None, [str(HOOK), os.environ.get("PYTHONPATH")])),
               STOP_AT_CHECKPOINT=json.dumps({"paths": sorted(targets.values()), "step": KILLED_AT,
                                              "record": str(record)}))
    with open(log_path, "w") as log:
        process = _start_repro(repo, log, env)
        try:
            deadline = time.monotonic() + 600  # no race to win: a guard against a hang only
            while not record.is_file():
                assert process.poll() is None, f"dvc repro ended before a kill:\n{log_path.read_text()[-3000:]}"
                assert time.monotonic() < deadline, f"no checkpoint past {KILLED_AT} of {sorted(targets)} in 600 s"
                time.sleep(0.05)
        finally:
            _kill_group(process)
    stopped = json.loads(record.read_text())
    if not _gone(stopped["pid"]):
        os.kill(stopped["pid"], signal.SIGKILL)
        raise AssertionError(f"the stage ({stopped}) was not in the process group of dvc repro")
    assert process.returncode == -signal.SIGKILL, process.returncode  # dvc itself was killed, not told
    stage = next(stage for stage, path in targets.items() if path == stopped["path"])
    checkpoint, step = stopped["path"], _checkpoint_step(repo / stopped["path"])
    assert step == stopped["step"] == KILLED_AT < stopped["next_step"], f"{checkpoint}: the kill landed at {stopped}"
    assert stage not in _locked_stages(repo) and not (repo / OUTS[stage]).exists(), f"{stage} wrote its out"
    assert not (repo / f"metrics/{stage}.json").exists(), f"{stage} wrote its metrics"
    ran = _ran(log_path.read_text())
    assert not set(ran) & done_before, f"stages complete before this round ran again: {ran}"
    return Kill(stage, checkpoint, step, ran, time.monotonic() - started)


@pytest.fixture(scope="module")
def drill(tmp_path_factory: pytest.TempPathFactory, make_project: Callable[..., Path], toy_params: Callable[..., None],
          request: pytest.FixtureRequest) -> Iterator[Drill]:
    """The drill, then the uninterrupted reference (asked for last: another worker may still be reproducing it);
    timings of each phase."""
    started = time.monotonic()
    repo = make_project(tmp_path_factory.mktemp("drill") / "drill", toy_params, text=False)
    kills, timings = [], {"setup": time.monotonic() - started}
    for index, targets in enumerate(ROUNDS):
        kill = _interrupt(repo, targets, repo.parent / f"round{index}.log")
        kills.append(kill)
        timings[f"round {index}: kill {kill.stage} ({Path(kill.checkpoint).parent.name})"] = kill.seconds
    resumed, done_before = time.monotonic(), _locked_stages(repo)
    final = _run(repo, "dvc", "repro")
    timings["final dvc repro"] = time.monotonic() - resumed
    assert not set(_ran(final)) & done_before, final
    waited = time.monotonic()
    result = Drill(request.getfixturevalue("toy_project"), repo, kills, timings)
    timings["waiting for the reference (toy_project)"] = time.monotonic() - waited
    timings["module total"] = time.monotonic() - started
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


@pytest.mark.parametrize("stage", ["pretrain", "finetune", "finetune_scratch", "semi", "evaluate", "rl"])
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
                                  "models/finetune_scratch/classifier.safetensors",
                                  "models/semi/classifier.safetensors", "models/rl/classifier.safetensors"])
def test_models_are_bit_identical(drill: Drill, path: str) -> None:
    assert (drill.drill / path).read_bytes() == (drill.reference / path).read_bytes()


@pytest.mark.parametrize("stage", ["pretrain", "finetune", "finetune_scratch", "semi"])
def test_loss_curves_are_identical(drill: Drill, stage: str) -> None:
    """Every logged window, including the ones a kill cut, averages the same steps as without the kill."""
    def curve(repo: Path) -> list[dict[str, str]]:
        with open(repo / f"plots/{stage}/loss.csv") as handle:
            return [{k: v for k, v in row.items() if not UNTIMED.search(k)} for row in csv.DictReader(handle)]

    assert curve(drill.drill) == curve(drill.reference)


def test_pipeline_is_up_to_date(drill: Drill) -> None:
    assert "up to date" in _run(drill.drill, "dvc", "status")
    vision = {stage for stage in _locked_stages(drill.reference) if not stage.startswith("text_")}
    assert _locked_stages(drill.drill) == vision == {"fetch", *TRAINING_STAGES, "evaluate"}


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
