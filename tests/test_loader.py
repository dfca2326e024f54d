"""The input pipeline on real shards (built from the demo tree), locally and on the loopback S3
server: determinism, worker-count independence, exact resume, cache, faults, bad data; and the
decode/augment presets against torchvision.
Multi-process DDP runs are in test_loader_ddp.py."""
from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch

from common import manifest as mf
from common import s3, storage, wds_s3
from common.errors import UserError
from tests.conftest import free_port
from tests.faulty_proxy import FaultyProxy
from trainer.loader import LoaderConfig, make_train_loader, make_val_loader
from trainer.reader import ShardStore


@pytest.fixture(scope="module")
def build(demo_tree, tmp_path_factory) -> str:
    """124 train samples in 7 shards, 42 val samples in 3 shards."""
    from shard_builder.build import build_shards

    out = tmp_path_factory.mktemp("loader") / "build"
    build_shards(str(demo_tree.root), str(out), shard_max_count=20, workers=2)
    return str(out)


def upload_build(build: str, endpoint: str) -> str:
    import boto3

    bucket = f"loader-{uuid.uuid4().hex[:10]}"
    boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket=bucket)
    url = f"s3://{bucket}/imagenet"
    for f in Path(build).rglob("*"):
        if f.is_file() and "logs" not in f.parts:
            storage.upload_file(f, f"{url}/{f.relative_to(build).as_posix()}")
    return url


@pytest.fixture(scope="module")
def s3_build(build, s3_server) -> str:
    return upload_build(build, s3_server)


def cfg(root: str, **kw) -> LoaderConfig:
    base = dict(batch_size=8, image_size=64, val_resize=64, val_size=56, num_workers=0, chunk_size=4,
                shuffle_window=32)
    return LoaderConfig(root, **{**base, **kw})


def run(loader) -> list:
    """(keys, images, labels, num_skipped) of every batch."""
    return [(b.keys, b.images.clone(), b.labels.clone(), b.num_skipped) for b in loader]


def assert_same(a: list, b: list) -> None:
    assert [x[0] for x in a] == [x[0] for x in b]
    for (_, ia, la, _), (_, ib, lb, _) in zip(a, b):
        assert torch.equal(ia, ib) and torch.equal(la, lb)


def all_keys(root: str, split: str) -> list[str]:
    m = mf.load(root)
    return [k for s in m.split(split).shards for k in mf.load_index(m, s).keys]


# --------------------------------------------------------------------------- order
def test_epoch_is_exact_and_seeded(build):
    m = mf.load(build)
    a = run(make_train_loader(cfg(build), epoch=0))
    keys = [k for x in a for k in x[0]]
    assert sorted(keys) == sorted(all_keys(build, "train"))  # one rank: every sample, once
    assert all(x[1].shape[1:] == (3, 64, 64) and x[1].dtype == torch.uint8 for x in a)
    assert all(x[2].dtype == torch.int64 for x in a)
    wnid_to_label = {c.wnid: c.index for c in m.classes}
    assert all(wnid_to_label[k.split("_")[0]] == int(lab) for x in a for k, lab in zip(x[0], x[2]))
    assert_same(a, run(make_train_loader(cfg(build), epoch=0)))
    b = run(make_train_loader(cfg(build), epoch=1))
    assert [x[0] for x in a] != [x[0] for x in b]
    assert sorted(keys) == sorted(k for x in b for k in x[0])


@pytest.mark.filterwarnings("ignore:This DataLoader will create")  # 3 workers on a 2-core CI machine
def test_worker_count_does_not_change_batches(build):
    one = run(make_train_loader(cfg(build, num_workers=1), epoch=2))
    three = run(make_train_loader(cfg(build, num_workers=3), epoch=2))
    assert_same(one, three)


