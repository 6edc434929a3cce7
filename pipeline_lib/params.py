"""The whole `params.yaml`: the core sections and both tracks' sections, loaded and validated by one function.

This module sits with the stages, above the tracks: a track types its params as its own view
(`VisionParams`, `TextParams`), and `Params` is both.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline_lib.core import config
from pipeline_lib.text.config import TextParams
from pipeline_lib.vision.config import VisionParams


@dataclass(frozen=True)
class Params(TextParams, VisionParams):
    """The whole `params.yaml`: seed, device, tracking, promote, the vision sections and the text sections."""


def load_params(path: str | Path, overrides: Sequence[str] = ()) -> Params:
    """Read and validate the project's params file (`core.config.load_params` with the whole schema)."""
    return config.load_params(path, Params, overrides)


def params_from_dict(raw: dict[str, Any]) -> Params:
    """`Params` from an already-parsed YAML document."""
    return config.params_from_dict(raw, Params)
