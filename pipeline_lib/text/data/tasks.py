"""Verifiable tasks for supervised finetuning and GRPO of small language models (DeepSeek-R1 / TinyZero style).

An `Example` is a prompt and the bare answer text; the completion a model is trained to produce is the answer in
tags, ``format_answer("579") == "<answer>579</answer>"``, and `pipeline_lib.text.rewards` scores completions
by rule. Three kinds of task (`TASKS`), each a seeded generator of examples:

- ``addition``: two integers of `digits` digits each (leading digit non-zero), ``"123+456="`` -> ``"579"``.
  There are ``(9 * 10 ** (digits - 1)) ** 2`` prompts. `digits` is at most 8: beyond, the numeric checker's
  relative tolerance (1e-9) would accept an off-by-one sum.
- ``reversal``: a lowercase ASCII string, its length uniform in [`min_len`, `max_len`],
  ``"reverse abcde="`` -> ``"edcba"``.
- ``countdown``: three integers in 1..`max_number` (repeats allowed, in drawn order) and a target reachable
  from them, ``"numbers 3 7 12 target 33="``. The target is the value of a random expression over the three
  numbers, each used once: a random order, two operators from ``+ - *`` and a random parenthesisation
  (``(x o y) o z`` or ``x o (y o z)``); a drawn expression whose value is not positive is redrawn for the same
  numbers. The stored answer is that expression (``"(3+7)*12"``); any expression the countdown checker accepts
  is right.

The generators (`addition`, `reversal`, `countdown`) return `count` independent draws, so prompts may repeat.
`make_splits` draws until it holds enough distinct prompts (keeping each prompt's first draw), then cuts them
into the named splits in the order `sizes` lists them: prompts are unique within and across splits, and the
same seed, sizes and options give the same splits. A split therefore depends on the sizes of all splits before
it. Asking for more distinct prompts than the task has is refused before any drawing.

Examples:
    >>> splits = make_splits("addition", {"train": 3, "test": 2}, seed=0, digits=2)
    >>> [len(examples) for examples in splits.values()]
    [3, 2]
    >>> format_answer("579")
    '<answer>579</answer>'
"""

from __future__ import annotations

import json
import operator
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

ANSWER_OPEN = "<answer>"
ANSWER_CLOSE = "</answer>"
# Sums of two 8-digit numbers stay below 2e8, where an off-by-one error (relative 5e-9) is beyond the numeric
# checker's relative tolerance of 1e-9; from 9 digits on that checker would accept some wrong sums.
MAX_ADDITION_DIGITS = 8
MAX_COUNTDOWN_NUMBER = 10**6  # products of three numbers stay below 2 ** 63 when counting prompts
# Rejection sampling of distinct prompts gives up after this many draws per prompt asked (plus a constant):
# enough to collect every prompt of a uniform task (about ln(n) draws each), bounded when a task reaches some
# prompts too rarely.
_DRAWS_PER_PROMPT, _EXTRA_DRAWS = 100, 10_000
_LETTERS = "abcdefghijklmnopqrstuvwxyz"
_OPERATORS: dict[str, Callable[[int, int], int]] = {"+": operator.add, "-": operator.sub, "*": operator.mul}
_NUMPY_OPERATORS = {"+": np.add, "-": np.subtract, "*": np.multiply}
_PERMUTATIONS = ((0, 1, 2), (0, 2, 1), (1, 0, 2), (1, 2, 0), (2, 0, 1), (2, 1, 0))
_COUNTDOWN_PROMPT = re.compile(r"numbers((?: \d+)+) target (\d+)=")


@dataclass(frozen=True)
class Example:
    """One verifiable task instance.

    Attributes:
        prompt: What the model is given, e.g. ``"123+456="``.
        answer: The bare answer text, e.g. ``"579"`` (the completion wraps it with `format_answer`).
    """

    prompt: str
    answer: str


def format_answer(answer: str) -> str:
    """The target completion for `answer`: ``"<answer>357</answer>"``.

    Raises:
        ValueError: If `answer` is blank or holds an answer tag (the completion would fail the format rule).
    """
    if not answer.strip() or ANSWER_OPEN in answer or ANSWER_CLOSE in answer:
        raise ValueError(f"answer={answer!r}: must be non-blank and hold no {ANSWER_OPEN} or {ANSWER_CLOSE} tag")
    return f"{ANSWER_OPEN}{answer}{ANSWER_CLOSE}"


