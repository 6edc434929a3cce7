"""Decision reports and risk-coverage curves on hand-computed cases."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline_lib.vision.decisions import decision_report, risk_coverage
from pipeline_lib.vision.rewards import abstain_table


def test_report_by_hand() -> None:
    table = abstain_table(3, correct=1.0, wrong=-2.0, abstain=0.0)
    labels = np.array([0, 1, 2, 2])
    actions = np.array([0, 2, 3, 2])  # right, wrong, abstain, right
    report = decision_report(actions, labels, table)
    assert report["reward_greedy"] == pytest.approx((1 - 2 + 0 + 1) / 4)
    assert report["reward_sampled"] == report["reward_greedy"]  # a fixed rule
    assert report["accuracy"] == 0.5
    assert report["coverage"] == 0.75
    assert report["selective_risk"] == pytest.approx(1 / 3)


def test_expected_reward_under_sampling() -> None:
    table = abstain_table(2, correct=1.0, wrong=-1.0, abstain=0.0)
    probs = np.array([[0.5, 0.25, 0.25], [0.0, 0.0, 1.0]])
    report = decision_report(np.array([0, 2]), np.array([0, 1]), table, action_probs=probs)
    assert report["reward_sampled"] == pytest.approx(((0.5 - 0.25 + 0.0) + 0.0) / 2)
    assert report["reward_greedy"] == pytest.approx(0.5)


def test_nothing_answered_has_no_selective_risk() -> None:
    report = decision_report(np.array([2, 2]), np.array([0, 1]), abstain_table(2))
    assert report["coverage"] == 0.0 and report["selective_risk"] is None


def test_risk_coverage_by_hand() -> None:
    coverage, risk, aurc = risk_coverage(np.array([0.9, 0.2, 0.6, 0.8]), np.array([True, False, False, True]))
    assert coverage.tolist() == [0.25, 0.5, 0.75, 1.0]
    assert risk.tolist() == pytest.approx([0.0, 0.0, 1 / 3, 0.5])  # order: 0.9 right, 0.8 right, 0.6 wrong, 0.2
    assert aurc == pytest.approx((0 + 0 + 1 / 3 + 0.5) / 4)
