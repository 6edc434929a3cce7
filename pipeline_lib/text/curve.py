"""The text track's compute curve: where, if anywhere, a transformer overtakes the n-gram.

Validation bits per character of the `ar` and `mdm` transformers against training time and against training
FLOPs, with the Kneser-Ney n-gram's as a horizontal line. Run it with

    dvc repro studies/dvc.yaml:text_curve

(a study: the default `dvc repro` never runs it; it brings `data/text/prepared` up to date first), or by hand with
`python -m stages.text_curve --params params.yaml --data data/text/prepared --plots plots/text_curve`. At the
default params it trains 1,680 ar and 3,360 mdm steps and scores 24 points, about 5 minutes on 2 cores.

Each objective trains once, with the text_pretrain stage's code and keys (`build_lm`, `training_setup`,
`LMTrainer`: the same seed, initial weights and batches) for its own epochs, `text_curve.ar_epochs` or
`mdm_epochs` in place of `text_pretrain.epochs`, and is scored on validation at `text_curve.points` evenly spaced
steps of that one run (the last is its final step). The points are a training curve, not a compute frontier:
the lr schedule spans the whole run, so an early point has not had the decay that a run of that length would end
with. Each point records:

- `tokens`: the positions the model has read, steps x batch_size x seq_len;
- `seconds`: the training loop's wall time up to the point (its logging and checkpoint writes included, the
  evaluations excluded);
- `flops`: `hparams.flops_per_token` x tokens, DeepSeek LLM's 6N + attention count: 6 FLOPs per non-embedding
  parameter a token passes through, plus 12 x n_layer x d_model x seq_len for the attention scores and values
  (the embedding, the output head and any multi-token prediction modules are left out);
- `bpc`: validation bits per character as text_evaluate scores it (`Objective.validation_nats`; the characters
  in proportion to the tokens scored), on the first `text_curve.val_windows` windows of `text_model.seq_len`
  tokens (null: the whole split). The `mdm` figure is LLaDA's Monte Carlo upper bound with
  `text_evaluate.mdm_samples` draws and the seed, the same draws at every point.

The n-gram of `text_ngram` is fitted on the same training tokens and scored on the same validation tokens (with
`val_windows` null, exactly the text_ngram stage's figure).

Outputs (one folder, written aside and renamed into place): `curve.csv` (one row per point: objective, step,
tokens, seconds, flops, bpc, ngram_bpc; a DVC plot) and `curve.png` (bpc against seconds and against FLOPs, log
x, the n-gram dashed, a star where a model first scores below it). The MLflow run gets both, each objective's
training metrics and its validation figure per step (`ar.loss`, `ar.bpc`, `mdm.bpc_bound`, ...) and the study's
numbers: `ngram_bpc`, per objective its final and best figure and, when it goes below the n-gram, the
`crossover_seconds` and `crossover_flops` of its first point below, and `mdm_over_ar_final_bpc`.
"""

from __future__ import annotations

import copy
import dataclasses
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from pipeline_lib.core import dist
from pipeline_lib.core.config import flatten
from pipeline_lib.core.errors import ConfigError
from pipeline_lib.core.outputs import staged_dir, write_csv
from pipeline_lib.core.tracking import Tracker
from pipeline_lib.core.trainer import FitResult, check_batch_size
from pipeline_lib.text.config import TextParams, TextPretrainParams
from pipeline_lib.text.data.corpus import read_text_meta, read_tokens
from pipeline_lib.text.hparams import flops_per_token
from pipeline_lib.text.models.objectives import OBJECTIVES, Objective, resolve_objective
from pipeline_lib.text.models.saved import exported
from pipeline_lib.text.models.transformer import TransformerLM
from pipeline_lib.text.ngram import NGramLM, bits_per_character
from pipeline_lib.text.pretrain import LMTrainer, build_lm, token_windows, training_setup, window_count

COLUMNS = ["objective", "step", "tokens", "seconds", "flops", "bpc", "ngram_bpc"]
AXES = (("seconds", "s", "training seconds (evaluations excluded)"),  # (column, unit, axis label)
        ("flops", "FLOPs", "training FLOPs (6N + attention, hparams.flops_per_token)"))


@dataclass(frozen=True)
class CurvePaths:
    """Where the curve reads and writes: the text_fetch stage's prepared text, the output folder."""

    data: Path
    plots: Path


