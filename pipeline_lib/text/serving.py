"""Generate text from a trained language model of the text track, from a folder or the MLflow registry.

Usage:
    python -m pipeline_lib.text.serving models/text/ar --prompt "The import statement" --max-new-tokens 200
    python -m pipeline_lib.text.serving models/text/mdm --prompt "Keywords" --max-new-tokens 64 \\
        --steps 32 --block-length 16 --temperature 0
    python -m pipeline_lib.text.serving models:/ssl-pipeline-lm-ar@challenger --prompt "def" --num-samples 3

MODEL is a model folder written by `text_pretrain` or a registered version (`models:/<name>/<version>` or
`models:/<name>@<alias>`, loaded through MLflow from the tracking store). An `ar` model samples one token per
step (temperature, optional top-k) and reads the last `max_len` tokens. An `mdm` model runs LLaDA's sampler
(`sampling.generate_mdm`): `max_new_tokens` MASK tokens after the prompt, decoded left to right in blocks of
`block_length` cut to fit (the last block is shorter when `block_length` does not divide `max_new_tokens`; a
`block_length` over `max_new_tokens` is one block), `steps` model calls in all, a multiple of the number of
blocks (default: one per new token; a block never gets more calls than it has tokens). While prompt and answer
fit the model's `max_len` the model reads them whole; beyond, each block is decoded in a sliding window of
`max_len` positions that ends at the block's end (the first `max_len` positions while the block ends within
them; a block is capped at `max_len` tokens), so any prompt and any `max_new_tokens` >= 1 work for both
objectives.

Accepted knobs: `max_new_tokens` >= 1, `temperature` >= 0 (0 is greedy), `top_k` >= 1 (default: all tokens),
`steps` >= 1 (default: one per new token), `block_length` >= 1, `num_samples` >= 1, any integer `seed`; a
value outside is refused with one line that names it. The samples print one after another, each after a
`--- sample i ---` line.
"""

from __future__ import annotations

import argparse
import numbers
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow.pyfunc
import torch
from mlflow.exceptions import MlflowException

from pipeline_lib.text.data.tokenizer import Tokenizer
from pipeline_lib.text.models.objectives import resolve_objective
from pipeline_lib.text.models.saved import load_lm
from pipeline_lib.text.models.transformer import TransformerLM


@dataclass(frozen=True)
class SamplerSettings:
    """The sampler's knobs, each checked on construction (a bad one is a `ValueError` that names it and what is
    accepted); `steps=None` is one model call per new token, `top_k=None` samples from all tokens."""

    max_new_tokens: int = 128
    temperature: float = 0.8
    top_k: int | None = None
    steps: int | None = None
    block_length: int = 32
    num_samples: int = 1
    seed: int = 0

    def __post_init__(self) -> None:
        positive = "must be >= 1 (an integer)"
        rules = {  # knob -> (accepted, what is accepted)
            "max_new_tokens": (_positive(self.max_new_tokens), positive),
            "temperature": (_is_number(self.temperature) and self.temperature >= 0, "must be >= 0 (0 is greedy)"),
            "top_k": (self.top_k is None or _positive(self.top_k), f"{positive}, or None for all tokens"),
            "steps": (self.steps is None or _positive(self.steps),
                      f"{positive}, or None for one model call per new token"),
            "block_length": (_positive(self.block_length), positive),
            "num_samples": (_positive(self.num_samples), positive),
            "seed": (_is_int(self.seed), "must be an integer"),
        }
        for name, (accepted, rule) in rules.items():
            if not accepted:
                raise ValueError(f"{name}={getattr(self, name)!r}: {rule}")


def _is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _positive(value: Any) -> bool:
    return _is_int(value) and value >= 1


def generate_text(model: TransformerLM, tokenizer: Tokenizer, objective: str, prompt: str,
                  settings: SamplerSettings) -> list[str]:
    """`settings.num_samples` continuations of `prompt` (the new text only), reproducible from `settings.seed`.

    Raises:
        ValueError: an empty prompt, or sampler settings the objective cannot honour (the message names them).
    """
    ids = tokenizer.encode(prompt)
    if not ids:
        raise ValueError("prompt is empty: the models continue a prompt of at least one token")
    strategy = resolve_objective(objective)
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(settings.seed)
    prompt_ids = torch.tensor([ids], device=device).repeat(settings.num_samples, 1)
    # Each sampler reads its knobs (ar: top_k; mdm: steps and block_length, blocks cut to fit, a window of
    # max_len positions sliding over a long sequence) and ignores the others.
    out = strategy.generate(model, prompt_ids, new_tokens=settings.max_new_tokens, temperature=settings.temperature,
                            top_k=settings.top_k, steps=settings.steps, block_length=settings.block_length,
                            generator=generator)
    return [tokenizer.decode(row[prompt_ids.shape[1]:].tolist()) for row in out.cpu()]


class LanguageModel(mlflow.pyfunc.PythonModel):
    """Prompts (a list of strings, or a one-column DataFrame) -> one generated continuation per prompt.

    The sampler's knobs are MLflow inference params: `max_new_tokens` >= 1, `temperature` >= 0, `top_k` >= 0
    (0: all tokens), `steps` >= 0 (mdm; 0: one per new token), `block_length` >= 1 (mdm) and `seed`, integers but
    the temperature; their defaults, recorded in the signature, are `default_params(max_len)`; a bad value is a
    one-line `ValueError` that names it. The model's `config.json` says which sampler runs (`ar` or `mdm`).
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
        settings = self.settings(params, self.model.max_len)
        prompts = model_input.iloc[:, 0].tolist() if hasattr(model_input, "iloc") else list(model_input)
        return [self.generate(str(prompt), settings)[0] for prompt in prompts]

    @classmethod
    def settings(cls, params: dict[str, Any] | None, max_len: int) -> SamplerSettings:
        """Inference params, `default_params(max_len)` for those not given -> the sampler's settings.

        Raises:
            ValueError: a value of the wrong kind or out of range, in one line that names the param.
        """
        knobs = {**cls.default_params(max_len), **(params or {})}
        top_k, steps = _integer_param("top_k", knobs["top_k"]), _integer_param("steps", knobs["steps"])
        for name, value, zero in (("top_k", top_k, "all tokens"), ("steps", steps, "one model call per new token")):
            if value < 0:
                raise ValueError(f"{name}={value}: must be >= 0 (0: {zero})")
        return SamplerSettings(max_new_tokens=_integer_param("max_new_tokens", knobs["max_new_tokens"]),
                               temperature=_number_param("temperature", knobs["temperature"]), top_k=top_k or None,
                               steps=steps or None, block_length=_integer_param("block_length", knobs["block_length"]),
                               seed=_integer_param("seed", knobs["seed"]))


def _integer_param(name: str, value: Any) -> int:
    """An inference param that must be a whole number (12, 12.0 or "12") -> int; anything else is refused."""
    try:
        number = int(value)
        whole = number == float(value) and not isinstance(value, bool)
    except (TypeError, ValueError, OverflowError):
        whole = False
    if not whole:
        raise ValueError(f"{name}={value!r}: must be an integer")
    return number


def _number_param(name: str, value: Any) -> float:
    """An inference param that must be a number -> float; anything else is refused."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = None
    if number is None or isinstance(value, bool):
        raise ValueError(f"{name}={value!r}: must be a number")
    return number


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
    parser.add_argument("--steps", type=int, default=None,
                        help="mdm: model calls in all, a multiple of the number of blocks (default: one per token)")
    parser.add_argument("--block-length", type=int, default=defaults.block_length,
                        help="mdm: semi-autoregressive block size (the last block may be shorter)")
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
