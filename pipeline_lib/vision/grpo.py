"""GRPO post-training of a classifier on the base trainer (resume, DDP, bf16 and logging come from it).

Each batch of `rl` images is used for `num_iterations` optimizer steps. On the first, one forward pass of
the policy gives pi(.|x); G actions per image are drawn from it (inverse-CDF on the step's uniforms, so the
process count does not change them), scored by the declared reward table, and turned into group-relative
advantages; the sampling log-probs and the reference's class log-probs are kept for the later iterations
(and in checkpoints, so a resume mid-batch continues exactly). The model stays in eval mode throughout:
the policy that samples is the policy being updated.

The KL penalty is the k3 estimate on the sampled class actions over the class distribution renormalised
without abstain, the only distribution the reference defines; abstain samples add no KL term.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pipeline_lib.core.grpo import expected_reward_loss, group_advantages, grpo_loss, k3_kl
from pipeline_lib.core.trainer import Batch
from pipeline_lib.vision.config import RLParams
from pipeline_lib.vision.models.classifier import AbstainClassifier
from pipeline_lib.vision.policy import class_kl, log_policy, sample_actions
from pipeline_lib.vision.rewards import rewards_of
from pipeline_lib.vision.trainer import ImageTrainer


def head_modules(model: nn.Module) -> list[nn.Module]:
    """The policy's output layers: the classifier head (and the abstain logit)."""
    if isinstance(model, AbstainClassifier):
        return [model.classifier.get_classifier(), model.abstain]
    return [model.get_classifier()]


class GRPOTrainer(ImageTrainer[RLParams]):
    """Group relative policy optimisation of `model` against a reward table, anchored to `reference`.

    Args (beyond the base trainer's):
        reference: the frozen finetuned classifier (C logits).
        table: (A, C) rewards R[action, label]; A = C, or C + 1 with abstain as the last action.
        labels: the `rl` split's labels.
    """

    stage = "rl"

    def __init__(self, model: nn.Module, cfg: RLParams, images: Any, preprocess: Any, *, reference: nn.Module,
                 table: Tensor, **kwargs: Any) -> None:
        if cfg.head_only:
            heads = {id(p) for module in head_modules(model) for p in module.parameters()}
            for param in model.parameters():
                param.requires_grad_(id(param) in heads)
        super().__init__(model, cfg, images, preprocess, **kwargs)
        if self.labels is None:
            raise ValueError("GRPO needs the rl split's labels to score actions")
        self.reference = reference.to(self.device).eval().requires_grad_(False)
        self.table = table.to(self.device, torch.float32)
        self.num_classes = self.table.shape[1]
        self.sampled: dict[str, dict[str, Tensor]] = {}  # per micro-batch, for the batch being iterated on

    def updates_per_batch(self) -> int:
        return self.cfg.num_iterations  # type: ignore[attr-defined]

    def train_mode(self) -> None:
        self.model.eval()

    def param_groups(self) -> list[dict[str, Any]]:
        groups = super().param_groups()
        for group in groups:
            group["params"] = [p for p in group["params"] if p.requires_grad]
        return [group for group in groups if group["params"]]

    def extra_state(self) -> dict[str, Any]:
        return {"sampled": {key: {k: v.cpu() for k, v in value.items()} for key, value in self.sampled.items()}}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        self.sampled = {key: {k: v.to(self.device) for k, v in value.items()}
                        for key, value in state.get("sampled", {}).items()}

    def sample(self, batch: Batch, images: Tensor, log_probs: Tensor) -> dict[str, Tensor]:
        """Draw G actions per image, score them and keep what the batch's later iterations need."""
        cfg: RLParams = self.cfg  # type: ignore[assignment]
        uniforms = torch.rand(batch.global_size, cfg.group_size, generator=batch.generator)[batch.rows]
        actions = sample_actions(log_probs, uniforms)
        rewards = rewards_of(self.table, actions, batch.labels)
        with torch.no_grad():
            reference = log_policy(self.reference(images), cfg.temperature)
        return {
            "actions": actions,
            "rewards": rewards,
            "advantages": group_advantages(rewards, scale=cfg.scale_rewards),
            "old_logp": log_probs.detach().gather(1, actions),
            "reference": reference,
        }

    def compute_loss(self, batch: Batch) -> dict[str, Tensor]:
        cfg: RLParams = self.cfg  # type: ignore[assignment]
        batch_index, iteration = divmod(batch.step, cfg.num_iterations)
        key = f"{batch_index}:{batch.rows.start}"
        images = self.normalize(batch.inputs)
        log_probs = log_policy(self.forward_model(images), cfg.temperature)
        if iteration == 0 or key not in self.sampled:
            if iteration == 0 and batch.rows.start == self.rank:  # a new batch: forget the previous one
                self.sampled = {}
            self.sampled[key] = self.sample(batch, images, log_probs)
        sampled = self.sampled[key]
        actions = sampled["actions"]
        logp = log_probs.gather(1, actions)
        out = grpo_loss(logp, sampled["old_logp"], sampled["advantages"], kl=self.class_kl_estimate(
            log_probs, sampled["reference"], actions), epsilon=cfg.epsilon, epsilon_high=cfg.epsilon_high,
            beta=cfg.beta)
        rewards = sampled["rewards"]
        with torch.no_grad():
            group_std = rewards.std(dim=1)
            out.update(
                reward=rewards.mean(),
                reward_std=group_std.mean(),
                frac_reward_zero_std=(group_std == 0).float().mean(),
                entropy=-(log_probs.exp() * log_probs).sum(dim=1).mean(),
            )
            if log_probs.shape[1] > self.num_classes:
                out["abstain_rate"] = (actions == self.num_classes).float().mean()
        return out

    def class_kl_estimate(self, log_probs: Tensor, reference: Tensor, actions: Tensor) -> Tensor:
        """(B, G) k3 estimates over the renormalised class distribution; 0 for abstain samples."""
        classes = self.num_classes
        policy = log_probs[:, :classes] - torch.logsumexp(log_probs[:, :classes], dim=1, keepdim=True)
        is_class = actions < classes
        chosen = actions.clamp(max=classes - 1)
        kl = k3_kl(policy.gather(1, chosen), reference.gather(1, chosen))
        return torch.where(is_class, kl, torch.zeros_like(kl))


