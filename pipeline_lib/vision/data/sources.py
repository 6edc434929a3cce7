"""Data sources: each turns `data.*` params into a `RawDataset` of uint8 N x H x W x C arrays.

Sources read archives in their official layouts and never unpickle anything: CIFAR-10 comes from the binary
version (`cifar-10-binary.tar.gz`), STL-10 from `stl10_binary.tar.gz`. Large arrays stay memory-mapped views
of the extracted files, so preparing STL-10's 100k unlabeled images never holds them all in memory. An image
folder is read as `FolderImages` (folder.py): headers here, pixels decoded on every core while the splits are written.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pipeline_lib.core.download import download, extract_archive
from pipeline_lib.core.errors import ConfigError, DataError
from pipeline_lib.vision.config import DataParams
from pipeline_lib.vision.data.folder import open_folder_images
from pipeline_lib.vision.data.store import ImageRows

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")


@dataclass
class RawDataset:
    """Images as a source delivers them, before capping and splitting.

    Attributes:
        train_images: (N, H, W, C) uint8 training pool (may be a memory-mapped view, or a folder decoded on read).
        train_labels: (N,) int64 class ids, or None for an unlabeled-only source.
        test_images: (M, H, W, C) uint8 official test split, or None to carve one from the training pool.
        test_labels: (M,) int64, or None.
        extra_unlabeled: (U, H, W, C) uint8 images that only ever join the unlabeled split (STL-10's pool).
        class_names: one name per class id.
        origin: where the data came from (url and sha256, folder, package version), recorded in meta.json.
    """

    train_images: ImageRows
    train_labels: np.ndarray | None
    class_names: list[str]
    origin: dict[str, Any]
    test_images: ImageRows | None = None
    test_labels: np.ndarray | None = None
    extra_unlabeled: ImageRows | None = field(default=None)


def load_source(cfg: DataParams, cache_dir: Path, *, workers: int | None = None) -> RawDataset:
    """Fetch (download, verify, extract) and read the source `cfg.source` names; an image folder is decoded later,
    as its splits are written, by `workers` processes (None: one per usable core)."""
    if cfg.source == "imagefolder":  # the one source that decodes files
        return load_imagefolder(cfg, Path(cache_dir), workers=workers)
    return SOURCES[cfg.source](cfg, Path(cache_dir))


def _fetch_archive(cfg: DataParams, cache_dir: Path) -> tuple[Path, dict[str, Any]]:
    """Download and extract `cfg.archive`; return the extracted folder and its origin record."""
    url, sha256 = cfg.archive  # type: ignore[misc]  # sources that call this always have one
    archive = download(url, sha256, cache_dir)
    return extract_archive(archive, cache_dir), {"url": url, "sha256": sha256}


def _find_dir(root: Path, marker: str) -> Path:
    """The folder under `root` (itself included) that holds the file `marker`."""
    if (root / marker).is_file():
        return root
    found = sorted(p.parent for p in root.rglob(marker) if p.is_file())
    if not found:
        raise DataError(f"{root}: archive does not contain {marker!r}; is this the right archive?")
    return found[0]


def _read_bytes(path: Path) -> np.ndarray:
    if not path.is_file():
        raise DataError(f"{path}: missing from the archive")
    return np.memmap(path, dtype=np.uint8, mode="r") if path.stat().st_size else np.zeros(0, np.uint8)


# ---------------------------------------------------------------------------------------------- digits


def load_digits(cfg: DataParams, cache_dir: Path) -> RawDataset:
    """scikit-learn's bundled 8x8 digits (1,797 images, pixel values 0..16), scaled to 0..255."""
    import sklearn
    from sklearn.datasets import load_digits as sklearn_digits

    bunch = sklearn_digits()
    images = np.rint(bunch.images * (255.0 / 16.0)).astype(np.uint8)[..., None]  # (N, 8, 8, 1)
    labels = bunch.target.astype(np.int64)
    digest = hashlib.sha256(images.tobytes() + labels.tobytes()).hexdigest()
    origin = {"package": f"scikit-learn {sklearn.__version__}", "sha256": digest}
    return RawDataset(images, labels, [str(c) for c in bunch.target_names], origin)


# --------------------------------------------------------------------------------------------- cifar10

CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
_CIFAR_RECORD = 1 + 3 * 32 * 32


def _read_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """One binary batch: records of 1 label byte + 3072 bytes (R, G, B planes, each row-major 32x32)."""
    raw = _read_bytes(path)
    if raw.size == 0 or raw.size % _CIFAR_RECORD:
        raise DataError(f"{path}: {raw.size} bytes is not a whole number of {_CIFAR_RECORD}-byte CIFAR records")
    records = raw.reshape(-1, _CIFAR_RECORD)
    labels = records[:, 0].astype(np.int64)
    if labels.max() >= len(CIFAR10_CLASSES):
        raise DataError(f"{path}: label {labels.max()} out of range 0..9")
    images = records[:, 1:].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)  # (N, C, H, W) -> (N, H, W, C)
    return np.ascontiguousarray(images), labels


