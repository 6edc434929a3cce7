"""The pixel baselines: a direct scikit-learn fit gives the same numbers, the SVM's search never sees the test
split, small classes reduce the folds, and bad arrays are refused by name."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from sklearn.datasets import load_digits
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import GridSearchCV, StratifiedKFold
from sklearn.svm import SVC

from pipeline_lib.vision.baselines import SVM_C, SVM_GAMMA, pixel_baselines


@pytest.fixture(scope="module")
def digits() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """200 train and 300 test digits as the fetch stage stores them: uint8 (N, 8, 8, 1), 0-16 scaled to 0-255."""
    data = load_digits()
    images = np.round(data.images * 255 / 16).astype(np.uint8)[..., None]
    order = np.random.default_rng(0).permutation(len(images))
    train, test = order[:200], order[200:500]
    return images[train], data.target[train], images[test], data.target[test]


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
