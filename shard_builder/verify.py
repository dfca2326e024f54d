"""``verify``: check a finished build against its manifest.

    python -m shard_builder verify /data/shards
    python -m shard_builder verify s3://bucket/imagenet-10pct --deep

Every shard must exist with the manifest's size, SHA-256 and sample count (counted by
reading the tar itself, not the index), and its index sidecar must match its checksum.
``--deep`` also decodes every image to RGB and checks every label is in range and agrees
with the sample's .json and the index. Exit 0 when all is well, 1 with one line per problem.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
from concurrent.futures import ThreadPoolExecutor

from common import manifest as mf
from common import storage


class _HashingReader(io.RawIOBase):
    """Hash the bytes while tarfile streams through them (one read per shard)."""

    def __init__(self, f):
        self.f, self.sha, self.size = f, hashlib.sha256(), 0

    def readable(self) -> bool:
        return True

    def readinto(self, buf) -> int:
        data = self.f.read(len(buf))
        n = len(data)
        buf[:n] = data
        self.sha.update(data)
        self.size += n
        return n


def _check_sample(key: str, members: dict[str, bytes], num_classes: int, deep: bool) -> list[str]:
    if set(members) != {"jpg", "cls", "json"}:
        return [f"sample {key} has members {sorted(members)}, expected cls, jpg, json"]
    if not deep:
        return []
    from PIL import Image

    problems = []
    label = int(members["cls"])
    if not 0 <= label < num_classes:
        problems.append(f"sample {key} has label {label}, outside 0..{num_classes - 1}")
    if json.loads(members["json"]).get("label") != label:
        problems.append(f"sample {key}: .json label disagrees with .cls")
    try:
        with Image.open(io.BytesIO(members["jpg"])) as im:
            im.load()  # a full decode: a truncated or undecodable image raises here
            if im.format != "JPEG" or im.mode != "RGB":
                problems.append(f"sample {key} is a {im.format} {im.mode} image; the builder stores RGB JPEGs")
    except Exception as exc:  # noqa: BLE001
        problems.append(f"sample {key} does not decode: {exc}")
    return problems


def verify_shard(m: mf.Manifest, shard: mf.ShardInfo, deep: bool) -> tuple[list[str], list[str]]:
    """(problems, sample keys) of one shard."""
    url = m.url(shard.path)
    where = shard.path
    if not storage.exists(url):
        return [f"{where}: missing"], []
    problems = []
    try:
        idx = mf.load_index(m, shard)
    except Exception as exc:  # noqa: BLE001 - report, keep checking
        idx = None
        problems.append(f"{shard.index}: {exc}")
    reader = _HashingReader(storage.open_read(url))
    keys: list[str] = []
    try:
        with tarfile.open(fileobj=io.BufferedReader(reader, 1 << 20), mode="r|") as tar:
            members: dict[str, bytes] = {}
            current = None
            for member in tar:
                key, _, ext = member.name.partition(".")
                if key != current:
                    if current is not None:
                        problems += _check_sample(current, members, m.num_classes, deep)
                    keys.append(key)
                    current, members = key, {}
                members[ext] = tar.extractfile(member).read()
            if current is not None:
                problems += _check_sample(current, members, m.num_classes, deep)
        while reader.read(1 << 20):  # hash the end-of-archive padding too
            pass
    except (tarfile.TarError, OSError) as exc:
        found = mf.shard_problems(url, shard.bytes, shard.sha256)  # the read broke: check the stored copy
        return problems + [f"{where}: {p}" for p in found] + [f"{where}: unreadable tar ({exc})"], keys
    problems += [f"{where}: {p}" for p in mf.shard_problems(url, shard.bytes, shard.sha256,
                                                             digest=reader.sha.hexdigest())]
    if len(keys) != shard.num_samples:
        problems.append(f"{where}: {len(keys)} samples, manifest says {shard.num_samples}")
    if idx is not None and idx.keys != keys:
        problems.append(f"{where}: sample keys differ from its index")
    return problems, keys


def verify(root: str, deep: bool = False, workers: int | None = None) -> list[str]:
    """All problems found (empty when the build is sound)."""
    m = mf.load(root)
    problems = []
    with ThreadPoolExecutor(max_workers=workers or min(8, (os.cpu_count() or 1) * 2)) as pool:
        for name, split in m.splits.items():
            keys: list[str] = []
            for shard_problems, shard_keys in pool.map(lambda s: verify_shard(m, s, deep), split.shards):
                problems += shard_problems
                keys += shard_keys
            if len(set(keys)) != len(keys):
                problems.append(f"split {name}: {len(keys) - len(set(keys))} sample key(s) appear more than once")
    return problems


def add_parser(sub) -> None:
    p = sub.add_parser("verify", help="check shards against the manifest (--deep decodes every image)",
                       description=__doc__.splitlines()[0])
    p.add_argument("dest", help="build folder or s3:// URL holding manifest.json")
    p.add_argument("--deep", action="store_true", help="also decode every image and check labels")
    p.add_argument("--workers", type=int, default=None)
    p.set_defaults(func=run)


def run(args) -> int:
    problems = verify(args.dest, deep=args.deep, workers=args.workers)
    m = mf.load(args.dest)
    counts = ", ".join(f"{s} {i.num_samples} samples / {len(i.shards)} shards" for s, i in m.splits.items())
    if problems:
        for p in problems:
            print(f"problem: {p}")
        print(f"verify FAILED for {args.dest}: {len(problems)} problem(s) ({counts})")
        return 1
    print(f"verify OK{' (deep)' if args.deep else ''}: {args.dest}: {m.num_classes} classes, {counts}")
    return 0
