"""One-command check that this machine can train: ``python -m trainer.selfcheck``.

    python -m trainer.selfcheck            # GPU machine: every row, under 5 minutes, no data needed
    python -m trainer.selfcheck --cpu      # only the CPU rows (what CI runs), well under 2 minutes

It builds its own shards (``shard_builder demo-tree`` + ``build`` in a temp folder) and prints
one table row per part: result (ok / FAIL / skipped) and what was measured. Exit status 1 if
any part failed (common.errors.EXIT_FAILURE), else 0 (EXIT_COMPLETED). Without a GPU (or with ``--cpu``) the
GPU rows say "skipped" and why; the CPU rows run small (a few steps, 64 px, resnet18).

Rows: shards; streaming loader (pinned memory on CUDA; every sample exactly once); CPU vs GPU
decode img/s (on CPU: the ``--decode gpu`` plumbing with torchvision's CPU decoder);
channels_last step; bf16 and fp16 AMP steps (finite loss, GradScaler steps taken); compile;
DDP over NCCL with all local GPUs via torchrun on the demo build; train img/s with synthetic
batches vs the streaming loader and the data-stall fraction (ResNet-50 at 224 px on a GPU).

The demo images are small (96-200 px, ~10 KB) so loader and decode rates here are higher
than on ImageNet's ~110 KB photos; ``bench/`` measures those on realistic photos.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from common.errors import EXIT_COMPLETED, EXIT_FAILURE

REPO = Path(__file__).resolve().parents[1]


@dataclass
class Size:
    """How big each part runs: tiny on CPU, ImageNet-shaped (but bounded) on a GPU."""

    classes: int
    per_class: int
    arch: str            # AMP / channels_last / compile rows
    image: int
    batch: int
    steps: int
    bench_arch: str      # the throughput row
    bench_image: int
    bench_batch: int
    bench_steps: int
    workers: int = field(default_factory=lambda: max(1, min(8, (os.cpu_count() or 2) - 1)))


CPU_SIZE = Size(classes=4, per_class=10, arch="resnet18", image=64, batch=8, steps=3,
                bench_arch="resnet18", bench_image=64, bench_batch=8, bench_steps=3, workers=1)
GPU_SIZE = Size(classes=10, per_class=100, arch="resnet18", image=64, batch=64, steps=5,
                bench_arch="resnet50", bench_image=224, bench_batch=128, bench_steps=20)


class Check:
    """Collects rows; each part is a function returning its detail text (raises to fail)."""

    def __init__(self):
        self.rows: list[tuple[str, str, str]] = []

    def run(self, name: str, fn, *args) -> object:
        t0 = time.perf_counter()
        try:
            detail = fn(*args)
            result = "ok"
        except Exception as exc:  # noqa: BLE001 - a failed part is a FAIL row, not a crash
            detail, result = f"{type(exc).__name__}: {exc}".splitlines()[0][:200], "FAIL"
        self.rows.append((name, result, f"{detail} ({time.perf_counter() - t0:.1f} s)"))
        print(f"[selfcheck] {name}: {result}", file=sys.stderr, flush=True)
        return detail if result == "ok" else None

    def skip(self, name: str, why: str) -> None:
        self.rows.append((name, "skipped", why))

    def table(self) -> str:
        w = max(len(r[0]) for r in self.rows)
        lines = [f"{'part':<{w}}  {'result':<7}  detail", f"{'-' * w}  -------  ------"]
        return "\n".join(lines + [f"{n:<{w}}  {r:<7}  {d}" for n, r, d in self.rows])

    @property
    def failed(self) -> bool:
        return any(r[1] == "FAIL" for r in self.rows)


def _cli(*args: str, timeout: float) -> subprocess.CompletedProcess:
    """``python -m <args>`` with this checkout importable; raises with the tail of its output."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run([sys.executable, "-m", *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        raise RuntimeError(f"{' '.join(args[:2])} exited {proc.returncode}: {' | '.join(tail)}")
    return proc


