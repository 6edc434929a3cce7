"""Typed, validated params: one frozen dataclass per `params.yaml` section.

`load_params` reads the file, rejects unknown keys, converts each value to the type its field declares and
runs each section's `__post_init__` checks. Every error is a `ConfigError` whose message starts with the
dotted key and the offending value and says what is accepted, e.g.
`data.label_fraction=1.5: must be in (0, 1]`. Nothing else in the pipeline validates params again.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import math
import re
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal, Union

import yaml

from pipeline_lib.core.errors import ConfigError

Device = Literal["auto", "cpu", "cuda", "mps"]
P = typing.TypeVar("P")


_SHA256 = re.compile(r"[0-9a-fA-F]{64}")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
_METRIC = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_./ -]*")




def _fail(key: str, value: Any, rule: str) -> typing.NoReturn:
    raise ConfigError(f"{key}={value!r}: {rule}")


def _check(ok: bool, key: str, value: Any, rule: str) -> None:
    if not ok:
        _fail(key, value, rule)


@dataclass(frozen=True)
class TrackingParams:
    """Where and under which names MLflow records runs and model versions.

    Every registered name holds one kind of model (track, role and, for language models, objective), so any
    version of a name can stand in for any other and `@challenger` / `@champion` compare like with like:
    `encoder_model` (the pretrain stage's encoder), `classifier_model` (the finetune stage's classifier and
    its GRPO successor from rl), and per objective `<lm_model>-ar` / `<lm_model>-mdm` (text_pretrain) and
    `<task_model>-ar` / `<task_model>-mdm` (text_sft and its GRPO successor from text_rl).
    """

    objectives: ClassVar[tuple[str, ...]] = ("ar", "mdm")

    experiment: str = "ssl-pipeline"
    encoder_model: str = "ssl-pipeline-encoder"
    classifier_model: str = "ssl-pipeline-classifier"
    lm_model: str = "ssl-pipeline-lm"  # prefix: the language models are <lm_model>-ar and <lm_model>-mdm
    task_model: str = "ssl-pipeline-task-lm"  # prefix: the task models are <task_model>-ar and <task_model>-mdm

    def __post_init__(self) -> None:
        for name in ("experiment", "encoder_model", "classifier_model", "lm_model", "task_model"):
            value = getattr(self, name)
            _check(
                bool(_NAME.fullmatch(value)),
                f"tracking.{name}",
                value,
                "must be a non-empty name of letters, digits, '.', '_' or '-'",
            )
        seen: dict[str, str] = {}
        for gate, name in self.registered_models().items():
            key = f"{gate.split('_')[0]}_model"  # lm_ar -> lm_model
            _check(name not in seen, f"tracking.{key}", getattr(self, key),
                   f"gives the registered name {name!r}, as tracking.{seen.get(name)} does; each kind of model "
                   "needs a name of its own")
            seen[name] = key

    def lm_name(self, objective: str) -> str:
        """The registered name of the pretrained language models of one objective."""
        return f"{self.lm_model}-{objective}"

    def task_name(self, objective: str) -> str:
        """The registered name of the task models (SFT, then GRPO) of one objective."""
        return f"{self.task_model}-{objective}"

    def registered_models(self) -> dict[str, str]:
        """Every registered name, keyed as the promotion gates are: encoder, classifier, lm_ar, ..., task_mdm."""
        return {"encoder": self.encoder_model, "classifier": self.classifier_model,
                **{f"lm_{objective}": self.lm_name(objective) for objective in self.objectives},
                **{f"task_{objective}": self.task_name(objective) for objective in self.objectives}}






Precision = Literal["auto", "fp32", "bf16"]
RewardScale = Literal["group", "none"]  # GRPO advantages: scaled by the group std, or only centred (Dr. GRPO)


@dataclass(frozen=True)
class TrainParams:
    """Optimisation and runtime keys every training stage shares; the base trainer reads only these.

    `batch_size` is the global batch per optimizer step (all processes, all accumulation micro-steps), so
    results do not depend on how many processes run; lr = base_lr x batch_size / 256.
    """

    section: ClassVar[str] = "train"

    epochs: int = 10
    batch_size: int = 128
    accumulation_steps: int = 1
    base_lr: float = 1.0e-3
    min_lr: float = 0.0
    weight_decay: float = 0.05
    adam_beta2: float = 0.95
    warmup_epochs: float = 1.0
    clip_grad: float | None = None
    drop_path_rate: float = 0.0
    precision: Precision = "auto"
    compile: bool = False
    checkpoint_every: int = 100
    log_every: int = 10

    def __post_init__(self) -> None:
        key = f"{self.section}."
        _check(0.0 <= self.drop_path_rate < 1.0, key + "drop_path_rate", self.drop_path_rate, "must be in [0, 1)")
        for name in ("epochs", "batch_size", "accumulation_steps", "checkpoint_every", "log_every"):
            _check(getattr(self, name) >= 1, key + name, getattr(self, name), "must be a positive integer")
        _check(
            self.batch_size % self.accumulation_steps == 0,
            key + "batch_size",
            self.batch_size,
            f"must be a multiple of {key}accumulation_steps={self.accumulation_steps}",
        )
        _check(self.base_lr > 0, key + "base_lr", self.base_lr, "must be > 0")
        _check(0 <= self.min_lr <= self.base_lr, key + "min_lr", self.min_lr, f"must be in [0, {key}base_lr]")
        _check(self.weight_decay >= 0, key + "weight_decay", self.weight_decay, "must be >= 0")
        _check(0 < self.adam_beta2 < 1, key + "adam_beta2", self.adam_beta2, "must be in (0, 1)")
        _check(
            0 <= self.warmup_epochs <= self.epochs,
            key + "warmup_epochs",
            self.warmup_epochs,
            f"must be in [0, {key}epochs={self.epochs}]",
        )
        if self.clip_grad is not None:
            _check(self.clip_grad > 0, key + "clip_grad", self.clip_grad, "must be > 0 or null (no clipping)")












@dataclass(frozen=True)
class GRPOParams(TrainParams):
    """The GRPO keys both tracks' rl sections share (`pipeline_lib.core.grpo`): `group_size` samples per input at
    `temperature`, group-relative advantages (`scale_rewards`: `group` divides by each group's std, `none` is
    Dr. GRPO), `num_iterations` updates per sampled batch against the sampling policy with the clip range
    `epsilon` / `epsilon_high`, and a k3 KL penalty `beta` to the frozen reference."""

    section: ClassVar[str] = "grpo"

    group_size: int = 8
    temperature: float = 1.0
    scale_rewards: RewardScale = "group"
    epsilon: float = 0.2
    epsilon_high: float = 0.28
    num_iterations: int = 1
    beta: float = 0.04

    def __post_init__(self) -> None:
        super().__post_init__()
        key = f"{self.section}."
        _check(self.group_size >= 2, key + "group_size", self.group_size,
               "must be >= 2 (advantages are relative to the group)")
        _check(self.temperature > 0, key + "temperature", self.temperature,
               "must be > 0 (greedy samples of an input would all be the same)")
        _check(0 < self.epsilon < 1, key + "epsilon", self.epsilon, "must be in (0, 1)")
        _check(self.epsilon_high >= self.epsilon, key + "epsilon_high", self.epsilon_high,
               f"must be >= {key}epsilon={self.epsilon} (clip-higher widens only the upper side)")
        _check(self.num_iterations >= 1, key + "num_iterations", self.num_iterations, "must be a positive integer")
        _check(self.beta >= 0, key + "beta", self.beta, "must be >= 0 (0: no KL penalty)")


MetricMode = Literal["max", "min"]


@dataclass(frozen=True)
class GateParams:
    """One registered model's promotion gate: its challenger becomes its champion only if it beats the
    champion on `metric` (read from the MLflow run that registered each version) by more than `min_delta`
    in the direction `mode` (max: higher is better). Checked by `PromoteParams`, which knows the keys."""

    metric: str = ""
    mode: MetricMode = "max"
    min_delta: float = 0.0


@dataclass(frozen=True)
class PromoteParams:
    """The promotion gates (`python -m pipeline_lib.promote`): one optional gate per registered model, keyed
    as `TrackingParams.registered_models` keys them. A null gate is not applied.

    The vision gates read the metrics of the run that registered the version: `post_trained.*` (rl, on test)
    or `test.*` (added to the finetune runs by evaluate). The text task gates read `test.accuracy` (exact
    match), `test.format_rate`, `test.pass_at_<k>`, which text_task_evaluate adds to the text_sft and text_rl
    runs; the language-model gates `validation.bits_per_character`, added by text_evaluate.
    """

    encoder: GateParams | None = None
    classifier: GateParams | None = dataclasses.field(
        default_factory=lambda: GateParams("post_trained.reward_greedy", "max", 0.005))
    lm_ar: GateParams | None = None
    lm_mdm: GateParams | None = None
    task_ar: GateParams | None = dataclasses.field(default_factory=lambda: GateParams("test.accuracy", "max", 0.01))
    task_mdm: GateParams | None = dataclasses.field(default_factory=lambda: GateParams("test.accuracy", "max", 0.01))

    def __post_init__(self) -> None:
        for model, gate in self.gates().items():
            _check(bool(_METRIC.fullmatch(gate.metric)), f"promote.{model}.metric", gate.metric,
                   "must be the name of a metric logged by the run that registered the model, e.g. "
                   "post_trained.reward_greedy, test.top1 or test.accuracy")
            _check(math.isfinite(gate.min_delta) and gate.min_delta >= 0, f"promote.{model}.min_delta",
                   gate.min_delta, "must be a finite number >= 0 (how much better the challenger must be)")

    def gates(self) -> dict[str, GateParams]:
        """The declared gates, by model key (encoder, classifier, lm_ar, lm_mdm, task_ar, task_mdm)."""
        return {field.name: getattr(self, field.name) for field in dataclasses.fields(self)
                if getattr(self, field.name) is not None}












































def load_params(path: str | Path, schema: type[P], overrides: Sequence[str] = (), *, view: bool = False) -> P:
    """Read and validate a params file; raise `ConfigError` naming the first bad key.

    An empty file is refused: it is far more likely a truncated or wrong file than a wish for defaults, and
    `dvc repro` needs every key a stage declares anyway. A key or section left out takes its default.

    `view=True` reads a track's view (`VisionParams`, `TextParams`) of the whole file: sections the schema does not
    declare are left to the other track. `overrides` are `section.key=value` assignments applied first, as
    `dvc exp run -S` applies them (the value parsed as YAML), for tools that try params without editing the file.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: params file not found")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from err
    if raw is None or raw == {}:
        raise ConfigError(f"{path}: the params file is empty; every stage reads its keys from it (DVC tracks them "
                          "key by key), so start from the project's params.yaml, which lists every key")
    if view and isinstance(raw, dict):  # a track's view: the other track's sections are not its to check
        declared = {field.name for field in dataclasses.fields(schema)}  # type: ignore[arg-type]
        raw = {key: value for key, value in raw.items() if key in declared}
    for assignment in overrides:
        key, equals, value = assignment.partition("=")
        if not equals or not key:
            raise ConfigError(f"{assignment!r}: an override is section.key=value")
        *sections, name = key.split(".")
        target = raw
        for section in sections:  # a section that is null (a gate not declared) becomes a mapping
            if not isinstance(target.get(section), dict):
                target[section] = {}
            target = target[section]
        target[name] = yaml.safe_load(value)
    return params_from_dict(raw, schema)


