"""The GRPO trainer in-process on tiny random data: what it logs, the reference it starts from, eval mode,
several updates per sampled batch, exact resume mid-batch, and a reward that rises."""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from pipeline_lib.core.grpo import GRPOTrainer
from pipeline_lib.core.tracking import Tracker
from pipeline_lib.core.trainer import Trainer
from pipeline_lib.params import params_from_dict
from pipeline_lib.vision.config import ModelParams
from pipeline_lib.vision.models.classifier import AbstainClassifier, attach_head
from pipeline_lib.vision.models.factory import build_encoder
from pipeline_lib.vision.models.preprocess import Preprocess
from pipeline_lib.vision.policy import ClassifierPolicy
from pipeline_lib.vision.rewards import abstain_table, accuracy_table
from pipeline_lib.vision.rl import CrossEntropyTrainer, ExpectedRewardTrainer, grpo_trainer

TINY_VIT = ModelParams(name="vit", patch_size=2, embed_dim=32, depth=2, num_heads=2)
STEP_METRICS = {"loss", "reward", "reward_std", "frac_reward_zero_std", "kl", "entropy", "clip_ratio", "grad_norm",
                "lr", "ratio", "abstain_rate"}


def _data(count: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """Images whose brightness gives the class (4 levels + noise): learnable from rewards alone."""
    generator = np.random.default_rng(0)
    labels = generator.integers(0, 4, count)
    images = labels[:, None, None, None] * 60 + generator.integers(0, 30, (count, 8, 8, 1))
    return images.astype(np.uint8), labels


def _trainer(root: Path, *, abstain: bool = True, cls: Callable[..., Trainer] = grpo_trainer, **rl: object) -> Any:
    torch.manual_seed(0)
    classifier = attach_head(build_encoder(TINY_VIT, in_chans=1, img_size=8, drop_path_rate=0.2), 4)
    reference = copy.deepcopy(classifier)
    policy = AbstainClassifier(classifier) if abstain else classifier
    table = abstain_table(4) if abstain else accuracy_table(4)
    cfg = params_from_dict({"rl": {"epochs": 2, "batch_size": 8, "log_every": 1, "group_size": 4, **rl}}).rl
    images, labels = _data()
    return cls(policy, cfg, images, Preprocess([0.5], [0.25], 8), reference=reference,
               table=torch.tensor(table), labels=labels, device=torch.device("cpu"), seed=0,
               checkpoint_dir=root / "ck", tracker=Tracker(), fingerprint="grpo")


def test_is_the_core_trainer_with_the_classifier_policy_and_samples_from_the_update_pass(tmp_path: Path) -> None:
    """One forward pass of the policy per step gives the G actions and the update's log-probs."""
    trainer = _trainer(tmp_path, epochs=1)
    assert isinstance(trainer, GRPOTrainer) and isinstance(trainer.policy, ClassifierPolicy)
    calls = []
    hook = trainer.model.register_forward_hook(lambda *_: calls.append(1))
    try:
        trainer.train_step(0)
    finally:
        hook.remove()
    assert len(calls) == 1
    assert trainer.sampled["0:0"]["actions"].shape == (8, 4)
    history = trainer.fit().history
    assert trainer.stage == "rl" and "images_per_second" in history[0]  # the stage's name and throughput key


def test_refuses_to_train_without_labels(tmp_path: Path) -> None:
    cfg = params_from_dict({"rl": {"epochs": 1, "batch_size": 8, "group_size": 4}}).rl
    images, _ = _data()
    model = attach_head(build_encoder(TINY_VIT, in_chans=1, img_size=8), 4)
    with pytest.raises(ValueError, match="labels"):
        grpo_trainer(model, cfg, images, Preprocess([0.5], [0.25], 8), reference=copy.deepcopy(model),
                     table=torch.tensor(accuracy_table(4)), device=torch.device("cpu"), seed=0,
                     checkpoint_dir=tmp_path, tracker=Tracker(), fingerprint="grpo")


def test_logs_every_step_metric_and_starts_at_the_reference(tmp_path: Path) -> None:
    trainer = _trainer(tmp_path, num_iterations=2)
    result = trainer.fit()
    assert result.steps == 2 * 4 * 2  # epochs x batches x updates per batch
    assert set(result.history[0]) >= STEP_METRICS
    first = result.history[0]
    assert first["ratio"] == pytest.approx(1.0) and first["clip_ratio"] == 0.0  # sampled from this very policy
    assert first["kl"] == pytest.approx(0.0, abs=1e-6)  # the abstain head leaves the class distribution alone
    assert any(h["ratio"] != pytest.approx(1.0) for h in result.history[1::2])  # second update: policy moved
    assert not trainer.model.training  # eval mode throughout: no dropout or drop path while sampling


def test_reference_is_frozen_and_head_only_trains_the_heads(tmp_path: Path) -> None:
    trainer = _trainer(tmp_path, head_only=True, lr=3.125e-3)
    reference = copy.deepcopy(trainer.reference.state_dict())
    encoder = {k: v.clone() for k, v in trainer.model.classifier.state_dict().items() if not k.startswith("head")}
    trainer.fit()
    assert all(torch.equal(v, trainer.reference.state_dict()[k]) for k, v in reference.items())
    after = trainer.model.classifier.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in encoder.items())
    assert not torch.equal(trainer.model.abstain.bias, torch.full((1,), float(np.log(0.01 / 0.99))))


def test_resume_mid_batch_matches_a_straight_run(tmp_path: Path) -> None:
    options = {"num_iterations": 2, "checkpoint_every": 3, "warmup_epochs": 1.0}  # 8 warmup steps: the lr of
    straight = _trainer(tmp_path / "straight", **options)                          # steps 1-3 ignores total_steps
    straight.fit()
    first = _trainer(tmp_path / "resumed", **options)
    first.total_steps = 3  # killed after the checkpoint taken between a batch's two updates
    first.fit()
    resumed = _trainer(tmp_path / "resumed", **options)
    assert resumed.fit().resumed_from == 3
    for key, value in straight.model.state_dict().items():
        assert torch.equal(value, resumed.model.state_dict()[key]), key


def test_reward_rises_on_the_images_it_trains_on(tmp_path: Path) -> None:
    trainer = _trainer(tmp_path, abstain=False, epochs=15, lr=1.5625e-2, beta=0.0)
    rewards = [h["reward"] for h in trainer.fit().history]
    assert np.mean(rewards[-8:]) > np.mean(rewards[:8]) + 0.2, rewards


def test_baselines_train_with_the_same_budget(tmp_path: Path) -> None:
    """The exact expected-reward objective raises the reward; cross-entropy lowers its loss; both take as many
    optimizer steps on the same batches as GRPO."""
    grpo_steps = _trainer(tmp_path / "grpo", num_iterations=2).total_steps
    expected = _trainer(tmp_path / "expected", cls=ExpectedRewardTrainer, num_iterations=2, epochs=8, lr=1.5625e-2)
    cross_entropy = _trainer(tmp_path / "ce", abstain=False, cls=CrossEntropyTrainer, num_iterations=2, epochs=8,
                             lr=1.5625e-2)
    assert _trainer(tmp_path / "e2", cls=ExpectedRewardTrainer, num_iterations=2).total_steps == grpo_steps
    rewards = [h["reward"] for h in expected.fit().history]
    assert np.mean(rewards[-4:]) > np.mean(rewards[:4]) + 0.2, rewards
    losses = [h["loss"] for h in cross_entropy.fit().history]
    assert np.mean(losses[-4:]) < 0.5 * np.mean(losses[:4]), losses
