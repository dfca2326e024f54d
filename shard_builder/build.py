"""``build``: Kaggle tree or zip -> WebDataset shards + manifest, local or on S3.

    python -m shard_builder build --source ~/imagenet --output s3://bucket/in-10pct --subset-percentage 10
    python -m shard_builder build --source ~/imagenet-object-localization-challenge.zip --output /data/shards

Each shard is built by one worker process (shard_builder.worker) from the pure plan
(shard_builder.plan): write the tar, then its index sidecar. The sidecar is the shard's completion record, so
a rerun after Ctrl-C, ``kill -9`` or a lost instance keeps every shard whose size and
SHA-256 check out and builds only the rest. With an S3 output each shard is uploaded as
soon as it is finished and its local scratch copy removed, so scratch space stays under
about ``workers`` shards. The manifest is written last.
"""
from __future__ import annotations

import argparse
import errno
import json
import multiprocessing as mp
import os
import shutil
import tempfile
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

from common import storage
from common.errors import UserError
from common.lease import DEFAULT_LEASE_SECONDS, Lease
from common.log import setup_logging
from common.manifest import MANIFEST_NAME, Manifest, SplitInfo, dumps, save
from shard_builder import worker
from shard_builder.plan import DEFAULT_SHARD_MAX_BYTES, SPLITS, BuildOptions, make_plan
from shard_builder.source import open_source
from shard_builder.worker import ShardResult

STATE_NAME = ".build-state.json"


def _prepare_output(output: str, build_args: dict, overwrite: bool) -> None:
    """Refuse a DEST holding a different build (unless overwrite); record ours; clean temp files."""
    storage.check_writable(output)
    for name in (MANIFEST_NAME, STATE_NAME):
        url = storage.join(output, name)
        try:
            prior = json.loads(storage.read_bytes(url))
        except (FileNotFoundError, NotADirectoryError):
            continue
        except json.JSONDecodeError:
            prior = {}
        prior_fp = prior.get("build_args", {}).get("fingerprint")
        if prior_fp != build_args["fingerprint"] and not overwrite:
            raise UserError(f"{output} already holds a build with different arguments: choose another --output, "
                            "or pass --overwrite to replace it")
    if overwrite:
        for url in storage.list_prefix(output):
            rel = url[len(str(output)):].lstrip("/")
            if rel in (MANIFEST_NAME, STATE_NAME) or rel.split("/")[0] in SPLITS:
                storage.delete(url)
    _remove_temp_files(output)  # of a killed run
    storage.write_bytes(storage.join(output, STATE_NAME), dumps({"build_args": build_args}))


def _remove_temp_files(output: str) -> None:
    """Delete shard temp files (``.train-000003.tar.xxxx.tmp``) that a stopped worker left behind."""
    if not storage.is_s3(output):
        for split in SPLITS:
            for stale in Path(output, split).glob(".*.tmp"):
                stale.unlink(missing_ok=True)


def _progress(counters, total_images: int, total_bytes: int, stop: threading.Event, enabled: bool) -> None:
    from tqdm import tqdm

    images, nbytes = counters
    bar = tqdm(total=total_images, unit="img", smoothing=0.1, disable=not enabled, dynamic_ncols=True)
    t0, last = time.time(), 0
    while True:
        finished = stop.wait(0.5)
        now = images.value
        bar.update(now - last)
        last = now
        mb_s = nbytes.value / 1e6 / max(1e-6, time.time() - t0)
        bar.set_postfix_str(f"{mb_s:.1f} MB/s of {total_bytes / 1e9:.2f} GB")
        if finished:
            break
    bar.close()


def build_shards(source: str, output: str, *, subset_percentage: float = 100.0, classes_file: str | None = None,
                 seed: int = 0, splits=SPLITS, shard_max_bytes: int = DEFAULT_SHARD_MAX_BYTES,
                 shard_max_count: int | None = None, resize_max_side: int | None = None, jpeg_quality: int = 90,
                 workers: int | None = None, overwrite: bool = False, progress: bool = False,
                 scratch_dir: str | None = None, log_file: str | None = None,
                 lease_seconds: float = DEFAULT_LEASE_SECONDS) -> Manifest:
    """Build the shards and the manifest; returns the manifest. See the module docstring.

    Holds the destination's single-writer lease (common.lease) for the whole build: a second
    build into it exits 2 naming this one; a killed build's lease is taken over (at once when
    provably dead, else once ``lease_seconds`` old)."""
    output = str(output).rstrip("/") if storage.is_s3(output) else str(Path(output).expanduser())
    opts = BuildOptions(float(subset_percentage), classes_file, int(seed), tuple(splits), int(shard_max_bytes),
                        shard_max_count, resize_max_side, int(jpeg_quality))
    opts.check()
    workers = max(1, workers or os.cpu_count() or 1)
    lease = Lease(output, lease_seconds, what="shard_builder build").acquire()
    try:
        return _build(source, output, opts, workers, overwrite, progress, scratch_dir, log_file, lease)
    finally:
        lease.release()  # no-op when it was taken over


