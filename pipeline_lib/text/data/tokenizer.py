"""Tokenizers for the text track: characters or byte-level BPE, behind one small interface.

Both kinds map text to a flat list of ids in ``range(vocab_size)`` and back, and save to one JSON file whose
``"kind"`` field tells `load_tokenizer` which class to rebuild:

- ``char``: one id per distinct character of the training text (sorted, so ids are deterministic) plus a
  final ``<unk>`` id. A character never seen in training encodes to ``<unk>`` and decodes as U+FFFD, so the
  round trip is lossless exactly for text made of training characters.
- ``bpe``: byte-level BPE trained with the `tokenizers` library. All 256 bytes are in the vocabulary, so any
  unicode text encodes and decodes back unchanged, whatever characters training saw.

Bits per character are computed later from the number of characters of the decoded text (`count_chars`),
never from the number of tokens, so the two kinds are comparable.

Examples:
    >>> tokenizer = fit_tokenizer("char", "hello world\\n", vocab_size=512)
    >>> tokenizer.decode(tokenizer.encode("hello"))
    'hello'
    >>> tokenizer.decode(tokenizer.encode("hello!")) == "hello\\ufffd"  # "!" was not in the training text
    True
"""

from __future__ import annotations

import abc
import json
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, ClassVar

import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

from pipeline_lib.core.errors import DataError

UNK_TOKEN = "<unk>"
REPLACEMENT_CHAR = "\ufffd"
# 256 byte symbols and at least one merge; below that a "BPE" is just bytes.
MIN_BPE_VOCAB_SIZE = 257


def count_chars(text: str) -> int:
    """Number of characters (unicode code points) of `text`, the denominator of bits per character."""
    return len(text)


class Tokenizer(abc.ABC):
    """Text <-> ids in ``range(vocab_size)``; subclasses set `kind` and implement the abstract methods."""

    kind: ClassVar[str]

    @classmethod
    @abc.abstractmethod
    def fit(cls, text: str, *, vocab_size: int) -> Tokenizer:
        """Learn a vocabulary from `text` (the training split only)."""

    @classmethod
    @abc.abstractmethod
    def from_dict(cls, data: dict[str, Any]) -> Tokenizer:
        """Rebuild a tokenizer from what `to_dict` returned."""

    @property
    @abc.abstractmethod
    def vocab_size(self) -> int:
        """Number of ids; every id `encode` returns is below it."""

    @abc.abstractmethod
    def encode(self, text: str) -> list[int]:
        """Ids of `text`."""

    @abc.abstractmethod
    def decode(self, ids: Iterable[int]) -> str:
        """Text of `ids`; raises ValueError for an id outside ``range(vocab_size)``."""

    @abc.abstractmethod
    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable state, without the ``"kind"`` field."""

    def save(self, path: Path) -> None:
        """Write the tokenizer to one JSON file that `load_tokenizer` reads back."""
        Path(path).write_text(json.dumps({"kind": self.kind, **self.to_dict()}, indent=1) + "\n", encoding="utf-8")

    def _checked_ids(self, ids: Iterable[int]) -> list[int]:
        """`ids` as Python ints, refusing any outside ``range(vocab_size)``."""
        checked = [int(i) for i in ids]
        if checked and (min(checked) < 0 or max(checked) >= self.vocab_size):
            bad = next(i for i in checked if not 0 <= i < self.vocab_size)
            raise ValueError(f"{self.kind} tokenizer: id {bad} is outside range(vocab_size={self.vocab_size})")
        return checked


class CharTokenizer(Tokenizer):
    """One id per training character, in sorted order, then ``<unk>`` (id ``len(chars)``) for the rest.

    Args:
        chars: The distinct characters of the training text; ids follow this order.
    """

    kind = "char"

    def __init__(self, chars: Sequence[str]) -> None:
        chars = list(chars)
        if any(len(c) != 1 for c in chars) or len(set(chars)) != len(chars):
            raise ValueError("char tokenizer: chars must be distinct single characters")
        self.chars = chars
        self.unk_id = len(chars)
        self._ids = {c: i for i, c in enumerate(chars)}
        self._symbols = [*chars, REPLACEMENT_CHAR]  # what each id decodes to

    @classmethod
    def fit(cls, text: str, *, vocab_size: int) -> CharTokenizer:
        """Vocabulary = sorted distinct characters of `text`; `vocab_size` is not used (the text fixes it)."""
        if not text:
            raise ValueError("char tokenizer: cannot fit on empty text")
        return cls(sorted(set(text)))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CharTokenizer:
        """Rebuild from ``{"chars": [...]}``."""
        return cls(data["chars"])

    @property
    def vocab_size(self) -> int:
        """Training characters plus ``<unk>``."""
        return len(self.chars) + 1

    def encode(self, text: str) -> list[int]:
        """One id per character; characters not seen in training become ``unk_id``."""
        ids, unk = self._ids, self.unk_id
        return [ids.get(c, unk) for c in text]

    def decode(self, ids: Iterable[int]) -> str:
        """One character per id; ``unk_id`` becomes U+FFFD."""
        return "".join(self._symbols[i] for i in self._checked_ids(ids))

    def to_dict(self) -> dict[str, Any]:
        """The character list (JSON escapes keep any character intact) and the unknown token's name."""
        return {"chars": self.chars, "unk_token": UNK_TOKEN}


