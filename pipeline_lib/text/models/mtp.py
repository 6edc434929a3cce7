"""DeepSeek-V3's multi-token prediction (MTP) around an autoregressive `TransformerLM`, for training only.

DeepSeek-AI 2024, "DeepSeek-V3 Technical Report" (https://arxiv.org/abs/2412.19437), section 2.2. Module k
(k = 1 .. depth) predicts the token k + 1 places ahead: at position i it combines the previous depth's hidden
state h_i^(k-1) (depth 0: the main model's last block) with the embedding of token i + k,

    h'_i^k = W_k [RMSNorm(h_i^(k-1)); RMSNorm(Emb(t_(i+k)))],

runs one causal transformer block over those states and reads them out through the main model's final norm
and tied output head (the embedding and the head are shared, as in DeepSeek-V3). Every state keeps the causal
chain: the logits at position i of module k depend on tokens 0 .. i + k only. The modules densify the training
signal; `MultiTokenPrediction.lm` is the model that is exported, without them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pipeline_lib.text.models.transformer import Block, TransformerLM, init_weights


class MTPModule(nn.Module):
    """One prediction depth: (B, T, C) hidden states and (B, T, C) next-token embeddings -> (B, T, C) states."""

    def __init__(self, lm: TransformerLM) -> None:
        super().__init__()
        d_model = lm.embed.weight.shape[1]
        self.hidden_norm = nn.RMSNorm(d_model, eps=1e-6)
        self.embed_norm = nn.RMSNorm(d_model, eps=1e-6)
        self.proj = nn.Linear(2 * d_model, d_model, bias=False)
        self.block = Block(d_model, lm.n_head, causal=True, dropout=0.0, moe=lm.moe)
        init_weights(self, lm.n_layer)  # the main model's init

    def forward(self, hidden: Tensor, embedded: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        combined = torch.cat([self.hidden_norm(hidden), self.embed_norm(embedded)], dim=-1)  # (B, T, 2C)
        return self.block(self.proj(combined), cos, sin)


class MultiTokenPrediction(nn.Module):
    """A causal `TransformerLM` with `depth` MTP modules: (B, T) ids -> [main logits (B, T, V), then module k's
    logits (B, T - k, V) for k = 1 .. depth], where module k's position i predicts token i + k + 1.

    Args:
        lm: the autoregressive model (causal); it is trained as usual and exported alone (`.lm`).
        depth: MTP modules, >= 1.

    Examples:
        >>> import torch
        >>> lm = TransformerLM(10, d_model=16, n_layer=1, n_head=2, max_len=8, causal=True)
        >>> [tuple(x.shape) for x in MultiTokenPrediction(lm, depth=1)(torch.tensor([[1, 2, 3, 4]]))]
        [(1, 4, 10), (1, 3, 10)]
    """

    def __init__(self, lm: TransformerLM, depth: int) -> None:
        super().__init__()
        if not lm.causal:
            raise ValueError("multi-token prediction needs a causal (ar) model")
        if depth < 1:
            raise ValueError(f"depth={depth}: must be >= 1")
        self.lm = lm
        self.depths = nn.ModuleList(MTPModule(lm) for _ in range(depth))

    def forward(self, ids: Tensor) -> list[Tensor]:
        hidden = self.lm.trunk(ids)  # (B, T, C): depth 0
        outputs = [self.lm.head(hidden)]
        for k, module in enumerate(self.depths, start=1):
            length = ids.shape[1] - k  # positions whose token k places ahead is in the input
            cos, sin = self.lm.positions(length, ids.device)
            hidden = module(hidden[:, :length], self.lm.embed(ids[:, k:]), cos, sin)  # (B, T - k, C)
            outputs.append(self.lm.head(hidden))
        return outputs


def mtp_losses(logits: list[Tensor], window: Tensor) -> dict[str, Tensor]:
    """Cross-entropy and accuracy of each MTP depth on a (B, L + 1) token window whose first L ids were the input.

    Module k's logits (B, L - k, V) at position i predict window[:, i + k + 1]. Returns `mtp<k>_loss` and
    `mtp<k>_accuracy` for k = 1 .. depth and `mtp_loss`, the mean over depths (the weight lambda is the
    caller's), plus `accuracy`, the main model's next-token accuracy, for comparison.
    """
    out: dict[str, Tensor] = {}
    main = logits[0]
    out["accuracy"] = (main.argmax(dim=-1) == window[:, 1 : main.shape[1] + 1]).float().mean()
    losses = []
    for k, depth_logits in enumerate(logits[1:], start=1):
        targets = window[:, k + 1 : k + 1 + depth_logits.shape[1]]  # (B, L - k)
        loss = F.cross_entropy(depth_logits.flatten(0, 1).float(), targets.flatten())
        out[f"mtp{k}_loss"] = loss
        out[f"mtp{k}_accuracy"] = (depth_logits.argmax(dim=-1) == targets).float().mean().detach()
        losses.append(loss)
    out["mtp_loss"] = sum(losses) / len(losses)
    return out
