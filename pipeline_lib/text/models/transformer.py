"""The text track's one small transformer language model: pre-norm, RoPE, SwiGLU, SDPA, with a `causal` switch.

One architecture serves both language-model objectives: `causal=True` is the autoregressive model (trained with
`losses.lm.ar_loss`), `causal=False` with `mask_token=True` is the masked diffusion model (LLaDA: Nie et al. 2025,
"Large Language Diffusion Models", https://arxiv.org/abs/2502.09992), a bidirectional transformer that reads a
partly masked sequence and has no timestep input (trained with `losses.lm.mdm_loss`).

Parts, as in LLaMA-style models and nanoGPT's layout (karpathy/nanoGPT `model.py`):
- RMSNorm before each sub-layer (pre-norm) and after the last block (`torch.nn.RMSNorm`, torch >= 2.4).
- Rotary position embeddings on queries and keys (Su et al. 2021, "RoFormer: Enhanced Transformer with Rotary
  Position Embedding", https://arxiv.org/abs/2104.09864); no learned or absolute positions, so q·k depends on
  positions only through their difference.
- SwiGLU feed-forward (Shazeer 2020, "GLU Variants Improve Transformer", https://arxiv.org/abs/2002.05202), hidden
  width 8/3 of the model width rounded up to a multiple of 8, so it has about the parameters of a 4x GELU MLP.
- `F.scaled_dot_product_attention(is_causal=causal)`, which picks a flash or memory-efficient kernel when it can.
- The output head is the token embedding's first `vocab_size` rows (weight tying, as in nanoGPT): logits never
  include the mask id, which lives in an extra embedding row outside the vocabulary.
- Optionally, DeepSeek-V3's mixture of experts in place of the feed-forward (`moe`, see `models.moe`).
- Optionally (`shift`), the AR convention kept by a masked model adapted from an AR one (DiffuGPT: Gong et al.
  2025, "Scaling Diffusion Language Models via Adaptation from Autoregressive Models"): the hidden state at
  position i predicts token i + 1, so `forward` returns the head's output moved one position right.
"""

from __future__ import annotations

import dataclasses
import math
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pipeline_lib.text.models.moe import MoE, expert_hidden

if TYPE_CHECKING:
    from pipeline_lib.text.config import TextMoEParams


def swiglu_hidden(d_model: int, multiple_of: int = 8) -> int:
    """The SwiGLU hidden width: 8/3 * d_model rounded up to a multiple of `multiple_of` (LLaMA's rounding).

    Three d x h matrices with h = 8/3 d hold the parameters of the two d x 4d matrices of a GELU MLP.
    """
    return multiple_of * math.ceil(8 * d_model / 3 / multiple_of)


