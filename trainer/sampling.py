"""Pure epoch plans: which samples each rank's micro-batches hold, for any shard layout.

Everything here is a pure function of (shard sample counts, seed, epoch, global batch), computed
with numpy in a few tens of milliseconds for ImageNet-size splits, so every DataLoader worker
recomputes it instead of receiving it, and a resumed or re-sized run recomputes the same one::

    from trainer import sampling
    counts = [s.num_samples for s in manifest.split("train").shards]
    p = sampling.train_plan(counts, seed=0, epoch=3, rank=1, world_size=8, batch_size=256)
    len(p)              # micro-batches of rank 1 this epoch: the same on every rank
    p.batch(17)         # global sample ids of its micro-batch 17 (shard offset + index in shard)
    sampling.locate(counts, p.batch(17))   # -> (shard numbers, indices inside the shards)

Train order (see :func:`global_order`): shards in a seeded order, each cut into chunks of
``chunk_size`` consecutive samples (one byte-range read each), the chunk stream rotated by a
random offset and shuffled within windows of about ``shuffle_window`` samples. The global
order does not depend on world size. Global step ``t`` covers ``G[t*GB:(t+1)*GB]`` with
``GB = world_size * batch_size * accum``; rank ``r`` takes the ``r``-th contiguous slice of it,
cut into ``accum`` micro-batches. Because steps are defined on the global order, a run with the
same global batch on a different ``world_size``/``accum`` sees the same samples in the same
steps (elastic resume). Inside each micro-batch the samples are reordered by a random key per
position of the global order (from seed and epoch), which breaks up chunks and is likewise
independent of world size.

The partial last global batch (``N % GB`` samples): **training drops it** (``drop_last=True``,
what the trainer passes). Then an epoch is ``N // GB`` steps, each of exactly ``GB`` samples,
and the number of steps, the LR at every step and the samples of every step are the same for
any (world size, accumulation) with that global batch. Fewer than ``GB`` samples sit out each
epoch, and since the rotation moves the stream's start every epoch, which ones changes from
epoch to epoch. ``drop_last=False`` instead gives every rank ``L // world_size`` of the ``L``
left-over samples in one more, smaller step (fewer than ``world_size`` dropped): the step
count then depends on the layout (1,441 samples, GB 16: 90 steps on 2 ranks, 91 on 1 rank x
accum 2), so it is not for runs that may resume on a different number of processes.
Validation (:func:`val_plan`) always covers every sample exactly once.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# Tags give each random decision its own stream although all derive from (seed, epoch).
_TAG_ORDER = 0x0DE5
_TAG_MICRO = 0x31C0


def _rng(seed: int, epoch: int, tag: int) -> np.random.Generator:
    if seed < 0 or epoch < 0:
        raise ValueError(f"seed and epoch must be >= 0 (got seed={seed}, epoch={epoch})")
    return np.random.default_rng(np.random.SeedSequence([int(seed), int(epoch), tag]))


def shard_offsets(counts) -> np.ndarray:
    """int64 [S+1]: global id of each shard's first sample, then the total."""
    return np.concatenate([[0], np.cumsum(np.asarray(counts, dtype=np.int64))]).astype(np.int64)


def locate(counts, ids) -> tuple[np.ndarray, np.ndarray]:
    """Global sample ids -> (shard numbers, indices inside those shards)."""
    return locate_in(shard_offsets(counts), ids)


def locate_in(offsets: np.ndarray, ids) -> tuple[np.ndarray, np.ndarray]:
    """:func:`locate` given the :func:`shard_offsets` (computed once by a loader)."""
    ids = np.asarray(ids, dtype=np.int64)
    # side="right" - 1 picks the last shard starting at or before the id, skipping empty shards.
    shard = np.searchsorted(offsets, ids, side="right") - 1
    return shard, ids - offsets[shard]


def global_order(counts, *, seed: int, epoch: int, chunk_size: int = 16, shuffle_window: int = 8192) -> np.ndarray:
    """int64 [N]: the epoch's order of all samples (global ids), the same for any world size.

    The concatenation of :func:`epoch_chunks`.
    """
    starts, lens = epoch_chunks(counts, seed=seed, epoch=epoch, chunk_size=chunk_size, shuffle_window=shuffle_window)
    out_start = np.cumsum(lens) - lens
    return np.arange(int(lens.sum()), dtype=np.int64) + np.repeat(starts - out_start, lens)


