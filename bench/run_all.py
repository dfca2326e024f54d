"""Run every benchmark with its default (CPU-sized) settings: ``python3.11 scripts/dev.py bench``."""
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent

for script in ("bench_build.py", "bench_loader.py", "bench_workers.py", "bench_decode.py", "bench_train.py"):
    print(f"==== {script}", flush=True)
    subprocess.run([sys.executable, str(HERE / script)], check=True)
