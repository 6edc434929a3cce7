"""A trained language model's folder: weights (safetensors), config.json and tokenizer.json."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import nn

from pipeline_lib.text.config import TextMoEParams
from pipeline_lib.text.data.tokenizer import Tokenizer, load_tokenizer
from pipeline_lib.text.models.mtp import MultiTokenPrediction
from pipeline_lib.text.models.objectives import OBJECTIVES as OBJECTIVES
from pipeline_lib.text.models.objectives import resolve_objective
from pipeline_lib.text.models.transformer import TransformerLM

WEIGHTS_FILE, CONFIG_FILE, TOKENIZER_FILE = "model.safetensors", "config.json", "tokenizer.json"


def exported(model: nn.Module) -> TransformerLM:
    """The language model a trained module exports: itself, or the main model of a multi-token predictor."""
    lm = model.lm if isinstance(model, MultiTokenPrediction) else model
    if not isinstance(lm, TransformerLM):
        raise TypeError(f"expected a TransformerLM or a MultiTokenPrediction around one, got {type(model).__name__}")
    return lm


def lm_config(model: TransformerLM, objective: str, **extra: Any) -> dict[str, Any]:
    """A model folder's `config.json`: the objective, the architecture (`load_lm` rebuilds it) and `extra`."""
    return {"objective": objective, **model.architecture(), **extra}


def load_lm(folder: Path, device: torch.device | str = "cpu") -> tuple[TransformerLM, Tokenizer, dict[str, Any]]:
    """A trained language model folder -> (model in eval mode, its tokenizer, its config)."""
    folder = Path(folder)
    config = json.loads((folder / CONFIG_FILE).read_text())
    moe = config.get("moe")
    model = resolve_objective(config["objective"]).build(
        config["vocab_size"], d_model=config["d_model"], n_layer=config["n_layer"], n_head=config["n_head"],
        max_len=config["max_len"], moe=TextMoEParams(**moe) if moe else None, shift=config.get("shift", False))
    model.load_state_dict(load_file(folder / WEIGHTS_FILE))
    return model.to(device).eval(), load_tokenizer(folder / TOKENIZER_FILE), config
