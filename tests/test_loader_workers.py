"""Loader workers: started once per run from a forkserver (never a fork of the training process),
kept across epochs, each index sidecar fetched once per worker per run; and a stress run that
creates and iterates loaders hundreds of times while threads come and go and gloo collectives
run (a hang fails through a timeout).

The stress ranks run ``python -m tests.test_loader_workers ROOT OUT`` (the ``main`` below) with
RANK/WORLD_SIZE/MASTER_* set.
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

from common import manifest as mf
from tests.conftest import REPO, free_port
from tests.faulty_proxy import FaultyProxy
from tests.test_loader import assert_same, build, cfg, run, upload_build  # noqa: F401 - build is a fixture
from trainer import loader, sampling
from trainer.loader import LoaderConfig, RunLoader, make_train_loader, make_val_loader


def _stat(pid: int) -> dict[str, str]:
    """/proc/PID/status as a dict (PPid, SigBlk, SigIgn, ...)."""
    lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    return {k: v.strip() for k, v in (line.split(":", 1) for line in lines)}


def _sigterm_held(pid: int) -> bool:
    """True when SIGTERM is blocked or ignored in process ``pid``."""
    st, bit = _stat(pid), 1 << (signal.SIGTERM - 1)
    return bool((int(st["SigBlk"], 16) | int(st["SigIgn"], 16)) & bit)


def _workers(loaders: RunLoader, split: str) -> list[int]:
    it = getattr(loaders, f"_{split}").dataloader._iterator
    return [w.pid for w in it._workers]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="forkserver and /proc are Linux's")
def test_run_loader_workers_come_from_the_forkserver_once_and_keep_their_order(build):  # noqa: F811
    from multiprocessing import forkserver

    c = cfg(build, num_workers=2)
    assert c.multiprocessing_context == "forkserver"
    with pytest.raises(ValueError, match="fork"):
        cfg(build, multiprocessing_context="fork")
    rng = torch.get_rng_state()
    with RunLoader(c, rank=0, world_size=1) as loaders:
        assert loaders._train.dataloader.multiprocessing_context.get_start_method() == "forkserver"
        assert loaders._train.dataloader.persistent_workers and loaders._train.dataloader.timeout == 600
        got = {0: run(loaders.train_epoch(0))}
        train_pids = _workers(loaders, "train")
        val = run(loaders.val())
        val_pids = _workers(loaders, "val")
        server = forkserver._forkserver._forkserver_pid
        assert server != os.getpid() and _stat(server)["PPid"] == str(os.getpid())
        assert len(os.listdir(f"/proc/{server}/task")) == 1  # it forks: it must never have a second thread
        for pid in train_pids + val_pids:  # children of the forkserver, not of this process
            assert _stat(pid)["PPid"] == str(server) and _sigterm_held(pid)
        assert _sigterm_held(server) and not _sigterm_held(os.getpid())
        stop_early = loaders.train_epoch(1)
        next(iter(stop_early))  # a pass left early (limit, interruption) does not disturb the next one
        got[1] = run(loaders.train_epoch(1, start_batch=3))
        got[2] = run(loaders.train_epoch(2))
        assert run(loaders.val()) and _workers(loaders, "train") == train_pids  # the same processes
        assert _workers(loaders, "val") == val_pids
    assert torch.equal(torch.get_rng_state(), rng)  # the loader leaves the global RNG alone
    in_process = cfg(build, num_workers=0)
    assert_same(got[0], run(make_train_loader(in_process, epoch=0)))
    assert_same(got[1], run(make_train_loader(in_process, epoch=1))[3:])
    assert_same(got[2], run(make_train_loader(in_process, epoch=2)))
    assert_same(val, run(make_val_loader(in_process)))


_OWNER = """
import json, signal, sys
from multiprocessing import forkserver
from trainer.loader import LoaderConfig, RunLoader
signal.signal(signal.SIGTERM, lambda *a: print("sigterm", flush=True))  # as the trainer: note it, go on
cfg = LoaderConfig(sys.argv[1], batch_size=8, image_size=32, val_resize=36, val_size=32, num_workers=2)
loaders = RunLoader(cfg, rank=0, world_size=1)
next(iter(loaders.train_epoch(0)))
next(iter(loaders.val()))
pids = [w.pid for s in (loaders._train, loaders._val) for w in s._it._workers]
print(json.dumps([forkserver._forkserver._forkserver_pid, *pids]), flush=True)
sys.stdin.readline()
print(len(list(loaders.train_epoch(1))), len(list(loaders.val())), flush=True)
sys.stdin.readline()
"""


def _readline(proc: subprocess.Popen, timeout: float) -> str:
    import select

    if not select.select([proc.stdout], [], [], timeout)[0]:
        pytest.fail(f"no output from the loader process within {timeout} s")
    return proc.stdout.readline()


def _gone(pid: int) -> bool:
    try:
        return _stat(pid)["State"].startswith("Z")
    except FileNotFoundError:
        return True


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="forkserver and /proc are Linux's")
def test_workers_outlive_sigterm_to_the_group_and_exit_with_their_owner(build):  # noqa: F811
    """torchrun / a spot shutdown SIGTERMs the whole process group: the workers and the forkserver
    keep serving the rank (it checkpoints first). When the rank is killed they all exit."""
    import time

    proc = subprocess.Popen([sys.executable, "-c", _OWNER, build], cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO)),
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, start_new_session=True)
    try:
        pids = json.loads(_readline(proc, 120))
        assert len(pids) == 5 and all(not _gone(p) for p in pids)
        os.killpg(proc.pid, signal.SIGTERM)
        assert _readline(proc, 30).strip() == "sigterm"
        proc.stdin.write("go\n")
        proc.stdin.flush()
        n_train, n_val = map(int, _readline(proc, 60).split())  # the same workers still serve
        m = mf.load(build)
        assert n_train == -(-m.split("train").num_samples // 8) and n_val == -(-m.split("val").num_samples // 8)
        assert all(not _gone(p) for p in pids)
        proc.kill()
        proc.wait(10)
        deadline = time.monotonic() + 30  # torch's worker watchdog looks every 5 s
        while not all(_gone(p) for p in pids) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert all(_gone(p) for p in pids), "workers or forkserver left behind by a killed owner"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


class CountingProxy(FaultyProxy):
    """A pass-through proxy (no cuts) that records the request line of every HTTP request."""

    def __init__(self, target):
        super().__init__(target, max_cuts=0)
        self.requests: list[str] = []

    def _pump(self, src, dst, may_cut, src_is_client):
        if src_is_client:
            src = _Recording(src, self)
        super()._pump(src, dst, may_cut, src_is_client)


class _Recording:
    _LINE = re.compile(rb"(GET|HEAD|PUT|POST|DELETE) (\S+) HTTP/1\.[01]\r\n")

    def __init__(self, sock, proxy: CountingProxy):
        self.sock, self.proxy = sock, proxy

    def recv(self, n: int) -> bytes:
        chunk = self.sock.recv(n)
        with self.proxy._lock:
            self.proxy.requests += [f"{m.group(1).decode()} {m.group(2).decode()}" for m in self._LINE.finditer(chunk)]
        return chunk

    def __getattr__(self, name):
        return getattr(self.sock, name)


def expected_index_gets(root: str, lcfg: LoaderConfig, epochs: int, workers: int) -> tuple[int, int]:
    """(fetches with workers kept for the run, with workers started every epoch).

    The DataLoader hands pass item i to worker i % workers; a worker fetches a shard's index
    the first time one of its batches touches that shard."""
    m = mf.load(root)
    kept, per_epoch = set(), 0
    for split in ("train", "val"):
        counts = [s.num_samples for s in m.split(split).shards]
        for epoch in range(epochs):
            p = (loader.planned_train_batches(lcfg, m, rank=0, world_size=1, epoch=epoch) if split == "train"
                 else loader.planned_val_batches(lcfg, m, rank=0, world_size=1))
            pairs = {(b % workers, int(s)) for b in range(len(p)) for s in sampling.locate(counts, p.batch(b))[0]}
            kept |= {(split, *x) for x in pairs}
            per_epoch += len(pairs)
    return len(kept), per_epoch


def test_training_run_starts_workers_once_and_fetches_each_index_once_per_worker(build, s3_server,  # noqa: F811
                                                                                 tmp_path):
    root = upload_build(build, s3_server)
    port = int(s3_server.rsplit(":", 1)[1])
    with CountingProxy(("127.0.0.1", port)) as proxy:
        env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", AWS_ENDPOINT_URL=proxy.url)
        proc = subprocess.run([sys.executable, "-m", "trainer", "--data", root, "--output", str(tmp_path / "run"),
                               "--epochs", "3", "--arch", "resnet18", "--batch-size", "16", "--image-size", "32",
                               "--val-resize", "36", "--workers", "2", "--device", "cpu"],
                              cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    log = proc.stderr
    assert len(re.findall(r"epoch \d/3: train loss", log)) == 3
    # Each loader's workers start once in the run, from the forkserver: the same processes serve all epochs.
    assert re.findall(r"(train|val) loader: (\d) workers started \((\w+)\)", log) == [
        ("train", "2", "forkserver"), ("val", "2", "forkserver")], log
    gets = [r for r in proxy.requests if r.startswith("GET ") and ".idx.json" in r]
    kept, per_epoch = expected_index_gets(root, LoaderConfig(root, batch_size=16), epochs=3, workers=2)
    m = mf.load(build)
    assert len(gets) == kept <= 2 * (len(m.split("train").shards) + len(m.split("val").shards))
    assert kept < per_epoch  # what workers started every epoch would fetch


def test_loaders_survive_thread_churn_and_collectives(build, tmp_path):  # noqa: F811
    """2 gloo ranks, each creating loaders 4 times and iterating 66 passes while threads start and
    stop and an all_reduce loop runs in a thread. A hang fails the test through the timeout."""
    port = free_port()
    env = dict(os.environ, PYTHONPATH=str(REPO), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="2",
               OMP_NUM_THREADS="1")
    procs = [subprocess.Popen([sys.executable, "-m", "tests.test_loader_workers", build, str(tmp_path)], cwd=REPO,
                              env={**env, "RANK": str(r)}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for r in range(2)]
    outputs = []
    try:
        for p in procs:
            try:
                outputs.append(p.communicate(timeout=300)[0])
            except subprocess.TimeoutExpired:
                pytest.fail("a rank hung creating or iterating loaders (no exit within 300 s)")
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait(10)
    for r, (p, text) in enumerate(zip(procs, outputs)):
        assert p.returncode == 0, f"rank {r} exited {p.returncode}:\n{text[-4000:]}"
    results = [json.loads((tmp_path / f"rank-{r}.json").read_text()) for r in range(2)]
    for res in results:
        assert res["plain_forks"] == 0  # nothing in the rank ever called fork()
        assert res["passes"] == 66 and res["threads_started"] > 100 and res["collectives"] > 10
    val = [k for res in results for k in res["val_keys"]]
    m = mf.load(build)
    assert sorted(val) == sorted(k for s in m.split("val").shards for k in mf.load_index(m, s).keys)


def _churn(stop: threading.Event, started: list) -> None:
    """Start and join short-lived threads that run Python code, until ``stop``."""
    while not stop.is_set():
        ts = [threading.Thread(target=lambda: json.dumps([list(range(200))] * 20)) for _ in range(4)]
        for t in ts:
            t.start()
        for t in ts:
            t.join(10)
        started.append(len(ts))


def _collectives(stop: threading.Event, count: list) -> None:
    """all_reduce in a loop until every rank has asked to stop (so all ranks run the same number)."""
    import torch.distributed as dist

    while True:
        flag = torch.tensor([float(stop.is_set())])
        dist.all_reduce(flag)
        count.append(1)
        if flag.item() == dist.get_world_size():
            return


def main() -> None:
    """One stress rank: ``python -m tests.test_loader_workers ROOT OUT``."""
    from datetime import timedelta

    import torch.distributed as dist

    root, out = sys.argv[1], Path(sys.argv[2])
    forks = []
    os.register_at_fork(before=lambda: forks.append(1))  # any plain fork() of this process
    dist.init_process_group("gloo", init_method="env://", timeout=timedelta(seconds=120))
    rank, world = dist.get_rank(), dist.get_world_size()
    stop, started, count = threading.Event(), [], []
    threads = [threading.Thread(target=_churn, args=(stop, started)),
               threading.Thread(target=_collectives, args=(stop, count))]
    for t in threads:
        t.start()
    c = LoaderConfig(root, batch_size=8, image_size=32, val_resize=36, val_size=32, num_workers=1, chunk_size=4,
                     shuffle_window=32, worker_timeout_s=60)
    m = mf.load(root)
    passes, val_keys = 0, []
    try:
        for round_ in range(2):
            with RunLoader(c, rank=rank, world_size=world, manifest=m) as loaders:
                for epoch in range(16):
                    train = loaders.train_epoch(epoch)
                    assert sum(1 for _ in train) == len(train)
                    val_keys = [k for b in loaders.val() for k in b.keys]
                    passes += 2
            # and a one-shot loader, whose worker starts and stops while the threads run
            assert [k for b in make_val_loader(c, rank=rank, world_size=world, manifest=m) for k in b.keys] == val_keys
            passes += 1
    finally:
        stop.set()
        for t in threads:
            t.join(120)
    assert not any(t.is_alive() for t in threads)
    (out / f"rank-{rank}.json").write_text(json.dumps({
        "plain_forks": len(forks), "passes": passes, "threads_started": sum(started), "collectives": len(count),
        "val_keys": val_keys}))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
