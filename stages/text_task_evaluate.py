"""DVC stage `text_task_evaluate`: test exact match, format rate and pass@k of the task models, side by side.

Usage: python -m stages.text_task_evaluate --params params.yaml --task data/text/task
           --model sft_ar=models/text/sft_ar --model scratch_ar=models/text/scratch_ar --model rl_ar=models/text/rl_ar
           ... --metrics metrics/text/task.json
Gains: GRPO over the SFT model it started from, and the pretrained-then-finetuned model over the from-scratch one.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pipeline_lib.core.config import flatten
from pipeline_lib.core.errors import ConfigError, DataError
from pipeline_lib.core.tracking import TrackingUnavailable, read_run_record, stage_run, write_json_atomic
from pipeline_lib.params import load_params
from pipeline_lib.text.data.task_data import task_digest
from pipeline_lib.text.task_evaluate import run_task_evaluate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--task", type=Path, required=True)
    parser.add_argument("--model", action="append", default=[], metavar="NAME=FOLDER", help="a task model")
    parser.add_argument("--metrics", type=Path, required=True)
    args = parser.parse_args()
    try:
        models = {name: Path(folder) for name, _, folder in (item.partition("=") for item in args.model)}
        if not models or not all(models) or Path() in models.values():
            raise ValueError(f"--model {args.model}: give one or more NAME=FOLDER")
        params = load_params(args.params)
        upstream = {name: read_run_record(folder).get("run_id", "unknown") for name, folder in models.items()}
        with stage_run("text_task_evaluate", params, {"seed": params.seed, **flatten(
                params.text_task_evaluate, prefix="text_task_evaluate.")}, inputs={"task": task_digest(args.task)},
                upstream=upstream) as run:
            summary = run_task_evaluate(params, args.task, models, run)
            write_json_atomic(args.metrics, summary)
    except (ConfigError, DataError, TrackingUnavailable, FileNotFoundError, ValueError) as err:
        sys.exit(f"text_task_evaluate: {err}")
    print("text_task_evaluate: test exact match: " + ", ".join(
        f"{name} {values['accuracy']:.3f}" for name, values in summary.items()
        if isinstance(values, dict) and "accuracy" in values))


if __name__ == "__main__":
    main()
