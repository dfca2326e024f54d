"""Recording stand-ins for what an EC2 instance and the launching machine call (aws, nvidia-smi,
systemctl, poweroff, reboot), a stand-in Deep Learning AMI PyTorch env (a venv holding a fake
``torch``), and an offline wheelhouse, for tests/test_ec2_*.py and tests/test_launcher.py.

    bindir = install_standins(tmp_path / "bin")      # then PATH=bindir:..., env from standin_env()
    calls(tmp_path)                                  # [{"cmd": "aws", "args": [...]}, ...]

Every call is appended to $STANDIN_LOG as one JSON line. ``aws s3 cp`` maps s3://bucket/key to
$STANDIN_S3/bucket/key (``-`` reads stdin); ``aws ec2 run-instances`` records the gunzipped user
data and prints ``i-N sir-N 10.0.0.N`` lines; a call whose joined arguments contain
$STANDIN_AWS_FAIL fails. nvidia-smi lists $STANDIN_GPUS GPUs. systemctl prints $STANDIN_UNITS
for list-unit-files.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import zipfile
from pathlib import Path

STANDIN = r'''
import gzip, json, os, sys
from pathlib import Path

name, args = os.path.basename(sys.argv[0]), sys.argv[1:]
rec = {"cmd": name, "args": args}


def record(**extra):
    rec.update(extra)
    with open(os.environ["STANDIN_LOG"], "a") as f:
        f.write(json.dumps(rec) + "\n")


def local(url):
    return Path(os.environ["STANDIN_S3"]) / url[5:] if url.startswith("s3://") else Path(url)


if name == "aws":
    fail = os.environ.get("STANDIN_AWS_FAIL", "")
    if fail and fail in " ".join(args):
        record(failed=True)
        print("An error occurred (InsufficientInstanceCapacity): stand-in failure", file=sys.stderr)
        sys.exit(255)
    if args[:2] == ["s3", "cp"]:
        src, dst = [a for a in args[2:] if not a.startswith("--")]
        if src == "-":
            data = sys.stdin.buffer.read()
        elif local(src).is_file():
            data = local(src).read_bytes()
        else:
            record(failed=True)
            print(f"fatal error: An error occurred (404) when calling the HeadObject operation: {src}", file=sys.stderr)
            sys.exit(1)
        target = local(dst) / src.rsplit("/", 1)[-1] if dst.endswith("/") else local(dst)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
        record(body=data.decode(errors="replace") if src == "-" else None)
    elif "run-instances" in args:
        ud = next(a for a in args if a.startswith("fileb://"))
        record(user_data=gzip.decompress(Path(ud[8:]).read_bytes()).decode())
        counter = Path(os.environ["STANDIN_LOG"] + ".ids")
        start = int(counter.read_text()) if counter.exists() else 0
        n = int(args[args.index("--count") + 1])
        counter.write_text(str(start + n))
        for i in range(start, start + n):
            print(f"i-{i:04d}\tsir-{i:04d}\t10.0.0.{i + 10}")
    elif "describe-images" in args:
        record()
        print("/dev/sda1")
    else:
        record()
elif name == "nvidia-smi":
    record()
    for i in range(int(os.environ.get("STANDIN_GPUS", "0"))):
        print(f"GPU {i}: NVIDIA A10G (UUID: GPU-standin-{i})")
else:  # systemctl, poweroff, reboot
    record()
    if name == "systemctl" and args[:1] == ["list-unit-files"]:
        for unit in os.environ.get("STANDIN_UNITS", "").split():
            if unit in args:
                print(f"{unit} enabled enabled")
'''


def install_standins(bindir: Path) -> Path:
    """Write the stand-ins into ``bindir`` (put it first on PATH)."""
    bindir.mkdir(parents=True, exist_ok=True)
    body = f"#!{sys.executable}\n{STANDIN}"
    for name in ("aws", "nvidia-smi", "systemctl", "poweroff", "reboot"):
        (bindir / name).write_text(body)
        (bindir / name).chmod(0o755)
    return bindir


def standin_env(tmp_path: Path, bindir: Path, **extra) -> dict:
    """Stand-in settings for a test's environment: the call log, the S3 folder, PATH."""
    (tmp_path / "s3").mkdir(exist_ok=True)
    env = {"STANDIN_LOG": str(tmp_path / "calls.jsonl"), "STANDIN_S3": str(tmp_path / "s3"),
           "PATH": f"{bindir}:{os.environ['PATH']}"}
    env.update({k: str(v) for k, v in extra.items()})
    return env


