"""The label-efficiency curve: test top-1 against the share of training images that carry labels.

For each label fraction, labeled sets are drawn from the training pool of the fetch stage's source as the fetch
stage draws them (`prepare.split_indices`, the top-level `seed`), so the test and rl splits are the pipeline's own
and the first draw of a fraction is the `labeled` split `data.label_fraction` would give. Further draws (repeats)
take the same number of images from the same pool (train minus rl), stratified, with their own generator. Each
labeled set trains, with the finetune stage's code and `finetune` params:

- `ssl`: the one pretrained encoder (models/pretrain) with a new head, finetuned;
- `scratch`: the same architecture from random weights, with the baseline's own recipe (`finetune.recipe`: the
  `finetune_scratch` keys over `finetune`), as the finetune_scratch stage trains it;

and fits the pixel baselines of the evaluate stage (`baselines.pixel_baselines`: logistic regression and an RBF
SVM with C and gamma chosen by CV on the labeled set, and LabelSpreading over the labeled set and the fetch stage's
`unlabeled` split, which no label fraction changes). All five are scored on the test split.

One change to the recipe, reported in every row (`batch_size`): where a labeled set is smaller than
`finetune.batch_size`, the batch is the whole set (the trainer needs one whole batch per epoch), and the lr
follows it by the recipe's own rule (base_lr * batch_size / 256). Epochs and everything else stay as declared.

Outputs (one folder, written aside and renamed into place): `curve.csv` (per fraction: mean, sample std, min and
max top-1 of each method over the draws; a DVC plot), `curve.png`, and `runs.csv` (one row per draw and method).
"""

from __future__ import annotations

import dataclasses
import tempfile
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from pipeline_lib.core.claims import paired_interval
from pipeline_lib.core.config import flatten
from pipeline_lib.core.errors import ConfigError, DataError
from pipeline_lib.core.outputs import staged_dir, write_csv
from pipeline_lib.core.tracking import Tracker, write_json_atomic
from pipeline_lib.vision.baselines import LABEL_SPREADING_MAX_ROWS, label_spreading_baseline, pixel_baselines
from pipeline_lib.vision.config import VisionParams
from pipeline_lib.vision.data.prepare import split_indices, stratified_pick
from pipeline_lib.vision.data.sources import RawDataset, load_source
from pipeline_lib.vision.data.store import pixel_mean_std
from pipeline_lib.vision.evaluate import predict_probabilities
from pipeline_lib.vision.finetune import FinetunePaths, FinetuneTrainer, build_classifier, check_encoder, recipe
from pipeline_lib.vision.models.factory import (
    CLASSIFIER_FILE,
    check_encoder_input,
    load_network,
    read_network_config,
    resolve_params,
    save_network,
)
from pipeline_lib.vision.models.preprocess import Preprocess
from pipeline_lib.vision.semi import SemiPaths, build_student, semi_trainer

DEFAULT_FRACTIONS = (0.01, 0.02, 0.05, 0.1, 0.25, 0.5)
# Draws per fraction when none are given, by labeled-set size: five where one draw says little, one from 100 images
# on, where draws cost most and differ least. On digits with the committed recipes the default curve trains 31,800
# steps, 13,200 of them for the 50% point (254 s of 2 cores: ssl 41 s, scratch with its 500 epochs 213 s).
# LabelSpreading's search adds 2 s (14 labeled images) to 9 s (719) a draw, ~50 s to the default curve.
REPEATS = ((50, 5), (100, 3))  # (fewer labeled images than this, draws)
METHODS = ("ssl", "semi", "scratch", "pixels_logreg", "pixels_svm", "pixels_label_spreading")
DATA_KEYS = ("source", "url", "sha256", "path", "image_size", "rl_fraction", "test_fraction", "max_images")


@dataclass(frozen=True)
class CurvePaths:
    """Where the curve reads and writes: the pretrained encoder, the download cache, the output folder, the JSON."""

    encoder: Path
    cache: Path
    plots: Path
    metrics: Path


