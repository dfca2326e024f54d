"""How a run ends early, the same way on every rank: an interruption (SIGTERM, spot notice)
waits for rank 0's checkpoint and exits 75; a lost lease writes nothing more and exits 77.

    if res.interrupted and (lost := lease_lost(dinfo, store)):
        return exit_lease_lost(dinfo, store, logger, lost)
    if res.interrupted:
        return exit_interrupted(step, store, dinfo, logger, watcher.reason)

(Called by trainer/train.py, which ``python -m trainer`` runs.)
"""
from __future__ import annotations

from common.errors import EXIT_LEASE_LOST
from trainer import checkpoint as ck
from trainer.distributed import DistInfo, any_rank, barrier, broadcast_object
from trainer.engine import StepState
from trainer.spot import EXIT_INTERRUPTED, report_exit


def exit_interrupted(s: StepState, store: ck.CheckpointStore, dinfo: DistInfo, logger, reason) -> int:
    """After a stop agreed at step ``s``: wait until rank 0's checkpoint of that step is complete
    (on S3: uploaded and verified), then exit 75 on every rank; exit 1 if it could not be saved.

    No rank may exit before: torchrun SIGTERMs the others (and SIGKILLs them 30 s later) as
    soon as one worker exits. The log says "saved" only once it is.
    """
    url = store.url(ck.checkpoint_name(s.epoch, s.step_in_epoch))
    logger.warning(f"interrupted ({reason or 'another rank'}) after epoch {s.epoch + 1} step {s.step_in_epoch}: "
                   f"waiting for checkpoint {url}")
    error = None
    if dinfo.is_main:
        try:
            store.wait()
        except Exception as exc:  # noqa: BLE001 - reported to every rank, then raised
            error = f"{type(exc).__name__}: {exc}"
    error = broadcast_object(error)  # also the barrier: every rank waits for rank 0's upload
    if error:
        raise RuntimeError(f"the interruption checkpoint {url} was not saved ({error})")
    logger.warning(f"checkpoint {url} saved and verified; exiting with {EXIT_INTERRUPTED}: rerun to resume")
    report_exit(EXIT_INTERRUPTED, reason)  # torchrun turns our 75 into its 1
    return EXIT_INTERRUPTED


def lease_lost(dinfo: DistInfo, store: ck.CheckpointStore) -> str | None:
    """On every rank: why rank 0 lost the run folder's lease (renewed now), or None. Two tiny
    collectives at most, so all ranks take the same decision at the same point."""
    lost = dinfo.is_main and store.lease is not None and not store.may_write()
    if not any_rank([lost], dinfo.device)[0]:
        return None
    return broadcast_object(store.lease.lost if dinfo.is_main else None)


def exit_lease_lost(dinfo: DistInfo, store: ck.CheckpointStore, logger, reason: str) -> int:
    """Another trainer took over --output: write nothing more and exit EXIT_LEASE_LOST everywhere."""
    if dinfo.is_main:
        store.abandon()
    barrier()
    logger.error(f"{reason}: stopped writing (no further checkpoint, latest.json left to the new holder); "
                 f"exiting {EXIT_LEASE_LOST}: do not rerun here (the other trainer continues this run)")
    report_exit(EXIT_LEASE_LOST, reason)
    return EXIT_LEASE_LOST
