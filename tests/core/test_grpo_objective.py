"""The GRPO objective on hand-computed values, against REINFORCE and the exact expected-reward gradient."""

from __future__ import annotations

import math

import pytest
import torch

from pipeline_lib.core.grpo import expected_reward_loss, group_advantages, grpo_loss, k3_kl


def test_group_advantages_by_hand() -> None:
    rewards = torch.tensor([[1.0, 0.0, 0.0, 1.0], [1.0, 1.0, 1.0, 0.0]])
    # group 0: mean 0.5, sample std sqrt(1/3); group 1: mean 0.75, sample std 0.5
    std0 = math.sqrt(((0.5**2) * 4) / 3)
    expected = torch.tensor([[0.5 / std0, -0.5 / std0, -0.5 / std0, 0.5 / std0], [0.5, 0.5, 0.5, -1.5]])
    assert torch.allclose(group_advantages(rewards, eps=0.0), expected, atol=1e-6)
    unscaled = torch.tensor([[0.5, -0.5, -0.5, 0.5], [0.25, 0.25, 0.25, -0.75]])
    assert torch.allclose(group_advantages(rewards, scale="none"), unscaled)


def test_zero_std_group_gives_zero_advantage_and_a_finite_loss() -> None:
    rewards = torch.tensor([[1.0, 1.0, 1.0], [-1.0, -1.0, -1.0]])
    advantages = group_advantages(rewards)
    assert torch.equal(advantages, torch.zeros_like(rewards))
    logp = torch.log(torch.full((2, 3), 0.3)).requires_grad_()
    out = grpo_loss(logp, logp.detach(), advantages, kl=k3_kl(logp, logp.detach() - 0.1), beta=0.04)
    out["loss"].backward()
    assert torch.isfinite(out["loss"]) and torch.isfinite(logp.grad).all()


def test_k3_is_nonnegative_and_zero_at_the_reference() -> None:
    generator = torch.Generator().manual_seed(0)
    logp = torch.randn(1000, generator=generator)
    ref = torch.randn(1000, generator=generator)
    assert (k3_kl(logp, ref) >= 0).all()
    assert torch.equal(k3_kl(logp, logp), torch.zeros(1000))
    # by hand: ref - logp = log 2 -> 2 - log 2 - 1
    assert k3_kl(torch.tensor(0.0), torch.tensor(math.log(2.0))).item() == pytest.approx(1 - math.log(2.0))


def test_k3_is_unbiased_for_the_kl() -> None:
    policy = torch.tensor([0.7, 0.2, 0.1])
    reference = torch.tensor([0.4, 0.4, 0.2])
    exact = float((policy * (policy / reference).log()).sum())
    samples = torch.multinomial(policy, 200_000, replacement=True, generator=torch.Generator().manual_seed(1))
    estimate = float(k3_kl(policy.log()[samples], reference.log()[samples]).mean())
    assert estimate == pytest.approx(exact, rel=0.02)


@pytest.mark.parametrize(
    ("ratio", "advantage", "expected", "clipped"),
    [
        (1.5, 2.0, -2.4, True),    # positive advantage: the gain is capped at (1 + 0.2) * A
        (0.5, 2.0, -1.0, False),   # ratio fell: unclipped ratio * A is the smaller, it keeps its gradient
        (0.5, -2.0, 1.6, True),    # negative advantage: capped at (1 - 0.2) * A
        (1.5, -2.0, 3.0, False),   # ratio rose on a bad action: the full penalty
        (1.25, 2.0, -2.5, False),  # clip-higher: epsilon_high 0.28 leaves 1.25 inside the range
    ],
)
def test_clipped_objective_by_hand(ratio: float, advantage: float, expected: float, clipped: bool) -> None:
    old = torch.tensor([[math.log(0.2)]])
    logp = (old + math.log(ratio)).requires_grad_()
    epsilon_high = 0.28 if ratio == 1.25 else None
    out = grpo_loss(logp, old, torch.tensor([[advantage]]), epsilon=0.2, epsilon_high=epsilon_high)
    assert out["loss"].item() == pytest.approx(expected, rel=1e-5)
    assert out["clip_ratio"].item() == float(clipped)
    out["loss"].backward()
    assert (logp.grad.abs().item() == 0.0) == clipped  # the clipped branch carries no gradient


