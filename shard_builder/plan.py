"""Decide, before any image is read, which sample goes into which shard.

The plan is a pure function of the source listing and the build options: the chosen
classes, the labels, the global seeded shuffle (no shard is class-sorted) and the split
of each split's samples into shards of nearly equal counts (they differ by at most 1).
Because it is pure, a rerun after a crash plans exactly the same shards and can keep
the ones already finished, and the zip and the extracted tree give the same shards.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePosixPath

from common.errors import UserError
from common.manifest import FORMAT_VERSION, ClassInfo, sha256_bytes
from shard_builder.classes import choose_subset, hash_key, parse_synset_mapping, read_classes_file
from shard_builder.source import SYNSET_MAPPING, TRAIN_DIR, VAL_DIR, VAL_SOLUTION, FileRef, Source, is_jpeg_name

SPLITS = ("train", "val")
DEFAULT_SHARD_MAX_BYTES = 256 * 2**20


@dataclass(frozen=True)
class BuildOptions:
    """Everything that decides the shards' bytes (workers and paths do not)."""

    subset_percentage: float = 100.0
    classes_file: str | None = None
    seed: int = 0
    splits: tuple[str, ...] = SPLITS
    shard_max_bytes: int = DEFAULT_SHARD_MAX_BYTES
    shard_max_count: int | None = None
    resize_max_side: int | None = None
    jpeg_quality: int = 90

    def check(self) -> None:
        if not 0 < self.subset_percentage <= 100:
            raise UserError(f"--subset-percentage must be in (0, 100], got {self.subset_percentage:g}")
        bad = [s for s in self.splits if s not in SPLITS]
        if bad or not self.splits:
            raise UserError(f"--splits must name some of {', '.join(SPLITS)}, got {','.join(self.splits) or 'none'}")
        if self.shard_max_bytes <= 0 or (self.shard_max_count is not None and self.shard_max_count <= 0):
            raise UserError("--shard-max-bytes and --shard-max-count must be positive")
        if self.resize_max_side is not None and self.resize_max_side < 16:
            raise UserError(f"--resize-max-side must be at least 16, got {self.resize_max_side}")
        if not 1 <= self.jpeg_quality <= 100:
            raise UserError(f"--jpeg-quality must be in [1, 100], got {self.jpeg_quality}")


@dataclass(frozen=True)
class Sample:
    key: str
    label: int
    wnid: str
    imagenet_index: int
    ref: FileRef


@dataclass(frozen=True)
class ShardTask:
    split: str
    index: int
    samples: tuple[Sample, ...]

    @property
    def name(self) -> str:
        return f"{self.split}-{self.index:06d}"

    @property
    def tar_path(self) -> str:
        return f"{self.split}/{self.name}.tar"

    @property
    def index_path(self) -> str:
        return f"{self.split}/{self.name}.idx.json"


@dataclass
class BuildPlan:
    classes: list[ClassInfo]
    build_args: dict
    fingerprint: str
    tasks: list[ShardTask]
    skipped: list[dict] = field(default_factory=list)  # found while planning (e.g. val without label)
    num_samples: dict[str, int] = field(default_factory=dict)
    source_bytes: int = 0


def _choose_classes(source: Source, opts: BuildOptions) -> list[ClassInfo]:
    synsets = parse_synset_mapping(source.read_text(SYNSET_MAPPING))
    all_wnids = [w for w, _ in synsets]
    if opts.classes_file:
        path = Path(opts.classes_file).expanduser()
        if not path.is_file():
            raise UserError(f"--classes-file {opts.classes_file} does not exist")
        chosen = read_classes_file(path.read_text(encoding="utf-8"), all_wnids, str(opts.classes_file))
    else:
        chosen = choose_subset(all_wnids, opts.subset_percentage, opts.seed)
    names = dict(synsets)
    position = {w: i for i, w in enumerate(all_wnids)}  # sorted: torchvision's class index
    return [ClassInfo(i, w, names[w], position[w]) for i, w in enumerate(chosen)]


