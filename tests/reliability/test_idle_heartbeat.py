"""Scenario 5, idle audited tables: for a long run, tables that are not audited are busy (in the
audited database and in another database of the same cluster, whose WAL the slot must read
past too) while the audited tables stay idle. The slot's retained WAL stays small all along:
the worker confirms the server's WAL position when it is idle, and commits a heartbeat marker
when nothing could be confirmed for CDC_AUDIT_HEARTBEAT_SECONDS. The heartbeats put nothing
in the trail.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from ..integration.fix_policy import WritePolicy
from ..integration.pg import Database
from .harness import (
    SEED,
    Churn,
    WorkerProcess,
    create_database,
    install,
    lsn,
    sized,
    slot_name,
    wait_for,
)

pytestmark = pytest.mark.reliability

RUN_SECONDS = sized(20.0, 300.0)
HEARTBEAT = sized(2, 10)
"""CDC_AUDIT_HEARTBEAT_SECONDS (10 is the default)."""
SLACK = 6.0
"""Seconds of WAL the slot may hold beyond the heartbeat interval (status updates, a busy
machine)."""
CHURN = "INSERT INTO busy SELECT g, repeat('w', 200) FROM generate_series(1, 100) g"


def test_idle_audited_tables_do_not_make_the_slot_retain_wal(
    database: Database, write_policy: WritePolicy, tmp_path: Path
) -> None:
    db = database
    install(db, write_policy)
    slot = slot_name(db)
    db.execute("CREATE TABLE busy (n int, t text)")
    other = create_database(db.cluster, f"{db.name}_other")
    other.execute("CREATE TABLE busy (n int, t text)")
    with db.connect(autocommit=False) as conn:
        conn.execute("SELECT cdc_audit.set_context(actor_id => 'ops')")
        conn.execute("INSERT INTO acct VALUES (1, 1, 'the last audited change')")
        conn.commit()
    worker = WorkerProcess(
        db.dsn, tmp_path / "worker.log", CDC_AUDIT_HEARTBEAT_SECONDS=str(HEARTBEAT)
    )
    churns = [Churn(db.dsn, CHURN), Churn(other.dsn, CHURN)]
    samples: list[tuple[float, int, int]] = []
    """(seconds into the run, bytes after confirmed_flush_lsn, bytes after restart_lsn)"""
    try:
        wait_for(
            "the worker to seal the last audited change",
            lambda: db.scalar("SELECT count(*) FROM cdc_audit.event") == 1,
            60,
            worker.tail,
        )
        with db.connect() as conn:
            started_at = lsn(conn, "SELECT pg_current_wal_lsn()")
            for churn in churns:
                churn.start()
            started = time.monotonic()
            while (elapsed := time.monotonic() - started) < RUN_SECONDS:
                assert worker.running(), f"the worker exited:\n    {worker.tail()}"
                row = conn.execute(
                    "SELECT pg_current_wal_lsn() - confirmed_flush_lsn,"
                    " pg_current_wal_lsn() - restart_lsn FROM pg_replication_slots"
                    " WHERE slot_name = %s",
                    (slot,),
                ).fetchone()
                assert row is not None
                samples.append((elapsed, int(row[0]), int(row[1])))
                time.sleep(0.5)
            written = lsn(conn, "SELECT pg_current_wal_lsn()") - started_at
        for churn in churns:
            churn.finish()
        rate = written / RUN_SECONDS
        allowed = int(rate * (HEARTBEAT + SLACK))
        late = [(round(t, 1), c) for t, c, _ in samples if t > HEARTBEAT + SLACK and c > allowed]
        summary = (
            f"seed {SEED}: {written / 1e6:.1f} MB of WAL in {RUN_SECONDS:.0f}s"
            f" ({rate / 1e6:.2f} MB/s) by {sum(c.transactions for c in churns)} transactions"
            f" on tables not audited; heartbeat {HEARTBEAT}s; largest WAL held after"
            f" confirmed_flush_lsn {max(c for _, c, _ in samples) / 1e6:.2f} MB, after"
            f" restart_lsn {max(r for _, _, r in samples) / 1e6:.2f} MB"
        )
        print(f"\n{summary}")
        # Without heartbeats and idle confirmations the slot would hold all of it.
        assert written > 10_000_000, f"the other tables were not busy enough: {summary}"
        assert not late, (
            f"the slot held more than {allowed / 1e6:.2f} MB (heartbeat + {SLACK:.0f}s of WAL)"
            f" after confirmed_flush_lsn at (second, bytes): {late[:10]}\n{summary}"
        )
        # restart_lsn (what really pins WAL) follows: the server moves it at the next
        # running-transactions record (every 15 s, and at checkpoints).
        pinned = [(round(t, 1), r) for t, _, r in samples if t > 30 and r > allowed + rate * 30]
        assert not pinned, f"restart_lsn held WAL back at (second, bytes): {pinned[:10]}"
        # Idle again: the slot catches up with the server entirely.
        with db.connect() as conn:
            wait_for(
                "the slot to confirm the end of WAL",
                lambda: (
                    conn.execute(
                        "SELECT pg_current_wal_lsn() - confirmed_flush_lsn < 65536"
                        " FROM pg_replication_slots WHERE slot_name = %s",
                        (slot,),
                    ).fetchone()
                    == (True,)
                ),
                HEARTBEAT + 30,
                worker.tail,
            )
        events = db.scalar("SELECT count(*) FROM cdc_audit.event")
        assert events == 1, f"heartbeats put {events - 1} events in the trail"
        assert not worker.errors(), worker.errors()[:3]
    finally:
        for churn in churns:
            churn.stop.set()
        worker.stop()
        other.drop()
