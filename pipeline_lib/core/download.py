"""Verified downloads and safe archive extraction for the fetch stage.

Everything a data source needs before it can be read: fetch a URL into a content-addressed cache,
refuse anything whose sha256 differs from the pinned value, and unpack archives without letting a
hostile member write outside the extraction directory. Only the standard library and tqdm are used so
the fetch stage stays cheap to import.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import re
import secrets
import shutil
import tarfile
import tempfile
import urllib.error
import urllib.parse
import urllib.request
import zipfile
import zlib
from collections.abc import Iterator
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import BinaryIO

from tqdm import tqdm

from pipeline_lib.core.errors import DataError

ACCEPTED_SCHEMES = ("http", "https", "file")
# Longest first, so "x.tar.gz" is recognised as a gzipped tar rather than stripped to "x.tar".
ARCHIVE_SUFFIXES = (".tar.gz", ".tar.bz2", ".tar.xz", ".tgz", ".tar", ".zip")
USER_AGENT = "pipeline-lib/0.1 (python-urllib)"
COMPLETE_MARKER = ".complete"

_SHA256_RE = re.compile(r"[0-9a-f]{64}")
# Cache file names are built from URL text; anything outside this set is replaced so a crafted URL can
# neither add path separators nor produce names that are awkward on other filesystems.
_UNSAFE_NAME_CHARS = re.compile(r"[^A-Za-z0-9._-]")
_CHUNK = 1 << 20

# Exceptions that mean "the archive bytes are bad". lzma may be missing from a minimal Python build, and
# tarfile.FilterError only exists where extraction filters do (3.11.4+), hence the fallbacks.
try:
    import lzma

    _LZMA_ERRORS: tuple[type[Exception], ...] = (lzma.LZMAError,)
except ImportError:  # pragma: no cover - depends on how Python was built
    _LZMA_ERRORS = ()
_CORRUPT_ERRORS = (EOFError, zlib.error, OSError, *_LZMA_ERRORS)
_TAR_FILTER_ERRORS: tuple[type[Exception], ...] = (
    (tarfile.FilterError,) if hasattr(tarfile, "FilterError") else ()
)




def sha256_file(path: Path, chunk_size: int = 1 << 20) -> str:
    """Compute the sha256 of a file without loading it into memory.

    Args:
        path: File to hash.
        chunk_size: Bytes read per step.

    Returns:
        The lowercase hex digest.

    Raises:
        DataError: If the file cannot be read.
    """
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as handle:
            while chunk := handle.read(chunk_size):
                digest.update(chunk)
    except OSError as exc:
        raise DataError(f"cannot read {path}: {exc}") from exc
    return digest.hexdigest()


def download(url: str, sha256: str, cache_dir: Path, *, timeout: float = 30.0, progress: bool = True) -> Path:
    """Download `url` into `cache_dir` (created if needed) and return the verified file's path.

    The file is cached as ``cache_dir / f"{sha256[:16]}-{basename}"``; a cached file whose digest
    matches is returned without any network access, one that does not match is fetched again. Data is
    streamed into a ``.part-`` file beside the final path and only moved into place once its length and
    digest check out, so the final path never holds a partial or unverified file.

    Args:
        url: An http, https or file URL.
        sha256: Expected sha256 of the content, 64 hex characters (any case).
        cache_dir: Directory holding downloaded files.
        timeout: Socket timeout in seconds for connecting and for each read.
        progress: Whether to show a tqdm progress bar.

    Returns:
        Path of the verified file inside `cache_dir`.

    Raises:
        DataError: If the URL or digest is malformed, the transfer fails or is truncated, or the content
            does not match `sha256`.
    """
    _check_url(url)
    expected = sha256.strip().lower() if isinstance(sha256, str) else ""
    if not _SHA256_RE.fullmatch(expected):
        raise DataError(f"invalid sha256 for {url}: {sha256!r} is not 64 hex characters")

    cache_dir = Path(cache_dir)
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DataError(f"cannot create cache directory {cache_dir} for {url}: {exc}") from exc
    final = cache_dir / f"{expected[:16]}-{_url_basename(url)}"
    if final.is_file():
        if sha256_file(final) == expected:
            return final
        # A known-bad file must not survive a failed re-download and be mistaken for data later.
        final.unlink()

    # A random suffix keeps concurrent downloads of the same file from writing into each other; "xb"
    # (rather than mkstemp) gives the file normal umask permissions once it is renamed into place.
    part = final.with_name(f"{final.name}.part-{secrets.token_hex(8)}")
    try:
        with open(part, "xb") as out:
            received, total, actual = _fetch(url, out, timeout=timeout, progress=progress, desc=final.name)
        if total is not None and received < total:
            raise DataError(f"download of {url} truncated: received {received} of {total} bytes")
        if actual != expected:
            raise DataError(
                f"sha256 mismatch for {url}: expected {expected}, got {actual}; refusing the downloaded file"
            )
        os.replace(part, final)
    except BaseException:
        # Also on KeyboardInterrupt: a stray .part file would otherwise accumulate on every retry.
        part.unlink(missing_ok=True)
        raise
    return final


def _check_url(url: str) -> None:
    """Reject URLs that urllib should not be asked to open, before any network access."""
    accepted = ", ".join(ACCEPTED_SCHEMES)
    try:
        parts = urllib.parse.urlsplit(url) if isinstance(url, str) else None
    except ValueError as exc:
        raise DataError(f"malformed URL {url!r}: {exc} (accepted schemes: {accepted})") from exc
    if parts is None or parts.scheme.lower() not in ACCEPTED_SCHEMES:
        raise DataError(f"unsupported URL {url!r}: the scheme must be one of {accepted}")
    if parts.scheme.lower() in ("http", "https") and not parts.hostname:
        raise DataError(f"malformed URL {url!r}: no host name (accepted schemes: {accepted})")
    if parts.scheme.lower() == "file" and not parts.path:
        raise DataError(f"malformed URL {url!r}: no file path (accepted schemes: {accepted})")


def _url_basename(url: str) -> str:
    """Return a filesystem-safe last path component of `url`, or "download" when it has none."""
    name = PurePosixPath(urllib.parse.unquote(urllib.parse.urlsplit(url).path)).name
    name = _UNSAFE_NAME_CHARS.sub("_", name).strip(".")
    return name or "download"


def _fetch(
    url: str, out: BinaryIO, *, timeout: float, progress: bool, desc: str
) -> tuple[int, int | None, str]:
    """Stream `url` into `out`.

    Args:
        url: A validated URL.
        out: Binary file the body is written to.
        timeout: Socket timeout in seconds.
        progress: Whether to show a progress bar.
        desc: Progress bar label.

    Returns:
        Bytes received, the announced Content-Length (None if absent) and the sha256 of what arrived.

    Raises:
        DataError: On any network, HTTP or local I/O failure, chained from the original exception.
    """
    request = urllib.request.Request(url, headers={"User-Agent": USER_AGENT})
    digest = hashlib.sha256()
    received, total = 0, None
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            total = _content_length(response.headers.get("Content-Length"))
            with tqdm(
                total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=desc, disable=not progress
            ) as bar:
                # Hashing while streaming avoids reading the file a second time just to verify it.
                while chunk := response.read(_CHUNK):
                    out.write(chunk)
                    digest.update(chunk)
                    received += len(chunk)
                    bar.update(len(chunk))
    except urllib.error.HTTPError as exc:
        exc.close()
        raise DataError(f"cannot download {url}: HTTP {exc.code} {exc.reason}") from exc
    except urllib.error.URLError as exc:
        raise DataError(f"cannot download {url}: {exc.reason}") from exc
    except http.client.IncompleteRead as exc:
        # Some Python versions raise here instead of returning a short read when the peer closes early.
        got = received + len(exc.partial)
        raise DataError(f"download of {url} truncated: received {got} of {total} bytes") from exc
    except (OSError, http.client.HTTPException) as exc:
        # OSError covers timeouts and resets while reading the body, which urllib does not wrap.
        raise DataError(f"cannot download {url}: {exc or type(exc).__name__}") from exc
    return received, total, digest.hexdigest()


def _content_length(value: str | None) -> int | None:
    """Parse a Content-Length header, treating a missing or nonsensical value as unknown."""
    try:
        length = int(value) if value is not None else None
    except ValueError:
        return None
    return length if length is not None and length >= 0 else None


def extract_archive(archive: Path, cache_dir: Path) -> Path:
    """Safely extract a .tar, .tar.gz/.tgz, .tar.bz2, .tar.xz or .zip archive.

    The target is ``cache_dir / f"{stem}.extracted"`` where `stem` is the archive name without its
    archive suffix. A target holding a ``.complete`` marker is returned as is. Otherwise every member is
    checked before anything is written, the archive is unpacked into a temporary directory beside the
    target, the marker is written and the directory is renamed into place, so a target either is
    complete or does not exist.

    Args:
        archive: Archive file to extract.
        cache_dir: Directory that receives the extracted directory.

    Returns:
        The directory holding the archive's contents (plus the ``.complete`` marker).

    Raises:
        DataError: If the archive type is unknown, the archive is missing, corrupt or truncated, or a
            member would be written outside the target (the message names the member).
    """
    archive, cache_dir = Path(archive), Path(cache_dir)
    stem, is_zip = _archive_kind(archive)
    target = cache_dir / f"{stem}.extracted"
    if (target / COMPLETE_MARKER).is_file():
        return target
    if not archive.is_file():
        raise DataError(f"cannot extract {archive}: no such file")

    cache_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f"{target.name}.tmp-", dir=cache_dir))
    try:
        if is_zip:
            _extract_zip(archive, staging)
        else:
            _extract_tar(archive, staging)
        (staging / COMPLETE_MARKER).touch()
        _remove(target)  # a target without the marker is the remains of an interrupted extraction
        try:
            os.replace(staging, target)
        except OSError:
            # A concurrent extraction may have finished first; its complete result is just as good.
            if not (target / COMPLETE_MARKER).is_file():
                raise
            shutil.rmtree(staging, ignore_errors=True)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target


def _archive_kind(archive: Path) -> tuple[str, bool]:
    """Return the archive's name without its archive suffix and whether it is a zip file."""
    lowered = archive.name.lower()
    for suffix in ARCHIVE_SUFFIXES:
        if lowered.endswith(suffix):
            return archive.name[: -len(suffix)] or "archive", suffix == ".zip"
    raise DataError(
        f"cannot extract {archive}: unknown archive type (accepted: {', '.join(ARCHIVE_SUFFIXES)})"
    )


