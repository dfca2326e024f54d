"""Train and val loaders over the shards: exact epochs and exact resume for any ranks x workers.

    from trainer.loader import LoaderConfig, RunLoader
    cfg = LoaderConfig("s3://bucket/imagenet-10pct", batch_size=256, num_workers=8, cache_dir="/mnt/cache")
    with RunLoader(cfg, manifest=manifest) as loaders:   # rank/world size from torch.distributed
        for epoch in range(start_epoch, epochs):
            train = loaders.train_epoch(epoch, start_batch=resume_batch if epoch == start_epoch else 0)
            for batch in train:     # Batch: images uint8 [B,3,H,W], labels int64 [B], step, micro, ...
                ...                 # checkpoint (epoch, batch.index + 1) to resume right after it
            log(train.num_skipped)  # undecodable / truncated samples skipped this epoch
            for batch in loaders.val(): ...   # every val sample exactly once across ranks

``make_train_loader(cfg, epoch=...)`` / ``make_val_loader(cfg)`` give one pass on workers of
its own (tools, tests); a training run uses one :class:`RunLoader`.

How (details in ``trainer.sampling``): each rank's micro-batches are a pure function of (shard
counts, seed, epoch, world size, batch sizes). The main process asks for items ``(epoch, b)``,
``b = start_batch, start_batch + 1, ...``; torch's DataLoader hands them to the workers in turn
and returns the results in that order, so the output is the same whatever ``num_workers`` is
(0 included) and whatever the timing. Resume skips plan entries without any I/O or decode.
Crop/flip randomness is per (seed, epoch, key), so pixels are identical too.

Workers never come from ``fork()`` of the training process, which has threads (checkpoint
uploads, IMDS poller, S3 read pools, collectives): a fork there can deadlock in the child. On
Linux they come from a ``forkserver`` (started at the first loader from a clean exec; it
preloads the imports but never has a second thread), elsewhere from ``spawn``. They start
once per run: train and val each keep theirs for every epoch (``persistent_workers``), and
each worker loads each index sidecar at most once per run. Workers and the forkserver
ignore SIGTERM (see ``trainer.workers``), and a worker that dies or stalls for
``worker_timeout_s`` is an error in the main process, not an endless wait.

Every train rank yields the same number of micro-batches (``len(loader)``). Val ranks may
yield different numbers of batches: evaluation must not run a collective per batch; sum the
counts locally and all-reduce once at the end.
"""
from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler, get_worker_info

from common import manifest as mf
from trainer import sampling
from trainer.distributed import rank_and_world
from trainer.presets import DECODERS, EvalPreset, TrainPreset
from trainer.reader import ShardStore
from trainer.workers import WORKER_START_METHODS, WorkerInit, worker_context

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
    multiprocessing_context: str = "forkserver" if sys.platform.startswith("linux") else "spawn"
    prefetch_factor: int = 2
    with_keys: bool = True
    decode: str = "cpu"                # "gpu": workers send JPEG bytes, decode_device decodes (trainer.gpu_decode)
    decode_device: str | None = None   # for decode="gpu"; default: the current CUDA device
    worker_timeout_s: float = 600      # a worker silent this long (dead or stuck) is an error

    def __post_init__(self):
        if self.batch_size < 1 or self.accum < 1 or self.num_workers < 0:
            raise ValueError(f"bad batch_size/accum/num_workers in {self}")
        if self.multiprocessing_context not in WORKER_START_METHODS:
            raise ValueError(f"multiprocessing_context must be one of {WORKER_START_METHODS}, not "
                             f"{self.multiprocessing_context!r}: fork() of a process with threads can deadlock")
        if self.worker_timeout_s <= 0:
            raise ValueError(f"worker_timeout_s must be > 0 (got {self.worker_timeout_s})")
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


class Sample(NamedTuple):
    """One sample read from its shard, not decoded yet."""

    key: str
    label: int
    jpeg: bytes
    shard_url: str

    def log_undecodable(self, exc: Exception) -> None:
        log.warning("skipped %s in %s: undecodable (%s: %s)", self.key, self.shard_url, type(exc).__name__, exc)


def _identity(x):
    return x


