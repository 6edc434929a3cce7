"""DVC stage `pretrain`: self-supervised pretraining of the encoder on the unlabeled split.

Usage: python -m stages.pretrain --params params.yaml --data data/prepared --out models/pretrain
           --metrics metrics/pretrain.json --plots plots/pretrain --checkpoints checkpoints/pretrain
On N processes: torchrun --nproc_per_node N -m stages.pretrain <same arguments>
"""

from __future__ import annotations

from pipeline_lib.core.runner import Stage, run_stage, stage_parser
from pipeline_lib.params import load_params
from pipeline_lib.vision.pretrain import (
    PretrainPaths,
    check_inputs,
    data_digest,
    fingerprint,
    logged_params,
    run_pretrain,
)


def main() -> None:
    args = stage_parser(__doc__, "data", "out", "metrics", "plots", "checkpoints").parse_args()
    paths = PretrainPaths(args.data, args.out, args.metrics, args.plots, args.checkpoints)
    run_stage(Stage(
        "pretrain", load_params, device=True, logged=logged_params,
        check=lambda params: check_inputs(params, paths),  # params the data decides
        inputs=lambda _: {"data": data_digest(paths.data)}, upstream={"fetch": paths.data},
        checkpoints=paths.checkpoints, fingerprint=lambda params: fingerprint(params, paths.data),
        run=lambda params, tracker, device: run_pretrain(params, paths, tracker, device),
    ), args.params)


if __name__ == "__main__":
    main()
