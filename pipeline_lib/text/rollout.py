"""Task models of the text track: the tokens they add, how task examples become training rows, and how a model
completes a batch of prompts (for GRPO's groups, the evaluation and the registered model alike).

A task model is a language model of `pipeline_lib.text.pretrain` whose vocabulary gained three special tokens
(`SPECIALS`): ``<answer>``, ``</answer>`` and the end-of-sequence token ``<eos>``. Its completion of a prompt is
``<answer>579</answer><eos>``: the answer in tags (`tasks.format_answer`), then end of sequence.

Rows. Every row is `prompt_len + answer_tokens` ids: the prompt left-padded to `prompt_len` (padding is never
read: the model's `key_mask` hides it, and RoPE's relative positions make a left-padded prompt look exactly like
the bare one), then the completion's region of `answer_tokens` ids: the completion with its ``<eos>``, then
``<eos>`` to the end. `ROLE` names each position: padding, prompt, answer (the completion and its first
``<eos>``, what the AR model learns) and fill (the ``<eos>`` after it; LLaDA's SFT learns it too, so the masked
model learns where an answer ends).

Completing. `complete` samples `answer_tokens` ids after each prompt (AR: one token per step; MDM: LLaDA's
sampler from an all-MASK region) and sets every id after the first ``<eos>`` to ``<eos>``. `completion_mask`
marks the tokens up to and including that first ``<eos>``: what a completion is, for rewards, log-probs and its
length.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from pipeline_lib.core.errors import ConfigError
from pipeline_lib.text.data.tasks import ANSWER_CLOSE, ANSWER_OPEN, Example, format_answer
from pipeline_lib.text.data.tokenizer import SpecialTokens, Tokenizer
from pipeline_lib.text.models.objectives import resolve_objective
from pipeline_lib.text.models.transformer import TransformerLM

EOS = "<eos>"
SPECIALS = (ANSWER_OPEN, ANSWER_CLOSE, EOS)


class ROLE:
    """What each position of a task row holds."""

    PAD, PROMPT, ANSWER, FILL = 0, 1, 2, 3


def task_tokenizer(base: Tokenizer) -> SpecialTokens:
    """The pretraining tokenizer plus the answer tags and ``<eos>`` (ids after its vocabulary)."""
    return SpecialTokens(base, SPECIALS)


def eos_id(tokenizer: Tokenizer) -> int:
    """The id of ``<eos>`` in a task model's tokenizer (`task_tokenizer`).

    Raises:
        ValueError: a tokenizer without the task tokens.
    """
    if not isinstance(tokenizer, SpecialTokens):
        raise ValueError(f"a {type(tokenizer).__name__} has no {EOS}: expected a task model's tokenizer "
                         "(task_tokenizer)")
    return tokenizer.token_id(EOS)


@dataclass(frozen=True)
class Rows:
    """Encoded examples: `ids` (N, prompt_len + answer_tokens) int64 and `roles` (same shape) int8 (`ROLE`)."""

    ids: np.ndarray
    roles: np.ndarray


def prompt_length(prompts: Sequence[str], tokenizer: Tokenizer) -> int:
    """The longest prompt, in tokens."""
    return max(len(tokenizer.encode(prompt)) for prompt in prompts)


def check_fits(prompt_len: int, answer_tokens: int, max_len: int) -> None:
    """Refuse a layout longer than the model's context, naming the keys that set it.

    Raises:
        ConfigError: naming `text_task.answer_tokens` and `text_model.seq_len`.
    """
    if prompt_len + answer_tokens > max_len:
        room = max_len - prompt_len
        accepted = f"at most {room}" if room >= 1 else f"none: raise text_model.seq_len above {prompt_len}"
        raise ConfigError(f"text_task.answer_tokens={answer_tokens}: with the longest prompt ({prompt_len} tokens) "
                          f"exceeds the model's context text_model.seq_len={max_len} (accepted: {accepted})")


def encode_prompts(prompts: Sequence[str], tokenizer: Tokenizer, prompt_len: int) -> tuple[np.ndarray, np.ndarray]:
    """Prompts -> left-padded ids (N, prompt_len) int64 (padding: ``<eos>``) and their key mask (True: real)."""
    eos = eos_id(tokenizer)
    ids = np.full((len(prompts), prompt_len), eos, dtype=np.int64)
    real = np.zeros((len(prompts), prompt_len), dtype=bool)
    for row, prompt in enumerate(prompts):
        tokens = tokenizer.encode(prompt)
        if not tokens or len(tokens) > prompt_len:
            raise ValueError(f"prompt {prompt!r} takes {len(tokens)} tokens; need 1..{prompt_len}")
        ids[row, prompt_len - len(tokens):] = tokens
        real[row, prompt_len - len(tokens):] = True
    return ids, real


def encode_examples(examples: Sequence[Example], tokenizer: Tokenizer, *, prompt_len: int, answer_tokens: int,
                    split: str) -> Rows:
    """Training rows of `examples` (see the module docstring).

    Raises:
        ConfigError: the longest completion is over `answer_tokens`, naming the key, the split and the example.
    """
    eos = eos_id(tokenizer)
    ids, real = encode_prompts([example.prompt for example in examples], tokenizer, prompt_len)
    roles = np.where(real, ROLE.PROMPT, ROLE.PAD).astype(np.int8)
    answers = np.full((len(examples), answer_tokens), eos, dtype=np.int64)
    answer_roles = np.full((len(examples), answer_tokens), ROLE.FILL, dtype=np.int8)
    completions = [[*tokenizer.encode(format_answer(example.answer)), eos] for example in examples]
    longest = max(range(len(examples)), key=lambda row: len(completions[row]), default=None)
    if longest is not None and len(completions[longest]) > answer_tokens:
        example, need = examples[longest], len(completions[longest])
        raise ConfigError(f"text_task.answer_tokens={answer_tokens}: the longest {split} completion, example {longest} "
                          f"({example.prompt!r} -> {example.answer!r}), takes {need} tokens with its answer tags and "
                          f"<eos> (accepted: >= {need})")
    for row, completion in enumerate(completions):
        answers[row, : len(completion)] = completion
        answer_roles[row, : len(completion)] = ROLE.ANSWER
    return Rows(np.concatenate([ids, answers], axis=1), np.concatenate([roles, answer_roles], axis=1))


@torch.no_grad()
def complete(model: TransformerLM, objective: str, prompt_ids: Tensor, key_mask: Tensor, *, answer_tokens: int,
             temperature: float, block_length: int, eos_id: int, generator: torch.Generator | None) -> Tensor:
    """(B, P) left-padded prompts -> (B, answer_tokens) completions, every id after the first ``<eos>`` set to it.

    AR samples token by token (temperature 0: greedy); MDM runs LLaDA's low-confidence sampler over an all-MASK
    region of `answer_tokens` in blocks of `block_length`, one token per step (temperature 0: argmax). Put the
    model in eval mode first (`models.objectives`: each objective's `generate`).
    """
    out = resolve_objective(objective).generate(model, prompt_ids, new_tokens=answer_tokens, temperature=temperature,
                                                block_length=block_length, generator=generator, key_mask=key_mask)
    completions = out[:, prompt_ids.shape[1]:]
    return completions.masked_fill(~completion_mask(completions, eos_id), eos_id)


def default_block_length(task: dict[str, Any]) -> int:
    """The block length a task model's greedy answers use unless told otherwise (the registered model, SFT's early
    stop): half the answer region, so that the masked model does not commit the ``<eos>`` fill, its surest
    positions, before the answer's digits."""
    return max(1, task["answer_tokens"] // 2)


def completion_mask(completions: Tensor, eos_id: int) -> Tensor:
    """(B, A) completions -> (B, A) bool: the tokens up to and including the first ``<eos>`` (all without one)."""
    is_eos = (completions == eos_id).long()
    return (is_eos.cumsum(dim=1) - is_eos) == 0


def decode_completions(completions: Tensor, tokenizer: Tokenizer, eos_id: int) -> list[str]:
    """Each completion's text before its first ``<eos>``."""
    texts = []
    for row in completions.tolist():
        end = row.index(eos_id) if eos_id in row else len(row)
        texts.append(tokenizer.decode(row[:end]))
    return texts
