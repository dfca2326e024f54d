"""Interruption handling (trainer.spot): real signals to real processes, a real IMDSv2
emulator on 127.0.0.1, and a real two-process gloo group agreeing on the stop step."""
from __future__ import annotations

import json
import logging
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests.conftest import REPO, free_port
from tests.imds_emulator import ImdsEmulator
from trainer.spot import EXIT_COMPLETED, EXIT_INTERRUPTED, InterruptWatcher, looks_like_ec2

POLL = 0.2

# A training loop in miniature: one "step" every 20 ms, the stop check after each step.
LOOP_CHILD = r"""
import json, os, sys, time
from trainer.spot import EXIT_INTERRUPTED, InterruptWatcher, report_exit

watcher = InterruptWatcher(poll_interval_s=float(os.environ.get("POLL", "5"))).start()
print(json.dumps({"polling": watcher.polling}), flush=True)
for step in range(1, 3000):
    time.sleep(0.02)
    print(json.dumps({"step": step}), flush=True)
    if watcher.requested():  # one process: no ranks to agree with
        print(json.dumps({"stopped_at": step, "reason": watcher.reason}), flush=True)
        watcher.stop()
        report_exit(EXIT_INTERRUPTED, watcher.reason)
        sys.exit(EXIT_INTERRUPTED)
sys.exit(0)
"""


