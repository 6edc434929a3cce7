"""Verifiable tasks: the generators, the count of distinct prompts, disjoint splits and the JSON-lines files."""

from __future__ import annotations

import dataclasses
import itertools
import json
import operator
import re
from pathlib import Path

import numpy as np
import pytest

from pipeline_lib.text.data import tasks
from pipeline_lib.text.data.tasks import (
    Example,
    addition,
    countdown,
    countdown_prompt,
    format_answer,
    load_jsonl,
    make_splits,
    num_prompts,
    parse_countdown_prompt,
    reversal,
    write_jsonl,
)

OPS = {"+": operator.add, "-": operator.sub, "*": operator.mul}
LEFT = re.compile(r"\((\d+)([-+*])(\d+)\)([-+*])(\d+)")  # (x o y) o z
RIGHT = re.compile(r"(\d+)([-+*])\((\d+)([-+*])(\d+)\)")  # x o (y o z)


def _countdown_value(expression: str) -> tuple[list[int], int]:
    """Numbers and value of a generated countdown answer, by a naive reading of its two shapes (no eval)."""
    if match := LEFT.fullmatch(expression):
        x, o1, y, o2, z = match.groups()
        return [int(x), int(y), int(z)], OPS[o2](OPS[o1](int(x), int(y)), int(z))
    match = RIGHT.fullmatch(expression)
    assert match is not None, expression
    x, o1, y, o2, z = match.groups()
    return [int(x), int(y), int(z)], OPS[o1](int(x), OPS[o2](int(y), int(z)))


def _assert_valid(kind: str, example: Example, options: dict[str, int]) -> None:
    """The example is one the task of `kind` with `options` may produce, and its answer is right."""
    if kind == "addition":
        a, b = (int(x) for x in re.fullmatch(r"([1-9]\d*)\+([1-9]\d*)=", example.prompt).groups())
        digits = options.get("digits", 3)
        assert len(str(a)) == len(str(b)) == digits
        assert example.answer == str(a + b)
    elif kind == "reversal":
        text = re.fullmatch(r"reverse ([a-z]+)=", example.prompt).group(1)
        assert options.get("min_len", 3) <= len(text) <= options.get("max_len", 8)
        assert example.answer == text[::-1]
    else:
        numbers, target = parse_countdown_prompt(example.prompt)
        assert len(numbers) == 3 and all(1 <= n <= options.get("max_number", 20) for n in numbers)
        used, value = _countdown_value(example.answer)
        assert sorted(used) == sorted(numbers) and value == target > 0


def _brute_force_countdown(max_number: int) -> set[str]:
    """Every countdown prompt with numbers up to `max_number`, by plain loops over all expressions."""
    prompts = set()
    for triple in itertools.product(range(1, max_number + 1), repeat=3):
        for x, y, z in itertools.permutations(triple):
            for f, g in itertools.product(OPS.values(), repeat=2):
                for value in (g(f(x, y), z), f(x, g(y, z))):
                    if value > 0:
                        prompts.add(countdown_prompt(triple, value))
    return prompts


# ------------------------------------------------------------------------------------------- the answer tag


def test_format_answer_wraps_the_bare_answer_and_refuses_what_could_not_be_parsed_back() -> None:
    assert format_answer("357") == "<answer>357</answer>"
    assert format_answer("(12-7)*3") == "<answer>(12-7)*3</answer>"
    for bad in ("", "  ", "1</answer>", "<answer>1"):
        with pytest.raises(ValueError, match="must be non-blank and hold no"):
            format_answer(bad)


def test_countdown_prompt_round_trips_and_refuses_other_prompts() -> None:
    prompt = countdown_prompt([3, 7, 12], 33)
    assert prompt == "numbers 3 7 12 target 33="
    assert parse_countdown_prompt(prompt) == ([3, 7, 12], 33)
    for bad in ("123+456=", "numbers 3 7 12 target 33", "numbers target 3=", "numbers 3 x target 3="):
        with pytest.raises(ValueError, match="not a countdown prompt"):
            parse_countdown_prompt(bad)


# ------------------------------------------------------------------------------------------- generators


