"""The S3 demo: shards built into a bucket, training that streams them and checkpoints to S3,
a spot-style SIGTERM mid-epoch (exit 75) and an exact resume by rerunning the same command.

    python3.11 scripts/dev.py demo --s3
    python scripts/demo.py --s3 --out demo-out

A local S3-compatible server (moto, listening on 127.0.0.1 only; common.local_s3) stands in
for a real bucket, so no AWS account is needed. The commands it prints are the ones you would
run against real S3: unset AWS_ENDPOINT_URL, have AWS credentials (the usual chain), and
replace s3://demo-bucket with your bucket. The server is stopped by its pid when the demo
ends, also on Ctrl-C or SIGTERM. A summary (also in OUT/s3-demo-summary.json) ends it.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from common import manifest as mf  # noqa: E402
from common import storage  # noqa: E402
from common.errors import EXIT_COMPLETED, EXIT_INTERRUPTED  # noqa: E402
from common.local_s3 import LocalS3  # noqa: E402
from trainer.loader import LoaderConfig, planned_train_batches  # noqa: E402

BUCKET = "demo-bucket"
SHARDS = f"s3://{BUCKET}/shards"
RUN = f"s3://{BUCKET}/runs/demo"
EPOCHS, BATCH, SEED = 2, 32, 0
# Small enough for ~2 minutes on 2 CPU cores: 10 classes, resnet18 at 64 px, 2 epochs.
TREE_ARGS = ["--classes", "10", "--train-per-class", "40", "--val-per-class", "10"]
STEP_TIMEOUT_S = 600  # every wait of the demo is bounded


class DemoFailed(Exception):
    """A step did not do what the demo shows; the message says which."""


def train_args(staging: Path) -> list[str]:
    return ["-m", "trainer", "--data", SHARDS, "--output", RUN, "--arch", "resnet18", "--epochs", str(EPOCHS),
            "--batch-size", str(BATCH), "--seed", str(SEED), "--image-size", "64", "--val-resize", "72",
            "--warmup-epochs", "0.5", "--workers", "2", "--device", "cpu", "--sample-log",
            "--local-dir", str(staging)]


def echo(args: list[str]) -> None:
    print("   $ python " + " ".join(args), flush=True)


def child_env() -> dict:
    return dict(os.environ, PYTHONPATH=str(REPO))


def sh(args: list[str], expect: int = EXIT_COMPLETED, capture: bool = False) -> str:
    """Run ``python <args>`` as a user would (echoed); fail unless it exits ``expect``."""
    echo(args)
    try:
        proc = subprocess.run([sys.executable, *args], cwd=REPO, env=child_env(), timeout=STEP_TIMEOUT_S,
                              stdout=subprocess.PIPE if capture else None, text=True)
    except subprocess.TimeoutExpired:
        raise DemoFailed(f"`python {' '.join(args[:3])} ...` did not finish within {STEP_TIMEOUT_S} s") from None
    if proc.returncode != expect:
        raise DemoFailed(f"`python {' '.join(args[:3])} ...` exited {proc.returncode}, expected {expect}")
    return proc.stdout or ""


def stop_child(proc: subprocess.Popen) -> None:
    """End a child we started (by its pid), bounded: SIGTERM, then SIGKILL."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=30)


def wait_for_lines(path: Path, n: int, proc: subprocess.Popen, timeout: float = STEP_TIMEOUT_S) -> None:
    """Wait (bounded) until the trainer's sample log holds ``n`` lines: it has trained that far."""
    deadline = time.monotonic() + timeout
    while not (path.exists() and path.read_text().count("\n") >= n):
        if proc.poll() is not None:
            raise DemoFailed(f"training exited {proc.returncode} before it reached step {n}")
        if time.monotonic() > deadline:
            raise DemoFailed(f"training did not reach step {n} within {timeout:.0f} s")
        time.sleep(0.1)


def interrupted_run(staging: Path, steps: int) -> tuple[int, dict]:
    """Start training, SIGTERM it mid-epoch 2 as a spot stop would; (exit code, checkpoint record)."""
    args = train_args(staging)
    echo(args)
    log = staging / "samples" / f"epoch{EPOCHS:03d}_rank0.jsonl"
    proc = subprocess.Popen([sys.executable, *args], cwd=REPO, env=child_env())
    try:
        wait_for_lines(log, steps // 2, proc)
        print(f"== the trainer has reached step {steps // 2} of {steps} in epoch {EPOCHS} (its sample log says so): "
              f"sending it SIGTERM (pid {proc.pid}), as EC2 does on a spot interruption or stop", flush=True)
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=STEP_TIMEOUT_S)
    finally:
        stop_child(proc)
    print(f"   exit code {code} ({'interrupted, checkpoint saved' if code == EXIT_INTERRUPTED else 'unexpected'})")
    if code != EXIT_INTERRUPTED:
        raise DemoFailed(f"the interrupted run exited {code}, expected {EXIT_INTERRUPTED}")
    latest = json.loads(storage.read_bytes(storage.join(RUN, "checkpoints", "latest.json")))
    st = storage.stat(storage.join(RUN, "checkpoints", latest["name"]))
    latest["bytes_in_s3"] = st.size if st else None  # the object itself, not just its record
    return code, latest


