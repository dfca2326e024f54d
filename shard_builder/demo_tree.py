"""Write a small, fake ILSVRC tree in exactly the Kaggle layout, quirks included.

    python -m shard_builder demo-tree DEST [--classes 20] [--train-per-class 40]
        [--val-per-class 10] [--test-images 5] [--seed 0] [--overwrite]

Why: the real download is ~160 GB, so the builder, the demo and the tests run on this
stand-in instead. DEST becomes "the folder that holds LOC_synset_mapping.txt" (see
docs/kaggle-layout.md). Every class has a distinct, crop-robust look (its own
hue pair and pattern kind/orientation/frequency) with per-image noise, offsets and
lighting, so a small ResNet learns it in a few CPU epochs at 32-64 px. Same arguments
give byte-identical files.

Class choice (seed-independent): real wnids in this priority order, then sorted:
n02105855 (PNG quirk), n01739381 (CMYK quirk), n02012849 + n03126707 (two "crane"),
n03710637 + n03710721 (two "maillot"), then the rest of the table below. More classes
than the table holds get generated wnids n099NNNNN with made-up names.

Quirk files, one of each, added ON TOP of the per-class counts. ``wnids`` is the sorted
class list, C its length, ``T = ILSVRC/Data/CLS-LOC/train``, ``V = .../val``:
  png           T/n02105855/n02105855_2933.JPEG  (PNG bytes)
  cmyk_train    T/n01739381/n01739381_1309.JPEG  (if C == 1: T/<wnids[0]>/<wnids[0]>_1309.JPEG)
  gray_train    T/<w>/<w>_4113.JPEG  with w = wnids[2 % C]   (mode L)
  truncated     T/<w>/<w>_5871.JPEG  with w = wnids[3 % C]   (cut in the scan data)
  undecodable   T/<w>/<w>_6102.JPEG  with w = wnids[4 % C]   (random bytes)
  lowercase_ext T/<w>/<w>_7246.jpeg  with w = wnids[5 % C]   (valid, must be included)
  non_jpeg      T/<wnids[0]>/notes.txt, and non_jpeg_val V/.DS_Store (ignored)
  cmyk_val      V/ILSVRC2012_val_00000001.JPEG  (class n01739381, else wnids[0])
  gray_val      V/ILSVRC2012_val_00000002.JPEG  (class wnids[-1])
  val_no_label  V/ILSVRC2012_val_<last>.JPEG    (valid JPEG, no row in LOC_val_solution.csv)
Ordinary val images take numbers 3..last-1, assigned to classes in shuffled order.
"""
from __future__ import annotations

import argparse
import colorsys
import io
import math
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from common.errors import UserError

_REAL = """\
n01440764 tench, Tinca tinca
n01443537 goldfish, Carassius auratus
n01484850 great white shark, white shark, man-eater, man-eating shark, Carcharodon carcharias
n01530575 brambling, Fringilla montifringilla
n01531178 goldfinch, Carduelis carduelis
n01614925 bald eagle, American eagle, Haliaeetus leucocephalus
n01632777 axolotl, mud puppy, Ambystoma mexicanum
n01644373 tree frog, tree-frog
n01677366 common iguana, iguana, Iguana iguana
n01739381 vine snake
n01744401 rock python, rock snake, Python sebae
n01751748 sea snake
n01774750 tarantula
n01806143 peacock
n01818515 macaw
n01882714 koala, koala bear, kangaroo bear, native bear, Phascolarctos cinereus
n01910747 jellyfish
n02007558 flamingo
n02012849 crane
n02077923 sea lion
n02099601 golden retriever
n02105855 Shetland sheepdog, Shetland sheep dog, Shetland
n02113186 Cardigan, Cardigan Welsh corgi
n02119789 kit fox, Vulpes macrotis
n02123045 tabby, tabby cat
n02129604 tiger, Panthera tigris
n02165456 ladybug, ladybeetle, lady beetle, ladybird, ladybird beetle
n02279972 monarch, monarch butterfly, milkweed butterfly, Danaus plexippus
n02391049 zebra
n02447366 badger
n02492035 capuchin, ringtail, Cebus capucinus
n02510455 giant panda, panda, panda bear, coon bear, Ailuropoda melanoleuca
n02747177 ashcan, trash can, garbage can, wastebin, ash bin, ash-bin, ashbin, dustbin, trash barrel, trash bin
n02963159 cardigan
n03018349 china cabinet, china closet
n03062245 cocktail shaker
n03126707 crane
n03347037 fire screen, fireguard
n03467068 guillotine
n03529860 home theater, home theatre
n03544143 hourglass
n03633091 ladle
n03710637 maillot
n03710721 maillot, tank suit
n03961711 plate rack
n04033995 quilt, comforter, comfort, puff
n04258138 solar dish, solar collector, solar furnace
n04264628 space bar
n04336792 stretcher
n04371774 swing
n04596742 wok
n07583066 guacamole
n13037406 gyromitra
"""
REAL_CLASSES: dict[str, str] = dict(line.split(" ", 1) for line in _REAL.splitlines())
_PRIORITY = ["n02105855", "n01739381", "n02012849", "n03126707", "n03710637", "n03710721"]
_ADJ = ["amber", "banded", "copper", "dappled", "emerald", "frosted", "gilded", "hazel", "ivory", "jade"]
_NOUN = ["kettle", "lantern", "marten", "nutcracker", "oriole", "pitcher", "quail", "reel", "sundial", "thimble"]
MAX_CLASSES = 1000