def calls(tmp_path: Path, cmd: str | None = None) -> list[dict]:
    log = tmp_path / "calls.jsonl"
    recs = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    return [r for r in recs if cmd is None or r["cmd"] == cmd]


FAKE_TORCH = '''
__version__ = "{version}"
class cuda:
    @staticmethod
    def is_available():
        return {cuda}
    @staticmethod
    def device_count():
        return {count}
'''
FAKE_TORCHRUN = '''
import json, os, sys
with open(os.environ["FAKE_TORCHRUN_LOG"], "a") as f:
    f.write(json.dumps(sys.argv[1:]) + "\\n")
sys.exit(int(os.environ.get("FAKE_TORCHRUN_EXIT", "0")))
'''


def make_ami_env(root: Path, version: str = "2.9.0+cu999", cuda: bool = True, gpus: int = 4) -> Path:
    """A stand-in DLAMI PyTorch env at ROOT/opt/pytorch: a venv (no pip) holding a fake torch and
    torchvision (with dist-info, so pip sees them installed); torch.distributed.run records its argv."""
    env = root / "opt" / "pytorch"
    import venv
    venv.EnvBuilder(with_pip=False, symlinks=True).create(env)
    site = next(env.glob("lib/python3*/site-packages"))
    set_fake_cuda(env, version, cuda, gpus)
    (site / "torch" / "distributed").mkdir(parents=True)
    (site / "torch" / "distributed" / "__init__.py").write_text("")
    (site / "torch" / "distributed" / "run.py").write_text(FAKE_TORCHRUN)
    (site / "torchvision").mkdir()
    (site / "torchvision" / "__init__.py").write_text("")
    for name, ver in (("torch", version), ("torchvision", "0.24.0+cu999")):
        info = site / f"{name}-{ver.split('+')[0]}.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {ver}\n")
        (info / "INSTALLER").write_text("pip\n")
        (info / "RECORD").write_text("")
    return env


def set_fake_cuda(env: Path, version: str = "2.9.0+cu999", cuda: bool = True, gpus: int = 4) -> None:
    site = next(env.glob("lib/python3*/site-packages"))
    (site / "torch").mkdir(exist_ok=True)
    (site / "torch" / "__init__.py").write_text(
        textwrap.dedent(FAKE_TORCH.format(version=version, cuda=cuda, count=gpus if cuda else 0)))


# Versions inside the project's ranges (pyproject.toml); torch is offered too, as a trap.
STUBS = {"torch": "2.50.0", "torchvision": "0.99.0", "webdataset": "1.0.0", "boto3": "1.99.0",
         "tqdm": "4.99.0", "kaggle": "2.0.0", "pillow": "10.0.0", "simplejpeg": "1.8.0",
         "numpy": "2.0.0", "matplotlib": "3.9.0"}


def make_wheelhouse(folder: Path) -> Path:
    """Empty wheels for the project's dependencies, so pip resolves offline (PIP_NO_INDEX)."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, version in STUBS.items():
        info = f"{name}-{version}.dist-info"
        with zipfile.ZipFile(folder / f"{name}-{version}-py3-none-any.whl", "w") as z:
            z.writestr(f"{info}/METADATA", f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
            z.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
            z.writestr(f"{info}/RECORD", "")
    return folder


def sigterm_when_started(proc: subprocess.Popen, started: Path, what: str, start_s: float = 90,
                         end_s: float = 60) -> str:
    """Wait (bounded) until ``started`` exists, SIGTERM the restart loop ``proc`` as systemd
    would, and return its output; the loop is killed whatever happens."""
    try:
        deadline = time.monotonic() + start_s
        while not started.exists():
            assert time.monotonic() < deadline and proc.poll() is None, f"{what} did not start"
            time.sleep(0.1)
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=end_s)
    finally:
        proc.kill()
        proc.wait()
    return out
