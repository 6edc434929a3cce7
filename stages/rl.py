"""DVC stage `rl`: GRPO post-training of the semi stage's classifier against the declared reward.

Usage: python -m stages.rl --params params.yaml --data data/prepared --classifier models/semi
           --out models/rl --metrics metrics/rl.json --plots plots/rl --checkpoints checkpoints/rl
Trains on the rl split, reports on test with the baselines, and registers the post-trained classifier
(alias challenger). On N processes: torchrun --nproc_per_node N -m stages.rl <same arguments>
"""

from __future__ import annotations

from typing import Any

from pipeline_lib.core.runner import Stage, model_version_tags, run_stage, stage_parser
from pipeline_lib.params import load_params
from pipeline_lib.vision.data.store import prepared_digest
from pipeline_lib.vision.models.factory import encoder_digest
from pipeline_lib.vision.rl import RLPaths, check_inputs, fingerprint, logged_params, run_rl


def main() -> None:
    args = stage_parser(__doc__, "data", "classifier", "out", "metrics", "plots", "checkpoints").parse_args()
    paths = RLPaths(args.data, args.classifier, args.out, args.metrics, args.plots, args.checkpoints)
    run_stage(Stage(
        "rl", load_params, device=True, logged=logged_params, report=report,
        check=lambda params: check_inputs(params, paths),  # params the data and the classifier decide
        inputs=lambda _: {"data": prepared_digest(paths.data), "classifier": encoder_digest(paths.classifier)},
        upstream={"fetch": paths.data, "semi": paths.classifier},
        tags=lambda: model_version_tags("classifier", paths.classifier),  # the version GRPO starts from
        # the GRPO trainer's checkpoints (its run is the stage's; the baselines' trainers log nowhere)
        checkpoints=paths.checkpoints_of("grpo"), fingerprint=lambda params: fingerprint(params, paths),
        run=lambda params, tracker, device: run_rl(params, paths, tracker, device),
    ), args.params)


def report(summary: dict[str, Any]) -> str:
    before, after = summary["reference"], summary["post_trained"]
    bayes = summary["baselines"]["bayes_reference"]
    return (f"test reward (greedy) {before['reward_greedy']:.4f} -> {after['reward_greedy']:.4f} (Bayes rule on the "
            f"reference {bayes['reward_greedy']:.4f}), accuracy {before['accuracy']:.4f} -> {after['accuracy']:.4f}, "
            f"coverage {after['coverage']:.4f}")


if __name__ == "__main__":
    main()
