"""The text transformer: shapes, causality, RoPE's relative positions, init, gradients, and a training step."""

from __future__ import annotations

import math

import pytest
import torch

from pipeline_lib.text.losses import ar_loss, mdm_corrupt, mdm_loss
from pipeline_lib.text.models.transformer import RotaryEmbedding, TransformerLM, apply_rotary, swiglu_hidden

VOCAB = 11
VARIANTS = pytest.mark.parametrize("causal, mask_token", [(True, False), (False, True), (False, False)],
                                   ids=["ar", "mdm", "bidirectional"])


def make_model(causal: bool, mask_token: bool = False, **options: object) -> TransformerLM:
    torch.manual_seed(0)
    config = {"d_model": 32, "n_layer": 2, "n_head": 4, "max_len": 16, **options}
    return TransformerLM(VOCAB, causal=causal, mask_token=mask_token, **config)


def token_batch(batch: int = 3, length: int = 10, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


@VARIANTS
def test_logits_have_one_column_per_vocabulary_token(causal: bool, mask_token: bool) -> None:
    model = make_model(causal, mask_token)
    ids = token_batch()
    if mask_token:
        ids[:, ::3] = model.mask_id
    logits = model(ids)
    assert logits.shape == (3, 10, VOCAB)  # never a column for the mask id
    assert torch.isfinite(logits).all()
    assert model.mask_id == (VOCAB if mask_token else None)
    assert model.embed.num_embeddings == VOCAB + int(mask_token)


def test_causal_model_does_not_see_the_future() -> None:
    model = make_model(causal=True).eval()
    ids = token_batch()
    changed = ids.clone()
    changed[:, 6] = (changed[:, 6] + 1) % VOCAB
    before, after = model(ids), model(changed)
    assert torch.equal(before[:, :6], after[:, :6])
    assert not torch.allclose(before[:, 6:], after[:, 6:])


def test_bidirectional_model_sees_the_future() -> None:
    model = make_model(causal=False, mask_token=True).eval()
    ids = token_batch()
    changed = ids.clone()
    changed[:, 6] = model.mask_id
    before, after = model(ids), model(changed)
    assert (before[:, :6] - after[:, :6]).abs().amax(dim=-1).gt(1e-6).all()  # every earlier position changes


def test_rope_scores_depend_only_on_relative_position() -> None:
    head_dim, max_len = 16, 64
    rotary = RotaryEmbedding(head_dim, max_len)
    generator = torch.Generator().manual_seed(0)
    q, k = torch.randn(head_dim, generator=generator), torch.randn(head_dim, generator=generator)

    def score(i: int, j: int) -> float:
        cos, sin = rotary(torch.tensor([i, j]))  # (2, hs/2) each
        x = torch.stack([q, k]).view(1, 1, 2, head_dim)  # q at position i, k at position j
        rq, rk = apply_rotary(x, cos, sin)[0, 0]
        return float(rq @ rk)

    for i, j in [(0, 3), (5, 1), (7, 7), (2, 40)]:
        reference = score(i, j)
        for shift in (1, 9, 20):
            assert score(i + shift, j + shift) == pytest.approx(reference, abs=1e-4)
    assert score(0, 3) != pytest.approx(score(0, 4), abs=1e-3)  # but it does depend on the offset
    rotated = apply_rotary(q.view(1, 1, 1, head_dim), *rotary(torch.tensor([13])))
    assert rotated.norm() == pytest.approx(q.norm().item(), rel=1e-5)  # rotations keep the norm
    assert not rotary.state_dict()  # tables are derived, not checkpointed


def test_swiglu_width_and_parameter_count() -> None:
    assert [swiglu_hidden(d) for d in (32, 64, 384)] == [88, 176, 1024]
    model = make_model(causal=True)
    d, hidden = 32, swiglu_hidden(32)
    per_block = 4 * d * d + 3 * d * hidden + 2 * d  # qkv + proj, gate/up/down, two RMSNorm weights
    assert model.num_params(non_embedding=True) == 2 * per_block + d  # + final norm
    assert model.num_params(non_embedding=False) == model.num_params(non_embedding=True) + VOCAB * d


def test_init_scales_the_residual_projections() -> None:
    model = make_model(causal=True, d_model=256, n_layer=8, n_head=4)
    block = model.blocks[0]
    assert block.attn.qkv.weight.std().item() == pytest.approx(0.02, rel=0.05)
    for projection in (block.attn.proj, block.mlp.down):
        assert projection.weight.std().item() == pytest.approx(0.02 / math.sqrt(16), rel=0.05)


def test_too_long_input_and_bad_shapes_are_rejected() -> None:
    model = make_model(causal=True)
    with pytest.raises(ValueError, match="max_len=16"):
        model(torch.zeros(1, 17, dtype=torch.long))
    with pytest.raises(ValueError, match="n_head=3"):
        TransformerLM(VOCAB, d_model=32, n_layer=1, n_head=3, max_len=8, causal=True)


@VARIANTS
def test_every_parameter_gets_a_gradient(causal: bool, mask_token: bool) -> None:
    model = make_model(causal, mask_token, dropout=0.1).train()
    ids = token_batch()
    if mask_token:
        ids[:, 1::2] = model.mask_id  # the mask row is an input embedding: it needs mask ids in the batch
    model(ids).square().mean().backward()
    for name, param in model.named_parameters():
        assert param.grad is not None, name
        assert torch.isfinite(param.grad).all() and param.grad.abs().sum() > 0, name


@pytest.mark.parametrize("objective", ["ar", "mdm"])
def test_two_optimizer_steps_change_every_parameter(objective: str) -> None:
    model = make_model(causal=objective == "ar", mask_token=objective == "mdm")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    before = {name: param.detach().clone() for name, param in model.named_parameters()}
    ids, generator = token_batch(batch=4, length=12), torch.Generator().manual_seed(0)
    losses = []
    for _ in range(2):
        if objective == "ar":
            loss = ar_loss(model(ids[:, :-1]), ids[:, 1:])
        else:
            noisy, masked, p = mdm_corrupt(ids, mask_id=model.mask_id, generator=generator)
            noisy[0, 0] = model.mask_id  # make sure the mask row is read
            masked[0, 0] = True
            loss = mdm_loss(model(noisy), ids, masked, p)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert all(math.isfinite(value) for value in losses)
    for name, param in model.named_parameters():
        assert not torch.equal(param, before[name]), name
