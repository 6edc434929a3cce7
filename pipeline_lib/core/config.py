"""Typed, validated params: one frozen dataclass per `params.yaml` section.

`load_params` reads the file, rejects unknown keys, converts each value to the type its field declares and
runs each section's `__post_init__` checks. Every error is a `ConfigError` whose message starts with the
dotted key and the offending value and says what is accepted, e.g.
`data.label_fraction=1.5: must be in (0, 1]`. Nothing else in the pipeline validates params again.

Each numeric key's range is declared once, beside its field, and written as the error says it:

    label_fraction: float = bounded(0.1, "(0, 1]")        # data.label_fraction=0.0: must be in (0, 1]
    epochs: int = bounded(10, ">= 1")                     # pretrain.epochs=0: must be a positive integer
    epsilon_high: float = unbounded(0.28, ">= epsilon: checked in __post_init__")

Every section is a `Section`, whose `__post_init__` checks all declared bounds and names the key from the
section's `section` (its dotted place in the file); rules that relate several keys (`min_lr <= base_lr`) stay
as code in the section's own `__post_init__`, through `Section.require`.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
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


# -- bounds: each numeric key's accepted interval, declared once next to its field and checked by `Section`

_BOUNDS = "bounds"  # the dataclass field-metadata key that holds a numeric field's `Bounds`
_NUMBER = r"-?\d+(?:\.\d+)?(?:e-?\d+)?|\d+\*\*\d+"  # 1, 0.5, 1.0e-3, 2**32
_ONE_SIDED = re.compile(rf"(>=|>|<=|<) ({_NUMBER})")
_TWO_SIDED = re.compile(rf"([\[(])({_NUMBER}), ({_NUMBER})([\])])")


def _number(text: str) -> float:
    base, _, power = text.partition("**")
    return int(base) ** int(power) if power else float(text)


@dataclass(frozen=True)
class Bounds:
    """The values a numeric key accepts, parsed from the interval as a reader writes it and as errors say it:
    `>= 1`, `> 0`, `<= 1`, `(0, 1]`, `[0, 2**32)`. No interval (`unbounded`) accepts every finite number.

    `note` follows the rule in parentheses, e.g. what a boundary value means (`0: off`).
    """

    interval: str = ""
    note: str = ""
    lower: float = -math.inf
    upper: float = math.inf
    lower_open: bool = False
    upper_open: bool = False

    @classmethod
    def parse(cls, interval: str, note: str = "") -> Bounds:
        """`Bounds` from `>= 1`, `(0, 1]`, ...; a typo fails when the section's module is imported."""
        if one := _ONE_SIDED.fullmatch(interval):
            sign, number = one.group(1), _number(one.group(2))
            if sign.startswith(">"):
                return cls(interval, note, lower=number, lower_open=sign == ">")
            return cls(interval, note, upper=number, upper_open=sign == "<")
        if two := _TWO_SIDED.fullmatch(interval):
            opening, lower, upper, closing = two.groups()
            return cls(interval, note, _number(lower), _number(upper), opening == "(", closing == ")")
        raise ValueError(f"bounds {interval!r}: write '>= a', '> a', '<= b', '< b' or an interval like '(a, b]'")

    def admits(self, value: float) -> bool:
        """Whether `value` lies in the interval."""
        above = value > self.lower if self.lower_open else value >= self.lower
        below = value < self.upper if self.upper_open else value <= self.upper
        return above and below

    def rule(self, *, integer: bool, optional: bool) -> str:
        """What an error says is accepted: 'must be in (0, 1]', 'must be a positive integer or null (...)'.

        Integer keys from 1 up are 'a positive integer'; integer keys from 0 say 'an integer' before the interval.
        """
        interval = f"in {self.interval}" if self.interval.startswith(("[", "(")) else self.interval
        if integer and self.interval == ">= 1":
            interval = "a positive integer"
        elif integer and self.lower == 0 and not self.lower_open:
            interval = f"an integer {interval}"
        return f"must be {interval}" + (" or null" if optional else "") + (f" ({self.note})" if self.note else "")


def bounded(default: Any, interval: str, note: str = "") -> Any:
    """A numeric field's default and the values it accepts, declared once; `Section` checks every instance.

    `epochs: int = bounded(10, ">= 1")` refuses `epochs: 0` with `<section>.epochs=0: must be a positive
    integer`; `label_fraction: float = bounded(0.1, "(0, 1]")` says `must be in (0, 1]`. A subclass that only
    changes the default (`epochs: int = 150`) keeps the bounds its base declared.
    """
    return dataclasses.field(default=default, metadata={_BOUNDS: Bounds.parse(interval, note)})


