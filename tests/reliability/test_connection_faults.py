"""Scenario 3, connection faults: the worker reaches PostgreSQL only through a TCP proxy that
drops its connections, stalls them and slows them down, while a workload commits. The worker
recovers on its own each time, and at every step the slot's `confirmed_flush_lsn` covers only
transactions that are in the trail, whole.

The check, `Observer.check`, reads the slot's confirmed position first, then the trail in one
snapshot, then which transactions committed audited changes and where their commit records
end (a pgoutput slot of the test's own, `CommitWatcher`). The worker commits a batch before it
confirms it, so every transaction whose commit ends at or below the position read first must
be in the snapshot read after it, with all its changes. Confirming past WAL that holds no
audited change is allowed (that is how an idle slot frees WAL).
"""

from __future__ import annotations

import random
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
import pytest

from ..integration.fix_policy import WritePolicy
from ..integration.pg import Database
from ..integration.workload import CommitWatcher, Workload
from .harness import (
    FULL,
    OPERATIONS_WITH_TRUNCATE,
    SEED,
    WorkerProcess,
    chain_problems,
    compare_with_ledger,
    confirmed_flush,
    install,
    lsn,
    sized,
    slot_name,
)
from .tcp_proxy import TcpProxy

pytestmark = pytest.mark.reliability

FAULTS = sized(6, 30)
RECOVERY_TIMEOUT = 90.0
"""Seconds a recovery may take: 30-40 s to notice a silent connection, the backoff (capped
at 30 s), a session start."""


@dataclass
class Observer:
    """Checks, step after step, that the slot never confirmed what the trail does not hold."""

    db: Database
    slot: str
    watcher: CommitWatcher
    conn: psycopg.Connection[Any]
    checks: int = 0
    last_confirmed: int = 0
    last_sealed: int = 0
    steps: list[str] = field(default_factory=list)

    def check(self, step: str) -> None:
        confirmed = confirmed_flush(self.conn, self.slot)
        with self.conn.transaction():
            self.conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
            sealed = lsn(self.conn, "SELECT end_lsn FROM cdc_audit.progress")
            in_trail = dict(
                self.conn.execute(
                    "SELECT xid, count(*) FROM cdc_audit.event"
                    " WHERE stream = 'user' AND table_name IS NOT NULL GROUP BY xid"
                ).fetchall()
            )
        commits = self.watcher.poll()
        problems = [
            f"xid {c.xid} ({c.changes} changes, commit ends at {c.end_lsn:X}): the slot"
            f" confirmed {confirmed:X} but the trail holds {in_trail.get(c.xid, 0)} of them"
            f" (sealed up to {sealed:X})"
            for c in commits.values()
            if c.end_lsn <= confirmed and in_trail.get(c.xid, 0) != c.changes
        ]
        if confirmed < self.last_confirmed:
            problems.append(
                f"confirmed_flush_lsn went back: {self.last_confirmed:X} -> {confirmed:X}"
            )
        if sealed < self.last_sealed:
            problems.append(f"progress went back: {self.last_sealed:X} -> {sealed:X}")
        assert not problems, (
            f"during {step}: confirmed an LSN that is not sealed:\n  "
            + "\n  ".join(problems[:10])
            + f"\nseed {SEED}; steps so far: {'; '.join(self.steps)}"
        )
        self.checks += 1
        self.last_confirmed, self.last_sealed = confirmed, sealed

    def watch(self, step: str, seconds: float) -> None:
        """Check continuously for `seconds`."""
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            self.check(step)
            time.sleep(0.25)

    def recover(self, step: str, worker: WorkerProcess) -> float:
        """Check until the worker confirmed past the WAL written now: it recovered."""
        target = lsn(self.conn, "SELECT pg_current_wal_lsn()")
        started = time.monotonic()
        while self.last_confirmed <= target:
            assert worker.running(), f"the worker exited after {step}:\n    {worker.tail()}"
            assert time.monotonic() - started < RECOVERY_TIMEOUT, (
                f"the worker did not recover within {RECOVERY_TIMEOUT:.0f}s after {step}"
                f" (confirmed {self.last_confirmed:X}, target {target:X}); seed {SEED}\n"
                f"    {worker.tail()}"
            )
            self.check(f"recovery after {step}")
            time.sleep(0.25)
        took = time.monotonic() - started
        self.steps.append(f"{step}: recovered in {took:.1f}s")
        return took


@pytest.fixture
def proxy(pg_cluster: Any) -> Iterator[TcpProxy]:
    proxy = TcpProxy(pg_cluster.port).start()
    try:
        yield proxy
    finally:
        proxy.close()


