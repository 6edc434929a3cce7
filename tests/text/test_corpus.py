"""Tests for text sources, the train/val split and the prepared text store (no network: url uses 127.0.0.1)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from pipeline_lib.core.download import sha256_file
from pipeline_lib.core.errors import ConfigError, DataError
from pipeline_lib.text.data import corpus
from pipeline_lib.text.data.corpus import prepare_text, read_source, read_text_meta, read_tokens, split_text
from pipeline_lib.text.data.tokenizer import CharTokenizer, load_tokenizer

LINES = "".join(f"line {i}: the quick brown fox\n" for i in range(200))
URL, ZEROS = "http://127.0.0.1:9/x.txt", "0" * 64


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _siblings(folder: Path) -> list[str]:
    """Names beside a prepared folder: a failed prepare must leave no out dir and no staging folder."""
    return sorted(p.name for p in folder.parent.iterdir()) if folder.parent.exists() else []


# ----------------------------------------------------------------------------------------------- split


@pytest.mark.parametrize("val_fraction", [0.01, 0.1, 0.25, 0.5])
def test_split_is_contiguous_at_a_line_boundary(val_fraction: float) -> None:
    train, val = split_text(LINES, val_fraction)
    assert train + val == LINES
    assert train.endswith("\n") and val.startswith("line ")
    cut = int(len(LINES) * (1 - val_fraction))
    assert cut <= len(train) < cut + len("line 199: the quick brown fox\n")  # the first newline at/after the cut
    assert split_text(LINES, val_fraction) == (train, val)


def test_split_without_a_usable_newline_cuts_at_the_character() -> None:
    text = "a" * 99 + "\n"  # the only newline is the last character: it would leave validation empty
    assert split_text(text, 0.1) == ("a" * 90, "a" * 9 + "\n")
    assert split_text("abcdefghij", 0.2) == ("abcdefgh", "ij")


@pytest.mark.parametrize(
    ("text", "val_fraction", "match"),
    [
        (LINES, 0.0, r"val_fraction=0.0: must be in \(0, 0.5\]"),
        (LINES, 0.6, r"val_fraction=0.6: must be in \(0, 0.5\]"),
        ("", 0.1, "0 characters is too short.*training part would be empty"),
        ("a", 0.5, "1 characters is too short.*training part would be empty"),
    ],
)
def test_split_refuses_bad_fractions_and_too_short_text(text: str, val_fraction: float, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        split_text(text, val_fraction)


# ------------------------------------------------------------------------------------------- embedded


@pytest.mark.parametrize(("kind", "vocab_size"), [("char", 512), ("bpe", 512)])
def test_embedded_corpus_prepares_and_reads_back(kind: str, vocab_size: int, tmp_path: Path) -> None:
    from pydoc_data.topics import topics

    out = tmp_path / "text"
    meta = prepare_text("embedded", tokenizer=kind, vocab_size=vocab_size, out_dir=out, cache_dir=tmp_path / "c")
    text = "\n\n".join(topics[name] for name in sorted(topics))
    assert len(text) > 400_000
    assert meta["source"] == "embedded" and meta["origin"] == "pydoc_data.topics"
    assert meta["source_sha256"] == _sha(text.encode("utf-8"))
    assert meta["python_version"].count(".") == 2
    assert meta == read_text_meta(out) and meta["tokenizer"] == kind and meta["dtype"] == "uint16"
    assert sorted(p.name for p in out.iterdir()) == ["meta.json", "tokenizer.json", "train.bin", "val.bin"]
    assert _siblings(out) == ["text"]  # no staging folder left, and nothing cached for embedded text

    train, val = split_text(text, 0.1)
    assert meta["num_chars"] == {"train": len(train), "val": len(val)}
    tokenizer = load_tokenizer(out / "tokenizer.json")
    assert meta["vocab_size"] == tokenizer.vocab_size
    if kind == "bpe":
        assert 256 < tokenizer.vocab_size <= vocab_size
    for split, part in (("train", train), ("val", val)):
        ids = read_tokens(out, split)
        assert isinstance(ids, np.memmap) and ids.dtype == np.dtype("<u2") and not ids.flags.writeable
        assert meta["num_tokens"][split] == len(ids)
        assert meta["sha256"][f"{split}.bin"] == sha256_file(out / f"{split}.bin")
        assert (out / f"{split}.bin").stat().st_size == 2 * len(ids)  # raw uint16, no header
        if split == "train":
            np.testing.assert_array_equal(ids, tokenizer.encode(part))
    if kind == "bpe":  # lossless even for characters only the validation text has
        assert tokenizer.decode(read_tokens(out, "val")) == val


# ----------------------------------------------------------------------------------------------- url


def test_url_source_downloads_verifies_and_prepares(http_server: tuple[str, Path], tmp_path: Path) -> None:
    base, served = http_server
    data = ("Ünïcödé text 🙂\n" + LINES).encode("utf-8")
    (served / "corpus.txt").write_bytes(data)
    out = tmp_path / "out" / "text"
    meta = prepare_text("url", url=f"{base}/corpus.txt", sha256=_sha(data).upper(), tokenizer="bpe",
                        vocab_size=300, out_dir=out, cache_dir=tmp_path / "cache")
    assert meta["origin"] == f"{base}/corpus.txt" and meta["source_sha256"] == _sha(data)
    train, val = split_text(data.decode("utf-8"), 0.1)
    tokenizer = load_tokenizer(out / "tokenizer.json")
    assert tokenizer.decode(read_tokens(out, "train")) + tokenizer.decode(read_tokens(out, "val")) == train + val


def test_url_with_a_wrong_sha256_names_both_digests_and_writes_nothing(
    http_server: tuple[str, Path], tmp_path: Path
) -> None:
    base, served = http_server
    data = LINES.encode("utf-8")
    (served / "corpus.txt").write_bytes(data)
    wrong = "0" * 64
    out = tmp_path / "out" / "text"
    with pytest.raises(DataError) as caught:
        prepare_text("url", url=f"{base}/corpus.txt", sha256=wrong, out_dir=out, cache_dir=tmp_path / "cache")
    message = str(caught.value)
    assert f"{base}/corpus.txt" in message and wrong in message and _sha(data) in message
    assert not out.exists() and _siblings(out) == []
    assert list((tmp_path / "cache").iterdir()) == []  # the refused download is not kept either


def test_url_that_is_not_utf8_is_refused_naming_it(http_server: tuple[str, Path], tmp_path: Path) -> None:
    base, served = http_server
    data = b"caf\xe9 latin-1\n" * 10
    (served / "latin1.txt").write_bytes(data)
    with pytest.raises(DataError, match=r"latin1\.txt.*not valid UTF-8"):
        prepare_text("url", url=f"{base}/latin1.txt", sha256=_sha(data), out_dir=tmp_path / "text",
                     cache_dir=tmp_path / "cache")
    assert not (tmp_path / "text").exists()


# -------------------------------------------------------------------------------------------- folder


def test_folder_reads_every_txt_file_in_sorted_order(tmp_path: Path) -> None:
    root = tmp_path / "corpus"
    (root / "b").mkdir(parents=True)
    (root / "b" / "2.txt").write_text("second\n", encoding="utf-8")
    (root / "a.txt").write_text("first\n", encoding="utf-8")
    (root / "b" / "1.txt").write_text("between\n", encoding="utf-8")
    (root / "notes.md").write_text("not text data\n", encoding="utf-8")
    read = read_source("folder", path=root, cache_dir=tmp_path / "cache")
    assert read.text == "first\n\n\nbetween\n\n\nsecond\n"
    assert read.origin == {"origin": str(root), "source_sha256": _sha(read.text.encode()), "num_files": 3}


def test_folder_prepare_fits_the_tokenizer_on_train_only(tmp_path: Path) -> None:
    root = tmp_path / "corpus"
    root.mkdir()
    (root / "doc.txt").write_text(LINES + "Zen: the quick brown fox\n", encoding="utf-8")
    out = tmp_path / "text"
    meta = prepare_text("folder", path=str(root), val_fraction=0.1, out_dir=out, cache_dir=tmp_path / "cache")
    tokenizer = load_tokenizer(out / "tokenizer.json")
    assert isinstance(tokenizer, CharTokenizer)
    assert "Z" not in tokenizer.chars and meta["vocab_size"] == tokenizer.vocab_size
    assert tokenizer.encode("Z") == [tokenizer.unk_id]
    val = read_tokens(out, "val")
    assert tokenizer.unk_id in val.tolist() and tokenizer.unk_id not in read_tokens(out, "train").tolist()
    assert tokenizer.decode(val).endswith("\nline 199: the quick brown fox\n\ufffden: the quick brown fox\n")


def test_folder_without_txt_files_is_an_error_naming_it(tmp_path: Path) -> None:
    root = tmp_path / "empty"
    root.mkdir()
    (root / "readme.md").write_text("no text here")
    with pytest.raises(DataError, match=f"{root}: no \\*.txt files"):
        prepare_text("folder", path=root, out_dir=tmp_path / "text", cache_dir=tmp_path / "cache")
    assert not (tmp_path / "text").exists()


def test_folder_with_a_non_utf8_file_names_the_file(tmp_path: Path) -> None:
    root = tmp_path / "corpus"
    root.mkdir()
    (root / "good.txt").write_text(LINES, encoding="utf-8")
    (root / "bad.txt").write_bytes(b"\xff\xfe not utf-8")
    with pytest.raises(DataError, match=f"{root / 'bad.txt'}: not valid UTF-8"):
        prepare_text("folder", path=root, out_dir=tmp_path / "text", cache_dir=tmp_path / "cache")
    assert not (tmp_path / "text").exists()


# --------------------------------------------------------------------------------------------- stdlib

# A toy standard library: what `stdlib` reads (in this order) and what it must skip, written out of order.
TOY_LIBRARY = {
    "zipfile.py": "import io\n",
    "a/b.py": "def b():\n    return 2\n",
    "abc.py": "class ABC:\n    pass\n",
    "a/__init__.py": "from a.b import b\n",
    "a/test/test_b.py": "assert False\n",
    "test/test_abc.py": "assert False\n",
    "a/tests/t.py": "assert False\n",
    "site-packages/torch/__init__.py": "third party\n",
    "encodings/cp1252.py": "decoding_table = ()\n",
    "pydoc_data/topics.py": "topics = {}\n",
    "a/__pycache__/b.py": "stale\n",
    "empty/__init__.py": "",
    "README.txt": "not python\n",
}
TOY_ORDER = ["a/__init__.py", "a/b.py", "abc.py", "empty/__init__.py", "zipfile.py"]


@pytest.fixture
def toy_library(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """`TOY_LIBRARY` written under tmp_path/lib, standing in for this Python's standard library folder."""
    root = tmp_path / "lib"
    for name, text in TOY_LIBRARY.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text, encoding="utf-8")
    monkeypatch.setattr(corpus, "stdlib_root", lambda: root)
    return root