def _next_result(results, lease: Lease) -> ShardResult | None:
    """The next finished shard (None at the end), checking the lease every second while waiting:
    once it is lost the pool is torn down and nothing more is written."""
    while True:
        try:
            return results.next(timeout=1.0)
        except StopIteration:
            return None
        except mp.TimeoutError:
            lease.check()


def _build(source: str, output: str, opts: BuildOptions, workers: int, overwrite: bool, progress: bool,
           scratch_dir: str | None, log_file: str | None, lease: Lease) -> Manifest:
    started = time.time()
    src = open_source(source, need_train="train" in opts.splits, need_val="val" in opts.splits)
    plan = make_plan(src, opts)
    plan.build_args["source"] = str(source)
    _prepare_output(output, plan.build_args, overwrite)

    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    local_log = log_file or (str(Path(output, "logs", f"build-{stamp}.log")) if not storage.is_s3(output)
                             else str(Path(tempfile.gettempdir(), f"shard_builder-build-{stamp}.log")))
    log = setup_logging("shard_builder", local_log)
    log.info(f"source {src.location} ({src.kind}); {len(plan.classes)} classes; "
             + ", ".join(f"{s}: {n} images" for s, n in plan.num_samples.items())
             + f"; {len(plan.tasks)} shards; {workers} workers -> {output}")

    results = _run_workers(plan, src, output, opts, workers, progress, scratch_dir, lease, log)
    manifest = _write_manifest(plan, opts, results, output, lease)

    elapsed = time.time() - started
    built = [r for r in results.values() if not r.reused]
    total_bytes = sum(r.info.bytes for r in results.values())
    log.info(f"done in {elapsed:.1f}s: {len(plan.classes)} classes; "
             + "; ".join(f"{s}: {i.num_samples} samples in {len(i.shards)} shards" for s, i in manifest.splits.items())
             + f"; {total_bytes / 1e6:.1f} MB; {len(built)} shards built, {len(results) - len(built)} kept; "
             f"{len(manifest.skipped)} source files skipped; {sum(plan.num_samples.values()) / elapsed:.0f} img/s, "
             f"{plan.source_bytes / 1e6 / elapsed:.1f} MB/s")
    for s in manifest.skipped:
        log.info(f"skipped {s['path']}: {s['reason']}")
    if storage.is_s3(output) and not log_file:
        log.handlers[-1].flush()
        storage.upload_file(local_log, storage.join(output, "logs", Path(local_log).name))
    log.info(f"manifest: {storage.join(output, MANIFEST_NAME)}; log: {local_log}")
    return manifest


def _run_workers(plan, src, output: str, opts: BuildOptions, workers: int, progress: bool, scratch_dir: str | None,
                 lease: Lease, log) -> dict[str, ShardResult]:
    """Build (or keep) every shard of the plan on a pool of worker processes; results by shard path."""
    scratch = tempfile.mkdtemp(prefix="shard_builder-", dir=scratch_dir) if storage.is_s3(output) else None
    # fork starts workers in milliseconds; it is safe because no thread runs yet and S3
    # clients are per process (common.s3 keys them by pid).
    ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
    counters = (ctx.Value("q", 0), ctx.Value("q", 0))
    stop = threading.Event()
    bar = threading.Thread(target=_progress, args=(counters, sum(plan.num_samples.values()), plan.source_bytes, stop,
                                                    progress), daemon=True)
    results: dict[str, ShardResult] = {}
    try:
        with ctx.Pool(workers, initializer=worker.start,
                      initargs=(src.opener(), output, opts, plan.fingerprint, scratch, counters)) as pool:
            bar.start()
            lease.start_renewing()  # after the fork of the workers, like the progress thread
            pending = pool.imap_unordered(worker.build_task, plan.tasks, chunksize=1)  # one shard per task
            while (res := _next_result(pending, lease)) is not None:
                results[res.info.path] = res
                log.debug(f"{'kept' if res.reused else 'built'} {res.info.path}: {res.info.num_samples} samples, "
                          f"{res.info.bytes} bytes, sha256 {res.info.sha256}")
    except BaseException as exc:
        _remove_temp_files(output)  # workers stopped mid-shard by the pool's terminate()
        if not isinstance(exc, OSError) or exc.errno not in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT):
            raise
        raise UserError(f"no space left while writing shards ({exc.strerror}): free space (or pass --scratch-dir) "
                        "and rerun the same command to resume", exit_code=1) from None
    finally:
        stop.set()
        if bar.is_alive():
            bar.join()
        if scratch:
            shutil.rmtree(scratch, ignore_errors=True)
    return results


