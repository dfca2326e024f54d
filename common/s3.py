"""S3 through boto3: the client, the one retry policy, a resuming reader, conditional writes.

boto3 is imported here and nowhere else; callers use the URL facade :mod:`common.storage`
(``python -c "from common import storage; print(storage.read_bytes('s3://bucket/key'))"``).
The endpoint comes from the standard ``AWS_ENDPOINT_URL`` (boto3 reads it itself) and
credentials only from boto3's standard chain. Permanent failures (missing bucket, no
credentials, access denied) become a one-line :class:`UserError` at once.

Retries: one loop, :func:`retry`, for every operation. botocore's own retries are off for
our client (``total_max_attempts=1``: one HTTP request per try), so nothing nests:

* head, put, list, delete, upload_file, conditional get/put: at most ``MAX_ATTEMPTS`` tries
  (default 6, ``IMAGENET_S3_MAX_ATTEMPTS``) on transient errors (dropped connections,
  timeouts, throttling, 5xx, a conditional write's 409 conflict). A failed ``upload_file``
  try starts that upload again.
* a read (:class:`S3Reader`, behind read_bytes / open_read / download_file) keeps every
  byte it received: after a cut it asks for the rest with ``Range: bytes=<next byte>-``.
  It passes :func:`retry` a *progress* signal, so the budget counts tries *without
  progress*: a connection that delivered at least one new byte does not count, so a read
  through a link that is cut every few KB still completes; ``MAX_ATTEMPTS`` tries in a row
  that deliver nothing fail it (an OSError naming the byte).

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

import contextlib
import io
import os
import random
import threading
import time
from typing import Callable, Iterator, TypeVar

from common.errors import PreconditionFailed, UserError

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


# --------------------------------------------------------------------------- client and errors
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
    """True for errors worth retrying: dropped connections, timeouts, throttling, 5xx, and the
    409 S3 returns while another conditional write to the same key is in flight."""
    from botocore.exceptions import ClientError, ConnectionError as BotoConnError
    from botocore.exceptions import IncompleteReadError, ReadTimeoutError, ResponseStreamingError

    for e in _chain(exc):
        if isinstance(e, (BotoConnError, ReadTimeoutError, IncompleteReadError, ResponseStreamingError)):
            return True
        if isinstance(e, ClientError):
            code = e.response.get("Error", {}).get("Code", "")
            status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
            return status >= 500 or code in {"SlowDown", "Throttling", "RequestTimeout", "InternalError",
                                             "ConditionalRequestConflict"}
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


def _error_code(exc: BaseException) -> str:
    from botocore.exceptions import ClientError
    return exc.response.get("Error", {}).get("Code", "") if isinstance(exc, ClientError) else ""


def _not_found(exc: BaseException) -> bool:
    return _error_code(exc) in {"404", "NoSuchKey", "NotFound"}


def _backoff(failures: int) -> None:
    """Sleep before the next try after ``failures`` tries in a row failed (full jitter keeps
    many workers from retrying in lockstep)."""
    time.sleep(random.uniform(0, min(BACKOFF_MAX_S, BACKOFF_BASE_S * 2**failures)))


# --------------------------------------------------------------------------- the retry loop
def retry(fn: Callable[[], T], what: str, *, progressed: Callable[[], bool] | None = None,
          give_up: Callable[[Exception, int], Exception] | None = None) -> T:
    """Run ``fn`` (one S3 request) until it succeeds: the one retry loop of the project.

    Transient errors are retried with backoff, at most MAX_ATTEMPTS tries *without progress*
    (a failed try after which ``progressed()`` says it moved data is retried at once, uncounted).
    Permanent S3 errors surface at once as UserError; UserError, FileNotFoundError and
    PreconditionFailed from ``fn`` pass through. Any other error ends the loop: raised as is,
    or as ``give_up(exc, tries without progress)``. ``what`` names the object."""
    failures = 0
    while True:
        try:
            return fn()
        except (UserError, FileNotFoundError, PreconditionFailed):
            raise
        except Exception as exc:  # noqa: BLE001 - classified below
            if is_s3(what):
                mapped = _user_error(exc, what)
                if mapped is not None:
                    raise mapped from exc
            transient = _transient(exc)
            if transient and progressed is not None and progressed():
                continue  # this try moved data: try again now, budget intact
            failures += 1
            if not transient or failures >= MAX_ATTEMPTS:
                if give_up is None:
                    raise
                raise give_up(exc, failures) from exc
            _backoff(failures)


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

    def _try_readinto(self, buf, want: int) -> int:
        """One try: (re)open if needed, then one socket read into ``buf``."""
        try:
            if self._body is None:
                self._open()
            data = self._read1(want)
            if not data:
                if self._stop is not None and self.pos < self._stop:
                    raise ConnectionError(f"stream ended at byte {self.pos} before {self._stop}")
                self._eof = True  # the object ends here (shorter than the range asked for)
                return 0
        except UserError:
            raise
        except Exception as exc:  # noqa: BLE001 - retry() classifies it
            self._drop_body()
            if _not_found(exc):
                raise FileNotFoundError(f"{self.url} does not exist") from exc
            if _error_code(exc) == "InvalidRange" and self.end is None:
                self._eof = True
                return 0  # resumed exactly at the end of the object
            raise
        n = len(data)
        buf[:n] = data
        self.pos += n
        self._got += n
        return n

    def _progressed(self) -> bool:
        """Did the connection that just broke deliver new bytes? (Asked once per broken try.)"""
        got, self._got = self._got, 0
        return got > 0

    def _give_up(self, exc: Exception, failures: int) -> OSError:
        return OSError(f"reading {self.url} failed at byte {self.pos} after {failures} "
                       f"attempt(s) without progress: {exc}")

    def readinto(self, buf) -> int:
        if self._eof or (self.end is not None and self.pos >= self.end):
            return 0
        want = len(buf) if self.end is None else min(len(buf), self.end - self.pos)
        return retry(lambda: self._try_readinto(buf, want), self.url, progressed=self._progressed,
                     give_up=self._give_up)

    def readall(self) -> bytes:
        """Read to the end in 1 MiB pieces (io's default readall asks for 8 KiB at a time)."""
        chunks = []
        buf = bytearray(1 << 20)
        while n := self.readinto(buf):
            chunks.append(bytes(buf[:n]))
        return b"".join(chunks)

    def _drop_body(self) -> None:
        body, self._body = self._body, None
        with contextlib.suppress(Exception):  # closing a broken stream
            if body is not None:
                body.close()

    def close(self):
        self._drop_body()
        super().close()


# --------------------------------------------------------------------------- writing and metadata
def put(url: str, data: bytes, metadata: dict[str, str] | None = None) -> None:
    """One PUT: S3 makes it atomic (readers see the old object or the new one)."""
    bucket, key = split_s3(url)
    retry(lambda: _client().put_object(Bucket=bucket, Key=key, Body=data, Metadata=metadata or {}), url)


def upload(path: str | os.PathLike, url: str, metadata: dict[str, str] | None = None) -> None:
    """Upload a local file; multipart for large files (the object appears on completion)."""
    from boto3.s3.transfer import TransferConfig

    bucket, key = split_s3(url)
    cfg = TransferConfig(multipart_threshold=MULTIPART_THRESHOLD, multipart_chunksize=MULTIPART_CHUNK,
                         max_concurrency=4, use_threads=True)
    extra = {"Metadata": metadata} if metadata else None
    retry(lambda: _client().upload_file(str(path), bucket, key, ExtraArgs=extra, Config=cfg), url)


def head(url: str) -> tuple[int, dict[str, str]] | None:
    """(size, user metadata) of ``url``, or None when it does not exist."""
    bucket, key = split_s3(url)

    def one():
        resp = _unless_missing(lambda: _client().head_object(Bucket=bucket, Key=key))
        if resp is not None and "ContentLength" not in resp:  # headers cut short on the way
            raise ConnectionError(f"HEAD {url}: response without Content-Length")
        return resp

    resp = retry(one, url)
    return None if resp is None else (resp["ContentLength"], dict(resp.get("Metadata", {})))


def _unless_missing(request: Callable[[], T]) -> T | None:
    """``request()``, or None when the object does not exist (404)."""
    try:
        return request()
    except Exception as exc:  # noqa: BLE001
        if _not_found(exc):
            return None
        raise


def list_keys(url: str) -> list[str]:
    """Full URLs of every object below ``url`` (recursive), sorted."""
    bucket, prefix = split_s3(url)
    prefix = prefix.rstrip("/") + "/" if prefix else ""

    def listing():
        out = []
        for page in _client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            out.extend(f"s3://{bucket}/{o['Key']}" for o in page.get("Contents", []))
        return out

    return sorted(retry(listing, url))


def delete(url: str) -> None:
    bucket, key = split_s3(url)
    retry(lambda: _client().delete_object(Bucket=bucket, Key=key), url)


# --------------------------------------------------------------------------- conditional writes
def get_versioned(url: str) -> tuple[bytes, str, float | None]:
    """(data, ETag, age in seconds by the server's clock); FileNotFoundError when absent."""
    from email.utils import parsedate_to_datetime

    bucket, key = split_s3(url)

    def get():
        resp = _unless_missing(lambda: _client().get_object(Bucket=bucket, Key=key))
        return (None, b"") if resp is None else (resp, resp["Body"].read())

    resp, data = retry(get, url)
    if resp is None:
        raise FileNotFoundError(f"{url} does not exist")
    age = None
    date = resp.get("ResponseMetadata", {}).get("HTTPHeaders", {}).get("date")
    if date and resp.get("LastModified") is not None:  # both from the server: no clock skew
        age = max(0.0, (parsedate_to_datetime(date) - resp["LastModified"]).total_seconds())
    return data, resp["ETag"], age


def put_versioned(url: str, data: bytes, if_match: str | None, if_none_match: bool) -> str:
    """Conditional PUT (If-None-Match: * / If-Match: etag); the new ETag, or PreconditionFailed.
    A 409 (a concurrent conditional write in flight: S3 asks to retry) is transient."""
    bucket, key = split_s3(url)
    cond = {"IfNoneMatch": "*"} if if_none_match else ({"IfMatch": if_match} if if_match else {})

    def one():
        try:
            return _client().put_object(Bucket=bucket, Key=key, Body=data, **cond)["ETag"]
        except Exception as exc:  # noqa: BLE001
            if _error_code(exc) in {"PreconditionFailed", "412"} or (cond and _not_found(exc)):
                raise PreconditionFailed(f"{url} changed (or exists) since it was read") from None
            raise

    return retry(one, url)


def _reinit_after_fork() -> None:
    """A forked child gets a fresh client lock: a parent's thread (the lease renewal) may
    have held it at the moment of the fork, and nothing in the child would release it."""
    global _clients_lock
    _clients_lock = threading.Lock()


os.register_at_fork(after_in_child=_reinit_after_fork)
