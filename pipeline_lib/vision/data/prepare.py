"""Turn a source into the prepared splits `unlabeled`, `labeled`, `rl` and `test`, atomically.

Split rules (all stratified by class and seeded by the top-level `seed`):
1. `data.max_images` caps each pool (training, test, extra unlabeled) to a random subset of that size.
2. A source without an official test split gives `data.test_fraction` of its training pool to `test`.
3. `rl` takes `data.rl_fraction` of the training pool; `labeled` takes `data.label_fraction` of it from
   what `rl` left, so the two are disjoint.
4. `unlabeled` holds every training image (labels dropped) plus the source's extra unlabeled images.
The splits are written into a temporary folder beside the output and renamed into place only when all of
them are complete, so an interrupted fetch never leaves a half-written `data/prepared`.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from pipeline_lib.core.errors import DataError
from pipeline_lib.core.tracking import Tracker, write_run_record
from pipeline_lib.vision.config import DataParams, VisionParams
from pipeline_lib.vision.data.sources import RawDataset, load_source, local_folder
from pipeline_lib.vision.data.store import StoredImages, write_split
from pipeline_lib.vision.data.summary import log_prepared


def allocate(counts: np.ndarray, total: int) -> np.ndarray:
    """Share `total` picks among classes in proportion to `counts` (largest remainder), capped per class."""
    quota = counts * (total / max(counts.sum(), 1))
    take = np.floor(quota).astype(np.int64)
    order = np.argsort(-(quota - take), kind="stable")
    take[order[: total - take.sum()]] += 1
    return np.minimum(take, counts)


def stratified_pick(
    labels: np.ndarray | None, pool: np.ndarray, total: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Pick `total` indices from `pool` (indices into `labels`), stratified; return (picked, rest), sorted."""
    total = min(total, len(pool))
    if labels is None:
        picked = rng.choice(pool, size=total, replace=False)
    else:
        classes, counts = np.unique(labels[pool], return_counts=True)
        takes = allocate(counts, total)
        picked = np.concatenate(
            [rng.permutation(pool[labels[pool] == c])[:take] for c, take in zip(classes, takes, strict=True)]
        )
    picked = np.sort(picked).astype(np.int64)
    return picked, np.setdiff1d(pool, picked, assume_unique=True)


def split_indices(raw: RawDataset, cfg: DataParams, seed: int) -> dict[str, Any]:
    """Index sets for every split, following the module's split rules."""
    rng = np.random.default_rng(seed)
    cap = cfg.max_images
    train = np.arange(len(raw.train_images))
    if cap is not None:
        train, _ = stratified_pick(raw.train_labels, train, cap, rng)
    test_source, test_labels = raw.test_images, raw.test_labels
    if raw.train_labels is None:
        test = np.zeros(0, np.int64)
    elif test_source is None:
        test, train = stratified_pick(raw.train_labels, train, round(cfg.test_fraction * len(train)), rng)
        test_source, test_labels = raw.train_images, raw.train_labels
    else:
        test = np.arange(len(test_source))
        if cap is not None:
            test, _ = stratified_pick(test_labels, test, cap, rng)
    extra = np.arange(0 if raw.extra_unlabeled is None else len(raw.extra_unlabeled))
    if cap is not None:
        extra, _ = stratified_pick(None, extra, cap, rng)
    rl, rest = stratified_pick(raw.train_labels, train, round(cfg.rl_fraction * len(train)), rng)
    labeled, _ = stratified_pick(raw.train_labels, rest, round(cfg.label_fraction * len(train)), rng)
    return {
        "train": train, "labeled": labeled, "rl": rl, "test": test, "extra": extra,
        "test_source": test_source, "test_labels": test_labels,
    }


def check_inputs(cfg: DataParams) -> None:
    """What the fetch stage checks before its MLflow run beyond `load_params` (which refuses a patch size the
    source's image size rules out): a local imagefolder's `data.path` is a folder. Downloads are checked
    (sha256) when fetched.

    Raises:
        ConfigError: naming the key.
    """
    if cfg.source == "imagefolder" and cfg.url is None:
        local_folder(cfg)


