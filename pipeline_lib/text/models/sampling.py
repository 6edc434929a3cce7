"""Samplers for the text track's language models: autoregressive decoding and LLaDA's masked-diffusion decoding.

- `generate_ar`: nanoGPT's loop (karpathy/nanoGPT `model.py`, `generate`): crop the context to `max_len`, take
  the last position's logits, sample with temperature and optional top-k, append. No KV cache: each new token
  costs a forward pass over the context, fine for the small models of this track.
- `generate_mdm`: LLaDA's reverse process with low-confidence remasking and semi-autoregressive blocks (Nie et
  al. 2025, "Large Language Diffusion Models", https://arxiv.org/abs/2502.09992, Appendix B.2 and the official
  `generate.py`). The answer starts all MASK and is decoded block by block, left to right; at each step the
  model predicts every masked position, and the k most confident predictions of the current block are
  committed while the rest stay masked, k following `schedule`. Two extensions of the official sampler, which
  change nothing where it applies (a `block_length` dividing `gen_length`, a sequence within `max_len`):
  blocks cut to fit (the last block is shorter when `block_length` does not divide `gen_length`) and a sliding
  window (a prompt and answer longer than `max_len` are decoded block by block in a window of `max_len`
  positions, as `generate_ar` crops its context).

Both run under `torch.no_grad()`; put the model in eval mode first. Randomness comes from a `torch.Generator` on
the device of the prompt (the noise has the logits' size, so it is drawn where they are), or the global RNG when
it is None. Temperature 0 is greedy.
"""

from __future__ import annotations

import torch
from torch import Tensor

from pipeline_lib.text.models.transformer import TransformerLM


def _check_prompt(prompt_ids: Tensor, temperature: float) -> None:
    if prompt_ids.ndim != 2 or prompt_ids.shape[1] < 1:
        raise ValueError(f"prompt_ids must be (B, P) with P >= 1, got shape {tuple(prompt_ids.shape)}")
    if temperature < 0:
        raise ValueError(f"temperature={temperature}: must be >= 0 (0 is greedy)")


def _sample_last(logits: Tensor, *, temperature: float, top_k: int | None, generator: torch.Generator | None) -> Tensor:
    """(B, V) logits of the next token -> (B, 1) sampled ids."""
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # (B, 1) the k-th largest logit
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return torch.multinomial(torch.softmax(logits, dim=-1), num_samples=1, generator=generator)


@torch.no_grad()
def generate_ar(
    model: TransformerLM,
    prompt_ids: Tensor,
    *,
    max_new_tokens: int,
    temperature: float,
    top_k: int | None = None,
    generator: torch.Generator | None,
    key_mask: Tensor | None = None,
) -> Tensor:
    """Autoregressive sampling from a causal model: (B, P) prompt -> (B, P + max_new_tokens) ids.

    Args:
        model: a causal `TransformerLM` (anything with `causal`, `max_len` and (B, T) ids -> (B, T, V) logits).
        prompt_ids: (B, P) ids, P >= 1; the model sees at most its last `max_len` ids.
        max_new_tokens: tokens to append, >= 0.
        temperature: divides the logits; 0 takes the most likely token.
        top_k: sample among the k most likely tokens only (None: all).
        generator: source of the samples, on the device of `prompt_ids` (None: the global RNG).
        key_mask: (B, P) bool, False at the padding of left-padded prompts of unequal length (None: no padding).

    Returns:
        The prompt followed by the new tokens.
    """
    _check_prompt(prompt_ids, temperature)
    if not model.causal:
        raise ValueError("generate_ar needs a causal model (causal=True); use generate_mdm for a masked model")
    if max_new_tokens < 0 or (top_k is not None and top_k < 1):
        raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 0 and top_k={top_k} None or >= 1")
    ids = prompt_ids
    real = key_mask
    for _ in range(max_new_tokens):
        context = ids[:, -model.max_len :]
        # (B, V), the last position's prediction
        logits = (model(context) if real is None else model(context, key_mask=real[:, -model.max_len :]))[:, -1, :]
        real = None if real is None else torch.cat([real, torch.ones_like(real[:, :1])], dim=1)
        next_id = _sample_last(logits, temperature=temperature, top_k=top_k, generator=generator)  # (B, 1)
        ids = torch.cat([ids, next_id], dim=1)
    return ids


