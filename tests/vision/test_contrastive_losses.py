"""Contrastive losses against naive reference implementations, closed forms and a two-process run."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.distributed as torch_dist
import torch.multiprocessing as mp

from pipeline_lib.vision.losses import (
    CONTRASTIVE_LOSSES,
    margin_contrastive,
    margin_contrastive_views,
    mocov3_loss,
    nt_xent,
)


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.dot(a, b) / (a.norm() * b.norm()))


def naive_nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> float:
    """Per anchor i of the 2B embeddings: -log(exp(s_pos / T) / sum_{k != i} exp(s_ik / T)), averaged."""
    embeddings = list(z1) + list(z2)
    n, batch = len(embeddings), len(z1)
    total = 0.0
    for i in range(n):
        positive = (i + batch) % n
        denominator = sum(math.exp(_cosine(embeddings[i], embeddings[k]) / temperature) for k in range(n) if k != i)
        total += -math.log(math.exp(_cosine(embeddings[i], embeddings[positive]) / temperature) / denominator)
    return total / n


def naive_mocov3(q1: torch.Tensor, q2: torch.Tensor, k1: torch.Tensor, k2: torch.Tensor, temperature: float) -> float:
    def ctr(q: torch.Tensor, k: torch.Tensor) -> float:
        total = 0.0
        for i in range(len(q)):
            logits = [_cosine(q[i], k[j]) / temperature for j in range(len(k))]
            total += -(logits[i] - math.log(sum(math.exp(x) for x in logits)))
        return total / len(q) * 2 * temperature

    return ctr(q1, k2) + ctr(q2, k1)


def naive_margin_pairs(x1: torch.Tensor, x2: torch.Tensor, same: list[int], margin: float) -> float:
    total = 0.0
    for a, b, y in zip(x1, x2, same, strict=True):
        d = float((a - b).norm())
        total += y * d**2 + (1 - y) * max(margin - d, 0.0) ** 2
    return total / (2 * len(same))


def _random_pair(batch: int = 6, dim: int = 5, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, dim, generator=generator), torch.randn(batch, dim, generator=generator)


# --- NT-Xent ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("temperature", [0.05, 0.1, 0.5, 2.0])
def test_nt_xent_matches_naive(temperature: float) -> None:
    for seed in range(3):
        z1, z2 = _random_pair(seed=seed)
        expected = naive_nt_xent(z1, z2, temperature)
        torch.testing.assert_close(nt_xent(z1, z2, temperature=temperature), torch.tensor(expected), rtol=1e-5,
                                   atol=1e-5)


def test_nt_xent_ignores_embedding_scale() -> None:
    z1, z2 = _random_pair()
    scales = torch.rand(len(z1), 1) * 10 + 0.1
    torch.testing.assert_close(nt_xent(z1 * scales, z2 * 3.0), nt_xent(z1, z2))


def test_nt_xent_closed_forms() -> None:
    batch, temperature = 4, 0.3
    # Collapse: every logit is equal, so each anchor's loss is log of the 2B - 1 candidates.
    collapsed = torch.ones(batch, 8)
    torch.testing.assert_close(nt_xent(collapsed, collapsed, temperature=temperature),
                               torch.tensor(math.log(2 * batch - 1)))
    # Views agree, images orthogonal: positive logit 1/T, the 2B - 2 negatives 0.
    views = torch.eye(batch, 8)
    expected = math.log(1 + (2 * batch - 2) * math.exp(-1 / temperature))
    torch.testing.assert_close(nt_xent(views, views.clone(), temperature=temperature), torch.tensor(expected))


def test_nt_xent_gradient_reaches_both_views() -> None:
    z1, z2 = (z.requires_grad_() for z in _random_pair())
    nt_xent(z1, z2, temperature=0.2).backward()
    for z in (z1, z2):
        assert z.grad is not None and torch.isfinite(z.grad).all() and z.grad.abs().sum() > 0


def test_infonce_losses_stay_in_float32_under_autocast() -> None:
    z1, z2 = _random_pair(batch=16, dim=32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        simclr, moco = nt_xent(z1, z2, temperature=0.05), mocov3_loss(z1, z2, z2, z1, temperature=0.05)
    assert simclr.dtype == moco.dtype == torch.float32
    torch.testing.assert_close(simclr, nt_xent(z1, z2, temperature=0.05))
    torch.testing.assert_close(moco, mocov3_loss(z1, z2, z2, z1, temperature=0.05))


def test_nt_xent_rejects_bad_inputs() -> None:
    z1, z2 = _random_pair()
    with pytest.raises(ValueError, match="same shape"):
        nt_xent(z1, z2[:-1])
    with pytest.raises(ValueError, match=r"\(B, D\)"):
        nt_xent(z1.flatten(), z2.flatten())
    with pytest.raises(ValueError, match="temperature"):
        nt_xent(z1, z2, temperature=0.0)


# --- margin ----------------------------------------------------------------------------------------------------


def test_margin_contrastive_hand_computed() -> None:
    x1 = torch.tensor([[0.0, 0.0], [1.0, 1.0], [0.0, 0.0]])
    x2 = torch.tensor([[3.0, 4.0], [1.0, 1.0], [0.6, 0.8]])
    same = torch.tensor([1, 0, 0])
    # similar at d=5: 25; dissimilar at d=0: (2 - 0)² = 4; dissimilar at d=1: (2 - 1)² = 1; (25 + 4 + 1) / 6
    torch.testing.assert_close(margin_contrastive(x1, x2, same, margin=2.0), torch.tensor(5.0))
    torch.testing.assert_close(margin_contrastive(x1, x2, same.bool(), margin=2.0), torch.tensor(5.0))


def test_margin_contrastive_matches_naive_on_random_pairs() -> None:
    x1, x2 = _random_pair(batch=10, seed=3)
    same = torch.randint(0, 2, (10,), generator=torch.Generator().manual_seed(1))
    expected = naive_margin_pairs(x1, x2, same.tolist(), margin=3.0)
    torch.testing.assert_close(margin_contrastive(x1, x2, same, margin=3.0), torch.tensor(expected))


def test_margin_views_is_zero_when_views_agree_and_images_are_far() -> None:
    points = torch.tensor([[0.0, 0.0], [3.0, 0.0], [0.0, 3.0]])
    assert margin_contrastive_views(points, points.clone(), margin=1.0, normalize=False) == 0
    unit = torch.tensor([[1.0, 0.0], [-1.0, 0.0]])  # 2 apart on the unit circle
    assert margin_contrastive_views(unit * 5, unit, margin=1.0) == 0


@pytest.mark.parametrize("normalize", [True, False])
def test_margin_views_matches_all_pairs_naive(normalize: bool) -> None:
    z1, z2 = _random_pair(batch=5, seed=4)
    a, b = (torch.nn.functional.normalize(z, dim=1) for z in (z1, z2)) if normalize else (z1, z2)
    pairs = [(i, j) for i in range(5) for j in range(5)]
    expected = naive_margin_pairs(a[[i for i, _ in pairs]], b[[j for _, j in pairs]], [int(i == j) for i, j in pairs],
                                  margin=1.5)
    torch.testing.assert_close(margin_contrastive_views(z1, z2, margin=1.5, normalize=normalize),
                               torch.tensor(expected))


def test_margin_gradient_is_finite_for_coinciding_negatives() -> None:
    x1 = torch.zeros(2, 3, requires_grad=True)
    x2 = torch.zeros(2, 3, requires_grad=True)
    margin_contrastive(x1, x2, torch.tensor([0, 1]), margin=1.0).backward()
    assert torch.isfinite(x1.grad).all() and torch.isfinite(x2.grad).all()


def test_margin_rejects_bad_inputs() -> None:
    x1, x2 = _random_pair()
    with pytest.raises(ValueError, match="same must have shape"):
        margin_contrastive(x1, x2, torch.ones(3))
    with pytest.raises(ValueError, match="margin"):
        margin_contrastive(x1, x2, torch.ones(len(x1)), margin=-1.0)


# --- MoCo v3 ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("temperature", [0.1, 0.2, 1.0])
def test_mocov3_matches_naive(temperature: float) -> None:
    generator = torch.Generator().manual_seed(5)
    q1, q2, k1, k2 = (torch.randn(6, 4, generator=generator) for _ in range(4))
    expected = naive_mocov3(q1, q2, k1, k2, temperature)
    torch.testing.assert_close(mocov3_loss(q1, q2, k1, k2, temperature=temperature), torch.tensor(expected),
                               rtol=1e-5, atol=1e-5)


def test_mocov3_gradient_reaches_queries_only() -> None:
    q1, q2, k1, k2 = (torch.randn(6, 4).requires_grad_() for _ in range(4))
    mocov3_loss(q1, q2, k1, k2).backward()
    assert q1.grad is not None and q2.grad is not None and q1.grad.abs().sum() > 0
    assert k1.grad is None and k2.grad is None


def test_mocov3_rejects_bad_inputs() -> None:
    q = torch.randn(4, 3)
    with pytest.raises(ValueError, match="same shape"):
        mocov3_loss(q, q, q, torch.randn(4, 2))
    with pytest.raises(ValueError, match="temperature"):
        mocov3_loss(q, q, q, q, temperature=-0.1)


def test_registry_takes_the_trainer_keywords() -> None:
    z1, z2 = _random_pair()
    assert set(CONTRASTIVE_LOSSES) == {"nt_xent", "margin"}
    assert torch.isfinite(CONTRASTIVE_LOSSES["nt_xent"](z1, z2, temperature=0.2))
    assert torch.isfinite(CONTRASTIVE_LOSSES["margin"](z1, z2, margin=1.0))


# --- two processes equal one ------------------------------------------------------------------------------------

WORLD, LOCAL_BATCH = 2, 3


def _global_inputs() -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(7)
    return [torch.randn(WORLD * LOCAL_BATCH, 5, generator=generator) for _ in range(4)]


def _distributed_worker(rank: int, init_file: str, out_dir: str) -> None:
    torch_dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        rows = slice(rank * LOCAL_BATCH, (rank + 1) * LOCAL_BATCH)
        a, b, c, d = (x[rows].clone().requires_grad_() for x in _global_inputs())
        simclr = nt_xent(a, b, temperature=0.3)
        simclr.backward()
        moco = mocov3_loss(a, b, c, d, temperature=0.3)
        torch.save({"nt_xent": simclr.detach(), "grad": a.grad.clone(), "mocov3": moco.detach()},
                   Path(out_dir) / f"rank{rank}.pt")
    finally:
        torch_dist.destroy_process_group()


def test_two_processes_equal_one_on_the_global_batch(tmp_path: Path) -> None:
    mp.spawn(_distributed_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]
    a, b, c, d = _global_inputs()
    a.requires_grad_()
    single = nt_xent(a, b, temperature=0.3)
    single.backward()
    torch.testing.assert_close(torch.stack([r["nt_xent"] for r in ranks]).mean(), single.detach())
    torch.testing.assert_close(torch.stack([r["mocov3"] for r in ranks]).mean(),
                               mocov3_loss(a.detach(), b, c, d, temperature=0.3))
    # Each rank's gradient sums every rank's loss (all_gather's backward); DDP's averaging divides by W.
    torch.testing.assert_close(torch.cat([r["grad"] for r in ranks]) / WORLD, a.grad)
