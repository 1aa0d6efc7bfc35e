"""Scenario 4, slot loss: the slot is dropped under a running worker, or invalidated by the
server (`max_slot_wal_keep_size`) while the worker is down. Either way changes were lost to
the trail, and it must say so: a `gap` event in every stream (once, however often the worker
is restarted), a worker that exits loudly with status 3 instead of resuming, `status`
showing the slot missing or lost, and the metrics `cdc_audit_slot_lost` and
`cdc_audit_gap_events` saying so. Resuming takes an operator: drop the broken slot, `apply`
(a new slot), and the worker seals from there on, the gap staying in the trail.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import psycopg
import pytest

from cdc_audit.metrics import WorkerCollector
from cdc_audit.pgoutput import format_lsn
from cdc_audit.worker import Worker, WorkerOptions

from ..integration.fix_policy import WritePolicy
from ..integration.pg import Database, run_cli
from .conftest import PrivateCluster
from .harness import (
    SEED,
    STREAMS,
    WorkerProcess,
    chain_problems,
    create_database,
    drain,
    gaps,
    install,
    sealed_up_to,
    slot_name,
    wait_for,
    worker_env,
)

pytestmark = pytest.mark.reliability

EXIT_GAP = 3


def _write(db: Database, first: int, count: int) -> None:
    with db.connect(autocommit=False) as conn:
        conn.execute("SELECT cdc_audit.set_context(actor_id => 'ops', reason => 'slot loss')")
        conn.execute(
            "INSERT INTO acct SELECT g, 1, 'x' FROM generate_series(%s::bigint, %s::bigint) g",
            (first, first + count - 1),
        )
        conn.commit()


def _status(db: Database) -> dict[str, Any]:
    result = run_cli("status", "--dsn", db.dsn, "--format", "json")
    assert result.returncode == 0, result.stderr
    report: dict[str, Any] = json.loads(result.stdout)
    return report


def _assert_alerts(db: Database, what: str) -> None:
    """The worker's metrics, read as a scrape would (from the database, at scrape time)."""
    collector = WorkerCollector(Worker(db.dsn, WorkerOptions()))
    samples = {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in collector.collect()
        for sample in family.samples
    }
    assert samples.get(("cdc_audit_up", ())) == 1, f"{what}: the scrape failed: {samples}"
    assert samples.get(("cdc_audit_slot_lost", ())) == 1, f"{what}: cdc_audit_slot_lost not 1"
    counted = {
        dict(labels)["stream"]: value
        for (name, labels), value in samples.items()
        if name == "cdc_audit_gap_events"
    }
    assert counted == dict.fromkeys(STREAMS, 1), f"{what}: cdc_audit_gap_events {counted}"


def _assert_gap_recorded(db: Database, slot: str, sealed: int, what: str) -> None:
    recorded = gaps(db)
    assert sorted(stream for stream, _, _ in recorded) == sorted(STREAMS), (
        f"{what}: gap events {recorded}, want one in each of {STREAMS} (seed {SEED})"
    )
    for stream, seq, new in recorded:
        assert new["slot"] == slot, f"gap in {stream} names slot {new['slot']}, not {slot}"
        assert new["sealed_up_to"] == format_lsn(sealed), (
            f"gap in {stream} (seq {seq}) says sealed up to {new['sealed_up_to']},"
            f" the progress row {format_lsn(sealed)}"
        )
        last = db.scalar("SELECT max(seq) FROM cdc_audit.event WHERE stream = %s", (stream,))
        assert seq == last, f"{what}: the worker went on after the gap in {stream}"


def _refuses_to_resume(db: Database, slot: str, sealed: int, what: str) -> None:
    """Started again, the worker exits 3 and records nothing more."""
    before = db.scalar("SELECT count(*) FROM cdc_audit.event")
    for attempt in range(2):
        result = run_cli("worker", env=worker_env(db.dsn))
        assert result.returncode == EXIT_GAP, (
            f"{what}: restart {attempt} exited {result.returncode}, not {EXIT_GAP}:\n"
            f"{result.stderr[-2000:]}"
        )
        assert "gap recorded" in result.stderr, result.stderr[-2000:]
    after = db.scalar("SELECT count(*) FROM cdc_audit.event")
    assert after == before, f"{what}: restarts recorded {after - before} more events"
    _assert_gap_recorded(db, slot, sealed, what)
    _assert_alerts(db, what)


