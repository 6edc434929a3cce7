"""Samplers: the AR loop against greedy by hand and top-k; LLaDA decoding's schedule, blocks cut to fit, sliding
window, prompt and masks, and bit-identity with the old loop (a naive reference) where that applied."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import Tensor, nn

from pipeline_lib.text.models.sampling import blocks, generate_ar, generate_mdm, schedule, window
from pipeline_lib.text.models.transformer import TransformerLM

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


def _plan(prompt_length: int, gen_length: int, steps: int | None, block_length: int) -> list[tuple[int, int, int]]:
    """(start, end, calls) of each block: blocks cut to fit, min(steps / num_blocks, block tokens) calls each."""
    cut = blocks(prompt_length, gen_length, min(block_length, gen_length))
    return [(start, end, end - start if steps is None else min(steps // len(cut), end - start)) for start, end in cut]


@pytest.mark.parametrize("temperature", [0.0, 1.0])
@pytest.mark.parametrize("gen_length, steps, block_length", [
    (12, 12, 4), (12, 6, 12), (8, 4, 2), (6, 12, 3),  # block_length divides gen_length (6, 12, 3: 3 calls a block)
    (10, None, 4), (10, 6, 4), (10, 12, 4),  # blocks of 4, 4 and 2: one call a token, 2 a block, 4 capped at 2
    (5, 5, 8), (5, None, 20),  # a block longer than the answer: one block of 5
])
def test_mdm_commits_the_scheduled_tokens_block_by_block(
    temperature: float, gen_length: int, steps: int | None, block_length: int
) -> None:
    model = make_model(causal=False)
    recorder, start = Recorder(model), prompt()
    out = generate_mdm(recorder, start, gen_length=gen_length, steps=steps, block_length=block_length,
                       temperature=temperature, mask_id=model.mask_id, generator=torch.Generator().manual_seed(0))
    P = start.shape[1]
    assert out.shape == (2, P + gen_length)
    assert torch.equal(out[:, :P], start)  # the prompt is untouched
    assert ((out >= 0) & (out < VOCAB)).all()  # no mask left, nothing outside the vocabulary
    plan = _plan(P, gen_length, steps, block_length)
    calls = [(block_start, block_end) for block_start, block_end, count in plan for _ in range(count)]
    commits = [count for block_start, block_end, n in plan for count in schedule(block_end - block_start, n)]
    assert len(recorder.inputs) == len(calls) and all(count >= 1 for count in commits)  # never an idle call
    masks = [int((ids == model.mask_id).sum(dim=1)[0]) for ids in [*recorder.inputs, out]]
    assert [before - after for before, after in itertools.pairwise(masks)] == commits  # per row
    for (block_start, block_end), ids in zip(calls, recorder.inputs, strict=True):
        masked = ids == model.mask_id
        assert ids.shape == out.shape  # the sequence fits: the model reads it whole
        assert torch.equal(ids[:, :P], start) and torch.equal(masked.sum(dim=1), masked[:1].sum(dim=1).expand(2))
        assert not masked[:, :block_start].any()  # earlier blocks are done
        assert masked[:, block_end:].all()  # later blocks wait their turn
        assert torch.equal(out[~masked], ids[~masked])  # a committed token is never changed


def test_blocks_are_cut_to_fit_and_the_window_slides_past_max_len() -> None:
    assert blocks(3, 10, 4) == [(3, 7), (7, 11), (11, 13)]
    assert blocks(3, 8, 4) == [(3, 7), (7, 11)] and blocks(3, 5, 5) == [(3, 8)]
    assert window(9, 20, 24) == (0, 20)  # the sequence fits: all of it
    assert window(9, 30, 24) == (0, 24)  # the block ends within the first max_len: those, later masks visible
    assert window(28, 30, 24) == (4, 28) and window(30, 30, 24) == (6, 30)  # max_len positions ending at the block


@pytest.mark.parametrize("temperature", [0.0, 1.0])
@pytest.mark.parametrize("prompt_length, gen_length, block_length", [
    (4, 40, 8),  # the answer alone is longer than the context
    (4, 24, 16),  # max_new_tokens = the whole context after a prompt; blocks of 16 and 8
    (30, 8, 4),  # a prompt longer than the context: its start drops out of the window
    (4, 40, 100),  # one block of 40 > max_len: capped at max_len, so blocks of 24 and 16
])
def test_mdm_slides_a_window_of_max_len_over_a_longer_sequence(
    temperature: float, prompt_length: int, gen_length: int, block_length: int
) -> None:
    model = make_model(causal=False)
    recorder, start = Recorder(model), prompt(length=prompt_length)
    out = generate_mdm(recorder, start, gen_length=gen_length, steps=None, block_length=block_length,
                       temperature=temperature, mask_id=model.mask_id, generator=torch.Generator().manual_seed(0))
    P, T = prompt_length, prompt_length + gen_length
    assert out.shape == (2, T) and torch.equal(out[:, :P], start)  # the prompt intact
    assert ((out >= 0) & (out < VOCAB)).all()  # gen_length tokens, no MASK left
    plan = _plan(P, gen_length, None, min(block_length, model.max_len))
    calls = [(block_start, block_end) for block_start, block_end, count in plan for _ in range(count)]
    assert len(recorder.inputs) == gen_length == len(calls)
    for (block_start, block_end), ids in zip(calls, recorder.inputs, strict=True):
        first, last = window(block_end, T, model.max_len)
        assert ids.shape == (2, model.max_len) and first <= block_start and block_end <= last  # the block in view
        masked = ids == model.mask_id
        assert torch.equal(out[:, first:last][~masked], ids[~masked])  # the window of the sequence, unchanged
        assert not masked[:, : block_start - first].any()  # earlier blocks are done
        assert masked[:, block_end - first :].all()  # later blocks in view wait their turn


class KeyMaskRecorder(nn.Module):
    """Keeps each call's ids and key mask; the model checks that they have the same shape."""

    def __init__(self, model: TransformerLM) -> None:
        super().__init__()
        self.model, self.max_len, self.calls = model, model.max_len, []

    def forward(self, ids: Tensor, key_mask: Tensor) -> Tensor:
        self.calls.append((ids.clone(), key_mask.clone()))
        return self.model(ids, key_mask=key_mask)


