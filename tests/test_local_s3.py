"""The loopback S3 server helper (common.local_s3): starts answering, stops by pid, never lingers.

    python -m pytest -q tests/test_local_s3.py
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

from common.local_s3 import LocalS3, pid_running
from tests.conftest import REPO


def _wait_gone(pid: int, timeout: float = 30) -> bool:
    deadline = time.monotonic() + timeout
    while pid_running(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    return not pid_running(pid)


def test_context_manager_serves_on_loopback_and_stops_by_pid():
    with LocalS3() as server:
        pid = server.pid
        assert server.endpoint.startswith("http://127.0.0.1:")
        assert server.env()["AWS_ENDPOINT_URL"] == server.endpoint
        assert server.create_bucket("lifecycle") == "s3://lifecycle"
        assert pid_running(pid)
    assert not pid_running(pid)
    server.stop()  # idempotent


def test_stop_kills_a_server_that_does_not_answer_sigterm():
    server = LocalS3(stop_timeout_s=1).start()
    os.kill(server.pid, signal.SIGSTOP)  # a stuck server: SIGTERM stays pending, so stop() must SIGKILL
    server.stop()
    assert not pid_running(server.pid)


def test_server_exits_by_itself_when_its_starter_is_killed_hard():
    code = "from common.local_s3 import LocalS3; import time; s = LocalS3().start(); print(s.pid, flush=True); " \
           "time.sleep(120)"
    starter = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, stdout=subprocess.PIPE, text=True,
                               env=dict(os.environ, PYTHONPATH=str(REPO)))
    try:
        pid = int(starter.stdout.readline())  # bounded: the starter's start() gives up after 60 s
        assert pid_running(pid)
    finally:
        starter.kill()  # kill -9: no finally, no stop() runs in the starter
        starter.wait(timeout=30)
    assert _wait_gone(pid), "the server outlived the process that started it"