@dataclass(frozen=True)
class Draw:
    """One labeled set: its fraction, its draw number (0: the fetch stage's own set) and its row indices."""

    fraction: float
    repeat: int
    rows: np.ndarray


def logged_params(params: VisionParams, fractions: Sequence[float], repeats: Sequence[int] | None) -> dict[str, Any]:
    """The flat params the curve uses, as MLflow logs them: data pool, model, finetune recipe, its own options."""
    return {
        "seed": params.seed,
        "device": params.device,
        **{f"data.{key}": getattr(params.data, key) for key in DATA_KEYS},
        **flatten(params.model, prefix="model."),
        **flatten(params.finetune, prefix="finetune."),
        **flatten(params.finetune_scratch, prefix="finetune_scratch."),
        **flatten(params.semi, prefix="semi."),
        "evaluate.baseline_folds": params.evaluate.baseline_folds,
        "curve.fractions": " ".join(f"{f:g}" for f in fractions),
        "curve.repeats": "auto" if repeats is None else " ".join(str(r) for r in repeats),
    }


def default_repeats(labeled_images: int) -> int:
    """Draws of a labeled set of this size when `--repeats` is not given (REPEATS; else one)."""
    return next((draws for below, draws in REPEATS if labeled_images < below), 1)


def check_options(fractions: Sequence[float], repeats: Sequence[int] | None, rl_fraction: float) -> None:
    """The curve's own options, before anything is read.

    Raises:
        ConfigError: naming the option and what it accepts.
    """
    if not fractions:
        raise ConfigError("--fractions: give at least one label fraction")
    top = 1.0 - rl_fraction
    for fraction in fractions:
        if not 0.0 < fraction <= top:
            raise ConfigError(f"--fractions {fraction:g}: must be in (0, {top:g}] (1 - data.rl_fraction: the labeled "
                              "sets are drawn from the training images the rl split leaves)")
    if len(set(fractions)) != len(fractions):
        raise ConfigError(f"--fractions {' '.join(f'{f:g}' for f in fractions)}: each fraction once")
    if repeats is not None:
        if len(repeats) not in (1, len(fractions)):
            raise ConfigError(f"--repeats {' '.join(map(str, repeats))}: give one count for every fraction or one per "
                              f"fraction ({len(fractions)})")
        if min(repeats) < 1:
            raise ConfigError(f"--repeats {' '.join(map(str, repeats))}: each count must be a positive integer")


def draw_sets(raw: RawDataset, params: VisionParams, fractions: Sequence[float],
              repeats: Sequence[int] | None) -> tuple[list[Draw], np.ndarray]:
    """Every labeled set of the curve and the test rows, drawn as the fetch stage draws its splits.

    Returns:
        the draws, fraction by fraction; the test split's rows (into `raw.test_images`, or into the training pool
        when the source has no test split).

    Raises:
        DataError: an unlabeled-only source, or a fraction that leaves fewer labeled images than classes.
    """
    if raw.train_labels is None:
        raise DataError(f"data.source {params.data.source!r}: the source has no labels, so there is no curve to draw")
    draws, test = [], None
    for index, fraction in enumerate(fractions):
        cfg = dataclasses.replace(params.data, label_fraction=fraction)
        split = split_indices(raw, cfg, params.seed)
        test = split["test"]
        labeled, pool = split["labeled"], np.setdiff1d(split["train"], split["rl"])
        classes = len(np.unique(raw.train_labels[split["train"]]))
        if len(labeled) < classes:
            raise DataError(f"--fractions {fraction:g}: {len(labeled)} labeled images of the {len(split['train'])} in "
                            f"the training pool, fewer than its {classes} classes; raise the fraction")
        count = default_repeats(len(labeled)) if repeats is None else repeats[index if len(repeats) > 1 else 0]
        draws.append(Draw(fraction, 0, labeled))
        for repeat in range(1, count):
            rng = np.random.default_rng([params.seed, repeat, index])
            draws.append(Draw(fraction, repeat, stratified_pick(raw.train_labels, pool, len(labeled), rng)[0]))
    return draws, test


