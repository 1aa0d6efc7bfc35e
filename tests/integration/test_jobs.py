"""Scheduled jobs in the worker (only the active one runs them) and incremental verify."""

from __future__ import annotations

import json
import os
import time
import urllib.request
from pathlib import Path

import pytest

from cdc_audit.ephemeral import free_port

from .fix_policy import WritePolicy
from .pg import Database, run_cli
from .test_worker import RunningWorker, ctx

TABLES = "  - {table: public.accounts, stream: user}\n"
JOBS = 'jobs: {verify: "*/15 * * * *"}\n'


@pytest.fixture
def installed(database: Database, write_policy: WritePolicy, tmp_path: Path) -> Database:
    database.execute("CREATE TABLE accounts (id int PRIMARY KEY, owner text)")
    policy = write_policy(TABLES, JOBS)
    assert run_cli("apply", "--dsn", database.dsn, "--policy", str(policy)).returncode == 0
    return database


def _env(db: Database, **extra: str) -> dict[str, str]:
    return {**os.environ, "CDC_AUDIT_DSN": db.dsn, **extra}


def _write(db: Database, ids: range) -> None:
    with db.connect(autocommit=False) as conn:
        for i in ids:
            ctx(conn, "alice", "test")
            conn.execute("INSERT INTO accounts VALUES (%s, 'x')", (i,))
            conn.commit()


def _job_runs(log: str) -> int:
    return sum(
        1 for line in log.splitlines() if '"msg":"job done"' in line and '"job":"verify"' in line
    )


def _wait_for(condition: object, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():  # type: ignore[operator]
            return
        time.sleep(0.2)
    raise AssertionError("timed out")


def test_only_the_active_worker_runs_the_jobs(installed: Database) -> None:
    env = _env(installed, CDC_AUDIT_JOBS_EVERY_SECONDS="0.5", CDC_AUDIT_HEARTBEAT_SECONDS="0.5")
    _write(installed, range(1, 4))
    active = RunningWorker(env)
    standby: RunningWorker | None = None
    try:
        _wait_for(lambda: installed.scalar("SELECT count(*) FROM cdc_audit.verification") > 0)
        standby = RunningWorker(env)
        time.sleep(3)
        code, active_log = active.stop()
        assert code == 0, active_log
        assert _job_runs(active_log) >= 2
        # The standby takes over, and only then runs the jobs.
        before = installed.scalar("SELECT count(*) FROM cdc_audit.verification")
        _wait_for(lambda: installed.scalar("SELECT count(*) FROM cdc_audit.verification") > before)
        code, standby_log = standby.stop()
        assert code == 0, standby_log
        takeover = standby_log.index("taking over as the active worker")
        assert _job_runs(standby_log[:takeover]) == 0
        assert _job_runs(standby_log[takeover:]) >= 1
    finally:
        active.stop()
        if standby is not None:
            standby.stop()


def test_verify_since_last_starts_after_the_last_verified_checkpoint(
    installed: Database, tmp_path: Path
) -> None:
    keys = tmp_path / "keys"
    assert run_cli("keygen", "--out", str(keys), env=_env(installed)).returncode == 0
    added = run_cli("keys", "add", str(keys / "signing_key.pub.pem"), env=_env(installed))
    assert added.returncode == 0
    signing = {"CDC_AUDIT_SIGNING_KEY_FILE": str(keys / "signing_key.pem")}
    _write(installed, range(1, 6))
    assert run_cli("worker", "--drain", env=_env(installed, **signing)).returncode == 0
    first = run_cli("verify", "--since-last", env=_env(installed))
    assert first.returncode == 0, first.stderr
    assert "stream user: ok: 5 events verified" in first.stdout
    _write(installed, range(6, 9))
    assert run_cli("worker", "--drain", env=_env(installed, **signing)).returncode == 0
    second = run_cli("verify", "--since-last", env=_env(installed))
    assert second.returncode == 0, second.stderr
    assert "stream user: ok: 3 events verified" in second.stdout
    rows = installed.execute(
        "SELECT first_seq, last_seq, checked, ok, signed_up_to FROM cdc_audit.verification"
        " ORDER BY id"
    )
    assert rows == [(1, 5, 5, True, 5), (6, 8, 3, True, 8)]
    # A change to what was not verified yet fails the next run, which records where.
    _write(installed, range(9, 12))
    assert run_cli("worker", "--drain", env=_env(installed, **signing)).returncode == 0
    installed.execute(
        "ALTER TABLE cdc_audit.event DISABLE TRIGGER USER;"
        "UPDATE cdc_audit.event SET actor_id = 'mallory' WHERE seq = 10;"
        "ALTER TABLE cdc_audit.event ENABLE TRIGGER USER"
    )
    third = run_cli("verify", "--since-last", env=_env(installed))
    assert third.returncode == 1
    assert "FAILED at seq 10: payload changed" in third.stdout
    assert installed.execute(
        "SELECT ok, first_bad_seq FROM cdc_audit.verification ORDER BY id DESC LIMIT 1"
    ) == [(False, 10)]
    # The next run starts from the last good checkpoint again, and fails again.
    assert run_cli("verify", "--since-last", env=_env(installed)).returncode == 1
    status = run_cli("status", "--format", "json", env=_env(installed))
    report = json.loads(status.stdout)
    assert report["verification"][0]["ok"] is False
    assert report["verification"][0]["first_bad_seq"] == 10


def test_the_worker_serves_its_metrics(installed: Database) -> None:
    port = free_port()
    env = _env(
        installed,
        CDC_AUDIT_METRICS_PORT=str(port),
        CDC_AUDIT_JOBS_EVERY_SECONDS="0.5",
        CDC_AUDIT_HEARTBEAT_SECONDS="0.5",
    )
    _write(installed, range(1, 4))
    worker = RunningWorker(env)
    try:

        def scrape() -> str:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as page:
                return str(page.read().decode())

        def ready() -> bool:
            try:
                text = scrape()
            except OSError:
                return False
            return 'cdc_audit_last_verify_ok{stream="user"} 1.0' in text

        _wait_for(ready)
        text = scrape()
        assert 'cdc_audit_events_sealed_total{stream="user"} 3.0' in text
        assert "cdc_audit_worker_active 1.0" in text
        assert 'cdc_audit_job_runs_total{job_name="verify"}' in text
        assert 'cdc_audit_last_verify_first_bad_seq{stream="user"} 0.0' in text
    finally:
        code, log = worker.stop()
    assert code == 0, log
