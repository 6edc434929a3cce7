"""DVC stages `finetune` and `finetune_scratch`: train a classifier on the labeled split.

Usage: python -m stages.finetune --name finetune --params params.yaml --data data/prepared
           --encoder models/pretrain --out models/finetune --metrics metrics/finetune.json
           --plots plots/finetune --checkpoints checkpoints/finetune --register
Without --encoder the same architecture, labels and budget train from scratch: the baseline that measures
what pretraining is worth. On N processes: torchrun --nproc_per_node N -m stages.finetune <same arguments>
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
from pipeline_lib.vision.finetune import FinetunePaths, check_inputs, fingerprint, logged_params, run_finetune
from pipeline_lib.vision.models.factory import encoder_digest


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--name", default="finetune", help="the DVC stage name, also the MLflow run name")
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--encoder", type=Path, help="pretrained encoder folder; omit to train from scratch")
    parser.add_argument("--register", action="store_true", help="register the classifier (alias challenger)")
    for name in ("data", "out", "metrics", "plots", "checkpoints"):
        parser.add_argument(f"--{name}", type=Path, required=True)
    args = parser.parse_args()
    paths = FinetunePaths(args.data, args.encoder, args.out, args.metrics, args.plots, args.checkpoints)
    try:
        params = load_params(args.params)  # every params error surfaces here, before any work
        device = dist.resolve_device(params.device)
        dist.init_distributed(device)
        check_inputs(params, paths)  # params the data and the encoder decide: before any work and any MLflow run
        previous = read_checkpoint(paths.checkpoints / "last.pt", fingerprint(params, paths))
        upstream = {"fetch": read_run_record(paths.data).get("run_id", "unknown")}
        inputs = {"data": prepared_digest(paths.data)}
        if paths.encoder is not None:
            upstream["pretrain"] = read_run_record(paths.encoder).get("run_id", "unknown")
            inputs["encoder"] = encoder_digest(paths.encoder)
        tracking = nullcontext(Tracker()) if not dist.is_main() else stage_run(
            args.name, params, logged_params(params), inputs=inputs, upstream=upstream,
            resume_run_id=previous and previous.get("run_id"), extra_tags=encoder_tags(paths.encoder),
        )
        with tracking as tracker:
            summary = run_finetune(params, paths, tracker, device, register=args.register)
    except (ConfigError, DataError, TrackingUnavailable, NonFiniteLossError, FileNotFoundError, ValueError) as err:
        sys.exit(f"{args.name}: {err}")
    finally:
        dist.cleanup()
    if dist.is_main():
        print(f"{args.name}: " + ", ".join(f"{k} {v:.4g}" for k, v in summary.items()))


def encoder_tags(encoder: Path | None) -> dict[str, str]:
    """Which registered encoder version the classifier starts from ("scratch" for the baseline)."""
    if encoder is None:
        return {"init": "scratch"}
    record = read_run_record(encoder)
    return {"init": "pretrained", "encoder.model_name": str(record.get("model_name")),
            "encoder.model_version": str(record.get("model_version"))}


if __name__ == "__main__":
    main()
