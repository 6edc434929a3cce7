"""The prepared-dataset store: one folder per split with `images.npy`, `labels.npy` and `meta.json`.

`images.npy` is uint8 (N, H, W, C), read back memory-mapped; `labels.npy` is int64 (N,) and absent for the
unlabeled split; `meta.json` records the source, class names, shape, the sha256 of each `.npy` file and the
split seed. Writers stream rows in chunks, so a split larger than memory is written without holding it.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline_lib.core.download import sha256_file
from pipeline_lib.core.errors import DataError

SPLITS = ("unlabeled", "labeled", "rl", "test")
CHUNK_ROWS = 4096


@dataclass(frozen=True)
class Split:
    """A prepared split as read back: memory-mapped images, labels (None when unlabeled) and meta."""

    images: np.ndarray
    labels: np.ndarray | None
    meta: dict[str, Any]

    def __len__(self) -> int:
        return len(self.images)

    @property
    def class_names(self) -> list[str]:
        return list(self.meta["class_names"])


def write_split(
    folder: Path,
    parts: Sequence[tuple[np.ndarray, np.ndarray]],
    labels: np.ndarray | None,
    meta: dict[str, Any],
) -> dict[str, Any]:
    """Write a split from rows `idx` of each `(images, idx)` part, in order; return its meta.

    `labels` must follow the same order. Sorted `idx` read memory-mapped sources front to back.

    Per-channel pixel mean and std (on the 0..1 scale) are accumulated while writing and stored in meta,
    so later stages can normalise without another pass over the data.
    """
    folder.mkdir(parents=True)
    count = sum(len(idx) for _, idx in parts)
    height, width, channels = parts[0][0].shape[1:]
    images = np.lib.format.open_memmap(folder / "images.npy", mode="w+", dtype=np.uint8,
                                       shape=(count, height, width, channels))
    sums = np.zeros(channels, dtype=np.float64)
    squares = np.zeros(channels, dtype=np.float64)
    row = 0
    for source, idx in parts:
        for start in range(0, len(idx), CHUNK_ROWS):
            chunk = np.asarray(source[idx[start : start + CHUNK_ROWS]], dtype=np.uint8)
            images[row : row + len(chunk)] = chunk
            as_float = chunk.reshape(-1, channels).astype(np.float64) / 255.0
            sums += as_float.sum(axis=0)
            squares += np.square(as_float).sum(axis=0)
            row += len(chunk)
    images.flush()
    del images
    pixels = max(count * height * width, 1)
    mean = sums / pixels
    std = np.sqrt(np.maximum(squares / pixels - np.square(mean), 0.0))
    digests = {"images.npy": sha256_file(folder / "images.npy")}
    if labels is not None:
        np.save(folder / "labels.npy", labels.astype(np.int64))
        digests["labels.npy"] = sha256_file(folder / "labels.npy")
    meta = {
        **meta,
        "num_images": count,
        "shape": [count, height, width, channels],
        "dtype": "uint8",
        "sha256": digests,
        "pixel_mean": [round(float(m), 6) for m in mean],
        "pixel_std": [round(float(s), 6) for s in std],
    }
    if labels is not None:
        meta["class_counts"] = np.bincount(labels, minlength=len(meta["class_names"])).tolist()
    (folder / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    return meta


def read_meta(root: Path, name: str) -> dict[str, Any]:
    """The `meta.json` of split `name` under a prepared-data folder (its shape, class names, digests), without
    opening its arrays: what a stage checks its params against before any work."""
    meta_file = Path(root) / name / "meta.json"
    if not meta_file.is_file():
        available = sorted(p.name for p in Path(root).iterdir() if (p / "meta.json").is_file()) if Path(
            root).is_dir() else []
        raise DataError(f"{meta_file.parent}: no prepared split {name!r} (available: {', '.join(available) or 'none'})")
    return json.loads(meta_file.read_text())


def image_origin(meta: dict[str, Any], root: Path) -> str:
    """How an error names where prepared images (of a split's `meta`) come from."""
    return f"data.source {meta['source']!r} in {root}"


def read_split(root: Path, name: str, *, verify: bool = False) -> Split:
    """Open split `name` under a prepared-data folder; with `verify`, check each array's sha256 first."""
    folder = Path(root) / name
    meta = read_meta(root, name)
    if verify:
        for file, expected in meta["sha256"].items():
            actual = sha256_file(folder / file)
            if actual != expected:
                raise DataError(f"{folder / file}: sha256 {actual} does not match meta.json ({expected})")
    images = np.load(folder / "images.npy", mmap_mode="r")
    labels = np.load(folder / "labels.npy") if (folder / "labels.npy").is_file() else None
    return Split(images=images, labels=labels, meta=meta)


def prepared_digest(root: Path, splits: Sequence[str] = SPLITS) -> str:
    """One sha256 for a prepared dataset (or some of its `splits`), from the per-array digests its meta files
    record."""
    digest = hashlib.sha256()
    for name in splits:
        meta_file = Path(root) / name / "meta.json"
        if meta_file.is_file():
            digest.update(name.encode())
            for file, value in sorted(json.loads(meta_file.read_text())["sha256"].items()):
                digest.update(f"{file}={value}".encode())
    return digest.hexdigest()
