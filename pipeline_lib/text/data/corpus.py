"""Text sources, the train/val split and the prepared text store.

A prepared text folder holds ``train.bin`` and ``val.bin`` (token ids, a flat little-endian uint16 array, or
uint32 when the vocabulary exceeds 65,535 ids, written with `ndarray.tofile` and read back memory-mapped),
``tokenizer.json`` (fitted on the training split only) and ``meta.json`` (source, origin and its sha256,
tokenizer, vocabulary size, dtype, tokens and characters per split, the sha256 of each file). The folder is
written aside and renamed into place, so it is either complete or absent.

Sources (`SOURCES`):

- ``embedded``: the English documentation CPython ships, `pydoc_data.topics` (about 465k characters for
  Python 3.11), topics joined in sorted name order; no network.
- ``url``: one UTF-8 plain-text file, downloaded into the cache and verified against its sha256.
- ``folder``: every ``*.txt`` file under a local folder, recursively, in sorted relative-path order.
- ``stdlib``: the source code of the running Python's standard library (`STDLIB_EXCLUDED` says what is left
  out; about 10 MB of ``*.py`` files for CPython 3.11), files in sorted relative-path order; ``modules`` keeps
  only the named top-level modules and packages. No network, and ~70x the ``embedded`` text.
"""

from __future__ import annotations

import hashlib
import json
import platform
import re
import sysconfig
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline_lib.core.download import ACCEPTED_SCHEMES, download, sha256_file
from pipeline_lib.core.errors import ConfigError, DataError
from pipeline_lib.core.outputs import staged_dir
from pipeline_lib.core.tracking import Tracker, write_run_record
from pipeline_lib.text.config import TextDataParams, TextParams
from pipeline_lib.text.data.tokenizer import MIN_BPE_VOCAB_SIZE, TOKENIZERS, Tokenizer, count_chars, fit_tokenizer

SPLITS = ("train", "val")
DOCUMENT_SEPARATOR = "\n\n"
EMBEDDED_ORIGIN = "pydoc_data.topics"
_SHA256_RE = re.compile(r"[0-9a-fA-F]{64}")
_UINT16_MAX_VOCAB = 65535
# Folders of the standard library that `stdlib` skips, at any depth: the test suites, installed third-party
# packages, bytecode, and two folders of generated data rather than code (the codecs' tables, and
# `pydoc_data.topics`, the `embedded` corpus itself).
STDLIB_EXCLUDED = frozenset({"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__",
                             "encodings", "pydoc_data"})


@dataclass(frozen=True)
class SourceText:
    """A source's whole text and what meta.json records about where it came from.

    Attributes:
        text: The corpus, before splitting.
        origin: ``origin`` (URL, folder or ``pydoc_data.topics``), ``source_sha256`` and source-specific
            fields (``python_version``, ``num_documents``, ``num_files``).
    """

    text: str
    origin: dict[str, Any]


