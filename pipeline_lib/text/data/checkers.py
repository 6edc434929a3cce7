"""How a verifiable task decides a completion: its tagged answer, its form, and whether the answer is right.

A completion answers in tags, ``"... <answer>579</answer>"`` (`pipeline_lib.text.data.tasks.format_answer`).

Two rules about the tags:

- `extract_answer` (what the answer is): the text between the first ``<answer>`` and the first ``</answer>``
  after it, stripped of surrounding whitespace; None without such a pair. Text before and after the pair
  (reasoning, a second block) is ignored by extraction.
- `format_ok` (whether the completion is well formed): exactly one ``<answer>`` and one ``</answer>``, in
  that order, a non-blank answer between them, and nothing but whitespace after ``</answer>``. Text before
  ``<answer>`` (a ``<think>`` block, say) is allowed; text after the closing tag is not, so a model cannot
  hedge with a second answer or trail off.

A checker (`CHECKERS`) decides whether an extracted answer solves an example:

- ``exact``: equal strings after stripping whitespace (reversal).
- ``numeric``: both are plain decimal numbers (optional sign, digits, optional fraction: ``"579"``,
  ``"-3.25"``, ``"579.0"``; no exponent, ``inf``, ``nan``, separators) equal within a relative 1e-9, compared
  exactly as fractions (addition). Anything unparsable is wrong.
- ``countdown``: an arithmetic expression of integers, ``+ - * /`` and parentheses that uses each number of
  the prompt exactly once (as a multiset: no number twice, none left out, none added) and whose exact value
  (fractions; intermediate values need not be integers) equals the target. It is parsed with `ast` and
  evaluated by walking the tree, never `eval`; any other character or syntax (names, calls, unary minus,
  ``**``, ``//``, hex or ``1_2`` literals), a division by zero or an expression over 1000 characters is wrong.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Callable
from fractions import Fraction

from pipeline_lib.text.data.tasks import ANSWER_CLOSE, ANSWER_OPEN, Example, parse_countdown_prompt

Checker = Callable[[str, Example], bool]
"""(extracted answer, example) -> whether the answer solves the example."""


NUMERIC_REL_TOL = Fraction(1, 10**9)


MAX_EXPRESSION_CHARS = 1000


_DECIMAL = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)")


_EXPRESSION_CHARS = re.compile(r"[0-9+\-*/() \t]*")


_BINARY_OPERATORS: dict[type[ast.operator], Callable[[Fraction, Fraction], Fraction]] = {
    ast.Add: lambda a, b: a + b,
    ast.Sub: lambda a, b: a - b,
    ast.Mult: lambda a, b: a * b,
    ast.Div: lambda a, b: a / b,  # Fraction: exact, ZeroDivisionError for b == 0
}


def extract_answer(completion: str) -> str | None:
    """The stripped text between the first ``<answer>`` and the first ``</answer>`` after it, or None."""
    start = completion.find(ANSWER_OPEN)
    if start == -1:
        return None
    start += len(ANSWER_OPEN)
    end = completion.find(ANSWER_CLOSE, start)
    return None if end == -1 else completion[start:end].strip()


def format_ok(completion: str) -> bool:
    """One ``<answer>`` then one ``</answer>``, a non-blank answer between, only whitespace after the close."""
    if completion.count(ANSWER_OPEN) != 1 or completion.count(ANSWER_CLOSE) != 1:
        return False
    answer = extract_answer(completion)  # None when the close tag comes first
    return bool(answer) and not completion.split(ANSWER_CLOSE, 1)[1].strip()


def exact(answer: str, example: Example) -> bool:
    """The answer equals the example's, both stripped of surrounding whitespace."""
    return answer.strip() == example.answer.strip()


def _decimal(text: str) -> Fraction | None:
    """`text` as an exact fraction when it is a plain decimal number (``"-3.25"``), else None."""
    text = text.strip()
    if not _DECIMAL.fullmatch(text):
        return None
    try:
        return Fraction(text)
    except ValueError:  # more digits than Python converts (sys.get_int_max_str_digits)
        return None


def numeric(answer: str, example: Example) -> bool:
    """Both are decimal numbers and |a - b| <= 1e-9 * max(|a|, |b|); unparsable -> False."""
    value, expected = _decimal(answer), _decimal(example.answer)
    if value is None or expected is None:
        return False
    return abs(value - expected) <= NUMERIC_REL_TOL * max(abs(value), abs(expected))


def _evaluate(node: ast.AST, used: list[int]) -> Fraction:
    """The exact value of an expression tree of integer literals and + - * /; appends each literal to `used`.

    Raises:
        ValueError: For any other node (names, calls, unary operators, other operators, non-integer literals).
        ZeroDivisionError: For a division by zero.
    """
    if isinstance(node, ast.Expression):
        return _evaluate(node.body, used)
    if isinstance(node, ast.Constant) and type(node.value) is int:  # not bool, float or str
        used.append(node.value)
        return Fraction(node.value)
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY_OPERATORS:
        left, right = _evaluate(node.left, used), _evaluate(node.right, used)
        return _BINARY_OPERATORS[type(node.op)](left, right)
    raise ValueError(f"{type(node).__name__} is not allowed in a countdown expression")


def countdown(answer: str, example: Example) -> bool:
    """The answer is an expression using each prompt number once whose exact value is the target.

    Raises:
        ValueError: If the example's prompt is not a countdown prompt (a checker applied to the wrong task).
    """
    numbers, target = parse_countdown_prompt(example.prompt)
    expression = answer.strip()
    if len(expression) > MAX_EXPRESSION_CHARS or not _EXPRESSION_CHARS.fullmatch(expression):
        return False
    used: list[int] = []
    try:
        value = _evaluate(ast.parse(expression, mode="eval"), used)
    except (SyntaxError, ValueError, ZeroDivisionError, RecursionError, MemoryError):
        return False
    return sorted(used) == sorted(numbers) and value == target


CHECKERS: dict[str, Checker] = {"exact": exact, "numeric": numeric, "countdown": countdown}


# Task kind (`pipeline_lib.text.data.tasks.TASKS`) -> the name of its checker.
DEFAULT_CHECKER: dict[str, str] = {"addition": "numeric", "reversal": "exact", "countdown": "countdown"}


def checker_for(kind: str) -> Checker:
    """The default checker of the task `kind` (``"addition"`` -> `numeric`, and so on).

    Raises:
        ValueError: If `kind` is not a task kind.
    """
    if kind not in DEFAULT_CHECKER:
        raise ValueError(f"unknown task kind {kind!r} (accepted: {', '.join(DEFAULT_CHECKER)})")
    return CHECKERS[DEFAULT_CHECKER[kind]]
