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

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from common import manifest as mf
from common import storage
from common.errors import UserError
from common.lease import Lease, LeaseLost
from trainer import checkpoint as ck
from trainer import sampling
from trainer.config import TrainConfig, parse_config
from trainer.distributed import DistInfo, broadcast_buffers, setup, teardown
from trainer.engine import Amp, Engine, EpochResult, StepState
from trainer.exits import exit_interrupted, exit_lease_lost, lease_lost
from trainer.loader import LoaderConfig, RunLoader
from trainer.model import build_model, load_pretrained, param_groups, unwrap
from trainer.resume import check_compatible, resolve_resume
from trainer.run_files import RunFiles, local_dir_for, progress, sample_log
from trainer.spot import EXIT_COMPLETED, InterruptWatcher, report_exit
from trainer.state import BestWeights, TrainState, classes_as_dicts, rng_state
from trainer.watchdog import HangWatchdog, collective_timeout_minutes

log = logging.getLogger("trainer")


def train(cfg: TrainConfig) -> int:
    """Set up the process group and the lease, resume or start, train; the exit code."""
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
        store = ck.CheckpointStore(cfg.output, local_dir_for(cfg.output, cfg.local_dir), cfg.keep_last, lease=lease)
        state, resumed_from = resolve_resume(cfg, store, dinfo)
        if state is not None:
            check_compatible(state, cfg, manifest, resumed_from)
        start = state.step if state is not None else StepState(0, 0, 0)
        run_files = RunFiles(cfg.output, store.local, dinfo.is_main)
        logger = run_files.start(cfg.to_json(), resume_epoch=start.epoch)
        return Run(cfg, dinfo, manifest, store, run_files, logger, state, resumed_from).loop(start)
    finally:
        try:
            if store is not None:
                store.close()
        finally:
            if lease is not None:
                lease.release()  # lease: a clean exit (0, 75) lets a rerun start at once; no-op once lost
            teardown()


@dataclass(frozen=True)
class Schedule:
    """Batch layout and LR schedule of a run (the same for any world size, given the global batch)."""

    global_batch: int
    accum: int
    steps: int          # optimizer steps per epoch
    total_steps: int
    warmup_steps: int
    peak_lr: float

    @classmethod
    def create(cls, cfg: TrainConfig, world_size: int, n_train: int, state: TrainState | None) -> "Schedule":
        B, W = cfg.batch_size, world_size
        global_batch = cfg.global_batch or (state.global_batch if state else B * W)
        if global_batch % (B * W):
            raise UserError(f"global batch {global_batch} is not a multiple of --batch-size {B} x {W} processes: "
                            "pick a --batch-size that divides it")
        accum = global_batch // (B * W)
        # The partial last global batch is dropped: steps, LR and samples per step do not depend
        # on (world size, accum) for a given global batch (trainer/sampling.py).
        steps = sampling.steps_per_epoch(n_train, world_size=W, batch_size=B, accum=accum, drop_last=True)
        if steps == 0:
            raise UserError(f"the train split has {n_train} images, fewer than one global batch of {global_batch}: "
                            "lower --batch-size / --global-batch")
        if cfg.limit_train_steps:
            steps = min(steps, cfg.limit_train_steps)
        return cls(global_batch, accum, steps, steps * cfg.epochs, round(cfg.warmup_epochs * steps),
                   cfg.lr * global_batch / 256)


