"""Generate text from a trained language model of the text track, from a folder or the MLflow registry.

Usage:
    python -m pipeline_lib.text.generate models/text/ar --prompt "The import statement" --max-new-tokens 200
    python -m pipeline_lib.text.generate models/text/mdm --prompt "Keywords" --max-new-tokens 64 \\
        --steps 32 --block-length 16 --temperature 0
    python -m pipeline_lib.text.generate models:/ssl-pipeline-lm@challenger --prompt "def" --num-samples 3

MODEL is a model folder written by `text_pretrain` or a registered version (`models:/<name>/<version>` or
`models:/<name>@<alias>`, loaded through MLflow from the tracking store). An `ar` model samples one token per
step (temperature, optional top-k); an `mdm` model runs LLaDA's sampler: `max_new_tokens` MASK tokens after
the prompt, decoded in blocks of `block_length`, `steps` model calls in all (default: one per token). Both see at
most `max_len` tokens: a longer prompt is cut to its last tokens (for `mdm`, its last `max_len - max_new_tokens`).
The samples print one after another, each after a `--- sample i ---` line.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow.pyfunc
import torch
from mlflow.exceptions import MlflowException

from pipeline_lib.models.transformer import TransformerLM
from pipeline_lib.text.lm import load_lm
from pipeline_lib.text.sampling import generate_ar, generate_mdm
from pipeline_lib.text.tokenizer import Tokenizer


@dataclass(frozen=True)
class SamplerSettings:
    """The sampler's knobs; `steps=None` is one model call per new token, `top_k=None` samples from all."""

    max_new_tokens: int = 128
    temperature: float = 0.8
    top_k: int | None = None
    steps: int | None = None
    block_length: int = 32
    num_samples: int = 1
    seed: int = 0

    def __post_init__(self) -> None:
        if self.num_samples < 1:
            raise ValueError(f"num_samples={self.num_samples}: must be >= 1")


def generate_text(model: TransformerLM, tokenizer: Tokenizer, objective: str, prompt: str,
                  settings: SamplerSettings) -> list[str]:
    """`settings.num_samples` continuations of `prompt` (the new text only), reproducible from `settings.seed`.

    Raises:
        ValueError: an empty prompt, or sampler settings the objective cannot honour (the message names them).
    """
    ids = tokenizer.encode(prompt)
    if not ids:
        raise ValueError("prompt is empty: the models continue a prompt of at least one token")
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(settings.seed)
    if objective == "ar":
        prompt_ids = torch.tensor([ids], device=device).repeat(settings.num_samples, 1)
        out = generate_ar(model, prompt_ids, max_new_tokens=settings.max_new_tokens,
                          temperature=settings.temperature, top_k=settings.top_k, generator=generator)
    elif objective == "mdm":
        room = model.max_len - settings.max_new_tokens
        if room < 1:
            raise ValueError(f"max_new_tokens={settings.max_new_tokens} leaves no room for a prompt in the "
                             f"model's max_len={model.max_len} tokens")
        prompt_ids = torch.tensor([ids[-room:]], device=device).repeat(settings.num_samples, 1)
        out = generate_mdm(model, prompt_ids, gen_length=settings.max_new_tokens,
                           steps=settings.steps or settings.max_new_tokens, block_length=settings.block_length,
                           temperature=settings.temperature, mask_id=model.mask_id, generator=generator)
    else:
        raise ValueError(f"objective={objective!r}: expected 'ar' or 'mdm'")
    return [tokenizer.decode(row[prompt_ids.shape[1]:].tolist()) for row in out.cpu()]


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
        self.model, self.tokenizer, self.config = load_lm(folder)

    def generate(self, prompt: str, settings: SamplerSettings) -> list[str]:
        """`settings.num_samples` continuations of `prompt`; a task model's end at its end-of-sequence token."""
        samples = generate_text(self.model, self.tokenizer, self.config["objective"], prompt, settings)
        eos = self.config.get("task", {}).get("eos")
        return [sample.split(eos)[0] for sample in samples] if eos else samples

    def predict(self, context, model_input, params=None):
        knobs = {**self.default_params(self.model.max_len), **(params or {})}
        settings = SamplerSettings(max_new_tokens=int(knobs["max_new_tokens"]),
                                   temperature=float(knobs["temperature"]), top_k=int(knobs["top_k"]) or None,
                                   steps=int(knobs["steps"]) or None, block_length=int(knobs["block_length"]),
                                   seed=int(knobs["seed"]))
        prompts = model_input.iloc[:, 0].tolist() if hasattr(model_input, "iloc") else list(model_input)
        return [self.generate(str(prompt), settings)[0] for prompt in prompts]


def load_language_model(source: str) -> LanguageModel:
    """A model folder or a `models:/` URI -> the loaded `LanguageModel` (the registry's pyfunc wrapper)."""
    if source.startswith(("models:/", "runs:/")):
        return mlflow.pyfunc.load_model(source).unwrap_python_model()
    folder = Path(source)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{folder}: not a language model folder (no config.json); expected the out of "
                                f"text_pretrain, e.g. models/text/ar, or a models:/ URI")
    return LanguageModel.from_folder(folder)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", help="model folder (models/text/ar) or models:/<name>@<alias> or /<version>")
    parser.add_argument("--prompt", required=True)
    defaults = SamplerSettings()
    parser.add_argument("--max-new-tokens", type=int, default=defaults.max_new_tokens)
    parser.add_argument("--temperature", type=float, default=defaults.temperature, help="0 is greedy")
    parser.add_argument("--top-k", type=int, default=None, help="ar: sample among the k most likely tokens")
    parser.add_argument("--steps", type=int, default=None, help="mdm: model calls in all (default: one per token)")
    parser.add_argument("--block-length", type=int, default=defaults.block_length,
                        help="mdm: semi-autoregressive block size, dividing --max-new-tokens")
    parser.add_argument("--num-samples", type=int, default=defaults.num_samples)
    parser.add_argument("--seed", type=int, default=defaults.seed)
    args = parser.parse_args(argv)
    try:
        settings = SamplerSettings(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                                   top_k=args.top_k, steps=args.steps, block_length=args.block_length,
                                   num_samples=args.num_samples, seed=args.seed)
        lm = load_language_model(args.model)
        samples = lm.generate(args.prompt, settings)
    except (ValueError, FileNotFoundError, MlflowException) as err:  # MLflow: no such model, version or store
        sys.exit(f"generate: {err}")
    for i, text in enumerate(samples):
        print(f"--- sample {i} ---\n{args.prompt}{text}")


if __name__ == "__main__":
    main()
