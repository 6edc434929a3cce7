"""Language-model objectives of the text track: autoregressive next-token cross-entropy and LLaDA's masked
diffusion loss, with the masked model's Monte Carlo likelihood bound.

Masked diffusion (MDM). Reference: Nie et al. 2025, "Large Language Diffusion Models" (LLaDA,
https://arxiv.org/abs/2502.09992), equation 3 and Algorithm 1 (training), equation 6 and Algorithm 3
(likelihood). Each sequence draws t ~ U(0, 1) and masks every token independently with probability
p = (1 - eps) t + eps (eps keeps p away from 0); the model, which has no timestep input, predicts the masked
tokens, and the loss is

    L = 1 / (B L) Σ_b Σ_{i masked in b} -log p_θ(x_i | x_noisy) / p_b,

an upper bound on the negative log-likelihood per token in expectation. Corruption and loss are separate pure
functions: `mdm_corrupt` takes its randomness from a `torch.Generator`, `mdm_loss` is deterministic in its inputs.

Shapes: ids (B, L) int64, logits (B, L, V) with V the vocabulary size; the mask id is outside 0 .. V - 1.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor


def _check_logits(logits: Tensor, ids: Tensor, name: str) -> None:
    if logits.ndim != 3 or logits.shape[:2] != ids.shape:
        raise ValueError(f"logits must be (B, T, V) over {name} of shape (B, T) = {tuple(ids.shape)}, "
                         f"got {tuple(logits.shape)}")


def _check_masks(ids: Tensor, p: Tensor, **masks: Tensor) -> None:
    """Each named mask is bool of the ids' shape; p holds one masking probability per sequence."""
    for name, value in masks.items():
        if value.shape != ids.shape or value.dtype != torch.bool:
            raise ValueError(f"{name} must be a bool tensor of shape {tuple(ids.shape)}, got {value.dtype} "
                             f"{tuple(value.shape)}")
    if p.shape != ids.shape[:1]:
        raise ValueError(f"p must have shape ({ids.shape[0]},) (one masking probability per sequence), "
                         f"got {tuple(p.shape)}")


def _uniform(shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device) -> Tensor:
    """U[0, 1) draws made on the generator's device (so a CPU generator gives the same draws for data on any
    device), then moved to `device`."""
    draw_device = generator.device if generator is not None else device
    return torch.rand(shape, generator=generator, device=draw_device).to(device)


def ar_loss(logits: Tensor, targets: Tensor, *, ignore_index: int = -100) -> Tensor:
    """Next-token cross-entropy, the mean over the (not ignored) tokens, in float32.

    The caller shifts: `logits[:, t]` is the prediction made after reading tokens 0..t and `targets[:, t]` the
    token that follows them (nanoGPT's x = ids[:, :-1], y = ids[:, 1:]).

    Args:
        logits: (B, T, V) from a causal model.
        targets: (B, T) the next tokens; `ignore_index` marks positions that do not count (padding, prompts).
        ignore_index: the target value of positions left out of the mean.

    Returns:
        Scalar loss in nats per token.

    Examples:
        >>> logits = torch.zeros(2, 3, 4)  # uniform over 4 tokens
        >>> round(ar_loss(logits, torch.tensor([[0, 1, 2], [3, 0, -100]])).item(), 4)  # log 4
        1.3863
    """
    _check_logits(logits, targets, "targets")
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=ignore_index)


