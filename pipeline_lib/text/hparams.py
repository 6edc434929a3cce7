"""Learning rate and batch size from a compute budget: the hyperparameter scaling laws of DeepSeek LLM.

DeepSeek LLM (DeepSeek-AI, "DeepSeek LLM: Scaling Open-Source Language Models with Longtermism", arXiv
2401.02954, section 3.1, eq. 1) fits the near-optimal learning rate and batch size of a pretraining run as power
laws of its compute budget C = M · D (FLOPs), where M is the non-embedding FLOPs per token (eq. 2,
`flops_per_token`) and D the training tokens:

    η_opt = 0.3118 · C^-0.1250          B_opt = 0.2920 · C^0.3271 tokens

The laws were fitted on grid searches over budgets of about 1e17 to 2e19 FLOPs (`FIT_RANGE`). `auto_hparams`
applies them with this cap policy:

- C within `FIT_RANGE`: the law's values.
- C below the fitted range (the CPU default of params.yaml is about 1.3e12): the learning-rate law grows without
  bound as C shrinks, so the learning rate is capped at the law's value at the bottom of the fitted range,
  η(1e17) ≈ 2.34e-3, never a larger learning rate than any fitted run used. The batch law's value is used: it
  only gets smaller below the range.
- C above the fitted range: DeepSeek LLM itself extrapolated both laws to its 7B and 67B runs (C ≈ 8e22 and 1e24;
  the laws give their Table 2 settings within 10%), so the values are the law's, uncapped, and a note says they
  are an extrapolation.
- In every case the batch in sequences is round(B_opt / seq_len), at least `multiple_of` and rounded to a multiple
  of it (the caller passes accumulation steps × processes, so the batch divides evenly), then at most `max_batch`
  (the caller passes the number of training sequences, so an epoch has at least one step), lowered to a multiple
  of `multiple_of`. Each such change adds a note.
- Outside `FIT_RANGE`, `warnings.warn` (`ScalingLawRangeWarning`) names C, the range and what was capped; the
  notes hold the same text. Inside the range no warning is issued.

`AutoHparams.as_params` gives the law's values and the values used as flat MLflow params under ``hparams.``.
``python -m pipeline_lib.text.hparams`` prints them for a model shape and a token count or a budget.
"""

from __future__ import annotations

import argparse
import math
import sys
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pipeline_lib.core.config import load_params
from pipeline_lib.text.config import TextParams

LR_COEF = 0.3118
LR_EXP = -0.125
BATCH_COEF = 0.2920
BATCH_EXP = 0.3271
FIT_RANGE = (1e17, 2e19)  # compute budgets (FLOPs) of the grid searches the laws were fitted on

FitPosition = Literal["below", "within", "above"]


class ScalingLawRangeWarning(UserWarning):
    """The compute budget lies outside the range the DeepSeek LLM laws were fitted on."""


def _check_positive(name: str, value: float, *, integer: bool = False) -> None:
    """Raise ValueError naming `name` unless `value` is a finite positive number (an integer if asked)."""
    if isinstance(value, bool) or (integer and not isinstance(value, int)):
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if not (math.isfinite(value) and value > 0):
        kind = "a positive integer" if integer else "a finite positive number"
        raise ValueError(f"{name} must be {kind}, got {value!r}")