def test_a_slot_dropped_under_a_running_worker_is_a_gap_not_a_silent_resume(
    database: Database, write_policy: WritePolicy, tmp_path: Path
) -> None:
    db = database
    policy = install(db, write_policy)
    slot = slot_name(db)
    worker = WorkerProcess(db.dsn, tmp_path / "worker.log", CDC_AUDIT_HEARTBEAT_SECONDS="1")
    try:
        _write(db, 1, 50)
        wait_for(
            "the worker to seal the first changes",
            lambda: db.scalar("SELECT count(*) FROM cdc_audit.event") == 50,
            60,
            worker.tail,
        )
        # The slot is busy while the worker streams: cut its walsender and drop the slot
        # in the moment before the worker reconnects.
        with db.connect() as conn:
            deadline = time.monotonic() + 60
            while True:
                conn.execute(
                    "SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots"
                    " WHERE slot_name = %s AND active_pid IS NOT NULL",
                    (slot,),
                )
                try:
                    conn.execute("SELECT pg_drop_replication_slot(%s)", (slot,))
                    break
                except psycopg.errors.ObjectInUse:
                    assert time.monotonic() < deadline, "could not drop the worker's slot"
        _write(db, 1000, 20)  # lost to the trail: no slot kept them
        code = worker.wait(60)
    finally:
        code = worker.stop()
    with db.connect() as conn:
        sealed = sealed_up_to(conn)
    assert code == EXIT_GAP, f"the worker exited {code}, not {EXIT_GAP}\n    {worker.tail()}"
    errors = worker.errors()
    assert any("gap recorded" in line for line in errors), (
        f"no loud error about the gap in the worker's log:\n    {worker.tail()}"
    )
    _assert_gap_recorded(db, slot, sealed, "slot dropped")
    _refuses_to_resume(db, slot, sealed, "slot dropped")
    report = _status(db)
    assert report["slot"] is None, f"status shows slot {report['slot']} after it was dropped"
    problems = chain_problems(db)
    assert not problems, "\n".join(problems)
    _resume_after_operator_action(db, policy, slot, lost=20)


def test_a_slot_invalidated_by_max_slot_wal_keep_size_is_a_gap(
    private_cluster: PrivateCluster, write_policy: WritePolicy
) -> None:
    cluster = private_cluster(max_slot_wal_keep_size="1MB")
    db = create_database(cluster, "invalidated")
    policy = install(db, write_policy)
    slot = slot_name(db)
    _write(db, 1, 50)
    assert drain(db.dsn).returncode == 0
    _write(db, 1000, 20)  # the worker is down: these wait in the slot's WAL...
    with db.connect() as conn:
        deadline = time.monotonic() + 120
        # ...which the server removes: past max_slot_wal_keep_size, a checkpoint invalidates
        # the slot.
        while conn.execute(
            "SELECT wal_status FROM pg_replication_slots WHERE slot_name = %s", (slot,)
        ).fetchone() != ("lost",):
            assert time.monotonic() < deadline, "the slot was not invalidated"
            conn.execute("CREATE TABLE IF NOT EXISTS filler (t text)")
            conn.execute("INSERT INTO filler SELECT repeat('x', 1000) FROM generate_series(1, 500)")
            conn.execute("SELECT pg_switch_wal()")
            conn.execute("CHECKPOINT")
    report = _status(db)
    assert report["slot"]["wal_status"] == "lost", f"status shows slot {report['slot']}"
    with db.connect() as conn:
        sealed = sealed_up_to(conn)
    result = run_cli("worker", env=worker_env(db.dsn))
    assert result.returncode == EXIT_GAP, (
        f"the worker exited {result.returncode}, not {EXIT_GAP}:\n{result.stderr[-2000:]}"
    )
    assert "gap recorded" in result.stderr and "lost" in result.stderr, result.stderr[-2000:]
    _assert_gap_recorded(db, slot, sealed, "slot invalidated")
    _refuses_to_resume(db, slot, sealed, "slot invalidated")
    problems = chain_problems(db)
    assert not problems, "\n".join(problems)
    db.execute("SELECT pg_drop_replication_slot(%s)", (slot,))
    _resume_after_operator_action(db, policy, slot, lost=20)


def _resume_after_operator_action(db: Database, policy: Path, slot: str, lost: int) -> None:
    """The documented way back: a new slot by apply; later changes are sealed after the gap."""
    applied = run_cli("apply", "--dsn", db.dsn, "--policy", str(policy))
    assert applied.returncode == 0, applied.stderr
    _write(db, 5000, 10)
    drained = drain(db.dsn)
    assert drained.returncode == 0, drained.stderr
    kinds = db.execute(
        "SELECT kind, count(*) FROM cdc_audit.event WHERE stream = 'user' AND seq >"
        " (SELECT seq FROM cdc_audit.event WHERE stream = 'user' AND kind = 'gap')"
        " GROUP BY kind"
    )
    assert kinds == [("insert", 10)], f"after the gap and a new slot, the trail has {kinds}"
    inserted = db.scalar("SELECT count(*) FROM cdc_audit.event WHERE kind = 'insert'")
    assert inserted == 60, f"{inserted} inserts in the trail: 60 sealed, {lost} lost in the gap"
    problems = chain_problems(db)
    assert not problems, "\n".join(problems)
