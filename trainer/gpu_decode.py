"""``--decode gpu``: DataLoader workers only read JPEG bytes; the main process decodes each
batch on the training device (nvJPEG on CUDA) and crops, resizes and flips it there.

    python -m trainer --data s3://bucket/imagenet-10pct --output runs/r50 --decode gpu

    from trainer.loader import LoaderConfig, make_train_loader
    cfg = LoaderConfig(root, decode="gpu", decode_device="cuda:0")
    for batch in make_train_loader(cfg, epoch=0):   # Batch.images: uint8 [B,3,H,W] on cuda:0
        ...

Why: CPU JPEG decode tops out at a few hundred images/s per core, far below what an
A100/H100/H200 trains at; batched nvJPEG (and the hardware JPEG engines of A100/H100/H200)
removes that ceiling.

Same samples, same boxes as the CPU path (``trainer.presets``): a worker parses the JPEG
header for the image size and asks ``TrainPreset.params`` (the one function both paths use)
for the seeded RandomResizedCrop box and flip; it sends one byte blob per batch (a single
shared-memory tensor, pinned by the DataLoader when ``pin_memory``) plus boxes, flips, labels
and keys in plan order. ``decode_batch`` then decodes the whole batch with one
``torchvision.io.decode_jpeg(list, device=...)`` call, crops the box, resizes it with
antialiased bilinear interpolation, flips, and returns the usual :class:`trainer.loader.Batch`
(uint8 [B,3,S,S], labels and keys in the same order). Val uses EvalPreset's resize of the
shorter side and center crop. Only the pixels differ slightly: the CPU path decodes at a
reduced DCT scale before resizing, this one resizes from the full-size decode (see
tests/test_gpu_decode.py for the measured tolerance).

A sample the device decoder refuses is decoded by the CPU preset instead (exactly the CPU
path's pixels for that sample); one that neither can decode is skipped and counted, as on
the CPU path. With ``device="cpu"`` the same code runs with torchvision's CPU decoder, which
is how the plumbing is tested on machines without a GPU.
"""
from __future__ import annotations

import logging
import warnings
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from shard_builder.images import jpeg_header
from trainer.presets import EvalPreset, TrainPreset, _size, resize_dims

log = logging.getLogger(__name__)


class RawBatch(NamedTuple):
    """What a worker sends for one micro-batch under ``--decode gpu`` (samples in plan order)."""

    data: torch.Tensor      # uint8 [total bytes]: the JPEGs back to back
    offsets: torch.Tensor   # int64 [n + 1]: JPEG i is data[offsets[i]:offsets[i + 1]]
    sizes: torch.Tensor     # int64 [n, 2]: (width, height) from the header
    boxes: torch.Tensor     # int64 [n, 4]: train crop (left, top, w, h) in full-size pixels
    flips: torch.Tensor     # bool [n]
    labels: torch.Tensor    # int64 [n]
    keys: list[str]
    preset: TrainPreset | EvalPreset  # for the CPU fallback and the output size
    seed: int
    epoch: int
    step: int
    micro: int
    num_micro: int
    num_skipped: int
    with_keys: bool
    index: int


def header_size(jpeg: bytes) -> tuple[int, int]:
    """(width, height): the fast marker walk, else the same header read as the CPU path."""
    header = jpeg_header(jpeg)
    return header[:2] if header is not None else _size(jpeg, True)


def _shared_uint8(n: int, worker: bool) -> torch.Tensor:
    if not worker:
        return torch.empty(n, dtype=torch.uint8)
    # Straight into shared memory (as trainer.loader does for images): sending it copies nothing.
    return torch.empty(0, dtype=torch.uint8).set_(torch.UntypedStorage._new_shared(max(n, 1)))[:n]


def read_raw(ds, p, b: int, worker: bool) -> RawBatch:
    """Micro-batch ``b`` of plan ``p`` as bytes + crop parameters (``ds``: a trainer.loader.PlanDataset)."""
    samples, skipped = ds.read_samples(p, b)
    train = isinstance(ds.preset, TrainPreset)
    kept: list[bytes] = []
    keys, labels, sizes, boxes, flips = [], [], [], [], []
    for sample in samples:
        try:
            width, height = header_size(sample.jpeg)
        except Exception as exc:  # noqa: BLE001 - Pillow raises many types for bad data
            skipped += 1
            sample.log_undecodable(exc)
            continue
        box, flip = (ds.preset.params(width, height, sample.key, ds.cfg.seed, ds.epoch) if train
                     else ((0, 0, width, height), False))
        kept.append(sample.jpeg)
        keys.append(sample.key)
        labels.append(sample.label)
        sizes.append((width, height))
        boxes.append(box)
        flips.append(flip)
    offsets = np.zeros(len(kept) + 1, dtype=np.int64)
    np.cumsum([len(j) for j in kept], out=offsets[1:])
    data = _shared_uint8(int(offsets[-1]), worker)
    if kept:
        data.numpy()[:] = np.frombuffer(b"".join(kept), dtype=np.uint8)
    n = len(kept)
    return RawBatch(data, torch.from_numpy(offsets), torch.tensor(sizes, dtype=torch.int64).view(n, 2),
                    torch.tensor(boxes, dtype=torch.int64).view(n, 4), torch.tensor(flips, dtype=torch.bool),
                    torch.tensor(labels, dtype=torch.int64), keys, ds.preset, ds.cfg.seed, ds.epoch,
                    int(p.steps[b]), int(p.micros[b]), int(p.num_micros[b]), skipped, ds.cfg.with_keys, b)


