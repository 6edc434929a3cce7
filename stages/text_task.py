"""DVC stage `text_task`: the verifiable task's train, rl and test splits (generated with the seed, or JSONL).

Usage: python -m stages.text_task --params params.yaml --out data/text/task
Generated splits never share a prompt; JSONL files are validated line by line and checked for shared prompts.
"""

from __future__ import annotations

from pathlib import Path

from pipeline_lib.core.config import flatten
from pipeline_lib.core.runner import Stage, run_stage, stage_parser
from pipeline_lib.params import load_params
from pipeline_lib.text.data.task_data import check_inputs, run_text_task


def main() -> None:
    parser = stage_parser(__doc__)
    parser.add_argument("--out", type=Path, required=True, help="task folder (the stage's out)")
    args = parser.parse_args()
    run_stage(Stage(
        "text_task", load_params, check=check_inputs,  # the task's size and files
        logged=lambda params: {"seed": params.seed, **flatten(params.text_task, "text_task.")},
        run=lambda params, tracker, _: run_text_task(params, tracker, args.out),
        report=lambda meta: f"{meta['kind']} ({meta['checker']} checker) -> {args.out}: "
                            + ", ".join(f"{split} {n}" for split, n in meta["sizes"].items()),
    ), args.params)




if __name__ == "__main__":
    main()
