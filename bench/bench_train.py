"""Training throughput with synthetic in-memory batches vs the real streaming loader.

    python bench/bench_train.py                               # resnet50, 224 px, AMP where available
    python bench/bench_train.py --arch resnet50 --batch-size 256 --steps 50 --workers 12   # on a GPU

Both runs go through the trainer's own Engine (one AMP path, channels_last, SGD step), on
the same hardware, in one process: first with batches already in memory (the model's
ceiling), then streaming the shards of bench/photos.py through trainer.loader. The gap is
the data stall: 1 - real / synthetic. Target (issue 4) on a GPU: stall <= 5%; NVIDIA's
published ResNet-50 AMP training figure is about 2,470 img/s on one A100.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchutil import machine  # noqa: E402
from photos import make_photo_tree  # noqa: E402

from common import manifest as mf  # noqa: E402
from shard_builder.build import build_shards  # noqa: E402
from trainer.distributed import DistInfo  # noqa: E402
from trainer.engine import Amp, Engine, StepState  # noqa: E402
from trainer.loader import Batch, LoaderConfig, RunLoader  # noqa: E402
from trainer.model import build_model, param_groups  # noqa: E402


def run(engine: Engine, batches, steps: int, warmup: int) -> float:
    """img/s over ``steps`` optimizer steps after ``warmup`` untimed ones."""
    it = iter(batches)
    state = StepState(0, 0, 0)

    def take(n):
        t0, seen = time.perf_counter(), 0
        for _ in range(n):
            b = next(it)
            seen += len(b.labels)
            engine.train_epoch([b], state, stop_after=10**9, should_stop=lambda: False,
                               checkpoint_due=lambda s: False, on_checkpoint=lambda: None)
        if engine.dist.device.type == "cuda":
            torch.cuda.synchronize()
        return seen / (time.perf_counter() - t0)

    take(warmup)
    return take(steps)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", default="/tmp/imagenet-bench")
    p.add_argument("--arch", default="resnet50")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--batch-size", type=int, default=None, help="default: 256 on GPU, 16 on CPU")
    p.add_argument("--steps", type=int, default=None, help="default: 50 on GPU, 5 on CPU")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--amp", default="auto")
    a = p.parse_args()
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    bs, steps = a.batch_size or (256 if cuda else 16), a.steps or (50 if cuda else 5)
    work = Path(a.workdir)
    shards = work / "train-shards"
    if not (shards / "manifest.json").exists():
        tree = make_photo_tree(work / "tree", classes=10, per_class=200, val_per_class=20)
        build_shards(str(tree), str(shards), workers=a.workers)
    m = mf.load(str(shards))
    torch.manual_seed(0)
    model = build_model(a.arch, m.num_classes).to(device, memory_format=torch.channels_last)
    opt = torch.optim.SGD(param_groups(model, 1e-4), lr=0.1, momentum=0.9)
    amp = Amp.create(a.amp, device)
    engine = Engine(model=model, optimizer=opt, amp=amp, dist=DistInfo(0, 0, 1, device), label_smoothing=0.1,
                    color_jitter=0.0, channels_last=True, seed=0, total_steps=10**6, warmup_steps=0, peak_lr=0.1)
    images = torch.randint(0, 255, (bs, 3, a.image_size, a.image_size), dtype=torch.uint8)
    labels = torch.randint(0, m.num_classes, (bs,))
    synthetic = (Batch(images, labels, 0, 0, 1, 0, None, i) for i in range(10**9))
    warmup = 3 if cuda else 1
    ceiling = run(engine, synthetic, steps, warmup)
    cfg = LoaderConfig(str(shards), batch_size=bs, image_size=a.image_size, num_workers=a.workers,
                       pin_memory=cuda, with_keys=False)

    loaders = RunLoader(cfg, rank=0, world_size=1, manifest=m)  # workers kept across epochs, as in training

    def epochs():
        e = 0
        while True:
            yield from loaders.train_epoch(e)
            e += 1

    try:
        real = run(engine, epochs(), steps, warmup)
    finally:
        loaders.close()
    print(f"machine: {machine()}")
    print(f"{a.arch} at {a.image_size} px, batch {bs}, amp {amp.name}, channels_last, {a.workers} loader workers, "
          f"{steps} timed steps")
    print(f"synthetic in-memory batches: {ceiling:8.1f} img/s")
    print(f"streaming loader (shards):   {real:8.1f} img/s")
    print(f"data stall: {max(0.0, 1 - real / ceiling):.1%}  (target on a GPU: <= 5%)")


if __name__ == "__main__":
    main()
