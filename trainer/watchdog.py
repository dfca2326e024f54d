"""Hang watchdog: exit with a retryable code when training stops making progress.

    from trainer.watchdog import HangWatchdog

    dog = HangWatchdog(timeout_s=15 * 60, first_timeout_s=30 * 60, log_path=run_log)
    dog.start()                    # the first beat gets the long allowance (compile, warm-up)
    try:
        for step in ...:
            train_step()
            dog.beat()             # after every optimizer step and every eval batch
    finally:
        dog.stop()

A run on a spot fleet that hangs (a deadlocked DataLoader worker, a peer that never joins an
all_reduce, a stalled S3 connection) would burn GPU-hours until someone looks; a process
that exits is restarted by the loop. So when no beat arrives within the allowance, a daemon
thread writes every thread's Python stack (``faulthandler``) to the log file and stderr,
records :data:`common.errors.EXIT_HUNG` (76) with :func:`trainer.spot.report_exit`, kills
this process's own multiprocessing children (DataLoader workers) and leaves with
``os._exit(76)``: a hung main thread cannot unwind, so nothing waits for it. The restart
loop treats 76 as retryable; the run resumes from its last checkpoint.

The first beat after :meth:`start` (and after :meth:`expect_slow`, e.g. before the first
evaluation) gets ``first_timeout_s``; every later one ``timeout_s``. A timeout of 0 turns
the watchdog off. It never writes through :mod:`logging` when it fires (a hung thread may
hold a handler's lock): the log file is appended to through its own file descriptor.
"""
from __future__ import annotations

import faulthandler
import multiprocessing
import os
import threading
import time
from pathlib import Path
from typing import Callable

from common.errors import EXIT_HUNG
from trainer.spot import report_exit


class HangWatchdog:
    """Fire (dump stacks, record and exit with 76) when no :meth:`beat` comes in time."""

    def __init__(self, timeout_s: float, first_timeout_s: float | None = None, *,
                 log_path: str | os.PathLike | None = None, on_fire: Callable[[], None] | None = None,
                 on_fire_limit_s: float = 15.0, exit_fn: Callable[[int], None] = os._exit):
        self.timeout_s = float(timeout_s)
        self.first_timeout_s = float(first_timeout_s if first_timeout_s is not None else timeout_s)
        self.log_path = Path(log_path) if log_path else None
        self.on_fire, self.on_fire_limit_s = on_fire, on_fire_limit_s
        self._exit = exit_fn
        self._lock = threading.Lock()
        self._last = time.monotonic()
        self._allowance = self.first_timeout_s
        self._what = "first step"
        self._stopped = False
        self._wake = threading.Event()  # set by stop(), and by a beat that shortens the allowance
        self._thread: threading.Thread | None = None
        self.fired = False

    @property
    def enabled(self) -> bool:
        return self.timeout_s > 0 and self.first_timeout_s > 0

    def start(self) -> "HangWatchdog":
        """Arm with the first-step allowance and start the watching thread (once)."""
        self.expect_slow("first step")
        if self.enabled and self._thread is None:
            self._thread = threading.Thread(target=self._watch, name="hang-watchdog", daemon=True)
            self._thread.start()
        return self

    def beat(self) -> None:
        """Progress: an optimizer step or an eval batch completed. Cheap (no syscalls but a clock)."""
        now = time.monotonic()
        with self._lock:
            shorter = self._allowance > self.timeout_s
            self._last, self._allowance, self._what = now, self.timeout_s, "step or batch"
        if shorter:  # the thread sleeps toward the long deadline: make it look again
            self._wake.set()

    def expect_slow(self, what: str) -> None:
        """The next beat may take the long allowance (first step, first evaluation after a start)."""
        with self._lock:
            self._last, self._allowance, self._what = time.monotonic(), self.first_timeout_s, what

    def stop(self) -> None:
        """Disarm; bounded: the thread wakes at once and is joined for at most 5 s."""
        self._stopped = True
        self._wake.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)

    def _watch(self) -> None:
        while not self._stopped:
            self._wake.clear()
            with self._lock:
                last, allowance, what = self._last, self._allowance, self._what
            left = last + allowance - time.monotonic()
            if left <= 0:
                self._fire(what, allowance)
                return
            self._wake.wait(left)  # a later beat moves the deadline on: look again when this one passes

    def _fire(self, what: str, allowance: float) -> None:
        self.fired = True
        msg = (f"hang watchdog: no {what} completed within {allowance / 60:g} min "
               f"(--hang-timeout-minutes / --hang-first-step-minutes); the stacks of all threads follow. "
               f"Exiting with {EXIT_HUNG} (retryable: rerun resumes from the last checkpoint).\n")
        try:
            dump_stacks(msg, self.log_path)
            report_exit(EXIT_HUNG, f"hang watchdog: no {what} within {allowance / 60:g} min")
            if self.on_fire is not None:  # best effort, bounded (e.g. upload the log)
                t = threading.Thread(target=self.on_fire, name="hang-watchdog-on-fire", daemon=True)
                t.start()
                t.join(self.on_fire_limit_s)
            kill_children()
        finally:
            self._exit(EXIT_HUNG)  # whatever failed above, the process must not stay hung


def collective_timeout_minutes(hang_minutes: float, first_minutes: float, default: float = 30.0) -> float:
    """The process-group timeout: longer than both watchdog allowances, so a rank waiting in a
    collective for a hung peer is ended by its own watchdog (exit 76, stacks in the log)
    rather than by a collective error (exit 1); the timeout stays as the backstop, and is
    ``default`` when the watchdog is off."""
    if hang_minutes <= 0 or first_minutes <= 0:
        return default
    return max(hang_minutes, first_minutes) + 2.0


def dump_stacks(header: str, log_path: Path | None) -> None:
    """``header`` then every thread's Python stack, to stderr and (appended) to ``log_path``.

    Raw file descriptors only: no Python-level lock another (hung) thread might hold.
    """
    targets = [2]  # stderr
    log_file = None
    if log_path is not None:
        try:
            log_file = open(log_path, "ab", buffering=0)
            targets.append(log_file.fileno())
        except OSError:
            pass
    try:
        for fd in targets:
            try:
                os.write(fd, header.encode())
                faulthandler.dump_traceback(file=fd, all_threads=True)
            except (OSError, ValueError):
                pass
    finally:
        if log_file is not None:
            log_file.close()


def kill_children() -> None:
    """SIGKILL this process's own multiprocessing children (DataLoader workers): a worker stuck
    in a read would otherwise outlive its parent for minutes, holding memory and pipes."""
    try:
        children = multiprocessing.active_children()
    except Exception:  # noqa: BLE001 - best effort while exiting
        return
    for child in children:
        try:
            child.kill()
        except Exception:  # noqa: BLE001
            pass
