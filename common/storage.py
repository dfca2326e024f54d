"""One small interface over local paths and ``s3://bucket/key`` URLs.

Every function takes a URL (a local path or ``s3://bucket/key``) so callers never branch
on where data lives:

    read_bytes(url, start=None, end=None)   whole object or a byte range [start, end)
    open_read(url, start=0)                 a streaming reader that resumes after drops
    write_bytes(url, data, metadata=None)   atomic: readers see the old object or the new one
    upload_file(path, url, metadata=None)   multipart for large files, atomic on S3
    download_file(url, path)                atomic local write
    exists(url) / stat(url) / list_prefix(url) / delete(url)

Local writes are atomic through the one helper :func:`atomic_write` (temp file, fsync,
rename); an S3 PUT or a completed (multipart) upload is atomic by itself. Versioned reads
and compare-and-swap writes (:func:`get_versioned` / :func:`put_versioned`) are the
primitive behind common.lease and the fenced ``checkpoints/latest.json`` pointer.

Everything S3 (boto3, the one retry policy with its worst-case bound, the resuming reader)
lives in :mod:`common.s3`; this module only dispatches on the URL:

    python -c "from common import storage; print(storage.list_prefix('s3://bucket/shards'))"
"""
from __future__ import annotations

import functools
import io
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, TypeVar

from common import s3
from common.errors import PreconditionFailed, UserError  # noqa: F401 - PreconditionFailed is part of this API
from common.s3 import is_s3, split_s3  # noqa: F401 - part of this API

T = TypeVar("T")


def join(base: str | os.PathLike, *parts: str) -> str:
    """Join path parts onto a local path or an s3:// URL."""
    base = str(base)
    if is_s3(base):
        out = base.rstrip("/")
        for p in parts:
            out = f"{out}/{p.strip('/')}" if p else out
        return out
    return str(Path(base, *parts))


def open_read(url: str, start: int = 0, end: int | None = None) -> io.BufferedReader:
    """Open ``url`` for streaming reads from byte ``start`` (to ``end``, exclusive)."""
    url = str(url)
    if is_s3(url):
        return io.BufferedReader(s3.S3Reader(url, start, end), buffer_size=1 << 20)
    f = open(url, "rb")
    if start:
        f.seek(start)
    if end is None:
        return f
    data = f.read(end - start)
    f.close()
    return io.BufferedReader(io.BytesIO(data))


def read_bytes(url: str, start: int | None = None, end: int | None = None) -> bytes | bytearray:
    """The whole object, or the byte range [start, end).

    An S3 range is read straight into one preallocated buffer (large reads, no copies):
    the hot path of the training loader, where the per-byte cost matters.
    """
    url = str(url)
    if is_s3(url) and end is not None:
        reader = s3.S3Reader(url, start or 0, end)
        buf = bytearray(end - (start or 0))
        view, pos = memoryview(buf), 0
        try:
            while pos < len(buf) and (n := reader.readinto(view[pos:])):
                pos += n
        finally:
            reader.close()
        return buf if pos == len(buf) else buf[:pos]
    if is_s3(url):
        with open_read(url, start or 0, end) as f:
            return f.read()
    with open(url, "rb") as f:
        if start:
            f.seek(start)
        return f.read() if end is None else f.read(end - (start or 0))


# --------------------------------------------------------------------------- writing
@functools.lru_cache(maxsize=1)
def public_mode() -> int:
    """0666 less the umask: what open() would give (mkstemp's 0600 hides files from other users)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def atomic_write(path: str | os.PathLike, write: Callable[[io.BufferedWriter], T], *, fsync: bool = True) -> T:
    """The one atomic write of a local file: ``write(f)`` into a temp file in the same folder
    (``.<name>.<random>.tmp``), fsync (unless ``fsync=False``, for a caller that re-checks what
    it finds after a crash), then rename over ``path``. Returns what ``write`` returned; a
    failure leaves no temp file and the old ``path`` untouched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb", buffering=1 << 20) as f:
            result = write(f)
            f.flush()
            if fsync:
                os.fsync(f.fileno())
        os.chmod(tmp, public_mode())
        os.replace(tmp, path)
        return result
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def write_bytes(url: str, data: bytes, metadata: dict[str, str] | None = None) -> None:
    """Atomically write ``data``: readers see either the old object or the new one."""
    url = str(url)
    if is_s3(url):
        return s3.put(url, data, metadata)
    atomic_write(Path(url), lambda f: f.write(data))


def upload_file(path: str | os.PathLike, url: str, metadata: dict[str, str] | None = None) -> None:
    """Copy a local file to ``url``; multipart on S3 for large files (atomic on completion)."""
    url = str(url)
    if is_s3(url):
        return s3.upload(path, url, metadata)

    def copy(dst):
        with open(path, "rb") as src:
            while chunk := src.read(8 << 20):
                dst.write(chunk)

    atomic_write(Path(url), copy)


