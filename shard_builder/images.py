"""Turn one source file into the JPEG bytes a shard stores, or say why it must be skipped.

Copy mode (the default) keeps a JPEG's bytes unchanged: no re-encode, no quality loss,
and no full decode on the hot path. Only files that need it are decoded and re-encoded
as RGB JPEG: a PNG saved as .JPEG, CMYK and grayscale JPEGs (so every reader gets RGB
from Pillow), and images larger than ``--resize-max-side``.

Truncation check without a full decode: a complete JPEG ends with the EOI marker
(FF D9), possibly followed by padding. Only files that lack it get a full decode, which
then decides whether they are usable.
"""
from __future__ import annotations

import io
from dataclasses import dataclass

from PIL import Image, ImageFile

ImageFile.LOAD_TRUNCATED_IMAGES = False
Image.MAX_IMAGE_PIXELS = None  # some ImageNet images are large but legitimate


class BadImage(Exception):
    """The file cannot be used; the message is the reason recorded in the manifest."""


@dataclass(frozen=True)
class Prepared:
    data: bytes
    width: int
    height: int
    reencoded: bool


def _ends_with_eoi(data: bytes) -> bool:
    """EOI, allowing up to ~60 bytes of padding; only the tail is copied, never the image.
    (Longer padding just takes the slow path: a full decode decides.)"""
    return data[-64:].rstrip(b"\x00\r\n ").endswith(b"\xff\xd9")


# Start-of-frame markers (baseline, extended, progressive, lossless; not DHT/JPG/DAC).
_SOF = frozenset({0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF})


def jpeg_header(data: bytes) -> tuple[int, int, int] | None:
    """(width, height, components) from a JPEG's frame header, or None if unsure.

    Walks the marker segments up to the first SOF, about 50x cheaper than Image.open on
    the hot path. Anything unusual returns None and Pillow decides instead.
    """
    if data[:2] != b"\xff\xd8":
        return None
    i, n = 2, len(data)
    while i + 4 <= n:
        if data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if 0xD0 <= marker <= 0xD8 or marker == 0x01:  # segments without a length
            i += 2
            continue
        if marker in _SOF:
            if i + 10 > n:
                return None
            height = int.from_bytes(data[i + 5:i + 7], "big")
            width = int.from_bytes(data[i + 7:i + 9], "big")
            return (width, height, data[i + 9]) if width and height else None
        if marker == 0xDA:  # scan before any frame header
            return None
        i += 2 + int.from_bytes(data[i + 2:i + 4], "big")
    return None


def prepare_image(data: bytes, resize_max_side: int | None = None, quality: int = 90) -> Prepared:
    """Validate ``data`` and return what to store (see module docstring)."""
    header = jpeg_header(data)
    if header is not None and header[2] == 3 and not (resize_max_side and max(header[:2]) > resize_max_side):
        if _ends_with_eoi(data):  # the common case: a complete 3-channel JPEG, stored as is
            return Prepared(data, header[0], header[1], False)
    try:
        im = Image.open(io.BytesIO(data))
        fmt, mode, (w, h) = im.format, im.mode, im.size
    except Exception as exc:  # noqa: BLE001 - Pillow raises many types for garbage
        raise BadImage(f"undecodable: not an image ({type(exc).__name__})") from None
    too_big = bool(resize_max_side) and max(w, h) > resize_max_side
    if fmt == "JPEG" and mode == "RGB" and not too_big:
        if not _ends_with_eoi(data):
            _full_decode(im, fmt)
        return Prepared(data, w, h, False)

    if too_big and fmt == "JPEG":
        # DCT-domain downscale first (exact, fast) when the target is at most half size.
        scale = resize_max_side / max(w, h)
        im.draft("RGB", (max(1, int(w * scale)), max(1, int(h * scale))))
    _full_decode(im, fmt)
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        rgba = im.convert("RGBA")
        rgb = Image.new("RGB", rgba.size, (255, 255, 255))
        rgb.paste(rgba, mask=rgba.getchannel("A"))
    else:
        rgb = im.convert("RGB")
    if too_big and max(rgb.size) > resize_max_side:
        scale = resize_max_side / max(rgb.size)
        size = (max(1, round(rgb.width * scale)), max(1, round(rgb.height * scale)))
        rgb = rgb.resize(size, Image.Resampling.BICUBIC)
    buf = io.BytesIO()
    rgb.save(buf, format="JPEG", quality=quality, subsampling="4:2:0")
    return Prepared(buf.getvalue(), rgb.width, rgb.height, True)


def _full_decode(im: Image.Image, fmt: str | None) -> None:
    try:
        im.load()
    except Exception as exc:  # noqa: BLE001
        raise BadImage(f"truncated or corrupt {fmt or 'image'}: {exc}") from None
