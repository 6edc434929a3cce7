"""The core GRPO trainer on a toy policy (a linear softmax bandit): what it asks of a policy and when, the old and
reference log-probs it keeps, the metrics it logs, exact resume between a batch's updates, and a reward that rises."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pipeline_lib.core.config import GRPOParams
from pipeline_lib.core.grpo import GRPOTrainer, LogProbs, Policy, Rollout, unwrap
from pipeline_lib.core.tracking import Tracker
from pipeline_lib.core.trainer import Batch

ACTIONS, FEATURES, COUNT = 4, 6, 32
GENERATOR = np.random.default_rng(0)
LABELS = GENERATOR.integers(0, ACTIONS, COUNT)
INPUTS = (np.eye(FEATURES)[LABELS] + 0.1 * GENERATOR.standard_normal((COUNT, FEATURES))).astype(np.float32)


class Bandit(Policy):
    """Pick one of ACTIONS per input; reward 1 for the input's label. `one_pass`: the draw's forward pass is the
    update's (`Rollout.scored`); `varies`: log-probs depend on the iteration (a constant shift, for the test)."""

    def __init__(self, group_size: int, *, one_pass: bool = False, varies: bool = False) -> None:
        self.group_size, self.one_pass, self.varies_by_iteration = group_size, one_pass, varies
        self.calls: list[tuple[str, int]] = []  # (model kind, iteration) of each log_probs call

    def scored(self, log_probs: Tensor, actions: Tensor) -> LogProbs:
        entropy = -(log_probs.exp() * log_probs).sum(dim=1).detach()
        return LogProbs(log_probs.gather(1, actions), entropy=entropy)

    def sample(self, model: nn.Module, batch: Batch) -> Rollout:
        log_probs = F.log_softmax(model(batch.inputs), dim=1)  # (b, A)
        uniforms = torch.rand(batch.global_size, self.group_size, generator=batch.generator)[batch.rows]
        cumulative = log_probs.detach().exp().cumsum(dim=1)
        actions = torch.searchsorted(cumulative / cumulative[:, -1:], uniforms, right=True).clamp(max=ACTIONS - 1)
        return Rollout({"actions": actions}, self.scored(log_probs, actions) if self.one_pass else None)

    def rewards(self, batch: Batch, samples: dict[str, Any]) -> Tensor:
        assert batch.labels is not None
        return (samples["actions"] == batch.labels[:, None]).float()

    def log_probs(self, model: nn.Module, batch: Batch, samples: dict[str, Any], iteration: int) -> LogProbs:
        self.calls.append(("grad" if torch.is_grad_enabled() else "no_grad", iteration))
        shift = 0.01 * iteration if self.varies_by_iteration else 0.0
        log_probs = F.log_softmax(model(batch.inputs) + shift * torch.arange(ACTIONS), dim=1)
        return self.scored(log_probs, samples["actions"])

    def metrics(self, batch: Batch, samples: dict[str, Any], scored: LogProbs) -> dict[str, Tensor]:
        return {"first_action_rate": (samples["actions"] == 0).float().mean()}


def _trainer(root: Path, policy: Bandit | None = None, **cfg: Any) -> GRPOTrainer[GRPOParams]:
    params = GRPOParams(**{"epochs": 2, "batch_size": 8, "group_size": 4, "lr": 0.15625, "warmup_epochs": 0.0,
                           "weight_decay": 0.0, "log_every": 1, "checkpoint_every": 100, **cfg})
    torch.manual_seed(0)
    model = nn.Linear(FEATURES, ACTIONS)
    policy = policy or Bandit(params.group_size)
    return GRPOTrainer(model, params, INPUTS, policy=policy, reference=copy.deepcopy(model), labels=LABELS,
                       device=torch.device("cpu"), seed=0, checkpoint_dir=root, tracker=Tracker(),
                       fingerprint="bandit")


def test_logs_the_common_and_the_policys_metrics_under_the_sections_name(tmp_path: Path) -> None:
    trainer = _trainer(tmp_path)
    history = trainer.fit().history
    assert trainer.stage == "grpo" and not trainer.model.training  # eval mode: the sampler is the updated policy
    assert set(history[0]) >= {"loss", "kl", "clip_ratio", "ratio", "reward", "reward_std", "frac_reward_zero_std",
                               "entropy", "first_action_rate", "grad_norm", "lr", "samples_per_second"}
    assert history[0]["kl"] == pytest.approx(0.0, abs=1e-7)  # the policy starts at the reference


