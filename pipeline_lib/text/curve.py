"""The text track's compute curve: where, if anywhere, a transformer overtakes the n-gram.

Validation bits per character of the `ar` and `mdm` transformers against training time and against training
FLOPs, with the Kneser-Ney n-gram's as a horizontal line; with `text_curve.mdm_ar_epochs`, a third line: `mdm`
adapted from the curve's trained `ar` model (`text_pretrain.mdm_init: ar`), whose seconds and FLOPs continue from
the AR run's. Run it with

    dvc repro studies/dvc.yaml:text_curve

(a study: the default `dvc repro` never runs it; it brings `data/text/prepared` up to date first), or by hand with
`python -m stages.text_curve --params params.yaml --data data/text/prepared --plots plots/text_curve`. At the
default params it trains 1,680 ar and 3,360 mdm steps and scores 24 points, about 5 minutes on 2 cores.

Each line (`curve_lines`: `ar`, `mdm` from fresh weights, `mdm_from_ar`) trains once, with the text_pretrain
stage's code and keys (`pretrain_model`, `adapt_from_ar`, `training_setup`, `LMTrainer`: the same seed, initial
weights and batches) for its own epochs, `text_curve.ar_epochs`, `mdm_epochs` or `mdm_ar_epochs` in place of
`text_pretrain.epochs`, and is scored on validation at `text_curve.points` evenly spaced steps of that one run
(the last is its final step). The points are a training curve, not a compute frontier:
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

Outputs (one folder, written aside and renamed into place): `curve.csv` (one row per point: model (the line),
objective, step, tokens, seconds, flops, bpc, ngram_bpc; a DVC plot) and `curve.png` (bpc against seconds and
against FLOPs, log x, the n-gram dashed, a star where a model first scores below it). The MLflow run gets both,
each line's training metrics and its validation figure per step (`ar.loss`, `ar.bpc`, `mdm.bpc_bound`,
`mdm_from_ar.bpc_bound`, ...) and the study's numbers: `ngram_bpc`, per line its final and best figure and, when it
goes below the n-gram, the `crossover_seconds` and `crossover_flops` of its first point below, and each masked
line's final figure over ar's (`mdm_over_ar_final_bpc`, `mdm_from_ar_over_ar_final_bpc`).
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
from torch import Tensor, nn

from pipeline_lib.core import dist
from pipeline_lib.core.config import flatten
from pipeline_lib.core.errors import ConfigError
from pipeline_lib.core.outputs import staged_dir, write_csv
from pipeline_lib.core.tracking import Tracker
from pipeline_lib.core.trainer import FitResult, check_batch_size
from pipeline_lib.text.config import TextParams, TextPretrainParams
from pipeline_lib.text.data.corpus import read_text_meta, read_tokens
from pipeline_lib.text.hparams import flops_per_token
from pipeline_lib.text.models.objectives import Objective, resolve_objective
from pipeline_lib.text.models.saved import exported
from pipeline_lib.text.models.transformer import TransformerLM
from pipeline_lib.text.ngram import NGramLM, bits_per_character
from pipeline_lib.text.pretrain import (
    LMTrainer,
    adapt_from_ar,
    adapts_from_ar,
    pretrain_model,
    token_windows,
    training_setup,
    window_count,
)

COLUMNS = ["model", "objective", "step", "tokens", "seconds", "flops", "bpc", "ngram_bpc"]
AXES = (("seconds", "s", "training seconds (evaluations excluded)"),  # (column, unit, axis label)
        ("flops", "FLOPs", "training FLOPs (6N + attention, hparams.flops_per_token)"))


@dataclass(frozen=True)
class Line:
    """One line of the curve: a model trained once, `objective` from fresh weights or (`init` "ar") from the curve's
    trained ar model, for `epochs`."""

    name: str
    objective: str
    init: str
    epochs: int

    @property
    def key(self) -> str:
        """The text_curve key of its epochs."""
        return {"ar": "ar_epochs", "mdm": "mdm_epochs", "mdm_from_ar": "mdm_ar_epochs"}[self.name]


def curve_lines(params: TextParams) -> list[Line]:
    """`ar`, `mdm` from fresh weights and, with `text_curve.mdm_ar_epochs`, `mdm_from_ar`, in training order."""
    cfg = params.text_curve
    lines = [Line("ar", "ar", "scratch", cfg.ar_epochs), Line("mdm", "mdm", "scratch", cfg.mdm_epochs)]
    if cfg.mdm_ar_epochs is not None:
        lines.append(Line("mdm_from_ar", "mdm", "ar", cfg.mdm_ar_epochs))
    return lines


@dataclass(frozen=True)
class CurvePaths:
    """Where the curve reads and writes: the text_fetch stage's prepared text, the output folder."""

    data: Path
    plots: Path


