"""Linear probe of frozen features: multinomial logistic regression (scikit-learn) on standardised features.

The standard measure of how linearly separable a pretrained representation is (MAE and SimCLR report it),
here fitted exactly by L-BFGS instead of with SGD, so it is fast and deterministic on small labeled splits.
"""

from __future__ import annotations

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler


def linear_probe_accuracy(
    train: tuple[np.ndarray, np.ndarray], test: tuple[np.ndarray, np.ndarray], *, c: float = 1.0,
    max_iter: int = 5000,
) -> float:
    """Top-1 accuracy on `test` (features (M, D), labels (M,)) of a probe fitted on `train` ((N, D), (N,)).

    Args:
        c: inverse strength of the L2 penalty (scikit-learn's `C`).
        max_iter: L-BFGS iterations.
    """
    probe = make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=max_iter))
    probe.fit(np.asarray(train[0], dtype=np.float64), np.asarray(train[1]))
    return float((probe.predict(np.asarray(test[0], dtype=np.float64)) == np.asarray(test[1])).mean())
