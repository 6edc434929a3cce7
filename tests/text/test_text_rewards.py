"""Rule rewards of completions on verifiable tasks: answer extraction, the format rule, checkers and rewards."""

from __future__ import annotations

import math
from pathlib import Path
from typing import get_args

import pytest

from pipeline_lib.text.config import TextReward
from pipeline_lib.text.data import tasks
from pipeline_lib.text.data.checkers import (
    CHECKERS,
    DEFAULT_CHECKER,
    checker_for,
    countdown,
    exact,
    extract_answer,
    format_ok,
    numeric,
)
from pipeline_lib.text.data.tasks import Example, format_answer, make_splits
from pipeline_lib.text.rewards import REWARDS, accuracy_reward, combined_reward, format_reward

SUM = Example("123+456=", "579")
PUZZLE = Example("numbers 3 7 12 target 33=", "3*7+12")


# ------------------------------------------------------------------------------------ extraction and format


@pytest.mark.parametrize(
    ("completion", "answer", "well_formed"),
    [
        ("<answer>579</answer>", "579", True),
        ("<answer>  579 \n</answer>", "579", True),  # surrounding whitespace is stripped
        ("<think>5+9 is 14, carry 1</think>\n<answer>579</answer>", "579", True),  # text before: allowed
        ("<answer>579</answer>  \n", "579", True),  # whitespace after: allowed
        ("<answer>579</answer> so 579", "579", False),  # text after the closing tag
        ("<answer>579</answer><answer>578</answer>", "579", False),  # two blocks: the first is extracted
        ("<answer>579", None, False),  # no closing tag
        ("579</answer>", None, False),  # no opening tag
        ("</answer>579<answer>", None, False),  # tags reversed
        ("</answer><answer>579</answer>", "579", False),  # a stray close before a good pair
        ("<answer>1<answer>2</answer>", "1<answer>2", False),  # two opening tags
        ("<answer></answer>", "", False),  # empty answer
        ("<answer>  </answer>", "", False),  # blank answer
        ("579", None, False),
        ("", None, False),
        ("<ANSWER>579</ANSWER>", None, False),  # tags are case-sensitive
    ],
)
def test_extraction_and_format_rule_by_hand(completion: str, answer: str | None, well_formed: bool) -> None:
    assert extract_answer(completion) == answer
    assert format_ok(completion) is well_formed
    assert format_reward(completion) == (1.0 if well_formed else 0.0)


def test_format_answer_output_is_well_formed_and_extracts_back() -> None:
    for answer in ("579", "edcba", "(12-7)*3", "a b"):
        assert format_ok(format_answer(answer)) and extract_answer(format_answer(answer)) == answer


# ------------------------------------------------------------------------------------------------ checkers


@pytest.mark.parametrize(
    ("answer", "expected", "accepted"),
    [
        ("edcba", "edcba", True),
        ("  edcba ", "edcba", True),
        ("edcb", "edcba", False),
        ("EDCBA", "edcba", False),
        ("e d c b a", "edcba", False),
        ("", "edcba", False),
    ],
)
def test_exact_checker(answer: str, expected: str, accepted: bool) -> None:
    assert exact(answer, Example("reverse abcde=", expected)) is accepted


@pytest.mark.parametrize(
    ("answer", "expected", "accepted"),
    [
        ("579", "579", True),
        ("579.0", "579", True),
        ("579", "579.0", True),
        ("579.", "579", True),
        ("+579", "579", True),
        ("0579", "579", True),
        (" 579 ", "579", True),
        ("579.0000000001", "579", True),  # relative difference 1.7e-13
        ("-0.0", "0", True),
        (".5", "0.5", True),
        ("1000000000.5", "1000000000", True),  # within 1e-9 relative: why addition stops at 8 digits
        ("199999998", "199999997", False),  # the largest 8-digit sums: off by one is 5e-9 relative
        ("578", "579", False),
        ("579.001", "579", False),
        ("-579", "579", False),
        ("0.000000000001", "0", False),  # relative: nothing but zero is close to zero
        ("5.79e2", "579", False),  # no exponent notation
        ("1,579", "1579", False),
        ("1_579", "1579", False),
        ("nan", "nan", False),
        ("inf", "inf", False),
        ("579/1", "579", False),
        ("five hundred seventy-nine", "579", False),
        ("", "579", False),
        (".", "0", False),
        ("579", "not a number", False),  # an unparsable expected answer never matches
        ("1" * 5000, "1" * 5000, False),  # more digits than Python converts: unparsable, not an error
    ],
)
def test_numeric_checker(answer: str, expected: str, accepted: bool) -> None:
    assert numeric(answer, Example("x=", expected)) is accepted