def test_resume_reads_nothing_before_start_and_continues_exactly(build, monkeypatch):
    full = run(make_train_loader(cfg(build, num_workers=2), epoch=3))
    k = 5
    resumed = make_train_loader(cfg(build, num_workers=2), epoch=3, start_batch=k)
    assert len(resumed) == len(full) - k
    assert_same(run(resumed), full[k:])

    read = []
    original = ShardStore.read_jpegs
    monkeypatch.setattr(ShardStore, "read_jpegs", lambda self, s, i: read.extend(i) or original(self, s, i))
    batches = run(make_train_loader(cfg(build), epoch=3, start_batch=k))  # in-process: reads are visible
    assert len(read) == sum(len(x[0]) for x in full[k:]) == sum(len(x[0]) for x in batches)


def test_val_every_sample_once_across_ranks(build):
    want = all_keys(build, "val")
    for world in (1, 3):
        got, counts = [], []
        for rank in range(world):
            loader = make_val_loader(cfg(build, num_workers=2, val_batch_size=5), rank=rank, world_size=world)
            batches = run(loader)
            counts.append(len(batches))
            assert len(batches) == len(loader)
            assert all(x[1].shape[1:] == (3, 56, 56) for x in batches)
            got += [k for x in batches for k in x[0]]
        assert got == want and len(got) == mf.load(build).split("val").num_samples


# --------------------------------------------------------------------------- S3
def test_s3_equals_local_and_resumes_with_spawn_workers(build, s3_build):
    local = run(make_train_loader(cfg(build), epoch=1))
    s3 = run(make_train_loader(cfg(s3_build, num_workers=2, multiprocessing_context="spawn"), epoch=1))
    assert_same(s3, local)
    assert_same(run(make_train_loader(cfg(s3_build, num_workers=2), epoch=1, start_batch=7)), local[7:])


def test_dropped_connections_resume_and_every_sample_arrives_once(build, s3_build, s3_server, monkeypatch):
    port = int(s3_server.rsplit(":", 1)[1])
    # Fewer cuts than S3Reader's attempts, so even one unlucky read that is cut every time recovers.
    with FaultyProxy(("127.0.0.1", port), cut_after=30_000, max_cuts=3) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
        monkeypatch.setattr(s3, "_clients", {})  # this process too: a client per endpoint
        got = run(make_train_loader(cfg(s3_build, num_workers=2, io_threads=2), epoch=0))
    assert proxy.cuts == 3
    assert_same(got, run(make_train_loader(cfg(build), epoch=0)))


def test_plain_webdataset_reads_s3_through_registered_scheme_in_spawn_workers(build, s3_build):
    import webdataset as wds
    from torch.utils.data import DataLoader

    urls = [f"{s3_build}/train/train-00000{i}.tar" for i in range(2)]
    ds = wds.WebDataset(urls, shardshuffle=False, empty_check=False)
    loader = DataLoader(ds, batch_size=None, num_workers=2, multiprocessing_context="spawn",
                        worker_init_fn=wds_s3.worker_init_fn)
    samples = list(loader)
    m = mf.load(build)
    want = [k for s in m.split("train").shards[:2] for k in mf.load_index(m, s).keys]
    assert sorted(s["__key__"] for s in samples) == sorted(want)
    assert all(s["jpg"][:2] == b"\xff\xd8" for s in samples)


