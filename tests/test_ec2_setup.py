"""The instance side of scripts/ec2/ (user-data.sh's first boot and `setup.sh --setup`, the
unit's ExecStartPre), run under a path prefix with recording stand-ins for aws, nvidia-smi,
systemctl and poweroff (tests/ec2_standins.py), a stand-in Deep Learning AMI env holding a
fake torch, and real pip resolving offline against empty wheels:

    PYTHONPATH=$PWD python -m pytest -q tests/test_ec2_setup.py

A "boot" runs the unit's ExecStartPre= then, if it succeeded, its ExecStart=, as systemd does.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO
from tests.ec2_standins import calls, install_standins, make_ami_env, make_wheelhouse, set_fake_cuda, standin_env
from tests.imds_emulator import ImdsEmulator

LAUNCH = REPO / "scripts" / "ec2" / "launch_spot.sh"
OUT = "s3://my-bucket/runs/r50"
ARGS = ["--data", "s3://my-bucket/shards", "--output", OUT, "--ami", "ami-1", "--nproc", "4",
        "--iam-instance-profile", "trainer"]


def _base_env(tmp_path: Path, **extra) -> dict:
    bindir = install_standins(tmp_path / "bin")
    env = {"HOME": str(tmp_path), "LANG": "C.UTF-8", "AWS_EC2_METADATA_DISABLED": "true"}
    env.update(standin_env(tmp_path, bindir, PYTHON=sys.executable))
    env.update({k: str(v) for k, v in extra.items()})
    return env


def _launch(tmp_path: Path, *args: str) -> tuple[str, Path]:
    """Run the launcher for real against the stand-in aws; return the user data it sent."""
    proc = subprocess.run(["bash", str(LAUNCH), *ARGS, *args], env=_base_env(tmp_path),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    run = calls(tmp_path, "aws")
    user_data = next(r["user_data"] for r in run if "run-instances" in r["args"])
    path = tmp_path / "user-data.sh"
    path.write_text(user_data)
    return user_data, path


def _instance_env(tmp_path: Path, imds: ImdsEmulator, **extra) -> dict:
    """What the instance's scripts see: the prefix, stand-ins, pip offline, "run by systemd"."""
    env = _base_env(tmp_path, IMAGENET_SPOT_ROOT=tmp_path / "root", IMAGENET_SPOT_SYSTEMCTL=1,
                    INVOCATION_ID="test-boot", AWS_EC2_METADATA_SERVICE_ENDPOINT=imds.url,
                    PIP_NO_INDEX=1, PIP_FIND_LINKS=make_wheelhouse(tmp_path / "wheelhouse"),
                    PIP_DISABLE_PIP_VERSION_CHECK=1, PIP_CONFIG_FILE="/dev/null",  # this machine's pip.conf: not here
                    FAKE_TORCHRUN_LOG=tmp_path / "torchrun.jsonl",
                    GPU_RETRY_S=0, STANDIN_GPUS=4, **extra)
    env.pop("AWS_EC2_METADATA_DISABLED")
    return env


