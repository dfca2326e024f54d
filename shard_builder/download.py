"""Download the ILSVRC competition files from Kaggle (one ~160 GB zip).

    python -m shard_builder download --dest DIR [--competition imagenet-object-localization-challenge] [--unzip]

Why a wrapper around the ``kaggle`` package: its import authenticates (and can print help
or exit), it falls back to other credential sources silently, and its errors and verbose
mode can carry the API key. Here we find and check the credentials ourselves first
(KAGGLE_USERNAME + KAGGLE_KEY, else kaggle.json in $KAGGLE_CONFIG_DIR or ~/.kaggle),
refuse a kaggle.json other users can read, import the API lazily, hand it exactly those
credentials, and turn every failure into a one-line message with the key scrubbed out.

The zip is kept as is by default: the builder reads it in place. Rerunning resumes or
skips a finished download. ``--unzip`` extracts it into DEST as well (it keeps the zip).
"""
from __future__ import annotations

import argparse
import base64
import contextlib
import io
import json
import os
import shutil
import sys
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

from common.errors import UserError

DEFAULT_COMPETITION = "imagenet-object-localization-challenge"
APPROX_ZIP_BYTES = 170 * 10**9  # the download is ~155-165 GB; JPEGs do not compress
HOW_TO_CREDENTIALS = (
    "create an API token at https://www.kaggle.com/settings (API > Create New Token) and either "
    "export KAGGLE_USERNAME and KAGGLE_KEY, or save the downloaded kaggle.json as ~/.kaggle/kaggle.json "
    "(or in $KAGGLE_CONFIG_DIR) and run chmod 600 on it; also accept the competition rules at "
    f"https://www.kaggle.com/competitions/{DEFAULT_COMPETITION}/rules with the same account"
)


@dataclass(frozen=True)
class Credentials:
    """A Kaggle username and API key; ``repr`` never shows the key."""

    username: str
    key: str = field(repr=False)
    source: str = ""