def unbounded(default: Any, why: str) -> Any:
    """A numeric field that accepts any finite value on its own; `why` says so, or which check relates it to
    other keys (e.g. `epsilon_high >= epsilon`), so that no numeric key is left without a declared range."""
    return dataclasses.field(default=default, metadata={_BOUNDS: Bounds(note=why)})


@functools.cache
def declared_bounds(cls: type) -> dict[str, tuple[Bounds, bool, bool]]:
    """Each numeric field of the dataclass `cls`: (its bounds, whether it is an integer, whether null is accepted).

    A field a subclass redeclares only to change its default keeps the bounds of the class that declared them.

    Raises:
        TypeError: a numeric field declares no bounds (`bounded` or `unbounded`): a mistake in the code.
    """
    declared: dict[str, Bounds] = {}
    for klass in reversed(cls.__mro__):  # the base first, so a subclass's declaration wins
        for field in vars(klass).get("__dataclass_fields__", {}).values():
            if _BOUNDS in field.metadata:
                declared[field.name] = field.metadata[_BOUNDS]
    hints = typing.get_type_hints(cls)
    numeric: dict[str, tuple[Bounds, bool, bool]] = {}
    for field in dataclasses.fields(cls):
        hint = hints[field.name]
        if typing.get_origin(hint) is list:  # a list's items are checked by its section, not as one number
            continue
        options = typing.get_args(hint) or (hint,)
        kinds = [option for option in options if option is not type(None)]
        if kinds not in ([int], [float]):
            continue
        if field.name not in declared:
            raise TypeError(f"{cls.__name__}.{field.name}: a numeric field declares its range with bounded() or "
                            "unbounded()")
        numeric[field.name] = (declared[field.name], kinds == [int], len(kinds) < len(options))
    return numeric


def check_bounds(params: Any, section: str) -> None:
    """Refuse the first numeric field of `params` (a dataclass instance) outside its declared bounds, naming
    the key `<section>.<field>` (the bare field at the top level, `section` empty)."""
    for name, (bounds, integer, optional) in declared_bounds(type(params)).items():
        value = getattr(params, name)
        if value is None and optional:
            continue
        key = f"{section}.{name}" if section else name
        if not (integer or math.isfinite(value)):  # as load_params refuses it, for a section built in Python
            _fail(key, value, "must be a finite number")
        if not bounds.admits(value):
            _fail(key, value, bounds.rule(integer=integer, optional=optional))


@dataclass(frozen=True)
class Section:
    """A `params.yaml` section: `section` is its dotted place in the file, which every error about its keys
    names. Construction (from YAML by `load_params` or in Python) checks each numeric key against its declared
    bounds (`check_bounds`); a subclass's `__post_init__` calls this first, then checks the rules that relate
    several keys, through `require`.
    """

    section: ClassVar[str] = ""  # the top level: keys are spelled bare (`seed`)

    def __post_init__(self) -> None:
        check_bounds(self, self.section)

    @classmethod
    def dotted(cls, name: str) -> str:
        """The key `name` of this section as params.yaml spells it: `pretrain.epochs`."""
        return f"{cls.section}.{name}" if cls.section else name

    def require(self, ok: bool, name: str, rule: str) -> None:
        """Refuse this section's key `name` and its value with `rule` (what is accepted) unless `ok`."""
        _check(ok, self.dotted(name), getattr(self, name), rule)


