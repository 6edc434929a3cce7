"""The text track's two language-model objectives, one strategy object each, chosen once by name.

Everything that differs between `ar` and `mdm` lives here, so a module asks `OBJECTIVES[objective]` (or
`resolve_objective`, which names the accepted values) and never branches on the name:

| what             | `ar` (`AR`)                            | `mdm` (`MDM`)                                        |
| ---------------- | -------------------------------------- | ---------------------------------------------------- |
| transformer      | causal                                 | bidirectional, a MASK id outside the vocabulary      |
| pretraining loss | next-token cross-entropy (`ar_loss`)   | LLaDA's masked diffusion (`mdm_corrupt`, `mdm_loss`) |
| SFT loss         | answer tokens only (`sft_ar_loss`)     | response masked, prompt never (`sft_mdm_loss`)       |
| generation       | token by token (`generate_ar`)         | low-confidence remasking (`generate_mdm`)            |
| validation nats  | exact, in sliding windows (`ar_nats`)  | Monte Carlo upper bound (`mdm_nats`)                 |

MDM is LLaDA (Nie et al. 2025, "Large Language Diffusion Models", https://arxiv.org/abs/2502.09992). The pure
losses stay in `text.losses`; a strategy wires them to a model (or its wrapped forward) and a batch. Where an
objective draws randomness (MDM's masks), it draws it for the step's global batch from the batch's generator and
keeps this process's rows (the base trainer's rule), so the process count does not change what is masked.

Examples:
    >>> OBJECTIVES["mdm"].causal, OBJECTIVES["mdm"].mask_token, OBJECTIVES["ar"].bpc_key
    (False, True, 'bpc')
"""

from __future__ import annotations

import abc
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from pipeline_lib.core.trainer import Batch
from pipeline_lib.text.losses import ar_loss, mdm_corrupt, mdm_loss, sft_ar_loss, sft_mdm_loss
from pipeline_lib.text.models.likelihood import ar_nats, consecutive_windows, mdm_nats
from pipeline_lib.text.models.sampling import generate_ar, generate_mdm
from pipeline_lib.text.models.transformer import TransformerLM

Forward = Callable[..., Tensor]  # the (possibly DDP-wrapped, compiled) model: (B, T) ids -> (B, T, V) logits


class Objective(abc.ABC):
    """What one language-model objective does its own way.

    Attributes:
        name: the objective's key in params, stage names and registered names (`ar`, `mdm`).
        title: how descriptions name it ("autoregressive (next-token)").
        sampler_params: the sampler's inference params, for a registered model's description.
        causal: its transformer attends to earlier positions only.
        mask_token: its transformer has an embedding for a MASK id just outside the vocabulary.
        multi_token_prediction: `text_pretrain.mtp_depth` applies to it.
        bpc_key: the metric key of its validation bits per character.
        bpc_is_bound: that figure is an upper bound, not exact.
    """

    name: str
    title: str
    sampler_params: str
    causal: bool
    mask_token: bool
    multi_token_prediction: bool
    bpc_key: str
    bpc_is_bound: bool

    def build(self, vocab_size: int, **architecture: Any) -> TransformerLM:
        """A fresh transformer for this objective (`architecture`: `TransformerLM`'s other keywords)."""
        return TransformerLM(vocab_size, causal=self.causal, mask_token=self.mask_token, **architecture)

    @abc.abstractmethod
    def pretrain_loss(self, forward: Forward, batch: Batch, *, mask_id: int | None, eps: float, context: int = 0,
                      anneal: float | None = None) -> dict[str, Tensor]:
        """The language-modelling loss (and other scalars to log) of `batch.inputs`, (b, L + 1) ids.

        Args:
            forward: the model to call (wrapped or not).
            batch: this process's rows of the step's global batch, with the step's generator.
            mask_id: the model's MASK id (None without one).
            eps: the smallest masking probability (`text_pretrain.mdm_eps`).
            context: the model's leading positions that are never predicted (`TransformerLM.context`).
            anneal: the attention annealing of an AR-initialised masked model: each query reads each later key
                with this probability, every earlier one always (None: the model's own attention).
        """

    @abc.abstractmethod
    def sft_loss(self, forward: Forward, batch: Batch, ids: Tensor, *, key_mask: Tensor, answer: Tensor,
                 response: Tensor, mask_id: int | None, eps: float) -> dict[str, Tensor]:
        """The supervised finetuning loss (and other scalars to log) of task rows.

        Args:
            forward: the model to call (wrapped or not), with a `key_mask` keyword.
            batch: this process's rows of the step's global batch, with the step's generator.
            ids: (b, T) prompt, completion and padding ids.
            key_mask: (b, T) bool, False at the padding, which is never read.
            answer: (b, T) bool, the completion and its first end-of-sequence id.
            response: (b, T) bool, `answer` and the end-of-sequence fill after it.
            mask_id: the model's MASK id (None without one).
            eps: the smallest masking probability (`text_sft.mdm_eps`).
        """

    @abc.abstractmethod
    def generate(self, model: TransformerLM, prompt_ids: Tensor, *, new_tokens: int, temperature: float,
                 generator: torch.Generator | None, block_length: int, top_k: int | None = None,
                 steps: int | None = None, key_mask: Tensor | None = None) -> Tensor:
        """(B, P) prompts -> (B, P + new_tokens) ids; temperature 0 is greedy. The sampler reads the knobs it has
        (`ar`: `top_k`; `mdm`: `block_length` and `steps`) and ignores the others. Put the model in eval mode."""

    @abc.abstractmethod
    def sample_length(self, requested: int, prompt_len: int, max_len: int) -> int:
        """How many tokens a sample of `requested` new tokens after `prompt_len` gets from a model of `max_len`
        (below 1: none fit)."""

    @abc.abstractmethod
    def validation_nats(self, model: TransformerLM, tokens: np.ndarray, *, num_samples: int,
                        seed: int) -> tuple[float, int]:
        """Total nats of a token stream and how many of its tokens were scored (`num_samples`, `seed`: the Monte
        Carlo draws of a bound). Put the model in eval mode."""


