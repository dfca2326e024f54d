"""Real multi-process runs: ranks are separate processes joined by torch.distributed (gloo on
127.0.0.1, a free port), each with its own DataLoader workers.

Each rank runs ``python -m tests.test_loader_ddp ROOT OUT ...`` (the ``main`` below): it loads two
train epochs and the val split, checks with an all_gather that every rank has the same number
of train batches, and writes its keys to OUT/rank-R.json for the test to check globally.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from common import manifest as mf
from tests.conftest import REPO, free_port
from tests.test_loader import upload_build


def all_keys(root: str, split: str) -> list[str]:
    m = mf.load(root)
    return [k for s in m.split(split).shards for k in mf.load_index(m, s).keys]


def launch(root: str, out: Path, world: int, workers: int, timeout: float = 120) -> list[dict]:
    port = free_port()
    env = dict(os.environ, PYTHONPATH=str(REPO), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
               WORLD_SIZE=str(world))
    procs = [subprocess.Popen([sys.executable, "-m", "tests.test_loader_ddp", root, str(out), str(workers)],
                              cwd=REPO, env={**env, "RANK": str(r)}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True) for r in range(world)]
    outputs = []
    try:
        for p in procs:
            outputs.append(p.communicate(timeout=timeout)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for r, (p, text) in enumerate(zip(procs, outputs)):
        assert p.returncode == 0, f"rank {r} exited {p.returncode}:\n{text}"
    return [json.loads((out / f"rank-{r}.json").read_text()) for r in range(world)]


def check(root: str, results: list[dict]) -> None:
    train, val = all_keys(root, "train"), all_keys(root, "val")
    world = len(results)
    for epoch in ("0", "1"):
        counts = {len(r["train"][epoch]) for r in results}
        assert len(counts) == 1, f"ranks yield different numbers of batches: {counts}"
        keys = [k for r in results for batch in r["train"][epoch] for k in batch]
        assert len(keys) == len(set(keys)), "a sample was seen twice in one epoch"
        assert set(keys) <= set(train)
        assert len(train) - len(keys) < world and len(keys) >= 0.99 * len(train) - world
        for b in range(counts.pop()):  # batch b has the same size on every rank
            assert len({len(r["train"][epoch][b]) for r in results}) == 1
    assert [r["train"]["0"] for r in results] != [r["train"]["1"] for r in results]
    got_val = [k for r in results for batch in r["val"] for k in batch]
    assert got_val == val  # rank order = manifest order; every sample exactly once
    assert len(got_val) == mf.load(root).split("val").num_samples


@pytest.fixture(scope="module")
def two_shard_build(demo_tree, tmp_path_factory) -> str:
    """124 train samples in 2 shards (70 + 54), 42 val samples in 1 shard."""
    from shard_builder.build import build_shards

    out = tmp_path_factory.mktemp("ddp") / "build"
    build_shards(str(demo_tree.root), str(out), shard_max_count=70, workers=2)
    return str(out)


def test_two_ranks_two_workers_from_s3(demo_tree, s3_server, tmp_path):
    from shard_builder.build import build_shards

    local = tmp_path / "build"
    build_shards(str(demo_tree.root), str(local), shard_max_count=20, workers=2)  # 7 train shards
    root = upload_build(str(local), s3_server)
    check(root, launch(root, tmp_path, world=2, workers=2))


def test_more_ranks_and_workers_than_shards(two_shard_build, tmp_path):
    assert len(mf.load(two_shard_build).split("train").shards) == 2
    check(two_shard_build, launch(two_shard_build, tmp_path, world=3, workers=3))


def main() -> None:
    """One rank: ``python -m tests.test_loader_ddp ROOT OUT WORKERS`` with RANK/WORLD_SIZE/MASTER_* set."""
    import torch.distributed as dist

    from trainer.loader import LoaderConfig, make_train_loader, make_val_loader

    root, out, workers = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3])
    dist.init_process_group("gloo", init_method="env://")
    rank = dist.get_rank()
    cfg = LoaderConfig(root, batch_size=6, image_size=32, val_resize=40, val_size=32, num_workers=workers,
                       chunk_size=4, shuffle_window=32, val_batch_size=5)
    m = mf.load(root)
    result: dict = {"train": {}, "val": []}
    for epoch in (0, 1):
        loader = make_train_loader(cfg, epoch=epoch, manifest=m)  # rank/world from torch.distributed
        result["train"][str(epoch)] = [b.keys for b in loader]
        assert len(result["train"][str(epoch)]) == len(loader)
        counts = [None] * dist.get_world_size()
        dist.all_gather_object(counts, len(loader))
        assert len(set(counts)) == 1, counts
    # Val: ranks may have different batch counts, so no collective per batch; one at the end.
    result["val"] = [b.keys for b in make_val_loader(cfg, manifest=m)]
    totals = [None] * dist.get_world_size()
    dist.all_gather_object(totals, sum(len(k) for k in result["val"]))
    assert sum(totals) == m.split("val").num_samples
    (out / f"rank-{rank}.json").write_text(json.dumps(result))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
