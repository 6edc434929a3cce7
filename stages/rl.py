"""DVC stage `rl`: GRPO post-training of the finetuned classifier against the declared reward.

Usage: python -m stages.rl --params params.yaml --data data/prepared --classifier models/finetune
           --out models/rl --metrics metrics/rl.json --plots plots/rl --checkpoints checkpoints/rl
Trains on the rl split, reports on test with the baselines, and registers the post-trained classifier
(alias challenger). On N processes: torchrun --nproc_per_node N -m stages.rl <same arguments>
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
from pipeline_lib.vision.models.factory import encoder_digest
from pipeline_lib.vision.rl import RLPaths, check_inputs, fingerprint, logged_params, run_rl


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    for name in ("data", "classifier", "out", "metrics", "plots", "checkpoints"):
        parser.add_argument(f"--{name}", type=Path, required=True)
    args = parser.parse_args()
    paths = RLPaths(args.data, args.classifier, args.out, args.metrics, args.plots, args.checkpoints)
    try:
        params = load_params(args.params)  # every params error surfaces here, before any work
        device = dist.resolve_device(params.device)
        dist.init_distributed(device)
        check_inputs(params, paths)  # params the data and the classifier decide: before any work and any MLflow run
        previous = read_checkpoint(paths.checkpoints / "grpo" / "last.pt", fingerprint(params, paths))
        record = read_run_record(paths.classifier)
        tracking = nullcontext(Tracker()) if not dist.is_main() else stage_run(
            "rl", params, logged_params(params),
            inputs={"data": prepared_digest(paths.data), "classifier": encoder_digest(paths.classifier)},
            upstream={"fetch": read_run_record(paths.data).get("run_id", "unknown"),
                      "finetune": record.get("run_id", "unknown")},
            resume_run_id=previous and previous.get("run_id"),
            extra_tags={"finetuned.model_name": str(record.get("model_name")),
                        "finetuned.model_version": str(record.get("model_version"))},
        )
        with tracking as tracker:
            summary = run_rl(params, paths, tracker, device)
    except (ConfigError, DataError, TrackingUnavailable, NonFiniteLossError, FileNotFoundError, ValueError) as err:
        sys.exit(f"rl: {err}")
    finally:
        dist.cleanup()
    if dist.is_main():
        before, after = summary["reference"], summary["post_trained"]
        bayes = summary["baselines"]["bayes_reference"]
        print(f"rl: test reward (greedy) {before['reward_greedy']:.4f} -> {after['reward_greedy']:.4f} "
              f"(Bayes rule on the reference {bayes['reward_greedy']:.4f}), accuracy {before['accuracy']:.4f} -> "
              f"{after['accuracy']:.4f}, coverage {after['coverage']:.4f}")


if __name__ == "__main__":
    main()
