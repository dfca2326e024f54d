"""Bootstrap and run the project with nothing but Python >= 3.11 and pip.

    python3 scripts/dev.py demo     # end-to-end demo on the embedded demo data
    python3 scripts/dev.py test     # the whole test suite (what CI runs)
    python3 scripts/dev.py bench    # the benchmarks under bench/

On first use (and whenever pyproject.toml changes) it creates ./.venv and installs the
project with its test extras into it; later runs start at once. Extra arguments go to
the command (e.g. ``python3 scripts/dev.py test -k build``).
"""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import venv
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
VENV = REPO / ".venv"
PY = VENV / "bin" / "python"


def ensure_venv(extras: str) -> None:
    if sys.version_info < (3, 11):
        sys.exit(f"error: Python >= 3.11 is required, this is {sys.version.split()[0]}: run it with python3.11")
    stamp = VENV / ".installed"
    want = hashlib.sha256((REPO / "pyproject.toml").read_bytes() + extras.encode()).hexdigest()
    if stamp.exists() and stamp.read_text() == want and PY.exists():
        return
    if not PY.exists():
        print(f"creating {VENV} ...", flush=True)
        venv.EnvBuilder(with_pip=True).create(VENV)
    print(f"installing the project and [{extras}] into {VENV} (first run takes a few minutes) ...", flush=True)
    subprocess.run([str(PY), "-m", "pip", "install", "-q", "-e", f".[{extras}]"], cwd=REPO, check=True)
    stamp.write_text(want)


def main() -> int:
    commands = {
        "demo": ("test", [str(PY), "scripts/demo.py"]),
        "test": ("test", [str(PY), "-m", "pytest", "-q"]),
        "bench": ("test,bench", [str(PY), "bench/run_all.py"]),
    }
    if len(sys.argv) < 2 or sys.argv[1] not in commands:
        print(__doc__)
        return 2
    extras, cmd = commands[sys.argv[1]]
    ensure_venv(extras)
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.Popen(cmd + sys.argv[2:], cwd=REPO, env=env)
    try:
        return proc.wait()
    except KeyboardInterrupt:  # Ctrl-C reached the command too: let it clean up (the demo stops its S3 server)
        try:
            return proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            proc.kill()
            return proc.wait()


if __name__ == "__main__":
    sys.exit(main())
