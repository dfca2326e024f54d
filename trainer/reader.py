"""Read samples out of shards by byte range, from a local folder, s3:// or a local cache.

    store = ShardStore(manifest, "train", cache_dir="/mnt/nvme/shard-cache")
    jpegs = store.read_jpegs(shards, indices)      # bytes, or None where the shard is truncated
    label = store.index(shards[0]).labels[indices[0]]

One :class:`ShardStore` lives in each DataLoader worker (it pickles without its caches).
Each shard's index sidecar is loaded lazily, checked against the manifest and kept for the
life of the worker. A batch's samples are grouped by shard and contiguous index runs are
coalesced into one byte-range read each (:func:`coalesce`); on S3 the ranges of one batch
download in parallel on a small per-worker thread pool. Dropped connections resume from the
byte where they stopped (``common.s3.S3Reader``).

With ``cache_dir`` the first read of a shard downloads the whole shard (atomically, under a
file lock, so the workers and ranks of one machine download it once) and later epochs and
runs read the local copy. A cached copy is checked against the manifest's size and SHA-256
once per process; a ``.ok`` marker holding (size, mtime, sha256) lets later processes skip
re-hashing an unchanged file. A corrupt cached copy is fetched again; a source that does not
match the manifest is a :class:`UserError` naming the shard.

Bad data is not fatal here: a truncated shard yields ``None`` for the samples past its end
(the caller skips and counts them). A missing shard or index, or an index that does not
match the manifest, raises :class:`UserError` naming the file.
"""
from __future__ import annotations

import fcntl
import json
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from common import storage
from common.errors import UserError
from common.manifest import Manifest, load_index, shard_problems

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ShardArrays:
    """A shard's index sidecar as arrays (what batch assembly needs, nothing else)."""

    keys: list[str]
    labels: np.ndarray       # int64 [n]
    jpg_offsets: np.ndarray  # int64 [n], bytes from the start of the shard
    jpg_sizes: np.ndarray    # int64 [n]


@dataclass(frozen=True)
class Range:
    """One byte-range read: bytes [start, end) of ``shard`` serve the listed samples."""

    shard: int
    start: int
    end: int
    members: list[tuple[int, int, int]]  # (output position, offset in shard, size)


def coalesce(shard: int, arrays: ShardArrays, items: list[tuple[int, int]], max_gap: int = 0) -> list[Range]:
    """Group (output position, index in shard) pairs into as few reads as possible.

    Samples are sorted by index; the next sample joins the current read when it is the next
    sample of the shard (only its .cls/.json members and tar headers lie between) or when the
    bytes between them are at most ``max_gap``.
    """
    items = sorted(items, key=lambda pi: pi[1])
    ranges: list[Range] = []
    cur: list[tuple[int, int, int]] = []
    start = end = prev = 0
    for pos, i in items:
        off, size = int(arrays.jpg_offsets[i]), int(arrays.jpg_sizes[i])
        if cur and (i <= prev + 1 or off - end <= max_gap):
            cur.append((pos, off, size))
            end, prev = max(end, off + size), i
            continue
        if cur:
            ranges.append(Range(shard, start, end, cur))
        cur, start, end, prev = [(pos, off, size)], off, off + size, i
    if cur:
        ranges.append(Range(shard, start, end, cur))
    return ranges


