"""Spot-instance resilience with the real trainer: kill -9 and SIGTERM mid-epoch, an IMDS
spot notice, a truncated newest checkpoint in S3, and an elastic 2 -> 1 process resume.

Every run is deterministic on CPU, so "resumed exactly" is asserted as bitwise-equal final
weights against one uninterrupted reference run. resnet18 at 32 px keeps each run short.
"""
from __future__ import annotations

import io
import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import torch

from common import manifest as mf
from common import storage
from tests.conftest import REPO, shards_in_s3
from tests.imds_emulator import ImdsEmulator
from trainer import sampling
from trainer.spot import EXIT_INTERRUPTED

ARGS = ["--arch", "resnet18", "--batch-size", "8", "--image-size", "32", "--val-resize", "36", "--workers", "1",
        "--device", "cpu", "--warmup-epochs", "0.3", "--epochs", "2", "--limit-train-steps", "6",
        "--deterministic", "--checkpoint-interval-minutes", "600", "--keep-last", "0"]


def _env(**extra) -> dict:
    return dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", **extra)


def start(*args: str, nproc: int = 2, env: dict | None = None) -> subprocess.Popen:
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
                if nproc > 1 else [sys.executable])
    return subprocess.Popen([*launcher, "-m", "trainer", *args], cwd=REPO, env=env or _env(), text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)


def finish(proc: subprocess.Popen, code: int = 0, timeout: float = 600) -> str:
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == code, f"exit {proc.returncode}\n{out[-2000:]}\n{err[-6000:]}"
    return err


def final_model(output: str) -> dict:
    url = storage.join(output, "checkpoints", "checkpoint_epoch_002.pth")
    return torch.load(io.BytesIO(storage.read_bytes(url)), weights_only=True)["model"]


def assert_bitwise_equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs"


def latest(output: str) -> dict | None:
    try:
        return json.loads(storage.read_bytes(storage.join(output, "checkpoints", "latest.json")))
    except FileNotFoundError:
        return None


def wait_for(predicate, timeout: float = 300, what: str = "condition"):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture(scope="module")
def data(tmp_path_factory, s3_server):
    return shards_in_s3(tmp_path_factory, s3_server, "resilience", classes=4, train_per_class=30, val_per_class=5,
                        seed=2, shard_max_count=25)["s3"]


@pytest.fixture(scope="module")
def odd_data(tmp_path_factory, s3_server, data):
    """97 train images (93 + the demo tree's quirks): with a global batch of 8, 12 full steps and
    1 image left over, which 2 ranks would drop but 1 rank x accum 2 would train."""
    odd = shards_in_s3(tmp_path_factory, s3_server, "resilience", classes=3, train_per_class=31, val_per_class=3,
                       seed=5, shard_max_count=25, prefix="odd")
    assert mf.load(odd["local"]).split("train").num_samples == 97
    return odd["s3"]


@pytest.fixture(scope="module")
def reference(data):
    """The uninterrupted 2-process run every interrupted run must reproduce bit for bit."""
    out = "s3://resilience/runs/reference"
    finish(start("--data", data, "--output", out, *ARGS))
    return final_model(out)


def test_sigkill_at_random_step_then_resume_auto_is_bitwise_equal(data, reference):
    out = "s3://resilience/runs/killed"
    step = random.Random(11).randint(1, 10)  # of 12 optimizer steps
    proc = start("--data", data, "--output", out, *ARGS, "--checkpoint-every-steps", "1")
    wait_for(lambda: (latest(out) or {}).get("global_step", 0) >= step, what=f"checkpoint of step {step}")
    os.killpg(proc.pid, signal.SIGKILL)  # every process of the job, like a lost instance
    proc.wait()
    killed_at = latest(out)["global_step"]
    assert killed_at < 12
    err = finish(start("--data", data, "--output", out, *ARGS, "--checkpoint-every-steps", "1"))
    assert "resumed from" in err
    assert_bitwise_equal(final_model(out), reference)


def test_sigterm_to_torchrun_checkpoints_within_60s_and_resumes_at_that_step(data, reference, tmp_path):
    out = "s3://resilience/runs/sigterm"
    status = tmp_path / "status"
    local = tmp_path / "local"
    proc = start("--data", data, "--output", out, *ARGS, "--sample-log", "--local-dir", str(local),
                 env=_env(IMAGENET_EXIT_STATUS_FILE=str(status)))
    log = local / "samples" / "epoch001_rank0.jsonl"
    wait_for(lambda: log.exists() and len(log.read_text().splitlines()) >= 3, what="training to start")
    t0 = time.time()
    proc.send_signal(signal.SIGTERM)  # to torchrun (the agent), as EC2 / systemd would
    proc.communicate(timeout=120)
    ckpt = wait_for(lambda: latest(out), timeout=60, what="a checkpoint in S3")
    assert time.time() - t0 < 60
    assert 0 < ckpt["step_in_epoch"] < 6  # mid-epoch
    assert status.read_text().split()[0] == str(EXIT_INTERRUPTED)  # torchrun itself exits 1
    err = finish(start("--data", data, "--output", out, *ARGS))
    assert f"at epoch {ckpt['epoch'] + 1} step {ckpt['step_in_epoch']}" in err
    assert_bitwise_equal(final_model(out), reference)