def prepare_dataset(cfg: DataParams, seed: int, out_dir: Path, cache_dir: Path, *, workers: int | None = None
                    ) -> dict[str, dict[str, Any]]:
    """Fetch the source and write its prepared splits to `out_dir`; return each split's meta. An image folder is
    decoded by `workers` processes (None: one per usable core); the bytes written do not depend on their number."""
    out_dir, cache_dir = Path(out_dir), Path(cache_dir)
    raw = load_source(cfg, cache_dir, workers=workers)
    _check_raw(raw)
    idx = split_indices(raw, cfg, seed)
    if raw.train_labels is not None and len(idx["labeled"]) == 0:
        raise DataError(
            f"data.label_fraction={cfg.label_fraction} leaves no labeled images out of {len(idx['train'])}; "
            "raise data.label_fraction or data.max_images"
        )
    common = {
        "source": cfg.source,
        "class_names": raw.class_names,
        "num_classes": len(raw.class_names),
        "seed": seed,
        "test_fraction": cfg.test_fraction if raw.test_images is None else None,
        "max_images": cfg.max_images,
        "origin": raw.origin,
    }
    # The fractions that draw the labeled splits are recorded in theirs only: the unlabeled split (what
    # pretraining reads) stays byte-identical when only they change.
    labels = {"label_fraction": cfg.label_fraction, "rl_fraction": cfg.rl_fraction}
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    staging.chmod(0o755)  # mkdtemp makes it private; the output is an ordinary shared folder
    try:
        metas = _write_splits(raw, idx, common, labels, staging)
        _swap_into_place(staging, out_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return metas


def _write_splits(
    raw: RawDataset, idx: dict[str, Any], common: dict[str, Any], labels: dict[str, Any], staging: Path
) -> dict[str, dict[str, Any]]:
    metas: dict[str, dict[str, Any]] = {}
    parts = [(raw.train_images, idx["train"])]
    if raw.extra_unlabeled is not None and len(idx["extra"]):
        parts.append((raw.extra_unlabeled, idx["extra"]))
    metas["unlabeled"] = write_split(staging / "unlabeled", parts, None, {**common, "split": "unlabeled"})
    if raw.train_labels is None:
        return metas  # unlabeled-only source: there is nothing to label, hold out or test
    # labeled and rl are rows of the training pool, which the unlabeled split now holds in `idx["train"]` order:
    # read them back from there, so that an image folder decodes each image once.
    written = StoredImages(staging / "unlabeled" / "images.npy")
    for name in ("labeled", "rl"):
        rows = idx[name]
        at = np.searchsorted(idx["train"], rows)
        assert np.array_equal(idx["train"][at], rows), f"{name} rows outside the training pool"
        metas[name] = write_split(
            staging / name, [(written, at)], raw.train_labels[rows], {**common, **labels, "split": name}
        )
    rows = idx["test"]
    metas["test"] = write_split(
        staging / "test", [(idx["test_source"], rows)], idx["test_labels"][rows],
        {**common, **labels, "split": "test"},
    )
    return metas


def _check_raw(raw: RawDataset) -> None:
    """Catch a source that delivers inconsistent arrays before anything is written."""
    arrays = {"train": raw.train_images, "test": raw.test_images, "unlabeled": raw.extra_unlabeled}
    shapes = {name: a.shape[1:] for name, a in arrays.items() if a is not None and len(a)}
    if len(set(shapes.values())) > 1:
        raise DataError(f"source {raw.origin}: image shapes differ between pools: {shapes}")
    for name, images, labels in (("train", raw.train_images, raw.train_labels),
                                 ("test", raw.test_images, raw.test_labels)):
        if images is not None and labels is not None and len(images) != len(labels):
            raise DataError(f"source {raw.origin}: {len(images)} {name} images but {len(labels)} labels")
    if raw.train_labels is not None and len(raw.train_labels) and raw.train_labels.max() >= len(raw.class_names):
        raise DataError(f"source {raw.origin}: label {raw.train_labels.max()} has no class name")


def _swap_into_place(staging: Path, out_dir: Path) -> None:
    """Replace `out_dir` with the finished `staging` folder; the old output survives until the new one is in."""
    old = None
    if out_dir.exists():
        old = out_dir.with_name(f".{out_dir.name}.old-{staging.name[-8:]}")
        out_dir.rename(old)
    staging.rename(out_dir)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def run_fetch(params: VisionParams, tracker: Tracker, out: Path, cache_dir: Path) -> dict[str, Any]:
    """The fetch stage: prepare the splits into `out`, log them to the run, and point `run.json` at the run."""
    metas = prepare_dataset(params.data, params.seed, out, cache_dir)
    log_prepared(tracker, out, metas)
    write_run_record(out / "run.json", tracker)
    sizes = ", ".join(f"{name} {meta['num_images']}" for name, meta in metas.items())
    return {"source": params.data.source, "sizes": sizes, "run_id": tracker.run_id}
