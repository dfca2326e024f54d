"""One epoch of training and one pass of evaluation, for any world size and accumulation.

One AMP path: ``torch.autocast(..., enabled=amp)`` and ``GradScaler(enabled=fp16)``.
Every optimizer step ends with one tiny all_reduce of two flags (stop, checkpoint), so
all ranks stop or checkpoint at the same step; the checkpoint records (epoch, step) and a
resumed run restarts the loader at exactly the next micro-batch.
"""
from __future__ import annotations

import contextlib
import json
import math
import time
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from trainer.distributed import DistInfo, all_reduce_sum, any_rank, assert_same_weights
from trainer.metrics import topk_correct
from trainer.presets import DeviceColorJitter, DeviceNormalize, jitter_generator


def lr_at(global_step: int, total_steps: int, warmup_steps: int, peak_lr: float) -> float:
    """Linear warmup to ``peak_lr`` over ``warmup_steps``, then cosine to 0 at ``total_steps``."""
    if global_step < warmup_steps:
        return peak_lr * (global_step + 1) / warmup_steps
    progress = (global_step - warmup_steps) / max(1, total_steps - warmup_steps)
    return peak_lr * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


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
    checkpoint_steps: list[int] = field(default_factory=list)
    loss: float = 0.0
    top1: float = 0.0
    samples: int = 0
    seconds: float = 0.0
    data_wait: float = 0.0
    skipped: int = 0
    sync_checks: int = 0


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

    def _inputs(self, images: torch.Tensor, epoch: int, step: int) -> torch.Tensor:
        """uint8 [B,3,H,W] -> normalized float on the device (color jitter seeded per step)."""
        x = images.to(self.dist.device, non_blocking=True)
        if self.jitter is not None:
            x = self.jitter(x, jitter_generator(self.seed, epoch, step))
        return self.normalize(x).contiguous(memory_format=self.memory_format)

    def train_epoch(self, loader, state: StepState, *, stop_after: int, should_stop, checkpoint_due,
                    on_checkpoint, progress=None, check_sync_every: int = 0, sample_log=None,
                    carry: list[float] | None = None) -> EpochResult:
        """Run the loader to its end (or ``stop_after`` steps); ``state`` is advanced in place.

        ``should_stop()`` / ``checkpoint_due(step)`` are this rank's local views; the decision
        is agreed across ranks after each optimizer step. ``on_checkpoint(sums)`` saves one;
        ``sums`` = [loss sum, top-1 hits, samples, skipped] of the epoch so far over all ranks,
        which a run resumed from that checkpoint passes back as ``carry`` (on one rank only) so
        the epoch's metrics cover the whole epoch. A stop agreed on the epoch's last step
        checkpoints too: the resumed run then starts with ``state.step_in_epoch == stop_after``
        and trains nothing more in this epoch.
        """
        model, device = self.model, self.dist.device
        model.train()
        res = EpochResult()
        loss_sum, correct, seen, carried_skips = 0.0, 0, 0, 0
        if carry:
            loss_sum, correct, seen, carried_skips = carry[0], int(carry[1]), int(carry[2]), int(carry[3])
        seen_before = all_reduce_sum([seen], device)[0]
        t0 = time.perf_counter()
        it = None
        while state.step_in_epoch < stop_after:
            if it is None:  # not before: a run resumed at the epoch's end starts no loader workers
                it = iter(loader)
            t_wait = time.perf_counter()
            try:
                batch = next(it)
            except StopIteration:
                break
            res.data_wait += time.perf_counter() - t_wait
            res.skipped += batch.num_skipped
            if sample_log is not None:
                lr = lr_at(state.global_step, self.total_steps, self.warmup_steps, self.peak_lr)
                sample_log.write(json.dumps({"epoch": state.epoch, "step": state.step_in_epoch, "micro": batch.micro,
                                             "lr": lr, "keys": batch.keys}) + "\n")
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
                n = len(labels)
                loss_sum += float(loss.detach()) * n
                correct += topk_correct(logits.detach().float(), labels, (1,))[0]
                seen += n
            if not last_micro:
                continue
            lr = lr_at(state.global_step, self.total_steps, self.warmup_steps, self.peak_lr)
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            self.amp.scaler.step(self.optimizer)
            self.amp.scaler.update()
            self.optimizer.zero_grad(set_to_none=True)
            state.step_in_epoch += 1
            state.global_step += 1
            if check_sync_every and state.global_step % check_sync_every == 0:
                assert_same_weights(self.model, device)
                res.sync_checks += 1
            if progress is not None:
                progress(state, loss_sum / max(1, seen), 100.0 * correct / max(1, seen), lr)
            stop, save = any_rank([should_stop(), checkpoint_due(state.step_in_epoch)], device)
            # A plain save due at the last step is left to the end-of-epoch checkpoint; a stop
            # is saved here whatever the step (the end-of-epoch one will not happen).
            if stop or (save and state.step_in_epoch < stop_after):
                on_checkpoint(all_reduce_sum([loss_sum, correct, seen, res.skipped + carried_skips], device))
            if stop:
                res.interrupted = True
                break
        res.seconds = time.perf_counter() - t0
        total = all_reduce_sum([loss_sum, correct, seen, res.skipped + carried_skips], device)
        res.loss, res.top1 = total[0] / max(1, total[2]), 100.0 * total[1] / max(1, total[2])
        res.samples, res.skipped = int(total[2] - seen_before), int(total[3])
        return res

    def evaluate(self, model: nn.Module, loader, expected: int) -> dict:
        return evaluate_model(model, loader, expected, self.dist.device, self.amp, self.normalize, self.memory_format)


@torch.no_grad()
def evaluate_model(model: nn.Module, loader, expected: int, device: torch.device, amp: Amp,
                   normalize=None, memory_format=torch.channels_last) -> dict:
    """Top-1/top-5 over this rank's share, summed over ranks once (no per-batch collectives).

    ``model`` is the unwrapped module: ranks may hold different numbers of val batches.
    Raises when the evaluated count (+ skipped) differs from ``expected`` (the manifest's).
    """
    normalize = normalize or DeviceNormalize()
    was_training = model.training
    model.eval()
    loss_sum = c1 = c5 = n = skipped = 0
    for batch in loader:
        skipped += batch.num_skipped
        if not len(batch.labels):
            continue
        labels = batch.labels.to(device, non_blocking=True)
        x = normalize(batch.images.to(device, non_blocking=True)).contiguous(memory_format=memory_format)
        with torch.autocast(device.type, dtype=amp.dtype, enabled=amp.enabled):
            logits = model(x).float()
        loss_sum += float(nn.functional.cross_entropy(logits, labels, reduction="sum"))
        k1, k5 = topk_correct(logits, labels, (1, 5))
        c1, c5, n = c1 + k1, c5 + k5, n + len(labels)
    model.train(was_training)
    loss_sum, c1, c5, n, skipped = all_reduce_sum([loss_sum, c1, c5, n, skipped], device)
    if int(n + skipped) != expected:
        raise RuntimeError(f"evaluated {int(n)} val samples (+{int(skipped)} skipped), "
                           f"the manifest lists {expected}: the val split was not covered exactly once")
    return {"val_loss": loss_sum / max(1, n), "val_top1": 100.0 * c1 / max(1, n),
            "val_top5": 100.0 * c5 / max(1, n), "val_count": int(n), "val_skipped": int(skipped)}
