"""One shard-builder worker process: build the shards of the plan it is handed.

    python -m shard_builder build ...   # build.py starts a pool of these (one ShardWorker each)

A shard is written as a tar, then its index sidecar: the sidecar is the shard's completion
record, so a rerun keeps every shard whose index and tar still check out
(common.manifest.shard_problems) and builds only the rest. With an S3 output the tar is
written to local scratch, uploaded with its SHA-256 as object metadata, then removed.
"""
from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass

from common import storage
from common.manifest import ShardIndex, ShardInfo, sha256_bytes, shard_problems
from shard_builder.images import BadImage, prepare_image
from shard_builder.plan import BuildOptions, ShardTask
from shard_builder.source import Reader


@dataclass(frozen=True)
class ShardResult:
    info: ShardInfo
    skipped: list[dict]
    reused: bool


class ShardWorker:
    """What a worker needs for every shard: the source reader, the output, the options, the
    build's fingerprint, the scratch folder (S3 output) and the shared progress counters."""

    def __init__(self, reader: Reader, output: str, opts: BuildOptions, fingerprint: str, scratch: str | None,
                 counters):
        self.reader, self.output, self.opts = reader, output, opts
        self.fingerprint, self.scratch, self.counters = fingerprint, scratch, counters

    def build(self, task: ShardTask) -> ShardResult:
        """The shard's result: kept when a previous run finished it, else written now."""
        done = self.finished(task)
        if done is not None:
            return done
        tar_url = storage.join(self.output, task.tar_path)
        if not storage.is_s3(self.output):
            # No fsync: a resumed build re-hashes every shard it keeps, so a torn write after a
            # power loss is caught there, and the rename is atomic.
            idx, skipped = storage.atomic_write(tar_url, lambda f: self.write_tar(task, f), fsync=False)
        else:
            fd, tmp = tempfile.mkstemp(prefix=f"{task.name}.", suffix=".tar", dir=self.scratch)  # scratch, not output
            try:
                with os.fdopen(fd, "wb", buffering=1 << 20) as f:
                    idx, skipped = self.write_tar(task, f)
                storage.upload_file(tmp, tar_url, metadata={"sha256": idx.sha256})
            finally:
                os.unlink(tmp)
        raw = idx.to_bytes()
        storage.write_bytes(storage.join(self.output, task.index_path), raw)  # completion record, written last
        return ShardResult(ShardInfo(task.tar_path, len(idx), idx.bytes, idx.sha256, task.index_path,
                                     sha256_bytes(raw)), skipped, False)

    def finished(self, task: ShardTask) -> ShardResult | None:
        """The shard's result if a previous run finished it and it still checks out."""
        idx_url, tar_url = storage.join(self.output, task.index_path), storage.join(self.output, task.tar_path)
        try:
            raw = storage.read_bytes(idx_url)
            idx = ShardIndex.from_bytes(raw)
        except (FileNotFoundError, ValueError, KeyError):
            return None
        if idx.fingerprint != self.fingerprint or shard_problems(tar_url, idx.bytes, idx.sha256, against="its index"):
            return None
        return ShardResult(ShardInfo(task.tar_path, len(idx), idx.bytes, idx.sha256, task.index_path,
                                     sha256_bytes(raw)), idx.skipped, True)

    def write_tar(self, task: ShardTask, f) -> tuple[ShardIndex, list[dict]]:
        """Write the shard's samples to ``f`` as a tar; its index and the source files skipped."""
        from shard_builder.writer import ShardWriter

        opts = self.opts
        writer = ShardWriter(f)
        rows, skipped = [], []
        done_images = done_bytes = 0
        for s in task.samples:
            try:
                prepared = prepare_image(self.reader.read(s.ref), opts.resize_max_side, opts.jpeg_quality)
            except BadImage as exc:
                skipped.append({"split": task.split, "path": s.ref.relpath, "reason": str(exc)})
                continue
            meta = json.dumps({"wnid": s.wnid, "imagenet_index": s.imagenet_index, "source": s.ref.relpath,
                               "width": prepared.width, "height": prepared.height, "label": s.label},
                              sort_keys=True, separators=(",", ":")).encode()
            start, end, jpg_off, jpg_size = writer.add(s.key, prepared.data, s.label, meta)
            rows.append((s.key, start, end, jpg_off, jpg_size, s.label))
            done_images, done_bytes = done_images + 1, done_bytes + s.ref.size
            if done_images % 64 == 0 or s is task.samples[-1]:
                self._count(done_images, done_bytes)
                done_images = done_bytes = 0
        self._count(done_images, done_bytes)
        size, sha = writer.close()
        cols = [list(c) for c in zip(*rows)] if rows else [[] for _ in range(6)]
        return ShardIndex(task.name + ".tar", size, sha, *cols, skipped, self.fingerprint), skipped

    def _count(self, images: int, nbytes: int) -> None:
        """Add to the shared progress counters (batched: each update takes a lock)."""
        if images:
            img_counter, byte_counter = self.counters
            with img_counter.get_lock():
                img_counter.value += images
            with byte_counter.get_lock():
                byte_counter.value += nbytes


# A pool hands tasks to plain functions, and the shared counters may only reach a worker by
# inheritance: so the pool's initializer makes this process's ShardWorker, and build_task uses it.
_worker: ShardWorker | None = None


def start(*args) -> None:
    """Pool initializer: this process's ShardWorker (arguments as ShardWorker's)."""
    global _worker
    _worker = ShardWorker(*args)


def build_task(task: ShardTask) -> ShardResult:
    return _worker.build(task)
