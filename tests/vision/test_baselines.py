"""The pixel baselines: a direct scikit-learn fit gives the same numbers, the SVM's and LabelSpreading's searches
never see the test split, small classes reduce the folds, and bad arrays are refused by name."""

from __future__ import annotations

import itertools
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from sklearn.datasets import load_digits
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import GridSearchCV, StratifiedKFold
from sklearn.semi_supervised import LabelSpreading
from sklearn.svm import SVC

from pipeline_lib.vision import baselines
from pipeline_lib.vision.baselines import (
    LABEL_SPREADING_ALPHA,
    LABEL_SPREADING_GAMMA,
    LABEL_SPREADING_NEIGHBORS,
    SVM_C,
    SVM_GAMMA,
    pixel_baselines,
    spread_labels,
)


@pytest.fixture(scope="module")
def digits() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """200 train and 300 test digits as the fetch stage stores them: uint8 (N, 8, 8, 1), 0-16 scaled to 0-255."""
    data = load_digits()
    images = np.round(data.images * 255 / 16).astype(np.uint8)[..., None]
    order = np.random.default_rng(0).permutation(len(images))
    train, test = order[:200], order[200:500]
    return images[train], data.target[train], images[test], data.target[test]


@pytest.fixture(scope="module")
def few_labels() -> tuple[np.ndarray, ...]:
    """5 labeled digits a class, an unlabeled pool of 400 that holds them (as the pipeline's `unlabeled` split holds
    `labeled`), and 300 test digits outside it: (train images, train labels, test images, test labels, pool)."""
    data = load_digits()
    images = np.round(data.images * 255 / 16).astype(np.uint8)[..., None]
    order = np.random.default_rng(0).permutation(len(images))
    pool, test = order[:400], order[1000:1300]
    labeled = np.concatenate([pool[data.target[pool] == digit][:5] for digit in range(10)])
    return images[labeled], data.target[labeled], images[test], data.target[test], images[pool]


def same(scores: dict[str, dict[str, float]], expected: dict[str, dict[str, float]]) -> bool:
    """Equal sections, each number to pytest's default tolerance."""
    return scores.keys() == expected.keys() and all(scores[k] == pytest.approx(expected[k]) for k in scores)


def direct_fit(train_images: np.ndarray, train_labels: np.ndarray, test_images: np.ndarray,
               test_labels: np.ndarray, *, seed: int, folds: int) -> dict[str, dict[str, float]]:
    """The baselines written out with scikit-learn, as a reader would check them."""
    x_train = train_images.reshape(len(train_images), -1).astype(np.float64) / 255
    x_test = test_images.reshape(len(test_images), -1).astype(np.float64) / 255
    logreg = LogisticRegression(max_iter=1000).fit(x_train, train_labels)
    search = GridSearchCV(SVC(), {"C": list(SVM_C), "gamma": list(SVM_GAMMA)},
                          cv=StratifiedKFold(folds, shuffle=True, random_state=seed)).fit(x_train, train_labels)
    return {"pixels_logreg": {"top1": logreg.score(x_test, test_labels)},
            "pixels_svm": {"top1": search.score(x_test, test_labels), **search.best_params_}}


@pytest.mark.parametrize("seed", [0, 1])
def test_matches_a_direct_scikit_learn_fit(digits: tuple[np.ndarray, ...], seed: int) -> None:
    scores = pixel_baselines(*digits, seed=seed)
    expected = direct_fit(*digits, seed=seed, folds=4)
    assert same(scores, expected)
    assert scores["pixels_svm"]["top1"] > 0.9 and scores["pixels_logreg"]["top1"] > 0.85  # the task is easy
    assert {type(value) for section in scores.values() for value in section.values()} == {float}  # JSON-ready


def test_memory_mapped_images_give_the_same_scores(digits: tuple[np.ndarray, ...], tmp_path: Path) -> None:
    train_images, train_labels, test_images, test_labels = digits
    np.save(tmp_path / "train.npy", train_images)
    np.save(tmp_path / "test.npy", test_images)
    mapped = np.load(tmp_path / "train.npy", mmap_mode="r"), np.load(tmp_path / "test.npy", mmap_mode="r")
    assert pixel_baselines(mapped[0], train_labels, mapped[1], test_labels, seed=0) == pixel_baselines(*digits, seed=0)


def test_the_svm_search_never_sees_the_test_split(digits: tuple[np.ndarray, ...]) -> None:
    """Other test labels and images change the scores, never the chosen C and gamma."""
    train_images, train_labels, test_images, test_labels = digits
    scores = pixel_baselines(*digits, seed=0)
    rng = np.random.default_rng(1)
    shuffled = pixel_baselines(train_images, train_labels, test_images, rng.permutation(test_labels), seed=0)
    noise = rng.integers(0, 256, size=test_images.shape, dtype=np.uint8)
    noisy = pixel_baselines(train_images, train_labels, noise, test_labels, seed=0)
    for other in (shuffled, noisy):
        assert (other["pixels_svm"]["C"], other["pixels_svm"]["gamma"]) == (scores["pixels_svm"]["C"],
                                                                            scores["pixels_svm"]["gamma"])
        assert other["pixels_svm"]["top1"] < scores["pixels_svm"]["top1"] - 0.3
        assert other["pixels_logreg"]["top1"] < scores["pixels_logreg"]["top1"] - 0.3


