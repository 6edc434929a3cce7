"""The base trainer on a toy regression: steps, schedule, accumulation, checkpoint/resume, non-finite stop, the
optional preprocessing and the throughput it reports."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import Tensor, nn

from pipeline_lib.core.checkpoints import read_checkpoint
from pipeline_lib.core.config import TrainParams
from pipeline_lib.core.errors import NonFiniteLossError
from pipeline_lib.core.tracking import Tracker
from pipeline_lib.core.trainer import Batch, Trainer, lr_factor

SAMPLES = np.random.default_rng(0).integers(0, 256, size=(64, 4, 4, 1), dtype=np.uint8)


class UnitScale(nn.Module):
    """A track's preprocessing in miniature: stored uint8 rows -> floats around 0 on the device."""

    def forward(self, rows: Tensor) -> Tensor:
        return (rows.float() / 255.0 - 0.5) / 0.25


class ToyTrainer(Trainer):
    """Regress a linear map of the samples onto step-seeded noise (exercises the per-step generator)."""

    nan_at_step: int | None = None
    interrupt_at_step: int | None = None

    def compute_loss(self, batch: Batch) -> dict[str, Tensor]:
        if batch.step == self.interrupt_at_step:
            raise KeyboardInterrupt  # Ctrl-C in the middle of a step
        target = torch.rand(batch.global_size, 3, generator=batch.generator)[batch.rows]
        loss = ((self.forward_model(batch.inputs) - target) ** 2).mean()
        if batch.step == self.nan_at_step:
            loss = loss * float("nan")
        return {"loss": loss}


def _trainer(tmp_path: Path, fingerprint: str = "toy", **overrides: object) -> ToyTrainer:
    cfg = TrainParams(**{"epochs": 4, "batch_size": 16, "base_lr": 0.05, "warmup_epochs": 1.0,
                         "checkpoint_every": 5, "log_every": 2, **overrides})
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 3))
    return ToyTrainer(model, cfg, SAMPLES, UnitScale(), device=torch.device("cpu"), seed=7,
                      checkpoint_dir=tmp_path / "ckpt", tracker=Tracker(), fingerprint=fingerprint)


def _weights(trainer: Trainer) -> list[Tensor]:
    return [p.detach().clone() for p in trainer.model.parameters()]


def test_steps_change_parameters_and_loss_falls(tmp_path: Path) -> None:
    trainer = _trainer(tmp_path)
    before = _weights(trainer)
    result = trainer.fit()
    assert result.steps == trainer.total_steps == 4 * (64 // 16)
    assert all(not torch.equal(a, b) for a, b in zip(before, _weights(trainer), strict=True))
    assert result.history[-1]["loss"] < result.history[0]["loss"]
    assert {"loss", "lr", "grad_norm", "samples_per_second", "step_time"} <= set(result.history[0])


def test_schedule_warms_up_then_decays_to_min() -> None:
    factors = [lr_factor(s, warmup_steps=4, total_steps=20, min_ratio=0.1) for s in range(20)]
    assert factors[:4] == [0.25, 0.5, 0.75, 1.0]
    assert all(a >= b for a, b in itertools.pairwise(factors[3:]))
    assert factors[-1] == pytest.approx(0.1, abs=0.01)


def test_lr_scales_with_batch(tmp_path: Path) -> None:
    assert _trainer(tmp_path, batch_size=32).lr == pytest.approx(0.05 * 32 / 256)


def test_the_lr_of_a_grpo_section_does_not_grow_with_the_batch() -> None:
    from pipeline_lib.core.config import GRPOParams

    assert GRPOParams(lr=1.0e-3, batch_size=8).learning_rate == GRPOParams(lr=1.0e-3, batch_size=64).learning_rate
    assert TrainParams(base_lr=1.0e-3, batch_size=64).learning_rate == pytest.approx(1.0e-3 * 64 / 256)


class StoppingTrainer(ToyTrainer):
    """Stops after the optimizer step `stop_after` (1-based), as SFT's early stop does at its target."""

    stop_after = 6

    def should_stop(self, step: int) -> bool:
        return step + 1 == self.stop_after


def test_should_stop_ends_training_there_and_a_resume_trains_no_further(tmp_path: Path) -> None:
    cfg = TrainParams(epochs=4, batch_size=16, base_lr=0.05, warmup_epochs=1.0, checkpoint_every=4, log_every=4)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 3))
    options = {"device": torch.device("cpu"), "seed": 7, "checkpoint_dir": tmp_path / "ckpt", "tracker": Tracker(),
               "fingerprint": "stop"}
    trainer = StoppingTrainer(model, cfg, SAMPLES, UnitScale(), **options)
    result = trainer.fit()
    assert result.steps == trainer.stopped_at == 6 < trainer.total_steps == 16
    assert [h["step"] for h in result.history] == [4, 6]  # the stop closes the logging window and checkpoints
    weights = _weights(trainer)
    again = StoppingTrainer(nn.Sequential(nn.Flatten(), nn.Linear(16, 3)), cfg, SAMPLES, UnitScale(), **options)
    again.stop_after = 0  # would never stop: the checkpoint's decision holds
    resumed = again.fit()
    assert resumed.steps == 6 and resumed.resumed_from == 6
    assert all(torch.equal(a, b) for a, b in zip(weights, _weights(again), strict=True))


