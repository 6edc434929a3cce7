"""Language-model pretraining on the base trainer: windows, both objectives, DDP-safe masks, save and load."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline_lib.core.tracking import Tracker
from pipeline_lib.params import params_from_dict
from pipeline_lib.text.data.corpus import prepare_text
from pipeline_lib.text.models.saved import load_lm
from pipeline_lib.text.pretrain import LMPaths, LMTrainer, build_lm, run_text_pretrain, token_windows


def test_windows_are_a_view_that_overlaps_by_one_token() -> None:
    tokens = np.arange(11, dtype=np.uint16)
    windows = token_windows(tokens, 4)
    assert windows.shape == (2, 5) and np.shares_memory(windows, tokens)
    assert windows[0].tolist() == [0, 1, 2, 3, 4] and windows[1].tolist() == [4, 5, 6, 7, 8]
    with pytest.raises(ValueError, match=r"text_model\.seq_len=16: the 11 training tokens are too few for one window"):
        token_windows(tokens, 16)


def _params(**pretrain: object):
    return params_from_dict({"device": "cpu", "text_model": {"d_model": 16, "n_layer": 1, "n_head": 2, "seq_len": 8},
                             "text_pretrain": {"epochs": 1, "batch_size": 4, "warmup_epochs": 0.0,
                                               "log_every": 1, "checkpoint_every": 2, **pretrain}})


def _trainer(objective: str, tmp_path: Path, windows: np.ndarray) -> LMTrainer:
    params = _params()
    return LMTrainer(build_lm(12, params, objective), params.text_pretrain, windows,
                     objective=objective, mdm_eps=1e-3, device=torch.device("cpu"), seed=0,
                     checkpoint_dir=tmp_path / objective, tracker=Tracker(), fingerprint="f")


@pytest.mark.parametrize("objective", ["ar", "mdm"])
def test_two_steps_change_every_parameter(objective: str, tmp_path: Path) -> None:
    windows = np.random.default_rng(0).integers(0, 12, size=(8, 9)).astype(np.uint16)
    trainer = _trainer(objective, tmp_path, windows)
    before = {name: p.detach().clone() for name, p in trainer.model.named_parameters()}
    trainer.fit()
    assert trainer.total_steps == 2
    for name, p in trainer.model.named_parameters():
        if name == "embed.weight" and objective == "mdm":
            assert not torch.equal(p[:12], before[name][:12])  # the mask row changes too, checked below
        else:
            assert not torch.equal(p, before[name]), name
    if objective == "mdm":
        assert not torch.equal(trainer.model.embed.weight[12], before["embed.weight"][12])  # MASK was read
        assert "mask_rate" in trainer.history[0]


def test_mdm_masks_are_drawn_for_the_global_batch(tmp_path: Path) -> None:
    """A process holding rows 1 and 3 of a step's batch masks them as a single process masks rows 1 and 3."""
    windows = np.random.default_rng(1).integers(0, 12, size=(8, 9)).astype(np.uint16)
    trainer = _trainer("mdm", tmp_path, windows)
    seen = []
    original = trainer.forward_model.forward
    trainer.forward_model.forward = lambda ids: seen.append(ids.clone()) or original(ids)
    batch = next(trainer.micro_batches(0))
    trainer.compute_loss(batch)
    whole = seen[-1]
    half = type(batch)(batch.inputs[1::2], None, slice(1, 4, 2), batch.global_size,
                       torch.Generator().manual_seed(batch.generator.initial_seed()), 0)
    trainer.compute_loss(half)
    assert torch.equal(seen[-1], whole[1::2])


def test_stage_entry_trains_writes_and_loads(tmp_path: Path) -> None:
    data = tmp_path / "prepared"
    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "a.txt").write_text("the cat sat on the mat.\n" * 40 + "a dog.\n" * 10)
    prepare_text("folder", path=tmp_path / "corpus", val_fraction=0.2, out_dir=data, cache_dir=tmp_path / "c")
    params = _params(epochs=2)
    paths = LMPaths(data, tmp_path / "ar", tmp_path / "ar.json", tmp_path / "plots", tmp_path / "ck")
    summary = run_text_pretrain(params, paths, "ar", Tracker(), torch.device("cpu"))
    assert summary["steps"] > 0 and np.isfinite(summary["loss"]) and (tmp_path / "plots" / "loss.csv").is_file()
    model, tokenizer, config = load_lm(paths.out)
    assert config["objective"] == "ar" and tokenizer.decode(tokenizer.encode("the cat")) == "the cat"
    ids = torch.tensor([tokenizer.encode("the cat")])
    fresh = build_lm(tokenizer.vocab_size, params, "ar")
    assert not torch.allclose(model(ids), fresh(ids))  # the trained weights, not a new model's


def test_training_does_not_depend_on_the_global_random_state(tmp_path: Path) -> None:
    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "a.txt").write_text("the cat sat on the mat.\n" * 40 + "a dog.\n" * 10)
    prepare_text("folder", path=tmp_path / "corpus", val_fraction=0.2, out_dir=tmp_path / "data",
                 cache_dir=tmp_path / "c")
    weights = []
    for run, noise in enumerate((1, 1000)):
        torch.rand(noise)  # whatever ran before in the process must not change the model
        paths = LMPaths(tmp_path / "data", tmp_path / f"ar{run}", tmp_path / f"ar{run}.json", tmp_path / f"p{run}",
                        tmp_path / f"c{run}")
        run_text_pretrain(_params(epochs=1), paths, "ar", Tracker(), torch.device("cpu"))
        weights.append((paths.out / "model.safetensors").read_bytes())
    assert weights[0] == weights[1]
