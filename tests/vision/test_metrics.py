"""Classification metrics against hand-computed values and naive definitions."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline_lib.vision.metrics import classification_metrics, expected_calibration_error, reliability_bins


def test_ece_by_hand() -> None:
    # confidences 0.9 (right), 0.9 (wrong), 0.6 (right), 0.6 (right) in 10 bins:
    # bin (0.8, 0.9]: conf 0.9, acc 0.5 -> |0.4| * 2/4; bin (0.5, 0.6]: conf 0.6, acc 1.0 -> |0.4| * 2/4
    probabilities = np.array([[0.9, 0.1], [0.9, 0.1], [0.4, 0.6], [0.6, 0.4]])
    labels = np.array([0, 1, 1, 0])
    assert expected_calibration_error(probabilities, labels, num_bins=10) == pytest.approx(0.4)
    confidence, accuracy, count = reliability_bins(probabilities, labels, num_bins=10)
    assert count.tolist() == [0, 0, 0, 0, 0, 2, 0, 0, 2, 0]
    assert confidence[8] == pytest.approx(0.9) and accuracy[8] == pytest.approx(0.5)


def test_perfectly_calibrated_one_hot_has_zero_ece() -> None:
    labels = np.array([0, 1, 2, 1])
    assert expected_calibration_error(np.eye(3)[labels], labels) == 0.0


def test_metrics_match_naive_definitions() -> None:
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(200, 7))
    probabilities = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    labels = rng.integers(0, 7, size=200)
    names = [f"c{i}" for i in range(7)]
    metrics = classification_metrics(probabilities, labels, names)
    predicted = probabilities.argmax(axis=1)
    assert metrics["top1"] == pytest.approx((predicted == labels).mean())
    top5 = np.argsort(-probabilities, axis=1)[:, :5]
    assert metrics["top5"] == pytest.approx(np.mean([label in row for label, row in zip(labels, top5, strict=True)]))
    assert metrics["nll"] == pytest.approx(-np.log(probabilities[np.arange(200), labels]).mean())
    for i, name in enumerate(names):
        assert metrics["per_class_accuracy"][name] == pytest.approx((predicted[labels == i] == i).mean())
    assert np.array(metrics["confusion_matrix"]).sum() == 200


def test_top5_only_with_more_than_five_classes() -> None:
    labels = np.array([0, 1])
    assert "top5" not in classification_metrics(np.eye(2)[labels], labels, ["a", "b"])


def test_shape_mismatch_is_named() -> None:
    with pytest.raises(ValueError, match=r"do not match 3 labels x 2 classes"):
        classification_metrics(np.ones((2, 2)) / 2, np.array([0, 1, 0]), ["a", "b"])
