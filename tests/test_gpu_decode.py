"""``--decode gpu`` (trainer.gpu_decode) run on device="cpu" against the CPU path (trainer.presets):
same samples, order, labels, crop boxes and flips; pixels equal or within a stated tolerance;
exact resume; refused files fall back to the CPU decoder, undecodable ones are skipped.

Pixel tolerance, and why: both paths decode with libjpeg-turbo and resize with torch's
antialiased bilinear kernel, so a sample the CPU path decodes at full scale comes out
bitwise equal. When the crop box is at least twice the output size the CPU path decodes at a
reduced DCT scale (1/2, 1/4, 1/8) and resizes from that; the device path always resizes the
full-size decode. Those samples differ by a few levels: on a smooth photo-like scene the mean
absolute difference per image stays below 4 of 255 (the CPU path itself is allowed 6 against
torchvision's PIL reference at that size, tests/test_loader.py); over a whole demo epoch at
64 px (where ~6% of the samples are DCT-scaled, with noisy synthetic textures) the mean over
all pixels stays below 1 level. On CUDA, nvJPEG's IDCT/upsampling adds its own small
differences; that is not measurable here.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import run_cli
from tests.test_loader import jpeg_of, scene
from trainer.loader import LoaderConfig, make_train_loader, make_val_loader
from trainer.gpu_decode import RawBatch, decode_batch, header_size, resize
from trainer.presets import EvalPreset, TrainPreset, _size


@pytest.fixture(scope="module")
def build(demo_tree, tmp_path_factory) -> str:
    from shard_builder.build import build_shards

    out = tmp_path_factory.mktemp("gpudecode") / "build"
    build_shards(str(demo_tree.root), str(out), shard_max_count=20, workers=2)
    return str(out)


def cfg(root: str, **kw) -> LoaderConfig:
    base = dict(batch_size=8, image_size=64, val_resize=73, num_workers=0, chunk_size=4, shuffle_window=32)
    return LoaderConfig(root, **{**base, **kw})


def gpu(root: str, **kw) -> LoaderConfig:
    return cfg(root, decode="gpu", decode_device="cpu", **kw)


def raw_batches(loader) -> list[RawBatch]:
    """What the workers send under decode="gpu" (in-process, in plan order)."""
    ds = loader.dataset
    p = ds.plan(loader.epoch)
    ds.epoch = loader.epoch  # as PlanDataset.__getitem__ sets it in a worker
    return [ds.load(p, b) for b in range(loader.start_batch, loader.num_batches)]


def assert_close(cpu_batches, gpu_batches, dct_scaled) -> None:
    """Same keys, order, labels; bitwise pixels unless the CPU path decoded at a DCT scale."""
    assert [b.keys for b in cpu_batches] == [b.keys for b in gpu_batches]
    assert all(torch.equal(a.labels, b.labels) and a.num_skipped == b.num_skipped
               for a, b in zip(cpu_batches, gpu_batches))
    a = torch.cat([b.images for b in cpu_batches])
    b = torch.cat([b.images for b in gpu_batches])
    assert a.shape == b.shape and b.dtype == torch.uint8 and b.is_contiguous()
    exact = ~torch.tensor(dct_scaled)
    assert torch.equal(a[exact], b[exact])
    assert (a.float() - b.float()).abs().mean() < 1.0


def test_train_epoch_same_samples_boxes_flips_and_pixels(build):
    seed, epoch, size = 0, 1, 64
    cpu = list(make_train_loader(cfg(build), epoch=epoch))
    loader = make_train_loader(gpu(build), epoch=epoch)
    raws = raw_batches(loader)
    preset = TrainPreset(size)
    scaled = []
    for raw in raws:  # the boxes/flips the workers chose are the CPU preset's, from the CPU's header read
        offsets = raw.offsets.tolist()
        for i, key in enumerate(raw.keys):
            jpeg = raw.data[offsets[i]:offsets[i + 1]].numpy().tobytes()
            width, height = _size(jpeg, True)
            box, flip = preset.params(width, height, key, seed, epoch)
            assert raw.boxes[i].tolist() == list(box) and bool(raw.flips[i]) == flip
            assert raw.sizes[i].tolist() == [width, height]
            scaled.append(box[2] >= 2 * size and box[3] >= 2 * size)  # CPU path decodes at 1/2 or less
    assert any(scaled) and not all(scaled)  # both kinds are exercised
    assert any(bool(r.flips.any()) for r in raws) and not all(bool(r.flips.all()) for r in raws)
    assert_close(cpu, list(loader), scaled)


def test_val_pass_same_samples_and_pixels(build):
    cpu = list(make_val_loader(cfg(build)))
    loader = make_val_loader(gpu(build))
    scaled = []
    for raw in raw_batches(loader):
        assert not raw.flips.any()
        for width, height in raw.sizes.tolist():
            new_w, new_h = (73, int(73 * height / width)) if width <= height else (int(73 * width / height), 73)
            scaled.append(width >= 2 * new_w and height >= 2 * new_h)
    assert_close(cpu, list(loader), scaled)


def test_resume_with_workers_is_exact(build):
    full = [(b.keys, b.images, b.labels) for b in make_train_loader(gpu(build, num_workers=2), epoch=3)]
    k = 5
    resumed = make_train_loader(gpu(build, num_workers=2), epoch=3, start_batch=k)
    assert len(resumed) == len(full) - k
    got = [(b.keys, b.images, b.labels, b.index) for b in resumed]
    assert [g[3] for g in got] == list(range(k, k + len(got)))
    assert [g[0] for g in got] == [f[0] for f in full[k:]]
    assert all(torch.equal(g[1], f[1]) and torch.equal(g[2], f[2]) for g, f in zip(got, full[k:]))


def test_corrupt_image_and_truncated_shard_are_skipped_as_on_the_cpu_path(build, tmp_path):
    import shutil

    from common import manifest as mf

    root = str(tmp_path / "b")
    shutil.copytree(build, root)
    m = mf.load(root)
    shards = m.split("train").shards
    bad, cut = mf.load_index(m, shards[1]), mf.load_index(m, shards[4])
    tar1, tar4 = Path(root, shards[1].path), Path(root, shards[4].path)
    data = bytearray(tar1.read_bytes())
    for i in range(bad.jpg_offsets[3], bad.jpg_offsets[3] + 32):  # no decoder can read its header
        data[i] ^= 0xFF
    tar1.write_bytes(bytes(data))
    tar4.write_bytes(tar4.read_bytes()[:cut.jpg_offsets[6] + 100])  # truncated inside sample 6
    cpu_loader = make_train_loader(cfg(root, num_workers=2), epoch=0)
    cpu = list(cpu_loader)
    loader = make_train_loader(gpu(root, num_workers=2), epoch=0)
    got = list(loader)
    assert [b.keys for b in got] == [b.keys for b in cpu]
    assert [b.num_skipped for b in got] == [b.num_skipped for b in cpu]
    assert loader.num_skipped == cpu_loader.num_skipped == 1 + len(cut.keys) - 6
    assert bad.keys[3] not in {k for b in got for k in b.keys}


def test_training_with_decode_gpu_resumes_mid_epoch_bitwise(build, tmp_path):
    """The real trainer (CPU device): a run resumed from its step-3 checkpoint ends with the same
    weights, bitwise, and trains on the same samples as the uninterrupted run."""
    import json

    small = ["--data", build, "--arch", "resnet18", "--batch-size", "8", "--image-size", "32", "--workers", "1",
             "--device", "cpu", "--deterministic", "--decode", "gpu", "--epochs", "1", "--limit-train-steps", "6",
             "--sample-log"]
    a, b = tmp_path / "a", tmp_path / "b"
    proc = run_cli("trainer", *small, "--output", str(a), "--checkpoint-every-steps", "3", timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    mid = a / "checkpoints" / "checkpoint_epoch_001_step_000003.pth"
    proc = run_cli("trainer", *small, "--output", str(b), "--resume", str(mid), timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    sa = torch.load(a / "checkpoints" / "checkpoint_epoch_001.pth", weights_only=True)
    sb = torch.load(b / "checkpoints" / "checkpoint_epoch_001.pth", weights_only=True)
    assert sa["global_step"] == sb["global_step"] == 6 and sa["config"]["decode"] == "gpu"
    assert all(torch.equal(sa["model"][k], sb["model"][k]) for k in sa["model"])

    def steps(run: Path) -> dict[int, list[str]]:
        lines = (run / "samples" / "epoch001_rank0.jsonl").read_text().splitlines()
        return {r["step"]: r["keys"] for r in map(json.loads, lines)}

    assert {k: v for k, v in steps(a).items() if k >= 3} == steps(b)


def test_dct_scaled_samples_within_tolerance_and_float_kernel_agrees():
    jpeg = jpeg_of(scene())  # 640 x 480, smooth: at 56 px nearly every crop is DCT-scaled on the CPU path
    preset = TrainPreset(56)
    for i in range(12):
        key = f"n01440764_{i}"
        cpu = preset(jpeg, key, 7, 3)
        raw = _raw([jpeg], preset, [key], seed=7, epoch=3)
        dev = decode_batch(raw, "cpu").images[0]
        assert (cpu.float() - dev.float()).abs().mean() < 4
        # The float kernel CUDA uses (uint8 antialias is CPU-only) is within one level of the uint8 one.
        left, top, w, h = raw.boxes[0].tolist()
        img = torch.from_numpy(np.array(_pil(jpeg))).permute(2, 0, 1)[:, top:top + h, left:left + w]
        y = torch.nn.functional.interpolate(img[None].float(), size=(56, 56), mode="bilinear", antialias=True)
        assert (y[0].round().clamp(0, 255) - resize(img, 56, 56).float()).abs().max() <= 1


def test_refused_file_falls_back_to_cpu_and_undecodable_is_skipped():
    good = jpeg_of(scene(200, 150))
    png = jpeg_of(scene(200, 150), "P", "PNG")  # torchvision's decode_jpeg refuses it; Pillow reads it
    truncated = good[: len(good) // 2]           # every decoder refuses it: the CPU path skips it too
    for preset in (TrainPreset(112), EvalPreset(112, 128)):  # 200 x 150: the CPU path decodes at full scale
        keys = ["n0_a", "n0_png", "n0_cut", "n0_b"]
        raw = _raw([good, png, truncated, good], preset, keys, seed=1, epoch=2, skipped=1)
        batch = decode_batch(raw, "cpu")
        assert batch.keys == ["n0_a", "n0_png", "n0_b"] and batch.labels.tolist() == [0, 1, 3]
        assert batch.num_skipped == 2 and batch.images.shape == (3, 3, preset.size, preset.size)
        assert torch.equal(batch.images[1], preset(png, "n0_png", 1, 2))  # exactly the CPU path's pixels
        assert torch.equal(batch.images[0], preset(good, "n0_a", 1, 2))   # full-scale: bitwise


def test_decode_flag_and_config_validation():
    from trainer.config import parse_config

    assert parse_config(["--data", "d"]).decode == "cpu"
    assert parse_config(["--data", "d", "--decode", "gpu"]).decode == "gpu"
    with pytest.raises(SystemExit):
        parse_config(["--data", "d", "--decode", "tpu"])
    with pytest.raises(ValueError, match="decode"):
        LoaderConfig("d", decode="tpu")


# --------------------------------------------------------------------------- helpers
def _pil(jpeg: bytes):
    import io

    from PIL import Image

    return Image.open(io.BytesIO(jpeg)).convert("RGB")


def _raw(jpegs, preset, keys, *, seed, epoch, skipped=0) -> RawBatch:
    """A RawBatch as a worker builds it (trainer.gpu_decode.read_raw), from loose bytes."""
    sizes, boxes, flips = [], [], []
    for jpeg, key in zip(jpegs, keys):
        width, height = header_size(jpeg)
        box, flip = (preset.params(width, height, key, seed, epoch) if isinstance(preset, TrainPreset)
                     else ((0, 0, width, height), False))
        sizes.append((width, height))
        boxes.append(box)
        flips.append(flip)
    offsets = np.cumsum([0] + [len(j) for j in jpegs])
    return RawBatch(torch.frombuffer(bytearray(b"".join(jpegs)), dtype=torch.uint8), torch.from_numpy(offsets),
                    torch.tensor(sizes), torch.tensor(boxes), torch.tensor(flips),
                    torch.arange(len(jpegs)), list(keys), preset, seed, epoch, 0, 0, 1, skipped, True, 0)