@pytest.mark.parametrize(
    ("prompt", "answer", "accepted"),
    [
        ("numbers 3 7 12 target 33=", "3*7+12", True),
        ("numbers 3 7 12 target 33=", "12+(7*3)", True),
        ("numbers 3 7 12 target 33=", " ( 3 * 7 ) + 12 ", True),
        ("numbers 3 7 12 target 33=", "3*7-12", False),  # every number once, wrong value
        ("numbers 6 3 4 target 8=", "6/3*4", True),
        ("numbers 3 4 6 target 8=", "4/3*6", True),  # exact fractions: a non-integer intermediate is fine
        ("numbers 3 4 6 target 8=", "4*6/3", True),
        ("numbers 2 2 7 target 11=", "7+2+2", True),  # a repeated number may be used as often as it appears
        ("numbers 2 3 5 target 10=", "5+5*(3-2)", False),  # 5 twice (value 10)
        ("numbers 2 3 5 target 10=", "2*5", False),  # 3 left out (value 10)
        ("numbers 2 3 5 target 10=", "1*(2+3+5)", False),  # 1 is not in the prompt (value 10)
        ("numbers 2 3 5 target 10=", "10", False),  # the target alone
        ("numbers 2 3 5 target 235=", "235", False),  # digits glued together
        ("numbers 2 2 7 target 1=", "7/(2-2)", False),  # division by zero
        ("numbers 2 3 5 target 6=", "-2+3+5", False),  # unary minus
        ("numbers 2 3 5 target 4=", "+2-3+5", False),  # unary plus
        ("numbers 2 3 5 target 45=", "3**2*5", False),  # power
        ("numbers 2 3 7 target 6=", "7//2+3", False),  # floor division
        ("numbers 2 3 7 target 4=", "7%2+3", False),  # modulo
        ("numbers 3 7 12 target 33=", "3.0*7+12", False),  # a float literal
        ("numbers 3 7 12 target 33=", "0x3*7+12", False),  # a hex literal
        ("numbers 3 7 12 target 33=", "3*7+1_2", False),  # an underscore literal
        ("numbers 3 7 12 target 33=", "3*7+12=33", False),  # an equation, not an expression
        ("numbers 3 7 12 target 33=", "3 7 12", False),  # syntax error
        ("numbers 3 7 12 target 33=", "3*7+(12", False),
        ("numbers 3 7 12 target 33=", "", False),
        ("numbers 3 7 12 target 33=", "True*3*7+12", False),
        ("numbers 3 7 12 target 33=", "abs(3)*7+12", False),
        ("numbers 3 7 12 target 33=", "__import__('os')", False),
        ("numbers 3 7 12 target 33=", "__import__('os').system('true') or 3*7+12", False),
        ("numbers 3 7 12 target 33=", "(lambda: 33)()", False),
        ("numbers 3 7 12 target 33=", "[3*7+12][0]", False),
        ("numbers 3 7 12 target 33=", "3*7+12\n", True),  # stripped like every answer
        ("numbers 3 7 12 target 33=", "3*7\n+12", False),  # no newlines inside
        ("numbers 3 7 12 target 33=", "(" * 300 + "3*7+12" + ")" * 300, False),  # too deep for the parser
        ("numbers 3 7 12 target 33=", "3*7+" + " " * 1000 + "12", False),  # over 1000 characters
    ],
)
def test_countdown_checker(prompt: str, answer: str, accepted: bool) -> None:
    assert countdown(answer, Example(prompt, "unused")) is accepted


