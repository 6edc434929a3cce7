"""What the stage tests share: a committed copy of the project with tiny params, and the environment of the
commands they run in it (dvc, git, the stages)."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
PROJECT_FILES = ["dvc.yaml", "params.yaml", ".dvcignore", ".gitignore", ".dvc/config", "data/raw/.gitkeep",
                 "data/text/tasks/.gitkeep"]
PROJECT_DIRS = ["stages", "pipeline_lib"]


@pytest.fixture(autouse=True, scope="module")
def command_environment() -> Iterator[None]:
    """For every command these tests start: no DVC analytics, a git identity, the project's default MLflow store
    (mlflow.db at `$DVC_ROOT`), and one thread per process: PyTorch processes sharing two cores, each spinning
    on both, slow each other down many times over."""
    with pytest.MonkeyPatch.context() as patch:
        for name, value in {"DVC_NO_ANALYTICS": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
                            "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.com",
                            "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@example.com"}.items():
            patch.setenv(name, value)
        patch.delenv("MLFLOW_TRACKING_URI", raising=False)
        yield


def copy_project(path: Path, edit: Callable[[dict[str, Any]], None], *, text: bool = True) -> Path:
    """A committed git repo at `path` holding the project, with the params `edit` changes in place.

    `text=False` leaves the text track's stages out of its dvc.yaml, for tests about the vision stages only.
    """
    for name in PROJECT_FILES:
        (path / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / name, path / name)
    if not text:
        pipeline = yaml.safe_load((path / "dvc.yaml").read_text())
        pipeline["stages"] = {name: stage for name, stage in pipeline["stages"].items() if not name.startswith("text_")}
        (path / "dvc.yaml").write_text(yaml.safe_dump(pipeline, sort_keys=False))
    for name in PROJECT_DIRS:
        shutil.copytree(ROOT / name, path / name, ignore=shutil.ignore_patterns("__pycache__"))
    params = yaml.safe_load((path / "params.yaml").read_text())
    _toy_text_track(params)
    edit(params)
    (path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    for command in (["git", "init", "-q"], ["git", "add", "-A"], ["git", "commit", "-q", "-m", "project"]):
        subprocess.run(command, cwd=path, check=True, capture_output=True)
    return path


@pytest.fixture(scope="session")
def make_project() -> Callable[..., Path]:
    """`copy_project`, for the module-scoped fixtures that build their repos with it."""
    return copy_project


def _toy_text_track(params: dict[str, Any]) -> None:
    """The text track at toy size (these tests are about the pipeline, not the language models), with the
    architecture knobs on so that every text stage runs them: MoE feed-forwards, and MTP beside the ar model."""
    params["text_model"].update(d_model=16, n_layer=1, n_head=2, seq_len=32)
    params["text_model"]["moe"].update(enabled=True, routed_experts=4, top_k=2, bias_update_speed=1.0e-2)
    params["text_pretrain"].update(epochs=1, batch_size=64, warmup_epochs=0.0, mtp_depth=1)
    params["text_evaluate"].update(mdm_samples=1, prompt_tokens=8, sample_tokens=16, block_length=8)
    params["text_task"].update(digits=1, train_size=40, rl_size=16, test_size=16, answer_tokens=6)
    params["text_sft"].update(epochs=10, batch_size=8, base_lr=1.0, warmup_epochs=0.0, log_every=5)
    params["text_rl"].update(epochs=1, batch_size=4, group_size=4, block_length=6, log_every=1, samples_every=2)
    params["text_task_evaluate"].update(pass_k=2, block_length=6)
