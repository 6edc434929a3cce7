"""Scoring task models on a split: greedy exact match, what sampling gives (pass@k, majority vote) and format.

From the greedy completion of each prompt (AR: argmax each token; MDM: LLaDA's low-confidence sampler at
temperature 0) and n = `pass_k` samples at `temperature`, with k = 1, 2, 4, ... up to n (`sample_ks`):

- `accuracy`: the share of prompts whose greedy completion is well formed and right by the task's checker
  (`rewards.accuracy_reward`); `format_rate`: the share of greedy completions that are well formed.
- `pass_at_<k>`: the unbiased estimator of Chen et al. 2021 ("Evaluating Large Language Models Trained on Code",
  https://arxiv.org/abs/2107.03374, equation 1), 1 - C(n - c, k) / C(n, k) averaged over prompts, with c the right
  samples. `pass_at_1` is the mean sampled accuracy, what GRPO's expected reward counts; `pass_at_<n>` the share
  of prompts with at least one right sample.
- `maj_at_<k>`: majority vote (self-consistency, Wang et al. 2022, https://arxiv.org/abs/2203.11171): the n
  samples cut into n / k disjoint runs of k, each run answers with its most frequent well-formed answer (the
  first seen among ties), scored as right or wrong, averaged over runs and prompts. `maj_at_1` is `pass_at_1`.
- `sampled_format_rate`: the share of samples that are well formed, apart from being right.
- `mean_completion_chars`: characters of the greedy completions (before ``<eos>``).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline_lib.core.registry import annotate
from pipeline_lib.core.tracking import Tracker, read_run_record
from pipeline_lib.text.config import TextParams
from pipeline_lib.text.data.checkers import Checker, extract_answer, format_ok
from pipeline_lib.text.data.task_data import read_task
from pipeline_lib.text.data.tasks import Example
from pipeline_lib.text.data.tokenizer import Tokenizer
from pipeline_lib.text.models.objectives import OBJECTIVES
from pipeline_lib.text.models.saved import load_lm
from pipeline_lib.text.models.transformer import TransformerLM
from pipeline_lib.text.rewards import accuracy_reward, format_reward
from pipeline_lib.text.rollout import complete, decode_completions, encode_prompts

EVAL_BATCH = 256


def pass_at_k(n: int, c: int, k: int) -> float:
    """Chance that at least one of k samples drawn without replacement from n, c of them right, is right.

    Examples:
        >>> pass_at_k(4, 0, 2), pass_at_k(4, 4, 1), pass_at_k(4, 1, 4)
        (0.0, 1.0, 1.0)
        >>> round(pass_at_k(4, 1, 2), 4)  # 1 - C(3, 2) / C(4, 2)
        0.5
    """
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"need 0 <= c={c} <= n={n} and 1 <= k={k} <= n")
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def sample_ks(n: int) -> list[int]:
    """The k of pass@k and maj@k from n samples: the powers of 2 below n, and n.

    Examples:
        >>> sample_ks(16), sample_ks(6), sample_ks(1)
        ([1, 2, 4, 8, 16], [1, 2, 4, 6], [1])
    """
    return [2**i for i in range(n.bit_length()) if 2**i < n] + [n]


def majority_right(texts: Sequence[str], example: Example, checker: Checker) -> bool:
    """Whether the most frequent well-formed answer among `texts` (the first seen among ties) is right; False when
    none is well formed."""
    answers = [extract_answer(text) for text in texts if format_ok(text)]
    if not answers:
        return False
    counts: dict[str, int] = {}
    for answer in answers:
        counts[answer] = counts.get(answer, 0) + 1
    voted = max(counts, key=counts.__getitem__)  # dicts keep insertion order: the first seen wins a tie
    return bool(checker(voted, example))


def maj_at_k(texts: Sequence[str], example: Example, checker: Checker, k: int) -> float:
    """Majority vote over k samples, averaged over the len(texts) // k disjoint runs of k (see the module
    docstring)."""
    if not 1 <= k <= len(texts):
        raise ValueError(f"need 1 <= k={k} <= {len(texts)} samples")
    runs = [texts[start : start + k] for start in range(0, len(texts) - k + 1, k)]
    return float(np.mean([majority_right(run, example, checker) for run in runs]))


@torch.no_grad()
def completions_of(model: TransformerLM, objective: str, tokenizer: Tokenizer, prompts: Sequence[str],
                   task: dict[str, Any], *, temperature: float, block_length: int, samples: int,
                   seed: int) -> list[list[str]]:
    """`samples` completions (text before ``<eos>``) of each prompt; in batches, each prompt's samples together."""
    model.eval()
    device = next(model.parameters()).device
    ids, real = encode_prompts(list(prompts), tokenizer, task["prompt_len"])
    generator = torch.Generator(device=device).manual_seed(seed)
    texts: list[list[str]] = []
    per_batch = max(1, EVAL_BATCH // samples)
    for start in range(0, len(prompts), per_batch):
        prompt_ids = torch.from_numpy(ids[start : start + per_batch]).to(device).repeat_interleave(samples, dim=0)
        key_mask = torch.from_numpy(real[start : start + per_batch]).to(device).repeat_interleave(samples, dim=0)
        out = complete(model, objective, prompt_ids, key_mask, answer_tokens=task["answer_tokens"],
                       temperature=temperature, block_length=block_length, eos_id=task["eos_id"],
                       generator=generator)
        decoded = decode_completions(out, tokenizer, task["eos_id"])
        texts += [decoded[i : i + samples] for i in range(0, len(decoded), samples)]
    return texts


def greedy_accuracy(model: TransformerLM, objective: str, tokenizer: Tokenizer, examples: Sequence[Example],
                    checker: Checker, task: dict[str, Any], *, block_length: int) -> float:
    """Exact match of the greedy completions of `examples` (`accuracy` of `evaluate_task_model`, without samples)."""
    texts = completions_of(model, objective, tokenizer, [example.prompt for example in examples], task,
                           temperature=0.0, block_length=block_length, samples=1, seed=0)
    return float(np.mean([accuracy_reward(group[0], example, checker) for group, example in
                          zip(texts, examples, strict=True)]))


def evaluate_task_model(model: TransformerLM, objective: str, tokenizer: Tokenizer, examples: Sequence[Example],
                        checker: Checker, task: dict[str, Any], *, pass_k: int, temperature: float,
                        block_length: int, seed: int) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """The module docstring's metrics on `examples`; and a row per example (prompt, answer, greedy completion,
    whether it is right, right samples)."""
    prompts = [example.prompt for example in examples]
    options = {"block_length": block_length}
    greedy = [texts[0] for texts in completions_of(model, objective, tokenizer, prompts, task, temperature=0.0,
                                                   samples=1, seed=seed, **options)]
    sampled = completions_of(model, objective, tokenizer, prompts, task, temperature=temperature, samples=pass_k,
                             seed=seed, **options)
    right = np.array([accuracy_reward(text, example, checker) for text, example in zip(greedy, examples, strict=True)])
    counts = [int(sum(accuracy_reward(text, example, checker) for text in texts))
              for texts, example in zip(sampled, examples, strict=True)]
    ks = sample_ks(pass_k)
    metrics = {
        "accuracy": float(right.mean()),
        "format_rate": float(np.mean([format_reward(text) for text in greedy])),
        **{f"pass_at_{k}": float(np.mean([pass_at_k(pass_k, c, k) for c in counts])) for k in ks},
        **{f"maj_at_{k}": float(np.mean([maj_at_k(texts, example, checker, k)
                                          for texts, example in zip(sampled, examples, strict=True)])) for k in ks},
        "sampled_format_rate": float(np.mean([format_reward(text) for texts in sampled for text in texts])),
        "mean_completion_chars": float(np.mean([len(text) for text in greedy])),
    }
    rows = [{"prompt": example.prompt, "answer": example.answer, "greedy": text, "right": bool(ok),
             "right_samples": c} for example, text, ok, c in zip(examples, greedy, right, counts, strict=True)]
    return metrics, rows


def run_task_evaluate(params: TextParams, task_folder: Path, models: dict[str, Path],
                      tracker: Tracker) -> dict[str, Any]:
    """Score each task model on the test split; gains of GRPO over its SFT model and of pretraining over scratch.

    Names follow the stages: `sft_<objective>`, `scratch_<objective>` and `rl_<objective>`; a gain is reported
    for each pair present. Each model's per-prompt results go to the run as `predictions/<name>.jsonl`.
    """
    cfg = params.text_task_evaluate
    data = read_task(task_folder)
    loaded = {}
    for name, folder in models.items():  # every check before any sampling
        model, tokenizer, config = load_lm(folder)
        if "task" not in config:
            raise ValueError(f"--model {name}={folder}: not a task model (config.json has no 'task')")
        loaded[name] = (model, tokenizer, config)
    summary: dict[str, Any] = {}
    for name, (model, tokenizer, config) in loaded.items():
        started = time.perf_counter()
        metrics, rows = evaluate_task_model(model, config["objective"], tokenizer, data.splits["test"], data.checker,
                                            config["task"], pass_k=cfg.pass_k, temperature=cfg.temperature,
                                            block_length=cfg.block_length, seed=params.seed)
        summary[name] = {**metrics, "eval_seconds": round(time.perf_counter() - started, 2)}
        tracker.log_text("".join(json.dumps(row) + "\n" for row in rows), f"predictions/{name}.jsonl")
    gain = {}
    for objective in OBJECTIVES:
        sft, scratch, rl = (summary.get(f"{kind}_{objective}") for kind in ("sft", "scratch", "rl"))
        if sft and rl:
            gain[f"rl_{objective}_over_sft"] = rl["accuracy"] - sft["accuracy"]
        if sft and scratch:
            gain[f"sft_{objective}_over_scratch"] = sft["accuracy"] - scratch["accuracy"]
    summary["gain"] = gain
    summary["test_prompts"] = len(data.splits["test"])
    tracker.log_metrics({f"{group}.{key}": value for group, values in summary.items() if isinstance(values, dict)
                         for key, value in values.items()})
    if tracker.run_id is not None:  # each model's run (and registered version) gets its test figures
        for name, folder in models.items():
            metrics = summary[name]
            figures = {f"test.{key}": value for key, value in metrics.items() if key != "eval_seconds"}
            annotate(read_run_record(folder), figures,
                     headline=f"test exact match {metrics['accuracy']:.4f} (greedy), format rate "
                              f"{metrics['format_rate']:.4f}, pass@{cfg.pass_k} {metrics[f'pass_at_{cfg.pass_k}']:.4f} "
                              f"on {summary['test_prompts']} test prompts (text_task_evaluate)")
    return summary
