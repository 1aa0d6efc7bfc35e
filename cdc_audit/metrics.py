"""Prometheus metrics of the worker, with `/healthz` and `/readyz`, on CDC_AUDIT_METRICS_PORT.

Everything is read at scrape time, in the HTTP server's threads: the worker's own figures
(events sealed and missing context per stream, its role, sealing lag, job runs and failures)
from memory, and the slot, gap events, checkpoints and verifications from the database over a
connection of the scrape's own with a short statement timeout, so a slow database slows a
scrape, never the sealing loop. `cdc_audit_up` says whether those database reads succeeded; a
scrape that cannot reach the database still returns the worker's own figures.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final
from wsgiref.simple_server import WSGIRequestHandler, make_server

import psycopg
from prometheus_client import CollectorRegistry, make_wsgi_app
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import ThreadingWSGIServer
from prometheus_client.registry import Collector
from psycopg.rows import TupleRow

from .health import health_routes
from .names import InstallNames
from .status import SlotLag, last_checkpoint_at, read_lag, stream_counts
from .trail import install_names, trail_streams
from .trail_commands import latest_verdicts

if TYPE_CHECKING:
    from .worker import Worker

__all__ = ["WorkerCollector", "serve_metrics"]

_CONNECT_TIMEOUT: Final = 3
_STATEMENT_TIMEOUT_MS: Final = 2000


@dataclass
class _Trail:
    """What a scrape read from the database."""

    lag: SlotLag
    gaps: dict[str, int]
    checkpoints: dict[str, float]
    verdicts: list[dict[str, object]]


class WorkerCollector(Collector):
    def __init__(self, worker: Worker) -> None:
        self.worker = worker
        self._lock = threading.Lock()

    def collect(self) -> Iterator[Metric]:
        yield from self._own()
        yield from self._jobs()
        with self._lock:
            trail = self._read_trail()
        yield GaugeMetricFamily(
            "cdc_audit_up",
            "1 when this scrape could read the database, 0 otherwise",
            value=0 if trail is None else 1,
        )
        yield self._lag_seconds(trail)
        yield from self._slot(trail)
        yield from self._streams(trail)
        yield from self._verification(trail)

    def _own(self) -> Iterator[Metric]:
        sealed = CounterMetricFamily(
            "cdc_audit_events_sealed", "Events sealed by this worker process", labels=["stream"]
        )
        missing = CounterMetricFamily(
            "cdc_audit_events_missing_context",
            "Events sealed by this worker process without the context of who made them",
            labels=["stream"],
        )
        # Copies: the sealing loop updates these counters while a scrape reads them.
        counts, missing_counts = dict(self.worker.sealed), dict(self.worker.missing_context)
        for stream in sorted(counts):
            sealed.add_metric([stream], counts[stream])
            missing.add_metric([stream], missing_counts.get(stream, 0))
        yield sealed
        yield missing
        yield GaugeMetricFamily(
            "cdc_audit_worker_active",
            "1 while this worker is the slot's active worker, 0 while it is a standby",
            value=1 if self.worker.active else 0,
        )

    def _jobs(self) -> Iterator[Metric]:
        runs = CounterMetricFamily("cdc_audit_job_runs", "Scheduled job runs", labels=["job_name"])
        failures = CounterMetricFamily(
            "cdc_audit_job_failures", "Scheduled job runs that failed", labels=["job_name"]
        )
        jobs = self.worker.jobs
        if jobs is not None:
            with jobs.stats.lock:
                for name, count in sorted(jobs.stats.runs.items()):
                    runs.add_metric([name], count)
                for name, count in sorted(jobs.stats.failures.items()):
                    failures.add_metric([name], count)
        yield runs
        yield failures

    def _lag_seconds(self, trail: _Trail | None) -> Metric:
        # The active worker knows its own lag best; a standby reports the server's view.
        seconds = self.worker.health.lag_seconds()
        if seconds is None and trail is not None:
            seconds = trail.lag.seconds
        family = GaugeMetricFamily(
            "cdc_audit_lag_seconds",
            "How long the oldest committed change not sealed yet has been waiting (0: caught up)",
        )
        if seconds is not None:
            family.add_metric([], seconds)
        return family

    def _slot(self, trail: _Trail | None) -> Iterator[Metric]:
        lag_bytes = GaugeMetricFamily(
            "cdc_audit_lag_bytes", "The server's current WAL position minus the slot's confirmed"
        )
        retained = GaugeMetricFamily(
            "cdc_audit_slot_retained_wal_bytes", "WAL the slot keeps on the server (bytes)"
        )
        lost = GaugeMetricFamily(
            "cdc_audit_slot_lost", "1 when the slot is missing or its WAL was removed"
        )
        if trail is not None:
            if trail.lag.bytes is not None:
                lag_bytes.add_metric([], trail.lag.bytes)
            if trail.lag.retained_wal_bytes is not None:
                retained.add_metric([], trail.lag.retained_wal_bytes)
            lost.add_metric([], 1 if trail.lag.slot_lost else 0)
        yield lag_bytes
        yield retained
        yield lost

    def _streams(self, trail: _Trail | None) -> Iterator[Metric]:
        gaps = GaugeMetricFamily(
            "cdc_audit_gap_events", "Gap events recorded in the stream", labels=["stream"]
        )
        checkpoint = GaugeMetricFamily(
            "cdc_audit_last_checkpoint_timestamp_seconds",
            "When the stream's newest signed checkpoint was made (Unix time)",
            labels=["stream"],
        )
        if trail is not None:
            for stream, count in sorted(trail.gaps.items()):
                gaps.add_metric([stream], count)
            for stream, when in sorted(trail.checkpoints.items()):
                checkpoint.add_metric([stream], when)
        yield gaps
        yield checkpoint

    def _verification(self, trail: _Trail | None) -> Iterator[Metric]:
        ok = GaugeMetricFamily(
            "cdc_audit_last_verify_ok",
            "1 when the stream's newest verification passed, 0 when it failed",
            labels=["stream"],
        )
        when = GaugeMetricFamily(
            "cdc_audit_last_verify_timestamp_seconds",
            "When the stream's newest verification ran (Unix time)",
            labels=["stream"],
        )
        bad = GaugeMetricFamily(
            "cdc_audit_last_verify_first_bad_seq",
            "First bad sequence number found by the newest verification (0 when it passed)",
            labels=["stream"],
        )
        for verdict in [] if trail is None else trail.verdicts:
            stream = str(verdict["stream"])
            ok.add_metric([stream], 1 if verdict["ok"] else 0)
            when.add_metric([stream], verdict["verified_at"].timestamp())  # type: ignore[attr-defined]
            bad.add_metric([stream], float(verdict["first_bad_seq"] or 0))  # type: ignore[arg-type]
        yield ok
        yield when
        yield bad

    # ---- database reads

    def _read_trail(self) -> _Trail | None:
        try:
            with _connect(self.worker.dsn) as conn:
                names = install_names(conn, self.worker.options.schema)
                return self._read(conn, names)
        except Exception:  # a scrape reports the failure as cdc_audit_up 0, never a 500
            return None

    def _read(self, conn: psycopg.Connection[TupleRow], names: InstallNames) -> _Trail:
        schema = names.schema
        lag = read_lag(conn, names.slot)
        streams = sorted(set(trail_streams(conn, schema)) | set(self.worker.sealed))
        conn.commit()
        checkpoints = {}
        for stream in streams:
            made = last_checkpoint_at(conn, schema, stream)
            if made is not None:
                checkpoints[stream] = made.timestamp()
        gaps = {stream: stream_counts(conn, schema, stream).gaps for stream in streams}
        return _Trail(lag, gaps, checkpoints, latest_verdicts(conn, schema))


def _connect(dsn: str) -> psycopg.Connection[TupleRow]:
    conn = psycopg.connect(
        dsn,
        connect_timeout=_CONNECT_TIMEOUT,
        application_name="cdc-audit metrics",
        client_encoding="utf8",
    )
    # Fixed here, not taken from the role's or database's defaults: see db.connect.
    conn.execute("SET DateStyle = 'ISO, YMD'")
    conn.execute(f"SET statement_timeout = {_STATEMENT_TIMEOUT_MS}")
    conn.commit()
    return conn


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        """The worker's log is JSON lines: no access log in it."""


def serve_metrics(worker: Worker, port: int, ready_max_lag_seconds: float) -> None:
    """Serve `/metrics`, `/healthz` and `/readyz` on `port` (all interfaces), from a daemon
    thread. `/readyz` answers 503 above `ready_max_lag_seconds` of lag."""
    registry = CollectorRegistry()
    registry.register(WorkerCollector(worker))
    app = health_routes(worker, ready_max_lag_seconds, make_wsgi_app(registry))
    # All interfaces, as start_http_server does: Prometheus scrapes from elsewhere.
    server = make_server(
        "0.0.0.0",
        port,
        app,
        ThreadingWSGIServer,
        handler_class=_QuietHandler,
    )
    thread = threading.Thread(target=server.serve_forever, name="cdc-audit-metrics", daemon=True)
    thread.start()
