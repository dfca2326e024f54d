"""Who and where this process runs: the facts a lease holder is named by, read from local
files only (no network, no secrets: names, ids and times).

    python -c "from common import host; print(host.host_id(), host.boot_id(), host.pid_start(1))"
"""
from __future__ import annotations

import hashlib
import os
import socket
from pathlib import Path

HOST_ENV = "IMAGENET_LEASE_HOST"  # names this machine in the lease (default: EC2 instance id or hostname)


def read_small(path: str | os.PathLike) -> str:
    """The first 256 characters of a small text file (sysfs, /proc, /etc), stripped; '' when unreadable."""
    try:
        with open(path, encoding="ascii", errors="replace") as f:
            return f.read(256).strip()
    except OSError:
        return ""


def _read_all(path: str) -> str:
    try:
        return Path(path).read_text(errors="replace")
    except OSError:
        return ""


def host_id() -> str:
    """``$IMAGENET_LEASE_HOST``, else the EC2 instance id (Nitro DMI asset tag, a local file), else the hostname."""
    tag = read_small("/sys/devices/virtual/dmi/id/board_asset_tag")
    return os.environ.get(HOST_ENV) or (tag if tag.startswith("i-") else socket.gethostname())


def machine_hash() -> str:
    """A hash of /etc/machine-id (the id itself is meant to stay private): tells same-named hosts apart."""
    mid = read_small("/etc/machine-id")
    return hashlib.sha256(f"imagenet-spot-lease:{mid}".encode()).hexdigest()[:16] if mid else ""


def boot_id() -> str:
    return read_small("/proc/sys/kernel/random/boot_id")


def boot_time() -> int:
    for line in _read_all("/proc/stat").splitlines():
        if line.startswith("btime "):
            return int(line.split()[1])
    return 0


def pid_start(pid: int) -> int | None:
    """Start time of ``pid`` in clock ticks since boot (tells a reused pid apart); None if it has exited."""
    stat = _read_all(f"/proc/{pid}/stat")
    if not stat:
        return None
    try:
        fields = stat.rsplit(")", 1)[1].split()
        return None if fields[0] in ("Z", "X") else int(fields[19])  # a zombie has exited
    except (IndexError, ValueError):
        return None


def pid_ns() -> str:
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return ""
