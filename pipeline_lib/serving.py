"""MLflow pyfunc wrappers: what `mlflow.pyfunc.load_model("models:/<name>@<alias>")` runs.

Preprocessing travels inside the model: `predict` takes uint8 images N x H x W x C exactly as the prepared
data stores them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import mlflow.pyfunc
import numpy as np
import torch


class EncoderModel(mlflow.pyfunc.PythonModel):
    """uint8 images (N, H, W, C) -> float32 features (N, D) of a pretrained encoder."""

    def load_context(self, context: Any) -> None:
        from pipeline_lib.models.factory import load_network

        self.encoder, self.preprocess, self.config = load_network(Path(context.artifacts["model_dir"]))

    # No annotation on model_input: MLflow would read one as a schema and warn; the signature logged with
    # the model describes the input instead.
    def predict(self, context, model_input, params=None):
        pixels = torch.from_numpy(np.array(model_input, dtype=np.uint8))  # a writable copy
        with torch.no_grad():
            return self.encoder(self.preprocess(pixels)).float().numpy()


class ClassifierModel(mlflow.pyfunc.PythonModel):
    """uint8 images (N, H, W, C) -> float32 class probabilities (N, classes), each row summing to 1.

    Column j is class `config.json`'s `class_names[j]`; the probabilities are the softmax of the logits.
    """

    def load_context(self, context: Any) -> None:
        from pipeline_lib.models.factory import load_network

        self.classifier, self.preprocess, self.config = load_network(Path(context.artifacts["model_dir"]))

    def predict(self, context, model_input, params=None):
        pixels = torch.from_numpy(np.array(model_input, dtype=np.uint8))  # a writable copy
        with torch.no_grad():
            return torch.softmax(self.classifier(self.preprocess(pixels)).float(), dim=1).numpy()