def test_countdown_checker_never_runs_the_answer(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    for answer in ("open('pwned', 'w')", "__import__('pathlib').Path('pwned').touch()"):
        assert countdown(answer, PUZZLE) is False
    assert list(tmp_path.iterdir()) == []


def test_countdown_checker_refuses_a_prompt_of_another_task() -> None:
    with pytest.raises(ValueError, match=r"prompt='123\+456=': not a countdown prompt"):
        countdown("1+2", SUM)


def test_every_task_kind_has_a_default_checker() -> None:
    assert DEFAULT_CHECKER.keys() == tasks.TASKS.keys()
    assert set(DEFAULT_CHECKER.values()) <= CHECKERS.keys()
    assert checker_for("addition") is numeric and checker_for("reversal") is exact
    assert checker_for("countdown") is countdown
    with pytest.raises(ValueError, match="unknown task kind 'multiplication'"):
        checker_for("multiplication")


def _wrong(kind: str, example: Example) -> str:
    """A well-formed wrong answer to `example`."""
    if kind == "addition":
        return str(int(example.answer) + 1)
    if kind == "reversal":
        return example.answer[::-1] + "x"
    return example.answer + "+1"  # every number once and then one more


@pytest.mark.parametrize("kind", list(tasks.TASKS))
def test_generated_answers_earn_full_reward_and_wrong_ones_the_format_score(kind: str) -> None:
    checker = checker_for(kind)
    for example in make_splits(kind, {"test": 300}, seed=3)["test"]:
        assert accuracy_reward(format_answer(example.answer), example, checker) == 1.0
        assert combined_reward(f"<think>easy</think> {format_answer(example.answer)}", example, checker) == 1.0
        assert combined_reward(format_answer(_wrong(kind, example)), example, checker) == 0.1
        assert combined_reward(example.answer, example, checker) == 0.0  # right, but without tags


# ------------------------------------------------------------------------------------------------- rewards


@pytest.mark.parametrize(
    ("completion", "accuracy", "combined"),
    [
        ("<answer>579</answer>", 1.0, 1.0),
        ("reasoning first <answer>579.0</answer>\n", 1.0, 1.0),
        ("<answer>578</answer>", 0.0, 0.1),
        ("<answer>five hundred</answer>", 0.0, 0.1),
        ("<answer>579</answer> maybe 578", 0.0, 0.0),  # right answer, text after the close
        ("<answer>579</answer><answer>579</answer>", 0.0, 0.0),
        ("<answer>579", 0.0, 0.0),
        ("</answer>579<answer>", 0.0, 0.0),
        ("<answer></answer>", 0.0, 0.0),
        ("<answer>  </answer>", 0.0, 0.0),
        ("579", 0.0, 0.0),
    ],
)
def test_rewards_by_hand(completion: str, accuracy: float, combined: float) -> None:
    assert accuracy_reward(completion, SUM, numeric) == accuracy
    assert combined_reward(completion, SUM, numeric) == combined


def test_combined_reward_uses_the_given_format_score_and_checker() -> None:
    assert combined_reward("<answer>578</answer>", SUM, numeric, format_score=0.25) == 0.25
    assert combined_reward("<answer>578</answer>", SUM, numeric, format_score=0.0) == 0.0
    assert combined_reward("<answer>579.0</answer>", SUM, exact) == 0.1  # exact: "579.0" is not "579"
    assert combined_reward("<answer>(12-7)*3+18</answer>", PUZZLE, countdown) == 0.1  # 18 is not in the prompt
    assert combined_reward("<answer>(7*3)+12</answer>", PUZZLE, countdown) == 1.0


@pytest.mark.parametrize("format_score", [1.0, 1.5, -0.1, math.nan, math.inf])
def test_combined_reward_refuses_a_format_score_outside_zero_one(format_score: float) -> None:
    with pytest.raises(ValueError, match=r"format_score=.*: must be in \[0, 1\)"):
        combined_reward("<answer>579</answer>", SUM, numeric, format_score=format_score)


def test_rewards_by_name_are_the_declared_rules() -> None:
    assert set(REWARDS) == set(get_args(TextReward))  # every accepted text_rl.reward has its rule
    right, wrong, malformed = "<answer>579</answer>", "<answer>578</answer>", "579"
    expected = {"accuracy": (1.0, 0.0, 0.0), "format": (1.0, 1.0, 0.0), "combined": (1.0, 0.3, 0.0)}
    for name, values in expected.items():
        assert tuple(REWARDS[name](text, SUM, numeric, 0.3) for text in (right, wrong, malformed)) == values, name
