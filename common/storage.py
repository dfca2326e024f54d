"""One small interface over local paths and ``s3://bucket/key`` URLs.

Every function takes a URL (a local path or ``s3://bucket/key``) so callers never branch
on where data lives:

    read_bytes(url, start=None, end=None)   whole object or a byte range [start, end)
    open_read(url, start=0)                 a streaming reader that resumes after drops
    write_bytes(url, data, metadata=None)   atomic: readers see the old object or the new one
    upload_file(path, url, metadata=None)   multipart for large files, atomic on S3
    download_file(url, path)                atomic local write
    exists(url) / stat(url) / list_prefix(url) / delete(url)

boto3 is imported here and nowhere else. The endpoint comes from the standard
``AWS_ENDPOINT_URL`` (boto3 reads it itself) and credentials only from boto3's standard
chain. Permanent failures (missing bucket, no credentials, access denied) become a one-line
:class:`UserError` at once.

Retries: one policy per operation, in one place. botocore's own retries are off for our
client (``total_max_attempts=1``: one HTTP request per try), so nothing nests:

* every operation but a streaming read (head, put, list, delete, upload_file) runs in
  :func:`retry`: at most ``MAX_ATTEMPTS`` tries (default 6, ``IMAGENET_S3_MAX_ATTEMPTS``)
  on transient errors (dropped connections, timeouts, throttling, 5xx). A failed
  ``upload_file`` try starts that upload again.
* a read (:class:`S3Reader`, behind read_bytes / open_read / download_file) keeps every
  byte it received: after a cut it asks for the rest with ``Range: bytes=<next byte>-``.
  Its budget counts tries *without progress*: a connection that delivered at least one new
  byte does not count, so a read through a link that is cut every few KB still completes;
  ``MAX_ATTEMPTS`` tries in a row that deliver nothing fail it (an OSError naming the byte).

Each try is bounded in time: ``CONNECT_TIMEOUT_S`` (10 s) to connect and
``READ_TIMEOUT_S`` (60 s) for any socket read or write to make progress. Between tries
without progress the wait is full-jitter backoff, ``uniform(0, min(5, 0.2 * 2**k))`` s
after the k-th, at most 0.4 + 0.8 + 1.6 + 3.2 + 5 = 11 s in all. Worst case before an
error surfaces, with the defaults: 6 tries and 6 x (10 + 60) s + 11 s, about 7.2 minutes
after the last byte moved; under the trainer's default 15-minute hang watchdog, so a dead
store is reported as an error, not as a hang. (A server that keeps trickling bytes is not
cut here; in training the hang watchdog bounds that.)
"""
from __future__ import annotations

import functools
import io
import os
import random
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, TypeVar

from common.errors import UserError

T = TypeVar("T")

MAX_ATTEMPTS = int(os.environ.get("IMAGENET_S3_MAX_ATTEMPTS", "6"))  # tries without progress, per operation
BACKOFF_BASE_S = 0.2
BACKOFF_MAX_S = 5.0
CONNECT_TIMEOUT_S = 10
READ_TIMEOUT_S = 60
MULTIPART_THRESHOLD = 64 * 2**20
MULTIPART_CHUNK = 32 * 2**20


def is_s3(url: str | os.PathLike) -> bool:
    return str(url).startswith("s3://")


def split_s3(url: str) -> tuple[str, str]:
    """``s3://bucket/a/b`` -> (``bucket``, ``a/b``)."""
    rest = str(url)[len("s3://"):]
    bucket, _, key = rest.partition("/")
    if not bucket:
        raise UserError(f"bad S3 URL {url!r}: expected s3://bucket/prefix")
    return bucket, key


def join(base: str | os.PathLike, *parts: str) -> str:
    """Join path parts onto a local path or an s3:// URL."""
    base = str(base)
    if is_s3(base):
        out = base.rstrip("/")
        for p in parts:
            out = f"{out}/{p.strip('/')}" if p else out
        return out
    return str(Path(base, *parts))


# --------------------------------------------------------------------------- S3 plumbing
_clients: dict[int, object] = {}
_clients_lock = threading.Lock()


def _client():
    """One boto3 client per process (clients must not cross fork/spawn boundaries)."""
    pid = os.getpid()
    with _clients_lock:
        client = _clients.get(pid)
        if client is None:
            import boto3
            from botocore.config import Config

            cfg = Config(
                retries={"total_max_attempts": 1, "mode": "standard"},  # ours only: see the module docstring
                connect_timeout=CONNECT_TIMEOUT_S,
                read_timeout=READ_TIMEOUT_S,
                max_pool_connections=32,
            )
            client = boto3.session.Session().client("s3", config=cfg)
            _clients.clear()
            _clients[pid] = client
        return client