TRAIN_DIR = "ILSVRC/Data/CLS-LOC/train"
VAL_DIR = "ILSVRC/Data/CLS-LOC/val"
TEST_DIR = "ILSVRC/Data/CLS-LOC/test"
# kind, preferred wnid (None: wnids[index % C]), number, extension
_TRAIN_QUIRKS = [
    ("png", "n02105855", 2933, ".JPEG"),
    ("cmyk_train", "n01739381", 1309, ".JPEG"),
    ("gray_train", None, 4113, ".JPEG"),
    ("truncated", None, 5871, ".JPEG"),
    ("undecodable", None, 6102, ".JPEG"),
    ("lowercase_ext", None, 7246, ".jpeg"),
]
_RESERVED = {q[2] for q in _TRAIN_QUIRKS}
_OUR_TOP_LEVEL = ["LOC_synset_mapping.txt", "LOC_train_solution.csv", "LOC_val_solution.csv",
                  "LOC_sample_submission.csv", "ILSVRC"]


@dataclass(frozen=True)
class DemoTreeInfo:
    """What was written; relpaths are POSIX paths relative to ``root``."""

    root: Path
    wnids: list[str]
    names: dict[str, str]
    train: dict[str, str]        # images the builder must include -> wnid
    val: dict[str, str]          # images the builder must include -> wnid
    bad: dict[str, str]          # images the builder must skip and report -> reason
    ignored: list[str]           # non-JPEG files the builder must ignore silently
    quirks: dict[str, str]       # quirk kind -> relpath
    test: list[str] = field(default_factory=list)
    total_bytes: int = 0


def choose_classes(n: int) -> tuple[list[str], dict[str, str]]:
    """The ``n`` wnids (sorted) and their names; see the module docstring for the rule."""
    order = _PRIORITY + [w for w in REAL_CLASSES if w not in _PRIORITY]
    names = {w: REAL_CLASSES[w] for w in order[:n]}
    for i in range(n - len(names)):
        wnid = f"n099{i * 37 % 100000:05d}"  # 37 is coprime to 1e5: distinct for i < 1e5
        names[wnid] = f"{_ADJ[i % 10]} {_NOUN[i // 10 % 10]}" + (f" {i // 100}" if i >= 100 else "")
    return sorted(names), names


def _class_style(index: int, count: int) -> dict:
    """Crop-robust signature of class ``index``: hue pair, saturation, pattern, angle, frequency."""
    hue = index / count
    return {
        "hue": hue, "hue2": (hue + 0.35 + 0.3 * ((index * 7) % 5) / 4) % 1.0,
        "sat": 0.55 + 0.4 * ((index * 3) % 4) / 3, "kind": index % 4,
        "angle": math.radians((index * 47) % 180), "freq": 2.5 + (index * 5) % 7,
    }


def _render(rng: np.random.Generator, style: dict, width: int, height: int, noise: np.ndarray) -> np.ndarray:
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


