"""Prometheus metrics of the worker, served on CDC_AUDIT_METRICS_PORT (names `cdc_audit_*`).

Everything is read at scrape time: the worker's own counters (events sealed per stream, its
role, job runs and failures) and, from the database, each stream's newest recorded
verification. A scrape that cannot reach the database still returns the worker's counters.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from .db import connect
from .trail_commands import latest_verdicts

if TYPE_CHECKING:
    from .worker import Worker

__all__ = ["WorkerCollector", "serve_metrics"]


class WorkerCollector(Collector):
    def __init__(self, worker: Worker) -> None:
        self.worker = worker

    def collect(self) -> Iterator[Metric]:
        sealed = CounterMetricFamily(
            "cdc_audit_events_sealed", "Events sealed by this worker process", labels=["stream"]
        )
        for stream, count in sorted(self.worker.sealed.items()):
            sealed.add_metric([stream], count)
        yield sealed
        yield GaugeMetricFamily(
            "cdc_audit_worker_active",
            "1 while this worker is the slot's active worker, 0 while it is a standby",
            value=1 if self.worker.active else 0,
        )
        yield from self._jobs()
        yield from self._verification()

    def _jobs(self) -> Iterator[Metric]:
        runs = CounterMetricFamily("cdc_audit_job_runs", "Scheduled job runs", labels=["job"])
        failures = CounterMetricFamily(
            "cdc_audit_job_failures", "Scheduled job runs that failed", labels=["job"]
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

    def _verification(self) -> Iterator[Metric]:
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
        try:
            with connect(self.worker.dsn, application_name="cdc-audit metrics") as conn:
                verdicts = latest_verdicts(conn, self.worker.options.schema)
        except Exception:  # the worker's own figures are still worth a scrape
            verdicts = []
        for verdict in verdicts:
            stream = str(verdict["stream"])
            ok.add_metric([stream], 1 if verdict["ok"] else 0)
            when.add_metric([stream], verdict["verified_at"].timestamp())  # type: ignore[attr-defined]
            bad.add_metric([stream], float(verdict["first_bad_seq"] or 0))  # type: ignore[arg-type]
        yield ok
        yield when
        yield bad


def serve_metrics(worker: Worker, port: int) -> None:
    """Serve `/metrics` on `port` (all interfaces) from a daemon thread."""
    registry = CollectorRegistry()
    registry.register(WorkerCollector(worker))
    start_http_server(port, registry=registry)
