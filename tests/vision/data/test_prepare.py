"""Splitting rules, the store format, and failures that must leave no partial `data/prepared`."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
from archives import archive_folder, cifar10_archive, random_images, sha256, write_image_folder

from pipeline_lib.core.errors import DataError
from pipeline_lib.vision.config import DataParams
from pipeline_lib.vision.data.prepare import allocate, prepare_dataset
from pipeline_lib.vision.data.store import SPLITS, prepared_digest, read_split


def _prepare(tmp_path: Path, seed: int = 0, **data: object) -> dict:
    return prepare_dataset(DataParams(**data), seed, tmp_path / "prepared", tmp_path / "cache")


def test_allocate_is_proportional_and_exact() -> None:
    counts = np.array([50, 30, 20])
    assert allocate(counts, 10).tolist() == [5, 3, 2]
    assert allocate(counts, 7).sum() == 7
    assert allocate(np.array([1, 1]), 5).tolist() == [1, 1]  # never more than a class has


def test_splits_follow_the_data_contract(tmp_path: Path) -> None:
    metas = _prepare(tmp_path, label_fraction=0.2, rl_fraction=0.3, test_fraction=0.25)
    root = tmp_path / "prepared"
    n_test = round(0.25 * 1797)
    n_train = 1797 - n_test
    assert metas["test"]["num_images"] == n_test
    assert metas["unlabeled"]["num_images"] == n_train
    assert metas["rl"]["num_images"] == round(0.3 * n_train)
    assert metas["labeled"]["num_images"] == round(0.2 * n_train)
    for name in SPLITS:
        split = read_split(root, name, verify=True)
        assert split.images.dtype == np.uint8 and split.images.shape[1:] == (8, 8, 1)
        assert isinstance(split.images, np.memmap)
        assert (split.labels is None) == (name == "unlabeled")
        assert split.meta["sha256"].keys() == ({"images.npy"} if name == "unlabeled" else
                                               {"images.npy", "labels.npy"})
    # stratified: each class's share of the labeled split matches its share of the test split within 2 images
    labeled, test = read_split(root, "labeled"), read_split(root, "test")
    share = np.bincount(test.labels, minlength=10) / len(test)
    assert np.abs(np.bincount(labeled.labels, minlength=10) - share * len(labeled)).max() <= 2
    # labeled, rl and test are disjoint sets of images; labeled and rl come from the unlabeled pool
    rows = {name: {img.tobytes() for img in read_split(root, name).images} for name in SPLITS}
    assert not rows["labeled"] & rows["rl"]
    assert rows["labeled"] | rows["rl"] <= rows["unlabeled"]


def test_same_seed_same_bytes_other_seed_other_split(tmp_path: Path) -> None:
    _prepare(tmp_path / "a", seed=3)
    _prepare(tmp_path / "b", seed=3)
    _prepare(tmp_path / "c", seed=4)
    digest = {name: prepared_digest(tmp_path / name / "prepared") for name in "abc"}
    assert digest["a"] == digest["b"] != digest["c"]


def test_label_fraction_one_takes_all_training_images(tmp_path: Path) -> None:
    metas = _prepare(tmp_path, label_fraction=1.0, rl_fraction=0.0, max_images=100)
    assert metas["labeled"]["num_images"] == metas["unlabeled"]["num_images"] == 80
    assert metas["rl"]["num_images"] == 0


def test_too_few_labels_is_an_error_before_writing(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="leaves no labeled images"):
        _prepare(tmp_path, label_fraction=0.01, max_images=20)
    assert not (tmp_path / "prepared").exists()


def test_meta_records_pixel_statistics(tmp_path: Path) -> None:
    metas = _prepare(tmp_path, max_images=200)
    images = read_split(tmp_path / "prepared", "unlabeled").images / 255.0
    assert metas["unlabeled"]["pixel_mean"][0] == pytest.approx(images.mean(), abs=1e-5)
    assert metas["unlabeled"]["pixel_std"][0] == pytest.approx(images.std(), abs=1e-5)
    on_disk = json.loads((tmp_path / "prepared" / "unlabeled" / "meta.json").read_text())
    assert on_disk == metas["unlabeled"]


# --------------------------------------------------------------------------------- failures leave nothing


def _assert_untouched(tmp_path: Path, before: str | None) -> None:
    """The previous output (or none) is still there, and no temporary folder is left beside it."""
    out = tmp_path / "prepared"
    assert (prepared_digest(out) if out.exists() else None) == before
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".prepared")] == []


@pytest.fixture
def previous_output(tmp_path: Path) -> str:
    """A finished earlier fetch, which a failing fetch must not destroy."""
    _prepare(tmp_path, max_images=50)
    return prepared_digest(tmp_path / "prepared")


def test_sha256_mismatch_refused(http_server: tuple[str, Path], tmp_path: Path, previous_output: str) -> None:
    base, served = http_server
    archive, _ = cifar10_archive(served, np.random.default_rng(0))
    with pytest.raises(DataError, match="sha256"):
        _prepare(tmp_path, source="cifar10", url=f"{base}/{archive.name}", sha256="0" * 64)
    _assert_untouched(tmp_path, previous_output)


def test_truncated_archive_refused(http_server: tuple[str, Path], tmp_path: Path, previous_output: str) -> None:
    base, served = http_server
    archive, _ = cifar10_archive(served, np.random.default_rng(0))
    archive.write_bytes(archive.read_bytes()[: archive.stat().st_size // 2])  # its sha256 now matches the cut
    with pytest.raises(DataError, match="corrupt or truncated"):
        _prepare(tmp_path, source="cifar10", url=f"{base}/{archive.name}", sha256=sha256(archive))
    _assert_untouched(tmp_path, previous_output)


def test_path_traversal_member_refused(http_server: tuple[str, Path], tmp_path: Path, previous_output: str) -> None:
    base, served = http_server
    write_image_folder(tmp_path / "pets", {"cat": random_images(np.random.default_rng(0), 4, 8)})
    archive = archive_folder(tmp_path / "pets", served / "pets.tar.gz")
    with tarfile.open(archive, "r:gz") as tar:
        members = [(m, tar.extractfile(m).read() if m.isfile() else None) for m in tar.getmembers()]
    with tarfile.open(archive, "w:gz") as tar:
        for member, data in members:
            tar.addfile(member, io.BytesIO(data) if data is not None else None)
        evil = tarfile.TarInfo("pets/../../escaped.txt")
        evil.size = 4
        tar.addfile(evil, io.BytesIO(b"evil"))
    with pytest.raises(DataError, match=r"escaped\.txt"):
        _prepare(tmp_path, source="imagefolder", url=f"{base}/{archive.name}", sha256=sha256(archive))
    _assert_untouched(tmp_path, previous_output)
    assert not list(tmp_path.rglob("escaped.txt"))


@pytest.mark.parametrize("url", ["ftp://127.0.0.1/x.tar.gz", "not a url", "http://127.0.0.1:9/missing.tar.gz"])
def test_bad_url_refused(tmp_path: Path, previous_output: str, url: str) -> None:
    with pytest.raises(DataError, match=r"x\.tar\.gz|not a url|missing\.tar\.gz"):
        _prepare(tmp_path, source="imagefolder", url=url, sha256="a" * 64)
    _assert_untouched(tmp_path, previous_output)


def test_missing_member_named(http_server: tuple[str, Path], tmp_path: Path) -> None:
    base, served = http_server
    archive = served / "cifar-10-binary.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        info = tarfile.TarInfo("cifar-10-batches-bin/test_batch.bin")
        info.size = 3073
        tar.addfile(info, io.BytesIO(bytes(3073)))
    with pytest.raises(DataError, match=r"data_batch_1\.bin: missing"):
        _prepare(tmp_path, source="cifar10", url=f"{base}/{archive.name}", sha256=sha256(archive))
    _assert_untouched(tmp_path, None)
