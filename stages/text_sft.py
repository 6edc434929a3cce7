"""DVC stages `text_sft@<objective>` and `text_sft_scratch@<objective>`: finetune a language model on the task.

Usage: python -m stages.text_sft --objective ar --params params.yaml --task data/text/task
           --data data/text/prepared --pretrained models/text/ar --out models/text/sft_ar
           --metrics metrics/text/sft_ar.json --plots plots/text/sft_ar --checkpoints checkpoints/text/sft_ar
Without --pretrained the same architecture, tokenizer and budget train from scratch (`--name text_sft_scratch`):
the baseline that measures what pretraining gives. On N processes: torchrun --nproc_per_node N -m stages.text_sft
"""

from __future__ import annotations

import argparse
import sys
from contextlib import nullcontext
from pathlib import Path

from pipeline_lib.core import dist
from pipeline_lib.core.errors import ConfigError, DataError
from pipeline_lib.core.tracking import Tracker, TrackingUnavailable, read_run_record, stage_run
from pipeline_lib.core.trainer import CHECKPOINT_NAME, NonFiniteLossError, read_checkpoint
from pipeline_lib.params import load_params
from pipeline_lib.text.data.task_data import task_digest
from pipeline_lib.text.finetune import SFTPaths, check_inputs, fingerprint, logged_params, run_text_sft, weights_digest
from pipeline_lib.text.models.saved import OBJECTIVES


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--objective", choices=OBJECTIVES, required=True)
    parser.add_argument("--name", default="text_sft", help="the stage's name (text_sft or text_sft_scratch)")
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--pretrained", type=Path, default=None, help="the pretrained LM (none: from scratch)")
    for name in ("task", "data", "out", "metrics", "plots", "checkpoints"):
        parser.add_argument(f"--{name}", type=Path, required=True)
    args = parser.parse_args()
    paths = SFTPaths(args.task, args.data, args.pretrained, args.out, args.metrics, args.plots, args.checkpoints)
    name = f"{args.name}_{args.objective}"
    try:
        params = load_params(args.params)  # every params error surfaces here, before any work
        device = dist.resolve_device(params.device)
        dist.init_distributed(device)
        check_inputs(params, paths, args.objective)  # params the task decides: before any work and any MLflow run
        previous = read_checkpoint(paths.checkpoints / CHECKPOINT_NAME, fingerprint(params, paths, args.objective))
        record = read_run_record(paths.pretrained) if paths.pretrained else {}
        upstream = {"text_task": read_run_record(paths.task).get("run_id", "unknown")}
        if paths.pretrained:
            upstream[f"text_pretrain_{args.objective}"] = record.get("run_id", "unknown")
        tracking = nullcontext(Tracker()) if not dist.is_main() else stage_run(
            name, params, logged_params(params, args.objective, "pretrained" if paths.pretrained else "scratch"),
            inputs={"task": task_digest(paths.task), "pretrained": weights_digest(paths.pretrained)},
            upstream=upstream, resume_run_id=previous and previous.get("run_id"),
            extra_tags={"objective": args.objective, "pretrained.model_name": str(record.get("model_name")),
                        "pretrained.model_version": str(record.get("model_version"))},
        )
        with tracking as tracker:
            summary = run_text_sft(params, paths, args.objective, tracker, device)
    except (ConfigError, DataError, NonFiniteLossError, TrackingUnavailable, FileNotFoundError, ValueError) as err:
        sys.exit(f"{name}: {err}")
    finally:
        dist.cleanup()
    if dist.is_main():
        print(f"{name}: " + ", ".join(f"{k} {v:.4g}" for k, v in summary.items()))


if __name__ == "__main__":
    main()
