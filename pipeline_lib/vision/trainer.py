"""The vision track's trainer over image rows: the base trainer plus pixels made on the device, augmentation and
per-channel normalisation.

The stored rows are uint8 (N, H, W, C); each micro-batch becomes (b, C, S, S) floats in [0, 1] on the device at the
model's input size (`Preprocess.to_unit`), a method augments them there and normalises them with the dataset's
per-channel mean and std.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor

from pipeline_lib.core.trainer import Batch, C, Trainer
from pipeline_lib.vision.data.augment import AugmentConfig, BatchAugment
from pipeline_lib.vision.models.preprocess import Preprocess


class ImageTrainer(Trainer[C]):
    """A trainer over image rows whose method augments each batch on the device, as `augment_config` says (None:
    not at all).

    The random choices are drawn for the step's global batch from the step's generator and each process applies its
    rows, so the process count does not change the augmented images.
    """

    unit = "images"
    preprocess: Preprocess

    def __init__(self, model: Any, cfg: C, images: np.ndarray, preprocess: Preprocess, **kwargs: Any) -> None:
        super().__init__(model, cfg, images, preprocess, **kwargs)
        config = self.augment_config()
        self.augment = None if config is None else BatchAugment(config, self.preprocess.img_size)

    def augment_config(self) -> AugmentConfig | None:
        """The augmentations of this method under `self.cfg`."""
        return None

    def load_inputs(self, index: np.ndarray) -> Tensor:
        """uint8 rows -> (b, C, S, S) float in [0, 1] on the device, resized to the model's input size."""
        pixels = torch.from_numpy(self.inputs[index])  # fancy indexing copies the rows out of the memory map
        return self.preprocess.to_unit(pixels.to(self.device, non_blocking=True))

    def normalize(self, images: Tensor) -> Tensor:
        """[0, 1] images -> standardised with the dataset's per-channel mean and std."""
        return self.preprocess.normalize(images)

    def augmented(self, batch: Batch) -> Tensor:
        """One augmented view of this process's images, (b, C, S, S) in [0, 1]."""
        if self.augment is None:
            return batch.inputs
        params = self.augment.sample(batch.global_size, batch.generator, torch.device("cpu"))
        return self.augment.apply(batch.inputs, {name: value[batch.rows].to(self.device) for name, value in
                                                 params.items()})
