"""The logistic-regression probe on frozen features."""

from __future__ import annotations

import numpy as np

from pipeline_lib.vision.probe import linear_probe_accuracy


def _clusters(rng: np.random.Generator, centres: np.ndarray, count: int) -> tuple[np.ndarray, np.ndarray]:
    labels = np.arange(count) % len(centres)
    return centres[labels] + rng.normal(size=(count, centres.shape[1])), labels


def test_separable_features_are_probed_perfectly() -> None:
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(4, 16)) * 10
    assert linear_probe_accuracy(_clusters(rng, centres, 80), _clusters(rng, centres, 40)) == 1.0


def test_features_without_class_information_stay_near_chance() -> None:
    rng = np.random.default_rng(0)
    train = (rng.normal(size=(200, 16)), rng.integers(0, 10, size=200))
    test = (rng.normal(size=(500, 16)), rng.integers(0, 10, size=500))
    assert linear_probe_accuracy(train, test) < 0.2