def planned_train_batches(cfg: LoaderConfig, manifest: mf.Manifest, *, rank: int, world_size: int,
                          epoch: int) -> sampling.RankPlan:
    """The micro-batches ``make_train_loader`` yields for this rank and epoch, without loading anything."""
    counts = [s.num_samples for s in manifest.split(cfg.train_split).shards]
    return sampling.train_plan(counts, seed=cfg.seed, epoch=epoch, rank=rank, world_size=world_size,
                              batch_size=cfg.batch_size, accum=cfg.accum, chunk_size=cfg.chunk_size,
                              shuffle_window=cfg.shuffle_window, drop_last=cfg.drop_last)


def planned_val_batches(cfg: LoaderConfig, manifest: mf.Manifest, *, rank: int, world_size: int) -> sampling.RankPlan:
    """This rank's val batches (:func:`trainer.sampling.val_plan` with the loader's settings)."""
    counts = [s.num_samples for s in manifest.split(cfg.val_split).shards]
    return sampling.val_plan(counts, rank=rank, world_size=world_size, batch_size=cfg.val_batch_size or cfg.batch_size)


class PlanDataset(Dataset):
    """Map-style: item ``(epoch, b)`` is this rank's planned micro-batch ``b`` of ``epoch``.

    One instance lives in each worker for the whole run: its :class:`ShardStore` keeps every
    index sidecar it loaded, and it keeps the plan of the epoch it is serving (recomputed per
    process from the manifest: cheap, and nothing large is pickled).
    """

    def __init__(self, cfg: LoaderConfig, manifest: mf.Manifest, train: bool, rank: int, world_size: int):
        self.cfg, self.train, self.rank, self.world_size = cfg, train, rank, world_size
        self.epoch = 0
        split = cfg.train_split if train else cfg.val_split
        self.store = ShardStore(manifest, split, cache_dir=cfg.cache_dir, io_threads=cfg.io_threads)
        self.offsets = sampling.shard_offsets(self.store.counts)
        self.preset = (TrainPreset(cfg.image_size, decoder=cfg.decoder) if train else
                       EvalPreset(cfg.val_size or cfg.image_size, cfg.val_resize, decoder=cfg.decoder))
        self._plans: dict[int, sampling.RankPlan] = {}

    def __getstate__(self):
        return {**self.__dict__, "_plans": {}}

    def plan(self, epoch: int) -> sampling.RankPlan:
        """The epoch's plan, computed once per process (val: the same for every epoch)."""
        epoch = epoch if self.train else 0
        p = self._plans.get(epoch)
        if p is None:
            m = self.store.manifest
            p = (planned_train_batches(self.cfg, m, rank=self.rank, world_size=self.world_size, epoch=epoch)
                 if self.train else planned_val_batches(self.cfg, m, rank=self.rank, world_size=self.world_size))
            self._plans = {epoch: p}  # only the current one: epochs only move forward
        return p

    def __getitem__(self, item: tuple[int, int]) -> Batch:
        epoch, b = item
        p = self.plan(epoch)
        self.epoch = epoch
        return self.load(p, b)

    def read_samples(self, p: sampling.RankPlan, b: int) -> tuple[list["Sample"], int]:
        """Micro-batch ``b``'s samples that arrived, in plan order, and how many did not (a
        truncated shard: logged). The CPU path and ``--decode gpu`` both read through here."""
        shard, local = sampling.locate_in(self.offsets, p.batch(b))
        jpegs = self.store.read_jpegs(shard, local)
        samples, skipped = [], 0
        for s, i, jpeg in zip(shard.tolist(), local.tolist(), jpegs):
            arrays = self.store.index(s)
            key = arrays.keys[i]
            if jpeg is None:
                skipped += 1
                log.warning("skipped %s: shard %s is truncated", key, self.store.url(s))
                continue
            samples.append(Sample(key, int(arrays.labels[i]), jpeg, self.store.url(s)))
        return samples, skipped

    def load(self, p: sampling.RankPlan, b: int) -> Batch:
        if self.cfg.decode == "gpu":  # bytes + crop boxes only; ShardLoader decodes on the device
            from trainer.gpu_decode import read_raw
            return read_raw(self, p, b, worker=get_worker_info() is not None)
        samples, skipped = self.read_samples(p, b)
        size = self.preset.size
        shape = (len(samples), 3, size, size)
        if get_worker_info() is None:
            images = torch.empty(shape, dtype=torch.uint8)
        else:  # straight into shared memory, as default_collate does: sending it then copies nothing
            images = torch.empty(0, dtype=torch.uint8).set_(torch.UntypedStorage._new_shared(int(np.prod(shape))))
            images = images.view(shape)
        labels = np.empty(len(samples), dtype=np.int64)
        keys: list[str] = []
        n = 0
        for sample in samples:
            try:
                images[n].copy_(self.preset(sample.jpeg, sample.key, self.cfg.seed, self.epoch))
            except Exception as exc:  # noqa: BLE001 - Pillow raises many types for bad data
                skipped += 1
                sample.log_undecodable(exc)
                continue
            labels[n] = sample.label
            keys.append(sample.key)
            n += 1
        return Batch(images[:n], torch.from_numpy(labels[:n]), int(p.steps[b]), int(p.micros[b]), int(p.num_micros[b]),
                     skipped, keys if self.cfg.with_keys else None, b)