def build_shards(work: Path, size: Size) -> str:
    _cli("shard_builder", "demo-tree", str(work / "tree"), "--classes", str(size.classes), "--train-per-class",
         str(size.per_class), "--val-per-class", "4", "--test-images", "1", timeout=300)
    _cli("shard_builder", "build", "--source", str(work / "tree"), "--output", str(work / "shards"),
         "--shard-max-count", "64", "--workers", str(size.workers), "--no-progress", timeout=300)
    from common import manifest as mf

    m = mf.load(str(work / "shards"))
    return (f"{m.num_classes} classes: {m.split('train').num_samples} train + {m.split('val').num_samples} val "
            f"samples in {len(m.split('train').shards) + len(m.split('val').shards)} shards")


def _loader_cfg(root: str, size: Size, device: torch.device, **kw):
    from trainer.loader import LoaderConfig

    base = dict(batch_size=size.batch, image_size=size.image, val_resize=round(size.image / 0.875),
                num_workers=size.workers, seed=0, pin_memory=device.type == "cuda", with_keys=True)
    return LoaderConfig(root, **{**base, **kw})


def check_loader(root: str, size: Size, device: torch.device) -> str:
    """One epoch: every train sample exactly once, uint8 [B,3,H,W], pinned on CUDA."""
    from common import manifest as mf
    from trainer.loader import make_train_loader

    m = mf.load(root)
    want = sorted(k for s in m.split("train").shards for k in mf.load_index(m, s).keys)
    t0 = time.perf_counter()
    batches = list(make_train_loader(_loader_cfg(root, size, device), epoch=0, rank=0, world_size=1))
    seconds = time.perf_counter() - t0
    got = sorted(k for b in batches for k in b.keys)
    if got != want:
        raise AssertionError(f"{len(got)} samples instead of each of the {len(want)} exactly once")
    if any(b.images.dtype != torch.uint8 or b.images.shape[1:] != (3, size.image, size.image) for b in batches):
        raise AssertionError("batch is not uint8 [B,3,H,W]")
    pinned = all(b.images.is_pinned() for b in batches) if device.type == "cuda" else None
    if pinned is False:
        raise AssertionError("pin_memory=True but batches are not in pinned memory")
    return (f"{len(got)} samples exactly once, {size.workers} workers, {len(got) / seconds:.0f} img/s incl. start-up"
            + (", pinned" if pinned else ", not pinned (no CUDA)"))


def check_decode(root: str, size: Size, device: torch.device) -> str:
    """img/s of the train loader with CPU decode vs --decode gpu on ``device``; same keys and labels."""
    from trainer.loader import make_train_loader

    rates, runs = {}, {}
    for mode in ("cpu", "gpu"):
        cfg = _loader_cfg(root, size, device, decode=mode, decode_device=str(device), image_size=size.bench_image)
        list(make_train_loader(cfg, epoch=0, rank=0, world_size=1))  # warm: page cache, CUDA/nvJPEG init
        t0 = time.perf_counter()
        batches = list(make_train_loader(cfg, epoch=1, rank=0, world_size=1))
        if device.type == "cuda":
            torch.cuda.synchronize()
        rates[mode] = sum(len(b.keys) for b in batches) / (time.perf_counter() - t0)
        runs[mode] = [(b.keys, b.labels.tolist()) for b in batches]
    if runs["cpu"] != runs["gpu"]:
        raise AssertionError("--decode gpu gave other samples, labels or order than --decode cpu")
    where = f"decode on {device}" + (" (plumbing: torchvision CPU decoder)" if device.type == "cpu" else " (nvJPEG)")
    return (f"{size.bench_image} px, {size.workers} workers: cpu {rates['cpu']:.0f} img/s, gpu path "
            f"{rates['gpu']:.0f} img/s ({where}), ratio {rates['gpu'] / rates['cpu']:.2f}; same samples/labels/order")


def _model(arch: str, device: torch.device, channels_last: bool):
    from trainer.model import build_model

    fmt = torch.channels_last if channels_last else torch.contiguous_format
    return build_model(arch, 10).to(device, memory_format=fmt)


def _steps(model, device, size: Size, dtype: torch.dtype | None, fp16: bool = False) -> tuple[torch.Tensor, int]:
    """``size.steps`` SGD steps on synthetic data; (losses read once at the end, steps not skipped)."""
    from trainer.presets import DeviceNormalize

    scaler = torch.amp.GradScaler(device.type, enabled=fp16)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (size.batch, 3, size.image, size.image), dtype=torch.uint8, generator=g).to(device)
    y = torch.randint(0, 10, (size.batch,), generator=g).to(device)
    x = DeviceNormalize()(x).contiguous(memory_format=torch.channels_last)
    losses, taken = [], 0
    for _ in range(size.steps):
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            loss = F.cross_entropy(model(x), y)
        scale = scaler.get_scale() if fp16 else 1.0
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)
        taken += (scaler.get_scale() >= scale) if fp16 else 1  # a skipped step lowers the scale
        losses.append(loss.detach().float())
    return torch.stack(losses).cpu(), taken


