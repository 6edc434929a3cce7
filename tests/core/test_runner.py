"""The stage runner against a real MLflow store (sqlite under tmp_path): the run it opens and its lineage, bad input
as one line before any run, and a rerun after a kill resuming the run its checkpoint names."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import mlflow
import pytest
import torch

from pipeline_lib.core.checkpoints import CHECKPOINT_NAME
from pipeline_lib.core.config import CoreParams, load_params
from pipeline_lib.core.errors import ConfigError, DataError, NonFiniteLossError
from pipeline_lib.core.runner import ONE_LINE_ERRORS, Stage, named_folders, run_stage
from pipeline_lib.core.tracking import Tracker


@pytest.fixture
def store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> mlflow.MlflowClient:
    """Runs go to a sqlite store under tmp_path; the project root (for the git tags) is tmp_path, outside git."""
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("DVC_ROOT", str(tmp_path))
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    return mlflow.MlflowClient(uri)


@pytest.fixture
def params_file(tmp_path: Path) -> Path:
    path = tmp_path / "params.yaml"
    path.write_text("seed: 3\ndevice: cpu\ntracking:\n  experiment: runner-test\n")
    return path


def _load(path: Path) -> CoreParams:
    return load_params(path, CoreParams)


def _no_params(params: CoreParams) -> dict[str, Any]:
    return {}


def _runs(client: mlflow.MlflowClient) -> list[Any]:
    experiment = client.get_experiment_by_name("runner-test")
    return client.search_runs([experiment.experiment_id]) if experiment else []


def test_a_run_opens_one_mlflow_run_named_after_the_stage_with_its_lineage(
        store: mlflow.MlflowClient, params_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    upstream = tmp_path / "prepared"
    upstream.mkdir()
    (upstream / "run.json").write_text(json.dumps({"run_id": "fetch-run"}))
    seen: dict[str, Any] = {}

    def train(params: CoreParams, tracker: Tracker, device: torch.device | None) -> dict[str, float]:
        seen.update(run_id=tracker.run_id, device=device, seed=params.seed)
        tracker.log_metrics({"loss": 0.5})
        return {"loss": 0.5, "steps": 2}

    stage = Stage("toy", _load, run=train, logged=lambda params: {"seed": params.seed}, device=True,
                  inputs=lambda _: {"data": "ab" * 32}, tags=lambda: {"objective": "ar"},
                  upstream={"fetch": upstream, "pretrain": tmp_path / "no-run-record", "scratch": None})
    assert run_stage(stage, params_file) == {"loss": 0.5, "steps": 2}

    (run,) = _runs(store)
    tags = run.data.tags
    assert run.info.run_name == "toy" and run.info.status == "FINISHED" and run.info.run_id == seen["run_id"]
    assert seen["device"] == torch.device("cpu") and seen["seed"] == 3
    assert tags["stage"] == "toy" and tags["objective"] == "ar" and tags["input.data.sha256"] == "ab" * 32
    assert tags["upstream.fetch.run_id"] == "fetch-run" and tags["upstream.pretrain.run_id"] == "unknown"
    assert "upstream.scratch.run_id" not in tags and "resumed" not in tags
    assert run.data.params == {"seed": "3"} and run.data.metrics["loss"] == 0.5
    assert capsys.readouterr().out.splitlines()[-1] == "toy: loss 0.5, steps 2"


def test_an_error_in_the_check_is_one_line_and_opens_no_run(store: mlflow.MlflowClient, params_file: Path) -> None:
    def check(params: CoreParams) -> None:
        raise ConfigError(f"toy.batch_size=64: is larger than the 10 images (seed {params.seed})")

    def train(params: CoreParams, tracker: Tracker, device: torch.device | None) -> dict[str, float]:
        raise AssertionError("the entry point ran after a failed check")

    stage = Stage("toy", _load, run=train, logged=_no_params, check=check)
    with pytest.raises(SystemExit) as stopped:
        run_stage(stage, params_file)
    assert stopped.value.code == "toy: toy.batch_size=64: is larger than the 10 images (seed 3)"
    assert not _runs(store)


def test_bad_params_and_bad_data_are_one_line(store: mlflow.MlflowClient, params_file: Path) -> None:
    params_file.write_text("seed: -1\n")
    stage = Stage("toy", _load, run=lambda *_: {}, logged=_no_params)
    with pytest.raises(SystemExit, match=r"^toy: seed=-1: must be an integer in \[0, 2\*\*32\)"):
        run_stage(stage, params_file)
    assert not _runs(store)

    params_file.write_text("tracking:\n  experiment: runner-test\n")
    for error in (DataError("http://example.invalid/x.tar: 404"), FileNotFoundError("models/x/config.json"),
                  NonFiniteLossError("loss is nan at step 3")):
        def fail(*_: Any, error: Exception = error) -> dict[str, float]:
            raise error

        with pytest.raises(SystemExit) as stopped:
            run_stage(Stage("toy", _load, run=fail, logged=_no_params), params_file)
        assert stopped.value.code == f"toy: {error}"
    assert {run.info.status for run in _runs(store)} == {"FAILED"}  # the run opened, then failed

    def bug(*_: Any) -> dict[str, float]:
        raise KeyError("a bug, not bad input")

    with pytest.raises(KeyError):  # anything else keeps its traceback
        run_stage(Stage("toy", _load, run=bug, logged=_no_params), params_file)


def test_a_rerun_resumes_the_run_its_checkpoint_names(store: mlflow.MlflowClient, params_file: Path,
                                                      tmp_path: Path) -> None:
    checkpoints = tmp_path / "checkpoints"
    executions: list[str | None] = []

    def train(params: CoreParams, tracker: Tracker, device: torch.device | None) -> dict[str, float]:
        executions.append(tracker.run_id)
        if len(executions) == 1:  # the first execution checkpoints, then dies
            checkpoints.mkdir()
            torch.save({"fingerprint": "fp-1", "run_id": tracker.run_id, "step": 4}, checkpoints / CHECKPOINT_NAME)
            raise DataError("the machine went away")
        return {"steps": 8}

    def stage(fingerprint: str) -> Stage[CoreParams]:
        return Stage("toy", _load, run=train, logged=_no_params, device=True, checkpoints=checkpoints,
                     fingerprint=lambda params: fingerprint)

    with pytest.raises(SystemExit, match=r"^toy: the machine went away$"):
        run_stage(stage("fp-1"), params_file)
    run_stage(stage("fp-1"), params_file)
    (run,) = _runs(store)
    assert executions == [run.info.run_id] * 2
    assert run.info.status == "FINISHED" and run.data.tags["resumed"] == "true"

    run_stage(stage("fp-2"), params_file)  # other params or data: the checkpoint is not this run's
    assert len(_runs(store)) == 2 and executions[2] != executions[0]


def test_stage_declarations_and_helpers(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match="checkpoints and fingerprint go together"):
        Stage("toy", _load, run=lambda *_: {}, logged=_no_params, checkpoints=tmp_path)
    assert NonFiniteLossError in ONE_LINE_ERRORS
    assert named_folders(["ar=models/ar", "mdm=m"], "--model") == {"ar": Path("models/ar"), "mdm": Path("m")}
    for bad in ([], ["ar"], ["=models/ar"], ["ar="]):
        with pytest.raises(ValueError, match=r"^--model .*: give one or more NAME=FOLDER"):
            named_folders(bad, "--model")