def schedule(masked_count: int, steps: int) -> list[int]:
    """How many tokens each of `steps` steps commits so that `masked_count` masked tokens are all decoded.

    LLaDA's `get_num_transfer_tokens`: the count spread evenly, the first `masked_count % steps` steps one more.

    Examples:
        >>> schedule(10, 4)
        [3, 3, 2, 2]
    """
    if masked_count < 0 or steps < 1:
        raise ValueError(f"masked_count={masked_count} must be >= 0 and steps={steps} >= 1")
    base, remainder = divmod(masked_count, steps)
    return [base + (step < remainder) for step in range(steps)]


def _check_mdm_args(model: TransformerLM, prompt_ids: Tensor, *, gen_length: int, steps: int | None,
                    block_length: int, temperature: float, mask_id: int) -> tuple[int, int]:
    """Validate `generate_mdm`'s arguments; return the block size in use and the number of blocks."""
    _check_prompt(prompt_ids, temperature)
    if gen_length < 1:
        raise ValueError(f"gen_length={gen_length}: must be >= 1")
    if block_length < 1:
        raise ValueError(f"block_length={block_length}: must be >= 1")
    # A block fits the answer and the model's window, beside the context a shifted model reads first.
    context = getattr(model, "context", 0)
    room = model.max_len - context
    size = min(block_length, gen_length, room)
    num_blocks = -(-gen_length // size)  # ceil
    if steps is not None and (steps < 1 or steps % num_blocks):
        limit = f"max_len={model.max_len}" if not context else f"max_len - {context} = {room}"
        capped = f" (block_length={block_length} capped at {limit})" if size < min(block_length, gen_length) else ""
        raise ValueError(f"steps={steps}: must be a positive multiple of the number of blocks ceil(gen_length / "
                         f"block_length) = ceil({gen_length} / {size}) = {num_blocks}{capped}, or None for one "
                         f"model call per answer token")
    if (prompt_ids == mask_id).any():
        raise ValueError(f"prompt_ids contain the mask id {mask_id}")
    return size, num_blocks


def blocks(prompt_length: int, gen_length: int, block_length: int) -> list[tuple[int, int]]:
    """The [start, end) sequence positions of each block: `block_length` tokens each, the last cut to fit.

    Examples:
        >>> blocks(2, 10, 4)
        [(2, 6), (6, 10), (10, 12)]
    """
    end = prompt_length + gen_length
    return [(start, min(start + block_length, end)) for start in range(prompt_length, end, block_length)]


def window(block_end: int, length: int, max_len: int) -> tuple[int, int]:
    """The [first, last) positions of a `length`-position sequence that the model reads while it decodes the
    block ending at `block_end`.

    The whole sequence while it fits (`length <= max_len`); otherwise `max_len` positions: those ending at the
    block's end, or the first `max_len` while the block ends within them (later masked positions stay visible,
    as they are when the sequence fits). RoPE is relative, so a window reads like a sequence of its own.

    Examples:
        >>> window(6, 12, 16), window(6, 20, 8), window(14, 20, 8)
        ((0, 12), (0, 8), (6, 14))
    """
    if length <= max_len:
        return 0, length
    first = max(block_end - max_len, 0)
    return first, first + max_len


def _predict(logits: Tensor, *, temperature: float, generator: torch.Generator | None) -> tuple[Tensor, Tensor]:
    """(B, T, V) logits -> predicted ids (B, T) and their confidence (B, T), the ids' softmax probability.

    With temperature > 0 the ids are sampled by the Gumbel-max trick, argmax(logits / temperature + Gumbel
    noise), the noise in float64 as in LLaDA (a float32 uniform truncates the Gumbel tail). The confidence uses
    the untempered softmax, as LLaDA's low-confidence remasking does.
    """
    logits = logits.double()
    if temperature == 0:
        predicted = logits.argmax(dim=-1)
    else:
        uniform = torch.rand(logits.shape, generator=generator, device=logits.device, dtype=torch.float64)
        gumbel = -torch.log(-torch.log(uniform.clamp_min(torch.finfo(torch.float64).tiny)))
        predicted = (logits / temperature + gumbel).argmax(dim=-1)  # (B, T)
    probs = torch.softmax(logits, dim=-1)
    return predicted, torch.gather(probs, -1, predicted.unsqueeze(-1)).squeeze(-1).float()


@torch.no_grad()
def generate_mdm(
    model: TransformerLM,
    prompt_ids: Tensor,
    *,
    gen_length: int,
    steps: int | None,
    block_length: int,
    temperature: float,
    mask_id: int,
    generator: torch.Generator | None,
    key_mask: Tensor | None = None,
) -> Tensor:
    """LLaDA sampling: (B, P) prompt -> (B, P + gen_length) ids, the answer decoded from all MASK.

    The answer is split into blocks of `block_length` tokens (`blocks`), the last one shorter when
    `block_length` does not divide `gen_length`, decoded left to right. Block b of n_b tokens gets
    min(steps / num_blocks, n_b) model calls (never more calls than tokens; `steps=None`: n_b, one per token).
    A call runs the model on the window of the sequence that holds the block (`window`: the whole sequence
    while P + gen_length <= model.max_len, else `max_len` positions ending at the block's end, or the first
    `max_len`), predicts the block's positions (`_predict`; no other position can be committed, so no other is
    predicted) and commits the `schedule(n_b, calls)[call]` most confident masked positions of the block; later
    blocks stay masked until their turn (those inside the window are still read by the bidirectional model).
    The prompt is never changed and every answer position is committed exactly once, so no MASK remains.

    Where the official sampler applies (`block_length` divides `gen_length`, P + gen_length <= max_len,
    steps <= gen_length) the output is that of this loop before the two extensions, draw for draw for a given
    generator (the pipeline's committed figures rely on it; a test pins it against a copy of the old loop). With
    more steps than answer tokens the old loop made calls that committed nothing; they are skipped now (greedy
    output unchanged; sampled output differs from the second block on, as the skipped calls drew noise).

    Args:
        model: a bidirectional `TransformerLM` with a mask token (anything with `max_len` and (B, T) ids ->
            (B, T, V) logits, V <= mask_id).
        prompt_ids: (B, P) ids, P >= 1, without the mask id; the model reads at most `max_len` positions, so a
            long prompt's start drops out of the window as the answer grows.
        gen_length: answer tokens, >= 1; any length (beyond `max_len - P` the window slides).
        steps: model calls in all, a positive multiple of the number of blocks ceil(gen_length / block_length);
            None: one call per answer token.
        block_length: tokens per block, >= 1; capped at `gen_length` (one block, no semi-AR) and at
            `model.max_len`, less a shifted model's context position (a block must fit the window).
        temperature: Gumbel noise scale; 0 commits the argmax.
        mask_id: the MASK id, outside the model's vocabulary.
        generator: source of the Gumbel noise, on the device of `prompt_ids` (None: the global RNG).
        key_mask: (B, P) bool, False at the padding of left-padded prompts of unequal length (None: no padding);
            windowed with the ids.
    """
    size, num_blocks = _check_mdm_args(model, prompt_ids, gen_length=gen_length, steps=steps,
                                       block_length=block_length, temperature=temperature, mask_id=mask_id)
    B, P = prompt_ids.shape
    answer = torch.full((B, gen_length), mask_id, dtype=prompt_ids.dtype, device=prompt_ids.device)
    x = torch.cat([prompt_ids, answer], dim=1)  # (B, P + gen_length)
    rows = torch.arange(B, device=x.device)[:, None]  # (B, 1)
    real = None if key_mask is None else torch.cat([key_mask, torch.ones_like(answer, dtype=torch.bool)], dim=1)
    for start, end in blocks(P, gen_length, size):  # the block being decoded
        first, last = window(end, x.shape[1], model.max_len)
        calls = end - start if steps is None else min(steps // num_blocks, end - start)
        for count in schedule(end - start, calls):
            view = x[:, first:last]  # (B, W), W <= max_len; a view, so it sees the commits
            logits = model(view) if real is None else model(view, key_mask=real[:, first:last])  # (B, W, V)
            if logits.shape[-1] > mask_id:
                raise ValueError(f"mask_id={mask_id} is inside the model's {logits.shape[-1]}-token vocabulary")
            # Only the block's positions can be committed: predict those alone (B, end - start) each.
            predicted, confidence = _predict(logits[:, start - first : end - first], temperature=temperature,
                                             generator=generator)
            confidence = confidence.masked_fill(x[:, start:end] != mask_id, float("-inf"))
            chosen = torch.topk(confidence, count, dim=1).indices  # (B, count), all masked: count <= remaining
            x[rows, start + chosen] = predicted[rows, chosen]
    return x
