"""Train a classifier on the shards: one process, or DDP under torchrun (multi-node capable).

    python -m trainer --data demo-out/shards --output runs/demo --arch resnet18 --epochs 3 --device cpu
    torchrun --nproc_per_node=8 -m trainer --data s3://bucket/in-10pct --output s3://bucket/runs/r50
    torchrun --nnodes 2 --nproc_per_node 8 --rdzv-backend c10d --rdzv-endpoint HOST:29400 -m trainer ...

Exit codes: 0 finished, 75 interrupted on purpose (SIGTERM or an EC2 spot notice; a
checkpoint was saved and uploaded: rerun the same command to resume), 76 the hang watchdog
fired (no progress for --hang-timeout-minutes; thread stacks in the log; rerun resumes from
the last checkpoint), 77 the lease was taken over (this run stopped writing; do not rerun
here), 2 bad input or another trainer holds --output's lease, 1 other.
"""
from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from common import manifest as mf
from common import storage
from common.errors import EXIT_LEASE_LOST, UserError
from common.lease import Lease, LeaseLost
from trainer import checkpoint as ck
from trainer import plan as planlib
from trainer.config import TrainConfig, parse_config
from trainer.data import LoaderConfig, RunLoader
from trainer.distributed import DistInfo, any_rank, barrier, broadcast_buffers, broadcast_object, setup, teardown
from trainer.engine import Amp, Engine, StepState
from trainer.metrics import RunFiles
from trainer.model import build_model, load_pretrained, param_groups, unwrap
from trainer.presets import IMAGENET_MEAN, IMAGENET_STD
from trainer.spot import EXIT_COMPLETED, EXIT_INTERRUPTED, InterruptWatcher, report_exit
from trainer.watchdog import HangWatchdog, collective_timeout_minutes

log = logging.getLogger("trainer")


def local_dir_for(cfg: TrainConfig) -> str:
    if not storage.is_s3(cfg.output):
        return str(Path(cfg.output).expanduser())
    if cfg.local_dir:
        return cfg.local_dir
    return str(Path(tempfile.gettempdir(), "imagenet-spot-" + hashlib.sha256(cfg.output.encode()).hexdigest()[:12]))


def resolve_resume(cfg: TrainConfig, store: ck.CheckpointStore, dinfo: DistInfo) -> tuple[dict | None, str | None]:
    """(checkpoint state, where it came from). Rank 0 checks the output and chooses; its
    errors are broadcast so every rank fails the same way (none waits forever); every rank
    then loads exactly the bytes rank 0 verified (checked against the record's sha256)."""
    choice: tuple = ("none",)
    if dinfo.is_main:
        try:
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
            return ck.load_checkpoint(store.obtain(choice[1])), store.url(choice[1]["name"])
        return ck.load_checkpoint(ck.fetch_any(choice[1], str(Path(store.local, "downloads")))), choice[1]
    except (ValueError, RuntimeError) as exc:
        where = store.url(choice[1]["name"]) if kind == "meta" else choice[1]
        raise UserError(f"cannot resume from {where}: {exc}") from None


def check_compatible(state: dict, cfg: TrainConfig, manifest: mf.Manifest, where: str) -> None:
    if state["arch"] != cfg.arch:
        raise UserError(f"{where} is a {state['arch']} checkpoint, not --arch {cfg.arch}: pass the same --arch "
                        "or start a new --output")
    if [c["wnid"] for c in state["classes"]] != [c.wnid for c in manifest.classes]:
        raise UserError(f"{where} was trained on a different class list than {cfg.data}: resume with the same "
                        "shards, or start a new --output")
    if state["data"].get("fingerprint") != manifest.build_args.get("fingerprint"):
        raise UserError(f"{where} was trained on a different shard build than {cfg.data}: resume with the same "
                        "shards, or start a new --output")


