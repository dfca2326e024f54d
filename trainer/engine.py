"""One epoch of training and one pass of evaluation, for any world size and accumulation.

    engine = Engine(model=ddp_model, optimizer=opt, amp=Amp.create("auto", device), dist=dinfo, ...)
    res = engine.train_epoch(loader, state, stop_after=steps, should_stop=watcher.requested,
                             checkpoint_due=due, on_checkpoint=save, log_every=50)
    val = engine.validate(model, val_loader, expected=num_val)

(``python -m trainer --data ... --output ...`` drives it, see trainer/train.py.)

One AMP path: ``torch.autocast(..., enabled=amp)`` and ``GradScaler(enabled=fp16)``.

No host sync per step: the loss sum and top-1 hits accumulate in a device tensor, read (one
``.tolist()``, counted by :class:`HostReads`) every ``log_every`` steps, at a checkpoint and
once at the end of the epoch (after one all_reduce); evaluation reads once, at its end.
Sample and skip counts are known on the host and need no read. (``--check-sync-every``, a
debugging aid, and fp16's GradScaler do read every step or N steps.)

Stop/checkpoint agreement, one step late: after optimizer step t every rank launches an
asynchronous all_reduce(MAX) of two CPU flags (stop requested here; checkpoint due at step
t+1), on the default group under gloo and on a side gloo group under NCCL, so it never touches
the GPU, and goes on with step t+1. After step t+1 it takes the result (long done by then), and
every rank stops or checkpoints after that same step t+1; the flags for an epoch's first step
are launched before it. The epoch's last step agrees synchronously instead (the pending result
is taken, then one all_reduce of the stop flag), so a stop seen during the last step is acted
on there and nothing is pending when the epoch ends. A stop is thus acted on at most two
optimizer steps after it is seen (a spot notice: plus the IMDS poll interval, 5 s): with steps
shorter than ~10 s, more than 90 s of EC2's 120 s notice remain for the checkpoint.

A stop agreed on any step, the epoch's last included, calls ``on_checkpoint``: the resumed run
continues right after that step. The checkpoint carries the epoch's metric sums so far, so the
epoch's metrics cover the whole epoch after a resume too.
"""
from __future__ import annotations

import contextlib
import json
import math
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn

from trainer.distributed import DistInfo, assert_same_weights
from trainer.presets import DeviceColorJitter, DeviceNormalize, jitter_generator


def lr_at(global_step: int, total_steps: int, warmup_steps: int, peak_lr: float) -> float:
    """Linear warmup to ``peak_lr`` over ``warmup_steps``, then cosine to 0 at ``total_steps``."""
    if global_step < warmup_steps:
        return peak_lr * (global_step + 1) / warmup_steps
    progress = (global_step - warmup_steps) / max(1, total_steps - warmup_steps)
    return peak_lr * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


@dataclass
class Amp:
    """The precision settings of the one code path."""

    enabled: bool
    dtype: torch.dtype
    scaler: torch.amp.GradScaler

    @classmethod
    def create(cls, mode: str, device: torch.device) -> "Amp":
        if mode == "auto":
            mode = ("bf16" if torch.cuda.is_bf16_supported() else "fp16") if device.type == "cuda" else "off"
        dtype = torch.float16 if mode == "fp16" else torch.bfloat16
        return cls(mode != "off", dtype, torch.amp.GradScaler(device.type, enabled=mode == "fp16"))

    @property
    def name(self) -> str:
        return "off" if not self.enabled else ("fp16" if self.dtype == torch.float16 else "bf16")


@dataclass
class StepState:
    """Where training is: what a checkpoint records (all plain ints)."""

    epoch: int
    step_in_epoch: int
    global_step: int


@dataclass
class EpochResult:
    interrupted: bool = False
    loss: float = 0.0         # whole epoch (sums carried over a resume), all ranks
    top1: float = 0.0
    samples: int = 0          # trained by this run in this epoch, all ranks (for img/s)
    seconds: float = 0.0
    data_wait: float = 0.0
    skipped: int = 0
    sync_checks: int = 0
    host_reads: int = 0       # device -> host reads of metric scalars on this rank


class HostReads:
    """Counts device -> host reads of metric scalars: each one makes the host wait for the device."""

    def __init__(self) -> None:
        self.count = 0

    def __call__(self, t: torch.Tensor) -> list:
        self.count += 1
        return t.tolist()


class _Agreement:
    """The (stop, checkpoint) flags, OR-ed over ranks asynchronously (see the module docstring)."""

    def __init__(self, group):
        self.group, self._pending = group, None

    def launch(self, stop: bool, save: bool) -> None:
        t = torch.tensor([int(stop), int(save)], dtype=torch.int32)  # CPU: reading it syncs no device
        work = dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.group, async_op=True) if _distributed() else None
        self._pending = (t, work)

    def take(self) -> tuple[bool, bool]:
        if self._pending is None:
            return False, False
        (t, work), self._pending = self._pending, None
        if work is not None:
            work.wait()
        stop, save = t.tolist()
        return bool(stop), bool(save)

    def now(self, stop: bool) -> bool:
        self.launch(stop, False)
        return self.take()[0]


