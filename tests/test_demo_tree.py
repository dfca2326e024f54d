"""The demo tree has the exact Kaggle layout, every quirk it promises, and is deterministic.

    python -m pytest -q tests/test_demo_tree.py
"""
from __future__ import annotations

import csv
import os
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile

from common.errors import UserError
from shard_builder.demo_tree import TRAIN_DIR, VAL_DIR, choose_classes, write_demo_tree

REPO = Path(__file__).resolve().parents[1]
SMALL = dict(classes=8, train_per_class=6, val_per_class=3, test_images=3, seed=1)
IMAGE_EXT = (".JPEG", ".jpeg")


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    return write_demo_tree(tmp_path_factory.mktemp("demo") / "kaggle", **SMALL)


def files_under(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, "-m", "shard_builder", "demo-tree", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)


def read_csv(path: Path) -> tuple[list[str], list[list[str]]]:
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    return rows[0], rows[1:]


def test_top_level_and_synset_mapping(tree):
    root = tree.root
    assert sorted(p.name for p in root.iterdir()) == [
        "ILSVRC", "LOC_sample_submission.csv", "LOC_synset_mapping.txt", "LOC_train_solution.csv",
        "LOC_val_solution.csv"]
    lines = (root / "LOC_synset_mapping.txt").read_text().splitlines()
    parsed = [line.split(" ", 1) for line in lines]
    assert [w for w, _ in parsed] == sorted(w for w, _ in parsed) == tree.wnids
    assert dict(parsed) == tree.names
    assert all(re.fullmatch(r"n\d{8}", w) for w in tree.wnids)
    for sub in ("Annotations/CLS-LOC/train", "Annotations/CLS-LOC/val", "Data/CLS-LOC/test"):
        assert any((root / "ILSVRC" / sub).rglob("*")), sub
    sets = root / "ILSVRC/ImageSets/CLS-LOC"
    assert sorted(p.name for p in sets.iterdir()) == ["test.txt", "train_cls.txt", "train_loc.txt", "val.txt"]
    assert (sets / "train_cls.txt").read_text().splitlines()[0].endswith(" 1")


def test_display_names_repeat():
    wnids, names = choose_classes(20)
    assert {"n02012849", "n03126707", "n02105855", "n01739381"} <= set(wnids)
    assert names["n02012849"] == names["n03126707"] == "crane"
    assert len(set(names.values())) < len(names)
    assert len(choose_classes(1)[0]) == 1
    many, many_names = choose_classes(130)
    assert len(set(many)) == 130 and many == sorted(many)
    assert len(set(many_names.values())) == 130 - 1  # only "crane" repeats
    assert all(re.fullmatch(r"n\d{8}", w) for w in many)


def test_train_folders_and_names(tree):
    train_root = tree.root / TRAIN_DIR
    assert sorted(p.name for p in train_root.iterdir()) == tree.wnids
    on_disk = {p.relative_to(tree.root).as_posix() for p in train_root.rglob("*") if p.is_file()}
    in_train = {r for r in tree.train if r.startswith(TRAIN_DIR)}
    skipped = {r for r in tree.bad if r.startswith(TRAIN_DIR)}
    ignored = {r for r in tree.ignored if r.startswith(TRAIN_DIR)}
    assert on_disk == in_train | skipped | ignored and not in_train & skipped
    assert len(tree.train) == SMALL["classes"] * SMALL["train_per_class"] + 4  # + png, cmyk, gray, .jpeg
    numbers = []
    for rel, wnid in tree.train.items():
        folder, name = rel.split("/")[-2:]
        m = re.fullmatch(r"(n\d{8})_(\d+)\.(JPEG|jpeg)", name)
        assert m and m.group(1) == folder == wnid, rel
        numbers.append(m.group(2))
    assert len({len(n) for n in numbers}) > 1, "numbers must not be fixed width"
    per_class = sorted(int(r.rsplit("_", 1)[1].split(".")[0]) for r in tree.train if f"/{tree.wnids[0]}/" in r)
    assert any(b - a > 1 for a, b in zip(per_class, per_class[1:])), "numbers must not be consecutive"
    header, rows = read_csv(tree.root / "LOC_train_solution.csv")
    assert header == ["ImageId", "PredictionString"]
    stems = {Path(r).stem for r in tree.train}
    assert rows and {row[0] for row in rows} <= stems and len(rows) < len(stems)


