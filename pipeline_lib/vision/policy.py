"""The classifier as a policy: pi(a | x) = softmax(logits / temperature) over the classes, plus `abstain`.

The abstain action comes from `pipeline_lib.vision.models.classifier.AbstainClassifier`, which starts every image
at a fixed abstain probability without moving the class distribution. The KL to the reference (which has no
abstain action) is measured over what both define, the class distribution renormalised (`class_kl`).

Sampling and updates both run with the model in eval mode (no dropout, drop path or batch-norm statistics
updates), so the policy that samples is the policy that is updated.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


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
