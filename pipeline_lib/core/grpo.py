"""Group relative policy optimisation (GRPO): the objective as pure functions, and the one GRPO trainer both tracks use.

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

The trainer (`GRPOTrainer`) owns what every track's GRPO shares: the per-batch cache of samples kept over the batch's
`num_iterations` updates (and in checkpoints), rewards turned into group advantages, the old log-probs and the frozen
reference's, the clipped objective and the common metrics. A track supplies a `Policy`: how its model draws G samples
per input and scores them (`sample`, `log_probs`) and what a sample earns (`rewards`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, TypeVar

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from pipeline_lib.core.config import GRPOParams, RewardScale
from pipeline_lib.core.trainer import Batch, Trainer, step_seed

Aggregation = Literal["token", "sample"]
GRPOConfig = TypeVar("GRPOConfig", bound=GRPOParams)


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


def shuffled_rewards(rewards: Tensor, *, generator: torch.Generator) -> Tensor:
    """(B, G) rewards -> the same B * G values in a random order over the whole batch: the null control of GRPO.

    Trained on them, the update keeps everything but the reward's information: the sampling, the group-relative
    advantages with their scale and share of zero groups, the clipping and the KL term. The permutation is drawn on
    the CPU from `generator`.
    """
    order = torch.randperm(rewards.numel(), generator=generator).to(rewards.device)
    return rewards.flatten()[order].view_as(rewards)


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


# ------------------------------------------------------------------------------------------ the trainer


@dataclass
class LogProbs:
    """A model's log-probabilities of a batch's samples (`Policy.log_probs`).

    Attributes:
        logp: (b, G) log-prob of each sampled action, or (b, G, T) of each completion token.
        entropy: the model's entropy where it acted, for the `entropy` metric: (b,) per input, or (b, G, T) per
            token (averaged over `mask`); None where nobody reads it (the reference's, as the trainer keeps it).
        mask: (b, G, T) the completions' tokens, for per-token log-probs; None for one action per sample.
        distribution: (b, A) log-probs of every action, for a policy that can enumerate them (a classifier), so its
            `kl` can measure the distributions rather than the sampled log-probs; None otherwise.
    """

    logp: Tensor
    entropy: Tensor | None = None
    mask: Tensor | None = None
    distribution: Tensor | None = None


@dataclass
class Rollout:
    """What `Policy.sample` drew for a batch.

    Attributes:
        samples: what `rewards`, `log_probs` and `metrics` need. Its tensors are kept for the batch's updates and in
            checkpoints; anything else (decoded texts) only while the batch is being sampled.
        scored: the samples' log-probs under the model that drew them, with gradients, when drawing them took the
            forward pass the update needs anyway (a classifier draws its G actions from one pass); None: the trainer
            asks `Policy.log_probs`.
    """

    samples: dict[str, Any]
    scored: LogProbs | None = None


class Policy:
    """What a track supplies to `GRPOTrainer`: how its model acts on a batch's inputs and what an action earns.

    Attributes:
        unit: what one input is, for the throughput metric `<unit>_per_second`.
        aggregation: how `grpo_loss` averages per-token terms (see the module docstring).
        varies_by_iteration: whether `log_probs` changes with the update's iteration (random prompt masks); then the
            old and reference log-probs are kept for each of a batch's `num_iterations` updates, else once.
    """

    unit = "samples"
    aggregation: Aggregation = "token"
    varies_by_iteration = False

    def sample(self, model: nn.Module, batch: Batch) -> Rollout:
        """Draw G samples for each of the batch's inputs from `model`, the policy as the trainer runs it (wrapped
        for DDP or compiled: a policy that generates step by step draws from `unwrap(model)` without gradients).

        Draw any randomness from `batch.generator` (or seeds derived from its `initial_seed()`), so a resume and
        every process draw the same.
        """
        raise NotImplementedError

    def rewards(self, batch: Batch, samples: dict[str, Any]) -> Tensor:
        """(b, G) rewards of the samples."""
        raise NotImplementedError

    def log_probs(self, model: nn.Module, batch: Batch, samples: dict[str, Any], iteration: int) -> LogProbs:
        """The samples' log-probs under `model` (the policy, with gradients, or the frozen reference) at the batch's
        update `iteration` (0 .. num_iterations - 1)."""
        raise NotImplementedError

    def kl(self, policy: LogProbs, reference: LogProbs, samples: dict[str, Any]) -> Tensor:
        """Per-sample (per-token) estimates of KL(policy || reference), shaped like `policy.logp`: k3 at the
        samples."""
        return k3_kl(policy.logp, reference.logp)

    def metrics(self, batch: Batch, samples: dict[str, Any], scored: LogProbs) -> dict[str, Tensor]:
        """The track's own scalars to log beside the trainer's (called without gradients)."""
        return {}

    def after_rollout(self, batch: Batch, samples: dict[str, Any], rewards: Tensor) -> None:
        """Called once a batch is sampled and rewarded (e.g. to log a table of samples)."""


def unwrap(model: nn.Module) -> nn.Module:
    """The module under the trainer's `torch.compile` and DDP wrappers (`Trainer._wrap`)."""
    model = getattr(model, "_orig_mod", model)
    return model.module if isinstance(model, DistributedDataParallel) else model