class RotaryEmbedding(nn.Module):
    """Cosine and sine tables of the rotary position embedding, for positions 0 .. max_len - 1.

    Channel pair (i, i + hs/2) of a head is rotated by the angle position * base^(-2i / hs), the "rotate half"
    layout of GPT-NeoX and LLaMA's Hugging Face port (the paper pairs neighbouring channels instead, the same
    thing up to a fixed permutation of the channels). The tables are non-persistent buffers: they follow
    `.to(device)` but stay out of the `state_dict`, which holds learned weights only.

    Args:
        head_dim: channels per head (hs), even.
        max_len: the longest sequence.
        base: the wavelength base, 10000 in the paper.
    """

    def __init__(self, head_dim: int, max_len: int, base: float = 10000.0) -> None:
        super().__init__()
        if head_dim % 2:
            raise ValueError(f"rotary embeddings need an even head width, got head_dim={head_dim}")
        inv_freq = base ** (-torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)  # (hs/2,)
        angles = torch.outer(torch.arange(max_len, dtype=torch.float32), inv_freq)  # (max_len, hs/2)
        self.register_buffer("cos", angles.cos(), persistent=False)
        self.register_buffer("sin", angles.sin(), persistent=False)

    def forward(self, positions: Tensor) -> tuple[Tensor, Tensor]:
        """(T,) integer positions -> cos, sin, each (T, hs/2), float32."""
        return self.cos[positions], self.sin[positions]


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate queries or keys (B, nh, T, hs) by their positions' angles (cos, sin (T, hs/2)); same shape out.

    Computed in float32 (angles of far positions lose precision in bf16) and cast back to x's dtype.
    """
    x1, x2 = x.float().chunk(2, dim=-1)  # (B, nh, T, hs/2) each
    rotated = torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)
    return rotated.to(x.dtype)


class SelfAttention(nn.Module):
    """Multi-head self-attention with rotary queries and keys, causal or bidirectional, through SDPA."""

    def __init__(self, d_model: int, n_head: int, *, causal: bool, dropout: float) -> None:
        super().__init__()
        self.n_head, self.causal, self.dropout = n_head, causal, dropout
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=False)
        self.proj = nn.Linear(d_model, d_model, bias=False)  # residual projection (scaled init)
        self.resid_drop = nn.Dropout(dropout)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, attn_mask: Tensor | None = None) -> Tensor:
        """(B, T, C) -> (B, T, C); `attn_mask` (B, 1, T, T) bool, True where a query may read a key, replaces
        the causal flag (it already holds causality)."""
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=2)  # (B, T, C) each
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))  # (B, nh, T, hs)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        dropout_p = self.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p,
                                           is_causal=self.causal and attn_mask is None)  # (B, nh, T, hs)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_drop(self.proj(y))


class SwiGLU(nn.Module):
    """down(silu(gate(x)) * up(x)): the gated feed-forward of Shazeer 2020, without biases; `hidden` None is
    `swiglu_hidden(d_model)`."""

    def __init__(self, d_model: int, *, hidden: int | None = None, dropout: float) -> None:
        super().__init__()
        hidden = hidden or swiglu_hidden(d_model)
        self.gate = nn.Linear(d_model, hidden, bias=False)
        self.up = nn.Linear(d_model, hidden, bias=False)
        self.down = nn.Linear(hidden, d_model, bias=False)  # residual projection (scaled init)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        """(B, T, C) -> (B, T, C)."""
        return self.drop(self.down(F.silu(self.gate(x)) * self.up(x)))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then x + mlp(norm(x)); `moe` makes the mlp a mixture of
    experts."""

    def __init__(self, d_model: int, n_head: int, *, causal: bool, dropout: float,
                 moe: TextMoEParams | None = None) -> None:
        super().__init__()
        self.attn_norm = nn.RMSNorm(d_model, eps=1e-6)
        self.attn = SelfAttention(d_model, n_head, causal=causal, dropout=dropout)
        self.mlp_norm = nn.RMSNorm(d_model, eps=1e-6)
        self.mlp: nn.Module = SwiGLU(d_model, dropout=dropout) if moe is None else MoE(
            d_model, moe, SwiGLU, hidden=expert_hidden(d_model, moe, swiglu_hidden(d_model)), dropout=dropout)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, attn_mask: Tensor | None = None) -> Tensor:
        """(B, T, C) -> (B, T, C)."""
        x = x + self.attn(self.attn_norm(x), cos, sin, attn_mask)
        return x + self.mlp(self.mlp_norm(x))


def init_weights(root: nn.Module, n_layer: int) -> None:
    """nanoGPT's init: normal(0, 0.02) linears and embeddings, residual projections scaled by 1/sqrt(2 n_layer).

    Each block adds two residual branches; scaling their output projections (attention's and every
    feed-forward's, experts included) keeps the residual stream's variance at initialisation about independent
    of depth (GPT-2). RMSNorm weights start at 1.
    """
    for module in root.modules():
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
    for module in root.modules():
        if isinstance(module, (SelfAttention, SwiGLU)):
            projection = module.proj if isinstance(module, SelfAttention) else module.down
            nn.init.normal_(projection.weight, mean=0.0, std=0.02 / math.sqrt(2 * n_layer))


