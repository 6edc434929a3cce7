"""DVC stage `text_task`: the verifiable task's train, rl and test splits (generated with the seed, or JSONL).

Usage: python -m stages.text_task --params params.yaml --out data/text/task
Generated splits never share a prompt; JSONL files are validated line by line and checked for shared prompts.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pipeline_lib.core.config import flatten
from pipeline_lib.core.errors import ConfigError
from pipeline_lib.core.tracking import TrackingUnavailable, stage_run, write_run_record
from pipeline_lib.params import load_params
from pipeline_lib.text.data.task_data import META_FILE, check_inputs, prepare_task


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--out", type=Path, required=True, help="task folder (the stage's out)")
    args = parser.parse_args()
    try:
        params = load_params(args.params)  # every params error surfaces here, before any work
        check_inputs(params)  # the task's size and files, before any MLflow run
        with stage_run("text_task", params, {"seed": params.seed, **flatten(params.text_task, "text_task.")}) as run:
            meta = prepare_task(params, args.out)
            run.log_metrics({f"{split}.examples": n for split, n in meta["sizes"].items()})
            run.set_tags({"task.kind": meta["kind"], "task.checker": meta["checker"],
                          **{f"input.{name}.sha256": digest for name, digest in meta["sha256"].items()}})
            run.log_artifact(args.out / META_FILE)
            write_run_record(args.out / "run.json", run)
    except (ConfigError, TrackingUnavailable, FileNotFoundError, ValueError) as err:
        sys.exit(f"text_task: {err}")
    sizes = ", ".join(f"{split} {n}" for split, n in meta["sizes"].items())
    print(f"text_task: {meta['kind']} ({meta['checker']} checker) -> {args.out}: {sizes}")


if __name__ == "__main__":
    main()
