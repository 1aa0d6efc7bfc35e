"""What the reliability scenarios share: their size, the audited workload and its ledger, worker
processes, and the checks that say what was lost, duplicated or forged.

The workload (tests/integration/workload.py) writes every change to the audited tables and,
in the same transaction, a row of the unaudited `ledger`: the database's own record of what
committed, independent of the worker. A transaction that rolled back, or whose COMMIT never
made it because the server crashed, is in neither.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, TypeVar

import psycopg

from cdc_audit.ephemeral import EphemeralCluster, _run_as
from cdc_audit.verify import verify_stream

from ..integration.fix_policy import WritePolicy
from ..integration.pg import Database, run_cli
from ..integration.workload import (
    CONTEXT,
    SCHEMA,
    SCRATCH,
    Workload,
    _Rollback,
    _Writer,
)
from .scale import FULL

SEED = int(os.environ.get("CDC_AUDIT_RELIABILITY_SEED") or random.SystemRandom().randrange(10**9))
"""One seed per test session, in every failure message; CDC_AUDIT_RELIABILITY_SEED replays it."""

T = TypeVar("T")


def sized(bounded: T, full: T) -> T:
    """The bounded value (CI) or the full one (CDC_AUDIT_RELIABILITY=full)."""
    return full if FULL else bounded


TABLES = (
    "  - {table: public.acct, stream: user, old_values: full}\n"
    "  - {table: public.scratch, stream: user}\n"
)
STREAMS = ("admin", "user")
"""Every stream of the policy: a gap must be recorded in each."""

Row = tuple[int, str, int, int | None, int | None]
"""(xid, kind, id, old n, new n): one change, as the ledger and the trail both give it."""


def install(db: Database, write_policy: WritePolicy) -> Path:
    """The workload's tables, audited by a policy with two streams; returns the policy."""
    db.execute(SCHEMA + SCRATCH)
    policy = write_policy(tables=TABLES)
    applied = run_cli("apply", "--dsn", db.dsn, "--policy", str(policy))
    assert applied.returncode == 0, applied.stderr
    return policy


def create_database(cluster: EphemeralCluster, name: str) -> Database:
    with psycopg.connect(cluster.dsn(), autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}" TEMPLATE template0')
    return Database(name=name, cluster=cluster)


def slot_name(db: Database) -> str:
    return str(db.scalar("SELECT value FROM cdc_audit.install_setting WHERE key = 'slot_name'"))


# ------------------------------------------------------------------------------ the worker


def worker_env(dsn: str, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CDC_AUDIT_")}
    return {**env, "CDC_AUDIT_DSN": dsn, **extra}


class WorkerProcess:
    """`cdc-audit worker` in the background, logging to a file."""

    def __init__(self, dsn: str, log: Path, *args: str, **env: str) -> None:
        self.log = log
        with log.open("ab") as out:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "cdc_audit.cli", "worker", *args],
                env=worker_env(dsn, **env),
                stdout=out,
                stderr=out,
            )

    def running(self) -> bool:
        return self.process.poll() is None

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60.0) -> int:
        if self.running():
            self.process.send_signal(sig)
        try:
            return self.process.wait(timeout)
        finally:
            if self.running():
                self.process.kill()
                self.process.wait(30)

    def wait(self, timeout: float) -> int:
        return self.process.wait(timeout)

    def text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def tail(self, lines: int = 12) -> str:
        return "\n    ".join(self.text().splitlines()[-lines:])

    def errors(self) -> list[str]:
        return [
            line
            for line in self.text().splitlines()
            if '"level":"error"' in line or "Traceback" in line
        ]


def drain(dsn: str, timeout: float = 300.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "cdc_audit.cli", "worker", "--drain"],
        env=worker_env(dsn),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def wait_for(
    what: str, check: Callable[[], bool], timeout: float, context: Callable[[], str] = str
) -> float:
    """Poll `check` until true; returns the seconds it took. Fails with `what` and context."""
    started = time.monotonic()
    while not check():
        if time.monotonic() - started > timeout:
            raise AssertionError(f"{what}: not within {timeout:.0f}s\n{context()}")
        time.sleep(0.2)
    return time.monotonic() - started


# ------------------------------------------------------------------------------ positions


