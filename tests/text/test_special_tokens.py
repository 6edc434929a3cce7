"""SpecialTokens: a base tokenizer plus special-token ids after its vocabulary; round trips, ids, save/load."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline_lib.text.data.tokenizer import (
    FITTABLE,
    SpecialTokens,
    Tokenizer,
    fit_tokenizer,
    load_tokenizer,
    tokenizer_from_dict,
)

TRAIN = "12+345=357\n98+7=105\nthe answer is 579 <b> a<b and a>b\n" * 10
SPECIALS = ("<answer>", "</answer>", "<eos>")
COMPLETION = "<answer>579</answer><eos>"
TEXTS = [
    COMPLETION,
    "12+345=" + COMPLETION,
    "<eos><eos><answer></answer><eos>",  # specials adjacent to each other, at the start and the end
    "the answer is <answer> 579 </answer> a<b<eos>",  # base text holding a bare "<" next to a special
    "<answer",  # a special's prefix is plain text
    "",
]


@pytest.fixture(scope="module", params=["char", "bpe"])
def base(request: pytest.FixtureRequest) -> Tokenizer:
    return fit_tokenizer(request.param, TRAIN, vocab_size=300)


@pytest.fixture(scope="module")
def special(base: Tokenizer) -> SpecialTokens:
    return SpecialTokens(base, SPECIALS)


@pytest.mark.parametrize("text", TEXTS)
def test_round_trip_is_exact(special: SpecialTokens, text: str) -> None:
    ids = special.encode(text)
    assert special.decode(ids) == text
    assert all(0 <= i < special.vocab_size for i in ids)


def test_special_ids_follow_the_base_vocabulary(special: SpecialTokens, base: Tokenizer) -> None:
    assert special.vocab_size == base.vocab_size + len(SPECIALS)
    for i, token in enumerate(SPECIALS):
        assert special.token_id(token) == base.vocab_size + i
        assert special.encode(token) == [base.vocab_size + i]  # one id, whatever the base does with "<"
        assert special.decode([base.vocab_size + i]) == token
    answer, close, eos = (special.token_id(s) for s in SPECIALS)
    assert special.encode(COMPLETION) == [answer, *base.encode("579"), close, eos]
    with pytest.raises(KeyError, match="<think>"):
        special.token_id("<think>")


def test_specials_at_the_ends_and_adjacent_are_one_id_each(special: SpecialTokens, base: Tokenizer) -> None:
    answer, close, eos = (special.token_id(s) for s in SPECIALS)
    assert special.encode("<eos><eos><answer></answer><eos>") == [eos, eos, answer, close, eos]
    assert special.encode("<eos>12+3=<eos>") == [eos, *base.encode("12+3="), eos]


def test_base_text_keeps_its_base_ids(special: SpecialTokens, base: Tokenizer) -> None:
    """Text without a special token encodes exactly as the base does (a pretrained model's ids keep meaning)."""
    for text in ("12+345=357", "a<b and a>b", "<answer"):
        assert special.encode(text) == base.encode(text)
    # base ids decode as the base decodes them, runs split by a special decode separately
    ids = base.encode("98+7=")
    assert special.decode([*ids, special.token_id("<eos>"), *ids]) == "98+7=<eos>98+7="


def test_longest_special_wins_where_two_start_at_the_same_place(base: Tokenizer) -> None:
    special = SpecialTokens(base, ["<", "<<"])
    short, long = special.token_id("<"), special.token_id("<<")
    assert special.encode("<<<") == [long, short]
    assert special.encode("a<<b") == [*base.encode("a"), long, *base.encode("b")]
    assert special.decode(special.encode("<<<")) == "<<<"


def test_save_and_load_give_identical_ids(special: SpecialTokens, base: Tokenizer, tmp_path: Path) -> None:
    path = tmp_path / "tokenizer.json"
    special.save(path)
    loaded = load_tokenizer(path)
    assert isinstance(loaded, SpecialTokens) and loaded.kind == "special"
    assert loaded.specials == list(SPECIALS) and loaded.base.kind == base.kind
    assert loaded.vocab_size == special.vocab_size
    for text in TEXTS:
        assert loaded.encode(text) == special.encode(text)
        assert loaded.decode(special.encode(text)) == text


def test_nesting_merges_the_specials(base: Tokenizer) -> None:
    inner = SpecialTokens(base, ["<answer>", "</answer>"])
    outer = SpecialTokens(inner, ["</answer>", "<eos>"])  # "</answer>" again: not added twice
    flat = SpecialTokens(base, SPECIALS)
    assert outer.base is base and not isinstance(outer.base, SpecialTokens)
    assert outer.specials == list(SPECIALS)
    assert outer.vocab_size == flat.vocab_size
    assert outer.encode(TEXTS[1]) == flat.encode(TEXTS[1])
    assert tokenizer_from_dict({"kind": "special", **outer.to_dict()}).encode(TEXTS[2]) == flat.encode(TEXTS[2])


@pytest.mark.parametrize("specials", [[], [""], ["<eos>", ""], ["<eos>", "<eos>"]], ids=["none", "empty", "one-empty",
                                                                                         "duplicate"])
def test_bad_specials_are_refused(base: Tokenizer, specials: list[str]) -> None:
    with pytest.raises(ValueError, match="special tokens"):
        SpecialTokens(base, specials)


def test_ids_outside_the_vocabulary_are_refused(special: SpecialTokens) -> None:
    with pytest.raises(ValueError, match="outside range"):
        special.decode([special.vocab_size])
    with pytest.raises(ValueError, match="outside range"):
        special.decode([-1])


def test_special_tokens_cannot_be_fitted() -> None:
    assert "special" not in FITTABLE
    with pytest.raises(ValueError, match=r"unknown tokenizer kind 'special' \(accepted: char, bpe\)"):
        fit_tokenizer("special", TRAIN, vocab_size=300)
    with pytest.raises(TypeError, match="extend a fitted tokenizer"):
        SpecialTokens.fit(TRAIN, vocab_size=300)
    with pytest.raises(ValueError, match="unknown tokenizer kind 'word'"):
        tokenizer_from_dict({"kind": "word"})