def unlabeled_pool(raw: RawDataset, params: VisionParams) -> np.ndarray:
    """The images of the fetch stage's `unlabeled` split (every training image of the pool, then the source's extra
    unlabeled ones): what the semi line and LabelSpreading learn from besides the labeled set."""
    split = split_indices(raw, params.data, params.seed)  # the pool and extra rows come before any label fraction
    parts = [raw.train_images[split["train"]]]
    if raw.extra_unlabeled is not None and len(split["extra"]):
        parts.append(raw.extra_unlabeled[split["extra"]])
    return np.concatenate(parts)


def check_inputs(params: VisionParams, paths: CurvePaths, fractions: Sequence[float],
                 repeats: Sequence[int] | None, jobs: int = 1) -> None:
    """What the curve checks before its MLflow run: its options, the encoder against the `model` section, and
    that every fraction gives a usable labeled set (reading the source, which the fetch stage has cached).

    Raises:
        ConfigError, DataError, FileNotFoundError, ValueError: naming the option, key or file.
    """
    check_options(fractions, repeats, params.data.rl_fraction)
    if jobs < 1:
        raise ConfigError(f"--jobs {jobs}: must be a positive number of worker processes")
    raw = load_source(params.data, paths.cache)
    resolved, _ = check_encoder_input(params, data_img_size=raw.train_images.shape[1],
                                      origin=f"data.source {params.data.source!r}")
    check_encoder(read_network_config(paths.encoder), resolved.model, paths.encoder)
    draw_sets(raw, params, fractions, repeats)


def top1(model: nn.Module, preprocess: Preprocess, test: tuple[np.ndarray, np.ndarray], device: torch.device) -> float:
    probabilities = predict_probabilities(model, preprocess, test[0], device=device)
    return float((probabilities.argmax(axis=1) == test[1]).mean())


def finetune_top1(params: VisionParams, encoder: Path | None, images: np.ndarray, labels: np.ndarray,
                  test: tuple[np.ndarray, np.ndarray], *, img_size: int, num_classes: int,
                  device: torch.device) -> dict[str, Any]:
    """Train the finetune stage's classifier (from `encoder`, or from scratch when None) on one labeled set; its
    test top-1, the batch it used, its steps, and the classifier with its preprocessing (`model`, `preprocess`).
    `params.model` is the resolved spec (`resolve_params`) and `img_size` its input side."""
    params = recipe(params, encoder)
    cfg = params.finetune
    batch = min(cfg.batch_size, len(images) - len(images) % cfg.accumulation_steps)  # see the module docstring
    params = dataclasses.replace(params, finetune=dataclasses.replace(cfg, batch_size=batch))
    with tempfile.TemporaryDirectory() as scratch:
        paths = FinetunePaths(Path(scratch), encoder, Path(scratch), Path(), Path(), Path(scratch) / "checkpoints")
        model, preprocess = build_classifier(params, paths, in_chans=images.shape[-1], img_size=img_size,
                                             num_classes=num_classes, pixel_stats=pixel_mean_std(images))
        trainer = FinetuneTrainer(model, params.finetune, images, preprocess, labels=labels, num_classes=num_classes,
                                  device=device, seed=params.seed, checkpoint_dir=paths.checkpoints,
                                  tracker=Tracker(), fingerprint="label_curve")
        trainer.fit()
    return {"top1": top1(trainer.model, preprocess, test, device), "batch_size": batch, "steps": trainer.total_steps,
            "model": trainer.model, "preprocess": preprocess}