def test_val_is_flat_numbered_and_labels_come_from_csv(tree):
    val_root = tree.root / VAL_DIR
    assert all(p.is_file() for p in val_root.iterdir())
    images = sorted(p.name for p in val_root.iterdir() if p.suffix == ".JPEG")
    assert images == [f"ILSVRC2012_val_{n:08d}.JPEG" for n in range(1, len(images) + 1)]
    assert len(images) == len(tree.val) + 1  # + the one without a label
    header, rows = read_csv(tree.root / "LOC_val_solution.csv")
    assert header == ["ImageId", "PredictionString"]
    by_id = {row[0]: row[1].split() for row in rows}
    assert len(by_id) == len(rows) == len(tree.val)
    ids = [row[0] for row in rows]
    assert ids != sorted(ids), "rows must not be in ImageId order"
    for rel, wnid in tree.val.items():
        tokens = by_id[Path(rel).stem]
        assert len(tokens) % 5 == 0 and tokens[0] == wnid, rel
        assert all(t.isdigit() for i, t in enumerate(tokens) if i % 5)
    assert any(len(t) >= 10 for t in by_id.values()), "need a row with 2+ boxes"
    assert Path(tree.quirks["val_no_label"]).stem not in by_id
    assert tree.quirks["val_no_label"] in tree.bad
    counts = Counter(tree.val.values())
    assert set(counts) == set(tree.wnids) and sum(counts.values()) == len(tree.wnids) * SMALL["val_per_class"] + 2
    test_root = tree.root / "ILSVRC/Data/CLS-LOC/test"
    assert sorted(p.name for p in test_root.iterdir()) == [
        f"ILSVRC2012_test_{n:08d}.JPEG" for n in range(1, SMALL["test_images"] + 1)]


def test_every_quirk_has_its_property(tree):
    q = {kind: tree.root / rel for kind, rel in tree.quirks.items()}
    assert set(q) >= {"png", "cmyk_train", "cmyk_val", "gray_train", "gray_val", "truncated", "undecodable",
                      "lowercase_ext", "val_no_label", "non_jpeg"}
    assert q["png"].suffix == ".JPEG" and q["png"].read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    assert Image.open(q["png"]).format == "PNG"
    for kind in ("cmyk_train", "cmyk_val"):
        assert Image.open(q[kind]).mode == "CMYK" and Image.open(q[kind]).format == "JPEG", kind
    for kind in ("gray_train", "gray_val"):
        assert Image.open(q[kind]).mode == "L", kind
    assert q["png"].parent.name == "n02105855" and q["cmyk_train"].name == "n01739381_1309.JPEG"
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False
    with Image.open(q["truncated"]) as img:
        assert img.format == "JPEG"
        with pytest.raises(OSError):
            img.load()
    with pytest.raises(Exception):
        Image.open(q["undecodable"]).load()
    assert q["lowercase_ext"].suffix == ".jpeg" and tree.quirks["lowercase_ext"] in tree.train
    Image.open(q["lowercase_ext"]).load()
    assert q["non_jpeg"].suffix not in IMAGE_EXT and tree.quirks["non_jpeg"] in tree.ignored
    assert any(r.startswith(VAL_DIR) for r in tree.ignored)
    for kind in ("png", "cmyk_train", "gray_train", "lowercase_ext"):
        assert tree.quirks[kind] in tree.train, kind
    for kind in ("cmyk_val", "gray_val"):
        assert tree.quirks[kind] in tree.val, kind
    assert set(tree.bad) == {tree.quirks[k] for k in ("truncated", "undecodable", "val_no_label")}


