"""The text track's GRPO claim: GRPO against the controls a sceptic asks for, over seeds, with paired intervals.

Run it with `dvc repro studies/dvc.yaml:text_rl_claim` (a study: the default `dvc repro` never runs it). For each
seed of `text_rl_claim.seeds` and each objective of `text_rl_claim.objectives` (a cell), on the task of
`data/text/task`:

1. SFT: the pretrained model of `models/text/<objective>` (objectives in `text_rl_claim.pretrained`) or fresh
   weights, finetuned with the text_sft keys and the cell's seed (with `text_sft.stop_at_accuracy`, up to the edge
   of competence on the held-out train examples);
2. from that SFT model, each method of `text_rl.METHODS` with the text_rl keys, the cell's seed and
   `text_rl_claim.rl_epochs`: GRPO, the shuffled-reward control (the same run on rewards permuted across each
   batch) and rejection-sampling finetuning, at the same prompts, group size and steps;
3. every model scored on the test split as text_task_evaluate scores it (`evaluate_task_model`: greedy exact
   match, pass@k and maj@k for k up to `text_task_evaluate.pass_k`, format rates), and the SFT model probed on
   the rl prompts as text_rl probes it (the share of groups without reward spread).

Cells run `text_rl_claim.jobs` at a time in worker processes that share the cores, so a cell's figures are those of
one process with that many threads (bit-identical on one machine). A cell trains from nothing: the study keeps no
checkpoints, and a killed run starts again.

The claim: per objective and metric, the paired difference of two models over the seeds (`DIFFERENCES`), its mean,
95% Student-t interval and smallest seed (`core.claims.paired_interval`), and each model's mean with its interval.

Outputs: `runs.csv` (one row per seed, objective and model), `claim.png` (the metrics with their intervals, and
pass@k and maj@k against k) in the plots folder, `metrics/text/rl_claim.json` (the summary), all staged and renamed
into place, and the study's MLflow run: every cell's figures per seed (`<objective>.<model>.<metric>`, step =
seed), the differences (`<objective>.<a>_minus_<b>.<metric>.mean|low|high|min`), the CSV and the plot.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import tempfile
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline_lib.core.claims import paired_interval
from pipeline_lib.core.config import flatten
from pipeline_lib.core.errors import ConfigError
from pipeline_lib.core.outputs import staged_dir, write_csv
from pipeline_lib.core.tracking import Tracker, write_json_atomic
from pipeline_lib.core.trainer import check_batch_size
from pipeline_lib.text.config import TextParams
from pipeline_lib.text.data.task_data import read_task
from pipeline_lib.text.finetune import SFTPaths, sft_trainer, start_model
from pipeline_lib.text.finetune import check_inputs as check_sft_inputs
from pipeline_lib.text.rl import METHODS, post_trainer, probe_signal
from pipeline_lib.text.rollout import encode_prompts
from pipeline_lib.text.task_evaluate import evaluate_task_model, sample_ks

MODELS = ("sft", *METHODS)  # sft, grpo, shuffled, rft
# (treatment, control) pairs whose per-seed differences the study reports.
DIFFERENCES = (("grpo", "shuffled"), ("grpo", "sft"), ("grpo", "rft"), ("rft", "sft"), ("shuffled", "sft"))


@dataclass(frozen=True)
class ClaimPaths:
    """What the study reads (the task, the prepared text's tokenizer, the pretrained models' folder) and writes."""

    task: Path
    data: Path
    pretrained: Path  # holds <objective>/ for the objectives in `text_rl_claim.pretrained`
    plots: Path
    metrics: Path


@dataclass(frozen=True)
class Cell:
    """One seed and objective of the study, as a worker process receives it."""

    params: TextParams
    paths: ClaimPaths
    objective: str
    seed: int
    device: str
    threads: int


def logged_params(params: TextParams) -> dict[str, Any]:
    """The flat params the study uses: the model, the task, the SFT and rl recipes, the scoring and its own."""
    return {"device": params.device, **flatten(params.text_model, "text_model."),
            **flatten(params.text_task, "text_task."), **flatten(params.text_sft, "text_sft."),
            **{key: value for key, value in flatten(params.text_rl, "text_rl.").items()
               if key not in ("text_rl.method", "text_rl.epochs")},
            **flatten(params.text_task_evaluate, "text_task_evaluate."),
            **flatten(params.text_rl_claim, "text_rl_claim.")}


def cell_params(params: TextParams, seed: int, method: str | None = None) -> TextParams:
    """The params of one seed (and one post-training method, for `rl_epochs` epochs)."""
    params = dataclasses.replace(params, seed=seed)
    if method is None:
        return params
    try:
        rl = dataclasses.replace(params.text_rl, method=method, epochs=params.text_rl_claim.rl_epochs)
    except ConfigError as err:
        raise ConfigError(f"text_rl_claim.rl_epochs={params.text_rl_claim.rl_epochs}: the text_rl keys refuse it as "
                          f"their epochs ({err})") from None
    return dataclasses.replace(params, text_rl=rl)


def sft_paths(params: TextParams, paths: ClaimPaths, objective: str) -> SFTPaths:
    """The SFT stage's paths for a cell (only its inputs are read)."""
    pretrained = paths.pretrained / objective if objective in params.text_rl_claim.pretrained else None
    return SFTPaths(paths.task, paths.data, pretrained, paths.plots, paths.metrics, paths.plots, paths.plots)