def logged_params(params: TextParams) -> dict[str, Any]:
    """The flat params the curve uses, as MLflow logs them: the model, the pretraining recipe but its epochs and mdm
    init (each line's own), the n-gram, the mdm bound's draws and the curve's options."""
    return {
        "seed": params.seed,
        "device": params.device,
        **flatten(params.text_model, "text_model."),
        **{key: value for key, value in flatten(params.text_pretrain, "text_pretrain.").items()
           if key not in {"text_pretrain.epochs", "text_pretrain.mdm_epochs", "text_pretrain.mdm_init"}},
        **flatten(params.text_ngram, "text_ngram."),
        "text_evaluate.mdm_samples": params.text_evaluate.mdm_samples,
        **flatten(params.text_curve, "text_curve."),
    }


def curve_params(params: TextParams, line: Line) -> TextParams:
    """The params `line` trains with: text_pretrain's, for the line's epochs and with its init.

    Raises:
        ConfigError: naming the text_curve key, when the text_pretrain keys refuse its epochs.
    """
    try:
        pretrain = dataclasses.replace(params.text_pretrain, epochs=line.epochs, mdm_epochs=None,
                                       mdm_init=line.init if line.objective == "mdm" else "scratch")
    except ConfigError as err:
        raise ConfigError(f"text_curve.{line.key}={line.epochs}: the text_pretrain keys refuse it as their epochs "
                          f"({err})") from None
    return dataclasses.replace(params, text_pretrain=pretrain)