class GRPOTrainer(Trainer[GRPOConfig]):
    """GRPO of `model` against the reward of `policy`, anchored to a frozen `reference`.

    Each batch is used for `num_iterations` optimizer steps. On the first, the policy draws G samples per input and
    the trainer rewards them and turns the rewards into group-relative advantages; it keeps them with the reference's
    log-probs and, when there are later updates, the sampling policy's (old) log-probs, in `sampled` (and in
    checkpoints, so a resume between a batch's updates continues exactly). With one update per batch the sampling
    policy is the policy being updated: the old log-probs are the current ones, detached. The model stays in eval
    mode throughout (no dropout or batch-norm updates), so the policy that samples is the policy that is updated.

    Args (beyond the base trainer's):
        policy: the track's policy (`Policy`); its `unit` names the throughput metric.
        reference: the frozen starting model (the finetuned classifier, the SFT language model).
        shuffle_rewards: train on each batch's rewards permuted across the batch (`shuffled_rewards`), the control
            that tells what the update does without the reward's information. The logged `reward` is the same
            mean; `accuracy`-like track metrics still score the samples themselves.
    """

    def __init__(self, model: nn.Module, cfg: GRPOConfig, inputs: np.ndarray, preprocess: nn.Module | None = None,
                 *, policy: Policy, reference: nn.Module, shuffle_rewards: bool = False, **kwargs: Any) -> None:
        self.policy, self.stage, self.unit = policy, cfg.section, policy.unit
        self.shuffle_rewards = shuffle_rewards
        super().__init__(model, cfg, inputs, preprocess, **kwargs)
        self.reference = reference.to(self.device).eval().requires_grad_(False)
        self.sampled: dict[str, dict[str, Any]] = {}  # per micro-batch, for the batch being iterated on

    def updates_per_batch(self) -> int:
        return self.cfg.num_iterations

    def train_mode(self) -> None:
        self.model.eval()

    def extra_state(self) -> dict[str, Any]:
        return {"sampled": {key: {k: v.cpu() for k, v in value.items() if isinstance(v, Tensor)}
                            for key, value in self.sampled.items()}}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        self.sampled = {key: {k: v.to(self.device) for k, v in value.items()}
                        for key, value in state.get("sampled", {}).items()}

    def compute_loss(self, batch: Batch) -> dict[str, Tensor]:
        cfg = self.cfg
        batch_index, iteration = divmod(batch.step, cfg.num_iterations)
        key = f"{batch_index}:{batch.rows.start}"
        scored = None
        if iteration == 0 or key not in self.sampled:
            if iteration == 0 and batch.rows.start == self.rank:  # a new batch: forget the previous one
                self.sampled = {}
            self.sampled[key], scored = self.rollout(batch)
        sampled = self.sampled[key]
        if scored is None:
            scored = self.policy.log_probs(self.forward_model, batch, sampled, iteration)
        variant = iteration if self.policy.varies_by_iteration else 0
        old = sampled["old_logp"][variant] if "old_logp" in sampled else scored.logp.detach()
        reference = LogProbs(sampled["ref_logp"][variant], distribution=sampled["ref_distribution"][variant]
                             if "ref_distribution" in sampled else None)
        out = grpo_loss(scored.logp, old, sampled["advantages"], kl=self.policy.kl(scored, reference, sampled),
                        epsilon=cfg.epsilon, epsilon_high=cfg.epsilon_high, beta=cfg.beta, mask=scored.mask,
                        aggregation=self.policy.aggregation)
        with torch.no_grad():
            out.update(self.metrics(batch, sampled, scored))
        return out

    def rollout(self, batch: Batch) -> tuple[dict[str, Any], LogProbs | None]:
        """Draw the batch's samples, reward them, and keep what its updates need: advantages, the reference's
        log-probs and (with several updates) the sampling policy's; also the samples' log-probs when drawing gave
        them (`Rollout.scored`)."""
        drawn = self.policy.sample(self.forward_model, batch)
        sampled, scored = drawn.samples, drawn.scored
        rewards = self.policy.rewards(batch, sampled)
        if self.shuffle_rewards:  # a generator of its own: the policy's draws stay those of the real run
            order = torch.Generator().manual_seed(step_seed(batch.generator.initial_seed(), batch.rows.start + 1))
            rewards = shuffled_rewards(rewards, generator=order)
        sampled["rewards"] = rewards
        sampled["advantages"] = group_advantages(rewards, scale=self.cfg.scale_rewards)
        iterations = range(self.cfg.num_iterations if self.policy.varies_by_iteration else 1)
        with torch.no_grad():
            references = [self.policy.log_probs(self.reference, batch, sampled, i) for i in iterations]
            sampled["ref_logp"] = torch.stack([r.logp for r in references])
            distributions = [r.distribution for r in references if r.distribution is not None]
            if distributions:
                sampled["ref_distribution"] = torch.stack(distributions)
            if self.cfg.num_iterations > 1:  # with one update, old = logp.detach() (`compute_loss`)
                olds = ([scored.logp.detach()] if scored is not None and len(iterations) == 1 else
                        [self.policy.log_probs(self.model, batch, sampled, i).logp for i in iterations])
                sampled["old_logp"] = torch.stack(olds)
        self.policy.after_rollout(batch, sampled, rewards)
        return sampled, scored

    def metrics(self, batch: Batch, sampled: dict[str, Any], scored: LogProbs) -> dict[str, Tensor]:
        """The batch's rewards (mean, mean group std, share of groups without signal), the policy's entropy where it
        acted, and the track's own metrics."""
        rewards, entropy, mask = sampled["rewards"], scored.entropy, scored.mask
        group_std = rewards.std(dim=1)
        metrics = {"reward": rewards.mean(), "reward_std": group_std.mean(),
                   "frac_reward_zero_std": (group_std == 0).float().mean()}
        if entropy is not None:
            metrics["entropy"] = entropy.mean() if mask is None else (entropy * mask).sum() / mask.sum()
        return {**metrics, **self.policy.metrics(batch, sampled, scored)}
