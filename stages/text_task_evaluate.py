"""DVC stage `text_task_evaluate`: test exact match, format rate and pass@k of the task models, side by side.

Usage: python -m stages.text_task_evaluate --params params.yaml --task data/text/task
           --model sft_ar=models/text/sft_ar --model scratch_ar=models/text/scratch_ar --model rl_ar=models/text/rl_ar
           ... --metrics metrics/text/task.json
Gains: GRPO over the SFT model it started from, and the pretrained-then-finetuned model over the from-scratch one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pipeline_lib.core.config import flatten
from pipeline_lib.core.runner import Stage, named_folders, one_line_errors, run_stage, stage_parser
from pipeline_lib.core.tracking import Tracker, write_json_atomic
from pipeline_lib.params import Params, load_params
from pipeline_lib.text.data.task_data import task_digest
from pipeline_lib.text.task_evaluate import run_task_evaluate


def main() -> None:
    parser = stage_parser(__doc__, "task")
    parser.add_argument("--model", action="append", default=[], metavar="NAME=FOLDER", help="a task model")
    parser.add_argument("--metrics", type=Path, required=True)
    args = parser.parse_args()
    with one_line_errors("text_task_evaluate"):
        models = named_folders(args.model, "--model")
    run_stage(Stage(
        "text_task_evaluate", load_params, inputs=lambda _: {"task": task_digest(args.task)}, upstream=models,
        logged=lambda params: {"seed": params.seed, **flatten(params.text_task_evaluate,
                                                              prefix="text_task_evaluate.")},
        run=lambda params, tracker, _: evaluate(params, tracker, args.task, models, args.metrics),
        report=lambda summary: "test exact match: " + ", ".join(
            f"{name} {values['accuracy']:.3f}" for name, values in summary.items()
            if isinstance(values, dict) and "accuracy" in values),
    ), args.params)


def evaluate(params: Params, tracker: Tracker, task: Path, models: dict[str, Path], metrics: Path) -> dict[str, Any]:
    summary = run_task_evaluate(params, task, models, tracker)
    write_json_atomic(metrics, summary)
    return summary


if __name__ == "__main__":
    main()
