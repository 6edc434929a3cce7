"""Compound scaling's table of model sizes, as a command line: python -m pipeline_lib.vision.models.scaling."""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Sequence
from pathlib import Path

import torch

from pipeline_lib.core.errors import ConfigError
from pipeline_lib.vision.config import ModelParams
from pipeline_lib.vision.models.compound import compound_scale, count_flops, count_parameters, human


def scaling_table(model: ModelParams, phis: Sequence[float], *, data_img_size: int, in_chans: int) -> list[str]:
    """Rows (φ, model, depth, width, resolution, params, FLOPs) of the encoder `model` describes at each φ.

    EfficientNet rows give the chosen variant's depth and width multipliers; FLOPs are for one image.
    """
    from pipeline_lib.vision.models.factory import build_encoder

    rows = [f"{'phi':>5}  {'model':<16} {'depth':>6} {'width':>6} {'res':>5} {'params':>9} {'FLOPs':>9}"]
    for phi in phis:
        resolved, scaling = compound_scale(dataclasses.replace(model, compound_phi=phi), data_img_size=data_img_size)
        torch.manual_seed(0)
        network = build_encoder(resolved, in_chans=in_chans, img_size=scaling.img_size)
        if scaling.depth is not None:
            depth, width = str(scaling.depth), str(scaling.embed_dim)
        else:
            depth, width = f"x{scaling.achieved[0]:.2f}", f"x{scaling.achieved[1]:.2f}"
        params = count_parameters(network)
        flops = count_flops(network, in_chans=in_chans, img_size=scaling.img_size)
        rows.append(f"{phi:>5g}  {scaling.name:<16} {depth:>6} {width:>6} {scaling.img_size:>5} "
                    f"{human(params):>9} {human(flops):>9}")
    return rows


def main(argv: Sequence[str] | None = None) -> None:
    """Print the scaling table of the configured encoder without training."""
    from pipeline_lib.core.config import load_params
    from pipeline_lib.vision.config import VisionParams

    parser = argparse.ArgumentParser(description="Compound scaling table (depth, width, resolution, params, "
                                                 "FLOPs per image) of the model section, without training.")
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--phi", type=float, nargs="+", default=[0.0, 1.0, 2.0, 3.0], help="values of φ")
    parser.add_argument("--img-size", type=int, default=None,
                        help="base input side; default model.img_size, else 8: the prepared images of the "
                             "default source, scikit-learn's bundled 8x8 digits (data.source digits)")
    parser.add_argument("--in-chans", type=int, default=1, help="input channels (1: the grayscale digits)")
    parser.add_argument("-S", "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a params key, as dvc exp run -S does (e.g. -S model.name=efficientnet_b0)")
    args = parser.parse_args(argv)
    try:
        model = load_params(args.params, VisionParams, args.overrides, view=True).model
        if args.img_size is not None:  # the given side is the base resolution, whatever model.img_size says
            model = dataclasses.replace(model, img_size=None)
        phis = [dataclasses.replace(model, compound_phi=phi).compound_phi for phi in args.phi]  # validates each
        rows = scaling_table(model, phis, data_img_size=args.img_size or model.img_size or 8, in_chans=args.in_chans)
    except ConfigError as err:
        parser.exit(2, f"compound: {err}\n")
    print(f"{model.name}: depth x {model.compound_alpha}^φ, width x {model.compound_beta}^φ, "
          f"resolution x {model.compound_gamma}^φ, {args.in_chans} input channel(s)")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