def test_folds_shrink_to_the_smallest_class(digits: tuple[np.ndarray, ...]) -> None:
    """Two images of class 9 (of 4 folds asked): two folds, as a direct fit with two folds, and no warning."""
    train_images, train_labels, test_images, test_labels = digits
    keep = np.flatnonzero(train_labels != 9).tolist() + np.flatnonzero(train_labels == 9)[:2].tolist()
    small = train_images[keep], train_labels[keep], test_images, test_labels
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        scores = pixel_baselines(*small, seed=3, folds=4)
        one = pixel_baselines(train_images[keep[:-1]], train_labels[keep[:-1]], test_images, test_labels, seed=0)
        four = direct_fit(*small, seed=3, folds=4)  # what the folds asked would choose: another C and gamma
    assert [str(w.message) for w in caught if "least populated class" in str(w.message)] != []  # from `four` only
    assert len(caught) == 1, [str(w.message) for w in caught]
    two = direct_fit(*small, seed=3, folds=2)
    assert same(scores, two) and not same(scores, four)
    assert 0 < one["pixels_svm"]["top1"] <= 1  # a class of one image: two folds still, one of them without it


def test_folds_are_an_argument(digits: tuple[np.ndarray, ...]) -> None:
    assert same(pixel_baselines(*digits, seed=0, folds=3), direct_fit(*digits, seed=0, folds=3))


@pytest.mark.parametrize(("change", "message"), [
    (lambda a: (a[0], a[1][:-1], a[2], a[3]), r"train labels: expected shape \(200,\), one per image, got \(199,\)"),
    (lambda a: (a[0], a[1], a[2][:10], a[3]), r"test labels: expected shape \(10,\), one per image, got \(300,\)"),
    (lambda a: (a[0], np.zeros_like(a[1]), a[2], a[3]), r"train labels: the baselines need at least two classes"),
    (lambda a: (a[0].astype(np.float32), a[1], a[2], a[3]), r"train images: expected a non-empty uint8 array"),
    (lambda a: (a[0][..., 0], a[1], a[2], a[3]), r"train images: expected .* \(N, H, W, C\), got uint8 \(200, 8, 8\)"),
    (lambda a: (a[0][:0], a[1][:0], a[2], a[3]), r"train images: expected a non-empty uint8 array"),
    (lambda a: (a[0], a[1], a[2][:, :4], a[3]), r"test images \(4, 8, 1\) differ in shape from the train images"),
])
def test_bad_input_is_refused_by_name(digits: tuple[np.ndarray, ...], change: Callable[[tuple], tuple],
                                      message: str) -> None:
    with pytest.raises(ValueError, match=message):
        pixel_baselines(*change(digits), seed=0)


def test_fewer_than_two_folds_is_refused(digits: tuple[np.ndarray, ...]) -> None:
    with pytest.raises(ValueError, match="folds: expected at least 2 cross-validation folds, got 1"):
        pixel_baselines(*digits, seed=0, folds=1)


def direct_label_spreading(train_images: np.ndarray, train_labels: np.ndarray, test_images: np.ndarray,
                           test_labels: np.ndarray, pool: np.ndarray, *, seed: int, folds: int
                           ) -> tuple[dict[str, Any], float]:
    """LabelSpreading's search and refit written out with scikit-learn: the candidate and its test top-1."""
    x_train = train_images.reshape(len(train_images), -1).astype(np.float64) / 255
    x_all = np.concatenate([x_train, pool.reshape(len(pool), -1).astype(np.float64) / 255])
    y_all = np.concatenate([train_labels, -np.ones(len(pool), dtype=int)])
    grid = [{"kernel": "knn", "n_neighbors": k, "alpha": a}
            for k, a in itertools.product(LABEL_SPREADING_NEIGHBORS, LABEL_SPREADING_ALPHA)]
    grid += [{"kernel": "rbf", "gamma": g, "alpha": a}
             for g, a in itertools.product(LABEL_SPREADING_GAMMA, LABEL_SPREADING_ALPHA)]
    best, best_score = None, -1.0
    for candidate in grid:
        scores = []
        for _, held_out in StratifiedKFold(folds, shuffle=True, random_state=seed).split(x_train, train_labels):
            y = y_all.copy()
            y[held_out] = -1
            model = LabelSpreading(**candidate, max_iter=1000).fit(x_all, y)
            reached = model.label_distributions_[held_out].sum(axis=1) > 0  # a row no label reached is wrong
            scores.append(np.mean((model.transduction_[held_out] == train_labels[held_out]) & reached))
        if np.mean(scores) > best_score:
            best, best_score = candidate, np.mean(scores)
    model = LabelSpreading(**best, max_iter=1000).fit(x_all, y_all)
    x_test = test_images.reshape(len(test_images), -1).astype(np.float64) / 255
    assert np.isfinite(model.predict_proba(x_test)).all()  # every test image reached: score is the plain accuracy
    return best, model.score(x_test, test_labels)


