"""The weekly retrain as a user runs it, in a temporary git repo with tiny params: the retrain command (repro,
diffs, gate), a param change that reruns only its dependents, and two queued experiments run in parallel."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import mlflow
import pytest
import yaml

TRAINING = ("fetch", "pretrain", "finetune", "finetune_scratch", "semi", "evaluate", "rl")
MODEL = "ssl-pipeline-classifier"


def _run(repo: Path, *command: str, status: int = 0) -> str:
    env = {name: value for name, value in os.environ.items() if name != "MLFLOW_TRACKING_URI"}  # the project's store
    done = subprocess.run(command, cwd=repo, capture_output=True, text=True, timeout=900, env=env)
    assert done.returncode == status, f"{' '.join(command)} exited {done.returncode}:\n{done.stdout}\n{done.stderr}"
    return done.stdout + done.stderr


def _retrain(repo: Path, *args: str, status: int = 0) -> str:
    return _run(repo, sys.executable, "-m", "pipeline_lib.retrain", *args, status=status)


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory, make_project: Callable[..., Path]) -> Path:
    """A committed git repo holding the project with tiny params; the gate promotes any improvement."""
    return make_project(tmp_path_factory.mktemp("retrain"), _tiny, text=False)


def _tiny(params: dict[str, Any]) -> None:
    params["data"]["max_images"] = 200
    params["model"].update(embed_dim=32, depth=1, num_heads=2)
    params["pretrain"].update(epochs=2, batch_size=32, warmup_epochs=1.0, decoder_embed_dim=32, decoder_depth=1,
                              decoder_num_heads=2)
    params["finetune"].update(epochs=2, batch_size=8, warmup_epochs=1.0)
    params["finetune_scratch"] = {"epochs": 2}
    params["semi"].update(epochs=1, batch_size=32, labeled_batch_size=8, threshold=0.5)
    params["evaluate"].update(knn_k=5)
    params["rl"].update(epochs=1, batch_size=8, group_size=4)
    params["promote"].update(task_ar=None, task_mdm=None)  # the vision track only
    params["promote"]["classifier"]["min_delta"] = 0.0


def _client(repo: Path) -> mlflow.MlflowClient:
    return mlflow.MlflowClient(f"sqlite:///{repo}/mlflow.db")


def _ran(output: str) -> set[str]:
    return {stage for stage in TRAINING if f"Running stage '{stage}'" in output}


def test_bad_override_stops_before_any_work(repo: Path) -> None:
    output = _retrain(repo, "-S", "rl.group_size=1", status=2)
    assert "rl.group_size=1: must be >= 2" in output
    assert not (repo / "data/prepared").exists() and not (repo / "mlflow.db").exists()


def test_retrain_then_param_change_reruns_only_its_dependents_then_the_gate_decides(repo: Path) -> None:
    started = time.monotonic()
    first = _retrain(repo, "--report", "report.md", "--summary", "summary.md")
    print(f"first retrain (whole tiny pipeline): {time.monotonic() - started:.0f} s")
    assert _ran(first) == set(TRAINING)
    client = _client(repo)
    challenger = client.get_model_version_by_alias(MODEL, "challenger")
    assert client.get_model_version_by_alias(MODEL, "champion").version == challenger.version  # first: promoted
    report = (repo / "report.md").read_text()
    assert f"**promoted**: {MODEL}: promoted v{challenger.version} to champion (no champion yet" in report
    assert (repo / "summary.md").read_text() == report + "\n"
    assert "No params changed." in report
    _run(repo, "git", "add", "-A")
    _run(repo, "git", "commit", "-q", "-m", "retrained")  # as the team commits dvc.lock and metrics

    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["rl"]["epochs"] = 3
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    status = _run(repo, "dvc", "status")
    assert status.startswith("rl:") and "modified:           rl" in status, status
    for stage in ("fetch:", "pretrain:", "finetune:", "finetune_scratch:", "semi:", "evaluate:"):
        assert stage not in status, status

    before = json.loads((repo / "metrics/rl.json").read_text())["post_trained"]["reward_greedy"]
    second = _retrain(repo, "--report", "report.md")
    assert _ran(second) == {"rl"}, second
    for stage in ("fetch", "pretrain", "finetune", "finetune_scratch", "semi", "evaluate"):
        assert f"Stage '{stage}' didn't change, skipping" in second
    after = json.loads((repo / "metrics/rl.json").read_text())["post_trained"]["reward_greedy"]
    report = (repo / "report.md").read_text()
    assert "rl.epochs" in report and "post_trained.reward_greedy" in report  # params and metrics diff vs HEAD
    new = client.get_model_version_by_alias(MODEL, "challenger")
    assert int(new.version) > int(challenger.version)
    champion = client.get_model_version_by_alias(MODEL, "champion")
    expected = new.version if after > before else challenger.version  # min_delta 0: any improvement wins
    assert champion.version == expected, report
    assert ("**promoted**" if after > before else "**kept**") in report

    aliases = client.get_registered_model(MODEL).aliases
    again = _run(repo, sys.executable, "-m", "pipeline_lib.promote")
    assert ("unchanged" if after > before else "kept") in again
    assert client.get_registered_model(MODEL).aliases == aliases


def test_two_queued_experiments_run_in_parallel_against_the_sqlite_store(repo: Path) -> None:
    client = _client(repo)
    experiment = client.get_experiment_by_name("ssl-pipeline").experiment_id
    runs_before = {run.info.run_id for run in client.search_runs([experiment])}
    for beta in ("0.1", "0.2"):
        _run(repo, "dvc", "exp", "run", "--queue", "-S", f"rl.beta={beta}")
    _run(repo, "dvc", "queue", "start", "-j", "2")
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        status = _run(repo, "dvc", "queue", "status")
        if "Queued" not in status and "Running" not in status:
            break
        time.sleep(2)
    assert status.count("Success") == 2, status + _run(repo, "dvc", "queue", "logs", "--help")
    logs = "".join(_run(repo, "dvc", "queue", "logs", line.split()[0]) for line in status.splitlines()[1:]
                   if "Success" in line)
    assert "database is locked" not in logs and "OperationalError" not in logs

    new = [run for run in client.search_runs([experiment]) if run.info.run_id not in runs_before]
    rl = [run for run in new if run.info.run_name == "rl"]
    assert len(rl) == 2 and {run.data.params["rl.beta"] for run in rl} == {"0.1", "0.2"}, [r.info for r in new]
    assert all(run.info.status == "FINISHED" for run in new)
    assert len({run.data.tags["dvc.exp_name"] for run in rl}) == 2
    for run in rl:  # each run kept its whole curve and registered its own classifier version
        assert len(client.get_metric_history(run.info.run_id, "reward")) >= 1
        assert client.search_model_versions(f"name = '{MODEL}' and run_id = '{run.info.run_id}'")