def epoch_chunks(counts, *, seed: int, epoch: int, chunk_size: int = 16,
                 shuffle_window: int = 8192) -> tuple[np.ndarray, np.ndarray]:
    """(first global id, length) of each chunk, int64 [num_chunks] each, in epoch order.

    1. Shards in a random order form one stream.
    2. Each shard is cut into chunks of ``chunk_size`` consecutive samples; its first chunk has a
       random length in 1..chunk_size, so chunk borders (and which samples travel together) move
       every epoch. A chunk never spans two shards, so it is one contiguous byte range.
    3. The chunk stream starts at a random sample (rotation; the shard it falls in is cut there),
       so which chunks end up in the partial last batch changes every epoch.
    4. Chunks are shuffled within windows of ``shuffle_window // chunk_size`` chunks, which mixes
       several shards into every batch while a window's reads stay within a few shards.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1 (got {chunk_size})")
    counts = np.asarray(counts, dtype=np.int64)
    n = int(counts.sum())
    rng = _rng(seed, epoch, _TAG_ORDER)
    if n == 0:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    first = shard_offsets(counts)[:-1]
    num_shards = len(counts)
    perm = rng.permutation(num_shards)
    plen = counts[perm]                                   # [S] piece lengths in stream order
    pstart = np.cumsum(plen) - plen                       # [S] stream position of each piece
    phase = rng.integers(1, chunk_size + 1, size=num_shards)  # [S] length of each shard's first chunk
    rot = int(rng.integers(0, n))

    # Chunk borders inside each piece: pstart + phase + k * chunk_size (< piece end).
    per = np.where(phase < plen, (plen - 1 - phase) // chunk_size + 1, 0)
    piece_of_cut = np.repeat(np.arange(num_shards), per)
    k = np.arange(int(per.sum())) - np.repeat(np.cumsum(per) - per, per)
    cuts = pstart[piece_of_cut] + phase[piece_of_cut] + chunk_size * k
    bounds = np.unique(np.concatenate([pstart[plen > 0], cuts, [rot]]))  # chunk starts (stream coords)
    lens = np.diff(np.append(bounds, n))
    piece = np.searchsorted(pstart, bounds, side="right") - 1
    gstart = first[perm[piece]] + (bounds - pstart[piece])  # global id of each chunk's first sample

    num_chunks = len(bounds)
    order = np.roll(np.arange(num_chunks), -int(np.searchsorted(bounds, rot)))
    per_window = max(1, shuffle_window // chunk_size)
    window = np.arange(num_chunks) // per_window
    order = order[np.lexsort((rng.random(num_chunks), window))]

    return gstart[order].astype(np.int64), lens[order].astype(np.int64)


@dataclass(frozen=True)
class RankPlan:
    """One rank's micro-batches for one epoch (train) or one pass (val)."""

    ids: np.ndarray          # int64 [n]: global sample ids, micro-batch after micro-batch
    offsets: np.ndarray      # int64 [M+1]: micro-batch b is ids[offsets[b]:offsets[b+1]]
    steps: np.ndarray        # int64 [M]: global step of micro-batch b
    micros: np.ndarray       # int64 [M]: its index within that step
    num_micros: np.ndarray   # int64 [M]: micro-batches of this rank in that step

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def batch(self, b: int) -> np.ndarray:
        return self.ids[self.offsets[b]:self.offsets[b + 1]]

    def sizes(self) -> np.ndarray:
        return np.diff(self.offsets)


def _last_share(num_samples: int, world_size: int, global_batch: int, drop_last: bool) -> tuple[int, int]:
    """(full global steps, samples per rank in the partial last step)."""
    if world_size < 1 or global_batch < world_size:
        raise ValueError(f"bad world_size={world_size} / global batch {global_batch}")
    full = num_samples // global_batch
    rest = num_samples - full * global_batch
    return full, 0 if drop_last else rest // world_size


def steps_per_epoch(num_samples: int, *, world_size: int, batch_size: int, accum: int = 1,
                    drop_last: bool = False) -> int:
    """Optimizer steps per epoch (the partial last global batch counts as one unless dropped)."""
    full, share = _last_share(num_samples, world_size, world_size * batch_size * accum, drop_last)
    return full + (share > 0)


