"""The text transformer's architecture knobs side by side: dense, DeepSeek-V3 MoE (with and without the bias
update), multi-token prediction, and `hparams: auto`, each trained with the text_pretrain stage's code.

Prepares the corpus of `text_data` once (in a temporary folder, so `data/text/prepared` is untouched), then trains
one model per variant, one after the other in this process, and scores it with the text_evaluate stage's code.
Prints one line per variant: training seconds, tokens/s and its ratio to the first variant's (measured in the same
run: compare ratios, not seconds, across machines), validation bits per character, the mixture of experts' max
violation (max load / mean load - 1, the mean of the last quarter of logged steps, and at the first log), and the
next-token and next-next-token accuracy of the multi-token prediction run. Nothing is tracked.

Examples:
    python benchmarks/text_architecture.py                         # every variant, the committed recipe
    python benchmarks/text_architecture.py --variant dense --variant moe -S text_pretrain.epochs=2
    python benchmarks/text_architecture.py --objective mdm --variant dense --variant moe
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from pipeline_lib.core.tracking import Tracker
from pipeline_lib.params import load_params
from pipeline_lib.text.data.corpus import prepare_configured
from pipeline_lib.text.evaluate import BPC_KEY, score
from pipeline_lib.text.models.saved import load_lm
from pipeline_lib.text.pretrain import LMPaths, run_text_pretrain

VARIANTS = {  # name -> params overrides on top of the file and -S
    "dense": [],
    "moe": ["text_model.moe.enabled=true"],
    "moe_no_bias": ["text_model.moe.enabled=true", "text_model.moe.bias_update_speed=0.0"],
    "moe_groups": ["text_model.moe.enabled=true", "text_model.moe.groups=4", "text_model.moe.topk_groups=2"],
    "mtp": ["text_pretrain.mtp_depth=1"],
    "auto": ["text_pretrain.hparams=auto"],
}


class History(Tracker):
    """Keeps the logged metrics in memory (nothing is written)."""

    def __init__(self) -> None:
        self.rows: list[dict[str, float]] = []

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self.rows.append(dict(metrics))


def violation(rows: list[dict[str, float]]) -> str:
    """'first -> mean of the last quarter' of the logged max violation, or '-' without experts."""
    values = [row["moe.max_violation"] for row in rows if "moe.max_violation" in row]
    if not values:
        return "-"
    return f"{values[0]:.2f} -> {np.mean(values[-max(1, len(values) // 4):]):.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("-S", "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--variant", choices=VARIANTS, action="append", help="default: all, in this order")
    parser.add_argument("--objective", choices=("ar", "mdm"), default="ar")
    args = parser.parse_args()
    base = load_params(args.params, args.overrides)
    reference = None
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        cfg = base.text_data
        prepare_configured(cfg, out_dir=root / "data", cache_dir=Path("data/cache"))
        for name in args.variant or VARIANTS:
            params = load_params(args.params, [*args.overrides, *VARIANTS[name]])
            paths = LMPaths(root / "data", root / name, root / f"{name}.json", root / f"{name}_plots",
                            root / f"{name}_checkpoints")
            history = History()
            started = time.perf_counter()
            summary = run_text_pretrain(params, paths, args.objective, history, torch.device("cpu"))
            seconds = time.perf_counter() - started
            model, _, _ = load_lm(paths.out)
            bpc = score(model, args.objective, root / "data", params)[BPC_KEY[args.objective]]
            speed = summary["tokens_per_second"]
            reference = reference or speed
            accuracy = ""
            if "mtp1_accuracy" in summary:
                accuracy = f", next-token acc {summary['accuracy']:.3f}, next-next {summary['mtp1_accuracy']:.3f}"
            print(f"{name}: {seconds:.1f} s, {summary['steps']} steps, {speed:.0f} tokens/s "
                  f"({speed / reference:.2f}x), {model.num_params()} non-embedding params "
                  f"({model.num_active_params()} active), {BPC_KEY[args.objective]} {bpc:.4f}, "
                  f"max violation {violation(history.rows)}{accuracy}", flush=True)


if __name__ == "__main__":
    main()