class TransformerLM(nn.Module):
    """Token ids (B, T) -> next-token (causal) or masked-token (bidirectional) logits (B, T, vocab_size).

    Args:
        vocab_size: V, the number of token ids; logits have V columns.
        d_model: model width C, divisible by `n_head`, with an even head width C / n_head.
        n_layer: transformer blocks.
        n_head: attention heads.
        max_len: the longest sequence `forward` accepts (the samplers crop or check against it).
        causal: position t attends to positions <= t (autoregressive) or to all positions (masked diffusion).
        mask_token: add an embedding row for the MASK id `vocab_size`, outside the vocabulary: it can be read,
            never predicted.
        dropout: on the embeddings, the attention weights and both residual branches.
        moe: the `text_model.moe` section when enabled: blocks from `moe.dense_layers` on get a mixture-of-experts
            feed-forward; None keeps every block dense.
        shift: the logits of position i come from the hidden state at position i - 1 (a masked model adapted from
            an autoregressive one keeps its next-token layout); position 0 has nothing before it, and its logits are
            0 (uniform): it is context, never predicted. Needs a bidirectional model.

    Attributes:
        mask_id: `vocab_size` with `mask_token`, else None.

    Examples:
        >>> model = TransformerLM(10, d_model=16, n_layer=1, n_head=2, max_len=8, causal=False, mask_token=True)
        >>> model(torch.tensor([[1, 2, model.mask_id, 3]])).shape
        torch.Size([1, 4, 10])
    """

    def __init__(
        self,
        vocab_size: int,
        *,
        d_model: int,
        n_layer: int,
        n_head: int,
        max_len: int,
        causal: bool,
        mask_token: bool = False,
        dropout: float = 0.0,
        moe: TextMoEParams | None = None,
        shift: bool = False,
    ) -> None:
        super().__init__()
        if shift and causal:
            raise ValueError("shift=True is for a bidirectional model: a causal model's position i already "
                             "predicts token i + 1")
        if d_model % n_head or (d_model // n_head) % 2:
            raise ValueError(f"n_head={n_head} must divide d_model={d_model} into heads of even width (for RoPE)")
        if vocab_size < 1 or n_layer < 1 or max_len < 1:
            raise ValueError(f"vocab_size={vocab_size}, n_layer={n_layer} and max_len={max_len} must be >= 1")
        self.vocab_size, self.max_len, self.causal, self.n_layer = vocab_size, max_len, causal, n_layer
        self.n_head, self.moe, self.shift = n_head, moe, shift
        self.mask_id: int | None = vocab_size if mask_token else None
        self.embed = nn.Embedding(vocab_size + int(mask_token), d_model)  # rows [:V] double as the output head
        self.drop = nn.Dropout(dropout)
        self.rotary = RotaryEmbedding(d_model // n_head, max_len)
        self.blocks = nn.ModuleList(
            Block(d_model, n_head, causal=causal, dropout=dropout,
                  moe=moe if moe is not None and layer >= moe.dense_layers else None)
            for layer in range(n_layer)
        )
        self.norm = nn.RMSNorm(d_model, eps=1e-6)
        self._init_weights()

    def _init_weights(self) -> None:
        init_weights(self, self.n_layer)

    def num_params(self, non_embedding: bool = True) -> int:
        """Parameter count; `non_embedding` leaves out the token embedding (which is also the tied head).

        The non-embedding count is the N of scaling laws (Kaplan et al. 2020), which excludes the embedding and
        unembedding matrices.
        """
        total = sum(p.numel() for p in self.parameters())
        return total - self.embed.weight.numel() if non_embedding else total

    def active_mlp_params(self) -> float:
        """Feed-forward parameters one token passes through, averaged over the layers: the dense SwiGLU's, or the
        router, `top_k` routed experts and the shared experts of a mixture of experts (for FLOPs per token)."""
        total = 0
        for block in self.blocks:
            mlp = block.mlp
            if isinstance(mlp, MoE):
                expert = sum(p.numel() for p in mlp.experts[0].parameters())
                shared = sum(p.numel() for p in mlp.shared.parameters()) if mlp.shared is not None else 0
                total += mlp.router.weight.numel() + mlp.spec.top_k * expert + shared
            else:
                total += sum(p.numel() for p in mlp.parameters())
        return total / self.n_layer

    def num_active_params(self) -> int:
        """Non-embedding parameters one token passes through: `num_params()` with only the router, `top_k` routed
        experts and the shared experts of each mixture-of-experts layer (equal to `num_params()` when dense)."""
        mlp = sum(p.numel() for block in self.blocks for p in block.mlp.parameters())
        return self.num_params() - mlp + round(self.active_mlp_params() * self.n_layer)

    def architecture(self) -> dict[str, Any]:
        """The architecture as JSON-ready values, for a model folder's `config.json` (`models.saved.load_lm`
        rebuilds the model from them and the objective, which sets `causal` and the MASK id); `moe` is the
        mixture-of-experts section as a mapping, or None."""
        return {"vocab_size": self.vocab_size, "d_model": self.embed.weight.shape[1], "n_layer": self.n_layer,
                "n_head": self.n_head, "max_len": self.max_len,
                "moe": dataclasses.asdict(self.moe) if self.moe is not None else None, "shift": self.shift}

    @property
    def context(self) -> int:
        """Leading positions every sequence must give as context, never predicted: 1 with `shift`, else 0."""
        return int(self.shift)

    def positions(self, length: int, device: torch.device) -> tuple[Tensor, Tensor]:
        """The rotary tables (cos, sin), each (length, hs/2), for positions 0 .. length - 1."""
        return self.rotary(torch.arange(length, device=device))

    def trunk(self, ids: Tensor, key_mask: Tensor | None = None, attention: Tensor | None = None) -> Tensor:
        """(B, T) ids -> (B, T, C) the last block's output, before the final norm (what `head` and multi-token
        prediction read); `key_mask` and `attention` as in `forward`."""
        if ids.ndim != 2:
            raise ValueError(f"ids must be (B, T), got shape {tuple(ids.shape)}")
        length = ids.shape[1]  # T
        if length > self.max_len:
            raise ValueError(f"sequence of length {length} is longer than max_len={self.max_len}")
        attn_mask = None
        if attention is not None:
            if attention.shape != (length, length) or attention.dtype != torch.bool:
                raise ValueError(f"attention must be bool of shape ({length}, {length}), got {attention.dtype} "
                                 f"{tuple(attention.shape)}")
            attn_mask = (attention | torch.eye(length, dtype=torch.bool, device=ids.device))[None, None]
        if key_mask is not None:
            if key_mask.shape != ids.shape or key_mask.dtype != torch.bool:
                raise ValueError(f"key_mask must be bool of the ids' shape {tuple(ids.shape)}, got "
                                 f"{key_mask.dtype} {tuple(key_mask.shape)}")
            eye = torch.eye(length, dtype=torch.bool, device=ids.device)
            allowed = key_mask[:, None, :] | eye  # (B, T, T): query i reads key j
            if self.causal:
                allowed = allowed & torch.ones(length, length, dtype=torch.bool, device=ids.device).tril()
            attn_mask = allowed[:, None] if attn_mask is None else allowed[:, None] & attn_mask  # (B, 1, T, T)
        cos, sin = self.positions(length, ids.device)  # (T, hs/2) each
        x = self.drop(self.embed(ids))  # (B, T, C)
        for block in self.blocks:
            x = block(x, cos, sin, attn_mask)
        return x

    def head(self, hidden: Tensor) -> Tensor:
        """(B, T, C) hidden states -> (B, T, V) logits: final norm, then the tied output rows."""
        return F.linear(self.norm(hidden), self.embed.weight[: self.vocab_size])  # the mask row is never a class

    def forward(self, ids: Tensor, key_mask: Tensor | None = None, attention: Tensor | None = None) -> Tensor:
        """(B, T) token ids, T <= max_len, the mask id allowed with `mask_token` -> logits (B, T, vocab_size).

        `key_mask` (B, T) bool marks the real tokens of a padded batch: no position reads a padding position
        (False), so the logits of the real positions are those of the unpadded sequence wherever the padding
        sits (left padding keeps the relative positions RoPE sees). A padding position reads only itself; its
        logits are meaningless.

        `attention` (T, T) bool, True where query i may read key j (every position always reads itself), replaces
        the model's own pattern for this call: the attention annealing of an AR-initialised masked model.

        With `shift`, the logits at position i are the head's output at position i - 1, and position 0's are 0.
        """
        logits = self.head(self.trunk(ids, key_mask, attention))
        if self.shift:
            logits = torch.cat([torch.zeros_like(logits[:, :1]), logits[:, :-1]], dim=1)
        return logits


def grow_vocab(model: TransformerLM, new_tokens: int) -> TransformerLM:
    """Add `new_tokens` ids after the vocabulary (special tokens for finetuning), in place; returns the model.

    Ids below the old vocabulary keep their embeddings (and output rows, which are the same weights); the MASK
    row, if any, moves to the new end, so `mask_id` stays just outside the vocabulary. New rows start at the
    mean of the old token embeddings, so a new token's logit starts at an average token's (Hewitt's
    initialisation for added tokens) rather than at noise.
    """
    if new_tokens < 1:
        raise ValueError(f"new_tokens={new_tokens}: must be >= 1")
    old = model.embed.weight.data  # (V [+ 1], C)
    vocab = model.vocab_size
    rows = torch.cat([old[:vocab], old[:vocab].mean(dim=0, keepdim=True).expand(new_tokens, -1), old[vocab:]])
    model.embed = nn.Embedding.from_pretrained(rows.clone(), freeze=False)
    model.vocab_size = vocab + new_tokens
    if model.mask_id is not None:
        model.mask_id = model.vocab_size
    return model
