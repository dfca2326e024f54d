"""scripts/ec2/train-loop.sh's terminal paths and multi-node behaviour, with stand-in trainers,
recording stand-ins for aws/systemctl/poweroff/nvidia-smi (tests/ec2_standins.py), the IMDS
emulator, and real torchrun for the SIGTERM budget:

    PYTHONPATH=$PWD python -m pytest -q tests/test_ec2_loop.py
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO
from tests.ec2_standins import calls, install_standins, sigterm_when_started, standin_env
from tests.imds_emulator import ImdsEmulator

LOOP = REPO / "scripts" / "ec2" / "train-loop.sh"
OUT = "s3://b/runs/r1"
STATUS = "s3/b/runs/r1/ec2-status/i-0123456789emulator.json"


def _env(tmp_path: Path, imds: ImdsEmulator, **extra) -> dict:
    """The loop as the unit runs it (INVOCATION_ID set), terminal failures power off."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_EC2_METADATA")}
    env.update(standin_env(tmp_path, install_standins(tmp_path / "bin"), STATE_DIR=tmp_path / "state",
                           OUTPUT=OUT, ON_FAIL="poweroff", INVOCATION_ID="test", CONSOLE=tmp_path / "console",
                           AWS_EC2_METADATA_SERVICE_ENDPOINT=imds.url, BACKOFF_BASE_S="0.01",
                           INTERRUPTED_WAIT_S="0.1", PEER_RETRY_S="0.01", PYTHONPATH=REPO))
    env.update({k: str(v) for k, v in extra.items()})
    return env


def _counted(tmp_path: Path, script: str) -> str:
    """A stand-in trainer: $n is its attempt number (1, 2, ...), then `script`."""
    path = tmp_path / "fake-trainer"
    path.write_text(f'#!/usr/bin/env bash\nn=$(( $(cat {tmp_path}/n 2>/dev/null || echo 0) + 1 )); '
                    f'echo "$n" > {tmp_path}/n\n{script}\n')
    path.chmod(0o755)
    return str(path)


def _run(env: dict, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(LOOP)], env=env, capture_output=True, text=True, timeout=timeout)


def _names(tmp_path: Path) -> list[str]:
    return [" ".join([r["cmd"], *r["args"][:2]]) for r in calls(tmp_path)]


def test_five_failures_write_the_status_object_then_power_off(tmp_path):
    """Acceptance: five consecutive failures -> status object under OUTPUT/ec2-status/, then poweroff."""
    with ImdsEmulator() as imds:
        proc = _run(_env(tmp_path, imds, TRAIN_CMD=_counted(tmp_path, "exit 3"), MAX_FAILURES=5))
    assert proc.returncode == 3, proc.stderr
    assert (tmp_path / "n").read_text().strip() == "5"
    status = json.loads((tmp_path / STATUS).read_text())
    assert status["stage"] == "train" and status["exit_code"] == 3 and status["action"] == "poweroff"
    assert "5 consecutive failures" in status["reason"] and status["instance_id"] == "i-0123456789emulator"
    names = _names(tmp_path)
    assert names[-1] == "systemctl --no-block poweroff"
    assert names.index("aws s3 cp") < len(names) - 1
    assert "5 consecutive failures" in (tmp_path / "console").read_text()
    assert "SECRET" not in json.dumps(status)


def test_lease_lost_is_terminal_and_hang_is_retried(tmp_path):
    """77 (another writer owns the run): no retry, status, poweroff. 76 (hang watchdog): resumed."""
    with ImdsEmulator() as imds:
        lost = _run(_env(tmp_path, imds, TRAIN_CMD=_counted(tmp_path, "exit 77"), MAX_FAILURES=5))
        assert lost.returncode == 77 and (tmp_path / "n").read_text().strip() == "1"
        assert "lease" in json.loads((tmp_path / STATUS).read_text())["reason"]
        assert _names(tmp_path)[-1] == "systemctl --no-block poweroff"
        (tmp_path / "n").unlink()
        (tmp_path / "calls.jsonl").unlink()
        hung = _run(_env(tmp_path, imds, OUTPUT="s3://b/runs/r2", MAX_FAILURES=2, TRAIN_CMD=_counted(
            tmp_path, '[ "$n" -gt 1 ] && exit 0; echo 76 > "$IMAGENET_EXIT_STATUS_FILE"; exit 1')))
    assert hung.returncode == 0, hung.stderr
    assert (tmp_path / "n").read_text().strip() == "2" and "hang watchdog" in hung.stderr
    assert "aws s3 cp" not in _names(tmp_path)