@dataclass(frozen=True)
class TrackingParams(Section):
    """Where and under which names MLflow records runs and model versions.

    Every registered name holds one kind of model (track, role and, for language models, objective), so any
    version of a name can stand in for any other and `@challenger` / `@champion` compare like with like:
    `encoder_model` (the pretrain stage's encoder), `classifier_model` (the finetune stage's classifier and
    its GRPO successor from rl), and per objective `<lm_model>-ar` / `<lm_model>-mdm` (text_pretrain) and
    `<task_model>-ar` / `<task_model>-mdm` (text_sft and its GRPO successor from text_rl).
    """

    section: ClassVar[str] = "tracking"
    objectives: ClassVar[tuple[str, ...]] = ("ar", "mdm")

    experiment: str = "ssl-pipeline"
    encoder_model: str = "ssl-pipeline-encoder"
    classifier_model: str = "ssl-pipeline-classifier"
    lm_model: str = "ssl-pipeline-lm"  # prefix: the language models are <lm_model>-ar and <lm_model>-mdm
    task_model: str = "ssl-pipeline-task-lm"  # prefix: the task models are <task_model>-ar and <task_model>-mdm

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("experiment", "encoder_model", "classifier_model", "lm_model", "task_model"):
            self.require(bool(_NAME.fullmatch(getattr(self, name))), name,
                         "must be a non-empty name of letters, digits, '.', '_' or '-'")
        seen: dict[str, str] = {}
        for gate, name in self.registered_models().items():
            key = f"{gate.split('_')[0]}_model"  # lm_ar -> lm_model
            self.require(name not in seen, key, f"gives the registered name {name!r}, as "
                         f"{self.dotted(seen.get(name, ''))} does; each kind of model needs a name of its own")
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
class OptimParams(Section):
    """Optimisation and runtime keys every training stage shares; the base trainer reads only these.

    `batch_size` is the global batch per optimizer step (all processes, all accumulation micro-steps), so
    results do not depend on how many processes run. The peak lr, `learning_rate`, comes from the key a subclass
    declares (`lr_key`): `base_lr` scaled by the batch (`TrainParams`) or `lr` as it is (`GRPOParams`); `min_lr`,
    where the cosine schedule ends, is in the same unit as that key.
    """

    section: ClassVar[str] = "train"
    lr_key: ClassVar[str] = ""

    epochs: int = bounded(10, ">= 1")
    batch_size: int = bounded(128, ">= 1")
    accumulation_steps: int = bounded(1, ">= 1")
    min_lr: float = unbounded(0.0, "in [0, the lr key]: checked in __post_init__")
    weight_decay: float = bounded(0.05, ">= 0")
    adam_beta2: float = bounded(0.95, "(0, 1)")
    warmup_epochs: float = unbounded(1.0, "in [0, epochs]: checked in __post_init__")
    clip_grad: float | None = bounded(None, "> 0", "no clipping")
    drop_path_rate: float = bounded(0.0, "[0, 1)")
    precision: Precision = "auto"
    compile: bool = False
    checkpoint_every: int = bounded(100, ">= 1")
    log_every: int = bounded(10, ">= 1")

    @property
    def learning_rate(self) -> float:
        """The peak lr of the schedule."""
        raise NotImplementedError

    def __post_init__(self) -> None:
        super().__post_init__()
        self.require(self.batch_size % self.accumulation_steps == 0, "batch_size",
                     f"must be a multiple of {self.dotted('accumulation_steps')}={self.accumulation_steps}")
        self.require(0 <= self.min_lr <= getattr(self, self.lr_key), "min_lr",
                     f"must be in [0, {self.dotted(self.lr_key)}]")
        self.require(0 <= self.warmup_epochs <= self.epochs, "warmup_epochs",
                     f"must be in [0, {self.dotted('epochs')}={self.epochs}]")


@dataclass(frozen=True)
class TrainParams(OptimParams):
    """A training stage whose lr follows the batch: lr = base_lr x batch_size / 256 (the linear scaling rule)."""

    lr_key: ClassVar[str] = "base_lr"

    base_lr: float = bounded(1.0e-3, "> 0")

    @property
    def learning_rate(self) -> float:
        return self.base_lr * self.batch_size / 256


@dataclass(frozen=True)
class GRPOParams(OptimParams):
    """The GRPO keys both tracks' rl sections share (`pipeline_lib.core.grpo`): `group_size` samples per input at
    `temperature`, group-relative advantages (`scale_rewards`: `group` divides by each group's std, `none` is
    Dr. GRPO), `num_iterations` updates per sampled batch against the sampling policy with the clip range
    `epsilon` / `epsilon_high`, and a k3 KL penalty `beta` to the frozen reference.

    `lr` is the learning rate itself: it does not grow with `batch_size`. More inputs a step lower the noise of
    GRPO's gradient, not its size, and with Adam every weight moves by about the lr whatever its signal, so a
    batch-scaled lr would turn the remedy for noisy gradients into the step size that collapses the policy.
    """

    section: ClassVar[str] = "grpo"
    lr_key: ClassVar[str] = "lr"

    lr: float = bounded(1.0e-4, "> 0")
    group_size: int = bounded(8, ">= 2", "advantages are relative to the group")
    temperature: float = bounded(1.0, "> 0", "greedy samples of an input would all be the same")
    scale_rewards: RewardScale = "group"
    epsilon: float = bounded(0.2, "(0, 1)")
    epsilon_high: float = unbounded(0.28, ">= epsilon: checked in __post_init__")
    num_iterations: int = bounded(1, ">= 1")
    beta: float = bounded(0.04, ">= 0", "0: no KL penalty")

    @property
    def learning_rate(self) -> float:
        return self.lr

    def __post_init__(self) -> None:
        super().__post_init__()
        self.require(self.epsilon_high >= self.epsilon, "epsilon_high",
                     f"must be >= {self.dotted('epsilon')}={self.epsilon} (clip-higher widens only the upper side)")


