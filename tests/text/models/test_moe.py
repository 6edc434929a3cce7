"""DeepSeek-V3 mixture of experts: routing, bias-only selection, group limiting, balancing, DDP load counts."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline_lib.core.tracking import Tracker
from pipeline_lib.params import params_from_dict
from pipeline_lib.text.config import TextMoEParams
from pipeline_lib.text.models.moe import ExpertBalancer, MoE, sequence_balance_loss
from pipeline_lib.text.models.transformer import SwiGLU, TransformerLM
from pipeline_lib.text.pretrain import LMTrainer, build_lm

pytestmark = pytest.mark.usefixtures("one_thread")

D = 16


def _moe(seed: int = 0, **spec: object) -> MoE:
    torch.manual_seed(seed)
    return MoE(D, TextMoEParams(enabled=True, **{"routed_experts": 8, "top_k": 2, **spec}), SwiGLU, hidden=8,
               dropout=0.0)


def _naive(moe: MoE, x: torch.Tensor, chosen: torch.Tensor) -> torch.Tensor:
    """Shared experts plus, per token, the chosen experts weighted by their normalised unbiased affinities."""
    flat = x.reshape(-1, D)
    scores = torch.sigmoid(moe.router(flat))
    rows = []
    for t in range(len(flat)):
        weights = scores[t, chosen[t]] / scores[t, chosen[t]].sum() * moe.spec.route_scale
        rows.append(sum(w * moe.experts[int(e)](flat[t : t + 1])[0] for w, e in zip(weights, chosen[t], strict=True)))
    out = torch.stack(rows)
    if moe.shared is not None:
        out = out + moe.shared(flat)
    return out.view_as(x)


@torch.no_grad()
def test_output_is_the_weighted_sum_of_the_chosen_experts() -> None:
    moe = _moe(route_scale=2.5)
    x = torch.randn(2, 5, D)
    _, chosen, _ = moe.route(x.reshape(-1, D))
    torch.testing.assert_close(moe(x), _naive(moe, x, chosen))


@torch.no_grad()
def test_bias_changes_the_selection_never_the_weights() -> None:
    moe = _moe()
    x = torch.randn(3, 7, D)
    flat = x.reshape(-1, D)
    weights, chosen, scores = moe.route(flat)
    moe.expert_bias.copy_(torch.tensor([5.0, 5.0, 0, 0, 0, 0, 0, 0]))  # experts 0 and 1 win every token
    biased_weights, biased_chosen, biased_scores = moe.route(flat)
    assert not torch.equal(biased_chosen, chosen)
    assert (biased_chosen.sort(dim=-1).values == torch.tensor([0, 1])).all()
    torch.testing.assert_close(biased_scores, scores)  # the affinities themselves ignore the bias
    expected = scores.gather(1, biased_chosen)
    torch.testing.assert_close(biased_weights, expected / expected.sum(dim=-1, keepdim=True))
    torch.testing.assert_close(moe(x), _naive(moe, x, biased_chosen))
    # A bias that moves every expert alike selects the same experts, with the same output.
    moe.expert_bias.fill_(0.3)
    torch.testing.assert_close(moe.route(flat)[0], weights)
    assert torch.equal(moe.route(flat)[1], chosen)


@torch.no_grad()
def test_group_limiting_never_selects_outside_the_kept_groups() -> None:
    moe = _moe(groups=4, topk_groups=2, top_k=3)
    moe.expert_bias.copy_(torch.randn(8) * 0.1)
    flat = torch.randn(64, D)
    _, chosen, scores = moe.route(flat)
    biased = (scores + moe.expert_bias).view(64, 4, 2)
    group_scores = biased.sum(dim=-1)  # two experts per group: the top-2 sum is the sum
    kept = group_scores.topk(2, dim=-1).indices  # (N, 2)
    groups_of_chosen = chosen // 2
    assert (groups_of_chosen[..., None] == kept[:, None, :]).any(dim=-1).all()
    # Without the limit, some token would have picked an expert outside its kept groups.
    free = (scores + moe.expert_bias).topk(3, dim=-1).indices
    assert not ((free // 2)[..., None] == kept[:, None, :]).any(dim=-1).all()


def test_sequence_balance_loss_matches_the_formula() -> None:
    generator = torch.Generator().manual_seed(0)
    scores = torch.rand(2, 6, 4, generator=generator)
    chosen = torch.stack([torch.randperm(4, generator=generator)[:2] for _ in range(12)]).view(2, 6, 2)
    expected = []
    for b in range(2):
        f = torch.tensor([(chosen[b] == i).sum().item() * 4 / (2 * 6) for i in range(4)])
        p = (scores[b] / scores[b].sum(dim=-1, keepdim=True)).mean(dim=0)
        expected.append((f * p).sum())
    torch.testing.assert_close(sequence_balance_loss(scores, chosen), torch.stack(expected).mean())
    even = torch.tensor([[[0, 1], [2, 3]]])  # every expert chosen once, equal affinities: 1
    torch.testing.assert_close(sequence_balance_loss(torch.ones(1, 2, 4), even), torch.tensor(1.0))


def test_every_parameter_gets_a_gradient_even_an_unchosen_expert() -> None:
    moe = _moe(shared_experts=1)
    moe.expert_bias.copy_(torch.tensor([9.0, 9.0, 0, 0, 0, 0, 0, 0]))  # experts 2..7 get no token
    moe(torch.randn(2, 4, D)).sum().backward()
    for name, parameter in moe.named_parameters():
        assert parameter.grad is not None, name
    assert moe.experts[5].down.weight.grad.abs().sum() == 0
    assert moe.experts[0].down.weight.grad.abs().sum() > 0


def test_load_is_counted_only_in_passes_that_build_a_graph() -> None:
    moe = _moe()
    x = torch.randn(2, 5, D)
    with torch.no_grad():
        moe(x)
    assert moe.load is None
    moe(x)
    moe(x)
    assert moe.load.sum().item() == 2 * 10 * 2  # two passes of 10 tokens, two experts each


def _skewed_violations(gamma: float, steps: int = 60) -> list[float]:
    """Max violation per step of a router skewed toward two experts, the bias moved by `gamma` after each."""
    moe = _moe(seed=1, bias_update_speed=gamma)
    with torch.no_grad():
        moe.router.weight[:2] += 2.0 * torch.ones(D) / D**0.5  # experts 0 and 1 favour every positive token
    balancer = ExpertBalancer(moe)
    generator = torch.Generator().manual_seed(0)
    violations = []
    for _ in range(steps):
        moe(torch.randn(4, 16, D, generator=generator).abs())
        violations.append(balancer.after_step()["moe.max_violation"].item())
    return violations


def test_bias_update_drives_the_load_toward_the_mean() -> None:
    balanced = _skewed_violations(gamma=0.05)
    frozen = _skewed_violations(gamma=0.0)
    assert balanced[0] == frozen[0] > 2.0  # the skewed start: two experts take most tokens
    assert np.mean(balanced[-10:]) < 0.5 * balanced[0]
    assert np.mean(frozen[-10:]) > 0.9 * frozen[0]  # no update, no balance


def test_balancer_moves_the_bias_by_gamma_toward_the_mean() -> None:
    moe = _moe(bias_update_speed=0.01)
    moe.load = torch.tensor([10.0, 0, 2, 2, 2, 2, 2, 4])  # mean 3
    metrics = ExpertBalancer(moe).after_step()
    torch.testing.assert_close(moe.expert_bias, torch.tensor([-0.01, 0.01, 0.01, 0.01, 0.01, 0.01, 0.01, -0.01]))
    assert moe.load is None
    assert metrics["moe.max_violation"].item() == pytest.approx(10 / 3 - 1)
    assert sum(metrics[f"moe.load.e{i}"].item() for i in range(8)) == pytest.approx(1.0)


def test_model_without_experts_has_an_empty_balancer() -> None:
    model = TransformerLM(10, d_model=D, n_layer=1, n_head=2, max_len=8, causal=True)
    balancer = ExpertBalancer(model)
    assert balancer.loss_terms() == {} and balancer.after_step() == {}


def test_dense_layers_stay_dense() -> None:
    spec = TextMoEParams(enabled=True, dense_layers=1)
    model = TransformerLM(10, d_model=D, n_layer=3, n_head=2, max_len=8, causal=True, moe=spec)
    assert [isinstance(block.mlp, MoE) for block in model.blocks] == [False, True, True]
    assert [prefix for prefix, _ in ExpertBalancer(model).layers] == ["moe.layer1.", "moe.layer2."]


# --- training through the base trainer -------------------------------------------------------


def _params(**moe: object):
    return params_from_dict({
        "device": "cpu",
        "text_model": {"d_model": D, "n_layer": 2, "n_head": 2, "seq_len": 8,
                       "moe": {"enabled": True, "routed_experts": 4, "top_k": 2, "bias_update_speed": 0.01, **moe}},
        "text_pretrain": {"epochs": 1, "batch_size": 4, "warmup_epochs": 0.0, "log_every": 1, "checkpoint_every": 4},
    })


@pytest.mark.parametrize("alpha", [0.0, 1.0e-2])
def test_trainer_balances_and_logs_each_expert(tmp_path: Path, alpha: float) -> None:
    params = _params(balance_loss_alpha=alpha)
    windows = np.random.default_rng(0).integers(0, 12, size=(16, 9))
    torch.manual_seed(0)
    trainer = LMTrainer(build_lm(12, params, "ar"), params.text_pretrain, windows, objective="ar",
                        mdm_eps=1e-3, device=torch.device("cpu"), seed=0, checkpoint_dir=tmp_path, tracker=Tracker(),
                        fingerprint="f")
    trainer.fit()
    first = trainer.history[0]
    for layer in (0, 1):
        shares = [first[f"moe.layer{layer}.load.e{i}"] for i in range(4)]
        assert sum(shares) == pytest.approx(1.0)
        assert first[f"moe.layer{layer}.max_violation"] == pytest.approx(max(shares) / 0.25 - 1, abs=1e-5)
    assert ("balance_loss" in first) == (alpha > 0)
    bias = trainer.model.blocks[0].mlp.expert_bias
    assert bias.abs().sum() > 0  # moved in steps of 0.01
    assert torch.allclose(bias / 0.01, (bias / 0.01).round(), atol=1e-4)
