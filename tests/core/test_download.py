"""Tests for verified downloads and safe archive extraction, over real HTTP on 127.0.0.1."""

from __future__ import annotations

import hashlib
import io
import os
import socket
import tarfile
import threading
import zipfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from pipeline_lib.core.download import download, extract_archive, sha256_file
from pipeline_lib.core.errors import DataError

PAYLOAD = b"hello, pipeline\n" * 64


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _leftovers(cache_dir: Path) -> list[str]:
    """Names in the cache directory; a failed call must leave none (no final file, no .part- file)."""
    return sorted(p.name for p in cache_dir.iterdir()) if cache_dir.exists() else []


@contextmanager
def _serve(handler: type[BaseHTTPRequestHandler]) -> Iterator[str]:
    """Run `handler` on a private server for tests that need a misbehaving server; yield its base URL."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


class _TruncatingHandler(BaseHTTPRequestHandler):
    """Announces 1000 bytes, sends 10, then hangs up, like a connection dropped mid-transfer."""

    def do_GET(self) -> None:
        """Send a short body under a longer Content-Length."""
        self.send_response(200)
        self.send_header("Content-Length", "1000")
        self.end_headers()
        self.wfile.write(b"x" * 10)
        self.close_connection = True

    def log_message(self, format: str, *args: object) -> None:
        """Keep the access log out of the test output."""


def _unused_port() -> int:
    """A port that nothing listens on: bind to get a free one, then release it."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# --- download -------------------------------------------------------------------------------------------


def test_download_verifies_and_then_serves_from_cache(http_server: tuple[str, Path], tmp_path: Path) -> None:
    base, served = http_server
    (served / "data.bin").write_bytes(PAYLOAD)
    cache = tmp_path / "cache" / "nested"  # must be created on demand

    path = download(f"{base}/data.bin", _sha(PAYLOAD), cache, progress=False)

    assert path.parent == cache
    assert path.name == f"{_sha(PAYLOAD)[:16]}-data.bin"
    assert path.read_bytes() == PAYLOAD
    assert sha256_file(path) == _sha(PAYLOAD)
    assert _leftovers(cache) == [path.name]

    # With the file gone from the server, only the cache can satisfy the second call.
    (served / "data.bin").unlink()
    assert download(f"{base}/data.bin", _sha(PAYLOAD), cache, progress=False) == path
    assert path.read_bytes() == PAYLOAD


