"""LM objectives against naive references; the MDM likelihood bound against enumerated exact values."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from pipeline_lib.text.losses import ar_loss, mask_exactly, mdm_corrupt, mdm_loss, mdm_nll_bound
from pipeline_lib.text.models.transformer import TransformerLM

# A toy joint distribution over {0, 1}^3, the mask id 2 outside the vocabulary.
LENGTH, VOCAB, MASK = 3, 2, 2
CONFIGS = torch.tensor(list(itertools.product(range(VOCAB), repeat=LENGTH)))  # (8, 3)
JOINT = torch.tensor([0.30, 0.05, 0.10, 0.15, 0.02, 0.08, 0.20, 0.10], dtype=torch.float64)  # p(CONFIGS[c])


def true_conditionals(noisy: Tensor) -> Tensor:
    """(B, 3) noisy ids -> (B, 3, 2) logits log p(x_i = v | the unmasked tokens) under JOINT, at every position."""
    fits = ((CONFIGS[None] == noisy[:, None]) | (noisy[:, None] == MASK)).all(dim=-1)  # (B, 8) consistent configs
    weight = JOINT[None] * fits  # (B, 8)
    onehot = F.one_hot(CONFIGS, VOCAB).double()  # (8, 3, 2)
    return torch.einsum("bc,civ->biv", weight, onehot).log().float()  # unnormalised: CE normalises


@torch.no_grad()
def exact_bound(model: object, x: Tensor) -> float:
    """E over l ~ U{1..L} and the C(L, l) masks of size l of (L / l) Σ_masked CE, by enumeration."""
    total = 0.0
    for size in range(1, LENGTH + 1):
        subsets = list(itertools.combinations(range(LENGTH), size))
        for subset in subsets:
            noisy = x.clone()
            noisy[list(subset)] = MASK
            ce = F.cross_entropy(model(noisy[None])[0].double(), x, reduction="none")  # (L,)
            total += (LENGTH / size) * float(ce[list(subset)].sum()) / len(subsets) / LENGTH
    return total


@torch.no_grad()
def any_order_nll(model: object, x: Tensor) -> float:
    """-log of the model's any-order likelihood: the mean over the L! orders of the chain rule of its conditionals."""
    likelihoods = []
    for order in itertools.permutations(range(LENGTH)):
        noisy, logp = torch.full_like(x, MASK), 0.0
        for position in order:  # reveal one token at a time, scoring it given the ones revealed before
            logp += float(torch.log_softmax(model(noisy[None])[0, position].double(), dim=-1)[x[position]])
            noisy[position] = x[position]
        likelihoods.append(math.exp(logp))
    return -math.log(sum(likelihoods) / len(likelihoods))


def test_ar_loss_matches_a_loop_and_ignores_positions() -> None:
    generator = torch.Generator().manual_seed(0)
    logits, targets = torch.randn(2, 5, 7, generator=generator), torch.randint(0, 7, (2, 5), generator=generator)
    targets[1, 3] = -100
    kept = [(b, t) for b in range(2) for t in range(5) if targets[b, t] != -100]
    naive = sum(-torch.log_softmax(logits[b, t], dim=0)[targets[b, t]] for b, t in kept) / len(kept)
    assert ar_loss(logits, targets).item() == pytest.approx(naive.item(), rel=1e-6)
    with pytest.raises(ValueError, match="logits must be"):
        ar_loss(logits, targets[:, :4])


def test_mdm_corrupt_masks_with_the_drawn_probability() -> None:
    ids = torch.randint(0, 5, (64, 400), generator=torch.Generator().manual_seed(0))
    noisy, masked, p = mdm_corrupt(ids, mask_id=5, eps=0.05, generator=torch.Generator().manual_seed(1))
    assert masked.dtype == torch.bool and p.shape == (64,)
    assert ((p >= 0.05) & (p <= 1.0)).all()
    assert torch.equal(noisy, torch.where(masked, torch.tensor(5), ids))
    assert (masked.float().mean(dim=1) - p).abs().max() < 0.1  # 400 Bernoulli(p) draws per row
    again = mdm_corrupt(ids, mask_id=5, eps=0.05, generator=torch.Generator().manual_seed(1))
    assert all(torch.equal(a, b) for a, b in zip((noisy, masked, p), again, strict=True))
    with pytest.raises(ValueError, match="mask id 4"):
        mdm_corrupt(ids, mask_id=4, generator=None)
    with pytest.raises(ValueError, match="eps"):
        mdm_corrupt(ids, mask_id=5, eps=0.0, generator=None)


