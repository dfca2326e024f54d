"""The epoch plan: equal batch counts on every rank, no sample twice, >= 99% coverage, seeded
order, worker-count independence, elastic invariance, and speed at ImageNet scale."""
from __future__ import annotations

import numpy as np
import pytest

from trainer import sampling

LAYOUTS = [
    # (shard counts, world size, per-rank batch, accum)
    ([1281] * 50, 8, 16, 1),        # 50 shards on 8 ranks (x 8 workers)
    ([70, 54], 3, 8, 1),            # 2 shards on 3 ranks (x 3 workers)
    ([13, 0, 7, 1, 29, 2], 4, 3, 2),  # uneven and empty shards, gradient accumulation
    ([5], 7, 4, 1),                 # fewer samples than ranks x batch
    ([1000, 999, 1001], 6, 32, 3),
]


def _all_ranks(counts, world, batch, accum, **kw):
    return [sampling.train_plan(counts, seed=3, epoch=1, rank=r, world_size=world, batch_size=batch, accum=accum, **kw)
            for r in range(world)]


def test_global_order_is_a_seeded_permutation():
    counts = [40, 0, 33, 17, 64]
    n = sum(counts)
    a = sampling.global_order(counts, seed=5, epoch=2, chunk_size=4, shuffle_window=32)
    assert sorted(a.tolist()) == list(range(n))
    assert np.array_equal(a, sampling.global_order(counts, seed=5, epoch=2, chunk_size=4, shuffle_window=32))
    assert not np.array_equal(a, sampling.global_order(counts, seed=5, epoch=3, chunk_size=4, shuffle_window=32))
    assert not np.array_equal(a, sampling.global_order(counts, seed=6, epoch=2, chunk_size=4, shuffle_window=32))


def test_chunks_lie_in_one_shard_and_partition_the_split():
    """A chunk is at most chunk_size consecutive samples of one shard: one byte-range read."""
    counts = [9, 10, 0, 11, 12, 1]
    offsets = sampling.shard_offsets(counts)
    for epoch in range(4):
        starts, lens = sampling.epoch_chunks(counts, seed=1, epoch=epoch, chunk_size=4, shuffle_window=8)
        assert (lens >= 1).all() and (lens <= 4).all()
        first = np.searchsorted(offsets, starts, side="right") - 1
        last = np.searchsorted(offsets, starts + lens - 1, side="right") - 1
        assert np.array_equal(first, last)
        ids = np.concatenate([np.arange(s, s + n) for s, n in zip(starts, lens)])
        assert sorted(ids.tolist()) == list(range(sum(counts)))
        assert np.array_equal(ids, sampling.global_order(counts, seed=1, epoch=epoch, chunk_size=4, shuffle_window=8))


def test_chunk_borders_move_each_epoch():
    """Which samples share a chunk (and so a batch) changes from epoch to epoch."""
    counts = [50 + 7 * i for i in range(40)]
    borders = [set(sampling.epoch_chunks(counts, seed=0, epoch=e, chunk_size=8)[0].tolist()) for e in range(2)]
    assert len(borders[0] & borders[1]) < 0.5 * len(borders[0])


