"""DVC stage `text_rl@<objective>`: GRPO of the finetuned language model on the task's rl split.

Usage: python -m stages.text_rl --objective ar --params params.yaml --task data/text/task
           --sft models/text/sft_ar --out models/text/rl_ar --metrics metrics/text/rl_ar.json
           --plots plots/text/rl_ar --checkpoints checkpoints/text/rl_ar
Trains only when at least `text_rl.min_signal` of the probe's groups (the SFT model's completions of the first rl
prompts) got unequal rewards; below that the SFT weights pass through unchanged. With `min_signal: 0` it stops
before training when no group has a signal.
On N processes: torchrun --nproc_per_node N -m stages.text_rl <same arguments>
"""

from __future__ import annotations

from typing import Any

from pipeline_lib.core.runner import Stage, model_version_tags, run_stage, stage_parser
from pipeline_lib.params import load_params
from pipeline_lib.text.data.task_data import task_digest
from pipeline_lib.text.finetune import weights_digest
from pipeline_lib.text.models.objectives import OBJECTIVES
from pipeline_lib.text.rl import TextRLPaths, check_inputs, fingerprint, logged_params, run_text_rl


def main() -> None:
    parser = stage_parser(__doc__, "task", "sft", "out", "metrics", "plots", "checkpoints")
    parser.add_argument("--objective", choices=OBJECTIVES, required=True)
    args = parser.parse_args()
    objective = args.objective
    paths = TextRLPaths(args.task, args.sft, args.out, args.metrics, args.plots, args.checkpoints)
    run_stage(Stage(
        f"text_rl_{objective}", load_params, device=True, logged=lambda params: logged_params(params, objective),
        check=lambda params: check_inputs(params, paths, objective),  # params the task decides
        inputs=lambda _: {"task": task_digest(paths.task), "sft": weights_digest(paths.sft)},
        upstream={"text_task": paths.task, f"text_sft_{objective}": paths.sft},
        tags=lambda: {"objective": objective, **model_version_tags("sft", paths.sft)},
        checkpoints=paths.checkpoints, fingerprint=lambda params: fingerprint(params, paths, objective),
        run=lambda params, tracker, device: run_text_rl(params, paths, objective, tracker, device), report=report,
    ), args.params)


def report(summary: dict[str, Any]) -> str:
    first, last = summary["first"], summary["last"]
    return (f"{summary['steps']} steps in {summary['rl_seconds']:.1f} s, rl-batch reward "
            f"{first.get('reward', float('nan')):.3f} -> {last.get('reward', float('nan')):.3f}, "
            f"kl {last.get('kl', float('nan')):.4f}")


if __name__ == "__main__":
    main()
