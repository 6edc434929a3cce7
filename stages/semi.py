"""DVC stage `semi`: the finetuned classifier trained further with the unlabeled images (FixMatch or distillation).

Usage: python -m stages.semi --params params.yaml --data data/prepared --encoder models/pretrain
           --finetuned models/finetune --out models/semi --metrics metrics/semi.json --plots plots/semi
           --checkpoints checkpoints/semi
`semi.method` chooses fixmatch, distill or none (models/semi is then the finetuned classifier); the classifier is
registered (alias challenger) as started from the finetuned version. On N processes:
torchrun --nproc_per_node N -m stages.semi <same arguments>
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pipeline_lib.core.runner import Stage, model_version_tags, run_stage, stage_parser
from pipeline_lib.params import load_params
from pipeline_lib.vision.data.store import prepared_digest
from pipeline_lib.vision.models.factory import encoder_digest
from pipeline_lib.vision.semi import SemiPaths, check_inputs, fingerprint, logged_params, run_semi


def main() -> None:
    parser = stage_parser(__doc__, "data", "encoder", "out", "metrics", "plots", "checkpoints")
    parser.add_argument("--finetuned", type=Path, required=True, help="the finetuned classifier folder")
    args = parser.parse_args()
    paths = SemiPaths(args.data, args.encoder, args.finetuned, args.out, args.metrics, args.plots, args.checkpoints)
    run_stage(Stage(
        "semi", load_params, device=True, logged=logged_params, report=report,
        check=lambda params: check_inputs(params, paths),  # params the data and the upstream models decide
        inputs=lambda _: {"data": prepared_digest(paths.data), "finetuned": encoder_digest(paths.finetuned),
                          "encoder": encoder_digest(paths.encoder)},
        upstream={"fetch": paths.data, "pretrain": paths.encoder, "finetune": paths.finetuned},
        tags=lambda: model_version_tags("finetuned", paths.finetuned),
        checkpoints=paths.checkpoints, fingerprint=lambda params: fingerprint(params, paths),
        run=lambda params, tracker, device: run_semi(params, paths, tracker, device),
    ), args.params)


def report(summary: dict[str, Any]) -> str:
    if summary["method"] == "none":
        return "method none: models/semi is the finetuned classifier"
    rate = f", mask rate {summary['mask_rate']:.3f}" if "mask_rate" in summary else ""
    return (f"{summary['method']}: {summary['steps']} steps in {summary['train_seconds']:.1f} s, loss "
            f"{summary['loss']:.4f}, train accuracy {summary['train_accuracy']:.4f}{rate}")


if __name__ == "__main__":
    main()
