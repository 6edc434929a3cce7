"""Tiny archives in the official layouts of each source, built from known images for exact comparison.

Images are random uint8, so a transposed, flipped or channel-swapped read cannot match by accident.
"""

from __future__ import annotations

import hashlib
import io
import tarfile
import zipfile
from pathlib import Path

import numpy as np
from PIL import Image


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def random_images(rng: np.random.Generator, count: int, side: int, channels: int = 3) -> np.ndarray:
    """(count, side, side, channels) uint8 noise."""
    return rng.integers(0, 256, size=(count, side, side, channels), dtype=np.uint8)


def _add_bytes(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def cifar10_archive(folder: Path, rng: np.random.Generator, per_batch: int = 4) -> tuple[Path, dict]:
    """`cifar-10-binary.tar.gz`: records of 1 label byte + R, G, B planes, each row-major 32x32."""
    expected: dict[str, list] = {"train_images": [], "train_labels": []}
    path = folder / "cifar-10-binary.tar.gz"
    with tarfile.open(path, "w:gz") as tar:
        for name in [f"data_batch_{i}.bin" for i in range(1, 6)] + ["test_batch.bin"]:
            images = random_images(rng, per_batch, 32)
            labels = rng.integers(0, 10, size=per_batch, dtype=np.uint8)
            planes = images.transpose(0, 3, 1, 2).reshape(per_batch, -1)  # (N, H, W, C) -> (N, C*H*W)
            records = np.concatenate([labels[:, None], planes], axis=1)
            _add_bytes(tar, f"cifar-10-batches-bin/{name}", records.tobytes())
            if name == "test_batch.bin":
                expected["test_images"], expected["test_labels"] = images, labels.astype(np.int64)
            else:
                expected["train_images"].append(images)
                expected["train_labels"].append(labels.astype(np.int64))
        _add_bytes(tar, "cifar-10-batches-bin/batches.meta.txt",
                   b"airplane\nautomobile\nbird\ncat\ndeer\ndog\nfrog\nhorse\nship\ntruck\n\n")
    expected["train_images"] = np.concatenate(expected["train_images"])
    expected["train_labels"] = np.concatenate(expected["train_labels"])
    return path, expected


def _stl_bytes(images: np.ndarray) -> bytes:
    """Each image as 3 channel planes, each plane stored column-major, as in `stl10_binary`."""
    return np.ascontiguousarray(images.transpose(0, 3, 2, 1)).tobytes()  # (N, C, W, H)


def stl10_archive(folder: Path, rng: np.random.Generator, train: int = 20, test: int = 10,
                  unlabeled: int = 6) -> tuple[Path, dict]:
    """`stl10_binary.tar.gz` with 96x96x3 images and labels 1..10 (every class in train)."""
    expected = {
        "train_images": random_images(rng, train, 96),
        "train_labels": np.arange(train, dtype=np.int64) % 10,
        "test_images": random_images(rng, test, 96),
        "test_labels": rng.integers(0, 10, size=test).astype(np.int64),
        "unlabeled_images": random_images(rng, unlabeled, 96),
    }
    path = folder / "stl10_binary.tar.gz"
    with tarfile.open(path, "w:gz") as tar:
        _add_bytes(tar, "stl10_binary/train_X.bin", _stl_bytes(expected["train_images"]))
        _add_bytes(tar, "stl10_binary/train_y.bin", (expected["train_labels"] + 1).astype(np.uint8).tobytes())
        _add_bytes(tar, "stl10_binary/test_X.bin", _stl_bytes(expected["test_images"]))
        _add_bytes(tar, "stl10_binary/test_y.bin", (expected["test_labels"] + 1).astype(np.uint8).tobytes())
        _add_bytes(tar, "stl10_binary/unlabeled_X.bin", _stl_bytes(expected["unlabeled_images"]))
        names = "airplane bird car cat deer dog horse monkey ship truck".replace(" ", "\n")
        _add_bytes(tar, "stl10_binary/class_names.txt", names.encode())
    return path, expected


def write_image_folder(root: Path, images_by_class: dict[str, np.ndarray]) -> None:
    """One subfolder per class of PNG files (or files directly in `root` for the class name "")."""
    for name, images in images_by_class.items():
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        for i, image in enumerate(images):
            Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(folder / f"{i:03d}.png")


def archive_folder(folder: Path, archive: Path) -> Path:
    """Pack `folder` as a .tar.gz or .zip (by suffix) with one top-level folder named like `folder`."""
    if archive.suffix == ".zip":
        with zipfile.ZipFile(archive, "w") as zf:
            for file in sorted(folder.rglob("*")):
                zf.write(file, f"{folder.name}/{file.relative_to(folder)}")
    else:
        with tarfile.open(archive, "w:gz") as tar:
            tar.add(folder, arcname=folder.name)
    return archive