def download_file(url: str, path: str | os.PathLike) -> None:
    """Copy ``url`` to a local file atomically (a crash never leaves a partial file)."""
    def copy(dst):
        with open_read(str(url)) as src:
            while chunk := src.read(8 << 20):
                dst.write(chunk)

    atomic_write(Path(path), copy)


# --------------------------------------------------------------------------- metadata
@dataclass(frozen=True)
class Stat:
    size: int
    metadata: dict[str, str]


def stat(url: str) -> Stat | None:
    """Size and user metadata of ``url``, or None when it does not exist."""
    url = str(url)
    if is_s3(url):
        found = s3.head(url)
        return None if found is None else Stat(*found)
    try:
        return Stat(os.stat(url).st_size, {})
    except (FileNotFoundError, NotADirectoryError):
        return None


def exists(url: str) -> bool:
    return stat(url) is not None


def list_prefix(url: str) -> list[str]:
    """Full URLs/paths of every object below ``url`` (recursive), sorted."""
    url = str(url)
    if is_s3(url):
        return s3.list_keys(url)
    root = Path(url)
    if not root.is_dir():
        return []
    return sorted(str(p) for p in root.rglob("*") if p.is_file())


def delete(url: str) -> None:
    """Remove ``url`` if it exists."""
    url = str(url)
    if is_s3(url):
        return s3.delete(url)
    try:
        os.unlink(url)
    except FileNotFoundError:
        pass


def check_writable(url: str) -> None:
    """Fail early, with a one-line error, when ``url`` cannot be written."""
    url = str(url)
    probe = join(url, f".write-probe-{os.getpid()}")
    try:
        write_bytes(probe, b"")
        delete(probe)
    except UserError:
        raise
    except OSError as exc:
        raise UserError(f"output {url} is not writable ({exc.strerror or exc}): choose a writable folder") from exc


def iter_chunks(url: str, chunk: int = 8 << 20) -> Iterator[bytes]:
    with open_read(url) as f:
        while data := f.read(chunk):
            yield data


def sha256_file(url: str | os.PathLike) -> str:
    """SHA-256 hex digest of a local file or S3 object, streamed in 8 MiB pieces."""
    import hashlib

    h = hashlib.sha256()
    for data in iter_chunks(str(url)):
        h.update(data)
    return h.hexdigest()


# =========================================================================== conditional writes
# Versioned reads and compare-and-swap writes: the primitive behind common.lease and the
# fenced checkpoints/latest.json pointer. S3 uses conditional writes (If-None-Match: * to
# create only if absent, If-Match: <etag> to replace only the version read); a local path
# emulates them under an flock on the object's folder, with the MD5 of the bytes as ETag.
@dataclass(frozen=True)
class Versioned:
    data: bytes
    etag: str
    age_s: float | None  # seconds since last written: the server's clock on S3, this machine's locally


def get_versioned(url: str) -> Versioned:
    """The object with its ETag and age; raises FileNotFoundError when absent."""
    url = str(url)
    if not is_s3(url):
        with open(url, "rb") as f:
            data, mtime = f.read(), os.fstat(f.fileno()).st_mtime
        return Versioned(data, _local_etag(data), max(0.0, time.time() - mtime))
    return Versioned(*s3.get_versioned(url))


def put_versioned(url: str, data: bytes, *, if_match: str | None = None, if_none_match: bool = False) -> str:
    """Write ``data`` and return its new ETag. ``if_none_match``: only if absent; ``if_match``:
    only if the object is still that version. Raises PreconditionFailed when the condition
    does not hold (a missing object fails ``if_match`` too). Neither: unconditional."""
    url = str(url)
    if not is_s3(url):
        return _local_put_versioned(Path(url), data, if_match, if_none_match)
    return s3.put_versioned(url, data, if_match, if_none_match)


def _local_etag(data: bytes) -> str:
    import hashlib

    return hashlib.md5(data, usedforsecurity=False).hexdigest()


def _local_put_versioned(path: Path, data: bytes, if_match: str | None, if_none_match: bool) -> str:
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        fcntl.flock(dir_fd, fcntl.LOCK_EX)  # serializes compare-and-swap between processes
        try:
            current = _local_etag(path.read_bytes())
        except FileNotFoundError:
            current = None
        if (if_none_match and current is not None) or (if_match and current != if_match):
            raise PreconditionFailed(f"{path} changed (or exists) since it was read")
        atomic_write(path, lambda f: f.write(data))
        return _local_etag(data)
    finally:
        os.close(dir_fd)  # releases the flock

