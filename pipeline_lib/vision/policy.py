"""The classifier as a policy: pi(a | x) = softmax(logits / temperature) over the classes, plus `abstain`.

The abstain action comes from `pipeline_lib.vision.models.classifier.AbstainClassifier`, which starts every image
at a fixed abstain probability without moving the class distribution. The KL to the reference (which has no
abstain action) is measured over what both define, the class distribution renormalised (`class_kl`).

Sampling and updates both run with the model in eval mode (no dropout, drop path or batch-norm statistics
updates), so the policy that samples is the policy that is updated.

`ClassifierPolicy` is this policy for the core GRPO trainer (`pipeline_lib.core.grpo.GRPOTrainer`): one forward pass
gives pi(.|x), G actions per image are drawn from it by inverse-CDF on the step's uniforms (so the process count does
not change them) and scored by the declared reward table R[action, label]. Its KL to the reference is the k3 estimate
on the sampled class actions over the class distribution renormalised without abstain, the only distribution the
reference defines; abstain samples add no KL term.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pipeline_lib.core.grpo import LogProbs, Policy, Rollout, k3_kl
from pipeline_lib.core.trainer import Batch
from pipeline_lib.vision.models.classifier import AbstainClassifier
from pipeline_lib.vision.rewards import rewards_of


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


def head_modules(model: nn.Module) -> list[nn.Module]:
    """The policy's output layers: the classifier head (and the abstain logit)."""
    if isinstance(model, AbstainClassifier):
        return [model.classifier.get_classifier(), model.abstain]
    return [model.get_classifier()]


def train_heads_only(model: nn.Module) -> None:
    """Freeze every parameter of `model` but its output layers' (`rl.head_only`)."""
    heads = {id(p) for module in head_modules(model) for p in module.parameters()}
    for param in model.parameters():
        param.requires_grad_(id(param) in heads)


class ClassifierPolicy(Policy):
    """A classifier acting on images: G actions per image from softmax(logits / temperature) (+ abstain), rewarded
    by `table` (A, C): R[action, label], A = C, or C + 1 with abstain as the last action. `Batch.inputs` are the
    normalised images; `Batch.labels` their classes."""

    unit = "images"

    def __init__(self, table: Tensor, *, group_size: int, temperature: float) -> None:
        self.table, self.group_size, self.temperature = table, group_size, temperature
        self.num_classes = table.shape[1]

    def scored(self, log_probs: Tensor, actions: Tensor) -> LogProbs:
        """(b, A) log pi(.|x) and (b, G) actions -> their log-probs and the policy's entropy per image. An action the
        model lacks (abstain, for the reference) reads its last column; `kl` ignores those samples."""
        with torch.no_grad():
            entropy = -(log_probs.exp() * log_probs).sum(dim=1)
        chosen = actions.clamp(max=log_probs.shape[1] - 1)
        return LogProbs(log_probs.gather(1, chosen), entropy=entropy, distribution=log_probs)

    def sample(self, model: nn.Module, batch: Batch) -> Rollout:
        """One forward pass: pi(.|x), G actions drawn from it, and their log-probs (with gradients) for the update."""
        log_probs = log_policy(model(batch.inputs), self.temperature)
        uniforms = torch.rand(batch.global_size, self.group_size, generator=batch.generator)[batch.rows]
        actions = sample_actions(log_probs, uniforms)
        return Rollout({"actions": actions}, self.scored(log_probs, actions))

    def rewards(self, batch: Batch, samples: dict[str, Any]) -> Tensor:
        if batch.labels is None:
            raise ValueError("GRPO needs the rl split's labels to score actions")
        return rewards_of(self.table, samples["actions"], batch.labels)

    def log_probs(self, model: nn.Module, batch: Batch, samples: dict[str, Any], iteration: int) -> LogProbs:
        return self.scored(log_policy(model(batch.inputs), self.temperature), samples["actions"])

    def kl(self, policy: LogProbs, reference: LogProbs, samples: dict[str, Any]) -> Tensor:
        """(b, G) k3 estimates over the renormalised class distribution; 0 for abstain samples."""
        assert policy.distribution is not None and reference.distribution is not None
        classes, actions = self.num_classes, samples["actions"]
        log_probs = policy.distribution[:, :classes]
        renormalised = log_probs - torch.logsumexp(log_probs, dim=1, keepdim=True)
        chosen = actions.clamp(max=classes - 1)
        kl = k3_kl(renormalised.gather(1, chosen), reference.distribution.gather(1, chosen))
        return torch.where(actions < classes, kl, torch.zeros_like(kl))

    def metrics(self, batch: Batch, samples: dict[str, Any], scored: LogProbs) -> dict[str, Tensor]:
        assert scored.distribution is not None
        if scored.distribution.shape[1] == self.num_classes:
            return {}
        return {"abstain_rate": (samples["actions"] == self.num_classes).float().mean()}
