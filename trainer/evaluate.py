"""Val top-1/top-5 of a checkpoint over a shard build's whole val split.

    python -m trainer.evaluate --checkpoint s3://bucket/runs/r50/checkpoints/checkpoint_epoch_090.pth \\
        --data s3://bucket/imagenet-10pct

Uses the checkpoint's own image size, resize and batch size, so it reproduces the val
metrics logged during training. Refuses shards whose class list differs from the model's.
"""
from __future__ import annotations

import argparse
import json
import sys

import torch

from common import manifest as mf
from common.errors import UserError
from trainer.loader import LoaderConfig, make_val_loader
from trainer.engine import Amp, evaluate_model
from trainer.inference import load_for_inference
from trainer.presets import DeviceNormalize


def evaluate(ckpt: str, data: str, device: str = "cpu", batch_size: int | None = None, workers: int = 2) -> dict:
    dev = torch.device(device)
    lm = load_for_inference(ckpt, dev)
    manifest = mf.load(data)
    if [c.wnid for c in manifest.classes] != [c.wnid for c in lm.classes]:
        raise UserError(f"{data} has a different class list than {ckpt}: evaluate on the shards it was trained on")
    cfg = LoaderConfig(data, batch_size=batch_size or int(lm.config.get("batch_size", 64)),
                       image_size=lm.image_size, val_resize=lm.val_resize, num_workers=workers, with_keys=False)
    amp = Amp.create(lm.config.get("amp", "off") if dev.type == "cuda" else "off", dev)
    result = evaluate_model(lm.model, make_val_loader(cfg, rank=0, world_size=1, manifest=manifest),
                            manifest.split("val").num_samples, dev, amp, DeviceNormalize(lm.mean, lm.std),
                            torch.channels_last if lm.config.get("channels_last", True) else torch.contiguous_format)
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m trainer.evaluate", description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--data", required=True, help="shard build (local or s3://) holding manifest.json")
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    args = p.parse_args(argv)
    from common import cli

    return cli.run(lambda: _report(evaluate(args.checkpoint, args.data, args.device, args.batch_size, args.workers),
                                   args.json))


def _report(r: dict, as_json: bool) -> int:
    if as_json:
        print(json.dumps(r))
    else:
        print(f"val top-1 {r['val_top1']:.2f}%  top-5 {r['val_top5']:.2f}%  loss {r['val_loss']:.4f}  "
              f"on {r['val_count']} images ({r['val_skipped']} skipped)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