def resumed_line(staging: Path) -> str:
    """The newest training log's line that says where the run resumed ('' if none)."""
    logs = sorted(staging.glob("training_log_*.txt"))
    lines = [x for x in logs[-1].read_text().splitlines() if "resumed from" in x] if logs else []
    return lines[0][lines[0].index("resumed from"):] if lines else ""


def data_order(staging: Path) -> tuple[bool, str]:
    """Do the sample logs of both runs together equal the uninterrupted plan, micro-batch by
    micro-batch (trainer.loader.planned_train_batches with the run's loader settings)? (ok, explanation)."""
    manifest = mf.load(SHARDS)
    shards = manifest.split("train").shards
    keys = [k for s in shards for k in mf.load_index(manifest, s).keys]  # global sample id -> key
    # The trainer's loader settings: what train_args passes, the trainer's rule for the partial
    # last global batch (train drops it: steps per epoch do not depend on the world size).
    cfg = LoaderConfig(SHARDS, batch_size=BATCH, seed=SEED, drop_last=True)
    for epoch in range(EPOCHS):
        plan = planned_train_batches(cfg, manifest, rank=0, world_size=1, epoch=epoch)
        want = [(int(plan.steps[b]), int(plan.micros[b]), [keys[i] for i in plan.batch(b)]) for b in range(len(plan))]
        path = staging / "samples" / f"epoch{epoch + 1:03d}_rank0.jsonl"
        got = [(r["step"], r["micro"], r["keys"]) for r in map(json.loads, path.read_text().splitlines())]
        if got != want:
            bad = next((i for i, (g, w) in enumerate(zip(got, want)) if g != w), min(len(got), len(want)))
            return False, (f"epoch {epoch + 1}: {len(got)} logged micro-batches vs {len(want)} planned, first "
                           f"difference at micro-batch {bad}")
    return True, f"{EPOCHS} epochs, every step's samples as planned, none repeated or missed"


def evaluate_and_predict(out: Path) -> tuple[float, float]:
    """(logged val top-1 of the last epoch, val top-1 that trainer.evaluate reproduces from S3)."""
    last = json.loads(storage.read_bytes(storage.join(RUN, "metrics.jsonl")).decode().splitlines()[-1])
    ckpt = storage.join(RUN, "checkpoints", f"checkpoint_epoch_{EPOCHS:03d}.pth")
    print(f"== 6/7 evaluate the final checkpoint from S3 (logged: top-1 {last['val_top1']:.2f}%)")
    result = json.loads(sh(["-m", "trainer.evaluate", "--checkpoint", ckpt, "--data", SHARDS, "--json"],
                           capture=True).strip().splitlines()[-1])
    print(f"   val top-1 {result['val_top1']:.2f}%  top-5 {result['val_top5']:.2f}% on {result['val_count']} images")
    print("== 7/7 predict two val images with model_best.pth from S3")
    val = sorted((out / "kaggle" / "ILSVRC" / "Data" / "CLS-LOC" / "val").glob("*.JPEG"))[3:5]
    sh(["-m", "trainer.predict", "--checkpoint", storage.join(RUN, "model_best.pth"), *map(str, val)])
    return float(last["val_top1"]), float(result["val_top1"])


