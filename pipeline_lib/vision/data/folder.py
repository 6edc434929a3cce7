"""Decoding an image folder on every core, in bounded memory.

A folder's images become a `FolderImages`: an (N, H, W, C) uint8 array in shape only, whose rows are decoded when
the store asks for them, in batches by a pool of worker processes, and handed back in file order a batch at a time.
No more than `2 x workers` batches are in flight, so memory does not grow with the number of images, and every
image is decoded by the same function (`load_image`) whatever the number of workers: the bytes do not depend on it.

Before any pixel is decoded, `scan_headers` reads every file's header (PIL reads no pixels on open) to fix one
channel count and size for all of them, and to name the first file that is not an image.

JPEG draft mode (libjpeg decoding at 1/2, 1/4 or 1/8 scale before the resize) is not used: it would change the
pixels of every JPEG whose shorter side is at least twice `data.image_size` (libjpeg's scaled decoding is not PIL's
bicubic filter), and it reduces nothing where that side is shorter: 256 -> 224, or ImageNet's typical 500x375 -> 224.
"""

from __future__ import annotations

import itertools
import multiprocessing
import os
import sys
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import numpy as np

from pipeline_lib.core.errors import DataError
from pipeline_lib.vision.data.store import Sums, channel_sums

BATCH_BYTES = 4 << 20  # decoded pixels per task a worker sends back: large enough to amortise the hand-over
BATCH_IMAGES = 64  # and at most this many images per task (small images)
SCAN_FILES = 256  # files per header-scan task
GRAY_MODES = {"L", "1", "I", "I;16", "F"}  # read as one channel; any other mode in the folder makes it RGB

T = TypeVar("T")


