"""An image folder fetched by a pool of decoding processes: the same bytes for any worker count and as the plain
single-process loader gives, memory that holds no split, and a bad file among many named before anything is kept."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline_lib.core.errors import DataError
from pipeline_lib.vision.config import DataParams
from pipeline_lib.vision.data.folder import ordered_map
from pipeline_lib.vision.data.prepare import prepare_dataset, split_indices
from pipeline_lib.vision.data.sources import load_source
from pipeline_lib.vision.data.store import SPLITS, StoredImages, prepared_digest, read_split, write_split

ROOT = Path(__file__).resolve().parents[3]
SIZE = 48  # data.image_size of the tests


def _picture(rng: np.random.Generator, width: int, height: int) -> Image.Image:
    """Smooth colour noise: compresses like a photo, so JPEG decoding does real work."""
    coarse = Image.fromarray(rng.integers(0, 256, (6, 6, 3), dtype=np.uint8))
    return coarse.resize((width, height), Image.Resampling.BICUBIC)


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """240 images in 4 class folders, some two levels deep: JPEGs of three shapes (landscape, portrait, square)
    and grayscale PNGs, which make the whole folder RGB."""
    root = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(0)
    for i in range(240):
        label = f"class{i % 4}"
        sub = root / label / ("deep" if i % 5 == 0 else "") / ("deeper" if i % 10 == 0 else "")
        sub.mkdir(parents=True, exist_ok=True)
        width, height = [(80, 60), (60, 96), (64, 64)][i % 3]
        picture = _picture(rng, width, height)
        if i % 7 == 0:
            picture.convert("L").save(sub / f"{i:04d}.png")
        else:
            picture.save(sub / f"{i:04d}.jpg", quality=90)
    return root


def _cfg(folder: Path) -> DataParams:
    return DataParams(source="imagefolder", path=str(folder), image_size=SIZE, label_fraction=0.2, rl_fraction=0.1)


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _reference(path: Path, mode: str, size: int) -> np.ndarray:
    """The single-process loader as it was before the pool (open, convert, bicubic resize of the shorter side,
    centre crop), written out here so that the test does not compare the code with itself."""
    with Image.open(path) as image:
        image = image.convert(mode)
        scale = size / min(image.size)
        width, height = max(size, round(image.width * scale)), max(size, round(image.height * scale))
        image = image.resize((width, height), Image.Resampling.BICUBIC)
        left, top = (width - size) // 2, (height - size) // 2
        array = np.asarray(image.crop((left, top, left + size, top + size)), dtype=np.uint8)
    return array[..., None] if array.ndim == 2 else array


def test_one_worker_and_two_write_the_same_bytes(folder: Path, tmp_path: Path) -> None:
    metas = {}
    for workers in (1, 2):
        metas[workers] = prepare_dataset(_cfg(folder), 0, tmp_path / f"w{workers}" / "prepared",
                                         tmp_path / "cache", workers=workers)
    assert _files(tmp_path / "w1" / "prepared") == _files(tmp_path / "w2" / "prepared")  # meta.json included
    assert metas[1] == metas[2]
    assert [metas[1][name]["num_images"] for name in SPLITS] == [192, 38, 19, 48]


def test_output_equals_the_single_process_loader(folder: Path, tmp_path: Path) -> None:
    cfg = _cfg(folder)
    prepare_dataset(cfg, 0, tmp_path / "prepared", tmp_path / "cache", workers=2)
    raw = load_source(cfg, tmp_path / "cache", workers=1)  # the file order and labels; nothing is decoded here
    idx = split_indices(raw, cfg, 0)
    reference = np.stack([_reference(path, "RGB", SIZE) for path in raw.train_images.files])
    expected = {"unlabeled": idx["train"], "labeled": idx["labeled"], "rl": idx["rl"], "test": idx["test"]}
    for name, rows in expected.items():
        split = read_split(tmp_path / "prepared", name, verify=True)
        np.testing.assert_array_equal(split.images, reference[rows], err_msg=name)
        if name != "unlabeled":
            np.testing.assert_array_equal(split.labels, raw.train_labels[rows])
        pixels = reference[rows].reshape(-1, 3) / 255.0
        assert split.meta["pixel_mean"] == pytest.approx(pixels.mean(axis=0), abs=1e-6)
        assert split.meta["pixel_std"] == pytest.approx(pixels.std(axis=0), abs=1e-6)


def test_tasks_run_in_worker_processes_in_order() -> None:
    results = list(ordered_map(_pid_and_square, [(i,) for i in range(20)], workers=2))
    assert [square for _, square in results] == [i * i for i in range(20)]
    assert os.getpid() not in {pid for pid, _ in results}
    assert list(ordered_map(_pid_and_square, [(3,)], workers=2)) == [(os.getpid(), 9)]  # one task: no pool


def _pid_and_square(value: int) -> tuple[int, int]:
    return os.getpid(), value * value


def test_images_npy_is_what_np_save_writes_and_reads_back_by_rows(tmp_path: Path) -> None:
    images = np.random.default_rng(1).integers(0, 256, (50, 7, 5, 3), dtype=np.uint8)
    rows = np.array([0, 3, 4, 5, 17, 18, 49])
    meta = write_split(tmp_path / "split", [(images, np.arange(50))], None, {"class_names": []})
    np.save(tmp_path / "expected.npy", images)
    assert (tmp_path / "split" / "images.npy").read_bytes() == (tmp_path / "expected.npy").read_bytes()
    stored = StoredImages(tmp_path / "split" / "images.npy")
    np.testing.assert_array_equal(np.concatenate([chunk for chunk, _ in stored.chunks(rows)]), images[rows])
    shuffled = np.array([17, 0, 49, 3, 3, 18])
    np.testing.assert_array_equal(stored.take(shuffled), images[shuffled])
    with pytest.raises(IndexError, match=r"outside 0\.\.49"):
        stored.take(np.array([2, 50]))
    assert meta["pixel_mean"] == pytest.approx((images / 255.0).reshape(-1, 3).mean(axis=0), abs=1e-6)
    assert meta["pixel_std"] == pytest.approx((images / 255.0).reshape(-1, 3).std(axis=0), abs=1e-6)


# ------------------------------------------------------------------------------------------------ memory

BUDGET = 64 << 20  # address space allowed above what the process holds after its imports
BOUNDED_FETCH = """
import re, resource, sys
from pathlib import Path
from pipeline_lib.vision.config import DataParams
from pipeline_lib.vision.data.prepare import prepare_dataset
import PIL.Image, tqdm  # what the fetch imports on its way, before the limit
folder, out, budget = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3])
size = int(re.search(r"VmSize:\\s+(\\d+) kB", Path("/proc/self/status").read_text()).group(1)) * 1024
resource.setrlimit(resource.RLIMIT_AS, (size + budget, resource.RLIM_INFINITY))
metas = prepare_dataset(DataParams(source="imagefolder", path=folder, image_size=224), 0, out, out.parent / "cache",
                        workers=2)