def params_from_dict(raw: Mapping[str, Any], schema: type[P]) -> P:
    """Build `schema` (the project's `Params`) from an already-parsed mapping (the YAML document)."""
    return _build(schema, raw, prefix="")


def _build(cls: type, raw: Any, prefix: str) -> Any:
    section = prefix.rstrip(".") or "params"
    if not isinstance(raw, Mapping):
        _fail(section, raw, "must be a mapping of keys to values")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in raw:
        if key not in fields:
            close = difflib.get_close_matches(str(key), fields, n=1)
            hint = f"; did you mean {prefix}{close[0]}?" if close else ""
            raise ConfigError(f"{prefix}{key}: unknown key; accepted keys: {', '.join(fields)}{hint}")
    hints = typing.get_type_hints(cls)
    kwargs = {name: _convert(hints[name], raw[name], f"{prefix}{name}") for name in fields if name in raw}
    return cls(**kwargs)


def _convert(annotation: Any, value: Any, key: str) -> Any:
    """Check `value` against a field annotation; ints widen to floats, nothing else is coerced."""
    origin = typing.get_origin(annotation)
    if origin in (Union, types.UnionType):
        options = [a for a in typing.get_args(annotation) if a is not type(None)]
        if value is None and len(options) < len(typing.get_args(annotation)):
            return None
        if len(options) == 1:
            return _convert(options[0], value, key)
        for option in options:
            if typing.get_origin(option) is list and isinstance(value, list):
                return _convert(option, value, key)  # a list's own error names the bad item: the clearest
            try:
                return _convert(option, value, key)
            except ConfigError:
                continue
        _fail(key, value, f"must be {' or '.join(_describe(option) for option in options)}")
    if origin is list:
        (inner,) = typing.get_args(annotation)
        _check(isinstance(value, list), key, value, f"must be {_describe(annotation)}")
        return [_convert(inner, item, f"{key}[{index}]") for index, item in enumerate(value)]
    if origin is Literal:
        choices = typing.get_args(annotation)
        _check(value in choices, key, value, f"must be one of {', '.join(map(repr, choices))}")
        return value
    if dataclasses.is_dataclass(annotation):  # a section left empty (`data:`) takes every default
        return _build(annotation, {} if value is None else value, prefix=f"{key}.")
    if annotation is bool:
        _check(isinstance(value, bool), key, value, "must be true or false")
    elif annotation is int:
        _check(isinstance(value, int) and not isinstance(value, bool), key, value, "must be an integer")
    elif annotation is float:
        if isinstance(value, str) and _looks_numeric(value):
            _fail(key, value, "must be a number; YAML reads '1e-4' as text, write 1.0e-4")
        _check(isinstance(value, (int, float)) and not isinstance(value, bool), key, value, "must be a number")
        try:
            number = float(value)
        except OverflowError:
            number = math.inf
        _check(math.isfinite(number), key, value, "must be a finite number")
        return number
    elif annotation is str:
        _check(isinstance(value, str), key, value, "must be a string")
    else:  # pragma: no cover - a new field type needs a branch here
        raise TypeError(f"{key}: unsupported annotation {annotation!r}")
    return value