def train(cfg: TrainConfig) -> int:
    dinfo = setup(cfg.device, timeout_minutes=collective_timeout_minutes(cfg.hang_timeout_minutes,
                                                                         cfg.hang_first_step_minutes))
    store = None
    lease = Lease(cfg.output, cfg.lease_seconds, what="trainer") if dinfo.is_main else None  # lease
    try:
        if cfg.deterministic:
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = not cfg.deterministic
        manifest = mf.load(cfg.data)
        local = local_dir_for(cfg)
        store = ck.CheckpointStore(cfg.output, local, cfg.keep_last, lease=lease)
        state, resumed_from = resolve_resume(cfg, store, dinfo)
        if state is not None:
            check_compatible(state, cfg, manifest, resumed_from)
        start = StepState(state["epoch"], state["step_in_epoch"], state["global_step"]) if state else StepState(0, 0, 0)
        run_files = RunFiles(cfg.output, local, dinfo.is_main)
        logger = run_files.start(cfg.to_json(), resume_epoch=start.epoch)
        return _train(cfg, dinfo, manifest, store, run_files, logger, state, resumed_from, start)
    finally:
        try:
            if store is not None:
                store.close()
        finally:
            if lease is not None:
                lease.release()  # lease: a clean exit (0, 75) lets a rerun start at once; no-op once lost
            teardown()


