"""The classifier as a policy: pi(a | x) = softmax(logits / temperature) over the classes, plus `abstain`.

`AbstainClassifier` gives a finetuned timm classifier one more action. Its logit is the log-sum-exp of the
class logits plus a learned linear function of the pooled features, whose weights start at 0 and whose bias
starts at logit(`init_prob`). So at the start every image abstains with probability exactly `init_prob` and
the class distribution, renormalised without abstain, is exactly the reference's: the post-trained policy
starts as close to the reference as an extra action allows, and the KL to the reference (which has no
abstain action) is measured over what both define, the renormalised class distribution (`class_kl`).

Sampling and updates both run with the model in eval mode (no dropout, drop path or batch-norm statistics
updates), so the policy that samples is the policy that is updated.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


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


def log_policy(logits: Tensor, temperature: float = 1.0) -> Tensor:
    """(B, A) logits -> (B, A) log pi(a | x) = log_softmax(logits / temperature), in float32."""
    return F.log_softmax(logits.float() / temperature, dim=1)


def sample_actions(log_probs: Tensor, uniforms: Tensor) -> Tensor:
    """G actions per row from one forward pass by inverse-CDF sampling: (B, A) log-probs, (B, G) uniforms in
    [0, 1) -> (B, G) action ids.

    The uniforms come from the step's generator for the global batch, each process keeping its rows, so the
    process count and a resume do not change which actions are drawn.
    """
    cumulative = log_probs.detach().float().exp().cumsum(dim=1)
    cumulative = cumulative / cumulative[:, -1:]  # exactly 1 at the end despite rounding
    actions = torch.searchsorted(cumulative, uniforms.to(cumulative.device, cumulative.dtype), right=True)
    return actions.clamp(max=log_probs.shape[1] - 1)


def class_kl(policy_logits: Tensor, reference_logits: Tensor, temperature: float = 1.0) -> Tensor:
    """Exact KL(policy || reference) per row over the reference's classes.

    `policy_logits` may carry extra actions after the C class columns (abstain); they are dropped and the
    class distribution renormalised, since the reference defines no probability for them.
    """
    classes = reference_logits.shape[1]
    policy = log_policy(policy_logits[:, :classes], temperature)
    reference = log_policy(reference_logits, temperature)
    return (policy.exp() * (policy - reference)).sum(dim=1)