def logged_params(params: TextParams) -> dict[str, Any]:
    """The flat params the curve uses, as MLflow logs them: the model, the pretraining recipe but its epochs (the
    curve's own), the n-gram, the mdm bound's draws and the curve's options."""
    return {
        "seed": params.seed,
        "device": params.device,
        **flatten(params.text_model, "text_model."),
        **{key: value for key, value in flatten(params.text_pretrain, "text_pretrain.").items()
           if key != "text_pretrain.epochs"},
        **flatten(params.text_ngram, "text_ngram."),
        "text_evaluate.mdm_samples": params.text_evaluate.mdm_samples,
        **flatten(params.text_curve, "text_curve."),
    }


def curve_params(params: TextParams, objective: str) -> TextParams:
    """The params `objective` trains with: text_pretrain's, for `text_curve.<objective>_epochs` epochs.

    Raises:
        ConfigError: naming the text_curve key, when the text_pretrain keys refuse its epochs.
    """
    epochs = params.text_curve.epochs(objective)
    try:
        pretrain = dataclasses.replace(params.text_pretrain, epochs=epochs)
    except ConfigError as err:
        raise ConfigError(f"text_curve.{objective}_epochs={epochs}: the text_pretrain keys refuse it as their "
                          f"epochs ({err})") from None
    return dataclasses.replace(params, text_pretrain=pretrain)


def training_run(params: TextParams, windows: np.ndarray, vocab_size: int,
                 objective: str) -> tuple[TransformerLM, nn.Module, TextPretrainParams]:
    """What text_pretrain trains for `params`: the language model (its initial weights from the seed), the module
    the trainer steps (with multi-token prediction for `ar` when asked) and the section it trains with."""
    torch.manual_seed(params.seed)  # the text_pretrain stage's initial weights
    model = build_lm(vocab_size, params, objective)
    trained, cfg, _ = training_setup(params, model, windows, objective)
    return model, trained, cfg


