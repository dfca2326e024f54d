"""``python -m trainer.selfcheck`` in CPU mode (what CI runs): exits 0, every CPU row passes with
what it asserts, and every GPU row is reported as skipped; a failing part makes it exit 1."""
from __future__ import annotations

import re

from tests.conftest import run_cli
from trainer import selfcheck

GPU_ROWS = ("AMP bf16 steps", "AMP fp16 + GradScaler steps", "torch.compile step", "DDP over NCCL")
CPU_ROWS = ("shards (demo-tree + build)", "streaming loader", "decode img/s: cpu vs gpu path",
            "channels_last step (fp32)", "train img/s: synthetic vs loader")


def rows(table: str) -> dict[str, tuple[str, str]]:
    """part -> (result, detail) from the printed table."""
    out = {}
    for line in table.splitlines():
        m = re.match(r"^(.+?)\s{2,}(ok|FAIL|skipped)\s{2,}(.*)$", line)
        if m:
            out[m.group(1)] = (m.group(2), m.group(3))
    return out


def test_cpu_mode_passes_and_reports_skipped_gpu_parts():
    proc = run_cli("trainer.selfcheck", "--cpu", timeout=240)  # TimeoutExpired fails the test
    assert proc.returncode == 0, proc.stdout + proc.stderr
    table = rows(proc.stdout)
    for name in CPU_ROWS:
        assert table[name][0] == "ok", (name, proc.stdout)
    assert "exactly once" in table["streaming loader"][1]
    assert "same samples/labels/order" in table["decode img/s: cpu vs gpu path"][1]
    for prefix in GPU_ROWS:
        (name,) = [n for n in table if n.startswith(prefix)]
        assert table[name] == ("skipped", "no CUDA GPU (--cpu)")
        assert name in proc.stdout.split("skipped:", 1)[1]
    assert "selfcheck passed" in proc.stdout


def test_a_failing_part_is_a_fail_row_and_exit_1(monkeypatch, capsys):
    def broken(work, size):
        raise RuntimeError("shard_builder build exited 1: disk full")

    monkeypatch.setattr(selfcheck, "build_shards", broken)
    monkeypatch.setattr(selfcheck, "check_step", lambda *a, **k: "not run here")
    assert selfcheck.main(["--cpu"]) == 1
    table = rows(capsys.readouterr().out)
    assert table["shards (demo-tree + build)"][0] == "FAIL" and "disk full" in table["shards (demo-tree + build)"][1]
    assert table["streaming loader"] == ("skipped", "no shards (see the row above)")