def _encode(arr: np.ndarray, rng: np.random.Generator, fmt: str = "JPEG", mode: str = "RGB") -> bytes:
    img = Image.fromarray(arr).convert(mode)
    buf = io.BytesIO()
    if fmt == "PNG":
        img.save(buf, "PNG")
    else:
        img.save(buf, "JPEG", quality=int(rng.integers(75, 96)), subsampling=2)
    return buf.getvalue()


def _truncate(jpeg: bytes) -> bytes:
    """Keep the headers and half of the entropy-coded scan, as an interrupted copy would."""
    sos = jpeg.index(b"\xff\xda")
    return jpeg[: sos + (len(jpeg) - sos) // 2]


def _box(rng: np.random.Generator, w: int, h: int) -> tuple[int, int, int, int]:
    x0, y0 = int(rng.integers(0, w // 3)), int(rng.integers(0, h // 3))
    return x0, y0, int(rng.integers(2 * w // 3, w)), int(rng.integers(2 * h // 3, h))


def _xml(folder: str, stem: str, size: tuple[int, int], wnid: str, boxes: list) -> str:
    objs = "".join(
        f"\t<object>\n\t\t<name>{wnid}</name>\n\t\t<pose>Unspecified</pose>\n\t\t<truncated>0</truncated>\n"
        f"\t\t<difficult>0</difficult>\n\t\t<bndbox>\n\t\t\t<xmin>{b[0]}</xmin>\n\t\t\t<ymin>{b[1]}</ymin>\n"
        f"\t\t\t<xmax>{b[2]}</xmax>\n\t\t\t<ymax>{b[3]}</ymax>\n\t\t</bndbox>\n\t</object>\n" for b in boxes)
    return (f"<annotation>\n\t<folder>{folder}</folder>\n\t<filename>{stem}</filename>\n\t<source>\n"
            f"\t\t<database>ILSVRC_2012</database>\n\t</source>\n\t<size>\n\t\t<width>{size[0]}</width>\n"
            f"\t\t<height>{size[1]}</height>\n\t\t<depth>3</depth>\n\t</size>\n\t<segmented>0</segmented>\n"
            f"{objs}</annotation>\n")


def _prepare_dest(dest: Path, overwrite: bool) -> None:
    if dest.exists() and not dest.is_dir():
        raise UserError(f"{dest} is a file; give a folder to write the demo tree into")
    if dest.is_dir() and any(dest.iterdir()):
        if not overwrite:
            raise UserError(f"{dest} is not empty; pick an empty or new folder, or pass --overwrite")
        for name in _OUR_TOP_LEVEL:  # only what this command writes, never the whole folder
            target = dest / name
            if target.is_dir() and not target.is_symlink():
                shutil.rmtree(target)
            elif target.exists() or target.is_symlink():
                target.unlink()
    dest.mkdir(parents=True, exist_ok=True)


def write_demo_tree(dest, classes: int = 20, train_per_class: int = 40, val_per_class: int = 10,
                    test_images: int = 5, seed: int = 0, overwrite: bool = False) -> DemoTreeInfo:
    """Write the demo tree under ``dest`` and describe it (what the builder must include/skip)."""
    if not 1 <= classes <= MAX_CLASSES:
        raise UserError(f"--classes must be between 1 and {MAX_CLASSES}, got {classes}")
    for flag, value in (("--train-per-class", train_per_class), ("--val-per-class", val_per_class),
                        ("--test-images", test_images)):
        if value < 1:
            raise UserError(f"{flag} must be at least 1, got {value}")
    if seed < 0:
        raise UserError(f"--seed must be a non-negative integer, got {seed}")
    root = Path(dest)
    _prepare_dest(root, overwrite)
    wnids, names = choose_classes(classes)
    styles = {w: _class_style(i, classes) for i, w in enumerate(wnids)}
    rng = np.random.default_rng(seed)
    noise = rng.standard_normal((400, 400, 3), dtype=np.float32)
    total = 0

    def write(rel: str, data: bytes | str) -> None:
        nonlocal total
        raw = data.encode() if isinstance(data, str) else data
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(raw)
        total += len(raw)

    def image(wnid: str, mode: str = "RGB", fmt: str = "JPEG") -> tuple[bytes, tuple[int, int]]:
        w, h = (int(x) for x in rng.integers(96, 201, 2))
        return _encode(_render(rng, styles[wnid], w, h, noise), rng, fmt, mode), (w, h)

    train: dict[str, str] = {}
    bad: dict[str, str] = {}
    quirks: dict[str, str] = {}
    sizes: dict[str, tuple[int, int]] = {}
    for wnid in wnids:  # ordinary train images: <wnid>_<n>.JPEG, n random, distinct, varying width
        numbers: set[int] = set()
        while len(numbers) < train_per_class:
            n = int(10 ** rng.uniform(1.0, 4.6))
            if n not in _RESERVED:
                numbers.add(n)
        for n in sorted(numbers):
            rel = f"{TRAIN_DIR}/{wnid}/{wnid}_{n}.JPEG"
            data, sizes[rel] = image(wnid)
            write(rel, data)
            train[rel] = wnid
    boxed = [rel for rel in train if rng.random() < 0.4]  # only part of train has boxes
    for i, (kind, preferred, n, ext) in enumerate(_TRAIN_QUIRKS):
        wnid = preferred if preferred in names else wnids[i % classes]
        rel = f"{TRAIN_DIR}/{wnid}/{wnid}_{n}{ext}"
        quirks[kind] = rel
        if kind == "undecodable":
            write(rel, b"\x00\xffJUNK\x00\x00" + rng.bytes(int(rng.integers(2000, 6000))))
            bad[rel] = "undecodable: not an image"
            continue
        mode = {"cmyk_train": "CMYK", "gray_train": "L"}.get(kind, "RGB")
        data, _ = image(wnid, mode, "PNG" if kind == "png" else "JPEG")
        if kind == "truncated":
            write(rel, _truncate(data))
            bad[rel] = "truncated JPEG"
            continue
        write(rel, data)
        train[rel] = wnid
    quirks["non_jpeg"] = f"{TRAIN_DIR}/{wnids[0]}/notes.txt"
    quirks["non_jpeg_val"] = f"{VAL_DIR}/.DS_Store"
    write(quirks["non_jpeg"], "Notes kept next to the images; not part of the data set.\n")
    write(quirks["non_jpeg_val"], b"\x00\x00\x00\x01Bud1" + rng.bytes(64))

    # val: FLAT folder, numbers 1..last; labels only in LOC_val_solution.csv
    plain = [w for w in wnids for _ in range(val_per_class)]
    rng.shuffle(plain)
    last = len(plain) + 3
    cmyk_class = "n01739381" if "n01739381" in names else wnids[0]
    val_plan = [(1, cmyk_class, "CMYK"), (2, wnids[-1], "L")]
    val_plan += [(3 + i, w, "RGB") for i, w in enumerate(plain)] + [(last, wnids[0], "RGB")]
    val: dict[str, str] = {}
    val_rows: list[str] = []
    for number, wnid, mode in val_plan:
        stem = f"ILSVRC2012_val_{number:08d}"
        rel = f"{VAL_DIR}/{stem}.JPEG"
        data, size = image(wnid, mode)
        write(rel, data)
        if number == last:
            quirks["val_no_label"] = rel
            bad[rel] = "no label in LOC_val_solution.csv"
            continue
        val[rel] = wnid
        groups = 2 if number == 3 else 1 + int(rng.random() < 0.3) + int(rng.random() < 0.05)
        boxes = [_box(rng, *size) for _ in range(groups)]
        val_rows.append(f"{stem}," + " ".join(f"{wnid} {b[0]} {b[1]} {b[2]} {b[3]}" for b in boxes))
        write(f"ILSVRC/Annotations/CLS-LOC/val/{stem}.xml", _xml("val", stem, size, wnid, boxes))
    quirks["cmyk_val"] = f"{VAL_DIR}/ILSVRC2012_val_00000001.JPEG"
    quirks["gray_val"] = f"{VAL_DIR}/ILSVRC2012_val_00000002.JPEG"
    rng.shuffle(val_rows)  # real row order is not by ImageId: readers must look rows up

    test = []
    for number in range(1, test_images + 1):
        rel = f"{TEST_DIR}/ILSVRC2012_test_{number:08d}.JPEG"
        write(rel, image(wnids[int(rng.integers(0, classes))])[0])
        test.append(rel)

    train_rows = []
    for rel in boxed:
        wnid, stem = train[rel], rel.rsplit("/", 1)[1].rsplit(".", 1)[0]
        boxes = [_box(rng, *sizes[rel]) for _ in range(1 + int(rng.random() < 0.2))]
        train_rows.append(f"{stem}," + " ".join(f"{wnid} {b[0]} {b[1]} {b[2]} {b[3]}" for b in boxes))
        write(f"ILSVRC/Annotations/CLS-LOC/train/{wnid}/{stem}.xml", _xml(wnid, stem, sizes[rel], wnid, boxes))
    rng.shuffle(train_rows)

    write("LOC_synset_mapping.txt", "".join(f"{w} {names[w]}\n" for w in wnids))
    write("LOC_val_solution.csv", "ImageId,PredictionString\n" + "".join(r + "\n" for r in val_rows))
    write("LOC_train_solution.csv", "ImageId,PredictionString\n" + "".join(r + "\n" for r in train_rows))
    top5 = " ".join(f"{w} 0 0 100 100" for w in wnids[:5])
    write("LOC_sample_submission.csv", "ImageId,PredictionString\n"
          + "".join(f"{Path(rel).stem},{top5}\n" for rel in test))

    def listing(rels) -> str:
        return "".join(f"{r} {i}\n" for i, r in enumerate(rels, 1))

    train_ids = sorted(r[len(TRAIN_DIR) + 1:].rsplit(".", 1)[0] for r in list(train) + [quirks["truncated"],
                                                                                      quirks["undecodable"]])
    boxed_ids = sorted(r[len(TRAIN_DIR) + 1:].rsplit(".", 1)[0] for r in boxed)
    sets = "ILSVRC/ImageSets/CLS-LOC"
    write(f"{sets}/train_cls.txt", listing(train_ids))
    write(f"{sets}/train_loc.txt", listing(boxed_ids))
    write(f"{sets}/val.txt", listing(f"ILSVRC2012_val_{n:08d}" for n in range(1, last + 1)))
    write(f"{sets}/test.txt", listing(Path(r).stem for r in test))

    return DemoTreeInfo(root=root, wnids=wnids, names=names, train=train, val=val, bad=bad,
                        ignored=[quirks["non_jpeg"], quirks["non_jpeg_val"]], quirks=quirks,
                        test=test, total_bytes=total)


def summary(info: DemoTreeInfo) -> str:
    """One paragraph for the terminal: what was written and what the builder should do with it."""
    quirk_list = ", ".join(f"{kind}={Path(rel).name}" for kind, rel in info.quirks.items())
    return (f"Wrote a demo ILSVRC tree (Kaggle layout) to {info.root}: {len(info.wnids)} classes "
            f"({info.wnids[0]} .. {info.wnids[-1]}), {len(info.train)} train and {len(info.val)} val images "
            f"to include, {len(info.test)} test images, {len(info.bad)} files to skip and report, "
            f"{len(info.ignored)} non-JPEG files to ignore; quirks: {quirk_list}; "
            f"{info.total_bytes / 1e6:.1f} MB in all. Next: python -m shard_builder build "
            f"--source {info.root} --output <shard folder>")


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "demo-tree", help="write a small fake ILSVRC tree in the Kaggle layout (with quirks)",
        description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("dest", type=Path, help="folder to create; it will hold LOC_synset_mapping.txt")
    p.add_argument("--classes", type=int, default=20, help="number of classes")
    p.add_argument("--train-per-class", type=int, default=40, help="ordinary train images per class")
    p.add_argument("--val-per-class", type=int, default=10, help="ordinary val images per class")
    p.add_argument("--test-images", type=int, default=5, help="unlabeled test images")
    p.add_argument("--seed", type=int, default=0, help="same seed and arguments give identical bytes")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the LOC_* files and ILSVRC/ folder if DEST is not empty")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    info = write_demo_tree(args.dest, classes=args.classes, train_per_class=args.train_per_class,
                           val_per_class=args.val_per_class, test_images=args.test_images,
                           seed=args.seed, overwrite=args.overwrite)
    print(summary(info))
    return 0
