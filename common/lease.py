"""One writer per run folder or shard destination: a lease fenced by conditional writes.

    lease = Lease("s3://bucket/runs/r50", lease_seconds=300, what="trainer").acquire()  # LeaseHeld: exit 2
    lease.start_renewing(on_lost=callback)   # background renewal every lease_seconds / 3
    lease.renew()                            # before each checkpoint; LeaseLost (exit 77) once taken over
    lease.release()                          # clean exit: a restarted instance continues at once

The lease is ``lease.json`` in the folder, naming its holder (host or EC2 instance id,
boot id, pid, start time, last renewal; no secrets). On S3 it is created with
``If-None-Match: *`` and renewed with ``If-Match`` on the ETag this holder last wrote, so a
holder learns it was taken over at its next renewal. A lease not renewed for its
``lease_seconds`` is taken over with ``If-Match`` on the stale ETag (of two takers only one
wins); a holder that is provably dead (same machine and an older boot, or same boot and
its process is gone) is taken over at once. A local folder is guarded by an ``fcntl``
lock on ``.lease.lock`` held while the process lives (the kernel drops it when the holder
dies); ``lease.json`` is written there too, to name the holder and detect a rewrite.
"""
from __future__ import annotations

import json
import logging
import os
import threading
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

from common import host, storage
from common.errors import EXIT_LEASE_LOST, EXIT_USAGE, UserError
from common.host import HOST_ENV  # noqa: F401 - names this machine in the lease (part of this API)

log = logging.getLogger(__name__)
LEASE_NAME = "lease.json"
LOCK_NAME = ".lease.lock"
DEFAULT_LEASE_SECONDS = 300.0

_child_fds: set[int] = set()  # lock fds a forked child must not keep (it would outlive a killed holder)


def _close_in_child() -> None:
    for fd in list(_child_fds):
        try:
            os.close(fd)  # only this child's copy: the parent keeps its lock
        except OSError:
            pass
    _child_fds.clear()


os.register_at_fork(after_in_child=_close_in_child)


class LeaseHeld(UserError):
    """Another live process holds the lease (exit 2 before touching anything)."""

    def __init__(self, message: str):
        super().__init__(message, EXIT_USAGE)


class LeaseLost(UserError):
    """This process no longer holds its lease: it must stop writing (exit 77, do not rerun)."""

    def __init__(self, message: str):
        super().__init__(message, EXIT_LEASE_LOST)


