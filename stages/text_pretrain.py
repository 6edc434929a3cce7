"""DVC stage `text_pretrain@<objective>`: train the text track's transformer as `ar` or `mdm` (LLaDA).

Usage: python -m stages.text_pretrain --objective ar --params params.yaml --data data/text/prepared
           --out models/text/ar --metrics metrics/text/pretrain_ar.json --plots plots/text/ar
           --checkpoints checkpoints/text/ar
On N processes: torchrun --nproc_per_node N -m stages.text_pretrain <same arguments>
"""

from __future__ import annotations

from pipeline_lib.core.runner import Stage, run_stage, stage_parser
from pipeline_lib.params import load_params
from pipeline_lib.text.data.corpus import read_text_meta
from pipeline_lib.text.models.objectives import OBJECTIVES
from pipeline_lib.text.pretrain import LMPaths, check_inputs, fingerprint, logged_params, run_text_pretrain


def main() -> None:
    parser = stage_parser(__doc__, "data", "out", "metrics", "plots", "checkpoints")
    parser.add_argument("--objective", choices=OBJECTIVES, required=True)
    args = parser.parse_args()
    objective = args.objective
    paths = LMPaths(args.data, args.out, args.metrics, args.plots, args.checkpoints)
    run_stage(Stage(
        f"text_pretrain_{objective}", load_params, device=True, tags=lambda: {"objective": objective},
        logged=lambda params: logged_params(params, objective),
        check=lambda params: check_inputs(params, paths),  # params the prepared text decides
        inputs=lambda: {"text": read_text_meta(paths.data)["sha256"]["train.bin"]}, upstream={"text_fetch": paths.data},
        checkpoints=paths.checkpoints, fingerprint=lambda params: fingerprint(params, paths, objective),
        run=lambda params, tracker, device: run_text_pretrain(params, paths, objective, tracker, device),
    ), args.params)


if __name__ == "__main__":
    main()
