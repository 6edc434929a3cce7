"""What a classifier's decisions earn: the RL stage's before/after numbers and its risk-coverage curve.

Actions 0..C-1 answer a class; action C (when the reward table has C + 1 rows) abstains. For a policy the
report gives the reward of its greedy action and the exact expected reward when actions are sampled from it;
for a fixed rule (the Bayes rule on the reference's probabilities) the two are equal.
"""

from __future__ import annotations

from typing import Any

import numpy as np


def decision_report(actions: np.ndarray, labels: np.ndarray, table: np.ndarray,
                    action_probs: np.ndarray | None = None) -> dict[str, Any]:
    """Reward, accuracy, coverage and selective risk of decisions `actions` (N,) on examples `labels` (N,).

    Args:
        actions: the decisions (greedy actions of a policy, or a rule's choices).
        labels: true classes.
        table: (A, C) rewards R[action, label].
        action_probs: (N, A) the policy's action probabilities, for the expected reward under sampling.

    Returns:
        reward_greedy (mean reward of `actions`), reward_sampled (mean of sum_a pi(a|x) R[a, y]; equal to
        reward_greedy without `action_probs`), accuracy (right answers over all examples), coverage (share
        answered) and selective_risk (wrong answers over answered; None when nothing is answered).
    """
    actions, labels = np.asarray(actions), np.asarray(labels)
    if actions.shape != labels.shape or actions.ndim != 1:
        raise ValueError(f"actions {actions.shape} and labels {labels.shape} must be the same (N,)")
    classes = table.shape[1]
    rewards = table[actions, labels]
    sampled = rewards.mean() if action_probs is None else (action_probs * table[:, labels].T).sum(axis=1).mean()
    answered = actions < classes
    right = actions == labels
    risk = float(1 - right[answered].mean()) if answered.any() else None
    return {
        "reward_greedy": float(rewards.mean()),
        "reward_sampled": float(sampled),
        "accuracy": float(right.mean()),
        "coverage": float(answered.mean()),
        "selective_risk": risk,
    }


def risk_coverage(confidence: np.ndarray, correct: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    """Selective risk at every coverage when answering the most confident examples first.

    Args:
        confidence: (N,) how sure the model is (e.g. the top class probability, or 1 - p(abstain)).
        correct: (N,) whether its class answer is right.

    Returns:
        coverage (k / N for k = 1..N), risk (error rate among the k most confident), and the area under the
        curve (AURC, the mean of the risks: lower is better).
    """
    order = np.argsort(-np.asarray(confidence), kind="stable")
    errors = np.cumsum(~np.asarray(correct, dtype=bool)[order])
    answered = np.arange(1, len(order) + 1)
    risk = errors / answered
    return answered / len(order), risk, float(risk.mean())
