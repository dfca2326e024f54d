"""Bad input to ``build``: one-line error naming the problem, non-zero exit, no manifest."""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from common import manifest as mf
from tests.conftest import run_cli


def build(*args: str, env: dict | None = None):
    return run_cli("shard_builder", "build", "--no-progress", "--workers", "1", *args, env=env)


def one_line_error(proc, *fragments: str, code: int = 2) -> str:
    assert proc.returncode == code, proc.stdout + proc.stderr
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    for frag in fragments:
        assert frag in lines[0], lines[0]
    return lines[0]


def test_missing_source(tmp_path):
    one_line_error(build("--source", str(tmp_path / "nope"), "--output", str(tmp_path / "o")), "does not exist")


def test_source_not_a_kaggle_tree(tmp_path):
    (tmp_path / "src").mkdir()
    one_line_error(build("--source", str(tmp_path / "src"), "--output", str(tmp_path / "o")),
                   "LOC_synset_mapping.txt")


def test_source_missing_val_solution(demo_tree, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(demo_tree.root, src)
    (src / "LOC_val_solution.csv").unlink()
    one_line_error(build("--source", str(src), "--output", str(tmp_path / "o")), "LOC_val_solution.csv")
    # train alone does not need it
    proc = build("--source", str(src), "--output", str(tmp_path / "o"), "--splits", "train")
    assert proc.returncode == 0, proc.stderr


def test_not_a_zip(tmp_path):
    bad = tmp_path / "x.zip"
    bad.write_bytes(b"not a zip")
    one_line_error(build("--source", str(bad), "--output", str(tmp_path / "o")), "not a readable zip")


@pytest.mark.parametrize("pct", ["0", "150", "-5"])
def test_percentage_out_of_range(demo_tree, tmp_path, pct):
    one_line_error(build("--source", str(demo_tree.root), "--output", str(tmp_path / "o"),
                         f"--subset-percentage={pct}"), "(0, 100]")


def test_classes_file_with_unknown_wnid(demo_tree, tmp_path):
    f = tmp_path / "classes.txt"
    f.write_text(f"{demo_tree.wnids[0]}\nn99999999\n")
    one_line_error(build("--source", str(demo_tree.root), "--output", str(tmp_path / "o"), "--classes-file", str(f)),
                   "n99999999", "not in the source")


def test_output_not_writable(demo_tree, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    one_line_error(build("--source", str(demo_tree.root), "--output", str(blocker / "out")), "not writable")


def test_missing_bucket(demo_tree, s3_server):
    one_line_error(build("--source", str(demo_tree.root), "--output", "s3://no-such-bucket-here/x"),
                   "does not exist")


def test_no_aws_credentials(demo_tree, s3_bucket, tmp_path):
    proc = run_cli("shard_builder", "build", "--no-progress", "--source", str(demo_tree.root),
                   "--output", f"{s3_bucket}/x",
                   env={"AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "none"), "AWS_CONFIG_FILE": str(tmp_path / "none"),
                        "AWS_EC2_METADATA_DISABLED": "true"},
                   unset=("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_PROFILE", "AWS_SESSION_TOKEN"))
    one_line_error(proc, "no AWS credentials")


def test_different_arguments_need_overwrite(demo_tree, tmp_path):
    out = str(tmp_path / "o")
    assert build("--source", str(demo_tree.root), "--output", out, "--splits", "val").returncode == 0
    one_line_error(build("--source", str(demo_tree.root), "--output", out, "--splits", "val", "--seed", "5",
                         "--subset-percentage", "50"), "different arguments", "--overwrite")
    proc = build("--source", str(demo_tree.root), "--output", out, "--splits", "val", "--seed", "5",
                 "--subset-percentage", "50", "--overwrite")
    assert proc.returncode == 0, proc.stderr
    assert mf.load(out).build_args["seed"] == 5


def _mount_tmpfs(path: Path, size: str) -> bool:
    path.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True)
    return r.returncode == 0


def test_disk_full_midway_leaves_no_manifest_and_rerun_resumes(demo_tree, tmp_path):
    small = tmp_path / "small"
    if not _mount_tmpfs(small, "600k"):
        pytest.skip("needs root to mount a small tmpfs")  # CI runs as root; see README
    try:
        out = small / "shards"
        proc = build("--source", str(demo_tree.root), "--output", str(out), "--shard-max-count", "8")
        one_line_error(proc, "no space left", "rerun", code=1)
        assert not (out / "manifest.json").exists()
        assert not list(out.rglob(".*.tmp"))
        finished = len(list(out.glob("*/*.idx.json")))
        assert finished > 0
        subprocess.run(["mount", "-o", "remount,size=20m", str(small)], check=True)
        proc = build("--source", str(demo_tree.root), "--output", str(out), "--shard-max-count", "8")
        assert proc.returncode == 0, proc.stderr
        assert f"{finished} kept" in proc.stderr
        from shard_builder.verify import verify
        assert verify(str(out)) == []
    finally:
        subprocess.run(["umount", "-l", str(small)])
