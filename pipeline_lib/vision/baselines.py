"""Pixel baselines: what a sceptic tries first on the same labeled images, to see where the recipe stands.

Logistic regression and an RBF SVM (scikit-learn) on raw pixels, flattened and scaled to [0, 1], and, given the
unlabeled pool, LabelSpreading (Zhou et al. 2004, "Learning with local and global consistency"): the sceptic's
semi-supervised baseline. The SVM's and LabelSpreading's hyperparameters are chosen by stratified k-fold
cross-validation on the labeled arrays only; the test arrays are scored once, by the refitted best model.

Examples:
    >>> scores = pixel_baselines(labeled.images, labeled.labels, test.images, test.labels, seed=0)
    >>> scores["pixels_svm"]  # {"top1": 0.922, "C": 10.0, "gamma": 0.1} on the default digits split
    >>> scores = pixel_baselines(..., seed=0, unlabeled_images=unlabeled.images)
    >>> scores["pixels_label_spreading"]  # {"top1": 0.933, "kernel": "knn", "gamma": None, "n_neighbors": 7,
    ...                                   #  "alpha": 0.2} on the default split, with its 1,438 unlabeled digits
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import GridSearchCV, StratifiedKFold
from sklearn.semi_supervised import LabelSpreading
from sklearn.svm import SVC
from threadpoolctl import threadpool_limits

# The SVM's search grid: 5 x 5 decades around scikit-learn's defaults (C 1, gamma 1 / (D * var) ~ 0.1 for
# 8x8 digits in [0, 1]); 25 candidates x 4 folds take about 0.3 s on 144 digits.
SVM_C = (0.1, 1.0, 10.0, 100.0, 1000.0)
SVM_GAMMA = (1.0e-4, 1.0e-3, 1.0e-2, 1.0e-1, 1.0)
LOGREG_C = 1.0  # scikit-learn's default L2 strength, not tuned: the first thing a sceptic tries
LOGREG_MAX_ITER = 1000  # L-BFGS iterations; enough to converge on raw pixels
# LabelSpreading's grid: a kNN graph, or a dense RBF one, exp(-gamma * ||x - y||^2). On 8x8 digits in [0, 1] a
# digit's 5th-nearest neighbour is ~1.7 away in squared distance and a random other digit ~9.4: gamma 1-10 weighs
# the nearest few. On the default split the CV peaks at kNN 7-10 and gamma 2-5 (20 and 40 score lower); alpha, the
# share of each step's labels that comes from the neighbours, matters little from 0.2 up. 24 candidates x 4 folds
# over 144 + 1,438 digits take ~4 s on 2 busy cores. The gammas suit 64 pixels; larger images are farther apart.
LABEL_SPREADING_NEIGHBORS = (5, 7, 10, 15)
LABEL_SPREADING_GAMMA = (1.0, 2.0, 5.0, 10.0)
LABEL_SPREADING_ALPHA = (0.05, 0.2, 0.5)
LABEL_SPREADING_MAX_ITER = 1000  # the change shrinks by alpha <= 0.5 per step: converged within ~30 steps
# Labeled + unlabeled images above which LabelSpreading is not fitted: every fit builds an (N, N) graph (dense for
# RBF), 97 times. Digits fit (1,582 in evaluate, 2,157 at most in the label curve); CIFAR-10's and STL-10's do not.
LABEL_SPREADING_MAX_ROWS = 5000


def pixels(images: np.ndarray) -> np.ndarray:
    """uint8 (N, H, W, C) images -> (N, H * W * C) float64 features in [0, 1]."""
    return np.asarray(images, dtype=np.float64).reshape(len(images), -1) / 255.0


def check_images(images: np.ndarray, name: str, like: np.ndarray | None = None) -> None:
    """Raise a ValueError naming `name` unless `images` are uint8 (N, H, W, C) with N > 0, shaped per image as
    `like` (the train images) when given."""
    if images.dtype != np.uint8 or images.ndim != 4 or len(images) == 0:
        raise ValueError(f"{name} images: expected a non-empty uint8 array (N, H, W, C), got {images.dtype} "
                         f"{tuple(images.shape)}")
    if like is not None and images.shape[1:] != like.shape[1:]:
        raise ValueError(f"{name} images {tuple(images.shape[1:])} differ in shape from the train images "
                         f"{tuple(like.shape[1:])}")


def check_arrays(images: np.ndarray, labels: np.ndarray, name: str) -> None:
    """Raise a ValueError naming `name` unless `images` pass `check_images` and `labels` are (N,)."""
    check_images(images, name)
    if labels.shape != (len(images),):
        raise ValueError(f"{name} labels: expected shape ({len(images)},), one per image, got {tuple(labels.shape)}")


def check_inputs(train_images: np.ndarray, train_labels: np.ndarray, test_images: np.ndarray,
                 test_labels: np.ndarray, folds: int, unlabeled_images: np.ndarray | None = None) -> None:
    """What every baseline checks first; a ValueError names the array or `folds`."""
    check_arrays(train_images, np.asarray(train_labels), "train")
    check_arrays(test_images, np.asarray(test_labels), "test")
    check_images(test_images, "test", like=train_images)
    if unlabeled_images is not None:
        check_images(unlabeled_images, "unlabeled", like=train_images)
    if len(np.unique(train_labels)) < 2:
        raise ValueError(f"train labels: the baselines need at least two classes, got only {np.unique(train_labels)}")
    if folds < 2:
        raise ValueError(f"folds: expected at least 2 cross-validation folds, got {folds}")


def cv_folds(labels: np.ndarray, folds: int) -> int:
    """`folds`, reduced to the smallest class's image count (at least 2) so that every fold can hold every class."""
    return max(2, min(folds, int(np.unique(labels, return_counts=True)[1].min())))


