"""The worker's metrics, health and readiness over HTTP, and `status --format json`."""

from __future__ import annotations

import json
import os
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from prometheus_client.parser import text_string_to_metric_families

from cdc_audit.ephemeral import free_port

from .fix_policy import WritePolicy
from .pg import Database, run_cli
from .test_worker import RunningWorker, ctx

TABLES = "  - {table: public.accounts, stream: user}\n"
# A purge job that has nothing to purge: it runs, and fails only when the database is away.
JOBS = 'jobs: {purge: "0 3 * * *"}\n'

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


class Endpoint:
    """The worker's HTTP port: metrics, health and readiness."""

    def __init__(self, port: int) -> None:
        self.base = f"http://127.0.0.1:{port}"

    def get(self, path: str) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(self.base + path, timeout=10) as page:
                return page.status, page.read().decode()
        except urllib.error.HTTPError as error:
            return error.code, error.read().decode()

    def samples(self) -> Samples:
        status, text = self.get("/metrics")
        assert status == 200, text
        return {
            (sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(text)
            for sample in family.samples
        }

    def value(self, name: str, **labels: str) -> float | None:
        return self.samples().get((name, tuple(sorted(labels.items()))))

    def reachable(self) -> bool:
        try:
            return self.get("/healthz")[0] == 200
        except OSError:
            return False


def wait_for(what: str, condition: Callable[[], bool], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def wait_value(
    endpoint: Endpoint, what: str, check: Callable[[float], bool], name: str, **labels: str
) -> float:
    found: list[float] = []

    def matches() -> bool:
        value = endpoint.value(name, **labels)
        if value is not None and check(value):
            found.append(value)
            return True
        return False

    wait_for(what, matches)
    return found[0]


@pytest.fixture
def installed(database: Database, write_policy: WritePolicy) -> Database:
    database.execute("CREATE TABLE accounts (id int PRIMARY KEY, owner text)")
    policy = write_policy(TABLES, JOBS)
    result = run_cli("apply", "--dsn", database.dsn, "--policy", str(policy))
    assert result.returncode == 0, result.stderr
    return database


@pytest.fixture
def signing_key(installed: Database, tmp_path: Path) -> str:
    out = tmp_path / "keys"
    assert run_cli("keygen", "--out", str(out), env=_env(installed)).returncode == 0
    added = run_cli("keys", "add", str(out / "signing_key.pub.pem"), env=_env(installed))
    assert added.returncode == 0, added.stderr
    return str(out / "signing_key.pem")


def _env(db: Database, **extra: str) -> dict[str, str]:
    return {**os.environ, "CDC_AUDIT_DSN": db.dsn, **extra}


def _write(db: Database, ids: range, actor: str | None = "alice") -> None:
    with db.connect(autocommit=False) as conn:
        for i in ids:
            if actor is not None:
                ctx(conn, actor, "test")
            conn.execute("INSERT INTO accounts VALUES (%s, 'x')", (i,))
            conn.commit()


class Workers:
    """Workers started by a test, each with its own metrics port; all stopped at the end."""

    def __init__(self, db: Database, **env: str) -> None:
        self.db = db
        self.env = env
        self.started: list[RunningWorker] = []

    def start(self, **env: str) -> tuple[RunningWorker, Endpoint]:
        port = free_port()
        worker = RunningWorker(
            _env(self.db, CDC_AUDIT_METRICS_PORT=str(port), **{**self.env, **env})
        )
        self.started.append(worker)
        endpoint = Endpoint(port)
        wait_for("the metrics port", lambda: endpoint.reachable() or not worker.running())
        assert worker.running(), worker.stop()[1]
        return worker, endpoint

    def stop_all(self) -> None:
        for worker in self.started:
            worker.stop()


@pytest.fixture
def workers(installed: Database) -> Iterator[Workers]:
    started = Workers(
        installed,
        CDC_AUDIT_HEARTBEAT_SECONDS="0.5",
        CDC_AUDIT_JOBS_EVERY_SECONDS="0.5",
        CDC_AUDIT_READY_MAX_LAG_SECONDS="1",
    )
    try:
        yield started
    finally:
        started.stop_all()


def test_every_metric_moves_as_events_are_sealed(
    installed: Database, signing_key: str, workers: Workers
) -> None:
    worker, metrics = workers.start(CDC_AUDIT_SIGNING_KEY_FILE=signing_key)
    wait_for("ready", lambda: metrics.get("/readyz")[0] == 200)
    assert metrics.get("/healthz") == (200, "ok\n")
    assert metrics.value("cdc_audit_worker_active") == 1
    assert metrics.value("cdc_audit_up") == 1
    assert metrics.value("cdc_audit_slot_lost") == 0

    _write(installed, range(1, 4))
    wait_value(
        metrics, "3 sealed", lambda v: v == 3, "cdc_audit_events_sealed_total", stream="user"
    )
    assert metrics.value("cdc_audit_events_missing_context_total", stream="user") == 0
    checkpoint = wait_value(
        metrics,
        "a checkpoint",
        lambda v: v > 0,
        "cdc_audit_last_checkpoint_timestamp_seconds",
        stream="user",
    )
    assert abs(checkpoint - time.time()) < 60
    assert metrics.value("cdc_audit_gap_events", stream="user") == 0

    # A change without context is sealed, flagged and counted.
    _write(installed, range(4, 5), actor=None)
    wait_value(
        metrics,
        "missing context",
        lambda v: v == 1,
        "cdc_audit_events_missing_context_total",
        stream="user",
    )
    assert metrics.value("cdc_audit_events_sealed_total", stream="user") == 4
    assert (metrics.value("cdc_audit_last_checkpoint_timestamp_seconds", stream="user") or 0) > (
        checkpoint
    )

    _lag_makes_the_worker_unready(installed, metrics)
    _verify_moves_the_verdict(installed, metrics)
    _jobs_and_up_follow_the_database(installed, metrics)

    # A second worker on the same slot is a standby: alive, but not ready.
    _, standby = workers.start(CDC_AUDIT_SIGNING_KEY_FILE=signing_key)
    assert standby.get("/healthz")[0] == 200
    status, reason = standby.get("/readyz")
    assert status == 503 and reason.startswith("standby"), reason
    assert standby.value("cdc_audit_worker_active") == 0
    assert standby.value("cdc_audit_up") == 1
    assert metrics.value("cdc_audit_worker_active") == 1
    assert metrics.get("/readyz")[0] == 200

    code, log = worker.stop()
    assert code == 0, log


def _lag_makes_the_worker_unready(db: Database, metrics: Endpoint) -> None:
    """While the trail cannot be written, lag grows past the threshold: 503; then back."""
    sealed_before = metrics.value("cdc_audit_events_sealed_total", stream="user") or 0
    written = range(100, 110)
    with db.connect(autocommit=False) as blocker:
        # The worker's batch waits for this lock; it still reads the stream meanwhile.
        blocker.execute("LOCK TABLE cdc_audit.progress IN ACCESS EXCLUSIVE MODE")
        _write(db, written)
        wait_for("lagging", lambda: metrics.get("/readyz")[1].startswith("lagging"))
        assert metrics.get("/readyz")[0] == 503
        assert metrics.get("/healthz")[0] == 200
        samples = metrics.samples()
        assert samples[("cdc_audit_lag_seconds", ())] > 1
        assert samples[("cdc_audit_lag_bytes", ())] > 0
        # Nothing is confirmed meanwhile, so the slot keeps what is written from now on.
        retained = samples[("cdc_audit_slot_retained_wal_bytes", ())]

        def retains_more() -> bool:
            nonlocal written
            more = range(written.stop, written.stop + 50)
            _write(db, more)
            written = range(written.start, more.stop)
            return (metrics.value("cdc_audit_slot_retained_wal_bytes") or 0) > retained

        wait_for("retained WAL to grow", retains_more)
        blocker.rollback()
    wait_for("ready again", lambda: metrics.get("/readyz")[0] == 200)
    wait_value(metrics, "caught up", lambda v: v == 0, "cdc_audit_lag_seconds")
    wait_value(metrics, "slot caught up", lambda v: v == 0, "cdc_audit_lag_bytes")
    sealed = metrics.value("cdc_audit_events_sealed_total", stream="user")
    assert sealed == sealed_before + len(written)


def _verify_moves_the_verdict(db: Database, metrics: Endpoint) -> None:
    assert metrics.value("cdc_audit_last_verify_ok", stream="user") is None
    verified = run_cli("verify", env=_env(db))
    assert verified.returncode == 0, verified.stderr
    assert metrics.value("cdc_audit_last_verify_ok", stream="user") == 1
    assert metrics.value("cdc_audit_last_verify_first_bad_seq", stream="user") == 0
    first = metrics.value("cdc_audit_last_verify_timestamp_seconds", stream="user") or 0
    assert abs(first - time.time()) < 60
    db.execute(
        "ALTER TABLE cdc_audit.event DISABLE TRIGGER USER;"
        "UPDATE cdc_audit.event SET actor_id = 'mallory' WHERE seq = 2;"
        "ALTER TABLE cdc_audit.event ENABLE TRIGGER USER"
    )
    assert run_cli("verify", env=_env(db)).returncode == 1
    samples = metrics.samples()
    assert samples[("cdc_audit_last_verify_ok", (("stream", "user"),))] == 0
    assert samples[("cdc_audit_last_verify_first_bad_seq", (("stream", "user"),))] == 2
    assert samples[("cdc_audit_last_verify_timestamp_seconds", (("stream", "user"),))] > first


def _jobs_and_up_follow_the_database(db: Database, metrics: Endpoint) -> None:
    """Jobs run on schedule; with the database refusing connections, scrapes say up 0 and
    the jobs fail; both recover with it."""
    runs = wait_value(
        metrics, "job runs", lambda v: v >= 2, "cdc_audit_job_runs_total", job_name="purge"
    )
    assert metrics.value("cdc_audit_job_failures_total", job_name="purge") is None
    with psycopg.connect(db.cluster.dsn(), autocommit=True) as admin:
        admin.execute(f'ALTER DATABASE "{db.name}" ALLOW_CONNECTIONS false')
        try:
            wait_value(metrics, "up 0", lambda v: v == 0, "cdc_audit_up")
            wait_value(
                metrics,
                "a job failure",
                lambda v: v >= 1,
                "cdc_audit_job_failures_total",
                job_name="purge",
            )
        finally:
            admin.execute(f'ALTER DATABASE "{db.name}" ALLOW_CONNECTIONS true')
    wait_value(metrics, "up 1", lambda v: v == 1, "cdc_audit_up")
    wait_value(
        metrics, "more job runs", lambda v: v > runs, "cdc_audit_job_runs_total", job_name="purge"
    )


def test_a_lost_slot_shows_then_stays_as_a_gap(
    installed: Database, workers: Workers, write_policy: WritePolicy
) -> None:
    slot = installed.scalar("SELECT value FROM cdc_audit.install_setting WHERE key = 'slot_name'")
    with installed.connect() as holder:
        # Holding the worker's lock keeps the worker a standby, so the slot can be dropped.
        holder.execute(
            "SELECT pg_advisory_lock(hashtextextended(%s, 0))", (f"cdc-audit worker {slot}",)
        )
        worker, metrics = workers.start()
        wait_value(metrics, "slot read", lambda v: v == 0, "cdc_audit_slot_lost")
        assert metrics.value("cdc_audit_worker_active") == 0
        assert metrics.get("/readyz")[1].startswith("standby")
        installed.execute("SELECT pg_drop_replication_slot(%s)", (slot,))
        wait_value(metrics, "slot lost", lambda v: v == 1, "cdc_audit_slot_lost")
        assert metrics.value("cdc_audit_lag_bytes") is None
    # The worker takes over, finds the slot gone, records the gap and stops.
    wait_for("the worker to exit", lambda: not worker.running())
    code, log = worker.stop()
    assert code == 3, log
    policy = write_policy(TABLES, JOBS)
    applied = run_cli("apply", "--dsn", installed.dsn, "--policy", str(policy))
    assert applied.returncode == 0, applied.stderr
    _, metrics = workers.start()
    wait_value(metrics, "a gap", lambda v: v == 1, "cdc_audit_gap_events", stream="user")
    assert metrics.value("cdc_audit_slot_lost") == 0


def test_status_json_gives_the_same_figures(
    installed: Database, signing_key: str, workers: Workers
) -> None:
    _write(installed, range(1, 4))
    _write(installed, range(4, 6), actor=None)
    env = _env(installed, CDC_AUDIT_SIGNING_KEY_FILE=signing_key)
    assert run_cli("worker", "--drain", env=env).returncode == 0
    assert run_cli("verify", env=env).returncode == 0
    report = _status(installed)
    # Keys that were there before stay.
    assert {"installed", "slot", "worker", "verification", "drift"} <= set(report)
    lag = report["lag"]
    assert lag["slot_lost"] is False and lag["worker_streaming"] is False
    assert lag["seconds"] is None  # no worker streams: nothing measures it
    assert lag["bytes"] >= 0 and lag["retained_wal_bytes"] > 0
    user = _stream(report, "user")
    assert user["events"] == user["last_seq"] == 5
    assert user["missing_context"] == 2 and user["gaps"] == 0
    assert user["last_checkpoint_at"] is not None
    assert user["last_verify"]["ok"] is True and user["last_verify"]["first_bad_seq"] is None

    # With a worker streaming, the server measures the lag; the counts match the metrics.
    _, metrics = workers.start(CDC_AUDIT_SIGNING_KEY_FILE=signing_key)
    _write(installed, range(6, 8), actor=None)
    wait_value(metrics, "sealed", lambda v: v == 2, "cdc_audit_events_sealed_total", stream="user")
    report = _status(installed)
    assert report["lag"]["worker_streaming"] is True
    assert 0 <= report["lag"]["seconds"] < 60
    user = _stream(report, "user")
    assert user["last_seq"] == 7 and user["missing_context"] == 4
    assert metrics.value("cdc_audit_events_missing_context_total", stream="user") == 2
    assert metrics.value("cdc_audit_gap_events", stream="user") == user["gaps"]
    checkpoint = metrics.value("cdc_audit_last_checkpoint_timestamp_seconds", stream="user")
    assert checkpoint is not None
    text = run_cli("status", env=_env(installed))
    assert text.returncode == 0, text.stderr
    assert "stream       user: 7 events, last seq 7, 4 missing context, 0 gaps" in text.stdout
    assert "bytes, " in text.stdout and "s behind commit" in text.stdout


def _status(db: Database) -> dict[str, Any]:
    result = run_cli("status", "--format", "json", env=_env(db))
    assert result.returncode == 0, result.stderr
    report: dict[str, Any] = json.loads(result.stdout)
    return report


def _stream(report: dict[str, Any], name: str) -> dict[str, Any]:
    found: list[dict[str, Any]] = [s for s in report["streams"] if s["stream"] == name]
    assert len(found) == 1, report["streams"]
    return found[0]
