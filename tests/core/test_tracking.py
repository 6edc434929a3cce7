"""Tracking against real MLflow stores: where runs go, what a fetch run carries, what a failed one shows."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
import yaml

from pipeline_lib.core.config import flatten, params_hash
from pipeline_lib.core.tracking import (
    MlflowTracker,
    artifact_location,
    git_state,
    project_root,
    tracking_uri,
    upstream_runs,
    write_run_record,
)
from pipeline_lib.params import load_params

ROOT = Path(__file__).resolve().parents[2]


def _run_fetch(tmp_path: Path, env: dict[str, str], **data: object) -> subprocess.CompletedProcess:
    """Run the fetch stage as DVC would (`python -m stages.fetch`) with tiny params."""
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["data"].update({"max_images": 60, **data})
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    command = [sys.executable, "-m", "stages.fetch", "--params", str(tmp_path / "params.yaml"),
               "--out", str(tmp_path / "prepared"), "--cache-dir", str(tmp_path / "cache")]
    return subprocess.run(command, cwd=ROOT, env={**os.environ, **env}, capture_output=True, text=True,
                          timeout=300)


def test_default_store_follows_dvc_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("DVC_ROOT", str(tmp_path))
    assert project_root() == tmp_path.resolve()
    uri = tracking_uri()
    assert uri == f"sqlite:///{tmp_path.resolve()}/mlflow.db"
    assert artifact_location(uri, tmp_path.resolve()) == (tmp_path.resolve() / "mlartifacts").as_uri()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert tracking_uri() == "http://127.0.0.1:5000"
    assert artifact_location(tracking_uri(), tmp_path) is None  # the server decides


def test_fetch_run_carries_lineage_params_and_datasets(tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    done = _run_fetch(tmp_path, {"MLFLOW_TRACKING_URI": uri, "DVC_EXP_NAME": "tiny-exp"})
    assert done.returncode == 0, done.stderr

    client = mlflow.MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("ssl-pipeline").experiment_id])
    tags, params = run.data.tags, run.data.params
    assert run.info.run_name == "fetch" and run.info.status == "FINISHED"
    assert tags["stage"] == "fetch" and tags["dvc.exp_name"] == "tiny-exp"
    assert len(tags["git.commit"]) == 40 or tags["git.commit"] == "unknown"
    assert tags["git.dirty"] in {"true", "false", "unknown"}
    assert tags["input.source.sha256"] == tags["input.source.sha256"].lower() and len(tags["input.source.sha256"]) == 64
    expected = {"seed": 0, **flatten(load_params(tmp_path / "params.yaml").data, prefix="data.")}
    assert tags["params.hash"] == params_hash(expected)
    assert params["data.source"] == "digits" and params["data.max_images"] == "60"
    assert params["data.url"] == "null" and params["seed"] == "0"
    assert run.data.metrics["labeled.num_images"] == 5 and run.data.metrics["image.channels"] == 1

    contexts = {}
    for item in run.inputs.dataset_inputs:
        context = {t.key: t.value for t in item.tags}["mlflow.data.context"]
        contexts[context] = item.dataset
    assert set(contexts) == {"unlabeled", "labeled", "rl", "test"}
    meta = (tmp_path / "prepared" / "labeled" / "meta.json").read_text()
    assert contexts["labeled"].digest in meta  # the digest is the leading part of images.npy's sha256
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"samples.png", "prepared"} <= artifacts
    record = (tmp_path / "prepared" / "run.json").read_text()
    assert run.info.run_id in record


def test_failed_fetch_marks_run_failed_and_names_the_problem(tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    done = _run_fetch(tmp_path, {"MLFLOW_TRACKING_URI": uri}, source="imagefolder",
                      url="http://127.0.0.1:9/pets.tar.gz", sha256="a" * 64, max_images=None)
    assert done.returncode != 0
    assert "fetch:" in done.stderr and "http://127.0.0.1:9/pets.tar.gz" in done.stderr
    assert "Traceback" not in done.stderr
    client = mlflow.MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("ssl-pipeline").experiment_id])
    assert run.info.status == "FAILED"
    assert not (tmp_path / "prepared").exists()


def test_bad_params_fail_before_any_run(tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    done = _run_fetch(tmp_path, {"MLFLOW_TRACKING_URI": uri}, label_fraction=1.5)
    assert done.returncode != 0
    assert "data.label_fraction=1.5: must be in (0, 1]" in done.stderr
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "prepared").exists()


def test_tracker_batches_metrics_by_step(tmp_path: Path) -> None:
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/mlflow.db")
    with mlflow.start_run() as run:
        tracker = MlflowTracker(run.info.run_id, flush_every=50)
        for step in range(120):
            tracker.log_metrics({"loss": 1.0 / (step + 1), "lr": 0.1}, step=step)
        client = mlflow.MlflowClient()
        sent = len(client.get_metric_history(run.info.run_id, "loss"))
        assert 0 < sent < 120  # buffered: some batches sent, the rest waits for flush
        tracker.flush()
    history = client.get_metric_history(run.info.run_id, "loss")
    assert [m.step for m in sorted(history, key=lambda m: m.step)] == list(range(120))


def _git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=repo, check=True, capture_output=True, text=True).stdout


def test_git_dirty_ignores_what_dvc_writes_and_names_what_else_changed(tmp_path: Path) -> None:
    """DVC rewrites dvc.lock, the committed outs it records there (metrics, plots) and its .gitignore files as
    the pipeline runs: a checkout is dirty only when the source (code, params, dvc.yaml, pointers) changed."""
    repo = tmp_path / "repo"
    lock = {"schema": "2.0", "stages": {"train@ar": {"cmd": "x", "outs": [
        {"path": "metrics/train.json", "md5": "0"}, {"path": "plots/train", "md5": "1.dir"}]}}}
    files = {"dvc.yaml": "stages: {}\n", "dvc.lock": yaml.safe_dump(lock), "params.yaml": "seed: 0\n",
             "metrics/train.json": "{}\n", "plots/train/loss.csv": "step\n", "models/.gitignore": "/x\n",
             "code.py": "pass\n", "data/raw.dvc": "outs: []\n", "README.md": "x\n"}
    for name, text in files.items():
        (repo / name).parent.mkdir(parents=True, exist_ok=True)
        (repo / name).write_text(text)
    _git(repo, "init", "-q")
    _git(repo, "add", "-A")
    _git(repo, "-c", "user.name=t", "-c", "user.email=t@example.com", "commit", "-q", "-m", "project")
    commit = _git(repo, "rev-parse", "HEAD").strip()
    assert git_state(repo) == {"git.commit": commit, "git.dirty": "false"}

    (repo / "metrics/train.json").write_text('{"loss": 1}\n')
    (repo / "plots/train/loss.csv").unlink()  # DVC deletes an out before its stage reruns
    (repo / "models/.gitignore").write_text("/x\n/y\n")
    (repo / "dvc.lock").write_text(yaml.safe_dump({"schema": "2.0", "stages": {}}))  # the committed lock still counts
    assert git_state(repo)["git.dirty"] == "false"
    (repo / "mlflow.db").write_text("untracked files never count")
    assert git_state(repo)["git.dirty"] == "false"

    for name in ("params.yaml", "code.py", "data/raw.dvc", "dvc.yaml"):
        (repo / name).write_text((repo / name).read_text() + "# edited\n")
        state = git_state(repo)
        assert state["git.dirty"] == "true" and state["git.dirty_paths"] == name, state
        _git(repo, "checkout", "--", name)
    _git(repo, "mv", "README.md", "README.txt")
    assert git_state(repo)["git.dirty_paths"] == "README.txt, README.md"  # both sides of a rename


def test_git_state_outside_a_repository(tmp_path: Path) -> None:
    assert git_state(tmp_path) == {"git.commit": "unknown", "git.dirty": "unknown"}


def test_upstream_runs_reads_each_folders_run_record(tmp_path: Path) -> None:
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/mlflow.db")
    with mlflow.start_run() as run:
        write_run_record(tmp_path / "prepared" / "run.json", MlflowTracker(run.info.run_id))
    folders = {"fetch": tmp_path / "prepared", "pretrain": tmp_path / "no-record", "finetune": None}
    assert upstream_runs(folders) == {"fetch": run.info.run_id, "pretrain": "unknown"}  # None: an input left out
