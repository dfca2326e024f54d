"""Read the Kaggle ILSVRC download: the unzipped tree, or the .zip read in place.

The root is "the folder that holds LOC_synset_mapping.txt" (see
docs/kaggle-layout.md); both kinds of source name files by their POSIX path
relative to that root, so a tree and its zip yield identical samples and shards.

The zip (about 160 GB, ZIP64) is never extracted: the main process reads the central
directory once and hands workers a small :class:`FileRef` per member (offset and sizes);
a worker seeks to the member's local header, reads the compressed bytes and inflates
them, checking the CRC. No worker parses the 2M-entry central directory again.
"""
from __future__ import annotations

import os
import struct
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from common.errors import UserError

SYNSET_MAPPING = "LOC_synset_mapping.txt"
VAL_SOLUTION = "LOC_val_solution.csv"
TRAIN_DIR = "ILSVRC/Data/CLS-LOC/train"
VAL_DIR = "ILSVRC/Data/CLS-LOC/val"
JPEG_SUFFIXES = (".jpeg",)  # compared lower-case: .JPEG and .jpeg


@dataclass(frozen=True)
class FileRef:
    """Where one source image lives. For a zip member: offset of its local header and sizes."""

    relpath: str
    size: int
    zip_offset: int = -1
    compress_type: int = 0
    compress_size: int = 0
    crc: int = 0


def is_jpeg_name(name: str) -> bool:
    return PurePosixPath(name).suffix.lower() in JPEG_SUFFIXES


class Source:
    """Common interface of the tree and zip sources."""

    kind: str
    location: str

    def read_text(self, relpath: str) -> str:
        raise NotImplementedError

    def has(self, relpath: str) -> bool:
        raise NotImplementedError

    def list_dir_files(self, reldir: str) -> list[FileRef]:
        """Every regular file below ``reldir`` (recursively), sorted by relpath."""
        raise NotImplementedError

    def opener(self) -> "Reader":
        raise NotImplementedError


class Reader:
    """Picklable per-worker byte reader of FileRefs."""

    def read(self, ref: FileRef) -> bytes:
        raise NotImplementedError


# --------------------------------------------------------------------------- tree
class TreeSource(Source):
    kind = "tree"

    def __init__(self, root: Path):
        self.root = root
        self.location = str(root)

    def read_text(self, relpath: str) -> str:
        return (self.root / relpath).read_text(encoding="utf-8")

    def has(self, relpath: str) -> bool:
        return (self.root / relpath).exists()

    def list_dir_files(self, reldir: str) -> list[FileRef]:
        base = self.root / reldir
        out = []
        for dirpath, _dirs, files in os.walk(base):
            for name in files:
                path = Path(dirpath, name)
                out.append(FileRef(path.relative_to(self.root).as_posix(), path.stat().st_size))
        return sorted(out, key=lambda r: r.relpath)

    def opener(self) -> Reader:
        return TreeReader(str(self.root))


class TreeReader(Reader):
    def __init__(self, root: str):
        self.root = root

    def read(self, ref: FileRef) -> bytes:
        with open(os.path.join(self.root, ref.relpath), "rb") as f:
            return f.read()


# --------------------------------------------------------------------------- zip
_LOCAL_HEADER = struct.Struct("<4s2B4HL2L2H")  # zipfile's structFileHeader, 30 bytes


