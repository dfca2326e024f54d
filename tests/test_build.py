"""Shard builder: completeness, labels, quirks, determinism, zip == tree, crash-resume, S3."""
from __future__ import annotations

import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import time
import zipfile
from pathlib import Path

import pytest
from PIL import Image

from common import manifest as mf
from common import storage
from common.errors import UserError
from shard_builder.build import build_shards
from shard_builder.verify import verify
from tests.conftest import REPO, run_cli


def read_split(m: mf.Manifest, split: str) -> dict[str, dict]:
    """key -> {label, jpg, meta, shard} for every sample, read with plain tarfile."""
    out: dict[str, dict] = {}
    for shard in m.split(split).shards:
        data = storage.read_bytes(m.url(shard.path))
        with tarfile.open(fileobj=io.BytesIO(data)) as tar:
            for member in tar.getmembers():
                key, _, ext = member.name.partition(".")
                payload = tar.extractfile(member).read()
                rec = out.setdefault(key, {"shards": set()})
                rec["shards"].add(shard.path)
                rec[ext] = payload
                rec.setdefault("count", {}).setdefault(ext, 0)
                rec["count"][ext] += 1
    return out


def shard_hashes(m: mf.Manifest) -> dict[str, str]:
    return {s.path: s.sha256 for split in m.splits.values() for s in split.shards}


@pytest.fixture(scope="module")
def full_build(demo_tree, tmp_path_factory):
    out = tmp_path_factory.mktemp("full") / "shards"
    return build_shards(str(demo_tree.root), str(out), shard_max_count=16, workers=2)


def expected(demo_tree, split: str, wnids: list[str]) -> dict[str, str]:
    """key -> wnid of every source image of the chosen classes the build must include."""
    files = demo_tree.train if split == "train" else demo_tree.val
    return {Path(rel).stem: w for rel, w in files.items() if w in wnids}


def test_full_build_has_every_image_exactly_once_with_right_labels(demo_tree, full_build):
    m = full_build
    wnids = [c.wnid for c in m.classes]
    assert wnids == sorted(demo_tree.wnids)
    assert [c.imagenet_index for c in m.classes] == list(range(len(wnids)))  # 100% = torchvision order
    for split in ("train", "val"):
        samples = read_split(m, split)
        want = expected(demo_tree, split, wnids)
        assert set(samples) == set(want), split
        assert m.split(split).num_samples == len(want)
        for key, rec in samples.items():
            assert len(rec["shards"]) == 1 and rec["count"] == {"jpg": 1, "cls": 1, "json": 1}, key
            assert int(rec["cls"]) == wnids.index(want[key])
            meta = json.loads(rec["json"])
            assert meta["wnid"] == want[key] and meta["label"] == int(rec["cls"])
            with Image.open(io.BytesIO(rec["jpg"])) as im:
                assert im.format == "JPEG" and im.mode == "RGB"
                assert (meta["width"], meta["height"]) == im.size
    assert verify(m.root, deep=True) == []


def test_quirks_handled_and_bad_files_reported(demo_tree, full_build):
    m = full_build
    train, val = read_split(m, "train"), read_split(m, "val")
    q = demo_tree.quirks
    for kind, samples in (("png", train), ("cmyk_train", train), ("gray_train", train), ("cmyk_val", val),
                          ("gray_val", val), ("lowercase_ext", train)):
        assert Path(q[kind]).stem in samples, kind  # converted to RGB JPEG (checked above), not dropped
    src = (demo_tree.root / q["png"]).read_bytes()
    assert src.startswith(b"\x89PNG") and train[Path(q["png"]).stem]["jpg"].startswith(b"\xff\xd8")
    skipped = {s["path"]: s["reason"] for s in m.skipped}
    for rel in demo_tree.bad:
        assert rel in skipped, rel
    assert "truncated" in skipped[q["truncated"]] and "undecodable" in skipped[q["undecodable"]]
    assert "LOC_val_solution.csv" in skipped[q["val_no_label"]]
    for rel in demo_tree.ignored:
        assert skipped[rel].startswith("ignored")
    # Plain copy for ordinary JPEGs: bytes unchanged.
    rel, _ = next((r, w) for r, w in demo_tree.train.items() if r not in q.values())
    assert train[Path(rel).stem]["jpg"] == (demo_tree.root / rel).read_bytes()