def resize(x: torch.Tensor, out_h: int, out_w: int) -> torch.Tensor:
    """uint8 [3,h,w] -> uint8 [3,out_h,out_w], bilinear with antialias on ``x``'s device.

    CPU: torch's uint8 kernel (the CPU path's); elsewhere the float kernel, rounded (the
    uint8 antialias kernel is CPU-only). The two agree within one level (tested).
    """
    if x.shape[1] == out_h and x.shape[2] == out_w:
        return x
    if x.device.type == "cpu":
        return F.interpolate(x[None], size=(out_h, out_w), mode="bilinear", antialias=True, align_corners=False)[0]
    y = F.interpolate(x[None].float(), size=(out_h, out_w), mode="bilinear", antialias=True, align_corners=False)
    return y[0].round_().clamp_(0, 255).to(torch.uint8)


def _decode_all(jpegs: list[torch.Tensor], device: torch.device) -> list[torch.Tensor | None]:
    """RGB uint8 [3,H,W] per JPEG on ``device`` (one batched call); None where the decoder refuses."""
    from torchvision.io import ImageReadMode, decode_jpeg

    with warnings.catch_warnings():
        # torchvision 0.29 deprecates its image codecs in favour of TorchCodec; they still work.
        warnings.simplefilter("ignore", DeprecationWarning)
        try:
            return list(decode_jpeg(jpegs, mode=ImageReadMode.RGB, device=device))
        except RuntimeError:  # one bad file fails the whole batched call: find it
            out: list[torch.Tensor | None] = []
            for j in jpegs:
                try:
                    out.append(decode_jpeg(j, mode=ImageReadMode.RGB, device=device))
                except RuntimeError:
                    out.append(None)
            return out


def _crop_resize(img: torch.Tensor, preset, width: int, height: int, box) -> torch.Tensor:
    """One decoded image -> uint8 [3,S,S], as ``preset`` would crop and resize it."""
    size = preset.size
    if isinstance(preset, TrainPreset):
        left, top, w, h = box
        return resize(img[:, top:top + h, left:left + w], size, size)
    new_w, new_h = resize_dims(width, height, preset.resize)
    resized = resize(img, new_h, new_w)
    top, left = int(round((new_h - size) / 2.0)), int(round((new_w - size) / 2.0))
    return resized[:, top:top + size, left:left + size]


def decode_batch(raw: RawBatch, device) -> "Batch":  # noqa: F821 - trainer.loader.Batch
    """Decode, crop, resize and flip ``raw`` on ``device``: the Batch the CPU path would yield."""
    from trainer.loader import Batch

    device = torch.device(device)
    offsets = raw.offsets.tolist()
    jpegs = [raw.data[offsets[i]:offsets[i + 1]] for i in range(len(raw.keys))]
    decoded = _decode_all(jpegs, device) if jpegs else []
    size = raw.preset.size
    out = torch.empty((len(jpegs), 3, size, size), dtype=torch.uint8, device=device)
    sizes, boxes, flips = raw.sizes.tolist(), raw.boxes.tolist(), raw.flips.tolist()
    kept, to_flip, skipped = [], [], 0
    for i, img in enumerate(decoded):
        width, height = sizes[i]
        try:
            if img is not None and tuple(img.shape) == (3, height, width):
                out[len(kept)] = _crop_resize(img, raw.preset, width, height, boxes[i])
                if flips[i]:
                    to_flip.append(len(kept))
            else:  # refused (or a size the header did not announce): the CPU path's pixels
                cpu = raw.preset(jpegs[i].numpy().tobytes(), raw.keys[i], raw.seed, raw.epoch)
                out[len(kept)].copy_(cpu, non_blocking=True)
        except Exception as exc:  # noqa: BLE001 - Pillow raises many types for bad data
            skipped += 1
            log.warning("skipped %s: undecodable (%s: %s)", raw.keys[i], type(exc).__name__, exc)
            continue
        kept.append(i)
    out = out[:len(kept)]
    if to_flip:
        idx = torch.tensor(to_flip, device=device)
        out[idx] = out[idx].flip(-1)
    labels = raw.labels if len(kept) == len(jpegs) else raw.labels[kept]
    keys = [raw.keys[i] for i in kept] if raw.with_keys else None
    return Batch(out, labels, raw.step, raw.micro, raw.num_micro, raw.num_skipped + skipped, keys, raw.index)


def resolve_device(name: str | None) -> torch.device:
    """The device GPU decode runs on: ``name``, else the current CUDA device."""
    if name:
        return torch.device(name)
    if not torch.cuda.is_available():
        from common.errors import UserError

        raise UserError("--decode gpu needs a CUDA GPU (none is visible): use --decode cpu")
    return torch.device("cuda", torch.cuda.current_device())
