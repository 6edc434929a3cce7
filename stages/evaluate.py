"""DVC stage `evaluate`: test-split metrics of the finetuned classifiers, encoder probes, SSL gain.

Usage: python -m stages.evaluate --params params.yaml --data data/prepared --encoder models/pretrain
           --classifier ssl=models/finetune --classifier scratch=models/finetune_scratch
           --metrics metrics/evaluate.json --plots plots/evaluate
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pipeline_lib.core import dist
from pipeline_lib.core.config import flatten
from pipeline_lib.core.errors import ConfigError, DataError
from pipeline_lib.core.tracking import TrackingUnavailable, read_run_record, stage_run
from pipeline_lib.params import load_params
from pipeline_lib.vision.data.store import prepared_digest
from pipeline_lib.vision.evaluate import EvaluatePaths, run_evaluate


def classifier(text: str) -> tuple[str, Path]:
    name, sep, folder = text.partition("=")
    if not sep or not name or not folder:
        raise argparse.ArgumentTypeError(f"{text!r}: expected NAME=FOLDER, e.g. ssl=models/finetune")
    return name, Path(folder)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--classifier", type=classifier, action="append", required=True,
                        help="NAME=FOLDER of a finetuned classifier; repeat (ssl, scratch)")
    for name in ("data", "encoder", "metrics", "plots"):
        parser.add_argument(f"--{name}", type=Path, required=True)
    args = parser.parse_args()
    paths = EvaluatePaths(args.data, args.encoder, dict(args.classifier), args.metrics, args.plots)
    try:
        params = load_params(args.params)  # every params error surfaces here, before any work
        device = dist.resolve_device(params.device)
        records = {name: read_run_record(folder) for name, folder in paths.classifiers.items()}
        upstream = {"fetch": read_run_record(paths.data).get("run_id", "unknown"),
                    "pretrain": read_run_record(paths.encoder).get("run_id", "unknown"),
                    **{f"finetune.{name}": r.get("run_id", "unknown") for name, r in records.items()}}
        logged = {"device": params.device, **flatten(params.evaluate, prefix="evaluate.")}
        with stage_run("evaluate", params, logged, inputs={"data": prepared_digest(paths.data)},
                       upstream=upstream) as tracker:
            summary = run_evaluate(params, paths, tracker, device)
    except (ConfigError, DataError, TrackingUnavailable, FileNotFoundError, ValueError) as err:
        sys.exit(f"evaluate: {err}")
    line = {f"{name}.top1": summary[name]["top1"] for name in paths.classifiers}
    line.update({f"gain.{k}": v for k, v in summary.get("gain", {}).items()})
    line.update({f"encoder.{k}": v for k, v in summary["encoder"].items()})
    print("evaluate: " + ", ".join(f"{k} {v:.4f}" for k, v in line.items()))


if __name__ == "__main__":
    main()