def test_cache_dir_serves_later_epochs_without_s3_and_refetches_corrupt_copies(build, s3_build, tmp_path,
                                                                                monkeypatch):
    cache = tmp_path / "cache"
    m = mf.load(s3_build)
    c = cfg(s3_build, num_workers=2, cache_dir=str(cache))
    port = int(os.environ["AWS_ENDPOINT_URL"].rsplit(":", 1)[1])
    with FaultyProxy(("127.0.0.1", port), max_cuts=0) as proxy, monkeypatch.context() as mp:
        mp.setenv("AWS_ENDPOINT_URL", proxy.url)  # to count the bytes the workers download
        assert_same(run(make_train_loader(c, epoch=0, manifest=m)), run(make_train_loader(cfg(build), epoch=0)))
    # Both workers read every shard, but the file lock makes the second one wait for the first
    # download and use it: each shard crosses the network once.
    assert proxy.bytes_down < 1.2 * sum(s.bytes for s in m.split("train").shards)
    tars = sorted(cache.glob("train-*.tar"))
    assert len(tars) == len(m.split("train").shards) and len(list(cache.glob("*.idx.json"))) == len(tars)

    local1 = run(make_train_loader(cfg(build), epoch=1))
    with monkeypatch.context() as mp:  # S3 unreachable: epoch 1 must come from the cache alone
        mp.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")
        mp.setattr(s3, "MAX_ATTEMPTS", 1)
        mp.setattr(s3, "_clients", {})
        assert_same(run(make_train_loader(c, epoch=1, manifest=m)), local1)

    data = bytearray(tars[0].read_bytes())
    data[len(data) // 2] ^= 0xFF
    tars[0].write_bytes(bytes(data))  # a corrupt cached copy is detected (sha256) and fetched again
    assert_same(run(make_train_loader(c, epoch=1, manifest=m)), local1)
    assert mf.sha256_bytes(tars[0].read_bytes()) == m.split("train").shards[0].sha256


def test_source_that_does_not_match_manifest_is_a_user_error(build, s3_server, tmp_path):
    url = upload_build(build, s3_server)
    shard = mf.load(url).split("train").shards[1]
    storage.write_bytes(f"{url}/{shard.path}", storage.read_bytes(f"{url}/{shard.path}")[:-1024])
    with pytest.raises(UserError, match="train-000001.tar does not match the manifest"):
        run(make_train_loader(cfg(url, cache_dir=str(tmp_path / "cache")), epoch=0))


# --------------------------------------------------------------------------- bad data
def copy_build(build: str, dest: Path) -> str:
    shutil.copytree(build, dest)
    return str(dest)


def test_corrupt_image_and_truncated_shard_are_skipped_and_counted(build, tmp_path):
    root = copy_build(build, tmp_path / "b")
    m = mf.load(root)
    shards = m.split("train").shards
    bad_idx = mf.load_index(m, shards[1])
    tar1 = Path(root, shards[1].path)
    data = bytearray(tar1.read_bytes())
    off = bad_idx.jpg_offsets[3]
    for i in range(off, off + 32):  # flip the JPEG's header bytes: no decoder can read it
        data[i] ^= 0xFF
    tar1.write_bytes(bytes(data))
    cut_idx = mf.load_index(m, shards[4])
    tar4 = Path(root, shards[4].path)
    tar4.write_bytes(tar4.read_bytes()[:cut_idx.jpg_offsets[6] + 100])  # truncated inside sample 6
    lost = {bad_idx.keys[3], *cut_idx.keys[6:]}

    loader = make_train_loader(cfg(root, num_workers=2), epoch=0)
    got = run(loader)
    keys = [k for x in got for k in x[0]]
    assert sorted(keys) == sorted(set(all_keys(build, "train")) - lost)
    assert sum(x[3] for x in got) == loader.num_skipped == len(lost)
    assert all(x[1].shape[0] == len(x[0]) == x[2].shape[0] for x in got)


@pytest.mark.parametrize("what", ["shard", "index"])
def test_missing_file_is_a_user_error_naming_it(build, tmp_path, what):
    root = copy_build(build, tmp_path / "b")
    shard = mf.load(root).split("train").shards[2]
    os.unlink(Path(root, shard.path if what == "shard" else shard.index))
    with pytest.raises(UserError, match=Path(shard.path).name if what == "shard" else Path(shard.index).name):
        run(make_train_loader(cfg(root, num_workers=2), epoch=0))


def test_index_that_does_not_match_manifest_is_a_user_error(build, tmp_path):
    root = copy_build(build, tmp_path / "b")
    shard = mf.load(root).split("train").shards[0]
    path = Path(root, shard.index)
    d = json.loads(path.read_bytes())
    d["samples"][0][5] = (d["samples"][0][5] + 1) % 10  # a changed label
    path.write_bytes(mf.dumps(d))
    with pytest.raises(UserError, match="train-000000.idx.json does not match the manifest"):
        run(make_train_loader(cfg(root), epoch=0))


def test_missing_manifest_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="manifest.json"):
        make_train_loader(cfg(str(tmp_path)), epoch=0)