print(metas["unlabeled"]["shape"])
"""


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads VmSize from /proc")
def test_fetch_runs_in_an_address_space_smaller_than_its_pixels(tmp_path: Path) -> None:
    """600 JPEGs at 224x224 are 90 MB of pixels, more than BUDGET. The loader before the pool (a list of decoded
    images, then the stacked array, then float64 statistics of 4096-row chunks) ran out of it, as it did at 600 MB;
    the pooled fetch holds a few batches and a 16 MB chunk."""
    rng = np.random.default_rng(2)
    for i in range(600):
        (tmp_path / "photos" / f"class{i % 3}").mkdir(parents=True, exist_ok=True)
        _picture(rng, 256, 256).save(tmp_path / "photos" / f"class{i % 3}" / f"{i:04d}.jpg", quality=90)
    assert BUDGET < 600 * 224 * 224 * 3
    env = {**os.environ, "MALLOC_ARENA_MAX": "2"}  # each thread's malloc arena reserves 64 MB of address space
    done = subprocess.run([sys.executable, "-c", BOUNDED_FETCH, str(tmp_path / "photos"),
                           str(tmp_path / "prepared"), str(BUDGET)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split("\n")[-2] == "[480, 224, 224, 3]"


# ---------------------------------------------------------------------------------------------- bad files


def _truncated_jpeg(path: Path) -> None:
    _picture(np.random.default_rng(3), 64, 64).save(path, quality=90)
    path.write_bytes(path.read_bytes()[:-300])  # the header survives: only decoding finds the cut


@pytest.mark.parametrize("name, make", [
    ("cut.jpg", _truncated_jpeg),
    ("notes.png", lambda path: path.write_text("a text file named like an image")),
    ("empty.jpg", lambda path: path.write_bytes(b"")),
])
def test_a_bad_file_deep_in_the_folder_is_named_and_nothing_is_kept(
    folder: Path, tmp_path: Path, name: str, make: object
) -> None:
    copy = tmp_path / "photos"
    for label in ("class0", "class1", "class2", "class3"):
        (copy / label).mkdir(parents=True)
        for file in (folder / label).rglob("*.*"):  # the good images, linked
            (copy / label / file.name).symlink_to(file)
    bad = copy / "class3" / "sub" / "deeper" / name
    bad.parent.mkdir(parents=True)
    make(bad)  # type: ignore[operator]
    prepare_dataset(_cfg(folder), 0, tmp_path / "prepared", tmp_path / "cache", workers=2)
    before = prepared_digest(tmp_path / "prepared")
    with pytest.raises(DataError) as raised:
        prepare_dataset(_cfg(copy), 0, tmp_path / "prepared", tmp_path / "cache", workers=2)
    message = str(raised.value)
    assert message.startswith(f"{bad}: not a readable image") and "\n" not in message
    assert prepared_digest(tmp_path / "prepared") == before  # the previous output is untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["photos", "prepared"]  # no staging folder, no cache


# ------------------------------------------------------------------------------------------------ benchmark


def test_benchmark_smoke_run_compares_every_part() -> None:
    done = subprocess.run([sys.executable, "benchmarks/fetch_imagefolder.py", "--smoke"], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    out = done.stdout
    for part in ("plain PIL loop", "after (2 workers)", "whole stage (python -m stages.fetch", "loader (trainer's",
                 "ImageNet-1k projection"):
        assert part in out, part
    if "is not in this clone" not in out:  # a shallow clone has no baseline commit to compare with
        assert out.count("output identical to before's, byte for byte: yes") == 2
