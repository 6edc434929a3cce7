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

from pipeline_lib.core.registry import ALIASES, ModelKind

ENCODER = ModelKind("vision", "encoder")
CLASSIFIER = ModelKind("vision", "classifier")


def encoder_description(name: str) -> str:
    """The registered encoder's description: what it holds, which stage registers it, how to load it."""
    return ("Image encoder of the vision track, pretrained self-supervised (MAE, SimCLR or MoCo v3, as "
            "`pretrain.method` says) on the unlabeled split. Every version is registered by the DVC stage "
            f"`pretrain`. {ALIASES}\n\n"
            f"Load: `mlflow.pyfunc.load_model(\"models:/{name}@challenger\").predict(images)`, images uint8 "
            "N x H x W x C as stored in data/prepared -> float32 features N x D.")


def classifier_description(name: str) -> str:
    """The registered classifier's description: what it holds, which stages register it, how to load it."""
    return ("Image classifier of the vision track. Versions come from two stages, in this order: `finetune` (the "
            "pretrained encoder finetuned on the labeled split) and `rl` (that classifier post-trained with GRPO "
            "against the reward declared in `rl.reward`, on the rl split), so after a full `dvc repro` the newest "
            f"is the post-trained one. {ALIASES}\n\n"
            f"Load: `mlflow.pyfunc.load_model(\"models:/{name}@champion\").predict(images)`, images uint8 "
            "N x H x W x C -> float32 class probabilities N x classes, rows summing to 1, column j the class "
            "`class_names[j]` of the version's config.json. A post-trained version whose reward declares abstain "
            "has one more last column: the probability of abstaining.")


class EncoderModel(mlflow.pyfunc.PythonModel):
    """uint8 images (N, H, W, C) -> float32 features (N, D) of a pretrained encoder."""

    def load_context(self, context: Any) -> None:
        from pipeline_lib.vision.models.factory import load_network

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
        from pipeline_lib.vision.models.factory import load_network

        self.classifier, self.preprocess, self.config = load_network(Path(context.artifacts["model_dir"]))

    def predict(self, context, model_input, params=None):
        pixels = torch.from_numpy(np.array(model_input, dtype=np.uint8))  # a writable copy
        with torch.no_grad():
            return torch.softmax(self.classifier(self.preprocess(pixels)).float(), dim=1).numpy()