def find_credentials(environ: dict | None = None, home: Path | None = None) -> Credentials:
    """Credentials from KAGGLE_USERNAME + KAGGLE_KEY, else from kaggle.json; UserError if unusable."""
    env = os.environ if environ is None else environ
    user, key = env.get("KAGGLE_USERNAME", ""), env.get("KAGGLE_KEY", "")
    if user and key:
        return Credentials(user, key, "the KAGGLE_USERNAME/KAGGLE_KEY environment variables")
    if user or key:
        missing = "KAGGLE_KEY" if user else "KAGGLE_USERNAME"
        raise UserError(f"{missing} is not set (set both KAGGLE_USERNAME and KAGGLE_KEY, or unset both "
                        "and use kaggle.json)")
    if env.get("KAGGLE_CONFIG_DIR"):
        path = Path(env["KAGGLE_CONFIG_DIR"]).expanduser() / "kaggle.json"
    else:
        path = (home or Path.home()) / ".kaggle" / "kaggle.json"
    if not path.is_file():
        raise UserError(f"no Kaggle credentials: KAGGLE_USERNAME/KAGGLE_KEY are not set and {path} does not "
                        f"exist; {HOW_TO_CREDENTIALS}")
    if os.name == "posix" and path.stat().st_mode & 0o077:
        raise UserError(f"{path} can be read by other users, so it is not used; run: chmod 600 {path}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        # the message of a JSON error names only a position, never the file's content
        raise UserError(f"{path} is not valid JSON ({type(exc).__name__} at {getattr(exc, 'pos', '?')}); "
                        "download a fresh kaggle.json from https://www.kaggle.com/settings") from None
    if not (isinstance(data, dict) and all(isinstance(data.get(k), str) and data[k].strip()
                                           for k in ("username", "key"))):
        raise UserError(f'{path} must be a JSON object with non-empty "username" and "key" strings; '
                        "download a fresh kaggle.json from https://www.kaggle.com/settings")
    return Credentials(data["username"].strip(), data["key"].strip(), str(path))


def scrub(text: str, creds: Credentials) -> str:
    """``text`` with the key, and the HTTP Basic form of user:key, replaced by ***."""
    basic = base64.b64encode(f"{creds.username}:{creds.key}".encode()).decode()
    for secret in (basic, creds.key):
        text = text.replace(secret, "***")
    return text


def _make_api(creds: Credentials):
    """A KaggleApi that uses exactly ``creds``: no token/OAuth fallback, no verbose header dumps."""
    os.environ.pop("KAGGLE_API_TOKEN", None)  # would take precedence over the key we checked
    sink = io.StringIO()
    try:  # importing the package authenticates at import time and may print help or exit
        with contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
            from kaggle.api.kaggle_api_extended import KaggleApi
    except ImportError:
        raise UserError("the kaggle package is not installed; run: pip install 'kaggle>=1.6'") from None
    except (Exception, SystemExit) as exc:  # noqa: BLE001 - the package's own start-up failed
        raise UserError(f"the kaggle package failed to start: {scrub(str(exc), creds)[:300]}", 1) from None
    api = KaggleApi()
    api.args = []  # never --verbose: it prints request headers, i.e. the credentials
    api.config_values = {"username": creds.username, "key": creds.key, "auth_method": "LEGACY_API_KEY"}
    api._authenticated = True  # noqa: SLF001 - we did the checks authenticate() would do
    return api


def _failure(exc: BaseException, creds: Credentials, competition: str) -> UserError:
    """A one-line, key-free UserError for an exception raised while talking to Kaggle."""
    status = getattr(getattr(exc, "response", None), "status_code", None)
    if status == 401:
        return UserError(f"Kaggle rejected the credentials from {creds.source} (HTTP 401); {HOW_TO_CREDENTIALS}")
    if status == 403:
        return UserError(f"Kaggle refused access to {competition} (HTTP 403): accept the rules at "
                         f"https://www.kaggle.com/competitions/{competition}/rules while logged in as "
                         f"{creds.username}, then rerun")
    if status == 404:
        return UserError(f"competition {competition!r} not found on Kaggle (HTTP 404); check --competition")
    reason = " ".join(scrub(f"{type(exc).__name__}: {exc}", creds).split())
    if len(reason) > 400:
        reason = reason[:400] + "..."
    return UserError(f"could not download from Kaggle: {reason} (check the network, then rerun: the download "
                     "resumes)", exit_code=1)


def _free_space_warning(dest: Path, needed: int) -> None:
    free = shutil.disk_usage(dest).free
    if free < needed:
        print(f"warning: {dest} has {free / 1e9:.0f} GB free, about {needed / 1e9:.0f} GB more may be needed",
              file=sys.stderr)


def extract(zip_path: Path, dest: Path) -> int:
    """Extract ``zip_path`` into ``dest``; skips members already there with the right size (resume).

    Refuses members that would land outside ``dest``. Returns the number of files written.
    """
    root = dest.resolve()
    written = 0
    try:
        with zipfile.ZipFile(zip_path) as zf:
            for info in zf.infolist():
                target = (root / info.filename).resolve()
                if target != root and root not in target.parents:
                    raise UserError(f"{zip_path} holds an unsafe path {info.filename!r}; not extracting it")
                if info.is_dir():
                    target.mkdir(parents=True, exist_ok=True)
                    continue
                if target.is_file() and target.stat().st_size == info.file_size:
                    continue
                target.parent.mkdir(parents=True, exist_ok=True)
                partial = target.with_name(target.name + ".partial")
                with zf.open(info) as src, open(partial, "wb") as out:
                    shutil.copyfileobj(src, out, 1 << 20)
                partial.replace(target)
                written += 1
    except zipfile.BadZipFile as exc:
        raise UserError(f"{zip_path} is not a complete zip ({exc}); rerun the download to resume it") from None
    return written


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "download", help="download the ILSVRC zip from Kaggle (needs a Kaggle API token)",
        description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--dest", type=Path, required=True, help="folder to download into (created if missing)")
    p.add_argument("--competition", default=DEFAULT_COMPETITION, help="Kaggle competition slug")
    p.add_argument("--unzip", action="store_true",
                   help="also extract the zip into DEST (needs ~160 GB more; the builder does not need this)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    creds = find_credentials()
    dest: Path = args.dest.expanduser()
    if dest.exists() and not dest.is_dir():
        raise UserError(f"--dest {dest} is a file; give a folder")
    try:
        dest.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"cannot create --dest {dest}: {exc.strerror}; pick a writable folder") from None
    competition = args.competition
    zip_path = dest / f"{competition}.zip"
    have = zip_path.stat().st_size if zip_path.is_file() else 0
    _free_space_warning(dest, max(APPROX_ZIP_BYTES - have, 0) + (APPROX_ZIP_BYTES if args.unzip else 0))
    print(f"downloading {competition} into {dest} with the credentials from {creds.source} "
          "(rerun the same command to resume)", flush=True)
    api = _make_api(creds)
    try:
        api.competition_download_files(competition, path=str(dest), quiet=False)
    except KeyboardInterrupt:
        raise
    except (Exception, SystemExit) as exc:  # noqa: BLE001 - anything from the API becomes one scrubbed line
        raise _failure(exc, creds, competition) from None
    if not zip_path.is_file():
        found = sorted(dest.glob(f"{competition}.*"))
        if not found:
            raise UserError(f"Kaggle reported success but no {competition}.* file is in {dest}; rerun", 1)
        zip_path = found[0]
    print(f"downloaded: {zip_path} ({zip_path.stat().st_size / 1e9:.1f} GB)")
    source = zip_path
    if args.unzip:
        print(f"extracting {zip_path} into {dest} ...", flush=True)
        count = extract(zip_path, dest)
        print(f"extracted {count} files into {dest}; the zip is kept (delete it to free space)")
        source = dest
    print(f"next: python -m shard_builder build --source {source} --output <shard folder or s3://bucket/prefix>")
    return 0
