"""A classifier is the encoder with timm's own classification head: `reset_classifier(num_classes)`.

timm models know how to pool and where their head goes (a ViT's class token or token mean, a CNN's global
pool), so the classifier is the same module class as the encoder: it saves, loads and is finetuned the same
way, and `param_groups_layer_decay` finds its blocks through the model's `group_matcher`.
"""

from __future__ import annotations

from torch import nn


def attach_head(encoder: nn.Module, num_classes: int, *, freeze_encoder: bool = False) -> nn.Module:
    """Give `encoder` a fresh linear head for `num_classes`; with `freeze_encoder`, only the head trains.

    Args:
        encoder: a timm model built with `num_classes=0`.
        num_classes: classes of the labeled data (>= 2).
        freeze_encoder: the linear-probe setting: every parameter outside the head stops requiring grad.

    Returns:
        The same module, changed in place.

    Raises:
        ValueError: fewer than two classes, or a model without timm's classifier interface.
    """
    if num_classes < 2:
        raise ValueError(f"a classifier needs at least 2 classes, got {num_classes}")
    if not hasattr(encoder, "reset_classifier") or not hasattr(encoder, "get_classifier"):
        raise ValueError(f"{type(encoder).__name__} has no timm classifier interface (reset_classifier)")
    encoder.reset_classifier(num_classes)
    head = encoder.get_classifier()
    if freeze_encoder:
        head_params = {id(p) for p in head.parameters()}
        for param in encoder.parameters():
            param.requires_grad_(id(param) in head_params)
    return encoder


def head_only_train(model: nn.Module) -> None:
    """Training mode for the head alone: a frozen encoder keeps dropout, drop path and norms in eval mode."""
    model.eval()
    model.get_classifier().train()