def batches_per_rank(num_samples: int, *, world_size: int, batch_size: int, accum: int = 1,
                     drop_last: bool = False) -> int:
    """Micro-batches each rank yields per epoch: the same number on every rank."""
    full, share = _last_share(num_samples, world_size, world_size * batch_size * accum, drop_last)
    return full * accum + -(-share // batch_size)


def train_plan(counts, *, seed: int, epoch: int, rank: int, world_size: int, batch_size: int, accum: int = 1,
               chunk_size: int = 16, shuffle_window: int = 8192, drop_last: bool = False) -> RankPlan:
    """Rank ``rank``'s train micro-batches for ``epoch`` (see module docstring)."""
    if not 0 <= rank < world_size or batch_size < 1 or accum < 1:
        raise ValueError(f"bad rank={rank}/world_size={world_size}/batch_size={batch_size}/accum={accum}")
    order = global_order(counts, seed=seed, epoch=epoch, chunk_size=chunk_size, shuffle_window=shuffle_window)
    n = len(order)
    gb = world_size * batch_size * accum
    full, share = _last_share(n, world_size, gb, drop_last)
    n_last = -(-share // batch_size)

    # Micro-batch b < full*accum: step b // accum, micro b % accum, positions
    # [t*GB + rank*B*accum + m*B, ... + B). Last step: positions full*GB + rank*share + m*B ...
    b = np.arange(full * accum)
    t, m = b // accum, b % accum
    starts = np.concatenate([t * gb + rank * batch_size * accum + m * batch_size,
                             full * gb + rank * share + np.arange(n_last) * batch_size]).astype(np.int64)
    sizes = np.concatenate([np.full(full * accum, batch_size),
                            np.minimum(batch_size, share - np.arange(n_last) * batch_size)]).astype(np.int64)
    offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    pos = np.repeat(starts - offsets[:-1], sizes) + np.arange(int(offsets[-1]), dtype=np.int64)

    # Shuffle inside each micro-batch by a random key per *position* of the global order: the
    # result depends on (seed, epoch, position) only, so it is the same for any world size.
    keys = _rng(seed, epoch, _TAG_MICRO).random(n)
    micro_of = np.repeat(np.arange(len(sizes)), sizes)
    pos = pos[np.lexsort((keys[pos], micro_of))]

    steps = np.concatenate([t, np.full(n_last, full)]).astype(np.int64)
    micros = np.concatenate([m, np.arange(n_last)]).astype(np.int64)
    num_micros = np.concatenate([np.full(full * accum, accum), np.full(n_last, n_last)]).astype(np.int64)
    return RankPlan(order[pos], offsets, steps, micros, num_micros)


def val_plan(counts, *, rank: int, world_size: int, batch_size: int) -> RankPlan:
    """Rank ``rank`` gets samples [r*N//W, (r+1)*N//W) in manifest order, in batches with a short
    last one: every sample exactly once across ranks, no padding. Ranks may get different numbers
    of batches, so evaluation must not run a collective per batch (reduce once at the end)."""
    if not 0 <= rank < world_size or batch_size < 1:
        raise ValueError(f"bad rank={rank}/world_size={world_size}/batch_size={batch_size}")
    n = int(np.asarray(counts, dtype=np.int64).sum())
    lo, hi = rank * n // world_size, (rank + 1) * n // world_size
    offsets = np.append(np.arange(0, hi - lo, batch_size), hi - lo).astype(np.int64)
    num = len(offsets) - 1
    return RankPlan(np.arange(lo, hi, dtype=np.int64), offsets, np.arange(num, dtype=np.int64),
                    np.zeros(num, dtype=np.int64), np.ones(num, dtype=np.int64))


def worker_batches(num_batches: int, worker_id: int, num_workers: int, start_batch: int = 0) -> range:
    """Micro-batches worker ``worker_id`` produces: start_batch + worker_id, + num_workers, ...

    torch's DataLoader takes one item from each worker in turn, so the merged output is
    start_batch, start_batch + 1, ... for any ``num_workers``.
    """
    return range(start_batch + worker_id, num_batches, max(1, num_workers))