def _train(cfg, dinfo, manifest, store, run_files, logger, state, resumed_from, start: StepState) -> int:
    W, B = dinfo.world_size, cfg.batch_size
    global_batch = cfg.global_batch or (state["global_batch"] if state else B * W)
    if global_batch % (B * W):
        raise UserError(f"global batch {global_batch} is not a multiple of --batch-size {B} x {W} processes: "
                        "pick a --batch-size that divides it")
    accum = global_batch // (B * W)
    n_train = manifest.split("train").num_samples
    # The partial last global batch is dropped: steps, LR and samples per step do not depend
    # on (world size, accum) for a given global batch (trainer/plan.py).
    steps = planlib.steps_per_epoch(n_train, world_size=W, batch_size=B, accum=accum, drop_last=True)
    if steps == 0:
        raise UserError(f"the train split has {n_train} images, fewer than one global batch of {global_batch}: "
                        "lower --batch-size / --global-batch")
    if cfg.limit_train_steps:
        steps = min(steps, cfg.limit_train_steps)
    total_steps = steps * cfg.epochs
    warmup_steps = round(cfg.warmup_epochs * steps)
    peak_lr = cfg.lr * global_batch / 256

    torch.manual_seed(cfg.seed)
    model = build_model(cfg.arch, manifest.num_classes, cfg.zero_init_residual)
    if state is not None:
        model.load_state_dict(state["model"])
    elif cfg.pretrained:
        logger.info(f"pretrained weights: {load_pretrained(model, cfg.arch, manifest.classes, cfg.pretrained)}")
    memory_format = torch.channels_last if cfg.channels_last else torch.contiguous_format
    model = model.to(dinfo.device, memory_format=memory_format)
    optimizer = torch.optim.SGD(param_groups(model, cfg.weight_decay), lr=peak_lr, momentum=cfg.momentum,
                                nesterov=cfg.nesterov)
    amp = Amp.create(cfg.amp, dinfo.device)
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
        amp.scaler.load_state_dict(state["scaler"])
        torch.set_rng_state(state["rng"]["torch"])
        if dinfo.device.type == "cuda" and state["rng"]["cuda"]:
            torch.cuda.set_rng_state(state["rng"]["cuda"][min(dinfo.local_rank, len(state["rng"]["cuda"]) - 1)])
    wrapped = DDP(model, device_ids=[dinfo.local_rank] if dinfo.device.type == "cuda" else None) if W > 1 else model
    if cfg.compile:
        wrapped = torch.compile(wrapped)
    engine = Engine(model=wrapped, optimizer=optimizer, amp=amp, dist=dinfo, label_smoothing=cfg.label_smoothing,
                    color_jitter=cfg.color_jitter, channels_last=cfg.channels_last, seed=cfg.seed,
                    total_steps=total_steps, warmup_steps=warmup_steps, peak_lr=peak_lr)
    lcfg = LoaderConfig(cfg.data, batch_size=B, accum=accum, image_size=cfg.image_size, val_resize=cfg.val_resize,
                        num_workers=cfg.workers, seed=cfg.seed, cache_dir=cfg.cache_dir, drop_last=True,
                        pin_memory=dinfo.device.type == "cuda", with_keys=cfg.sample_log,
                        decode=cfg.decode, decode_device=str(dinfo.device),
                        # a silent worker is an error only after the watchdog had its chance
                        worker_timeout_s=60 * collective_timeout_minutes(cfg.hang_timeout_minutes,
                                                                         cfg.hang_first_step_minutes))
    loaders = RunLoader(lcfg, rank=dinfo.rank, world_size=W, manifest=manifest)  # workers live for the run
    best = state.get("best_top1", 0.0) if state else 0.0
    logger.info(f"{cfg.arch} on {manifest.num_classes} classes, {n_train} train images; {W} process(es) on "
                f"{dinfo.device.type}, batch {B} x {W} x accum {accum} = {global_batch}, lr {peak_lr:g}, "
                f"amp {amp.name}, {steps} steps/epoch"
                + (f"; resumed from {resumed_from} at epoch {start.epoch + 1} step {start.step_in_epoch}"
                   if state else ""))

    def snapshot(s: StepState, epoch_sums: list[float] | None = None) -> dict:
        return {"format": ck.FORMAT, "version": 1, "arch": cfg.arch, "model": unwrap(wrapped).state_dict(),
                "optimizer": optimizer.state_dict(), "scaler": amp.scaler.state_dict(),
                "scheduler": {"global_step": s.global_step, "total_steps": total_steps, "warmup_steps": warmup_steps,
                              "peak_lr": peak_lr},
                "epoch": s.epoch, "step_in_epoch": s.step_in_epoch, "global_step": s.global_step,
                "global_batch": global_batch, "world_size": W, "accum": accum,
                "rng": {"torch": torch.get_rng_state(),
                        "cuda": torch.cuda.get_rng_state_all() if dinfo.device.type == "cuda" else []},
                "config": cfg.to_dict(), "classes": [asdict(c) for c in manifest.classes],
                "data": {"root": cfg.data, "fingerprint": manifest.build_args.get("fingerprint"), "num_train": n_train},
                "best_top1": best, "epoch_sums": epoch_sums}

    # One poller per node (each node gets its own spot notice); every rank handles SIGTERM.
    watcher = InterruptWatcher(poll_imds=None if dinfo.local_rank == 0 else False,
                               poll_interval_s=cfg.imds_poll_seconds)
    watcher.start()
    dog = HangWatchdog(cfg.hang_timeout_minutes * 60, cfg.hang_first_step_minutes * 60, log_path=run_files.log_path,
                       on_fire=_log_uploader(cfg, run_files.log_path))
    engine.heartbeat = dog.beat
    dog.start()  # the first step after this start (or resume) gets the long allowance
    first_eval = True
    if store.lease is not None:  # lease: renewed every --lease-seconds/3; a takeover stops training
        store.lease.start_renewing(on_lost=watcher.request)
    s = start
    try:
        while s.epoch < cfg.epochs:
            last_save = time.monotonic()

            def checkpoint_due(step: int) -> bool:
                by_steps = cfg.checkpoint_every_steps and step % cfg.checkpoint_every_steps == 0
                by_time = dinfo.is_main and time.monotonic() - last_save >= cfg.checkpoint_interval_minutes * 60
                return bool(by_steps or by_time)

            def save_mid_epoch(epoch_sums: list[float]) -> None:
                nonlocal last_save
                if dinfo.is_main and not (store.lease and store.lease.lost):  # lease: no save once lost
                    store.save(snapshot(s, epoch_sums), ck.checkpoint_name(s.epoch, s.step_in_epoch))
                last_save = time.monotonic()

            # A run resumed mid-epoch carries the epoch's metric sums so far (on one rank).
            carry = state.get("epoch_sums") if state and dinfo.is_main and s.step_in_epoch else None

            loader = loaders.train_epoch(s.epoch, start_batch=s.step_in_epoch * accum)
            report, bar = _progress(dinfo, logger, s, steps, global_batch)
            with _sample_log(cfg, store.local, s.epoch, dinfo.rank) as sample_log:
                res = engine.train_epoch(loader, s, stop_after=steps, should_stop=watcher.requested,
                                         checkpoint_due=checkpoint_due, on_checkpoint=save_mid_epoch,
                                         progress=report, check_sync_every=cfg.check_sync_every,
                                         sample_log=sample_log, log_every=cfg.log_every_steps, carry=carry)
            if bar:
                bar.close()
            if res.interrupted and (lost := _lease_lost(dinfo, store)):  # lease
                return _exit_lease_lost(dinfo, store, logger, lost)
            if res.interrupted:
                return _exit_interrupted(s, store, dinfo, logger, watcher.reason)
            broadcast_buffers(unwrap(wrapped))
            if first_eval:  # its first batch may start workers and warm caches: the long allowance
                dog.expect_slow("first evaluation batch")
                first_eval = False
            val = engine.evaluate(unwrap(wrapped), loaders.val(), manifest.split("val").num_samples)
            s.epoch, s.step_in_epoch = s.epoch + 1, 0
            record = {"epoch": s.epoch, "train_loss": res.loss, "train_top1": res.top1, **val,
                      "lr": optimizer.param_groups[0]["lr"], "train_images_per_s": res.samples / max(res.seconds, 1e-9),
                      "train_images_per_s_per_process": res.samples / max(res.seconds, 1e-9) / W,
                      "data_wait_fraction": res.data_wait / max(res.seconds, 1e-9),
                      "train_skipped": res.skipped, "seconds": res.seconds, "global_step": s.global_step,
                      "sync_checks": res.sync_checks, "host_reads": res.host_reads}
            logger.info(f"epoch {s.epoch}/{cfg.epochs}: train loss {res.loss:.4f} top-1 {res.top1:.2f}% | val loss "
                        f"{val['val_loss']:.4f} top-1 {val['val_top1']:.2f}% top-5 {val['val_top5']:.2f}% "
                        f"({val['val_count']} images) | {record['train_images_per_s']:.0f} img/s, data wait "
                        f"{100 * record['data_wait_fraction']:.1f}%, skipped {res.skipped + val['val_skipped']}")
            if lost := _lease_lost(dinfo, store):  # lease: checked (renewed) before the epoch's checkpoint
                return _exit_lease_lost(dinfo, store, logger, lost)
            if dinfo.is_main:
                is_best = val["val_top1"] >= best
                best = max(best, val["val_top1"])
                store.save(snapshot(s), ck.checkpoint_name(s.epoch, 0))
                if is_best:
                    store.save_best(best_weights(unwrap(wrapped), cfg, manifest, s.epoch, val))
                run_files.add_epoch(record)
        logger.info(f"training complete: best val top-1 {best:.2f}%; outputs in {cfg.output}")
        report_exit(EXIT_COMPLETED)
        return EXIT_COMPLETED
    finally:
        dog.stop()
        watcher.stop()
        loaders.close()


