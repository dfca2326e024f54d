"""The hang watchdog: a process that stops making progress logs every thread's stack and exits
76 in bounded time, and a training run whose S3 data source stalls mid-run does so and then
resumes from its last checkpoint.

    python -m pytest -q tests/test_watchdog.py
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from common.errors import EXIT_HUNG
from tests.conftest import REPO, shards_in_s3
from tests.faulty_proxy import FaultyProxy
from trainer.watchdog import collective_timeout_minutes


def _env(**extra) -> dict:
    return dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", **extra)


def _communicate(proc: subprocess.Popen, timeout: float) -> tuple[str, str]:
    """Wait at most ``timeout`` s; a process still running then fails the test (and is killed)."""
    try:
        return proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        raise AssertionError(f"still running after {timeout} s (a hang)\n{out[-2000:]}\n{err[-4000:]}") from None


# --------------------------------------------------------------------------- the class, in a real process
HUNG_PROGRAM = textwrap.dedent("""
    import multiprocessing, sys, threading, time
    from trainer.watchdog import HangWatchdog

    def sleeper():
        time.sleep(600)

    if __name__ == "__main__":
        child = multiprocessing.get_context("spawn").Process(target=sleeper, daemon=True)
        child.start()
        print(child.pid, flush=True)
        threading.Thread(target=sleeper, name="some-io-thread", daemon=True).start()
        dog = HangWatchdog(0.5, 600, log_path=sys.argv[1]).start()
        time.sleep(1.5)                     # a slow first step: within the first-step allowance
        for _ in range(20):                 # then steady progress, 0.1 s a step
            dog.beat()
            time.sleep(0.1)
        print("hanging", flush=True)
        threading.Event().wait()            # then the main thread hangs for good
""")


def test_watchdog_dumps_all_stacks_records_76_and_exits(tmp_path):
    log, status = tmp_path / "run.log", tmp_path / "status"
    log.write_text("earlier log lines\n")
    program = tmp_path / "hung.py"  # a file, not -c: the spawned child re-imports it
    program.write_text(HUNG_PROGRAM)
    proc = subprocess.Popen([sys.executable, str(program), str(log)], cwd=REPO, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True,
                            env=_env(IMAGENET_EXIT_STATUS_FILE=str(status)))
    out, err = _communicate(proc, timeout=60)  # the regular 0.5 s allowance, not the first step's 600 s
    assert proc.returncode == EXIT_HUNG, err
    assert out.split()[1] == "hanging"  # the slow first step and the steady steps did not fire it
    text = log.read_text()
    assert text.startswith("earlier log lines\n")  # appended, not overwritten
    for where in (text, err):
        assert "hang watchdog: no step or batch completed within" in where
        assert "Thread 0x" in where and 'File "' in where and "in sleeper" in where  # every thread's stack
    assert status.read_text().split()[0] == str(EXIT_HUNG)
    child = int(out.split()[0])  # its multiprocessing child (a DataLoader worker, in training) is gone
    deadline = time.time() + 10
    while time.time() < deadline and _alive(child):
        time.sleep(0.1)
    assert not _alive(child)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie (exited, not yet reaped by init) counts as gone
        return Path(f"/proc/{pid}/stat").read_text().split(")")[1].split()[0] != "Z"
    except OSError:
        return False


def test_collective_timeout_outlasts_both_allowances():
    assert collective_timeout_minutes(15, 30) > 30
    assert collective_timeout_minutes(0.2, 1) > 1
    assert collective_timeout_minutes(0, 30) == 30  # watchdog off: the plain default


def test_negative_hang_timeout_is_a_usage_error():
    from trainer.config import parse_config
    from common.errors import UserError

    with pytest.raises(UserError, match="--hang-timeout-minutes must be >= 0"):
        parse_config(["--data", "x", "--hang-timeout-minutes", "-1"])
    assert parse_config(["--data", "x", "--hang-timeout-minutes", "0.1"]).hang_timeout_minutes == 0.1


# --------------------------------------------------------------------------- a training run whose S3 data stalls
HANG_MIN, FIRST_MIN = 0.3, 1.5
ARGS = ["--arch", "resnet18", "--batch-size", "8", "--image-size", "32", "--val-resize", "36", "--workers", "1",
        "--device", "cpu", "--warmup-epochs", "0.3", "--epochs", "3", "--limit-train-steps", "4",
        "--checkpoint-interval-minutes", "600", "--keep-last", "2",
        "--hang-timeout-minutes", str(HANG_MIN), "--hang-first-step-minutes", str(FIRST_MIN)]


@pytest.fixture(scope="module")
def s3_data(tmp_path_factory, s3_server):
    return shards_in_s3(tmp_path_factory, s3_server, "watchdog", classes=4, train_per_class=20, val_per_class=4,
                        seed=3, shard_max_count=20, workers=1)["s3"]


def _latest(out: Path) -> dict:
    try:
        return json.loads((out / "checkpoints" / "latest.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


def test_stalled_data_source_exits_76_with_stacks_and_the_rerun_resumes(s3_data, s3_server, tmp_path):
    out, status = tmp_path / "run", tmp_path / "status"
    port = int(s3_server.rsplit(":", 1)[1])
    cmd = [sys.executable, "-m", "trainer", "--data", s3_data, "--output", str(out), *ARGS]
    with FaultyProxy(("127.0.0.1", port), max_cuts=0) as proxy:
        env = _env(AWS_ENDPOINT_URL=proxy.url, IMAGENET_EXIT_STATUS_FILE=str(status))
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                start_new_session=True)
        deadline = time.time() + 300
        while _latest(out).get("epoch", 0) < 1:  # epoch 1 trained, evaluated and saved
            if proc.poll() is not None or time.time() > deadline:
                os.killpg(proc.pid, signal.SIGKILL)
                raise AssertionError(f"no end-of-epoch-1 checkpoint (exit {proc.poll()}): {proc.communicate()[1]}")
            time.sleep(0.05)
        proxy.stall()  # S3 stops answering mid-run: the next shard read blocks
        t_stall = time.time()
        _, err = _communicate(proc, timeout=HANG_MIN * 60 + 60)
        waited = time.time() - t_stall
        assert proc.returncode == EXIT_HUNG, err[-4000:]
        assert status.read_text().split()[0] == str(EXIT_HUNG)
        logs = [p.read_text() for p in out.glob("training_log_*.txt")]
        hung = [t for t in logs if "hang watchdog: no" in t]
        assert len(hung) == 1 and "Thread 0x" in hung[0] and 'File "' in hung[0], logs
        assert "Thread 0x" in err
        saved = _latest(out)
        assert saved["global_step"] >= 4 and saved["step_in_epoch"] == 0  # end of epoch 1 (or 2)

        proxy.resume()  # S3 healthy again: the same command resumes from the last checkpoint
        rerun = subprocess.Popen(cmd, cwd=REPO, env=env, text=True, stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, start_new_session=True)
        _, err2 = _communicate(rerun, timeout=300)
    assert rerun.returncode == 0, err2[-4000:]
    assert f"resumed from {out / 'checkpoints' / saved['name']}" in err2
    assert _latest(out)["global_step"] == 3 * 4 and _latest(out)["epoch"] == 3
    print(f"watchdog fired {waited:.1f} s after the stall (timeout {HANG_MIN * 60:.0f} s)")
