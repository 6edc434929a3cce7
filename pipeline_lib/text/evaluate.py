"""The text track's evaluation: validation bits per character of the n-gram, AR and masked-diffusion models.

Bits per character = total nats / ln 2 / characters, so char and BPE tokenizers compare. The AR model reads
the validation tokens in sliding windows of its `seq_len` (`sliding_windows`), so, like the n-gram, it scores
every token but the first and each with context; the masked model reads consecutive windows of `seq_len`, each
scored on its own. The characters scored are the validation characters times the share of tokens scored. The
AR figure is exact (teacher-forced next-token CE); the masked-diffusion figure is LLaDA's Monte Carlo upper
bound (`mdm_nll_bound`) with a fixed seed and sample count, so it is marked as a bound.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline_lib.core.errors import ConfigError
from pipeline_lib.core.registry import annotate
from pipeline_lib.core.tracking import Tracker, read_run_record
from pipeline_lib.text.config import TextEvaluateParams, TextParams
from pipeline_lib.text.data.corpus import read_text_meta, read_tokens
from pipeline_lib.text.losses import mdm_nll_bound
from pipeline_lib.text.models.sampling import generate_ar, generate_mdm
from pipeline_lib.text.models.saved import CONFIG_FILE, load_lm
from pipeline_lib.text.models.transformer import TransformerLM
from pipeline_lib.text.ngram import bits_per_character
from pipeline_lib.text.pretrain import token_windows, window_count

EVAL_BATCH = 64


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
def mdm_nats(model: TransformerLM, windows: np.ndarray, *, num_samples: int, seed: int) -> float:
    """Total Monte Carlo NLL bound (nats) of the first `seq_len` ids of each window, each scored on its own."""
    generator = torch.Generator().manual_seed(seed)
    total = 0.0
    for start in range(0, len(windows), EVAL_BATCH):
        ids = torch.from_numpy(windows[start : start + EVAL_BATCH, :-1].astype(np.int64))  # (b, L)
        total += mdm_nll_bound(model, ids, mask_id=model.mask_id, num_samples=num_samples, generator=generator).sum()
    return float(total)


BPC_KEY = {"ar": "bpc", "mdm": "bpc_bound"}  # the masked model's figure is an upper bound, and says so


def run_text_evaluate(params: TextParams, data: Path, ngram_bpc: float, models: dict[str, Path],
                      tracker: Tracker) -> dict[str, Any]:
    """Score each trained model against the n-gram's bits per character; a sample of each goes to the run."""
    summary: dict[str, Any] = {"ngram": {"bpc": ngram_bpc}}
    gain = {}
    for name, folder in models.items():
        model, tokenizer, config = load_lm(folder)
        objective = config["objective"]
        summary[name] = score(model, objective, data, params)
        tracker.log_text(tokenizer.decode(sample(model, objective, data, params)[0].tolist()),
                         f"samples/{name}.txt")
        gain[f"{name}_vs_ngram"] = 1 - summary[name][BPC_KEY[objective]] / ngram_bpc
    summary["gain"] = gain
    tracker.log_metrics({f"{group}.{key}": value for group, values in summary.items() for key, value in values.items()})
    if tracker.run_id is not None:  # each model's run and registered version get their validation figure
        for name, folder in models.items():
            key = next(key for key in BPC_KEY.values() if key in summary[name])
            bound = " (an upper bound)" if key == BPC_KEY["mdm"] else ""
            annotate(read_run_record(folder), {"validation.bits_per_character": summary[name][key]},
                     headline=f"validation bits per character {summary[name][key]:.4f}{bound}, against "
                              f"{ngram_bpc:.4f} for the n-gram baseline (text_evaluate)")
    return summary


def score(model: TransformerLM, objective: str, data: Path, params: TextParams) -> dict[str, Any]:
    """Bits per character of one trained transformer on the validation split, with its size and speed.

    The AR model scores every validation token but the first, in sliding windows of `max_len` advancing by half
    of it; the masked model scores the tokens of consecutive `max_len` windows, each on its own. The characters
    are the validation characters times the share of tokens scored.
    """
    meta = read_text_meta(data)
    tokens = read_tokens(data, "val")
    started = time.perf_counter()
    if objective == "ar":
        nats = ar_nats(model, tokens, stride=max(1, model.max_len // 2))
        scored = len(tokens) - 1
    else:
        windows = token_windows(tokens, model.max_len, "validation")
        nats = mdm_nats(model, windows, num_samples=params.text_evaluate.mdm_samples, seed=params.seed)
        scored = windows.shape[0] * model.max_len
    seconds = time.perf_counter() - started
    covered = scored / meta["num_tokens"]["val"]
    return {BPC_KEY[objective]: bits_per_character(nats, round(meta["num_chars"]["val"] * covered)),
            "params": model.num_params(non_embedding=False), "non_embedding_params": model.num_params(),
            "eval_tokens_per_second": scored / seconds, "scored_token_share": covered}


def mdm_sample_length(cfg: TextEvaluateParams, prompt_len: int, max_len: int) -> int:
    """How many tokens the masked model samples after a prompt of `prompt_len` tokens: `sample_tokens`, cut to
    the rest of its window of `max_len` (its blocks are cut to fit: the last may be shorter).

    Raises:
        ConfigError: the prompt leaves no room, naming `text_evaluate.prompt_tokens`.
    """
    length = min(cfg.sample_tokens, max_len - prompt_len)
    if length < 1:
        raise ConfigError(f"text_evaluate.prompt_tokens={cfg.prompt_tokens}: must be < text_model.seq_len={max_len}, "
                          f"the masked model's window, which its sample fills after the prompt (accepted: at most "
                          f"{max_len - 1})")
    return length


def check_inputs(params: TextParams, data: Path, models: dict[str, Path]) -> None:
    """The params that only the prepared text and the models decide, checked by the stage before its MLflow run
    from meta.json and each model's config.json: each model's window (`text_model.seq_len` when it was trained)
    against the validation tokens (`lm.window_count`), and for a masked model `text_evaluate.prompt_tokens`
    against its window (`mdm_sample_length`).

    Raises:
        ConfigError: naming the key; DataError, FileNotFoundError: missing inputs.
    """
    num_val = read_text_meta(data)["num_tokens"]["val"]
    for folder in models.values():
        config = json.loads((Path(folder) / CONFIG_FILE).read_text())
        window_count(num_val, config["max_len"], "validation")
        if config["objective"] == "mdm":  # the prompt is the first prompt_tokens validation tokens, or all of them
            mdm_sample_length(params.text_evaluate, min(params.text_evaluate.prompt_tokens, num_val), config["max_len"])


def sample(model: TransformerLM, objective: str, data: Path, params: TextParams) -> torch.Tensor:
    """(1, P + new) ids continuing the validation text's first tokens: AR sampling, or LLaDA's sampler."""
    cfg = params.text_evaluate
    prompt = _prompt(data, cfg.prompt_tokens)
    generator = torch.Generator().manual_seed(params.seed)
    if objective == "ar":
        return generate_ar(model, prompt, max_new_tokens=cfg.sample_tokens, temperature=cfg.temperature,
                           generator=generator)
    length = mdm_sample_length(cfg, prompt.shape[1], model.max_len)
    return generate_mdm(model, prompt, gen_length=length, steps=None, block_length=cfg.block_length,
                        temperature=cfg.temperature, mask_id=model.mask_id, generator=generator)


def _prompt(data: Path, length: int) -> torch.Tensor:
    """The first `length` validation tokens, (1, length)."""
    return torch.from_numpy(np.asarray(read_tokens(data, "val")[:length], dtype=np.int64))[None, :]