def load_cifar10(cfg: DataParams, cache_dir: Path) -> RawDataset:
    """CIFAR-10 from the official binary archive: 5 training batches and one test batch."""
    root, origin = _fetch_archive(cfg, cache_dir)
    folder = _find_dir(root, "test_batch.bin")
    train = [_read_cifar_batch(folder / f"data_batch_{i}.bin") for i in range(1, 6)]
    test_images, test_labels = _read_cifar_batch(folder / "test_batch.bin")
    names_file = folder / "batches.meta.txt"
    names = [n.strip() for n in names_file.read_text().splitlines() if n.strip()] if names_file.is_file() else []
    return RawDataset(
        train_images=np.concatenate([images for images, _ in train]),
        train_labels=np.concatenate([labels for _, labels in train]),
        class_names=names if len(names) == len(CIFAR10_CLASSES) else CIFAR10_CLASSES,
        origin=origin,
        test_images=test_images,
        test_labels=test_labels,
    )


# ----------------------------------------------------------------------------------------------- stl10

_STL_SIDE = 96
_STL_IMAGE = 3 * _STL_SIDE * _STL_SIDE


def _read_stl_images(path: Path) -> np.ndarray:
    """(N, H, W, C) view of an STL-10 `*_X.bin`: per image, 3 channel planes each stored column-major."""
    raw = _read_bytes(path)
    if raw.size % _STL_IMAGE:
        raise DataError(f"{path}: {raw.size} bytes is not a whole number of 96x96x3 images")
    return raw.reshape(-1, 3, _STL_SIDE, _STL_SIDE).transpose(0, 3, 2, 1)  # (N, C, W, H) -> (N, H, W, C)


def _read_stl_labels(path: Path, count: int) -> np.ndarray:
    labels = np.asarray(_read_bytes(path), dtype=np.int64)
    if labels.size != count:
        raise DataError(f"{path}: {labels.size} labels for {count} images")
    if labels.size and (labels.min() < 1 or labels.max() > 10):
        raise DataError(f"{path}: labels must be 1..10, found {labels.min()}..{labels.max()}")
    return labels - 1


def load_stl10(cfg: DataParams, cache_dir: Path) -> RawDataset:
    """STL-10 from the official binary archive; its 100k unlabeled images join the unlabeled split."""
    root, origin = _fetch_archive(cfg, cache_dir)
    folder = _find_dir(root, "train_X.bin")
    train_images = _read_stl_images(folder / "train_X.bin")
    test_images = _read_stl_images(folder / "test_X.bin")
    names_file = folder / "class_names.txt"
    names = [n.strip() for n in names_file.read_text().splitlines() if n.strip()] if names_file.is_file() else []
    return RawDataset(
        train_images=train_images,
        train_labels=_read_stl_labels(folder / "train_y.bin", len(train_images)),
        class_names=names or [str(i) for i in range(10)],
        origin=origin,
        test_images=test_images,
        test_labels=_read_stl_labels(folder / "test_y.bin", len(test_images)),
        extra_unlabeled=_read_stl_images(folder / "unlabeled_X.bin"),
    )


