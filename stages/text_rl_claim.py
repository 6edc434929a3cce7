"""Study `text_rl_claim` (studies/dvc.yaml): GRPO against the shuffled-reward and rejection-sampling controls over
seeds, from SFT models at the edge of competence, with paired 95% intervals.

Usage: python -m stages.text_rl_claim --params params.yaml --task data/text/task --data data/text/prepared
           --pretrained models/text --plots plots/text_rl_claim --metrics metrics/text/rl_claim.json
Run by `dvc repro studies/dvc.yaml:text_rl_claim` (never by the default `dvc repro`); see
pipeline_lib/text/rl_claim.py.
"""

from __future__ import annotations

from typing import Any

from pipeline_lib.core.runner import Stage, run_stage, stage_parser
from pipeline_lib.params import load_params
from pipeline_lib.text.data.task_data import task_digest
from pipeline_lib.text.rl_claim import ClaimPaths, check_inputs, logged_params, run_text_rl_claim


def main() -> None:
    args = stage_parser(__doc__, "task", "data", "pretrained", "plots", "metrics").parse_args()
    paths = ClaimPaths(args.task, args.data, args.pretrained, args.plots, args.metrics)
    run_stage(Stage(
        "text_rl_claim", load_params, device=True, logged=logged_params,
        check=lambda params: check_inputs(params, paths),  # params the task and the tokenizer decide
        inputs=lambda _: {"task": task_digest(paths.task)},
        upstream={"text_task": paths.task, "text_fetch": paths.data},
        run=lambda params, tracker, device: run_text_rl_claim(params, paths, tracker, device),
        report=report,
    ), args.params)


def report(result: dict[str, Any]) -> str:
    """`ar: GRPO - shuffled greedy +0.162 [+0.120, +0.204] (min +0.110), GRPO - SFT pass@1 ...; 1234 s`."""
    parts = []
    for objective, found in result["summary"].items():
        differences = found["differences"]
        shown = [("grpo_minus_shuffled", "accuracy", "greedy"), ("grpo_minus_sft", "accuracy", "greedy"),
                 ("grpo_minus_sft", "pass_at_1", "pass@1"), ("grpo_minus_rft", "accuracy", "greedy")]
        parts.append(f"{objective}: " + ", ".join(
            f"{pair.replace('_minus_', ' - ')} {label} {d['mean']:+.3f} [{d['low']:+.3f}, {d['high']:+.3f}] "
            f"(min {d['minimum']:+.3f})" for pair, metric, label in shown for d in [differences[pair][metric]]))
    return "; ".join(parts) + f" ({result['seconds']:.0f} s; MLflow run {result['run_id']})"


if __name__ == "__main__":
    main()
