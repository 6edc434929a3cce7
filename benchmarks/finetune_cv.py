"""Choose a finetuning recipe without looking at the test split: k-fold cross-validation on `labeled`.

Each fold trains the finetune stage's model (the pretrained encoder in `--encoder`, or from scratch with
`--scratch`) on the other folds with exactly the finetune stage's code and the params in `--params`, with
`-S key=value` overrides, and scores the held-out fold. With `--repeats R` the k-fold split is redrawn R
times, each repeat with its own finetuning seed: with ~36 held-out images a fold, one split's mean moves by a
few points between seeds, so compare recipes on repeated CV. Prints the mean and spread of the fold accuracies.

Examples:
    python benchmarks/finetune_cv.py                                   # the committed recipe
    python benchmarks/finetune_cv.py -S finetune.layer_decay=0.65 -S finetune.epochs=150
    python benchmarks/finetune_cv.py --scratch                         # the baseline's recipe (finetune_scratch)
    python benchmarks/finetune_cv.py --scratch -S finetune_scratch.epochs=500
    python benchmarks/finetune_cv.py --repeats 3 --encoder /tmp/other_encoder
"""

from __future__ import annotations

import argparse
import dataclasses
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from sklearn.model_selection import RepeatedStratifiedKFold

from pipeline_lib.core.tracking import Tracker
from pipeline_lib.params import load_params
from pipeline_lib.vision.data.store import read_split
from pipeline_lib.vision.evaluate import predict_probabilities
from pipeline_lib.vision.finetune import FinetunePaths, FinetuneTrainer, build_classifier, recipe
from pipeline_lib.vision.models.factory import resolve_params


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--data", type=Path, default=Path("data/prepared"))
    parser.add_argument("--encoder", type=Path, default=Path("models/pretrain"))
    parser.add_argument("--scratch", action="store_true", help="train from random weights (the baseline)")
    parser.add_argument("--folds", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=1, help="redraw the folds this many times")
    parser.add_argument("-S", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()
    labeled = read_split(args.data, "labeled")
    params = recipe(load_params(args.params, args.overrides), None if args.scratch else args.encoder)
    params, scaling = resolve_params(params, data_img_size=labeled.images.shape[1])
    images, labels = np.asarray(labeled.images), np.asarray(labeled.labels)
    splitter = RepeatedStratifiedKFold(n_splits=args.folds, n_repeats=args.repeats, random_state=params.seed)
    device, accuracies, started = torch.device("cpu"), [], time.perf_counter()
    for fold, (train, held_out) in enumerate(splitter.split(images, labels)):
        run_params = dataclasses.replace(params, seed=params.seed + fold // args.folds)  # a seed per repeat
        with tempfile.TemporaryDirectory() as scratch_dir:
            paths = FinetunePaths(args.data, None if args.scratch else args.encoder, Path(scratch_dir), Path(),
                                  Path(), Path(scratch_dir) / "ck")
            model, preprocess = build_classifier(
                run_params, paths, in_chans=images.shape[-1], img_size=scaling.img_size,
                num_classes=len(labeled.meta["class_names"]),
                pixel_stats=(labeled.meta["pixel_mean"], labeled.meta["pixel_std"]))
            trainer = FinetuneTrainer(model, params.finetune, images[train], preprocess, labels=labels[train],
                                      num_classes=len(labeled.meta["class_names"]), device=device,
                                      seed=run_params.seed, checkpoint_dir=paths.checkpoints, tracker=Tracker(),
                                      fingerprint="cv")
            trainer.fit()
            probabilities = predict_probabilities(trainer.model, preprocess, images[held_out], device=device)
            accuracies.append(float((probabilities.argmax(axis=1) == labels[held_out]).mean()))
    print(f"cv top-1 {np.mean(accuracies):.4f} +- {np.std(accuracies):.4f} over {args.folds} folds x {args.repeats} "
          f"({time.perf_counter() - started:.0f} s) {'scratch' if args.scratch else args.encoder} {args.overrides}")


if __name__ == "__main__":
    main()
