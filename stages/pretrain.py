"""DVC stage `pretrain`: self-supervised pretraining of the encoder on the unlabeled split.

Usage: python -m stages.pretrain --params params.yaml --data data/prepared --out models/pretrain
           --metrics metrics/pretrain.json --plots plots/pretrain --checkpoints checkpoints/pretrain
On N processes: torchrun --nproc_per_node N -m stages.pretrain <same arguments>
"""

from __future__ import annotations

import argparse
import sys
from contextlib import nullcontext
from pathlib import Path

from pipeline_lib.core import dist
from pipeline_lib.core.errors import ConfigError, DataError
from pipeline_lib.core.tracking import Tracker, TrackingUnavailable, read_run_record, stage_run
from pipeline_lib.core.trainer import NonFiniteLossError, read_checkpoint
from pipeline_lib.params import load_params
from pipeline_lib.vision.data.store import prepared_digest
from pipeline_lib.vision.pretrain import PretrainPaths, check_inputs, fingerprint, logged_params, run_pretrain


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    for name in ("data", "out", "metrics", "plots", "checkpoints"):
        parser.add_argument(f"--{name}", type=Path, required=True)
    args = parser.parse_args()
    paths = PretrainPaths(args.data, args.out, args.metrics, args.plots, args.checkpoints)
    try:
        params = load_params(args.params)  # every params error surfaces here, before any work
        device = dist.resolve_device(params.device)
        dist.init_distributed(device)
        check_inputs(params, paths)  # params the data decides: before any work and any MLflow run
        previous = read_checkpoint(paths.checkpoints / "last.pt", fingerprint(params, paths.data))
        tracking = nullcontext(Tracker()) if not dist.is_main() else stage_run(
            "pretrain", params, logged_params(params), inputs={"data": prepared_digest(paths.data)},
            upstream={"fetch": read_run_record(paths.data).get("run_id", "unknown")},
            resume_run_id=previous and previous.get("run_id"),
        )
        with tracking as tracker:
            summary = run_pretrain(params, paths, tracker, device)
    except (ConfigError, DataError, TrackingUnavailable, NonFiniteLossError, ValueError) as err:
        sys.exit(f"pretrain: {err}")
    finally:
        dist.cleanup()
    if dist.is_main():
        print("pretrain: " + ", ".join(f"{k} {v:.4g}" for k, v in summary.items()))


if __name__ == "__main__":
    main()
