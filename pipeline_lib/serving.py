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


class LanguageModel(mlflow.pyfunc.PythonModel):
    """Prompts (a list of strings, or a one-column DataFrame) -> one generated continuation per prompt.

    The sampler's knobs are MLflow inference params: `max_new_tokens`, `temperature`, `top_k` (0: all tokens),
    `steps` (mdm; 0: one per new token), `block_length` (mdm) and `seed`; their defaults, recorded in the
    signature, are `default_params(max_len)`. The model's `config.json` says which sampler runs (`ar` or `mdm`).
    """

    @staticmethod
    def default_params(max_len: int) -> dict[str, Any]:
        """Sampler defaults that fit a model of `max_len` tokens: up to 32 new tokens in one block."""
        new = min(32, max_len // 2)
        return {"max_new_tokens": new, "temperature": 0.8, "top_k": 0, "steps": 0, "block_length": new, "seed": 0}

    @classmethod
    def from_folder(cls, folder: Path) -> LanguageModel:
        """Load a model folder directly, without MLflow."""
        model = cls()
        model._load(Path(folder))
        return model

    def load_context(self, context: Any) -> None:
        self._load(Path(context.artifacts["model_dir"]))

    def _load(self, folder: Path) -> None:
        from pipeline_lib.text.lm import load_lm

        self.model, self.tokenizer, self.config = load_lm(folder)

    def generate(self, prompt: str, settings: Any) -> list[str]:
        """`settings.num_samples` continuations of `prompt` (`pipeline_lib.text.generate.SamplerSettings`)."""
        from pipeline_lib.text.generate import generate_text

        return generate_text(self.model, self.tokenizer, self.config["objective"], prompt, settings)

    def predict(self, context, model_input, params=None):
        from pipeline_lib.text.generate import SamplerSettings

        knobs = {**self.default_params(self.model.max_len), **(params or {})}
        settings = SamplerSettings(max_new_tokens=int(knobs["max_new_tokens"]),
                                   temperature=float(knobs["temperature"]), top_k=int(knobs["top_k"]) or None,
                                   steps=int(knobs["steps"]) or None, block_length=int(knobs["block_length"]),
                                   seed=int(knobs["seed"]))
        prompts = model_input.iloc[:, 0].tolist() if hasattr(model_input, "iloc") else list(model_input)
        return [self.generate(str(prompt), settings)[0] for prompt in prompts]
