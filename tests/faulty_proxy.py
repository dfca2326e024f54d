"""A TCP proxy on 127.0.0.1 that cuts some connections mid-response, for fault-injection tests.

    with FaultyProxy(("127.0.0.1", moto_port), cut_after=64 * 1024, max_cuts=5) as proxy:
        os.environ["AWS_ENDPOINT_URL"] = proxy.url
        ...            # S3 reads through the proxy
    assert proxy.cuts == 5
    proxy.bytes_down     # response bytes forwarded, for "downloaded once" checks

Every ``every``-th connection is eligible: once its response bytes (server -> client) pass
``cut_after``, the proxy forwards exactly ``cut_after`` bytes and then resets both sides,
as a dropped network connection would, until ``max_cuts`` cuts have been made. Everything
else is forwarded unchanged. ``reset=True`` cuts with a bare TCP RST (no FIN first), as a
dead middlebox does: the client sees the bytes, then ECONNRESET instead of an early EOF.

``stall()`` makes the proxy stop answering, like a hung server: connections are still
accepted, but nothing more is forwarded in either direction until ``resume()`` (or ``stop()``).
"""
from __future__ import annotations

import socket
import struct
import threading


def _drop(sock: socket.socket, fin: bool = True) -> None:
    """Drop a connection now: RST on close (SO_LINGER 0), and shutdown() first, because a
    plain close() does not wake the other pump thread blocked in recv() on the same socket.
    ``fin=False`` shuts down only the read side (which sends nothing), so the peer gets the RST alone."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.shutdown(socket.SHUT_RDWR if fin else socket.SHUT_RD)
    except OSError:
        pass
    sock.close()


class FaultyProxy:
    def __init__(self, target: tuple[str, int], *, cut_after: int = 64 * 1024, max_cuts: int = 3, every: int = 1,
                 reset: bool = False):
        self.target, self.cut_after, self.max_cuts, self.every = target, cut_after, max_cuts, max(1, every)
        self.reset = reset
        self._flowing = threading.Event()  # cleared while stalled
        self._flowing.set()
        self.cuts = 0
        self.connections = 0
        self.bytes_down = 0  # response bytes forwarded (server -> client), all connections
        self._lock = threading.Lock()
        self._server = socket.socket()
        self._server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._server.bind(("127.0.0.1", 0))
        self._server.listen(64)
        self.port = self._server.getsockname()[1]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._accept_loop, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> "FaultyProxy":
        self._thread.start()
        return self

    def stall(self) -> None:
        """Stop answering: hold every connection open, forward nothing (a hung server)."""
        self._flowing.clear()

    def resume(self) -> None:
        self._flowing.set()

    def stop(self) -> None:
        self._stop.set()
        self._flowing.set()  # release stalled pumps; their sockets close with the peers
        self._server.close()

    def __enter__(self) -> "FaultyProxy":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def _accept_loop(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self._server.accept()
            except OSError:
                return
            with self._lock:
                self.connections += 1
                eligible = self.connections % self.every == 0
            try:
                upstream = socket.create_connection(self.target)
            except OSError:
                _drop(client)
                continue
            threading.Thread(target=self._pump, args=(client, upstream, False, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, eligible, False), daemon=True).start()

    def _take_cut(self) -> bool:
        with self._lock:
            if self.cuts >= self.max_cuts:
                return False
            self.cuts += 1
            return True

    def _pump(self, src: socket.socket, dst: socket.socket, may_cut: bool, src_is_client: bool) -> None:
        sent = 0
        try:
            while data := src.recv(65536):
                self._flowing.wait()
                if self._stop.is_set():
                    return
                if may_cut and sent + len(data) > self.cut_after and self._take_cut():
                    dst.sendall(data[:self.cut_after - sent])
                    _drop(dst, fin=not self.reset)
                    _drop(src)
                    return
                dst.sendall(data)
                sent += len(data)
                if not src_is_client:
                    with self._lock:
                        self.bytes_down += len(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                s.close()
