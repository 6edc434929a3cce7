"""The promotion gate on a temporary MLflow store: promote, keep, tie, idempotence, races, bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
import yaml

from pipeline_lib.core.registry import CHALLENGER, CHAMPION, PromotionError, decide, promote
from pipeline_lib.promote import EXIT_BAD_INPUT, EXIT_DECIDED, EXIT_KEPT, EXIT_UNREACHABLE, main

ROOT = Path(__file__).resolve().parents[2]
NAME = "ssl-pipeline-classifier"
METRIC = "post_trained.reward_greedy"


@pytest.fixture
def client(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> mlflow.MlflowClient:
    """A fresh sqlite store, also the store the gate's command line resolves (MLFLOW_TRACKING_URI)."""
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    return mlflow.MlflowClient(uri)


def _register(client: mlflow.MlflowClient, value: float | None, *, data: str = "d0", alias: bool = True,
              name: str = NAME, metric: str = METRIC) -> int:
    """A new version whose registering run logged `metric`=value; alias challenger like the rl stage sets."""
    experiment = client.get_experiment_by_name("gate") or client.get_experiment(client.create_experiment("gate"))
    run = client.create_run(experiment.experiment_id, run_name="rl")
    if value is not None:
        client.log_metric(run.info.run_id, metric, value)
    client.set_terminated(run.info.run_id)
    if not client.search_registered_models(f"name = '{name}'"):
        client.create_registered_model(name)
    version = client.create_model_version(name, f"runs:/{run.info.run_id}/model", run_id=run.info.run_id,
                                          tags={"input.data.sha256": data})
    if alias:
        client.set_registered_model_alias(name, CHALLENGER, version.version)
    return int(version.version)


def _champion(client: mlflow.MlflowClient, name: str = NAME) -> int:
    return int(client.get_model_version_by_alias(name, CHAMPION).version)


def _gate(client: mlflow.MlflowClient, min_delta: float = 0.01, mode: str = "max"):
    return promote(client, NAME, metric=METRIC, mode=mode, min_delta=min_delta)


def test_first_challenger_becomes_champion(client: mlflow.MlflowClient) -> None:
    first = _register(client, 0.80)
    decision = _gate(client)
    assert decision.action == "promoted" and decision.champion_version is None
    assert _champion(client) == first
    tags = client.get_model_version(NAME, str(first)).tags
    assert tags["promotion.previous_champion"] == "none" and float(tags["promotion.value"]) == 0.80


def test_better_challenger_is_promoted_worse_and_tied_are_not(client: mlflow.MlflowClient) -> None:
    champion = _register(client, 0.80)
    _gate(client)
    better = _register(client, 0.85)
    decision = _gate(client)
    assert decision.action == "promoted" and decision.champion_version == champion
    assert decision.improvement == pytest.approx(0.05) and decision.same_data is True
    assert _champion(client) == better
    assert client.get_model_version(NAME, str(better)).tags["promotion.previous_champion"] == str(champion)

    worse = _register(client, 0.70)
    decision = _gate(client)
    assert decision.action == "kept" and decision.challenger_version == worse
    assert _champion(client) == better  # never demoted
    assert "kept v" in decision.summary() and "-0.15" in decision.summary()

    _register(client, 0.855)  # better, but by less than min_delta: a tie
    assert _gate(client).action == "kept" and _champion(client) == better


def test_exactly_min_delta_better_is_a_tie(client: mlflow.MlflowClient) -> None:
    champion = _register(client, 0.5)
    _gate(client)
    _register(client, 0.625)  # better by exactly min_delta (both exact in binary): the challenger must beat it
    assert _gate(client, min_delta=0.125).action == "kept" and _champion(client) == champion
    assert _gate(client, min_delta=0.124).action == "promoted"


def test_lower_is_better_mode(client: mlflow.MlflowClient) -> None:
    first = _register(client, 0.40)
    _gate(client, mode="min")
    _register(client, 0.50)
    assert _gate(client, mode="min").action == "kept" and _champion(client) == first
    lower = _register(client, 0.30)
    assert _gate(client, mode="min").action == "promoted" and _champion(client) == lower


def test_second_invocation_changes_nothing(client: mlflow.MlflowClient) -> None:
    _register(client, 0.80)
    _gate(client)
    challenger = _register(client, 0.90)
    assert _gate(client).action == "promoted"
    state = client.get_registered_model(NAME).aliases, client.get_model_version(NAME, str(challenger)).tags
    again = _gate(client)
    assert again.action == "unchanged" and again.challenger_version == challenger
    assert (client.get_registered_model(NAME).aliases, client.get_model_version(NAME, str(challenger)).tags) == state

    _register(client, 0.10)
    kept = _gate(client)
    state = client.get_registered_model(NAME).aliases
    assert _gate(client) == kept and client.get_registered_model(NAME).aliases == state


def test_champion_moved_during_the_decision_is_decided_again(client: mlflow.MlflowClient) -> None:
    """Another gate promotes a better version between our read and our write: we must not demote it."""
    _register(client, 0.80)
    _gate(client)
    ours = _register(client, 0.85)
    rival = _register(client, 0.95, alias=False)

    class RacingClient:
        """Delegates to the real client; moves the champion to `rival` right after our first decision."""

        def __init__(self) -> None:
            self.reads = 0

        def __getattr__(self, name: str):
            return getattr(client, name)

        def get_model_version_by_alias(self, name: str, alias: str):
            if alias == CHAMPION:
                self.reads += 1
                if self.reads == 2:  # the re-read right before setting the alias
                    client.set_registered_model_alias(NAME, CHAMPION, str(rival))
            return client.get_model_version_by_alias(name, alias)

    decision = promote(RacingClient(), NAME, metric=METRIC, min_delta=0.01)
    assert decision.action == "kept" and decision.champion_version == rival
    assert _champion(client) == rival and ours != rival


