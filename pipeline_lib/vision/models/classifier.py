"""A classifier is the encoder with timm's own classification head: `reset_classifier(num_classes)`.

timm models know how to pool and where their head goes (a ViT's class token or token mean, a CNN's global
pool), so the classifier is the same module class as the encoder: it saves, loads and is finetuned the same
way, and `param_groups_layer_decay` finds its blocks through the model's `group_matcher`.

`AbstainClassifier` gives a classifier one more action for RL post-training. Its logit is the log-sum-exp of
the class logits plus a learned linear function of the pooled features, whose weights start at 0 and whose
bias starts at logit(`init_prob`). So at the start every image abstains with probability exactly
`init_prob` and the class distribution, renormalised without abstain, is exactly the original's.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


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


class AbstainClassifier(nn.Module):
    """A timm classifier with C class logits and one abstain logit: forward gives (B, C + 1)."""

    def __init__(self, classifier: nn.Module, *, init_prob: float = 0.01) -> None:
        super().__init__()
        if not 0 < init_prob < 1:
            raise ValueError(f"init_prob={init_prob}: the initial abstain probability must be in (0, 1)")
        for name in ("forward_features", "forward_head", "get_classifier"):
            if not hasattr(classifier, name):
                raise ValueError(f"{type(classifier).__name__} has no timm classifier interface ({name})")
        self.classifier = classifier
        self.num_classes, self.num_features = classifier.num_classes, classifier.num_features  # as timm's
        self.abstain = nn.Linear(classifier.num_features, 1)
        nn.init.zeros_(self.abstain.weight)
        nn.init.constant_(self.abstain.bias, math.log(init_prob / (1 - init_prob)))

    def forward(self, images: Tensor) -> Tensor:
        features = self.classifier.forward_head(self.classifier.forward_features(images), pre_logits=True)
        logits = self.classifier.get_classifier()(features)
        abstain = torch.logsumexp(logits.float(), dim=1, keepdim=True) + self.abstain(features).float()
        return torch.cat([logits.float(), abstain], dim=1)
