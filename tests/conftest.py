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
