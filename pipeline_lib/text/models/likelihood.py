"""How well a language model of the text track predicts a stream of token ids, in total nats.

- `ar_nats`: a causal model, teacher-forced in sliding windows of its `max_len` (`sliding_windows`), so every id
  but the first is scored once and, like an n-gram's, with context: the exact next-token NLL.
- `mdm_nats`: a masked model, on consecutive windows of its `max_len` (`consecutive_windows`), each scored on its
  own by LLaDA's Monte Carlo upper bound (`losses.mdm_nll_bound`) with a fixed seed and sample count; a shifted
  model (`TransformerLM.shift`) is given each window's first id as context.

Put the model in eval mode first. The evaluation turns nats into bits per character (`text.evaluate`).
"""

from __future__ import annotations

import numpy as np
import torch

from pipeline_lib.text.losses import mdm_nll_bound
from pipeline_lib.text.models.transformer import TransformerLM

EVAL_BATCH = 64


def consecutive_windows(tokens: np.ndarray, length: int) -> np.ndarray:
    """Flat ids -> (N, length + 1) windows starting every `length` ids (each window's last id is the next one's
    first), as many as fit: a view, nothing is copied.

    Examples:
        >>> consecutive_windows(np.arange(11), 4).tolist()
        [[0, 1, 2, 3, 4], [4, 5, 6, 7, 8]]
    """
    count = (len(tokens) - 1) // length
    if count < 1:
        raise ValueError(f"{len(tokens)} tokens are too few for one window of {length} + 1")
    return np.lib.stride_tricks.sliding_window_view(tokens[: count * length + 1], length + 1)[::length]


def sliding_windows(num_tokens: int, length: int, stride: int) -> tuple[np.ndarray, np.ndarray]:
    """Starts of windows of `length` inputs over `num_tokens` ids, and the first position each window scores.

    Windows start every `stride` ids and the last one ends at the last id, so every id but the first is a target
    exactly once: the first window scores all its positions, each later one only the targets past the previous
    window's end, which therefore see at least `length - stride` ids of context (the standard sliding-window
    perplexity evaluation).

    Examples:
        >>> starts, first = sliding_windows(11, 4, 2)
        >>> starts.tolist(), first.tolist()
        ([0, 2, 4, 6], [0, 2, 2, 2])
    """
    if not 1 <= stride <= length or num_tokens < length + 1:
        raise ValueError(f"need 1 <= stride={stride} <= length={length} < num_tokens={num_tokens}")
    starts = list(range(0, num_tokens - length, stride))
    if starts[-1] + length < num_tokens - 1:
        starts.append(num_tokens - 1 - length)
    starts_array = np.asarray(starts, dtype=np.int64)
    first = np.zeros_like(starts_array)
    first[1:] = starts_array[:-1] + length - starts_array[1:]  # the previous window's end, in this one
    return starts_array, first


@torch.no_grad()
def ar_nats(model: TransformerLM, tokens: np.ndarray, *, stride: int) -> float:
    """Total next-token NLL (nats) of `tokens[1:]`, each scored once by `sliding_windows` of `max_len` inputs."""
    length = model.max_len
    starts, first = sliding_windows(len(tokens), length, stride)
    offsets = np.arange(length + 1)
    total = 0.0
    for batch in range(0, len(starts), EVAL_BATCH):
        index = starts[batch : batch + EVAL_BATCH, None] + offsets  # (b, L + 1)
        ids = torch.from_numpy(np.asarray(tokens)[index].astype(np.int64))
        logits = model(ids[:, :-1]).float()  # (b, L, V)
        nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")  # (b, L)
        scored = torch.arange(length)[None, :] >= torch.from_numpy(first[batch : batch + EVAL_BATCH])[:, None]
        total += nll[scored].sum().item()
    return total


@torch.no_grad()
def mdm_nats(model: TransformerLM, windows: np.ndarray, *, num_samples: int, seed: int, context: int = 0) -> float:
    """Total Monte Carlo NLL bound (nats) of the first `max_len` ids of each window, each scored on its own; the
    first `context` ids of a window are given, never masked or scored.

    Raises:
        ValueError: the model has no mask token.
    """
    if model.mask_id is None:
        raise ValueError("mdm_nats needs a model with a mask token (mask_token=True)")
    generator = torch.Generator().manual_seed(seed)
    total = torch.zeros(())
    for start in range(0, len(windows), EVAL_BATCH):
        ids = torch.from_numpy(windows[start : start + EVAL_BATCH, : model.max_len].astype(np.int64))  # (b, L)
        total += mdm_nll_bound(model, ids, mask_id=model.mask_id, num_samples=num_samples, generator=generator,
                               context=context).sum()
    return float(total)
