"""Shared fixtures: a real S3-protocol server on 127.0.0.1 and the demo tree.

The S3 server is moto in server mode, run as its own process on a free port by
``common.local_s3.LocalS3`` (the demo and the benchmarks start it the same way); code under
test reaches it only through the standard ``AWS_ENDPOINT_URL`` (no patching of boto3).
"""
from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from common.local_s3 import LocalS3, free_port  # noqa: F401 - free_port: tests import it from here

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def s3_server():
    """Start moto_server (common.local_s3); point every boto3 client (ours and subprocesses') at it."""
    with LocalS3() as server:
        saved = {k: os.environ.get(k) for k in _S3_ENV}
        os.environ.update(server.env())
        os.environ["IMAGENET_S3_MAX_ATTEMPTS"] = "4"
        try:
            yield server.endpoint
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v


_S3_ENV = ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION",
           "AWS_EC2_METADATA_DISABLED", "IMAGENET_S3_MAX_ATTEMPTS")


@pytest.fixture
def s3_bucket(s3_server) -> str:
    """A fresh, empty bucket; returns ``s3://name``."""
    import boto3

    name = f"test-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket=name)
    return f"s3://{name}"


@pytest.fixture(scope="session")
def demo_tree(tmp_path_factory):
    """The default-size demo tree in the exact Kaggle layout (built once per session)."""
    from shard_builder.demo_tree import write_demo_tree

    return write_demo_tree(tmp_path_factory.mktemp("demo") / "kaggle", classes=10, train_per_class=12,
                           val_per_class=4, seed=0)


def run_cli(*args: str, env: dict | None = None, unset: tuple[str, ...] = (), timeout: float = 300,
            check: bool = False):
    """Run ``python -m <args>`` from the repo root, as a user would; returns CompletedProcess.

    ``env`` adds variables, ``unset`` removes them from the child's environment.
    """
    full_env = dict(os.environ)
    full_env.update(env or {})
    for name in unset:
        full_env.pop(name, None)
    full_env["PYTHONPATH"] = str(REPO)
    proc = subprocess.run([sys.executable, "-m", *args], cwd=REPO, env=full_env, capture_output=True,
                          text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{args} exited {proc.returncode}\nstdout:{proc.stdout}\nstderr:{proc.stderr}")
    return proc


def shards_in_s3(tmp_path_factory, s3_server: str, bucket: str, *, classes: int, train_per_class: int,
                 val_per_class: int, seed: int, shard_max_count: int, workers: int = 2,
                 prefix: str = "shards") -> dict:
    """A demo tree built into local shards and uploaded to ``s3://bucket/prefix`` (the bucket is
    created if needed). Returns {"local": shard folder, "s3": URL, "tree": tree root}."""
    import boto3

    from common import storage
    from shard_builder.build import build_shards
    from shard_builder.demo_tree import write_demo_tree

    tree = write_demo_tree(tmp_path_factory.mktemp("tree") / "kaggle", classes=classes,
                           train_per_class=train_per_class, val_per_class=val_per_class, seed=seed)
    local = tmp_path_factory.mktemp("shards") / "s"
    build_shards(str(tree.root), str(local), shard_max_count=shard_max_count, workers=workers)
    client = boto3.client("s3", endpoint_url=s3_server)
    if bucket not in [b["Name"] for b in client.list_buckets().get("Buckets", [])]:
        client.create_bucket(Bucket=bucket)
    for path in local.rglob("*"):
        if path.is_file() and "logs" not in path.parts:
            storage.upload_file(path, f"s3://{bucket}/{prefix}/{path.relative_to(local).as_posix()}")
    return {"local": str(local), "s3": f"s3://{bucket}/{prefix}", "tree": str(tree.root)}
