"""EfficientNet compound scaling of the encoder: one knob φ for depth, width and input resolution.

Tan & Le 2019 ("EfficientNet: Rethinking Model Scaling for Convolutional Neural Networks", eq. 3) grow a base
network by depth x α^φ, width x β^φ and resolution x γ^φ, with α = 1.2, β = 1.1, γ = 1.15 found by a small grid
search (α β² γ² ≈ 2: each unit of φ about doubles the FLOPs). Here the knob is `model.compound_phi` (with
`model.compound_alpha`, `compound_beta`, `compound_gamma`), for two families:

- `vit`: the custom ViT's `depth`, `embed_dim` and `img_size` are scaled and rounded (see `scale_vit`).
- `efficientnet_b0`..`efficientnet_b7`: timm builds only these fixed variants, so the target multipliers (the
  base variant's times β^φ and α^φ) choose the nearest variant, and the input resolution is scaled.

A stage resolves the spec once, where it decides the input size (`compound_scale`), and from then on builds,
preprocesses, saves and logs the resolved spec, whose `compound_phi` is 0: a saved `config.json` rebuilds the
same network and is never scaled twice. `count_parameters` and `count_flops` measure the built network; the
stages print both before training and log them to MLflow (`log_model_size`). From the command line:

    python -m pipeline_lib.vision.models.scaling --params params.yaml --phi 0 1 2 3
    python -m pipeline_lib.vision.models.scaling --phi 0 1 2 3 -S model.name=efficientnet_b0
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from timm.layers import make_divisible
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from pipeline_lib.core.errors import ConfigError
from pipeline_lib.vision.config import ModelParams

if TYPE_CHECKING:
    from pipeline_lib.core.tracking import Tracker

# (width, depth) multipliers of timm's EfficientNets: `timm/models/efficientnet.py`, `efficientnet_b0` ..
# `efficientnet_b7` call `_gen_efficientnet(channel_multiplier=..., depth_multiplier=...)` with these values.
EFFICIENTNET_MULTIPLIERS: dict[str, tuple[float, float]] = {
    "efficientnet_b0": (1.0, 1.0),
    "efficientnet_b1": (1.0, 1.1),
    "efficientnet_b2": (1.1, 1.2),
    "efficientnet_b3": (1.2, 1.4),
    "efficientnet_b4": (1.4, 1.8),
    "efficientnet_b5": (1.6, 2.2),
    "efficientnet_b6": (1.8, 2.6),
    "efficientnet_b7": (2.0, 3.1),
}
# A variant matches a target when each of its multipliers is within 20% of the target's (ratio in [1/1.2, 1.2]).
# The variants are 10-30% apart, so below b7 some variant always matches; beyond b7 (φ > 7 from b0) none does.
VARIANT_TOLERANCE = 1.2
_EPSILON = 1e-9  # float noise: 5 x 1.2 must round up to 6 repeats, not 7


@dataclass(frozen=True)
class CompoundScaling:
    """What compound scaling chose for one φ: the targets, the resolved encoder and how close it came.

    Attributes:
        phi: the knob, `model.compound_phi`.
        target: (depth, width, resolution) multipliers asked for: (α^φ, β^φ, γ^φ).
        achieved: the same multipliers after rounding (vit) or of the chosen variant relative to the base
            variant (EfficientNet); `achieved[i] / target[i]` says how far the choice is from the target.
        base_name: `model.name` before scaling.
        name: the model built: `vit`, or the chosen timm EfficientNet variant.
        base_img_size: input side before scaling (`model.img_size`, else the prepared images' side).
        img_size: input side after scaling.
        depth: transformer blocks after scaling (custom `vit` only, else None).
        embed_dim: token width after scaling (custom `vit` only, else None).
    """

    phi: float
    target: tuple[float, float, float]
    achieved: tuple[float, float, float]
    base_name: str
    name: str
    base_img_size: int
    img_size: int
    depth: int | None = None
    embed_dim: int | None = None

    def describe(self) -> str:
        """One line: φ and the resolved depth/width/resolution, or the chosen variant."""
        if self.phi == 0:
            head = f"compound scaling off (φ=0): {self.name}"
        else:
            head = f"compound scaling φ={self.phi:g}: {self.base_name}"
            if self.name != self.base_name:
                head += f" -> {self.name}"
        if self.depth is not None:
            head += f", depth {self.depth}, width {self.embed_dim}"
        elif self.phi > 0:
            head += (f" (width x{self.achieved[1]:.2f} for target x{self.target[1]:.2f}, "
                     f"depth x{self.achieved[0]:.2f} for target x{self.target[0]:.2f})")
        return head + f", resolution {self.img_size}"

    def mlflow_params(self) -> dict[str, Any]:
        """The resolved architecture as flat MLflow params (`model.scaled.*`)."""
        logged: dict[str, Any] = {"model.scaled.name": self.name, "model.scaled.img_size": self.img_size}
        if self.depth is not None:
            logged |= {"model.scaled.depth": self.depth, "model.scaled.embed_dim": self.embed_dim}
        names = ("depth_multiplier", "width_multiplier", "resolution_multiplier")
        logged |= {f"model.scaled.{name}": round(value, 4) for name, value in zip(names, self.achieved, strict=True)}
        return logged


def compound_scale(model: ModelParams, *, data_img_size: int) -> tuple[ModelParams, CompoundScaling]:
    """The spec to build after compound scaling by `model.compound_phi`, and a record of what was chosen.

    Args:
        model: the `model` section as configured.
        data_img_size: side of the prepared images; the base resolution when `model.img_size` is null.

    Returns:
        The resolved spec (`compound_phi` 0, so rebuilding it from a saved config does not scale it again)
        and the record. At φ = 0 the spec is `model` itself, unchanged.

    Raises:
        ConfigError: no timm EfficientNet variant is near the scaled multipliers (the message names
            `model.compound_phi` and the nearest variant).
    """
    base_img_size = model.img_size or data_img_size
    if model.compound_phi == 0:
        custom = model.name == "vit"
        scaling = CompoundScaling(
            phi=0.0, target=(1.0, 1.0, 1.0), achieved=(1.0, 1.0, 1.0), base_name=model.name, name=model.name,
            base_img_size=base_img_size, img_size=base_img_size, depth=model.depth if custom else None,
            embed_dim=model.embed_dim if custom else None,
        )
        return model, scaling
    target = (model.compound_alpha ** model.compound_phi, model.compound_beta ** model.compound_phi,
              model.compound_gamma ** model.compound_phi)
    scaler = SCALERS["vit" if model.name == "vit" else "efficientnet"]
    return scaler(model, target, base_img_size)


def scale_vit(model: ModelParams, target: tuple[float, float, float],
              base_img_size: int) -> tuple[ModelParams, CompoundScaling]:
    """Scale the custom ViT, rounding as EfficientNet rounds its repeats and channels.

    - depth' = ceil(depth · α^φ): EfficientNet's `round_repeats` (never fewer blocks than asked for).
    - width' = embed_dim · β^φ to the nearest multiple of lcm(2 · num_heads, 4), as timm's `make_divisible`
      rounds channels (up instead when rounding down would lose more than 10%), and never below `embed_dim`.
      `num_heads` stays; a multiple of 2 · num_heads gives every head the same even width, and a multiple of 4
      is what MAE's 2D sin-cos position embedding needs.
    - resolution' = img_size · γ^φ to the nearest multiple of `patch_size` (halves up), at least one patch.
    """
    depth_mult, width_mult, res_mult = target
    assert model.patch_size is not None  # ModelParams requires it for vit
    depth = math.ceil(model.depth * depth_mult - _EPSILON)
    divisor = math.lcm(2 * model.num_heads, 4)
    embed_dim = make_divisible(model.embed_dim * width_mult, divisor)
    if embed_dim < model.embed_dim:  # a base width that is no multiple of the divisor: never narrower
        embed_dim += divisor
    img_size = _round_to_multiple(base_img_size * res_mult, model.patch_size)
    resolved = dataclasses.replace(model, depth=depth, embed_dim=embed_dim, img_size=img_size, compound_phi=0.0)
    achieved = (depth / model.depth, embed_dim / model.embed_dim, img_size / base_img_size)
    return resolved, CompoundScaling(
        phi=model.compound_phi, target=target, achieved=achieved, base_name=model.name, name=model.name,
        base_img_size=base_img_size, img_size=img_size, depth=depth, embed_dim=embed_dim,
    )


def scale_efficientnet(model: ModelParams, target: tuple[float, float, float],
                       base_img_size: int) -> tuple[ModelParams, CompoundScaling]:
    """Move to the timm EfficientNet variant nearest the scaled multipliers; resolution' = round(size · γ^φ).

    The resolved spec's `patch_size` is null: a CNN ignores it, and its input side need not be a multiple of it.
    """
    depth_mult, width_mult, res_mult = target
    base_width, base_depth = EFFICIENTNET_MULTIPLIERS[model.name]
    name = nearest_efficientnet(base_width * width_mult, base_depth * depth_mult, phi=model.compound_phi)
    width, depth = EFFICIENTNET_MULTIPLIERS[name]
    img_size = _round_to_multiple(base_img_size * res_mult, 1)
    resolved = dataclasses.replace(model, name=name, img_size=img_size, patch_size=None, compound_phi=0.0)
    achieved = (depth / base_depth, width / base_width, img_size / base_img_size)
    return resolved, CompoundScaling(
        phi=model.compound_phi, target=target, achieved=achieved, base_name=model.name, name=name,
        base_img_size=base_img_size, img_size=img_size,
    )


SCALERS: dict[str, Callable[[ModelParams, tuple[float, float, float], int], tuple[ModelParams, CompoundScaling]]] = {
    "vit": scale_vit,
    "efficientnet": scale_efficientnet,
}


def nearest_efficientnet(width: float, depth: float, *, phi: float) -> str:
    """The timm EfficientNet whose (width, depth) multipliers are nearest (width, depth) in log space.

    Raises:
        ConfigError: the nearest variant is more than `VARIANT_TOLERANCE` away in either multiplier.
    """

    def gaps(name: str) -> tuple[float, float]:
        variant_width, variant_depth = EFFICIENTNET_MULTIPLIERS[name]
        return abs(math.log(variant_width / width)), abs(math.log(variant_depth / depth))

    name = min(EFFICIENTNET_MULTIPLIERS, key=lambda candidate: math.hypot(*gaps(candidate)))
    if max(gaps(name)) > math.log(VARIANT_TOLERANCE) + _EPSILON:
        variant_width, variant_depth = EFFICIENTNET_MULTIPLIERS[name]
        raise ConfigError(
            f"model.compound_phi={phi!r}: asks for width x{width:.2f} and depth x{depth:.2f} (of efficientnet_b0); "
            f"the nearest timm variant, {name} (width x{variant_width}, depth x{variant_depth}), is more than "
            f"{VARIANT_TOLERANCE - 1:.0%} off in a multiplier; lower model.compound_phi"
        )
    return name


def _round_to_multiple(value: float, multiple: int) -> int:
    """`value` to the nearest multiple of `multiple` (halves up), at least `multiple`."""
    return max(multiple, math.floor(value / multiple + 0.5) * multiple)


def count_parameters(network: nn.Module) -> int:
    """Every parameter of `network`, trainable or not (a frozen position embedding counts)."""
    return sum(p.numel() for p in network.parameters())


def count_flops(network: nn.Module, *, in_chans: int, img_size: int) -> int:
    """FLOPs of one forward pass of a single (1, in_chans, img_size, img_size) image, as torch counts them.

    `torch.utils.flop_counter.FlopCounterMode` counts matmuls, convolutions and attention, with a multiply-add
    as 2 FLOPs (a (m, k) @ (k, n) matmul is 2mkn); norms, activations and softmax are not counted. Attention
    runs on the math backend while counting, so its two matmuls count on every device (torch's table lacks
    the fused CPU kernel). The forward runs without gradients in eval mode (batch-norm statistics stay put);
    every module's mode is restored afterwards.
    """
    device = next(network.parameters()).device
    image = torch.zeros(1, in_chans, img_size, img_size, device=device)  # (1, C, H, W)
    with _eval_mode(network), torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        network(image)
    return int(counter.get_total_flops())


@contextmanager
def _eval_mode(network: nn.Module) -> Iterator[None]:
    modes = {module: module.training for module in network.modules()}
    network.eval()
    try:
        yield
    finally:
        for module, training in modes.items():
            module.training = training


def log_model_size(stage: str, scaling: CompoundScaling, network: nn.Module, *, in_chans: int,
                   tracker: Tracker) -> dict[str, int]:
    """Print the scaling and the size of `network` in one line, and log both to the stage's MLflow run.

    Params `model.scaled.*` (the resolved architecture) and metrics `model_params` and `model_flops` (for one
    image at the resolved size) are logged at every φ, so runs compare in MLflow's view whether scaled or not.
    """
    sizes = {"model_params": count_parameters(network),
             "model_flops": count_flops(network, in_chans=in_chans, img_size=scaling.img_size)}
    print(f"{stage}: {scaling.describe()}; {human(sizes['model_params'])} params, "
          f"{human(sizes['model_flops'])}FLOPs per image")
    tracker.log_params(scaling.mlflow_params())
    tracker.log_metrics({name: float(value) for name, value in sizes.items()}, step=0)
    return sizes


def human(count: float) -> str:
    """12345678 -> '12.35M'."""
    for unit, scale in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if count >= scale:
            return f"{count / scale:.2f}{unit}"
    return f"{count:.0f}"
