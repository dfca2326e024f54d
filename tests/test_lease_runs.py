"""One writer per run folder and per shard destination, with the real trainer and builder:
two trainers or two builds at once, a SIGKILLed holder taken over once stale, a SIGTERMed
holder (exit 75) rerun at once, and a holder taken over underneath (exit 77, latest.json
never moved). Each against the loopback S3 server and a local folder.

    python -m pytest -q tests/test_lease_runs.py

Deterministic CPU runs (resnet18, 32 px, one process unless DDP is the point), so a resumed
run is checked as bitwise-equal final weights against one uninterrupted reference.
``IMAGENET_LEASE_HOST`` makes a holder look like another machine (else a dead holder on
this machine is taken over at once, which the unit tests cover).
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from common import storage
from common.errors import EXIT_INTERRUPTED, EXIT_LEASE_LOST, EXIT_USAGE
from common.lease import HOST_ENV, LEASE_NAME, Lease, LeaseHeld, identity
from tests.conftest import REPO, run_cli, shards_in_s3
from tests.test_resilience import ARGS, assert_bitwise_equal, final_model, latest, wait_for


def start(data: str, out: str, *extra: str, host: str = "host-a", nproc: int = 1, env: dict | None = None):
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
                if nproc > 1 else [sys.executable])
    full_env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", **{HOST_ENV: host}, **(env or {}))
    return subprocess.Popen([*launcher, "-m", "trainer", "--data", data, "--output", out, *ARGS, *extra], cwd=REPO,
                            env=full_env, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            start_new_session=True)


def finish(proc: subprocess.Popen, code: int | None = 0, timeout: float = 600) -> str:
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        raise AssertionError(f"no exit within {timeout} s\n{err[-4000:]}") from None
    assert code is None or proc.returncode == code, f"exit {proc.returncode}\n{out[-2000:]}\n{err[-6000:]}"
    return err


def lease_of(out: str) -> dict:
    return json.loads(storage.read_bytes(storage.join(out, LEASE_NAME)))


def sidecars(out: str) -> dict[str, dict]:
    urls = storage.list_prefix(storage.join(out, "checkpoints"))
    return {u.rsplit("/", 1)[-1]: json.loads(storage.read_bytes(u)) for u in urls
            if u.rsplit("/", 1)[-1].startswith("checkpoint_") and u.endswith(".json")}


@pytest.fixture(scope="module")
def shards(tmp_path_factory, s3_server):
    return shards_in_s3(tmp_path_factory, s3_server, "leases", classes=4, train_per_class=30, val_per_class=5,
                        seed=2, shard_max_count=25)


@pytest.fixture(scope="module")
def reference(shards, tmp_path_factory):
    """Final weights of one uninterrupted single-process run (the same wherever --output is)."""
    out = str(tmp_path_factory.mktemp("ref") / "run")
    finish(start(shards["local"], out))
    return final_model(out)


@pytest.fixture(params=["s3", "local"])
def where(request, tmp_path):
    """(data, a fresh --output) on S3 or on local disk."""
    data = request.getfixturevalue("shards")
    if request.param == "s3":
        return data["s3"], f"s3://leases/runs/{request.node.name.split('[')[0][5:40]}-{time.time_ns()}"
    return data["local"], str(tmp_path / "run")


def test_two_trainers_at_once_exactly_one_trains(where):
    data, out = where
    a = start(data, out, "--checkpoint-every-steps", "2", host="host-a")
    b = start(data, out, "--checkpoint-every-steps", "2", host="host-b")
    first = wait_for(lambda: next((p for p in (a, b) if p.poll() is not None), None), timeout=300,
                     what="one trainer to exit")
    winner = b if first is a else a
    assert winner.poll() is None, "the refused trainer must exit while the holder still trains"
    err = finish(first, EXIT_USAGE)
    host = "host-a" if winner is a else "host-b"
    errors = [x for x in err.splitlines() if x.startswith("error:")]
    assert len(errors) == 1 and f"in use by trainer pid {winner.pid} on {host}" in errors[0], err[-3000:]
    assert "last renewed" in errors[0]
    finish(winner)
    token = lease_of(out)["token"]
    cks = sidecars(out)
    assert sorted(m["global_step"] for m in cks.values()) == [2, 4, 6, 8, 10, 12]  # one run's, each once
    assert {m["writer"] for m in cks.values()} == {token} and latest(out)["writer"] == token
    assert lease_of(out)["released"] is True


def test_sigkilled_holder_is_taken_over_once_stale_and_the_resume_is_exact(where, reference, monkeypatch):
    data, out = where
    holder = start(data, out, "--lease-seconds", "10", "--checkpoint-every-steps", "1", host="host-a")
    wait_for(lambda: (latest(out) or {}).get("global_step", 0) >= 3, what="checkpoint of step 3")
    os.killpg(holder.pid, signal.SIGKILL)  # every process of it, like a lost instance
    holder.wait()
    monkeypatch.setenv(HOST_ENV, "host-b")
    if storage.is_s3(out):
        with pytest.raises(LeaseHeld, match=f"trainer pid {holder.pid} on host-a"):
            Lease(out, 10).acquire()  # just killed: not provably dead from another machine, not stale yet
        refused = 0
        while True:  # what a restart loop does: retry until the lease is stale
            proc = start(data, out, "--lease-seconds", "10", "--checkpoint-every-steps", "1", host="host-b")
            err = finish(proc, None)
            if proc.returncode != EXIT_USAGE:
                break
            assert "on host-a" in err and refused < 20, err[-3000:]
            refused += 1
            time.sleep(1)
        assert proc.returncode == 0, err[-6000:]
        assert "took over the lease" in err and "not renewed for" in err  # only once stale
    else:  # the kernel dropped the dead holder's lock: the rerun starts at once
        err = finish(start(data, out, "--lease-seconds", "10", "--checkpoint-every-steps", "1", host="host-b"))
    assert "resumed from" in err
    assert_bitwise_equal(final_model(out), reference)


def test_exit_75_releases_the_lease_so_a_rerun_starts_at_once(where, reference, tmp_path):
    data, out = where
    local = tmp_path / "staging"
    holder = start(data, out, "--sample-log", "--local-dir", str(local), host="host-a")
    log = (Path(out) if not storage.is_s3(out) else local) / "samples" / "epoch001_rank0.jsonl"
    wait_for(lambda: log.exists() and log.read_text().count("\n") >= 2, what="training to start")
    holder.send_signal(signal.SIGTERM)
    finish(holder, EXIT_INTERRUPTED)
    assert lease_of(out)["released"] is True
    # another machine, default 300 s lease: starts at once because the lease was released
    err = finish(start(data, out, host="host-b"))
    assert "resumed from" in err and "took over" not in err
    assert_bitwise_equal(final_model(out), reference)


def _take_over(out: str) -> bytes:
    """What a new holder does: rewrite lease.json, then stamp latest.json (If-Match) as its own."""
    intruder = {**identity("trainer"), "host": "intruder-host", "pid": 4242, "token": "intruder",
                "renewed_unix": time.time(), "renewed_at": "now", "lease_seconds": 300}
    storage.write_bytes(storage.join(out, LEASE_NAME), json.dumps(intruder).encode())
    url = storage.join(out, "checkpoints", "latest.json")
    seen = storage.get_versioned(url)
    pointer = json.dumps({**json.loads(seen.data), "writer": "intruder"}).encode()
    storage.put_versioned(url, pointer, if_match=seen.etag)
    return pointer


def test_holder_taken_over_underneath_stops_before_its_next_checkpoint(where, tmp_path):
    data, out = where
    nproc = 2 if storage.is_s3(out) else 1  # DDP: every rank must stop, with 77
    status = tmp_path / "status"
    proc = start(data, out, "--checkpoint-every-steps", "1", "--lease-seconds", "60", nproc=nproc,
                 env={"IMAGENET_EXIT_STATUS_FILE": str(status)})
    wait_for(lambda: (latest(out) or {}).get("global_step", 0) >= 2, what="checkpoint of step 2")
    pointer = _take_over(out)
    before = set(sidecars(out))
    err = finish(proc, None)
    assert status.read_text().split()[0] == str(EXIT_LEASE_LOST), err[-6000:]
    assert proc.returncode == (EXIT_LEASE_LOST if nproc == 1 else 1)  # torchrun reports its own 1
    assert err.count(f"exiting {EXIT_LEASE_LOST}") == nproc and "taken over by trainer pid 4242" in err
    assert storage.read_bytes(storage.join(out, "checkpoints", "latest.json")) == pointer  # never moved
    # at most the one checkpoint whose publish had passed its lease check when the lease was taken
    assert len(set(sidecars(out)) - before) <= 1
    assert not storage.exists(storage.join(out, "checkpoints", "checkpoint_epoch_002.pth"))
    assert lease_of(out)["token"] == "intruder"  # not released over the new holder


def test_two_builds_into_one_destination_one_builds_the_other_exits_2(shards, where):
    _, out = where
    dest = out.replace("/runs/", "/builds/")
    args = ["shard_builder", "build", "--source", shards["tree"], "--output", dest, "--shard-max-count", "4",
            "--workers", "1", "--resize-max-side", "48", "--no-progress"]
    env = dict(os.environ, PYTHONPATH=str(REPO))
    for _ in range(5):  # pause the first build while it holds the lease, so the overlap never depends on speed
        first = subprocess.Popen([sys.executable, "-m", *args], cwd=REPO, env=env, text=True,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        wait_for(lambda: first.poll() is not None or (storage.exists(storage.join(dest, LEASE_NAME))
                                                       and not lease_of(dest)["released"]), what="the first lease")
        first.send_signal(signal.SIGSTOP)
        if first.poll() is None and not lease_of(dest)["released"]:
            break
        first.send_signal(signal.SIGCONT)
        finish(first)
    else:
        pytest.fail("could not pause the first build while it held the lease")
    try:
        second = run_cli(*args, timeout=300)
    finally:
        first.send_signal(signal.SIGCONT)
    assert second.returncode == EXIT_USAGE, second.stderr[-3000:]
    assert f"in use by shard_builder build pid {first.pid}" in second.stderr
    finish(first)
    verified = run_cli("shard_builder", "verify", dest, "--deep", timeout=300)
    assert verified.returncode == 0, verified.stdout + verified.stderr
    assert lease_of(dest)["released"] is True and lease_of(dest)["pid"] == first.pid
