"""Tests for the text track's tokenizers: round trips, unseen characters, determinism, save/load."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline_lib.core.errors import DataError
from pipeline_lib.text.data.tokenizer import (
    REPLACEMENT_CHAR,
    TOKENIZERS,
    BpeTokenizer,
    CharTokenizer,
    count_chars,
    fit_tokenizer,
    load_tokenizer,
)

TRAIN = (
    "The quick brown fox jumps over the lazy dog.\n"
    "Pack my box with five dozen liquor jugs!\n"
    "    def f(x):\n        return x * 2  # indented code, tabs:\tand spaces\n"
) * 20
# Characters never seen in TRAIN: accents, emoji (outside the BMP), CJK, a zero-width joiner sequence, CRLF.
UNSEEN = "Crème brûlée 🙂🚀 中文 Ωμέγα 👩‍💻\r\n\t\x00 \u00a0end"
BPE_VOCAB = 300


@pytest.fixture(scope="module")
def bpe() -> BpeTokenizer:
    return fit_tokenizer("bpe", TRAIN, vocab_size=BPE_VOCAB)  # type: ignore[return-value]


@pytest.fixture(scope="module")
def char() -> CharTokenizer:
    return fit_tokenizer("char", TRAIN, vocab_size=512)  # type: ignore[return-value]


def test_registry_dispatches_both_kinds(char: CharTokenizer, bpe: BpeTokenizer) -> None:
    assert set(TOKENIZERS) == {"char", "bpe", "special"}
    assert isinstance(char, CharTokenizer) and char.kind == "char"
    assert isinstance(bpe, BpeTokenizer) and bpe.kind == "bpe"
    with pytest.raises(ValueError, match=r"unknown tokenizer kind 'word' \(accepted: char, bpe\)"):
        fit_tokenizer("word", TRAIN, vocab_size=512)


def test_char_vocabulary_is_sorted_training_characters_plus_unk(char: CharTokenizer) -> None:
    assert char.chars == sorted(set(TRAIN))
    assert char.vocab_size == len(set(TRAIN)) + 1
    assert char.unk_id == char.vocab_size - 1
    assert char.encode(char.chars[0] + char.chars[-1]) == [0, len(char.chars) - 1]


def test_char_round_trip_is_lossless_for_training_characters(char: CharTokenizer) -> None:
    text = "".join(reversed(TRAIN[:500]))
    ids = char.encode(text)
    assert len(ids) == count_chars(text) == len(text)
    assert char.decode(ids) == text


def test_char_unseen_characters_encode_to_unk_and_decode_as_replacement(char: CharTokenizer) -> None:
    text = "fox 🙂 é!"
    ids = char.encode(text)
    assert len(ids) == len(text)  # one id per character, seen or not
    assert [i for i, c in zip(ids, text, strict=True) if c not in TRAIN] == [char.unk_id, char.unk_id]
    assert char.decode(ids) == f"fox {REPLACEMENT_CHAR} {REPLACEMENT_CHAR}!"


@pytest.mark.parametrize("text", [TRAIN, UNSEEN, TRAIN[:300] + UNSEEN + TRAIN[:50], "", " ", "\n\n\n", "🙂"])
def test_bpe_round_trip_is_lossless_for_any_unicode(bpe: BpeTokenizer, text: str) -> None:
    assert bpe.decode(bpe.encode(text)) == text


def test_bpe_compresses_training_text_and_respects_vocab_size(bpe: BpeTokenizer) -> None:
    assert 256 < bpe.vocab_size <= BPE_VOCAB
    ids = bpe.encode(TRAIN)
    assert max(ids) < bpe.vocab_size
    assert len(ids) < 0.7 * len(TRAIN.encode("utf-8"))  # merges were learned and are used


def test_bpe_stops_below_the_requested_size_when_merges_run_out() -> None:
    small = fit_tokenizer("bpe", "abab abab", vocab_size=10_000)
    assert 256 < small.vocab_size < 10_000
    assert small.decode(small.encode(UNSEEN)) == UNSEEN


def test_bpe_refuses_a_vocabulary_without_room_for_merges() -> None:
    with pytest.raises(ValueError, match=r"vocab_size=256 must be >= 257"):
        fit_tokenizer("bpe", TRAIN, vocab_size=256)


@pytest.mark.parametrize("kind", ["char", "bpe"])
def test_fitting_is_deterministic(kind: str) -> None:
    first = fit_tokenizer(kind, TRAIN, vocab_size=BPE_VOCAB)
    second = fit_tokenizer(kind, TRAIN, vocab_size=BPE_VOCAB)
    probe = TRAIN[::7] + UNSEEN
    assert first.encode(probe) == second.encode(probe)
    assert first.to_dict() == second.to_dict()


@pytest.mark.parametrize("kind", ["char", "bpe"])
def test_save_and_load_give_an_equal_tokenizer(kind: str, tmp_path: Path) -> None:
    fitted = fit_tokenizer(kind, TRAIN, vocab_size=BPE_VOCAB)
    fitted.save(tmp_path / "tokenizer.json")
    assert json.loads((tmp_path / "tokenizer.json").read_text())["kind"] == kind
    loaded = load_tokenizer(tmp_path / "tokenizer.json")
    assert type(loaded) is type(fitted)
    assert loaded.vocab_size == fitted.vocab_size
    assert loaded.to_dict() == fitted.to_dict()
    probe = TRAIN[:400] + UNSEEN
    assert loaded.encode(probe) == fitted.encode(probe)
    assert loaded.decode(fitted.encode(probe)) == fitted.decode(fitted.encode(probe))


def test_char_save_keeps_unusual_training_characters(tmp_path: Path) -> None:
    fitted = fit_tokenizer("char", UNSEEN, vocab_size=1)
    fitted.save(tmp_path / "tokenizer.json")
    loaded = load_tokenizer(tmp_path / "tokenizer.json")
    assert loaded.decode(loaded.encode(UNSEEN)) == UNSEEN


@pytest.mark.parametrize("kind", ["char", "bpe"])
def test_decode_refuses_ids_outside_the_vocabulary(kind: str) -> None:
    fitted = fit_tokenizer(kind, TRAIN, vocab_size=BPE_VOCAB)
    for bad in (fitted.vocab_size, -1):
        with pytest.raises(ValueError, match=f"id {bad} is outside range"):
            fitted.decode([0, bad])


def test_load_names_the_file_for_an_unknown_kind_or_bad_json(tmp_path: Path) -> None:
    (tmp_path / "word.json").write_text(json.dumps({"kind": "word"}))
    with pytest.raises(DataError, match=r"word\.json: unknown tokenizer kind 'word'"):
        load_tokenizer(tmp_path / "word.json")
    (tmp_path / "broken.json").write_text("{not json")
    with pytest.raises(DataError, match=r"broken\.json: cannot read tokenizer"):
        load_tokenizer(tmp_path / "broken.json")
    (tmp_path / "bpe.json").write_text(json.dumps({"kind": "bpe", "tokenizer": "{}"}))
    with pytest.raises(DataError, match=r"bpe\.json: malformed bpe tokenizer"):
        load_tokenizer(tmp_path / "bpe.json")
