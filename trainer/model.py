"""Model construction, optimizer parameter groups and pretrained weights.

Weight decay is excluded from every normalization layer's parameters and from every bias,
found by module type, not by name (``'bn' in name`` misses ``downsample.1``).
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn
import torchvision

from common.errors import UserError
from common.manifest import ClassInfo

NORM_TYPES = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm, nn.modules.instancenorm._InstanceNorm,
              nn.LocalResponseNorm)


def build_model(arch: str, num_classes: int, zero_init_residual: bool = False) -> nn.Module:
    try:
        builder = torchvision.models.get_model_builder(arch)
    except ValueError:
        raise UserError(f"--arch {arch} is not a torchvision model (e.g. resnet50, resnet18)") from None
    kwargs = {"num_classes": num_classes}
    if zero_init_residual and arch.startswith(("resnet", "resnext", "wide_resnet")):
        kwargs["zero_init_residual"] = True
    return builder(weights=None, **kwargs)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two groups: decayed weights, and norm-layer parameters + biases without decay."""
    no_decay, seen = [], set()
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if isinstance(module, NORM_TYPES) or name == "bias":
                no_decay.append(p)
                seen.add(id(p))
    decay = [p for p in model.parameters() if id(p) not in seen]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module under DDP and torch.compile wrappers (what checkpoints store)."""
    while True:
        if hasattr(model, "module") and isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


def _classifier(model: nn.Module) -> nn.Linear:
    for name in ("fc", "classifier", "head", "heads"):
        m = getattr(model, name, None)
        if isinstance(m, nn.Sequential):
            m = [x for x in m if isinstance(x, nn.Linear)][-1]
        if isinstance(m, nn.Linear):
            return m
    raise UserError("--pretrained: cannot find this model's final Linear layer to map the classes")


def load_pretrained(model: nn.Module, arch: str, classes: list[ClassInfo], source: str) -> str:
    """Load ImageNet-1k weights, keeping the classifier rows of the chosen classes (by imagenet_index).

    ``source`` is "torchvision" (weights already in the torch hub cache; nothing is downloaded)
    or a path to a state_dict file. Returns a description for the log.
    """
    if source == "torchvision":
        weights = torchvision.models.get_model_weights(arch).DEFAULT
        path = Path(torch.hub.get_dir(), "checkpoints", Path(weights.url).name)
        if not path.is_file():
            raise UserError(f"--pretrained: {path} is not in the torch hub cache (no download here): "
                            f"fetch {weights.url} there, or pass --pretrained FILE")
    else:
        path = Path(source).expanduser()
        if not path.is_file():
            raise UserError(f"--pretrained {source}: no such file")
    state = torch.load(path, map_location="cpu", weights_only=True)
    state = state.get("model", state) if isinstance(state, dict) else state
    head = _classifier(model)
    head_names = [n for n, m in model.named_modules() if m is head]
    prefix = head_names[0] + "."
    w, b = state.get(prefix + "weight"), state.get(prefix + "bias")
    if w is None or w.shape[0] != 1000:
        raise UserError(f"--pretrained {path}: expected ImageNet-1k weights with a 1000-class {prefix}weight")
    rows = torch.tensor([c.imagenet_index for c in classes])
    state[prefix + "weight"] = w[rows]
    if b is not None:
        state[prefix + "bias"] = b[rows]
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise UserError(f"--pretrained {path} does not fit --arch {arch}: missing {missing[:3]}, "
                        f"unexpected {unexpected[:3]}")
    return f"{path} ({len(classes)} of 1000 classes kept)"
