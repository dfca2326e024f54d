"""Process-group setup for one process (CPU or one GPU) or torchrun (DDP, multi-node).

    dist_info = setup("auto")     # reads RANK / LOCAL_RANK / WORLD_SIZE set by torchrun
    try:
        ...
    finally:
        teardown()

NCCL on GPU, gloo on CPU. Rendezvous (single node or c10d across nodes) is torchrun's
job; this module only joins the group it describes.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from common.errors import UserError


@dataclass(frozen=True)
class DistInfo:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def setup(device: str = "auto", timeout_minutes: float = 30) -> DistInfo:
    """Pick the device and join the process group described by torchrun's environment."""
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for but no CUDA device is available: use --device cpu or auto")
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if use_cuda:
        if local_rank >= torch.cuda.device_count():
            raise UserError(f"LOCAL_RANK {local_rank} but only {torch.cuda.device_count()} GPUs: "
                            "lower --nproc_per_node")
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo", timeout=timedelta(minutes=timeout_minutes),
                                device_id=dev if use_cuda else None)
    return DistInfo(rank, local_rank, world_size, dev)


def rank_and_world(rank: int | None = None, world_size: int | None = None) -> tuple[int, int]:
    """(rank, world size): the given ones, else torch.distributed's, else (0, 1)."""
    if rank is not None and world_size is not None:
        return rank, world_size
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def teardown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    """Sum a few numbers over all ranks (one collective); identity when not distributed."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t)
    return t.tolist()


def any_rank(flags: list[bool], device: torch.device) -> list[bool]:
    """Element-wise OR of a few flags over all ranks, so every rank takes the same decision
    at the same step (stop, checkpoint). One tiny all_reduce."""
    t = torch.tensor([int(f) for f in flags], dtype=torch.int32, device=device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return [bool(v) for v in t.tolist()]


def broadcast_object(obj, src: int = 0):
    if dist.is_available() and dist.is_initialized():
        box = [obj]
        dist.broadcast_object_list(box, src=src)
        return box[0]
    return obj


def assert_same_weights(model: torch.nn.Module, device: torch.device) -> None:
    """Raise if this rank's parameters differ from another rank's.

    Compares a float64 checksum (sum and a position-weighted sum, catching swaps) via one
    MIN and one MAX all_reduce: equal only if every rank holds the same value.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return
    flat = torch.cat([p.detach().reshape(-1).double() for p in model.parameters()])
    weights = torch.arange(1, flat.numel() + 1, dtype=torch.float64, device=flat.device) / flat.numel()
    local = torch.stack([flat.sum(), (flat * weights).sum()]).to(device)
    lo, hi = local.clone(), local.clone()
    dist.all_reduce(lo, op=dist.ReduceOp.MIN)
    dist.all_reduce(hi, op=dist.ReduceOp.MAX)
    if not torch.equal(lo, hi):
        raise RuntimeError(f"rank {dist.get_rank()}: weights differ across ranks (checksums {lo.tolist()} vs "
                           f"{hi.tolist()}): DDP lost synchronisation")


def broadcast_buffers(model: torch.nn.Module, src: int = 0) -> None:
    """Give every rank rank ``src``'s buffers (BatchNorm running stats).

    DDP syncs buffers at the start of each forward, so after the last training step every
    rank holds running stats from its own last batch. Evaluation must use the stats the
    checkpoint stores (rank 0's), or ranks evaluate slightly different models.
    """
    if dist.is_available() and dist.is_initialized():
        for buf in model.buffers():
            dist.broadcast(buf, src)
