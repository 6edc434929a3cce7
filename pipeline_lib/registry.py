"""Model versions in the MLflow registry: log a pyfunc model, register it, tag its lineage, set aliases.

Aliases, not the deprecated stages: `challenger` marks the newest candidate; `champion` is moved only by the
promotion gate.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import pipeline_lib

CHALLENGER = "challenger"
REQUIREMENTS = ["torch", "torchvision", "timm", "numpy", "safetensors", "tokenizers", "mlflow"]


def register_model(
    python_model: Any,
    model_dir: Path,
    *,
    name: str,
    artifact_name: str,
    input_example: Any,
    tags: Mapping[str, str],
    alias: str | None = CHALLENGER,
    inference_params: Mapping[str, Any] | None = None,
) -> int:
    """Log `model_dir` as a pyfunc model in the active run, register it under `name`, tag it; return the version.

    The library itself is packed with the model (`code_paths`), so the version loads without this checkout.
    `inference_params` (name -> default) become the signature's params, which `predict` callers may set.
    """
    import mlflow
    from mlflow.models import infer_signature

    python_model.load_context(_Context(model_dir))
    output = python_model.predict(None, input_example, dict(inference_params or {}))
    info = mlflow.pyfunc.log_model(
        name=artifact_name,
        python_model=python_model,
        artifacts={"model_dir": str(model_dir)},
        code_paths=[str(Path(pipeline_lib.__file__).parent)],
        signature=infer_signature(input_example, output, params=inference_params),
        input_example=input_example if inference_params is None else (input_example, dict(inference_params)),
        pip_requirements=REQUIREMENTS,
        registered_model_name=name,
    )
    version = int(info.registered_model_version)
    client = mlflow.MlflowClient()
    for key, value in tags.items():
        client.set_model_version_tag(name, str(version), key, str(value))
    if alias is not None:
        client.set_registered_model_alias(name, alias, str(version))
    return version


class _Context:
    """The slice of MLflow's PythonModelContext that our models read, for a check before logging."""

    def __init__(self, model_dir: Path) -> None:
        self.artifacts = {"model_dir": str(model_dir)}


# -- the promotion gate ----------------------------------------------------------------------------------------

CHAMPION = "champion"


class PromotionError(ValueError):
    """The gate cannot decide: no challenger, or a version without the declared metric."""


@dataclass(frozen=True)
class Decision:
    """What the gate did and the numbers it decided on.

    `action`: `promoted` (the challenger is the new champion; `champion_version` None when it is the first),
    `kept` (the champion stays) or `unchanged` (the challenger already is the champion).
    """

    action: Literal["promoted", "kept", "unchanged"]
    model: str
    metric: str
    mode: str
    min_delta: float
    challenger_version: int
    challenger_value: float | None
    champion_version: int | None
    champion_value: float | None
    same_data: bool | None  # both versions scored on the same prepared data (None: no champion to compare)

    @property
    def improvement(self) -> float | None:
        """How much better the challenger scores (positive: better), in the direction of `mode`."""
        if self.challenger_value is None or self.champion_value is None:
            return None
        sign = 1.0 if self.mode == "max" else -1.0
        return sign * (self.challenger_value - self.champion_value)

    def summary(self) -> str:
        """One line: the decision and the numbers."""
        challenger = f"challenger v{self.challenger_version} {self.metric}={_number(self.challenger_value)}"
        if self.action == "unchanged":
            return f"{self.model}: unchanged, {challenger} already is the champion"
        if self.champion_version is None:
            return f"{self.model}: promoted v{self.challenger_version} to champion (no champion yet; {challenger})"
        rule = f"improvement {self.improvement:+.6g} {'>' if self.action == 'promoted' else '<='} " \
               f"min_delta {self.min_delta:g} ({self.mode})"
        versus = f"{challenger} vs champion v{self.champion_version} {_number(self.champion_value)}: {rule}"
        verdict = f"promoted v{self.challenger_version}" if self.action == "promoted" else \
            f"kept v{self.champion_version}"
        return f"{self.model}: {verdict}; {versus}"

    def as_dict(self) -> dict[str, Any]:
        """The decision as JSON-ready data."""
        return {**dataclasses.asdict(self), "improvement": self.improvement, "summary": self.summary()}


