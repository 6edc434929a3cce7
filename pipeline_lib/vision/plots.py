"""Pictures and curves the stages write for `dvc plots` and MLflow."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor


def image_rows(rows: dict[str, Tensor]) -> Any:
    """A figure with one row per entry: name -> (n, C, H, W) images in [0, 1]."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    count = max(len(images) for images in rows.values())
    figure, axes = plt.subplots(len(rows), count, figsize=(1.2 * count, 1.3 * len(rows)), squeeze=False)
    for axis_row, (name, images) in zip(axes, rows.items(), strict=True):
        pictures = images.detach().float().clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy()
        for axis, picture in zip(axis_row, pictures, strict=False):
            axis.imshow(picture[..., 0] if picture.shape[-1] == 1 else picture, cmap="gray", vmin=0, vmax=1)
        for axis in axis_row:
            axis.set_axis_off()
        axis_row[0].set_title(name, fontsize=8, loc="left")
    figure.tight_layout()
    return figure


@torch.no_grad()
def mae_reconstruction(model: Any, preprocess: Any, pixels: Tensor, *, seed: int = 0) -> Any:
    """Original / masked / reconstruction / reconstruction with visible patches pasted, for uint8 pixels."""
    was_training = model.training
    model.eval()
    images = preprocess.to_unit(pixels)  # (n, C, S, S) in [0, 1]
    normalised = preprocess.normalize(images)
    noise = torch.rand(len(images), model.num_patches, generator=torch.Generator().manual_seed(seed))
    _, pred, mask = model(normalised, noise=noise.to(images.device))  # pred (n, L, p*p*C), mask (n, L)
    if model.norm_pix_loss:  # predictions are per-patch standardised: undo with the true patch statistics
        target = model.patchify(normalised)
        mean, var = target.mean(dim=-1, keepdim=True), target.var(dim=-1, keepdim=True)
        pred = pred * (var + 1.0e-6).sqrt() + mean
    reconstruction = model.unpatchify(pred.float()) * preprocess.std + preprocess.mean
    patch_area = pred.shape[-1] // images.shape[1]
    hidden = model.unpatchify(mask.unsqueeze(-1).repeat(1, 1, patch_area * images.shape[1]).float())
    model.train(was_training)
    return image_rows({
        "original": images,
        "masked": images * (1 - hidden) + 0.5 * hidden,  # grey where patches were removed
        "reconstruction": reconstruction,
        "reconstruction + visible": images * (1 - hidden) + reconstruction * hidden,
    })


@torch.no_grad()
def contrastive_views(augment: Any, preprocess: Any, pixels: Tensor, *, seed: int = 0) -> Any:
    """Original and two augmented views, as the contrastive methods see them."""
    images = preprocess.to_unit(pixels)
    generator = torch.Generator().manual_seed(seed)
    return image_rows({
        "original": images,
        "view 1": augment(images, generator),
        "view 2": augment(images, generator),
    })


def pretrain_examples(trainer: Any, count: int = 8) -> tuple[Any, str]:
    """The pretrain stage's picture and its MLflow name: MAE reconstructions or contrastive views."""
    pixels = torch.from_numpy(np.array(trainer.inputs[:count])).to(trainer.device)
    if not hasattr(trainer.model, "mask_ratio"):  # the contrastive methods
        return contrastive_views(trainer.augment, trainer.preprocess, pixels), "views"
    return mae_reconstruction(trainer.model, trainer.preprocess, pixels), "reconstruction"


def confusion_figure(matrices: dict[str, np.ndarray], class_names: list[str]) -> Any:
    """One confusion-matrix panel per model: rows are true classes, columns predictions, counts annotated."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    size = max(3.0, 0.4 * len(class_names) + 1.5)
    figure, axes = plt.subplots(1, len(matrices), figsize=(size * len(matrices), size), squeeze=False)
    ticks = np.arange(len(class_names))
    for axis, (name, matrix) in zip(axes[0], matrices.items(), strict=True):
        matrix = np.asarray(matrix)
        axis.imshow(matrix, cmap="Blues")
        for (row, col), count in np.ndenumerate(matrix):
            if count:
                colour = "white" if count > matrix.max() / 2 else "black"
                axis.text(col, row, str(count), ha="center", va="center", fontsize=7, color=colour)
        axis.set_xticks(ticks, class_names, fontsize=7)
        axis.set_yticks(ticks, class_names, fontsize=7)
        axis.set_xlabel("predicted")
        axis.set_ylabel("true")
        axis.set_title(f"{name}: accuracy {np.trace(matrix) / max(matrix.sum(), 1):.3f}", fontsize=9)
    figure.tight_layout()
    return figure


def reliability_figure(curves: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]], ece: dict[str, float]) -> Any:
    """Reliability diagram: accuracy against mean confidence per bin (name -> (confidence, accuracy, count))."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(4.5, 4.5))
    axis.plot([0, 1], [0, 1], color="grey", linestyle="--", linewidth=1, label="perfect calibration")
    for name, (confidence, accuracy, count) in curves.items():
        used = count > 0
        axis.plot(confidence[used], accuracy[used], marker="o", markersize=4, label=f"{name} (ECE {ece[name]:.3f})")
    axis.set_xlim(0, 1)
    axis.set_ylim(0, 1)
    axis.set_xlabel("confidence (top probability)")
    axis.set_ylabel("accuracy")
    axis.set_title("reliability on the test split", fontsize=9)
    axis.legend(fontsize=7, loc="upper left")
    figure.tight_layout()
    return figure