def test_ordinary_images_are_small_varied_jpegs(tree):
    sizes = set()
    for rel in list(tree.train)[:40] + list(tree.val)[:20]:
        with Image.open(tree.root / rel) as img:
            img.load()
            sizes.add(img.size)
            if rel not in tree.quirks.values():
                assert img.format == "JPEG" and img.mode == "RGB"
                assert all(96 <= s <= 200 for s in img.size)
    assert len(sizes) > 10


def test_classes_are_separable_by_colour_alone(tree):
    """Cheap learnability proxy: nearest class-centroid of mean colour over random crops."""
    rng = np.random.default_rng(0)

    def feature(rel: str) -> np.ndarray:
        arr = np.asarray(Image.open(tree.root / rel).convert("RGB"), np.float32)
        h, w = arr.shape[:2]
        ch, cw = int(h * rng.uniform(0.3, 1)), int(w * rng.uniform(0.3, 1))
        y, x = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
        return arr[y:y + ch, x:x + cw].reshape(-1, 3).mean(0)

    centroids = {w: np.mean([feature(r) for r, c in tree.train.items() if c == w], 0) for w in tree.wnids}
    hits = [min(centroids, key=lambda w: np.linalg.norm(feature(r) - centroids[w])) == c
            for r, c in tree.val.items()]
    assert np.mean(hits) > 0.8


def test_same_arguments_give_identical_bytes(tmp_path, tree):
    again = write_demo_tree(tmp_path / "again", **SMALL)
    assert files_under(again.root) == files_under(tree.root)
    assert again.quirks == tree.quirks and again.train == tree.train and again.val == tree.val
    other = write_demo_tree(tmp_path / "other", **{**SMALL, "seed": 2})
    assert files_under(other.root) != files_under(tree.root)


def test_single_class_tree_still_has_every_quirk(tmp_path):
    info = write_demo_tree(tmp_path / "one", classes=1, train_per_class=1, val_per_class=1, test_images=1)
    assert info.wnids == ["n02105855"]
    assert len(info.train) == 5 and len(info.val) == 3 and len(info.bad) == 3
    assert all((info.root / rel).is_file() for rel in info.quirks.values())


def test_refuses_non_empty_dest_unless_overwrite(tmp_path):
    dest = tmp_path / "d"
    dest.mkdir()
    (dest / "keep.txt").write_text("mine")
    with pytest.raises(UserError, match="--overwrite"):
        write_demo_tree(dest, classes=2, train_per_class=1, val_per_class=1, test_images=1)
    info = write_demo_tree(dest, classes=2, train_per_class=1, val_per_class=1, test_images=1, overwrite=True)
    (dest / "ILSVRC/stale.txt").write_text("old run")
    write_demo_tree(dest, classes=2, train_per_class=1, val_per_class=1, test_images=1, overwrite=True)
    assert (dest / "keep.txt").read_text() == "mine" and not (dest / "ILSVRC/stale.txt").exists()
    assert (dest / info.quirks["png"]).is_file()


@pytest.mark.parametrize("bad", [["--classes", "0"], ["--train-per-class", "0"], ["--val-per-class", "0"],
                                 ["--test-images", "0"], ["--seed", "-1"]])
def test_cli_bad_arguments_exit_2(tmp_path, bad):
    proc = cli(str(tmp_path / "out"), *bad)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("error: ") and len(proc.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_cli_writes_tree_and_refuses_to_clobber(tmp_path):
    args = [str(tmp_path / "out"), "--classes", "3", "--train-per-class", "2", "--val-per-class", "1",
            "--test-images", "1"]
    proc = cli(*args)
    assert proc.returncode == 0, proc.stderr
    assert "3 classes" in proc.stdout and "quirks" in proc.stdout
    assert (tmp_path / "out/LOC_synset_mapping.txt").is_file()
    again = cli(*args)
    assert again.returncode == 2 and "--overwrite" in again.stderr
    assert cli(*args, "--overwrite").returncode == 0
