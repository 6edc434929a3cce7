"""Model versions in the MLflow registry: log a pyfunc model, register it, tag and describe it, set aliases.

One kind of model per registered name: every version carries the tags `track`, `role` and (for language
models) `objective` of its `ModelKind`, and a name whose versions are of another kind is refused, so any version
of a name can stand in for any other and `challenger` / `champion` compare like with like. Aliases, not the
deprecated stages: `challenger` marks the newest candidate; `champion` is moved only by the promotion gate.

Descriptions make the registry pages explain themselves: the registered model says what it holds, which stage
registers it and how to load it; each version gives its headline metric and the version it started from
(the evaluation stages replace the headline with their test figures through `annotate`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

LIBRARY = Path(__file__).resolve().parents[1]  # the pipeline_lib package, shipped with every pyfunc model


CHALLENGER = "challenger"
REQUIREMENTS = ["torch", "torchvision", "timm", "numpy", "safetensors", "tokenizers", "mlflow"]
FRESH_WEIGHTS = "fresh weights (no registered model)"
ALIASES = ("Alias `challenger` is the newest version; `champion` is moved only by the promotion gate "
           "(`python -m pipeline_lib.promote`), when a challenger beats it on the gate's declared metric.")


class RegistryError(ValueError):
    """A registered name already holds versions of another kind of model."""


@dataclass(frozen=True)
class ModelKind:
    """What every version of one registered name is: the track, the role and, for language models, the objective."""

    track: str
    role: str
    objective: str | None = None

    def tags(self) -> dict[str, str]:
        """The version tags that say what the model is."""
        return {"track": self.track, "role": self.role, **({"objective": self.objective} if self.objective else {})}

    def __str__(self) -> str:
        return " ".join(f"{key}={value}" for key, value in self.tags().items())


def check_kind(client: Any, name: str, kind: ModelKind) -> None:
    """Raise `RegistryError` if the newest version of `name` is tagged as another kind of model (untagged
    versions, registered before the tags existed, are accepted)."""
    newest = client.search_model_versions(f"name = '{name}'", max_results=1, order_by=["version_number DESC"])
    if not newest:
        return
    version = newest[0]
    clash = {key: version.tags[key] for key, value in kind.tags().items() if version.tags.get(key, value) != value}
    if clash:
        held = " ".join(f"{key}={value}" for key, value in clash.items())
        raise RegistryError(f"registered model {name!r} holds {held} models (v{version.version}), not {kind}; give "
                            "this kind of model a name of its own in the tracking section of params.yaml")


def version_description(headline: str, started_from: str) -> str:
    """A version's description: its headline metric, then the model it started from."""
    return f"{headline}\n\nStarted from: {started_from}."


def model_uri(name: str | None, version: int | str | None) -> str | None:
    """`models:/<name>/<version>`, or None when either is unknown."""
    return f"models:/{name}/{version}" if name and version not in (None, "None") else None


def register_model(
    python_model: Any,
    model_dir: Path,
    *,
    name: str,
    kind: ModelKind,
    artifact_name: str,
    input_example: Any,
    tags: Mapping[str, str],
    description: str,
    headline: str,
    started_from: str | None = None,
    alias: str | None = CHALLENGER,
    inference_params: Mapping[str, Any] | None = None,
) -> int:
    """Log `model_dir` as a pyfunc model in the active run, register it under `name`, tag and describe it;
    return the version.

    Args:
        python_model: the pyfunc wrapper; it is loaded and run on `input_example` before anything is logged.
        kind: what the model is; refused (`RegistryError`) when `name` holds another kind.
        tags: lineage tags (the run's); the kind's tags and `started_from` are added.
        description: the registered model's description (what it holds, which stage registers it, how to load).
        headline: the version's headline metric, the first line of its description.
        started_from: the model URI this version was trained from (None: fresh weights).
        inference_params: name -> default; they become the signature's params, which `predict` callers may set.

    The library itself is packed with the model (`code_paths`), so the version loads without this checkout.
    """
    import mlflow
    from mlflow.models import infer_signature

    client = mlflow.MlflowClient()
    check_kind(client, name, kind)
    python_model.load_context(_Context(model_dir))
    output = python_model.predict(None, input_example, dict(inference_params or {}))
    info = mlflow.pyfunc.log_model(
        name=artifact_name,
        python_model=python_model,
        artifacts={"model_dir": str(model_dir)},
        code_paths=[str(LIBRARY)],
        signature=infer_signature(input_example, output, params=inference_params),
        input_example=input_example if inference_params is None else (input_example, dict(inference_params)),
        pip_requirements=REQUIREMENTS,
        registered_model_name=name,
    )
    version = str(info.registered_model_version)
    origin = started_from or FRESH_WEIGHTS
    for key, value in {**tags, **kind.tags(), "started_from": origin}.items():
        client.set_model_version_tag(name, version, key, str(value))
    client.update_registered_model(name, description=description)
    client.update_model_version(name, version, description=version_description(headline, origin))
    if alias is not None:
        client.set_registered_model_alias(name, alias, version)
    return int(version)


def annotate(record: Mapping[str, Any], metrics: Mapping[str, float], *, headline: str | None = None,
             figures: Mapping[str, Any] | None = None) -> bool:
    """Add an evaluation's figures to the finished run in `record` (a model folder's run.json) and, when that
    run registered a version and `headline` is given, make `headline` the version's description headline.

    Returns False (and changes nothing) when the run lives in another tracking store than the active one.
    """
    import mlflow

    from pipeline_lib.core.tracking import MlflowTracker

    if not record.get("run_id") or record.get("tracking_uri") != mlflow.get_tracking_uri():
        return False
    run = MlflowTracker(record["run_id"])
    run.log_metrics(metrics)
    run.flush()
    for artifact, figure in (figures or {}).items():
        run.log_figure(figure, artifact)
    name, version = record.get("model_name"), record.get("model_version")
    if headline is not None and model_uri(name, version):
        client = mlflow.MlflowClient()
        origin = client.get_model_version(name, str(version)).tags.get("started_from", FRESH_WEIGHTS)
        client.update_model_version(name, str(version), description=version_description(headline, origin))
    return True


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
            f"{version.name} v{version.version}: its run {version.run_id} has no metric {metric!r}; set the gate's "
            "metric to one that run logs (pretrain logs loss, rl post_trained.*; evaluate adds test.* to the pretrain "
            "and finetune runs, text_task_evaluate test.* to the text_sft and text_rl runs, text_evaluate "
            "validation.* to text_pretrain)")
    return value