def _val_labels(source: Source) -> dict[str, str]:
    """ImageId -> wnid (first token of PredictionString), looked up by id, not row order."""
    labels = {}
    lines = source.read_text(VAL_SOLUTION).splitlines()
    if not lines or not lines[0].startswith("ImageId"):
        raise UserError(f"{VAL_SOLUTION} has no ImageId,PredictionString header: is the download complete?")
    for line in lines[1:]:
        image_id, _, pred = line.strip().partition(",")
        if image_id and pred.split():
            labels[image_id] = pred.split()[0]
    return labels


def make_plan(source: Source, opts: BuildOptions) -> BuildPlan:
    opts.check()
    classes = _choose_classes(source, opts)
    skipped: list[dict] = []
    per_split = {split: _split_samples(source, split, {c.wnid: c for c in classes}, opts.seed, skipped)
                 for split in opts.splits}
    tasks = _shard_tasks(per_split, opts)
    build_args = {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(opts).items()}
    build_args["format_version"] = FORMAT_VERSION
    build_args["class_wnids"] = [c.wnid for c in classes]
    ident = {k: v for k, v in build_args.items() if k != "classes_file"}
    fingerprint = sha256_bytes(json.dumps(ident, sort_keys=True).encode())[:16]
    build_args.pop("class_wnids")
    build_args["fingerprint"] = fingerprint
    skipped.sort(key=lambda d: (d["split"], d["path"]))
    total_bytes = sum(s.ref.size for samples in per_split.values() for s in samples)
    return BuildPlan(classes, build_args, fingerprint, tasks, skipped,
                     {s: len(v) for s, v in per_split.items()}, total_bytes)


def _split_samples(source: Source, split: str, by_wnid: dict[str, ClassInfo], seed: int,
                   skipped: list[dict]) -> list[Sample]:
    """The split's samples of the chosen classes in seeded shuffled order; what is left out
    goes to ``skipped``."""
    samples: list[Sample] = []
    seen: set[str] = set()

    def add(ref: FileRef, wnid: str) -> None:
        key = PurePosixPath(ref.relpath).stem
        if key in seen:
            skipped.append({"split": split, "path": ref.relpath, "reason": f"duplicate key {key}"})
            return
        seen.add(key)
        c = by_wnid[wnid]
        samples.append(Sample(key, c.index, wnid, c.imagenet_index, ref))

    if split == "train":
        for ref in source.list_dir_files(TRAIN_DIR):
            parts = PurePosixPath(ref.relpath).parts
            wnid = parts[-2] if len(parts) == 6 else None  # ILSVRC/Data/CLS-LOC/train/<wnid>/<file>
            if wnid not in by_wnid:
                continue
            if not is_jpeg_name(ref.relpath):
                skipped.append({"split": split, "path": ref.relpath, "reason": "ignored: not a .JPEG file"})
                continue
            add(ref, wnid)
    else:
        labels = _val_labels(source)
        for ref in source.list_dir_files(VAL_DIR):
            if not is_jpeg_name(ref.relpath):
                skipped.append({"split": split, "path": ref.relpath, "reason": "ignored: not a .JPEG file"})
                continue
            wnid = labels.get(PurePosixPath(ref.relpath).stem)
            if wnid is None:
                skipped.append({"split": split, "path": ref.relpath, "reason": f"no row in {VAL_SOLUTION}"})
            elif wnid in by_wnid:
                add(ref, wnid)
    if not samples:
        raise UserError(f"no {split} images found for the chosen classes: check --source and the class choice")
    # Global seeded shuffle, keyed by path so listing order never matters.
    samples.sort(key=lambda s: hash_key(seed, split, s.ref.relpath))
    return samples


def _shard_tasks(per_split: dict[str, list[Sample]], opts: BuildOptions) -> list[ShardTask]:
    """Cut each split into shards of nearly equal counts under the size/count limits."""
    tasks: list[ShardTask] = []
    for split, samples in per_split.items():
        n = len(samples)
        nbytes = sum(s.ref.size for s in samples)
        count = max(1, math.ceil(nbytes / opts.shard_max_bytes))
        if opts.shard_max_count:
            count = max(count, math.ceil(n / opts.shard_max_count))
        count = min(count, n)
        # Shard i holds samples [i*n//count, (i+1)*n//count): sizes differ by at most 1.
        for i in range(count):
            tasks.append(ShardTask(split, i, tuple(samples[i * n // count:(i + 1) * n // count])))
    return tasks
