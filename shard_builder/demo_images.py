"""Pixels and annotation files of the demo ILSVRC tree (shard_builder.demo_tree writes them).

    python -m shard_builder demo-tree DEST     # uses these; see shard_builder/demo_tree.py

Every class has a distinct, crop-robust look (its own hue pair and pattern kind /
orientation / frequency) with per-image noise, offsets and lighting. All randomness comes
from the caller's generator, so the same seed gives byte-identical files.
"""
from __future__ import annotations

import colorsys
import io
import math

import numpy as np
from PIL import Image


def class_style(index: int, count: int) -> dict:
    """Crop-robust signature of class ``index``: hue pair, saturation, pattern, angle, frequency."""
    hue = index / count
    return {
        "hue": hue, "hue2": (hue + 0.35 + 0.3 * ((index * 7) % 5) / 4) % 1.0,
        "sat": 0.55 + 0.4 * ((index * 3) % 4) / 3, "kind": index % 4,
        "angle": math.radians((index * 47) % 180), "freq": 2.5 + (index * 5) % 7,
    }


def render(rng: np.random.Generator, style: dict, width: int, height: int, noise: np.ndarray) -> np.ndarray:
    """An RGB uint8 image: the class pattern with per-image jitter, lighting and noise.

    ``noise`` is a bank of unit Gaussian noise larger than any image; each image takes a
    random window of it (drawing fresh noise per image was most of the generation time).
    """
    scale = max(width, height)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32) / scale
    angle = style["angle"] + float(rng.normal(0, 0.12))
    freq = style["freq"] * float(rng.uniform(0.85, 1.15))
    ph1, ph2 = (float(x) for x in rng.uniform(0, 2 * math.pi, 2))
    u = xx * math.cos(angle) + yy * math.sin(angle)
    v = -xx * math.sin(angle) + yy * math.cos(angle)
    two_pi_f = 2 * math.pi * freq
    kind = style["kind"]
    if kind == 0:    # stripes
        p = np.sin(two_pi_f * u + ph1)
    elif kind == 1:  # checker
        p = np.sin(two_pi_f * u + ph1) * np.sin(two_pi_f * v + ph2) * 2
    elif kind == 2:  # rings around a random centre
        cx, cy = (float(x) for x in rng.uniform(0.2, 0.8, 2))
        p = np.sin(two_pi_f * np.hypot(xx - cx, yy - cy) + ph1)
    else:            # wavy stripes
        p = np.sin(two_pi_f * u + 1.8 * np.sin(two_pi_f * 0.5 * v + ph2) + ph1)
    p = np.clip(p * float(rng.uniform(0.5, 1.25)) + 0.5, 0.0, 1.0)[..., None]
    jitter = float(rng.normal(0, 0.012))
    col_a = np.array(colorsys.hsv_to_rgb((style["hue"] + jitter) % 1.0, style["sat"], 0.95), np.float32)
    col_b = np.array(colorsys.hsv_to_rgb((style["hue2"] + jitter) % 1.0, 0.5, 0.35), np.float32)
    img = (p * col_a + (1 - p) * col_b) * 255.0
    gx, gy = (float(x) for x in rng.normal(0, 0.3, 2))
    light = float(rng.uniform(0.75, 1.15)) * (1 + gx * (xx - 0.5) + gy * (yy - 0.5))
    oy, ox = rng.integers(0, noise.shape[0] - height), rng.integers(0, noise.shape[1] - width)
    img = img * light[..., None] + noise[oy:oy + height, ox:ox + width] * float(rng.uniform(5, 14))
    return np.clip(img, 0, 255).astype(np.uint8)


def encode(arr: np.ndarray, rng: np.random.Generator, fmt: str = "JPEG", mode: str = "RGB") -> bytes:
    img = Image.fromarray(arr).convert(mode)
    buf = io.BytesIO()
    if fmt == "PNG":
        img.save(buf, "PNG")
    else:
        img.save(buf, "JPEG", quality=int(rng.integers(75, 96)), subsampling=2)
    return buf.getvalue()


def truncate(jpeg: bytes) -> bytes:
    """Keep the headers and half of the entropy-coded scan, as an interrupted copy would."""
    sos = jpeg.index(b"\xff\xda")
    return jpeg[: sos + (len(jpeg) - sos) // 2]


def box(rng: np.random.Generator, w: int, h: int) -> tuple[int, int, int, int]:
    x0, y0 = int(rng.integers(0, w // 3)), int(rng.integers(0, h // 3))
    return x0, y0, int(rng.integers(2 * w // 3, w)), int(rng.integers(2 * h // 3, h))


def annotation_xml(folder: str, stem: str, size: tuple[int, int], wnid: str, boxes: list) -> str:
    objs = "".join(
        f"\t<object>\n\t\t<name>{wnid}</name>\n\t\t<pose>Unspecified</pose>\n\t\t<truncated>0</truncated>\n"
        f"\t\t<difficult>0</difficult>\n\t\t<bndbox>\n\t\t\t<xmin>{b[0]}</xmin>\n\t\t\t<ymin>{b[1]}</ymin>\n"
        f"\t\t\t<xmax>{b[2]}</xmax>\n\t\t\t<ymax>{b[3]}</ymax>\n\t\t</bndbox>\n\t</object>\n" for b in boxes)
    return (f"<annotation>\n\t<folder>{folder}</folder>\n\t<filename>{stem}</filename>\n\t<source>\n"
            f"\t\t<database>ILSVRC_2012</database>\n\t</source>\n\t<size>\n\t\t<width>{size[0]}</width>\n"
            f"\t\t<height>{size[1]}</height>\n\t\t<depth>3</depth>\n\t</size>\n\t<segmented>0</segmented>\n"
            f"{objs}</annotation>\n")
