"""Stop training cleanly when the machine is about to go away: SIGTERM/SIGINT or an EC2 spot
interruption notice, with every DDP rank stopping at the same optimizer step.

How the training loop uses it (one watcher per process; only one process per *instance*
polls the instance metadata service, i.e. local rank 0, so each node of a multi-node job
watches its own notice)::

    from trainer.distributed import any_rank
    from trainer.spot import EXIT_INTERRUPTED, InterruptWatcher, report_exit

    watcher = InterruptWatcher(poll_imds=None if local_rank == 0 else False,
                               poll_interval_s=cfg.imds_poll_seconds).start()
    try:
        for step in ...:
            train_step()
            if any_rank([watcher.requested()], device)[0]:   # one tiny all_reduce per step
                save_and_upload_checkpoint()               # must finish within ~60 s
                dist.barrier()                             # nobody exits before the upload is done
                report_exit(EXIT_INTERRUPTED, watcher.reason)   # on every rank (every node)
                sys.exit(EXIT_INTERRUPTED)
    finally:
        watcher.stop()

Exit codes (the restart loop in ``scripts/ec2/train-loop.sh`` relies on them):

* :data:`EXIT_COMPLETED` (0): training finished; do not rerun.
* :data:`EXIT_INTERRUPTED` (75, EX_TEMPFAIL): stopped on purpose, checkpoint saved and
  uploaded; rerun with ``--resume auto`` to continue from the exact step.

torchrun turns any non-zero worker exit into its own exit code 1, so the code alone does
not survive torchrun. :func:`report_exit` therefore also writes the code to the file named
by ``IMAGENET_EXIT_STATUS_FILE`` (set by the restart loop), which the loop reads back.
torchrun also sends SIGTERM to the remaining workers as soon as one exits non-zero, and
SIGKILL 30 s later, hence the barrier before exiting.

EC2 detection never slows start-up: it reads environment variables and two small local
files; any network access happens only in the background polling thread.
"""
from __future__ import annotations

import json
import logging
import os
import signal
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Mapping

from common.errors import EXIT_COMPLETED, EXIT_INTERRUPTED  # noqa: F401 - re-exported; one home: common.errors
from common.host import read_small

log = logging.getLogger(__name__)


EXIT_STATUS_ENV = "IMAGENET_EXIT_STATUS_FILE"
DEFAULT_IMDS = "http://169.254.169.254"
DEFAULT_IMDS_IPV6 = "http://[fd00:ec2::254]"
TOKEN_TTL_S = 21600
ACTION_PATH = "/latest/meta-data/spot/instance-action"
REBALANCE_PATH = "/latest/meta-data/events/recommendations/rebalance"
TOKEN_PATH = "/latest/api/token"


# --------------------------------------------------------------------------- detection
def _env_true(value: str | None) -> bool:
    return (value or "").strip().lower() in {"1", "true", "yes", "on"}


def imds_endpoint(environ: Mapping[str, str] | None = None) -> str:
    """The metadata service base URL, as the AWS SDKs choose it (no trailing slash)."""
    env = os.environ if environ is None else environ
    explicit = env.get("AWS_EC2_METADATA_SERVICE_ENDPOINT", "").strip()
    if explicit:
        return explicit.rstrip("/")
    if env.get("AWS_EC2_METADATA_SERVICE_ENDPOINT_MODE", "").strip().lower() == "ipv6":
        return DEFAULT_IMDS_IPV6
    return DEFAULT_IMDS


def looks_like_ec2(environ: Mapping[str, str] | None = None, sysfs: str | os.PathLike = "/sys") -> bool:
    """True when IMDS polling is worth doing: cheap, local checks only (no network).

    Off when ``AWS_EC2_METADATA_DISABLED=true`` (the SDKs' own switch). On when
    ``AWS_EC2_METADATA_SERVICE_ENDPOINT`` is set, or when the firmware says EC2: the DMI
    board/system vendor "Amazon EC2" (Nitro) or a Xen hypervisor UUID starting "ec2".
    """
    env = os.environ if environ is None else environ
    if _env_true(env.get("AWS_EC2_METADATA_DISABLED")):
        return False
    if env.get("AWS_EC2_METADATA_SERVICE_ENDPOINT", "").strip():
        return True
    root = Path(sysfs)
    for name in ("devices/virtual/dmi/id/board_vendor", "devices/virtual/dmi/id/sys_vendor"):
        if "amazon ec2" in read_small(root / name).lower():
            return True
    return read_small(root / "hypervisor/uuid").lower().startswith("ec2")