def test_mdm_windows_the_key_mask_with_the_ids() -> None:
    """Left-padded prompts over a sliding window: each call's key mask is the window of the padded sequence's,
    and the padding's ids never matter."""
    model = make_model(causal=False)
    start, pad = prompt(length=6), 3
    key_mask = torch.ones_like(start, dtype=torch.bool)
    key_mask[0, :pad] = False  # row 0: three padding positions on the left
    runs = []
    for filler in (0, 5):
        padded = start.clone()
        padded[0, :pad] = filler
        recorder = KeyMaskRecorder(model)
        out = generate_mdm(recorder, padded, gen_length=24, steps=None, block_length=8, temperature=1.0,
                           mask_id=model.mask_id, generator=torch.Generator().manual_seed(0), key_mask=key_mask)
        runs.append(out[:, pad:])
        T, real = out.shape[1], torch.cat([key_mask, torch.ones(2, 24, dtype=torch.bool)], dim=1)
        for block_start, block_end, count in _plan(6, 24, None, 8):
            first, last = window(block_end, T, model.max_len)
            for ids, mask in recorder.calls[:count]:
                assert torch.equal(mask, real[:, first:last])
                assert torch.equal(ids[:, : block_start - first], out[:, first:block_start])
            recorder.calls = recorder.calls[count:]
    assert torch.equal(runs[0], runs[1])


def _old_predict(logits: Tensor, *, temperature: float, generator: torch.Generator | None) -> tuple[Tensor, Tensor]:
    """`sampling._predict` as it was when the reference loop below was copied."""
    logits = logits.double()
    if temperature == 0:
        predicted = logits.argmax(dim=-1)
    else:
        uniform = torch.rand(logits.shape, generator=generator, device=logits.device, dtype=torch.float64)
        gumbel = -torch.log(-torch.log(uniform.clamp_min(torch.finfo(torch.float64).tiny)))
        predicted = (logits / temperature + gumbel).argmax(dim=-1)
    probs = torch.softmax(logits, dim=-1)
    return predicted, torch.gather(probs, -1, predicted.unsqueeze(-1)).squeeze(-1).float()