def _number(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.6g}"


def promote(
    client: Any, name: str, *, metric: str, mode: str = "max", min_delta: float = 0.0, attempts: int = 3
) -> Decision:
    """Move alias `champion` of registered model `name` to its `challenger` if that scores better.

    Better means: `metric` (read from the run that registered each version) beats the champion's by more
    than `min_delta` in the direction `mode` (`max` or `min`). With no champion yet, the first challenger is
    promoted. The champion alias is read again right before it is moved; if another gate moved it meanwhile,
    the decision is made again against the new champion, so a better champion is never demoted. Running the
    gate twice changes nothing the second time.

    Raises:
        PromotionError: `name` has no challenger, or a compared version's run lacks `metric`.
    """
    for _ in range(attempts):
        decision = decide(client, name, metric=metric, mode=mode, min_delta=min_delta)
        if decision.action != "promoted":
            return decision
        current = _alias_version(client, name, CHAMPION)
        if (int(current.version) if current else None) != decision.champion_version:
            continue  # the champion moved while we decided: decide again against the new one
        client.set_registered_model_alias(name, CHAMPION, str(decision.challenger_version))
        tags = {"promotion.metric": metric, "promotion.value": decision.challenger_value,
                "promotion.previous_champion": decision.champion_version or "none"}
        for key, value in tags.items():
            client.set_model_version_tag(name, str(decision.challenger_version), key, str(value))
        return decision
    raise PromotionError(f"{name}: the champion alias kept moving while the gate decided ({attempts} attempts)")


def decide(client: Any, name: str, *, metric: str, mode: str = "max", min_delta: float = 0.0) -> Decision:
    """The gate's decision for `name` without moving any alias (see `promote`)."""
    challenger = _alias_version(client, name, CHALLENGER)
    if challenger is None:
        raise PromotionError(f"{name}: no version has the alias {CHALLENGER!r}; run the pipeline to register one")
    champion = _alias_version(client, name, CHAMPION)
    common = {"model": name, "metric": metric, "mode": mode, "min_delta": min_delta,
              "challenger_version": int(challenger.version)}
    if champion is not None and champion.version == challenger.version:
        return Decision("unchanged", **common, challenger_value=_metric(client, challenger, metric),
                        champion_version=int(champion.version), champion_value=None, same_data=True)
    challenger_value = _metric(client, challenger, metric, required=True)
    if champion is None:
        return Decision("promoted", **common, challenger_value=challenger_value, champion_version=None,
                        champion_value=None, same_data=None)
    champion_value = _metric(client, champion, metric, required=True)
    data = [version.tags.get("input.data.sha256") for version in (challenger, champion)]
    decision = Decision("kept", **common, challenger_value=challenger_value, champion_version=int(champion.version),
                        champion_value=champion_value, same_data=None if None in data else data[0] == data[1])
    if decision.improvement > min_delta:
        decision = dataclasses.replace(decision, action="promoted")
    return decision


def _alias_version(client: Any, name: str, alias: str) -> Any:
    """The model version holding `alias`, or None (also when the model is not registered yet)."""
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException as err:
        if err.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            return None
        raise


def _metric(client: Any, version: Any, metric: str, *, required: bool = False) -> float | None:
    """The latest value of `metric` in the run that registered `version`."""
    value = client.get_run(version.run_id).data.metrics.get(metric) if version.run_id else None
    if value is None and required:
        raise PromotionError(
            f"{version.name} v{version.version}: its run {version.run_id} has no metric {metric!r}; set "
            "promote.metric to a metric that run logs (the rl stage logs post_trained.*, evaluate adds test.* "
            "to the finetune runs)")
    return value