class ExpectedRewardTrainer(GRPOTrainer):
    """Baseline: the exact expected reward sum_a pi(a|x) R[a, y], maximised directly with the same budget.

    With every action enumerable this is the objective GRPO estimates from G samples, without the sampling
    noise; the same KL weight keeps it near the reference (exact class KL instead of the k3 estimate).
    """

    stage = "rl_expected_reward"

    def compute_loss(self, batch: Batch) -> dict[str, Tensor]:
        cfg: RLParams = self.cfg  # type: ignore[assignment]
        images = self.normalize(batch.inputs)
        logits = self.forward_model(images)
        log_probs = log_policy(logits, cfg.temperature)
        rewards = self.table[:, batch.labels].T  # (b, A): the reward of every action for each image
        loss = expected_reward_loss(log_probs, rewards)
        with torch.no_grad():
            reference = self.reference(images)
        kl = class_kl(logits, reference, cfg.temperature).mean()
        return {"loss": loss + cfg.beta * kl, "reward": -loss.detach(), "kl": kl.detach()}


class CrossEntropyTrainer(GRPOTrainer):
    """Control: plain cross-entropy on the same `rl` labels and budget (the Bayes rule decides afterwards).

    If RL only helps because it saw more labels, this matches it.
    """

    stage = "rl_cross_entropy"

    def compute_loss(self, batch: Batch) -> dict[str, Tensor]:
        logits = self.forward_model(self.normalize(batch.inputs))
        return {"loss": F.cross_entropy(logits[:, : self.num_classes].float(), batch.labels)}
