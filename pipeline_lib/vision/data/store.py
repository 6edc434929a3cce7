"""The prepared-dataset store: one folder per split with `images.npy`, `labels.npy` and `meta.json`.

`images.npy` is uint8 (N, H, W, C), read back memory-mapped; `labels.npy` is int64 (N,) and absent for the
unlabeled split; `meta.json` records the source, class names, shape, the sha256 of each `.npy` file and the
split seed. Writers stream rows in chunks with plain file writes, so a split larger than memory is written without
holding it; a source is an array (memory-mapped or not) or a `RowSource` that reads its rows itself, a chunk at a
time (an image folder decoded in worker processes, a written split read back).
"""

from __future__ import annotations

import hashlib
import io
import itertools
import json
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Protocol

import numpy as np
from tqdm import tqdm

from pipeline_lib.core.download import sha256_file
from pipeline_lib.core.errors import DataError

SPLITS = ("unlabeled", "labeled", "rl", "test")
CHUNK_ROWS = 4096  # rows per chunk read from an array source, at most
CHUNK_BYTES = 16 << 20  # and bytes per chunk, at most: memory grows with neither the split nor the image size
_SUM_ROWS = 16384  # rows of a (rows, W * C) block summed in uint32: 255^2 * 16384 < 2^32, so the sums are exact
_SUM_ELEMENTS = 1 << 22  # pixel values per block, at most (the uint16 squares are twice that in bytes)


Sums = tuple[np.ndarray, np.ndarray]  # per-channel sums of pixel values and of their squares: `channel_sums`


class RowSource(Protocol):
    """Rows that a source reads itself, in order, a bounded chunk at a time."""

    @property
    def shape(self) -> tuple[int, ...]: ...

    def __len__(self) -> int: ...

    def chunks(self, rows: np.ndarray) -> Iterator[tuple[np.ndarray, Sums | None]]:
        """uint8 (n, H, W, C) arrays that together hold rows `rows`, in that order, each with its `channel_sums`
        when the source computed them (worker processes do), else None."""
        ...


ImageRows = np.ndarray | RowSource


