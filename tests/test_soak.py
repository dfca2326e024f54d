"""Soak: a long unattended 2-rank run of tiny epochs never hangs (issue "never hang").

A 2-process gloo run with 2 loader workers per rank hung forever at its 12th epoch when
workers were forked from the (threaded) training process every epoch. This runs 40 tiny
epochs, each with a train pass, a val pass and a checkpoint uploaded to the loopback S3
server, and asserts that the run completes within a bound (a hang fails the test through
the timeout), that every epoch's metrics were logged, and that the loader workers were
started once for the whole run.
"""
from __future__ import annotations

import json
import subprocess

import pytest

from common import manifest as mf
from common import storage
from tests.conftest import shards_in_s3
from tests.test_resilience import _env, finish, start

EPOCHS = 40
# shufflenet_v2_x0_5 keeps each checkpoint at a few MB: 40 uploads stay cheap on 2 cores.
ARGS = ["--arch", "shufflenet_v2_x0_5", "--batch-size", "4", "--global-batch", "8", "--image-size", "32",
        "--val-resize", "36", "--workers", "2", "--device", "cpu", "--warmup-epochs", "1",
        "--epochs", str(EPOCHS), "--limit-train-steps", "1", "--checkpoint-interval-minutes", "600",
        "--keep-last", "2", "--log-every-steps", "1"]


@pytest.fixture(scope="module")
def soak_data(tmp_path_factory, s3_server):
    return shards_in_s3(tmp_path_factory, s3_server, "soak", classes=3, train_per_class=6, val_per_class=3,
                        seed=7, shard_max_count=5)["s3"]


def test_forty_tiny_ddp_epochs_with_val_and_s3_checkpoints_complete(soak_data, tmp_path):
    output = "s3://soak/runs/soak"
    proc = start("--data", soak_data, "--output", output, "--local-dir", str(tmp_path / "staging"), *ARGS,
                 env=_env())
    try:
        err = finish(proc, timeout=900)  # a hang fails here instead of blocking CI
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise AssertionError(f"the {EPOCHS}-epoch soak run did not finish within 900 s (hang?)") from None
    records = [json.loads(line) for line in storage.read_bytes(storage.join(output, "metrics.jsonl")).splitlines()]
    assert [r["epoch"] for r in records] == list(range(1, EPOCHS + 1))
    val_count = mf.load(soak_data).split("val").num_samples
    assert all(r["val_count"] + r["val_skipped"] == val_count for r in records)
    pointer = json.loads(storage.read_bytes(storage.join(output, "checkpoints", "latest.json")))
    assert pointer["name"] == f"checkpoint_epoch_{EPOCHS:03d}.pth"
    assert storage.stat(storage.join(output, "checkpoints", pointer["name"])).size == pointer["bytes"]
    # workers started once for the whole run (train and val each; rank 0's log), never per epoch
    assert err.count("train loader: 2 workers started") == 1, err[-3000:]
    assert err.count("val loader: 2 workers started") == 1, err[-3000:]