def cv_splits(labels: np.ndarray, folds: int, seed: int) -> StratifiedKFold:
    """The stratified, shuffled folds every baseline's search uses (`cv_folds` of them)."""
    return StratifiedKFold(cv_folds(labels, folds), shuffle=True, random_state=seed)


def label_spreading_grid() -> list[dict[str, Any]]:
    """LabelSpreading's candidates, kNN first: each a kernel with its one parameter, and an alpha."""
    kernels = [{"kernel": "knn", "n_neighbors": k} for k in LABEL_SPREADING_NEIGHBORS]
    kernels += [{"kernel": "rbf", "gamma": gamma} for gamma in LABEL_SPREADING_GAMMA]
    return [{**kernel, "alpha": alpha} for kernel in kernels for alpha in LABEL_SPREADING_ALPHA]


def spread(features: np.ndarray, labels: np.ndarray, candidate: dict[str, Any]) -> LabelSpreading:
    """LabelSpreading with `candidate`'s kernel and alpha fitted on (N, D) `features`, (N,) `labels` (-1: unlabeled).

    Raises:
        RuntimeError: the spreading did not converge in LABEL_SPREADING_MAX_ITER steps (its scores would be those
            of a half-spread graph).
    """
    model = LabelSpreading(**candidate, max_iter=LABEL_SPREADING_MAX_ITER)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConvergenceWarning)
        try:
            return model.fit(features, labels)
        except ConvergenceWarning as err:
            raise RuntimeError(f"LabelSpreading {candidate} did not converge in {LABEL_SPREADING_MAX_ITER} steps on "
                               f"{len(features)} images") from err


def spread_labels(distributions: np.ndarray, classes: np.ndarray) -> np.ndarray:
    """(N, classes) label distributions -> (N,) labels; -1 where no label reached the row (all zeros, or NaN where
    scikit-learn divides the zeros by their sum), so that it counts as wrong rather than as `classes[0]`."""
    known = np.nan_to_num(distributions)
    return np.where(known.sum(axis=1) > 0, classes[known.argmax(axis=1)], -1)


def choose_spreading(features: np.ndarray, labels: np.ndarray, folds: list[tuple[np.ndarray, np.ndarray]]
                     ) -> dict[str, Any]:
    """The grid's best candidate by mean held-out accuracy over `folds` (of the labeled rows, which come first in
    (N, D) `features`; `labels` is -1 on the pool's rows); the first in grid order on a tie.

    Each fold spreads over every row with the held-out fold's labels hidden too, and scores their transduction.
    """
    grid, means = label_spreading_grid(), []
    for candidate in grid:
        scores = []
        for _, held_out in folds:
            hidden = labels.copy()
            hidden[held_out] = -1
            model = spread(features, hidden, candidate)
            transduced = spread_labels(model.label_distributions_[held_out], model.classes_)
            scores.append(np.mean(transduced == labels[held_out]))
        means.append(np.mean(scores))
    return grid[int(np.argmax(means))]


