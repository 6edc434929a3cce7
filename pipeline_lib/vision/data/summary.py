"""What the fetch run shows in MLflow: split sizes, pixel statistics, dataset inputs and a sample grid."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from pipeline_lib.core.tracking import Tracker
from pipeline_lib.vision.data.store import read_split


def dataset_metrics(metas: dict[str, dict[str, Any]]) -> dict[str, float]:
    """Flat numbers for the run: images per split, classes, image shape, per-channel mean/std."""
    unlabeled = metas["unlabeled"]
    _, height, width, channels = unlabeled["shape"]
    metrics: dict[str, float] = {
        "num_classes": unlabeled["num_classes"],
        "image.height": height,
        "image.width": width,
        "image.channels": channels,
    }
    for split, meta in metas.items():
        metrics[f"{split}.num_images"] = meta["num_images"]
    for c, (mean, std) in enumerate(zip(unlabeled["pixel_mean"], unlabeled["pixel_std"], strict=True)):
        metrics[f"pixel_mean.c{c}"] = mean
        metrics[f"pixel_std.c{c}"] = std
    return metrics


def sample_grid(images: np.ndarray, labels: np.ndarray | None, class_names: list[str], per_class: int = 8) -> Any:
    """A matplotlib figure: one row per class (up to 10) of `per_class` images, or one block if unlabeled.

    The images are tiled into one mosaic (a strip of background between them; large images subsampled to about 96
    pixels) and drawn as one image: a figure of 80 axes costs seconds to lay out and save, one image a fraction."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if labels is None:
        shown = np.arange(min(len(images), 8 * per_class))
        rows = [shown[start : start + per_class] for start in range(0, len(shown), per_class)]
        row_names = ["unlabeled"] + [""] * (len(rows) - 1)
    else:
        classes = np.unique(labels)[:10]
        rows = [np.flatnonzero(labels == c)[:per_class] for c in classes]
        row_names = [class_names[c] for c in classes]
    step = max(1, max(images.shape[1:3]) // 96)  # large images shown at about 96 pixels: the figure is 1 inch each
    height, width, channels = images[:1, ::step, ::step].shape[1:]
    pad = max(1, height // 16)
    mosaic = np.full((len(rows) * (height + pad), per_class * (width + pad), channels), 255, dtype=np.uint8)
    for r, idx in enumerate(rows):
        for column, i in enumerate(idx):
            top, left = r * (height + pad), column * (width + pad)
            mosaic[top : top + height, left : left + width] = images[i, ::step, ::step]
    figure, axis = plt.subplots(figsize=(per_class, len(rows)))
    axis.imshow(mosaic[..., 0] if channels == 1 else mosaic, cmap="gray", vmin=0, vmax=255, interpolation="nearest")
    axis.set_xticks([])
    axis.set_yticks([r * (height + pad) + height / 2 for r in range(len(rows))], row_names, fontsize=7)
    axis.tick_params(length=0)
    for spine in axis.spines.values():
        spine.set_visible(False)
    figure.tight_layout()
    return figure


def log_prepared(tracker: Tracker, root: Path, metas: dict[str, dict[str, Any]]) -> None:
    """Log a freshly prepared dataset to the fetch run."""
    unlabeled = metas["unlabeled"]
    tracker.set_tags({"input.source.sha256": unlabeled["origin"].get("sha256", "none"),
                      "data.origin": json.dumps(unlabeled["origin"])})
    tracker.log_metrics(dataset_metrics(metas))
    for name in metas:
        split = read_split(root, name)
        tracker.log_dataset(
            split.images, split.labels, name=f"{unlabeled['source']}-{name}", source=str(Path(root) / name),
            sha256=split.meta["sha256"]["images.npy"], context=name,
        )
        tracker.log_artifact(Path(root) / name / "meta.json", artifact_path=f"prepared/{name}")
    shown = read_split(root, "labeled" if "labeled" in metas else "unlabeled")
    figure = sample_grid(shown.images, shown.labels, shown.class_names)
    tracker.log_figure(figure, "samples.png")
    import matplotlib.pyplot as plt

    plt.close(figure)
