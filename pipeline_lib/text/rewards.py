"""Rule-based rewards of a language model's completion on a verifiable task: pure functions, never learned.

Whether a completion is well formed and right is the task's business (`pipeline_lib.text.data.checkers`).

Rewards of one completion: `format_reward` (1 if `format_ok`), `accuracy_reward` (1 if well formed and the
checker accepts the answer) and `combined_reward`, TinyZero's scheme (Pan et al., "TinyZero", 2025,
https://github.com/Jiayi-Pan/TinyZero, ``verl/utils/reward_score/countdown.py``): 0 for a malformed
completion, `format_score` for a well-formed wrong one, 1 for a right one. `REWARDS` names them as `text_rl.reward`
does, each with the signature (completion, example, checker, format_score).

Examples:
    >>> example = Example("123+456=", "579")
    >>> combined_reward("<think>carry the one</think> <answer>579</answer>", example, numeric)
    1.0
    >>> combined_reward("<answer>578</answer>", example, numeric)
    0.1
    >>> combined_reward("<answer>579</answer> or 578", example, numeric)
    0.0
"""

from __future__ import annotations

import math
from collections.abc import Callable

from pipeline_lib.text.data.checkers import Checker, extract_answer, format_ok
from pipeline_lib.text.data.tasks import Example


def format_reward(completion: str) -> float:
    """1.0 if the completion is well formed (`format_ok`), else 0.0."""
    return 1.0 if format_ok(completion) else 0.0


def accuracy_reward(completion: str, example: Example, checker: Checker) -> float:
    """1.0 if the completion is well formed and `checker` accepts its answer, else 0.0."""
    if not format_ok(completion):
        return 0.0
    answer = extract_answer(completion)
    assert answer is not None  # format_ok guarantees a complete pair
    return 1.0 if checker(answer, example) else 0.0


def combined_reward(completion: str, example: Example, checker: Checker, *, format_score: float = 0.1) -> float:
    """TinyZero's scheme: 0 if malformed, `format_score` if well formed but wrong, 1 if right.

    Raises:
        ValueError: If `format_score` is not in [0, 1) (at 1 a right answer would earn no more than a wrong one).
    """
    if not (math.isfinite(format_score) and 0 <= format_score < 1):
        raise ValueError(f"format_score={format_score!r}: must be in [0, 1) (a right answer earns 1)")
    if not format_ok(completion):
        return 0.0
    return 1.0 if accuracy_reward(completion, example, checker) == 1.0 else float(format_score)


RuleReward = Callable[[str, Example, Checker, float], float]

# The declared rule (`text_rl.reward`) -> its reward of one completion: (completion, example, checker, format_score).
REWARDS: dict[str, RuleReward] = {
    "accuracy": lambda completion, example, checker, format_score: accuracy_reward(completion, example, checker),
    "format": lambda completion, example, checker, format_score: format_reward(completion),
    "combined": lambda completion, example, checker, format_score: combined_reward(
        completion, example, checker, format_score=format_score),
}
