"""Resume: choose the checkpoint a run continues from, fetch it on every rank, check it fits.

    state, where = resolve_resume(cfg, store, dinfo)    # (None, None): a fresh start
    if state is not None:
        check_compatible(state, cfg, manifest, where)

``--resume auto`` takes the newest checkpoint under ``--output`` that verifies and loads
(:meth:`trainer.checkpoint.CheckpointStore.choose`); ``--resume none`` starts over (refused
on a folder that holds a run unless ``--overwrite``); ``--resume PATH`` loads that file.
"""
from __future__ import annotations

from pathlib import Path

from common import manifest as mf
from common import storage
from common.errors import UserError
from trainer import checkpoint as ck
from trainer.config import TrainConfig
from trainer.distributed import DistInfo, broadcast_object
from trainer.state import TrainState


def _choose(cfg: TrainConfig, store: ck.CheckpointStore) -> tuple:
    """Rank 0: take the lease, check the output, and pick what to resume from."""
    choice: tuple = ("none",)
    if store.lease is not None:
        store.lease.acquire()  # lease: before touching anything; a live holder -> exit 2
    storage.check_writable(cfg.output)
    if cfg.resume == "none":
        if store.has_run() and not cfg.overwrite:
            raise UserError(f"{cfg.output} already holds a run: continue it with --resume auto, "
                            "or pass --overwrite to start over")
        if store.has_run():
            ck.clear_run(cfg.output, store.local)
    elif cfg.resume == "auto":
        meta = store.choose()
        choice = ("meta", meta) if meta else ("none",)
    else:
        choice = ("url", cfg.resume)
    store.fence()  # lease: from here on latest.json moves only by this run's conditional writes
    return choice


def resolve_resume(cfg: TrainConfig, store: ck.CheckpointStore, dinfo: DistInfo) -> tuple[TrainState | None, str | None]:
    """(checkpoint state, where it came from). Rank 0 checks the output and chooses; its
    errors are broadcast so every rank fails the same way (none waits forever); every rank
    then loads exactly the bytes rank 0 verified (checked against the record's sha256)."""
    choice: tuple = ("none",)
    if dinfo.is_main:
        try:
            choice = _choose(cfg, store)
        except UserError as exc:
            choice = ("error", str(exc))
    choice = broadcast_object(choice)
    kind = choice[0]
    if kind == "error":
        raise UserError(choice[1])
    if kind == "none":
        return None, None
    try:
        if kind == "meta":
            return TrainState.load(store.obtain(choice[1])), store.url(choice[1]["name"])
        return TrainState.load(ck.fetch_any(choice[1], str(Path(store.local, "downloads")))), choice[1]
    except (ValueError, RuntimeError) as exc:
        where = store.url(choice[1]["name"]) if kind == "meta" else choice[1]
        raise UserError(f"cannot resume from {where}: {exc}") from None


def check_compatible(state: TrainState, cfg: TrainConfig, manifest: mf.Manifest, where: str) -> None:
    """UserError unless ``state`` continues a run of --arch on the shards of --data."""
    state.check_compatible(arch=cfg.arch, wnids=[c.wnid for c in manifest.classes],
                           fingerprint=manifest.build_args.get("fingerprint"), data=cfg.data, where=where)