class _PassSampler(Sampler):
    """Main process only: the items ``(epoch, b)`` of the current pass, in order.

    The DataLoader hands them to its workers round-robin and returns the results in this
    order, so the output is start, start + 1, ... whatever ``num_workers`` and timing.
    """

    def __init__(self):
        self.epoch = self.start = self.stop = 0

    def __iter__(self):
        return ((self.epoch, b) for b in range(self.start, self.stop))

    def __len__(self) -> int:
        return max(0, self.stop - self.start)


class _Split:
    """One split's dataset and DataLoader. With workers, the workers start on the first pass
    and serve every later pass until :meth:`close` (``persistent_workers``)."""

    def __init__(self, cfg: LoaderConfig, manifest: mf.Manifest, train: bool, rank: int, world_size: int,
                 persistent: bool = True):
        self.name = "train" if train else "val"
        self.dataset = PlanDataset(cfg, manifest, train, rank, world_size)
        self.sampler = _PassSampler()
        self.workers = cfg.num_workers
        self._it = None  # the DataLoader iterator, hence the workers, of the latest pass
        extra = {}
        if self.workers > 0:
            extra = dict(multiprocessing_context=worker_context(cfg.multiprocessing_context),
                         prefetch_factor=cfg.prefetch_factor, persistent_workers=persistent,
                         worker_init_fn=WorkerInit(dict(os.environ)), timeout=cfg.worker_timeout_s)
        # Its own generator: drawing worker seeds must not advance the global torch RNG, whose
        # state the checkpoints save and a resumed run restores.
        self.dataloader = DataLoader(self.dataset, batch_size=None, sampler=self.sampler, num_workers=self.workers,
                                     pin_memory=cfg.pin_memory, collate_fn=_identity,
                                     generator=torch.Generator().manual_seed(cfg.seed), **extra)

    def batches(self, epoch: int, start: int, stop: int):
        """An iterator over micro-batches start..stop-1 of ``epoch`` (one pass at a time)."""
        self.sampler.epoch, self.sampler.start, self.sampler.stop = epoch, start, stop
        previous = self._it
        self._it = iter(self.dataloader)  # persistent workers: the same iterator, reset
        if self.workers > 0 and self._it is not previous:
            if previous is not None:
                self._shutdown(previous)
            pids = [w.pid for w in getattr(self._it, "_workers", [])]
            log.info("%s loader: %d workers started (%s), pids %s", self.name, len(pids),
                     self.dataloader.multiprocessing_context.get_start_method(), pids)
        return self._it

    @staticmethod
    def _shutdown(it) -> None:
        shutdown = getattr(it, "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()

    def close(self) -> None:
        """Stop the workers now (a later pass would start new ones)."""
        it, self._it = self._it, None
        if hasattr(self.dataloader, "_iterator"):
            self.dataloader._iterator = None
        if it is not None:
            self._shutdown(it)


class ShardLoader:
    """Iterable over :class:`Batch` for one epoch (train) or one pass (val).

    ``len()`` is the number of batches it yields (from ``start_batch``); ``num_batches`` the
    epoch's total for this rank; ``num_skipped`` the running total of skipped samples.
    """

    def __init__(self, split: _Split, epoch: int, start_batch: int, num_batches: int, steps_per_epoch: int,
                 owns_split: bool = False):
        self.split, self.owns_split = split, owns_split
        self.num_batches, self.steps_per_epoch = num_batches, steps_per_epoch
        self.epoch, self.start_batch = epoch, start_batch
        self.num_skipped = 0

    @property
    def dataset(self) -> PlanDataset:
        return self.split.dataset

    def __len__(self) -> int:
        return max(0, self.num_batches - self.start_batch)

    def __iter__(self):
        batches = self.split.batches(self.epoch, self.start_batch, self.num_batches)
        cfg = self.dataset.cfg
        if cfg.decode == "gpu":  # --decode gpu: workers sent bytes; decode here, on the device
            from trainer.gpu_decode import decode_batch, resolve_device
            device = resolve_device(cfg.decode_device)
            batches = (decode_batch(raw, device) for raw in batches)
        try:
            for batch in batches:
                self.num_skipped += batch.num_skipped
                yield batch
        finally:
            if self.owns_split:
                # A one-shot loader stops its workers when the consumer stops early or an error
                # escapes. Left to garbage collection, an iterator caught in an exception's
                # traceback is finalised after its queues and each worker join waits out 5 s.
                self.split.close()


def _counts(cfg: LoaderConfig, manifest: mf.Manifest, world_size: int) -> tuple[int, int]:
    """(train micro-batches per rank, optimizer steps) per epoch."""
    n = manifest.split(cfg.train_split).num_samples
    kw = dict(world_size=world_size, batch_size=cfg.batch_size, accum=cfg.accum, drop_last=cfg.drop_last)
    return sampling.batches_per_rank(n, **kw), sampling.steps_per_epoch(n, **kw)


class RunLoader:
    """The train and val loaders of one run; each keeps its workers from its first pass to
    :meth:`close` (see the module docstring). Use as a context manager or close it in ``finally``."""

    def __init__(self, cfg: LoaderConfig, *, rank: int | None = None, world_size: int | None = None,
                 manifest: mf.Manifest | None = None):
        self.cfg = cfg
        self.rank, self.world_size = rank_and_world(rank, world_size)
        self.manifest = manifest or mf.load(cfg.root)
        self.num_batches, self.steps_per_epoch = _counts(cfg, self.manifest, self.world_size)
        self.num_val_batches = len(planned_val_batches(cfg, self.manifest, rank=self.rank, world_size=self.world_size))
        self._train = _Split(cfg, self.manifest, True, self.rank, self.world_size)
        self._val = _Split(cfg, self.manifest, False, self.rank, self.world_size)

    def train_epoch(self, epoch: int, start_batch: int = 0) -> ShardLoader:
        """This rank's train micro-batches of ``epoch`` from ``start_batch`` on (iterate once)."""
        if not 0 <= start_batch <= self.num_batches:
            raise ValueError(f"start_batch {start_batch} is outside 0..{self.num_batches}")
        return ShardLoader(self._train, epoch, start_batch, self.num_batches, self.steps_per_epoch)

    def val(self) -> ShardLoader:
        """This rank's share of the val split: every sample exactly once across ranks, no padding."""
        return ShardLoader(self._val, 0, 0, self.num_val_batches, self.num_val_batches)

    def close(self) -> None:
        for split in (self._train, self._val):
            split.close()

    def __enter__(self) -> "RunLoader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def make_train_loader(cfg: LoaderConfig, *, epoch: int, start_batch: int = 0, rank: int | None = None,
                      world_size: int | None = None, manifest: mf.Manifest | None = None) -> ShardLoader:
    """One epoch on its own workers, stopped at its end (a run uses :class:`RunLoader`).

    rank/world_size default to torch.distributed's (or 0/1).
    """
    rank, world_size = rank_and_world(rank, world_size)
    manifest = manifest or mf.load(cfg.root)
    num_batches, steps = _counts(cfg, manifest, world_size)
    if not 0 <= start_batch <= num_batches:
        raise ValueError(f"start_batch {start_batch} is outside 0..{num_batches}")
    split = _Split(cfg, manifest, True, rank, world_size, persistent=False)
    return ShardLoader(split, epoch, start_batch, num_batches, steps, owns_split=True)


def make_val_loader(cfg: LoaderConfig, *, rank: int | None = None, world_size: int | None = None,
                    manifest: mf.Manifest | None = None) -> ShardLoader:
    """This rank's share of the val split on its own workers (a run uses :meth:`RunLoader.val`)."""
    rank, world_size = rank_and_world(rank, world_size)
    manifest = manifest or mf.load(cfg.root)
    num_batches = len(planned_val_batches(cfg, manifest, rank=rank, world_size=world_size))
    split = _Split(cfg, manifest, False, rank, world_size, persistent=False)
    return ShardLoader(split, 0, 0, num_batches, num_batches, owns_split=True)