def test_mdm_loss_matches_a_loop_over_a_fixed_mask() -> None:
    generator = torch.Generator().manual_seed(0)
    B, L, V = 3, 6, 5
    ids, logits = torch.randint(0, V, (B, L), generator=generator), torch.randn(B, L, V, generator=generator)
    masked = torch.rand(B, L, generator=generator) < 0.5
    p = torch.tensor([0.2, 0.5, 0.9])
    naive = 0.0
    for b in range(B):
        for i in range(L):
            if masked[b, i]:
                naive += -float(torch.log_softmax(logits[b, i], dim=0)[ids[b, i]]) / float(p[b])
    assert mdm_loss(logits, ids, masked, p).item() == pytest.approx(naive / (B * L), rel=1e-6)


def test_mdm_loss_ignores_unmasked_positions_and_is_finite() -> None:
    generator = torch.Generator().manual_seed(0)
    ids, logits = torch.randint(0, 5, (4, 8), generator=generator), torch.randn(4, 8, 5, generator=generator)
    _, masked, p = mdm_corrupt(ids, mask_id=5, generator=generator)
    masked[0] = False  # a row with nothing masked contributes 0
    changed = torch.where(masked[..., None], logits, 1e4 * torch.randn(4, 8, 5, generator=generator))
    loss = mdm_loss(logits, ids, masked, p)
    assert torch.isfinite(loss) and loss.item() > 0
    assert torch.equal(loss, mdm_loss(changed, ids, masked, p))
    logits.requires_grad_(True)
    mdm_loss(logits, ids, masked, p).backward()
    assert (logits.grad[~masked] == 0).all() and torch.isfinite(logits.grad).all()


def test_mask_exactly_masks_the_requested_count_uniformly() -> None:
    lengths = torch.tensor([0, 1, 3, 5] * 500)
    masked = mask_exactly(lengths, 5, generator=torch.Generator().manual_seed(0), device=torch.device("cpu"))
    assert torch.equal(masked.sum(dim=1), lengths)
    share = masked[lengths == 1].float().mean(dim=0)  # one masked position: each about 1/5 of the time
    assert (share - 0.2).abs().max() < 0.06


def test_bound_is_exact_for_true_conditionals_and_monte_carlo_converges() -> None:
    ids = CONFIGS.repeat_interleave(500, dim=0)  # every sequence 500 times: 4000 draws per sequence
    per_row = mdm_nll_bound(true_conditionals, ids, mask_id=MASK, num_samples=8,
                            generator=torch.Generator().manual_seed(0)).view(8, 500)
    estimate, standard_error = per_row.mean(dim=1), per_row.std(dim=1) / math.sqrt(500)
    for c, x in enumerate(CONFIGS):
        nll, expected = -math.log(JOINT[c]), exact_bound(true_conditionals, x)
        assert expected >= nll - 1e-5  # an upper bound ...
        assert expected == pytest.approx(nll, abs=1e-5)  # ... which is tight for the true conditionals
        assert abs(estimate[c].item() - expected) < 4 * standard_error[c].item()


def test_bound_is_above_the_exact_nll_of_a_random_transformer() -> None:
    torch.manual_seed(0)
    model = TransformerLM(VOCAB, d_model=16, n_layer=2, n_head=2, max_len=LENGTH, causal=False, mask_token=True)
    model.eval()
    with torch.no_grad():
        for layer in model.modules():  # larger weights: conditionals far from uniform and from one joint
            if isinstance(layer, torch.nn.Linear | torch.nn.Embedding):
                layer.weight.normal_(0, 0.5)
        gaps = [exact_bound(model, x) - any_order_nll(model, x) for x in CONFIGS]
        per_row = mdm_nll_bound(model, CONFIGS.repeat(250, 1), mask_id=MASK, num_samples=8,
                                generator=torch.Generator().manual_seed(0)).view(250, 8)
    assert min(gaps) >= -1e-6 and max(gaps) > 1e-3  # a strict upper bound for inconsistent conditionals
    standard_error = per_row.std(dim=0) / math.sqrt(250)
    for x, value, error in zip(CONFIGS, per_row.mean(dim=0), standard_error, strict=True):
        assert abs(value.item() - exact_bound(model, x)) < 4 * error.item()


def test_bound_validates_its_arguments() -> None:
    with pytest.raises(ValueError, match="num_samples"):
        mdm_nll_bound(true_conditionals, CONFIGS, mask_id=MASK, num_samples=0, generator=None)
    with pytest.raises(ValueError, match="mask id"):
        mdm_nll_bound(true_conditionals, CONFIGS, mask_id=1, num_samples=1, generator=None)
