"""The evaluate stage: test-split metrics of the SSL-finetuned classifier, of the from-scratch baseline and of the
semi stage's classifier (left out when `semi.method` is none),
frozen-encoder probes, pixel baselines (logistic regression and an RBF SVM on raw pixels, fitted on `labeled`;
LabelSpreading over `labeled` and `unlabeled`), and the label-efficiency summary (what pretraining is worth at this
many labels, over each baseline).

Every number is computed on the `test` split, which no training stage reads. Metrics go to one JSON for
`dvc metrics`, to the evaluate run in MLflow, and back onto each finetune run (as `test.*` metrics with its
confusion matrix and reliability diagram), so the MLflow UI compares finetune runs by their test results.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from pipeline_lib.core.errors import DataError
from pipeline_lib.core.outputs import staged_dir
from pipeline_lib.core.registry import annotate
from pipeline_lib.core.tracking import Tracker, read_run_record, write_json_atomic
from pipeline_lib.vision.baselines import pixel_baselines
from pipeline_lib.vision.config import VisionParams
from pipeline_lib.vision.data.store import Split, read_split
from pipeline_lib.vision.knn import embed, knn_scores
from pipeline_lib.vision.metrics import classification_metrics, reliability_bins
from pipeline_lib.vision.models.factory import load_network
from pipeline_lib.vision.probe import linear_probe_accuracy

HEADLINE = "ssl"  # the classifier the pipeline ships: finetuned from the pretrained encoder
BASELINE = "scratch"  # the same architecture, labels and budget from random weights
SEMI = "semi"  # the finetuned classifier trained further with the unlabeled images (absent with semi.method none)


@dataclass
class EvaluatePaths:
    """Where the evaluate stage reads and writes (all from dvc.yaml).

    `classifiers` maps a short name to a finetuned classifier folder: "ssl" (finetuned from the pretrained
    encoder), "scratch" (the same recipe from random weights) and "semi" (the semi stage's; skipped when its config
    says `semi: none`).
    """

    data: Path
    encoder: Path
    classifiers: dict[str, Path]
    metrics: Path
    plots: Path


@torch.no_grad()
def predict_probabilities(network: nn.Module, preprocess: nn.Module, images: np.ndarray, *, device: torch.device,
                          batch_size: int = 512) -> np.ndarray:
    """Softmax probabilities (N, classes), float64, of a classifier on uint8 N x H x W x C images."""
    network, preprocess = network.to(device).eval(), preprocess.to(device)
    rows = []
    for start in range(0, len(images), batch_size):
        pixels = torch.from_numpy(np.array(images[start : start + batch_size])).to(device)
        rows.append(torch.softmax(network(preprocess(pixels)).float(), dim=1).double().cpu())
    return torch.cat(rows).numpy()


def encoder_probes(params: VisionParams, encoder_dir: Path, labeled: Split, test: Split, device: torch.device,
                   num_classes: int) -> dict[str, float]:
    """kNN (cosine, temperature-weighted votes) and a logistic-regression probe on the frozen encoder's
    features, both fitted on the labeled split and scored on test."""
    cfg = params.evaluate
    encoder, preprocess, _ = load_network(encoder_dir)
    encoder, preprocess = encoder.to(device), preprocess.to(device)
    bank = embed(encoder, labeled.images, preprocess, device=device)
    queries = embed(encoder, test.images, preprocess, device=device)
    votes = knn_scores(bank, torch.as_tensor(np.asarray(labeled.labels)), queries, num_classes=num_classes,
                       k=cfg.knn_k, temperature=cfg.knn_temperature)
    return {
        "knn_top1": float((votes.argmax(dim=1).numpy() == test.labels).mean()),
        "linear_probe_top1": linear_probe_accuracy((bank.numpy(), labeled.labels), (queries.numpy(), test.labels),
                                                   c=cfg.probe_c),
    }


def run_evaluate(params: VisionParams, paths: EvaluatePaths, tracker: Tracker, device: torch.device) -> dict[str, Any]:
    """Score every classifier and the encoder on test; write metrics, plots, and log them to MLflow."""
    labeled, test = read_split(paths.data, "labeled"), read_split(paths.data, "test")
    if test.labels is None or labeled.labels is None:
        raise DataError(f"{paths.data}: the labeled and test splits need labels.npy to evaluate")
    baselines = pixel_baselines(labeled.images, labeled.labels, test.images, test.labels, seed=params.seed,
                                folds=params.evaluate.baseline_folds,
                                unlabeled_images=read_split(paths.data, "unlabeled").images)
    class_names = list(test.meta["class_names"])
    bins = params.evaluate.calibration_bins
    probabilities, results = {}, {}
    for name, folder in paths.classifiers.items():
        network, preprocess, config = load_network(folder)
        if config.get("semi") == "none":  # the semi stage switched off: the finetuned classifier again
            continue
        if config.get("num_classes") != len(class_names):
            raise ValueError(f"{folder} predicts {config.get('num_classes')} classes; the test split has "
                             f"{len(class_names)}: rerun finetuning on this data (dvc repro)")
        probabilities[name] = predict_probabilities(network, preprocess, test.images, device=device)
        results[name] = classification_metrics(probabilities[name], test.labels, class_names, num_bins=bins)
    summary: dict[str, Any] = {name: _scalars(metrics) for name, metrics in results.items()}
    if HEADLINE in results and BASELINE in results:  # the label-efficiency summary: what pretraining is worth
        summary["gain"] = {key: summary[HEADLINE][key] - summary[BASELINE][key] for key in ("top1", "macro_f1")}
    if HEADLINE in results:  # and over the pixel baselines, in top-1
        summary.setdefault("gain", {}).update({f"{HEADLINE}_vs_{name}": summary[HEADLINE]["top1"] - scores["top1"]
                                               for name, scores in baselines.items()})
    if SEMI in results and HEADLINE in results:  # what the unlabeled images add at finetune time
        for reference in (HEADLINE, BASELINE):
            if reference in results:
                summary["gain"][f"{SEMI}_vs_{reference}"] = summary[SEMI]["top1"] - summary[reference]["top1"]
        summary["gain"].update({f"{SEMI}_vs_{name}": summary[SEMI]["top1"] - scores["top1"]
                                for name, scores in baselines.items()})
    summary["baselines"] = baselines
    summary["encoder"] = encoder_probes(params, paths.encoder, labeled, test, device, len(class_names))
    summary["labels"] = {"labeled_images": len(labeled), "label_fraction": labeled.meta.get("label_fraction"),
                         "test_images": len(test)}
    figures = write_plots(paths.plots, results, probabilities, test.labels, class_names, bins)
    log_results(tracker, paths, summary, figures, results)
    write_json_atomic(paths.metrics, summary)
    return summary


def _scalars(metrics: dict[str, Any]) -> dict[str, Any]:
    """What goes into the metrics JSON: every scalar and the per-class accuracies, not the confusion matrix."""
    return {key: value for key, value in metrics.items() if key != "confusion_matrix"}


def write_plots(folder: Path, results: dict[str, dict[str, Any]], probabilities: dict[str, np.ndarray],
                labels: np.ndarray, class_names: list[str], bins: int) -> dict[str, Any]:
    """confusion.csv (the headline model's predictions, for DVC's confusion template), confusion.png and
    reliability.png (every model); returns the figures by artifact name, per model too."""
    from pipeline_lib.core.outputs import write_csv
    from pipeline_lib.vision.plots import confusion_figure, reliability_figure

    curves = {name: reliability_bins(p, labels, num_bins=bins) for name, p in probabilities.items()}
    ece = {name: results[name]["ece"] for name in results}
    figures = {
        "confusion.png": confusion_figure({n: np.array(r["confusion_matrix"]) for n, r in results.items()},
                                          class_names),
        "reliability.png": reliability_figure(curves, ece),
    }
    for name in results:
        figures[f"{name}/confusion.png"] = confusion_figure({name: np.array(results[name]["confusion_matrix"])},
                                                            class_names)
        figures[f"{name}/reliability.png"] = reliability_figure({name: curves[name]}, {name: ece[name]})
    headline = HEADLINE if HEADLINE in probabilities else next(iter(probabilities))
    predicted = probabilities[headline].argmax(axis=1)
    rows = [{"actual": class_names[a], "predicted": class_names[p]} for a, p in zip(labels, predicted, strict=True)]
    with staged_dir(folder) as staging:
        write_csv(staging / "confusion.csv", rows, ["actual", "predicted"])
        for artifact in ("confusion.png", "reliability.png"):
            figures[artifact].savefig(staging / artifact, dpi=110)
    return figures


def log_results(tracker: Tracker, paths: EvaluatePaths, summary: dict[str, Any], figures: dict[str, Any],
                results: dict[str, dict[str, Any]]) -> None:
    """The evaluate run gets everything; each finetune run gets its own test metrics and pictures."""
    import matplotlib.pyplot as plt

    tracker.log_metrics(_flat(summary))
    for artifact, figure in figures.items():
        if "/" not in artifact:
            tracker.log_figure(figure, artifact)
    tracker.log_artifact(paths.plots / "confusion.csv")
    tracker.flush()
    if tracker.run_id is not None:
        test_images = summary["labels"]["test_images"]
        for name in results:
            folder, metrics = paths.classifiers[name], summary[name]
            headline = (f"test top-1 {metrics['top1']:.4f}, macro-F1 {metrics['macro_f1']:.4f}, ECE "
                        f"{metrics['ece']:.4f} on {test_images} test images (evaluate stage)")
            annotate(read_run_record(folder), {f"test.{k}": v for k, v in _flat(_scalars(results[name])).items()},
                     headline=headline, figures={f"test/{artifact.split('/', 1)[1]}": figure
                                                 for artifact, figure in figures.items()
                                                 if artifact.startswith(f"{name}/")})
        probes = summary["encoder"]
        annotate(read_run_record(paths.encoder), {f"test.{k}": v for k, v in probes.items()},
                 headline=f"linear probe top-1 {probes['linear_probe_top1']:.4f}, kNN top-1 {probes['knn_top1']:.4f} "
                          f"on {test_images} test images, fitted on {summary['labels']['labeled_images']} labeled "
                          "images (evaluate stage)")
    for figure in figures.values():
        plt.close(figure)


def _flat(document: dict[str, Any], prefix: str = "") -> dict[str, float]:
    """Nested numbers as dotted keys (`ssl.top1`, `ssl.per_class_accuracy.3`), as MLflow's UI lines them up."""
    flat: dict[str, float] = {}
    for key, value in document.items():
        if isinstance(value, dict):
            flat.update(_flat(value, f"{prefix}{key}."))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            flat[f"{prefix}{key}"] = float(value)
    return flat