def training_run(params: TextParams, windows: np.ndarray, vocab_size: int, objective: str,
                 ar_weights: Mapping[str, Tensor] | None = None) -> tuple[TransformerLM, nn.Module, TextPretrainParams]:
    """What text_pretrain trains for `params`: the language model (its initial weights from the seed, then the AR
    weights it adapts when `mdm_init: ar`), the module the trainer steps (with multi-token prediction for `ar` when
    asked) and the section it trains with."""
    torch.manual_seed(params.seed)  # the text_pretrain stage's initial weights
    model = pretrain_model(vocab_size, params, objective)
    if adapts_from_ar(params, objective) and ar_weights is not None:
        adapt_from_ar(model, ar_weights)
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
    for line in curve_lines(params):
        run_params = curve_params(params, line)
        if run_params.text_pretrain.hparams == "manual":
            check_batch_size(run_params.text_pretrain, len(windows),
                             "training windows of text_model.seq_len + 1 tokens")
        _, _, train = training_run(run_params, windows, meta["vocab_size"], line.objective)
        steps = train.epochs * (len(windows) // train.batch_size)  # as the base trainer counts them
        if cfg.points > steps:
            raise ConfigError(f"text_curve.points={cfg.points}: {line.name} trains {steps} steps "
                              f"(text_curve.{line.key}={train.epochs} of {len(windows) // train.batch_size}) and is "
                              f"scored at most once a step (accepted: at most {steps})")


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


class LineTracker(Tracker):
    """The study's MLflow run as one line's trainer sees it: its metrics logged as `<line>.<name>`."""

    def __init__(self, tracker: Tracker, line: str) -> None:
        self.tracker, self.prefix, self.run_id = tracker, f"{line}.", tracker.run_id

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


@dataclass
class LineResult:
    """What one line's run gives: its rows, and the final weights, seconds and FLOPs (where `mdm_from_ar` starts)."""

    rows: list[dict[str, Any]]
    weights: dict[str, Tensor]
    seconds: float
    flops: float


def train_and_score(params: TextParams, line: Line, windows: np.ndarray, val: np.ndarray, tracker: Tracker,
                    device: torch.device, data: Path, start: LineResult | None = None) -> LineResult:
    """Train `line` once as text_pretrain does, for its curve epochs, scored at each point; one row per point. Its
    training metrics and its per-step validation figure go to `tracker` under `<line>.`. A line adapted from `ar`
    starts from `start` (the ar line's result): its weights, and its seconds and FLOPs as the rows' origin."""
    params, strategy = curve_params(params, line), resolve_objective(line.objective)
    meta, seq_len = read_text_meta(data), params.text_model.seq_len
    model, trained, cfg = training_run(params, windows, meta["vocab_size"], line.objective,
                                       None if start is None else start.weights)
    per_token = flops_per_token(n_layer=model.n_layer, d_model=model.embed.weight.shape[1], seq_len=seq_len,
                                mlp_active_params=round(model.active_mlp_params()))  # as auto_hparams_for counts
    offset_seconds, offset_flops = (0.0, 0.0) if start is None else (start.seconds, start.flops)
    with tempfile.TemporaryDirectory(prefix="text_curve-") as checkpoints:  # never resumed: the clock restarts
        trainer = CurveTrainer(trained, cfg, windows, objective=line.objective, mdm_eps=cfg.mdm_eps,
                               mtp_weight=cfg.mtp_weight,
                               anneal_epochs=cfg.mdm_anneal_epochs if line.init == "ar" else 0.0, device=device,
                               seed=params.seed, checkpoint_dir=Path(checkpoints),
                               tracker=LineTracker(tracker, line.name), fingerprint=f"text_curve-{line.name}",
                               points=params.text_curve.points,
                               score=lambda lm: validation_bpc(lm, strategy, val, meta, params))
        if dist.is_main():
            origin = ("" if start is None else
                      f", from the ar line's model ({offset_seconds:.1f} s, {offset_flops:.3g} FLOPs)")
            print(f"text_curve: {line.name} for {cfg.epochs} epochs, {trainer.total_steps} steps of "
                  f"{cfg.batch_size * seq_len} tokens ({per_token:.3g} FLOPs per token), lr {trainer.lr:.2e}, "
                  f"scored at {len(trainer.evaluate_at)} steps, on {device}{origin}")
        trainer.fit()
    rows = []
    for step, seconds, bpc in trainer.points:
        tokens = step * cfg.batch_size * seq_len
        rows.append({"model": line.name, "objective": line.objective, "step": step, "tokens": tokens,
                     "seconds": round(offset_seconds + seconds, 3), "flops": offset_flops + per_token * tokens,
                     "bpc": bpc})
        tracker.log_metrics({f"{line.name}.{strategy.bpc_key}": bpc, f"{line.name}.train_seconds": seconds},
                            step=step)
    weights = {name: value.detach().cpu().clone() for name, value in exported(trainer.model).state_dict().items()}
    return LineResult(rows, weights, offset_seconds + trainer.train_seconds, rows[-1]["flops"])


def first_below(rows: list[dict[str, Any]], name: str, ngram: float) -> dict[str, Any] | None:
    """The first point of the line `name` that scores below the n-gram, or None."""
    return next((row for row in rows if row["model"] == name and row["bpc"] < ngram), None)


def summarise(rows: list[dict[str, Any]], ngram: float) -> dict[str, Any]:
    """The study's numbers: the n-gram's bpc; per line its final and best figure (named by its objective's
    `bpc_key`) and the seconds and FLOPs of its first point below the n-gram (None if none); each masked line's
    final figure over ar's (`<line>_over_ar_final_bpc`)."""
    summary: dict[str, Any] = {"ngram_bpc": ngram}
    final = {}
    for name in dict.fromkeys(row["model"] for row in rows):
        scores = [row["bpc"] for row in rows if row["model"] == name]
        key = resolve_objective(next(row["objective"] for row in rows if row["model"] == name)).bpc_key
        below, final[name] = first_below(rows, name, ngram), scores[-1]
        summary[name] = {f"final_{key}": scores[-1], f"best_{key}": min(scores),
                         "crossover_seconds": None if below is None else below["seconds"],
                         "crossover_flops": None if below is None else below["flops"]}
    for name in final:
        if name != "ar" and "ar" in final:
            summary[f"{name}_over_ar_final_bpc"] = final[name] / final["ar"]
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
        for name in dict.fromkeys(row["model"] for row in rows):
            points = [row for row in rows if row["model"] == name]
            bound = resolve_objective(points[0]["objective"]).bpc_is_bound
            (line,) = axis.plot([p[x] for p in points], [p["bpc"] for p in points], marker="o", markersize=3,
                                label=f"{name} (upper bound)" if bound else name)
            below = first_below(rows, name, ngram)
            if below is not None:
                axis.plot([below[x]], [below["bpc"]], marker="*", markersize=14, color=line.get_color(),
                          linestyle="none", label=f"{name} first below the n-gram: {below[x]:.3g} {unit}")
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
    rows, results = [], {}
    for line in curve_lines(params):
        start = results["ar"] if line.init == "ar" else None
        results[line.name] = train_and_score(params, line, windows, val, tracker, device, paths.data, start)
        rows += results[line.name].rows
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
    tracker.log_metrics({"seconds": seconds, "val_tokens": len(val),
                         **{key: value for key, value in summary.items() if not isinstance(value, dict)},
                         **{f"{name}.{key}": value for name, numbers in summary.items() if isinstance(numbers, dict)
                            for key, value in numbers.items() if value is not None}})
    tracker.log_artifact(paths.plots)
    tracker.flush()
    return {**summary, "points": len(rows), "seconds": seconds, "run_id": tracker.run_id}