def _log_uploader(cfg: TrainConfig, log_path: Path | None):
    """What the watchdog runs (bounded) before it exits: copy the log, stacks included, to an s3:// output."""
    if log_path is None or not storage.is_s3(cfg.output):
        return None
    return lambda: storage.upload_file(log_path, storage.join(cfg.output, log_path.name))


def _exit_interrupted(s: StepState, store: ck.CheckpointStore, dinfo: DistInfo, logger, reason) -> int:
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


def _lease_lost(dinfo: DistInfo, store: ck.CheckpointStore) -> str | None:
    """On every rank: why rank 0 lost the run folder's lease (renewed now), or None. Two tiny
    collectives at most, so all ranks take the same decision at the same point."""
    lost = dinfo.is_main and store.lease is not None and not store.may_write()
    if not any_rank([lost], dinfo.device)[0]:
        return None
    return broadcast_object(store.lease.lost if dinfo.is_main else None)


def _exit_lease_lost(dinfo: DistInfo, store: ck.CheckpointStore, logger, reason: str) -> int:
    """Another trainer took over --output: write nothing more and exit EXIT_LEASE_LOST everywhere."""
    if dinfo.is_main:
        store.abandon()
    barrier()
    logger.error(f"{reason}: stopped writing (no further checkpoint, latest.json left to the new holder); "
                 f"exiting {EXIT_LEASE_LOST}: do not rerun here (the other trainer continues this run)")
    report_exit(EXIT_LEASE_LOST, reason)
    return EXIT_LEASE_LOST


