"""Samplers: the AR loop against greedy by hand and top-k; LLaDA decoding's schedule, blocks, prompt and masks."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import Tensor, nn

from pipeline_lib.models.transformer import TransformerLM
from pipeline_lib.text.sampling import generate_ar, generate_mdm, schedule

VOCAB = 9


def make_model(causal: bool) -> TransformerLM:
    torch.manual_seed(0)
    model = TransformerLM(VOCAB, d_model=32, n_layer=2, n_head=4, max_len=24, causal=causal, mask_token=not causal)
    return model.eval()


def prompt(batch: int = 2, length: int = 4) -> Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(1))


class Recorder(nn.Module):
    """Passes ids to the model and keeps a copy of each input (the sampler edits its sequence in place)."""

    def __init__(self, model: TransformerLM) -> None:
        super().__init__()
        self.model, self.max_len, self.inputs = model, model.max_len, []

    def forward(self, ids: Tensor) -> Tensor:
        self.inputs.append(ids.clone())
        return self.model(ids)


class FixedLM(nn.Module):
    """A causal stub whose next-token logits are always `logits` (V,)."""

    causal, max_len = True, 8

    def __init__(self, logits: Tensor) -> None:
        super().__init__()
        self.logits = logits

    def forward(self, ids: Tensor) -> Tensor:
        return self.logits.expand(*ids.shape, -1)


def test_schedule_spreads_the_count_evenly() -> None:
    assert schedule(10, 4) == [3, 3, 2, 2]
    assert schedule(8, 4) == [2, 2, 2, 2]
    assert schedule(2, 4) == [1, 1, 0, 0]
    for count in range(0, 30):
        for steps in range(1, 12):
            plan = schedule(count, steps)
            assert len(plan) == steps and sum(plan) == count and max(plan) - min(plan) <= 1
    with pytest.raises(ValueError, match="steps=0"):
        schedule(4, 0)


def test_greedy_ar_matches_a_loop_by_hand_and_crops_to_max_len() -> None:
    model = make_model(causal=True)
    start = prompt(length=20)
    out = generate_ar(model, start, max_new_tokens=10, temperature=0.0, generator=None)
    assert out.shape == (2, 30) and torch.equal(out[:, :20], start)
    ids = start
    for _ in range(10):
        next_id = model(ids[:, -24:])[:, -1].argmax(dim=-1, keepdim=True)
        ids = torch.cat([ids, next_id], dim=1)
    assert torch.equal(out, ids)
    sampled = generate_ar(model, start, max_new_tokens=10, temperature=1.0, top_k=1, generator=None)
    assert torch.equal(sampled, out)  # top-1 sampling is greedy


def test_ar_sampling_is_seeded_and_respects_top_k() -> None:
    model = make_model(causal=True)
    draws = [generate_ar(model, prompt(), max_new_tokens=12, temperature=1.5,
                         generator=torch.Generator().manual_seed(seed)) for seed in (3, 3, 4)]
    assert torch.equal(draws[0], draws[1]) and not torch.equal(draws[0], draws[2])
    assert ((draws[0] >= 0) & (draws[0] < VOCAB)).all()
    stub = FixedLM(torch.tensor([0.0, 3.0, 2.9, 2.8, 0.5]))
    out = generate_ar(stub, torch.zeros(64, 1, dtype=torch.long), max_new_tokens=6, temperature=2.0, top_k=2,
                      generator=torch.Generator().manual_seed(0))
    assert set(out[:, 1:].unique().tolist()) == {1, 2}  # only the two largest logits


def test_ar_rejects_a_bidirectional_model() -> None:
    with pytest.raises(ValueError, match="causal"):
        generate_ar(make_model(causal=False), prompt(), max_new_tokens=1, temperature=0.0, generator=None)


@pytest.mark.parametrize("temperature", [0.0, 1.0])
@pytest.mark.parametrize("gen_length, steps, block_length", [(12, 12, 4), (12, 6, 12), (8, 4, 2), (6, 12, 3)])
def test_mdm_commits_the_scheduled_tokens_block_by_block(
    temperature: float, gen_length: int, steps: int, block_length: int
) -> None:
    model = make_model(causal=False)
    recorder, start = Recorder(model), prompt()
    out = generate_mdm(recorder, start, gen_length=gen_length, steps=steps, block_length=block_length,
                       temperature=temperature, mask_id=model.mask_id, generator=torch.Generator().manual_seed(0))
    P, num_blocks = start.shape[1], gen_length // block_length
    assert out.shape == (2, P + gen_length)
    assert torch.equal(out[:, :P], start)  # the prompt is untouched
    assert ((out >= 0) & (out < VOCAB)).all()  # no mask left, nothing outside the vocabulary
    plan = [count for _ in range(num_blocks) for count in schedule(block_length, steps // num_blocks)]
    assert len(recorder.inputs) == steps
    masks = [int((ids == model.mask_id).sum(dim=1)[0]) for ids in [*recorder.inputs, out]]
    assert [before - after for before, after in itertools.pairwise(masks)] == plan  # per row
    for step, ids in enumerate(recorder.inputs):
        block, masked = step // (steps // num_blocks), ids == model.mask_id
        assert torch.equal(ids[:, :P], start) and torch.equal(masked.sum(dim=1), masked[:1].sum(dim=1).expand(2))
        assert not masked[:, : P + block * block_length].any()  # earlier blocks are done
        assert masked[:, P + (block + 1) * block_length :].all()  # later blocks wait their turn
        assert torch.equal(out[~masked], ids[~masked])  # a committed token is never changed


def test_mdm_is_seeded_and_greedy_is_deterministic() -> None:
    model = make_model(causal=False)

    def run(temperature: float, seed: int) -> Tensor:
        return generate_mdm(model, prompt(), gen_length=8, steps=8, block_length=4, temperature=temperature,
                            mask_id=model.mask_id, generator=torch.Generator().manual_seed(seed))

    assert torch.equal(run(0.0, 0), run(0.0, 1))
    assert torch.equal(run(1.0, 5), run(1.0, 5))
    assert not torch.equal(run(1.0, 5), run(1.0, 6))


@pytest.mark.parametrize("arguments, message", [
    ({"gen_length": 10, "block_length": 4}, "gen_length=10 must be a multiple of block_length=4"),
    ({"steps": 5}, "steps=5 must be a positive multiple of the number of blocks gen_length / block_length = 2"),
    ({"gen_length": 24, "block_length": 24}, "exceeds the model.s max_len=24"),
    ({"temperature": -1.0}, "temperature"),
])
def test_mdm_rejects_bad_arguments(arguments: dict, message: str) -> None:
    model = make_model(causal=False)
    options = {"gen_length": 8, "steps": 4, "block_length": 4, "temperature": 0.0, "mask_id": model.mask_id,
               "generator": None, **arguments}
    with pytest.raises(ValueError, match=message):
        generate_mdm(model, prompt(), **options)


def test_mdm_rejects_a_mask_id_inside_the_vocabulary_or_the_prompt() -> None:
    model = make_model(causal=False)
    options = {"gen_length": 4, "steps": 2, "block_length": 4, "temperature": 0.0, "generator": None}
    with pytest.raises(ValueError, match="inside the model's 9-token vocabulary"):
        generate_mdm(model, prompt(), mask_id=3, **{**options})
    with pytest.raises(ValueError, match="prompt_ids contain the mask id"):
        generate_mdm(model, torch.full((1, 2), model.mask_id), mask_id=model.mask_id, **options)