def _child_env(**extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_EC2_METADATA")}
    env.update(PYTHONPATH=str(REPO), PYTHONUNBUFFERED="1", **extra)
    return env


class _Lines:
    """JSON lines of a child's stdout, read by a thread so a hung child cannot hang the test."""

    def __init__(self, proc: subprocess.Popen):
        self.queue: queue.Queue = queue.Queue()
        threading.Thread(target=self._pump, args=(proc.stdout,), daemon=True).start()

    def _pump(self, stream) -> None:
        with stream:
            for raw in stream:
                self.queue.put(json.loads(raw))
        self.queue.put(None)

    def until(self, pred, timeout: float = 30) -> list[dict]:
        """Lines up to and including the first one where pred(line) is true."""
        lines, deadline = [], time.monotonic() + timeout
        while True:
            try:
                line = self.queue.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                line = None
            if line is None:
                raise AssertionError(f"condition not met; last lines {lines[-3:]}")
            lines.append(line)
            if pred(line):
                return lines


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_stops_at_next_step_with_exit_75(tmp_path, sig):
    status = tmp_path / "last-exit"
    env = _child_env(AWS_EC2_METADATA_DISABLED="true", IMAGENET_EXIT_STATUS_FILE=str(status))
    proc = subprocess.Popen([sys.executable, "-c", LOOP_CHILD], env=env, cwd=REPO, stdout=subprocess.PIPE, text=True)
    lines = _Lines(proc)
    try:
        assert lines.until(lambda d: "polling" in d)[-1]["polling"] is False  # not on EC2: no IMDS traffic
        seen = lines.until(lambda d: d.get("step") == 5)
        proc.send_signal(sig)
        sent_at = seen[-1]["step"]
        rest = lines.until(lambda d: "stopped_at" in d)
        assert proc.wait(timeout=10) == EXIT_INTERRUPTED
    finally:
        proc.kill()
        proc.wait()
    stop = rest[-1]
    assert stop["reason"] == sig.name
    # the step in flight finishes and the loop stops right after it
    assert sent_at <= stop["stopped_at"] <= sent_at + 2
    assert status.read_text().split("\n")[0] == str(EXIT_INTERRUPTED)


def test_imds_notice_in_a_child_process_behaves_like_sigterm(tmp_path):
    """Auto-detection through the standard endpoint variable, then the same exit path."""
    with ImdsEmulator() as imds:
        env = _child_env(AWS_EC2_METADATA_SERVICE_ENDPOINT=imds.url, POLL=str(POLL))
        proc = subprocess.Popen([sys.executable, "-c", LOOP_CHILD], env=env, cwd=REPO, stdout=subprocess.PIPE,
                                text=True)
        lines = _Lines(proc)
        try:
            assert lines.until(lambda d: "polling" in d)[-1]["polling"] is True
            lines.until(lambda d: d.get("step") == 5)
            assert imds.token_requests >= 1 and imds.rejected == 0
            imds.announce(action="stop", seconds=120)
            announced = time.monotonic()
            stop = lines.until(lambda d: "stopped_at" in d)[-1]
            latency = time.monotonic() - announced
            assert proc.wait(timeout=10) == EXIT_INTERRUPTED
        finally:
            proc.kill()
            proc.wait()
    assert stop["reason"].startswith("spot-interruption: stop at ")
    assert latency < 2 * POLL + 0.5


def test_watcher_sees_notice_within_two_poll_intervals():
    with ImdsEmulator() as imds:
        w = InterruptWatcher(poll_imds=True, endpoint=imds.url, poll_interval_s=POLL, install_signals=False)
        with w:
            time.sleep(3 * POLL)
            assert not w.requested() and w.reason is None  # 404 = no notice
            imds.announce(action="terminate", seconds=120)
            t0 = time.monotonic()
            while not w.requested() and time.monotonic() - t0 < 5:
                time.sleep(0.01)
            latency = time.monotonic() - t0
        assert w.requested()
        assert latency <= 2 * POLL + 0.2
        assert w.reason.startswith("spot-interruption: terminate at ")
        assert imds.token_requests == 1  # the token is cached across polls
        assert imds.rejected == 0


def test_token_is_required_and_refreshed_after_401():
    with ImdsEmulator() as imds:
        # the emulator enforces IMDSv2 like EC2 with HttpTokens=required
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(imds.url + "/latest/meta-data/spot/instance-action", timeout=2)
        assert err.value.code == 401
        w = InterruptWatcher(poll_imds=True, endpoint=imds.url, poll_interval_s=POLL, install_signals=False)
        with w:
            time.sleep(2 * POLL)
            imds.revoke_tokens()  # e.g. the token expired: the watcher must fetch a new one
            time.sleep(2 * POLL)
            imds.announce()
            t0 = time.monotonic()
            while not w.requested() and time.monotonic() - t0 < 5:
                time.sleep(0.01)
        assert w.requested()
        assert imds.token_requests >= 2
        assert all(status != 401 for method, path, status in imds.requests[-3:])


def test_rebalance_recommendation_is_logged_once_and_does_not_stop(caplog):
    with ImdsEmulator() as imds:
        imds.set_rebalance(True)
        w = InterruptWatcher(poll_imds=True, endpoint=imds.url, poll_interval_s=0.05, install_signals=False)
        with caplog.at_level(logging.WARNING, logger="trainer.spot"):
            for _ in range(4):
                w.poll_once()
        assert not w.requested()
        assert sum("rebalance" in r.getMessage() for r in caplog.records) == 1


def test_detection_is_local_and_respects_the_sdk_switch(tmp_path):
    empty = tmp_path / "sys"
    empty.mkdir()
    assert looks_like_ec2({"AWS_EC2_METADATA_DISABLED": "true"}, sysfs=empty) is False
    assert looks_like_ec2({}, sysfs=empty) is False
    assert looks_like_ec2({"AWS_EC2_METADATA_SERVICE_ENDPOINT": "http://127.0.0.1:9"}, sysfs=empty) is True
    # the SDKs' off switch wins even over an endpoint
    assert looks_like_ec2({"AWS_EC2_METADATA_SERVICE_ENDPOINT": "http://127.0.0.1:9",
                           "AWS_EC2_METADATA_DISABLED": "TRUE"}, sysfs=empty) is False
    nitro = tmp_path / "nitro"
    (nitro / "devices/virtual/dmi/id").mkdir(parents=True)
    (nitro / "devices/virtual/dmi/id/board_vendor").write_text("Amazon EC2\n")
    assert looks_like_ec2({}, sysfs=nitro) is True
    xen = tmp_path / "xen"
    (xen / "hypervisor").mkdir(parents=True)
    (xen / "hypervisor/uuid").write_text("ec2e1916-9099-7caf-fd21-012345abcdef\n")
    assert looks_like_ec2({}, sysfs=xen) is True
    assert looks_like_ec2({"AWS_EC2_METADATA_DISABLED": "true"}, sysfs=xen) is False


def test_start_never_waits_for_the_network():
    """An endpoint that accepts connections but never answers must not delay start()/stop()."""
    with socket.socket() as black_hole:
        black_hole.bind(("127.0.0.1", 0))
        black_hole.listen(16)
        url = f"http://127.0.0.1:{black_hole.getsockname()[1]}"
        t0 = time.monotonic()
        w = InterruptWatcher(poll_imds=True, endpoint=url, poll_interval_s=POLL, install_signals=False).start()
        started = time.monotonic() - t0
        time.sleep(0.3)
        t1 = time.monotonic()
        w.stop()
        stopped = time.monotonic() - t1
    assert started < 0.1 and stopped < 1.0
    assert not w.requested()  # an unreachable IMDS is never mistaken for a notice


def test_stop_restores_previous_signal_handlers():
    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    w = InterruptWatcher(poll_imds=False).start()
    assert signal.getsignal(signal.SIGTERM) != before[0]
    os.kill(os.getpid(), signal.SIGTERM)  # handled by the watcher: only a flag
    deadline = time.monotonic() + 2
    while not w.requested() and time.monotonic() < deadline:
        time.sleep(0.01)
    w.stop()
    assert w.reason == "SIGTERM"
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before
    assert EXIT_COMPLETED == 0 and EXIT_INTERRUPTED == 75


DDP_CHILD = r"""
import json, os, sys, time
import torch
import torch.distributed as dist
from trainer.distributed import any_rank
from trainer.spot import EXIT_INTERRUPTED, InterruptWatcher

dist.init_process_group("gloo")
rank = dist.get_rank()
watcher = InterruptWatcher(poll_imds=False).start()
out = open(os.environ["PROGRESS"] + f".{rank}", "w", buffering=1)
for step in range(1, 5000):
    time.sleep(0.01)                       # the "training step"
    out.write(json.dumps({"step": step}) + "\n")
    if any_rank([watcher.requested()], torch.device("cpu"))[0]:
        out.write(json.dumps({"stopped_at": step, "reason": watcher.reason}) + "\n")
        out.close()
        watcher.stop()
        dist.destroy_process_group()
        sys.exit(EXIT_INTERRUPTED)
sys.exit(0)
"""


def _progress(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.endswith("}")]


def test_two_ranks_stop_at_the_same_step_when_only_one_gets_sigterm(tmp_path):
    port = free_port()
    progress = tmp_path / "progress"
    procs = []
    for rank in range(2):
        env = _child_env(AWS_EC2_METADATA_DISABLED="true", RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank),
                         MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), PROGRESS=str(progress))
        procs.append(subprocess.Popen([sys.executable, "-c", DDP_CHILD], env=env, cwd=REPO))
    try:
        deadline = time.monotonic() + 60
        while len(_progress(Path(f"{progress}.1"))) < 10:
            assert time.monotonic() < deadline, "ranks did not start"
            assert all(p.poll() is None for p in procs), "a rank died early"
            time.sleep(0.05)
        procs[1].send_signal(signal.SIGTERM)  # only rank 1 is told
        codes = [p.wait(timeout=30) for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert codes == [EXIT_INTERRUPTED, EXIT_INTERRUPTED]
    ends = [_progress(Path(f"{progress}.{r}"))[-1] for r in range(2)]
    assert ends[0]["stopped_at"] == ends[1]["stopped_at"]
    assert ends[1]["reason"] == "SIGTERM"
    assert ends[0]["reason"] is None  # rank 0 stopped because rank 1 asked, via any_rank()
