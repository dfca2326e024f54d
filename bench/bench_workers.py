"""Loader worker start-up and index-sidecar GETs per epoch, over a short run from loopback S3.

    python bench/bench_workers.py                              # this checkout, 2 workers, 4 epochs
    python bench/bench_workers.py --repo /path/to/older/checkout   # the same run on other code

Builds a small demo shard set (400 train / 80 val images in 16 + 4 shards), uploads it to a
moto server on 127.0.0.1 and reads it through a counting proxy, as a training run does:
each epoch one train pass and one val pass. Prints, per epoch, the seconds from asking for
the pass to its first batch (worker start-up, when workers start) and the GETs of index
sidecars. With a ``RunLoader`` (workers kept for the run) the run starts its workers once;
older code (``make_train_loader``/``make_val_loader`` per epoch) starts them every pass.
"""
from __future__ import annotations

import argparse
import os
import re
import sys
import tempfile
import time
import uuid
from pathlib import Path


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repo", default=str(Path(__file__).resolve().parents[1]), help="checkout whose code to run")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--workdir", default=None)
    return p.parse_args()


a = parse()
sys.path.insert(0, a.repo)
sys.path.insert(1, str(Path(__file__).resolve().parent))

from bench_loader import start_moto  # noqa: E402
from benchutil import machine  # noqa: E402

sys.path.insert(0, a.repo)  # bench_loader put this checkout first; --repo wins


def counting_proxy(port: int):
    from tests.faulty_proxy import FaultyProxy

    line = re.compile(rb"(GET|HEAD|PUT|POST) (\S+) HTTP/1\.[01]\r\n")

    class Recording:
        def __init__(self, sock, sink):
            self.sock, self.sink = sock, sink

        def recv(self, n):
            chunk = self.sock.recv(n)
            self.sink += [m.group(2).decode() for m in line.finditer(chunk) if m.group(1) == b"GET"]
            return chunk

        def __getattr__(self, name):
            return getattr(self.sock, name)

    class Counting(FaultyProxy):
        def __init__(self, target):
            super().__init__(target, max_cuts=0)
            self.gets: list[str] = []

        def _pump(self, src, dst, may_cut, src_is_client):
            super()._pump(Recording(src, self.gets) if src_is_client else src, dst, may_cut, src_is_client)

    return Counting(("127.0.0.1", port))


def main() -> None:
    import boto3

    from common import manifest as mf
    from common import storage
    from shard_builder.build import build_shards
    from shard_builder.demo_tree import write_demo_tree
    from trainer import loader

    work = Path(a.workdir or tempfile.mkdtemp(prefix="bench-workers-"))
    shards = work / "shards"
    if not (shards / "manifest.json").exists():
        tree = write_demo_tree(work / "kaggle", classes=10, train_per_class=40, val_per_class=8, seed=0)
        build_shards(str(tree.root), str(shards), shard_max_count=25, workers=2)
    moto = start_moto()
    try:
        bucket = f"bench-{uuid.uuid4().hex[:8]}"
        boto3.client("s3").create_bucket(Bucket=bucket)
        root = f"s3://{bucket}/shards"
        for f in shards.rglob("*"):
            if f.is_file() and "logs" not in f.parts:
                storage.upload_file(f, f"{root}/{f.relative_to(shards).as_posix()}")
        m = mf.load(root)
        proxy = counting_proxy(int(os.environ["AWS_ENDPOINT_URL"].rsplit(":", 1)[1])).start()
        os.environ["AWS_ENDPOINT_URL"] = proxy.url
        cfg = loader.LoaderConfig(root, batch_size=16, image_size=64, val_resize=72, val_size=64,
                                num_workers=a.workers, with_keys=False)
        persistent = hasattr(loader, "RunLoader")
        run = loader.RunLoader(cfg, rank=0, world_size=1, manifest=m) if persistent else None
        how = "RunLoader, workers kept for the run" if persistent else "loaders per epoch"
        print(f"machine: {machine()}\ncode: {loader.__file__} ({how}), start method {cfg.multiprocessing_context}, "
              f"{a.workers} workers; {len(m.split('train').shards)} train + {len(m.split('val').shards)} val shards\n")
        print(f"{'epoch':>5} {'train 1st batch s':>18} {'val 1st batch s':>16} {'epoch s':>8} {'index GETs':>11}")
        totals = [0.0, 0.0, 0]
        try:
            for epoch in range(a.epochs):
                t0, before = time.perf_counter(), len(proxy.gets)
                firsts = []
                for make in ((lambda: run.train_epoch(epoch)) if persistent else
                             (lambda: loader.make_train_loader(cfg, epoch=epoch, rank=0, world_size=1, manifest=m)),
                             (lambda: run.val()) if persistent else
                             (lambda: loader.make_val_loader(cfg, rank=0, world_size=1, manifest=m))):
                    t = time.perf_counter()
                    for i, _ in enumerate(make()):
                        if i == 0:
                            firsts.append(time.perf_counter() - t)
                gets = sum(".idx.json" in g for g in proxy.gets[before:])
                wall = time.perf_counter() - t0
                totals = [totals[0] + sum(firsts), totals[1] + wall, totals[2] + gets]
                print(f"{epoch:5d} {firsts[0]:18.2f} {firsts[1]:16.2f} {wall:8.2f} {gets:11d}")
        finally:
            if run is not None:
                run.close()
            proxy.stop()
        print(f"{'all':>5} {totals[0]:35.2f} {totals[1]:8.2f} {totals[2]:11d}  (first-batch seconds summed)")
    finally:
        moto.terminate()
        moto.wait(timeout=10)


if __name__ == "__main__":
    main()
