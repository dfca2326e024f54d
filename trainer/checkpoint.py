"""Checkpoints: atomic writes, background S3 upload, a ``latest`` pointer that never lies.

Layout under the run folder (local or s3://)::

    checkpoints/checkpoint_epoch_003.pth              after epoch 3 (1-based, like the original script)
    checkpoints/checkpoint_epoch_004_step_000120.pth  mid-epoch (interval, or an interruption)
    checkpoints/<name>.json                           sidecar: bytes, sha256, epoch, step (written after
                                                      the checkpoint is complete and verified)
    checkpoints/latest.json                           pointer to the newest verified checkpoint
    model_best.pth                                    small: weights + classes + normalization

Order of writes, so a crash at any point leaves ``latest`` valid: checkpoint file (local:
temp file + fsync + rename; S3: upload, then size and checksum verified), then its sidecar,
then the pointer. On S3 the upload runs on a background thread; training goes on.

Single writer: with a lease (common.lease), every write first renews it (a holder that was
taken over writes nothing more), and ``latest.json`` only moves with a conditional write
on the ETag this run last wrote (or saw at resume, :meth:`CheckpointStore.fence`), so even
a stale writer that missed the takeover cannot move the pointer.

Resume (:meth:`CheckpointStore.choose`, then :meth:`CheckpointStore.obtain` on every rank):
the pointer's target first, then every sidecar newest first. A candidate whose bytes do
not match its recorded size/sha256, or that does not load, is skipped with a warning and
left in place (never deleted silently). Everything is loaded with weights_only=True.
"""
from __future__ import annotations

import json
import logging
import shutil
import tempfile
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import torch

from common import storage
from common.errors import UserError
from common.lease import Lease, LeaseLost
from trainer.state import TrainState

log = logging.getLogger("trainer")
CKPT_DIR = "checkpoints"
LATEST = "latest.json"


def checkpoint_name(epoch: int, step_in_epoch: int) -> str:
    """``epoch`` is the 0-based epoch in progress; step 0 means "start of epoch" = end of the previous."""
    if step_in_epoch == 0:
        return f"checkpoint_epoch_{epoch:03d}.pth"          # = after (1-based) epoch `epoch`
    return f"checkpoint_epoch_{epoch + 1:03d}_step_{step_in_epoch:06d}.pth"


