"""trainer.state: a checkpoint round-trips through torch.load(weights_only=True), restores
weights/optimizer/scaler/RNG exactly, and one check refuses what is not a checkpoint."""
from __future__ import annotations

import pytest
import torch

from common.errors import UserError
from trainer.engine import Amp
from trainer.state import FORMAT, TrainState, check_weights, rng_state

CPU = torch.device("cpu")


def _state(model, optimizer, scaler, **kw) -> TrainState:
    base = dict(arch="tiny", model=model.state_dict(), optimizer=optimizer.state_dict(), scaler=scaler.state_dict(),
                scheduler={"global_step": 3, "total_steps": 10, "warmup_steps": 1, "peak_lr": 0.1},
                epoch=1, step_in_epoch=2, global_step=3, global_batch=8, world_size=1, accum=1, rng=rng_state(CPU),
                config={"arch": "tiny"}, classes=[{"wnid": "n1", "name": "a"}, {"wnid": "n2", "name": "b"}],
                data={"root": "x", "fingerprint": "f1", "num_train": 16}, best_top1=12.5, epoch_sums=[1.0, 2.0, 3, 0])
    return TrainState(**{**base, **kw})


def _trained():
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(3, 4)).sum().backward()
    optimizer.step()
    return model, optimizer, Amp.create("off", CPU).scaler


def test_round_trip_and_restore_are_exact(tmp_path):
    model, optimizer, scaler = _trained()
    path = tmp_path / "c.pth"
    torch.save(_state(model, optimizer, scaler).to_dict(), path)
    expected_draw = torch.rand(3)  # what the RNG gives right after the checkpoint

    loaded = TrainState.load(path)  # weights_only=True inside
    assert (loaded.step.epoch, loaded.step.step_in_epoch, loaded.step.global_step) == (1, 2, 3)
    assert loaded.best_top1 == 12.5 and loaded.epoch_sums == [1.0, 2.0, 3, 0]
    fresh = torch.nn.Linear(4, 2)
    fresh_opt = torch.optim.SGD(fresh.parameters(), lr=0.1, momentum=0.9)
    loaded.restore(fresh, fresh_opt, Amp.create("off", CPU).scaler, CPU)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), fresh.state_dict().values()))
    assert torch.equal(fresh_opt.state_dict()["state"][0]["momentum_buffer"],
                       optimizer.state_dict()["state"][0]["momentum_buffer"])
    assert torch.equal(torch.rand(3), expected_draw)


def test_older_checkpoint_without_optional_keys_loads(tmp_path):
    d = _state(*_trained()).to_dict()
    del d["best_top1"], d["epoch_sums"]
    d["some_future_key"] = 1  # ignored
    s = TrainState.from_dict(d)
    assert s.best_top1 == 0.0 and s.epoch_sums is None


def test_what_is_not_a_training_checkpoint_is_refused():
    d = _state(*_trained()).to_dict()
    with pytest.raises(ValueError, match="not a training checkpoint"):
        TrainState.from_dict({**d, "format": "imagenet-spot-weights"}, "w.pth")
    with pytest.raises(ValueError, match="lacks optimizer"):
        TrainState.from_dict({k: v for k, v in d.items() if k != "optimizer"}, "c.pth")
    with pytest.raises(UserError, match="no model/classes/arch"):
        check_weights({"format": FORMAT}, "c.pth")
    check_weights(d, "c.pth")  # a training checkpoint also serves inference


def test_compatibility_check_names_what_differs():
    s = _state(*_trained())
    ok = dict(arch="tiny", wnids=["n1", "n2"], fingerprint="f1", data="shards", where="c.pth")
    s.check_compatible(**ok)
    with pytest.raises(UserError, match="is a tiny checkpoint, not --arch resnet18"):
        s.check_compatible(**{**ok, "arch": "resnet18"})
    with pytest.raises(UserError, match="different class list"):
        s.check_compatible(**{**ok, "wnids": ["n2", "n1"]})
    with pytest.raises(UserError, match="different shard build"):
        s.check_compatible(**{**ok, "fingerprint": "f2"})
