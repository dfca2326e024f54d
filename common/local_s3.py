"""A local S3-compatible server on 127.0.0.1 (moto's server mode) for the demo, tests and benchmarks.

    from common.local_s3 import LocalS3
    with LocalS3() as s3:                # moto on 127.0.0.1:<free port>, answering within 60 s
        os.environ.update(s3.env())      # AWS_ENDPOINT_URL + throw-away credentials
        s3.create_bucket("demo-bucket")
        ...                              # any boto3 client (ours, subprocesses') now talks to it
    # leaving the block stops it by its pid: SIGTERM, then SIGKILL after a bound

It stands in for a real bucket: the code under test reaches it only through the standard
``AWS_ENDPOINT_URL``, so the same commands run against real S3 once that variable is unset
and real credentials are available. The server listens on loopback only; nothing leaves the
machine. moto is in the ``test`` extra (``pip install -e .[test]``; ``scripts/dev.py`` installs it).

One home for starting it: ``scripts/demo.py --s3``, the ``s3_server`` fixture in
``tests/conftest.py`` and ``bench/bench_loader.py`` all use this class.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request

HOST = "127.0.0.1"

# The server process: moto's own entry point, plus a thread that ends it when the process that
# started it is gone (even after a kill -9 of the demo, no server is left behind for long).
_SERVE = """
import os, sys, threading, time
def watch(parent=int(sys.argv[1])):
    while os.getppid() == parent:
        time.sleep(0.5)
    os._exit(0)
threading.Thread(target=watch, daemon=True).start()
from moto.server import main
main(sys.argv[2:])
"""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


class LocalS3:
    """One moto server process on 127.0.0.1; :meth:`stop` ends it by pid (also on errors)."""

    def __init__(self, start_timeout_s: float = 60.0, stop_timeout_s: float = 10.0):
        self.start_timeout_s, self.stop_timeout_s = start_timeout_s, stop_timeout_s
        self.port: int | None = None
        self.pid: int | None = None
        self._proc: subprocess.Popen | None = None
        self._log = None

    @property
    def endpoint(self) -> str:
        if self.port is None:
            raise RuntimeError("the local S3 server is not started")
        return f"http://{HOST}:{self.port}"

    def start(self) -> "LocalS3":
        """Start the server on a free port and wait (bounded) until it answers HTTP."""
        if self._proc is not None:
            raise RuntimeError("the local S3 server is already started")
        self.port = free_port()
        # Its output goes to a temp file (a pipe nobody reads could fill up and block the server).
        self._log = tempfile.TemporaryFile()
        # Own session: a Ctrl-C in the terminal reaches us, and we stop the server in order.
        self._proc = subprocess.Popen(
            [sys.executable, "-c", _SERVE, str(os.getpid()), "-H", HOST, "-p", str(self.port)],
            stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True)
        self.pid = self._proc.pid
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.start_timeout_s
        while True:
            try:
                urllib.request.urlopen(self.endpoint + "/moto-api/", timeout=1).close()
                return
            except (OSError, urllib.error.URLError):
                pass  # still starting
            if self._proc.poll() is not None:
                raise RuntimeError(f"the local S3 server exited with {self._proc.returncode} before it answered: "
                                   f"{self._output()[-500:]} (is moto installed? pip install -e .[test])")
            if time.monotonic() > deadline:
                raise RuntimeError(f"the local S3 server did not answer on {self.endpoint} within "
                                   f"{self.start_timeout_s:.0f} s")
            time.sleep(0.1)

    def _output(self) -> str:
        if self._log is None:
            return ""
        self._log.seek(0)
        return self._log.read().decode(errors="replace")

    def stop(self) -> None:
        """Stop the server by its pid: SIGTERM, then SIGKILL after ``stop_timeout_s``. Idempotent."""
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            try:
                os.kill(proc.pid, signal.SIGTERM)
                proc.wait(timeout=self.stop_timeout_s)
            except subprocess.TimeoutExpired:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait(timeout=self.stop_timeout_s)
            except ProcessLookupError:
                proc.wait(timeout=self.stop_timeout_s)
        if self._log is not None:
            self._log.close()
            self._log = None

    def env(self) -> dict[str, str]:
        """The standard AWS variables that point boto3 (in any process) at this server.

        The credentials are placeholders moto accepts; they are not secrets and reach nothing
        else. ``AWS_EC2_METADATA_DISABLED`` keeps boto3 from asking an instance metadata service.
        """
        return {"AWS_ENDPOINT_URL": self.endpoint, "AWS_ACCESS_KEY_ID": "local-s3",
                "AWS_SECRET_ACCESS_KEY": "local-s3-placeholder-not-a-secret", "AWS_DEFAULT_REGION": "us-east-1",
                "AWS_EC2_METADATA_DISABLED": "true"}

    def create_bucket(self, name: str) -> str:
        """Create bucket ``name`` (a plain path-style PUT to the loopback server); returns ``s3://name``."""
        req = urllib.request.Request(f"{self.endpoint}/{name}", method="PUT", data=b"")
        urllib.request.urlopen(req, timeout=30).close()
        return f"s3://{name}"

    def __enter__(self) -> "LocalS3":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def pid_running(pid: int) -> bool:
    """True while process ``pid`` exists and is not a zombie (for tests that check a stop)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as f:  # Linux: a zombie has ended, only its entry is left
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return True
