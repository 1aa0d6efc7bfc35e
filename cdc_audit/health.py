"""How the worker is doing, as seen from inside it: loop liveness and sealing lag.

The worker's threads update a `WorkerHealth`; the HTTP thread reads it for `/healthz`,
`/readyz` and `cdc_audit_lag_seconds`, without touching the database or the sealing loop.

Sealing lag is the age of the oldest committed transaction that is not sealed yet, measured
from its commit time (the server's clock). The worker knows each transaction's commit time
from its Begin message and knows when the batch holding it is written and confirmed; while it
reads a backlog (a read that returned a full batch), transactions it has not received yet are
waiting too, and none of them committed before the newest one it sealed: their age is then
bounded by the age of that one, which is what the lag reports. Caught up, the lag is 0.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Final

from .pgoutput import pg_timestamp_to_datetime

if TYPE_CHECKING:
    from .worker import Worker

__all__ = ["LIVENESS_SECONDS", "WorkerHealth", "health_routes"]

LIVENESS_SECONDS: Final = 60.0
"""The worker's loops come round at least every few seconds (the longest wait is a retry
backoff of 30 s); silence for this long means the process is stuck."""


class WorkerHealth:
    """Liveness and sealing lag of one worker process (thread-safe)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._beat = time.monotonic()
        self._streaming = False
        # (commit LSN, commit time as sent: microseconds since 2000) of received transactions
        # not confirmed yet, in order; converted only when the lag is asked for.
        self._unsealed: deque[tuple[int, int]] = deque()
        self._last_sealed: datetime | None = None
        self._backlog = False

    def beat(self) -> None:
        """The calling loop came round: the process is alive."""
        self._beat = time.monotonic()

    def silent_for(self) -> float:
        return time.monotonic() - self._beat

    def start(self, last_sealed: datetime | None) -> None:
        """Streaming from a position whose newest sealed commit happened at `last_sealed`."""
        with self._lock:
            self._streaming = True
            self._unsealed.clear()
            self._last_sealed = last_sealed
            self._backlog = False

    def stop(self) -> None:
        with self._lock:
            self._streaming = False
            self._unsealed.clear()

    def received(self, commit_lsn: int, commit_time_us: int) -> None:
        """A transaction arrived (its Begin): `commit_time_us` as pgoutput sends it."""
        with self._lock:
            self._unsealed.append((commit_lsn, commit_time_us))

    def read(self, *, full: bool) -> None:
        """A read returned; `full` when it stopped at its limit, so more is waiting."""
        self._backlog = full

    def confirmed(self, lsn: int) -> None:
        """Everything before `lsn` is written: the transactions committed below it are sealed."""
        with self._lock:
            sealed_us = None
            while self._unsealed and self._unsealed[0][0] < lsn:
                _, sealed_us = self._unsealed.popleft()
            if sealed_us is not None:
                self._last_sealed = pg_timestamp_to_datetime(sealed_us)

    def lag_seconds(self, now: datetime | None = None) -> float | None:
        """Age of the oldest committed change not sealed yet; None while not streaming."""
        now = now or datetime.now(UTC)
        with self._lock:
            if not self._streaming:
                return None
            if self._unsealed:
                oldest: datetime | None = pg_timestamp_to_datetime(self._unsealed[0][1])
            elif self._backlog:
                oldest = self._last_sealed
            else:
                return 0.0
        return 0.0 if oldest is None else max(0.0, (now - oldest).total_seconds())


def readiness(worker: Worker, max_lag_seconds: float) -> str | None:
    """Why the worker is not ready to be relied on, or None when it is."""
    health = worker.health
    if health.silent_for() > LIVENESS_SECONDS:
        return f"not alive: no loop iteration for {health.silent_for():.0f} s"
    if not worker.active:
        return "standby: this worker does not hold the slot"
    lag = health.lag_seconds()
    if lag is None:
        return "not streaming yet"
    if lag > max_lag_seconds:
        return f"lagging: {lag:.1f} s behind commit (ready up to {max_lag_seconds:g} s)"
    return None


StartResponse = Callable[[str, list[tuple[str, str]]], object]
WsgiApp = Callable[[dict[str, object], StartResponse], Iterable[bytes]]


def health_routes(worker: Worker, max_lag_seconds: float, metrics: WsgiApp) -> WsgiApp:
    """`/healthz` and `/readyz` in front of the metrics app (which serves everything else)."""

    def app(environ: dict[str, object], start_response: StartResponse) -> Iterable[bytes]:
        path = environ.get("PATH_INFO")
        if path == "/healthz":
            silent = worker.health.silent_for()
            reason = None if silent <= LIVENESS_SECONDS else f"no loop iteration for {silent:.0f} s"
            return _plain(start_response, reason)
        if path == "/readyz":
            return _plain(start_response, readiness(worker, max_lag_seconds))
        return metrics(environ, start_response)

    return app


def _plain(start_response: StartResponse, reason: str | None) -> list[bytes]:
    status = "200 OK" if reason is None else "503 Service Unavailable"
    body = f"{reason or 'ok'}\n".encode()
    start_response(
        status, [("Content-Type", "text/plain; charset=utf-8"), ("Content-Length", str(len(body)))]
    )
    return [body]