def _chain(exc: BaseException) -> Iterator[BaseException]:
    """``exc`` and what it wraps (boto3's S3UploadFailedError wraps the ClientError)."""
    for _ in range(5):
        yield exc
        nxt = exc.__cause__ or exc.__context__
        if nxt is None:
            return
        exc = nxt


def _transient(exc: BaseException) -> bool:
    """True for errors worth retrying: dropped connections, timeouts, throttling, 5xx."""
    from botocore.exceptions import ClientError, ConnectionError as BotoConnError
    from botocore.exceptions import IncompleteReadError, ReadTimeoutError, ResponseStreamingError

    for e in _chain(exc):
        if isinstance(e, (BotoConnError, ReadTimeoutError, IncompleteReadError, ResponseStreamingError)):
            return True
        if isinstance(e, ClientError):
            code = e.response.get("Error", {}).get("Code", "")
            status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
            return status >= 500 or code in {"SlowDown", "Throttling", "RequestTimeout", "InternalError"}
        # urllib3 / http.client errors surface raw while streaming a body
        if isinstance(e, (ConnectionError, TimeoutError)) or type(e).__name__ in {
                "ProtocolError", "IncompleteRead", "ReadTimeoutError", "RemoteDisconnected", "SSLError"}:
            return True
    return False


