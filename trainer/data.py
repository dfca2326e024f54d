"""Train and val loaders over the shards: exact epochs and exact resume for any ranks x workers.

    from trainer.data import LoaderConfig, make_train_loader, make_val_loader
    cfg = LoaderConfig("s3://bucket/imagenet-10pct", batch_size=256, num_workers=8, cache_dir="/mnt/cache")
    for epoch in range(start_epoch, epochs):
        train = make_train_loader(cfg, epoch=epoch, start_batch=resume_batch if epoch == start_epoch else 0)
        for batch in train:     # Batch: images uint8 [B,3,H,W], labels int64 [B], step, micro, ...
            ...                 # checkpoint (epoch, batch.index + 1) to resume right after it
        log(train.num_skipped)  # undecodable / truncated samples skipped this epoch
    for batch in make_val_loader(cfg): ...   # every val sample exactly once across ranks

How (details in ``trainer.plan``): each rank's micro-batches are a pure function of (shard
counts, seed, epoch, world size, batch sizes). Micro-batch ``b`` of a rank is produced by
DataLoader worker ``(b - start_batch) % num_workers``; torch's DataLoader takes one item from
each worker in turn, so the output is ``start_batch, start_batch + 1, ...`` whatever
``num_workers`` is (0 included) and whatever the timing. Resume skips plan entries without any
I/O or decode. Crop/flip randomness is per (seed, epoch, key), so pixels are identical too.

Every train rank yields the same number of micro-batches (``len(loader)``). Val ranks may
yield different numbers of batches: evaluation must not run a collective per batch; sum the
counts locally and all-reduce once at the end.
"""
from __future__ import annotations

import logging
import signal
import sys
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from common import manifest as mf
from common import wds_s3
from trainer import plan as planlib
from trainer.presets import DECODERS, EvalPreset, TrainPreset
from trainer.reader import ShardStore

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoaderConfig:
    """Everything that defines the input pipeline except (rank, world size, epoch, start)."""

    root: str                          # local folder or s3:// URL holding manifest.json
    batch_size: int = 256              # per rank, per micro-batch
    accum: int = 1                     # micro-batches per optimizer step (global batch = W * B * accum)
    val_batch_size: int | None = None  # default: batch_size
    image_size: int = 224              # train crop
    val_resize: int = 256              # val: shorter side resized to this ...
    val_size: int | None = None        # ... then center crop (default: image_size)
    num_workers: int = 8
    seed: int = 0
    train_split: str = "train"
    val_split: str = "val"
    chunk_size: int = 16               # consecutive samples per byte-range read
    shuffle_window: int = 8192         # samples whose chunks are shuffled together
    drop_last: bool = False            # drop the partial last global batch
    cache_dir: str | None = None       # local write-through shard cache
    io_threads: int = 8                # parallel S3 range reads per worker
    decoder: str = "simplejpeg"        # or "pil" (see trainer.presets)
    pin_memory: bool = False
    multiprocessing_context: str | None = "fork" if sys.platform.startswith("linux") else "spawn"
    prefetch_factor: int = 2
    with_keys: bool = True
    decode: str = "cpu"                # "gpu": workers send JPEG bytes, decode_device decodes (trainer.gpu_decode)
    decode_device: str | None = None   # for decode="gpu"; default: the current CUDA device

    def __post_init__(self):
        if self.batch_size < 1 or self.accum < 1 or self.num_workers < 0:
            raise ValueError(f"bad batch_size/accum/num_workers in {self}")
        if self.decoder not in DECODERS:
            raise ValueError(f"decoder must be one of {DECODERS}, not {self.decoder!r}")
        if self.decode not in ("cpu", "gpu"):
            raise ValueError(f"decode must be 'cpu' or 'gpu', not {self.decode!r}")


class Batch(NamedTuple):
    """One micro-batch. Skipped samples (bad JPEG, truncated shard) are left out, so ``images``
    may hold fewer than the planned samples; ``num_skipped`` says how many."""

    images: torch.Tensor    # uint8 [B, 3, H, W], contiguous
    labels: torch.Tensor    # int64 [B]
    step: int               # global optimizer step within the epoch
    micro: int              # micro-batch within the step (0..num_micro-1)
    num_micro: int          # micro-batches of this rank in the step (accum, fewer in the last)
    num_skipped: int
    keys: list[str] | None  # sample keys (with_keys=True)
    index: int              # per-rank micro-batch index in the epoch: resume with start_batch=index + 1


