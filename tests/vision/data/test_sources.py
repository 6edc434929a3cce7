"""Each data source end to end: official-layout archives served over HTTP on 127.0.0.1, read back exactly."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from archives import archive_folder, cifar10_archive, random_images, sha256, stl10_archive, write_image_folder

from pipeline_lib.core.errors import DataError
from pipeline_lib.vision.config import DataParams
from pipeline_lib.vision.data.prepare import prepare_dataset
from pipeline_lib.vision.data.store import read_split


def _rows_of(images: np.ndarray, pool: np.ndarray) -> list[int]:
    """For each image, its row in `pool`; fails if an image is not in the pool exactly."""
    keys = {row.tobytes(): i for i, row in enumerate(pool)}
    return [keys[image.tobytes()] for image in images]


def _check_labeled_subsets(out: Path, train_images: np.ndarray, train_labels: np.ndarray) -> None:
    """labeled and rl are disjoint, and every image carries the label it had in the source."""
    rows = {}
    for name in ("labeled", "rl"):
        split = read_split(out, name, verify=True)
        rows[name] = _rows_of(split.images, train_images)
        np.testing.assert_array_equal(split.labels, train_labels[rows[name]])
    assert not set(rows["labeled"]) & set(rows["rl"])


def test_cifar10_reads_official_binary_layout(http_server: tuple[str, Path], tmp_path: Path) -> None:
    base, served = http_server
    archive, expected = cifar10_archive(served, np.random.default_rng(0))
    cfg = DataParams(source="cifar10", url=f"{base}/{archive.name}", sha256=sha256(archive),
                     label_fraction=0.5, rl_fraction=0.25)
    metas = prepare_dataset(cfg, seed=0, out_dir=tmp_path / "prepared", cache_dir=tmp_path / "cache")

    test = read_split(tmp_path / "prepared", "test", verify=True)
    np.testing.assert_array_equal(test.images, expected["test_images"])
    np.testing.assert_array_equal(test.labels, expected["test_labels"])
    unlabeled = read_split(tmp_path / "prepared", "unlabeled")
    np.testing.assert_array_equal(unlabeled.images, expected["train_images"])
    assert unlabeled.labels is None
    _check_labeled_subsets(tmp_path / "prepared", expected["train_images"], expected["train_labels"])
    assert metas["test"]["class_names"][0] == "airplane" and metas["test"]["num_classes"] == 10
    assert metas["unlabeled"]["origin"]["sha256"] == sha256(archive)


def test_stl10_reads_column_major_images_and_unlabeled_pool(http_server: tuple[str, Path], tmp_path: Path) -> None:
    base, served = http_server
    archive, expected = stl10_archive(served, np.random.default_rng(1))
    cfg = DataParams(source="stl10", url=f"{base}/{archive.name}", sha256=sha256(archive),
                     label_fraction=0.5, rl_fraction=0.5)
    prepare_dataset(cfg, seed=0, out_dir=tmp_path / "prepared", cache_dir=tmp_path / "cache")

    test = read_split(tmp_path / "prepared", "test", verify=True)
    np.testing.assert_array_equal(test.images, expected["test_images"])
    np.testing.assert_array_equal(test.labels, expected["test_labels"])  # 1..10 on disk, 0..9 here
    unlabeled = read_split(tmp_path / "prepared", "unlabeled")
    np.testing.assert_array_equal(
        unlabeled.images, np.concatenate([expected["train_images"], expected["unlabeled_images"]])
    )
    _check_labeled_subsets(tmp_path / "prepared", expected["train_images"], expected["train_labels"])
    assert test.meta["class_names"][7] == "monkey"


def test_stl10_max_images_caps_every_pool(http_server: tuple[str, Path], tmp_path: Path) -> None:
    base, served = http_server
    archive, _ = stl10_archive(served, np.random.default_rng(2))
    cfg = DataParams(source="stl10", url=f"{base}/{archive.name}", sha256=sha256(archive), max_images=10)
    metas = prepare_dataset(cfg, seed=0, out_dir=tmp_path / "prepared", cache_dir=tmp_path / "cache")
    assert metas["test"]["num_images"] == 10
    assert metas["unlabeled"]["num_images"] == 10 + 6  # capped training pool + all 6 extra images
    assert metas["unlabeled"]["origin"]["url"].endswith("stl10_binary.tar.gz")
    assert (metas["labeled"]["num_images"], metas["rl"]["num_images"]) == (1, 1)  # 10% of 10 each


@pytest.mark.parametrize("suffix", [".tar.gz", ".zip"])
def test_imagefolder_archive_by_url(http_server: tuple[str, Path], tmp_path: Path, suffix: str) -> None:
    base, served = http_server
    rng = np.random.default_rng(3)
    by_class = {"cat": random_images(rng, 6, 12), "dog": random_images(rng, 4, 12)}
    write_image_folder(tmp_path / "pets", by_class)
    archive = archive_folder(tmp_path / "pets", served / f"pets{suffix}")
    cfg = DataParams(source="imagefolder", url=f"{base}/{archive.name}", sha256=sha256(archive),
                     label_fraction=0.5, rl_fraction=0.25, test_fraction=0.5)
    metas = prepare_dataset(cfg, seed=0, out_dir=tmp_path / "prepared", cache_dir=tmp_path / "cache")

    assert metas["test"]["class_names"] == ["cat", "dog"]
    assert metas["test"]["class_counts"] == [3, 2]  # stratified: half of each class
    pool = np.concatenate([by_class["cat"], by_class["dog"]])
    labels = np.array([0] * 6 + [1] * 4)
    test = read_split(tmp_path / "prepared", "test")
    np.testing.assert_array_equal(labels[_rows_of(test.images, pool)], test.labels)
    unlabeled = read_split(tmp_path / "prepared", "unlabeled")
    assert not set(_rows_of(unlabeled.images, pool)) & set(_rows_of(test.images, pool))


def test_imagefolder_local_split_layout_grayscale(tmp_path: Path) -> None:
    rng = np.random.default_rng(4)
    train = {"a": random_images(rng, 4, 9, channels=1), "b": random_images(rng, 4, 9, channels=1)}
    test = {"a": random_images(rng, 2, 9, channels=1), "b": random_images(rng, 1, 9, channels=1)}
    write_image_folder(tmp_path / "root" / "train", train)
    write_image_folder(tmp_path / "root" / "test", test)
    write_image_folder(tmp_path / "root" / "unlabeled", {"": random_images(rng, 3, 9, channels=1)})
    cfg = DataParams(source="imagefolder", path=str(tmp_path / "root"), label_fraction=0.5)
    metas = prepare_dataset(cfg, seed=0, out_dir=tmp_path / "prepared", cache_dir=tmp_path / "cache")

    assert metas["unlabeled"]["shape"] == [8 + 3, 9, 9, 1]
    split = read_split(tmp_path / "prepared", "test")
    np.testing.assert_array_equal(split.images, np.concatenate([test["a"], test["b"]]))
    np.testing.assert_array_equal(split.labels, [0, 0, 1])


def test_imagefolder_flat_folder_is_unlabeled_only(tmp_path: Path) -> None:
    images = random_images(np.random.default_rng(5), 5, 7)
    write_image_folder(tmp_path / "flat", {"": images})
    cfg = DataParams(source="imagefolder", path=str(tmp_path / "flat"))
    metas = prepare_dataset(cfg, seed=0, out_dir=tmp_path / "prepared", cache_dir=tmp_path / "cache")
    assert list(metas) == ["unlabeled"]
    np.testing.assert_array_equal(read_split(tmp_path / "prepared", "unlabeled").images, images)
    with pytest.raises(DataError, match=r"no prepared split 'labeled'.*available: unlabeled"):
        read_split(tmp_path / "prepared", "labeled")


def test_imagefolder_sizes_differ_needs_image_size(tmp_path: Path) -> None:
    rng = np.random.default_rng(6)
    write_image_folder(tmp_path / "root", {"a": random_images(rng, 2, 10), "b": random_images(rng, 2, 14)})
    cfg = DataParams(source="imagefolder", path=str(tmp_path / "root"), label_fraction=0.5)
    with pytest.raises(DataError, match=r"differ in size.*data\.image_size"):
        prepare_dataset(cfg, seed=0, out_dir=tmp_path / "prepared", cache_dir=tmp_path / "cache")
    assert not (tmp_path / "prepared").exists()

    resized = DataParams(source="imagefolder", path=str(tmp_path / "root"), label_fraction=0.5, image_size=8)
    metas = prepare_dataset(resized, seed=0, out_dir=tmp_path / "prepared", cache_dir=tmp_path / "cache")
    assert metas["unlabeled"]["shape"][1:] == [8, 8, 3]


def test_imagefolder_unreadable_image_is_named(tmp_path: Path) -> None:
    write_image_folder(tmp_path / "root", {"a": random_images(np.random.default_rng(7), 2, 8)})
    (tmp_path / "root" / "a" / "broken.png").write_bytes(b"not a png")
    cfg = DataParams(source="imagefolder", path=str(tmp_path / "root"))
    with pytest.raises(DataError, match=r"broken\.png: not a readable image"):
        prepare_dataset(cfg, seed=0, out_dir=tmp_path / "prepared", cache_dir=tmp_path / "cache")


def test_digits_is_embedded(tmp_path: Path) -> None:
    metas = prepare_dataset(DataParams(), seed=0, out_dir=tmp_path / "prepared", cache_dir=tmp_path / "cache")
    assert metas["unlabeled"]["shape"][1:] == [8, 8, 1]
    assert metas["unlabeled"]["num_images"] + metas["test"]["num_images"] == 1797
    unlabeled = read_split(tmp_path / "prepared", "unlabeled")
    assert unlabeled.images.max() == 255 and unlabeled.images.dtype == np.uint8
    assert not (tmp_path / "cache").exists()  # nothing downloaded