def lsn(conn: psycopg.Connection[Any], query: str, params: tuple[Any, ...] = ()) -> int:
    """An LSN-valued query as an integer (0 when NULL or no row)."""
    row = conn.execute(f"SELECT ({query}) - '0/0'".encode(), params or None).fetchone()
    return 0 if row is None or row[0] is None else int(row[0])


def confirmed_flush(conn: psycopg.Connection[Any], slot: str) -> int:
    return lsn(
        conn,
        "SELECT confirmed_flush_lsn FROM pg_replication_slots WHERE slot_name = %s",
        (slot,),
    )


def sealed_up_to(conn: psycopg.Connection[Any]) -> int:
    return lsn(conn, "SELECT end_lsn FROM cdc_audit.progress")


# ------------------------------------------------------------------------------ the oracle


def ledger(db: Database) -> Counter[Row]:
    return Counter(
        (int(xid), kind, int(id_), old_n, new_n)
        for xid, kind, id_, old_n, new_n in db.execute(
            "SELECT xid, kind, id, old_n, new_n FROM ledger"
        )
    )


def trail(db: Database) -> Counter[Row]:
    return Counter(
        (int(xid), kind, int(id_), _int(old_n), _int(new_n))
        for xid, kind, id_, old_n, new_n in db.execute(
            "SELECT xid, kind, coalesce((row_key ->> 'id')::bigint, 0), old ->> 'n', new ->> 'n'"
            " FROM cdc_audit.event WHERE stream = 'user' AND table_name IS NOT NULL"
        )
    )


def compare_with_ledger(db: Database) -> str | None:
    """None when the trail holds each committed change exactly once; else what differs."""
    expected, actual = ledger(db), trail(db)
    lost = expected - actual
    extra = actual - expected
    duplicated = Counter({row: n for row, n in extra.items() if row in expected})
    forged = Counter({row: n for row, n in extra.items() if row not in expected})
    if not (lost or duplicated or forged):
        return None
    return (
        f"the trail differs from the ledger ({sum(expected.values())} changes committed in"
        f" {len({r[0] for r in expected})} transactions, {sum(actual.values())} in the trail):"
        f"\n  lost {sum(lost.values())}: {_first(lost)}"
        f"\n  duplicated {sum(duplicated.values())}: {_first(duplicated)}"
        f"\n  forged or from a rolled-back transaction {sum(forged.values())}: {_first(forged)}"
        "\n  (rows are (xid, kind, id, old n, new n) x count)"
    )


def chain_problems(db: Database, streams: Iterable[str] = STREAMS) -> list[str]:
    """Each stream numbered 1..N without gaps and verified; the problems found."""
    problems = []
    with db.connect() as conn:
        for stream in streams:
            row = conn.execute(
                "SELECT count(*), coalesce(min(seq), 1), coalesce(max(seq), 0),"
                " count(DISTINCT seq) FROM cdc_audit.event WHERE stream = %s",
                (stream,),
            ).fetchone()
            assert row is not None
            count, low, high, distinct = row
            if (low, high, distinct) != (1, count, count):
                problems.append(
                    f"stream {stream}: {count} events numbered {low}..{high}"
                    f" ({distinct} distinct): not 1..N without gaps"
                )
            verdict = verify_stream(conn, "cdc_audit", stream)
            if not verdict.ok:
                problems.append(f"stream {stream}: verify failed: {verdict.problem}")
    return problems


def gaps(db: Database) -> list[tuple[str, int, dict[str, Any]]]:
    return [
        (stream, seq, new)
        for stream, seq, new in db.execute(
            "SELECT stream, seq, new FROM cdc_audit.event WHERE kind = 'gap' ORDER BY stream, seq"
        )
    ]


def _int(text: str | None) -> int | None:
    return None if text is None else int(text)


def _first(counter: Counter[Row], limit: int = 10) -> str:
    items = sorted(counter.items())[:limit]
    more = f" ... and {len(counter) - limit} more" if len(counter) > limit else ""
    return (", ".join(f"{row} x{n}" for row, n in items) + more) or "none"


# ------------------------------------------------------------------------------ workloads