def test_shards_are_shuffled_and_balanced(full_build):
    for split in full_build.splits.values():
        counts = [s.num_samples for s in split.shards]
        assert max(counts) - min(counts) <= 1 + len(full_build.skipped)
    first = read_split(full_build, "train")
    shard0 = [k for k, r in first.items() if full_build.split("train").shards[0].path in r["shards"]]
    assert len({k.split("_")[0] for k in shard0}) > 3  # several classes per shard: not class-sorted


def test_plain_webdataset_reads_shards(full_build):
    import webdataset as wds

    for name, split in full_build.splits.items():
        urls = [full_build.url(s.path) for s in split.shards]
        n = sum(1 for sample in wds.WebDataset(urls, shardshuffle=False) if {"jpg", "cls", "json"} <= set(sample))
        assert n == split.num_samples


def test_rebuild_is_byte_identical_and_manifest_equal(demo_tree, full_build, tmp_path):
    again = build_shards(str(demo_tree.root), str(tmp_path / "again"), shard_max_count=16, workers=1)
    assert shard_hashes(again) == shard_hashes(full_build)
    a, b = again.to_dict(), full_build.to_dict()
    a.pop("created"), b.pop("created")
    assert a == b


def test_subset_choice_is_seeded_and_stable(demo_tree, tmp_path):
    m1 = build_shards(str(demo_tree.root), str(tmp_path / "a"), subset_percentage=20, seed=3, splits=("val",))
    m2 = build_shards(str(demo_tree.root), str(tmp_path / "b"), subset_percentage=20, seed=3, splits=("val",))
    m3 = build_shards(str(demo_tree.root), str(tmp_path / "c"), subset_percentage=20, seed=4, splits=("val",))
    assert [c.wnid for c in m1.classes] == [c.wnid for c in m2.classes]
    assert len(m1.classes) == round(len(demo_tree.wnids) * 0.2)
    assert [c.wnid for c in m1.classes] != [c.wnid for c in m3.classes]
    assert set(read_split(m1, "val")) == set(expected(demo_tree, "val", [c.wnid for c in m1.classes]))
    all_sorted = sorted(demo_tree.wnids)
    assert [c.imagenet_index for c in m1.classes] == [all_sorted.index(c.wnid) for c in m1.classes]


def test_classes_file(demo_tree, tmp_path):
    chosen = sorted(demo_tree.wnids)[2:5]
    f = tmp_path / "classes.txt"
    f.write_text("# my classes\n" + "\n".join(reversed(chosen)) + "\n")
    m = build_shards(str(demo_tree.root), str(tmp_path / "out"), classes_file=str(f))
    assert [c.wnid for c in m.classes] == chosen and [c.index for c in m.classes] == [0, 1, 2]


def _zip_tree(root: Path, dest: Path, prefix: str = "") -> Path:
    with zipfile.ZipFile(dest, "w") as zf:
        for i, path in enumerate(sorted(p for p in root.rglob("*") if p.is_file())):
            method = zipfile.ZIP_DEFLATED if i % 2 else zipfile.ZIP_STORED
            zf.write(path, prefix + path.relative_to(root).as_posix(), compress_type=method)
    return dest


def test_zip_source_gives_identical_shards(demo_tree, full_build, tmp_path):
    z = _zip_tree(demo_tree.root, tmp_path / "imagenet-object-localization-challenge.zip", prefix="ILSVRC/")
    m = build_shards(str(z), str(tmp_path / "fromzip"), shard_max_count=16, workers=2)
    assert shard_hashes(m) == shard_hashes(full_build)
    assert m.skipped == full_build.skipped


