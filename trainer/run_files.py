"""Run-folder outputs: log file, metrics.jsonl, training_curves.png, config.json (rank 0),
the progress lines and bar (rank 0), the per-rank sample audit files (--sample-log).

With an s3:// output they are written in the local staging folder and uploaded after
every epoch (they are small); on resume the previous metrics.jsonl is fetched first so
the history and the curves continue.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path


from common import storage
from common.log import setup_logging


def local_dir_for(output: str, local_dir: str | None) -> str:
    """Where rank 0 writes the run's files: the output folder itself, or for an s3:// output
    ``local_dir`` (default: a temp folder named after the output, the same on every start)."""
    if not storage.is_s3(output):
        return str(Path(output).expanduser())
    if local_dir:
        return local_dir
    return str(Path(tempfile.gettempdir(), "imagenet-spot-" + hashlib.sha256(output.encode()).hexdigest()[:12]))


class RunFiles:
    def __init__(self, output: str, local_dir: str, is_main: bool):
        self.output, self.local, self.is_main = output, Path(local_dir), is_main
        self.remote = storage.is_s3(output)
        self.history: list[dict] = []
        self.log_path: Path | None = None

    def start(self, config_json: str, resume_epoch: int) -> logging.Logger:
        """Open the log (a new training_log_YYYYMMDD_HHMMSS.txt per start), load history."""
        if not self.is_main:
            return setup_logging("trainer", None, console_level=logging.WARNING)
        self.local.mkdir(parents=True, exist_ok=True)
        self.log_path = self.local / f"training_log_{datetime.now().strftime('%Y%m%d_%H%M%S')}.txt"
        logger = setup_logging("trainer", self.log_path)
        (self.local / "config.json").write_text(config_json + "\n")
        src = storage.join(self.output, "metrics.jsonl")
        try:
            lines = storage.read_bytes(src).decode().splitlines()
        except FileNotFoundError:
            lines = []
        self.history = [r for r in (json.loads(x) for x in lines if x.strip()) if r["epoch"] <= resume_epoch]
        self._write_history()
        self.sync()
        return logger

    def add_epoch(self, record: dict) -> None:
        if not self.is_main:
            return
        self.history = [r for r in self.history if r["epoch"] != record["epoch"]] + [record]
        self._write_history()
        self._plot()
        self.sync()

    def _write_history(self) -> None:
        (self.local / "metrics.jsonl").write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in self.history))

    def _plot(self) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import matplotlib.ticker

        ep = [r["epoch"] for r in self.history]
        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
        ax1.plot(ep, [r["train_loss"] for r in self.history], "o-", label="train loss")
        if all("val_loss" in r for r in self.history):
            ax1.plot(ep, [r["val_loss"] for r in self.history], "o-", label="val loss")
        ax1.set_xlabel("epoch"), ax1.set_ylabel("loss"), ax1.legend(), ax1.grid(alpha=0.3)
        ax2.plot(ep, [r["train_top1"] for r in self.history], "o-", label="train top-1")
        ax2.plot(ep, [r["val_top1"] for r in self.history], "o-", label="val top-1")
        ax2.plot(ep, [r["val_top5"] for r in self.history], "o-", label="val top-5")
        ax2.set_xlabel("epoch"), ax2.set_ylabel("accuracy (%)"), ax2.legend(), ax2.grid(alpha=0.3)
        for ax in (ax1, ax2):
            ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
        fig.tight_layout()
        fig.savefig(self.local / "training_curves.png", dpi=100)
        plt.close(fig)

    def sync(self) -> None:
        """Upload the small run files when the output is on S3."""
        if not (self.is_main and self.remote):
            return
        for name in ("config.json", "metrics.jsonl", "training_curves.png"):
            if (self.local / name).exists():
                storage.upload_file(self.local / name, storage.join(self.output, name))
        if self.log_path and self.log_path.exists():
            storage.upload_file(self.log_path, storage.join(self.output, self.log_path.name))


def sample_log(enabled: bool, local: Path, epoch: int, rank: int):
    """Append-mode audit file of the keys each rank trained on (a resumed run appends)."""
    if not enabled:
        return contextlib.nullcontext(None)
    path = Path(local, "samples", f"epoch{epoch + 1:03d}_rank{rank}.jsonl")
    path.parent.mkdir(parents=True, exist_ok=True)
    return open(path, "a", buffering=1)  # line-buffered: readable while training runs


class _Bar:
    def __init__(self, total: int, initial: int, desc: str, global_batch: int):
        from tqdm import tqdm

        self.bar = tqdm(total=total, initial=initial, desc=desc, unit="step", dynamic_ncols=True, leave=False)
        self.t0, self.n0, self.global_batch = time.perf_counter(), initial, global_batch

    def update(self, s, loss: float, top1: float, lr: float) -> None:
        self.bar.update(s.step_in_epoch - self.bar.n)
        rate = (s.step_in_epoch - self.n0) * self.global_batch / max(1e-9, time.perf_counter() - self.t0)
        self.bar.set_postfix_str(f"loss {loss:.3f} acc {top1:.1f}% {rate:.0f} img/s lr {lr:.3g}")

    def close(self) -> None:
        self.bar.close()


def progress(is_main: bool, logger, s, steps: int, global_batch: int):
    """(report, bar): rank 0's report every --log-every-steps steps (a log line, and a tqdm bar
    when attached to a terminal); (None, None) on the other ranks, which then read nothing.
    ``s`` is the StepState the epoch starts at."""
    if not is_main:
        return None, None
    bar = _Bar(steps, s.step_in_epoch, f"epoch {s.epoch + 1}", global_batch) if sys.stderr.isatty() else None

    def report(st, loss: float, top1: float, lr: float) -> None:
        logger.info(f"epoch {st.epoch + 1} step {st.step_in_epoch}/{steps}: loss {loss:.4f} top-1 {top1:.2f}% "
                    f"(rank 0, running) lr {lr:.4g}")
        if bar:
            bar.update(st, loss, top1, lr)

    return report, bar