OPERATIONS_WITH_TRUNCATE: tuple[tuple[str, int], ...] = (
    ("insert_one", 6),
    ("update_one", 6),
    ("delete_one", 3),
    ("series", 3),
    ("copy", 2),
    ("mixed", 4),
    ("savepoint_rolled_back", 2),
    ("savepoint_first", 2),
    ("savepoint_error", 2),
    ("rollback", 2),
    ("error", 1),
    ("truncate", 2),
)
"""Every operation of the workload, TRUNCATE included (each one transaction)."""


class ResilientWorkload(Workload):
    """The workload, but a writer whose connection breaks (the server crashed or restarts)
    reconnects and goes on. The ledger needs no care: a transaction whose COMMIT was cut off
    either committed with its ledger rows or vanished with them."""

    def __init__(self, db: Database, seed: int, **kwargs: Any) -> None:
        super().__init__(db, seed, **kwargs)
        self.reconnects = 0

    def _run(self, writer: _Writer) -> None:
        try:
            self._write_until_stopped(writer)
        except BaseException as exc:  # reported by raise_errors()
            self.errors.append(exc)
            self.stop.set()

    def _write_until_stopped(self, writer: _Writer) -> None:
        started = time.monotonic()
        while not self.stop.is_set():
            try:
                with self.db.connect() as conn:
                    writer.conn = conn
                    while not self.stop.is_set():
                        self._one(writer, conn, writer.next_op(time.monotonic() - started))
            except psycopg.OperationalError:
                with self._lock:
                    self.reconnects += 1
                self.stop.wait(0.2)

    def _one(self, writer: _Writer, conn: psycopg.Connection[Any], name: str) -> None:
        operation: Callable[[psycopg.Cursor[Any]], None] = getattr(writer, f"op_{name}")
        try:
            with conn.transaction(), conn.cursor() as cur:
                cur.execute(CONTEXT)
                operation(cur)
        except (_Rollback, psycopg.errors.UniqueViolation):
            self.count(self.stats.rolled_back, name)
        else:
            self.count(self.stats.committed, name)
        self.stop.wait(writer.rng.uniform(0.0, self.pause))


class Churn:
    """Writes to tables that are not audited, in a thread, until stopped."""

    def __init__(self, dsn: str, statement: str) -> None:
        self.dsn = dsn
        self.statement = statement
        self.stop = threading.Event()
        self.errors: list[BaseException] = []
        self.transactions = 0
        self.thread = threading.Thread(target=self._run, name="churn", daemon=True)

    def _run(self) -> None:
        try:
            with psycopg.connect(self.dsn, autocommit=True) as conn:
                while not self.stop.is_set():
                    conn.execute(self.statement.encode())
                    self.transactions += 1
                    self.stop.wait(0.02)
        except BaseException as exc:
            self.errors.append(exc)

    def start(self) -> Churn:
        self.thread.start()
        return self

    def finish(self) -> None:
        self.stop.set()
        self.thread.join(60)
        assert not self.thread.is_alive(), "the churn thread did not stop"
        assert not self.errors, f"the churn thread failed: {self.errors[0]!r}"


# ------------------------------------------------------------------------------ the server


def pg_ctl(cluster: EphemeralCluster, *args: str) -> subprocess.CompletedProcess[str]:
    """pg_ctl on a private cluster, as the account that owns it."""
    owner = _run_as()
    command = [str(cluster.bin_dir / "pg_ctl"), "-D", str(cluster.data_dir), *args]
    if owner is not None:
        command = ["runuser", "-u", owner.pw_name, "--", *command]
    return subprocess.run(command, capture_output=True, text=True, check=False, timeout=120)


def crash(cluster: EphemeralCluster) -> None:
    """`pg_ctl stop -m immediate`: no shutdown checkpoint; the restart runs crash recovery."""
    result = pg_ctl(cluster, "stop", "-m", "immediate", "-w", "-t", "60")
    assert result.returncode == 0, f"pg_ctl stop -m immediate failed: {result.stderr}"


def restart(cluster: EphemeralCluster) -> None:
    result = pg_ctl(cluster, "start", "-w", "-t", "120", "-l", str(cluster.log_file))
    assert result.returncode == 0, f"pg_ctl start failed: {result.stderr}\n{result.stdout}"
    cluster.pid = int((cluster.data_dir / "postmaster.pid").read_text().split()[0])
