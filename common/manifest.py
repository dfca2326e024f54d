"""The dataset manifest (``DEST/manifest.json``) and the per-shard index sidecars.

The manifest is the contract between the shard builder and every reader. It is written
last, so a DEST without it is not a finished build. Layout of a build:

    DEST/manifest.json
    DEST/train/train-000000.tar        plain POSIX tar: KEY.jpg, KEY.cls, KEY.json per sample
    DEST/train/train-000000.idx.json   per-sample byte offsets (see ShardIndex)
    DEST/val/val-000000.tar ...

Manifest schema (format_version 1)::

    {"format": "imagenet-wds", "format_version": 1, "created": "...Z",
     "build_args": {...}, "seed": 0,
     "classes": [{"index": 0, "wnid": "n01440764", "name": "tench, Tinca tinca", "imagenet_index": 0}],
     "splits": {"train": {"num_samples": N, "shards": [
         {"path": "train/train-000000.tar", "num_samples": n, "bytes": b, "sha256": "...",
          "index": "train/train-000000.idx.json", "index_sha256": "..."}]}},
     "skipped": [{"split": "train", "path": "ILSVRC/...", "reason": "..."}]}

The index sidecar lets a reader fetch any sample with one byte-range read and no tar
parsing, which is what exact rank/worker splitting and resume-without-decoding need::

    {"shard": "train-000000.tar", "bytes": b, "sha256": "...",
     "fields": ["key", "start", "end", "jpg_offset", "jpg_size", "label"],
     "samples": [["n01440764_10026", 0, 120832, 512, 110234, 0], ...],
     "skipped": [{"path": "...", "reason": "..."}], "fingerprint": "<build args hash>"}

``start``/``end`` bound all of a sample's tar members (its headers included); the JPEG
payload is bytes [jpg_offset, jpg_offset + jpg_size) of the shard.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from common import storage
from common.errors import UserError

FORMAT = "imagenet-wds"
FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
INDEX_FIELDS = ["key", "start", "end", "jpg_offset", "jpg_size", "label"]


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def dumps(obj: Any) -> bytes:
    """Canonical JSON (sorted keys, fixed separators) so equal content gives equal bytes."""
    return (json.dumps(obj, sort_keys=True, indent=1, ensure_ascii=False) + "\n").encode()


@dataclass(frozen=True)
class ClassInfo:
    index: int
    wnid: str
    name: str
    imagenet_index: int


@dataclass(frozen=True)
class ShardInfo:
    path: str
    num_samples: int
    bytes: int
    sha256: str
    index: str
    index_sha256: str


@dataclass(frozen=True)
class SplitInfo:
    num_samples: int
    shards: list[ShardInfo]


@dataclass
class Manifest:
    build_args: dict
    seed: int
    classes: list[ClassInfo]
    splits: dict[str, SplitInfo]
    skipped: list[dict] = field(default_factory=list)
    created: str = ""
    format: str = FORMAT
    format_version: int = FORMAT_VERSION
    root: str = ""  # where it was loaded from; not serialised

    # ------------------------------------------------------------------ (de)serialise
    def to_dict(self) -> dict:
        d = asdict(self)
        d.pop("root")
        return d

    def to_bytes(self) -> bytes:
        return dumps(self.to_dict())

    @classmethod
    def from_dict(cls, d: dict, root: str = "") -> "Manifest":
        try:
            if d.get("format") != FORMAT:
                raise ValueError(f"format is {d.get('format')!r}, expected {FORMAT!r}")
            if d.get("format_version") != FORMAT_VERSION:
                raise ValueError(f"format_version {d.get('format_version')} is not supported (want {FORMAT_VERSION})")
            m = cls(
                build_args=dict(d["build_args"]),
                seed=int(d["seed"]),
                classes=[ClassInfo(**c) for c in d["classes"]],
                splits={name: SplitInfo(int(s["num_samples"]), [ShardInfo(**sh) for sh in s["shards"]])
                        for name, s in d["splits"].items()},
                skipped=list(d.get("skipped", [])),
                created=str(d.get("created", "")),
                root=root,
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise UserError(f"manifest {root or ''} is invalid ({exc}): rebuild the shards") from exc
        m.validate()
        return m

    def validate(self) -> None:
        """Internal consistency: class indices 0..K-1, split totals equal shard sums."""
        where = self.root or "manifest"
        if [c.index for c in self.classes] != list(range(len(self.classes))):
            raise UserError(f"{where}: class indices are not 0..K-1: rebuild the shards")
        if [c.wnid for c in self.classes] != sorted(c.wnid for c in self.classes):
            raise UserError(f"{where}: classes are not in sorted-wnid order: rebuild the shards")
        for name, split in self.splits.items():
            total = sum(s.num_samples for s in split.shards)
            if total != split.num_samples:
                raise UserError(f"{where}: split {name} says {split.num_samples} samples but its shards hold {total}")

    # ------------------------------------------------------------------ access
    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def split(self, name: str) -> SplitInfo:
        if name not in self.splits:
            raise UserError(f"{self.root or 'manifest'} has no split {name!r} (has: {', '.join(self.splits)})")
        return self.splits[name]

    def url(self, relpath: str) -> str:
        """Absolute URL/path of a file named relative to the build root."""
        return storage.join(self.root, relpath)


def load(root: str) -> Manifest:
    """Load and validate ``root/manifest.json`` (root: local folder or s3:// URL)."""
    url = storage.join(root, MANIFEST_NAME)
    try:
        raw = storage.read_bytes(url)
    except FileNotFoundError:
        raise UserError(f"{root} has no {MANIFEST_NAME}: it is not a finished shard build "
                        "(run `python -m shard_builder build` first, or rerun it to finish)") from None
    except (NotADirectoryError, IsADirectoryError) as exc:
        raise UserError(f"{root} is not a shard build folder: {exc}") from None
    try:
        d = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise UserError(f"{url} is not valid JSON ({exc}): rebuild the shards") from None
    return Manifest.from_dict(d, root=str(root))


def save(manifest: Manifest, root: str) -> None:
    """Atomically write the manifest; call only once every shard is complete."""
    storage.write_bytes(storage.join(root, MANIFEST_NAME), manifest.to_bytes())


@dataclass(frozen=True)
class ShardIndex:
    """Decoded index sidecar of one shard (see module docstring)."""

    shard: str
    bytes: int
    sha256: str
    keys: list[str]
    starts: list[int]
    ends: list[int]
    jpg_offsets: list[int]
    jpg_sizes: list[int]
    labels: list[int]
    skipped: list[dict]
    fingerprint: str = ""  # the build that wrote it (lets a resumed build trust it)

    def __len__(self) -> int:
        return len(self.keys)

    @classmethod
    def from_bytes(cls, raw: bytes) -> "ShardIndex":
        d = json.loads(raw)
        if d.get("fields") != INDEX_FIELDS:
            raise ValueError(f"unexpected index fields {d.get('fields')}")
        cols = list(zip(*d["samples"])) if d["samples"] else [[]] * len(INDEX_FIELDS)
        return cls(d["shard"], int(d["bytes"]), d["sha256"], *(list(c) for c in cols), list(d.get("skipped", [])),
                   str(d.get("fingerprint", "")))

    def to_bytes(self) -> bytes:
        rows = [list(r) for r in zip(self.keys, self.starts, self.ends, self.jpg_offsets, self.jpg_sizes, self.labels)]
        return dumps({"shard": self.shard, "bytes": self.bytes, "sha256": self.sha256, "fields": INDEX_FIELDS,
                      "samples": rows, "skipped": self.skipped, "fingerprint": self.fingerprint})


def load_index(manifest: Manifest, shard: ShardInfo, *, cache: Path | None = None) -> ShardIndex:
    """The one index loader: a shard's sidecar, checked against the manifest.

    With ``cache`` (a local file), a copy there whose checksum matches is used; otherwise the
    sidecar is read from the build and written there (atomically; racing writers write
    identical bytes). Checked: the manifest's checksum, that it parses, and that it describes
    the manifest's shard (sample count, bytes, sha256). Any mismatch, or a missing sidecar, is
    a UserError naming the file.
    """
    url = manifest.url(shard.index)
    raw = cache.read_bytes() if cache is not None and cache.exists() else None
    if raw is None or sha256_bytes(raw) != shard.index_sha256:
        try:
            raw = storage.read_bytes(url)
        except (FileNotFoundError, NotADirectoryError):
            raise UserError(f"index {url} of shard {manifest.url(shard.path)} is missing: rebuild or re-upload "
                            "the shards") from None
        if sha256_bytes(raw) != shard.index_sha256:
            raise UserError(f"index {url} does not match the manifest checksum: rebuild or re-upload it")
        if cache is not None:
            storage.write_bytes(str(cache), raw)
    try:
        idx = ShardIndex.from_bytes(raw)
    except (ValueError, KeyError, TypeError) as exc:  # json.JSONDecodeError is a ValueError
        raise UserError(f"index {url} is invalid ({exc}): rebuild the shards") from None
    if len(idx) != shard.num_samples or idx.bytes != shard.bytes or idx.sha256 != shard.sha256:
        raise UserError(f"index {url} does not describe shard {manifest.url(shard.path)} of the manifest "
                        f"({len(idx)} samples, {idx.bytes} bytes; manifest: {shard.num_samples}, {shard.bytes})")
    return idx


def shard_problems(url: str, size: int, sha256: str, *, digest: str | None = None,
                   against: str = "the manifest") -> list[str]:
    """The one "is this shard intact" check: what is wrong with the shard at ``url`` compared
    with its record (``size`` bytes, SHA-256 ``sha256``, from ``against``); [] when intact.

    The SHA-256 compared is ``digest`` when the caller hashed the shard while reading it
    (verify streams each tar once), else, on S3, the ``sha256`` metadata the builder stored at
    upload (no download), else the local file's hash. Without ``digest`` a wrong size is
    reported without hashing.
    """
    st = storage.stat(url)
    if st is None:
        return ["missing"]
    problems = [] if st.size == size else [f"{st.size} bytes, {against} says {size}"]
    if problems and digest is None:
        return problems
    if digest is None:
        digest = st.metadata.get("sha256") if storage.is_s3(url) else storage.sha256_file(url)
    if digest != sha256:
        problems.append(f"sha256 differs from {against}")
    return problems