def test_kl_penalty_adds_beta_times_k3() -> None:
    logp = torch.log(torch.tensor([[0.5, 0.25]]))
    ref = torch.log(torch.tensor([[0.25, 0.25]]))
    without = grpo_loss(logp, logp, torch.zeros(1, 2), kl=k3_kl(logp, ref), beta=0.0)
    with_kl = grpo_loss(logp, logp, torch.zeros(1, 2), kl=k3_kl(logp, ref), beta=0.5)
    k3 = k3_kl(logp, ref).mean()
    assert without["loss"].item() == pytest.approx(0.0)
    assert with_kl["loss"].item() == pytest.approx(0.5 * k3.item())
    assert with_kl["kl"].item() == pytest.approx(k3.item())


def _sampled(logits: torch.Tensor, group: int, seed: int) -> torch.Tensor:
    """(B, A) logits -> (B, G) actions drawn from the softmax."""
    probs = torch.softmax(logits, dim=1)
    return torch.multinomial(probs, group, replacement=True, generator=torch.Generator().manual_seed(seed))


def test_one_iteration_is_reinforce_with_the_group_mean_baseline() -> None:
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 5, generator=generator, requires_grad=True)
    actions = _sampled(logits.detach(), 6, seed=1)
    rewards = torch.randint(0, 3, actions.shape, generator=generator).float()
    logp = torch.log_softmax(logits, dim=1).gather(1, actions)
    for scale in ("none", "group"):
        advantages = group_advantages(rewards, scale=scale)
        (grpo,) = torch.autograd.grad(grpo_loss(logp, logp.detach(), advantages)["loss"], logits,
                                      retain_graph=True)
        baseline = rewards.mean(dim=1, keepdim=True)
        weight = (rewards - baseline) if scale == "none" else advantages
        reinforce = -(weight * logp).mean()
        (expected,) = torch.autograd.grad(reinforce, logits, retain_graph=True)
        assert torch.allclose(grpo, expected, atol=1e-6), scale


def test_unscaled_gradient_approaches_the_exact_expected_reward_gradient() -> None:
    """E[(r_i - mean_G r) grad log p_i] = (1 - 1/G) grad E[r]: the estimate converges as G grows."""
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 6, generator=generator, requires_grad=True)
    table = torch.randn(4, 6, generator=generator)  # reward of each action for each example
    (exact,) = torch.autograd.grad(expected_reward_loss(torch.log_softmax(logits, 1), table), logits)
    errors = {}
    for group in (4, 64, 4096):
        actions = _sampled(logits.detach(), group, seed=group)
        rewards = table.gather(1, actions)
        logp = torch.log_softmax(logits, dim=1).gather(1, actions)
        loss = grpo_loss(logp, logp.detach(), group_advantages(rewards, scale="none"))["loss"]
        (estimate,) = torch.autograd.grad(loss, logits)
        errors[group] = float((estimate - exact).norm() / exact.norm())
    assert errors[4096] < 0.05
    assert errors[4] > 3 * errors[4096], errors


def test_token_and_sample_aggregation() -> None:
    logp = torch.zeros(1, 2, 3)  # ratio 1 everywhere
    mask = torch.tensor([[[1, 0, 0], [1, 1, 1]]])
    advantages = torch.tensor([[1.0, -1.0]])
    token = grpo_loss(logp, logp, advantages, mask=mask, aggregation="token")["loss"]
    sample = grpo_loss(logp, logp, advantages, mask=mask, aggregation="sample")["loss"]
    assert token.item() == pytest.approx((-1.0 + 3 * 1.0) / 4)  # every token weighs the same
    assert sample.item() == pytest.approx(0.0)  # each completion weighs the same


def test_bad_inputs_name_the_problem() -> None:
    with pytest.raises(ValueError, match="G >= 2"):
        group_advantages(torch.zeros(3, 1))
    with pytest.raises(ValueError, match="kl estimates"):
        grpo_loss(torch.zeros(2, 2), torch.zeros(2, 2), torch.zeros(2, 2), beta=0.1)
    with pytest.raises(ValueError, match="mask"):
        grpo_loss(torch.zeros(2, 2, 3), torch.zeros(2, 2, 3), torch.zeros(2, 2))
    with pytest.raises(ValueError, match="advantages"):
        grpo_loss(torch.zeros(2, 2), torch.zeros(2, 2), torch.zeros(2, 3))
