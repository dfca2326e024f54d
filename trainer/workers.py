"""Where loader workers come from: never a fork of the training process, and they outlive SIGTERM.

    from trainer.workers import WorkerInit, worker_context
    DataLoader(ds, num_workers=8, persistent_workers=True, multiprocessing_context=worker_context("forkserver"),
               worker_init_fn=WorkerInit(dict(os.environ)))

The training process has threads (checkpoint uploads, IMDS poller, S3 read pools, gloo),
and a ``fork()`` of a process with threads can deadlock in the child (CPython 3.11's
after-fork clean-up waited on a lock another thread held). Workers therefore start from a
forkserver (Linux) or spawn: the forkserver is a separate, single-threaded process started
by exec; it forks the workers. See ``trainer.loader`` for how the loaders use them.
"""
from __future__ import annotations

import functools
import multiprocessing
import os
import signal
import subprocess
import sys

WORKER_START_METHODS = ("forkserver", "spawn")


def _outlive_sigterm(worker_id: int) -> None:
    """Ignore SIGTERM in a DataLoader worker.

    torchrun stops a job by signalling each rank's whole process group, DataLoader workers
    included. Were they to die, the rank would crash mid-step instead of finishing it and
    writing its interruption checkpoint. Workers still exit when the loader shuts them down
    or the process that started them dies (see :class:`WorkerInit`), and SIGKILL still ends them.
    """
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


class WorkerInit:
    """DataLoader ``worker_init_fn``: ignore SIGTERM, and take the loader creator's environment.

    A forkserver child inherits the forkserver's environment, a copy made when the first
    loader started it; the creator's current one (endpoint, credentials, ...) is what a
    forked or spawned worker would see. It travels in the pipe to the worker, nowhere else.
    """

    def __init__(self, env: dict[str, str]):
        self.env = env

    def __call__(self, worker_id: int) -> None:
        _outlive_sigterm(worker_id)
        if dict(os.environ) != self.env:
            os.environ.clear()
            os.environ.update(self.env)
        # torch's worker loop (which builds its watchdog after this function) exits when its
        # parent dies. A forkserver child's parent is the forkserver, which lives as long as
        # any of its children: watch the process that started the worker instead, or a killed
        # trainer would leave its workers (and the forkserver) behind forever.
        from torch.utils.data._utils import worker as torch_worker

        if hasattr(torch_worker, "ManagerWatchdog"):
            torch_worker.ManagerWatchdog = CreatorWatchdog


class CreatorWatchdog:
    """Alive while the process that started this worker is (``multiprocessing.parent_process``)."""

    def __init__(self):
        self.creator = multiprocessing.parent_process()

    def is_alive(self) -> bool:
        return self.creator is None or self.creator.is_alive()


@functools.lru_cache(maxsize=1)
def _forkserver_preload() -> list[str]:
    """``["trainer.worker_preload"]`` when a fresh interpreter finds this copy of ``trainer``.

    Python 3.11's forkserver imports its preload before (and without) taking its creator's
    ``sys.path``; a program that changed its path (a script inserting a checkout) would
    otherwise give its workers another copy of the code. Without a preload each worker
    imports everything itself, from its creator's path: correct, only slower to start.
    """
    from multiprocessing import util

    probe = "import importlib.util as u; s = u.find_spec('trainer'); print(s.submodule_search_locations[0])"
    try:
        out = subprocess.run([sys.executable, *util._args_from_interpreter_flags(), "-c", probe],
                             capture_output=True, text=True, timeout=60).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return []
    here = os.path.dirname(os.path.realpath(__file__))
    return ["trainer.worker_preload"] if out and os.path.realpath(out) == here else []


def worker_context(method: str):
    """The multiprocessing context for loader workers; for ``forkserver``, start the server now.

    The forkserver preloads ``trainer.worker_preload`` (workers then start without seconds
    of imports each) and stays single-threaded, as anything that forks must. It starts with
    SIGTERM blocked, as Python's own resource tracker does: it and the workers it forks (they
    inherit the mask) then outlive the SIGTERM that torchrun or a spot shutdown sends to the
    whole process group, so the rank can finish its step and checkpoint. It exits by itself
    once this process and its workers have ended. The mask is this thread's only, for the
    duration of the start: a SIGTERM meanwhile stays pending for this process, not lost.
    """
    ctx = multiprocessing.get_context(method)
    if method == "forkserver":
        from multiprocessing import forkserver, resource_tracker

        ctx.set_forkserver_preload(_forkserver_preload())  # only has an effect before the server starts
        resource_tracker.ensure_running()  # first: starting it unblocks SIGTERM in this thread
        old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
        try:
            forkserver.ensure_running()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, old)
    return ctx
