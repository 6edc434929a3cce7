"""DVC stage `text_rl@<objective>`: GRPO of the finetuned language model on the task's rl split.

Usage: python -m stages.text_rl --objective ar --params params.yaml --task data/text/task
           --sft models/text/sft_ar --out models/text/rl_ar --metrics metrics/text/rl_ar.json
           --plots plots/text/rl_ar --checkpoints checkpoints/text/rl_ar
Stops before training when the SFT model's completions give no learning signal (every probe group all right
or all wrong). On N processes: torchrun --nproc_per_node N -m stages.text_rl <same arguments>
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
from pipeline_lib.text.finetune import weights_digest
from pipeline_lib.text.models.saved import OBJECTIVES
from pipeline_lib.text.rl import RLPaths, check_inputs, fingerprint, logged_params, run_text_rl


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--objective", choices=OBJECTIVES, required=True)
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    for name in ("task", "sft", "out", "metrics", "plots", "checkpoints"):
        parser.add_argument(f"--{name}", type=Path, required=True)
    args = parser.parse_args()
    paths = RLPaths(args.task, args.sft, args.out, args.metrics, args.plots, args.checkpoints)
    name = f"text_rl_{args.objective}"
    try:
        params = load_params(args.params)  # every params error surfaces here, before any work
        device = dist.resolve_device(params.device)
        dist.init_distributed(device)
        check_inputs(params, paths, args.objective)  # params the task decides: before any work and any MLflow run
        previous = read_checkpoint(paths.checkpoints / CHECKPOINT_NAME, fingerprint(params, paths, args.objective))
        record = read_run_record(paths.sft)
        tracking = nullcontext(Tracker()) if not dist.is_main() else stage_run(
            name, params, logged_params(params, args.objective),
            inputs={"task": task_digest(paths.task), "sft": weights_digest(paths.sft)},
            upstream={"text_task": read_run_record(paths.task).get("run_id", "unknown"),
                      f"text_sft_{args.objective}": record.get("run_id", "unknown")},
            resume_run_id=previous and previous.get("run_id"),
            extra_tags={"objective": args.objective, "sft.model_name": str(record.get("model_name")),
                        "sft.model_version": str(record.get("model_version"))},
        )
        with tracking as tracker:
            summary = run_text_rl(params, paths, args.objective, tracker, device)
    except (ConfigError, DataError, NonFiniteLossError, TrackingUnavailable, FileNotFoundError, ValueError) as err:
        sys.exit(f"{name}: {err}")
    finally:
        dist.cleanup()
    if dist.is_main():
        first, last = summary["first"], summary["last"]
        print(f"{name}: {summary['steps']} steps in {summary['rl_seconds']:.1f} s, rl-batch reward "
              f"{first.get('reward', float('nan')):.3f} -> {last.get('reward', float('nan')):.3f}, "
              f"kl {last.get('kl', float('nan')):.4f}")


if __name__ == "__main__":
    main()
