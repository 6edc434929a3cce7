"""DVC stage `text_pretrain@<objective>`: train the text track's transformer as `ar` or `mdm` (LLaDA).

Usage: python -m stages.text_pretrain --objective ar --params params.yaml --data data/text/prepared
           --out models/text/ar --metrics metrics/text/pretrain_ar.json --plots plots/text/ar
           --checkpoints checkpoints/text/ar
On N processes: torchrun --nproc_per_node N -m stages.text_pretrain <same arguments>
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
from pipeline_lib.text.data.corpus import read_text_meta
from pipeline_lib.text.models.saved import OBJECTIVES
from pipeline_lib.text.pretrain import LMPaths, check_inputs, fingerprint, logged_params, run_text_pretrain


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--objective", choices=OBJECTIVES, required=True)
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    for name in ("data", "out", "metrics", "plots", "checkpoints"):
        parser.add_argument(f"--{name}", type=Path, required=True)
    args = parser.parse_args()
    paths = LMPaths(args.data, args.out, args.metrics, args.plots, args.checkpoints)
    name = f"text_pretrain_{args.objective}"
    try:
        params = load_params(args.params)  # every params error surfaces here, before any work
        device = dist.resolve_device(params.device)
        dist.init_distributed(device)
        check_inputs(params, paths)  # params the prepared text decides: before any work and any MLflow run
        previous = read_checkpoint(paths.checkpoints / CHECKPOINT_NAME, fingerprint(params, paths, args.objective))
        tracking = nullcontext(Tracker()) if not dist.is_main() else stage_run(
            name, params, logged_params(params, args.objective),
            inputs={"text": read_text_meta(paths.data)["sha256"]["train.bin"]},
            upstream={"text_fetch": read_run_record(paths.data).get("run_id", "unknown")},
            resume_run_id=previous and previous.get("run_id"), extra_tags={"objective": args.objective},
        )
        with tracking as tracker:
            summary = run_text_pretrain(params, paths, args.objective, tracker, device)
    except (ConfigError, DataError, NonFiniteLossError, TrackingUnavailable, FileNotFoundError, ValueError) as err:
        sys.exit(f"{name}: {err}")
    finally:
        dist.cleanup()
    if dist.is_main():
        print(f"{name}: " + ", ".join(f"{k} {v:.4g}" for k, v in summary.items()))


if __name__ == "__main__":
    main()
