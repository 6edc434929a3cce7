"""Try a text post-training recipe without the test split: SFT to its stop, then GRPO and its controls, scored on a
validation slice, for several seeds.

Draws the task of `text_task` with one more split, `val` (`--val` prompts after train, rl and test, which stay those
the text_task stage writes), and for each of `--seeds` does what one cell of the study `text_rl_claim` does
(`rl_claim.run_cell`), scored on `val` instead of test: SFT with the text_sft keys (from the pretrained model of
`models/text/<objective>` for an objective in `text_rl_claim.pretrained`, else fresh weights), then each method of
`--methods` from that model with the text_rl keys (`--rl key=value` sets a text_rl key for the methods alone). Prints
one row per model: the SFT steps, greedy exact match, pass@1, maj@k and pass@k for the largest k, format rate and
seconds. Nothing is tracked. Run one at a time on a quiet machine.

Examples:
    python benchmarks/text_rl_recipe.py --objective ar --seeds 0 1 2 3 4
    python benchmarks/text_rl_recipe.py --objective mdm --seeds 1 -S text_sft.base_lr=8.0e-2 --methods grpo
    python benchmarks/text_rl_recipe.py --objective ar --seeds 4 --rl epochs=6 --rl warmup_epochs=0.3
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from pipeline_lib.core.tracking import Tracker
from pipeline_lib.params import load_params
from pipeline_lib.text.data.task_data import SPLITS, TaskData, build_splits, checker_name
from pipeline_lib.text.data.tasks import TASKS, Example, make_splits
from pipeline_lib.text.finetune import sft_trainer, start_model
from pipeline_lib.text.rl import METHODS, post_trainer
from pipeline_lib.text.rl_claim import ClaimPaths, cell_params, sft_paths
from pipeline_lib.text.rollout import encode_prompts
from pipeline_lib.text.task_evaluate import evaluate_task_model


def task_with_val(params: Any, val: int) -> tuple[TaskData, list[Example]]:
    """The task's three splits, as the text_task stage draws them, and `val` more distinct prompts after them."""
    cfg = params.text_task
    if cfg.source != "generate":
        raise SystemExit("text_rl_recipe: a validation slice needs text_task.source: generate")
    sizes = {"train": cfg.train_size, "rl": cfg.rl_size, "test": cfg.test_size, "val": val}
    drawn = make_splits(cfg.kind, sizes, params.seed, **{name: getattr(cfg, name) for name in TASKS[cfg.kind].defaults})
    splits = build_splits(cfg, params.seed)
    assert all(drawn[name] == splits[name] for name in SPLITS)  # the stage's splits, then the slice
    return TaskData(splits, checker_name(cfg), {"kind": cfg.kind}), drawn["val"]


def row(name: str, metrics: dict[str, float], k: int, steps: int, seconds: float) -> str:
    return (f"{name:<10}{steps:>7}{metrics['accuracy']:>9.3f}{metrics['pass_at_1']:>9.3f}{metrics[f'maj_at_{k}']:>9.3f}"
            f"{metrics[f'pass_at_{k}']:>9.3f}{metrics['format_rate']:>8.2f}{seconds:>8.1f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("-S", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--rl", action="append", default=[], metavar="KEY=VALUE", help="a text_rl key, methods only")
    parser.add_argument("--objective", choices=("ar", "mdm"), required=True)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--methods", nargs="*", choices=list(METHODS), default=list(METHODS))
    parser.add_argument("--val", type=int, default=256, help="validation prompts (default: %(default)s)")
    parser.add_argument("--pretrained", type=Path, default=Path("models/text"))
    parser.add_argument("--data", type=Path, default=Path("data/text/prepared"))
    args = parser.parse_args()
    params = load_params(args.params, args.overrides)
    rl_params = load_params(args.params, [*args.overrides, *(f"text_rl.{item}" for item in args.rl)])
    data, val = task_with_val(params, args.val)
    device, objective, evaluation = torch.device("cpu"), args.objective, params.text_task_evaluate
    k = evaluation.pass_k
    paths = ClaimPaths(Path("-"), args.data, args.pretrained, Path("-"), Path("-"))
    print(f"{objective}: train {len(data.splits['train'])}, rl {len(data.splits['rl'])}, val {len(val)}; text_rl "
          f"overrides {args.rl or 'none'}")
    print(f"{'model':<10}{'steps':>7}{'greedy':>9}{'pass@1':>9}{f'maj@{k}':>9}{f'pass@{k}':>9}{'format':>8}{'sec':>8}")

    def scored(model: Any, task: dict[str, Any], seed: int) -> dict[str, float]:
        metrics, _ = evaluate_task_model(model, objective, tokenizer, val, data.checker, task, pass_k=k,
                                         temperature=evaluation.temperature, block_length=evaluation.block_length,
                                         seed=seed)
        return metrics

    for seed in args.seeds:
        cell = cell_params(params, seed)
        model, tokenizer = start_model(cell, sft_paths(cell, paths, objective), objective)
        with tempfile.TemporaryDirectory() as scratch:
            started = time.perf_counter()
            trainer, task = sft_trainer(cell, model, tokenizer, data, objective, device=device, seed=seed,
                                        checkpoint_dir=Path(scratch) / "sft", tracker=Tracker(), fingerprint="sft")
            steps = trainer.fit().steps
            sft = trainer.model.eval()
            print(f"seed {seed}")
            print(row("sft", scored(sft, task, seed), k, steps, time.perf_counter() - started), flush=True)
            examples = data.splits["rl"]
            ids, real = encode_prompts([e.prompt for e in examples], tokenizer, task["prompt_len"])
            for method in args.methods:
                cfg = dataclasses.replace(rl_params.text_rl, method=method)
                started = time.perf_counter()
                trained = post_trainer(copy.deepcopy(sft), cfg, ids, real, examples, reference=copy.deepcopy(sft),
                                       objective=objective, tokenizer=tokenizer, checker=data.checker, task=task,
                                       tracker=Tracker(), device=device, mdm_eps=cell.text_sft.mdm_eps, seed=seed,
                                       checkpoint_dir=Path(scratch) / method, fingerprint=method)
                trained.fit()
                print(row(method, scored(trained.model.eval(), task, seed), k, trained.total_steps,
                          time.perf_counter() - started), flush=True)


if __name__ == "__main__":
    main()