def check_inputs(params: TextParams, paths: ClaimPaths) -> None:
    """What the study checks before its MLflow run, for every objective: the SFT inputs as text_sft checks them
    (layout, the held-out examples and the batch, the pretrained model where one is used), the rl batch against
    the rl prompts, and `rl_epochs` as text_rl's epochs.

    Raises:
        ConfigError: naming the key; FileNotFoundError, ValueError: missing or wrong inputs.
    """
    rl = len(read_task(paths.task).splits["rl"])
    for objective in params.text_rl_claim.objectives:
        check_sft_inputs(params, sft_paths(params, paths, objective), objective)
    check_batch_size(cell_params(params, params.seed, "grpo").text_rl, rl, "rl prompts")


def run_cell(cell: Cell) -> list[dict[str, Any]]:
    """SFT, the probe, the three post-trainings and the test scores of one seed and objective (in a worker)."""
    torch.set_num_threads(cell.threads)
    device, objective = torch.device(cell.device), cell.objective
    params = cell_params(cell.params, cell.seed)
    data = read_task(cell.paths.task)
    evaluation = params.text_task_evaluate

    def scored(model: Any, name: str, extra: dict[str, Any]) -> dict[str, Any]:
        metrics, _ = evaluate_task_model(model, objective, tokenizer, data.splits["test"], data.checker, task,
                                         pass_k=evaluation.pass_k, temperature=evaluation.temperature,
                                         block_length=evaluation.block_length, seed=cell.seed)
        return {"objective": objective, "seed": cell.seed, "model": name, **extra, **metrics}

    model, tokenizer = start_model(params, sft_paths(params, cell.paths, objective), objective)
    with tempfile.TemporaryDirectory(prefix="text_rl_claim-") as scratch:
        started = time.perf_counter()
        trainer, task = sft_trainer(params, model, tokenizer, data, objective, device=device, seed=cell.seed,
                                    checkpoint_dir=Path(scratch) / "sft", tracker=Tracker(), fingerprint="sft")
        result = trainer.fit()
        sft_model = trainer.model.eval()
        sft_info = {"sft_steps": result.steps, "sft_holdout_accuracy": trainer.checks[-1][1] if trainer.checks
                    else None}
        probe = probe_signal(sft_model, objective, tokenizer, data.splits["rl"], data.checker, task,
                             params.text_rl, cell.seed)
        rows = [scored(sft_model, "sft", {**sft_info, "seconds": round(time.perf_counter() - started, 1),
                                          "frac_reward_zero_std": probe["frac_reward_zero_std"]})]
        examples = data.splits["rl"]
        ids, real = encode_prompts([e.prompt for e in examples], tokenizer, task["prompt_len"])
        for method in METHODS:
            started = time.perf_counter()
            cfg = cell_params(params, cell.seed, method).text_rl
            trained = post_trainer(copy.deepcopy(sft_model), cfg, ids, real, examples,
                                   reference=copy.deepcopy(sft_model), objective=objective, tokenizer=tokenizer,
                                   checker=data.checker, task=task, tracker=Tracker(), device=device,
                                   mdm_eps=params.text_sft.mdm_eps, seed=cell.seed,
                                   checkpoint_dir=Path(scratch) / method, fingerprint=method)
            history = trained.fit().history
            rows.append(scored(trained.model.eval(), method, {
                **sft_info, "steps": trained.total_steps, "seconds": round(time.perf_counter() - started, 1),
                "frac_reward_zero_std": float(np.mean([h["frac_reward_zero_std"] for h in history])),
                "train_reward_first": history[0]["reward"], "train_reward_last": history[-1]["reward"]}))
    return rows


