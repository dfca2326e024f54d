"""Run-folder outputs written by rank 0: log file, metrics.jsonl, training_curves.png, config.json.

With an s3:// output they are written in the local staging folder and uploaded after
every epoch (they are small); on resume the previous metrics.jsonl is fetched first so
the history and the curves continue. Also: running top-k accuracy helpers.
"""
from __future__ import annotations

import json
import logging
from datetime import datetime
from pathlib import Path

import torch

from common import storage
from common.log import setup_logging


def topk_correct(logits: torch.Tensor, labels: torch.Tensor, ks=(1, 5)) -> list[int]:
    """Number of samples whose label is among the top-k logits, for each k. logits: [B, C]."""
    k_max = min(max(ks), logits.shape[1])
    top = logits.topk(k_max, dim=1).indices  # [B, k_max]
    hit = top.eq(labels[:, None])
    return [int(hit[:, :min(k, k_max)].any(dim=1).sum()) for k in ks]


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