def check_step(arch: str, size: Size, device: torch.device, dtype, fp16: bool = False, compile_: bool = False) -> str:
    model = _model(arch, device, channels_last=True)
    if not model.conv1.weight.is_contiguous(memory_format=torch.channels_last):
        raise AssertionError("model weights are not channels_last")
    before = [p.detach().clone() for p in model.parameters()]
    run = torch.compile(model) if compile_ else model
    losses, taken = _steps(run, device, size, dtype, fp16)
    if not torch.isfinite(losses).all():
        raise AssertionError(f"non-finite loss: {losses.tolist()}")
    if taken < 1 or all(torch.equal(a, b) for a, b in zip(before, model.parameters())):
        raise AssertionError("no optimizer step changed the weights")
    name = {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]
    extra = f", GradScaler took {taken}/{size.steps} steps" if fp16 else ""
    return (f"{arch} {size.image} px batch {size.batch}, {name}, channels_last, {size.steps} steps, loss "
            f"{losses[0]:.3f} -> {losses[-1]:.3f}{extra}")


def check_ddp(root: str, work: Path, size: Size, gpus: int) -> str:
    """``torchrun --nproc_per_node N -m trainer`` on the demo build: NCCL, one short epoch."""
    out = work / "ddp-run"
    _cli("torch.distributed.run", "--standalone", "--nproc_per_node", str(gpus), "-m", "trainer", "--data", root,
         "--output", str(out), "--arch", size.arch, "--epochs", "1", "--image-size", str(size.image),
         "--batch-size", "16", "--workers", "2", "--limit-train-steps", "4", "--device", "cuda", timeout=240)
    record = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    if not math.isfinite(record["train_loss"]):
        raise AssertionError(f"non-finite train loss {record['train_loss']}")
    backend = "NCCL" if gpus > 1 else "world size 1: torchrun launch only, no collective (NCCL needs 2+ GPUs)"
    return (f"{gpus} process(es), {backend}, 4 steps + val: train loss {record['train_loss']:.3f}, val top-1 "
            f"{record['val_top1']:.1f}% on {record['val_count']} images")


def _loader_rate(cfg, steps: int, step, sync) -> tuple[float, float]:
    """(img/s, fraction of the time spent waiting for data) over ``steps`` loader-fed steps."""
    from trainer.loader import make_train_loader

    done = seen = epoch = 0
    wait = 0.0
    t0 = time.perf_counter()
    while done < steps:
        it = iter(make_train_loader(cfg, epoch=epoch, rank=0, world_size=1))
        while done < steps:
            tw = time.perf_counter()
            batch = next(it, None)
            if batch is None:
                break
            sync()  # --decode gpu: its kernels count as data time, not as training time
            wait += time.perf_counter() - tw
            step(batch.images, batch.labels)
            done, seen = done + 1, seen + len(batch.keys)
        epoch += 1
    sync()
    total = time.perf_counter() - t0
    return seen / total, wait / total


