"""Study `label_curve` (studies/dvc.yaml): test top-1 of SSL, semi-supervised, scratch and the pixel baselines against
the label fraction, from the one pretrained encoder, with paired intervals over the draws.

Usage: python -m stages.label_curve --params params.yaml --encoder models/pretrain --cache-dir data/cache
           --plots plots/label_curve --metrics metrics/label_curve.json
           [--fractions 0.01 0.02 0.05 0.1 0.25 0.5] [--repeats 5 5 3 1 1 1] [--set semi.epochs=60]
Run by `dvc repro studies/dvc.yaml` (never by the default `dvc repro`); see pipeline_lib/vision/label_curve.py.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pipeline_lib.core.runner import Stage, model_version_tags, run_stage, stage_parser
from pipeline_lib.params import load_params
from pipeline_lib.vision.label_curve import (
    DEFAULT_FRACTIONS,
    METHODS,
    CurvePaths,
    check_inputs,
    logged_params,
    run_label_curve,
)
from pipeline_lib.vision.models.factory import encoder_digest


def main() -> None:
    parser = stage_parser(__doc__, "encoder", "plots", "metrics")
    parser.add_argument("--cache-dir", type=Path, required=True, help="the fetch stage's download cache")
    parser.add_argument("--fractions", type=float, nargs="+", default=list(DEFAULT_FRACTIONS),
                        help="label fractions of the training pool (default: %(default)s)")
    parser.add_argument("--repeats", type=int, nargs="+",
                        help="labeled draws per fraction: one count, or one per fraction (default: 5 below 50 "
                             "labeled images, 3 below 100, else 1)")
    parser.add_argument("--jobs", type=int, default=1, help="labeled sets trained at a time, in worker processes "
                        "that share the threads (default: %(default)s)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a params key for this run (repeatable), e.g. semi.epochs=60")
    args = parser.parse_args()
    paths = CurvePaths(args.encoder, args.cache_dir, args.plots, args.metrics)
    run_stage(Stage(
        "label_curve", lambda path: load_params(path, args.set), device=True,
        logged=lambda params: {**logged_params(params, args.fractions, args.repeats), "curve.jobs": args.jobs},
        check=lambda params: check_inputs(params, paths, args.fractions, args.repeats, args.jobs),
        inputs=lambda _: {"encoder": encoder_digest(paths.encoder)}, upstream={"pretrain": paths.encoder},
        tags=lambda: model_version_tags("encoder", paths.encoder),
        run=lambda params, tracker, device: run_label_curve(params, paths, tracker, device,
                                                            fractions=args.fractions, repeats=args.repeats,
                                                            jobs=args.jobs),
        report=report,
    ), args.params)


def report(summary: dict[str, Any]) -> str:
    """`<fraction>: ssl 0.9xx, scratch ...` per point, then the wall time."""
    points = "; ".join(f"{point['label_fraction']:g}: " + ", ".join(f"{m} {point[m]:.3f}" for m in METHODS
                                                                     if point[m] is not None)
                       for point in summary["table"])
    return f"{points} ({summary['draws']} labeled sets, {summary['seconds']:.0f} s; MLflow run {summary['run_id']})"


if __name__ == "__main__":
    main()