def _first_boot(user_data: Path, env: dict) -> str:
    proc = subprocess.run(["bash", str(user_data)], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return (Path(env["IMAGENET_SPOT_ROOT"]) / "etc/systemd/system/imagenet-spot-train.service").read_text()


def _boot(env: dict, timeout: float = 600) -> tuple[int, str]:
    """ExecStartPre= then ExecStart= of the unit, as systemd runs them at a boot."""
    unit = (Path(env["IMAGENET_SPOT_ROOT"]) / "etc/systemd/system/imagenet-spot-train.service").read_text()
    lines = dict(line.split("=", 1) for line in unit.splitlines() if line.startswith("ExecStart"))
    log = ""
    for key in ("ExecStartPre", "ExecStart"):
        proc = subprocess.run(lines[key].split(), env=env, capture_output=True, text=True, timeout=timeout)
        log += proc.stderr
        if proc.returncode != 0:
            return proc.returncode, log
    return 0, log


def _names(tmp_path: Path) -> list[str]:
    """The stand-in calls in order, as 'cmd first-args'."""
    return [" ".join([r["cmd"], *r["args"][:2]]) for r in calls(tmp_path)]


def test_launcher_wheel_is_installed_setup_retried_at_next_boot_and_ami_torch_reused(tmp_path):
    """Acceptance: the launcher uploads a wheel of this checkout and the user data installs it
    from there; a set-up failing on its first boot reboots and succeeds at the next; the
    project venv imports the AMI env's torch and pip never installs torch."""
    user_data, ud_path = _launch(tmp_path)
    uploads = [r["args"] for r in calls(tmp_path, "aws") if r["args"][:2] == ["s3", "cp"]]
    assert len(uploads) == 1 and uploads[0][-1].startswith(f"{OUT}/code/")
    wheel_url = uploads[0][-1]
    assert wheel_url.endswith("/imagenet_spot-0.1.0-py3-none-any.whl")
    assert f"PROJECT_PIP_SPEC={wheel_url}" in user_data and "PROJECT_GIT_URL=''" in user_data
    wheel = tmp_path / "s3" / wheel_url[5:]
    assert wheel.is_file()

    root = tmp_path / "root"
    ami = make_ami_env(root)
    with ImdsEmulator() as imds:
        env = _instance_env(tmp_path, imds)
        unit = _first_boot(ud_path, env)
        assert "ExecStartPre=" in unit
        assert ["systemctl daemon-reload", "systemctl enable imagenet-spot-train.service",
                "systemctl start --no-block"] == [n for n in _names(tmp_path) if n.startswith("systemctl")
                                                  and "list-unit-files" not in n]
        # boot 1: the wheel cannot be fetched (as if S3 were unreachable) -> reboot, no training
        hidden = tmp_path / "hidden.whl"
        wheel.rename(hidden)
        rc, log = _boot(env)
        assert rc != 0 and "rebooting to retry" in log, log
        assert "systemctl --no-block reboot" in _names(tmp_path)
        assert not any(n.startswith("poweroff") or n == "systemctl --no-block poweroff" for n in _names(tmp_path))
        assert not (tmp_path / "torchrun.jsonl").exists()
        assert (root / "var/lib/imagenet-spot/setup-attempts").read_text().strip() == "1"
        # boot 2: reachable again -> installed, GPU check passes, training runs (and completes)
        hidden.rename(wheel)
        rc, log = _boot(env)
    assert rc == 0, log
    venv_py = root / "opt/imagenet-spot/venv/bin/python"
    probe = subprocess.run([str(venv_py), "-c", "import json, torch, importlib.metadata as m; "
                            "d = m.distribution('imagenet-spot'); print(json.dumps([torch.__file__, "
                            "torch.__version__, d.read_text('direct_url.json')]))"],
                           env={"PATH": "/usr/bin:/bin"}, cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert probe.returncode == 0, probe.stderr
    torch_file, torch_version, direct_url = json.loads(probe.stdout)
    assert Path(torch_file).is_relative_to(ami) and torch_version == "2.9.0+cu999"
    assert json.loads(direct_url)["url"].endswith("/opt/imagenet-spot/dist/imagenet_spot-0.1.0-py3-none-any.whl")
    # pip was never asked to install torch: not in its plan, not in the project venv
    report = json.loads((root / "opt/imagenet-spot/pip-report.json").read_text())
    planned = {i["metadata"]["name"].lower() for i in report["install"]}
    assert "imagenet-spot" in planned and not planned & {"torch", "torchvision"}
    site = next((root / "opt/imagenet-spot/venv").glob("lib/python3*/site-packages"))
    assert not [p.name for p in site.iterdir() if p.name.split("-")[0] in ("torch", "torchvision")]
    assert (root / "opt/imagenet-spot/constraints.txt").read_text().split() == ["torch==2.9.0+cu999",
                                                                             "torchvision==0.24.0+cu999"]
    # and the loop trained on the GPUs
    torchrun = [json.loads(line) for line in (tmp_path / "torchrun.jsonl").read_text().splitlines()]
    assert len(torchrun) == 1 and "--nproc_per_node=4" in torchrun[0]
    assert torchrun[0][torchrun[0].index("--device") + 1] == "cuda"
    assert _names(tmp_path)[-1] == "systemctl --no-block poweroff"  # --on-done poweroff


def test_setup_that_always_fails_powers_off_with_the_reason(tmp_path):
    """Acceptance: every boot fails -> after the attempts, the status object, then poweroff."""
    root = tmp_path / "root"
    proc = subprocess.run(["bash", str(LAUNCH), *ARGS, "--project-pip", "s3://my-bucket/code/missing.whl",
                           "--user-data-out", str(tmp_path / "ud.sh"), "--dry-run"],
                          env=_base_env(tmp_path), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    with ImdsEmulator() as imds:
        env = _instance_env(tmp_path, imds)
        _first_boot(tmp_path / "ud.sh", env)
        results = [_boot(env, timeout=120) for _ in range(3)]  # SETUP_MAX_ATTEMPTS=3
    assert all(rc != 0 for rc, _ in results)
    names = _names(tmp_path)
    assert names.count("systemctl --no-block reboot") == 2
    assert names[-1] == "systemctl --no-block poweroff"
    status_cp = names.index("aws s3 cp")
    assert status_cp < len(names) - 1  # the status object is written before the poweroff
    status = json.loads((tmp_path / "s3/my-bucket/runs/r50/ec2-status/i-0123456789emulator.json").read_text())
    assert status["stage"] == "setup" and status["instance_id"] == "i-0123456789emulator"
    assert "cannot download s3://my-bucket/code/missing.whl" in status["reason"]
    assert "attempt 3" in status["reason"] and status["time"].endswith("Z")
    console = (root / "dev/console").read_text()
    assert "cannot download" in console and "powering off" in console
    assert not (tmp_path / "torchrun.jsonl").exists()


def _venv_seeing_ami(root: Path) -> None:
    """What a successful install leaves (a venv seeing the AMI env), for GPU-check tests."""
    ami = make_ami_env(root)
    venv = root / "opt/imagenet-spot/venv"
    subprocess.run([str(ami / "bin/python3"), "-m", "venv", "--without-pip", str(venv)], check=True, timeout=60)
    site = next(venv.glob("lib/python3*/site-packages"))
    (site / "ami.pth").write_text(str(next(ami.glob("lib/python3*/site-packages"))) + "\n")


@pytest.mark.parametrize("cuda", [False, True])
def test_listed_gpus_must_be_usable_and_are_trained_on(tmp_path, cuda):
    """Acceptance: nvidia-smi lists 4 GPUs while CUDA is unavailable -> setup fails and powers
    off; with 4 usable GPUs and --nproc 4, the loop passes --device cuda. The unit is ordered
    after the NVIDIA services the instance has."""
    root = tmp_path / "root"
    proc = subprocess.run(["bash", str(LAUNCH), *ARGS, "--project-git", "https://example.com/p.git",
                           "--user-data-out", str(tmp_path / "ud.sh"), "--dry-run"],
                          env=_base_env(tmp_path), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    _venv_seeing_ami(root)
    set_fake_cuda(root / "opt/pytorch", cuda=cuda, gpus=4)
    with ImdsEmulator() as imds:
        env = _instance_env(tmp_path, imds, SKIP_INSTALL=1, STANDIN_UNITS="nvidia-fabricmanager.service")
        unit = _first_boot(tmp_path / "ud.sh", env)
        rc, log = _boot(env, timeout=120)
    assert "After=network-online.target nvidia-fabricmanager.service" in unit
    assert "nvidia-persistenced" not in unit
    names = _names(tmp_path)
    if not cuda:
        assert rc != 0 and not (tmp_path / "torchrun.jsonl").exists()
        assert names[-1] == "systemctl --no-block poweroff" and "systemctl --no-block reboot" not in names
        status = json.loads((tmp_path / "s3/my-bucket/runs/r50/ec2-status/i-0123456789emulator.json").read_text())
        assert "GPU check failed" in status["reason"] and "4 GPUs" in status["reason"]
        assert "GPU check failed" in (root / "dev/console").read_text()
    else:
        assert rc == 0, log
        argv = json.loads((tmp_path / "torchrun.jsonl").read_text())
        assert "--nproc_per_node=4" in argv and argv[argv.index("--device") + 1] == "cuda"
        assert "--standalone" in argv
