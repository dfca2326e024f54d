"""Loading a trained model for inference: from model_best.pth or a training checkpoint,
local or s3://, always with torch.load(weights_only=True).

    lm = load_for_inference("s3://bucket/runs/r50/model_best.pth", torch.device("cpu"))
    lm.image_size, lm.val_resize   # the eval preset the run validated with (config.json has them too)
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from common.errors import UserError
from common.manifest import ClassInfo
from trainer.checkpoint import fetch_any
from trainer.config import default_val_resize
from trainer.model import build_model
from trainer.presets import IMAGENET_MEAN, IMAGENET_STD
from trainer.state import check_weights, read


@dataclass
class LoadedModel:
    model: torch.nn.Module
    arch: str
    classes: list[ClassInfo]
    image_size: int
    val_resize: int
    mean: tuple
    std: tuple
    config: dict


def load_for_inference(ckpt: str, device: torch.device) -> LoadedModel:
    path = fetch_any(ckpt)
    try:
        state = read(path)
    except Exception as exc:  # noqa: BLE001 - pickle/zip errors of many kinds
        raise UserError(f"{ckpt} is not a loadable checkpoint ({type(exc).__name__}): pass a .pth written by "
                        "the trainer") from None
    check_weights(state, ckpt)
    classes = [ClassInfo(**c) for c in state["classes"]]
    cfg = state.get("config", {})
    model = build_model(state["arch"], len(classes))
    model.load_state_dict(state["model"])
    model.to(device).eval()
    norm = state.get("normalization", {"mean": IMAGENET_MEAN, "std": IMAGENET_STD})
    image_size = int(state.get("image_size", cfg.get("image_size", 224)))
    val_resize = state.get("val_resize", cfg.get("val_resize")) or default_val_resize(image_size)
    return LoadedModel(model, state["arch"], classes, image_size, int(val_resize), tuple(norm["mean"]),
                       tuple(norm["std"]), cfg)