def _sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _decode_utf8(data: bytes, name: str) -> str:
    """`data` as UTF-8 text, or a DataError naming `name` and the first bad byte."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"{name}: not valid UTF-8 text (bad byte at offset {exc.start}: {exc.reason})") from exc


def _read_embedded(*, url: str | None, sha256: str | None, path: str | Path | None, modules: list[str] | None,
                   cache_dir: Path) -> SourceText:
    """The `pydoc_data.topics` documents (topic name -> text), joined in sorted name order."""
    del url, sha256, path, modules, cache_dir  # nothing to fetch
    try:
        from pydoc_data.topics import topics  # read at run time: the text is whatever this Python ships
    except ImportError as exc:  # some distributions package pydoc_data separately
        raise DataError(f"text_data.source='embedded' needs {EMBEDDED_ORIGIN}, missing from this Python") from exc
    text = DOCUMENT_SEPARATOR.join(topics[name] for name in sorted(topics))
    return SourceText(text, {
        "origin": EMBEDDED_ORIGIN,
        "source_sha256": _sha256_text(text),
        "python_version": platform.python_version(),
        "num_documents": len(topics),
    })


def _read_url(*, url: str | None, sha256: str | None, path: str | Path | None, modules: list[str] | None,
              cache_dir: Path) -> SourceText:
    """Download (or reuse from the cache) the file at `url`, verified against `sha256`, and decode it."""
    del path, modules
    assert url is not None and sha256 is not None  # checked by _check_args
    file = download(url, sha256, cache_dir)
    return SourceText(_decode_utf8(file.read_bytes(), f"{url} (cached as {file})"),
                      {"origin": url, "source_sha256": sha256.strip().lower()})


def _read_folder(*, url: str | None, sha256: str | None, path: str | Path | None, modules: list[str] | None,
                 cache_dir: Path) -> SourceText:
    """Every ``*.txt`` under `path`, recursively, sorted by relative path and joined with a blank line."""
    del url, sha256, modules, cache_dir
    assert path is not None  # checked by _check_args
    root = Path(path)
    files = sorted((p for p in root.rglob("*.txt") if p.is_file()), key=lambda p: p.relative_to(root).as_posix())
    if not files:
        raise DataError(f"{root}: no *.txt files in this folder or below (text_data.source='folder')")
    texts = []
    for file in files:
        try:
            data = file.read_bytes()
        except OSError as exc:
            raise DataError(f"{file}: cannot read ({exc})") from exc
        texts.append(_decode_utf8(data, str(file)))
    text = DOCUMENT_SEPARATOR.join(texts)
    return SourceText(text, {"origin": str(path), "source_sha256": _sha256_text(text), "num_files": len(files)})


def stdlib_root() -> Path:
    """The running Python's standard library folder."""
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_files(root: Path, modules: list[str] | None = None) -> list[Path]:
    """The `*.py` files of the standard library at `root`, sorted by relative POSIX path: none inside a folder
    named in `STDLIB_EXCLUDED`, and with `modules`, only those of the named top-level modules (`json.py`) and
    packages (`json/...`).

    Raises:
        ConfigError: naming ``text_data.modules`` when a name is no module of this library, or nothing is left.
    """
    files = sorted((path for path in root.rglob("*.py")
                    if path.is_file() and not STDLIB_EXCLUDED.intersection(path.relative_to(root).parts[:-1])),
                   key=lambda path: path.relative_to(root).as_posix())

    def top(path: Path) -> str:
        return path.relative_to(root).parts[0].removesuffix(".py")

    if modules is not None:
        present = {top(path) for path in files}
        unknown = [name for name in modules if name not in present]
        if unknown:
            raise ConfigError(f"text_data.modules: {', '.join(map(repr, unknown))} is no module or package of the "
                            f"standard library at {root} (or only holds excluded folders: "
                            f"{', '.join(sorted(STDLIB_EXCLUDED))})")
        files = [path for path in files if top(path) in set(modules)]
    if not files:
        raise ConfigError(f"text_data.modules={modules!r}: no *.py files left in the standard library at {root}")
    return files


def _read_stdlib(*, url: str | None, sha256: str | None, path: str | Path | None, modules: list[str] | None,
                 cache_dir: Path) -> SourceText:
    """The standard library's `stdlib_files`, decoded as UTF-8 and joined with a blank line."""
    del url, sha256, path, cache_dir  # nothing to fetch
    root = stdlib_root()
    files = stdlib_files(root, modules)
    texts = [_decode_utf8(file.read_bytes(), str(file)) for file in files]
    text = DOCUMENT_SEPARATOR.join(texts)
    if not text.strip():
        raise DataError(f"text_data.modules={modules!r}: the selected standard library files hold no text")
    return SourceText(text, {
        "origin": "stdlib",
        "source_sha256": _sha256_text(text),
        "python_version": platform.python_version(),
        "python_implementation": platform.python_implementation(),
        "num_files": len(files),
        "num_bytes": len(text.encode("utf-8")),
    })


SOURCES: dict[str, Callable[..., SourceText]] = {"embedded": _read_embedded, "url": _read_url, "folder": _read_folder,
                                                 "stdlib": _read_stdlib}
