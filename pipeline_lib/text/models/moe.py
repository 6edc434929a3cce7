"""DeepSeek-V3's mixture-of-experts feed-forward with auxiliary-loss-free load balancing.

DeepSeek-AI 2024, "DeepSeek-V3 Technical Report" (https://arxiv.org/abs/2412.19437), section 2.1.2, and Wang et
al. 2024, "Auxiliary-Loss-Free Load Balancing Strategy for Mixture-of-Experts" (https://arxiv.org/abs/2408.15664):

- Each token goes through the shared experts (always) and through `top_k` routed SwiGLU experts.
- The affinity of token t for expert i is s_it = sigmoid(u_t . e_i), with e_i a learned centroid (the router).
- Selection ranks s_it + b_i, where b_i is a per-expert bias; the bias picks experts but never weights them.
- With group-limited routing, each group of experts is scored by the sum of its two best biased affinities, and
  a token picks its experts within the `topk_groups` best groups only.
- The gate weights are the selected (unbiased) affinities divided by their sum, times `route_scale`.
- After each optimizer step, b_i += gamma * sign(mean load - load_i), where load_i counts the tokens that chose
  expert i in the whole step: every micro-batch, and every process (the counts are all-reduced), so all
  processes move the bias alike. `ExpertBalancer` does this for every MoE layer of a model; the base trainer
  calls it.
- An optional complementary sequence-wise balance loss, alpha * sum_i f_i P_i per sequence (DeepSeek-V3 eq. 17-20),
  keeps single sequences from collapsing onto a few experts. It is collected by `ExpertBalancer.loss_terms`.

Loads are counted only in forward passes that build a graph (`torch.is_grad_enabled()`): the passes a training
step learns from, not sampling, evaluation or the frozen reference of GRPO. Every position counts, padding included.
Each expert runs on the tokens routed to it (sorted by expert, one contiguous chunk each), an empty chunk
included, so every expert parameter is in every step's graph (a DDP requirement) and gets a zero gradient when
no token chose it.
"""

from __future__ import annotations

import math
import re
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pipeline_lib.core import dist

if TYPE_CHECKING:
    from pipeline_lib.text.config import TextMoEParams


def expert_hidden(d_model: int, spec: TextMoEParams, dense_hidden: int, multiple_of: int = 8) -> int:
    """An expert's SwiGLU width: `spec.expert_hidden`, or the dense width split over a token's active experts
    (top_k routed + shared), rounded up to `multiple_of`, so a token passes through about the dense parameters."""
    if spec.expert_hidden is not None:
        return spec.expert_hidden
    return multiple_of * math.ceil(dense_hidden / (spec.top_k + spec.shared_experts) / multiple_of)


