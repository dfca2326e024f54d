"""Deterministic WebDataset tar writer that records each sample's byte offsets.

Every member gets fixed metadata (mtime 0, uid/gid 0, no user names, mode 0644) in plain
USTAR format, so the same samples always give byte-identical shards that ``tar`` and
``webdataset.WebDataset`` read with no code of ours. Headers come from a prebuilt
template (tarfile's per-member header code costs more than copying a 110 KB JPEG), and
the SHA-256 is computed while writing, so a shard is never read back just to hash it.
"""
from __future__ import annotations

import hashlib
from typing import BinaryIO

BLOCK = 512
RECORD = 20 * BLOCK  # archives are padded to a whole record, like GNU tar and tarfile


def _template() -> bytearray:
    h = bytearray(BLOCK)
    h[100:108] = b"0000644\0"          # mode
    h[108:116] = b"0000000\0"          # uid
    h[116:124] = b"0000000\0"          # gid
    h[136:148] = b"00000000000\0"      # mtime 0
    h[156:157] = b"0"                  # regular file
    h[257:265] = b"ustar\x0000"        # POSIX ustar magic + version; devmajor/minor stay NUL
    return h


_TEMPLATE = _template()


def ustar_header(name: bytes, size: int) -> bytes:
    """One 512-byte USTAR header for a regular file (name <= 100 bytes)."""
    if len(name) > 100 or size >= 8**11:
        raise ValueError(f"member {name!r} does not fit a USTAR header")
    h = bytearray(_TEMPLATE)
    h[0:len(name)] = name
    h[124:136] = b"%011o\0" % size
    h[148:156] = b"        "         # checksum is computed over blanks in its own field
    h[148:156] = b"%06o\0 " % sum(h)
    return bytes(h)


def _padding(size: int) -> bytes:
    return bytes(-size % BLOCK)


class ShardWriter:
    """Append samples (KEY.jpg, KEY.cls, KEY.json) to one tar file."""

    def __init__(self, f: BinaryIO):
        self._f = f
        self._sha = hashlib.sha256()
        self.offset = 0

    def _write(self, data: bytes) -> None:
        self._sha.update(data)
        self._f.write(data)
        self.offset += len(data)

    def add(self, key: str, jpg: bytes, label: int, meta: bytes) -> tuple[int, int, int, int]:
        """Write one sample; returns (start, end, jpg_offset, jpg_size) within the shard."""
        if "." in key or "/" in key:
            raise ValueError(f"bad sample key {key!r}")
        k = key.encode()
        start = self.offset
        cls = str(label).encode()
        self._write(ustar_header(k + b".jpg", len(jpg)))
        self._write(jpg)
        self._write(b"".join((_padding(len(jpg)), ustar_header(k + b".cls", len(cls)), cls, _padding(len(cls)),
                              ustar_header(k + b".json", len(meta)), meta, _padding(len(meta)))))
        return start, self.offset, start + BLOCK, len(jpg)

    def close(self) -> tuple[int, str]:
        """Finish the archive (two zero blocks, record padding); returns (bytes, sha256 hex)."""
        end = self.offset + 2 * BLOCK
        self._write(bytes(2 * BLOCK + (-end % RECORD)))
        return self.offset, self._sha.hexdigest()