class _Bar(tqdm):
    """The trainers' tqdm bar without tqdm's monitor thread, so that a source may fork worker processes under it."""

    monitor_interval = 0


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
    parts: Sequence[tuple[ImageRows, np.ndarray]],
    labels: np.ndarray | None,
    meta: dict[str, Any],
) -> dict[str, Any]:
    """Write a split from rows `idx` of each `(images, idx)` part, in order; return its meta.

    `labels` must follow the same order. Sorted `idx` read memory-mapped sources front to back. Rows are written a
    chunk at a time with file writes (a memory map would keep every written page resident), with a progress bar.

    The sha256 of `images.npy` and the per-channel pixel mean and std (on the 0..1 scale, from exact integer sums)
    are accumulated while writing and stored in meta, so later stages can normalise without another pass over the
    data.
    """
    folder.mkdir(parents=True)
    count = sum(len(idx) for _, idx in parts)
    shape = (count, *(int(n) for n in parts[0][0].shape[1:]))
    channels = shape[-1]
    sums = np.zeros(channels, dtype=np.uint64)
    squares = np.zeros(channels, dtype=np.uint64)
    digest = hashlib.sha256()
    written = 0
    with open(folder / "images.npy", "wb") as file, _Bar(total=count, desc=folder.name, unit="img",
                                                          dynamic_ncols=True, mininterval=1.0) as bar:
        _write(file, digest, _npy_header(shape))
        for source, idx in parts:
            for chunk, known in row_chunks(source, np.asarray(idx, dtype=np.int64)):
                if chunk.shape[1:] != shape[1:]:
                    raise DataError(f"{folder}: a source gave rows of shape {chunk.shape[1:]}, not {shape[1:]}")
                chunk = np.ascontiguousarray(chunk, dtype=np.uint8)
                _write(file, digest, chunk)
                chunk_sums, chunk_squares = channel_sums(chunk) if known is None else known
                sums += chunk_sums
                squares += chunk_squares
                written += len(chunk)
                bar.update(len(chunk))
    if written != count:
        raise DataError(f"{folder}: the sources gave {written} rows for {count} indices")
    mean, std = _mean_std(sums, squares, count * shape[1] * shape[2])
    digests = {"images.npy": digest.hexdigest()}
    if labels is not None:
        np.save(folder / "labels.npy", labels.astype(np.int64))
        digests["labels.npy"] = sha256_file(folder / "labels.npy")
    meta = {
        **meta,
        "num_images": count,
        "shape": list(shape),
        "dtype": "uint8",
        "sha256": digests,
        "pixel_mean": [round(m, 6) for m in mean],
        "pixel_std": [round(s, 6) for s in std],
    }
    if labels is not None:
        meta["class_counts"] = np.bincount(labels, minlength=len(meta["class_names"])).tolist()
    (folder / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    return meta


def chunk_rows(row_shape: Sequence[int]) -> int:
    """Rows of this shape per chunk: CHUNK_ROWS, fewer where they would pass CHUNK_BYTES (at least 1)."""
    return max(1, min(CHUNK_ROWS, CHUNK_BYTES // max(1, math.prod(row_shape))))


def row_chunks(source: ImageRows, rows: np.ndarray) -> Iterator[tuple[np.ndarray, Sums | None]]:
    """Rows `rows` of `source` in order, a chunk at a time, as `RowSource.chunks` gives them (an array's with no
    sums)."""
    if not isinstance(source, np.ndarray):
        yield from source.chunks(rows)
        return
    step = chunk_rows(source.shape[1:])
    for start in range(0, len(rows), step):
        yield np.asarray(source[rows[start : start + step]], dtype=np.uint8), None


def channel_sums(images: np.ndarray) -> Sums:
    """(N, H, W, C) uint8 -> per-channel sums of the values and of their squares, (C,) uint64 each, exact.

    Summed over contiguous (rows, W * C) blocks, whose column sums fit uint32, and the squares in uint16
    (255^2 < 2^16): about ten times faster than float64, and independent of how the images are chunked.
    """
    channels = images.shape[-1]
    flat = np.ascontiguousarray(images).reshape(-1, images.shape[-2] * channels)  # (N * H, W * C)
    step = max(1, min(_SUM_ROWS, _SUM_ELEMENTS // max(1, flat.shape[1])))
    sums = np.zeros(channels, dtype=np.uint64)
    squares = np.zeros(channels, dtype=np.uint64)
    for start in range(0, len(flat), step):
        block = flat[start : start + step]
        sums += block.sum(axis=0, dtype=np.uint32).reshape(-1, channels).sum(axis=0, dtype=np.uint64)
        squared = block.astype(np.uint16)
        np.multiply(squared, squared, out=squared)
        squares += squared.sum(axis=0, dtype=np.uint32).reshape(-1, channels).sum(axis=0, dtype=np.uint64)
    return sums, squares


def pixel_mean_std(images: np.ndarray) -> tuple[list[float], list[float]]:
    """Per-channel mean and std on the 0..1 scale of (N, H, W, C) uint8 images, rounded as a split's meta.json
    records them (`pixel_mean`, `pixel_std`)."""
    mean, std = _mean_std(*channel_sums(images), math.prod(images.shape[:3]))
    return [round(m, 6) for m in mean], [round(s, 6) for s in std]


def _mean_std(sums: np.ndarray, squares: np.ndarray, pixels: int) -> tuple[list[float], list[float]]:
    """Per-channel mean and std on the 0..1 scale from exact sums over `pixels` pixels (0 for no pixels)."""
    pixels = max(pixels, 1)
    mean = [int(s) / (255 * pixels) for s in sums]
    # var * pixels^2 = pixels * sum(x^2) - sum(x)^2, exact in integers
    std = [math.sqrt(max(int(q) * pixels - int(s) ** 2, 0)) / (255 * pixels)
           for s, q in zip(sums, squares, strict=True)]
    return mean, std


def _npy_header(shape: tuple[int, ...]) -> bytes:
    """The `.npy` header of a C-order uint8 array of `shape`, as `np.save` and `open_memmap` write it."""
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        header, {"descr": np.lib.format.dtype_to_descr(np.dtype(np.uint8)), "fortran_order": False, "shape": shape}
    )
    return header.getvalue()


def _write(file: BinaryIO, digest: Any, data: bytes | np.ndarray) -> None:
    view = memoryview(data).cast("B") if isinstance(data, np.ndarray) else data
    file.write(view)
    digest.update(view)


class StoredImages:
    """The rows of a written `images.npy`, read with file reads in chunks: a `RowSource` (the store reads the labeled
    and rl splits back from the unlabeled split so). Unlike a memory map, reading every row keeps nothing resident
    beyond the chunk in hand."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        with open(self.path, "rb") as file:
            version = np.lib.format.read_magic(file)
            read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else (
                np.lib.format.read_array_header_2_0)
            shape, fortran_order, dtype = read_header(file)
            self.offset = file.tell()
        if dtype != np.uint8 or fortran_order or len(shape) != 4:
            raise DataError(f"{self.path}: expected a C-order uint8 (N, H, W, C) array, found {dtype} {shape}")
        self.shape: tuple[int, ...] = tuple(shape)

    def __len__(self) -> int:
        return self.shape[0]

    def take(self, index: np.ndarray) -> np.ndarray:
        """Rows `index` (any order) as one (n, H, W, C) array: a training batch read without a memory map, whose
        pages would stay resident until the whole split is."""
        index = np.asarray(index, dtype=np.int64)
        if len(index) and (index.min() < 0 or index.max() >= self.shape[0]):
            raise IndexError(f"{self.path}: rows {index.min()}..{index.max()} outside 0..{self.shape[0] - 1}")
        order = np.argsort(index, kind="stable")
        out = np.empty((len(index), *self.shape[1:]), dtype=np.uint8)
        start = 0
        for chunk, _ in self.chunks(index[order]):
            out[order[start : start + len(chunk)]] = chunk
            start += len(chunk)
        return out

    def chunks(self, rows: np.ndarray) -> Iterator[tuple[np.ndarray, Sums | None]]:
        """Rows `rows` in order, without sums; each run of consecutive rows is one read."""
        row_bytes = math.prod(self.shape[1:])
        step = chunk_rows(self.shape[1:])
        with open(self.path, "rb", buffering=0) as file:
            for start in range(0, len(rows), step):
                block = np.asarray(rows[start : start + step], dtype=np.int64)
                out = np.empty((len(block), *self.shape[1:]), dtype=np.uint8)
                breaks = [0, *(np.flatnonzero(np.diff(block) != 1) + 1).tolist(), len(block)]
                for first, end in itertools.pairwise(breaks):
                    file.seek(self.offset + int(block[first]) * row_bytes)
                    view, done = memoryview(out[first:end]).cast("B"), 0
                    while done < len(view):
                        got = file.readinto(view[done:])
                        if not got:
                            raise DataError(f"{self.path}: ends before row {block[end - 1]} of {self.shape[0]}")
                        done += got
                yield out, None


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