def _remove(path: Path) -> None:
    """Delete a file, symlink or directory tree if it exists."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def _unsafe_name(name: str) -> str | None:
    """Return why a member name is unsafe to join onto the extraction directory, or None if it is fine."""
    if not name or "\x00" in name:
        return "empty name or NUL byte"
    # Windows-style names are checked too: a "..\\x" member is harmless here but not where the data
    # might be copied to, and refusing it costs nothing for a legitimate dataset.
    posix, windows = PurePosixPath(name), PureWindowsPath(name)
    if posix.is_absolute() or windows.drive or windows.root:
        return "absolute path"
    if ".." in posix.parts or ".." in windows.parts:
        return "'..' component"
    return None


def _inside(root: str, path: str) -> bool:
    """Whether `path` is `root` itself or lies below it; both must already be normalised."""
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def _refuse(archive: Path, member: str, reason: str) -> DataError:
    """Build the error for a member that must not be extracted."""
    return DataError(f"refusing to extract {archive}: unsafe member {member!r} ({reason})")


def _check_tar_member(archive: Path, member: tarfile.TarInfo, root: str, resolve: bool) -> None:
    """Refuse a tar member that could write, or point, outside `root`.

    Args:
        archive: The archive, for error messages.
        member: Member to check.
        root: Real path of the extraction directory.
        resolve: Follow symlinks already on disk (during extraction) instead of only normalising the
            text (before extraction, when nothing is on disk yet).
    """
    norm = os.path.realpath if resolve else os.path.normpath
    reason = _unsafe_name(member.name)
    if reason is None and not _inside(root, norm(os.path.join(root, member.name))):
        reason = "path leaves the extraction directory"
    if reason is None and not (member.isfile() or member.isdir() or member.issym() or member.islnk()):
        reason = "device, fifo or other unsupported member type"
    if reason is None and (member.issym() or member.islnk()):
        # Symlink targets are relative to the member's directory, hardlink targets to the archive root.
        base = os.path.dirname(os.path.join(root, member.name)) if member.issym() else root
        if os.path.isabs(member.linkname) or PureWindowsPath(member.linkname).drive:
            reason = f"link to absolute path {member.linkname!r}"
        elif not _inside(root, norm(os.path.join(base, member.linkname))):
            reason = f"link target {member.linkname!r} leaves the extraction directory"
    if reason is not None:
        raise _refuse(archive, member.name, reason)


def _extract_tar(archive: Path, dest: Path) -> None:
    """Check every tar member, then extract them all into `dest`."""
    root = os.path.realpath(dest)
    try:
        with tarfile.open(archive, "r:*") as tar:
            members = tar.getmembers()  # reads the whole index, so truncation shows up before writing
            for member in members:
                _check_tar_member(archive, member, root, resolve=False)

            def guarded() -> Iterator[tarfile.TarInfo]:
                # Re-check against the disk as members land: a chain of individually harmless symlinks
                # can still lead outside, and older Pythons have no extraction filter to catch it.
                for member in members:
                    _check_tar_member(archive, member, root, resolve=True)
                    yield member

            if hasattr(tarfile, "data_filter"):  # Python 3.11.4+ / 3.12+
                tar.extractall(dest, members=guarded(), filter="data")
            else:
                tar.extractall(dest, members=guarded())
    except _TAR_FILTER_ERRORS as exc:
        member = getattr(exc, "tarinfo", None)
        raise _refuse(archive, member.name if member else "?", str(exc)) from exc
    except (tarfile.TarError, *_CORRUPT_ERRORS) as exc:
        raise DataError(f"cannot extract {archive}: archive is corrupt or truncated ({exc})") from exc


def _extract_zip(archive: Path, dest: Path) -> None:
    """Check every zip member name, then extract them all into `dest`."""
    root = os.path.realpath(dest)
    try:
        with zipfile.ZipFile(archive) as zf:
            for name in zf.namelist():
                reason = _unsafe_name(name)
                if reason is None and not _inside(root, os.path.normpath(os.path.join(root, name))):
                    reason = "path leaves the extraction directory"
                if reason is not None:
                    raise _refuse(archive, name, reason)
            # zipfile never creates symlinks, so once the names are safe nothing can escape `dest`.
            zf.extractall(dest)
    except (zipfile.BadZipFile, *_CORRUPT_ERRORS) as exc:
        raise DataError(f"cannot extract {archive}: archive is corrupt or truncated ({exc})") from exc