class _Sums:
    """This rank's running loss sum and top-1 hits (device); samples and skips (host ints)."""

    def __init__(self, device: torch.device, carry: list[float] | None):
        carry = carry or [0.0, 0.0, 0, 0]
        self.device = device
        self.dev = torch.tensor([float(carry[0]), float(carry[1])], dtype=torch.float64).to(device)
        self.seen, self.skipped, self.carried = int(carry[2]), int(carry[3]), int(carry[2])

    def add(self, loss: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor) -> None:
        n = len(labels)
        self.dev[0] += loss.detach().double() * n
        self.dev[1] += logits.detach().argmax(dim=1).eq(labels).sum()
        self.seen += n

    def local_means(self, reads: HostReads) -> tuple[float, float]:
        loss_sum, hits = reads(self.dev)
        return loss_sum / max(1, self.seen), 100.0 * hits / max(1, self.seen)

    def totals(self, reads: HostReads) -> list[float]:
        """[loss sum, top-1 hits, samples, skipped, carried samples] over all ranks: one
        all_reduce, one read."""
        host = torch.tensor([self.seen, self.skipped, self.carried], dtype=torch.float64).to(self.device)
        t = torch.cat([self.dev, host])
        if _distributed():
            dist.all_reduce(t)
        return reads(t)