def _outlive_sigterm(worker_id: int) -> None:
    """DataLoader worker init: ignore SIGTERM.

    torchrun stops a job by signalling each rank's whole process group, DataLoader workers
    included. Were they to die, the rank would crash mid-step instead of finishing it and
    writing its interruption checkpoint. Workers still exit when the loader shuts them down
    or their parent dies (torch's worker watchdog), and SIGKILL still ends them.
    """
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def _identity(x):
    return x


def _rank_world(rank: int | None, world_size: int | None) -> tuple[int, int]:
    if rank is not None and world_size is not None:
        return rank, world_size
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def train_plan(cfg: LoaderConfig, manifest: mf.Manifest, *, rank: int, world_size: int, epoch: int) -> planlib.RankPlan:
    """The micro-batches ``make_train_loader`` yields for this rank and epoch, without loading anything."""
    counts = [s.num_samples for s in manifest.split(cfg.train_split).shards]
    return planlib.train_plan(counts, seed=cfg.seed, epoch=epoch, rank=rank, world_size=world_size,
                              batch_size=cfg.batch_size, accum=cfg.accum, chunk_size=cfg.chunk_size,
                              shuffle_window=cfg.shuffle_window, drop_last=cfg.drop_last)


def val_plan(cfg: LoaderConfig, manifest: mf.Manifest, *, rank: int, world_size: int) -> planlib.RankPlan:
    counts = [s.num_samples for s in manifest.split(cfg.val_split).shards]
    return planlib.val_plan(counts, rank=rank, world_size=world_size, batch_size=cfg.val_batch_size or cfg.batch_size)


class PlanDataset(IterableDataset):
    """Yields this rank's planned micro-batches from ``start_batch`` on, split across workers."""

    def __init__(self, cfg: LoaderConfig, manifest: mf.Manifest, train: bool, rank: int, world_size: int,
                 epoch: int, start_batch: int):
        wds_s3.register()  # here too: forked workers then inherit it (spawn ones register in __iter__)
        self.cfg, self.train, self.rank, self.world_size = cfg, train, rank, world_size
        self.epoch, self.start_batch = epoch, start_batch
        split = cfg.train_split if train else cfg.val_split
        self.store = ShardStore(manifest, split, cache_dir=cfg.cache_dir, io_threads=cfg.io_threads)
        self.offsets = planlib.shard_offsets(self.store.counts)
        self.preset = (TrainPreset(cfg.image_size, decoder=cfg.decoder) if train else
                       EvalPreset(cfg.val_size or cfg.image_size, cfg.val_resize, decoder=cfg.decoder))

    def plan(self) -> planlib.RankPlan:
        m = self.store.manifest
        if self.train:
            return train_plan(self.cfg, m, rank=self.rank, world_size=self.world_size, epoch=self.epoch)
        return val_plan(self.cfg, m, rank=self.rank, world_size=self.world_size)

    def __iter__(self):
        wds_s3.register()  # per process: spawn workers start without it
        info = get_worker_info()
        worker, workers = (0, 1) if info is None else (info.id, info.num_workers)
        p = self.plan()  # recomputed in each worker: cheap, and nothing large is pickled
        for b in planlib.worker_batches(len(p), worker, workers, self.start_batch):
            yield self.load(p, b)

    def load(self, p: planlib.RankPlan, b: int) -> Batch:
        if self.cfg.decode == "gpu":  # bytes + crop boxes only; ShardLoader decodes on the device
            from trainer.gpu_decode import read_raw
            return read_raw(self, p, b, worker=get_worker_info() is not None)
        ids = p.batch(b)
        shard = np.searchsorted(self.offsets, ids, side="right") - 1
        local = ids - self.offsets[shard]
        jpegs = self.store.read_jpegs(shard, local)
        size = self.preset.size
        shape = (len(ids), 3, size, size)
        if get_worker_info() is None:
            images = torch.empty(shape, dtype=torch.uint8)
        else:  # straight into shared memory, as default_collate does: sending it then copies nothing
            images = torch.empty(0, dtype=torch.uint8).set_(torch.UntypedStorage._new_shared(int(np.prod(shape))))
            images = images.view(shape)
        labels = np.empty(len(ids), dtype=np.int64)
        keys: list[str] = []
        n = skipped = 0
        for s, i, jpeg in zip(shard.tolist(), local.tolist(), jpegs):
            arrays = self.store.index(s)
            key = arrays.keys[i]
            if jpeg is None:
                skipped += 1
                log.warning("skipped %s: shard %s is truncated", key, self.store.url(s))
                continue
            try:
                images[n].copy_(self.preset(jpeg, key, self.cfg.seed, self.epoch))
            except Exception as exc:  # noqa: BLE001 - Pillow raises many types for bad data
                skipped += 1
                log.warning("skipped %s in %s: undecodable (%s: %s)", key, self.store.url(s), type(exc).__name__, exc)
                continue
            labels[n] = arrays.labels[i]
            keys.append(key)
            n += 1
        return Batch(images[:n], torch.from_numpy(labels[:n]), int(p.steps[b]), int(p.micros[b]), int(p.num_micros[b]),
                     skipped, keys if self.cfg.with_keys else None, b)