def test_window_shuffle_mixes_shards_into_batches():
    counts = [1000] * 20
    order = sampling.global_order(counts, seed=0, epoch=0, chunk_size=16, shuffle_window=4096)
    shards_per_batch = [len(set((order[i:i + 256] // 1000).tolist())) for i in range(0, 20000 - 256, 256)]
    assert np.mean(shards_per_batch) >= 3


@pytest.mark.parametrize("counts,world,batch,accum", LAYOUTS)
@pytest.mark.parametrize("drop_last", [False, True])
def test_every_rank_same_batches_no_duplicates_full_coverage(counts, world, batch, accum, drop_last):
    plans = _all_ranks(counts, world, batch, accum, chunk_size=4, shuffle_window=64, drop_last=drop_last)
    n = sum(counts)
    assert len({len(p) for p in plans}) == 1
    assert len(plans[0]) == sampling.batches_per_rank(n, world_size=world, batch_size=batch, accum=accum,
                                                  drop_last=drop_last)
    for b in range(len(plans[0])):  # same micro-batch sizes and step labels on all ranks
        assert len({len(p.batch(b)) for p in plans}) == 1
        assert len({(int(p.steps[b]), int(p.micros[b]), int(p.num_micros[b])) for p in plans}) == 1
    ids = np.concatenate([p.ids for p in plans])
    assert len(ids) == len(set(ids.tolist()))
    assert set(ids.tolist()) <= set(range(n))
    if drop_last:
        assert all((p.sizes() == batch).all() for p in plans)
        assert n - len(ids) < world * batch * accum
    else:
        assert n - len(ids) < world  # fewer than world_size samples dropped per epoch
        if n >= 100 * world:
            assert len(ids) >= 0.99 * n
    steps = sampling.steps_per_epoch(n, world_size=world, batch_size=batch, accum=accum, drop_last=drop_last)
    assert (plans[0].steps.max() + 1 if len(plans[0]) else 0) == steps


def test_step_structure_with_accum():
    p = sampling.train_plan([100], seed=0, epoch=0, rank=1, world_size=2, batch_size=4, accum=3)
    # GB = 24: 4 full steps of 3 micro-batches, then 4 samples left -> 2 per rank, one micro-batch.
    assert p.steps.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3, 4]
    assert p.micros.tolist() == [0, 1, 2] * 4 + [0]
    assert p.num_micros.tolist() == [3] * 12 + [1]
    assert p.sizes().tolist() == [4] * 12 + [2]


def test_order_depends_on_seed_epoch_not_on_anything_else():
    counts = [300, 200, 123]
    a = sampling.train_plan(counts, seed=1, epoch=4, rank=2, world_size=3, batch_size=16)
    b = sampling.train_plan(counts, seed=1, epoch=4, rank=2, world_size=3, batch_size=16)
    c = sampling.train_plan(counts, seed=1, epoch=5, rank=2, world_size=3, batch_size=16)
    assert np.array_equal(a.ids, b.ids) and np.array_equal(a.offsets, b.offsets)
    assert not np.array_equal(a.ids, c.ids)


def test_elastic_same_global_batch_gives_same_steps():
    """W=4, accum=1 and W=2, accum=2 and W=1, accum=4 (same global batch) see the same samples,
    in the same order, in every full step."""
    counts = [500, 433, 67]
    layouts = [(4, 1), (2, 2), (1, 4)]
    per_step = []
    for world, accum in layouts:
        plans = [sampling.train_plan(counts, seed=9, epoch=2, rank=r, world_size=world, batch_size=8, accum=accum)
                 for r in range(world)]
        full = 1000 // 32
        per_step.append([np.concatenate([p.batch(b) for p in plans for b in np.flatnonzero(p.steps == t)])
                         for t in range(full)])
    for t in range(1000 // 32):
        assert np.array_equal(per_step[0][t], per_step[1][t])
        assert np.array_equal(per_step[0][t], per_step[2][t])


def test_dropping_the_partial_last_global_batch_makes_steps_independent_of_layout():
    """1,441 samples, global batch 16 (the trainer's rule, drop_last=True): 2 ranks x accum 1 and
    1 rank x accum 2 run the same 90 steps with the same 16 samples in every step."""
    counts = [500, 441, 500]
    layouts = [(2, 1), (1, 2)]
    assert {sampling.steps_per_epoch(1441, world_size=w, batch_size=8, accum=a, drop_last=True) for w, a in layouts} == {90}
    per_layout = []
    for world, accum in layouts:
        plans = [sampling.train_plan(counts, seed=4, epoch=1, rank=r, world_size=world, batch_size=8, accum=accum,
                                 drop_last=True) for r in range(world)]
        assert {len(p) for p in plans} == {sampling.batches_per_rank(1441, world_size=world, batch_size=8, accum=accum,
                                                                 drop_last=True)}
        assert all(int(p.steps.max()) + 1 == 90 for p in plans)
        per_layout.append([sorted(np.concatenate([p.batch(b) for p in plans for b in np.flatnonzero(p.steps == t)])
                                  .tolist()) for t in range(90)])
    assert all(len(step) == 16 for step in per_layout[0])
    assert per_layout[0] == per_layout[1]
    # Keeping the partial batch would not do: the step count then depends on the layout.
    assert sampling.steps_per_epoch(1441, world_size=2, batch_size=8) == 90
    assert sampling.steps_per_epoch(1441, world_size=1, batch_size=8, accum=2) == 91


def test_micro_batches_are_shuffled_inside():
    """Within a micro-batch the chunk runs are broken up (samples of a chunk are not adjacent)."""
    p = sampling.train_plan([4096], seed=0, epoch=0, rank=0, world_size=1, batch_size=64, chunk_size=16)
    adjacent = np.mean(np.diff(p.batch(0)) == 1)
    assert adjacent < 0.3


@pytest.mark.parametrize("workers", [1, 2, 3, 8])
@pytest.mark.parametrize("start", [0, 1, 5])
def test_worker_round_robin_reproduces_the_sequence(workers, start):
    num = 11
    per_worker = [list(sampling.worker_batches(num, w, workers, start)) for w in range(workers)]
    # torch's DataLoader takes one item per worker in turn, skipping exhausted workers.
    merged, pos = [], [0] * workers
    while any(pos[w] < len(per_worker[w]) for w in range(workers)):
        for w in range(workers):
            if pos[w] < len(per_worker[w]):
                merged.append(per_worker[w][pos[w]])
                pos[w] += 1
    assert merged == list(range(start, num))


def test_val_plan_each_sample_once_across_ranks():
    counts = [10, 0, 7, 6]
    for world in (1, 2, 3, 5, 30):
        plans = [sampling.val_plan(counts, rank=r, world_size=world, batch_size=4) for r in range(world)]
        ids = np.concatenate([p.ids for p in plans])
        assert ids.tolist() == list(range(23))
        for p in plans:
            assert all(1 <= s <= 4 for s in p.sizes())


def test_locate_maps_to_shard_and_index():
    counts = [3, 0, 2, 4]
    shard, idx = sampling.locate(counts, np.arange(9))
    assert shard.tolist() == [0, 0, 0, 2, 2, 3, 3, 3, 3]
    assert idx.tolist() == [0, 1, 2, 0, 1, 0, 1, 2, 3]


def test_imagenet_scale_plan_covers_each_sample_at_most_once():
    """At ImageNet-1k size (1.28M samples, 8 ranks): the plan is computed (each DataLoader worker
    recomputes it) and its micro-batches hold distinct, valid ids. How fast: bench, not here."""
    counts = [1281] * 1000
    p = sampling.train_plan(counts, seed=0, epoch=1, rank=7, world_size=8, batch_size=256)
    assert len(p) == sampling.batches_per_rank(sum(counts), world_size=8, batch_size=256)
    assert len(np.unique(p.ids)) == len(p.ids) and 0 <= p.ids.min() and p.ids.max() < sum(counts)