# ----------------------------------------------------------------------------------------- imagefolder


def load_imagefolder(cfg: DataParams, cache_dir: Path, *, workers: int | None = None) -> RawDataset:
    """Images from a folder (or an archive of one), in one of three layouts.

    - `train/<class>/...`, optional `test/<class>/...`, optional `unlabeled/...` (any depth);
    - `<class>/...`: one subfolder per class, the test split carved out by `data.test_fraction`;
    - image files only (any depth): unlabeled-only data.

    Only the headers are read here (every file's, to fix one mode and size); the pools are `FolderImages`, decoded
    by `workers` processes (None: one per usable core) while the store writes the splits.
    """
    if cfg.url is not None:
        root, origin = _fetch_archive(cfg, cache_dir)
        entries = [p for p in root.iterdir() if not p.name.startswith(".")]
        if len(entries) == 1 and entries[0].is_dir():  # an archive of one top-level folder
            root = entries[0]
    else:
        root, origin = local_folder(cfg), {"path": str(cfg.path)}
    if (root / "train").is_dir():
        train_files, train_labels, names = _class_layout(root / "train")
        test = _class_layout(root / "test", names) if (root / "test").is_dir() else None
        extra = _image_files(root / "unlabeled") if (root / "unlabeled").is_dir() else []
    elif any(p.is_dir() and not p.name.startswith(".") for p in root.iterdir()):
        (train_files, train_labels, names), test, extra = _class_layout(root), None, []
    else:
        train_files, train_labels, names, test, extra = _image_files(root), None, [], None, []
    if not train_files:
        raise DataError(f"{root}: no images found (looked for {', '.join(IMAGE_SUFFIXES)})")
    train_images, test_images, extra_images = open_folder_images(
        [train_files, test[0] if test else [], extra], cfg.image_size, workers)
    return RawDataset(
        train_images=train_images,
        train_labels=train_labels,
        class_names=names,
        origin=origin,
        test_images=test_images if test else None,
        test_labels=test[1] if test else None,
        extra_unlabeled=extra_images if extra else None,
    )


def local_folder(cfg: DataParams) -> Path:
    """The folder `data.path` names (imagefolder without `data.url`); the fetch stage checks it before its run.

    Raises:
        ConfigError: it is not a folder.
    """
    root = Path(cfg.path).expanduser()  # type: ignore[arg-type]  # DataParams requires path without url
    if not root.is_dir():
        raise ConfigError(f"data.path={cfg.path!r}: not a folder (accepted: a folder of images, one subfolder per "
                          "class, or flat for unlabeled)")
    return root


def _image_files(folder: Path) -> list[Path]:
    return sorted(
        p for p in folder.rglob("*")
        if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".")
    )


def _class_layout(folder: Path, names: list[str] | None = None) -> tuple[list[Path], np.ndarray, list[str]]:
    """Files and labels of a one-subfolder-per-class folder; `names` fixes the class ids (for test)."""
    found = sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    if names is not None and set(found) - set(names):
        raise DataError(f"{folder}: classes {sorted(set(found) - set(names))} are not in the training classes")
    names = names if names is not None else found
    files: list[Path] = []
    labels: list[int] = []
    for class_id, name in enumerate(names):
        class_files = _image_files(folder / name) if (folder / name).is_dir() else []
        files += class_files
        labels += [class_id] * len(class_files)
    return files, np.asarray(labels, dtype=np.int64), names


SOURCES: dict[str, Callable[[DataParams, Path], RawDataset]] = {
    "digits": load_digits,
    "cifar10": load_cifar10,
    "stl10": load_stl10,
    "imagefolder": load_imagefolder,
}
