"""Preprocessing that travels with a model: uint8 N x H x W x C pixels -> normalised float N x C x S x S."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class Preprocess(nn.Module):
    """Scale to [0, 1], resize to the model's square input size, standardise per channel.

    Training applies `to_unit` and `normalize` separately (augmentations work on [0, 1] images in between);
    inference calls the module, so a served model takes the images exactly as the prepared data stores them.
    """

    def __init__(self, mean: Sequence[float], std: Sequence[float], img_size: int) -> None:
        super().__init__()
        self.img_size = img_size
        self.register_buffer("mean", torch.tensor(list(mean), dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(list(std), dtype=torch.float32).view(1, -1, 1, 1))

    def to_unit(self, pixels: Tensor) -> Tensor:
        """(B, H, W, C) uint8 -> (B, C, S, S) float in [0, 1]."""
        images = pixels.permute(0, 3, 1, 2).float().div_(255.0)
        if images.shape[-2:] != (self.img_size, self.img_size):
            images = F.interpolate(images, size=self.img_size, mode="bilinear", align_corners=False)
        return images

    def normalize(self, images: Tensor) -> Tensor:
        return (images - self.mean) / self.std

    def forward(self, pixels: Tensor) -> Tensor:
        return self.normalize(self.to_unit(pixels))
