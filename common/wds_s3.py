"""``s3://`` URLs for webdataset through our storage layer: no ``aws`` CLI, no ``pipe:``.

    import webdataset as wds
    from common import wds_s3

    wds_s3.register()  # this process (forked DataLoader workers inherit it)
    ds = wds.WebDataset("s3://bucket/imagenet/train/train-{000000..000099}.tar", shardshuffle=False)
    loader = DataLoader(ds, num_workers=4, multiprocessing_context="spawn",
                        worker_init_fn=wds_s3.worker_init_fn)  # spawn workers register themselves

Reads go through :class:`common.s3.S3Reader`: when a connection drops mid-shard the read
reopens the object with an HTTP Range from the byte where it stopped, with bounded retries and
backoff, and finally fails with an error naming the shard. Writes (``ShardWriter("s3://...")``)
spool to a local temp file and upload on a clean close, so a crash never leaves a partial
object. Registration edits webdataset's per-process dispatch table, which is why it is an
explicit call (and idempotent) rather than an import side effect.
"""
from __future__ import annotations

import io
import os
import tempfile

from common import storage


class _UploadOnClose(io.RawIOBase):
    """A write-only file that becomes the S3 object ``url`` when closed without an error."""

    def __init__(self, url: str):
        super().__init__()
        self.url = url
        fd, self._path = tempfile.mkstemp(prefix="wds-s3-", suffix=".tmp")
        self._file = os.fdopen(fd, "wb")
        self._failed = False

    def writable(self) -> bool:
        return True

    def write(self, b) -> int:
        return self._file.write(b)

    def __exit__(self, exc_type, exc, tb):
        self._failed = exc_type is not None
        return super().__exit__(exc_type, exc, tb)

    def close(self) -> None:
        if self.closed:
            return
        try:
            self._file.close()
            if not self._failed:
                storage.upload_file(self._path, self.url)
        finally:
            os.unlink(self._path)
            super().close()


def gopen_s3(url: str, mode: str = "rb", bufsize: int = 8192, **kw):
    """webdataset ``gopen`` handler for ``s3://bucket/key``."""
    if mode == "rb":
        return storage.open_read(url)
    if mode == "wb":
        return _UploadOnClose(url)
    raise ValueError(f"{url}: unsupported mode {mode!r}")


def register() -> None:
    """Make ``webdataset.gopen`` (hence ``WebDataset``/``ShardWriter``) open s3:// via our storage."""
    # ``webdataset.gopen`` is shadowed by the function of that name; import the table itself.
    from webdataset.gopen import gopen_schemes

    gopen_schemes["s3"] = gopen_s3


def worker_init_fn(worker_id: int) -> None:
    """DataLoader ``worker_init_fn`` for spawn workers, which start without the registration."""
    register()