def semi_top1(params: VisionParams, encoder: Path, finetuned: nn.Module, preprocess: Preprocess,
              labeled: tuple[np.ndarray, np.ndarray], pool: np.ndarray, test: tuple[np.ndarray, np.ndarray], *,
              device: torch.device) -> dict[str, Any]:
    """The semi stage's training (`semi` params) after one labeled set's finetuning, as the stage does it: the
    finetuned classifier is saved and loaded back as student (or the encoder with a new head, `semi.init: encoder`)
    and teacher, and trains over the labeled set and the unlabeled `pool`. The labeled batch follows the finetune
    batch's rule. `params.model` is the resolved spec."""
    cfg = params.semi
    labeled_batch = min(cfg.labeled_batch_size, len(labeled[0]) - len(labeled[0]) % cfg.accumulation_steps)
    params = dataclasses.replace(params, semi=dataclasses.replace(cfg, labeled_batch_size=labeled_batch))
    with tempfile.TemporaryDirectory() as scratch:
        paths = SemiPaths(Path(scratch), encoder, Path(scratch) / "finetuned", Path(), Path(), Path(),
                          Path(scratch) / "checkpoints")
        save_network(finetuned, preprocess, params.model, paths.finetuned, in_chans=labeled[0].shape[-1],
                     weights=CLASSIFIER_FILE)
        student, student_preprocess = build_student(params, paths, finetuned.num_classes)
        trainer = semi_trainer(params.semi, student, student_preprocess, load_network(paths.finetuned)[0], labeled,
                               pool, device=device, seed=params.seed, checkpoint_dir=paths.checkpoints,
                               tracker=Tracker(), fingerprint="label_curve")
        trainer.fit()
    return {"top1": top1(trainer.model, student_preprocess, test, device), "batch_size": labeled_batch,
            "steps": trainer.total_steps}


@dataclass(frozen=True)
class DrawJob:
    """One labeled set's work, as a worker process receives it: the draw's images and labels, the test arrays, the
    unlabeled pool, and the threads the worker trains with."""

    params: VisionParams
    paths: CurvePaths
    draw: Draw
    images: np.ndarray
    labels: np.ndarray
    num_classes: int
    test: tuple[np.ndarray, np.ndarray]
    pool: np.ndarray
    device: str
    threads: int


def score_draw(job: DrawJob) -> list[dict[str, Any]]:
    """One row per method for one labeled set (no semi row with `semi.method` none, no LabelSpreading row with more
    images than it takes, LABEL_SPREADING_MAX_ROWS); the run's seed is the top-level seed plus the draw number."""
    torch.set_num_threads(job.threads)
    params, paths, draw, test, pool, device = job.params, job.paths, job.draw, job.test, job.pool, torch.device(
        job.device)
    images, labels = job.images, job.labels
    run_params, scaling = resolve_params(dataclasses.replace(params, seed=params.seed + draw.repeat),
                                         data_img_size=images.shape[1])
    common = {"label_fraction": draw.fraction, "labeled_images": len(draw.rows), "repeat": draw.repeat}
    rows, trained = [], {}
    for method, encoder in (("ssl", paths.encoder), ("scratch", None)):
        started = time.perf_counter()
        result = finetune_top1(run_params, encoder, images, labels, test, img_size=scaling.img_size,
                               num_classes=job.num_classes, device=device)
        trained[method] = (result.pop("model"), result.pop("preprocess"))
        rows.append({**common, "method": method, **result, "seconds": round(time.perf_counter() - started, 2)})
    if params.semi.method != "none":
        started = time.perf_counter()
        result = semi_top1(run_params, paths.encoder, *trained["ssl"], (images, labels), pool, test, device=device)
        rows.append({**common, "method": "semi", **result, "seconds": round(time.perf_counter() - started, 2)})
    started = time.perf_counter()
    baselines = pixel_baselines(images, labels, test[0], test[1], seed=run_params.seed,
                                folds=params.evaluate.baseline_folds)
    seconds = round((time.perf_counter() - started) / len(baselines), 2)
    rows += [{**common, "method": name, "top1": scores["top1"], "seconds": seconds}
             for name, scores in baselines.items()]
    started = time.perf_counter()  # as pixel_baselines(..., unlabeled_images=pool) fits it, timed on its own
    spreading = None if len(images) + len(pool) > LABEL_SPREADING_MAX_ROWS else label_spreading_baseline(
        images, labels, test[0], test[1], pool, seed=run_params.seed, folds=params.evaluate.baseline_folds)
    if spreading is not None:
        rows.append({**common, "method": "pixels_label_spreading", "top1": spreading["top1"],
                     "seconds": round(time.perf_counter() - started, 2)})
    return rows


