"""Classification metrics from predicted class probabilities, with scikit-learn where it has them.

Calibration follows Guo et al. 2017 ("On Calibration of Modern Neural Networks"): confidence is the top
probability, bins are equal-width on [0, 1], and ECE = sum_b (n_b / N) |accuracy_b - confidence_b|.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from sklearn.metrics import accuracy_score, confusion_matrix, f1_score, log_loss, top_k_accuracy_score


def reliability_bins(
    probabilities: np.ndarray, labels: np.ndarray, *, num_bins: int = 15
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(N, C) probabilities, (N,) labels -> per-bin mean confidence, accuracy and count, each (num_bins,).

    Bin b holds confidences in (b/num_bins, (b+1)/num_bins]; empty bins report 0 confidence and accuracy.
    """
    confidence = probabilities.max(axis=1)
    correct = (probabilities.argmax(axis=1) == labels).astype(np.float64)
    index = np.clip(np.ceil(confidence * num_bins).astype(int) - 1, 0, num_bins - 1)
    count = np.bincount(index, minlength=num_bins).astype(np.float64)
    safe = np.maximum(count, 1)
    mean_confidence = np.bincount(index, weights=confidence, minlength=num_bins) / safe
    accuracy = np.bincount(index, weights=correct, minlength=num_bins) / safe
    return mean_confidence, accuracy, count


def expected_calibration_error(probabilities: np.ndarray, labels: np.ndarray, *, num_bins: int = 15) -> float:
    """ECE over `num_bins` equal-width confidence bins."""
    confidence, accuracy, count = reliability_bins(probabilities, labels, num_bins=num_bins)
    return float(np.sum(count / count.sum() * np.abs(accuracy - confidence)))


def classification_metrics(
    probabilities: np.ndarray, labels: np.ndarray, class_names: Sequence[str], *, num_bins: int = 15
) -> dict[str, Any]:
    """Top-1, top-5 (more than 5 classes), macro-F1, per-class accuracy, NLL, ECE and the confusion matrix.

    Args:
        probabilities: (N, C) rows summing to 1.
        labels: (N,) true class ids in [0, C).
        class_names: one name per class, for the per-class keys.
        num_bins: confidence bins for ECE.
    """
    classes = np.arange(len(class_names))
    if probabilities.shape != (len(labels), len(classes)):
        expected = f"{len(labels)} labels x {len(classes)} classes"
        raise ValueError(f"probabilities {probabilities.shape} do not match {expected}")
    probabilities = np.asarray(probabilities, dtype=np.float64)
    predicted = probabilities.argmax(axis=1)
    matrix = confusion_matrix(labels, predicted, labels=classes)
    per_class = np.diag(matrix) / np.maximum(matrix.sum(axis=1), 1)
    metrics: dict[str, Any] = {
        "top1": float(accuracy_score(labels, predicted)),
        "macro_f1": float(f1_score(labels, predicted, labels=classes, average="macro", zero_division=0)),
        "nll": float(log_loss(labels, probabilities / probabilities.sum(axis=1, keepdims=True), labels=classes)),
        "ece": expected_calibration_error(probabilities, labels, num_bins=num_bins),
        "per_class_accuracy": {name: float(value) for name, value in zip(class_names, per_class, strict=True)},
        "confusion_matrix": matrix.tolist(),
    }
    if len(classes) > 5:
        metrics["top5"] = float(top_k_accuracy_score(labels, probabilities, k=5, labels=classes))
    return metrics