def test_stdlib_reads_the_library_source_in_path_order_without_tests_packages_or_tables(toy_library: Path) -> None:
    read = read_source("stdlib", cache_dir=toy_library.parent / "c")
    assert read.text == "\n\n".join(TOY_LIBRARY[name] for name in TOY_ORDER)
    assert read.origin["origin"] == "stdlib" and read.origin["num_files"] == len(TOY_ORDER)
    assert read.origin["num_bytes"] == len(read.text.encode("utf-8"))
    assert read.origin["source_sha256"] == _sha(read.text.encode("utf-8"))
    assert read.origin["python_version"].count(".") == 2
    only_a = read_source("stdlib", modules=["a"], cache_dir=toy_library.parent / "c")
    assert only_a.text == TOY_LIBRARY["a/__init__.py"] + "\n\n" + TOY_LIBRARY["a/b.py"]
    both = read_source("stdlib", modules=["zipfile", "abc"], cache_dir=toy_library.parent / "c")
    assert both.text == TOY_LIBRARY["abc.py"] + "\n\n" + TOY_LIBRARY["zipfile.py"]  # path order, not the list's


@pytest.mark.parametrize(
    ("modules", "error", "match"),
    [
        (["nosuch"], ConfigError, r"text_data\.modules: 'nosuch' is no module or package of the standard library"),
        (["encodings"], ConfigError, r"text_data\.modules: 'encodings' is no module.*excluded folders"),
        (["empty"], DataError, r"text_data\.modules=\['empty'\]: the selected standard library files hold no text"),
        ([], ValueError, r"text_data\.modules=\[\]: must be null \(the whole library\) or a non-empty list"),
    ],
)
def test_stdlib_selection_that_yields_no_text_is_refused_naming_the_key(
    toy_library: Path, modules: list[str], error: type[Exception], match: str
) -> None:
    out = toy_library.parent / "text"
    with pytest.raises(error, match=match):
        prepare_text("stdlib", modules=modules, out_dir=out, cache_dir=toy_library.parent / "c")
    assert not out.exists()