@pytest.mark.parametrize("seed", [0, 1])
def test_label_spreading_matches_a_direct_scikit_learn_fit(few_labels: tuple[np.ndarray, ...], seed: int) -> None:
    train_images, train_labels, test_images, test_labels, pool = few_labels
    scores = pixel_baselines(train_images, train_labels, test_images, test_labels, seed=seed, unlabeled_images=pool)
    spreading = scores.pop("pixels_label_spreading")
    assert same(scores, direct_fit(train_images, train_labels, test_images, test_labels, seed=seed, folds=4))
    best, top1 = direct_label_spreading(*few_labels, seed=seed, folds=4)
    assert {key: value for key, value in spreading.items() if key != "top1" and value is not None} == best
    assert spreading["top1"] == top1 and top1 > 0.85  # 50 labels and a pool: the task is still easy
    assert set(spreading) == {"top1", "kernel", "gamma", "n_neighbors", "alpha"}
    assert spreading["gamma" if best["kernel"] == "knn" else "n_neighbors"] is None  # not this kernel's


def test_the_label_spreading_search_never_sees_the_test_split(few_labels: tuple[np.ndarray, ...]) -> None:
    """Other test labels and images change the score, never the chosen kernel, its parameter and alpha."""
    train_images, train_labels, test_images, test_labels, pool = few_labels
    scores = pixel_baselines(*few_labels[:4], seed=0, unlabeled_images=pool)["pixels_label_spreading"]
    rng = np.random.default_rng(1)
    shuffled = pixel_baselines(train_images, train_labels, test_images, rng.permutation(test_labels), seed=0,
                               unlabeled_images=pool)["pixels_label_spreading"]
    noise = rng.integers(0, 256, size=test_images.shape, dtype=np.uint8)
    noisy = pixel_baselines(train_images, train_labels, noise, test_labels, seed=0,
                            unlabeled_images=pool)["pixels_label_spreading"]
    for other in (shuffled, noisy):
        assert {k: v for k, v in other.items() if k != "top1"} == {k: v for k, v in scores.items() if k != "top1"}
        assert other["top1"] < scores["top1"] - 0.3


def test_label_spreading_uses_the_pool(few_labels: tuple[np.ndarray, ...]) -> None:
    """Another pool, another graph: the score moves (the pool is not ignored)."""
    full = pixel_baselines(*few_labels[:4], seed=0, unlabeled_images=few_labels[4])["pixels_label_spreading"]
    small = pixel_baselines(*few_labels[:4], seed=0, unlabeled_images=few_labels[0])["pixels_label_spreading"]
    assert full["top1"] != small["top1"]


@pytest.mark.parametrize(("change", "message"), [
    (lambda pool: pool.astype(np.float32), r"unlabeled images: expected a non-empty uint8 array"),
    (lambda pool: pool[..., 0], r"unlabeled images: expected .* \(N, H, W, C\), got uint8 \(400, 8, 8\)"),
    (lambda pool: pool[:0], r"unlabeled images: expected a non-empty uint8 array"),
    (lambda pool: pool[:, :4], r"unlabeled images \(4, 8, 1\) differ in shape from the train images \(8, 8, 1\)"),
    (lambda pool: np.repeat(pool, 3, axis=-1), r"unlabeled images \(8, 8, 3\) differ in shape"),
])
def test_a_bad_unlabeled_pool_is_refused_by_name(few_labels: tuple[np.ndarray, ...],
                                                  change: Callable[[np.ndarray], np.ndarray], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        pixel_baselines(*few_labels[:4], seed=0, unlabeled_images=change(few_labels[4]))


def test_too_many_images_for_label_spreading_leave_it_out(few_labels: tuple[np.ndarray, ...],
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(baselines, "LABEL_SPREADING_MAX_ROWS", len(few_labels[0]) + len(few_labels[4]) - 1)
    scores = pixel_baselines(*few_labels[:4], seed=0, unlabeled_images=few_labels[4])
    assert set(scores) == {"pixels_logreg", "pixels_svm"}


def test_label_spreading_that_does_not_converge_stops_by_name(few_labels: tuple[np.ndarray, ...],
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(baselines, "LABEL_SPREADING_MAX_ITER", 2)
    with pytest.raises(RuntimeError, match=r"LabelSpreading \{'kernel': 'knn', .*did not converge in 2 steps"):
        pixel_baselines(*few_labels[:4], seed=0, unlabeled_images=few_labels[4])


def test_rows_no_label_reached_count_as_wrong() -> None:
    """scikit-learn's zero rows (transduction) and NaN rows (a test image's neighbours all unreached) are -1."""
    distributions = np.array([[0.2, 0.8], [0.0, 0.0], [np.nan, np.nan], [1.0, 0.0]])
    np.testing.assert_array_equal(spread_labels(distributions, np.array([3, 7])), [7, -1, -1, 3])