# Which location keys each source reads; any other one set is a mistake worth stopping for.
_SOURCE_KEYS = {"embedded": (), "url": ("url", "sha256"), "folder": ("path",), "stdlib": ("modules",)}
_OPTIONAL_KEYS = {"modules"}  # read by their source, but null there too


def read_source(
    source: str, *, url: str | None = None, sha256: str | None = None, path: str | Path | None = None,
    modules: list[str] | None = None, cache_dir: Path,
) -> SourceText:
    """Read the whole text of `source` (arguments as for `prepare_text`, checked there)."""
    return SOURCES[source](url=url, sha256=sha256, path=path, modules=modules, cache_dir=Path(cache_dir))


def split_text(text: str, val_fraction: float) -> tuple[str, str]:
    """Split `text` into contiguous (train, val) parts: val is the last `val_fraction` of it.

    The cut point ``int(len(text) * (1 - val_fraction))`` moves forward to just after the first newline at or
    after it, so validation starts at the beginning of a line. A newline that is the text's last character
    does not count (it would leave validation empty); with no other newline the cut stays where it is.
    ``train + val == text`` always.

    Args:
        text: The whole corpus.
        val_fraction: Share of the characters for validation, in (0, 0.5].

    Returns:
        (train, val), both non-empty.

    Raises:
        ValueError: If `val_fraction` is out of range, or the text is too short for two non-empty parts.
    """
    if not 0 < val_fraction <= 0.5:
        raise ValueError(f"val_fraction={val_fraction!r}: must be in (0, 0.5]")
    cut = int(len(text) * (1 - val_fraction))
    newline = text.find("\n", cut, len(text) - 1)
    if newline != -1:
        cut = newline + 1
    train, val = text[:cut], text[cut:]
    if not train or not val:
        raise ValueError(f"text of {len(text)} characters is too short to split with val_fraction={val_fraction}: "
                         f"the {'training' if not train else 'validation'} part would be empty")
    return train, val


def _check_location(source: str, url: str | None, sha256: str | None, path: str | Path | None,
                    modules: list[str] | None = None) -> None:
    """The location keys `source` needs are set and well formed; the others are unset."""
    values = {"url": url, "sha256": sha256, "path": path, "modules": modules}
    for key, value in values.items():
        if value is not None and key not in _SOURCE_KEYS[source]:
            user = next(name for name, keys in _SOURCE_KEYS.items() if key in keys)
            raise ValueError(f"text_data.{key}={value!r}: only used with text_data.source={user!r}; "
                             f"must be null with text_data.source={source!r}")
    for key in _SOURCE_KEYS[source]:
        if not values[key] and key not in _OPTIONAL_KEYS:
            raise ValueError(f"text_data.{key}: required with text_data.source={source!r}")
    if source == "url":
        scheme = urllib.parse.urlsplit(str(url)).scheme.lower()
        if scheme not in ACCEPTED_SCHEMES:
            raise ValueError(f"text_data.url={url!r}: the scheme must be one of {', '.join(ACCEPTED_SCHEMES)}")
        if not isinstance(sha256, str) or not _SHA256_RE.fullmatch(sha256.strip()):
            raise ValueError(f"text_data.sha256={sha256!r}: must be 64 hexadecimal characters (the file's sha256)")
    if source == "folder" and not Path(path).is_dir():  # type: ignore[arg-type]  # set, checked above
        raise ValueError(f"text_data.path={str(path)!r}: no such folder")
    if modules is not None and (not isinstance(modules, list) or not modules
                                or not all(isinstance(name, str) and name for name in modules)):
        raise ValueError(f"text_data.modules={modules!r}: must be null (the whole library) or a non-empty list of "
                         "top-level module and package names, e.g. [json, email]")
    if source == "stdlib":
        stdlib_files(stdlib_root(), modules)  # a listing, no reading: names the key when nothing is selected