def countdown_prompt(numbers: Iterable[int], target: int) -> str:
    """``"numbers 3 7 12 target 33="``."""
    return f"numbers {' '.join(str(n) for n in numbers)} target {target}="


def parse_countdown_prompt(prompt: str) -> tuple[list[int], int]:
    """(numbers, target) of a countdown prompt, the inverse of `countdown_prompt`.

    Raises:
        ValueError: If `prompt` is not a countdown prompt.
    """
    match = _COUNTDOWN_PROMPT.fullmatch(prompt)
    if match is None:
        raise ValueError(f"prompt={prompt!r}: not a countdown prompt ('numbers 3 7 12 target 33=')")
    return [int(n) for n in match.group(1).split()], int(match.group(2))


# ---------------------------------------------------------------------------------------- one draw per kind


def _draw_addition(rng: np.random.Generator, *, digits: int) -> Example:
    low, high = 10 ** (digits - 1), 10**digits
    a, b = (int(x) for x in rng.integers(low, high, size=2))
    return Example(f"{a}+{b}=", str(a + b))


def _draw_reversal(rng: np.random.Generator, *, min_len: int, max_len: int) -> Example:
    length = int(rng.integers(min_len, max_len + 1))
    text = "".join(_LETTERS[i] for i in rng.integers(0, len(_LETTERS), size=length))
    return Example(f"reverse {text}=", text[::-1])


def _draw_countdown(rng: np.random.Generator, *, max_number: int) -> Example:
    numbers = [int(n) for n in rng.integers(1, max_number + 1, size=3)]
    while True:  # a+b+c is always positive, so each redraw succeeds with probability >= 1/9
        x, y, z = (numbers[i] for i in rng.permutation(3))
        first, second = (list(_OPERATORS)[i] for i in rng.integers(0, len(_OPERATORS), size=2))
        if rng.integers(0, 2) == 0:
            value = _OPERATORS[second](_OPERATORS[first](x, y), z)
            expression = f"({x}{first}{y}){second}{z}"
        else:
            value = _OPERATORS[first](x, _OPERATORS[second](y, z))
            expression = f"{x}{first}({y}{second}{z})"
        if value > 0:
            return Example(countdown_prompt(numbers, value), expression)


# ------------------------------------------------------------------------------------- counting the prompts


def _count_addition(*, digits: int) -> int:
    return (9 * 10 ** (digits - 1)) ** 2


def _count_reversal(*, min_len: int, max_len: int) -> int:
    return sum(len(_LETTERS) ** length for length in range(min_len, max_len + 1))


def _count_countdown(*, max_number: int) -> int:
    """Distinct (ordered numbers, positive target) prompts the countdown draw can produce, exactly.

    Every expression shape the draw uses is evaluated for all numbers at once, one first number at a time:
    (N^2, 108) values per step for N = `max_number`; a row's distinct positive values are its targets.
    """
    values = np.arange(1, max_number + 1, dtype=np.int64)
    rest = np.stack(np.meshgrid(values, values, indexing="ij")).reshape(2, -1)  # (2, N^2): second, third
    total = 0
    for first in values:
        triple = (np.full(rest.shape[1], first), rest[0], rest[1])
        results = []
        for order in _PERMUTATIONS:
            x, y, z = (triple[i] for i in order)
            for left in _NUMPY_OPERATORS.values():
                for right in _NUMPY_OPERATORS.values():
                    results += [right(left(x, y), z), left(x, right(y, z))]
        results.append(np.zeros_like(x))  # a floor, so the first positive value of each row counts as new
        table = np.sort(np.maximum(np.stack(results, axis=1), 0), axis=1)  # (N^2, 109), non-positive -> 0
        total += int(((table[:, 1:] != table[:, :-1]) & (table[:, 1:] > 0)).sum())  # distinct positive values
    return total


# ------------------------------------------------------------------------------------------ option checks


def _check_addition(*, digits: int) -> None:
    if not 1 <= digits <= MAX_ADDITION_DIGITS:
        raise ValueError(f"addition: digits={digits} must be in 1..{MAX_ADDITION_DIGITS}")


def _check_reversal(*, min_len: int, max_len: int) -> None:
    if not 1 <= min_len <= max_len:
        raise ValueError(f"reversal: min_len={min_len}, max_len={max_len}: need 1 <= min_len <= max_len")