def annealed_attention(length: int, fraction: float, generator: torch.Generator | None) -> Tensor:
    """DiffuGPT's attention annealing: (length, length) bool, True where query i reads key j: every j <= i (the
    causal pattern), and each later key with probability `fraction` (0: causal; 1: bidirectional).

    Examples:
        >>> annealed_attention(3, 0.0, None).int().tolist()
        [[1, 0, 0], [1, 1, 0], [1, 1, 1]]
    """
    later = torch.rand(length, length, generator=generator) < fraction
    return later | torch.ones(length, length, dtype=torch.bool).tril()


def _required(mask_id: int | None) -> int:
    if mask_id is None:
        raise ValueError("mdm needs a model with a mask token (mask_token=True)")
    return mask_id


class AR(Objective):
    """Autoregressive: a causal model trained on next-token cross-entropy, sampled one token per step."""

    name = "ar"
    title = "autoregressive (next-token)"
    sampler_params = "`temperature` (0: greedy), `top_k` (0: all tokens)"
    causal = True
    mask_token = False
    multi_token_prediction = True
    bpc_key = "bpc"
    bpc_is_bound = False

    def pretrain_loss(self, forward: Forward, batch: Batch, *, mask_id: int | None, eps: float, context: int = 0,
                      anneal: float | None = None) -> dict[str, Tensor]:
        ids = batch.inputs  # (b, L + 1)
        return {"loss": ar_loss(forward(ids[:, :-1]), ids[:, 1:])}

    def sft_loss(self, forward: Forward, batch: Batch, ids: Tensor, *, key_mask: Tensor, answer: Tensor,
                 response: Tensor, mask_id: int | None, eps: float) -> dict[str, Tensor]:
        # Prompt and padding are read, never learned.
        logits = forward(ids[:, :-1], key_mask=key_mask[:, :-1])  # (b, T - 1, V)
        return {"loss": sft_ar_loss(logits, ids, answer)}

    def generate(self, model: TransformerLM, prompt_ids: Tensor, *, new_tokens: int, temperature: float,
                 generator: torch.Generator | None, block_length: int, top_k: int | None = None,
                 steps: int | None = None, key_mask: Tensor | None = None) -> Tensor:
        return generate_ar(model, prompt_ids, max_new_tokens=new_tokens, temperature=temperature, top_k=top_k,
                           generator=generator, key_mask=key_mask)

    def sample_length(self, requested: int, prompt_len: int, max_len: int) -> int:
        """Any length: the model reads the last `max_len` tokens."""
        return requested

    def validation_nats(self, model: TransformerLM, tokens: np.ndarray, *, num_samples: int,
                        seed: int) -> tuple[float, int]:
        """Every token but the first, in sliding windows of `max_len` advancing by half of it."""
        return ar_nats(model, tokens, stride=max(1, model.max_len // 2)), len(tokens) - 1


class MDM(Objective):
    """Masked diffusion (LLaDA): a bidirectional model with a MASK id, trained to predict randomly masked tokens,
    sampled by unmasking an all-MASK answer block by block."""

    name = "mdm"
    title = "masked-diffusion (LLaDA)"
    sampler_params = ("`temperature` (0: greedy), `block_length` (the answer is decoded in blocks of this many "
                      "tokens, the last one cut to fit), `steps` (model calls in all; 0: one per new token)")
    causal = False
    mask_token = True
    multi_token_prediction = False  # it predicts every masked position at once
    bpc_key = "bpc_bound"
    bpc_is_bound = True

    def pretrain_loss(self, forward: Forward, batch: Batch, *, mask_id: int | None, eps: float, context: int = 0,
                      anneal: float | None = None) -> dict[str, Tensor]:
        """LLaDA's loss over the window's positions from `context` on (the others are never masked)."""
        mask_id = _required(mask_id)
        clean = batch.inputs[:, :-1]  # (b, L)
        length = clean.shape[1]
        # Masks are drawn for the step's whole global batch, then this process keeps its rows (the base trainer's
        # rule), so N processes mask exactly what one process would.
        _, masked, p = mdm_corrupt(torch.zeros(batch.global_size, length - context, dtype=torch.long),
                                   mask_id=mask_id, eps=eps, generator=batch.generator)
        masked = F.pad(masked, (context, 0))  # (B, L): the context positions stay visible
        masked, p = masked[batch.rows].to(clean.device), p[batch.rows].to(clean.device)
        extra: dict[str, Any] = {}
        if anneal is not None:  # one pattern for the step's whole batch, from the step's generator
            extra["attention"] = annealed_attention(length, anneal, batch.generator).to(clean.device)
        logits = forward(clean.masked_fill(masked, mask_id), **extra)
        loss = mdm_loss(logits[:, context:], clean[:, context:], masked[:, context:], p)
        return {"loss": loss, "mask_rate": masked[:, context:].float().mean()}

    def sft_loss(self, forward: Forward, batch: Batch, ids: Tensor, *, key_mask: Tensor, answer: Tensor,
                 response: Tensor, mask_id: int | None, eps: float) -> dict[str, Tensor]:
        # Only response positions may be masked; each sequence's loss is divided by its response length.
        mask_id = _required(mask_id)
        _, masked, p = mdm_corrupt(torch.zeros(batch.global_size, ids.shape[1], dtype=torch.long), mask_id=mask_id,
                                   eps=eps, generator=batch.generator)
        masked = masked[batch.rows].to(ids.device) & response
        logits = forward(ids.masked_fill(masked, mask_id), key_mask=key_mask)  # (b, T, V)
        return {"loss": sft_mdm_loss(logits, ids, masked, p[batch.rows].to(ids.device), response),
                "mask_rate": masked.sum() / response.sum()}

    def generate(self, model: TransformerLM, prompt_ids: Tensor, *, new_tokens: int, temperature: float,
                 generator: torch.Generator | None, block_length: int, top_k: int | None = None,
                 steps: int | None = None, key_mask: Tensor | None = None) -> Tensor:
        return generate_mdm(model, prompt_ids, gen_length=new_tokens, steps=steps, block_length=block_length,
                            temperature=temperature, mask_id=_required(model.mask_id), generator=generator,
                            key_mask=key_mask)

    def sample_length(self, requested: int, prompt_len: int, max_len: int) -> int:
        """Cut to the rest of the model's window after the prompt."""
        return min(requested, max_len - prompt_len)

    def validation_nats(self, model: TransformerLM, tokens: np.ndarray, *, num_samples: int,
                        seed: int) -> tuple[float, int]:
        """The tokens of consecutive `max_len` windows, each scored on its own; a shifted model's windows overlap
        by its one context token (the previous window's last), so each token is still scored once."""
        length, context = model.max_len, model.context
        windows = consecutive_windows(tokens, length - context)[:, :length]  # (N, max_len)
        nats = mdm_nats(model, windows, num_samples=num_samples, seed=seed, context=context)
        return nats, windows.shape[0] * (length - context)


OBJECTIVES: dict[str, Objective] = {"ar": AR(), "mdm": MDM()}


def resolve_objective(name: str) -> Objective:
    """The strategy of the objective `name`.

    Raises:
        ValueError: an unknown name, with the accepted ones.
    """
    try:
        return OBJECTIVES[name]
    except KeyError:
        raise ValueError(f"objective={name!r}: expected {' or '.join(map(repr, OBJECTIVES))}") from None