def test_stdlib_of_this_python_is_deterministic_and_its_meta_says_what_it_read(tmp_path: Path) -> None:
    root = corpus.stdlib_root()
    files = sorted(path.relative_to(root).as_posix() for path in (root / "json").rglob("*.py")
                   if "__pycache__" not in path.parts and "tests" not in path.parts)
    text = "\n\n".join((root / name).read_text(encoding="utf-8") for name in files)
    metas = [prepare_text("stdlib", modules=["json"], tokenizer="bpe", vocab_size=300, out_dir=tmp_path / f"t{run}",
                          cache_dir=tmp_path / "c") for run in range(2)]
    assert metas[0] == metas[1]  # the same files, bytes, split and tokenizer every time
    meta = metas[0]
    assert meta["source"] == "stdlib" and meta["num_files"] == len(files) >= 4
    assert meta["source_sha256"] == _sha(text.encode("utf-8")) and meta["num_bytes"] == len(text.encode("utf-8"))
    assert meta["num_chars"]["train"] + meta["num_chars"]["val"] == len(text)
    import platform

    assert meta["python_version"] == platform.python_version()


# ---------------------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"source": "wiki"}, r"text_data\.source='wiki': must be one of 'embedded', 'url', 'folder', 'stdlib'"),
        ({"source": "embedded", "modules": ["json"]}, r"text_data\.modules=\['json'\]: only used with "
                                                      r"text_data\.source='stdlib'"),
        ({"source": "url", "url": URL}, r"text_data\.sha256: required with text_data\.source='url'"),
        ({"source": "url", "sha256": ZEROS}, r"text_data\.url: required with text_data\.source='url'"),
        ({"source": "url", "url": URL, "sha256": "abc"}, r"text_data\.sha256='abc': must be 64 hex"),
        ({"source": "url", "url": "ftp://h/x", "sha256": ZEROS}, r"text_data\.url='ftp://h/x': the scheme must"),
        ({"source": "folder"}, r"text_data\.path: required with text_data\.source='folder'"),
        ({"source": "folder", "path": "/no/such/folder"}, r"text_data\.path='/no/such/folder': no such folder"),
        ({"source": "embedded", "url": URL}, r"text_data\.url='http.*': only used with text_data\.source='url'"),
        ({"source": "embedded", "tokenizer": "word"}, r"text_data\.tokenizer='word': must be one of 'char', 'bpe'"),
        ({"source": "embedded", "val_fraction": 0.7}, r"text_data\.val_fraction=0\.7: must be a number in \(0, 0\.5\]"),
        ({"source": "embedded", "vocab_size": 0}, r"text_data\.vocab_size=0: must be a positive integer"),
        ({"source": "embedded", "tokenizer": "bpe", "vocab_size": 100}, r"text_data\.vocab_size=100: must be >= 257"),
    ],
)
def test_bad_arguments_are_refused_before_any_work(
    kwargs: dict[str, Any], match: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_read(*args: object, **kw: object) -> None:
        raise AssertionError("the source was read before the arguments were checked")

    monkeypatch.setattr(corpus, "read_source", no_read)
    with pytest.raises(ValueError, match=match):
        prepare_text(out_dir=tmp_path / "text", cache_dir=tmp_path / "cache", **kwargs)
    assert sorted(p.name for p in tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------------------ atomicity


def _fail_fitting(monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(kind: str, text: str, *, vocab_size: int) -> None:
        raise RuntimeError("tokenizer kind failed after the source was read")

    monkeypatch.setattr(corpus, "fit_tokenizer", boom)


def _fail_while_writing(monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(self: CharTokenizer, path: Path) -> None:
        assert (path.parent / "train.bin").is_file()  # the staging folder is half written
        raise RuntimeError("interrupted while writing")

    monkeypatch.setattr(CharTokenizer, "save", boom)


@pytest.mark.parametrize("fail", [_fail_fitting, _fail_while_writing])
def test_an_interrupted_prepare_leaves_no_out_dir_and_keeps_the_previous_one(
    fail: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tmp_path / "corpus"
    root.mkdir()
    (root / "doc.txt").write_text(LINES, encoding="utf-8")
    args = {"path": root, "out_dir": tmp_path / "out" / "text", "cache_dir": tmp_path / "cache"}
    fail(monkeypatch)
    with pytest.raises(RuntimeError):
        prepare_text("folder", **args)
    assert _siblings(args["out_dir"]) == []

    monkeypatch.undo()
    before = prepare_text("folder", **args)
    fail(monkeypatch)
    with pytest.raises(RuntimeError):
        prepare_text("folder", **{**args, "val_fraction": 0.3})
    assert _siblings(args["out_dir"]) == ["text"]
    assert read_text_meta(args["out_dir"]) == before
    assert json.loads((args["out_dir"] / "meta.json").read_text())["val_fraction"] == 0.1


def test_read_tokens_refuses_unknown_splits_and_unprepared_folders(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="split='test': must be one of 'train', 'val'"):
        read_tokens(tmp_path, "test")
    with pytest.raises(DataError, match="no prepared text here"):
        read_tokens(tmp_path, "train")
