"""What the stage tests share: a committed copy of the project with tiny params, the environment of the
commands they run in it (dvc, git, the stages), and one reproduced toy project for the tests that read it."""

from __future__ import annotations

import compileall
import os
import shutil
import sqlite3
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from filelock import FileLock

ROOT = Path(__file__).resolve().parents[2]
PROJECT_FILES = ["dvc.yaml", "params.yaml", ".dvcignore", ".gitignore", ".dvc/config", "data/raw/.gitkeep",
                 "data/text/tasks/.gitkeep"]
PROJECT_DIRS = ["stages", "pipeline_lib"]
# For every command these tests start: no DVC analytics and a git identity (one thread per process is set for the
# whole session in tests/conftest.py); and no MLFLOW_TRACKING_URI, so stages log to the project's default store
# (mlflow.db at `$DVC_ROOT`).
COMMAND_ENV = {"DVC_NO_ANALYTICS": "1", "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.com",
               "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@example.com"}


def command_env() -> dict[str, str]:
    """The environment of the commands these tests start (see COMMAND_ENV), for use outside the fixture below."""
    env = {**os.environ, **COMMAND_ENV}
    env.pop("MLFLOW_TRACKING_URI", None)
    return env


@pytest.fixture(autouse=True, scope="module")
def command_environment() -> Iterator[None]:
    """COMMAND_ENV for every command a stage test starts."""
    with pytest.MonkeyPatch.context() as patch:
        for name, value in COMMAND_ENV.items():
            patch.setenv(name, value)
        patch.delenv("MLFLOW_TRACKING_URI", raising=False)
        yield