def _old_generate_mdm(model: TransformerLM, prompt_ids: Tensor, *, gen_length: int, steps: int, block_length: int,
                      temperature: float, mask_id: int, generator: torch.Generator | None,
                      key_mask: Tensor | None = None) -> Tensor:
    """The naive reference: `generate_mdm`'s loop before blocks were cut to fit and the window slid (block_length
    dividing gen_length, P + gen_length <= max_len), which the pipeline's committed figures come from."""
    num_blocks = gen_length // block_length
    B, P = prompt_ids.shape
    answer = torch.full((B, gen_length), mask_id, dtype=prompt_ids.dtype, device=prompt_ids.device)
    x = torch.cat([prompt_ids, answer], dim=1)
    rows = torch.arange(B, device=x.device)[:, None]
    real = None if key_mask is None else torch.cat([key_mask, torch.ones_like(answer, dtype=torch.bool)], dim=1)
    for block in range(num_blocks):
        start, end = P + block * block_length, P + (block + 1) * block_length
        for count in schedule(block_length, steps // num_blocks):
            logits = model(x) if real is None else model(x, key_mask=real)
            predicted, confidence = _old_predict(logits[:, start:end], temperature=temperature, generator=generator)
            confidence = confidence.masked_fill(x[:, start:end] != mask_id, float("-inf"))
            chosen = torch.topk(confidence, count, dim=1).indices
            x[rows, start + chosen] = predicted[rows, chosen]
    return x


@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("temperature", [0.0, 0.7, 1.0])
@pytest.mark.parametrize("prompt_length, gen_length, steps, block_length", [
    (4, 12, 12, 4), (4, 12, 6, 12), (4, 8, 4, 2), (4, 16, 8, 4), (8, 16, 16, 16), (4, 20, 20, 5), (2, 22, 2, 11),
])
def test_mdm_is_bit_identical_to_the_old_loop_where_that_applied(
    padded: bool, temperature: float, prompt_length: int, gen_length: int, steps: int, block_length: int
) -> None:
    """Where block_length divides gen_length and P + gen_length <= max_len, the same seed gives the same ids."""
    model = make_model(causal=False)
    start = prompt(length=prompt_length)
    key_mask = None
    if padded:
        key_mask = torch.ones_like(start, dtype=torch.bool)
        key_mask[0, : prompt_length // 2] = False
    outs = [sampler(model, start, gen_length=gen_length, steps=steps, block_length=block_length,
                    temperature=temperature, mask_id=model.mask_id, generator=torch.Generator().manual_seed(7),
                    key_mask=key_mask) for sampler in (generate_mdm, _old_generate_mdm)]
    assert torch.equal(outs[0], outs[1])
    if steps == gen_length:  # steps=None is one call per token, the same calls
        one_per_token = generate_mdm(model, start, gen_length=gen_length, steps=None, block_length=block_length,
                                     temperature=temperature, mask_id=model.mask_id,
                                     generator=torch.Generator().manual_seed(7), key_mask=key_mask)
        assert torch.equal(one_per_token, outs[1])


def test_mdm_with_more_steps_than_tokens_skips_idle_calls_and_greedy_is_unchanged() -> None:
    """The old loop made calls that committed nothing when steps > gen_length; without them greedy decoding is the
    same (sampling is not: the skipped calls drew noise)."""
    model = make_model(causal=False)
    options = {"gen_length": 8, "steps": 16, "block_length": 4, "temperature": 0.0, "mask_id": model.mask_id,
               "generator": None}
    recorder = Recorder(model)
    out = generate_mdm(recorder, prompt(), **options)
    assert len(recorder.inputs) == 8 and torch.equal(out, _old_generate_mdm(model, prompt(), **options))


def test_mdm_block_longer_than_the_answer_is_one_block() -> None:
    model = make_model(causal=False)

    def run(block_length: int) -> Tensor:
        return generate_mdm(model, prompt(), gen_length=7, steps=7, block_length=block_length, temperature=1.0,
                            mask_id=model.mask_id, generator=torch.Generator().manual_seed(3))

    assert torch.equal(run(8), run(7)) and torch.equal(run(1000), run(7))


def test_mdm_is_seeded_and_greedy_is_deterministic() -> None:
    model = make_model(causal=False)

    def run(temperature: float, seed: int) -> Tensor:
        return generate_mdm(model, prompt(), gen_length=8, steps=8, block_length=4, temperature=temperature,
                            mask_id=model.mask_id, generator=torch.Generator().manual_seed(seed))

    assert torch.equal(run(0.0, 0), run(0.0, 1))
    assert torch.equal(run(1.0, 5), run(1.0, 5))
    assert not torch.equal(run(1.0, 5), run(1.0, 6))


@pytest.mark.parametrize("arguments, message", [
    ({"steps": 5}, r"steps=5: must be a positive multiple of the number of blocks ceil\(gen_length / block_length\) "
                   r"= ceil\(8 / 4\) = 2"),
    ({"gen_length": 10, "steps": 4}, r"steps=4: .* = ceil\(10 / 4\) = 3, or None"),  # blocks of 4, 4 and 2
    ({"steps": 0}, "steps=0: must be a positive multiple"),
    ({"gen_length": 40, "block_length": 30, "steps": 3}, r"ceil\(40 / 24\) = 2 \(block_length=30 capped at "
                                                          r"max_len=24\)"),
    ({"gen_length": 0}, "gen_length=0: must be >= 1"),
    ({"block_length": 0}, "block_length=0: must be >= 1"),
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
