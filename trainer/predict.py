"""Top-5 classes for images, from a trained checkpoint (local path or s3:// URL).

    python -m trainer.predict --checkpoint runs/demo/model_best.pth photo1.jpg photo2.png

Preprocessing is the validation preset the model was trained with (resize, center crop,
normalization stored in the checkpoint). Prints, per image, rank, wnid, probability, name.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from common.errors import UserError
from trainer.inference import load_for_inference
from trainer.presets import DeviceNormalize, EvalPreset


def predict(ckpt: str, images: list[str], device: str = "cpu", top: int = 5) -> list[list[tuple[str, str, float]]]:
    """For each image: [(wnid, name, probability)] best first."""
    dev = torch.device(device)
    lm = load_for_inference(ckpt, dev)
    # JPEGs go through the decoder the training run validated with (same pixels as evaluate);
    # PIL takes any other format a user may pass.
    presets = [EvalPreset(lm.image_size, lm.val_resize), EvalPreset(lm.image_size, lm.val_resize, decoder="pil")]
    normalize = DeviceNormalize(lm.mean, lm.std)
    memory_format = torch.channels_last if lm.config.get("channels_last", True) else torch.contiguous_format
    out = []
    for image in images:
        p = Path(image)
        if not p.is_file():
            raise UserError(f"image {image} does not exist")
        x = _decode(presets, p.read_bytes(), image)  # uint8 [1,3,H,W]
        with torch.no_grad():
            probs = torch.softmax(lm.model(normalize(x.to(dev)).contiguous(memory_format=memory_format)).float(),
                                  dim=1)[0]
        values, idx = probs.topk(min(top, len(lm.classes)))
        out.append([(lm.classes[i].wnid, lm.classes[i].name, float(v)) for v, i in zip(values, idx.tolist())])
    return out


def _decode(presets: list[EvalPreset], data: bytes, name: str) -> torch.Tensor:
    """The first preset that decodes ``data``; a UserError when none does."""
    error: Exception | None = None
    for preset in presets:
        try:
            return preset(data)[None]
        except Exception as exc:  # noqa: BLE001 - decoders raise many types for bad data
            error = exc
    raise UserError(f"cannot decode {name} ({type(error).__name__}): is it an image?")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m trainer.predict", description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", required=True, help="model_best.pth or a training checkpoint (path or s3://)")
    p.add_argument("images", nargs="+")
    p.add_argument("--device", default="cpu")
    p.add_argument("--top", type=int, default=5)
    args = p.parse_args(argv)
    from common import cli

    return cli.run(lambda: _report(args.images, predict(args.checkpoint, args.images, args.device, args.top)))


def _report(images: list[str], results: list) -> int:
    for image, rows in zip(images, results):
        print(image)
        for rank, (wnid, name, prob) in enumerate(rows, 1):
            print(f"  {rank}. {wnid}  {prob:6.2%}  {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
