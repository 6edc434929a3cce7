"""Build, save and load networks: a timm ViT (custom or by name) or any timm backbone, plus its preprocessing.

An exported network is a folder with its weights (`encoder.safetensors` for a pretrained encoder,
`classifier.safetensors` for a finetuned classifier: the unwrapped state dict) and `config.json` (everything
needed to rebuild it without the params file: architecture, input channels and size, normalisation, feature
size, number of classes, and whatever the stage that made it records).

Compound scaling (`model.compound_phi`, `pipeline_lib.vision.models.compound`) is resolved once by the stage that
decides the input size (`resolve_params`); networks are built and saved from the resolved spec only, whose
`compound_phi` is 0, so `build_encoder` and `save_network` refuse a spec that still asks to be scaled.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import timm
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from pipeline_lib.core.download import sha256_file
from pipeline_lib.core.errors import ConfigError
from pipeline_lib.vision.config import ModelParams, VisionParams, check_patch_size
from pipeline_lib.vision.models.backbone import feature_dim, unknown_model
from pipeline_lib.vision.models.classifier import AbstainClassifier
from pipeline_lib.vision.models.compound import CompoundScaling, compound_scale
from pipeline_lib.vision.models.preprocess import Preprocess

ENCODER_FILE = "encoder.safetensors"
CLASSIFIER_FILE = "classifier.safetensors"
CONFIG_FILE = "config.json"


def is_vit(name: str) -> bool:
    """Whether `model.name` is a timm VisionTransformer (custom `vit` or a timm ViT model name)."""
    if name == "vit":
        return True
    if not timm.is_model(name):
        return False
    return timm.models.model_entrypoint(name).__module__.endswith(".vision_transformer")


def resolve_params(params: VisionParams, *, data_img_size: int) -> tuple[VisionParams, CompoundScaling]:
    """`params` with its `model` section compound-scaled for images of side `data_img_size`, and the record.

    A stage calls this once, where it reads the data, and hands the result to everything downstream (encoder,
    MAE decoder, preprocessing, saved config); it hashes its fingerprint from the params as configured. At
    `model.compound_phi` 0 the params come back unchanged.

    Raises:
        ConfigError: no timm EfficientNet variant is near the scaled multipliers.
    """
    model, scaling = compound_scale(params.model, data_img_size=data_img_size)
    return dataclasses.replace(params, model=model), scaling


def check_encoder_input(params: VisionParams, *, data_img_size: int,
                        origin: str) -> tuple[VisionParams, CompoundScaling]:
    """Refuse, before any work, an encoder the builders would refuse for images of side `data_img_size`.

    What `params.yaml` alone cannot decide (`VisionParams` checks the rest): `model.name` is 'vit' or a timm model,
    compound scaling finds an EfficientNet variant (`compound.nearest_efficientnet`), and a ViT's patch side
    divides its input side, with a timm ViT's own patch size when `model.patch_size` is null (the rule of
    `config.check_patch_size`; `mae.build_vit_encoder` enforces the same at build time). Reads no weights.

    Args:
        params: the params as configured.
        data_img_size: side of the prepared images.
        origin: where that side comes from, for the message (e.g. "data.source 'imagefolder' in data/prepared").

    Returns:
        `resolve_params(params, data_img_size=data_img_size)`.

    Raises:
        ConfigError: naming the key.
    """
    if params.model.name != "vit" and not timm.is_model(params.model.name):
        raise ConfigError(f"model.name={params.model.name!r}: {unknown_model(params.model.name)} (accepted: 'vit' "
                          "or a timm model name)")
    resolved, scaling = resolve_params(params, data_img_size=data_img_size)
    model = resolved.model
    if is_vit(model.name):
        own = vit_patch_size(model) if model.patch_size is None else None
        where = "model.img_size" if model.img_size is not None else origin
        check_patch_size(model.patch_size, scaling.img_size, where, own_patch=own)
    return resolved, scaling


def vit_patch_size(model: ModelParams) -> int:
    """The patch side a ViT spec builds with: `model.patch_size`, or the timm model's own when it is null (read
    from the model built on the meta device: no weights are allocated)."""
    if model.patch_size is not None:
        return model.patch_size
    with torch.device("meta"):
        return timm.create_model(model.name, pretrained=False, num_classes=0).patch_embed.patch_size[0]


def _check_resolved(model: ModelParams) -> None:
    if model.compound_phi != 0:
        raise ValueError(
            f"model.compound_phi={model.compound_phi!r}: build and save the resolved spec, "
            "pipeline_lib.vision.models.compound.compound_scale(model, ...)[0], whose compound_phi is 0"
        )


def build_encoder(model: ModelParams, *, in_chans: int, img_size: int, drop_path_rate: float = 0.0) -> nn.Module:
    """The encoder `model` describes, randomly initialised; `encoder(x)` gives pooled (B, D) features.

    Every timm model keeps its own classifier handling: `encoder.reset_classifier(num_classes)` turns it into
    a classifier (the finetune stage does).

    Raises:
        ValueError: `model.compound_phi` is not 0 (resolve the spec first: its input size changes too).
    """
    from pipeline_lib.vision.models.backbone import create_backbone
    from pipeline_lib.vision.models.mae import build_vit_encoder

    _check_resolved(model)
    if is_vit(model.name):
        custom = model.name == "vit"
        return build_vit_encoder(
            model_name=None if custom else model.name, img_size=img_size, patch_size=vit_patch_size(model),
            in_chans=in_chans, embed_dim=model.embed_dim, depth=model.depth, num_heads=model.num_heads,
            drop_path_rate=drop_path_rate, global_pool=model.global_pool,
        )
    return create_backbone(model.name, in_chans=in_chans, drop_path_rate=drop_path_rate)


def save_network(network: nn.Module, preprocess: Preprocess, model: ModelParams, folder: Path, *, in_chans: int,
                 weights: str = ENCODER_FILE, **extra: Any) -> dict[str, Any]:
    """Write the weights (file name `weights`) and `config.json` into `folder`; return the config.

    `network` is an encoder (`num_classes` 0), the same encoder with a classification head, or such a
    classifier with an abstain action (`AbstainClassifier`; config `abstain: true`, one more output). `model`
    is the resolved spec the network was built from (`compound_phi` 0).
    """
    _check_resolved(model)
    extra.setdefault("abstain", isinstance(network, AbstainClassifier))
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in network.state_dict().items()}
    save_file(state, folder / weights)
    config = {
        "model": {**dataclasses.asdict(model), "img_size": preprocess.img_size, "in_chans": in_chans},
        "preprocess": {"mean": preprocess.mean.flatten().tolist(), "std": preprocess.std.flatten().tolist(),
                       "img_size": preprocess.img_size},
        "feature_dim": feature_dim(network),
        "num_classes": int(getattr(network, "num_classes", 0)),
        "weights": weights,
        **extra,
    }
    (folder / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    return config


def load_network(folder: Path, *, drop_path_rate: float = 0.0) -> tuple[nn.Module, Preprocess, dict[str, Any]]:
    """Rebuild an exported encoder or classifier (with abstain, when it has one) in eval mode, with its
    preprocessing and config.

    `drop_path_rate` only matters to a caller that trains the network further (stochastic depth is not
    stored: it has no weights).
    """
    folder = Path(folder)
    config = read_network_config(folder)
    model = saved_model_params(config)
    in_chans = config["model"]["in_chans"]
    network = build_encoder(model, in_chans=in_chans, img_size=model.img_size, drop_path_rate=drop_path_rate)
    if config.get("num_classes", 0):
        network.reset_classifier(config["num_classes"])
    if config.get("abstain"):
        network = AbstainClassifier(network)
    network.load_state_dict(load_file(folder / config.get("weights", ENCODER_FILE)))
    preprocess = Preprocess(**config["preprocess"])
    return network.eval(), preprocess.eval(), config


def read_network_config(folder: Path) -> dict[str, Any]:
    """The `config.json` of an exported network, without its weights."""
    config_path = Path(folder) / CONFIG_FILE
    if not config_path.is_file():
        raise FileNotFoundError(f"{config_path}: no exported network here (expected config.json and weights)")
    return json.loads(config_path.read_text())


def saved_model_params(config: dict[str, Any]) -> ModelParams:
    """The `ModelParams` an exported network was built from (its `config.json`); keys added to `ModelParams`
    after the export take their defaults."""
    spec = {key: value for key, value in config["model"].items() if key != "in_chans"}
    return ModelParams(**spec)


def encoder_digest(encoder_dir: Path | None) -> str:
    """sha256 of the pretrained encoder's weights ("none" when training from scratch)."""
    if encoder_dir is None:
        return "none"
    config = json.loads((Path(encoder_dir) / CONFIG_FILE).read_text())
    return sha256_file(Path(encoder_dir) / config.get("weights", ENCODER_FILE))