def test_lengths_and_steps(build):
    n = mf.load(build).split("train").num_samples  # 124
    loader = make_train_loader(cfg(build, batch_size=5, accum=2), epoch=0, rank=1, world_size=3)
    # GB = 30: 4 full steps (2 micro-batches each), 4 left -> 1 per rank: one more step.
    assert loader.steps_per_epoch == 5 and loader.num_batches == len(loader) == 9
    got = list(loader)
    assert [(b.step, b.micro, b.num_micro, b.index) for b in got][-3:] == [(3, 0, 2, 6), (3, 1, 2, 7), (4, 0, 1, 8)]
    assert sum(len(b.keys) for b in got) == (n // 30) * 10 + (n % 30) // 3
    assert np.all(np.array([len(b.keys) for b in got[:-1]]) == 5)


# --------------------------------------------------------------------------- presets
def jpeg_of(arr: np.ndarray, mode: str = "RGB", fmt: str = "JPEG") -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    im = Image.fromarray(arr)
    (im.convert(mode) if mode != "RGB" else im).save(buf, fmt, **({"quality": 95} if fmt == "JPEG" else {}))
    return buf.getvalue()


def scene(width: int = 640, height: int = 480) -> np.ndarray:
    """A smooth, asymmetric picture: wrong crops, flips or channel orders show up as big errors."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    arr = np.stack([255 * x / width, 255 * y / height, 128 + 100 * np.sin(x / 37.0) * np.cos(y / 23.0)], -1)
    return arr.clip(0, 255).astype(np.uint8)


@pytest.mark.parametrize("decoder", ["simplejpeg", "pil"])
@pytest.mark.parametrize("size,resize", [(224, 256), (56, 64)])  # 56/64: DCT-scaled decode kicks in
def test_presets_match_torchvision(decoder, size, resize):
    import io

    import torchvision.transforms as T
    import torchvision.transforms.functional as TF
    from PIL import Image

    from trainer.presets import EvalPreset, TrainPreset, random_resized_crop_box, sample_rng

    jpeg = jpeg_of(scene())
    full = Image.open(io.BytesIO(jpeg)).convert("RGB")
    ev = EvalPreset(size, resize, decoder=decoder)(jpeg)
    ref = torch.from_numpy(np.array(T.CenterCrop(size)(T.Resize(resize)(full)))).permute(2, 0, 1)
    assert ev.shape == (3, size, size) and ev.dtype == torch.uint8
    assert (ev.float() - ref.float()).abs().mean() < (1 if size == 224 else 4)
    for key in (f"n01440764_{i}" for i in range(6)):
        got = TrainPreset(size, decoder=decoder)(jpeg, key, 7, 3)
        rng = sample_rng(7, 3, key)  # the same draws the preset makes: box, then flip
        left, top, w, h = random_resized_crop_box(full.width, full.height, rng)
        want = TF.resized_crop(full, top, left, h, w, [size, size])
        want = torch.from_numpy(np.array(TF.hflip(want) if rng.random() < 0.5 else want)).permute(2, 0, 1)
        assert (got.float() - want.float()).abs().mean() < (1.5 if size == 224 else 6)


def test_train_preset_randomness_is_per_seed_epoch_key():
    from trainer.presets import TrainPreset

    jpeg, p = jpeg_of(scene()), TrainPreset(64)
    a = p(jpeg, "k1", 0, 0)
    assert torch.equal(a, TrainPreset(64)(jpeg, "k1", 0, 0))
    assert not torch.equal(a, p(jpeg, "k1", 0, 1)) and not torch.equal(a, p(jpeg, "k2", 0, 0))


def test_crop_box_follows_torchvision_rules():
    import random

    import torchvision.transforms as T

    from trainer.presets import random_resized_crop_box

    rng = random.Random(0)
    for _ in range(2000):
        left, top, w, h = random_resized_crop_box(500, 375, rng)
        assert 0 <= left and left + w <= 500 and 0 <= top and top + h <= 375
        assert 0.08 * 0.97 <= w * h / (500 * 375) <= 1.0 and 3 / 4 * 0.97 <= w / h <= 4 / 3 * 1.03
    # 10 failed tries -> torchvision's deterministic central fallback, clamped to the ratio range.
    for width, height in ((1000, 10), (10, 1000)):
        tv = T.RandomResizedCrop.get_params(torch.zeros(3, height, width), [0.08, 1.0], [3 / 4, 4 / 3])
        top, left, h, w = tv
        assert random_resized_crop_box(width, height, random.Random(1)) == (left, top, w, h)


@pytest.mark.parametrize("decoder", ["simplejpeg", "pil"])
@pytest.mark.parametrize("mode,fmt", [("L", "JPEG"), ("CMYK", "JPEG"), ("P", "PNG"), ("RGBA", "PNG")])
def test_any_mode_comes_out_rgb(decoder, mode, fmt):
    from trainer.presets import EvalPreset, TrainPreset

    data = jpeg_of(scene(200, 150), mode, fmt)
    for out in (TrainPreset(64, decoder=decoder)(data, "k", 0, 0), EvalPreset(56, 64, decoder=decoder)(data)):
        assert out.shape[0] == 3 and out.dtype == torch.uint8
    if mode == "L":
        assert torch.equal(out[0], out[1]) and torch.equal(out[1], out[2])


def test_undecodable_and_truncated_bytes_raise():
    from trainer.presets import TrainPreset

    good = jpeg_of(scene(200, 150))
    for bad in (b"not an image", good[: len(good) // 2]):
        for decoder in ("simplejpeg", "pil"):
            with pytest.raises(OSError):  # Pillow: UnidentifiedImageError, "image file is truncated"
                TrainPreset(64, decoder=decoder)(bad, "k", 0, 0)


def test_device_normalize_and_jitter_match_torchvision():
    import torchvision.transforms.functional as TF

    from trainer.presets import DeviceColorJitter, DeviceNormalize, jitter_generator

    x = torch.from_numpy(np.stack([scene(48, 40)] * 4)).permute(0, 3, 1, 2)  # uint8 [4,3,40,48] channels_last
    x = torch.stack([x[0], x[1].flip(-1), x[2].flip(-2), x[3] // 2])
    norm = DeviceNormalize()(x)
    ref = TF.normalize(x.float() / 255, [0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
    assert torch.allclose(norm, ref, atol=1e-5)

    ops = {"brightness": TF.adjust_brightness, "contrast": TF.adjust_contrast, "saturation": TF.adjust_saturation}
    for name, op in ops.items():
        jitter = DeviceColorJitter(**{k: (0.4 if k == name else 0) for k in ops})
        out = jitter(x, jitter_generator(0, 1, 2))
        g = jitter_generator(0, 1, 2)
        torch.randperm(1, generator=g)  # the (trivial) op order draw comes first
        factors = torch.empty(4).uniform_(0.6, 1.4, generator=g)
        want = torch.stack([op(x[i].float() / 255, float(f)) for i, f in enumerate(factors)])
        assert torch.allclose(out, want, atol=1e-5), name
    full = DeviceColorJitter(0.4, 0.4, 0.4)
    assert torch.equal(full(x, jitter_generator(0, 1, 2)), full(x, jitter_generator(0, 1, 2)))
    assert not torch.equal(full(x, jitter_generator(0, 1, 2)), full(x, jitter_generator(0, 1, 3)))