class BpeTokenizer(Tokenizer):
    """Byte-level BPE from the `tokenizers` library: lossless for any unicode text.

    Args:
        tokenizer: A trained `tokenizers.Tokenizer` with a ByteLevel pre-tokenizer and decoder.
    """

    kind = "bpe"

    def __init__(self, tokenizer: tokenizers.Tokenizer) -> None:
        self.tokenizer = tokenizer

    @classmethod
    def fit(cls, text: str, *, vocab_size: int) -> BpeTokenizer:
        """Train merges on `text` until the vocabulary holds `vocab_size` entries (fewer if merges run out).

        The 256 byte symbols are always in the vocabulary (``initial_alphabet``), so bytes of characters
        absent from `text` still encode; no special tokens are added. Training is deterministic.
        """
        if vocab_size < MIN_BPE_VOCAB_SIZE:
            raise ValueError(f"bpe tokenizer: vocab_size={vocab_size} must be >= {MIN_BPE_VOCAB_SIZE} "
                             "(256 byte symbols and at least one merge)")
        tokenizer = tokenizers.Tokenizer(models.BPE())
        # add_prefix_space=False: a leading space would be added on encode and kept on decode (not lossless).
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tokenizer.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            special_tokens=[],
            show_progress=False,
        )
        tokenizer.train_from_iterator([text], trainer=trainer)
        return cls(tokenizer)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> BpeTokenizer:
        """Rebuild from ``{"tokenizer": <tokenizers JSON string>}``."""
        return cls(tokenizers.Tokenizer.from_str(data["tokenizer"]))

    @property
    def vocab_size(self) -> int:
        """Byte symbols plus merges."""
        return self.tokenizer.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        """Byte-level BPE ids of `text`."""
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Iterable[int]) -> str:
        """The text whose bytes the ids spell (invalid UTF-8 from a partial sequence becomes U+FFFD)."""
        return self.tokenizer.decode(self._checked_ids(ids), skip_special_tokens=False)

    def to_dict(self) -> dict[str, Any]:
        """The `tokenizers` JSON, embedded as one string."""
        return {"tokenizer": self.tokenizer.to_str()}


