"""Group relative policy optimisation (GRPO) as pure functions, shared by the vision and text RL stages.

References: Shao et al., "DeepSeekMath" (2024, https://arxiv.org/abs/2402.03300), section 4.1: G samples per
prompt, advantages relative to the group, a PPO-style clipped ratio and a k3 KL penalty to a frozen
reference; Liu et al., "Understanding R1-Zero-Like Training" (Dr. GRPO, https://arxiv.org/abs/2503.20783):
rewards centred but not divided by the group's std; Yu et al., "DAPO" (https://arxiv.org/abs/2503.14476):
clip-higher (`epsilon_high` > `epsilon`) and the token-level mean.

Shapes. Rewards and advantages are (B, G): B prompts (images), G sampled completions (actions) each. Log-probs
are (B, G) when a completion is one action (a classifier's decision) or (B, G, T) per token with a `mask`
(B, G, T) marking the completion's tokens. For one-action completions the two aggregations are the same.

- `aggregation="token"` (DAPO): the sum over every completion token of the batch / the number of tokens, so
  long completions weigh in proportion to their length.
- `aggregation="sample"` (GRPO as published): each completion's token mean, then the mean over completions.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from pipeline_lib.core.config import RewardScale

Aggregation = Literal["token", "sample"]


def group_advantages(rewards: Tensor, *, scale: RewardScale = "group", eps: float = 1e-4) -> Tensor:
    """(B, G) rewards -> (B, G) advantages: reward minus the group mean, over (group std + eps) with "group".

    The std is the sample std (Bessel-corrected, as in DeepSeekMath's implementation). A group whose rewards
    are all equal has no learning signal and gets advantage 0 under either scale.

    Dividing by the std makes every group's advantages about +-1 whatever the size of its reward gap, which
    changes the declared trade-off when rewards have unequal gaps: with +1 right, -lambda wrong and 0 for
    abstaining, a policy trained with "group" learns to answer above confidence 1/2 instead of the declared
    (0 + lambda) / (1 + lambda) (tests/rewards shows it). "none" (Dr. GRPO) keeps the reward's scale.
    """
    if rewards.ndim != 2 or rewards.shape[1] < 2:
        raise ValueError(f"rewards must be (B, G) with G >= 2 samples per group, got shape {tuple(rewards.shape)}")
    if scale not in ("group", "none"):
        raise ValueError(f"scale must be 'group' or 'none', got {scale!r}")
    centred = rewards - rewards.mean(dim=1, keepdim=True)
    if scale == "none":
        return centred
    return centred / (rewards.std(dim=1, keepdim=True) + eps)


def k3_kl(logp: Tensor, ref_logp: Tensor) -> Tensor:
    """Schulman's k3 estimator of KL(policy || reference) at samples drawn from the policy, elementwise.

    exp(ref - logp) - (ref - logp) - 1: unbiased, always >= 0, and exactly 0 where the two log-probs agree.
    """
    log_ratio = ref_logp - logp
    return torch.exp(log_ratio) - log_ratio - 1


def _aggregate(values: Tensor, mask: Tensor | None, aggregation: Aggregation) -> Tensor:
    if mask is None:
        return values.mean()
    mask = mask.to(values.dtype)
    if aggregation == "token":
        return (values * mask).sum() / mask.sum().clamp(min=1)
    per_completion = (values * mask).sum(dim=-1) / mask.sum(dim=-1).clamp(min=1)
    return per_completion.mean()


def grpo_loss(
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    *,
    kl: Tensor | None = None,
    epsilon: float = 0.2,
    epsilon_high: float | None = None,
    beta: float = 0.0,
    mask: Tensor | None = None,
    aggregation: Aggregation = "token",
) -> dict[str, Tensor]:
    """The clipped-ratio GRPO objective with a k3 KL penalty, to minimise.

    Per sample (or token): -min(ratio * A, clip(ratio, 1 - epsilon, 1 + epsilon_high) * A) + beta * kl,
    with ratio = exp(logp - old_logp), old_logp the log-prob under the policy that sampled (detached), A
    broadcast over tokens, and kl the per-sample KL estimate to the reference, normally
    `k3_kl(logp, ref_logp)` (a caller whose reference lacks some actions estimates it over what the reference
    defines). With one update per sampled batch (ratio = 1) the gradient is REINFORCE with the group-mean
    baseline.

    Args:
        logp: log-probs of the sampled actions/tokens under the policy being trained, (B, G) or (B, G, T).
        old_logp: the same under the sampling policy; treated as constant.
        advantages: (B, G), from `group_advantages`.
        kl: per-sample (per-token) KL estimates to the frozen reference, differentiable in the policy; None
            when beta is 0.
        epsilon, epsilon_high: lower and upper clip range (epsilon_high None: epsilon, symmetric).
        beta: weight of the KL penalty.
        mask: (B, G, T) completion tokens, for per-token inputs.
        aggregation: "token" or "sample" (see the module docstring).

    Returns:
        "loss" (scalar, differentiable) and detached statistics: "kl" (the mean estimate, 0 without one),
        "clip_ratio" (share of samples/tokens where the clipped branch is taken and so gives no gradient) and
        "ratio" (mean ratio).
    """
    if logp.shape != old_logp.shape or (kl is not None and kl.shape != logp.shape):
        raise ValueError("logp, old_logp and kl must have the same shape")
    if advantages.shape != logp.shape[:2]:
        raise ValueError(f"advantages must be (B, G) = {tuple(logp.shape[:2])}, got {tuple(advantages.shape)}")
    if (logp.ndim == 3) != (mask is not None) or (mask is not None and mask.shape != logp.shape):
        raise ValueError("per-token log-probs (B, G, T) need a mask of the same shape, and only they take one")
    if not epsilon > 0 or (epsilon_high is not None and not epsilon_high > 0):
        raise ValueError(f"epsilon and epsilon_high must be > 0, got {epsilon} and {epsilon_high}")
    if beta < 0 or (beta > 0 and kl is None):
        raise ValueError(f"beta={beta}: must be >= 0, and a KL penalty needs the kl estimates")
    upper = epsilon if epsilon_high is None else epsilon_high
    adv = advantages if logp.ndim == 2 else advantages.unsqueeze(-1)
    ratio = torch.exp(logp - old_logp.detach())
    unclipped = ratio * adv
    clipped = torch.clamp(ratio, 1 - epsilon, 1 + upper) * adv
    per_item = -torch.minimum(unclipped, clipped)
    kl = torch.zeros_like(logp) if kl is None else kl
    if beta > 0:
        per_item = per_item + beta * kl
    with torch.no_grad():
        clip_active = (clipped < unclipped).to(logp.dtype)  # the min picked the clipped value: no gradient
        stats = {
            "kl": _aggregate(kl, mask, aggregation),
            "clip_ratio": _aggregate(clip_active, mask, aggregation),
            "ratio": _aggregate(ratio, mask, aggregation),
        }
    return {"loss": _aggregate(per_item, mask, aggregation), **stats}


def expected_reward_loss(log_probs: Tensor, rewards: Tensor) -> Tensor:
    """Minus the exact expected reward, the objective GRPO estimates, when every action can be enumerated.

    Args:
        log_probs: (B, A) log-probabilities of all A actions.
        rewards: (B, A) reward of each action for each example (e.g. a reward table's columns of the labels).
    """
    if log_probs.shape != rewards.shape:
        raise ValueError(f"log_probs {tuple(log_probs.shape)} and rewards {tuple(rewards.shape)} must match")
    return -(log_probs.exp() * rewards).sum(dim=1).mean()
