"""Benchmark ``shard_builder build`` (copy mode, 2 workers) against ``tar -cf`` of the same files.

    make bench                                   # or:
    python bench/bench_build.py --workdir /tmp/imagenet-bench --classes 10 --per-class 200

Both read the same realistic photos (bench/photos.py: about 110 KB, 470x390 on average)
from a warm page cache and write to the same disk, in the same run, alternating, median
of --repeats. Reported: images/s and source MB/s for each, and build/tar as a ratio.
Target (issue 2): build >= 1.0x tar's MB/s.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchutil import machine, median_time  # noqa: E402
from photos import make_photo_tree  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", default="/tmp/imagenet-bench")
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--per-class", type=int, default=800)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    a = p.parse_args()
    work = Path(a.workdir)
    root = make_photo_tree(work / "tree", a.classes, a.per_class, max(1, a.per_class // 10))
    data = [root / "ILSVRC/Data/CLS-LOC/train", root / "ILSVRC/Data/CLS-LOC/val"]
    files = [f for d in data for f in d.rglob("*") if f.is_file()]
    n_img, n_bytes = len(files), sum(f.stat().st_size for f in files)
    out_tar, out_build = work / "tar-out.tar", work / "build-out"

    def clean():
        out_tar.unlink(missing_ok=True)
        shutil.rmtree(out_build, ignore_errors=True)

    def tar():
        subprocess.run(["tar", "-cf", str(out_tar), "-C", str(root), *[str(d.relative_to(root)) for d in data]],
                       check=True)

    env = dict(os.environ, PYTHONPATH=str(REPO))

    def build():
        subprocess.run([sys.executable, "-m", "shard_builder", "build", "--source", str(root), "--output",
                        str(out_build), "--workers", str(a.workers), "--no-progress"], check=True, env=env,
                       stderr=subprocess.DEVNULL, stdout=subprocess.DEVNULL)

    clean(), tar(), clean(), build()  # warm the page cache and the interpreter
    t_tar = median_time(tar, a.repeats, before=clean)
    t_build = median_time(build, a.repeats, before=clean)
    clean()
    mb = n_bytes / 1e6
    print(f"machine: {machine()}")
    print(f"data: {n_img} files, {mb:.0f} MB, mean {n_bytes / n_img / 1e3:.0f} KB (warm page cache)")
    print(f"{'':24}{'img/s':>10}{'MB/s':>10}")
    print(f"{'tar -cf':24}{n_img / t_tar:10.0f}{mb / t_tar:10.1f}")
    print(f"{f'build ({a.workers} workers)':24}{n_img / t_build:10.0f}{mb / t_build:10.1f}")
    print(f"build / tar MB/s ratio: {t_tar / t_build:.2f}x  (target >= 1.0x)")


if __name__ == "__main__":
    main()
