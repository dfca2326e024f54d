"""common.storage on local paths and on the loopback S3 server, and the manifest round trip."""
from __future__ import annotations

import os

import pytest

from common import manifest as mf
from common import s3, storage
from common.errors import UserError


@pytest.fixture(params=["local", "s3"])
def root(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "root")
    return request.getfixturevalue("s3_bucket") + "/some/prefix"


def test_write_read_range_list_stat_delete(root):
    url = storage.join(root, "a", "b.bin")
    data = os.urandom(100_000)
    storage.write_bytes(url, data)
    assert storage.read_bytes(url) == data
    assert storage.read_bytes(url, 10, 1000) == data[10:1000]
    with storage.open_read(url, 500) as f:
        assert f.read() == data[500:]
    assert storage.stat(url).size == len(data)
    assert storage.exists(url) and not storage.exists(storage.join(root, "missing"))
    storage.write_bytes(storage.join(root, "c.txt"), b"x")
    assert storage.list_prefix(root) == sorted([url, storage.join(root, "c.txt")])
    storage.delete(url)
    assert not storage.exists(url)
    with pytest.raises(FileNotFoundError):
        storage.read_bytes(url)


def test_upload_download_multipart(root, tmp_path, monkeypatch):
    monkeypatch.setattr(s3, "MULTIPART_THRESHOLD", 5 * 2**20)
    monkeypatch.setattr(s3, "MULTIPART_CHUNK", 5 * 2**20)
    src = tmp_path / "big.bin"
    data = os.urandom(11 * 2**20 + 123)  # three parts on S3
    src.write_bytes(data)
    url = storage.join(root, "big.bin")
    storage.upload_file(src, url, metadata={"sha256": mf.sha256_bytes(data)})
    st = storage.stat(url)
    assert st.size == len(data)
    if storage.is_s3(url):
        assert st.metadata["sha256"] == mf.sha256_bytes(data)
    storage.download_file(url, tmp_path / "back.bin")
    assert (tmp_path / "back.bin").read_bytes() == data
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []


def test_local_atomic_write_leaves_no_partial_file(tmp_path):
    target = tmp_path / "out.bin"
    storage.write_bytes(str(target), b"old")

    def boom(_f):
        raise RuntimeError("crash mid-write")

    with pytest.raises(RuntimeError):
        storage.atomic_write(target, boom)
    assert target.read_bytes() == b"old" and sorted(p.name for p in tmp_path.iterdir()) == ["out.bin"]


def test_s3_errors_are_one_line_user_errors(s3_server):
    with pytest.raises(UserError, match="does not exist"):
        storage.write_bytes("s3://bucket-that-is-missing/x", b"1")
    with pytest.raises(UserError, match="s3://bucket/prefix"):
        storage.split_s3("s3:///x")


def test_manifest_roundtrip_and_validation(root):
    m = mf.Manifest(
        build_args={"seed": 0}, seed=0,
        classes=[mf.ClassInfo(0, "n01440764", "tench, Tinca tinca", 0), mf.ClassInfo(1, "n01443537", "goldfish", 1)],
        splits={"val": mf.SplitInfo(3, [mf.ShardInfo("val/val-000000.tar", 3, 10240, "ab" * 32,
                                                      "val/val-000000.idx.json", "cd" * 32)])},
        created="2026-01-01T00:00:00+00:00")
    mf.save(m, root)
    back = mf.load(root)
    assert back.to_dict() == m.to_dict() and back.root == root
    bad = m.to_dict()
    bad["splits"]["val"]["num_samples"] = 4
    storage.write_bytes(storage.join(root, "manifest.json"), mf.dumps(bad))
    with pytest.raises(UserError, match="shards hold 3"):
        mf.load(root)
    with pytest.raises(UserError, match="no manifest.json"):
        mf.load(storage.join(root, "elsewhere"))


def test_empty_object_reads_as_empty(root):
    url = storage.join(root, "empty.txt")
    storage.write_bytes(url, b"")
    assert storage.read_bytes(url) == b""
    storage.download_file(url, storage.join(str(os.environ.get("TMPDIR", "/tmp")), f"empty-{os.getpid()}"))


# --------------------------------------------------------------------------- dropped connections
@pytest.fixture
def through_proxy(s3_server, monkeypatch):
    """Start a FaultyProxy in front of the S3 server and point this process's client at it."""
    from tests.faulty_proxy import FaultyProxy

    proxies = []

    def make(**kwargs) -> FaultyProxy:
        port = int(s3_server.rsplit(":", 1)[1])
        proxy = FaultyProxy(("127.0.0.1", port), **kwargs).start()
        proxies.append(proxy)
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
        monkeypatch.setattr(s3, "_clients", {})  # a new client for the new endpoint
        return proxy

    yield make
    for p in proxies:
        p.stop()


def test_range_read_cut_every_12kb_keeps_its_progress(s3_bucket, through_proxy, monkeypatch):
    """Every connection is cut after 12 KB (headers included): each try must continue at the
    next byte, and tries that made progress must not use up the (small) retry budget."""
    url = f"{s3_bucket}/cut/obj.bin"
    data = os.urandom(200_000)
    storage.write_bytes(url, data)
    monkeypatch.setattr(s3, "MAX_ATTEMPTS", 3)
    proxy = through_proxy(cut_after=12 * 1024, max_cuts=10_000, reset=True)
    assert storage.read_bytes(url, 1000, 139_000) == data[1000:139_000]  # a 138 KB range
    assert proxy.cuts >= 138_000 // (12 * 1024)  # the cuts really happened, far more than MAX_ATTEMPTS
    cuts = proxy.cuts
    with storage.open_read(url, 5) as f:  # the streaming reader (download_file, sha256_file) too
        assert f.read() == data[5:]
    assert proxy.cuts - cuts >= 200_000 // (12 * 1024)


def test_retries_are_bounded_and_in_one_place(s3_bucket, through_proxy, monkeypatch):
    """With botocore's retries off, one operation makes exactly MAX_ATTEMPTS requests (one per
    connection here) before it fails; not MAX_ATTEMPTS cubed."""
    url = f"{s3_bucket}/bounded/obj.bin"
    storage.write_bytes(url, os.urandom(50_000))
    monkeypatch.setattr(s3, "MAX_ATTEMPTS", 3)
    proxy = through_proxy(cut_after=100, max_cuts=10_000)  # cut inside the response headers: no progress
    with pytest.raises(OSError, match="failed at byte 0 after 3 attempt"):
        storage.read_bytes(url, 0, 40_000)
    assert proxy.connections == 3
    with pytest.raises(Exception) as info:  # noqa: PT011 - botocore's connection error class
        storage.stat(url)
    assert s3._transient(info.value) and proxy.connections == 6
    proxy = through_proxy(cut_after=0, max_cuts=10_000)  # nothing at all comes back
    with pytest.raises(Exception) as info:  # noqa: PT011
        storage.write_bytes(url, b"x")
    assert s3._transient(info.value) and proxy.connections == 3


def test_read_past_the_end_of_a_shorter_object_returns_what_exists(root):
    """A truncated object (shorter than the range) reads short instead of retrying: callers
    (the shard reader) skip what is missing."""
    url = storage.join(root, "short.bin")
    data = os.urandom(5000)
    storage.write_bytes(url, data)
    assert storage.read_bytes(url, 1000, 9000) == data[1000:]
