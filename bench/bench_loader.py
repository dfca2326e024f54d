"""Benchmark the train input pipeline (trainer.loader) against the classic torchvision one.

    python bench/bench_loader.py                       # defaults: 2000 photos, 2 workers, ~2 min
    python bench/bench_loader.py --workdir /tmp/imagenet-bench --images 4000 --workers 2 --repeats 3

Same realistic photos throughout (bench/photos.py: about 110 KB, 470x390), warm page cache,
one run, medians of --repeats full epochs (worker start-up included for every loader):

  (a) our train loader (local shards) vs torchvision ImageFolder + DataLoader on the same
      images as loose files with the classic transforms (RandomResizedCrop(224), flip,
      ColorJitter(0.4, 0.4, 0.4), ToTensor, Normalize). Target >= 2.5x. Ours leaves
      normalization and jitter to the device (trainer.presets); their CPU cost per batch is
      printed separately.
  (b) our loader streaming from a loopback moto S3 server vs from local disk. Target >= 0.9x.
      The moto server runs on the same cores as the workers, so this is pessimistic.
  (c) our loader's images/s per worker vs full-image libjpeg-turbo decode only (simplejpeg
      and Pillow, one core, same bytes, in memory). Target >= 0.8x of the faster.

Also: both decode paths of the presets (simplejpeg + torch resize vs Pillow draft + resize),
in the loader and per image on one core, which is how the default was chosen.
"""
from __future__ import annotations

import io
import os
import resource
import statistics
import sys
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchutil import loader_bench_parser, photo_shards, print_setup  # noqa: E402
from common.local_s3 import LocalS3  # noqa: E402


def cpu_seconds(*pids: int) -> float:
    """CPU time (user + sys) of this process, its reaped children (DataLoader workers are joined
    at the end of each epoch) and the given still-running processes (the moto server)."""
    total = 0.0
    for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN):
        ru = resource.getrusage(who)
        total += ru.ru_utime + ru.ru_stime
    for pid in pids:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


def timed_epochs(make_iter, repeats: int, pids=()) -> dict:
    """Medians over ``repeats`` full epochs: wall seconds, CPU seconds (all processes), images,
    and the steady rate from the first batch on (without worker start-up)."""
    runs = []
    for _ in range(repeats):
        c0, t0 = cpu_seconds(*pids), time.perf_counter()
        n = n_first = 0
        t_first = t0
        for b in make_iter():
            if not n:
                t_first, n_first = time.perf_counter(), len(b)
            n += len(b)
        t1 = time.perf_counter()
        runs.append((t1 - t0, cpu_seconds(*pids) - c0, n, (n - n_first) / (t1 - t_first), t_first - t0))
    wall, cpu, n, steady, first = (statistics.median(r[i] for r in runs) for i in range(5))
    return {"wall": n / wall, "cpu": n / cpu, "steady": steady, "first_s": first, "n": int(n)}


_JPEGS: list[bytes] = []  # the decode-only baseline's input, inherited by its forked workers


def _decode_share(args) -> int:
    import simplejpeg
    from PIL import Image

    lo, hi, decoder = args
    for data in _JPEGS[lo:hi]:
        if decoder == "simplejpeg":
            simplejpeg.decode_jpeg(data)
        else:
            Image.open(io.BytesIO(data)).convert("RGB").load()
    return hi - lo