def test_s3_output_matches_local(demo_tree, full_build, s3_bucket, tmp_path):
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    dest = f"{s3_bucket}/imagenet/full"
    m = build_shards(str(demo_tree.root), dest, shard_max_count=16, workers=2, scratch_dir=str(scratch))
    assert shard_hashes(m) == shard_hashes(full_build)
    assert list(scratch.iterdir()) == []  # every shard uploaded and its scratch copy removed
    loaded = mf.load(dest)
    assert loaded.to_dict() == m.to_dict()
    assert verify(dest) == []
    proc = run_cli("shard_builder", "verify", dest, "--deep")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # Rerun with the same arguments keeps every shard (nothing rebuilt).
    again = build_shards(str(demo_tree.root), dest, shard_max_count=16, workers=1)
    assert shard_hashes(again) == shard_hashes(m)


def test_sigkill_midway_then_rerun_equals_uninterrupted(demo_tree, full_build, tmp_path):
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "shard_builder", "build", "--source", str(demo_tree.root), "--output", str(out),
           "--shard-max-count", "16", "--workers", "1", "--no-progress"]
    env = dict(os.environ, PYTHONPATH=str(REPO))
    killed_midway = False
    for _ in range(3):  # the build is fast: retry the kill until it lands between two shards
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, start_new_session=True,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 60
        while time.time() < deadline and not list(out.glob("train/*.idx.json")):
            time.sleep(0.002)
        os.killpg(proc.pid, signal.SIGKILL)  # the whole group: like losing the instance
        proc.wait()
        done = list(out.glob("*/*.idx.json"))
        if not (out / "manifest.json").exists() and 0 < len(done) < sum(len(s.shards) for s in
                                                                         full_build.splits.values()):
            killed_midway = True
            break
        shutil.rmtree(out, ignore_errors=True)
    assert killed_midway, "could not interrupt the build midway"
    with pytest.raises(UserError):
        mf.load(str(out))  # not a finished build
    proc = run_cli("shard_builder", "build", "--source", str(demo_tree.root), "--output", str(out),
                   "--shard-max-count", "16", "--workers", "2", "--no-progress")
    assert proc.returncode == 0, proc.stderr
    resumed = mf.load(str(out))
    assert shard_hashes(resumed) == shard_hashes(full_build)
    kept = int(re.search(r"(\d+) kept", proc.stderr).group(1))
    assert kept == len(done) and not list(out.rglob(".*.tmp"))


def test_verify_reports_a_damaged_shard(full_build, tmp_path):
    import shutil as sh

    copy = tmp_path / "copy"
    sh.copytree(full_build.root, copy)
    shard = full_build.split("train").shards[0]
    data = bytearray((copy / shard.path).read_bytes())
    data[600:700] = bytes(100)  # inside the first sample's JPEG payload
    (copy / shard.path).write_bytes(bytes(data))
    problems = verify(str(copy), deep=True)
    assert any(shard.path in p and "sha256" in p for p in problems)
    proc = run_cli("shard_builder", "verify", str(copy))
    assert proc.returncode == 1 and "verify FAILED" in proc.stdout
    (copy / full_build.split("val").shards[0].path).unlink()
    assert any("missing" in p for p in verify(str(copy)))


def test_ten_percent_build_to_s3_is_exact_and_stable(demo_tree, s3_bucket):
    first = build_shards(str(demo_tree.root), f"{s3_bucket}/in10a", subset_percentage=10, seed=5, workers=2)
    again = build_shards(str(demo_tree.root), f"{s3_bucket}/in10b", subset_percentage=10, seed=5, workers=1)
    wnids = [c.wnid for c in first.classes]
    assert wnids == [c.wnid for c in again.classes] and len(wnids) == round(len(demo_tree.wnids) * 0.1)
    assert shard_hashes(first) == shard_hashes(again)
    for split in ("train", "val"):
        samples = read_split(first, split)
        want = expected(demo_tree, split, wnids)
        assert set(samples) == set(want) and first.split(split).num_samples == len(want)
        for key, rec in samples.items():
            assert len(rec["shards"]) == 1 and int(rec["cls"]) == wnids.index(want[key])
    assert verify(first.root, deep=True) == []
