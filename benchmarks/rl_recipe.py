"""Try an RL post-training recipe on the finetuned classifier without the test split: GRPO against its baselines.

Splits the `rl` split in two (stratified, seeded): GRPO, the exact expected-reward objective and plain
cross-entropy each train on one half with the params in `--params` plus `-S rl.key=value` overrides and the
same budget; every model, the reference and the Bayes rule on the reference's probabilities are scored on
the other half with the declared reward. Prints one row per model: greedy and sampled reward, accuracy,
coverage, selective risk, wall time.

Examples:
    python benchmarks/rl_recipe.py                                   # params.yaml's rl section
    python benchmarks/rl_recipe.py -S rl.beta=0.0 -S rl.group_size=16 -S rl.scale_rewards=group
"""

from __future__ import annotations

import argparse
import copy
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from sklearn.model_selection import train_test_split

from pipeline_lib.core.tracking import Tracker
from pipeline_lib.params import load_params
from pipeline_lib.vision.data.store import read_split
from pipeline_lib.vision.decisions import decision_report
from pipeline_lib.vision.evaluate import predict_probabilities
from pipeline_lib.vision.models.classifier import AbstainClassifier
from pipeline_lib.vision.models.factory import load_network
from pipeline_lib.vision.rewards import bayes_actions
from pipeline_lib.vision.rl import TRAINERS, CrossEntropyTrainer, reward_table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--data", type=Path, default=Path("data/prepared"))
    parser.add_argument("--classifier", type=Path, default=Path("models/finetune"))
    parser.add_argument("-S", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()
    params = load_params(args.params, args.overrides)
    cfg, device = params.rl, torch.device("cpu")
    rl = read_split(args.data, "rl")
    images, labels = np.asarray(rl.images), np.asarray(rl.labels)
    train, held_out = train_test_split(np.arange(len(labels)), test_size=0.5, stratify=labels,
                                       random_state=params.seed)
    reference, preprocess, config = load_network(args.classifier)
    num_classes = config["num_classes"]
    table = reward_table(cfg.reward, num_classes)
    abstains = table.shape[0] > num_classes

    def scored(name: str, actions: np.ndarray, probs: np.ndarray | None, seconds: float) -> None:
        report = decision_report(actions, labels[held_out], table, probs)
        risk = report["selective_risk"]
        print(f"{name:<20}{report['reward_greedy']:>9.4f}{report['reward_sampled']:>9.4f}{report['accuracy']:>9.4f}"
              f"{report['coverage']:>9.4f}{'-' if risk is None else f'{risk:.4f}':>9}{seconds:>8.1f}")

    print(f"reward {cfg.reward.type}, train {len(train)} / score {len(held_out)} rl images, overrides {args.overrides}")
    print(f"{'model':<20}{'greedy':>9}{'sampled':>9}{'accuracy':>9}{'coverage':>9}{'risk':>9}{'sec':>8}")
    ref_probs = predict_probabilities(reference, preprocess, images[held_out], device=device)
    padded = np.pad(ref_probs, ((0, 0), (0, table.shape[0] - num_classes)))  # the reference never abstains
    scored("reference", ref_probs.argmax(1), padded, 0.0)
    bayes = bayes_actions(torch.as_tensor(ref_probs), torch.as_tensor(table)).numpy()
    scored("bayes(reference)", bayes, None, 0.0)
    for name, cls in TRAINERS.items():  # grpo, expected_reward, cross_entropy
        torch.manual_seed(params.seed)
        policy = copy.deepcopy(reference)
        if abstains and cls is not CrossEntropyTrainer:
            policy = AbstainClassifier(policy)
        with tempfile.TemporaryDirectory() as scratch:
            trainer = cls(policy, cfg, images[train], preprocess, reference=copy.deepcopy(reference),
                          table=torch.as_tensor(table), labels=labels[train], device=device, seed=params.seed,
                          checkpoint_dir=Path(scratch), tracker=Tracker(), fingerprint=name)
            started = time.perf_counter()
            trainer.fit()
            seconds = time.perf_counter() - started
        probs = predict_probabilities(trainer.model, preprocess, images[held_out], device=device)
        if cls is CrossEntropyTrainer:  # a classifier again: decide by the Bayes rule on its probabilities
            actions = bayes_actions(torch.as_tensor(probs), torch.as_tensor(table)).numpy()
            scored(f"{name}+bayes", actions, None, seconds)
        else:
            scored(name, probs.argmax(1), probs, seconds)


if __name__ == "__main__":
    main()
