"""Trainer: 2-process DDP from S3, exact resume, checkpoints, predict/evaluate, bad input.

Small on purpose: resnet18 at 32 px on a 6-class demo tree, so each epoch takes seconds.
"""
from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from common import manifest as mf
from common import storage
from shard_builder.build import build_shards
from shard_builder.demo_tree import write_demo_tree
from tests.conftest import REPO, run_cli
from trainer.evaluate import evaluate
from trainer.predict import predict

SMALL = ["--arch", "resnet18", "--batch-size", "16", "--image-size", "32", "--val-resize", "36", "--workers", "1",
         "--device", "cpu", "--warmup-epochs", "0.3", "--lr", "0.2"]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    tree = write_demo_tree(tmp_path_factory.mktemp("tree") / "kaggle", classes=6, train_per_class=40,
                           val_per_class=8, seed=1)
    out = tmp_path_factory.mktemp("shards") / "local"
    m = build_shards(str(tree.root), str(out), shard_max_count=60, workers=2)
    return {"tree": tree, "local": str(out), "manifest": m}


@pytest.fixture(scope="module")
def s3_shards(shards, s3_server):
    import boto3

    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket="train-tests")
    dest = "s3://train-tests/shards"
    for path in Path(shards["local"]).rglob("*"):
        if path.is_file() and "logs" not in path.parts:
            storage.upload_file(path, f"{dest}/{path.relative_to(shards['local']).as_posix()}")
    return dest


def metrics(output: str) -> list[dict]:
    return [json.loads(x) for x in storage.read_bytes(storage.join(output, "metrics.jsonl")).decode().splitlines()]


def torchrun(*args: str, nproc: int = 2, timeout: float = 600):
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                           "-m", "trainer", *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def ddp_run(shards, s3_shards):
    out = "s3://train-tests/runs/ddp"
    proc = torchrun("--data", s3_shards, "--output", out, "--epochs", "4", "--check-sync-every", "1", *SMALL)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return out, proc


def test_ddp_from_s3_learns_with_identical_weights_on_both_ranks(shards, ddp_run):
    out, proc = ddp_run
    history = metrics(out)
    m: mf.Manifest = shards["manifest"]
    chance = 100.0 / m.num_classes
    assert [r["epoch"] for r in history] == [1, 2, 3, 4]
    assert history[-1]["val_top1"] >= 3 * chance, history
    assert all(r["val_count"] + r["val_skipped"] == m.split("val").num_samples for r in history)
    steps = history[0]["global_step"]
    # --check-sync-every 1: the ranks' weight checksums were compared after every optimizer step
    assert all(r["sync_checks"] == steps for r in history) and steps > 0
    for name in ("config.json", "training_curves.png", "model_best.pth", "checkpoints/latest.json"):
        assert storage.exists(storage.join(out, name)), name
    assert any(u.rsplit("/", 1)[-1].startswith("training_log_") for u in storage.list_prefix(out))


def test_evaluate_reproduces_logged_metrics_from_s3_checkpoint(shards, s3_shards, ddp_run):
    out, _ = ddp_run
    logged = metrics(out)[-1]
    result = evaluate(f"{out}/checkpoints/checkpoint_epoch_004.pth", s3_shards)
    assert result["val_count"] == logged["val_count"]
    assert result["val_top1"] == pytest.approx(logged["val_top1"])
    assert result["val_top5"] == pytest.approx(logged["val_top5"])
    assert result["val_loss"] == pytest.approx(logged["val_loss"], rel=1e-4)
    proc = run_cli("trainer.evaluate", "--checkpoint", f"{out}/checkpoints/checkpoint_epoch_004.pth",
                   "--data", s3_shards, "--json")
    assert proc.returncode == 0 and json.loads(proc.stdout)["val_count"] == logged["val_count"]


def test_predict_from_s3_and_local(shards, ddp_run, tmp_path):
    out, _ = ddp_run
    tree = shards["tree"]
    rel, wnid = sorted(tree.val.items())[5]
    image = str(tree.root / rel)
    remote = predict(f"{out}/model_best.pth", [image])[0]
    storage.download_file(f"{out}/model_best.pth", tmp_path / "best.pth")
    local = predict(str(tmp_path / "best.pth"), [image])[0]
    assert remote == local and len(local) == 5
    assert abs(sum(p for _, _, p in local) - 1) < 0.5 and local[0][2] >= local[-1][2]
    assert {w for w, _, _ in local} <= {c.wnid for c in shards["manifest"].classes}
    proc = run_cli("trainer.predict", "--checkpoint", str(tmp_path / "best.pth"), image)
    assert proc.returncode == 0 and local[0][0] in proc.stdout


