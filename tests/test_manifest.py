"""common.manifest: the one index loader and the one shard-intact check (builder resume,
verify and the trainer's reader all use them)."""
from __future__ import annotations

import hashlib

import pytest

from common import manifest as mf
from common import storage
from common.errors import UserError


def _build(root, data: bytes) -> tuple[mf.Manifest, mf.ShardInfo]:
    """A one-shard, one-sample build written by hand under ``root``."""
    sha = hashlib.sha256(data).hexdigest()
    idx = mf.ShardIndex("train-000000.tar", len(data), sha, ["k0"], [0], [len(data)], [0], [len(data)], [0], [])
    raw = idx.to_bytes()
    storage.write_bytes(storage.join(root, "train/train-000000.tar"), data)
    storage.write_bytes(storage.join(root, "train/train-000000.idx.json"), raw)
    shard = mf.ShardInfo("train/train-000000.tar", 1, len(data), sha, "train/train-000000.idx.json",
                         mf.sha256_bytes(raw))
    m = mf.Manifest({}, 0, [mf.ClassInfo(0, "n01440764", "tench", 0)], {"train": mf.SplitInfo(1, [shard])},
                    root=str(root))
    return m, shard


def test_shard_problems_names_what_is_wrong(tmp_path):
    m, shard = _build(tmp_path, b"x" * 1000)
    url = m.url(shard.path)
    assert mf.shard_problems(url, shard.bytes, shard.sha256) == []
    assert mf.shard_problems(url, shard.bytes + 1, shard.sha256) == ["1000 bytes, the manifest says 1001"]
    assert mf.shard_problems(url, shard.bytes, "0" * 64, against="its index") == ["sha256 differs from its index"]
    assert mf.shard_problems(url, shard.bytes, shard.sha256, digest="f" * 64) == ["sha256 differs from the manifest"]
    storage.delete(url)
    assert mf.shard_problems(url, shard.bytes, shard.sha256) == ["missing"]


def test_shard_problems_on_s3_trusts_the_sha256_stored_at_upload(s3_bucket, tmp_path):
    data = b"y" * 500
    local = tmp_path / "shard.tar"
    local.write_bytes(data)
    url = f"{s3_bucket}/m/train-000000.tar"
    sha = hashlib.sha256(data).hexdigest()
    storage.upload_file(local, url, metadata={"sha256": sha})
    assert mf.shard_problems(url, len(data), sha) == []
    storage.upload_file(local, url)  # no metadata: cannot vouch for it
    assert mf.shard_problems(url, len(data), sha) == ["sha256 differs from the manifest"]


def test_load_index_checks_the_manifest_and_refreshes_a_bad_cached_copy(tmp_path):
    m, shard = _build(tmp_path / "build", b"z" * 300)
    cache = tmp_path / "cache" / "train-000000.idx.json"
    assert mf.load_index(m, shard, cache=cache).keys == ["k0"]
    assert mf.sha256_bytes(cache.read_bytes()) == shard.index_sha256  # cached for the next process
    cache.write_bytes(b"{}")  # a corrupt cached copy is fetched again, not trusted
    assert mf.load_index(m, shard, cache=cache).keys == ["k0"]
    assert mf.sha256_bytes(cache.read_bytes()) == shard.index_sha256
    storage.write_bytes(m.url(shard.index), b"{}")
    with pytest.raises(UserError, match="does not match the manifest checksum"):
        mf.load_index(m, shard)
    storage.delete(m.url(shard.index))
    with pytest.raises(UserError, match="is missing"):
        mf.load_index(m, shard)
