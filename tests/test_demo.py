"""The S3 demo (scripts/demo.py --s3) as a user runs it, and the local S3 server's lifecycle.

    python -m pytest -q tests/test_demo.py

The demo starts its own loopback moto server (common.local_s3), builds shards into it, trains
with a SIGTERM mid-epoch, resumes, evaluates and predicts. Asserted: exit 0; the interruption
exited 75 and left its checkpoint object in S3; the rerun logged a resume from exactly that
step; evaluate reproduced the logged val top-1; the sample logs of both runs equal the
uninterrupted plan (recomputed here from a local build of the same tree, byte-identical to the
demo's S3 build); and the server's pid is gone, also after a Ctrl-C mid-training.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from common import manifest as mf
from common.local_s3 import pid_running
from shard_builder.build import build_shards
from tests.conftest import REPO
from trainer.loader import LoaderConfig, planned_train_batches

DEMO_TIMEOUT_S = 900  # generous for 2 shared CPU cores; a hang fails the test, it never blocks


def _demo(out: Path, **popen) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}  # the demo brings its own server
    env.update(PYTHONPATH=str(REPO), PYTHONUNBUFFERED="1")
    popen.setdefault("stdout", subprocess.PIPE)
    return subprocess.Popen([sys.executable, "scripts/demo.py", "--s3", "--out", str(out)], cwd=REPO, env=env,
                            stderr=subprocess.STDOUT, text=True, **popen)


def _port_closed(endpoint: str) -> bool:
    host, port = endpoint.rsplit("//", 1)[1].split(":")
    with socket.socket() as s:
        s.settimeout(2)
        return s.connect_ex((host, int(port))) != 0


def _assert_order_matches_plan(out: Path, facts: dict) -> None:
    """Rebuild the demo's shards locally (same tree, same arguments: byte-identical) and check
    that the two runs' sample logs together are the uninterrupted plan, micro-batch by micro-batch."""
    shards = out / "check-shards"
    build_shards(str(out / "kaggle"), str(shards), shard_max_count=100, workers=1)
    manifest = mf.load(str(shards))
    assert [s.sha256 for s in manifest.split("train").shards] == facts["train_shards_sha256"]
    keys = [k for s in manifest.split("train").shards for k in mf.load_index(manifest, s).keys]
    stop = facts["stopped_at"]
    for epoch in range(2):
        plan = planned_train_batches(LoaderConfig(str(shards), batch_size=32, seed=0, drop_last=True), manifest, rank=0, world_size=1,
                          epoch=epoch)
        want = [(int(plan.steps[b]), [keys[i] for i in plan.batch(b)]) for b in range(len(plan))]
        lines = (out / "staging" / "samples" / f"epoch{epoch + 1:03d}_rank0.jsonl").read_text().splitlines()
        got = [(r["step"], r["keys"]) for r in map(json.loads, lines)]
        assert got == want, f"epoch {epoch + 1}: trained samples differ from the uninterrupted plan"
        if epoch == stop["epoch"]:  # the interrupted run logged steps < stop, the rerun the rest
            assert [s for s, _ in got][:stop["step_in_epoch"]] == list(range(stop["step_in_epoch"]))


def test_s3_demo_interrupts_resumes_exactly_and_stops_its_server(tmp_path):
    out = tmp_path / "demo-out"
    proc = _demo(out)
    try:
        log, _ = proc.communicate(timeout=DEMO_TIMEOUT_S)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
    assert proc.returncode == 0, log[-6000:]
    facts = json.loads((out / "s3-demo-summary.json").read_text())
    stop = facts["stopped_at"]
    assert facts["interrupted_exit"] == 75
    assert 0 < stop["step_in_epoch"] < facts["steps_per_epoch"], stop  # mid-epoch
    assert stop["name"] == f"checkpoint_epoch_{stop['epoch'] + 1:03d}_step_{stop['step_in_epoch']:06d}.pth"
    assert stop["bytes_in_s3"] == stop["bytes"] > 0  # the checkpoint object itself was in S3 after exit 75
    assert f"runs/demo/checkpoints/{stop['name']}" in facts["object_keys"]
    assert facts["resume_line"] == (f"resumed from {facts['checkpoint_url']} at epoch {stop['epoch'] + 1} "
                                    f"step {stop['step_in_epoch']}")
    assert facts["val_top1_evaluated"] == pytest.approx(facts["val_top1_logged"])
    assert facts["data_order_ok"], facts["data_order"]
    assert "matched the uninterrupted plan" in log
    _assert_order_matches_plan(out, facts)
    assert not pid_running(facts["server_pid"]), "the demo left its S3 server running"
    assert _port_closed(facts["endpoint"])


def test_ctrl_c_during_training_stops_the_server_and_the_trainer(tmp_path):
    out, log = tmp_path / "demo-out", tmp_path / "demo.log"
    with open(log, "w") as f:  # a file, polled below: every wait is bounded, no reader thread
        proc = _demo(out, stdout=f, start_new_session=True)  # own process group, as a terminal gives it
    try:
        deadline = time.monotonic() + DEMO_TIMEOUT_S
        while "== 4/7" not in log.read_text():  # training is about to start
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.2)
        pid = int(log.read_text().split("pid ", 1)[1].split(")", 1)[0])
        assert pid_running(pid)
        time.sleep(1)  # the trainer has started
        os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in the terminal does
        proc.wait(timeout=300)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
    text = log.read_text()
    assert proc.returncode == 130, text[-3000:]
    assert "stopping the local S3 server" in text
    assert not pid_running(pid), "Ctrl-C left the S3 server running"
    staging = str(out / "staging")
    left = [p for p in Path("/proc").glob("[0-9]*") if staging in _cmdline(p)]
    assert not left, f"processes of the demo still running: {left}"


def _cmdline(p: Path) -> str:
    try:
        return p.joinpath("cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""
