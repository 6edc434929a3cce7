"""Reward tables, their validation, the Bayes rule, and GRPO learning the abstention threshold on a toy problem."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from pipeline_lib.core.grpo import group_advantages, grpo_loss
from pipeline_lib.vision.rewards import (
    abstain_table,
    accuracy_table,
    bayes_actions,
    cost_table,
    expected_rewards,
    rewards_of,
)


def test_tables_by_hand() -> None:
    assert np.array_equal(accuracy_table(3), np.eye(3))
    table = abstain_table(2, correct=1.0, wrong=-2.0, abstain=0.5)
    assert table.tolist() == [[1.0, -2.0], [-2.0, 1.0], [0.5, 0.5]]  # rows: class 0, class 1, abstain
    cost = [[0.0, 5.0], [1.0, 0.0]]  # true 0 predicted 1 costs 5; true 1 predicted 0 costs 1
    assert cost_table(cost, 2).tolist() == [[0.0, -1.0], [-5.0, 0.0]]  # R[predicted, true]


def test_rewards_are_table_lookups_of_action_and_label() -> None:
    table = torch.tensor(abstain_table(3, wrong=-1.0, abstain=0.0), dtype=torch.float32)
    actions = torch.tensor([[0, 1, 3], [2, 2, 0]])
    labels = torch.tensor([0, 2])
    assert rewards_of(table, actions, labels).tolist() == [[1.0, -1.0, 0.0], [1.0, 1.0, -1.0]]


def test_bayes_rule_is_a_confidence_threshold_for_abstain() -> None:
    wrong, abstain = -3.0, 0.0  # lambda 3: answer when max p >= (0 + 3) / (1 + 3) = 0.75
    table = torch.tensor(abstain_table(2, wrong=wrong, abstain=abstain), dtype=torch.float32)
    confidence = torch.tensor([0.5, 0.7, 0.74, 0.76, 0.9, 1.0])
    probabilities = torch.stack([confidence, 1 - confidence], dim=1)
    assert bayes_actions(probabilities, table).tolist() == [2, 2, 2, 0, 0, 0]
    assert torch.allclose(expected_rewards(probabilities, table)[:, 0], confidence - 3 * (1 - confidence))


def test_cost_matrix_moves_decisions_towards_cheap_mistakes() -> None:
    table = torch.tensor(cost_table([[0.0, 10.0], [1.0, 0.0]], 2), dtype=torch.float32)
    probabilities = torch.tensor([[0.2, 0.8]])  # class 1 likely, but calling a true 0 a 1 costs 10
    assert bayes_actions(probabilities, table).tolist() == [0]


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: abstain_table(3, correct=1.0, abstain=1.5), r"reward.abstain=1.5: must not exceed reward.correct"),
        (lambda: abstain_table(3, correct=1.0, wrong=1.0), r"reward.wrong=1.0: must be below"),
        (lambda: abstain_table(3, wrong=math.nan), r"reward.wrong=nan: must be a finite number"),
        (lambda: cost_table([[0, 1], [1, 0]], 3), r"reward.cost_matrix: shape \(2, 2\), expected 3 x 3"),
        (lambda: cost_table([[0, math.nan], [1, 0]], 2), r"reward.cost_matrix\[0\]\[1\]=nan"),
        (lambda: cost_table([[0, "x"], [1, 0]], 2), r"reward.cost_matrix: must be a 2 x 2 matrix of numbers"),
        (lambda: accuracy_table(1), r"at least 2 classes"),
    ],
)
def test_bad_rewards_are_clear_errors(call, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        call()


# With std scaling, a group's advantages are about +-1 whatever the size of its reward gap: a right answer
# (+1 over abstaining) and a wrong one (-3) push equally hard, as if lambda were 1, so the policy learns the
# threshold of the sign of the reward, (0 + 1) / (1 + 1) = 0.5, not the declared 0.75. Unscaled advantages
# (Dr. GRPO) keep the declared trade-off.
@pytest.mark.parametrize(("scale", "threshold"), [("none", 0.75), ("group", 0.5)])
def test_grpo_learns_the_abstain_threshold(scale: str, threshold: float) -> None:
    """Two classes, one input per confidence level q = P(y = 0): a tabular policy over {0, 1, abstain}
    trained by GRPO on sampled labels answers 0 where q >= (abstain + lambda) / (1 + lambda) and abstains below."""
    wrong, abstain = -3.0, 0.0
    assert (abstain - wrong) / (1 - wrong) == 0.75
    table = torch.tensor(abstain_table(2, wrong=wrong, abstain=abstain), dtype=torch.float32)
    confidence = torch.linspace(0.5, 1.0, 11)
    logits = torch.zeros(len(confidence), 3, requires_grad=True)
    optimizer = torch.optim.Adam([logits], lr=0.05)
    generator = torch.Generator().manual_seed(0)
    copies, group = 16, 16
    rows = torch.arange(len(confidence)).repeat_interleave(copies)
    for _ in range(400):
        labels = (torch.rand(len(rows), generator=generator) >= confidence[rows]).long()  # y = 0 with prob. q
        log_probs = torch.log_softmax(logits[rows], dim=1)
        actions = torch.multinomial(log_probs.detach().exp(), group, replacement=True, generator=generator)
        advantages = group_advantages(rewards_of(table, actions, labels), scale=scale)
        logp = log_probs.gather(1, actions)
        loss = grpo_loss(logp, logp.detach(), advantages)["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    greedy = logits.detach().argmax(dim=1)
    bayes = torch.where(confidence >= threshold, 0, 2)
    clear = (confidence - threshold).abs() >= 0.1 - 1e-6
    assert torch.equal(greedy[clear], bayes[clear]), (greedy.tolist(), bayes.tolist())
    answered = confidence[greedy == 0]
    assert abs(float(answered.min()) - threshold) <= 0.1, greedy.tolist()
    assert not (greedy == 1).any()  # never the unlikely class
