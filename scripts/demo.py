"""End-to-end demo on the embedded demo data: demo tree -> shards -> verify -> train -> evaluate -> predict.

    python3.11 scripts/dev.py demo          # creates .venv on first use
    python3.11 scripts/dev.py demo --s3     # the same through a local S3 server, with a spot stop + resume
    python scripts/demo.py --out demo-out

Everything runs on CPU (about 2 minutes on 2 cores) and writes under --out (default
./demo-out). Training uses resnet18 at 64 px so it fits a laptop; the trainer's default
is resnet50 at 224 px. Each step prints the command a user would run for it.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
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
    parser.add_argument("--s3", action="store_true",
                        help="shards and checkpoints in a local S3 server, a spot-style stop and an exact resume "
                             "(scripts/demo_s3.py)")
    args = parser.parse_args()
    out = Path(args.out)
    if out.exists():
        shutil.rmtree(out)
    if args.s3:
        import demo_s3  # scripts/ is on sys.path when this file runs

        try:
            return demo_s3.main(out)
        except KeyboardInterrupt:
            print("interrupted; the local S3 server was stopped", file=sys.stderr)
            return 130
    t0 = time.time()

    print("== 1/6 demo tree in the Kaggle ILSVRC layout")
    info = write_demo_tree(out / "kaggle")
    print(f"   {len(info.wnids)} classes, {len(info.train)} train + {len(info.val)} val images, "
          f"quirks: {', '.join(sorted(info.quirks))}")

    print("== 2/6 build shards (100% of the demo classes)")
    m = build_shards(str(out / "kaggle"), str(out / "shards"), shard_max_count=200, progress=True)
    for name, split in m.splits.items():
        print(f"   {name}: {split.num_samples} samples in {len(split.shards)} shards")
    print(f"   skipped {len(m.skipped)} source files (listed in manifest.json)")

    print("== 3/6 verify --deep")
    problems = verify(str(out / "shards"), deep=True)
    for p in problems:
        print(f"   problem: {p}")
    print(f"   {'OK' if not problems else 'FAILED'}")
    if problems:
        return 1

    shards, run = str(out / "shards"), str(out / "run")
    print("== 4/6 train (3 CPU epochs, resnet18 at 64 px)")
    sh(["-m", "trainer", "--data", shards, "--output", run, "--arch", "resnet18", "--epochs", "3",
        "--batch-size", "32", "--image-size", "64", "--val-resize", "72", "--warmup-epochs", "0.5",
        "--workers", "2", "--device", "cpu"])
    last = json.loads((out / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    print(f"== 5/6 evaluate the last checkpoint (logged: top-1 {last['val_top1']:.2f}% top-5 {last['val_top5']:.2f}%)")
    sh(["-m", "trainer.evaluate", "--checkpoint", f"{run}/checkpoints/checkpoint_epoch_003.pth", "--data", shards])
    print("== 6/6 predict two val images with model_best.pth")
    val = sorted((out / "kaggle" / "ILSVRC" / "Data" / "CLS-LOC" / "val").glob("*.JPEG"))[3:5]
    sh(["-m", "trainer.predict", "--checkpoint", f"{run}/model_best.pth", *map(str, val)])
    truth = {r.split(",")[0]: r.split(",")[1].split()[0]
             for r in (out / "kaggle" / "LOC_val_solution.csv").read_text().splitlines()[1:]}
    print("   truth: " + ", ".join(f"{p.stem} = {truth[p.stem]}" for p in val))
    print(f"demo finished in {time.time() - t0:.0f}s; outputs in {out}/ (curves: {run}/training_curves.png)")
    return 0


def sh(args: list[str]) -> None:
    """Run ``python <args>`` as a user would, echoing the command."""
    print("   $ python " + " ".join(args), flush=True)
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    subprocess.run([sys.executable, *args], check=True, env=env)


if __name__ == "__main__":
    sys.exit(main())