def _check_args(
    source: str, url: str | None, sha256: str | None, path: str | Path | None,
    val_fraction: float, tokenizer: str, vocab_size: int, modules: list[str] | None = None,
) -> None:
    """Refuse bad arguments before any download or work; messages name the ``text_data.<key>``."""
    if source not in SOURCES:
        raise ValueError(f"text_data.source={source!r}: must be one of {', '.join(map(repr, SOURCES))}")
    if tokenizer not in TOKENIZERS:
        raise ValueError(f"text_data.tokenizer={tokenizer!r}: must be one of {', '.join(map(repr, TOKENIZERS))}")
    if isinstance(val_fraction, bool) or not isinstance(val_fraction, (int, float)) or not 0 < val_fraction <= 0.5:
        raise ValueError(f"text_data.val_fraction={val_fraction!r}: must be a number in (0, 0.5]")
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 1:
        raise ValueError(f"text_data.vocab_size={vocab_size!r}: must be a positive integer")
    if tokenizer == "bpe" and vocab_size < MIN_BPE_VOCAB_SIZE:
        raise ValueError(f"text_data.vocab_size={vocab_size}: must be >= {MIN_BPE_VOCAB_SIZE} with "
                         "text_data.tokenizer='bpe' (256 byte symbols and at least one merge)")
    _check_location(source, url, sha256, path, modules)


def check_inputs(cfg: TextDataParams) -> None:
    """What the text_fetch stage checks before its MLflow run: `prepare_text`'s own argument checks, the
    location included (a folder source's `text_data.path` is a folder).

    Raises:
        ConfigError: naming ``text_data.<key>``.
    """
    try:
        _check_args(cfg.source, cfg.url, cfg.sha256, cfg.path, cfg.val_fraction, cfg.tokenizer, cfg.vocab_size,
                    cfg.modules)
    except ValueError as err:
        raise ConfigError(str(err)) from err


def token_dtype(vocab_size: int) -> np.dtype:
    """Little-endian uint16 for vocabularies of up to 65,535 ids, uint32 above."""
    return np.dtype("<u2") if vocab_size <= _UINT16_MAX_VOCAB else np.dtype("<u4")


def prepare_text(
    source: str,
    *,
    url: str | None = None,
    sha256: str | None = None,
    path: str | Path | None = None,
    modules: list[str] | None = None,
    val_fraction: float = 0.1,
    tokenizer: str = "char",
    vocab_size: int = 512,
    out_dir: Path,
    cache_dir: Path,
) -> dict[str, Any]:
    """Read `source`, split it, fit the tokenizer on the training part, and write the prepared folder.

    Args:
        source: ``"embedded"``, ``"url"``, ``"folder"`` or ``"stdlib"``.
        url: The text file to download (``url`` only).
        sha256: Its expected sha256, 64 hex characters (``url`` only, required there).
        path: The folder of ``*.txt`` files (``folder`` only).
        modules: The standard library's top-level modules and packages to keep (``stdlib`` only; None: all).
        val_fraction: Share of the text, at its end, that is validation; in (0, 0.5].
        tokenizer: ``"char"`` or ``"bpe"``.
        vocab_size: Requested vocabulary size (``bpe``: an upper bound, >= 257; ``char``: unused).
        out_dir: The prepared folder; replaced as a whole on success, untouched on failure.
        cache_dir: Where downloads are kept and reused.

    Returns:
        The meta written to ``out_dir / "meta.json"``.

    Raises:
        ValueError: For a bad argument, before anything is read; the message names ``text_data.<key>``.
        DataError: If the source cannot be fetched or read (download failure, sha256 mismatch, no ``*.txt``
            files, a file that is not UTF-8); nothing is written.
    """
    _check_args(source, url, sha256, path, val_fraction, tokenizer, vocab_size, modules)
    read = read_source(source, url=url, sha256=sha256, path=path, modules=modules, cache_dir=cache_dir)
    texts = dict(zip(SPLITS, split_text(read.text, val_fraction), strict=True))
    fitted = fit_tokenizer(tokenizer, texts["train"], vocab_size=vocab_size)  # never sees validation text
    dtype = token_dtype(fitted.vocab_size)
    tokens = {split: np.asarray(fitted.encode(part), dtype=dtype) for split, part in texts.items()}
    meta = {
        "source": source,
        **read.origin,
        "tokenizer": tokenizer,
        "vocab_size": fitted.vocab_size,
        "dtype": dtype.name,
        "val_fraction": val_fraction,
        "num_tokens": {split: len(ids) for split, ids in tokens.items()},
        "num_chars": {split: count_chars(part) for split, part in texts.items()},
    }
    return _write_prepared(Path(out_dir), tokens, fitted, meta)


