"""Pixel baselines: what a sceptic tries first on the same labeled images, to see where the recipe stands.

Logistic regression and an RBF SVM (scikit-learn) on raw pixels, flattened and scaled to [0, 1]. The SVM's C
and gamma are chosen by stratified k-fold cross-validation (GridSearchCV) on the training arrays only; the test
arrays are scored once, by the refitted best model.

Examples:
    >>> scores = pixel_baselines(labeled.images, labeled.labels, test.images, test.labels, seed=0)
    >>> scores["pixels_svm"]  # {"top1": 0.922, "C": 10.0, "gamma": 0.1} on the default digits split
"""

from __future__ import annotations

import warnings

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import GridSearchCV, StratifiedKFold
from sklearn.svm import SVC

# The SVM's search grid: 5 x 5 decades around scikit-learn's defaults (C 1, gamma 1 / (D * var) ~ 0.1 for
# 8x8 digits in [0, 1]); 25 candidates x 4 folds take about 0.3 s on 144 digits.
SVM_C = (0.1, 1.0, 10.0, 100.0, 1000.0)
SVM_GAMMA = (1.0e-4, 1.0e-3, 1.0e-2, 1.0e-1, 1.0)
LOGREG_C = 1.0  # scikit-learn's default L2 strength, not tuned: the first thing a sceptic tries
LOGREG_MAX_ITER = 1000  # L-BFGS iterations; enough to converge on raw pixels


def pixels(images: np.ndarray) -> np.ndarray:
    """uint8 (N, H, W, C) images -> (N, H * W * C) float64 features in [0, 1]."""
    return np.asarray(images, dtype=np.float64).reshape(len(images), -1) / 255.0


def check_arrays(images: np.ndarray, labels: np.ndarray, name: str) -> None:
    """Raise a ValueError naming `name` unless `images` are uint8 (N, H, W, C) with N > 0 and `labels` are (N,)."""
    if images.dtype != np.uint8 or images.ndim != 4 or len(images) == 0:
        raise ValueError(f"{name} images: expected a non-empty uint8 array (N, H, W, C), got {images.dtype} "
                         f"{tuple(images.shape)}")
    if labels.shape != (len(images),):
        raise ValueError(f"{name} labels: expected shape ({len(images)},), one per image, got {tuple(labels.shape)}")


def cv_folds(labels: np.ndarray, folds: int) -> int:
    """`folds`, reduced to the smallest class's image count (at least 2) so that every fold can hold every class."""
    return max(2, min(folds, int(np.unique(labels, return_counts=True)[1].min())))


def pixel_baselines(train_images: np.ndarray, train_labels: np.ndarray, test_images: np.ndarray,
                    test_labels: np.ndarray, *, seed: int, folds: int = 4) -> dict[str, dict[str, float]]:
    """Test top-1 of logistic regression and of an RBF SVM fitted on the train images' raw pixels.

    The SVM's C and gamma are the best of SVM_C x SVM_GAMMA by mean accuracy over `folds` stratified, shuffled
    (by `seed`) folds of the train arrays. When a class has fewer than `folds` train images the folds are
    reduced to its count (at least 2: a class with one image then sits in one fold only).

    Returns:
        {"pixels_logreg": {"top1"}, "pixels_svm": {"top1", "C", "gamma"}}

    Raises:
        ValueError: arrays of the wrong form or mismatched lengths, fewer than two train classes, or `folds` < 2.
    """
    check_arrays(train_images, np.asarray(train_labels), "train")
    check_arrays(test_images, np.asarray(test_labels), "test")
    if test_images.shape[1:] != train_images.shape[1:]:
        raise ValueError(f"test images {tuple(test_images.shape[1:])} differ in shape from the train images "
                         f"{tuple(train_images.shape[1:])}")
    if len(np.unique(train_labels)) < 2:
        raise ValueError(f"train labels: the baselines need at least two classes, got only {np.unique(train_labels)}")
    if folds < 2:
        raise ValueError(f"folds: expected at least 2 cross-validation folds, got {folds}")
    x_train, y_train = pixels(train_images), np.asarray(train_labels)
    x_test, y_test = pixels(test_images), np.asarray(test_labels)
    logreg = LogisticRegression(C=LOGREG_C, max_iter=LOGREG_MAX_ITER).fit(x_train, y_train)
    splits = StratifiedKFold(cv_folds(y_train, folds), shuffle=True, random_state=seed)
    search = GridSearchCV(SVC(kernel="rbf"), {"C": list(SVM_C), "gamma": list(SVM_GAMMA)}, cv=splits)
    with warnings.catch_warnings():  # a class with fewer images than folds: expected, see the docstring
        warnings.filterwarnings("ignore", message="The least populated class", category=UserWarning)
        search.fit(x_train, y_train)
    return {
        "pixels_logreg": {"top1": float(logreg.score(x_test, y_test))},
        "pixels_svm": {"top1": float(search.score(x_test, y_test)), "C": float(search.best_params_["C"]),
                       "gamma": float(search.best_params_["gamma"])},
    }
