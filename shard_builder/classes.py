"""ImageNet class lists: LOC_synset_mapping.txt parsing and seeded subset selection.

Classes are always keyed by wnid (display names repeat: two "crane", two "maillot").
Subset choice and sample shuffling use SHA-256 of (seed, item) as a sort key rather than
a PRNG: the result is identical on every machine and Python version, and independent of
the order in which a directory listing or a zip happened to enumerate the items.
"""
from __future__ import annotations

import hashlib
import re

from common.errors import UserError

WNID_RE = re.compile(r"^n\d{8}$")


def parse_synset_mapping(text: str, where: str = "LOC_synset_mapping.txt") -> list[tuple[str, str]]:
    """``n01440764 tench, Tinca tinca`` lines -> [(wnid, name)] in ascending wnid order.

    Split on the first space only: names contain spaces and commas.
    """
    out = []
    for lineno, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line:
            continue
        wnid, _, name = line.partition(" ")
        if not WNID_RE.match(wnid):
            raise UserError(f"{where} line {lineno}: {wnid!r} is not a wnid (expected like n01440764)")
        out.append((wnid, name.strip()))
    if not out:
        raise UserError(f"{where} lists no classes")
    wnids = [w for w, _ in out]
    if len(set(wnids)) != len(wnids):
        raise UserError(f"{where} lists a wnid twice")
    return sorted(out)


def hash_key(seed: int, *parts: object) -> bytes:
    """Stable sort key for seeded, platform-independent shuffles and choices."""
    return hashlib.sha256(":".join(str(p) for p in (seed, *parts)).encode()).digest()


def choose_subset(wnids: list[str], percentage: float, seed: int) -> list[str]:
    """round(percentage% of the classes), chosen by seed; returned in sorted-wnid order."""
    if not 0 < percentage <= 100:
        raise UserError(f"--subset-percentage must be in (0, 100], got {percentage:g}")
    k = max(1, round(len(wnids) * percentage / 100))
    return sorted(sorted(wnids, key=lambda w: hash_key(seed, "class", w))[:k])


def read_classes_file(text: str, available: list[str], where: str) -> list[str]:
    """One wnid per line (blank lines and ``#`` comments ignored) -> sorted unique wnids."""
    chosen = []
    for lineno, line in enumerate(text.splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        wnid = line.split()[0]
        if not WNID_RE.match(wnid):
            raise UserError(f"{where} line {lineno}: {wnid!r} is not a wnid (expected like n01440764)")
        chosen.append(wnid)
    if not chosen:
        raise UserError(f"{where} lists no classes: put one wnid per line")
    missing = sorted(set(chosen) - set(available))
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise UserError(f"{where}: class {missing[0]}{more} is not in the source's LOC_synset_mapping.txt")
    return sorted(set(chosen))