# --------------------------------------------------------------------------- the watcher
class InterruptWatcher:
    """Sets a sticky "please stop" flag on SIGTERM, SIGINT or a spot interruption notice.

    ``poll_imds``: None = poll the metadata service if :func:`looks_like_ec2` (default),
    True = poll ``endpoint`` (or the standard one) regardless, False = never poll.
    Signal handlers are installed only from the main thread and only set attributes (no
    I/O, no locks), so they are safe at any point of the training step. Repeated signals
    change nothing (a terminal Ctrl-C reaches each torchrun worker twice: directly and
    forwarded), so a second Ctrl-C cannot break a checkpoint upload; to abandon a stop
    that hangs, use Ctrl-\\ (SIGQUIT) or kill -9.
    """

    def __init__(self, poll_imds: bool | None = None, poll_interval_s: float = 5.0, *,
                 endpoint: str | None = None, http_timeout_s: float = 1.0, install_signals: bool = True):
        self.poll_interval_s = float(poll_interval_s)
        self.http_timeout_s = float(http_timeout_s)
        self.install_signals = install_signals
        self.polling = looks_like_ec2() if poll_imds is None else bool(poll_imds)
        self.endpoint = (endpoint or imds_endpoint()).rstrip("/")
        self._reason: str | None = None
        self._previous: dict[int, object] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._token: str | None = None
        self._token_expiry = 0.0
        self._rebalance_logged = False

    # -- public API -------------------------------------------------------------------
    def start(self) -> "InterruptWatcher":
        """Install the signal handlers and start the IMDS poller (if polling). Returns self."""
        if self.install_signals:
            if threading.current_thread() is threading.main_thread():
                for sig in (signal.SIGTERM, signal.SIGINT):
                    self._previous[sig] = signal.signal(sig, self._on_signal)
            else:
                log.warning("interrupt watcher started outside the main thread: SIGTERM/SIGINT not handled")
        if self.polling and self._thread is None:
            self._stop.clear()
            self._thread = threading.Thread(target=self._poll_loop, name="imds-poller", daemon=True)
            self._thread.start()
            log.debug("polling %s for spot interruption notices every %.1f s", self.endpoint, self.poll_interval_s)
        return self

    def stop(self) -> None:
        """Stop polling and put back the signal handlers that were there before start()."""
        self._stop.set()
        thread, self._thread = self._thread, None
        if thread is not None:
            thread.join(timeout=0.5)  # a daemon; never hold up a time-critical exit for it
        if threading.current_thread() is threading.main_thread():
            for sig, handler in self._previous.items():
                signal.signal(sig, handler)  # type: ignore[arg-type]
        self._previous.clear()

    def requested(self) -> bool:
        """True once a stop was asked for (sticky). Reads one attribute: call it every step."""
        return self._reason is not None

    @property
    def reason(self) -> str | None:
        """"SIGTERM", "SIGINT" or "spot-interruption: <action> at <time>"; None if not requested."""
        return self._reason

    def request(self, reason: str) -> None:
        """Ask for a stop from code (first reason wins)."""
        if self._reason is None:
            self._reason = reason

    def __enter__(self) -> "InterruptWatcher":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- signals ----------------------------------------------------------------------
    def _on_signal(self, signum, frame) -> None:
        # Runs in the main thread between bytecodes: attribute writes only.
        self.request(signal.Signals(signum).name)

    # -- IMDS polling -----------------------------------------------------------------
    def _poll_loop(self) -> None:
        while not self._stop.is_set() and not self.requested():
            try:
                self.poll_once()
            except Exception as exc:  # noqa: BLE001 - a poller must never kill training
                log.debug("IMDS poll failed: %s", exc)
            self._stop.wait(self.poll_interval_s)

    def poll_once(self) -> bool:
        """One round of IMDS queries; True when an interruption notice is present."""
        status, body = self._get(ACTION_PATH)
        if status == 200:
            try:
                notice = json.loads(body)
                action, when = notice.get("action", "?"), notice.get("time", "?")
            except (ValueError, AttributeError):
                action, when = "?", "?"
            self.request(f"spot-interruption: {action} at {when}")
            log.warning("EC2 spot interruption notice: %s at %s", action, when)
            return True
        status, body = self._get(REBALANCE_PATH)
        if status == 200 and not self._rebalance_logged:
            self._rebalance_logged = True
            log.warning("EC2 rebalance recommendation (%s): an interruption is more likely soon; "
                        "training continues until a notice or SIGTERM", body.strip()[:200])
        return False

    def _fetch_token(self) -> str | None:
        req = urllib.request.Request(self.endpoint + TOKEN_PATH, method="PUT",
                                     headers={"X-aws-ec2-metadata-token-ttl-seconds": str(TOKEN_TTL_S)})
        try:
            with urllib.request.urlopen(req, timeout=self.http_timeout_s) as resp:
                token = resp.read().decode("ascii", "replace").strip()
        except (OSError, urllib.error.URLError) as exc:
            # e.g. a container behind a hop limit of 1: fall back to IMDSv1 GETs
            log.debug("IMDS token request failed: %s", exc)
            return None
        self._token, self._token_expiry = token, time.monotonic() + TOKEN_TTL_S - 60
        return token

    def _get(self, path: str, retry_auth: bool = True) -> tuple[int, str]:
        """GET ``path`` with the cached token; (status, body); status 0 on network errors."""
        token = self._token if time.monotonic() < self._token_expiry else self._fetch_token()
        headers = {"X-aws-ec2-metadata-token": token} if token else {}
        req = urllib.request.Request(self.endpoint + path, headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=self.http_timeout_s) as resp:
                return resp.status, resp.read(4096).decode("utf-8", "replace")
        except urllib.error.HTTPError as exc:
            exc.close()
            if exc.code == 401 and retry_auth:
                self._token, self._token_expiry = None, 0.0
                return self._get(path, retry_auth=False)
            return exc.code, ""
        except (OSError, urllib.error.URLError) as exc:
            log.debug("IMDS GET %s failed: %s", path, exc)
            return 0, ""


# --------------------------------------------------------------------------- ranks and exit
def report_exit(code: int, reason: str | None = None, environ: Mapping[str, str] | None = None) -> None:
    """Record the exit code where the restart loop finds it (``$IMAGENET_EXIT_STATUS_FILE``).

    Atomic (temp file + rename) so concurrent ranks writing the same code are harmless;
    a no-op when the variable is unset. Errors are logged, never raised: exiting matters more.
    """
    env = os.environ if environ is None else environ
    target = env.get(EXIT_STATUS_ENV, "").strip()
    if not target:
        return
    from common.storage import atomic_write

    path = Path(target)
    text = f"{int(code)}\n{(reason or '').splitlines()[0] if reason else ''}\n"
    try:
        atomic_write(path, lambda f: f.write(text.encode()))
    except OSError as exc:
        log.warning("could not record exit status in %s: %s", path, exc)
