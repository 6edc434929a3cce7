"""Choose the semi stage's recipe without looking at the test split: score variants on the `rl` split.

The rl split is a labeled slice that neither finetuning nor the semi stage reads as labeled (its images are in
the unlabeled pool, as every training image is), so its accuracy ranks recipes the way a validation slice does.
Each variant runs the semi stage's own code (`run_semi`, no tracking) from the committed models/finetune and
models/pretrain, with `-S key=value` overrides per variant (`--variant "-S semi.epochs=40 -S semi.threshold=0.9"`),
and prints its rl top-1 beside the finetuned classifier's, the steps and the seconds.

Examples:
    python benchmarks/semi_recipe.py                                       # the committed recipe
    python benchmarks/semi_recipe.py --variant "semi.epochs=40" --variant "semi.method=distill semi.init=encoder"
    python benchmarks/semi_recipe.py --seeds 0 1 2 --variant "semi.epochs=10"
"""

from __future__ import annotations

import argparse
import shlex
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from pipeline_lib.core.tracking import Tracker
from pipeline_lib.params import load_params
from pipeline_lib.vision.data.store import read_split
from pipeline_lib.vision.evaluate import predict_probabilities
from pipeline_lib.vision.models.factory import load_network
from pipeline_lib.vision.semi import SemiPaths, check_inputs, run_semi


def top1(folder: Path, images: np.ndarray, labels: np.ndarray) -> float:
    network, preprocess, _ = load_network(folder)
    probabilities = predict_probabilities(network, preprocess, images, device=torch.device("cpu"))
    return float((probabilities.argmax(axis=1) == labels).mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--data", type=Path, default=Path("data/prepared"))
    parser.add_argument("--encoder", type=Path, default=Path("models/pretrain"))
    parser.add_argument("--finetuned", type=Path, default=Path("models/finetune"))
    parser.add_argument("--variant", action="append", default=None,
                        help="space-separated KEY=VALUE overrides of one variant; repeat (default: the params)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="semi-stage seeds of each variant")
    args = parser.parse_args()
    torch.set_num_threads(1)
    rl = read_split(args.data, "rl")
    if rl.labels is None or not len(rl):
        raise SystemExit(f"{args.data}/rl: needs labeled images (data.rl_fraction > 0)")
    labels = np.asarray(rl.labels)
    print(f"rl split: {len(rl)} images; finetuned classifier {top1(args.finetuned, rl.images, labels):.4f}")
    for variant in args.variant or [""]:
        overrides = shlex.split(variant)
        scores, seconds = [], []
        for seed in args.seeds:
            params = load_params(args.params, [*overrides, f"seed={seed}"])
            with tempfile.TemporaryDirectory() as scratch:
                root = Path(scratch)
                paths = SemiPaths(args.data, args.encoder, args.finetuned, root / "semi", root / "m.json",
                                  root / "plots", root / "checkpoints")
                check_inputs(params, paths)
                started = time.perf_counter()
                summary = run_semi(params, paths, Tracker(), torch.device("cpu"))
                seconds.append(time.perf_counter() - started)
                scores.append(top1(paths.out, rl.images, labels))
        rate = f", last mask rate {summary['mask_rate']:.3f}" if "mask_rate" in summary else ""
        print(f"{variant or '(params)'}: rl top-1 {np.mean(scores):.4f} "
              f"({' '.join(f'{s:.4f}' for s in scores)}), {summary['steps']} steps, "
              f"{np.mean(seconds):.1f} s a run{rate}", flush=True)


if __name__ == "__main__":
    main()