def check_throughput(root: str, size: Size, device: torch.device) -> str:
    """Train img/s with a synthetic on-device batch vs the streaming loader; data-stall fraction."""
    from trainer.presets import DeviceNormalize

    cuda = device.type == "cuda"
    dtype = (torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16) if cuda else None
    model = _model(size.bench_arch, device, channels_last=True)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    norm = DeviceNormalize()

    def step(images, labels):
        x = norm(images.to(device, non_blocking=True)).contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            loss = F.cross_entropy(model(x), labels.to(device, non_blocking=True) % 10)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)

    def sync():
        if cuda:
            torch.cuda.synchronize()

    b, s = size.bench_batch, size.bench_image
    images = torch.randint(0, 256, (b, 3, s, s), dtype=torch.uint8, device=device)
    labels = torch.zeros(b, dtype=torch.int64, device=device)
    for _ in range(3 if cuda else 1):
        step(images, labels)  # warm-up: cuDNN autotune, allocator
    sync()
    t0 = time.perf_counter()
    for _ in range(size.bench_steps):
        step(images, labels)
    sync()
    synthetic = b * size.bench_steps / (time.perf_counter() - t0)

    results = []
    for mode in ("cpu", "gpu") if cuda else ("cpu",):
        cfg = _loader_cfg(root, size, device, batch_size=b, image_size=s, decode=mode, decode_device=str(device))
        rate, stall = _loader_rate(cfg, size.bench_steps, step, sync)
        results.append(f"loader decode={mode} {rate:.0f} img/s, data stall {100 * stall:.0f}%")
    amp = {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]
    return (f"{size.bench_arch} {s} px batch {b} {amp} channels_last: synthetic {synthetic:.0f} img/s; "
            + "; ".join(results) + f" ({size.workers} workers, epochs re-start the workers)")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m trainer.selfcheck", description=__doc__.splitlines()[0])
    p.add_argument("--cpu", action="store_true", help="run only the CPU rows, even where a GPU is visible")
    p.add_argument("--workdir", default=None, help="keep the demo shards and runs here (default: a temp folder)")
    args = p.parse_args(argv)
    gpus = 0 if args.cpu or not torch.cuda.is_available() else torch.cuda.device_count()
    device = torch.device("cuda", 0) if gpus else torch.device("cpu")
    size = GPU_SIZE if gpus else CPU_SIZE
    name = torch.cuda.get_device_name(0) if gpus else "no GPU" + (" (--cpu)" if args.cpu else "")
    print(f"selfcheck: torch {torch.__version__}, {gpus} GPU(s): {name}, {os.cpu_count()} CPUs", flush=True)
    threads = torch.get_num_threads()
    if not gpus:  # small CPU rows on a possibly busy CI machine: intra-op threads only add spin-waits
        torch.set_num_threads(1)
    try:
        c = run_parts(args, gpus, device, size)
    finally:
        torch.set_num_threads(threads)
    print(c.table(), flush=True)
    skipped = [r[0] for r in c.rows if r[1] == "skipped"]
    if skipped:
        print(f"skipped: {', '.join(skipped)}", flush=True)
    print("selfcheck FAILED" if c.failed else "selfcheck passed", flush=True)
    return EXIT_FAILURE if c.failed else EXIT_COMPLETED


def run_parts(args, gpus: int, device: torch.device, size: Size) -> Check:
    """Every row in order; GPU rows are skipped (with the reason) when ``gpus`` is 0."""
    torch.manual_seed(0)
    c = Check()
    with tempfile.TemporaryDirectory(prefix="selfcheck-", dir=args.workdir) as tmp:
        work = Path(tmp)
        root = str(work / "shards") if c.run("shards (demo-tree + build)", build_shards, work, size) else None
        loader_name = "streaming loader, pinned memory" if gpus else "streaming loader"
        if root:
            c.run(loader_name, check_loader, root, size, device)
            c.run("decode img/s: cpu vs gpu path", check_decode, root, size, device)
        else:
            for n in (loader_name, "decode img/s: cpu vs gpu path"):
                c.skip(n, "no shards (see the row above)")
        c.run("channels_last step (fp32)", check_step, size.arch, size, device, None)
        why = "no CUDA GPU" + (" (--cpu)" if args.cpu else "")
        if gpus and torch.cuda.is_bf16_supported():
            c.run("AMP bf16 steps", check_step, size.arch, size, device, torch.bfloat16)
        else:
            c.skip("AMP bf16 steps", why if not gpus else "this GPU has no bf16")
        gpu_rows = [("AMP fp16 + GradScaler steps", check_step, (size.arch, size, device, torch.float16, True)),
                    ("torch.compile step", check_step, (size.arch, size, device, None, False, True)),
                    ("DDP over NCCL, torchrun (all GPUs)", check_ddp, (root, work, size, gpus))]
        for n, fn, fargs in gpu_rows:
            if not gpus:
                c.skip(n, why)
            elif fn is check_ddp and not root:
                c.skip(n, "no shards (see the row above)")
            else:
                c.run(n, fn, *fargs)
        if root:
            c.run("train img/s: synthetic vs loader", check_throughput, root, size, device)
        else:
            c.skip("train img/s: synthetic vs loader", "no shards (see the row above)")
    return c


if __name__ == "__main__":
    sys.exit(main())