def evaluation_steps(total_steps: int, points: int) -> list[int]:
    """`points` evenly spaced steps of a run of `total_steps` (>= points), the last one `total_steps`.

    Examples:
        >>> evaluation_steps(10, 4)
        [2, 5, 7, 10]
    """
    return [k * total_steps // points for k in range(1, points + 1)]


def check_inputs(params: TextParams, data: Path) -> None:
    """What the curve checks before its MLflow run: the windows of `text_model.seq_len` in the training and
    validation tokens, each objective's epochs and batch (as text_pretrain checks them), `text_curve.points`
    against each run's steps and `text_curve.val_windows` against the validation windows.

    Raises:
        ConfigError: naming the key; DataError: no prepared text.
    """
    meta, cfg, seq_len = read_text_meta(data), params.text_curve, params.text_model.seq_len
    windows = token_windows(read_tokens(data, "train"), seq_len)
    available = window_count(meta["num_tokens"]["val"], seq_len, "validation")
    if cfg.val_windows is not None and cfg.val_windows > available:
        raise ConfigError(f"text_curve.val_windows={cfg.val_windows}: the validation split holds {available} windows "
                          f"of text_model.seq_len={seq_len} tokens (accepted: at most {available}, or null for all)")
    for objective in OBJECTIVES:
        run_params = curve_params(params, objective)
        if run_params.text_pretrain.hparams == "manual":
            check_batch_size(run_params.text_pretrain, len(windows),
                             "training windows of text_model.seq_len + 1 tokens")
        _, _, train = training_run(run_params, windows, meta["vocab_size"], objective)
        steps = train.epochs * (len(windows) // train.batch_size)  # as the base trainer counts them
        if cfg.points > steps:
            raise ConfigError(f"text_curve.points={cfg.points}: {objective} trains {steps} steps "
                              f"(text_curve.{objective}_epochs={train.epochs} of {len(windows) // train.batch_size}) "
                              f"and is scored at most once a step (accepted: at most {steps})")


def scored_chars(meta: Mapping[str, Any], scored_tokens: int) -> int:
    """The validation characters of `scored_tokens` of its tokens, in proportion (as text_evaluate counts them)."""
    return round(meta["num_chars"]["val"] * (scored_tokens / meta["num_tokens"]["val"]))


def validation_tokens(params: TextParams, data: Path) -> np.ndarray:
    """The validation tokens every point is scored on: the first `text_curve.val_windows` windows of
    `text_model.seq_len` tokens and the one after them, or the whole split."""
    tokens, count = read_tokens(data, "val"), params.text_curve.val_windows
    return tokens if count is None else tokens[: count * params.text_model.seq_len + 1]


def ngram_bpc(params: TextParams, data: Path, tokens: np.ndarray) -> float:
    """Bits per character of the text_ngram stage's n-gram, fitted on the training tokens, on `tokens`."""
    cfg, meta = params.text_ngram, read_text_meta(data)
    model = NGramLM(cfg.order, meta["vocab_size"], cfg.method, k=cfg.k, discount=cfg.discount)
    model.fit(read_tokens(data, "train"))
    return bits_per_character(-model.log_prob_sequence(tokens), scored_chars(meta, len(tokens)))


def validation_bpc(model: TransformerLM, strategy: Objective, tokens: np.ndarray, meta: Mapping[str, Any],
                   params: TextParams) -> float:
    """Bits per character of `tokens` as text_evaluate scores them, in eval mode. The likelihood functions read
    ids on the CPU, as text_evaluate runs, so a model elsewhere is scored as a CPU copy."""
    if next(model.parameters()).device.type != "cpu":
        model = copy.deepcopy(model).cpu()
    model.eval()
    nats, scored = strategy.validation_nats(model, tokens, num_samples=params.text_evaluate.mdm_samples,
                                            seed=params.seed)
    return bits_per_character(nats, scored_chars(meta, scored))


class ObjectiveTracker(Tracker):
    """The study's MLflow run as one objective's trainer sees it: its metrics logged as `<objective>.<name>`."""

    def __init__(self, tracker: Tracker, objective: str) -> None:
        self.tracker, self.prefix, self.run_id = tracker, f"{objective}.", tracker.run_id

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        self.tracker.log_metrics({self.prefix + name: value for name, value in metrics.items()}, step=step)

    def flush(self) -> None:
        self.tracker.flush()


class CurveTrainer(LMTrainer):
    """The text_pretrain trainer, stopping its clock at `points` evenly spaced steps to score the model.

    Scoring reads the weights only (its Monte Carlo draws come from their own seed), so the run trains exactly as
    text_pretrain trains it. `points` holds (step, training seconds so far, score) per point.
    """

    stage = "text_curve"

    def __init__(self, *args: Any, score: Callable[[TransformerLM], float], points: int, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.score, self.evaluate_at = score, set(evaluation_steps(self.total_steps, points))
        self.points: list[tuple[int, float, float]] = []
        self.train_seconds, self.clock = 0.0, time.perf_counter()

    def fit(self) -> FitResult:
        self.clock = time.perf_counter()
        return super().fit()

    def after_step(self, step: int) -> None:
        super().after_step(step)
        if step + 1 not in self.evaluate_at:
            return
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # the step's kernels belong to training time
        self.train_seconds += time.perf_counter() - self.clock
        self.points.append((step + 1, self.train_seconds, self.score(exported(self.model))))
        self.clock = time.perf_counter()


def train_and_score(params: TextParams, objective: str, windows: np.ndarray, val: np.ndarray,
                    tracker: Tracker, device: torch.device, data: Path) -> list[dict[str, Any]]:
    """Train `objective` once as text_pretrain does, for its curve epochs, scored at each point; one row per point.
    Its training metrics and its per-step validation figure go to `tracker` under `<objective>.`."""
    params, strategy = curve_params(params, objective), resolve_objective(objective)
    meta, seq_len = read_text_meta(data), params.text_model.seq_len
    model, trained, cfg = training_run(params, windows, meta["vocab_size"], objective)
    per_token = flops_per_token(n_layer=model.n_layer, d_model=model.embed.weight.shape[1], seq_len=seq_len,
                                mlp_active_params=round(model.active_mlp_params()))  # as auto_hparams_for counts
    with tempfile.TemporaryDirectory(prefix="text_curve-") as checkpoints:  # never resumed: the clock restarts
        trainer = CurveTrainer(trained, cfg, windows, objective=objective, mdm_eps=cfg.mdm_eps,
                               mtp_weight=cfg.mtp_weight, device=device, seed=params.seed,
                               checkpoint_dir=Path(checkpoints), tracker=ObjectiveTracker(tracker, objective),
                               fingerprint=f"text_curve-{objective}", points=params.text_curve.points,
                               score=lambda lm: validation_bpc(lm, strategy, val, meta, params))
        if dist.is_main():
            print(f"text_curve: {objective} for {cfg.epochs} epochs, {trainer.total_steps} steps of "
                  f"{cfg.batch_size * seq_len} tokens ({per_token:.3g} FLOPs per token), lr {trainer.lr:.2e}, "
                  f"scored at {len(trainer.evaluate_at)} steps, on {device}")
        trainer.fit()
    rows = []
    for step, seconds, bpc in trainer.points:
        tokens = step * cfg.batch_size * seq_len
        rows.append({"objective": objective, "step": step, "tokens": tokens, "seconds": round(seconds, 3),
                     "flops": per_token * tokens, "bpc": bpc})
        tracker.log_metrics({f"{objective}.{strategy.bpc_key}": bpc, f"{objective}.train_seconds": seconds},
                            step=step)
    return rows


def first_below(rows: list[dict[str, Any]], objective: str, ngram: float) -> dict[str, Any] | None:
    """The first point of `objective` that scores below the n-gram, or None."""
    return next((row for row in rows if row["objective"] == objective and row["bpc"] < ngram), None)


def summarise(rows: list[dict[str, Any]], ngram: float) -> dict[str, Any]:
    """The study's numbers: the n-gram's bpc; per objective its final and best figure (named by its `bpc_key`)
    and the seconds and FLOPs of its first point below the n-gram (None if none); the mdm / ar final ratio."""
    summary: dict[str, Any] = {"ngram_bpc": ngram}
    final = {}
    for objective, strategy in OBJECTIVES.items():
        scores = [row["bpc"] for row in rows if row["objective"] == objective]
        below, final[objective] = first_below(rows, objective, ngram), scores[-1]
        summary[objective] = {f"final_{strategy.bpc_key}": scores[-1], f"best_{strategy.bpc_key}": min(scores),
                              "crossover_seconds": None if below is None else below["seconds"],
                              "crossover_flops": None if below is None else below["flops"]}
    summary["mdm_over_ar_final_bpc"] = final["mdm"] / final["ar"]
    return summary


def curve_figure(rows: list[dict[str, Any]], ngram: float, ngram_label: str) -> Any:
    """Two panels, bpc against training seconds and against training FLOPs (log x): a line per objective, the
    n-gram dashed, a star on each model's first point below it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter

    figure, axes = plt.subplots(1, 2, figsize=(11.0, 4.2), sharey=True)
    for axis, (x, unit, label) in zip(axes, AXES, strict=True):
        for objective, strategy in OBJECTIVES.items():
            points = [row for row in rows if row["objective"] == objective]
            name = f"{objective} (upper bound)" if strategy.bpc_is_bound else objective
            (line,) = axis.plot([p[x] for p in points], [p["bpc"] for p in points], marker="o", markersize=3,
                                label=name)
            below = first_below(rows, objective, ngram)
            if below is not None:
                axis.plot([below[x]], [below["bpc"]], marker="*", markersize=14, color=line.get_color(),
                          linestyle="none", label=f"{objective} first below the n-gram: {below[x]:.3g} {unit}")
        axis.axhline(ngram, color="gray", linestyle="--", label=ngram_label)
        axis.set_xscale("log")
        axis.xaxis.set_minor_formatter(NullFormatter())  # minor labels crowd a span of under two decades
        axis.set_xlabel(label)
        axis.grid(alpha=0.3, which="both")
        axis.legend(loc="best", fontsize=8)
    axes[0].set_ylabel("validation bits per character")
    figure.tight_layout()
    return figure


def run_text_curve(params: TextParams, paths: CurvePaths, tracker: Tracker,
                   device: torch.device) -> dict[str, Any]:
    """Fit the n-gram, train and score each objective; write the CSV and the figure, and log them with the study's
    numbers to `tracker` (rank 0)."""
    import matplotlib.pyplot as plt

    started = time.perf_counter()
    windows = token_windows(read_tokens(paths.data, "train"), params.text_model.seq_len)
    val = validation_tokens(params, paths.data)
    ngram = ngram_bpc(params, paths.data, val)
    cfg = params.text_ngram
    if dist.is_main():
        print(f"text_curve: {len(windows)} training windows, {len(val)} validation tokens; {cfg.order}-gram "
              f"{cfg.method}: {ngram:.4f} bits per character")
    rows = []
    for objective in OBJECTIVES:
        rows += train_and_score(params, objective, windows, val, tracker, device, paths.data)
    if not dist.is_main():
        return {}
    rows = [{**row, "ngram_bpc": ngram} for row in rows]
    summary = summarise(rows, ngram)
    figure = curve_figure(rows, ngram, f"{cfg.order}-gram {cfg.method} {ngram:.3f}")
    with staged_dir(paths.plots) as out:
        write_csv(out / "curve.csv", rows, COLUMNS)
        figure.savefig(out / "curve.png", dpi=110)
    plt.close(figure)
    seconds = round(time.perf_counter() - started, 1)
    tracker.log_metrics({"ngram_bpc": ngram, "mdm_over_ar_final_bpc": summary["mdm_over_ar_final_bpc"],
                         "seconds": seconds, "val_tokens": len(val),
                         **{f"{objective}.{key}": value for objective in OBJECTIVES
                            for key, value in summary[objective].items() if value is not None}})
    tracker.log_artifact(paths.plots)
    tracker.flush()
    return {**summary, "points": len(rows), "seconds": seconds, "run_id": tracker.run_id}
