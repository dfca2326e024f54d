"""Per-sample decode + augment presets (DataLoader workers) and batched device ops (trainer).

    train = TrainPreset(224)
    chw = train(jpeg_bytes, "n01440764_10026", seed=0, epoch=3)   # uint8 [3, 224, 224]
    val = EvalPreset(224, resize=256)                              # shorter side 256, center 224

    normalize, jitter = DeviceNormalize(), DeviceColorJitter(0.4, 0.4, 0.4)
    x = batch.images.to(device, non_blocking=True)                 # uint8 [B, 3, H, W]
    x = normalize(jitter(x, jitter_generator(seed, epoch, step)))  # float [B, 3, H, W]

Workers do only what must happen per image: decode, crop, resize, flip, emitting uint8 (4x
less to move than float). Normalization and color jitter are cheap batched tensor ops, so
they run on the device.

Decode is "crop box first": read the JPEG header, choose the crop box on full-size
coordinates, then decode at the smallest DCT scale that still leaves the box at least the
output size (so no visible detail is lost) and resize only the box. Two interchangeable paths
(``bench/bench_loader.py`` measures both):

* ``"simplejpeg"`` (default): libjpeg-turbo through simplejpeg, whose scaled decode offers
  n/8 factors, straight to numpy; then torch's uint8 antialiased bilinear resize (SIMD, about
  2x Pillow's), as torchvision does for tensors. Anything turbo refuses (CMYK, PNG, libjpeg
  warnings) falls back to the Pillow path, so both accept and reject the same files.
* ``"pil"``: Pillow's ``draft`` (1/2, 1/4, 1/8 scales) and one ``resize(box=...)`` call
  (BILINEAR with antialias, as torchvision's PIL path).

Every mode (L, CMYK, P, RGBA) comes out RGB. Truncated or undecodable data raises.

Randomness: each sample's crop and flip come from a ``random.Random`` seeded by a hash of
(seed, epoch, key), so they do not depend on worker count, batch order or resume point.
Presets are small immutable callables with no global state.
"""
from __future__ import annotations

import hashlib
import io
import math
import random

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

BILINEAR = Image.Resampling.BILINEAR
DECODERS = ("simplejpeg", "pil")
_DCT_SCALES = (8, 4, 2)


def sample_rng(seed: int, epoch: int, key: str) -> random.Random:
    """A generator private to one sample in one epoch (hash, so no global stream is consumed)."""
    digest = hashlib.blake2b(f"{seed}\x00{epoch}\x00{key}".encode(), digest_size=8).digest()
    return random.Random(int.from_bytes(digest, "little"))


def random_resized_crop_box(width: int, height: int, rng: random.Random, scale=(0.08, 1.0),
                            ratio=(3 / 4, 4 / 3)) -> tuple[int, int, int, int]:
    """(left, top, w, h): torchvision's RandomResizedCrop.get_params, including its fallback
    to a central crop clamped to ``ratio`` after 10 failed tries, with ``rng`` as the source."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = rng.randint(0, height - h)
            left = rng.randint(0, width - w)
            return left, top, w, h
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        w, h = int(round(height * max(ratio))), height
    else:
        w, h = width, height
    return (width - w) // 2, (height - h) // 2, w, h


def resize_dims(width: int, height: int, resize: int) -> tuple[int, int]:
    """(w, h) after torchvision's Resize(resize): shorter side -> resize, longer truncated."""
    if width <= height:
        return resize, int(resize * height / width)
    return int(resize * width / height), resize


