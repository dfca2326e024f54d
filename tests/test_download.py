"""`download` checks credentials itself, refuses unsafe kaggle.json, and never leaks the key.

    python -m pytest -q tests/test_download.py

No network: every subprocess gets HOME and KAGGLE_CONFIG_DIR in a temp folder and all proxy
variables pointed at a closed port, so a real request fails at once.
"""
from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from common.errors import UserError
from shard_builder.download import Credentials, extract, find_credentials, scrub

REPO = Path(__file__).resolve().parents[1]
KEY = "abcdef0123456789abcdef0123456789"
USER = "demo-user"
DEAD_PROXY = "http://127.0.0.1:9"


@pytest.fixture
def dirs(tmp_path):
    home, cfg = tmp_path / "home", tmp_path / "cfg"
    home.mkdir()
    cfg.mkdir()
    return home, cfg


def download(home: Path, cfg: Path | None, *extra: str, env: dict | None = None) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if not k.startswith("KAGGLE_") and "proxy" not in k.lower()}
    base.update(HOME=str(home), PYTHONPATH=str(REPO), XDG_CONFIG_HOME=str(home / ".config"),
                HTTPS_PROXY=DEAD_PROXY, HTTP_PROXY=DEAD_PROXY, https_proxy=DEAD_PROXY, http_proxy=DEAD_PROXY,
                ALL_PROXY=DEAD_PROXY, NO_PROXY="", no_proxy="")
    if cfg is not None:
        base["KAGGLE_CONFIG_DIR"] = str(cfg)
    base.update(env or {})
    dest = home / "downloads"
    return subprocess.run([sys.executable, "-m", "shard_builder", "download", "--dest", str(dest), *extra],
                          cwd=REPO, env=base, capture_output=True, text=True, timeout=60)


def write_json(folder: Path, content: str, mode: int = 0o600) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "kaggle.json"
    path.write_text(content)
    path.chmod(mode)
    return path


def assert_no_key(proc: subprocess.CompletedProcess) -> None:
    basic = base64.b64encode(f"{USER}:{KEY}".encode()).decode()
    for stream in (proc.stdout, proc.stderr):
        assert KEY not in stream and basic not in stream


def test_missing_credentials_says_how_to_provide_them(dirs):
    proc = download(*dirs)
    assert proc.returncode == 2, proc.stderr
    err = proc.stderr
    assert err.startswith("error: ") and len(err.strip().splitlines()) == 1
    for hint in ("KAGGLE_USERNAME", "KAGGLE_KEY", "kaggle.json", "chmod 600", "rules"):
        assert hint in err, hint


def test_only_one_env_var_is_an_error(dirs):
    proc = download(*dirs, env={"KAGGLE_USERNAME": USER})
    assert proc.returncode == 2 and "KAGGLE_KEY" in proc.stderr


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604])
def test_kaggle_json_readable_by_others_is_refused(dirs, mode):
    home, cfg = dirs
    path = write_json(cfg, json.dumps({"username": USER, "key": KEY}), mode)
    proc = download(home, cfg)
    assert proc.returncode == 2, proc.stderr
    assert f"chmod 600 {path}" in proc.stderr
    assert_no_key(proc)


def test_home_kaggle_json_is_used_without_config_dir(dirs):
    home, _ = dirs
    path = write_json(home / ".kaggle", json.dumps({"username": USER, "key": KEY}), 0o644)
    proc = download(home, None)
    assert proc.returncode == 2 and f"chmod 600 {path}" in proc.stderr
    assert_no_key(proc)


@pytest.mark.parametrize("content", [
    "not json at all " + KEY,
    json.dumps([USER, KEY]),
    json.dumps({"username": USER}),
    json.dumps({"key": KEY}),
    json.dumps({"username": "", "key": KEY}),
    json.dumps({"username": USER, "key": 12345}),
])
def test_malformed_kaggle_json_exits_2(dirs, content):
    home, cfg = dirs
    path = write_json(cfg, content)
    proc = download(home, cfg)
    assert proc.returncode == 2, proc.stderr
    assert str(path) in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert_no_key(proc)


@pytest.mark.parametrize("source", ["env", "file"])
def test_network_failure_is_one_line_without_the_key(dirs, source):
    home, cfg = dirs
    env = {"VERBOSE": "true"}  # the kaggle package's verbose mode would print auth headers
    if source == "env":
        env.update(KAGGLE_USERNAME=USER, KAGGLE_KEY=KEY)
    else:
        write_json(cfg, json.dumps({"username": USER, "key": KEY}))
    proc = download(home, cfg, env=env)
    assert proc.returncode == 1, (proc.stdout, proc.stderr)
    assert "could not download from Kaggle" in proc.stderr
    assert_no_key(proc)
    assert not list((home / "downloads").glob("*.zip"))


def test_find_credentials_prefers_env_then_config_dir(tmp_path):
    home = tmp_path / "home"
    write_json(tmp_path / "cfg", json.dumps({"username": "fileuser", "key": "filekey"}))
    env_creds = find_credentials({"KAGGLE_USERNAME": "u", "KAGGLE_KEY": "k"}, home=home)
    assert (env_creds.username, env_creds.key) == ("u", "k")
    file_creds = find_credentials({"KAGGLE_CONFIG_DIR": str(tmp_path / "cfg")}, home=home)
    assert (file_creds.username, file_creds.key) == ("fileuser", "filekey")
    assert "filekey" not in repr(file_creds)
    with pytest.raises(UserError) as exc:
        find_credentials({}, home=home)
    assert exc.value.exit_code == 2 and str(home / ".kaggle" / "kaggle.json") in str(exc.value)


def test_scrub_removes_key_and_basic_auth():
    creds = Credentials(USER, KEY, "test")
    basic = base64.b64encode(f"{USER}:{KEY}".encode()).decode()
    text = scrub(f"failed with key={KEY} header=Basic {basic}", creds)
    assert KEY not in text and basic not in text and "***" in text


def test_extract_writes_resumes_and_refuses_unsafe_paths(tmp_path):
    good = tmp_path / "good.zip"
    with zipfile.ZipFile(good, "w") as zf:
        zf.writestr("LOC_synset_mapping.txt", "n01440764 tench, Tinca tinca\n")
        zf.writestr("ILSVRC/Data/CLS-LOC/val/ILSVRC2012_val_00000001.JPEG", b"\xff\xd8fake")
    out = tmp_path / "out"
    out.mkdir()
    assert extract(good, out) == 2
    assert (out / "LOC_synset_mapping.txt").read_text().startswith("n01440764")
    assert extract(good, out) == 0  # already there: nothing rewritten
    evil = tmp_path / "evil.zip"
    with zipfile.ZipFile(evil, "w") as zf:
        zf.writestr("../escaped.txt", "x")
    with pytest.raises(UserError, match="unsafe"):
        extract(evil, out)
    assert not (tmp_path / "escaped.txt").exists()
    broken = tmp_path / "broken.zip"
    broken.write_bytes(good.read_bytes()[:40])
    with pytest.raises(UserError, match="rerun the download"):
        extract(broken, out)