def usable_cores() -> int:
    """The cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


# ----------------------------------------------------------------------------------------------- decoding


def load_image(path: str | Path, mode: str, image_size: int | None) -> np.ndarray:
    """One image as (H, W, C) uint8; with `image_size`, shorter side resized (bicubic) then centre-cropped."""
    from PIL import Image

    with Image.open(path) as image:
        if image.mode != mode:  # `convert` to the same mode is a copy: a tenth of a 256x256 JPEG's time
            image = image.convert(mode)
        if image_size is not None:
            scale = image_size / min(image.size)
            width, height = max(image_size, round(image.width * scale)), max(image_size, round(image.height * scale))
            image = image.resize((width, height), Image.Resampling.BICUBIC)
            left, top = (width - image_size) // 2, (height - image_size) // 2
            image = image.crop((left, top, left + image_size, top + image_size))
        array = np.asarray(image, dtype=np.uint8)
    return array[..., None] if array.ndim == 2 else array


def _unreadable_errors() -> tuple[type[Exception], ...]:
    """What PIL raises for a file that is not a (whole) image: unknown format, truncated data, a decompression bomb."""
    from PIL import Image

    return OSError, SyntaxError, ValueError, Image.DecompressionBombError


def decode_batch(files: Sequence[str], mode: str, image_size: int | None, shape: tuple[int, ...]
                 ) -> tuple[np.ndarray, Sums]:
    """`files` decoded into one (n, H, W, C) uint8 array, with its `channel_sums` (a worker's task: the process
    that writes the split then only hashes and writes the bytes, and keeps up with many more workers).

    Raises:
        DataError: naming the first file that cannot be decoded (truncated, not an image) or decodes to another
            size (possible only without `image_size`).
    """
    out = np.empty((len(files), *shape), dtype=np.uint8)
    for i, path in enumerate(files):
        try:
            image = load_image(path, mode, image_size)
        except _unreadable_errors() as err:
            raise DataError(f"{path}: not a readable image ({err})") from None
        if image.shape != out.shape[1:]:
            raise DataError(f"{path}: decodes to {image.shape[1]}x{image.shape[0]}, the header said "
                            f"{shape[1]}x{shape[0]}; set data.image_size to resize every image")
        out[i] = image
    return out, channel_sums(out)


def scan_batch(files: Sequence[str]) -> tuple[set[str], dict[tuple[int, int], str]]:
    """The modes of `files` and, per (width, height), the first file of that size; headers only (a worker's task).

    Raises:
        DataError: naming the first file PIL cannot identify (not an image, empty, a decompression bomb).
    """
    from PIL import Image

    modes: set[str] = set()
    sizes: dict[tuple[int, int], str] = {}
    for path in files:
        try:
            with Image.open(path) as image:
                modes.add(image.mode)
                sizes.setdefault(image.size, path)
        except _unreadable_errors() as err:
            raise DataError(f"{path}: not a readable image ({err})") from None
    return modes, sizes


def scan_headers(files: Sequence[str], image_size: int | None, workers: int) -> tuple[str, tuple[int, int]]:
    """Fix the mode every image is read in ("L" if all are grayscale, else "RGB") and the (height, width) of all.

    Raises:
        DataError: a file is not an image, or images differ in size and `image_size` is None.
    """
    modes: set[str] = set()
    sizes: dict[tuple[int, int], str] = {}
    tasks = [(files[start : start + SCAN_FILES],) for start in range(0, len(files), SCAN_FILES)]
    for batch_modes, batch_sizes in ordered_map(scan_batch, tasks, workers):
        modes |= batch_modes
        for size, path in batch_sizes.items():
            sizes.setdefault(size, path)
    mode = "L" if modes <= GRAY_MODES else "RGB"
    if image_size is not None:
        return mode, (image_size, image_size)
    if len(sizes) > 1:
        (size_a, file_a), (size_b, file_b) = list(sizes.items())[:2]
        raise DataError(
            f"images differ in size ({file_a}: {size_a[0]}x{size_a[1]}, {file_b}: {size_b[0]}x{size_b[1]}); "
            "set data.image_size to resize and centre-crop them to one square size"
        )
    (width, height), = sizes
    return mode, (height, width)


# ------------------------------------------------------------------------------------------------ the pool


def _context() -> multiprocessing.context.BaseContext:
    """Fork where the platform forks safely (Linux): a worker starts in milliseconds and imports nothing, where a
    spawned one would import the stage's main module (torch, MLflow) first. Workers only decode with PIL and numpy,
    so the parent's threads and locks are nothing to them; the store's progress bar runs no monitor thread."""
    return multiprocessing.get_context("fork" if sys.platform == "linux" else "spawn")


def ordered_map(function: Callable[..., T], tasks: Sequence[tuple[Any, ...]], workers: int) -> Iterator[T]:
    """`function(*task)` for each task, in order, in `workers` processes (in this one when `workers` <= 1).

    At most `2 x workers` tasks are submitted ahead of the one handed back, so finished results wait in memory for
    at most that many. The first error a task raises is raised here, after the pool has stopped.
    """
    workers = min(workers, len(tasks))
    if workers <= 1:
        for task in tasks:
            yield function(*task)
        return
    pool = ProcessPoolExecutor(workers, mp_context=_context())
    try:
        todo = iter(tasks)
        pending: deque[Future[T]] = deque(pool.submit(function, *task) for task in itertools.islice(todo, 2 * workers))
        while pending:
            result = pending.popleft().result()
            pending.extend(pool.submit(function, *task) for task in itertools.islice(todo, 1))
            yield result
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


# ---------------------------------------------------------------------------------------------- the array


@dataclass(frozen=True)
class FolderImages:
    """Image files read as one (N, H, W, C) uint8 array, decoded only when rows are asked for.

    `chunks(rows)` decodes rows in `workers` processes, a batch at a time, in order (what the store writes from);
    indexing decodes in this process (a few rows).

    Attributes:
        files: one file per row (strings: a third of the memory of `Path`s, for a million files).
        mode: the PIL mode every image is converted to ("L" or "RGB").
        image_size: the square side every image is resized and centre-cropped to, or None to keep the size.
        size: (height, width) of every image as stored.
        workers: decoding processes for `chunks`.
    """

    files: tuple[str, ...]
    mode: str
    image_size: int | None
    size: tuple[int, int]
    workers: int = 1
    dtype: ClassVar[np.dtype] = np.dtype(np.uint8)

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return (len(self.files), *self.size, 1 if self.mode == "L" else 3)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, rows: Any) -> np.ndarray:
        picked = np.arange(len(self.files))[rows]
        images, _ = decode_batch([self.files[i] for i in np.atleast_1d(picked)], self.mode, self.image_size,
                                 self.shape[1:])
        return images[0] if picked.ndim == 0 else images

    def chunks(self, rows: np.ndarray) -> Iterator[tuple[np.ndarray, Sums]]:
        """Rows `rows`, decoded in order, one batch of at most BATCH_BYTES (and BATCH_IMAGES) at a time, with its
        `channel_sums`."""
        files = [self.files[i] for i in rows]
        per_batch = max(1, min(BATCH_IMAGES, BATCH_BYTES // int(np.prod(self.shape[1:]))))
        tasks = [(files[start : start + per_batch], self.mode, self.image_size, self.shape[1:])
                 for start in range(0, len(files), per_batch)]
        yield from ordered_map(decode_batch, tasks, self.workers)


def open_folder_images(pools: Sequence[Sequence[Path]], image_size: int | None, workers: int | None = None
                       ) -> list[FolderImages]:
    """One `FolderImages` per list of files, all in the mode and size that the headers of all of them fix.

    Args:
        pools: lists of image files (training, test, extra unlabeled), each in row order.
        image_size: resize and centre-crop every image to this square side; None: all must share one size.
        workers: decoding processes; None: one per usable core.

    Raises:
        DataError: a file is not an image, or sizes differ without `image_size`.
    """
    workers = usable_cores() if workers is None else max(1, workers)
    names = [tuple(str(path) for path in files) for files in pools]
    mode, size = scan_headers([path for files in names for path in files], image_size, workers)
    return [FolderImages(files, mode, image_size, size, workers) for files in names]