class CheckpointStore:
    """Saves (rank 0 only) and finds checkpoints of one run folder."""

    def __init__(self, output: str, local_dir: str, keep_last: int = 5, lease: Lease | None = None):
        self.output, self.local = str(output), Path(local_dir)
        self.lease = lease  # rank 0's single-writer lease on the run folder (None: unguarded)
        self._pointer_etag: str | None = None  # latest.json as this run last wrote or saw it
        self.remote = storage.is_s3(self.output)
        self.keep_last = keep_last
        self._uploader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ckpt-upload") if self.remote else None
        self._pending: list[Future] = []
        self._uploaded_local: list[Path] = []  # local copies already safe in S3

    # ------------------------------------------------------------------ paths
    def url(self, name: str) -> str:
        return storage.join(self.output, CKPT_DIR, name)

    def local_path(self, name: str) -> Path:
        return self.local / CKPT_DIR / name

    # ------------------------------------------------------------------ single writer (lease)
    def may_write(self) -> bool:
        """Renew the lease now (about to write); False once it is lost (then write nothing)."""
        try:
            if self.lease is not None:
                self.lease.renew()
            return True
        except LeaseLost:
            return False
        except Exception as exc:  # noqa: BLE001 - S3 unreachable: the lease stays ours until it expires
            if self.lease.renewed_ago() >= self.lease.lease_seconds / 2:
                raise
            log.warning(f"could not renew the lease now ({exc}); it was renewed "
                        f"{self.lease.renewed_ago():.0f} s ago, so writing on")
            return True

    def fence(self) -> None:
        """Rank 0, once it holds the lease: stamp latest.json with this run's writer id (If-Match
        on the version seen), so a writer that lost the lease can no longer move it."""
        if self.lease is None:
            return
        url = self.url(LATEST)
        try:
            seen = storage.get_versioned(url)
        except FileNotFoundError:
            self._pointer_etag = None  # the first publish creates it (If-None-Match)
            return
        try:
            pointer = json.loads(seen.data)
            pointer["writer"] = self.lease.token
            self._pointer_etag = storage.put_versioned(url, json.dumps(pointer).encode(), if_match=seen.etag)
        except (ValueError, TypeError):
            self._pointer_etag = seen.etag  # unreadable: left as it is (resume already skipped it)
        except storage.PreconditionFailed:
            raise UserError(f"{url} changed while this run started: is another trainer writing to "
                            f"{self.output}? Stop it and rerun") from None

    def _move_pointer(self, meta: dict) -> None:
        """latest.json := meta, conditional on the version this run last wrote."""
        url = self.url(LATEST)
        if self.lease is None:
            storage.write_bytes(url, json.dumps(meta).encode())
            return
        data = json.dumps(meta).encode()
        try:
            self._pointer_etag = storage.put_versioned(url, data, if_match=self._pointer_etag,
                                                       if_none_match=self._pointer_etag is None)
            return
        except storage.PreconditionFailed:
            self.lease.renew()  # LeaseLost here: we are the stale writer, the pointer stays
        try:  # we hold the lease: our own write retried after a drop, or a stale writer moved it
            seen = storage.get_versioned(url)
        except FileNotFoundError:
            self._pointer_etag = storage.put_versioned(url, data, if_none_match=True)
            return
        if seen.data != data:
            log.warning(f"{url} was moved by a writer without the lease: pointing it back at this run")
            self._pointer_etag = storage.put_versioned(url, data, if_match=seen.etag)
        else:
            self._pointer_etag = seen.etag

    def abandon(self) -> None:
        """After losing the lease: drop queued uploads, wait for running ones (they publish
        nothing: each renews the lease first), never raise."""
        for f in self._pending:
            if not f.cancel():
                try:
                    f.result()
                except Exception:  # noqa: BLE001 - the lease is gone; nothing to report
                    pass
        self._pending.clear()

    # ------------------------------------------------------------------ saving
    def save(self, state: dict, name: str) -> None:
        """Write ``state`` as checkpoint ``name``; on S3 the upload continues in the background."""
        self.raise_failed_upload()
        if not self.may_write():
            return  # the lease is lost: the loop stops at the next step (common.lease on_lost)
        path = self.local_path(name)
        storage.atomic_write(path, lambda f: torch.save(state, f))
        meta = {"name": name, "bytes": path.stat().st_size, "sha256": storage.sha256_file(path),
                "epoch": state["epoch"], "step_in_epoch": state["step_in_epoch"], "global_step": state["global_step"]}
        if self.lease is not None:
            meta["writer"] = self.lease.token  # which run wrote it (the lease holder's id)
        if self.remote:
            self._pending.append(self._uploader.submit(self._publish_remote, path, meta))
        else:
            self._fenced(self._publish, meta)

    def save_best(self, state: dict) -> None:
        if not self.may_write():
            return
        path = self.local / "model_best.pth"
        storage.atomic_write(path, lambda f: torch.save(state, f))
        if self.remote:
            dest = storage.join(self.output, "model_best.pth")
            self._pending.append(self._uploader.submit(self._fenced, storage.upload_file, path, dest))

    def _fenced(self, write, *args) -> None:
        """Run ``write`` unless the lease is lost (renewed first); a lost lease is not an upload
        failure: it was logged and the training loop stops on it."""
        try:
            if self.may_write():
                write(*args)
        except LeaseLost:
            pass

    def _publish_remote(self, path: Path, meta: dict) -> None:
        if not self.may_write():
            return
        url = self.url(meta["name"])
        storage.upload_file(path, url, metadata={"sha256": meta["sha256"]})
        st = storage.stat(url)
        if st is None or st.size != meta["bytes"] or st.metadata.get("sha256") != meta["sha256"]:
            raise OSError(f"upload of {url} did not verify (size/sha256 differ): latest left unchanged")
        self._fenced(self._publish, meta)
        # Keep only the newest uploaded local copy (a fast resume on this machine); S3 holds the
        # rest. Never touch copies still queued for upload.
        for old in self._uploaded_local:
            old.unlink(missing_ok=True)
        self._uploaded_local = [path]

    def _publish(self, meta: dict) -> None:
        """Sidecar, then pointer (both atomic), then pruning."""
        storage.write_bytes(self.url(meta["name"][:-4] + ".json"), json.dumps(meta).encode())
        self._move_pointer(meta)
        log.debug(f"checkpoint {self.url(meta['name'])} complete; latest updated")
        self._prune(meta["name"])

    def _prune(self, keep: str) -> None:
        if self.keep_last <= 0:
            return
        metas = sorted(self._sidecars(), key=lambda m: m["global_step"], reverse=True)
        for m in metas[self.keep_last:]:
            if m["name"] != keep:
                storage.delete(self.url(m["name"][:-4] + ".json"))
                storage.delete(self.url(m["name"]))

    def raise_failed_upload(self) -> None:
        for f in [f for f in self._pending if f.done()]:
            self._pending.remove(f)
            f.result()  # re-raises an upload failure here, on the training thread

    def wait(self) -> None:
        """Block until every background upload has finished (and raise if one failed)."""
        for f in self._pending:
            f.result()
        self._pending.clear()

    def close(self) -> None:
        try:
            self.wait()
        finally:
            if self._uploader:
                self._uploader.shutdown(wait=True)

    # ------------------------------------------------------------------ finding
    def _sidecars(self) -> list[dict]:
        out = []
        for url in storage.list_prefix(storage.join(self.output, CKPT_DIR)):
            name = url.rsplit("/", 1)[-1]
            if name.startswith("checkpoint_") and name.endswith(".json"):
                try:
                    out.append(json.loads(storage.read_bytes(url)))
                except (OSError, ValueError):
                    log.warning(f"unreadable checkpoint sidecar {url}: ignored")
        return out

    def has_run(self) -> bool:
        return bool(storage.list_prefix(storage.join(self.output, CKPT_DIR))) or storage.exists(
            storage.join(self.output, "config.json"))

    def candidates(self) -> list[dict]:
        """Checkpoint metadata to try, best first: the pointer's target, then newest first."""
        out, seen = [], set()
        try:
            pointer = json.loads(storage.read_bytes(self.url(LATEST)))
            out.append(pointer)
            seen.add(pointer["name"])
        except FileNotFoundError:
            pass
        except (OSError, ValueError, KeyError):
            log.warning(f"{self.url(LATEST)} is unreadable: looking for the newest complete checkpoint")
        for m in sorted(self._sidecars(), key=lambda m: m["global_step"], reverse=True):
            if m["name"] not in seen:
                out.append(m)
                seen.add(m["name"])
        return out

    def obtain(self, meta: dict) -> Path:
        """A verified local file of checkpoint ``meta``: the local copy when its bytes match the
        record, else a fresh download. Raises ValueError when the bytes do not match."""
        local = self.local_path(meta["name"])
        if local.is_file() and local.stat().st_size == meta["bytes"] and storage.sha256_file(local) == meta["sha256"]:
            return local
        if not self.remote:
            raise ValueError("size or sha256 differs from its record (truncated or corrupt)")
        dest = self.local / "downloads" / meta["name"]
        storage.download_file(self.url(meta["name"]), dest)
        if dest.stat().st_size != meta["bytes"] or storage.sha256_file(dest) != meta["sha256"]:
            dest.unlink(missing_ok=True)
            raise ValueError("size or sha256 differs from its record (truncated or corrupt)")
        return dest

    def choose(self) -> dict | None:
        """The newest checkpoint that verifies and loads; None when there is none at all.

        Judged on the shared copy (S3 for a remote run), which every rank on every node can
        obtain; a local staging copy is only a shortcut to identical bytes.
        """
        tried = []
        for meta in self.candidates():
            url = self.url(meta["name"])
            try:
                if self.remote:
                    st = storage.stat(url)
                    if st is None or st.size != meta["bytes"] or st.metadata.get("sha256") != meta["sha256"]:
                        raise ValueError("the S3 object is missing or differs from its record (truncated?)")
                    self.local_path(meta["name"]).unlink(missing_ok=True)  # re-fetch: judge the shared bytes
                TrainState.load(self.obtain(meta))
                return meta
            except (OSError, ValueError, RuntimeError) as exc:
                log.warning(f"checkpoint {url} is not usable ({exc}); trying the previous one (it is kept)")
                tried.append(url)
        if tried:
            raise UserError(f"no usable checkpoint under {self.output} (tried {len(tried)}): "
                            "start over with --resume none --overwrite, or pass --resume PATH")
        return None


def fetch_any(url: str, scratch: str | None = None) -> Path:
    """Local path of a checkpoint given as a path or s3:// URL (downloaded to a temp folder)."""
    if not storage.is_s3(url):
        path = Path(url).expanduser()
        if not path.is_file():
            raise UserError(f"checkpoint {url} does not exist")
        return path
    if not storage.exists(url):
        raise UserError(f"checkpoint {url} does not exist")
    dest = Path(scratch or tempfile.mkdtemp(prefix="ckpt-")) / url.rsplit("/", 1)[-1]
    storage.download_file(url, dest)
    return dest


def clear_run(output: str, local_dir: str) -> None:
    """--overwrite: remove a previous run's checkpoints and logs (never anything else)."""
    for url in storage.list_prefix(output):
        rel = url[len(str(output)):].lstrip("/")
        if rel.startswith(CKPT_DIR + "/") or rel in ("config.json", "metrics.jsonl", "model_best.pth",
                                                       "training_curves.png") or rel.startswith("training_log_"):
            storage.delete(url)
    if Path(local_dir).exists() and local_dir != output:
        shutil.rmtree(Path(local_dir) / CKPT_DIR, ignore_errors=True)