def _describe(annotation: Any, *, plural: bool = False) -> str:
    """How an error names a field type: 'a number', 'a list of lists of numbers', ..."""
    if typing.get_origin(annotation) is list:
        inner = _describe(typing.get_args(annotation)[0], plural=True)
        return f"lists of {inner}" if plural else f"a list of {inner}"
    names = {float: ("a number", "numbers"), int: ("an integer", "integers"), str: ("a string", "strings"),
             bool: ("true or false", "booleans")}
    return names.get(annotation, (str(annotation), str(annotation)))[plural]


def _looks_numeric(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def flatten(section: Any, prefix: str = "") -> dict[str, Any]:
    """A dataclass or mapping as flat dotted keys, the form MLflow's compare view lines up across runs."""
    mapping = dataclasses.asdict(section) if dataclasses.is_dataclass(section) else dict(section)
    flat: dict[str, Any] = {}
    for key, value in mapping.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, prefix=f"{name}."))
        else:
            flat[name] = value
    return flat


def params_hash(values: Mapping[str, Any]) -> str:
    """Stable sha256 of flat params: equal params give equal hashes across runs and machines."""
    canonical = json.dumps(dict(values), sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


@dataclass(frozen=True)
class CoreParams:
    """The sections every track shares: the seed, the device, MLflow names and the promotion gates.

    Each track extends this with its own sections (`vision.config.VisionParams`, `text.config.TextParams`);
    `pipeline_lib.params.Params` is both, the whole `params.yaml`. A track's code types its params as its own
    view, so it never imports the other track.
    """

    seed: int = 0
    device: Device = "auto"
    tracking: TrackingParams = dataclasses.field(default_factory=TrackingParams)
    promote: PromoteParams = dataclasses.field(default_factory=PromoteParams)

    def __post_init__(self) -> None:
        _check(0 <= self.seed < 2**32, "seed", self.seed, "must be an integer in [0, 2**32)")