def test_download_accepts_uppercase_digest_and_shows_progress(
    http_server: tuple[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    base, served = http_server
    (served / "data.bin").write_bytes(PAYLOAD)

    path = download(f"{base}/data.bin", _sha(PAYLOAD).upper(), tmp_path, progress=True)

    assert path.name.startswith(_sha(PAYLOAD)[:16])
    assert path.read_bytes() == PAYLOAD
    assert "data.bin" in capsys.readouterr().err  # the tqdm bar is labelled with the file name


def test_download_replaces_a_corrupt_cached_file(http_server: tuple[str, Path], tmp_path: Path) -> None:
    base, served = http_server
    (served / "data.bin").write_bytes(PAYLOAD)
    stale = tmp_path / f"{_sha(PAYLOAD)[:16]}-data.bin"
    stale.write_bytes(b"bit rot")

    path = download(f"{base}/data.bin", _sha(PAYLOAD), tmp_path, progress=False)

    assert path == stale
    assert path.read_bytes() == PAYLOAD


def test_download_file_url(tmp_path: Path) -> None:
    source = tmp_path / "src" / "local file.txt"
    source.parent.mkdir()
    source.write_bytes(PAYLOAD)

    path = download(source.as_uri(), _sha(PAYLOAD), tmp_path / "cache", progress=False)

    assert path.read_bytes() == PAYLOAD
    assert path.name == f"{_sha(PAYLOAD)[:16]}-local_file.txt"


def test_download_refuses_digest_mismatch(http_server: tuple[str, Path], tmp_path: Path) -> None:
    base, served = http_server
    (served / "data.bin").write_bytes(PAYLOAD)
    wrong = _sha(b"something else")

    with pytest.raises(DataError) as info:
        download(f"{base}/data.bin", wrong, tmp_path / "cache", progress=False)

    message = str(info.value)
    assert wrong in message and _sha(PAYLOAD) in message and "refus" in message
    assert f"{base}/data.bin" in message
    assert _leftovers(tmp_path / "cache") == []


def test_download_detects_truncation(tmp_path: Path) -> None:
    with _serve(_TruncatingHandler) as base, pytest.raises(DataError, match="truncated") as info:
        # The digest of the 10 bytes that do arrive matches, so only the length check can catch this.
        download(f"{base}/big.bin", _sha(b"x" * 10), tmp_path, progress=False)

    assert "10 of 1000" in str(info.value)
    assert _leftovers(tmp_path) == []


def test_download_http_404(http_server: tuple[str, Path], tmp_path: Path) -> None:
    base, _ = http_server
    url = f"{base}/missing.bin"

    with pytest.raises(DataError, match="404") as info:
        download(url, _sha(PAYLOAD), tmp_path, progress=False)

    assert url in str(info.value)
    assert info.value.__cause__ is not None
    assert _leftovers(tmp_path) == []


def test_download_connection_refused(tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{_unused_port()}/data.bin"

    with pytest.raises(DataError) as info:
        download(url, _sha(PAYLOAD), tmp_path, progress=False)

    assert url in str(info.value)
    assert info.value.__cause__ is not None
    assert _leftovers(tmp_path) == []


def test_download_timeout(tmp_path: Path) -> None:
    # The kernel completes the TCP handshake for a listening socket, but no one ever answers.
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        url = f"http://127.0.0.1:{listener.getsockname()[1]}/slow.bin"

        with pytest.raises(DataError, match="timed out") as info:
            download(url, _sha(PAYLOAD), tmp_path, timeout=0.2, progress=False)

    assert url in str(info.value)
    assert _leftovers(tmp_path) == []


@pytest.mark.parametrize("url", ["ftp://127.0.0.1/data.bin", "notaurl", "", "http://", "http:///data.bin"])
def test_download_rejects_bad_url_before_network(url: str, tmp_path: Path) -> None:
    cache = tmp_path / "cache"

    with pytest.raises(DataError, match="http, https, file") as info:
        download(url, _sha(PAYLOAD), cache, progress=False)

    assert repr(url) in str(info.value)
    assert not cache.exists()  # rejected before anything was touched


@pytest.mark.parametrize("digest", ["", "abc", "g" * 64, "a" * 63, "a" * 65, "sha256:" + "a" * 64])
def test_download_rejects_malformed_digest(
    digest: str, http_server: tuple[str, Path], tmp_path: Path
) -> None:
    base, _ = http_server

    with pytest.raises(DataError, match="invalid sha256") as info:
        download(f"{base}/data.bin", digest, tmp_path / "cache", progress=False)

    assert repr(digest) in str(info.value) and f"{base}/data.bin" in str(info.value)
    assert not (tmp_path / "cache").exists()


def test_sha256_file(tmp_path: Path) -> None:
    path = tmp_path / "f.bin"
    path.write_bytes(PAYLOAD)

    assert sha256_file(path, chunk_size=7) == _sha(PAYLOAD)
    with pytest.raises(DataError, match=r"missing\.bin"):
        sha256_file(tmp_path / "missing.bin")


# --- extract_archive ------------------------------------------------------------------------------------

CONTENT = {"top.txt": b"top\n", "sub/inner.bin": bytes(range(256)), "sub/deeper/empty.txt": b""}


def _tar_member(name: str, data: bytes = b"", **fields: object) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    for key, value in fields.items():
        setattr(info, key, value)
    return info, data


def _write_tar(path: Path, members: list[tuple[tarfile.TarInfo, bytes]]) -> Path:
    mode = {".gz": "w:gz", ".tgz": "w:gz", ".bz2": "w:bz2", ".xz": "w:xz"}.get(path.suffix, "w")
    with tarfile.open(path, mode) as tar:
        for info, data in members:
            tar.addfile(info, io.BytesIO(data) if info.isfile() else None)
    return path


def _write_zip(path: Path, files: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in files.items():
            zf.writestr(name, data)
    return path


def _make_archive(path: Path) -> Path:
    if path.suffix == ".zip":
        return _write_zip(path, CONTENT)
    return _write_tar(path, [_tar_member(name, data) for name, data in CONTENT.items()])


def _tree(root: Path) -> dict[str, bytes]:
    return {
        p.relative_to(root).as_posix(): p.read_bytes()
        for p in root.rglob("*")
        if p.is_file() and p.name != ".complete"
    }


@pytest.fixture
def dirs(tmp_path: Path) -> tuple[Path, Path]:
    """(source dir for archives, cache dir for extraction), side by side under tmp_path."""
    src = tmp_path / "src"
    src.mkdir()
    return src, tmp_path / "cache"


@pytest.mark.parametrize("name", ["ds.tar.gz", "ds.tgz", "ds.tar", "ds.tar.bz2", "ds.tar.xz", "ds.zip"])
def test_extract_archive_roundtrip_and_reuse(name: str, dirs: tuple[Path, Path]) -> None:
    src, cache = dirs
    archive = _make_archive(src / name)

    target = extract_archive(archive, cache)

    assert target == cache / "ds.extracted"
    assert _tree(target) == CONTENT
    assert (target / ".complete").is_file()
    assert _leftovers(cache) == ["ds.extracted"]  # no staging directory left behind

    # The archive is gone, so only the completed target can answer the second call.
    marker_mtime = (target / ".complete").stat().st_mtime_ns
    archive.unlink()
    assert extract_archive(archive, cache) == target
    assert (target / ".complete").stat().st_mtime_ns == marker_mtime


def test_extract_archive_replaces_incomplete_target(dirs: tuple[Path, Path]) -> None:
    src, cache = dirs
    archive = _make_archive(src / "ds.tar.gz")
    leftover = cache / "ds.extracted" / "half-written.txt"
    leftover.parent.mkdir(parents=True)
    leftover.write_bytes(b"from an interrupted run")

    target = extract_archive(archive, cache)

    assert _tree(target) == CONTENT


def test_extract_archive_keeps_safe_links(dirs: tuple[Path, Path]) -> None:
    src, cache = dirs
    archive = _write_tar(
        src / "links.tar",
        [
            _tar_member("data/a.txt", b"A"),
            _tar_member("data/alias.txt", type=tarfile.SYMTYPE, linkname="a.txt"),
            _tar_member("copy.txt", type=tarfile.LNKTYPE, linkname="data/a.txt"),
        ],
    )

    target = extract_archive(archive, cache)

    assert (target / "data" / "alias.txt").is_symlink()
    assert (target / "data" / "alias.txt").read_bytes() == b"A"
    assert (target / "copy.txt").read_bytes() == b"A"


def _assert_refused(archive: Path, cache: Path, member: str) -> None:
    with pytest.raises(DataError) as info:
        extract_archive(archive, cache)
    message = str(info.value)
    assert str(archive) in message and repr(member) in message
    assert _leftovers(cache) == []  # neither a target nor a staging directory


@pytest.mark.parametrize(
    ("member", "fields"),
    [
        ("../evil.txt", {}),
        ("ok/../../evil.txt", {}),
        ("link", {"type": tarfile.SYMTYPE, "linkname": "/etc/passwd"}),
        ("sub/link", {"type": tarfile.SYMTYPE, "linkname": "../../x"}),
        ("hard", {"type": tarfile.LNKTYPE, "linkname": "../x"}),
        ("pipe", {"type": tarfile.FIFOTYPE}),
        ("tty", {"type": tarfile.CHRTYPE, "devmajor": 5, "devminor": 0}),
    ],
)
def test_extract_tar_refuses_unsafe_member(
    member: str, fields: dict[str, object], dirs: tuple[Path, Path]
) -> None:
    src, cache = dirs
    archive = _write_tar(src / "bad.tar.gz", [_tar_member("fine.txt", b"ok"), _tar_member(member, **fields)])

    _assert_refused(archive, cache, member)
    assert not (src.parent / "evil.txt").exists() and not (cache.parent / "x").exists()


def test_extract_tar_refuses_absolute_member(dirs: tuple[Path, Path]) -> None:
    src, cache = dirs
    outside = src.parent / "abs-evil.txt"
    archive = _write_tar(src / "abs.tar", [_tar_member(str(outside), b"pwned")])

    _assert_refused(archive, cache, str(outside))
    assert not outside.exists()


def test_extract_tar_refuses_symlink_chain_out(dirs: tuple[Path, Path]) -> None:
    # Each link looks harmless on its own ("b/c" -> "b/..", "a" -> "b/c/.." -> "b"), but on disk "b/c" is
    # the extraction root, so "a" would point at its parent and "a/evil.txt" would land outside.
    src, cache = dirs
    archive = _write_tar(
        src / "chain.tar",
        [
            _tar_member("b", type=tarfile.DIRTYPE),
            _tar_member("b/c", type=tarfile.SYMTYPE, linkname=".."),
            _tar_member("a", type=tarfile.SYMTYPE, linkname="b/c/.."),
            _tar_member("a/evil.txt", b"pwned"),
        ],
    )

    with pytest.raises(DataError, match="'a'"):
        extract_archive(archive, cache)
    assert _leftovers(cache) == []
    assert not list(src.parent.rglob("evil.txt"))


@pytest.mark.parametrize("member", ["../evil.txt", "/abs/evil.txt", "ok/../../evil.txt"])
def test_extract_zip_refuses_unsafe_member(member: str, dirs: tuple[Path, Path]) -> None:
    src, cache = dirs
    archive = _write_zip(src / "bad.zip", {"fine.txt": b"ok", member: b"pwned"})

    _assert_refused(archive, cache, member)
    assert not list(src.parent.rglob("evil.txt"))


@pytest.mark.parametrize(
    ("name", "damage"),
    [
        ("ds.tar.gz", lambda data: data[: len(data) // 2]),
        ("ds.tar.xz", lambda data: data[: len(data) // 2]),
        ("ds.zip", lambda data: data[: len(data) // 2]),
        ("ds.tar.gz", lambda data: b"not an archive at all"),
        ("ds.zip", lambda data: b""),
    ],
)
def test_extract_archive_rejects_corrupt(
    name: str, damage: Callable[[bytes], bytes], dirs: tuple[Path, Path]
) -> None:
    src, cache = dirs
    archive = src / name
    # Incompressible content, so that cutting the compressed file in half really loses member data.
    payload = os.urandom(64 * 1024)
    if name.endswith(".zip"):
        _write_zip(archive, {"a.bin": payload, "b.bin": payload[::-1]})
    else:
        _write_tar(archive, [_tar_member("a.bin", payload), _tar_member("b.bin", payload[::-1])])
    archive.write_bytes(damage(archive.read_bytes()))

    with pytest.raises(DataError, match="corrupt or truncated") as info:
        extract_archive(archive, cache)

    assert str(archive) in str(info.value)
    assert _leftovers(cache) == []


def test_extract_archive_rejects_unknown_type_and_missing_file(dirs: tuple[Path, Path]) -> None:
    src, cache = dirs
    rar = src / "ds.rar"
    rar.write_bytes(b"Rar!")

    with pytest.raises(DataError, match=r"unknown archive type.*\.tar\.gz.*\.zip"):
        extract_archive(rar, cache)
    with pytest.raises(DataError, match="no such file"):
        extract_archive(src / "absent.tar.gz", cache)
    assert _leftovers(cache) == []