class MoE(nn.Module):
    """(B, T, C) -> (B, T, C): shared experts plus the gate-weighted sum of each token's top-k routed experts.

    Args:
        d_model: model width C.
        spec: the `text_model.moe` section (experts, top_k, groups, route scale, balancing).
        make_expert: builds one SwiGLU expert of the given hidden width (the dense block's class, so an expert is
            exactly a small dense feed-forward).
        hidden: the routed experts' hidden width; the shared experts are one SwiGLU `shared_experts` times wider.
        dropout: on the output, as the dense feed-forward's.

    Attributes:
        expert_bias: (E,) the balancing bias, a persistent buffer (saved with the weights; it routes at inference).
        load: (E,) float tokens routed to each expert since the last `ExpertBalancer.update`, or None.

    Examples:
        >>> from pipeline_lib.core.config import TextMoEParams
        >>> from pipeline_lib.text.models.transformer import SwiGLU
        >>> moe = MoE(16, TextMoEParams(enabled=True, routed_experts=4, top_k=2), SwiGLU, hidden=8, dropout=0.0)
        >>> moe(torch.randn(2, 5, 16)).shape
        torch.Size([2, 5, 16])
    """

    def __init__(self, d_model: int, spec: TextMoEParams, make_expert: type[nn.Module], *, hidden: int,
                 dropout: float) -> None:
        super().__init__()
        self.spec = spec
        self.num_experts = spec.routed_experts
        self.router = nn.Linear(d_model, spec.routed_experts, bias=False)  # rows are the centroids e_i
        self.experts = nn.ModuleList(make_expert(d_model, hidden=hidden, dropout=0.0)
                                     for _ in range(spec.routed_experts))
        self.shared = (make_expert(d_model, hidden=hidden * spec.shared_experts, dropout=0.0)
                       if spec.shared_experts else None)
        self.drop = nn.Dropout(dropout)
        self.register_buffer("expert_bias", torch.zeros(spec.routed_experts))
        # Plain attributes, not buffers: DDP broadcasts buffers from rank 0 before each forward, which would
        # overwrite this process's own counts.
        self.load: Tensor | None = None
        self.balance_losses: list[Tensor] = []

    def route(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(N, C) tokens -> gate weights (N, k), chosen experts (N, k) and affinities (N, E), float32."""
        scores = torch.sigmoid(self.router(x).float())  # (N, E)
        biased = scores + self.expert_bias  # selection only
        groups = self.spec.groups
        if groups > 1:
            grouped = biased.view(len(x), groups, -1)  # (N, G, E / G)
            group_scores = grouped.topk(2, dim=-1).values.sum(dim=-1)  # (N, G)
            kept = group_scores.topk(self.spec.topk_groups, dim=-1).indices  # (N, topk_groups)
            keep = torch.zeros_like(group_scores, dtype=torch.bool).scatter(1, kept, True)  # (N, G)
            biased = grouped.masked_fill(~keep[..., None], -math.inf).view(len(x), -1)
        chosen = biased.topk(self.spec.top_k, dim=-1).indices  # (N, k)
        weights = scores.gather(1, chosen)  # (N, k): the unbiased affinities
        weights = weights / weights.sum(dim=-1, keepdim=True) * self.spec.route_scale
        return weights, chosen, scores

    def forward(self, x: Tensor) -> Tensor:
        """(B, T, C) -> (B, T, C); counts the load and keeps the balance loss when building a graph."""
        B, T, C = x.shape
        flat = x.reshape(B * T, C)
        weights, chosen, scores = self.route(flat)
        # Dispatch: sort the (token, slot) pairs by expert, so each expert reads one contiguous chunk.
        order = chosen.flatten().argsort(stable=True)  # (N k,)
        token = order // self.spec.top_k  # the token of each sorted pair
        counts = torch.bincount(chosen.flatten(), minlength=self.num_experts)  # (E,)
        chunks = flat[token].split(counts.tolist())
        routed = torch.cat([expert(chunk) for expert, chunk in zip(self.experts, chunks, strict=True)])  # (N k, C)
        gate = weights.flatten()[order, None].to(flat.dtype)  # (N k, 1)
        out = torch.zeros_like(flat).index_add_(0, token, routed * gate)
        if self.shared is not None:
            out = out + self.shared(flat)
        if torch.is_grad_enabled():
            self.load = counts.float() if self.load is None else self.load + counts
            if self.spec.balance_loss_alpha > 0:
                self.balance_losses.append(self.spec.balance_loss_alpha * sequence_balance_loss(
                    scores.view(B, T, -1), chosen.view(B, T, -1)))
        return self.drop(out.view(B, T, C))


def sequence_balance_loss(scores: Tensor, chosen: Tensor) -> Tensor:
    """DeepSeek-V3's complementary sequence-wise balance loss without alpha: mean over sequences of sum_i f_i P_i.

    f_i = E / (k T) * (tokens of the sequence that chose i), P_i = mean over the sequence of s_it / sum_j s_jt.
    A sequence spread evenly over the experts scores 1 (f_i = 1 and P_i = 1 / E for all i).

    Args:
        scores: (B, T, E) affinities.
        chosen: (B, T, k) the experts each token chose.

    Returns:
        A scalar tensor.
    """
    _, T, E = scores.shape
    k = chosen.shape[-1]
    picked = F.one_hot(chosen, E).sum(dim=(1, 2))  # (B, E) choices per sequence
    fraction = picked * E / (k * T)  # f_i
    probability = (scores / scores.sum(dim=-1, keepdim=True)).mean(dim=1)  # (B, E): P_i
    return (fraction * probability).sum(dim=-1).mean()


class ExpertBalancer:
    """Balances every `MoE` layer of a model: collects the balance losses of a step and moves the biases after it.

    It is a step hook of the base trainer (`core.trainer.StepHook`). A model without MoE layers gives an empty
    balancer: `loss_terms` and `after_step` return {}.
    """

    def __init__(self, model: nn.Module) -> None:
        self.layers = [(metric_prefix(name), module) for name, module in model.named_modules()
                       if isinstance(module, MoE)]

    def loss_terms(self) -> dict[str, Tensor]:
        """`balance_loss`: the sum of the balance losses kept since the last call ({} when there are none); clears
        them."""
        losses = [loss for _, layer in self.layers for loss in layer.balance_losses]
        for _, layer in self.layers:
            layer.balance_losses = []
        return {"balance_loss": torch.stack(losses).sum()} if losses else {}

    @torch.no_grad()
    def after_step(self) -> dict[str, Tensor]:
        """After an optimizer step: all-reduce each layer's load, move its bias, reset the counts.

        Returns per-layer metrics: each expert's share of the routed token slots (`.load.e<i>`, mean 1 / E), the
        max violation max(load) / mean(load) - 1 (`.max_violation`, 0 when balanced), and `moe.max_violation`,
        the largest over layers.
        """
        counted = [(prefix, layer) for prefix, layer in self.layers if layer.load is not None]
        if not counted:
            return {}
        # One collective for every layer: the whole step's counts, on every process.
        loads = dist.all_reduce_sum(torch.cat([layer.load for _, layer in counted]))
        metrics: dict[str, Tensor] = {}
        violations = []
        for (prefix, layer), load in zip(counted, loads.split([layer.num_experts for _, layer in counted]),
                                         strict=True):
            layer.load = None
            mean = load.mean()
            layer.expert_bias.add_(layer.spec.bias_update_speed * torch.sign(mean - load))
            violation = load.max() / mean.clamp_min(1e-9) - 1
            violations.append(violation)
            share = load / load.sum().clamp_min(1e-9)
            metrics.update({f"{prefix}load.e{i}": value for i, value in enumerate(share)})
            metrics[f"{prefix}max_violation"] = violation
        metrics["moe.max_violation"] = torch.stack(violations).max()
        return metrics


def metric_prefix(name: str) -> str:
    """A MoE layer's module name -> its metrics' prefix: `blocks.1.mlp` -> `moe.layer1.`, a multi-token
    prediction module's `depths.0.block.mlp` -> `moe.mtp1.`, a bare layer -> `moe.`."""
    name = name.removeprefix("lm.")
    if match := re.fullmatch(r"blocks\.(\d+)\.mlp", name):
        return f"moe.layer{match[1]}."
    if match := re.fullmatch(r"depths\.(\d+)\.block\.mlp", name):
        return f"moe.mtp{int(match[1]) + 1}."
    return f"moe.{name}." if name else "moe."