def metric_names(pass_k: int) -> list[str]:
    """The scored metrics, in the order tables show them."""
    ks = sample_ks(pass_k)
    return ["accuracy", *(f"pass_at_{k}" for k in ks), *(f"maj_at_{k}" for k in ks), "format_rate",
            "sampled_format_rate"]


def summarise(rows: Sequence[dict[str, Any]], params: TextParams) -> dict[str, Any]:
    """Per objective: each model's mean and interval per metric over the seeds, each difference of `DIFFERENCES`
    paired by seed, and the SFT models' steps, greedy exact match and share of probe groups without signal."""
    names, summary = metric_names(params.text_task_evaluate.pass_k), {}
    for objective in params.text_rl_claim.objectives:
        by = {(row["model"], row["seed"]): row for row in rows if row["objective"] == objective}
        seeds = sorted({seed for _, seed in by})
        models = {model: {name: paired_interval([by[model, s][name] for s in seeds]).as_dict() for name in names}
                  for model in MODELS}
        differences = {f"{a}_minus_{b}": {name: {**paired_interval([by[a, s][name] - by[b, s][name]
                                                                    for s in seeds]).as_dict(),
                                                 "seeds": [by[a, s][name] - by[b, s][name] for s in seeds]}
                                          for name in names} for a, b in DIFFERENCES}
        sft = [by["sft", s] for s in seeds]
        summary[objective] = {
            "seeds": seeds, "models": models, "differences": differences,
            "sft": {"steps": [row["sft_steps"] for row in sft], "accuracy": [row["accuracy"] for row in sft],
                    "frac_reward_zero_std": [row["frac_reward_zero_std"] for row in sft]},
            "grpo_frac_reward_zero_std": float(np.mean([by["grpo", s]["frac_reward_zero_std"] for s in seeds])),
        }
    return summary