@contextmanager
def _file_lock(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+b") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


class ShardStore:
    """Per-worker access to one split's shards (see module docstring)."""

    def __init__(self, manifest: Manifest, split: str, *, cache_dir: str | None = None, io_threads: int = 8,
                 max_gap: int | None = None):
        self.manifest = manifest
        self.split = split
        self.shards = manifest.split(split).shards
        self.counts = [s.num_samples for s in self.shards]
        self.remote = storage.is_s3(manifest.root)
        self.cache_dir = Path(cache_dir).expanduser() if cache_dir else None
        self.io_threads = max(1, io_threads)
        # Remote requests cost a round trip, so reading a few unneeded bytes beats a second request.
        self.max_gap = (256 << 10 if self.remote and not self.cache_dir else 0) if max_gap is None else max_gap
        self._reset()

    def _reset(self) -> None:
        self._indexes: dict[int, ShardArrays] = {}
        self._local: dict[int, str] = {}  # shard -> cached copy verified in this process
        self._pool: ThreadPoolExecutor | None = None
        self._pool_pid = 0

    def __getstate__(self):
        state = dict(self.__dict__)
        state.update(_indexes={}, _local={}, _pool=None, _pool_pid=0)
        return state

    # ------------------------------------------------------------------ names
    def url(self, shard: int) -> str:
        return self.manifest.url(self.shards[shard].path)

    def _cache_path(self, relpath: str, sha: str, suffix: str) -> Path:
        # Content-addressed by the manifest's checksum: two builds never share a stale name.
        return self.cache_dir / f"{Path(relpath).name.split('.')[0]}-{sha[:16]}{suffix}"

    # ------------------------------------------------------------------ index
    def index(self, shard: int) -> ShardArrays:
        """The shard's index arrays, loaded and checked on first use."""
        arrays = self._indexes.get(shard)
        if arrays is None:
            arrays = self._indexes[shard] = self._load_index(shard)
        return arrays

    def _load_index(self, shard: int) -> ShardArrays:
        info = self.shards[shard]
        cached = self._cache_path(info.index, info.index_sha256, ".idx.json") if self.cache_dir else None
        idx = load_index(self.manifest, info, cache=cached)
        return ShardArrays(idx.keys, np.asarray(idx.labels, dtype=np.int64),
                           np.asarray(idx.jpg_offsets, dtype=np.int64), np.asarray(idx.jpg_sizes, dtype=np.int64))

    # ------------------------------------------------------------------ cache
    def _cached_ok(self, path: Path, shard: int) -> bool:
        """True when ``path`` holds the shard the manifest describes (hash only when unsure)."""
        info = self.shards[shard]
        try:
            st = path.stat()
        except FileNotFoundError:
            return False
        if st.st_size != info.bytes:
            return False
        marker = path.with_name(path.name + ".ok")
        want = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": info.sha256}
        try:
            if json.loads(marker.read_text()) == want:
                return True
        except (FileNotFoundError, ValueError):
            pass
        if shard_problems(str(path), info.bytes, info.sha256):
            return False
        storage.write_bytes(str(marker), json.dumps(want).encode())
        return True

    def local_copy(self, shard: int) -> str:
        """Path of the verified cached copy of ``shard``, downloading it on first use."""
        path = self._local.get(shard)
        if path is not None:
            return path
        info, url = self.shards[shard], self.url(shard)
        dest = self._cache_path(info.path, info.sha256, ".tar")
        with _file_lock(dest.with_name(dest.name + ".lock")):  # one download per machine
            if not self._cached_ok(dest, shard):
                if dest.exists():
                    log.warning("cached copy %s of %s does not match the manifest; fetching it again", dest, url)
                    dest.unlink()
                try:
                    storage.download_file(url, dest)
                except (FileNotFoundError, NotADirectoryError):
                    raise UserError(f"shard {url} is missing: rebuild or re-upload the shards") from None
                if not self._cached_ok(dest, shard):
                    dest.unlink(missing_ok=True)
                    raise UserError(f"shard {url} does not match the manifest (size/sha256): it was changed or "
                                    "truncated after the build; rebuild or re-upload it")
        self._local[shard] = str(dest)
        return str(dest)

    # ------------------------------------------------------------------ reads
    def _read(self, r: Range) -> bytes | bytearray:
        """Bytes [r.start, r.end) of the shard; shorter when the shard is truncated."""
        if self.cache_dir is not None:
            return storage.read_bytes(self.local_copy(r.shard), r.start, r.end)
        url = self.url(r.shard)
        try:
            return storage.read_bytes(url, r.start, r.end)
        except (FileNotFoundError, NotADirectoryError):
            raise UserError(f"shard {url} is missing: rebuild or re-upload the shards") from None
        except OSError:
            if not self.remote:
                raise
            # Ranges past the end of a truncated object fail; read what exists, if that is the cause.
            st = storage.stat(url)
            if st is None:
                raise UserError(f"shard {url} is missing: rebuild or re-upload the shards") from None
            if st.size >= r.end:
                raise
            return storage.read_bytes(url, r.start, st.size) if r.start < st.size else b""

    def _map(self, fn, items: list) -> list:
        if not self.remote or self.cache_dir is not None or len(items) < 2:
            return [fn(x) for x in items]
        if self._pool is None or self._pool_pid != os.getpid():  # threads do not survive fork
            self._pool = ThreadPoolExecutor(self.io_threads, thread_name_prefix="shard-read")
            self._pool_pid = os.getpid()
        return list(self._pool.map(fn, items))

    def read_jpegs(self, shards: np.ndarray, indices: np.ndarray) -> list[bytes | None]:
        """JPEG bytes of sample ``indices[k]`` of shard ``shards[k]``, in the given order.

        ``None`` marks a sample whose bytes lie past the end of a truncated shard.
        """
        by_shard: dict[int, list[tuple[int, int]]] = {}
        for pos, (s, i) in enumerate(zip(shards.tolist(), indices.tolist())):
            by_shard.setdefault(s, []).append((pos, i))
        ranges = [r for s, items in by_shard.items() for r in coalesce(s, self.index(s), items, self.max_gap)]
        out: list[bytes | None] = [None] * len(shards)
        for r, data in zip(ranges, self._map(self._read, ranges)):
            view = memoryview(data)
            for pos, off, size in r.members:
                lo = off - r.start
                if lo + size <= len(data):
                    out[pos] = bytes(view[lo:lo + size])
        return out