def _run(repo: Path, *command: str, timeout: float = 600) -> str:
    """Run `command` in `repo` (environment: command_env); its stdout and stderr, once it succeeded."""
    done = subprocess.run(command, cwd=repo, capture_output=True, text=True, timeout=timeout, env=command_env())
    assert done.returncode == 0, f"{' '.join(command)} exited {done.returncode}:\n{done.stdout}\n{done.stderr}"
    return done.stdout + done.stderr


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
        # Byte-compiled once here rather than by each stage process (git and DVC ignore __pycache__).
        compileall.compile_dir(path / name, quiet=1)
    params = yaml.safe_load((path / "params.yaml").read_text())
    _toy_text_track(params)
    edit(params)
    (path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    for command in (["git", "init", "-q"], ["git", "add", "-A"], ["git", "commit", "-q", "-m", "project"]):
        subprocess.run(command, cwd=path, check=True, capture_output=True, env=command_env())
    return path


@pytest.fixture(scope="session")
def make_project() -> Callable[..., Path]:
    """`copy_project`, for the module-scoped fixtures that build their repos with it."""
    return copy_project


def _toy_params(params: dict[str, Any]) -> None:
    """The vision track of the toy project at toy size (the text track is always toy-sized: `_toy_text_track`).

    Every vision trainer takes 40 steps and checkpoints every 3rd, logging means over 2 steps: a checkpoint at an
    odd step closes a logging window early (the base trainer's rule), so a run killed there and resumed must log
    the same windows as one that was not (the kill drills)."""
    params["device"] = "cpu"
    params["data"]["max_images"] = 200  # 160 unlabeled, 16 labeled, 16 rl, 40 test images
    params["model"].update(embed_dim=32, depth=1, num_heads=2)
    every = {"checkpoint_every": 3, "log_every": 2}
    params["pretrain"].update(epochs=8, batch_size=32, warmup_epochs=1.0, decoder_embed_dim=32, decoder_depth=1,
                              decoder_num_heads=2, **every)  # 8 epochs x 5 steps
    params["finetune"].update(epochs=20, batch_size=8, warmup_epochs=1.0, **every)  # 20 x 2
    params["finetune_scratch"] = {"epochs": 20}  # the same budget as finetune (the baseline's own recipe: none)
    params["semi"].update(epochs=8, batch_size=32, labeled_batch_size=8, threshold=0.5, **every)  # 8 x 5 steps
    params["evaluate"].update(knn_k=5)
    params["rl"].update(epochs=10, batch_size=8, group_size=4, num_iterations=2,
                        **every)  # 10 x 2 batches x 2 updates, for GRPO and each baseline


@pytest.fixture(scope="session")
def toy_params() -> Callable[[dict[str, Any]], None]:
    """The params edit of the toy project's vision track (`_toy_params`), for a project that must match it."""
    return _toy_params


def shared_tmp(factory: pytest.TempPathFactory) -> Path:
    """The temporary folder every pytest-xdist worker of this run shares (this process's own without xdist)."""
    base = factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


@pytest.fixture(scope="session")
def toy_project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The whole toy project (both tracks, `toy_params`), reproduced by one `dvc repro` of a committed copy, once
    per test run: the first worker to ask runs it, under a file lock the others wait on. Its outs, metrics,
    dvc.lock, MLflow store and registry are as the repro left them (uncommitted); a test that reads them uses this
    fixture, a test that changes anything works on a copy of its own (`toy_clone`)."""
    shared = shared_tmp(tmp_path_factory)
    repo, done, failed = shared / "toy-project", shared / "toy-project.done", shared / "toy-project.failed"
    with FileLock(shared / "toy-project.lock"):
        if failed.is_file():
            pytest.fail(f"the toy project's dvc repro failed (in another worker):\n{failed.read_text()}")
        if not done.is_file():
            try:
                copy_project(repo, _toy_params)
                done.write_text(_run(repo, "dvc", "repro", timeout=1800))
            except BaseException as err:
                failed.write_text(str(err))
                raise
    return repo


def clone_project(source: Path, destination: Path) -> Path:
    """A copy of the project at `source` (git history, workspace, DVC cache, MLflow store and artifacts) that is
    its own: the MLflow store's absolute paths (the artifact locations of experiments, runs, logged models and
    model versions) are moved from `source` to `destination`, so nothing the copy runs writes into `source`."""
    shutil.copytree(source, destination, symlinks=True)
    database = destination / "mlflow.db"
    if database.is_file():
        old, new = f"{source.resolve()}/", f"{destination.resolve()}/"
        with sqlite3.connect(database) as connection:
            tables = [row[0] for row in connection.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
            for table in tables:
                for column in [row[1] for row in connection.execute(f'PRAGMA table_info("{table}")')]:
                    connection.execute(
                        f'UPDATE "{table}" SET "{column}" = replace("{column}", ?, ?) '
                        f'WHERE typeof("{column}") = \'text\' AND instr("{column}", ?) > 0', (old, new, old))
        connection.close()
    return destination


@pytest.fixture
def toy_clone(toy_project: Path, tmp_path: Path) -> Path:
    """A copy of the reproduced toy project of the test's own (`clone_project`), for a test that changes it."""
    return clone_project(toy_project, tmp_path / "toy-project")


def _toy_text_track(params: dict[str, Any]) -> None:
    """The text track at toy size (these tests are about the pipeline, not the language models), with the
    architecture knobs on so that every text stage runs them: MoE feed-forwards, and MTP beside the ar model."""
    params["text_model"].update(d_model=16, n_layer=1, n_head=2, seq_len=32)
    params["text_model"]["moe"].update(enabled=True, routed_experts=4, top_k=2, bias_update_speed=1.0e-2)
    params["text_pretrain"].update(epochs=1, mdm_epochs=1, batch_size=64, warmup_epochs=0.0, mtp_depth=1)
    params["text_evaluate"].update(mdm_samples=1, prompt_tokens=8, sample_tokens=16, block_length=8)
    params["text_task"].update(digits=1, train_size=40, rl_size=16, test_size=16, answer_tokens=6)
    params["text_sft"].update(epochs=10, batch_size=8, base_lr=1.0, warmup_epochs=0.0, log_every=5, holdout=8,
                              check_every=5)  # the early stop's checks run (a toy model rarely reaches the target)
    params["text_rl"].update(epochs=1, batch_size=4, group_size=4, block_length=6, log_every=1, samples_every=2,
                             min_signal=0.0)  # the toy GRPO trains whatever its probe finds
    params["text_task_evaluate"].update(pass_k=16, block_length=6)  # the report reads k up to 16
    params["text_curve"].update(ar_epochs=1, mdm_epochs=1, points=2)
