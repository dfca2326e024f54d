"""End-to-end demo on the embedded demo data: demo tree -> shards -> verify.

    make demo                       # creates .venv on first use
    python scripts/demo.py --out demo-out

Everything runs on CPU in a few minutes and writes under --out (default ./demo-out).
"""
from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from shard_builder.build import build_shards  # noqa: E402
from shard_builder.demo_tree import write_demo_tree  # noqa: E402
from shard_builder.verify import verify  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="demo-out")
    args = parser.parse_args()
    out = Path(args.out)
    if out.exists():
        shutil.rmtree(out)
    t0 = time.time()

    print("== 1/3 demo tree in the Kaggle ILSVRC layout")
    info = write_demo_tree(out / "kaggle")
    print(f"   {len(info.wnids)} classes, {len(info.train)} train + {len(info.val)} val images, "
          f"quirks: {', '.join(sorted(info.quirks))}")

    print("== 2/3 build shards (100% of the demo classes)")
    m = build_shards(str(out / "kaggle"), str(out / "shards"), shard_max_count=200, progress=True)
    for name, split in m.splits.items():
        print(f"   {name}: {split.num_samples} samples in {len(split.shards)} shards")
    print(f"   skipped {len(m.skipped)} source files (listed in manifest.json)")

    print("== 3/3 verify --deep")
    problems = verify(str(out / "shards"), deep=True)
    for p in problems:
        print(f"   problem: {p}")
    print(f"   {'OK' if not problems else 'FAILED'}")
    print(f"demo finished in {time.time() - t0:.0f}s; outputs in {out}/")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