class SpecialTokens(Tokenizer):
    """A base tokenizer plus special tokens with ids of their own after its vocabulary (task finetuning adds
    ``<answer>``, ``</answer>`` and the end-of-sequence token this way).

    `encode` cuts the text at every occurrence of a special token (the longest first where two start at the same
    place), encodes the pieces between with the base tokenizer and gives each special token its id, so
    ``"<answer>"`` is one id whatever the base does with ``<``. `decode` is the exact inverse for ids of
    text the base tokenizer round-trips. Ids below the base vocabulary keep their meaning, so a model trained on
    the base tokenizer keeps its embeddings for them.

    Args:
        base: the tokenizer of the pretraining data (a `SpecialTokens` is not nested: its specials are merged).
        specials: distinct, non-empty special-token strings; ids ``base.vocab_size + i`` in this order.
    """

    kind = "special"

    def __init__(self, base: Tokenizer, specials: Sequence[str]) -> None:
        if isinstance(base, SpecialTokens):
            base, specials = base.base, [*base.specials, *(s for s in specials if s not in base.specials)]
        specials = list(specials)
        if not specials or any(not s for s in specials) or len(set(specials)) != len(specials):
            raise ValueError(f"special tokens {specials!r}: need at least one, each non-empty and distinct")
        self.base, self.specials = base, specials
        self._ids = {s: base.vocab_size + i for i, s in enumerate(specials)}
        self._pattern = re.compile("|".join(re.escape(s) for s in sorted(specials, key=len, reverse=True)))

    @classmethod
    def fit(cls, text: str, *, vocab_size: int) -> SpecialTokens:
        raise TypeError("special tokens extend a fitted tokenizer: SpecialTokens(base, specials)")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SpecialTokens:
        """Rebuild from ``{"base": <a tokenizer's saved dict>, "specials": [...]}``."""
        return cls(tokenizer_from_dict(data["base"]), data["specials"])

    @property
    def vocab_size(self) -> int:
        """The base vocabulary plus the special tokens."""
        return self.base.vocab_size + len(self.specials)

    def token_id(self, special: str) -> int:
        """The id of one special token."""
        if special not in self._ids:
            raise KeyError(f"{special!r} is not a special token of this tokenizer ({', '.join(self.specials)})")
        return self._ids[special]

    def encode(self, text: str) -> list[int]:
        """Base ids of the text between special tokens, each special token as its own id."""
        ids: list[int] = []
        start = 0
        for match in self._pattern.finditer(text):
            ids += self.base.encode(text[start : match.start()]) if match.start() > start else []
            ids.append(self._ids[match.group()])
            start = match.end()
        return ids + (self.base.encode(text[start:]) if start < len(text) else [])

    def decode(self, ids: Iterable[int]) -> str:
        """Base text of each run of base ids, each special id as its string."""
        pieces, run = [], []
        size = self.base.vocab_size
        for i in self._checked_ids(ids):
            if i < size:
                run.append(i)
                continue
            if run:
                pieces.append(self.base.decode(run))
                run = []
            pieces.append(self.specials[i - size])
        if run:
            pieces.append(self.base.decode(run))
        return "".join(pieces)

    def to_dict(self) -> dict[str, Any]:
        """The base tokenizer's saved dict and the special tokens."""
        return {"base": {"kind": self.base.kind, **self.base.to_dict()}, "specials": self.specials}


TOKENIZERS: dict[str, type[Tokenizer]] = {"char": CharTokenizer, "bpe": BpeTokenizer, "special": SpecialTokens}
FITTABLE = ("char", "bpe")


def tokenizer_from_dict(data: dict[str, Any]) -> Tokenizer:
    """A tokenizer from the dict `Tokenizer.save` writes (with its ``"kind"``)."""
    kind = data.get("kind") if isinstance(data, dict) else None
    if kind not in TOKENIZERS:
        raise ValueError(f"unknown tokenizer kind {kind!r} (accepted: {', '.join(TOKENIZERS)})")
    return TOKENIZERS[kind].from_dict(data)


def fit_tokenizer(kind: str, text: str, *, vocab_size: int) -> Tokenizer:
    """Fit a tokenizer of `kind` on `text`.

    Args:
        kind: ``"char"`` or ``"bpe"``.
        text: Training text (never the validation split).
        vocab_size: Requested vocabulary size; an upper bound for ``bpe``, unused by ``char``.

    Returns:
        The fitted tokenizer; its `vocab_size` is the actual size.

    Raises:
        ValueError: If `kind` is unknown or `vocab_size` is too small for ``bpe``.
    """
    if kind not in FITTABLE:
        raise ValueError(f"unknown tokenizer kind {kind!r} (accepted: {', '.join(FITTABLE)})")
    return TOKENIZERS[kind].fit(text, vocab_size=vocab_size)


def load_tokenizer(path: Path) -> Tokenizer:
    """Read a tokenizer of either kind from the JSON file `Tokenizer.save` wrote.

    Raises:
        DataError: If the file cannot be read, is not JSON, or names an unknown kind.
    """
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise DataError(f"{path}: cannot read tokenizer ({exc})") from exc
    kind = data.get("kind") if isinstance(data, dict) else None
    if kind not in TOKENIZERS:
        raise DataError(f"{path}: unknown tokenizer kind {kind!r} (accepted: {', '.join(TOKENIZERS)})")
    try:
        return tokenizer_from_dict(data)
    except Exception as exc:  # tokenizers raises a bare Exception for a malformed JSON string
        raise DataError(f"{path}: malformed {kind} tokenizer ({exc})") from exc
