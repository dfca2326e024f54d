"""Train a classifier on the shards: one process, or DDP under torchrun (multi-node capable).

    python -m trainer --data demo-out/shards --output runs/demo --arch resnet18 --epochs 3 --device cpu
    torchrun --nproc_per_node=8 -m trainer --data s3://bucket/in-10pct --output s3://bucket/runs/r50
    torchrun --nnodes 2 --nproc_per_node 8 --rdzv-backend c10d --rdzv-endpoint HOST:29400 -m trainer ...

Exit codes: 0 finished, 75 interrupted on purpose (SIGTERM or an EC2 spot notice; a
checkpoint was saved and uploaded: rerun the same command to resume), 2 bad input, 1 other.
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
from common.errors import UserError
from trainer import checkpoint as ck
from trainer import plan as planlib
from trainer.config import TrainConfig, parse_config
from trainer.data import LoaderConfig, RunLoader
from trainer.distributed import DistInfo, barrier, broadcast_buffers, broadcast_object, setup, teardown
from trainer.engine import Amp, Engine, StepState
from trainer.metrics import RunFiles
from trainer.model import build_model, load_pretrained, param_groups, unwrap
from trainer.presets import IMAGENET_MEAN, IMAGENET_STD
from trainer.spot import EXIT_COMPLETED, EXIT_INTERRUPTED, InterruptWatcher, report_exit

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
    dinfo = setup(cfg.device)
    store = None
    try:
        if cfg.deterministic:
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = not cfg.deterministic
        manifest = mf.load(cfg.data)
        local = local_dir_for(cfg)
        store = ck.CheckpointStore(cfg.output, local, cfg.keep_last)
        state, resumed_from = resolve_resume(cfg, store, dinfo)
        if state is not None:
            check_compatible(state, cfg, manifest, resumed_from)
        start = StepState(state["epoch"], state["step_in_epoch"], state["global_step"]) if state else StepState(0, 0, 0)
        run_files = RunFiles(cfg.output, local, dinfo.is_main)
        logger = run_files.start(cfg.to_json(), resume_epoch=start.epoch)
        return _train(cfg, dinfo, manifest, store, run_files, logger, state, resumed_from, start)
    finally:
        if store is not None:
            store.close()
        teardown()


def _train(cfg, dinfo, manifest, store, run_files, logger, state, resumed_from, start: StepState) -> int:
    W, B = dinfo.world_size, cfg.batch_size
    global_batch = cfg.global_batch or (state["global_batch"] if state else B * W)
    if global_batch % (B * W):
        raise UserError(f"global batch {global_batch} is not a multiple of --batch-size {B} x {W} processes: "
                        "pick a --batch-size that divides it")
    accum = global_batch // (B * W)
    n_train = manifest.split("train").num_samples
    steps = planlib.steps_per_epoch(n_train, world_size=W, batch_size=B, accum=accum)
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
                        num_workers=cfg.workers, seed=cfg.seed, cache_dir=cfg.cache_dir,
                        pin_memory=dinfo.device.type == "cuda", with_keys=cfg.sample_log)
    loaders = RunLoader(lcfg, rank=dinfo.rank, world_size=W, manifest=manifest)  # workers live for the run
    best = state.get("best_top1", 0.0) if state else 0.0
    logger.info(f"{cfg.arch} on {manifest.num_classes} classes, {n_train} train images; {W} process(es) on "
                f"{dinfo.device.type}, batch {B} x {W} x accum {accum} = {global_batch}, lr {peak_lr:g}, "
                f"amp {amp.name}, {steps} steps/epoch"
                + (f"; resumed from {resumed_from} at epoch {start.epoch + 1} step {start.step_in_epoch}"
                   if state else ""))

    def snapshot(s: StepState) -> dict:
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
                "best_top1": best}

    # One poller per node (each node gets its own spot notice); every rank handles SIGTERM.
    watcher = InterruptWatcher(poll_imds=None if dinfo.local_rank == 0 else False,
                               poll_interval_s=cfg.imds_poll_seconds)
    watcher.start()
    s = start
    try:
        while s.epoch < cfg.epochs:
            last_save = time.monotonic()

            def checkpoint_due(step: int) -> bool:
                by_steps = cfg.checkpoint_every_steps and step % cfg.checkpoint_every_steps == 0
                by_time = dinfo.is_main and time.monotonic() - last_save >= cfg.checkpoint_interval_minutes * 60
                return bool(by_steps or by_time)

            def save_mid_epoch() -> None:
                nonlocal last_save
                if dinfo.is_main:
                    store.save(snapshot(s), ck.checkpoint_name(s.epoch, s.step_in_epoch))
                last_save = time.monotonic()

            loader = loaders.train_epoch(s.epoch, start_batch=s.step_in_epoch * accum)
            bar = _progress_bar(dinfo, s, steps, global_batch)
            with _sample_log(cfg, store.local, s.epoch, dinfo.rank) as sample_log:
                res = engine.train_epoch(loader, s, stop_after=steps, should_stop=watcher.requested,
                                         checkpoint_due=checkpoint_due, on_checkpoint=save_mid_epoch,
                                         progress=bar.update if bar else None, check_sync_every=cfg.check_sync_every,
                                         sample_log=sample_log)
            if bar:
                bar.close()
            if res.interrupted:
                logger.warning(f"interrupted ({watcher.reason or 'another rank'}) at epoch {s.epoch + 1} step "
                               f"{s.step_in_epoch}: checkpoint saved; waiting for its upload")
                if dinfo.is_main:
                    store.wait()
                # No rank may exit before the upload is done: torchrun SIGTERMs the others (and
                # SIGKILLs them 30 s later) as soon as one worker exits.
                barrier()
                logger.warning(f"checkpoint complete; exiting with {EXIT_INTERRUPTED}: rerun to resume")
                report_exit(EXIT_INTERRUPTED, watcher.reason)  # torchrun turns our 75 into its 1
                return EXIT_INTERRUPTED
            broadcast_buffers(unwrap(wrapped))
            val = engine.evaluate(unwrap(wrapped), loaders.val(), manifest.split("val").num_samples)
            s.epoch, s.step_in_epoch = s.epoch + 1, 0
            record = {"epoch": s.epoch, "train_loss": res.loss, "train_top1": res.top1, **val,
                      "lr": optimizer.param_groups[0]["lr"], "train_images_per_s": res.samples / max(res.seconds, 1e-9),
                      "train_images_per_s_per_process": res.samples / max(res.seconds, 1e-9) / W,
                      "data_wait_fraction": res.data_wait / max(res.seconds, 1e-9),
                      "train_skipped": res.skipped, "seconds": res.seconds, "global_step": s.global_step,
                      "sync_checks": res.sync_checks}
            logger.info(f"epoch {s.epoch}/{cfg.epochs}: train loss {res.loss:.4f} top-1 {res.top1:.2f}% | val loss "
                        f"{val['val_loss']:.4f} top-1 {val['val_top1']:.2f}% top-5 {val['val_top5']:.2f}% "
                        f"({val['val_count']} images) | {record['train_images_per_s']:.0f} img/s, data wait "
                        f"{100 * record['data_wait_fraction']:.1f}%, skipped {res.skipped + val['val_skipped']}")
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
        watcher.stop()
        loaders.close()


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
        self.bar.update(1)
        rate = (s.step_in_epoch - self.n0) * self.global_batch / max(1e-9, time.perf_counter() - self.t0)
        self.bar.set_postfix_str(f"loss {loss:.3f} acc {top1:.1f}% {rate:.0f} img/s lr {lr:.3g}")

    def close(self) -> None:
        self.bar.close()


def _progress_bar(dinfo: DistInfo, s: StepState, steps: int, global_batch: int):
    """tqdm on rank 0 when attached to a terminal (logs get the per-epoch summary instead)."""
    if dinfo.is_main and sys.stderr.isatty():
        return _Bar(steps, s.step_in_epoch, f"epoch {s.epoch + 1}", global_batch)
    return None


def main(argv: list[str] | None = None) -> int:
    try:
        return train(parse_config(argv))
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
