"""The engine in one process on a tiny model: scalars read from the device once per log
interval plus once per epoch, the heartbeat after every step and val batch, the one-step-late
stop agreement, and an exact stop (with its checkpoint) on an epoch's last step."""
from __future__ import annotations

import torch
import torch.nn as nn

from trainer.distributed import DistInfo
from trainer.engine import Amp, Engine, StepState
from trainer.loader import Batch

CPU = torch.device("cpu")


def _batches(steps: int, accum: int = 1, size: int = 4, seed: int = 0) -> list[Batch]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for b in range(steps * accum):
        images = torch.randint(0, 256, (size, 3, 8, 8), dtype=torch.uint8, generator=g)
        labels = torch.randint(0, 3, (size,), generator=g)
        out.append(Batch(images, labels, b // accum, b % accum, accum, 0, None, b))
    return out


def _engine(steps: int) -> Engine:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4 * 6 * 6, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    return Engine(model=model, optimizer=opt, amp=Amp.create("off", CPU), dist=DistInfo(0, 0, 1, CPU),
                  label_smoothing=0.0, color_jitter=0.0, channels_last=False, seed=0, total_steps=steps,
                  warmup_steps=0, peak_lr=0.1)


def _run(engine: Engine, batches, steps: int, *, stop_seen_at: int | None = None, log_every: int = 0,
         start: int = 0, carry=None):
    state = StepState(0, start, start)
    saved, logged = [], []

    def should_stop() -> bool:  # a signal that arrives during step stop_seen_at (1-based)
        return stop_seen_at is not None and state.step_in_epoch >= stop_seen_at

    res = engine.train_epoch(batches[start:], state, stop_after=steps, should_stop=should_stop,
                             checkpoint_due=lambda step: False,
                             on_checkpoint=lambda sums: saved.append((state.step_in_epoch, sums)),
                             progress=lambda s, *a: logged.append(s.step_in_epoch), log_every=log_every, carry=carry)
    return res, state, saved, logged


def test_scalars_are_read_once_per_log_interval_plus_once_per_epoch_and_heartbeat_beats():
    engine = _engine(7)
    beats = []
    engine.heartbeat = lambda: beats.append(1)
    res, state, saved, logged = _run(engine, _batches(7, accum=2), 7, log_every=2)
    assert state.step_in_epoch == 7 and not res.interrupted and not saved
    assert logged == [2, 4, 6]
    assert res.host_reads == len(logged) + 1 <= 7 // 2 + 1
    assert len(beats) == 7  # one per optimizer step
    assert res.samples == 7 * 2 * 4 and 0 < res.loss < 10
    val = engine.validate(engine.model, _batches(5, seed=1), expected=20)
    assert val["val_host_reads"] == 1 and val["val_count"] == 20
    assert len(beats) == 7 + 5  # and one per evaluation batch


def test_a_stop_is_agreed_one_step_late_mid_epoch_and_at_once_on_the_last_step():
    res, state, saved, _ = _run(_engine(6), _batches(6), 6, stop_seen_at=2)
    assert res.interrupted and state.step_in_epoch == 3 and [s for s, _ in saved] == [3]
    res, state, saved, _ = _run(_engine(6), _batches(6), 6, stop_seen_at=5)
    assert res.interrupted and state.step_in_epoch == 6 and [s for s, _ in saved] == [6]
    res, state, saved, _ = _run(_engine(6), _batches(6), 6, stop_seen_at=6)  # seen during the last step
    assert res.interrupted and state.step_in_epoch == 6 and [s for s, _ in saved] == [6]


def test_resume_after_a_stop_on_the_last_step_trains_nothing_and_keeps_the_epoch_metrics():
    full, _, _, _ = _run(_engine(4), _batches(4), 4)
    engine = _engine(4)
    res, state, saved, _ = _run(engine, _batches(4), 4, stop_seen_at=4)
    assert res.interrupted and saved[0][0] == 4
    resumed, state, saved2, _ = _run(engine, _batches(4), 4, start=4, carry=saved[0][1])
    assert not resumed.interrupted and not saved2 and resumed.samples == 0 and state.step_in_epoch == 4
    assert resumed.loss == full.loss and resumed.top1 == full.top1
