"""DVC stage `text_pretrain@<objective>`: train the text track's transformer as `ar` or `mdm` (LLaDA).

Usage: python -m stages.text_pretrain --objective ar --params params.yaml --data data/text/prepared
           --out models/text/ar --metrics metrics/text/pretrain_ar.json --plots plots/text/ar
           --checkpoints checkpoints/text/ar
       python -m stages.text_pretrain --objective mdm --init models/text/ar <the other arguments>
           (--init: the trained ar model that `text_pretrain.mdm_init: ar` continues from; unread with `scratch`)
On N processes: torchrun --nproc_per_node N -m stages.text_pretrain <same arguments>
"""

from __future__ import annotations

from pathlib import Path

from pipeline_lib.core.download import sha256_file
from pipeline_lib.core.runner import Stage, run_stage, stage_parser
from pipeline_lib.params import Params, load_params
from pipeline_lib.text.data.corpus import read_text_meta
from pipeline_lib.text.models.objectives import OBJECTIVES
from pipeline_lib.text.models.saved import WEIGHTS_FILE
from pipeline_lib.text.pretrain import LMPaths, check_inputs, fingerprint, init_folder, logged_params, run_text_pretrain


def main() -> None:
    parser = stage_parser(__doc__, "data", "out", "metrics", "plots", "checkpoints")
    parser.add_argument("--objective", choices=OBJECTIVES, required=True)
    parser.add_argument("--init", type=Path, default=None, help="the ar model folder mdm_init: ar continues from")
    args = parser.parse_args()
    objective = args.objective
    paths = LMPaths(args.data, args.out, args.metrics, args.plots, args.checkpoints, args.init)

    def init(params: Params) -> Path | None:  # the AR model folder this run reads, if it reads one
        return init_folder(params, paths, objective)

    run_stage(Stage(
        f"text_pretrain_{objective}", load_params, device=True, tags=lambda: {"objective": objective},
        logged=lambda params: logged_params(params, objective),
        check=lambda params: check_inputs(params, paths, objective),  # params the prepared text and init decide
        inputs=lambda params: {"text": read_text_meta(paths.data)["sha256"]["train.bin"],
                               **({"init": sha256_file(init(params) / WEIGHTS_FILE)} if init(params) else {})},
        upstream=lambda params: {"text_fetch": paths.data, "text_pretrain_ar": init(params)},
        checkpoints=paths.checkpoints, fingerprint=lambda params: fingerprint(params, paths, objective),
        run=lambda params, tracker, device: run_text_pretrain(params, paths, objective, tracker, device),
    ), args.params)


if __name__ == "__main__":
    main()