def flops_per_token(*, n_layer: int, d_model: int, seq_len: int, mlp_active_params: int | None = None) -> float:
    """DeepSeek LLM's non-embedding training FLOPs per token, M (arXiv 2401.02954, eq. 2).

    M = 6 · n_layer · (4·d² + P_mlp) + 12 · n_layer · d · seq_len.

    The 6: a parameter of a matrix multiply costs one multiply-add, 2 FLOPs, per token in the forward pass, and
    the backward pass costs twice the forward (gradients with respect to the activations and to the weights), so
    training costs 3 × 2 = 6 FLOPs per parameter per token. Per layer, attention has 4·d² projection parameters
    (query, key, value, output) and the feed-forward block P_mlp. The attention term: the scores Q·Kᵀ and the
    weighted sum of the values each take seq_len · d multiply-adds per token and layer, 4 · seq_len · d forward
    FLOPs, 12 · seq_len · d for training (DeepSeek counts the full seq_len × seq_len score matrix, not the causal
    half). The token embedding and the output projection onto the vocabulary are left out.

    Args:
        n_layer: Transformer blocks.
        d_model: Width of the residual stream, d.
        seq_len: Tokens per training sequence (the attention context).
        mlp_active_params: Feed-forward parameters one token passes through in one layer. The default, 8·d², is
            the dense MLP of width 4·d that makes the first term exactly DeepSeek's 72 · n_layer · d²; a mixture
            of experts passes the parameters of the experts a token activates (shared and routed).

    Returns:
        M, in FLOPs per training token.

    Examples:
        >>> flops_per_token(n_layer=30, d_model=4096, seq_len=4096)  # DeepSeek LLM 7B
        42278584320.0
    """
    _check_positive("n_layer", n_layer, integer=True)
    _check_positive("d_model", d_model, integer=True)
    _check_positive("seq_len", seq_len, integer=True)
    if mlp_active_params is None:
        mlp_active_params = 8 * d_model**2
    elif isinstance(mlp_active_params, bool) or not isinstance(mlp_active_params, int) or mlp_active_params < 0:
        raise ValueError(f"mlp_active_params must be a non-negative integer, got {mlp_active_params!r}")
    attention_params = 4 * d_model**2
    return float(6 * n_layer * (attention_params + mlp_active_params) + 12 * n_layer * d_model * seq_len)


def law_lr(compute: float) -> float:
    """DeepSeek LLM's near-optimal learning rate for a compute budget: η_opt = 0.3118 · C^-0.125 (eq. 1)."""
    _check_positive("compute", compute)
    return LR_COEF * compute**LR_EXP


def law_batch_tokens(compute: float) -> float:
    """DeepSeek LLM's near-optimal batch size in tokens for a compute budget: B_opt = 0.2920 · C^0.3271 (eq. 1)."""
    _check_positive("compute", compute)
    return BATCH_COEF * compute**BATCH_EXP


@dataclass(frozen=True)
class AutoHparams:
    """The scaling laws' learning rate and batch size for one run, and the values used after the caps.

    Attributes:
        compute: C, the compute budget in FLOPs.
        flops_per_token: M, non-embedding training FLOPs per token.
        tokens: D, training tokens.
        law_lr: η_opt of the law at C.
        law_batch_tokens: B_opt of the law at C, in tokens.
        lr: The learning rate used.
        batch_size: The batch used, in sequences.
        batch_tokens: The batch used, in tokens (batch_size × seq_len).
        fit: Where C lies against `FIT_RANGE`.
        capped: Short names of the caps applied (``lr``, ``multiple_of``, ``max_batch``), empty when none.
        notes: One line per cap applied, and one for an extrapolation above the range; empty when none.
    """

    compute: float
    flops_per_token: float
    tokens: float
    law_lr: float
    law_batch_tokens: float
    lr: float
    batch_size: int
    batch_tokens: int
    fit: FitPosition = "within"
    capped: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()

    def as_params(self) -> dict[str, float | int | str]:
        """Flat MLflow params under ``hparams.``: the inputs, the law's values and the values used."""
        return {
            "hparams.compute": self.compute,
            "hparams.flops_per_token": self.flops_per_token,
            "hparams.tokens": self.tokens,
            "hparams.fit": self.fit,
            "hparams.law.lr": self.law_lr,
            "hparams.law.batch_tokens": self.law_batch_tokens,
            "hparams.used.lr": self.lr,
            "hparams.used.batch_size": self.batch_size,
            "hparams.used.batch_tokens": self.batch_tokens,
            "hparams.capped": ",".join(self.capped) or "none",
        }


