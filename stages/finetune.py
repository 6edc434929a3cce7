"""DVC stages `finetune` and `finetune_scratch`: train a classifier on the labeled split.

Usage: python -m stages.finetune --name finetune --params params.yaml --data data/prepared
           --encoder models/pretrain --out models/finetune --metrics metrics/finetune.json
           --plots plots/finetune --checkpoints checkpoints/finetune --register
Without --encoder the same architecture and labels train from scratch, with the baseline's own recipe (the
`finetune_scratch` params over `finetune`): the baseline that measures what pretraining is worth.
On N processes: torchrun --nproc_per_node N -m stages.finetune <same arguments>
"""

from __future__ import annotations

from pathlib import Path

from pipeline_lib.core.runner import Stage, model_version_tags, run_stage, stage_parser
from pipeline_lib.params import load_params
from pipeline_lib.vision.data.store import prepared_digest
from pipeline_lib.vision.finetune import (
    FinetunePaths,
    check_inputs,
    fingerprint,
    logged_params,
    recipe,
    run_finetune,
)
from pipeline_lib.vision.models.factory import encoder_digest


def main() -> None:
    parser = stage_parser(__doc__, "data", "out", "metrics", "plots", "checkpoints")
    parser.add_argument("--name", default="finetune", help="the DVC stage name, also the MLflow run name")
    parser.add_argument("--encoder", type=Path, help="pretrained encoder folder; omit to train from scratch")
    parser.add_argument("--register", action="store_true", help="register the classifier (alias challenger)")
    args = parser.parse_args()
    paths = FinetunePaths(args.data, args.encoder, args.out, args.metrics, args.plots, args.checkpoints)
    run_stage(Stage(
        args.name, lambda path: recipe(load_params(path), paths.encoder), device=True, logged=logged_params,
        check=lambda params: check_inputs(params, paths),  # params the data and the encoder decide
        inputs=lambda _: {"data": prepared_digest(paths.data),
                        **({"encoder": encoder_digest(paths.encoder)} if paths.encoder else {})},
        upstream={"fetch": paths.data, "pretrain": paths.encoder}, tags=lambda: encoder_tags(paths.encoder),
        checkpoints=paths.checkpoints, fingerprint=lambda params: fingerprint(params, paths),
        run=lambda params, tracker, device: run_finetune(params, paths, tracker, device, register=args.register),
    ), args.params)


def encoder_tags(encoder: Path | None) -> dict[str, str]:
    """Which registered encoder version the classifier starts from ("scratch" for the baseline)."""
    if encoder is None:
        return {"init": "scratch"}
    return {"init": "pretrained", **model_version_tags("encoder", encoder)}


if __name__ == "__main__":
    main()