class Engine:
    def __init__(self, *, model: nn.Module, optimizer: torch.optim.Optimizer, amp: Amp, dist: DistInfo,
                 label_smoothing: float, color_jitter: float, channels_last: bool, seed: int,
                 total_steps: int, warmup_steps: int, peak_lr: float):
        self.model, self.optimizer, self.amp, self.dist = model, optimizer, amp, dist
        self.criterion = nn.CrossEntropyLoss(label_smoothing=label_smoothing)
        self.normalize = DeviceNormalize()
        self.jitter = DeviceColorJitter(color_jitter, color_jitter, color_jitter) if color_jitter > 0 else None
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.seed, self.total_steps, self.warmup_steps, self.peak_lr = seed, total_steps, warmup_steps, peak_lr
        self.reads = HostReads()
        self.heartbeat = lambda: None  # called after every optimizer step and evaluation batch (a watchdog sets it)
        # The stop/checkpoint flags travel on CPU tensors: the default group under gloo, a side
        # gloo group under NCCL (created here, on every rank, in the same order).
        self.flag_group = None
        if _distributed() and torch.distributed.get_backend() != "gloo":
            self.flag_group = torch.distributed.new_group(backend="gloo")

    def _inputs(self, images: torch.Tensor, epoch: int, step: int) -> torch.Tensor:
        """uint8 [B,3,H,W] -> normalized float on the device (color jitter seeded per step)."""
        x = images.to(self.dist.device, non_blocking=True)
        if self.jitter is not None:
            x = self.jitter(x, jitter_generator(self.seed, epoch, step))
        return self.normalize(x).contiguous(memory_format=self.memory_format)

    def _micro_batch(self, batch, state: StepState, sums: _Sums) -> None:
        """Forward and backward of one micro-batch (gradients all-reduced on the step's last)."""
        model, device = self.model, self.dist.device
        last_micro = batch.micro == batch.num_micro - 1
        labels = batch.labels.to(device, non_blocking=True)
        sync = contextlib.nullcontext() if last_micro or not self.dist.distributed else model.no_sync()
        with sync:
            with torch.autocast(device.type, dtype=self.amp.dtype, enabled=self.amp.enabled):
                if len(labels):
                    logits = model(self._inputs(batch.images, state.epoch, state.step_in_epoch))
                    loss = self.criterion(logits, labels)
                else:  # every sample was bad: still join the gradient all-reduce (no DDP hang)
                    logits, loss = None, sum(p.reshape(-1)[0] * 0.0 for p in model.parameters())
            # Equal-size micro-batches: the step's gradient is the mean over its samples.
            self.amp.scaler.scale(loss / batch.num_micro).backward()
        if logits is not None:
            sums.add(loss, logits, labels)

    def _optimizer_step(self, state: StepState, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.amp.scaler.step(self.optimizer)
        self.amp.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        state.step_in_epoch += 1
        state.global_step += 1
        self.heartbeat()

    def train_epoch(self, loader, state: StepState, *, stop_after: int, should_stop, checkpoint_due,
                    on_checkpoint, progress=None, check_sync_every: int = 0, sample_log=None, log_every: int = 0,
                    carry: list[float] | None = None) -> EpochResult:
        """Run the loader to its end (or ``stop_after`` steps); ``state`` is advanced in place.

        ``should_stop()`` / ``checkpoint_due(step)`` are this rank's local views; the decision
        is agreed across ranks one step late (module docstring). ``on_checkpoint(sums)`` saves
        one; ``sums`` = [loss sum, top-1 hits, samples, skipped] of the epoch so far over all
        ranks, which a run resumed from that checkpoint passes back as ``carry`` (on one rank
        only). ``progress(state, loss, top1, lr)`` (this rank's running means) is called every
        ``log_every`` steps. A run resumed at the epoch's end (``state.step_in_epoch ==
        stop_after``) trains nothing and starts no loader workers.
        """
        self.model.train()
        res, reads_before = EpochResult(), self.reads.count
        sums = _Sums(self.dist.device, carry)
        agree = _Agreement(self.flag_group)
        if state.step_in_epoch < stop_after:
            agree.launch(should_stop(), checkpoint_due(state.step_in_epoch + 1))
        t0, it = time.perf_counter(), None
        while state.step_in_epoch < stop_after:
            if it is None:
                it = iter(loader)
            t_wait = time.perf_counter()
            try:
                batch = next(it)
            except StopIteration:
                break
            res.data_wait += time.perf_counter() - t_wait
            sums.skipped += batch.num_skipped
            lr = lr_at(state.global_step, self.total_steps, self.warmup_steps, self.peak_lr)
            if sample_log is not None:
                sample_log.write(json.dumps({"epoch": state.epoch, "step": state.step_in_epoch, "micro": batch.micro,
                                             "lr": lr, "keys": batch.keys}) + "\n")
            self._micro_batch(batch, state, sums)
            if batch.micro != batch.num_micro - 1:
                continue
            self._optimizer_step(state, lr)
            step = state.step_in_epoch
            if check_sync_every and state.global_step % check_sync_every == 0:
                assert_same_weights(self.model, self.dist.device)
                res.sync_checks += 1
            if progress is not None and log_every and step % log_every == 0 and step < stop_after:
                progress(state, *sums.local_means(self.reads), lr)
            stop, save = agree.take()   # about this step, launched after the previous one
            if step == stop_after:      # the epoch's last step: agree now, leave nothing pending
                stop, save = agree.now(should_stop()), False
            if stop or save:
                on_checkpoint(sums.totals(self.reads)[:4])
            if stop:
                res.interrupted = True
                break
            if step < stop_after:
                agree.launch(should_stop(), checkpoint_due(step + 1))
        agree.take()  # a loader that ended early leaves one pending
        res.seconds = time.perf_counter() - t0
        return self._finish(res, sums, reads_before)

    def _finish(self, res: EpochResult, sums: _Sums, reads_before: int) -> EpochResult:
        """The epoch's totals over all ranks (one all_reduce, one read) into ``res``."""
        loss_sum, hits, seen, skipped, carried = sums.totals(self.reads)
        res.loss, res.top1 = loss_sum / max(1, seen), 100.0 * hits / max(1, seen)
        res.samples, res.skipped = int(seen - carried), int(skipped)
        res.host_reads = self.reads.count - reads_before
        return res

    def validate(self, model: nn.Module, loader, expected: int) -> dict:
        """The val metrics of ``model`` (:func:`evaluate_model` with this engine's settings and heartbeat)."""
        return evaluate_model(model, loader, expected, self.dist.device, self.amp, self.normalize, self.memory_format,
                              heartbeat=self.heartbeat)


@torch.no_grad()
def evaluate_model(model: nn.Module, loader, expected: int, device: torch.device, amp: Amp,
                   normalize=None, memory_format=torch.channels_last, heartbeat=None) -> dict:
    """Top-1/top-5 over this rank's share, summed over ranks once (no per-batch collectives).

    ``model`` is the unwrapped module: ranks may hold different numbers of val batches.
    Sums stay on the device and are read once, at the end (``val_host_reads``: 1).
    Raises when the evaluated count (+ skipped) differs from ``expected`` (the manifest's).
    """
    normalize = normalize or DeviceNormalize()
    reads = HostReads()
    was_training = model.training
    model.eval()
    sums = torch.zeros(3, dtype=torch.float64, device=device)  # loss sum, top-1 hits, top-5 hits
    n = skipped = 0
    for batch in loader:
        skipped += batch.num_skipped
        if len(batch.labels):
            labels = batch.labels.to(device, non_blocking=True)
            x = normalize(batch.images.to(device, non_blocking=True)).contiguous(memory_format=memory_format)
            with torch.autocast(device.type, dtype=amp.dtype, enabled=amp.enabled):
                logits = model(x).float()
            hit = logits.topk(min(5, logits.shape[1]), dim=1).indices.eq(labels[:, None])
            sums += torch.stack([nn.functional.cross_entropy(logits, labels, reduction="sum").double(),
                                 hit[:, :1].any(dim=1).sum().double(), hit.any(dim=1).sum().double()])
            n += len(labels)
        if heartbeat is not None:
            heartbeat()
    model.train(was_training)
    t = torch.cat([sums, torch.tensor([n, skipped], dtype=torch.float64).to(device)])
    if _distributed():
        dist.all_reduce(t)
    loss_sum, c1, c5, n, skipped = reads(t)
    if int(n + skipped) != expected:
        raise RuntimeError(f"evaluated {int(n)} val samples (+{int(skipped)} skipped), "
                           f"the manifest lists {expected}: the val split was not covered exactly once")
    return {"val_loss": loss_sum / max(1, n), "val_top1": 100.0 * c1 / max(1, n),
            "val_top5": 100.0 * c5 / max(1, n), "val_count": int(n), "val_skipped": int(skipped),
            "val_host_reads": reads.count}
