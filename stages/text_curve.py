"""Study `text_curve` (studies/dvc.yaml): validation bits per character of the ar and mdm transformers against
training time and training FLOPs, with the n-gram's as a line.

Usage: python -m stages.text_curve --params params.yaml --data data/text/prepared --plots plots/text_curve
Run by `dvc repro studies/dvc.yaml:text_curve` (never by the default `dvc repro`); see pipeline_lib/text/curve.py.
"""

from __future__ import annotations

from typing import Any

from pipeline_lib.core.runner import Stage, run_stage, stage_parser
from pipeline_lib.params import load_params
from pipeline_lib.text.curve import CurvePaths, check_inputs, logged_params, run_text_curve
from pipeline_lib.text.data.corpus import read_text_meta
from pipeline_lib.text.models.objectives import OBJECTIVES


def main() -> None:
    args = stage_parser(__doc__, "data", "plots").parse_args()
    paths = CurvePaths(args.data, args.plots)
    run_stage(Stage(
        "text_curve", load_params, device=True, logged=logged_params,
        check=lambda params: check_inputs(params, paths.data),  # params the prepared text decides
        inputs=lambda _: {f"text_{split}": read_text_meta(paths.data)["sha256"][f"{split}.bin"]
                        for split in ("train", "val")},
        upstream={"text_fetch": paths.data},
        run=lambda params, tracker, device: run_text_curve(params, paths, tracker, device),
        report=report,
    ), args.params)


def report(summary: dict[str, Any]) -> str:
    """`n-gram 1.677; ar final bpc 1.71 (best 1.70), below the n-gram from 95.2 s, 3.1e+13 FLOPs; ...`."""
    parts = [f"n-gram {summary['ngram_bpc']:.4f}"]
    for objective, strategy in OBJECTIVES.items():
        numbers = summary[objective]
        crossing = ("never below the n-gram" if numbers["crossover_seconds"] is None else
                    f"below the n-gram from {numbers['crossover_seconds']:.1f} s, {numbers['crossover_flops']:.3g} "
                    "FLOPs")
        parts.append(f"{objective} final {strategy.bpc_key} {numbers[f'final_{strategy.bpc_key}']:.4f} (best "
                     f"{numbers[f'best_{strategy.bpc_key}']:.4f}), {crossing}")
    return (f"{'; '.join(parts)}; mdm / ar {summary['mdm_over_ar_final_bpc']:.3f} ({summary['points']} points, "
            f"{summary['seconds']:.0f} s; MLflow run {summary['run_id']})")


if __name__ == "__main__":
    main()
