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
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Union

import yaml

DataSource = Literal["digits", "cifar10", "stl10", "imagefolder"]
Device = Literal["auto", "cpu", "cuda", "mps"]

# Official archives (URL, sha256). A user may point `data.url` at a mirror with its own sha256.
OFFICIAL_ARCHIVES: dict[str, tuple[str, str]] = {
    "cifar10": (
        "https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz",
        "c4a38c50a1bc5f3a1c5537f2155ab9d68f9f25eb1ed8d9ddda3db29a59bca1dd",
    ),
    "stl10": (
        "http://ai.stanford.edu/~acoates/stl10/stl10_binary.tar.gz",
        "f31fd99273a1acb8609c8db427cebb1de3f71de77758cdc0e22956e1289b9866",
    ),
}

_SHA256 = re.compile(r"[0-9a-fA-F]{64}")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


class ConfigError(ValueError):
    """A params value is missing, unknown, of the wrong type or out of range; the message names the key."""


def _fail(key: str, value: Any, rule: str) -> typing.NoReturn:
    raise ConfigError(f"{key}={value!r}: {rule}")


def _check(ok: bool, key: str, value: Any, rule: str) -> None:
    if not ok:
        _fail(key, value, rule)


@dataclass(frozen=True)
class TrackingParams:
    """Where and under which names MLflow records runs and model versions."""

    experiment: str = "ssl-pipeline"
    encoder_model: str = "ssl-pipeline-encoder"
    classifier_model: str = "ssl-pipeline-classifier"

    def __post_init__(self) -> None:
        for name in ("experiment", "encoder_model", "classifier_model"):
            value = getattr(self, name)
            _check(
                bool(_NAME.fullmatch(value)),
                f"tracking.{name}",
                value,
                "must be a non-empty name of letters, digits, '.', '_' or '-'",
            )


@dataclass(frozen=True)
class DataParams:
    """What the fetch stage downloads or reads and how it splits it (see the data contract in the README)."""

    source: DataSource = "digits"
    url: str | None = None
    sha256: str | None = None
    path: str | None = None
    image_size: int | None = None
    label_fraction: float = 0.1
    rl_fraction: float = 0.1
    test_fraction: float = 0.2
    max_images: int | None = None

    def __post_init__(self) -> None:
        _check(0.0 < self.label_fraction <= 1.0, "data.label_fraction", self.label_fraction, "must be in (0, 1]")
        _check(0.0 <= self.rl_fraction < 1.0, "data.rl_fraction", self.rl_fraction, "must be in [0, 1)")
        _check(0.0 < self.test_fraction < 1.0, "data.test_fraction", self.test_fraction, "must be in (0, 1)")
        _check(
            self.label_fraction + self.rl_fraction <= 1.0,
            "data.rl_fraction",
            self.rl_fraction,
            f"data.label_fraction + data.rl_fraction = {self.label_fraction} + {self.rl_fraction} must be <= 1 "
            "(the labeled and rl splits are disjoint); lower one, e.g. rl_fraction 0 with label_fraction 1",
        )
        if self.max_images is not None:
            _check(self.max_images >= 1, "data.max_images", self.max_images, "must be a positive integer or null")
        if self.image_size is not None:
            _check(self.image_size >= 1, "data.image_size", self.image_size, "must be a positive integer or null")
            _check(
                self.source == "imagefolder",
                "data.image_size",
                self.image_size,
                f"only the imagefolder source resizes images; remove it for source {self.source!r}",
            )
        if self.sha256 is not None:
            hex_digest = bool(_SHA256.fullmatch(self.sha256))
            _check(hex_digest, "data.sha256", self.sha256, "must be 64 hexadecimal characters")
        self._check_location()

    def _check_location(self) -> None:
        """Each source takes its images from exactly one place: bundled, an official URL, a mirror, a folder."""
        if self.source == "digits":
            for name in ("url", "sha256", "path"):
                value = getattr(self, name)
                _check(value is None, f"data.{name}", value, "must be null for source 'digits' (bundled data)")
            return
        _check(
            self.url is not None or self.sha256 is None,
            "data.sha256",
            self.sha256,
            "is only set together with data.url (it is the digest of the archive to download)",
        )
        if self.url is not None:
            _check(
                self.sha256 is not None,
                "data.sha256",
                self.sha256,
                f"is required with data.url={self.url!r}: downloads are verified before use",
            )
        if self.source in OFFICIAL_ARCHIVES:
            _check(self.path is None, "data.path", self.path, f"must be null for source {self.source!r}")
            return
        _check(
            (self.url is None) != (self.path is None),
            "data.path",
            self.path,
            "source 'imagefolder' needs exactly one of data.path (a local folder) or data.url (an archive)",
        )

    @property
    def archive(self) -> tuple[str, str] | None:
        """(url, sha256) to download, or None for bundled data and local folders."""
        if self.url is not None:
            assert self.sha256 is not None
            return self.url, self.sha256.lower()
        return OFFICIAL_ARCHIVES.get(self.source)


@dataclass(frozen=True)
class Params:
    """The whole `params.yaml`."""

    seed: int = 0
    device: Device = "auto"
    tracking: TrackingParams = dataclasses.field(default_factory=TrackingParams)
    data: DataParams = dataclasses.field(default_factory=DataParams)

    def __post_init__(self) -> None:
        _check(0 <= self.seed < 2**32, "seed", self.seed, "must be an integer in [0, 2**32)")


def load_params(path: str | Path) -> Params:
    """Read and validate a params file; raise `ConfigError` naming the first bad key."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: params file not found")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from err
    return params_from_dict({} if raw is None else raw)  # an empty file means all defaults


def params_from_dict(raw: Mapping[str, Any]) -> Params:
    """Build `Params` from an already-parsed mapping (the YAML document)."""
    return _build(Params, raw, prefix="")


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
        (inner,) = options
        return _convert(inner, value, key)
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