def _fit_position(compute: float) -> FitPosition:
    low, high = FIT_RANGE
    return "below" if compute < low else "above" if compute > high else "within"


def _range_lr(compute: float, fit: FitPosition) -> tuple[float, str | None]:
    """The learning rate used and the range note (None within the range): the lr cap of the module docstring."""
    low, high = FIT_RANGE
    where = f"compute budget C = {compute:.3g} FLOPs is {fit} the fitted range [{low:.3g}, {high:.3g}] of DeepSeek LLM"
    if fit == "below":
        lr = law_lr(low)
        return lr, (f"{where}: lr capped at the law's value at {low:.3g}, {lr:.3g} (law at C: {law_lr(compute):.3g});"
                    f" batch from the law")
    if fit == "above":
        return law_lr(compute), f"{where}: lr and batch extrapolated from the laws (as DeepSeek LLM did for 7B/67B)"
    return law_lr(compute), None


def _batch_sequences(batch_tokens: float, *, seq_len: int, max_batch: int | None,
                     multiple_of: int) -> tuple[int, list[str], list[str]]:
    """Batch in sequences from the law's tokens -> (batch, cap names, notes), per the module docstring."""
    capped: list[str] = []
    notes: list[str] = []
    law = round(batch_tokens / seq_len)
    batch = max(multiple_of, round(law / multiple_of) * multiple_of)
    if batch != law:
        capped.append("multiple_of")
        notes.append(f"batch {law} sequences (law {batch_tokens:.4g} tokens / seq_len {seq_len}) rounded to "
                     f"{batch}, a positive multiple of multiple_of={multiple_of}")
    if max_batch is not None and batch > max_batch:
        lowered = max_batch // multiple_of * multiple_of
        if lowered == 0:
            raise ValueError(f"max_batch={max_batch} is smaller than multiple_of={multiple_of}: no batch of at most "
                             f"max_batch sequences divides evenly")
        capped.append("max_batch")
        notes.append(f"batch {batch} sequences capped at {lowered} (max_batch={max_batch}, the training sequences, so "
                     f"an epoch has at least one step)")
        batch = lowered
    return batch, capped, notes


def auto_hparams(*, flops_per_token: float, tokens: float, seq_len: int, compute: float | None = None,
                 max_batch: int | None = None, multiple_of: int = 1) -> AutoHparams:
    """Learning rate and batch size from DeepSeek LLM's scaling laws, capped as the module docstring documents.

    Args:
        flops_per_token: M, non-embedding training FLOPs per token (`flops_per_token`).
        tokens: D, training tokens (e.g. epochs × tokens per epoch).
        seq_len: Tokens per training sequence; the batch is counted in sequences of this length.
        compute: C, a budget stated directly; by default M · D.
        max_batch: Largest batch in sequences (the number of training sequences); none by default.
        multiple_of: The batch in sequences is a positive multiple of this (accumulation steps × processes).

    Returns:
        The law's values, the values used and a note per cap.

    Raises:
        ValueError: A non-positive (or non-finite) input, naming it, or `max_batch` below `multiple_of`.

    Examples:
        >>> hp = auto_hparams(flops_per_token=42278584320.0, tokens=2e12, seq_len=4096)  # DeepSeek LLM 7B
        >>> round(hp.lr, 6), hp.batch_size, hp.fit
        (0.000425, 2252, 'above')
    """
    _check_positive("flops_per_token", flops_per_token)
    _check_positive("tokens", tokens)
    _check_positive("seq_len", seq_len, integer=True)
    _check_positive("multiple_of", multiple_of, integer=True)
    if compute is not None:
        _check_positive("compute", compute)
    if max_batch is not None:
        _check_positive("max_batch", max_batch, integer=True)
    budget = flops_per_token * tokens if compute is None else compute
    fit = _fit_position(budget)
    lr, range_note = _range_lr(budget, fit)
    law_tokens = law_batch_tokens(budget)
    batch, capped, notes = _batch_sequences(law_tokens, seq_len=seq_len, max_batch=max_batch, multiple_of=multiple_of)
    if range_note is not None:
        warnings.warn(range_note, ScalingLawRangeWarning, stacklevel=2)
        notes.insert(0, range_note)
        if fit == "below":
            capped.insert(0, "lr")
    return AutoHparams(compute=budget, flops_per_token=flops_per_token, tokens=tokens, law_lr=law_lr(budget),
                       law_batch_tokens=law_tokens, lr=lr, batch_size=batch, batch_tokens=batch * seq_len, fit=fit,
                       capped=tuple(capped), notes=tuple(notes))