def _user_error(exc: BaseException, url: str) -> UserError | None:
    """Map permanent S3 failures to a one-line message a user can act on."""
    from botocore.exceptions import ClientError, NoCredentialsError, PartialCredentialsError

    for e in _chain(exc):
        if isinstance(e, (NoCredentialsError, PartialCredentialsError)):
            return UserError(
                f"no AWS credentials for {url}: configure them the standard way "
                "(aws configure / AWS_PROFILE / AWS_ACCESS_KEY_ID+AWS_SECRET_ACCESS_KEY / an instance role)"
            )
        if isinstance(e, ClientError):
            code = e.response.get("Error", {}).get("Code", "")
            if code == "NoSuchBucket":
                return UserError(f"S3 bucket of {url} does not exist: create it or fix the URL")
            if code in {"AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "403"}:
                return UserError(f"access denied to {url} ({code}): check the credentials and bucket policy")
            return None
    return None


def _backoff(failures: int) -> None:
    """Sleep before the next try after ``failures`` tries in a row failed (full jitter keeps
    many workers from retrying in lockstep)."""
    time.sleep(random.uniform(0, min(BACKOFF_MAX_S, BACKOFF_BASE_S * 2**failures)))


def retry(fn: Callable[[], T], what: str) -> T:
    """Run ``fn`` (one S3 request) up to MAX_ATTEMPTS times with backoff on transient errors.

    ``what`` names the object in the final error. Permanent S3 errors (missing bucket,
    no credentials, access denied) surface at once as UserError.
    """
    for attempt in range(1, MAX_ATTEMPTS + 1):
        try:
            return fn()
        except UserError:
            raise
        except Exception as exc:  # noqa: BLE001 - classified below
            if is_s3(what):
                mapped = _user_error(exc, what)
                if mapped is not None:
                    raise mapped from exc
            if not _transient(exc) or attempt == MAX_ATTEMPTS:
                raise
            _backoff(attempt)
    raise AssertionError("unreachable")


def _error_code(exc: BaseException) -> str:
    from botocore.exceptions import ClientError

    return exc.response.get("Error", {}).get("Code", "") if isinstance(exc, ClientError) else ""


def _not_found(exc: BaseException) -> bool:
    return _error_code(exc) in {"404", "NoSuchKey", "NotFound"}


# --------------------------------------------------------------------------- reading
class S3Reader(io.RawIOBase):
    """Streaming reader of one S3 object (or a byte range of it) that survives dropped connections.

    Every byte received is kept: when the body stream breaks, the reader reopens the object
    with ``Range: bytes=<pos>-`` and continues at the next byte. Each ``readinto`` returns
    what one socket read delivered (``read1``), so a cut loses nothing already received. It
    fails after MAX_ATTEMPTS tries in a row that delivered no new byte (module docstring).
    """

    def __init__(self, url: str, start: int = 0, end: int | None = None):
        super().__init__()
        self.url = url
        self.bucket, self.key = split_s3(url)
        self.pos = start
        self.end = end  # exclusive; None = to the end of the object
        self._body = None
        self._stop: int | None = None  # where the open response's body ends
        self._got = 0  # bytes the open connection delivered
        self._failures = 0  # tries in a row without a new byte
        self._eof = False

    def readable(self) -> bool:
        return True

    def _open(self) -> None:
        kwargs = {"Bucket": self.bucket, "Key": self.key}
        if self.pos or self.end is not None:  # no Range for a whole object: it may be empty
            kwargs["Range"] = f"bytes={self.pos}-" if self.end is None else f"bytes={self.pos}-{self.end - 1}"
        resp = _client().get_object(**kwargs)  # one request: the retries are readinto's
        self._body, self._got = resp["Body"], 0
        length = resp.get("ContentLength")
        self._stop = self.pos + int(length) if length is not None else self.end

    def _read1(self, n: int) -> bytes:
        """Up to ``n`` bytes from one socket read (what arrived is returned, not lost in a cut)."""
        raw = getattr(self._body, "_raw_stream", None)
        if hasattr(raw, "read1"):  # urllib3 2.x; its errors are the transient kinds
            return raw.read1(min(n, 1 << 20)) or b""
        return self._body.read(min(n, 64 << 10))  # older urllib3: small reads lose less per cut

    def readinto(self, buf) -> int:
        if self._eof or (self.end is not None and self.pos >= self.end):
            return 0
        want = len(buf) if self.end is None else min(len(buf), self.end - self.pos)
        while True:
            try:
                if self._body is None:
                    self._open()
                data = self._read1(want)
                if not data:
                    if self._stop is not None and self.pos < self._stop:
                        raise ConnectionError(f"stream ended at byte {self.pos} before {self._stop}")
                    self._eof = True  # the object ends here (shorter than the range asked for)
                    return 0
                n = len(data)
                buf[:n] = data
                self.pos += n
                self._got += n
                self._failures = 0
                return n
            except UserError:
                raise
            except Exception as exc:  # noqa: BLE001 - classified below
                self._drop_body()
                if _not_found(exc):
                    raise FileNotFoundError(f"{self.url} does not exist") from exc
                if _error_code(exc) == "InvalidRange" and self.end is None:
                    self._eof = True
                    return 0  # resumed exactly at the end of the object
                mapped = _user_error(exc, self.url)
                if mapped is not None:
                    raise mapped from exc
                if self._got and _transient(exc):  # this connection made progress: reconnect now, budget intact
                    self._got = 0
                    continue
                self._failures += 1
                if not _transient(exc) or self._failures >= MAX_ATTEMPTS:
                    raise OSError(f"reading {self.url} failed at byte {self.pos} after {self._failures} "
                                  f"attempt(s) without progress: {exc}") from exc
                _backoff(self._failures)

    def readall(self) -> bytes:
        """Read to the end in 1 MiB pieces (io's default readall asks for 8 KiB at a time)."""
        chunks = []
        buf = bytearray(1 << 20)
        while n := self.readinto(buf):
            chunks.append(bytes(buf[:n]))
        return b"".join(chunks)

    def _drop_body(self) -> None:
        if self._body is not None:
            try:
                self._body.close()
            except Exception:  # noqa: BLE001 - closing a broken stream
                pass
            self._body = None

    def close(self):
        self._drop_body()
        super().close()


def open_read(url: str, start: int = 0, end: int | None = None) -> io.BufferedReader:
    """Open ``url`` for streaming reads from byte ``start`` (to ``end``, exclusive)."""
    url = str(url)
    if is_s3(url):
        return io.BufferedReader(S3Reader(url, start, end), buffer_size=1 << 20)
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
        reader = S3Reader(url, start or 0, end)
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


def _atomic_local_write(path: Path, write: Callable[[io.BufferedWriter], None]) -> None:
    """Write via a temp file in the same folder, fsync, then rename over ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, public_mode())
        os.replace(tmp, path)
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
        bucket, key = split_s3(url)
        retry(lambda: _client().put_object(Bucket=bucket, Key=key, Body=data, Metadata=metadata or {}), url)
        return
    _atomic_local_write(Path(url), lambda f: f.write(data))


def upload_file(path: str | os.PathLike, url: str, metadata: dict[str, str] | None = None) -> None:
    """Copy a local file to ``url``; multipart on S3 for large files (atomic on completion)."""
    url = str(url)
    if is_s3(url):
        from boto3.s3.transfer import TransferConfig

        bucket, key = split_s3(url)
        cfg = TransferConfig(multipart_threshold=MULTIPART_THRESHOLD, multipart_chunksize=MULTIPART_CHUNK,
                             max_concurrency=4, use_threads=True)
        extra = {"Metadata": metadata} if metadata else None
        retry(lambda: _client().upload_file(str(path), bucket, key, ExtraArgs=extra, Config=cfg), url)
        return

    def copy(dst):
        with open(path, "rb") as src:
            while chunk := src.read(8 << 20):
                dst.write(chunk)

    _atomic_local_write(Path(url), copy)


def download_file(url: str, path: str | os.PathLike) -> None:
    """Copy ``url`` to a local file atomically (a crash never leaves a partial file)."""
    def copy(dst):
        with open_read(str(url)) as src:
            while chunk := src.read(8 << 20):
                dst.write(chunk)

    _atomic_local_write(Path(path), copy)


# --------------------------------------------------------------------------- metadata
@dataclass(frozen=True)
class Stat:
    size: int
    metadata: dict[str, str]


def stat(url: str) -> Stat | None:
    """Size and user metadata of ``url``, or None when it does not exist."""
    url = str(url)
    if is_s3(url):
        bucket, key = split_s3(url)

        def head():
            try:
                resp = _client().head_object(Bucket=bucket, Key=key)
            except Exception as exc:  # noqa: BLE001
                if _not_found(exc):
                    return None
                raise
            if "ContentLength" not in resp:  # headers cut short on the way
                raise ConnectionError(f"HEAD {url}: response without Content-Length")
            return resp

        resp = retry(head, url)
        return None if resp is None else Stat(resp["ContentLength"], dict(resp.get("Metadata", {})))
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
        bucket, prefix = split_s3(url)
        prefix = prefix.rstrip("/") + "/" if prefix else ""

        def listing():
            out = []
            for page in _client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
                out.extend(f"s3://{bucket}/{o['Key']}" for o in page.get("Contents", []))
            return out

        return sorted(retry(listing, url))
    root = Path(url)
    if not root.is_dir():
        return []
    return sorted(str(p) for p in root.rglob("*") if p.is_file())


def delete(url: str) -> None:
    """Remove ``url`` if it exists."""
    url = str(url)
    if is_s3(url):
        bucket, key = split_s3(url)
        retry(lambda: _client().delete_object(Bucket=bucket, Key=key), url)
        return
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
class PreconditionFailed(Exception):
    """A conditional write lost: the object already exists (create) or changed (replace)."""


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
    from email.utils import parsedate_to_datetime

    bucket, key = split_s3(url)

    def get():
        try:
            resp = _client().get_object(Bucket=bucket, Key=key)
        except Exception as exc:  # noqa: BLE001
            if _not_found(exc):
                raise FileNotFoundError(f"{url} does not exist") from None
            raise
        return resp, resp["Body"].read()

    resp, data = retry(get, url)
    age = None
    date = resp.get("ResponseMetadata", {}).get("HTTPHeaders", {}).get("date")
    if date and resp.get("LastModified") is not None:  # both from the server: no clock skew
        age = max(0.0, (parsedate_to_datetime(date) - resp["LastModified"]).total_seconds())
    return Versioned(data, resp["ETag"], age)


def put_versioned(url: str, data: bytes, *, if_match: str | None = None, if_none_match: bool = False) -> str:
    """Write ``data`` and return its new ETag. ``if_none_match``: only if absent; ``if_match``:
    only if the object is still that version. Raises PreconditionFailed when the condition
    does not hold (a missing object fails ``if_match`` too). Neither: unconditional."""
    url = str(url)
    if not is_s3(url):
        return _local_put_versioned(Path(url), data, if_match, if_none_match)
    bucket, key = split_s3(url)
    cond = {"IfNoneMatch": "*"} if if_none_match else ({"IfMatch": if_match} if if_match else {})

    def put():
        for attempt in range(1, MAX_ATTEMPTS + 1):
            try:
                return _client().put_object(Bucket=bucket, Key=key, Body=data, **cond)["ETag"]
            except Exception as exc:  # noqa: BLE001
                code = _error_code(exc)
                if code in {"PreconditionFailed", "412"} or (cond and _not_found(exc)):
                    raise PreconditionFailed(f"{url} changed (or exists) since it was read") from None
                if code != "ConditionalRequestConflict" or attempt == MAX_ATTEMPTS:
                    raise  # 409 = a concurrent conditional write in flight: S3 asks to retry
                time.sleep(random.uniform(0, BACKOFF_BASE_S * 2**attempt))
        raise AssertionError("unreachable")

    return retry(put, url)


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
        _atomic_local_write(path, lambda f: f.write(data))
        return _local_etag(data)
    finally:
        os.close(dir_fd)  # releases the flock


def _reinit_after_fork() -> None:
    """A forked child gets a fresh client lock: a parent's thread (the lease renewal) may
    have held it at the moment of the fork, and nothing in the child would release it."""
    global _clients_lock
    _clients_lock = threading.Lock()


os.register_at_fork(after_in_child=_reinit_after_fork)