def summarise(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per fraction: the draws' mean, sample std (empty for one draw), min and max top-1 of each method (all empty
    for a method with no rows: LabelSpreading over too many images)."""
    table = []
    for fraction in sorted({row["label_fraction"] for row in rows}):
        here = [row for row in rows if row["label_fraction"] == fraction]
        point: dict[str, Any] = {"label_fraction": fraction, "labeled_images": here[0]["labeled_images"],
                                 "repeats": len({row["repeat"] for row in here}),
                                 "batch_size": next(row["batch_size"] for row in here if row["method"] == "ssl")}
        for method in METHODS:
            scores = np.array([row["top1"] for row in here if row["method"] == method])
            if not len(scores):
                point.update({f"{method}{suffix}": None for suffix in ("", "_std", "_min", "_max")})
                continue
            point.update({method: scores.mean(), f"{method}_std": scores.std(ddof=1) if len(scores) > 1 else None,
                          f"{method}_min": scores.min(), f"{method}_max": scores.max()})
        for treatment, control in PAIRS:
            name = f"{treatment}_minus_{control}"
            point[name] = paired_difference(here, treatment, control)
            point.update({f"{name}_{key}": (point[name] or {}).get(key) for key in ("mean", "low", "high")})
        table.append(point)
    return table


# The claims the curve states per fraction: a treatment against its control on the same labeled draws.
PAIRS = (("ssl", "scratch"), ("semi", "ssl"), ("semi", "scratch"))


def paired_difference(rows: list[dict[str, Any]], treatment: str, control: str) -> dict[str, Any] | None:
    """`treatment` minus `control` top-1 over the draws both scored (`core.claims.paired_interval`), with the
    per-draw differences; None when they share no draw."""
    scores = {method: {row["repeat"]: row["top1"] for row in rows if row["method"] == method}
              for method in (treatment, control)}
    draws = sorted(set(scores[treatment]) & set(scores[control]))
    if not draws:
        return None
    differences = [scores[treatment][draw] - scores[control][draw] for draw in draws]
    return {**paired_interval(differences).as_dict(), "per_draw": differences}


def point_key(fraction: float) -> str:
    """The JSON key of a fraction's point: its percentage (`p10` for 0.1), a key without a dot."""
    return f"p{fraction * 100:g}".replace(".", "_")


def curve_document(table: list[dict[str, Any]], seconds: float, test_images: int) -> dict[str, Any]:
    """metrics/label_curve.json: per point (`point_key`) the means over the draws and the paired differences."""
    points = {}
    for point in table:
        means = {method: point[method] for method in METHODS}
        pairs = {f"{t}_minus_{c}": point[f"{t}_minus_{c}"] for t, c in PAIRS}
        points[point_key(point["label_fraction"])] = {
            "label_fraction": point["label_fraction"], "labeled_images": point["labeled_images"],
            "draws": point["repeats"], **means, **pairs}
    return {"points": points, "seconds": seconds, "test_images": test_images}


CURVE_COLUMNS = ["label_fraction", "labeled_images", "repeats", "batch_size",
                 *[f"{method}{suffix}" for method in METHODS for suffix in ("", "_std", "_min", "_max")],
                 *[f"{t}_minus_{c}_{key}" for t, c in PAIRS for key in ("mean", "low", "high")]]
RUN_COLUMNS = ["label_fraction", "labeled_images", "repeat", "method", "top1", "batch_size", "steps", "seconds"]