def test_accumulation_matches_one_big_batch(tmp_path: Path) -> None:
    whole = _trainer(tmp_path / "a", accumulation_steps=1)
    split = _trainer(tmp_path / "b", accumulation_steps=4)
    whole.fit()
    split.fit()
    for a, b in zip(_weights(whole), _weights(split), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_resume_gives_identical_weights(tmp_path: Path) -> None:
    straight = _trainer(tmp_path / "straight")
    straight.fit()

    first = _trainer(tmp_path / "resumed")
    first.interrupt_at_step = 7
    with pytest.raises(KeyboardInterrupt):
        first.fit()
    assert read_checkpoint(tmp_path / "resumed" / "ckpt" / "last.pt", "toy")["step"] == 5
    second = _trainer(tmp_path / "resumed")
    result = second.fit()
    assert result.resumed_from == 5
    for a, b in zip(_weights(straight), _weights(second), strict=True):
        assert torch.equal(a, b)
    assert [h["step"] for h in result.history] == [h["step"] for h in straight.history]


def test_resume_between_log_steps_logs_the_curve_of_a_straight_run(tmp_path: Path) -> None:
    """A checkpoint closes the logging window: killed after the checkpoint at step 3 (log_every 2), the resumed
    run logs the same averages as an uninterrupted one, not a window that lost the steps before the kill."""
    straight = _trainer(tmp_path / "straight", checkpoint_every=3)
    straight.fit()
    first = _trainer(tmp_path / "resumed", checkpoint_every=3)
    first.interrupt_at_step = 4
    with pytest.raises(KeyboardInterrupt):
        first.fit()
    resumed = _trainer(tmp_path / "resumed", checkpoint_every=3)
    assert resumed.fit().resumed_from == 3

    def untimed(history: list[dict[str, float]]) -> list[dict[str, float]]:
        return [{k: v for k, v in h.items() if k not in ("samples_per_second", "step_time")} for h in history]

    assert untimed(resumed.history) == untimed(straight.history)
    assert [h["step"] for h in straight.history] == [2, 3, 4, 6, 8, 9, 10, 12, 14, 15, 16]


def test_other_fingerprint_starts_fresh(tmp_path: Path) -> None:
    _trainer(tmp_path).fit()
    assert read_checkpoint(tmp_path / "ckpt" / "last.pt", "other params") is None
    assert _trainer(tmp_path, fingerprint="other params").fit().resumed_from == 0


def test_non_finite_loss_stops_and_keeps_last_checkpoint(tmp_path: Path) -> None:
    trainer = _trainer(tmp_path)
    trainer.nan_at_step = 8  # the 9th step; checkpoints were written after steps 5 (and 10 is never reached)
    with pytest.raises(NonFiniteLossError, match=r"loss is nan at step 9.*last\.pt \(step 5\) is kept"):
        trainer.fit()
    state = read_checkpoint(tmp_path / "ckpt" / "last.pt", "toy")
    assert state["step"] == 5
    restored = _trainer(tmp_path)
    restored.model.load_state_dict(state["model"])
    assert all(torch.isfinite(p).all() for p in restored.model.parameters())


def test_batch_larger_than_data_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"train\.batch_size=128: is larger than the 64 training samples"):
        _trainer(tmp_path, batch_size=128)