def _pil_image(jpeg: bytes, need_w: float, need_h: float) -> Image.Image:
    """Pillow decode at the smallest 1/s scale keeping the image >= need_w x need_h, as RGB."""
    im = Image.open(io.BytesIO(jpeg))
    if im.format == "JPEG":
        for s in _DCT_SCALES:
            if im.width >= need_w * s and im.height >= need_h * s:
                im.draft("RGB", (im.width // s, im.height // s))  # size becomes ceil(width / s)
                break
    return im.convert("RGB")


def _size(jpeg: bytes, turbo: bool) -> tuple[int, int]:
    """(width, height) from the header alone."""
    if turbo:
        import simplejpeg

        try:
            height, width, _, _ = simplejpeg.decode_jpeg_header(jpeg)
            return width, height
        except ValueError:
            pass  # not a JPEG turbo can parse: let Pillow say what it is
    return Image.open(io.BytesIO(jpeg)).size


def _decode_scaled(jpeg: bytes, need_w: float, need_h: float) -> np.ndarray:
    """RGB HWC uint8 of the whole image, scaled down as far as possible while staying
    >= need_w x need_h (turbo first, Pillow for what turbo refuses)."""
    import simplejpeg

    try:
        height, width, _, _ = simplejpeg.decode_jpeg_header(jpeg)
        # Only 1/2, 1/4, 1/8: turbo's other n/8 factors use slow non-SIMD IDCTs and cost more
        # than a full decode. Asking for ceil(size / s) makes turbo pick exactly 1/s.
        s = next((s for s in _DCT_SCALES if width >= need_w * s and height >= need_h * s), 1)
        return simplejpeg.decode_jpeg(jpeg, colorspace="RGB", min_width=-(-width // s), min_height=-(-height // s),
                                      strict=True)
    except ValueError:
        return np.array(_pil_image(jpeg, need_w, need_h))  # a writable copy, as torch wants


def _resize(arr: np.ndarray, out_w: int, out_h: int) -> torch.Tensor:
    """uint8 HWC (any strides) -> uint8 [3, out_h, out_w] contiguous, bilinear with antialias
    (torch's uint8 SIMD path). CHW out, because that is what the kernel writes: converting its
    output back to HWC would cost as much as the resize itself."""
    x = torch.from_numpy(arr).permute(2, 0, 1).unsqueeze(0)  # [1,3,h,w] view of the HWC pixels
    if arr.shape[0] == out_h and arr.shape[1] == out_w:
        return x[0].contiguous()
    return F.interpolate(x, size=(out_h, out_w), mode="bilinear", antialias=True, align_corners=False)[0]


def _pil_to_chw(im: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.array(im)).permute(2, 0, 1).contiguous()


def _scaled_box(box, arr: np.ndarray, width: int, height: int) -> tuple[int, int, int, int]:
    """A (left, top, w, h) box of the full-size image in pixels of ``arr`` (a scaled decode)."""
    fx, fy = arr.shape[1] / width, arr.shape[0] / height
    left, top = min(round(box[0] * fx), arr.shape[1] - 1), min(round(box[1] * fy), arr.shape[0] - 1)
    return left, top, max(1, min(round(box[2] * fx), arr.shape[1] - left)), max(1, min(round(box[3] * fy),
                                                                                       arr.shape[0] - top))


class TrainPreset:
    """RandomResizedCrop(size, scale, ratio) + horizontal flip, seeded per (seed, epoch, key)."""

    def __init__(self, size: int = 224, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), hflip_prob: float = 0.5,
                 decoder: str = "simplejpeg"):
        if decoder not in DECODERS:
            raise ValueError(f"decoder must be one of {DECODERS}, not {decoder!r}")
        self.size, self.scale, self.ratio = size, tuple(scale), tuple(ratio)
        self.hflip_prob, self.decoder = hflip_prob, decoder

    def params(self, width: int, height: int, key: str, seed: int, epoch: int) -> tuple[tuple[int, ...], bool]:
        """(crop box (left, top, w, h) in full-size pixels, flip) of one sample: the one place
        the random choices are made, shared by this CPU path and GPU decode (trainer.gpu_decode)."""
        rng = sample_rng(seed, epoch, key)
        box = random_resized_crop_box(width, height, rng, self.scale, self.ratio)
        return box, rng.random() < self.hflip_prob

    def __call__(self, jpeg: bytes, key: str, seed: int, epoch: int) -> torch.Tensor:
        """uint8 [3, size, size]; raises on undecodable or truncated data."""
        size, turbo = self.size, self.decoder == "simplejpeg"
        width, height = _size(jpeg, turbo)
        box, flip = self.params(width, height, key, seed, epoch)
        # The box stays >= size x size when the whole image stays >= these dimensions.
        need_w, need_h = width * size / box[2], height * size / box[3]
        if turbo:
            arr = _decode_scaled(jpeg, need_w, need_h)
            left, top, w, h = _scaled_box(box, arr, width, height)
            out = _resize(arr[top:top + h, left:left + w], size, size)
        else:
            im = _pil_image(jpeg, need_w, need_h)
            fx, fy = im.width / width, im.height / height
            left, top, w, h = box
            out = _pil_to_chw(im.resize((size, size), BILINEAR, box=(
                left * fx, top * fy, min((left + w) * fx, im.width), min((top + h) * fy, im.height))))
        return out.flip(-1) if flip else out

    def __repr__(self) -> str:
        return f"TrainPreset(size={self.size}, scale={self.scale}, ratio={self.ratio}, decoder={self.decoder!r})"


class EvalPreset:
    """Resize the shorter side to ``resize``, center crop ``size`` (torchvision's eval transform)."""

    def __init__(self, size: int = 224, resize: int = 256, decoder: str = "simplejpeg"):
        if resize < size:
            raise ValueError(f"resize ({resize}) must be >= size ({size})")
        if decoder not in DECODERS:
            raise ValueError(f"decoder must be one of {DECODERS}, not {decoder!r}")
        self.size, self.resize, self.decoder = size, resize, decoder

    def __call__(self, jpeg: bytes, key: str = "", seed: int = 0, epoch: int = 0) -> torch.Tensor:
        """uint8 [3, size, size]; deterministic (key/seed/epoch only keep the preset signature)."""
        turbo = self.decoder == "simplejpeg"
        width, height = _size(jpeg, turbo)
        new_w, new_h = resize_dims(width, height, self.resize)
        if turbo:
            resized = _resize(_decode_scaled(jpeg, new_w, new_h), new_w, new_h)
        else:
            resized = _pil_to_chw(_pil_image(jpeg, new_w, new_h).resize((new_w, new_h), BILINEAR))
        top, left = int(round((new_h - self.size) / 2.0)), int(round((new_w - self.size) / 2.0))
        return resized[:, top:top + self.size, left:left + self.size]

    def __repr__(self) -> str:
        return f"EvalPreset(size={self.size}, resize={self.resize}, decoder={self.decoder!r})"


# --------------------------------------------------------------------------- device side
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def jitter_generator(seed: int, epoch: int, step: int) -> torch.Generator:
    """A CPU generator for one step's jitter: the same factors on any device and after resume."""
    digest = hashlib.blake2b(f"jitter\x00{seed}\x00{epoch}\x00{step}".encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little") >> 1)


def _as_unit_float(x: torch.Tensor) -> torch.Tensor:
    return x.float().div_(255) if x.dtype == torch.uint8 else x.float()


def _gray(x: torch.Tensor) -> torch.Tensor:
    """[B,3,H,W] -> [B,1,H,W] luma with torchvision's rgb_to_grayscale weights."""
    return (0.2989 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3])


class DeviceColorJitter:
    """Batched ColorJitter(brightness, contrast, saturation) on any device.

    Input: uint8 or float in [0, 1], [B,3,H,W]; output float in [0, 1]. Factors are drawn per
    image uniformly from [max(0, 1-v), 1+v] like torchvision; the order of the three ops is
    drawn once per batch (torchvision draws it per image), which keeps it three tensor ops.
    """

    def __init__(self, brightness: float = 0.4, contrast: float = 0.4, saturation: float = 0.4):
        self.ranges = {name: (max(0.0, 1 - v), 1 + v) for name, v in
                       (("brightness", brightness), ("contrast", contrast), ("saturation", saturation)) if v > 0}

    def __call__(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        x = _as_unit_float(images)
        n = x.shape[0]
        # Draw on the generator's device, then move: the same numbers whatever device x is on.
        order = torch.randperm(len(self.ranges), generator=generator, device=generator.device).tolist()
        names = list(self.ranges)
        factors = {name: torch.empty(n, device=generator.device).uniform_(lo, hi, generator=generator)
                   .to(x.device).view(n, 1, 1, 1) for name, (lo, hi) in self.ranges.items()}
        for i in order:
            name, f = names[i], factors[names[i]]
            if name == "brightness":
                x = x * f
            elif name == "contrast":
                x = f * x + (1 - f) * _gray(x).mean(dim=(1, 2, 3), keepdim=True)
            else:
                x = f * x + (1 - f) * _gray(x)
            x = x.clamp_(0, 1)
        return x

    def __repr__(self) -> str:
        return f"DeviceColorJitter({self.ranges})"


class DeviceNormalize:
    """(x - mean) / std per channel on a batch; uint8 input is scaled to [0, 1] first.

    Keeps the input's memory format (the loader's batches are channels_last).
    """

    def __init__(self, mean=IMAGENET_MEAN, std=IMAGENET_STD, dtype: torch.dtype = torch.float32):
        self.mean, self.std, self.dtype = tuple(mean), tuple(std), dtype

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        x = _as_unit_float(images)
        mean = torch.tensor(self.mean, device=x.device).view(1, -1, 1, 1)
        std = torch.tensor(self.std, device=x.device).view(1, -1, 1, 1)
        return ((x - mean) / std).to(self.dtype)

    def __repr__(self) -> str:
        return f"DeviceNormalize(mean={self.mean}, std={self.std}, dtype={self.dtype})"