def _model_shape(args: argparse.Namespace) -> tuple[int, int, int]:
    """(n_layer, d_model, seq_len): the flags, filled from `text_model` of --params where not given."""
    shape = {"n_layer": args.n_layer, "d_model": args.d_model, "seq_len": args.seq_len}
    if args.params is not None:
        model = load_params(args.params, TextParams, args.overrides, view=True).text_model
        shape = {key: getattr(model, key) if value is None else value for key, value in shape.items()}
    missing = [f"--{key.replace('_', '-')}" for key, value in shape.items() if value is None]
    if missing:
        raise ValueError(f"give {', '.join(missing)} or --params")
    return shape["n_layer"], shape["d_model"], shape["seq_len"]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline_lib.text.hparams", description=__doc__.splitlines()[0],
                                     epilog="flags override the values read from --params")
    parser.add_argument("--params", type=Path, help="read text_model.n_layer/d_model/seq_len from this params file")
    parser.add_argument("-S", "--set-param", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a key of --params for this call, as `dvc exp run -S` does")
    parser.add_argument("--n-layer", type=int)
    parser.add_argument("--d-model", type=int)
    parser.add_argument("--seq-len", type=int)
    parser.add_argument("--mlp-active-params", type=int, help="feed-forward parameters per token and layer "
                        "(default 8·d_model², the dense MLP)")
    parser.add_argument("--tokens", type=float, help="training tokens D (default with --compute: C / M)")
    parser.add_argument("--compute", type=float, help="compute budget C in FLOPs (default M · D)")
    parser.add_argument("--max-batch", type=int, help="largest batch in sequences (the training sequences)")
    parser.add_argument("--multiple-of", type=int, default=1, help="accumulation steps × processes")
    args = parser.parse_args(argv)
    try:
        if args.tokens is None and args.compute is None:
            raise ValueError("give --tokens or --compute")
        n_layer, d_model, seq_len = _model_shape(args)
        m = flops_per_token(n_layer=n_layer, d_model=d_model, seq_len=seq_len,
                            mlp_active_params=args.mlp_active_params)
        tokens = args.compute / m if args.tokens is None else args.tokens
        with warnings.catch_warnings():  # printed below as notes
            warnings.simplefilter("ignore", ScalingLawRangeWarning)
            hp = auto_hparams(flops_per_token=m, tokens=tokens, seq_len=seq_len, compute=args.compute,
                              max_batch=args.max_batch, multiple_of=args.multiple_of)
    except ValueError as err:  # a bad flag, or a bad params file (ConfigError is a ValueError)
        print(f"hparams: {err}", file=sys.stderr)
        return 2
    print(f"model: n_layer={n_layer} d_model={d_model} seq_len={seq_len}")
    for key, value in hp.as_params().items():
        print(f"{key} = {value:.4g}" if isinstance(value, float) else f"{key} = {value}")
    print(f"used: lr {hp.lr:.4g}, batch {hp.batch_size} sequences of {seq_len} ({hp.batch_tokens} tokens)")
    for note in hp.notes:
        print(f"note: {note}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
