"""Build, save and load encoders: a timm ViT (custom or by name) or any timm backbone, plus its preprocessing.

An exported encoder is a folder with `encoder.safetensors` (the unwrapped state dict) and `config.json`
(everything needed to rebuild it without the params file: architecture, input channels and size,
normalisation, feature size, the method that trained it).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import timm
from safetensors.torch import load_file, save_file
from torch import nn

from pipeline_lib.config import ModelParams
from pipeline_lib.models.backbone import feature_dim
from pipeline_lib.models.preprocess import Preprocess

ENCODER_FILE = "encoder.safetensors"
CONFIG_FILE = "config.json"


def is_vit(name: str) -> bool:
    """Whether `model.name` is a timm VisionTransformer (custom `vit` or a timm ViT model name)."""
    if name == "vit":
        return True
    if not timm.is_model(name):
        return False
    return timm.models.model_entrypoint(name).__module__.endswith(".vision_transformer")


def build_encoder(model: ModelParams, *, in_chans: int, img_size: int) -> nn.Module:
    """The encoder `model` describes, randomly initialised; `encoder(x)` gives pooled (B, D) features."""
    from pipeline_lib.models.backbone import create_backbone
    from pipeline_lib.models.mae import build_vit_encoder

    if is_vit(model.name):
        custom = model.name == "vit"
        patch_size = model.patch_size
        if patch_size is None:  # keep the timm model's own patch size
            patch_size = timm.create_model(model.name, pretrained=False, num_classes=0).patch_embed.patch_size[0]
        return build_vit_encoder(
            model_name=None if custom else model.name, img_size=img_size, patch_size=patch_size, in_chans=in_chans,
            embed_dim=model.embed_dim, depth=model.depth, num_heads=model.num_heads,
            drop_path_rate=model.drop_path_rate,
        )
    return create_backbone(model.name, in_chans=in_chans, drop_path_rate=model.drop_path_rate)


def save_encoder(encoder: nn.Module, preprocess: Preprocess, model: ModelParams, folder: Path, *, in_chans: int,
                 **extra: Any) -> dict[str, Any]:
    """Write `encoder.safetensors` and `config.json` into `folder`; return the config."""
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in encoder.state_dict().items()}
    save_file(state, folder / ENCODER_FILE)
    config = {
        "model": {**dataclasses.asdict(model), "img_size": preprocess.img_size, "in_chans": in_chans},
        "preprocess": {"mean": preprocess.mean.flatten().tolist(), "std": preprocess.std.flatten().tolist(),
                       "img_size": preprocess.img_size},
        "feature_dim": feature_dim(encoder),
        **extra,
    }
    (folder / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    return config


def load_encoder(folder: Path) -> tuple[nn.Module, Preprocess, dict[str, Any]]:
    """Rebuild an exported encoder in eval mode, with its preprocessing and config."""
    config = json.loads((Path(folder) / CONFIG_FILE).read_text())
    spec = dict(config["model"])
    in_chans = spec.pop("in_chans")
    model = ModelParams(**spec)
    encoder = build_encoder(model, in_chans=in_chans, img_size=model.img_size)
    encoder.load_state_dict(load_file(Path(folder) / ENCODER_FILE))
    preprocess = Preprocess(**config["preprocess"])
    return encoder.eval(), preprocess.eval(), config

