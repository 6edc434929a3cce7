"""The text track's evaluation: validation bits per character of the n-gram, AR and masked-diffusion models.

Bits per character = total nats / ln 2 / characters, so char and BPE tokenizers compare. Each objective scores
the validation tokens its own way (`Objective.validation_nats`, `models.likelihood`): the AR model reads them in
sliding windows of its `seq_len`, so, like the n-gram, it scores every token but the first and each with context;
the masked model reads consecutive windows of `seq_len`, each scored on its own. The characters scored are the
validation characters times the share of tokens scored. The AR figure is exact (teacher-forced next-token CE);
the masked-diffusion figure is LLaDA's Monte Carlo upper bound (`mdm_nll_bound`) with a fixed seed and sample
count, so it is marked as a bound (`bpc_bound`).
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
from pipeline_lib.text.models.objectives import OBJECTIVES, Objective, resolve_objective
from pipeline_lib.text.models.saved import CONFIG_FILE, load_lm
from pipeline_lib.text.models.transformer import TransformerLM
from pipeline_lib.text.ngram import bits_per_character
from pipeline_lib.text.pretrain import window_count

# The metric key of each objective's figure: the masked model's is an upper bound, and says so.
BPC_KEY = {name: objective.bpc_key for name, objective in OBJECTIVES.items()}


def run_text_evaluate(params: TextParams, data: Path, ngram_bpc: float, models: dict[str, Path],
                      tracker: Tracker) -> dict[str, Any]:
    """Score each trained model against the n-gram's bits per character; a sample of each goes to the run."""
    summary: dict[str, Any] = {"ngram": {"bpc": ngram_bpc}}
    gain, strategies = {}, {}
    for name, folder in models.items():
        model, tokenizer, config = load_lm(folder)
        objective = config["objective"]
        strategies[name] = resolve_objective(objective)
        summary[name] = score(model, objective, data, params)
        tracker.log_text(tokenizer.decode(sample(model, objective, data, params)[0].tolist()),
                         f"samples/{name}.txt")
        gain[f"{name}_vs_ngram"] = 1 - summary[name][strategies[name].bpc_key] / ngram_bpc
    summary["gain"] = gain
    tracker.log_metrics({f"{group}.{key}": value for group, values in summary.items() for key, value in values.items()})
    if tracker.run_id is not None:  # each model's run and registered version get their validation figure
        for name, folder in models.items():
            key = strategies[name].bpc_key
            bound = " (an upper bound)" if strategies[name].bpc_is_bound else ""
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
    strategy = resolve_objective(objective)
    meta = read_text_meta(data)
    tokens = read_tokens(data, "val")
    window_count(len(tokens), model.max_len, "validation")  # refuses too few tokens, naming the key
    started = time.perf_counter()
    nats, scored = strategy.validation_nats(model, tokens, num_samples=params.text_evaluate.mdm_samples,
                                            seed=params.seed)
    seconds = time.perf_counter() - started
    covered = scored / meta["num_tokens"]["val"]
    return {strategy.bpc_key: bits_per_character(nats, round(meta["num_chars"]["val"] * covered)),
            "params": model.num_params(non_embedding=False), "non_embedding_params": model.num_params(),
            "eval_tokens_per_second": scored / seconds, "scored_token_share": covered}


def sample_length(strategy: Objective, cfg: TextEvaluateParams, prompt_len: int, max_len: int) -> int:
    """How many tokens a model samples after a prompt of `prompt_len` tokens: `sample_tokens`, for the masked
    model cut to the rest of its window of `max_len` (its blocks are cut to fit: the last may be shorter).

    Raises:
        ConfigError: the prompt leaves no room, naming `text_evaluate.prompt_tokens`.
    """
    length = strategy.sample_length(cfg.sample_tokens, prompt_len, max_len)
    if length < 1:
        raise ConfigError(f"text_evaluate.prompt_tokens={cfg.prompt_tokens}: must be < text_model.seq_len={max_len}, "
                          f"the masked model's window, which its sample fills after the prompt (accepted: at most "
                          f"{max_len - 1})")
    return length


def check_inputs(params: TextParams, data: Path, models: dict[str, Path]) -> None:
    """The params that only the prepared text and the models decide, checked by the stage before its MLflow run
    from meta.json and each model's config.json: each model's window (`text_model.seq_len` when it was trained)
    against the validation tokens (`pretrain.window_count`), and for a masked model `text_evaluate.prompt_tokens`
    against its window (`sample_length`).

    Raises:
        ConfigError: naming the key; DataError, FileNotFoundError: missing inputs.
    """
    num_val = read_text_meta(data)["num_tokens"]["val"]
    for folder in models.values():
        config = json.loads((Path(folder) / CONFIG_FILE).read_text())
        window_count(num_val, config["max_len"], "validation")
        # The prompt is the first prompt_tokens validation tokens, or all of them.
        sample_length(resolve_objective(config["objective"]), params.text_evaluate,
                      min(params.text_evaluate.prompt_tokens, num_val), config["max_len"])


def sample(model: TransformerLM, objective: str, data: Path, params: TextParams) -> torch.Tensor:
    """(1, P + new) ids continuing the validation text's first tokens: AR sampling, or LLaDA's sampler."""
    cfg = params.text_evaluate
    strategy = resolve_objective(objective)
    prompt = _prompt(data, cfg.prompt_tokens)
    generator = torch.Generator().manual_seed(params.seed)
    return strategy.generate(model, prompt, new_tokens=sample_length(strategy, cfg, prompt.shape[1], model.max_len),
                             temperature=cfg.temperature, block_length=cfg.block_length, generator=generator)


def _prompt(data: Path, length: int) -> torch.Tensor:
    """The first `length` validation tokens, (1, length)."""
    return torch.from_numpy(np.asarray(read_tokens(data, "val")[:length], dtype=np.int64))[None, :]