def test_bad_input_names_the_problem(client: mlflow.MlflowClient) -> None:
    with pytest.raises(PromotionError, match="no version has the alias 'challenger'"):
        decide(client, NAME, metric=METRIC)
    _register(client, 0.8)
    _gate(client)
    version = _register(client, None)
    with pytest.raises(PromotionError, match=rf"v{version}: its run .* has no metric '{METRIC}'"):
        _gate(client)
    assert _champion(client) == version - 1


def test_different_data_is_compared_and_flagged(client: mlflow.MlflowClient) -> None:
    _register(client, 0.80, data="old")
    _gate(client)
    _register(client, 0.90, data="new")
    decision = _gate(client)
    assert decision.action == "promoted" and decision.same_data is False


def _project(tmp_path: Path, **gates: dict[str, object] | None) -> Path:
    """The project's params with the promote section's gates updated (a gate set to None is dropped)."""
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    for gate, keys in gates.items():
        params["promote"][gate] = None if keys is None else {**(params["promote"].get(gate) or {}), **keys}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    return tmp_path / "params.yaml"


# The classifier's gate and a text task model's gate (test exact match, added by text_task_evaluate).
GATES = [("classifier", NAME, METRIC), ("task_ar", "ssl-pipeline-task-lm-ar", "test.accuracy")]


@pytest.mark.parametrize(("gate", "name", "metric"), GATES)
def test_command_line_statuses_summary_and_report(client: mlflow.MlflowClient, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str], gate: str, name: str,
                                                  metric: str) -> None:
    params = _project(tmp_path, **{gate: {"min_delta": 0.01}})
    summary, report = tmp_path / "summary.md", tmp_path / "decision.json"
    command = ["--params", str(params), "--model", gate]
    assert main(command) == EXIT_BAD_INPUT  # nothing registered yet
    assert f"promote.{gate} ({name}): {name}: no version has the alias 'challenger'" in capsys.readouterr().err

    first = _register(client, 0.80, name=name, metric=metric)
    assert main([*command, "--summary", str(summary), "--report", str(report)]) == EXIT_DECIDED
    assert f"{name}: promoted v{first} to champion" in capsys.readouterr().out
    assert json.loads(report.read_text())["decisions"][0]["action"] == "promoted"

    _register(client, 0.805, name=name, metric=metric)
    assert main([*command, "--summary", str(summary), "--exit-code"]) == EXIT_KEPT
    assert main(command) == EXIT_DECIDED  # a kept champion is a decision, not a failure
    assert f"{name}: kept v{first}" in capsys.readouterr().out
    assert main([*command, "-S", f"promote.{gate}.min_delta=0.001"]) == EXIT_DECIDED
    assert _champion(client, name) == first + 1
    assert "unchanged" in (main(command), capsys.readouterr().out)[1]  # a second run changes nothing
    text = summary.read_text()
    assert text.count(f"### Promotion gate: `{name}`") == 2 and "**kept**" in text
    assert "| champion before | v1 | 0.8 |" in text

    assert main([*command, "-S", f"promote.{gate}.mode=up"]) == EXIT_BAD_INPUT
    assert f"promote.{gate}.mode='up': must be one of 'max', 'min'" in capsys.readouterr().err
    _register(client, 0.9, name=name, metric=metric)
    assert main([*command, "-S", f"promote.{gate}.metric=test.nll"]) == EXIT_BAD_INPUT
    assert "has no metric 'test.nll'" in capsys.readouterr().err


def test_every_declared_gate_runs_and_one_that_cannot_decide_does_not_stop_the_others(
        client: mlflow.MlflowClient, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    params = _project(tmp_path, task_mdm=None, lm_ar={"metric": "validation.bits_per_character", "mode": "min"})
    _register(client, 0.8)
    _register(client, 0.1, name="ssl-pipeline-task-lm-ar", metric="test.accuracy")
    report = tmp_path / "decisions.json"
    assert main(["--params", str(params), "--report", str(report)]) == EXIT_BAD_INPUT  # lm_ar has no challenger
    out, err = capsys.readouterr()
    assert "ssl-pipeline-classifier: promoted" in out and "ssl-pipeline-task-lm-ar: promoted" in out
    assert "promote.lm_ar (ssl-pipeline-lm-ar): ssl-pipeline-lm-ar: no version has the alias" in err
    decided = json.loads(report.read_text())
    assert [d["model"] for d in decided["decisions"]] == [NAME, "ssl-pipeline-task-lm-ar"]
    assert len(decided["errors"]) == 1
    assert main(["--params", str(params), "--model", "task_mdm"]) == EXIT_BAD_INPUT
    assert "--model task_mdm: no gate promote.task_mdm is declared" in capsys.readouterr().err
    assert main(["--params", str(params), "--model", "classifier", "--model", "task_ar"]) == EXIT_DECIDED
    assert capsys.readouterr().out.count("unchanged") == 2


def test_unreachable_server_exits_3_within_seconds(tmp_path: Path) -> None:
    params = _project(tmp_path)
    env = {"MLFLOW_TRACKING_URI": "http://127.0.0.1:9", "PATH": "/usr/bin:/bin"}
    done = subprocess.run([sys.executable, "-m", "pipeline_lib.promote", "--params", str(params)], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == EXIT_UNREACHABLE, done.stderr
    assert "tracking server http://127.0.0.1:9 is unreachable" in done.stderr