MetricMode = Literal["max", "min"]


@dataclass(frozen=True)
class GateParams:
    """One registered model's promotion gate: its challenger becomes its champion only if it beats the
    champion on `metric` (read from the MLflow run that registered each version) by more than `min_delta`
    in the direction `mode` (max: higher is better).

    Not a `Section` of its own: the same gate sits under each model's key (`promote.classifier`, ...), so
    `PromoteParams`, which knows the key, checks it."""

    metric: str = ""
    mode: MetricMode = "max"
    min_delta: float = bounded(0.0, ">= 0", "how much better the challenger must be")


@dataclass(frozen=True)
class PromoteParams(Section):
    """The promotion gates (`python -m pipeline_lib.promote`): one optional gate per registered model, keyed
    as `TrackingParams.registered_models` keys them. A null gate is not applied.

    The vision gates read the metrics of the run that registered the version: `loss` (pretrain),
    `post_trained.*` (rl, on test) or `test.*` (added to the pretrain run, e.g. `test.linear_probe_top1`, and to
    the finetune runs by evaluate). The text task gates read `test.accuracy` (exact
    match), `test.format_rate`, `test.pass_at_<k>`, which text_task_evaluate adds to the text_sft and text_rl
    runs; the language-model gates `validation.bits_per_character`, added by text_evaluate.
    """

    section: ClassVar[str] = "promote"

    encoder: GateParams | None = None
    classifier: GateParams | None = dataclasses.field(
        default_factory=lambda: GateParams("post_trained.reward_greedy", "max", 0.005))
    lm_ar: GateParams | None = None
    lm_mdm: GateParams | None = None
    task_ar: GateParams | None = dataclasses.field(default_factory=lambda: GateParams("test.accuracy", "max", 0.01))
    task_mdm: GateParams | None = dataclasses.field(default_factory=lambda: GateParams("test.accuracy", "max", 0.01))

    def __post_init__(self) -> None:
        super().__post_init__()
        for model, gate in self.gates().items():
            _check(bool(_METRIC.fullmatch(gate.metric)), f"{self.dotted(model)}.metric", gate.metric,
                   "must be the name of a metric logged by the run that registered the model, e.g. "
                   "post_trained.reward_greedy, test.top1 or test.accuracy")
            check_bounds(gate, self.dotted(model))

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
    apply_overrides(raw, overrides)
    return params_from_dict(raw, schema)


def apply_overrides(raw: dict[str, Any], overrides: Sequence[str]) -> None:
    """Set each `section.key=value` in the parsed params document `raw`, the value parsed as YAML (as `dvc exp run
    -S` parses it).

    Raises:
        ConfigError: an override without `=` or a key.
    """
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
    raw = dict(raw)
    for name in fields:  # a section that `inherits` another takes that one's keys, then its own over them
        base = getattr(hints[name], "inherits", None) if isinstance(hints[name], type) else None
        if base is not None and isinstance(raw.get(base), Mapping):
            raw[name] = {**raw[base], **(raw.get(name) or {})}
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
class CoreParams(Section):
    """The sections every track shares: the seed, the device, MLflow names and the promotion gates.

    Each track extends this with its own sections (`vision.config.VisionParams`, `text.config.TextParams`);
    `pipeline_lib.params.Params` is both, the whole `params.yaml`. A track's code types its params as its own
    view, so it never imports the other track. Its `section` is the top level: its keys are spelled bare.
    """

    seed: int = bounded(0, "[0, 2**32)")
    device: Device = "auto"
    tracking: TrackingParams = dataclasses.field(default_factory=TrackingParams)
    promote: PromoteParams = dataclasses.field(default_factory=PromoteParams)