def _sample_log(cfg: TrainConfig, local: Path, epoch: int, rank: int):
    """Append-mode audit file of the keys each rank trained on (a resumed run appends)."""
    if not cfg.sample_log:
        return contextlib.nullcontext(None)
    path = Path(local, "samples", f"epoch{epoch + 1:03d}_rank{rank}.jsonl")
    path.parent.mkdir(parents=True, exist_ok=True)
    return open(path, "a", buffering=1)  # line-buffered: readable while training runs


def best_weights(model, cfg: TrainConfig, manifest: mf.Manifest, epoch: int, val: dict) -> dict:
    """The small model_best.pth: what predict needs, nothing more."""
    return {"format": "imagenet-spot-weights", "arch": cfg.arch, "model": model.state_dict(),
            "classes": [asdict(c) for c in manifest.classes],
            "normalization": {"mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)},
            "image_size": cfg.image_size, "val_resize": cfg.val_resize, "epoch": epoch,
            "val_top1": val["val_top1"], "val_top5": val["val_top5"]}


class _Bar:
    def __init__(self, total: int, initial: int, desc: str, global_batch: int):
        from tqdm import tqdm

        self.bar = tqdm(total=total, initial=initial, desc=desc, unit="step", dynamic_ncols=True, leave=False)
        self.t0, self.n0, self.global_batch = time.perf_counter(), initial, global_batch

    def update(self, s: StepState, loss: float, top1: float, lr: float) -> None:
        self.bar.update(s.step_in_epoch - self.bar.n)
        rate = (s.step_in_epoch - self.n0) * self.global_batch / max(1e-9, time.perf_counter() - self.t0)
        self.bar.set_postfix_str(f"loss {loss:.3f} acc {top1:.1f}% {rate:.0f} img/s lr {lr:.3g}")

    def close(self) -> None:
        self.bar.close()


def _progress(dinfo: DistInfo, logger, s: StepState, steps: int, global_batch: int):
    """(report, bar): rank 0's report every --log-every-steps steps (a log line, and a tqdm bar
    when attached to a terminal); (None, None) on the other ranks, which then read nothing."""
    if not dinfo.is_main:
        return None, None
    bar = _Bar(steps, s.step_in_epoch, f"epoch {s.epoch + 1}", global_batch) if sys.stderr.isatty() else None

    def report(st: StepState, loss: float, top1: float, lr: float) -> None:
        logger.info(f"epoch {st.epoch + 1} step {st.step_in_epoch}/{steps}: loss {loss:.4f} top-1 {top1:.2f}% "
                    f"(rank 0, running) lr {lr:.4g}")
        if bar:
            bar.update(st, loss, top1, lr)

    return report, bar


def main(argv: list[str] | None = None) -> int:
    from common import cli

    def record(exc: UserError) -> None:
        if isinstance(exc, LeaseLost):  # lease: e.g. lost while the last uploads finished
            report_exit(exc.exit_code, str(exc))

    return cli.run(lambda: train(parse_config(argv)), on_error=record)