def _check_countdown(*, max_number: int) -> None:
    if not 1 <= max_number <= MAX_COUNTDOWN_NUMBER:
        raise ValueError(f"countdown: max_number={max_number} must be in 1..{MAX_COUNTDOWN_NUMBER}")


@dataclass(frozen=True)
class _Task:
    """How to draw, check and count one kind of task; every function takes the kind's options as keywords.

    Attributes:
        draw: (rng, **options) -> one random example.
        check: Raises ValueError for out-of-range options.
        count: The exact number of distinct prompts (may be slow).
        at_least: A cheap lower bound of `count`; `count` is only called when a request exceeds it.
        defaults: The options and their default values.
    """

    draw: Callable[..., Example]
    check: Callable[..., None]
    count: Callable[..., int]
    at_least: Callable[..., int]
    defaults: dict[str, int]


TASKS: dict[str, _Task] = {
    "addition": _Task(_draw_addition, _check_addition, _count_addition, _count_addition, {"digits": 3}),
    "reversal": _Task(_draw_reversal, _check_reversal, _count_reversal, _count_reversal, {"min_len": 3, "max_len": 8}),
    # Every ordered triple reaches at least one positive target (their sum).
    "countdown": _Task(
        _draw_countdown, _check_countdown, _count_countdown, lambda *, max_number: max_number**3, {"max_number": 20}
    ),
}


def _is_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _resolve_options(kind: str, options: Mapping[str, Any]) -> tuple[_Task, dict[str, int]]:
    """The task of `kind` and its full options (defaults filled in), checked."""
    if kind not in TASKS:
        raise ValueError(f"unknown task kind {kind!r} (accepted: {', '.join(TASKS)})")
    task = TASKS[kind]
    for key, value in options.items():
        if key not in task.defaults:
            raise ValueError(f"{kind}: unknown option {key!r} (accepted: {', '.join(task.defaults)})")
        if not _is_int(value):
            raise ValueError(f"{kind}: {key}={value!r} must be an integer")
    resolved = {**task.defaults, **{key: int(value) for key, value in options.items()}}
    task.check(**resolved)
    return task, resolved


def _as_rng(rng: np.random.Generator | int) -> np.random.Generator:
    if isinstance(rng, np.random.Generator):
        return rng
    if not _is_int(rng) or rng < 0:
        raise ValueError(f"seed={rng!r}: must be a non-negative integer or a numpy.random.Generator")
    return np.random.default_rng(int(rng))


def _generate(kind: str, count: int, rng: np.random.Generator | int, options: dict[str, int]) -> list[Example]:
    task, resolved = _resolve_options(kind, options)
    if not _is_int(count) or count < 0:
        raise ValueError(f"{kind}: count={count!r} must be a non-negative integer")
    generator = _as_rng(rng)
    return [task.draw(generator, **resolved) for _ in range(count)]


def addition(count: int, rng: np.random.Generator | int, *, digits: int = 3) -> list[Example]:
    """`count` random additions of two `digits`-digit integers, ``"123+456="`` -> ``"579"``; may repeat."""
    return _generate("addition", count, rng, {"digits": digits})


def reversal(count: int, rng: np.random.Generator | int, *, min_len: int = 3, max_len: int = 8) -> list[Example]:
    """`count` random lowercase strings to reverse, ``"reverse abcde="`` -> ``"edcba"``; may repeat."""
    return _generate("reversal", count, rng, {"min_len": min_len, "max_len": max_len})


def countdown(count: int, rng: np.random.Generator | int, *, max_number: int = 20) -> list[Example]:
    """`count` random countdown puzzles, ``"numbers 3 7 12 target 33="`` -> one solving expression; may repeat."""
    return _generate("countdown", count, rng, {"max_number": max_number})


def num_prompts(kind: str, **options: int) -> int:
    """The number of distinct prompts the task of `kind` with `options` can produce (countdown: counted)."""
    task, resolved = _resolve_options(kind, options)
    return task.count(**resolved)


def prompts_available(kind: str, total: int, **options: int) -> int | None:
    """The number of distinct prompts of `kind` with `options` when it is below `total`, else None: what
    `make_splits` checks before drawing (counted only when `total` exceeds the kind's cheap lower bound)."""
    task, resolved = _resolve_options(kind, options)
    if total <= task.at_least(**resolved):
        return None
    available = task.count(**resolved)
    return available if total > available else None