class Run:
    """One training run, built in named steps (schedule, model, engine, loaders), then :meth:`loop`."""

    def __init__(self, cfg: TrainConfig, dinfo: DistInfo, manifest: mf.Manifest, store: ck.CheckpointStore,
                 run_files: RunFiles, logger, state: TrainState | None, resumed_from: str | None):
        self.cfg, self.dinfo, self.manifest, self.store = cfg, dinfo, manifest, store
        self.run_files, self.logger, self.state = run_files, logger, state
        self.n_train = manifest.split("train").num_samples
        self.sched = Schedule.create(cfg, dinfo.world_size, self.n_train, state)
        self._build_model()
        self._build_engine()
        self.loaders = RunLoader(self._loader_config(), rank=dinfo.rank, world_size=dinfo.world_size,
                                 manifest=manifest)  # workers live for the run
        self.best = state.best_top1 if state else 0.0
        self.s = StepState(0, 0, 0)
        self.last_save = time.monotonic()
        self.first_eval = True
        sc = self.sched
        logger.info(f"{cfg.arch} on {manifest.num_classes} classes, {self.n_train} train images; {dinfo.world_size} "
                    f"process(es) on {dinfo.device.type}, batch {cfg.batch_size} x {dinfo.world_size} x accum "
                    f"{sc.accum} = {sc.global_batch}, lr {sc.peak_lr:g}, amp {self.amp.name}, {sc.steps} steps/epoch"
                    + (f"; resumed from {resumed_from} at epoch {state.epoch + 1} step {state.step_in_epoch}"
                       if state else ""))

    def _build_model(self) -> None:
        """Model (restored, or pretrained weights), optimizer and AMP scaler; DDP/compile wrapping."""
        cfg, dinfo = self.cfg, self.dinfo
        torch.manual_seed(cfg.seed)
        model = build_model(cfg.arch, self.manifest.num_classes, cfg.zero_init_residual)
        if self.state is None and cfg.pretrained:
            self.logger.info(f"pretrained weights: "
                             f"{load_pretrained(model, cfg.arch, self.manifest.classes, cfg.pretrained)}")
        memory_format = torch.channels_last if cfg.channels_last else torch.contiguous_format
        model = model.to(dinfo.device, memory_format=memory_format)
        self.optimizer = torch.optim.SGD(param_groups(model, cfg.weight_decay), lr=self.sched.peak_lr,
                                         momentum=cfg.momentum, nesterov=cfg.nesterov)
        self.amp = Amp.create(cfg.amp, dinfo.device)
        if self.state is not None:
            self.state.restore(model, self.optimizer, self.amp.scaler, dinfo.device, dinfo.local_rank)
        wrapped = model
        if dinfo.world_size > 1:
            wrapped = DDP(model, device_ids=[dinfo.local_rank] if dinfo.device.type == "cuda" else None)
        self.wrapped = torch.compile(wrapped) if cfg.compile else wrapped

    def _build_engine(self) -> None:
        cfg, sc = self.cfg, self.sched
        self.engine = Engine(model=self.wrapped, optimizer=self.optimizer, amp=self.amp, dist=self.dinfo,
                             label_smoothing=cfg.label_smoothing, color_jitter=cfg.color_jitter,
                             channels_last=cfg.channels_last, seed=cfg.seed, total_steps=sc.total_steps,
                             warmup_steps=sc.warmup_steps, peak_lr=sc.peak_lr)

    def _loader_config(self) -> LoaderConfig:
        cfg, dinfo = self.cfg, self.dinfo
        return LoaderConfig(cfg.data, batch_size=cfg.batch_size, accum=self.sched.accum, image_size=cfg.image_size,
                            val_resize=cfg.val_resize, num_workers=cfg.workers, seed=cfg.seed,
                            cache_dir=cfg.cache_dir, drop_last=True, pin_memory=dinfo.device.type == "cuda",
                            with_keys=cfg.sample_log, decode=cfg.decode, decode_device=str(dinfo.device),
                            # a silent worker is an error only after the watchdog had its chance
                            worker_timeout_s=60 * collective_timeout_minutes(cfg.hang_timeout_minutes,
                                                                             cfg.hang_first_step_minutes))

    # ------------------------------------------------------------------ checkpoints
    def snapshot(self, epoch_sums: list[float] | None = None) -> dict:
        """The checkpoint of the current step (a plain dict, see trainer.state)."""
        cfg, sc, s, m = self.cfg, self.sched, self.s, self.manifest
        return TrainState(
            arch=cfg.arch, model=unwrap(self.wrapped).state_dict(), optimizer=self.optimizer.state_dict(),
            scaler=self.amp.scaler.state_dict(),
            scheduler={"global_step": s.global_step, "total_steps": sc.total_steps,
                       "warmup_steps": sc.warmup_steps, "peak_lr": sc.peak_lr},
            epoch=s.epoch, step_in_epoch=s.step_in_epoch, global_step=s.global_step, global_batch=sc.global_batch,
            world_size=self.dinfo.world_size, accum=sc.accum, rng=rng_state(self.dinfo.device),
            config=cfg.to_dict(), classes=classes_as_dicts(m.classes),
            data={"root": cfg.data, "fingerprint": m.build_args.get("fingerprint"), "num_train": self.n_train},
            best_top1=self.best, epoch_sums=epoch_sums).to_dict()

    def checkpoint_due(self, step: int) -> bool:
        """This rank's view: every --checkpoint-every-steps, or (rank 0) --checkpoint-interval-minutes."""
        cfg = self.cfg
        by_steps = cfg.checkpoint_every_steps and step % cfg.checkpoint_every_steps == 0
        by_time = self.dinfo.is_main and time.monotonic() - self.last_save >= cfg.checkpoint_interval_minutes * 60
        return bool(by_steps or by_time)

    def save_mid_epoch(self, epoch_sums: list[float]) -> None:
        store = self.store
        if self.dinfo.is_main and not (store.lease and store.lease.lost):  # lease: no save once lost
            store.save(self.snapshot(epoch_sums), ck.checkpoint_name(self.s.epoch, self.s.step_in_epoch))
        self.last_save = time.monotonic()

    # ------------------------------------------------------------------ the loop
    def loop(self, start: StepState) -> int:
        """Epochs from ``start`` to --epochs; the exit code (0, 75 interrupted, 77 lease lost)."""
        cfg, dinfo = self.cfg, self.dinfo
        # One poller per node (each node gets its own spot notice); every rank handles SIGTERM.
        self.watcher = InterruptWatcher(poll_imds=None if dinfo.local_rank == 0 else False,
                                        poll_interval_s=cfg.imds_poll_seconds)
        self.watcher.start()
        self.dog = HangWatchdog(cfg.hang_timeout_minutes * 60, cfg.hang_first_step_minutes * 60,
                                log_path=self.run_files.log_path, on_fire=_log_uploader(cfg, self.run_files.log_path))
        self.engine.heartbeat = self.dog.beat
        self.dog.start()  # the first step after this start (or resume) gets the long allowance
        if self.store.lease is not None:  # lease: renewed every --lease-seconds/3; a takeover stops training
            self.store.lease.start_renewing(on_lost=self.watcher.request)
        self.s = start
        try:
            while self.s.epoch < cfg.epochs:
                code = self._epoch()
                if code is not None:
                    return code
            self.logger.info(f"training complete: best val top-1 {self.best:.2f}%; outputs in {cfg.output}")
            report_exit(EXIT_COMPLETED)
            return EXIT_COMPLETED
        finally:
            self.dog.stop()
            self.watcher.stop()
            self.loaders.close()

    def _epoch(self) -> int | None:
        """Train the rest of the current epoch, validate, checkpoint; an exit code to stop with, or None."""
        res = self._train_epoch()
        if res.interrupted and (lost := lease_lost(self.dinfo, self.store)):  # lease
            return exit_lease_lost(self.dinfo, self.store, self.logger, lost)
        if res.interrupted:
            return exit_interrupted(self.s, self.store, self.dinfo, self.logger, self.watcher.reason)
        broadcast_buffers(unwrap(self.wrapped))
        if self.first_eval:  # its first batch may start workers and warm caches: the long allowance
            self.dog.expect_slow("first evaluation batch")
            self.first_eval = False
        val = self.engine.validate(unwrap(self.wrapped), self.loaders.val(), self.manifest.split("val").num_samples)
        self.s.epoch, self.s.step_in_epoch = self.s.epoch + 1, 0
        record = self._record(res, val)
        if lost := lease_lost(self.dinfo, self.store):  # lease: checked (renewed) before the epoch's checkpoint
            return exit_lease_lost(self.dinfo, self.store, self.logger, lost)
        if self.dinfo.is_main:
            self._save_epoch(val, record)
        return None

    def _train_epoch(self) -> EpochResult:
        cfg, dinfo, s, sc = self.cfg, self.dinfo, self.s, self.sched
        self.last_save = time.monotonic()
        # A run resumed mid-epoch carries the epoch's metric sums so far (on one rank).
        carry = self.state.epoch_sums if self.state and dinfo.is_main and s.step_in_epoch else None
        loader = self.loaders.train_epoch(s.epoch, start_batch=s.step_in_epoch * sc.accum)
        report, bar = progress(dinfo.is_main, self.logger, s, sc.steps, sc.global_batch)
        with sample_log(cfg.sample_log, self.store.local, s.epoch, dinfo.rank) as samples:
            res = self.engine.train_epoch(loader, s, stop_after=sc.steps, should_stop=self.watcher.requested,
                                          checkpoint_due=self.checkpoint_due, on_checkpoint=self.save_mid_epoch,
                                          progress=report, check_sync_every=cfg.check_sync_every,
                                          sample_log=samples, log_every=cfg.log_every_steps, carry=carry)
        if bar:
            bar.close()
        return res

    def _record(self, res: EpochResult, val: dict) -> dict:
        """The epoch's metrics.jsonl record, and its log line."""
        s, W, secs = self.s, self.dinfo.world_size, max(res.seconds, 1e-9)
        record = {"epoch": s.epoch, "train_loss": res.loss, "train_top1": res.top1, **val,
                  "lr": self.optimizer.param_groups[0]["lr"], "train_images_per_s": res.samples / secs,
                  "train_images_per_s_per_process": res.samples / secs / W,
                  "data_wait_fraction": res.data_wait / secs,
                  "train_skipped": res.skipped, "seconds": res.seconds, "global_step": s.global_step,
                  "sync_checks": res.sync_checks, "host_reads": res.host_reads}
        self.logger.info(f"epoch {s.epoch}/{self.cfg.epochs}: train loss {res.loss:.4f} top-1 {res.top1:.2f}% | val "
                         f"loss {val['val_loss']:.4f} top-1 {val['val_top1']:.2f}% top-5 {val['val_top5']:.2f}% "
                         f"({val['val_count']} images) | {record['train_images_per_s']:.0f} img/s, data wait "
                         f"{100 * record['data_wait_fraction']:.1f}%, skipped {res.skipped + val['val_skipped']}")
        return record

    def _save_epoch(self, val: dict, record: dict) -> None:
        """Rank 0: the end-of-epoch checkpoint, model_best.pth when val top-1 did not drop, metrics."""
        is_best = val["val_top1"] >= self.best
        self.best = max(self.best, val["val_top1"])
        self.store.save(self.snapshot(), ck.checkpoint_name(self.s.epoch, 0))
        if is_best:
            cfg = self.cfg
            self.store.save_best(BestWeights(
                arch=cfg.arch, model=unwrap(self.wrapped).state_dict(),
                classes=classes_as_dicts(self.manifest.classes), image_size=cfg.image_size,
                val_resize=cfg.val_resize, epoch=self.s.epoch, val_top1=val["val_top1"],
                val_top5=val["val_top5"]).to_dict())
        self.run_files.add_epoch(record)


def _log_uploader(cfg: TrainConfig, log_path: Path | None):
    """What the watchdog runs (bounded) before it exits: copy the log, stacks included, to an s3:// output."""
    if log_path is None or not storage.is_s3(cfg.output):
        return None
    return lambda: storage.upload_file(log_path, storage.join(cfg.output, log_path.name))


def main(argv: list[str] | None = None) -> int:
    from common import cli

    def record(exc: UserError) -> None:
        if isinstance(exc, LeaseLost):  # lease: e.g. lost while the last uploads finished
            report_exit(exc.exit_code, str(exc))

    return cli.run(lambda: train(parse_config(argv)), on_error=record)