def curve_figure(table: list[dict[str, Any]], test_images: int) -> Any:
    """Mean top-1 of each method against the label fraction (log scale), the draws' min-max as a band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fractions = [point["label_fraction"] for point in table]
    figure, axis = plt.subplots(figsize=(6.4, 4.2))
    for method in METHODS:
        points = [point for point in table if point[method] is not None]  # LabelSpreading may skip a fraction
        if points:
            at = [point["label_fraction"] for point in points]
            axis.plot(at, [point[method] for point in points], marker="o", label=method)
            axis.fill_between(at, [point[f"{method}_min"] for point in points],
                              [point[f"{method}_max"] for point in points], alpha=0.15)
    axis.set_xscale("log")
    axis.set_xticks(fractions, [f"{f:g}\n({p['labeled_images']})" for f, p in zip(fractions, table, strict=True)])
    axis.minorticks_off()
    axis.set_xlabel("label fraction (labeled images)")
    axis.set_ylabel(f"test top-1 ({test_images} images)")
    axis.grid(alpha=0.3)
    axis.legend(loc="best")
    figure.tight_layout()
    return figure


def run_label_curve(params: VisionParams, paths: CurvePaths, tracker: Tracker, device: torch.device, *,
                    fractions: Sequence[float], repeats: Sequence[int] | None, jobs: int = 1) -> dict[str, Any]:
    """Draw, train and score every labeled set, `jobs` at a time in worker processes that share this process's
    threads (each with threads // jobs: a draw's figures depend on that count, not on the order); write the CSVs,
    the JSON and the figure, and log them with the curve's metrics (each method's mean and std top-1 with the
    labeled-image count as the step) to `tracker`."""
    import matplotlib.pyplot as plt

    started = time.perf_counter()
    raw = load_source(params.data, paths.cache)
    draws, test_rows = draw_sets(raw, params, fractions, repeats)
    test_source = raw.train_images if raw.test_images is None else raw.test_images
    test_labels = raw.train_labels if raw.test_labels is None else raw.test_labels
    test = (np.ascontiguousarray(test_source[test_rows]), np.asarray(test_labels)[test_rows])
    print(f"label_curve: {len(draws)} labeled sets over fractions {' '.join(f'{f:g}' for f in fractions)}, "
          f"{len(test_rows)} test images, {jobs} at a time, on {device}")
    pool = unlabeled_pool(raw, params)
    threads = max(1, torch.get_num_threads() // jobs)  # this process's threads, shared by the workers
    largest_first = sorted(draws, key=lambda draw: -len(draw.rows))  # the longest runs first: no idle worker at the end
    work = [DrawJob(params, paths, draw, np.ascontiguousarray(raw.train_images[draw.rows]),
                    np.asarray(raw.train_labels)[draw.rows], len(raw.class_names), test, pool, str(device), threads)
            for draw in largest_first]
    rows = []
    with ProcessPoolExecutor(jobs, mp_context=get_context("spawn")) if jobs > 1 else nullcontext() as workers:
        results = map(score_draw, work) if workers is None else workers.map(score_draw, work)
        for draw, scored in zip(largest_first, results, strict=True):
            rows += scored
            scores = ", ".join(f"{row['method']} {row['top1']:.4f}" for row in scored)
            print(f"label_curve: fraction {draw.fraction:g} ({len(draw.rows)} images) draw {draw.repeat}: {scores}",
                  flush=True)
    rows.sort(key=lambda row: (row["label_fraction"], row["repeat"], METHODS.index(row["method"])))
    table = summarise(rows)
    figure = curve_figure(table, len(test_rows))
    with staged_dir(paths.plots) as out:
        write_csv(out / "curve.csv", table, CURVE_COLUMNS)
        write_csv(out / "runs.csv", rows, RUN_COLUMNS)
        figure.savefig(out / "curve.png", dpi=110)
    plt.close(figure)
    seconds = round(time.perf_counter() - started, 1)
    write_json_atomic(paths.metrics, curve_document(table, seconds, len(test_rows)))
    for point in table:
        tracker.log_metrics({"draws": point["repeats"], **{
            f"{method}.top1{suffix}": point[f"{method}{suffix}"] for method in METHODS for suffix in ("", "_std")
            if point[f"{method}{suffix}"] is not None}}, step=point["labeled_images"])
    tracker.log_metrics({"seconds": seconds, "test_images": len(test_rows)})
    tracker.log_artifact(paths.plots)
    tracker.log_artifact(paths.metrics)
    tracker.flush()
    return {"table": table, "seconds": seconds, "draws": len(draws), "run_id": tracker.run_id}