def run(out: Path, server: LocalS3) -> dict:
    """Every step of the S3 demo against ``server``; returns the facts the summary reports."""
    staging = out / "staging"  # the instance's local disk: checkpoints are written here, then uploaded
    print("== 1/7 demo tree in the Kaggle ILSVRC layout (local; it stands in for the Kaggle download)")
    sh(["-m", "shard_builder", "demo-tree", str(out / "kaggle"), *TREE_ARGS])
    print("== 2/7 build shards straight into the bucket")
    sh(["-m", "shard_builder", "build", "--source", str(out / "kaggle"), "--output", SHARDS,
        "--shard-max-count", "100", "--workers", "2", "--no-progress"])
    print("== 3/7 verify the shards in S3")
    sh(["-m", "shard_builder", "verify", SHARDS, "--deep", "--workers", "2"])
    manifest = mf.load(SHARDS)
    plan = planned_train_batches(LoaderConfig(SHARDS, batch_size=BATCH, seed=SEED, drop_last=True), manifest,
                      rank=0, world_size=1, epoch=0)
    steps = int(plan.steps.max()) + 1
    print(f"== 4/7 train from {SHARDS}, checkpoints to {RUN} ({EPOCHS} epochs of {steps} steps)")
    code, stopped = interrupted_run(staging, steps)
    ckpt_url = storage.join(RUN, "checkpoints", stopped["name"])
    print(f"   checkpoint in S3: {ckpt_url} ({stopped['bytes_in_s3']} bytes; epoch {stopped['epoch'] + 1} "
          f"step {stopped['step_in_epoch']})")
    print("== 5/7 the same command again (what the restart loop on a replacement instance does): resumes")
    sh(train_args(staging))
    line = resumed_line(staging)
    print(f"   its log: {line or 'no resume line found'}")
    logged, evaluated = evaluate_and_predict(out)
    order_ok, order_msg = data_order(staging)
    objects = storage.list_prefix(f"s3://{BUCKET}")
    return {"server_pid": server.pid, "endpoint": server.endpoint, "objects": len(objects),
            "object_keys": [o[len(f"s3://{BUCKET}/"):] for o in objects], "interrupted_exit": code,
            "stopped_at": stopped, "checkpoint_url": ckpt_url,
            "checkpoint_in_bucket": stopped["bytes_in_s3"] == stopped["bytes"], "resume_line": line,
            "steps_per_epoch": steps, "val_top1_logged": logged, "val_top1_evaluated": evaluated,
            "data_order_ok": order_ok, "data_order": order_msg,
            "train_shards_sha256": [s.sha256 for s in manifest.split("train").shards]}


def summary(facts: dict) -> str:
    s = facts["stopped_at"]
    where = f"epoch {s['epoch'] + 1} step {s['step_in_epoch']}"
    resumed = f"at {where}" in facts["resume_line"]
    return "\n".join([
        "== summary",
        f"   bucket s3://{BUCKET}: {facts['objects']} objects (shards, index sidecars, manifest, checkpoints, logs)",
        f"   stopped at {where} (global step {s['global_step']}), exit {facts['interrupted_exit']}, "
        f"checkpoint {facts['stopped_at']['name']} in S3",
        f"   resumed from {where if resumed else 'an unexpected point: ' + facts['resume_line']}",
        f"   val top-1 {facts['val_top1_logged']:.2f}% (logged); evaluate from S3 reproduced "
        f"{facts['val_top1_evaluated']:.2f}%",
        f"   data order of the interrupted + resumed run "
        f"{'matched the uninterrupted plan' if facts['data_order_ok'] else 'DIFFERS from the plan'}: "
        f"{facts['data_order']}",
    ])


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def main(out: Path) -> int:
    """Start the local server, run the demo, always stop the server by its pid."""
    signal.signal(signal.SIGTERM, _raise_interrupt)  # like Ctrl-C: unwind, so `finally` stops the server
    signal.signal(signal.SIGHUP, _raise_interrupt)
    t0 = time.time()
    with LocalS3() as server:
        print(f"== local S3 server (moto, pid {server.pid}) on {server.endpoint}: it stands in for a real bucket.\n"
              f"   Against real S3 run the same commands without AWS_ENDPOINT_URL, with your AWS credentials,\n"
              f"   and your bucket in place of s3://{BUCKET}. Nothing here leaves 127.0.0.1.", flush=True)
        os.environ.update(server.env())
        server.create_bucket(BUCKET)
        try:
            facts = run(out, server)
        except DemoFailed as exc:
            print(f"demo failed: {exc}", file=sys.stderr)
            return 1
        finally:
            print(f"== stopping the local S3 server (pid {server.pid})", flush=True)
    facts["seconds"] = round(time.time() - t0, 1)
    (out / "s3-demo-summary.json").write_text(json.dumps(facts, indent=1) + "\n")
    print(summary(facts))
    print(f"S3 demo finished in {facts['seconds']:.0f}s; local parts in {out}/ (summary: {out}/s3-demo-summary.json)")
    s = facts["stopped_at"]
    ok = (facts["data_order_ok"] and facts["checkpoint_in_bucket"]
          and f"at epoch {s['epoch'] + 1} step {s['step_in_epoch']}" in facts["resume_line"]
          and abs(facts["val_top1_logged"] - facts["val_top1_evaluated"]) < 1e-6)
    return 0 if ok else 1
