"""The objectives' strategies against the functions they wire: the model each builds, its losses (the pure losses on
the same masks), its sampler and its validation nats; and the choice by name."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

from pipeline_lib.core.trainer import Batch
from pipeline_lib.text.losses import ar_loss, mdm_corrupt, mdm_loss, sft_ar_loss, sft_mdm_loss
from pipeline_lib.text.models.likelihood import ar_nats, consecutive_windows, mdm_nats
from pipeline_lib.text.models.objectives import AR, MDM, OBJECTIVES, Objective, resolve_objective
from pipeline_lib.text.models.sampling import generate_ar, generate_mdm
from pipeline_lib.text.models.transformer import TransformerLM

VOCAB = 9
pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def build(objective: str, seed: int = 0) -> TransformerLM:
    torch.manual_seed(seed)
    return OBJECTIVES[objective].build(VOCAB, d_model=16, n_layer=1, n_head=2, max_len=8)


def batch_of(inputs: torch.Tensor, rows: slice, global_size: int, seed: int = 3) -> Batch:
    return Batch(inputs, None, rows, global_size, torch.Generator().manual_seed(seed), step=0)


def test_objectives_are_chosen_by_name_and_an_unknown_one_is_refused() -> None:
    assert list(OBJECTIVES) == ["ar", "mdm"]
    assert isinstance(OBJECTIVES["ar"], AR) and isinstance(OBJECTIVES["mdm"], MDM)
    for name, objective in OBJECTIVES.items():
        assert resolve_objective(name) is objective and objective.name == name
    with pytest.raises(ValueError, match=r"^objective='gpt': expected 'ar' or 'mdm'$"):
        resolve_objective("gpt")
    strategy: type[Any] = Objective
    with pytest.raises(TypeError, match="abstract"):  # an objective brings every method of its own
        strategy()


@pytest.mark.parametrize("objective", ["ar", "mdm"])
def test_build_makes_the_objective_s_transformer(objective: str) -> None:
    model = build(objective)
    assert model.causal == OBJECTIVES[objective].causal == (objective == "ar")
    assert model.mask_id == (VOCAB if objective == "mdm" else None)


@pytest.mark.parametrize("objective", ["ar", "mdm"])
def test_pretrain_loss_is_the_pure_loss_on_masks_drawn_for_the_global_batch(objective: str) -> None:
    model, strategy = build(objective), OBJECTIVES[objective]
    ids = torch.randint(0, VOCAB, (4, 9), generator=torch.Generator().manual_seed(1))  # (b, L + 1)
    out = strategy.pretrain_loss(model, batch_of(ids, slice(0, 4), 4), mask_id=model.mask_id, eps=1e-3)
    if objective == "ar":
        assert torch.equal(out["loss"], ar_loss(model(ids[:, :-1]), ids[:, 1:]))
        return
    _, masked, p = mdm_corrupt(torch.zeros(4, 8, dtype=torch.long), mask_id=VOCAB, eps=1e-3,
                               generator=torch.Generator().manual_seed(3))
    clean = ids[:, :-1]
    assert torch.equal(out["loss"], mdm_loss(model(clean.masked_fill(masked, VOCAB)), clean, masked, p))
    assert out["mask_rate"] == masked.float().mean()
    # A process holding rows 1 and 3 of the global batch masks them as one process does.
    half = strategy.pretrain_loss(model, batch_of(ids[1::2], slice(1, 4, 2), 4), mask_id=model.mask_id, eps=1e-3)
    rows = clean[1::2]
    expected = mdm_loss(model(rows.masked_fill(masked[1::2], VOCAB)), rows, masked[1::2], p[1::2])
    assert torch.equal(half["loss"], expected)


@pytest.mark.parametrize("objective", ["ar", "mdm"])
def test_sft_loss_is_the_pure_loss_and_never_masks_the_prompt(objective: str) -> None:
    model, strategy = build(objective), OBJECTIVES[objective]
    ids = torch.randint(0, VOCAB, (2, 8), generator=torch.Generator().manual_seed(2))
    roles = torch.tensor([[0, 0, 1, 1, 1, 2, 2, 3], [1, 1, 1, 1, 2, 2, 2, 2]])  # pad, prompt, answer, fill
    key_mask, answer, response = roles != 0, roles == 2, roles >= 2
    out = strategy.sft_loss(model, batch_of(ids, slice(0, 2), 2), ids, key_mask=key_mask, answer=answer,
                            response=response, mask_id=model.mask_id, eps=1e-3)
    if objective == "ar":
        assert torch.equal(out["loss"], sft_ar_loss(model(ids[:, :-1], key_mask=key_mask[:, :-1]), ids, answer))
        return
    _, masked, p = mdm_corrupt(torch.zeros(2, 8, dtype=torch.long), mask_id=VOCAB, eps=1e-3,
                               generator=torch.Generator().manual_seed(3))
    masked &= response
    logits = model(ids.masked_fill(masked, VOCAB), key_mask=key_mask)
    assert torch.equal(out["loss"], sft_mdm_loss(logits, ids, masked, p, response))
    assert out["mask_rate"] == masked.sum() / response.sum()


def test_mdm_refuses_a_model_without_a_mask_token() -> None:
    ids = torch.zeros(2, 9, dtype=torch.long)
    with pytest.raises(ValueError, match="mask token"):
        OBJECTIVES["mdm"].pretrain_loss(build("ar"), batch_of(ids, slice(0, 2), 2), mask_id=None, eps=1e-3)


@pytest.mark.parametrize("temperature", [0.0, 0.9])
def test_generate_runs_the_objective_s_sampler_with_its_own_knobs(temperature: float) -> None:
    prompt = torch.tensor([[1, 2, 3], [4, 5, 6]])
    ar, mdm = build("ar").eval(), build("mdm").eval()
    got = OBJECTIVES["ar"].generate(ar, prompt, new_tokens=5, temperature=temperature, top_k=3, steps=99,
                                    block_length=2, generator=torch.Generator().manual_seed(0))
    want = generate_ar(ar, prompt, max_new_tokens=5, temperature=temperature, top_k=3,
                       generator=torch.Generator().manual_seed(0))
    assert torch.equal(got, want)  # steps and block_length are the masked sampler's: ignored
    got = OBJECTIVES["mdm"].generate(mdm, prompt, new_tokens=5, temperature=temperature, top_k=3, steps=3,
                                     block_length=2, generator=torch.Generator().manual_seed(0))
    want = generate_mdm(mdm, prompt, gen_length=5, steps=3, block_length=2, temperature=temperature, mask_id=VOCAB,
                        generator=torch.Generator().manual_seed(0))
    assert torch.equal(got, want)  # top_k is the autoregressive sampler's: ignored


def test_sample_length_fills_the_masked_model_s_window_only() -> None:
    assert OBJECTIVES["ar"].sample_length(100, 5, 16) == 100  # reads the last max_len tokens
    assert OBJECTIVES["mdm"].sample_length(100, 5, 16) == 11
    assert OBJECTIVES["mdm"].sample_length(4, 5, 16) == 4
    assert OBJECTIVES["mdm"].sample_length(4, 16, 16) == 0  # no room: the evaluation refuses it


def test_validation_nats_score_the_stream_the_objective_s_way() -> None:
    tokens = np.random.default_rng(0).integers(0, VOCAB, size=30).astype(np.uint16)
    ar, mdm = build("ar").eval(), build("mdm").eval()
    assert OBJECTIVES["ar"].validation_nats(ar, tokens, num_samples=2, seed=0) == (ar_nats(ar, tokens, stride=4), 29)
    windows = consecutive_windows(tokens, 8)  # 3 windows of 8 + 1: the last 5 tokens are not scored
    assert OBJECTIVES["mdm"].validation_nats(mdm, tokens, num_samples=2, seed=0) == (
        mdm_nats(mdm, windows, num_samples=2, seed=0), 24)
    assert OBJECTIVES["ar"].bpc_key == "bpc" and not OBJECTIVES["ar"].bpc_is_bound
    assert OBJECTIVES["mdm"].bpc_key == "bpc_bound" and OBJECTIVES["mdm"].bpc_is_bound


def test_consecutive_windows_are_a_view_that_overlaps_by_one_token() -> None:
    tokens = np.arange(11, dtype=np.uint16)
    windows = consecutive_windows(tokens, 4)
    assert windows.tolist() == [[0, 1, 2, 3, 4], [4, 5, 6, 7, 8]] and np.shares_memory(windows, tokens)
    with pytest.raises(ValueError, match="too few"):
        consecutive_windows(tokens, 11)