def decode_only(jpegs: list[bytes], workers: int, decoder: str, repeats: int) -> dict:
    """Full-image decode of the same bytes from memory in ``workers`` parallel processes (the
    same parallelism as the loaders), as img/s of wall and per CPU-second."""
    import multiprocessing as mp

    _JPEGS[:] = jpegs
    step = -(-len(jpegs) // workers)
    shares = [(i, min(i + step, len(jpegs)), decoder) for i in range(0, len(jpegs), step)]
    runs = []
    with mp.get_context("fork").Pool(workers) as pool:
        for _ in range(repeats + 1):  # first: warm-up of the pool
            c0, t0 = cpu_seconds(*[p.pid for p in pool._pool]), time.perf_counter()
            n = sum(pool.map(_decode_share, shares))
            runs.append((n / (time.perf_counter() - t0), n / (cpu_seconds(*[p.pid for p in pool._pool]) - c0)))
    return {"wall": statistics.median(r[0] for r in runs[1:]), "cpu": statistics.median(r[1] for r in runs[1:])}


def per_image(fn, items, repeats: int) -> float:
    """Median images per CPU-second of ``fn`` over ``items`` in this one thread."""
    rates = []
    for _ in range(repeats):
        t0 = time.process_time()
        for it in items:
            fn(it)
        rates.append(len(items) / (time.process_time() - t0))
    return statistics.median(rates)


def main() -> None:
    a = loader_bench_parser(__doc__, images=2000).parse_args()

    import simplejpeg
    import torch
    import torchvision.transforms as T
    from torch.utils.data import DataLoader
    from torchvision.datasets import ImageFolder

    from common import manifest as mf
    from common import storage
    from trainer.loader import LoaderConfig, make_train_loader
    from trainer.presets import DeviceColorJitter, DeviceNormalize, TrainPreset, jitter_generator

    tree, shards, m = photo_shards(a.workdir, a.images, a.workers)
    train = m.split("train")
    print_setup(m, f"{a.workers} DataLoader workers, batch {a.batch_size}, output 224x224")
    torch.set_num_threads(1)

    moto = LocalS3().start()  # the loopback moto server (common.local_s3), stopped by pid below
    try:
        os.environ.update(moto.env())
        s3_root = moto.create_bucket(f"bench-{uuid.uuid4().hex[:8]}") + "/shards"
        for f in shards.rglob("*"):
            if f.is_file() and "logs" not in f.parts:
                storage.upload_file(f, f"{s3_root}/{f.relative_to(shards).as_posix()}")

        def ours(root: str, decoder: str = "simplejpeg"):
            # spawn, not the default forkserver: spawned workers are children of this process, so
            # cpu_seconds() counts them once they are joined (a forkserver's children are not ours).
            cfg = LoaderConfig(root, batch_size=a.batch_size, num_workers=a.workers, decoder=decoder, with_keys=False,
                               multiprocessing_context="spawn")
            manifest = mf.load(root)
            epoch = iter(range(10**6))
            return lambda: (b.images for b in make_train_loader(cfg, epoch=next(epoch), rank=0, world_size=1,
                                                                 manifest=manifest))

        # The classic pipeline on the same images as loose files (minus those the builder rejected).
        rejected = {str(tree / s["path"]) for s in m.skipped}
        classic = T.Compose([T.RandomResizedCrop(224), T.RandomHorizontalFlip(), T.ColorJitter(0.4, 0.4, 0.4),
                             T.ToTensor(), T.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])])
        folder = ImageFolder(str(tree / "ILSVRC/Data/CLS-LOC/train"), transform=classic,
                             is_valid_file=lambda f: f.endswith(".JPEG") and f not in rejected)

        def baseline():
            return (x for x, _ in DataLoader(folder, batch_size=a.batch_size, shuffle=True, num_workers=a.workers,
                                             multiprocessing_context="fork"))

        ours_local = timed_epochs(ours(str(shards)), a.repeats)
        base = timed_epochs(baseline, a.repeats)
        c_moto0 = cpu_seconds(moto.pid) - cpu_seconds()
        ours_s3 = timed_epochs(ours(s3_root), a.repeats, pids=(moto.pid,))
        moto_share = (cpu_seconds(moto.pid) - cpu_seconds() - c_moto0) / a.repeats  # moto CPU s per epoch
        ours_pil = timed_epochs(ours(str(shards), "pil"), a.repeats)

        # Full-image decode only of the same bytes, from memory, same number of processes.
        jpegs = []
        for sh in train.shards:
            ix, raw = mf.load_index(m, sh), storage.read_bytes(m.url(sh.path))
            jpegs += [(k, raw[o:o + z]) for k, o, z in zip(ix.keys, ix.jpg_offsets, ix.jpg_sizes)]
        dec_sj = decode_only([j for _, j in jpegs], a.workers, "simplejpeg", a.repeats)
        dec_pil = decode_only([j for _, j in jpegs], a.workers, "pil", a.repeats)
        sample = jpegs[:300]
        p_sj = per_image(lambda kj, t=TrainPreset(224): t(kj[1], kj[0], 0, 0), sample, a.repeats)
        p_pil = per_image(lambda kj, t=TrainPreset(224, decoder="pil"): t(kj[1], kj[0], 0, 0), sample, a.repeats)
        d_sj1 = per_image(lambda kj: simplejpeg.decode_jpeg(kj[1]), sample, a.repeats)
        best = max(dec_sj, dec_pil, key=lambda d: d["wall"])

        # What the trainer does on the device, timed here on one CPU core for scale.
        x = torch.zeros(a.batch_size, 3, 224, 224, dtype=torch.uint8)
        norm, jit = DeviceNormalize(), DeviceColorJitter(0.4, 0.4, 0.4)
        t0 = time.perf_counter()
        for step in range(3):
            norm(jit(x, jitter_generator(0, 0, step)))
        dev_ms = (time.perf_counter() - t0) / 3 * 1e3

        s3_client_cpu = ours_s3["n"] / (ours_s3["n"] / ours_s3["cpu"] - moto_share)
        print(f"{'':46} {'steady':>8} {'epoch':>8} {'per':>8}")
        print(f"{'':46} {'img/s':>8} {'img/s':>8} {'CPU-s':>8}  (start-up s)")
        rows = [
            ("our loader, local shards", ours_local),
            ("torchvision ImageFolder + classic transforms", base),
            ("our loader, loopback S3 (moto CPU included)", ours_s3),
            ("our loader, decoder='pil'", ours_pil),
            ("full decode only, simplejpeg, parallel", dec_sj),
            ("full decode only, Pillow, parallel", dec_pil),
        ]
        for name, r in rows:
            steady = f"{r['steady']:8.0f}" if "steady" in r else f"{r['wall']:8.0f}"
            epoch = f"{r['wall']:8.0f}" if "steady" in r else ""
            first = f"  ({r['first_s']:.2f})" if "first_s" in r else ""
            print(f"{name:46} {steady:>8} {epoch:>8} {r['cpu']:8.0f}{first}")
        print(f"{'  S3 client side only (moto CPU excluded)':46} {'':>8} {'':>8} {s3_client_cpu:8.0f}")
        print(f"{'TrainPreset simplejpeg / pil, 1 thread':46} {'':>8} {'':>8} {p_sj:4.0f}/{p_pil:3.0f}")
        print(f"{'full decode simplejpeg, 1 thread':46} {'':>8} {'':>8} {d_sj1:8.0f}\n")
        ratios = [
            ("(a) ours / torchvision", ours_local["steady"] / base["steady"], ours_local["cpu"] / base["cpu"],
             "target >= 2.5x"),
            ("(b) S3 / local", ours_s3["steady"] / ours_local["steady"], ours_s3["cpu"] / ours_local["cpu"],
             f"target >= 0.9x; client side only: {s3_client_cpu / ours_local['cpu']:.2f}x"),
            ("(c) ours / faster full decode, same processes", ours_local["steady"] / best["wall"],
             ours_local["cpu"] / best["cpu"], "target >= 0.8x"),
        ]
        print(f"{'':46} {'steady':>8} {'per CPU-s':>10}")
        for name, wall, cpu, note in ratios:
            print(f"{name:46} {wall:7.2f}x {cpu:9.2f}x  {note}")
        print(f"\ndevice normalize+jitter, timed on 1 CPU core: {dev_ms:.0f} ms/batch (runs on the GPU in training)")
        print("steady: img/s from the first batch on (what a long epoch sees); epoch: incl. worker start-up;\n"
              "per CPU-s: images per CPU-second of every process involved (robust to other load on the machine).")
    finally:
        moto.stop()


if __name__ == "__main__":
    main()
