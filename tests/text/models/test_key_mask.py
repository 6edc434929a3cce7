"""TransformerLM's key mask (left-padded batches read as the bare sequences) and `grow_vocab`."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from pipeline_lib.text.models.transformer import TransformerLM, grow_vocab

VOCAB = 9
TINY = {"d_model": 16, "n_layer": 2, "n_head": 2, "max_len": 16}
VARIANTS = pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def make_model(causal: bool, seed: int = 0) -> TransformerLM:
    torch.manual_seed(seed)
    return TransformerLM(VOCAB, causal=causal, mask_token=not causal, **TINY).eval()


def rows_of(lengths: list[int], seed: int = 1) -> list[Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (n,), generator=generator) for n in lengths]


def left_padded(rows: list[Tensor], width: int, pad_ids: Tensor) -> tuple[Tensor, Tensor]:
    """Rows -> (B, width) ids, each row at the right end after padding from `pad_ids`, and the key mask."""
    ids = pad_ids[: len(rows), :width].clone()
    real = torch.zeros(len(rows), width, dtype=torch.bool)
    for b, row in enumerate(rows):
        ids[b, width - len(row):] = row
        real[b, width - len(row):] = True
    return ids, real


LENGTHS = [5, 9, 2, 9, 1]  # padding of 4, 0, 7, 0 and 8 positions in a width of 9


@VARIANTS
def test_left_padded_rows_give_the_unpadded_logits(causal: bool) -> None:
    model = make_model(causal)
    rows = rows_of(LENGTHS)
    if not causal:
        rows[0][1] = model.mask_id  # the masked model reads its mask id like any other
    pad_ids = torch.randint(0, VOCAB, (len(rows), 9), generator=torch.Generator().manual_seed(2))
    ids, real = left_padded(rows, 9, pad_ids)
    with torch.no_grad():
        batched = model(ids, key_mask=real)
        unmasked = model(ids)
        for b, row in enumerate(rows):
            alone = model(row[None])[0]  # (n, V)
            start = 9 - len(row)
            assert torch.allclose(batched[b, start:], alone, atol=1e-5), b
            if start > 0:  # without the key mask the padding leaks in: the test can tell the two apart
                assert not torch.allclose(unmasked[b, start:], alone, atol=1e-3), b
    assert torch.isfinite(batched).all()  # padding positions read themselves: no empty softmax, no NaN


@VARIANTS
def test_padding_ids_do_not_change_real_positions(causal: bool) -> None:
    model = make_model(causal)
    rows = rows_of(LENGTHS, seed=3)
    first = torch.randint(0, VOCAB, (len(rows), 9), generator=torch.Generator().manual_seed(4))
    ids_a, real = left_padded(rows, 9, first)
    ids_b, _ = left_padded(rows, 9, (first + 1 + torch.arange(9)) % VOCAB)
    assert not torch.equal(ids_a, ids_b)
    with torch.no_grad():
        a, b = model(ids_a, key_mask=real), model(ids_b, key_mask=real)
    assert torch.allclose(a[real], b[real], atol=1e-5)


@VARIANTS
def test_bad_key_masks_are_refused(causal: bool) -> None:
    model = make_model(causal)
    ids = torch.zeros(2, 5, dtype=torch.long)
    for bad in (torch.ones(2, 4, dtype=torch.bool), torch.ones(5, dtype=torch.bool),
                torch.ones(2, 5, dtype=torch.long), torch.ones(2, 5)):
        with pytest.raises(ValueError, match="key_mask must be bool"):
            model(ids, key_mask=bad)


@VARIANTS
def test_grow_vocab_keeps_old_ids_and_moves_the_mask(causal: bool) -> None:
    model = make_model(causal)
    old_weight = model.embed.weight.detach().clone()  # (V [+ 1], C)
    old_mask = model.mask_id
    ids = rows_of([10], seed=5)[0][None]
    if not causal:
        ids[0, ::3] = old_mask
    with torch.no_grad():
        before = model(ids)
    assert grow_vocab(model, 3) is model
    assert model.vocab_size == VOCAB + 3
    weight = model.embed.weight.detach()
    assert weight.shape == (VOCAB + 3 + int(not causal), TINY["d_model"])
    assert torch.equal(weight[:VOCAB], old_weight[:VOCAB])
    mean = old_weight[:VOCAB].mean(dim=0)
    for row in range(VOCAB, VOCAB + 3):
        assert torch.allclose(weight[row], mean, atol=1e-7)  # new tokens start at the mean embedding
    if causal:
        assert model.mask_id is None
    else:
        assert model.mask_id == VOCAB + 3  # just outside the grown vocabulary
        assert torch.equal(weight[model.mask_id], old_weight[old_mask])
        ids = ids.masked_fill(ids == old_mask, model.mask_id)
    assert model.embed.weight.requires_grad
    with torch.no_grad():
        after = model(ids)
    assert after.shape == (1, 10, VOCAB + 3)
    assert torch.allclose(after[..., :VOCAB], before, atol=1e-6)
    # a new token's logit is the mean embedding's: the mean of the old logits at every position
    assert torch.allclose(after[..., VOCAB], before.mean(dim=-1), atol=1e-5)


def test_grow_vocab_refuses_no_new_tokens() -> None:
    with pytest.raises(ValueError, match="new_tokens=0"):
        grow_vocab(make_model(True), 0)