@pytest.mark.parametrize("digits", [1, 3, 8])
def test_addition_has_digits_digit_operands_and_their_sum(digits: int) -> None:
    examples = addition(300, 0, digits=digits)
    assert len(examples) == 300
    for example in examples:
        _assert_valid("addition", example, {"digits": digits})
    leading = {example.prompt[0] for example in examples}
    assert leading == set("123456789")  # every non-zero leading digit occurs, zero never


def test_reversal_covers_the_length_range() -> None:
    examples = reversal(400, 1, min_len=2, max_len=5)
    for example in examples:
        _assert_valid("reversal", example, {"min_len": 2, "max_len": 5})
    assert {len(example.answer) for example in examples} == {2, 3, 4, 5}
    assert reversal(3, 1)[0].prompt.startswith("reverse ")


def test_countdown_targets_are_reachable_and_both_parenthesisations_occur() -> None:
    examples = countdown(500, 2, max_number=20)
    for example in examples:
        _assert_valid("countdown", example, {"max_number": 20})
    assert any(LEFT.fullmatch(e.answer) for e in examples) and any(RIGHT.fullmatch(e.answer) for e in examples)
    operators = {ch for e in examples for ch in e.answer if ch in "+-*"}
    assert operators == {"+", "-", "*"}


@pytest.mark.parametrize("generate", [addition, reversal, countdown])
def test_generators_are_deterministic_in_the_seed(generate) -> None:
    assert generate(50, 7) == generate(50, 7) == generate(50, np.random.default_rng(7))
    assert generate(50, 7) != generate(50, 8)
    assert generate(0, 7) == []


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: addition(5, 0, digits=0), "digits=0 must be in 1..8"),
        (lambda: addition(5, 0, digits=9), "digits=9 must be in 1..8"),
        (lambda: addition(5, 0, digits=2.0), r"digits=2.0 must be an integer"),
        (lambda: addition(5, 0, digits=True), r"digits=True must be an integer"),
        (lambda: addition(-1, 0), "count=-1 must be a non-negative integer"),
        (lambda: addition(5, -3), "seed=-3: must be a non-negative integer"),
        (lambda: reversal(5, 0, min_len=0), "min_len=0, max_len=8: need 1 <= min_len <= max_len"),
        (lambda: reversal(5, 0, min_len=5, max_len=4), "min_len=5, max_len=4"),
        (lambda: countdown(5, 0, max_number=0), "max_number=0 must be in 1..1000000"),
    ],
)
def test_generators_refuse_bad_options(call, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        call()


# ---------------------------------------------------------------------------------------- counting prompts


def test_prompt_counts_by_hand() -> None:
    assert num_prompts("addition", digits=1) == 81
    assert num_prompts("addition", digits=2) == 90 * 90
    assert num_prompts("reversal", min_len=1, max_len=1) == 26
    assert num_prompts("reversal", min_len=1, max_len=2) == 26 + 26**2
    assert num_prompts("countdown", max_number=1) == 3  # 1 1 1 reaches 1 (1*1*1), 2 (1+1*1) and 3 (1+1+1)


@pytest.mark.parametrize("max_number", [1, 2, 3, 4, 6])
def test_countdown_count_matches_a_brute_force_enumeration(max_number: int) -> None:
    assert num_prompts("countdown", max_number=max_number) == len(_brute_force_countdown(max_number))


# ------------------------------------------------------------------------------------------------- splits


def _random_config(rng: np.random.Generator) -> tuple[str, dict[str, int], dict[str, int]]:
    """A random (kind, options, sizes) whose total fits the task's distinct prompts."""
    kind = str(rng.choice(list(tasks.TASKS)))
    if kind == "addition":
        options = {"digits": int(rng.integers(1, 4))}
    elif kind == "reversal":
        low = int(rng.integers(1, 4))
        options = {"min_len": low, "max_len": low + int(rng.integers(0, 3))}
    else:
        options = {"max_number": int(rng.integers(2, 12))}
    total = int(rng.integers(10, min(num_prompts(kind, **options), 400) + 1))  # every config has >= 26 prompts
    names = ["train", "rl", "test"][: int(rng.integers(1, 4))]
    cuts = sorted(int(c) for c in rng.choice(np.arange(1, total), size=len(names) - 1, replace=False))
    bounds = [0, *cuts, total]
    return kind, options, {name: bounds[i + 1] - bounds[i] for i, name in enumerate(names)}


@pytest.mark.parametrize("case", range(40))
def test_property_splits_are_sized_unique_disjoint_valid_and_deterministic(case: int) -> None:
    rng = np.random.default_rng(1000 + case)
    kind, options, sizes = _random_config(rng)
    seed = int(rng.integers(0, 2**31))
    splits = make_splits(kind, sizes, seed, **options)
    assert list(splits) == list(sizes)
    assert {name: len(examples) for name, examples in splits.items()} == sizes
    prompts = [example.prompt for examples in splits.values() for example in examples]
    assert len(set(prompts)) == len(prompts)  # unique within and disjoint across splits
    for examples in splits.values():
        for example in examples:
            _assert_valid(kind, example, options)
    assert make_splits(kind, sizes, seed, **options) == splits


@pytest.mark.parametrize("case", range(10))
def test_property_another_seed_gives_other_splits(case: int) -> None:
    rng = np.random.default_rng(2000 + case)
    kind, options, sizes = _random_config(rng)
    first, second = make_splits(kind, sizes, 1, **options), make_splits(kind, sizes, 2, **options)
    assert first != second


def test_splits_are_the_first_distinct_draws_of_the_generator() -> None:
    draws = addition(3000, 5, digits=2)
    seen: set[str] = set()
    distinct = [e for e in draws if not (e.prompt in seen or seen.add(e.prompt))]  # first draw of each prompt
    splits = make_splits("addition", {"train": 100, "test": 50}, 5, digits=2)
    assert splits["train"] + splits["test"] == distinct[:150]


def test_defaults_give_the_documented_tasks() -> None:
    splits = make_splits("countdown", {"train": 200, "rl": 50, "test": 50}, 0)
    for examples in splits.values():
        for example in examples:
            _assert_valid("countdown", example, {})
    assert len(make_splits("addition", {"test": 20}, 0)["test"][0].prompt) == len("123+456=")


def test_all_prompts_of_a_small_task_can_be_asked_for() -> None:
    every_addition = {f"{a}+{b}=" for a in range(1, 10) for b in range(1, 10)}
    splits = make_splits("addition", {"train": 60, "test": 21}, 0, digits=1)
    assert {e.prompt for examples in splits.values() for e in examples} == every_addition
    every_countdown = _brute_force_countdown(2)
    splits = make_splits("countdown", {"all": len(every_countdown)}, 0, max_number=2)
    assert {e.prompt for e in splits["all"]} == every_countdown


def test_asking_for_more_prompts_than_exist_fails_before_drawing(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_drawing(rng: np.random.Generator, **options: int) -> Example:
        raise AssertionError("drew an example before checking the request")

    for kind in tasks.TASKS:
        monkeypatch.setitem(tasks.TASKS, kind, dataclasses.replace(tasks.TASKS[kind], draw=no_drawing))
    with pytest.raises(ValueError, match=r"addition .*: 82 distinct prompts asked .* only 81 available"):
        make_splits("addition", {"train": 80, "test": 2}, 0, digits=1)
    with pytest.raises(ValueError, match=r"reversal .*: 27 distinct prompts asked .* only 26 available"):
        make_splits("reversal", {"train": 27}, 0, min_len=1, max_len=1)
    available = len(_brute_force_countdown(2))
    with pytest.raises(ValueError, match=rf"countdown .*: {available + 1} distinct prompts asked .* only {available}"):
        make_splits("countdown", {"train": available + 1}, 0, max_number=2)


def test_a_task_that_repeats_itself_stops_at_the_draw_budget(monkeypatch: pytest.MonkeyPatch) -> None:
    def same(rng: np.random.Generator, **options: int) -> Example:
        return Example(f"{int(rng.integers(0, 3))}+1=", "1")  # only 3 prompts, though 81 are claimed

    monkeypatch.setitem(tasks.TASKS, "addition", dataclasses.replace(tasks.TASKS["addition"], draw=same))
    with pytest.raises(ValueError, match=r"only 3 distinct prompts of the 5 asked after 10500 draws"):
        make_splits("addition", {"train": 5}, 0, digits=1)


@pytest.mark.parametrize(
    ("kind", "sizes", "options", "match"),
    [
        ("subtraction", {"train": 1}, {}, "unknown task kind 'subtraction'"),
        ("addition", {"train": 1}, {"digit": 2}, "addition: unknown option 'digit' \\(accepted: digits\\)"),
        ("countdown", {"train": 1}, {"digits": 2}, "unknown option 'digits' \\(accepted: max_number\\)"),
        ("addition", {}, {}, "need at least one split"),
        ("addition", {"train": 0}, {}, r"sizes\['train'\]=0: must be a positive integer"),
        ("addition", {"train": 5, "test": -1}, {}, r"sizes\['test'\]=-1"),
        ("addition", {"train": 2.5}, {}, r"sizes\['train'\]=2.5"),
        ("addition", {"": 2}, {}, "split name '' must be a non-empty string"),
    ],
)
def test_make_splits_refuses_bad_requests(kind: str, sizes: dict, options: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        make_splits(kind, sizes, 0, **options)


# ---------------------------------------------------------------------------------------------- JSON lines


def test_jsonl_round_trip_keeps_unicode_and_skips_blank_lines(tmp_path: Path) -> None:
    examples = [Example("123+456=", "579"), Example("reverse ab\u2028c=", "c\u2028ba"), Example("é", "ü")]
    path = tmp_path / "split.jsonl"
    write_jsonl(path, examples)
    assert load_jsonl(path) == examples
    path.write_text(
        '\n{"prompt": "1+1=", "answer": "2", "id": 7}\n   \n{"prompt": "a", "answer": "b"}', encoding="utf-8"
    )
    assert load_jsonl(path) == [Example("1+1=", "2"), Example("a", "b")]  # extra fields ignored


@pytest.mark.parametrize(
    ("second_line", "problem"),
    [
        ('{"prompt": "1+1=", "answer": "2"', "not JSON"),
        ("plain text", "not JSON"),
        ('["1+1=", "2"]', "not a JSON object \\(got list\\)"),
        ('"1+1="', "not a JSON object \\(got str\\)"),
        ('{"prompt": "1+1="}', "missing field 'answer'"),
        ('{"answer": "2"}', "missing field 'prompt'"),
        ('{"prompt": "1+1=", "answer": ""}', "field 'answer' is empty"),
        ('{"prompt": "1+1=", "answer": "   "}', "field 'answer' is empty"),
        ('{"prompt": "", "answer": "2"}', "field 'prompt' is empty"),
        ('{"prompt": "1+1=", "answer": 2}', "field 'answer' must be a string, got int"),
        ('{"prompt": null, "answer": "2"}', "field 'prompt' must be a string, got NoneType"),
    ],
)
def test_load_jsonl_names_the_file_line_and_problem(tmp_path: Path, second_line: str, problem: str) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"prompt": "2+2=", "answer": "4"}) + "\n" + second_line + "\n", encoding="utf-8")
    with pytest.raises(ValueError, match=rf"^{re.escape(str(path))}:2: {problem}"):
        load_jsonl(path)


def test_load_jsonl_counts_lines_from_one_including_blank_ones(tmp_path: Path) -> None:
    path = tmp_path / "gap.jsonl"
    path.write_text('{"prompt": "a", "answer": "b"}\n\n\n{"prompt": "a"}\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"gap.jsonl:4: missing field 'answer'"):
        load_jsonl(path)


@pytest.mark.parametrize(
    ("content", "problem"), [(b"", "no examples"), (b"\n  \n", "no examples"), (b"\xff\xfe", "cannot read as UTF-8")]
)
def test_load_jsonl_refuses_empty_and_unreadable_files(tmp_path: Path, content: bytes, problem: str) -> None:
    path = tmp_path / "empty.jsonl"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=rf"{re.escape(str(path))}: {problem}"):
        load_jsonl(path)
    with pytest.raises(ValueError, match=r"missing.jsonl: cannot read"):
        load_jsonl(tmp_path / "missing.jsonl")
