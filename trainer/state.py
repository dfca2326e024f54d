"""What a checkpoint holds, in one place: :class:`TrainState` (a training checkpoint) and
:func:`best_weights` (the small ``model_best.pth``), with the one format check that
training, resume, ``trainer.evaluate`` and ``trainer.predict`` use.

    state = TrainState.load("runs/demo/checkpoints/checkpoint_epoch_002.pth")
    state.restore(model, optimizer, scaler)        # + the RNG state of this rank
    TrainState(...).to_dict()                      # what CheckpointStore.save writes

On disk a checkpoint stays a plain dict of tensors, numbers, strings, lists and dicts, so
``torch.load(path, weights_only=True)`` reads it (keys: format, version, arch, model,
optimizer, scaler, scheduler, epoch, step_in_epoch, global_step, global_batch, world_size,
accum, rng, config, classes, data, best_top1, epoch_sums). Older checkpoints without
``best_top1`` or ``epoch_sums`` still load.
"""
from __future__ import annotations

from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path

import torch

from common.errors import UserError
from trainer.engine import StepState
from trainer.presets import IMAGENET_MEAN, IMAGENET_STD

FORMAT = "imagenet-spot-checkpoint"
WEIGHTS_FORMAT = "imagenet-spot-weights"
VERSION = 1


@dataclass
class TrainState:
    """Everything a run needs to continue exactly where a checkpoint was taken."""

    arch: str
    model: dict
    optimizer: dict
    scaler: dict
    scheduler: dict           # global_step, total_steps, warmup_steps, peak_lr
    epoch: int                # 0-based epoch in progress (step_in_epoch 0: the previous one is done)
    step_in_epoch: int
    global_step: int
    global_batch: int
    world_size: int
    accum: int
    rng: dict                 # {"torch": ByteTensor, "cuda": [ByteTensor per device]}
    config: dict              # TrainConfig.to_dict()
    classes: list[dict]       # ClassInfo as dicts
    data: dict                # root, fingerprint, num_train
    best_top1: float = 0.0
    epoch_sums: list[float] | None = None  # the epoch's metric sums so far (mid-epoch checkpoints)
    format: str = FORMAT
    version: int = VERSION

    @property
    def step(self) -> StepState:
        return StepState(self.epoch, self.step_in_epoch, self.global_step)

    def to_dict(self) -> dict:
        """The plain dict written to disk (``asdict`` would deep-copy every tensor)."""
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_dict(cls, d, where: str = "checkpoint") -> "TrainState":
        """Check the format, then take the known keys (unknown ones are ignored)."""
        check_training(d, where)
        known = {f.name for f in fields(cls)}
        missing = [f.name for f in fields(cls) if f.name not in d and f.default is MISSING]
        if missing:
            raise ValueError(f"{where} lacks {', '.join(missing)}: not a complete training checkpoint")
        return cls(**{k: v for k, v in d.items() if k in known})

    @classmethod
    def load(cls, path: str | Path) -> "TrainState":
        """Read a training checkpoint (weights_only=True); ValueError if it is not one."""
        return cls.from_dict(read(path), str(path))

    def restore(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, scaler, device: torch.device,
                local_rank: int = 0) -> None:
        """Load weights, optimizer and scaler state, and this process's RNG state."""
        model.load_state_dict(self.model)
        optimizer.load_state_dict(self.optimizer)
        scaler.load_state_dict(self.scaler)
        torch.set_rng_state(self.rng["torch"])
        cuda = self.rng["cuda"]
        if device.type == "cuda" and cuda:
            torch.cuda.set_rng_state(cuda[min(local_rank, len(cuda) - 1)])

    def check_compatible(self, *, arch: str, wnids: list[str], fingerprint, data: str, where: str) -> None:
        """UserError unless this state continues a run of ``arch`` on the same classes and shards."""
        if self.arch != arch:
            raise UserError(f"{where} is a {self.arch} checkpoint, not --arch {arch}: pass the same --arch "
                            "or start a new --output")
        if [c["wnid"] for c in self.classes] != wnids:
            raise UserError(f"{where} was trained on a different class list than {data}: resume with the same "
                            "shards, or start a new --output")
        if self.data.get("fingerprint") != fingerprint:
            raise UserError(f"{where} was trained on a different shard build than {data}: resume with the same "
                            "shards, or start a new --output")


def rng_state(device: torch.device) -> dict:
    """This process's RNG state, as TrainState.rng records it."""
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if device.type == "cuda" else []}


def read(path: str | Path) -> object:
    """torch.load with weights_only=True, onto the CPU."""
    return torch.load(path, map_location="cpu", weights_only=True)


def check_training(obj, where: str) -> None:
    """ValueError unless ``obj`` is a training checkpoint of this project."""
    if not isinstance(obj, dict) or obj.get("format") != FORMAT:
        raise ValueError(f"{where} is not a training checkpoint of this project")


def check_weights(obj, where: str) -> None:
    """UserError unless ``obj`` holds what inference needs (a training checkpoint or model_best.pth)."""
    if not isinstance(obj, dict) or "model" not in obj or "classes" not in obj or "arch" not in obj:
        raise UserError(f"{where} is not a checkpoint of this project (no model/classes/arch)")


@dataclass
class BestWeights:
    """The small model_best.pth: what predict needs, nothing more."""

    arch: str
    model: dict
    classes: list[dict]
    image_size: int
    val_resize: int
    epoch: int
    val_top1: float
    val_top5: float
    normalization: dict = field(default_factory=lambda: {"mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)})
    format: str = WEIGHTS_FORMAT

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}


def classes_as_dicts(classes) -> list[dict]:
    return [asdict(c) for c in classes]