def metrics(output: str) -> list[dict]:
    return [json.loads(x) for x in storage.read_bytes(storage.join(output, "metrics.jsonl")).decode().splitlines()]


def test_sigterm_on_the_last_step_of_an_epoch_saves_that_step_and_resumes_exactly(data, tmp_path):
    """One step per epoch, so the stop is agreed on an epoch's last step: a checkpoint of that
    step is verified in S3 before exit 75; the resumed run goes straight to that epoch's
    evaluation (no step redone, each epoch's metrics recorded once) and ends bitwise equal."""
    one = [*ARGS, "--limit-train-steps", "1", "--sample-log"]
    ref = "s3://resilience/runs/last-step-reference"
    finish(start("--data", data, "--output", ref, *one, "--local-dir", str(tmp_path / "ref")))
    out, local1, local2, status = "s3://resilience/runs/last-step", tmp_path / "l1", tmp_path / "l2", tmp_path / "st"
    proc = start("--data", data, "--output", out, *one, "--local-dir", str(local1),
                 env=_env(IMAGENET_EXIT_STATUS_FILE=str(status)))
    log = local1 / "samples" / "epoch001_rank0.jsonl"
    wait_for(lambda: log.exists() and log.read_text().count("\n") >= 1, what="the first step")
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert status.read_text().split()[0] == str(EXIT_INTERRUPTED), err[-3000:]
    ckpt = latest(out)
    assert ckpt["step_in_epoch"] == 1 and ckpt["name"] == f"checkpoint_epoch_{ckpt['epoch'] + 1:03d}_step_000001.pth"
    url = storage.join(out, "checkpoints", ckpt["name"])
    body = storage.read_bytes(url)
    assert len(body) == ckpt["bytes"] and mf.sha256_bytes(body) == ckpt["sha256"]
    assert err.index(f"checkpoint {url} saved and verified") > err.index("interrupted (")
    err = finish(start("--data", data, "--output", out, *one, "--local-dir", str(local2)))
    assert f"at epoch {ckpt['epoch'] + 1} step 1" in err
    resumed = local2 / "samples" / f"epoch{ckpt['epoch'] + 1:03d}_rank0.jsonl"
    assert not resumed.exists() or not resumed.read_text().strip(), "the resumed run redid the saved step"
    got, want = metrics(out), metrics(ref)
    assert [r["epoch"] for r in got] == [1, 2]
    for g, w in zip(got, want):  # the interrupted epoch's train metrics cover the whole epoch
        assert g["val_top1"] == w["val_top1"] and g["train_loss"] == pytest.approx(w["train_loss"], rel=1e-9)
    assert_bitwise_equal(final_model(out), final_model(ref))


def test_imds_spot_notice_behaves_like_sigterm(data, tmp_path):
    out = str(tmp_path / "run")
    with ImdsEmulator() as imds:
        env = _env(AWS_EC2_METADATA_SERVICE_ENDPOINT=imds.url)
        env.pop("AWS_EC2_METADATA_DISABLED", None)
        proc = start("--data", data, "--output", out, *ARGS, "--imds-poll-seconds", "0.2", "--sample-log",
                     nproc=1, env=env)
        log = Path(out, "samples", "epoch001_rank0.jsonl")
        wait_for(lambda: log.exists() and log.read_text().count("\n") >= 2, what="training to start")
        imds.announce(action="terminate", seconds=120)
        err = finish(proc, code=EXIT_INTERRUPTED)
    assert "spot-interruption: terminate" in err
    ckpt = latest(out)
    assert 0 < ckpt["step_in_epoch"] < 6  # stopped mid-epoch, checkpoint saved