def test_the_worker_recovers_from_cut_stalled_and_slow_connections(
    database: Database, write_policy: WritePolicy, proxy: TcpProxy, tmp_path: Path
) -> None:
    install(database, write_policy)
    rng = random.Random(SEED)
    watcher = CommitWatcher(database)
    observer = Observer(database, slot_name(database), watcher, database.connect())
    workload = Workload(
        database, SEED, threads=2, pause=0.1, big=(3.0,), operations=OPERATIONS_WITH_TRUNCATE
    )
    worker = WorkerProcess(
        proxy.dsn(database.name),
        tmp_path / "worker.log",
        CDC_AUDIT_BATCH_MESSAGES=str(rng.choice((50, 500, 5000))),
    )
    recoveries: list[float] = []
    try:
        workload.start()
        recoveries.append(observer.recover("start", worker))
        for index in range(FAULTS):
            kind = ("drop", "stall", "slow", "drop while slow")[index % 4]
            step = f"fault {index}: {kind}"
            if kind == "drop":
                observer.watch(step, rng.uniform(0.0, 1.5))
                cut = proxy.drop()
                step += f" ({cut} connections)"
            elif kind == "stall":
                seconds = rng.uniform(1.0, sized(4.0, 15.0))
                proxy.stall(seconds)
                step += f" {seconds:.1f}s"
                observer.watch(step, seconds)
            else:
                proxy.slow(rng.uniform(0.01, 0.1), rng.choice((7, 64, 512)))
                observer.watch(step, rng.uniform(1.0, 3.0))
                if kind == "drop while slow":
                    proxy.drop()
                proxy.normal()
            recoveries.append(observer.recover(step, worker))
            workload.raise_errors()
    finally:
        workload.finish()
        proxy.normal()
    workload.raise_errors()
    observer.recover("the end of the workload", worker)
    code = worker.stop(signal.SIGTERM)
    observer.check("after the worker stopped")
    summary = (
        f"seed {SEED}: {FAULTS} faults, {proxy.accepted} connections through the proxy,"
        f" {proxy.dropped} cut, {observer.checks} checks; slowest recovery"
        f" {max(recoveries):.1f}s\n  " + "\n  ".join(observer.steps)
    )
    print(f"\n{summary}")
    assert code == 0, f"the worker exited {code} on SIGTERM\n    {worker.tail()}\n{summary}"
    assert not worker.errors(), f"the worker logged errors: {worker.errors()[:3]}\n{summary}"
    difference = compare_with_ledger(database)
    assert difference is None, f"{difference}\n{summary}"
    problems = chain_problems(database)
    assert not problems, "\n".join(problems) + f"\n{summary}"
    assert proxy.dropped >= FAULTS // 2, summary
    observer.conn.close()


def test_backends_a_dead_connection_left_on_the_server_do_not_block_the_worker(
    database: Database, write_policy: WritePolicy, proxy: TcpProxy, tmp_path: Path
) -> None:
    """The worker's connections fail on its side only: the server keeps their backends (as
    after a partition, until its TCP keepalive gives up, hours by default), and with them the
    worker's advisory lock and the slot. The worker ends them and goes on; it does not wait
    behind its own ghost as a standby."""
    install(database, write_policy)
    slot = slot_name(database)
    observer = Observer(database, slot, CommitWatcher(database), database.connect())
    worker = WorkerProcess(proxy.dsn(database.name), tmp_path / "worker.log")
    try:
        _commit(database, 1)
        observer.recover("start", worker)
        before = _worker_backends(observer.conn, slot)
        cut = proxy.drop_clients()
        _commit(database, 100)
        took = observer.recover(f"{cut} connections cut on the client side only", worker)
        left = before & _worker_backends(observer.conn, slot)
        code = worker.stop(signal.SIGTERM)
    finally:
        worker.stop()
        observer.conn.close()
    print(f"\nseed {SEED}: recovered in {took:.1f}s; {'; '.join(observer.steps)}")
    assert not left, f"backends of the dead session still on the server: {left}"
    assert code == 0, worker.tail()
    assert compare_with_ledger(database) is None, compare_with_ledger(database)


@pytest.mark.skipif(not FULL, reason="full form only: noticing the silence takes 30-40 s")
def test_a_replication_connection_that_goes_silent_is_given_up_and_replaced(
    database: Database, write_policy: WritePolicy, proxy: TcpProxy, tmp_path: Path
) -> None:
    """The proxy stops forwarding on the replication connection for good, without closing
    it: no error ever reaches the worker. It notices the silence by itself (it asks the
    server for a reply with each status update) and goes on with a new stream."""
    install(database, write_policy)
    slot = slot_name(database)
    observer = Observer(database, slot, CommitWatcher(database), database.connect())
    worker = WorkerProcess(proxy.dsn(database.name), tmp_path / "worker.log")
    try:
        _commit(database, 1)
        observer.recover("start", worker)
        port = observer.conn.execute(
            "SELECT client_port FROM pg_stat_activity WHERE pid ="
            " (SELECT active_pid FROM pg_replication_slots WHERE slot_name = %s)",
            (slot,),
        ).fetchone()
        assert port is not None
        assert proxy.blackhole(server_side_port=port[0]) == 1
        _commit(database, 100)
        took = observer.recover("a silent replication connection", worker)
        code = worker.stop(signal.SIGTERM)
    finally:
        worker.stop()
        observer.conn.close()
    print(f"\nseed {SEED}: recovered from a silent stream in {took:.1f}s")
    assert "connection presumed dead" in worker.text(), worker.tail()
    assert code == 0, worker.tail()
    assert compare_with_ledger(database) is None, compare_with_ledger(database)


def _worker_backends(conn: psycopg.Connection[Any], slot: str) -> set[tuple[int, Any]]:
    """(pid, backend_start) of the worker's trail connection and walsender."""
    rows = conn.execute(
        "SELECT pid, backend_start FROM pg_stat_activity WHERE application_name LIKE"
        " 'cdc-audit%%' OR pid = (SELECT active_pid FROM pg_replication_slots"
        " WHERE slot_name = %s)",
        (slot,),
    ).fetchall()
    return {(pid, started) for pid, started in rows}


def _commit(db: Database, first: int) -> None:
    """Ten audited inserts, with their ledger rows, in one transaction."""
    with db.connect(autocommit=False) as conn:
        conn.execute("SELECT cdc_audit.set_context(actor_id => 'w1', reason => 'blackhole')")
        conn.execute(
            "WITH changed AS (INSERT INTO acct SELECT g, 1, 'x'"
            " FROM generate_series(%s::bigint, %s::bigint) g RETURNING id, n)"
            " INSERT INTO ledger SELECT pg_current_xact_id()::text::bigint, 'insert', id,"
            " NULL, n FROM changed",
            (first, first + 9),
        )
        conn.commit()
