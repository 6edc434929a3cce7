"""DVC stage `evaluate`: test-split metrics of the finetuned classifiers, encoder probes, pixel baselines, SSL gain.

Usage: python -m stages.evaluate --params params.yaml --data data/prepared --encoder models/pretrain
           --classifier ssl=models/finetune --classifier scratch=models/finetune_scratch --classifier semi=models/semi
           --metrics metrics/evaluate.json --plots plots/evaluate
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from pipeline_lib.core.config import flatten
from pipeline_lib.core.runner import Stage, run_stage, stage_parser
from pipeline_lib.params import load_params
from pipeline_lib.vision.data.store import prepared_digest
from pipeline_lib.vision.evaluate import EvaluatePaths, run_evaluate


def main() -> None:
    parser = stage_parser(__doc__, "data", "encoder", "metrics", "plots")
    parser.add_argument("--classifier", type=classifier, action="append", required=True,
                        help="NAME=FOLDER of a finetuned classifier; repeat (ssl, scratch, semi)")
    args = parser.parse_args()
    paths = EvaluatePaths(args.data, args.encoder, dict(args.classifier), args.metrics, args.plots)
    run_stage(Stage(
        "evaluate", load_params, device=True, report=lambda summary: report(summary, paths.classifiers),
        logged=lambda params: {"seed": params.seed, "device": params.device,
                               **flatten(params.evaluate, prefix="evaluate.")},
        inputs=lambda _: {"data": prepared_digest(paths.data)},
        upstream={"fetch": paths.data, "pretrain": paths.encoder,
                  **{f"finetune.{name}": folder for name, folder in paths.classifiers.items()}},
        run=lambda params, tracker, device: run_evaluate(params, paths, tracker, device),
    ), args.params)


def classifier(text: str) -> tuple[str, Path]:
    name, sep, folder = text.partition("=")
    if not sep or not name or not folder:
        raise argparse.ArgumentTypeError(f"{text!r}: expected NAME=FOLDER, e.g. ssl=models/finetune")
    return name, Path(folder)


def report(summary: dict[str, Any], classifiers: dict[str, Path]) -> str:
    line = {f"{name}.top1": summary[name]["top1"] for name in classifiers if name in summary}  # semi may be off
    line.update({f"gain.{k}": v for k, v in summary.get("gain", {}).items()})
    line.update({f"encoder.{k}": v for k, v in summary["encoder"].items()})
    line.update({f"baselines.{name}.top1": scores["top1"] for name, scores in summary["baselines"].items()})
    svm = summary["baselines"]["pixels_svm"]
    chosen = f"svm C {svm['C']:g}, gamma {svm['gamma']:g}"
    if spreading := summary["baselines"].get("pixels_label_spreading"):  # absent over too many images
        graph = "gamma" if spreading["kernel"] == "rbf" else "n_neighbors"  # the kernel's own parameter
        chosen += f"; label spreading {spreading['kernel']} {graph} {spreading[graph]:g}, alpha {spreading['alpha']:g}"
    return ", ".join(f"{k} {v:.4f}" for k, v in line.items()) + f" ({chosen})"


if __name__ == "__main__":
    main()
