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
    """A matplotlib figure: one row per class (up to 10) of `per_class` images, or one block if unlabeled."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if labels is None:
        rows = [np.arange(min(len(images), 8 * per_class))]
        row_names = ["unlabeled"]
    else:
        shown = np.unique(labels)[:10]
        rows = [np.flatnonzero(labels == c)[:per_class] for c in shown]
        row_names = [class_names[c] for c in shown]
    figure, axes = plt.subplots(len(rows), per_class, figsize=(per_class, len(rows)), squeeze=False)
    for axis_row, idx, name in zip(axes, rows, row_names, strict=True):
        for column, axis in enumerate(axis_row):
            axis.set_axis_off()
            if column < len(idx):
                image = images[idx[column]]
                axis.imshow(image[..., 0] if image.shape[-1] == 1 else image, cmap="gray", vmin=0, vmax=255)
        axis_row[0].set_title(name, fontsize=7, loc="left")
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
