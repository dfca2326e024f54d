"""The single-writer lease (common.lease) and the conditional writes under it (common.storage),
against the loopback S3 server and real local folders, with real holder processes.

    python -m pytest -q tests/test_lease.py

The trainer and builder acceptance tests (two writers, SIGKILL, SIGTERM, takeover) are in
tests/test_lease_runs.py.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from common import s3, storage
from common.errors import EXIT_LEASE_LOST, EXIT_USAGE
from common.lease import HOST_ENV, LEASE_NAME, Lease, LeaseHeld, LeaseLost, judge, identity
from tests.conftest import REPO

HOLD = """
import sys, time
from common.lease import Lease
Lease(sys.argv[1], float(sys.argv[2]), what="holder").acquire()
print("held", flush=True)
time.sleep(600)
"""


def start_holder(root: str, lease_seconds: float = 300, host: str | None = None) -> subprocess.Popen:
    """A real process that takes the lease and sleeps (never renews, never releases)."""
    env = dict(os.environ, PYTHONPATH=str(REPO))
    if host:
        env[HOST_ENV] = host
    proc = subprocess.Popen([sys.executable, "-c", HOLD, root, str(lease_seconds)], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    assert line.strip() == "held", proc.communicate(timeout=30)
    return proc


def kill(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=30)


def read_lease(root: str) -> dict:
    return json.loads(storage.read_bytes(storage.join(root, LEASE_NAME)))


@pytest.fixture(params=["s3", "local"])
def root(request, tmp_path):
    if request.param == "s3":
        return request.getfixturevalue("s3_bucket") + "/runs/r1"
    return str(tmp_path / "run")


# --------------------------------------------------------------------------- storage primitives
def test_conditional_writes_create_once_and_replace_only_the_version_read(root):
    url = storage.join(root, "obj.json")
    first = storage.put_versioned(url, b"1", if_none_match=True)
    with pytest.raises(storage.PreconditionFailed):
        storage.put_versioned(url, b"2", if_none_match=True)
    seen = storage.get_versioned(url)
    assert seen.data == b"1" and seen.etag == first and seen.age_s is not None and seen.age_s < 60
    # two writers that read the same version: exactly one replaces it
    second = storage.put_versioned(url, b"A", if_match=seen.etag)
    with pytest.raises(storage.PreconditionFailed):
        storage.put_versioned(url, b"B", if_match=seen.etag)
    assert storage.get_versioned(url).data == b"A" and storage.get_versioned(url).etag == second
    with pytest.raises(storage.PreconditionFailed):  # a missing object fails If-Match too
        storage.put_versioned(storage.join(root, "missing"), b"x", if_match=second)
    with pytest.raises(FileNotFoundError):
        storage.get_versioned(storage.join(root, "missing"))


# --------------------------------------------------------------------------- holding and refusing
def test_second_holder_is_refused_naming_the_first_then_release_lets_it_in(root, monkeypatch):
    monkeypatch.setenv(HOST_ENV, "host-a")
    a = Lease(root, 300, what="trainer").acquire()
    monkeypatch.setenv(HOST_ENV, "host-b")
    b = Lease(root, 300, what="trainer")
    with pytest.raises(LeaseHeld) as err:
        b.acquire()
    msg = str(err.value)
    assert err.value.exit_code == EXIT_USAGE and "\n" not in msg
    assert f"trainer pid {os.getpid()} on host-a" in msg and "last renewed" in msg and "Stop that process" in msg
    a.release()
    assert read_lease(root)["released"] is True
    b.acquire()  # at once: a released lease is free
    assert read_lease(root)["host"] == "host-b" and not read_lease(root)["released"]
    a.renew()  # released: nothing to renew, and it does not write
    assert read_lease(root)["token"] == b.token
    b.release()


def test_renewal_thread_extends_the_lease_and_detects_a_rewrite_underneath(root):
    lease = Lease(root, 0.6, what="trainer").acquire()
    lost = []
    lease.start_renewing(on_lost=lost.append)
    first = read_lease(root)["seq"]
    deadline = time.time() + 20
    while read_lease(root)["seq"] < first + 2 and time.time() < deadline:
        time.sleep(0.05)
    assert read_lease(root)["seq"] >= first + 2, "the lease was not renewed"
    intruder = {**identity("intruder"), "host": "elsewhere", "token": "x", "renewed_unix": time.time()}
    storage.write_bytes(storage.join(root, LEASE_NAME), json.dumps(intruder).encode())  # a takeover
    while not lost and time.time() < deadline:
        time.sleep(0.05)
    assert lost and "taken over by intruder" in lost[0] and "elsewhere" in lost[0]
    with pytest.raises(LeaseLost) as err:
        lease.renew()
    assert err.value.exit_code == EXIT_LEASE_LOST
    lease.release()  # must not overwrite the new holder's lease
    assert read_lease(root)["token"] == "x"


# --------------------------------------------------------------------------- takeover
def test_dead_holder_on_this_machine_is_taken_over_at_once(root, caplog):
    holder = start_holder(root, lease_seconds=300)
    pid = holder.pid
    with pytest.raises(LeaseHeld, match=f"holder pid {pid} on "):
        Lease(root, 300).acquire()  # alive: refused
    kill(holder)
    t0 = time.monotonic()
    lease = Lease(root, 300).acquire()  # 300 s lease, taken at once: its process is gone
    assert time.monotonic() - t0 < 30
    assert read_lease(root)["token"] == lease.token
    if storage.is_s3(root):  # locally the kernel dropped the lock: nothing to take over
        assert f"its process {pid} is gone" in caplog.text
    lease.release()


def test_stale_lease_of_another_host_is_taken_over_and_only_by_one_taker(s3_bucket, monkeypatch):
    root = s3_bucket + "/runs/stale"
    holder = start_holder(root, lease_seconds=2, host="host-a")
    try:
        monkeypatch.setenv(HOST_ENV, "host-b")
        with pytest.raises(LeaseHeld, match="on host-a"):
            Lease(root, 2).acquire()  # live (its process runs elsewhere, as far as we can tell)
        time.sleep(3.5)  # not renewed for over 2 s by the server's clock
        stale = storage.get_versioned(storage.join(root, LEASE_NAME))
        taker = Lease(root, 2).acquire()
        monkeypatch.setenv(HOST_ENV, "host-c")
        late = Lease(root, 2)
        with pytest.raises(LeaseHeld, match="on host-b"):
            late.acquire()  # the first taker renewed it: live again
        with pytest.raises(storage.PreconditionFailed):  # a second taker racing on the stale version loses
            storage.put_versioned(storage.join(root, LEASE_NAME), b"{}", if_match=stale.etag)
        assert read_lease(root)["token"] == taker.token
        taker.release()
    finally:
        kill(holder)


def test_judge_rules():
    me = identity("trainer")
    live = {**me, "pid": os.getpid(), "pid_start": me["pid_start"], "renewed_unix": time.time(), "lease_seconds": 300}
    assert judge(live, 5, me, 300) is None
    assert judge({**live, "released": True}, 5, me, 300) == "released"
    assert judge(live, 301, me, 300).startswith("not renewed for 301 s")
    assert judge({**live, "pid_start": me["pid_start"] - 1}, 5, me, 300).startswith("its process")  # pid reused
    assert "rebooted" in judge({**live, "boot_id": "old", "boot_time": me["boot_time"] - 100}, 5, me, 300)
    other_host = {**live, "host": "elsewhere", "pid": 999999}
    assert judge(other_host, 5, me, 300) is None  # another machine: only staleness counts
    assert judge({**live, "pid_ns": "pid:[1]", "pid": 999999}, 5, me, 300) is None  # another container
    assert judge({**live, "lease_seconds": 10}, 11, me, 300).startswith("not renewed")  # the holder's own limit


def test_local_lock_is_not_kept_by_forked_children(tmp_path):
    lease = Lease(str(tmp_path / "run"), 300).acquire()
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])  # fork+exec: not inherited
    pid = os.fork()
    if pid == 0:  # a forked worker (like a DataLoader or build worker) that outlives its parent
        time.sleep(600)
        os._exit(0)
    try:
        lease.release()
        Lease(str(tmp_path / "run"), 300).acquire().release()  # free although both children live
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        child.kill()
        child.wait(timeout=30)


def test_unwritable_local_folder_is_a_one_line_user_error(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        if os.access(ro, os.W_OK):
            pytest.skip("running as root: permissions are not enforced")
        with pytest.raises(Exception) as err:
            Lease(str(ro / "run"), 300).acquire()
        assert "is not writable" in str(err.value) and type(err.value).__name__ == "UserError"
    finally:
        ro.chmod(0o700)


# --------------------------------------------------------------------------- the fenced pointer
def test_a_writer_that_missed_the_takeover_cannot_move_latest(s3_bucket, tmp_path, monkeypatch):
    """Writer A passed its lease check just before B took over (a paused VM): A's pointer
    update is conditional on A's last ETag, which B's fence changed, so it fails. (A local
    folder cannot get there: the kernel lock keeps B out while A lives.)"""
    from trainer.checkpoint import LATEST, CheckpointStore

    root = s3_bucket + "/runs/fenced"
    url = storage.join(root, "checkpoints", LATEST)
    monkeypatch.setenv(HOST_ENV, "host-a")
    a = CheckpointStore(root, str(tmp_path / "a"), lease=Lease(root, 300).acquire())
    a.fence()
    meta = {"name": "checkpoint_epoch_001.pth", "bytes": 1, "sha256": "0", "epoch": 1, "step_in_epoch": 0,
            "global_step": 6, "writer": a.lease.token}
    a._move_pointer(meta)
    a._move_pointer({**meta, "global_step": 7})  # its own ETag: moves
    storage.write_bytes(storage.join(root, LEASE_NAME), b'{"host": "host-b", "token": "b", "released": true}')
    monkeypatch.setenv(HOST_ENV, "host-b")
    b = CheckpointStore(root, str(tmp_path / "b"), lease=Lease(root, 300).acquire())  # takes the released lease
    b.fence()
    fenced = storage.read_bytes(url)
    assert json.loads(fenced)["writer"] == b.lease.token and json.loads(fenced)["global_step"] == 7
    with pytest.raises(LeaseLost):
        a._move_pointer({**meta, "global_step": 8})
    assert storage.read_bytes(url) == fenced  # never moved by A
    assert not a.may_write()  # and A writes nothing more
    b.close()
    b.lease.release()
    a.close()


def test_a_renewal_whose_response_was_dropped_is_recognised_as_ours(s3_server, s3_bucket, monkeypatch):
    """The server applied the If-Match write but the reply was cut: the SDK's retry then gets
    412 (the ETag moved). The lease reads it back, finds its own token, and stays held."""
    from urllib.parse import urlparse

    from tests.faulty_proxy import FaultyProxy

    root = s3_bucket + "/runs/dropped"
    lease = Lease(root, 300).acquire()
    target = urlparse(s3_server)
    with FaultyProxy((target.hostname, target.port), cut_after=40, max_cuts=1) as proxy:  # past a "100 Continue"
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
        monkeypatch.setattr(s3, "_clients", {})  # a client for the proxy endpoint
        lease.renew()
        assert proxy.cuts == 1
        assert not lease.lost and storage.get_versioned(storage.join(root, LEASE_NAME)).etag == lease.etag
        lease.release()
        assert read_lease(root)["released"] is True  # read while the proxy (the client's endpoint) still runs
