"""Any timm model, by name, as a randomly initialised feature extractor for self-supervised pretraining."""

from __future__ import annotations

import difflib
from typing import Any

import timm
from torch import nn


def _close_matches(name: str, count: int = 5) -> list[str]:
    return difflib.get_close_matches(name, timm.list_models(), n=count, cutoff=0.6)


def unknown_model(name: str) -> str:
    """What is wrong with a name timm does not know, with the closest names it does."""
    suggestions = ", ".join(_close_matches(name)) or "none; see timm.list_models()"
    return f"unknown timm model {name!r}; close matches: {suggestions}"


def create_backbone(name: str, *, in_chans: int, img_size: int | None = None, **overrides: Any) -> nn.Module:
    """A timm model without its classifier: `backbone(x)` gives pooled (B, num_features) features.

    Weights are always random (`pretrained=False`): nothing is downloaded. `img_size` reaches only models whose
    constructor takes it (ViT-like models, whose position embeddings depend on it); convolutional networks pool
    adaptively and run at any size, so for them it is ignored. `overrides` go to the constructor as they are
    (e.g. `patch_size=8`, `drop_path_rate=0.1`).

    Args:
        name: a timm model name, optionally with a pretrained tag (`resnet18`, `vit_small_patch16_224`).
        in_chans: input channels (1 for grayscale digits).
        img_size: input side for models that need it; None keeps the model's default.
        **overrides: further keyword arguments for the model's constructor.

    Raises:
        ValueError: unknown name (with the closest timm names), or an override the model does not accept.
    """
    if not timm.is_model(name):
        raise ValueError(unknown_model(name))
    kwargs: dict[str, Any] = {"pretrained": False, "num_classes": 0, "in_chans": in_chans, **overrides}
    if img_size is not None:
        try:
            return timm.create_model(name, img_size=img_size, **kwargs)
        except TypeError as error:
            if "img_size" not in str(error):
                raise _override_error(name, overrides, error) from error
    try:
        return timm.create_model(name, **kwargs)
    except TypeError as error:
        raise _override_error(name, overrides, error) from error


def _override_error(name: str, overrides: dict[str, Any], error: TypeError) -> Exception:
    """A TypeError from the constructor, reworded when it is about one of the caller's overrides."""
    rejected = [key for key in overrides if repr(key) in str(error)]
    if not rejected:
        return error
    return ValueError(f"timm model {name!r} does not accept {', '.join(rejected)} ({error})")


def feature_dim(backbone: nn.Module) -> int:
    """Size D of the backbone's pooled features."""
    return int(backbone.num_features)