def mdm_corrupt(
    ids: Tensor, *, mask_id: int, eps: float = 1e-3, generator: torch.Generator | None
) -> tuple[Tensor, Tensor, Tensor]:
    """LLaDA's forward process: per sequence t ~ U(0, 1), p = (1 - eps) t + eps, each token masked with prob. p.

    Args:
        ids: (B, L) clean token ids, none equal to `mask_id`.
        mask_id: the MASK id, outside the vocabulary (`TransformerLM.mask_id`).
        eps: the smallest masking probability, in (0, 1); LLaDA uses 1e-3.
        generator: source of t and of the masks (None: the global RNG). Draws are made on its device.

    Returns:
        noisy_ids (B, L) with the masked positions set to `mask_id`; masked (B, L) bool; p (B,) the masking
        probability of each sequence, in [eps, 1].

    Examples:
        >>> noisy, masked, p = mdm_corrupt(torch.zeros(2, 5, dtype=torch.long), mask_id=7,
        ...                                generator=torch.Generator().manual_seed(0))
        >>> bool((noisy[masked] == 7).all() and (noisy[~masked] == 0).all()), p.shape
        (True, torch.Size([2]))
    """
    if ids.ndim != 2:
        raise ValueError(f"ids must be (B, L), got shape {tuple(ids.shape)}")
    if not 0.0 < eps < 1.0:
        raise ValueError(f"eps={eps}: must be in (0, 1)")
    if (ids == mask_id).any():
        raise ValueError(f"ids contain the mask id {mask_id}: it must lie outside the vocabulary")
    B, L = ids.shape
    t = _uniform((B,), generator, ids.device)  # (B,)
    p = (1.0 - eps) * t + eps  # (B,)
    masked = _uniform((B, L), generator, ids.device) < p[:, None]  # (B, L)
    return ids.masked_fill(masked, mask_id), masked, p


def mdm_loss(logits: Tensor, ids: Tensor, masked: Tensor, p: Tensor) -> Tensor:
    """LLaDA's masked diffusion loss: Σ over masked tokens of CE / p of their sequence, divided by B * L.

    Unmasked positions contribute exactly nothing, whatever their logits. The division is by all B * L
    positions, not by the number of masked ones: the 1 / p weight already makes each sequence's sum an unbiased
    estimate of its full-sequence CE (for the true conditionals, an upper bound on its NLL).

    Args:
        logits: (B, L, V) the model's output on the noisy ids.
        ids: (B, L) the clean ids, the targets.
        masked: (B, L) bool, the positions `mdm_corrupt` masked.
        p: (B,) the masking probability of each sequence.

    Returns:
        Scalar loss in nats per token.

    Examples:
        >>> ids, masked = torch.tensor([[0, 1]]), torch.tensor([[True, False]])
        >>> round(mdm_loss(torch.zeros(1, 2, 4), ids, masked, torch.tensor([0.5])).item(), 4)  # log 4 / 0.5 / 2
        1.3863
    """
    _check_logits(logits, ids, "ids")
    _check_masks(ids, p, masked=masked)
    B, L = ids.shape
    ce = F.cross_entropy(logits.float().transpose(1, 2), ids, reduction="none")  # (B, L)
    weighted = torch.where(masked, ce / p.float()[:, None], torch.zeros_like(ce))  # (B, L), 0 where unmasked
    return weighted.sum() / (B * L)


def sft_ar_loss(logits: Tensor, ids: Tensor, answer: Tensor) -> Tensor:
    """Supervised finetuning of a causal model: next-token cross-entropy on the answer tokens only.

    Args:
        logits: (B, T - 1, V), the model's output on `ids[:, :-1]`.
        ids: (B, T) prompt, answer and padding ids.
        answer: (B, T) bool, the positions whose token is learned (the completion and its end-of-sequence id).
            Prompt and padding positions are never targets, whatever their logits.

    Returns:
        Scalar loss, the mean over every answer token of the batch, in nats per token.
    """
    if answer.shape != ids.shape or answer.dtype != torch.bool:
        raise ValueError(f"answer must be a bool tensor of the ids' shape {tuple(ids.shape)}, got {answer.dtype} "
                         f"{tuple(answer.shape)}")
    if not answer[:, 0].logical_not().all():
        raise ValueError("the first position cannot be an answer token: nothing precedes it")
    return ar_loss(logits, ids[:, 1:].masked_fill(~answer[:, 1:], -100))


