"""Helpers shared by the benchmarks: machine description and repeated timing."""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import time
from pathlib import Path
from typing import Callable


def machine() -> str:
    model = "unknown CPU"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = ""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=10)
        gpu = f", GPU: {out.stdout.strip().splitlines()[0]}" if out.returncode == 0 and out.stdout.strip() else ""
    except (OSError, subprocess.TimeoutExpired):
        pass
    return f"{model}, {os.cpu_count()} cores, Python {platform.python_version()}{gpu}"


def median_time(fn: Callable[[], None], repeats: int, before: Callable[[], None] | None = None) -> float:
    """Median wall time of ``fn`` over ``repeats`` runs (``before`` runs untimed each time)."""
    times = []
    for _ in range(repeats):
        if before:
            before()
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def photo_shards(workdir: str, images: int, workers: int):
    """(photo tree, shards folder, manifest) of a 10-class photo tree (bench/photos.py) with ``images``
    train images, built once into ``workdir`` and reused by later runs."""
    from common import manifest as mf
    from photos import make_photo_tree
    from shard_builder.build import build_shards

    work = Path(workdir)
    per_class = max(1, images // 10)
    tree = make_photo_tree(work / "loader-tree", 10, per_class, max(1, per_class // 10))
    shards = work / f"loader-shards-{per_class}"
    if not (shards / mf.MANIFEST_NAME).exists():
        build_shards(str(tree), str(shards), shard_max_bytes=16 * 10**6, workers=workers, overwrite=True)
    return tree, shards, mf.load(str(shards))


def print_setup(m, setup: str) -> None:
    """The machine and data lines every loader benchmark starts with; ``setup`` ends the second."""
    train = m.split("train")
    print(f"machine: {machine()}")
    print(f"data: {train.num_samples} train photos in {len(train.shards)} shards, "
          f"{sum(s.bytes for s in train.shards) / train.num_samples / 1e3:.0f} KB each; {setup}\n")


def loader_bench_parser(doc: str, images: int) -> argparse.ArgumentParser:
    """The options the loader benchmarks share (photo count, workers, batch, repeats)."""
    p = argparse.ArgumentParser(description=doc.splitlines()[0])
    p.add_argument("--workdir", default="/tmp/imagenet-bench")
    p.add_argument("--images", type=int, default=images, help="train images (10 classes)")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    return p