def claim_figure(summary: dict[str, Any], pass_k: int) -> Any:
    """Per objective (a row of panels): each difference of `DIFFERENCES` in greedy exact match, pass@1, maj@n and
    pass@n, its mean and 95% interval over the seeds, each seed a dot; and pass@k (solid) and maj@k (dashed) of each
    model against k, means over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    objectives, ks = list(summary), sample_ks(pass_k)
    shown = {"accuracy": "greedy", "pass_at_1": "pass@1", f"maj_at_{pass_k}": f"maj@{pass_k}",
             f"pass_at_{pass_k}": f"pass@{pass_k}"}
    figure, axes = plt.subplots(len(objectives), 2, figsize=(12.0, 4.2 * len(objectives)), squeeze=False)
    width = 0.8 / len(DIFFERENCES)
    for row, objective in enumerate(objectives):
        found = summary[objective]
        bars, curves = axes[row]
        for i, (treatment, control) in enumerate(DIFFERENCES):
            numbers = found["differences"][f"{treatment}_minus_{control}"]
            positions = np.arange(len(shown)) + (i - (len(DIFFERENCES) - 1) / 2) * width
            means = np.array([numbers[name]["mean"] for name in shown])
            errors = np.array([[numbers[name]["mean"] - numbers[name]["low"],
                                numbers[name]["high"] - numbers[name]["mean"]] for name in shown]).T
            bars.bar(positions, means, width, yerr=np.nan_to_num(errors), capsize=3, label=f"{treatment} - {control}")
            for position, name in zip(positions, shown, strict=True):  # each seed's difference
                bars.plot([position] * len(numbers[name]["seeds"]), numbers[name]["seeds"], "o", markersize=3,
                          color="black", alpha=0.6)
        bars.axhline(0.0, color="gray", linewidth=0.8)
        bars.set_xticks(range(len(shown)), list(shown.values()))
        bars.set_ylabel("paired difference on test")
        bars.set_title(f"{objective}: mean, 95% interval and each of {len(found['seeds'])} seeds")
        bars.legend(fontsize=7)
        for model in MODELS:
            (line,) = curves.plot(ks, [found["models"][model][f"pass_at_{k}"]["mean"] for k in ks], marker="o",
                                  label=model)
            curves.plot(ks, [found["models"][model][f"maj_at_{k}"]["mean"] for k in ks], linestyle="--",
                        color=line.get_color())
        curves.set_xscale("log", base=2)
        curves.set_xticks(ks, [str(k) for k in ks])
        curves.set_xlabel("k samples (temperature as text_task_evaluate)")
        curves.set_ylabel("test pass@k (solid), maj@k (dashed)")
        curves.set_title(f"{objective}: pass@k and majority vote, mean over seeds")
        curves.grid(alpha=0.3)
        curves.legend(fontsize=8)
    figure.tight_layout()
    return figure


def cells(params: TextParams, paths: ClaimPaths, device: torch.device) -> list[Cell]:
    """Every (seed, objective) cell, the masked model's first (its sampler is the slower one)."""
    cfg = params.text_rl_claim
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    threads = max(1, cores // cfg.jobs)
    order = sorted(cfg.objectives, key=lambda objective: objective != "mdm")
    return [Cell(params, paths, objective, seed, str(device), threads) for objective in order for seed in cfg.seeds]


def run_text_rl_claim(params: TextParams, paths: ClaimPaths, tracker: Tracker, device: torch.device) -> dict[str, Any]:
    """Run every cell, summarise, write the CSV, the figure and the summary, and log them to `tracker`."""
    import matplotlib.pyplot as plt

    started, cfg = time.perf_counter(), params.text_rl_claim
    work = cells(params, paths, device)
    print(f"text_rl_claim: {len(work)} cells (seeds {cfg.seeds} x {cfg.objectives}), {cfg.jobs} at a time with "
          f"{work[0].threads} thread(s) each, on {device}; SFT from the pretrained model for "
          f"{cfg.pretrained or 'none'} (fresh weights for the others), then {', '.join(METHODS)} for "
          f"{cfg.rl_epochs} epochs of the rl prompts", flush=True)
    if cfg.jobs == 1:
        results = [run_cell(cell) for cell in work]
    else:
        with ProcessPoolExecutor(max_workers=cfg.jobs, mp_context=get_context("spawn")) as pool:
            results = list(pool.map(run_cell, work))
    rows = sorted((row for result in results for row in result),
                  key=lambda row: (row["objective"], row["seed"], MODELS.index(row["model"])))
    summary = summarise(rows, params)
    names = metric_names(params.text_task_evaluate.pass_k)
    figure = claim_figure(summary, params.text_task_evaluate.pass_k)
    columns = ["objective", "seed", "model", *names, "sft_steps", "sft_holdout_accuracy", "steps",
               "frac_reward_zero_std", "train_reward_first", "train_reward_last", "seconds"]
    with staged_dir(paths.plots) as out:
        write_csv(out / "runs.csv", rows, columns)
        figure.savefig(out / "claim.png", dpi=110)
    plt.close(figure)
    seconds = round(time.perf_counter() - started, 1)
    write_json_atomic(paths.metrics, {**summary, "seconds": seconds})
    for row in rows:
        tracker.log_metrics({f"{row['objective']}.{row['model']}.{name}": row[name] for name in names},
                            step=row["seed"])
    tracker.log_metrics({f"{objective}.{pair}.{name}.{stat}": numbers[stat]
                         for objective, found in summary.items() for pair, metrics in found["differences"].items()
                         for name, numbers in metrics.items() for stat in ("mean", "low", "high", "minimum")
                         if np.isfinite(numbers[stat])} | {"seconds": seconds})
    tracker.log_artifact(paths.plots)
    tracker.log_artifact(paths.metrics)
    tracker.flush()
    return {"summary": summary, "seconds": seconds, "run_id": tracker.run_id}
