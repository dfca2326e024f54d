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
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from common.errors import UserError
from shard_builder.demo_images import annotation_xml, box, class_style, encode, render, truncate

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
    t = _TreeWriter(root, classes, seed)
    boxed = t.train_images(train_per_class)
    t.quirk_files()
    val_rows, last = t.val_images(val_per_class)
    test = t.test_images(test_images)
    t.metadata(boxed, val_rows, last, test)
    return DemoTreeInfo(root=root, wnids=t.wnids, names=t.names, train=t.train, val=t.val, bad=t.bad,
                        ignored=[t.quirks["non_jpeg"], t.quirks["non_jpeg_val"]], quirks=t.quirks,
                        test=test, total_bytes=t.total)


class _TreeWriter:
    """Writes the tree's files in a fixed order from one seeded generator (the order of the
    calls is part of the output: same arguments, byte-identical files)."""

    def __init__(self, root: Path, classes: int, seed: int):
        self.root, self.classes = root, classes
        self.wnids, self.names = choose_classes(classes)
        self.styles = {w: class_style(i, classes) for i, w in enumerate(self.wnids)}
        self.rng = np.random.default_rng(seed)
        self.noise = self.rng.standard_normal((400, 400, 3), dtype=np.float32)
        self.total = 0
        self.train: dict[str, str] = {}
        self.val: dict[str, str] = {}
        self.bad: dict[str, str] = {}
        self.quirks: dict[str, str] = {}
        self.sizes: dict[str, tuple[int, int]] = {}

    def write(self, rel: str, data: bytes | str) -> None:
        raw = data.encode() if isinstance(data, str) else data
        path = self.root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(raw)
        self.total += len(raw)

    def image(self, wnid: str, mode: str = "RGB", fmt: str = "JPEG") -> tuple[bytes, tuple[int, int]]:
        w, h = (int(x) for x in self.rng.integers(96, 201, 2))
        return encode(render(self.rng, self.styles[wnid], w, h, self.noise), self.rng, fmt, mode), (w, h)

    def train_images(self, per_class: int) -> list[str]:
        """Ordinary train images ``<wnid>_<n>.JPEG`` (n random, distinct); returns those with boxes."""
        rng = self.rng
        for wnid in self.wnids:
            numbers: set[int] = set()
            while len(numbers) < per_class:
                n = int(10 ** rng.uniform(1.0, 4.6))
                if n not in _RESERVED:
                    numbers.add(n)
            for n in sorted(numbers):
                rel = f"{TRAIN_DIR}/{wnid}/{wnid}_{n}.JPEG"
                data, self.sizes[rel] = self.image(wnid)
                self.write(rel, data)
                self.train[rel] = wnid
        return [rel for rel in self.train if rng.random() < 0.4]  # only part of train has boxes

    def quirk_files(self) -> None:
        """One file of each train quirk and the non-JPEG files (module docstring)."""
        rng, wnids = self.rng, self.wnids
        for i, (kind, preferred, n, ext) in enumerate(_TRAIN_QUIRKS):
            wnid = preferred if preferred in self.names else wnids[i % self.classes]
            rel = f"{TRAIN_DIR}/{wnid}/{wnid}_{n}{ext}"
            self.quirks[kind] = rel
            if kind == "undecodable":
                self.write(rel, b"\x00\xffJUNK\x00\x00" + rng.bytes(int(rng.integers(2000, 6000))))
                self.bad[rel] = "undecodable: not an image"
                continue
            mode = {"cmyk_train": "CMYK", "gray_train": "L"}.get(kind, "RGB")
            data, _ = self.image(wnid, mode, "PNG" if kind == "png" else "JPEG")
            if kind == "truncated":
                self.write(rel, truncate(data))
                self.bad[rel] = "truncated JPEG"
                continue
            self.write(rel, data)
            self.train[rel] = wnid
        self.quirks["non_jpeg"] = f"{TRAIN_DIR}/{wnids[0]}/notes.txt"
        self.quirks["non_jpeg_val"] = f"{VAL_DIR}/.DS_Store"
        self.write(self.quirks["non_jpeg"], "Notes kept next to the images; not part of the data set.\n")
        self.write(self.quirks["non_jpeg_val"], b"\x00\x00\x00\x01Bud1" + rng.bytes(64))

    def val_images(self, per_class: int) -> tuple[list[str], int]:
        """val: a FLAT folder numbered 1..last, labels only in LOC_val_solution.csv; returns
        the solution rows (shuffled: real row order is not by ImageId) and ``last``."""
        rng, wnids = self.rng, self.wnids
        plain = [w for w in wnids for _ in range(per_class)]
        rng.shuffle(plain)
        last = len(plain) + 3
        cmyk_class = "n01739381" if "n01739381" in self.names else wnids[0]
        val_plan = [(1, cmyk_class, "CMYK"), (2, wnids[-1], "L")]
        val_plan += [(3 + i, w, "RGB") for i, w in enumerate(plain)] + [(last, wnids[0], "RGB")]
        rows: list[str] = []
        for number, wnid, mode in val_plan:
            stem = f"ILSVRC2012_val_{number:08d}"
            rel = f"{VAL_DIR}/{stem}.JPEG"
            data, size = self.image(wnid, mode)
            self.write(rel, data)
            if number == last:
                self.quirks["val_no_label"] = rel
                self.bad[rel] = "no label in LOC_val_solution.csv"
                continue
            self.val[rel] = wnid
            groups = 2 if number == 3 else 1 + int(rng.random() < 0.3) + int(rng.random() < 0.05)
            boxes = [box(rng, *size) for _ in range(groups)]
            rows.append(f"{stem}," + " ".join(f"{wnid} {b[0]} {b[1]} {b[2]} {b[3]}" for b in boxes))
            self.write(f"ILSVRC/Annotations/CLS-LOC/val/{stem}.xml", annotation_xml("val", stem, size, wnid, boxes))
        self.quirks["cmyk_val"] = f"{VAL_DIR}/ILSVRC2012_val_00000001.JPEG"
        self.quirks["gray_val"] = f"{VAL_DIR}/ILSVRC2012_val_00000002.JPEG"
        rng.shuffle(rows)
        return rows, last

    def test_images(self, count: int) -> list[str]:
        test = []
        for number in range(1, count + 1):
            rel = f"{TEST_DIR}/ILSVRC2012_test_{number:08d}.JPEG"
            self.write(rel, self.image(self.wnids[int(self.rng.integers(0, self.classes))])[0])
            test.append(rel)
        return test

    def metadata(self, boxed: list[str], val_rows: list[str], last: int, test: list[str]) -> None:
        """Train boxes, the CSVs and the ImageSets listings."""
        train_rows = []
        for rel in boxed:
            wnid, stem = self.train[rel], rel.rsplit("/", 1)[1].rsplit(".", 1)[0]
            boxes = [box(self.rng, *self.sizes[rel]) for _ in range(1 + int(self.rng.random() < 0.2))]
            train_rows.append(f"{stem}," + " ".join(f"{wnid} {b[0]} {b[1]} {b[2]} {b[3]}" for b in boxes))
            self.write(f"ILSVRC/Annotations/CLS-LOC/train/{wnid}/{stem}.xml",
                       annotation_xml(wnid, stem, self.sizes[rel], wnid, boxes))
        self.rng.shuffle(train_rows)
        header = "ImageId,PredictionString\n"
        self.write("LOC_synset_mapping.txt", "".join(f"{w} {self.names[w]}\n" for w in self.wnids))
        self.write("LOC_val_solution.csv", header + "".join(r + "\n" for r in val_rows))
        self.write("LOC_train_solution.csv", header + "".join(r + "\n" for r in train_rows))
        top5 = " ".join(f"{w} 0 0 100 100" for w in self.wnids[:5])
        self.write("LOC_sample_submission.csv", header + "".join(f"{Path(rel).stem},{top5}\n" for rel in test))

        def listing(rels) -> str:
            return "".join(f"{r} {i}\n" for i, r in enumerate(rels, 1))

        train_ids = sorted(r[len(TRAIN_DIR) + 1:].rsplit(".", 1)[0]
                           for r in list(self.train) + [self.quirks["truncated"], self.quirks["undecodable"]])
        boxed_ids = sorted(r[len(TRAIN_DIR) + 1:].rsplit(".", 1)[0] for r in boxed)
        sets = "ILSVRC/ImageSets/CLS-LOC"
        self.write(f"{sets}/train_cls.txt", listing(train_ids))
        self.write(f"{sets}/train_loc.txt", listing(boxed_ids))
        self.write(f"{sets}/val.txt", listing(f"ILSVRC2012_val_{n:08d}" for n in range(1, last + 1)))
        self.write(f"{sets}/test.txt", listing(Path(r).stem for r in test))


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