def _check_sizes(sizes: Mapping[str, int]) -> int:
    """The total of `sizes`, after checking every split has a name and a positive integer size."""
    if not sizes:
        raise ValueError("sizes: need at least one split, e.g. {'train': 2000, 'test': 500}")
    for name, size in sizes.items():
        if not isinstance(name, str) or not name:
            raise ValueError(f"sizes: split name {name!r} must be a non-empty string")
        if not _is_int(size) or size < 1:
            raise ValueError(f"sizes[{name!r}]={size!r}: must be a positive integer")
    return sum(int(size) for size in sizes.values())


def make_splits(kind: str, sizes: Mapping[str, int], seed: int, **options: int) -> dict[str, list[Example]]:
    """Splits of distinct prompts, disjoint across splits, named and sized by `sizes`.

    Args:
        kind: ``"addition"``, ``"reversal"`` or ``"countdown"``.
        sizes: Split name -> number of examples, e.g. ``{"train": 2000, "rl": 500, "test": 500}``; the splits
            are cut in this order from one sequence of distinct prompts.
        seed: Seed of the draws; the same seed, sizes and options give the same splits.
        **options: The kind's options (`digits`; `min_len`, `max_len`; `max_number`), defaults otherwise.

    Returns:
        Split name -> examples, in the order of `sizes`.

    Raises:
        ValueError: For an unknown kind or option, a bad size or seed, or more prompts asked than the task has
            (checked before drawing); also if the draws reach too few distinct prompts within the draw budget
            (countdown asked for nearly all of its prompts, some of which are rare).
    """
    task, resolved = _resolve_options(kind, options)
    total = _check_sizes(sizes)
    rng = _as_rng(seed)
    available = prompts_available(kind, total, **resolved)
    if available is not None:
        raise ValueError(
            f"{kind} with {resolved}: {total} distinct prompts asked ({dict(sizes)}), only {available} available"
        )
    unique: dict[str, Example] = {}
    max_draws = _DRAWS_PER_PROMPT * total + _EXTRA_DRAWS
    for _ in range(max_draws):
        example = task.draw(rng, **resolved)
        unique.setdefault(example.prompt, example)
        if len(unique) == total:
            break
    else:
        raise ValueError(
            f"{kind} with {resolved}: only {len(unique)} distinct prompts of the {total} asked after "
            f"{max_draws} draws; ask for fewer"
        )
    examples = list(unique.values())
    splits, start = {}, 0
    for name, size in sizes.items():
        splits[name] = examples[start : start + size]
        start += size
    return splits


# ---------------------------------------------------------------------------------------------- JSON lines


def write_jsonl(path: Path, examples: Iterable[Example]) -> None:
    """Write one ``{"prompt": ..., "answer": ...}`` object per line (UTF-8), the format `load_jsonl` reads."""
    lines = [json.dumps({"prompt": e.prompt, "answer": e.answer}, ensure_ascii=False) + "\n" for e in examples]
    Path(path).write_text("".join(lines), encoding="utf-8")


def _parse_line(line: str, where: str) -> Example:
    """The example on one JSON line; `where` (``"file:line"``) starts every error message."""
    try:
        data = json.loads(line)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{where}: not JSON ({exc.msg} at column {exc.colno})") from exc
    if not isinstance(data, dict):
        raise ValueError(f"{where}: not a JSON object (got {type(data).__name__})")
    for field in ("prompt", "answer"):
        if field not in data:
            raise ValueError(f"{where}: missing field {field!r}")
        if not isinstance(data[field], str):
            raise ValueError(f"{where}: field {field!r} must be a string, got {type(data[field]).__name__}")
        if not data[field].strip():
            raise ValueError(f"{where}: field {field!r} is empty")
    return Example(data["prompt"], data["answer"])


def load_jsonl(path: Path) -> list[Example]:
    """Examples from a JSON-lines file: one object with non-empty string ``prompt`` and ``answer`` per line.

    Blank lines are skipped; other fields are ignored. Lines are split on ``\\n`` only, so a JSON string
    holding U+2028 or another unicode line separator stays whole.

    Raises:
        ValueError: Naming the file (and the 1-based line) when it cannot be read, is not UTF-8, holds no
            example, or a line is not JSON, not an object, or lacks a non-empty string prompt or answer.
    """
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: cannot read as UTF-8 text ({exc})") from exc
    examples = [
        _parse_line(line, f"{path}:{number}") for number, line in enumerate(text.split("\n"), start=1) if line.strip()
    ]
    if not examples:
        raise ValueError(f"{path}: no examples (the file is empty or blank)")
    return examples
