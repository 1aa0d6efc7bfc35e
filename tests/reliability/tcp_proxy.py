"""A TCP proxy between the worker and PostgreSQL that injects connection faults.

Every accepted connection is forwarded to the target by two threads (one per direction).
Faults apply to every connection, open or new:

- `drop()` closes both sides of every open connection (a network cut, a killed bouncer);
- `stall(seconds)` stops forwarding for a while (a partition that heals): bytes wait in the
  kernel buffers, nothing is lost, nothing arrives;
- `slow(delay, chunk)` forwards at most `chunk` bytes at a time, `delay` seconds apart (a bad
  link); `normal()` ends it;
- `blackhole()` stops forwarding on the open connections (or on the one whose server side
  has a given port) for good, while new ones work (a firewall that silently forgot the
  flows): only the client itself can notice, by a timeout;
- `drop_clients()` closes the client side of every open connection and leaves the server
  side open and silent: the client sees its connections fail, the server does not (what a
  network partition leaves behind once the client's TCP has given up).
"""

from __future__ import annotations

import contextlib
import select
import socket
import threading
import time


class TcpProxy:
    def __init__(self, target_port: int, target_host: str = "127.0.0.1") -> None:
        self.target = (target_host, target_port)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(0.2)
        self.port: int = self.listener.getsockname()[1]
        self._closed = threading.Event()
        self._lock = threading.Lock()
        self._pairs: list[tuple[socket.socket, socket.socket]] = []
        self._frozen: set[tuple[socket.socket, socket.socket]] = set()
        self._stalled_until = 0.0
        self._delay = 0.0
        self._chunk = 65536
        self.accepted = 0
        self.dropped = 0
        self._thread = threading.Thread(target=self._accept, name="proxy-accept", daemon=True)

    def dsn(self, dbname: str, user: str = "postgres") -> str:
        return f"host=127.0.0.1 port={self.port} dbname={dbname} user={user} connect_timeout=10"

    def start(self) -> TcpProxy:
        self._thread.start()
        return self

    # ---- faults

    def drop(self) -> int:
        """Close every open connection, both sides; returns how many."""
        with self._lock:
            pairs, self._pairs = self._pairs, []
            self._frozen.clear()
        for client, upstream in pairs:
            _close(client)
            _close(upstream)
        self.dropped += len(pairs)
        return len(pairs)

    def stall(self, seconds: float) -> None:
        """Forward nothing for `seconds` from now (returns at once)."""
        self._stalled_until = time.monotonic() + seconds

    def slow(self, delay: float, chunk: int) -> None:
        self._delay, self._chunk = delay, chunk

    def blackhole(self, server_side_port: int | None = None) -> int:
        """Forward nothing more on the open connections, ever; returns how many.

        With `server_side_port`, only on the connection whose socket towards the server has
        that port (the server shows it as `client_port`)."""
        with self._lock:
            pairs = [
                pair
                for pair in self._pairs
                if server_side_port is None or _port(pair[1]) == server_side_port
            ]
            self._frozen.update(pairs)
            return len(pairs)

    def drop_clients(self) -> int:
        """Close the client side of every open connection; the server side stays open."""
        with self._lock:
            pairs = [pair for pair in self._pairs if pair not in self._frozen]
            self._frozen.update(pairs)
        for client, _ in pairs:
            _close(client)
        self.dropped += len(pairs)
        return len(pairs)

    def normal(self) -> None:
        self._stalled_until, self._delay, self._chunk = 0.0, 0.0, 65536

    def open_connections(self) -> int:
        with self._lock:
            return len(self._pairs)

    def close(self) -> None:
        self._closed.set()
        self._thread.join(5)
        self.listener.close()
        self.drop()

    # ---- forwarding

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                client, _ = self.listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.target, timeout=10)
            except OSError:
                _close(client)
                continue
            for sock in (client, upstream):
                sock.settimeout(None)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self._lock:
                self._pairs.append((client, upstream))
            self.accepted += 1
            for src, dst in ((client, upstream), (upstream, client)):
                threading.Thread(
                    target=self._pump, args=(src, dst, (client, upstream)), daemon=True
                ).start()

    def _pump(
        self, src: socket.socket, dst: socket.socket, pair: tuple[socket.socket, socket.socket]
    ) -> None:
        try:
            while not self._closed.is_set():
                wait = self._stalled_until - time.monotonic()
                if pair in self._frozen:
                    time.sleep(0.1)
                    continue
                if wait > 0:
                    time.sleep(min(wait, 0.1))
                    continue
                readable, _, _ = select.select([src], [], [], 0.1)
                if not readable:
                    continue
                data = src.recv(self._chunk)
                if not data:
                    break
                if self._delay:
                    time.sleep(self._delay)
                dst.sendall(data)
        except (OSError, ValueError):
            pass  # a side was closed: by a drop, or by its owner
        finally:
            with self._lock:
                # A frozen connection's server side stays open until `drop` or `close`.
                ended = pair not in self._frozen
                if ended and pair in self._pairs:
                    self._pairs.remove(pair)
            if ended:
                _close(pair[0])
                _close(pair[1])


def _port(sock: socket.socket) -> int | None:
    try:
        port: int = sock.getsockname()[1]
    except OSError:
        return None
    return port


def _close(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)
    with contextlib.suppress(OSError):
        sock.close()