class ZipSource(Source):
    kind = "zip"

    def __init__(self, path: Path):
        self.path = path
        self.location = str(path)
        try:
            with zipfile.ZipFile(path) as zf:
                infos = zf.infolist()
        except (zipfile.BadZipFile, OSError) as exc:
            raise UserError(f"{path} is not a readable zip ({exc}): re-download it or pass the unzipped folder") from None
        roots = [i.filename[: -len(SYNSET_MAPPING)] for i in infos
                 if i.filename == SYNSET_MAPPING or i.filename.endswith("/" + SYNSET_MAPPING)]
        if not roots:
            wrapped = [i.filename for i in infos if i.filename.endswith((".tar.gz", ".tgz"))]
            if wrapped:
                raise UserError(f"{path} wraps {wrapped[0]} (an older Kaggle download): extract that archive and "
                                "pass the extracted folder as --source")
            raise UserError(f"{path} is not the Kaggle ILSVRC zip: it has no {SYNSET_MAPPING}")
        self.prefix = min(roots, key=len)
        # Keep compact refs only; the ZipInfo objects of ~2M entries are dropped here.
        self.members: dict[str, FileRef] = {}
        for i in infos:
            if i.is_dir() or not i.filename.startswith(self.prefix):
                continue
            rel = i.filename[len(self.prefix):]
            self.members[rel] = FileRef(rel, i.file_size, i.header_offset, i.compress_type, i.compress_size, i.CRC)
        for ref in self.members.values():
            if ref.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
                raise UserError(f"{path}: member {ref.relpath} uses an unsupported compression method "
                                f"({ref.compress_type}): unzip it and pass the folder instead")

    def read_text(self, relpath: str) -> str:
        return self.opener().read(self.members[relpath]).decode("utf-8")

    def has(self, relpath: str) -> bool:
        return relpath in self.members or any(k.startswith(relpath.rstrip("/") + "/") for k in self.members)

    def list_dir_files(self, reldir: str) -> list[FileRef]:
        prefix = reldir.rstrip("/") + "/"
        return sorted((r for k, r in self.members.items() if k.startswith(prefix)), key=lambda r: r.relpath)

    def opener(self) -> Reader:
        return ZipReader(str(self.path))


class ZipReader(Reader):
    """Reads members by offset; the file handle is opened lazily in each worker process."""

    def __init__(self, path: str):
        self.path = path
        self._f = None

    def __getstate__(self):
        return {"path": self.path, "_f": None}

    def read(self, ref: FileRef) -> bytes:
        if self._f is None:
            self._f = open(self.path, "rb")
        f = self._f
        f.seek(ref.zip_offset)
        header = f.read(_LOCAL_HEADER.size)
        fields = _LOCAL_HEADER.unpack(header)
        if fields[0] != b"PK\x03\x04":
            raise OSError(f"{self.path}: bad local header for {ref.relpath}")
        name_len, extra_len = fields[10], fields[11]
        f.seek(name_len + extra_len, os.SEEK_CUR)
        raw = f.read(ref.compress_size)
        data = raw if ref.compress_type == zipfile.ZIP_STORED else zlib.decompress(raw, -15)
        if len(data) != ref.size or zlib.crc32(data) != ref.crc:
            raise OSError(f"{self.path}: CRC or size mismatch in member {ref.relpath}")
        return data


# --------------------------------------------------------------------------- opening
def open_source(src: str | os.PathLike, need_train: bool = True, need_val: bool = True) -> Source:
    """Open SRC (tree folder or .zip) and check it has what the requested splits need."""
    path = Path(src).expanduser()
    if not path.exists():
        raise UserError(f"--source {src} does not exist: pass the unzipped Kaggle folder or the downloaded .zip")
    if path.is_file():
        source: Source = ZipSource(path)
    else:
        root = path
        if not (root / SYNSET_MAPPING).is_file():
            # `unzip x.zip -d ILSVRC` gives ILSVRC/ILSVRC/...: accept the folder one level up.
            nested = sorted(p.parent for p in path.glob(f"*/{SYNSET_MAPPING}"))
            if len(nested) != 1:
                raise UserError(f"{src} is not a Kaggle ILSVRC tree: {SYNSET_MAPPING} is missing "
                                "(pass the folder that holds it and ILSVRC/Data/CLS-LOC/)")
            root = nested[0]
        source = TreeSource(root)
    needed = ([TRAIN_DIR] if need_train else []) + ([VAL_DIR, VAL_SOLUTION] if need_val else [])
    for rel in needed:
        if not source.has(rel):
            raise UserError(f"{src} is not a complete Kaggle ILSVRC download: {rel} is missing")
    return source