def _write_manifest(plan, opts: BuildOptions, results: dict[str, ShardResult], output: str, lease: Lease) -> Manifest:
    """The manifest of the finished shards, written last (only while the lease is still ours)."""
    splits_info, skipped = {}, list(plan.skipped)
    for split in opts.splits:
        shards = [results[t.tar_path] for t in plan.tasks if t.split == split]
        splits_info[split] = SplitInfo(sum(r.info.num_samples for r in shards), [r.info for r in shards])
        for r in shards:
            skipped.extend(r.skipped)
    skipped.sort(key=lambda d: (d["split"], d["path"]))
    manifest = Manifest(plan.build_args, opts.seed, plan.classes, splits_info, skipped,
                        created=datetime.now(timezone.utc).isoformat(timespec="seconds"), root=output)
    manifest.validate()
    lease.renew()  # LeaseLost (exit 77) if another build took over: then no manifest from this one
    save(manifest, output)  # last: its presence marks a finished build
    storage.delete(storage.join(output, STATE_NAME))
    return manifest


# --------------------------------------------------------------------------- CLI
def parse_size(text: str) -> int:
    """``268435456``, ``256MB``, ``256MiB``, ``1GB`` -> bytes."""
    units = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30}
    t = text.strip().lower()
    num = t.rstrip("kmgib")
    try:
        return int(float(num) * units[t[len(num):]])
    except (KeyError, ValueError):
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 256MB)") from None


def add_parser(sub) -> None:
    p = sub.add_parser("build", help="Kaggle ILSVRC tree or zip -> WebDataset shards (local or s3://)",
                       description=__doc__.splitlines()[0])
    p.add_argument("--source", required=True, help="unzipped Kaggle folder (holds LOC_synset_mapping.txt) or the .zip")
    p.add_argument("--output", required=True, help="local folder or s3://bucket/prefix")
    choice = p.add_mutually_exclusive_group()
    choice.add_argument("--subset-percentage", type=float, default=100.0, help="percent of classes (0, 100]")
    choice.add_argument("--classes-file", help="file with one wnid per line")
    p.add_argument("--seed", type=int, default=0, help="class choice and sample shuffle seed")
    p.add_argument("--splits", default="train,val", help="comma-separated: train,val")
    p.add_argument("--shard-max-bytes", type=parse_size, default=DEFAULT_SHARD_MAX_BYTES)
    p.add_argument("--shard-max-count", type=int, default=None)
    p.add_argument("--resize-max-side", type=int, default=None, help="re-encode images whose longer side exceeds PX")
    p.add_argument("--jpeg-quality", type=int, default=90)
    p.add_argument("--workers", type=int, default=None, help="worker processes (default: all cores)")
    p.add_argument("--overwrite", action="store_true", help="replace a different build at --output")
    p.add_argument("--scratch-dir", default=None, help="local scratch for shards bound for S3")
    p.add_argument("--log-file", default=None)
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--lease-seconds", type=float, default=DEFAULT_LEASE_SECONDS,
                   help="one build per --output: another may take over a lease not renewed this long")
    p.set_defaults(func=run)


def run(args) -> int:
    if args.workers is not None and args.workers < 1:
        raise UserError(f"--workers must be at least 1, got {args.workers}")
    m = build_shards(args.source, args.output, subset_percentage=args.subset_percentage,
                     classes_file=args.classes_file, seed=args.seed,
                     splits=tuple(s.strip() for s in args.splits.split(",") if s.strip()),
                     shard_max_bytes=args.shard_max_bytes, shard_max_count=args.shard_max_count,
                     resize_max_side=args.resize_max_side, jpeg_quality=args.jpeg_quality, workers=args.workers,
                     overwrite=args.overwrite, progress=not args.no_progress, scratch_dir=args.scratch_dir,
                     log_file=args.log_file, lease_seconds=args.lease_seconds)
    print(f"built {m.root}: {m.num_classes} classes, "
          + ", ".join(f"{s} {i.num_samples} samples / {len(i.shards)} shards" for s, i in m.splits.items())
          + f", {len(m.skipped)} skipped")
    return 0
