"""DVC stages `text_sft@<objective>` and `text_sft_scratch@<objective>`: finetune a language model on the task.

Usage: python -m stages.text_sft --objective ar --params params.yaml --task data/text/task
           --data data/text/prepared --pretrained models/text/ar --out models/text/sft_ar
           --metrics metrics/text/sft_ar.json --plots plots/text/sft_ar --checkpoints checkpoints/text/sft_ar
Without --pretrained the same architecture, tokenizer and budget train from scratch (`--name text_sft_scratch`):
the baseline that measures what pretraining gives. On N processes: torchrun --nproc_per_node N -m stages.text_sft
"""

from __future__ import annotations

from pathlib import Path

from pipeline_lib.core.runner import Stage, model_version_tags, run_stage, stage_parser
from pipeline_lib.params import load_params
from pipeline_lib.text.data.task_data import task_digest
from pipeline_lib.text.finetune import SFTPaths, check_inputs, fingerprint, logged_params, run_text_sft, weights_digest
from pipeline_lib.text.models.objectives import OBJECTIVES


def main() -> None:
    parser = stage_parser(__doc__, "task", "data", "out", "metrics", "plots", "checkpoints")
    parser.add_argument("--objective", choices=OBJECTIVES, required=True)
    parser.add_argument("--name", default="text_sft", help="the stage's name (text_sft or text_sft_scratch)")
    parser.add_argument("--pretrained", type=Path, default=None, help="the pretrained LM (none: from scratch)")
    args = parser.parse_args()
    objective = args.objective
    paths = SFTPaths(args.task, args.data, args.pretrained, args.out, args.metrics, args.plots, args.checkpoints)
    run_stage(Stage(
        f"{args.name}_{objective}", load_params, device=True,
        logged=lambda params: logged_params(params, objective, "pretrained" if paths.pretrained else "scratch"),
        check=lambda params: check_inputs(params, paths, objective),  # params the task decides
        inputs=lambda _: {"task": task_digest(paths.task), "pretrained": weights_digest(paths.pretrained)},
        upstream={"text_task": paths.task, f"text_pretrain_{objective}": paths.pretrained},
        tags=lambda: {"objective": objective, **model_version_tags("pretrained", paths.pretrained)},
        checkpoints=paths.checkpoints, fingerprint=lambda params: fingerprint(params, paths, objective),
        run=lambda params, tracker, device: run_text_sft(params, paths, objective, tracker, device),
    ), args.params)


if __name__ == "__main__":
    main()