def test_truncated_newest_checkpoint_falls_back_to_previous_with_warning(data, reference):
    import boto3

    out = "s3://resilience/runs/truncated"
    finish(start("--data", data, "--output", out, *ARGS, "--checkpoint-every-steps", "2"))
    newest = latest(out)
    assert newest["name"] == "checkpoint_epoch_002.pth"
    s3 = boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"])
    key = f"runs/truncated/checkpoints/{newest['name']}"
    body = s3.get_object(Bucket="resilience", Key=key)["Body"].read()
    s3.put_object(Bucket="resilience", Key=key, Body=body[: len(body) // 2])  # a half-written object
    err = finish(start("--data", data, "--output", out, *ARGS, "--checkpoint-every-steps", "2"))
    assert f"{newest['name']} is not usable" in err and "trying the previous one (it is kept)" in err
    assert "checkpoint_epoch_002_step_000004.pth at epoch 2 step 4" in err  # the previous complete one
    assert_bitwise_equal(final_model(out), reference)  # and the rerun of steps 5-6 is exact


def test_elastic_resume_on_fewer_processes_keeps_global_batch_and_sees_each_sample_once(data, tmp_path):
    out, local1, local2 = "s3://resilience/runs/elastic", tmp_path / "l1", tmp_path / "l2"
    args = [a for a in ARGS if a != "--deterministic"] + ["--sample-log", "--epochs", "1", "--limit-train-steps", "7"]
    proc = start("--data", data, "--output", out, *args, "--local-dir", str(local1))
    log = local1 / "samples" / "epoch001_rank0.jsonl"
    wait_for(lambda: log.exists() and log.read_text().count("\n") >= 2, what="training to start")
    proc.send_signal(signal.SIGTERM)  # both ranks stop at the same step boundary, checkpoint uploaded
    proc.communicate(timeout=120)
    # resume as ONE process: batch 8 x 1 process x accum 2 = the checkpoint's global batch 16
    err = finish(start("--data", data, "--output", out, *args, "--local-dir", str(local2), nproc=1))
    assert "batch 8 x 1 x accum 2 = 16" in err
    found = re.search(r"at epoch 1 step (\d+)", err)
    assert found, err[-3000:]
    stop = int(found.group(1))
    assert 0 < stop < 7
    first = [json.loads(x) for r in (0, 1)
             for x in (local1 / "samples" / f"epoch001_rank{r}.jsonl").read_text().splitlines()]
    second = [json.loads(x) for x in (local2 / "samples" / "epoch001_rank0.jsonl").read_text().splitlines()]
    seen = [k for rec in first if rec["step"] < stop for k in rec["keys"]] + [k for rec in second for k in rec["keys"]]
    counts = Counter(seen)
    assert max(counts.values()) == 1, "a sample was repeated after the elastic resume"
    per_step = Counter()
    for rec in first:
        if rec["step"] < stop:
            per_step[rec["step"]] += len(rec["keys"])
    for rec in second:
        per_step[rec["step"]] += len(rec["keys"])
    assert set(per_step) == set(range(7)) and set(per_step.values()) == {16}  # same global batch every step
    # ... and exactly the samples the epoch's (world-size independent) global order puts in steps 0..6
    m = mf.load(data)
    counts_per_shard = [sh.num_samples for sh in m.split("train").shards]
    ids = sampling.global_order(counts_per_shard, seed=0, epoch=0)[: 7 * 16]
    shard, index = sampling.locate(counts_per_shard, ids)
    keys = {sh: mf.load_index(m, m.split("train").shards[sh]).keys for sh in set(shard.tolist())}
    assert set(counts) == {keys[a][b] for a, b in zip(shard.tolist(), index.tolist())}


def _records(local: Path, epoch: int = 1, ranks=(0, 1)) -> list[dict]:
    return [json.loads(x) for r in ranks if (local / "samples" / f"epoch{epoch:03d}_rank{r}.jsonl").exists()
            for x in (local / "samples" / f"epoch{epoch:03d}_rank{r}.jsonl").read_text().splitlines()]


def test_elastic_resume_on_an_odd_split_keeps_steps_lr_and_samples_of_each_step(odd_data, tmp_path):
    """97 images, global batch 8: 2 ranks x accum 1 run 12 steps (the partial last global batch
    is dropped); a resume on 1 process (accum 2) mid-epoch runs the same 10, sets the same LR
    at every step and trains the same samples in every step, each sample exactly once."""
    args = [*ARGS, "--batch-size", "4", "--epochs", "1", "--limit-train-steps", "0", "--sample-log"]
    ref, out, local1, local2 = tmp_path / "ref", "s3://resilience/runs/odd", tmp_path / "l1", tmp_path / "l2"
    err = finish(start("--data", odd_data, "--output", str(ref), *args))
    assert "batch 4 x 2 x accum 1 = 8" in err and "12 steps/epoch" in err
    proc = start("--data", odd_data, "--output", out, *args, "--local-dir", str(local1))
    log = local1 / "samples" / "epoch001_rank0.jsonl"
    wait_for(lambda: log.exists() and log.read_text().count("\n") >= 2, what="training to start")
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=120)
    err = finish(start("--data", odd_data, "--output", out, *args, "--local-dir", str(local2), nproc=1))
    assert "batch 4 x 1 x accum 2 = 8" in err and "12 steps/epoch" in err
    stop = int(re.search(r"at epoch 1 step (\d+)", err).group(1))
    assert 0 < stop < 12
    want = _records(ref)
    got = [r for r in _records(local1) if r["step"] < stop] + _records(local2, ranks=(0,))
    keys = [k for r in got for k in r["keys"]]
    assert len(keys) == len(set(keys)) == 96, "a sample was repeated or missed after the elastic resume"

    def per_step(records):
        steps: dict[int, set] = {}
        lrs: dict[int, set] = {}
        for r in records:
            steps.setdefault(r["step"], set()).update(r["keys"])
            lrs.setdefault(r["step"], set()).add(r["lr"])
        return steps, lrs

    (want_keys, want_lr), (got_keys, got_lr) = per_step(want), per_step(got)
    assert sorted(got_keys) == list(range(12)) and got_keys == want_keys
    assert got_lr == want_lr and all(len(v) == 1 for v in got_lr.values())