def prepare_configured(cfg: TextDataParams, *, out_dir: Path, cache_dir: Path) -> dict[str, Any]:
    """`prepare_text` with the keys of the `text_data` section."""
    return prepare_text(cfg.source, url=cfg.url, sha256=cfg.sha256, path=cfg.path, modules=cfg.modules,
                        val_fraction=cfg.val_fraction, tokenizer=cfg.tokenizer, vocab_size=cfg.vocab_size,
                        out_dir=out_dir, cache_dir=cache_dir)


def _write_prepared(out_dir: Path, tokens: dict[str, np.ndarray], fitted: Tokenizer,
                    meta: dict[str, Any]) -> dict[str, Any]:
    """Write the token files, tokenizer and meta into a staging folder, then rename it onto `out_dir`."""
    with staged_dir(out_dir) as staging:
        for split, ids in tokens.items():
            ids.tofile(staging / f"{split}.bin")
        fitted.save(staging / "tokenizer.json")
        files = [f"{split}.bin" for split in tokens] + ["tokenizer.json"]
        meta = {**meta, "sha256": {name: sha256_file(staging / name) for name in files}}
        (staging / "meta.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    return meta


def read_text_meta(out_dir: Path) -> dict[str, Any]:
    """The meta.json of a prepared text folder.

    Raises:
        DataError: If the folder holds no meta.json.
    """
    meta_file = Path(out_dir) / "meta.json"
    if not meta_file.is_file():
        raise DataError(f"{out_dir}: no prepared text here (meta.json is missing)")
    return json.loads(meta_file.read_text(encoding="utf-8"))


def read_tokens(out_dir: Path, split: str) -> np.memmap:
    """The token ids of `split` (``"train"`` or ``"val"``), memory-mapped read-only.

    Raises:
        ValueError: If `split` is unknown.
        DataError: If the folder is not prepared, or the file's length disagrees with meta.json.
    """
    if split not in SPLITS:
        raise ValueError(f"split={split!r}: must be one of {', '.join(map(repr, SPLITS))}")
    meta = read_text_meta(out_dir)
    file = Path(out_dir) / f"{split}.bin"
    if not file.is_file():
        raise DataError(f"{file}: missing from the prepared text folder")
    ids = np.memmap(file, dtype=np.dtype(meta["dtype"]).newbyteorder("<"), mode="r")
    if len(ids) != meta["num_tokens"][split]:
        raise DataError(f"{file}: {len(ids)} tokens, meta.json says {meta['num_tokens'][split]}")
    return ids


def run_text_fetch(params: TextParams, tracker: Tracker, out: Path, cache_dir: Path) -> dict[str, Any]:
    """The text_fetch stage: prepare the text into `out`, log its sizes and files to the run, and point `run.json`
    at the run."""
    cfg = params.text_data
    meta = prepare_configured(cfg, out_dir=out, cache_dir=cache_dir)
    tracker.log_metrics({"vocab_size": meta["vocab_size"],
                         **{f"{split}.num_tokens": n for split, n in meta["num_tokens"].items()},
                         **{f"{split}.num_chars": n for split, n in meta["num_chars"].items()}})
    tracker.set_tags({"input.source.sha256": meta["source_sha256"], "data.origin": meta["origin"],
                      **{f"data.{key}": meta[key] for key in ("python_version", "python_implementation")
                         if key in meta}})
    tracker.log_metrics({f"source.{key}": meta[key] for key in ("num_files", "num_documents", "num_bytes")
                         if key in meta})
    tracker.log_artifact(out / "meta.json")
    tracker.log_artifact(out / "tokenizer.json")
    write_run_record(out / "run.json", tracker)
    return meta