def sft_mdm_loss(logits: Tensor, ids: Tensor, masked: Tensor, p: Tensor, response: Tensor) -> Tensor:
    """LLaDA's supervised finetuning loss (Nie et al. 2025, section 2.3 and Appendix B.1).

    The prompt is never masked: only the response (answer and end-of-sequence padding) is corrupted, each of
    its tokens masked with its sequence's probability p. Each sequence's sum of CE / p over its masked tokens is
    divided by its response length, and the batch takes the mean over sequences:

        L = 1 / B Σ_b (1 / |response_b|) Σ_{i masked in b} -log p_θ(x_i | x_noisy) / p_b.

    Args:
        logits: (B, T, V), the model's output on the noisy ids.
        ids: (B, T) clean ids.
        masked: (B, T) bool, masked positions; must lie inside `response`.
        p: (B,) masking probability of each sequence.
        response: (B, T) bool, the answer and its end-of-sequence padding.
    """
    _check_masks(ids, p, masked=masked, response=response)
    if (masked & ~response).any():
        raise ValueError("masked positions outside the response: the SFT loss never masks the prompt")
    lengths = response.sum(dim=1)  # (B,)
    if (lengths == 0).any():
        raise ValueError("every sequence needs a response of at least one token")
    _check_logits(logits, ids, "ids")
    ce = F.cross_entropy(logits.float().transpose(1, 2), ids, reduction="none")  # (B, T)
    weighted = torch.where(masked, ce / p.float()[:, None], torch.zeros_like(ce))
    return (weighted.sum(dim=1) / lengths).mean()


def mask_exactly(lengths: Tensor, seq_len: int, *, generator: torch.Generator | None, device: torch.device) -> Tensor:
    """(B,) counts l_b -> (B, seq_len) bool masks with exactly l_b True positions each, uniform among such masks.

    A position is masked when its rank in a uniform random permutation of the row is below l_b.
    """
    ranks = _uniform((lengths.shape[0], seq_len), generator, device).argsort(dim=1).argsort(dim=1)  # (B, L)
    return ranks < lengths.to(device)[:, None]


@torch.no_grad()
def mdm_nll_bound(
    model: Callable[[Tensor], Tensor],
    ids: Tensor,
    *,
    mask_id: int,
    num_samples: int,
    generator: torch.Generator | None,
    context: int = 0,
) -> Tensor:
    """LLaDA's Monte Carlo upper bound on each sequence's negative log-likelihood, in nats per sequence.

    Each of `num_samples` draws picks l uniform in 1..L per sequence, masks exactly l of its tokens uniformly at
    random and scores (L / l) Σ_{masked i} -log p_θ(x_i | x_noisy) (LLaDA equation 6, Algorithm 3; the
    lower-variance form of equation 3). The result is the mean over the draws. In expectation it is ≥ -log of the
    model's any-order likelihood (the mean over orders of the chain rule of its conditionals), with equality for
    conditionals of one joint distribution; report it as an upper bound, with its seed and `num_samples`.

    Put the model in eval mode first (dropout would change the bound).

    Args:
        model: (B, L) noisy ids -> (B, L, V) logits, e.g. a bidirectional `TransformerLM` with a mask token.
        ids: (B, L) clean ids, none equal to `mask_id`.
        mask_id: the MASK id, outside the vocabulary.
        num_samples: Monte Carlo draws per sequence, >= 1 (one forward pass of the batch each).
        generator: source of l and of the masks (None: the global RNG). Draws are made on its device.
        context: the first `context` ids are given and never masked; the bound is on the other L - context
            (l uniform in 1..L - context), conditioned on them.

    Returns:
        (B,) float32 bound per sequence; divide by L - context for nats per token.
    """
    if ids.ndim != 2 or ids.shape[1] < context + 1:
        raise ValueError(f"ids must be (B, L) with L >= context + 1 = {context + 1}, got shape {tuple(ids.shape)}")
    if num_samples < 1:
        raise ValueError(f"num_samples={num_samples}: must be >= 1")
    if (ids == mask_id).any():
        raise ValueError(f"ids contain the mask id {mask_id}: it must lie outside the vocabulary")
    B, L = ids.shape[0], ids.shape[1] - context  # L: the scored positions
    total = torch.zeros(B, device=ids.device)
    for _ in range(num_samples):
        draw_device = generator.device if generator is not None else ids.device
        lengths = torch.randint(1, L + 1, (B,), generator=generator, device=draw_device).to(ids.device)  # (B,)
        masked = F.pad(mask_exactly(lengths, L, generator=generator, device=ids.device), (context, 0))  # (B, T)
        logits = model(ids.masked_fill(masked, mask_id))  # (B, T, V)
        _check_logits(logits, ids, "ids")
        ce = F.cross_entropy(logits.float().transpose(1, 2), ids, reduction="none")  # (B, L)
        masked_ce = torch.where(masked, ce, torch.zeros_like(ce)).sum(dim=1)  # (B,)
        total += masked_ce * L / lengths.float()
    return total / num_samples