def test_reward_rises_and_the_reference_stays_frozen(tmp_path: Path) -> None:
    trainer = _trainer(tmp_path, epochs=15, beta=0.0)
    reference = copy.deepcopy(trainer.reference.state_dict())
    rewards = [h["reward"] for h in trainer.fit().history]
    assert np.mean(rewards[-8:]) > np.mean(rewards[:8]) + 0.2, rewards
    assert all(torch.equal(v, trainer.reference.state_dict()[k]) for k, v in reference.items())


@pytest.mark.parametrize("one_pass", [False, True])
def test_old_and_reference_log_probs_are_taken_once_per_batch(one_pass: bool, tmp_path: Path) -> None:
    policy = Bandit(4, one_pass=one_pass)
    trainer = _trainer(tmp_path, policy, num_iterations=2)
    trainer.train_step(0)
    sampled = trainer.sampled["0:0"]
    # the reference once; the old log-probs once, from the draw's own pass when it gave them
    expected = [("no_grad", 0)] if one_pass else [("no_grad", 0), ("no_grad", 0), ("grad", 0)]
    assert policy.calls == expected
    assert sampled["ref_logp"].shape == sampled["old_logp"].shape == (1, 8, 4)
    policy.calls.clear()
    out = trainer.train_step(1)  # the batch's second update: the kept samples, no new draw
    assert trainer.sampled["0:0"] is sampled and policy.calls == [("grad", 1)]
    assert out["ratio"].item() != pytest.approx(1.0)  # the policy moved since it sampled
    trainer.train_step(2)  # a new batch: the previous one is forgotten
    assert list(trainer.sampled) == ["1:0"]


def test_one_update_per_batch_keeps_no_old_log_probs(tmp_path: Path) -> None:
    trainer = _trainer(tmp_path)
    out = trainer.train_step(0)
    assert "old_logp" not in trainer.sampled["0:0"]  # old = the update's own log-probs, detached
    assert out["ratio"].item() == pytest.approx(1.0) and out["clip_ratio"].item() == 0.0


def test_log_probs_that_vary_by_iteration_are_kept_per_update(tmp_path: Path) -> None:
    policy = Bandit(4, varies=True)
    trainer = _trainer(tmp_path, policy, num_iterations=3)
    trainer.train_step(0)
    no_grad = sorted(call for call in policy.calls if call[0] == "no_grad")
    assert no_grad == sorted([("no_grad", i) for i in range(3)] * 2)  # reference and old, for each update
    assert trainer.sampled["0:0"]["ref_logp"].shape == (3, 8, 4)
    with torch.no_grad():  # the next iteration compares like with like: old and reference under its variant
        fresh = _trainer(tmp_path / "fresh", Bandit(4, varies=True), num_iterations=3)
        fresh.compute_loss(next(iter(fresh.micro_batches(0))))
        out = fresh.compute_loss(next(iter(fresh.micro_batches(1))))
    assert out["ratio"].item() == pytest.approx(1.0) and out["kl"].item() == pytest.approx(0.0, abs=1e-7)


def test_resume_between_a_batchs_updates_matches_an_unbroken_run(tmp_path: Path) -> None:
    options = {"num_iterations": 2, "warmup_epochs": 1.0}  # 8 warmup steps: the lr of steps 1-3 ignores total_steps
    unbroken = _trainer(tmp_path / "unbroken", **options)
    unbroken.fit()
    broken = _trainer(tmp_path / "broken", checkpoint_every=3, **options)
    broken.total_steps = 3  # killed after the checkpoint taken between batch 1's two updates
    broken.fit()
    resumed = _trainer(tmp_path / "broken", checkpoint_every=3, **options)
    assert resumed.fit().resumed_from == 3
    for name, value in unbroken.model.state_dict().items():
        assert torch.equal(value, resumed.model.state_dict()[name]), name


def test_unwrap_finds_the_module_under_ddp_and_compile_wrappers() -> None:
    model = nn.Linear(2, 2)
    assert unwrap(model) is model
    compiled = torch.compile(model)
    assert unwrap(compiled) is model
