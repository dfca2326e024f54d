"""A Kaggle-layout tree of realistic photos for benchmarks (not for tests).

    python bench/photos.py /tmp/bench-photos --classes 10 --per-class 200

The demo tree's images are small synthetic patterns; benchmarks need ImageNet-like
files: about 110 KB and 470x390 on average. This writes the demo tree's layout (same
CSVs, same quirks) and then replaces every ordinary image with a random crop of one of
the photos that scikit-image ships (astronaut, coffee, chelsea, rocket, ...), rescaled,
flipped, with mild sensor noise, saved at JPEG quality 92-97.
"""
from __future__ import annotations

import argparse
import io
import json
import sys
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from shard_builder.demo_tree import write_demo_tree  # noqa: E402

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry", "retina", "hubble_deep_field")


def _sources() -> list[Image.Image]:
    try:
        import skimage.data as data
    except ImportError:
        sys.exit("bench needs scikit-image for its sample photos: pip install scikit-image (make bench does)")
    return [Image.fromarray(getattr(data, name)()) for name in PHOTOS]


def _photo(rng: np.random.Generator, sources: list[Image.Image]) -> bytes:
    src = sources[rng.integers(len(sources))]
    w, h = int(rng.integers(380, 561)), int(rng.integers(320, 461))   # mean about 470 x 390
    scale = max(w / src.width, h / src.height) * rng.uniform(1.0, 1.6)
    big = src.resize((int(src.width * scale) + 1, int(src.height * scale) + 1), Image.Resampling.BILINEAR)
    x, y = int(rng.integers(0, big.width - w + 1)), int(rng.integers(0, big.height - h + 1))
    arr = np.asarray(big.crop((x, y, x + w, y + h)), dtype=np.float32)
    if rng.random() < 0.5:
        arr = arr[:, ::-1]
    arr = arr * rng.uniform(0.8, 1.2) + rng.normal(0, rng.uniform(10, 17), arr.shape)  # exposure + sensor noise
    buf = io.BytesIO()
    Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)).save(buf, "JPEG", quality=int(rng.integers(92, 98)))
    return buf.getvalue()


def make_photo_tree(dest: str | Path, classes: int = 10, per_class: int = 200, val_per_class: int = 20,
                    seed: int = 0, unique: int = 400) -> Path:
    """Write (or reuse, when the same arguments made it) the photo tree; returns its root."""
    root = Path(dest)
    stamp = root.parent / f".{root.name}.args.json"
    args = {"classes": classes, "per_class": per_class, "val_per_class": val_per_class, "seed": seed, "unique": unique, "v": 2}
    if stamp.exists() and json.loads(stamp.read_text()) == args and (root / "LOC_synset_mapping.txt").exists():
        return root
    info = write_demo_tree(root, classes=classes, train_per_class=per_class, val_per_class=val_per_class,
                           test_images=1, seed=seed, overwrite=True)
    rng, sources = np.random.default_rng(seed), _sources()
    # A pool of distinct photos, reused across files: generating each one costs ~30 ms,
    # and neither tar nor the builder's copy mode cares whether bytes repeat.
    pool = [_photo(rng, sources) for _ in range(min(unique, len(info.train) + len(info.val)))]
    quirks = set(info.quirks.values())
    for rel in sorted({**info.train, **info.val}):
        if rel not in quirks:
            (root / rel).write_bytes(pool[int(rng.integers(len(pool)))])
    stamp.write_text(json.dumps(args))
    return root


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("dest")
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--per-class", type=int, default=200)
    p.add_argument("--val-per-class", type=int, default=20)
    a = p.parse_args()
    r = make_photo_tree(a.dest, a.classes, a.per_class, a.val_per_class)
    files = [f for f in r.rglob("*.JPEG")]
    print(f"{r}: {len(files)} files, mean {sum(f.stat().st_size for f in files) / len(files) / 1e3:.0f} KB")
