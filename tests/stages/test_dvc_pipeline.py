"""The pipeline as a user runs it: `dvc repro` and `dvc exp run` in a temporary git repo copy of the project."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import mlflow
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
PROJECT_FILES = ["dvc.yaml", "params.yaml", ".dvcignore", ".gitignore", ".dvc/config", "data/raw/.gitkeep"]
PROJECT_DIRS = ["stages", "pipeline_lib"]


def _run(repo: Path, *command: str) -> str:
    env = {**os.environ, "DVC_NO_ANALYTICS": "1", "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.com",
           "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@example.com"}
    env.pop("MLFLOW_TRACKING_URI", None)  # use the default store, resolved against $DVC_ROOT
    done = subprocess.run(command, cwd=repo, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"{' '.join(command)} failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout + done.stderr


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A git repo holding a copy of the project with tiny params, committed."""
    repo = tmp_path_factory.mktemp("project")
    for name in PROJECT_FILES:
        (repo / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / name, repo / name)
    for name in PROJECT_DIRS:
        shutil.copytree(ROOT / name, repo / name, ignore=shutil.ignore_patterns("__pycache__"))
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["data"]["max_images"] = 200
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    _run(repo, "git", "init", "-q")
    _run(repo, "git", "add", "-A")
    _run(repo, "git", "commit", "-q", "-m", "project")
    return repo


def _labeled_count(repo: Path) -> int:
    return json.loads((repo / "data/prepared/labeled/meta.json").read_text())["num_images"]


def test_repro_then_noop_then_experiment(repo: Path) -> None:
    _run(repo, "dvc", "repro")
    for split in ("unlabeled", "labeled", "rl", "test"):
        assert (repo / "data/prepared" / split / "meta.json").is_file()
    assert (repo / "mlflow.db").is_file() and (repo / "mlartifacts").is_dir()  # default store at DVC_ROOT
    first_run = json.loads((repo / "data/prepared/run.json").read_text())["run_id"]
    assert _labeled_count(repo) == 16  # 10% of the 160 training images left after the 20% test split

    second = _run(repo, "dvc", "repro")
    assert "didn't change" in second or "up to date" in second
    assert json.loads((repo / "data/prepared/run.json").read_text())["run_id"] == first_run  # nothing reran
    assert "up to date" in _run(repo, "dvc", "status")

    _run(repo, "git", "add", "-A")
    _run(repo, "git", "commit", "-q", "-m", "fetch")
    _run(repo, "dvc", "exp", "run", "-S", "data.label_fraction=0.2")
    assert _labeled_count(repo) == 32
    assert yaml.safe_load((repo / "params.yaml").read_text())["data"]["label_fraction"] == 0.2

    client = mlflow.MlflowClient(f"sqlite:///{repo}/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("ssl-pipeline").experiment_id],
                              order_by=["attributes.start_time ASC"])
    assert [run.info.run_name for run in runs] == ["fetch", "fetch"]
    assert "dvc.exp_name" not in runs[0].data.tags
    assert runs[1].data.tags["dvc.exp_name"]  # DVC names the experiment; the run carries the name
    assert runs[1].data.params["data.label_fraction"] == "0.2"
    assert runs[0].data.tags["git.commit"] == _run(repo, "git", "rev-parse", "HEAD~1").strip()


def test_switch_source_with_exp_run(repo: Path, tmp_path: Path) -> None:
    from PIL import Image

    for name, value in (("bright", 220), ("dark", 30)):
        (tmp_path / "pets" / name).mkdir(parents=True)
        for i in range(5):
            Image.new("RGB", (6, 6), (value, i * 10, 0)).save(tmp_path / "pets" / name / f"{i}.png")
    _run(repo, "dvc", "exp", "run", "-S", "data.source=imagefolder", "-S", f"data.path={tmp_path / 'pets'}")
    meta = json.loads((repo / "data/prepared/test/meta.json").read_text())
    assert meta["source"] == "imagefolder" and meta["class_names"] == ["bright", "dark"]
    assert meta["shape"][1:] == [6, 6, 3]
