"""Benchmark ``--decode gpu``'s plumbing against the CPU decode path, on this machine's CPU.

    python bench/bench_decode.py                          # 1000 photos, 224 px, batch 64, ~1-2 min
    python bench/bench_decode.py --images 2000 --workers 2 --repeats 3

Same realistic photos as bench_loader.py (bench/photos.py: about 110 KB, 470x390), local
shards, warm page cache, 224 px train crops, one run, medians of --repeats:

  (1) per CPU-second, in this process on one thread (robust to other load on the machine):
      - CPU path: what each DataLoader worker does by default (read, decode at the smallest
        DCT scale, crop, resize, flip: ``PlanDataset.load``);
      - GPU path on device="cpu": the worker part (read bytes, parse the header, choose the
        box: ``read_raw``) plus the main-process part (``decode_batch``: torchvision's CPU
        decoder at full size, crop, resize, flip), and each part alone. The worker part is
        all that stays on the CPU when a real GPU decodes.
  (2) the train loader with --workers DataLoader workers, both modes, epoch img/s (with
      decode gpu on a CPU the main process decodes everything on one core).

The ratio GPU-path / CPU-path is printed for both. With a CUDA device it also times
``decode_batch`` on the GPU (nvJPEG); without one it says so: GPU numbers are never estimated.
"""
from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_loader import timed_epochs  # noqa: E402
from benchutil import loader_bench_parser, photo_shards, print_setup  # noqa: E402


def per_cpu_second(fn, items, repeats: int) -> float:
    """Median images per CPU-second of this thread over ``items`` (each returns its image count)."""
    rates = []
    for _ in range(repeats):
        t0 = time.process_time()
        n = sum(fn(it) for it in items)
        rates.append(n / (time.process_time() - t0))
    return statistics.median(rates)


def per_core_rates(ds_cpu, ds_gpu, plan, repeats: int) -> tuple[dict, list]:
    """(1): img per CPU-second of each path and part, one thread, epoch 0's micro-batches."""
    from trainer.gpu_decode import decode_batch

    idx = list(range(len(plan)))
    raws = [ds_gpu.load(plan, b) for b in idx]
    decode_batch(raws[0], "cpu")  # warm: load torchvision's image library
    rates = {
        "CPU path (worker: read + DCT-scaled decode + crop/resize)":
            per_cpu_second(lambda b: len(ds_cpu.load(plan, b).keys), idx, repeats),
        "GPU path on device=cpu, worker + main part":
            per_cpu_second(lambda b: len(decode_batch(ds_gpu.load(plan, b), "cpu").keys), idx, repeats),
        "  worker part only (bytes + header + box)": per_cpu_second(lambda b: len(ds_gpu.load(plan, b).keys), idx,
                                                                    repeats),
        "  main part only (decode_batch, torchvision CPU decode)":
            per_cpu_second(lambda r: len(decode_batch(r, "cpu").keys), raws, repeats),
    }
    return rates, raws


def pixel_agreement(ds_cpu, plan, raws) -> str:
    """Same keys and labels; how many samples are bitwise equal, mean abs difference."""
    import torch

    from trainer.gpu_decode import decode_batch

    diffs = []
    for b, raw in enumerate(raws):
        x, y = ds_cpu.load(plan, b), decode_batch(raw, "cpu")
        assert x.keys == y.keys and torch.equal(x.labels, y.labels)
        diffs.append((x.images.float() - y.images.float()).abs().mean(dim=(1, 2, 3)))
    d = torch.cat(diffs)
    equal = int((d == 0).sum())
    return (f"pixels, same {len(d)} samples: {equal} bitwise equal ({100 * equal / len(d):.0f}%); mean abs diff "
            f"{d.mean():.3f} levels, largest per-image mean {d.max():.2f} (differences come only from the CPU "
            "path's DCT-scaled decode)")


def cuda_rate(raws, repeats: int) -> str:
    import torch

    from trainer.gpu_decode import decode_batch

    if not torch.cuda.is_available():
        return "decode_batch on a GPU: not measured (no CUDA device on this machine)"
    dev = torch.device("cuda")
    for r in raws[:2]:
        decode_batch(r, dev)  # warm: nvJPEG handles, allocator
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    n = sum(len(decode_batch(r, dev).keys) for _ in range(repeats) for r in raws)
    torch.cuda.synchronize()
    rate = n / (time.perf_counter() - t0)
    return f"decode_batch on {torch.cuda.get_device_name(0)} (nvJPEG, one process): {rate:.0f} img/s"


def main() -> None:
    p = loader_bench_parser(__doc__, images=1000)
    p.add_argument("--size", type=int, default=224)
    a = p.parse_args()

    import torch

    from trainer.loader import LoaderConfig, make_train_loader

    _, shards, m = photo_shards(a.workdir, a.images, a.workers)
    print_setup(m, f"output {a.size}x{a.size}, batch {a.batch_size}")
    torch.set_num_threads(1)

    def cfg(decode: str, workers: int = 0) -> LoaderConfig:
        return LoaderConfig(str(shards), batch_size=a.batch_size, image_size=a.size, num_workers=workers,
                            decode=decode, decode_device="cpu", with_keys=True)

    def loader(decode: str):
        epochs = iter(range(10**6))
        c = cfg(decode, a.workers)
        return lambda: (b.images for b in make_train_loader(c, epoch=next(epochs), rank=0, world_size=1, manifest=m))

    ds_cpu = make_train_loader(cfg("cpu"), epoch=0, rank=0, world_size=1, manifest=m).dataset
    ds_gpu = make_train_loader(cfg("gpu"), epoch=0, rank=0, world_size=1, manifest=m).dataset
    plan = ds_cpu.plan(0)  # epoch 0, as the datasets were made for
    rates, raws = per_core_rates(ds_cpu, ds_gpu, plan, a.repeats)
    pixels = pixel_agreement(ds_cpu, plan, raws)
    l_cpu, l_gpu = timed_epochs(loader("cpu"), a.repeats), timed_epochs(loader("gpu"), a.repeats)

    print(f"{'(1) one thread, images per CPU-second':58} {'img/s':>8}")
    for name, r in rates.items():
        print(f"{name:58} {r:8.0f}")
    cpu_path, gpu_path, worker_part, _ = rates.values()
    print(f"{'ratio GPU path (device=cpu) / CPU path':58} {gpu_path / cpu_path:7.2f}x")
    print(f"{'ratio worker part of GPU path / CPU path':58} {worker_part / cpu_path:7.1f}x\n")
    print(f"(2) train loader, {a.workers} workers{'':29} {'steady':>8} {'epoch':>8} {'per CPU-s':>10}")
    for name, r in (("--decode cpu", l_cpu), ("--decode gpu on device=cpu (main process decodes)", l_gpu)):
        print(f"{name:58} {r['steady']:8.0f} {r['wall']:8.0f} {r['cpu']:10.0f}")
    print(f"{'ratio gpu / cpu':58} {l_gpu['steady'] / l_cpu['steady']:7.2f}x {l_gpu['wall'] / l_cpu['wall']:7.2f}x "
          f"{l_gpu['cpu'] / l_cpu['cpu']:9.2f}x\n")
    print(pixels)
    print(cuda_rate(raws, a.repeats))


if __name__ == "__main__":
    main()