def label_spreading_baseline(train_images: np.ndarray, train_labels: np.ndarray, test_images: np.ndarray,
                             test_labels: np.ndarray, unlabeled_images: np.ndarray, *, seed: int,
                             folds: int = 4) -> dict[str, Any] | None:
    """Test top-1 of LabelSpreading over the train images (their labels) and `unlabeled_images` (label -1).

    Kernel, its parameter and alpha are the best of `label_spreading_grid` on the SVM's folds (`cv_splits`), with
    the whole pool in every fit, then refitted on every label. The test images are never in the pool: the refit
    predicts them (inductively) once. The pool may hold the train images themselves (the pipeline's `unlabeled`
    split holds every training image), and so the held-out fold's in the CV: a labeled copy clamps its duplicate,
    an unlabeled one is one more unlabeled row.

    Returns:
        {"top1", "kernel", "gamma", "n_neighbors", "alpha"} (None where not the kernel's), or None when the train
        and unlabeled images are more than LABEL_SPREADING_MAX_ROWS.

    Raises:
        ValueError: as `pixel_baselines`, and unlabeled images of another form or image shape than train.
    """
    check_inputs(train_images, train_labels, test_images, test_labels, folds, unlabeled_images)
    if len(train_images) + len(unlabeled_images) > LABEL_SPREADING_MAX_ROWS:
        return None
    y_train = np.asarray(train_labels)
    features = np.concatenate([pixels(train_images), pixels(unlabeled_images)])  # (N_train + N_pool, D)
    labels = np.concatenate([y_train, np.full(len(unlabeled_images), -1, dtype=y_train.dtype)])
    with warnings.catch_warnings():  # a class with fewer images than folds: expected, see `pixel_baselines`
        warnings.filterwarnings("ignore", message="The least populated class", category=UserWarning)
        splits = list(cv_splits(y_train, folds, seed).split(features[: len(y_train)], y_train))
    # ~1,600-row graphs: threads cost more than they give (4.5 s with one, 5-18 s with two on 2 busy cores)
    with threadpool_limits(limits=1):
        best = choose_spreading(features, labels, splits)
        model = spread(features, labels, best)
        with np.errstate(invalid="ignore"):  # a test image whose neighbours no label reached: a NaN row
            predicted = spread_labels(model.predict_proba(pixels(test_images)), model.classes_)
    return {"top1": float(np.mean(predicted == np.asarray(test_labels))), "kernel": best["kernel"],
            "gamma": best.get("gamma"), "n_neighbors": best.get("n_neighbors"), "alpha": best["alpha"]}


def pixel_baselines(train_images: np.ndarray, train_labels: np.ndarray, test_images: np.ndarray,
                    test_labels: np.ndarray, *, seed: int, folds: int = 4,
                    unlabeled_images: np.ndarray | None = None) -> dict[str, dict[str, Any]]:
    """Test top-1 of logistic regression and of an RBF SVM fitted on the train images' raw pixels, and of
    LabelSpreading with `unlabeled_images` when given (`label_spreading_baseline`).

    The SVM's C and gamma are the best of SVM_C x SVM_GAMMA by mean accuracy over `folds` stratified, shuffled
    (by `seed`) folds of the train arrays. When a class has fewer than `folds` train images the folds are
    reduced to its count (at least 2: a class with one image then sits in one fold only).

    Returns:
        {"pixels_logreg": {"top1"}, "pixels_svm": {"top1", "C", "gamma"}}, and "pixels_label_spreading" with
        `unlabeled_images` unless there are too many (`label_spreading_baseline`).

    Raises:
        ValueError: arrays of the wrong form or mismatched shapes, fewer than two train classes, or `folds` < 2.
    """
    check_inputs(train_images, train_labels, test_images, test_labels, folds, unlabeled_images)
    x_train, y_train = pixels(train_images), np.asarray(train_labels)
    x_test, y_test = pixels(test_images), np.asarray(test_labels)
    logreg = LogisticRegression(C=LOGREG_C, max_iter=LOGREG_MAX_ITER).fit(x_train, y_train)
    search = GridSearchCV(SVC(kernel="rbf"), {"C": list(SVM_C), "gamma": list(SVM_GAMMA)},
                          cv=cv_splits(y_train, folds, seed))
    with warnings.catch_warnings():  # a class with fewer images than folds: expected, see the docstring
        warnings.filterwarnings("ignore", message="The least populated class", category=UserWarning)
        search.fit(x_train, y_train)
    scores: dict[str, dict[str, Any]] = {
        "pixels_logreg": {"top1": float(logreg.score(x_test, y_test))},
        "pixels_svm": {"top1": float(search.score(x_test, y_test)), "C": float(search.best_params_["C"]),
                       "gamma": float(search.best_params_["gamma"])},
    }
    spreading = None if unlabeled_images is None else label_spreading_baseline(
        train_images, train_labels, test_images, test_labels, unlabeled_images, seed=seed, folds=folds)
    if spreading is not None:
        scores["pixels_label_spreading"] = spreading
    return scores