class ShardLoader:
    """Iterable over :class:`Batch` for one epoch (train) or one pass (val).

    ``len()`` is the number of batches it yields (from ``start_batch``); ``num_batches`` the
    epoch's total for this rank; ``num_skipped`` the running total of skipped samples.
    """

    def __init__(self, dataset: PlanDataset, cfg: LoaderConfig, num_batches: int, steps_per_epoch: int):
        self.dataset, self.cfg = dataset, cfg
        self.num_batches, self.steps_per_epoch = num_batches, steps_per_epoch
        self.epoch, self.start_batch = dataset.epoch, dataset.start_batch
        self.num_skipped = 0
        workers = cfg.num_workers
        extra = dict(multiprocessing_context=cfg.multiprocessing_context, prefetch_factor=cfg.prefetch_factor,
                     persistent_workers=False, worker_init_fn=_outlive_sigterm) if workers > 0 else {}
        # Its own generator: drawing worker seeds must not advance the global torch RNG, whose
        # state the checkpoints save and a resumed run restores.
        self.dataloader = DataLoader(dataset, batch_size=None, num_workers=workers, pin_memory=cfg.pin_memory,
                                     collate_fn=_identity, generator=torch.Generator().manual_seed(cfg.seed),
                                     **extra)

    def __len__(self) -> int:
        return max(0, self.num_batches - self.start_batch)

    def __iter__(self):
        it = iter(self.dataloader)
        batches = it
        if self.cfg.decode == "gpu":  # --decode gpu: workers sent bytes; decode here, on the device
            from trainer.gpu_decode import decode_batch, resolve_device
            device = resolve_device(self.cfg.decode_device)
            batches = (decode_batch(raw, device) for raw in it)
        try:
            for batch in batches:
                self.num_skipped += batch.num_skipped
                yield batch
        finally:
            # Stop the workers now when the consumer stops early or an error escapes. Left to
            # garbage collection, an iterator caught in an exception's traceback is finalised
            # after its queues and each worker join then waits out a 5 s timeout.
            shutdown = getattr(it, "_shutdown_workers", None)
            if shutdown is not None:
                shutdown()


def make_train_loader(cfg: LoaderConfig, *, epoch: int, start_batch: int = 0, rank: int | None = None,
                      world_size: int | None = None, manifest: mf.Manifest | None = None) -> ShardLoader:
    """This rank's train micro-batches of ``epoch``, from micro-batch ``start_batch`` on.

    rank/world_size default to torch.distributed's (or 0/1). Pass ``manifest`` to avoid
    re-reading it every epoch.
    """
    rank, world_size = _rank_world(rank, world_size)
    manifest = manifest or mf.load(cfg.root)
    n = manifest.split(cfg.train_split).num_samples
    kw = dict(world_size=world_size, batch_size=cfg.batch_size, accum=cfg.accum, drop_last=cfg.drop_last)
    num_batches = planlib.batches_per_rank(n, **kw)
    if not 0 <= start_batch <= num_batches:
        raise ValueError(f"start_batch {start_batch} is outside 0..{num_batches}")
    dataset = PlanDataset(cfg, manifest, True, rank, world_size, epoch, start_batch)
    return ShardLoader(dataset, cfg, num_batches, planlib.steps_per_epoch(n, **kw))


def make_val_loader(cfg: LoaderConfig, *, rank: int | None = None, world_size: int | None = None,
                    manifest: mf.Manifest | None = None) -> ShardLoader:
    """This rank's share of the val split: every sample exactly once across ranks, no padding."""
    rank, world_size = _rank_world(rank, world_size)
    manifest = manifest or mf.load(cfg.root)
    num_batches = len(val_plan(cfg, manifest, rank=rank, world_size=world_size))
    dataset = PlanDataset(cfg, manifest, False, rank, world_size, 0, 0)
    return ShardLoader(dataset, cfg, num_batches, num_batches)
