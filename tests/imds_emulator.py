"""A tiny EC2 instance metadata service (IMDSv2 only) on 127.0.0.1, for spot-interruption tests.

In a test::

    with ImdsEmulator() as imds:
        env["AWS_EC2_METADATA_SERVICE_ENDPOINT"] = imds.url
        imds.announce(action="terminate", seconds=120)   # or imds.announce_after(1.0)
        imds.set_rebalance(True)

As a process (for the launcher tests)::

    python tests/imds_emulator.py --port 0 --announce-after 2
    # prints "listening http://127.0.0.1:PORT" once ready; serves until SIGTERM/SIGINT

What it implements, as EC2 does with ``HttpTokens=required``:

* ``PUT /latest/api/token`` with ``X-aws-ec2-metadata-token-ttl-seconds`` (1..21600) -> a token;
  400 without a valid TTL header.
* every GET needs a valid, unexpired ``X-aws-ec2-metadata-token``; 401 otherwise.
* ``/latest/meta-data/spot/instance-action``: 404 until :meth:`announce`, then 200 with
  ``{"action": "terminate", "time": "2026-01-01T00:02:00Z"}``.
* ``/latest/meta-data/events/recommendations/rebalance``: 404 unless switched on, then 200
  with ``{"noticeTime": "..."}``.
* ``/latest/meta-data/instance-id`` and ``.../placement/region``: fixed fake values;
  ``.../local-ipv4``: the ``local_ipv4`` attribute (10.0.0.7 unless a test sets it).
  Anything else: 404.

``announce(reads=N)`` withdraws the notice after it has been served N times, as when an
instance outlives its notice (a false alarm): a restarted run then sees 404 again.
"""
from __future__ import annotations

import argparse
import json
import secrets
import signal
import sys
import threading
import time
from datetime import datetime, timedelta, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

ACTION_PATH = "/latest/meta-data/spot/instance-action"
REBALANCE_PATH = "/latest/meta-data/events/recommendations/rebalance"


def _iso(t: datetime) -> str:
    return t.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


class ImdsEmulator:
    def __init__(self, port: int = 0):
        self._lock = threading.Lock()
        self._tokens: dict[str, float] = {}  # token -> monotonic expiry
        self._action: dict | None = None
        self._action_reads_left: int | None = None
        self._rebalance: dict | None = None
        self._timers: list[threading.Timer] = []
        self.token_requests = 0
        self.rejected = 0          # GETs answered 401 (missing/expired/unknown token)
        self.requests: list[tuple[str, str, int]] = []  # (method, path, status)
        self.local_ipv4 = "10.0.0.7"
        self._server = ThreadingHTTPServer(("127.0.0.1", port), self._handler_class())
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, name="imds-emulator", daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    # -- control ----------------------------------------------------------------------
    def start(self) -> "ImdsEmulator":
        self._thread.start()
        return self

    def stop(self) -> None:
        for t in self._timers:
            t.cancel()
        self._server.shutdown()
        self._server.server_close()

    def __enter__(self) -> "ImdsEmulator":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def announce(self, action: str = "terminate", seconds: float = 120, reads: int | None = None) -> None:
        """Start answering instance-action with ``action`` due ``seconds`` from now
        (for ``reads`` answers, then withdraw; None = until :meth:`withdraw`)."""
        when = datetime.now(timezone.utc) + timedelta(seconds=seconds)
        with self._lock:
            self._action = {"action": action, "time": _iso(when)}
            self._action_reads_left = reads

    def announce_after(self, delay_s: float, action: str = "terminate", seconds: float = 120,
                       reads: int | None = None) -> None:
        """Call :meth:`announce` in ``delay_s`` seconds (a background timer)."""
        t = threading.Timer(delay_s, self.announce, kwargs={"action": action, "seconds": seconds, "reads": reads})
        t.daemon = True
        self._timers.append(t)
        t.start()

    def withdraw(self) -> None:
        with self._lock:
            self._action = None

    def revoke_tokens(self) -> None:
        """Forget every issued token: clients get 401 until they fetch a new one."""
        with self._lock:
            self._tokens.clear()

    def set_rebalance(self, on: bool = True) -> None:
        with self._lock:
            self._rebalance = {"noticeTime": _iso(datetime.now(timezone.utc))} if on else None

    # -- serving ----------------------------------------------------------------------
    def _record(self, method: str, path: str, status: int) -> None:
        with self._lock:
            self.requests.append((method, path, status))
            if status == 401:
                self.rejected += 1

    def _new_token(self, ttl: int) -> str:
        token = secrets.token_urlsafe(32)
        with self._lock:
            self.token_requests += 1
            self._tokens[token] = time.monotonic() + ttl
        return token

    def _valid(self, token: str | None) -> bool:
        with self._lock:
            expiry = self._tokens.get(token or "")
        return expiry is not None and time.monotonic() < expiry

    def _document(self, path: str) -> dict | str | None:
        with self._lock:
            if path == ACTION_PATH:
                doc = self._action
                if doc is not None and self._action_reads_left is not None:
                    self._action_reads_left -= 1
                    if self._action_reads_left <= 0:
                        self._action = None
                return doc
            if path == REBALANCE_PATH:
                return self._rebalance
        return {"/latest/meta-data/instance-id": "i-0123456789emulator",
                "/latest/meta-data/placement/region": "us-east-1",
                "/latest/meta-data/local-ipv4": self.local_ipv4}.get(path)

    def _handler_class(self):
        emu = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:  # keep test output clean
                pass

            def _send(self, status: int, body: str = "", ctype: str = "text/plain") -> None:
                data = body.encode()
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
                emu._record(self.command, self.path, status)

            def do_PUT(self) -> None:
                if self.path != "/latest/api/token":
                    return self._send(404)
                try:
                    ttl = int(self.headers.get("X-aws-ec2-metadata-token-ttl-seconds", ""))
                except ValueError:
                    ttl = 0
                if not 1 <= ttl <= 21600:
                    return self._send(400, "missing or invalid X-aws-ec2-metadata-token-ttl-seconds")
                self._send(200, emu._new_token(ttl))

            def do_GET(self) -> None:
                if not emu._valid(self.headers.get("X-aws-ec2-metadata-token")):
                    return self._send(401)
                doc = emu._document(self.path)
                if doc is None:
                    return self._send(404)
                if isinstance(doc, dict):
                    return self._send(200, json.dumps(doc), "application/json")
                self._send(200, doc)

        return Handler


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--port", type=int, default=0, help="0 = a free port (printed)")
    ap.add_argument("--announce-after", type=float, default=None, metavar="S",
                    help="announce a spot interruption S seconds after start")
    ap.add_argument("--action", default="terminate", choices=["terminate", "stop", "hibernate"])
    ap.add_argument("--notice-reads", type=int, default=None, metavar="N",
                    help="withdraw the notice after serving it N times (a false alarm)")
    ap.add_argument("--rebalance", action="store_true", help="answer a rebalance recommendation from the start")
    args = ap.parse_args(argv)
    stopped = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stopped.set())
    signal.signal(signal.SIGINT, lambda *_: stopped.set())
    with ImdsEmulator(args.port) as emu:
        if args.rebalance:
            emu.set_rebalance(True)
        if args.announce_after is not None:
            emu.announce_after(args.announce_after, action=args.action, reads=args.notice_reads)
        print(f"listening {emu.url}", flush=True)
        while not stopped.wait(0.2):
            pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