# --------------------------------------------------------------------------- who we are
def _iso(t: float) -> str:
    return datetime.fromtimestamp(t, timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


def identity(what: str) -> dict:
    """This process as a lease holder (no secrets: names, ids and times only)."""
    return {"what": what, "host": host.host_id(), "machine": host.machine_hash(), "boot_id": host.boot_id(),
            "boot_time": host.boot_time(), "pid_ns": host.pid_ns(), "pid": os.getpid(),
            "pid_start": host.pid_start(os.getpid()),
            "started_at": _iso(time.time())}


def judge(other: dict, age_s: float | None, me: dict, lease_seconds: float) -> str | None:
    """Why ``other``'s lease may be taken now, or None while it is live."""
    if other.get("released"):
        return "released"
    if other.get("host") == me["host"] and other.get("machine") == me["machine"]:
        if other.get("boot_id") != me["boot_id"] and int(other.get("boot_time") or 0) < me["boot_time"]:
            return "its machine has rebooted since"
        if other.get("boot_id") == me["boot_id"] and other.get("pid_ns") == me["pid_ns"]:
            pid, started = int(other.get("pid") or 0), host.pid_start(int(other.get("pid") or 0))
            if pid <= 0 or started is None or other.get("pid_start") not in (None, started):
                return f"its process {pid} is gone"
    limit = float(other.get("lease_seconds") or lease_seconds)
    if age_s is None:
        age_s = time.time() - float(other.get("renewed_unix") or 0)
    if age_s > limit:
        return f"not renewed for {age_s:.0f} s (over its {limit:g} s)"
    return None


def describe(other: dict, age_s: float | None) -> str:
    """``trainer pid 123 on host-a (started ..., last renewed 14 s ago)``."""
    if age_s is None and other.get("renewed_unix"):
        age_s = max(0.0, time.time() - float(other["renewed_unix"]))
    ago = f"{age_s:.0f} s ago" if age_s is not None else "at an unknown time"
    return (f"{other.get('what', 'a process')} pid {other.get('pid', '?')} on {other.get('host', '?')} "
            f"(started {other.get('started_at', '?')}, lease last renewed {other.get('renewed_at', '?')}, {ago})")


# --------------------------------------------------------------------------- the lease
class Lease:
    """The single-writer lease of one folder (local or s3://). See the module docstring."""

    def __init__(self, root: str, lease_seconds: float = DEFAULT_LEASE_SECONDS, what: str = "trainer"):
        if lease_seconds <= 0:
            raise UserError(f"--lease-seconds must be positive, got {lease_seconds:g}")
        self.remote = storage.is_s3(root)
        self.root = str(root).rstrip("/") if self.remote else str(Path(root).expanduser())
        self.lease_seconds, self.what = float(lease_seconds), what
        self.url = storage.join(self.root, LEASE_NAME)
        self.token = uuid.uuid4().hex  # names this holder's writes (a renewal retried after a drop is ours)
        self.me = identity(what)
        self.etag: str | None = None
        self.lost: str | None = None  # why the lease was lost; None while held
        self.held = False
        self._seq = 0
        self._fd: int | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._on_lost: list[Callable[[str], None]] = []
        self._last_ok = 0.0

    def _body(self, released: bool = False) -> bytes:
        self._seq += 1
        now = time.time()
        return json.dumps({**self.me, "token": self.token, "seq": self._seq, "renewed_at": _iso(now),
                           "renewed_unix": now, "lease_seconds": self.lease_seconds, "released": released},
                          sort_keys=True).encode()

    def _held_error(self, other: dict | None, age_s: float | None) -> LeaseHeld:
        who = describe(other, age_s) if other else "another process (its lease.json is unreadable)"
        limit = float((other or {}).get("lease_seconds") or self.lease_seconds)
        wait = "" if not self.remote else (f"; if it died, rerun once its lease has gone {limit:g} s without renewal "
                                           "(a dead holder on this machine is taken over at once)")
        return LeaseHeld(f"{self.root} is in use by {who}: only one {self.what} may write there. Stop that process "
                         f"or use another folder{wait}")

    # ------------------------------------------------------------------ acquire
    def acquire(self) -> "Lease":
        """Take the lease, or raise LeaseHeld naming the live holder. Returns self."""
        if self.remote:
            self._acquire_s3()
        else:
            self._acquire_local()
        self.held, self._last_ok = True, time.monotonic()
        return self

    def _acquire_s3(self) -> None:
        other, age = None, None
        for _ in range(4):  # bounded: each round either wins or learns of a newer holder
            try:
                self.etag = storage.put_versioned(self.url, self._body(), if_none_match=True)
                log.info(f"lease {self.url} taken")
                return
            except storage.PreconditionFailed:
                pass
            try:
                seen = storage.get_versioned(self.url)
            except FileNotFoundError:
                continue  # released by deletion in between: try to create again
            other, age = _parse(seen.data), seen.age_s
            if other is not None and other.get("token") == self.token:
                self.etag = seen.etag  # our own create, retried after a dropped response
                return
            why = judge(other, age, self.me, self.lease_seconds) if other is not None else (
                "unreadable and stale" if (age or 0) > self.lease_seconds else None)
            if why is None:
                raise self._held_error(other, age)
            try:
                self.etag = storage.put_versioned(self.url, self._body(), if_match=seen.etag)
            except storage.PreconditionFailed:
                continue  # renewed by its holder, or another taker won: judge the new version
            if why != "released":
                log.warning(f"took over the lease {self.url} from {describe(other or {}, age)}: {why}")
            return
        raise self._held_error(other, age)

    def _acquire_local(self) -> None:
        import fcntl

        try:
            Path(self.root).mkdir(parents=True, exist_ok=True)
            fd = os.open(Path(self.root, LOCK_NAME), os.O_RDWR | os.O_CREAT, storage.public_mode())
        except OSError as exc:
            raise UserError(f"{self.root} is not writable ({exc.strerror or exc}): choose a writable folder") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise self._local_holder_error() from None
        self._fd = fd
        _child_fds.add(fd)
        self.etag = storage.put_versioned(self.url, self._body())  # ours while the flock is ours

    def _local_holder_error(self, wait_s: float = 3.0) -> "LeaseHeld":
        """The error naming the process that holds the lock. It writes its record right after
        taking the lock, so a missing or released record is re-read for up to ``wait_s``."""
        deadline = time.monotonic() + wait_s
        while True:
            try:
                seen = storage.get_versioned(self.url)
                other = _parse(seen.data)
                if other and not other.get("released"):
                    return self._held_error(other, seen.age_s)
            except FileNotFoundError:
                other = None
            if time.monotonic() >= deadline:
                return self._held_error(None, None)
            time.sleep(0.1)

    # ------------------------------------------------------------------ renew
    def renew(self) -> None:
        """Extend the lease now; raises LeaseLost (and stays lost) once another holder took it."""
        with self._lock:
            if self.lost:
                raise LeaseLost(self.lost)
            if not self.held:
                return
            try:
                self.etag = storage.put_versioned(self.url, self._body(), if_match=self.etag)
            except storage.PreconditionFailed:
                self._renew_conflict()
            self._last_ok = time.monotonic()

    def _renew_conflict(self) -> None:
        """If-Match failed: our own write retried after a drop, or a takeover (then: lost)."""
        try:
            seen = storage.get_versioned(self.url)
            other, age = _parse(seen.data), seen.age_s
        except FileNotFoundError:
            seen, other, age = None, None, None
        if seen is not None and other is not None and other.get("token") == self.token and not other.get("released"):
            self.etag = seen.etag
            return
        who = describe(other, age) if other else "someone (lease.json was removed)"
        self._mark_lost(f"lease {self.url} was taken over by {who}")
        raise LeaseLost(self.lost)

    def _mark_lost(self, reason: str) -> None:
        if self.lost is None:
            self.lost = reason
            log.error(f"{reason}: this {self.what} stops writing there")
            for callback in self._on_lost:
                try:
                    callback(reason)
                except Exception:  # noqa: BLE001 - a callback must not stop the others
                    log.exception("lease-lost callback failed")

    def renewed_ago(self) -> float:
        """Seconds since the last successful acquire or renewal (this machine's monotonic clock)."""
        return time.monotonic() - self._last_ok

    def check(self) -> None:
        """Raise LeaseLost if the lease was lost (no I/O)."""
        if self.lost:
            raise LeaseLost(self.lost)

    def start_renewing(self, on_lost: Callable[[str], None] | None = None) -> "Lease":
        """Renew every lease_seconds / 3 on a daemon thread; ``on_lost(reason)`` runs once if lost."""
        if on_lost is not None:
            self._on_lost.append(on_lost)
        if self.held and self._thread is None:
            self._stop.clear()
            self._thread = threading.Thread(target=self._renew_loop, name="lease-renew", daemon=True)
            self._thread.start()
        return self

    def _renew_loop(self) -> None:
        while not self._stop.wait(self.lease_seconds / 3) and not self.lost:
            try:
                self.renew()
            except LeaseLost:
                return
            except Exception as exc:  # noqa: BLE001 - transient: try again next tick, within the lease
                since = time.monotonic() - self._last_ok
                log.warning(f"could not renew the lease {self.url} ({exc}); last renewal {since:.0f} s ago")
                if since >= self.lease_seconds:
                    with self._lock:
                        self._mark_lost(f"lease {self.url} not renewed for {since:.0f} s (another writer may "
                                        "have taken over)")
                    return

    # ------------------------------------------------------------------ release
    def release(self) -> None:
        """Mark the lease released (a rerun starts at once). No-op when lost or never held."""
        self._stop.set()
        thread, self._thread = self._thread, None
        if thread is not None:
            thread.join(timeout=max(5.0, self.lease_seconds))
        with self._lock:
            if self.held and not self.lost:
                try:
                    self.etag = storage.put_versioned(self.url, self._body(released=True), if_match=self.etag)
                    log.info(f"lease {self.url} released")
                except storage.PreconditionFailed:
                    log.warning(f"lease {self.url} was taken over before it could be released")
                except Exception as exc:  # noqa: BLE001 - exiting matters more; the lease expires by itself
                    log.warning(f"could not release the lease {self.url} ({exc}): it expires in "
                                f"{self.lease_seconds:g} s")
            self.held = False
            if self._fd is not None:
                _child_fds.discard(self._fd)
                os.close(self._fd)  # drops the flock
                self._fd = None

    def __enter__(self) -> "Lease":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _parse(data: bytes) -> dict | None:
    try:
        out = json.loads(data)
        return out if isinstance(out, dict) else None
    except ValueError:
        return None