def test_multi_node_waiting_for_peers_is_not_a_failure_until_the_cap(tmp_path):
    """Acceptance: after a 75, rendezvous failures (nothing reported by the trainer) do not
    count toward MAX_FAILURES; past WAIT_PEERS_MAX_S the loop gives up and powers off."""
    # 75, then 6 failed rendezvous (more than MAX_FAILURES=2), then the peers are back
    script = ('[ "$n" -eq 1 ] && { echo 75 > "$IMAGENET_EXIT_STATUS_FILE"; exit 1; }\n'
              '[ "$n" -le 7 ] && exit 1\nexit 0')
    with ImdsEmulator() as imds:
        env = _env(tmp_path, imds, TRAIN_CMD=_counted(tmp_path, script), NNODES=2,
                   RDZV_ENDPOINT="10.0.1.10:29400", MAX_FAILURES=2, OUTPUT="s3://b/runs/r0")
        ok = _run(env)
        assert ok.returncode == 0, ok.stderr
        assert (tmp_path / "n").read_text().strip() == "8" and ok.stderr.count("peers not all back") == 6
        assert not (tmp_path / STATUS).exists()
        # a peer that never comes back: the cap (4 s here: the loop's clock has 1 s steps), not
            # MAX_FAILURES, ends the wait
        (tmp_path / "n").unlink()
        script = '[ "$n" -eq 1 ] && { echo 75 > "$IMAGENET_EXIT_STATUS_FILE"; exit 1; }\nsleep 0.2; exit 1'
        env.update(TRAIN_CMD=_counted(tmp_path, script), OUTPUT="s3://b/runs/r1", WAIT_PEERS_MAX_S="4")
        capped = _run(env)
    assert capped.returncode == 1
    assert int((tmp_path / "n").read_text()) > 3  # well past MAX_FAILURES=2
    status = json.loads((tmp_path / STATUS).read_text())
    assert status["stage"] == "waiting-for-peers" and "did not come back" in status["reason"]
    assert _names(tmp_path)[-1] == "systemctl --no-block poweroff"


def test_a_failure_the_trainer_reports_still_counts_while_waiting(tmp_path):
    script = ('[ "$n" -eq 1 ] && { echo 75 > "$IMAGENET_EXIT_STATUS_FILE"; exit 1; }\n'
              'echo 2 > "$IMAGENET_EXIT_STATUS_FILE"; exit 1')
    with ImdsEmulator() as imds:
        proc = _run(_env(tmp_path, imds, TRAIN_CMD=_counted(tmp_path, script), NNODES=2,
                         RDZV_ENDPOINT="10.0.1.10:29400", MAX_FAILURES=2))
    assert proc.returncode == 2 and (tmp_path / "n").read_text().strip() == "3"


@pytest.mark.parametrize("ip,gpus", [("10.0.1.10", 4), ("10.0.1.11", 0)])
def test_rendezvous_host_from_the_private_ip_and_device_from_nvidia_smi(tmp_path, ip, gpus):
    """The node whose IMDS local-ipv4 is --rdzv-host hosts the c10d store (is_host=true), the
    others do not, whatever the hostname resolves to; listed GPUs -> --device cuda."""
    fake_py = tmp_path / "python"
    fake_py.write_text(f'#!/usr/bin/env bash\nprintf "%s\\n" "$@" > {tmp_path}/argv\nexit 0\n')
    fake_py.chmod(0o755)
    with ImdsEmulator() as imds:
        imds.local_ipv4 = ip
        proc = _run(_env(tmp_path, imds, PYTHON=fake_py, DATA="s3://b/shards", NNODES=2,
                         RDZV_ENDPOINT="10.0.1.10:29400", STANDIN_GPUS=gpus, EXTRA_ARGS="--epochs 1"))
    assert proc.returncode == 0, proc.stderr
    argv = (tmp_path / "argv").read_text().splitlines()
    assert f"--rdzv_conf=is_host={'true' if ip == '10.0.1.10' else 'false'}" in argv
    assert ("--device" in argv) == (gpus > 0)
    if gpus:
        assert argv[argv.index("--device") + 1] == "cuda" and "--nproc_per_node=4" in argv
    assert argv[-2:] == ["--epochs", "1"]


SLOW_UPLOAD_WORKER = r"""
import signal, sys, time
from pathlib import Path
from trainer.spot import EXIT_INTERRUPTED, report_exit

stop = []
signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
Path(sys.argv[1]).touch()
while not stop:
    time.sleep(0.05)
time.sleep(4.0)                       # the checkpoint upload, longer than torchrun's timer
Path(sys.argv[2]).write_text("uploaded")
report_exit(EXIT_INTERRUPTED, "SIGTERM")
sys.exit(EXIT_INTERRUPTED)
"""


def test_sigterm_gives_the_ranks_the_full_upload_budget_whatever_torchrun_allows(tmp_path):
    """torchrun SIGKILLs its workers TORCH_ELASTIC_SHUTDOWN_TIMEOUT after it gets SIGTERM (30 s
    on torch before 2026-03, whatever the variable says); here 1 s. The loop signals the ranks
    instead, so a 4 s upload completes and the loop ends with 75."""
    worker, running, uploaded = tmp_path / "worker.py", tmp_path / "running", tmp_path / "uploaded"
    worker.write_text(SLOW_UPLOAD_WORKER)
    cmd = f"{sys.executable} -m torch.distributed.run --standalone --nproc_per_node=1 {worker} {running} {uploaded}"
    with ImdsEmulator() as imds:
        env = _env(tmp_path, imds, TRAIN_CMD=cmd, TORCH_ELASTIC_SHUTDOWN_TIMEOUT="1", INTERRUPTED_WAIT_S="600")
        proc = subprocess.Popen(["bash", str(LOOP)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True)
        out = sigterm_when_started(proc, running, "the worker")
    assert proc.returncode == 75, out
    assert uploaded.read_text() == "uploaded", out
    assert "SIGTERM to the ranks" in out
