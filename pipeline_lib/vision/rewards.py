"""Rewards of a classifier's decisions as a table R[action, label], and the decisions it implies.

A reward is a pure function of the action and the true label, so a finite action set makes it a table:
R has one row per action (the classes, then `abstain` when the reward declares it) and one column per class.

- `accuracy`: 1 for the right class, 0 otherwise.
- `cost_matrix`: minus the cost of predicting class a when the truth is y; `cost[y][a]`, rows are the true
  class as in a confusion matrix.
- `abstain`: `correct` for the right class, `wrong` for another, `abstain` for the extra action. With
  correct = 1, wrong = -lambda and abstain = r, the Bayes rule answers the most likely class when its
  probability is at least (r + lambda) / (1 + lambda) and abstains otherwise.

`bayes_actions` is the decision that maximises expected reward under given class probabilities; the
RL stage reports it on the reference model as the baseline RL has to beat.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from torch import Tensor


def accuracy_table(num_classes: int) -> np.ndarray:
    """(C, C) identity: 1 for the right class."""
    if num_classes < 2:
        raise ValueError(f"a classifier needs at least 2 classes, got {num_classes}")
    return np.eye(num_classes)


def abstain_table(num_classes: int, *, correct: float = 1.0, wrong: float = -1.0, abstain: float = 0.0) -> np.ndarray:
    """(C + 1, C): `correct` on the diagonal, `wrong` elsewhere, a last row of `abstain`.

    Raises ValueError (naming the key) for non-finite rewards, `wrong` >= `correct`, or `abstain` above
    `correct` (abstaining would beat knowing the answer).
    """
    values = {"correct": correct, "wrong": wrong, "abstain": abstain}
    for name, value in values.items():
        if not math.isfinite(value):
            raise ValueError(f"reward.{name}={value}: must be a finite number")
    if not wrong < correct:
        raise ValueError(f"reward.wrong={wrong}: must be below reward.correct={correct}")
    if abstain > correct:
        raise ValueError(f"reward.abstain={abstain}: must not exceed reward.correct={correct} (abstaining would "
                         "pay more than a right answer)")
    table = np.full((num_classes + 1, num_classes), float(wrong))
    np.fill_diagonal(table[:num_classes], float(correct))
    table[num_classes] = float(abstain)
    return table


def cost_table(cost: Sequence[Sequence[float]] | np.ndarray, num_classes: int) -> np.ndarray:
    """(C, C) rewards from a cost matrix `cost[true][predicted]`: R[a, y] = -cost[y][a].

    Raises ValueError for a matrix that is not C x C or holds a non-finite value.
    """
    try:
        matrix = np.asarray(cost, dtype=np.float64)
    except (TypeError, ValueError) as err:
        raise ValueError(f"reward.cost_matrix: must be a {num_classes} x {num_classes} matrix of numbers") from err
    if matrix.shape != (num_classes, num_classes):
        raise ValueError(f"reward.cost_matrix: shape {matrix.shape}, expected {num_classes} x {num_classes} "
                         "(rows: true class, columns: predicted class)")
    bad = np.argwhere(~np.isfinite(matrix))
    if len(bad):
        row, column = bad[0]
        raise ValueError(f"reward.cost_matrix[{row}][{column}]={matrix[row, column]}: must be a finite number")
    return -matrix.T


def rewards_of(table: Tensor, actions: Tensor, labels: Tensor) -> Tensor:
    """R[action, label] for actions (B, G) and labels (B,): the (B, G) rewards of sampled decisions."""
    return table[actions, labels.unsqueeze(1).expand_as(actions)]


def expected_rewards(probabilities: Tensor, table: Tensor) -> Tensor:
    """(B, C) class probabilities -> (B, A) expected reward of each action: sum_y p(y) R[a, y]."""
    return probabilities @ table.T


def bayes_actions(probabilities: Tensor, table: Tensor) -> Tensor:
    """(B, C) class probabilities -> (B,) the action of highest expected reward."""
    return expected_rewards(probabilities, table).argmax(dim=1)