def _train_local(shards, out, *extra):
    proc = run_cli("trainer", "--data", shards["local"], "--output", str(out), "--deterministic", *SMALL, *extra)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def test_resume_from_epoch_checkpoint_continues_schedule_exactly(shards, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    _train_local(shards, a, "--epochs", "2", "--limit-train-steps", "6")
    (b / "seed").mkdir(parents=True)
    shutil.copy(a / "checkpoints" / "checkpoint_epoch_001.pth", b / "seed" / "ckpt1.pth")
    proc = _train_local(shards, b, "--epochs", "2", "--limit-train-steps", "6",
                        "--resume", str(b / "seed" / "ckpt1.pth"))
    assert "at epoch 2 step 0" in proc.stderr
    sa = torch.load(a / "checkpoints" / "checkpoint_epoch_002.pth", weights_only=True)
    sb = torch.load(b / "checkpoints" / "checkpoint_epoch_002.pth", weights_only=True)
    assert (sa["epoch"], sa["global_step"], sa["scheduler"]) == (sb["epoch"], sb["global_step"], sb["scheduler"])
    for k in sa["model"]:
        assert torch.equal(sa["model"][k], sb["model"][k]), k
    ma, mb = metrics(str(a))[-1], metrics(str(b))[-1]
    assert ma["lr"] == mb["lr"] and ma["val_top1"] == mb["val_top1"] and ma["epoch"] == mb["epoch"] == 2


def test_val_resize_follows_image_size_and_evaluate_and_predict_reproduce_the_logged_metrics(shards, tmp_path):
    """--image-size 64 without --val-resize validates on a 73 px resize (64 / 0.875): recorded in
    config.json, the checkpoint and model_best.pth; evaluate and predict use it and reproduce
    the run's val metrics (predict on the very bytes the val split holds)."""
    import numpy as np

    from trainer.reader import ShardStore

    run = tmp_path / "r64"
    args = [a for a in SMALL if a not in ("--image-size", "32", "--val-resize", "36")]
    proc = run_cli("trainer", "--data", shards["local"], "--output", str(run), *args, "--image-size", "64",
                   "--epochs", "1", "--limit-train-steps", "4")
    assert proc.returncode == 0, proc.stderr[-4000:]
    ckpt, best = run / "checkpoints" / "checkpoint_epoch_001.pth", run / "model_best.pth"
    assert json.loads((run / "config.json").read_text())["val_resize"] == 73
    assert torch.load(ckpt, weights_only=True)["config"]["val_resize"] == 73
    assert torch.load(best, weights_only=True)["val_resize"] == 73
    logged = metrics(str(run))[-1]
    assert logged["host_reads"] == 1 and logged["val_host_reads"] == 1  # 4 steps < --log-every-steps 50
    result = evaluate(str(ckpt), shards["local"])
    assert result["val_count"] == logged["val_count"] > 0
    assert result["val_top1"] == pytest.approx(logged["val_top1"])
    assert result["val_loss"] == pytest.approx(logged["val_loss"], rel=1e-4)
    m: mf.Manifest = shards["manifest"]
    store = ShardStore(m, "val")
    images, wnids = [], []
    for s, shard in enumerate(m.split("val").shards):
        idx = np.arange(shard.num_samples)
        for i, jpeg in zip(idx.tolist(), store.read_jpegs(np.full(len(idx), s), idx)):
            images.append(tmp_path / f"val{s}_{i}.jpg")
            images[-1].write_bytes(jpeg)
            wnids.append(m.classes[int(store.index(s).labels[i])].wnid)
    rows = predict(str(best), [str(p) for p in images])
    top1 = 100.0 * sum(r[0][0] == w for r, w in zip(rows, wnids)) / len(rows)
    top5 = 100.0 * sum(w in {x[0] for x in r} for r, w in zip(rows, wnids)) / len(rows)
    assert (top1, top5) == (pytest.approx(logged["val_top1"]), pytest.approx(logged["val_top5"]))


_SAVE_LOOP = """
import sys, torch
from common import s3
s3.MULTIPART_THRESHOLD = s3.MULTIPART_CHUNK = 5 * 2**20
from trainer.checkpoint import CheckpointStore
from trainer.state import FORMAT
store = CheckpointStore(sys.argv[1], sys.argv[2], keep_last=0)
start = int(sys.argv[3])
for i in range(start, start + 1000):
    state = {"format": FORMAT, "epoch": 0, "step_in_epoch": i, "global_step": i, "blob": torch.randn(4_000_000)}
    store.save(state, f"checkpoint_epoch_001_step_{i:06d}.pth")
    print(i, flush=True)
    store.wait()
"""


def test_latest_never_points_at_a_partial_checkpoint_when_upload_is_killed(s3_server, s3_bucket, tmp_path):
    import boto3

    out = f"{s3_bucket}/run"
    s3 = boto3.client("s3", endpoint_url=s3_server)
    rng = random.Random(7)
    env = dict(os.environ, PYTHONPATH=str(REPO))
    killed_mid_upload = 0
    for attempt in range(10):  # kill at random moments until some kills landed mid-upload
        if killed_mid_upload >= 2:
            break
        proc = subprocess.Popen([sys.executable, "-c", _SAVE_LOOP, out, str(tmp_path / f"local{attempt}"),
                                 str(attempt * 1000 + 1)], cwd=REPO, env=env, stdout=subprocess.PIPE, text=True)
        proc.stdout.readline()  # first checkpoint written locally, its upload under way
        time.sleep(rng.uniform(0.05, 1.5))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        bucket = s3_bucket[len("s3://"):]
        if s3.list_multipart_uploads(Bucket=bucket).get("Uploads"):
            killed_mid_upload += 1
            for u in s3.list_multipart_uploads(Bucket=bucket)["Uploads"]:  # like a lifecycle rule would
                s3.abort_multipart_upload(Bucket=bucket, Key=u["Key"], UploadId=u["UploadId"])
        try:
            latest = json.loads(storage.read_bytes(f"{out}/checkpoints/latest.json"))
        except FileNotFoundError:
            continue  # killed before the first upload finished: no pointer at all is fine
        path = tmp_path / "check.pth"
        storage.download_file(f"{out}/checkpoints/{latest['name']}", path)
        assert path.stat().st_size == latest["bytes"]
        assert mf.sha256_bytes(path.read_bytes()) == latest["sha256"]
        assert torch.load(path, weights_only=True)["global_step"] == latest["global_step"]
    assert killed_mid_upload >= 1, "no kill landed during a multipart upload"


def test_bad_input(shards, tmp_path, s3_server, capsys):
    from trainer.train import main

    def err(*args, code=2):
        assert main(list(args)) == code
        lines = [x for x in capsys.readouterr().err.splitlines() if x.startswith("error:")]
        assert len(lines) == 1, lines
        return lines[0]

    # one through the real CLI: one line on stderr, exit 2, no traceback
    proc = run_cli("trainer", "--data", str(tmp_path), "--output", str(tmp_path / "o"), "--device", "cpu")
    assert proc.returncode == 2 and "manifest.json" in proc.stderr and "Traceback" not in proc.stderr
    assert "must be positive" in err("--data", shards["local"], "--output", str(tmp_path / "o"), "--batch-size", "0")
    if not torch.cuda.is_available():
        assert "no CUDA" in err("--data", shards["local"], "--output", str(tmp_path / "o"), "--device", "cuda")
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert "not writable" in err("--data", shards["local"], "--output", str(blocker / "run"), *SMALL)
    assert "does not exist" in err("--data", shards["local"], "--output", "s3://missing-bucket-xyz/run", *SMALL)
    # a run to resume from, then incompatible resumes
    run = tmp_path / "run"
    _train_local(shards, run, "--epochs", "1", "--limit-train-steps", "2")
    ckpt = str(run / "checkpoints" / "checkpoint_epoch_001.pth")
    assert "not --arch resnet34" in err("--data", shards["local"], "--output", str(tmp_path / "r2"),
                                        "--resume", ckpt, *SMALL, "--arch", "resnet34")
    other = build_shards(str(shards["tree"].root), str(tmp_path / "subset"), subset_percentage=50)
    assert other.num_classes != shards["manifest"].num_classes
    assert "different class list" in err("--data", str(tmp_path / "subset"), "--output", str(tmp_path / "r3"),
                                         "--resume", ckpt, *SMALL)
    assert "already holds a run" in err("--data", shards["local"], "--output", str(run), "--resume", "none", *SMALL)
    assert "not a loadable checkpoint" in err_predict(str(blocker), capsys)


def err_predict(ckpt: str, capsys) -> str:
    from trainer.predict import main

    assert main(["--checkpoint", ckpt, "x.jpg"]) == 2
    return capsys.readouterr().err


def test_pretrained_keeps_the_chosen_classes_rows_and_errors_clearly(shards, tmp_path, monkeypatch):
    from common.errors import UserError
    from trainer.model import build_model, load_pretrained

    torch.manual_seed(3)
    imagenet = build_model("resnet18", 1000).state_dict()  # stands in for torchvision's ImageNet weights
    path = tmp_path / "resnet18-imagenet.pth"
    torch.save(imagenet, path)
    classes = shards["manifest"].classes
    model = build_model("resnet18", len(classes))
    load_pretrained(model, "resnet18", classes, str(path))
    rows = [c.imagenet_index for c in classes]
    assert torch.equal(model.fc.weight, imagenet["fc.weight"][rows])
    assert torch.equal(model.fc.bias, imagenet["fc.bias"][rows])
    assert torch.equal(model.conv1.weight, imagenet["conv1.weight"])
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty-hub"))
    with pytest.raises(UserError, match="not in the torch hub cache"):
        load_pretrained(build_model("resnet18", len(classes)), "resnet18", classes, "torchvision")
    with pytest.raises(UserError, match="does not fit --arch resnet34"):
        load_pretrained(build_model("resnet34", len(classes)), "resnet34", classes, str(path))
