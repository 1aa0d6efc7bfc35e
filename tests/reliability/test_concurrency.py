"""Scenario 9, concurrency: 16 writers, each with its own actor, run mixed transactions at once
(multi-statement, context changed mid-transaction, savepoints rolled back, whole transactions
rolled back) while the worker streams. Afterwards every event carries its own writer's context
(no cross-talk), every committed change is in the trail exactly once and nothing rolled back
is, and the trail's order is the commit order: commit_lsn never decreases with seq, a
transaction's events are contiguous, and the order of transactions is the one an independent
test_decoding slot reports.
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
from dataclasses import dataclass, field
from typing import Any

import psycopg
import pytest

from cdc_audit import installer
from cdc_audit.pgoutput import parse_lsn
from cdc_audit.policy import load_policy
from cdc_audit.verify import verify_stream

from ..integration.fix_policy import WritePolicy
from ..integration.pg import Database
from .scale import scaled

pytestmark = pytest.mark.reliability

WRITERS = 16
SECONDS = scaled(15.0, 60.0)
TABLES = "  - {table: public.conc, stream: user, old_values: full}\n"
SCHEMA_SQL = (
    "CREATE TABLE conc (id bigint PRIMARY KEY, actor text NOT NULL, note text, n int);"
    "ALTER TABLE conc REPLICA IDENTITY FULL"
)
Change = tuple[str, int]
"""(kind, row id)"""


@dataclass
class Committed:
    actor: str
    xid: int
    changes: list[Change]


@dataclass
class Writer:
    """One application thread: its own connection, actor and rows."""

    db: Database
    number: int
    stop: threading.Event
    seed: int
    committed: list[Committed] = field(default_factory=list)
    rolled_back: list[int] = field(default_factory=list)
    error: BaseException | None = None

    @property
    def actor(self) -> str:
        return f"writer-{self.number:02d} 'o\"k"

    def run(self) -> None:
        rnd = random.Random(self.seed)
        live: list[int] = []
        next_id = self.number * 10_000_000
        try:
            with self.db.connect() as conn:
                step = 0
                while not self.stop.is_set():
                    step += 1
                    next_id = self._transaction(conn, rnd, live, next_id, step)
        except BaseException as exc:
            self.error = exc

    def _context(self, conn: psycopg.Connection[Any], reason: str) -> None:
        conn.execute(
            "SELECT cdc_audit.set_context(actor_id => %s, reason => %s)", (self.actor, reason)
        )

    def _transaction(
        self, conn: psycopg.Connection[Any], rnd: random.Random, live: list[int], next_id: int,
        step: int,
    ) -> int:  # fmt: skip
        changes: list[Change] = []
        inserted: list[int] = []
        deleted: list[int] = []
        rollback = rnd.random() < 0.1
        try:
            with conn.transaction():
                reason = f"{self.actor}:{step}:a"
                self._context(conn, reason)
                for _ in range(rnd.randint(1, 3)):
                    action = rnd.choice(("insert", "insert", "update", "delete", "savepoint"))
                    if rnd.random() < 0.2:  # a new context mid-transaction
                        reason = f"{self.actor}:{step}:{len(changes)}"
                        self._context(conn, reason)
                    if action == "update" and live:
                        row = rnd.choice(live)
                        conn.execute(
                            "UPDATE conc SET note = %s, n = n + 1 WHERE id = %s", (reason, row)
                        )
                        changes.append(("update", row))
                    elif action == "delete" and live:
                        row = live.pop(rnd.randrange(len(live)))
                        deleted.append(row)
                        conn.execute("DELETE FROM conc WHERE id = %s", (row,))
                        changes.append(("delete", row))
                    elif action == "savepoint":
                        # A savepoint rolled back: its row must never appear.
                        try:
                            with conn.transaction():
                                conn.execute(
                                    "INSERT INTO conc VALUES (%s, %s, 'undone', 0)",
                                    (-next_id, self.actor),
                                )
                                conn.execute("SELECT 1/0")
                        except psycopg.errors.DivisionByZero:
                            pass
                    else:
                        rows = [next_id + i for i in range(rnd.randint(1, 3))]
                        next_id += len(rows)
                        conn.execute(
                            "INSERT INTO conc SELECT id, %s, %s, 0 FROM unnest(%s::bigint[]) id",
                            (self.actor, reason, rows),
                        )
                        inserted += rows
                        changes += [("insert", row) for row in rows]
                xid_row = conn.execute("SELECT pg_current_xact_id()::text").fetchone()
                assert xid_row is not None
                xid = int(xid_row[0])
                if rollback:
                    raise _RollBack
        except _RollBack:
            live.extend(deleted)
            self.rolled_back.append(xid)
            return next_id
        live.extend(inserted)
        self.committed.append(Committed(self.actor, xid, changes))
        return next_id


class _RollBack(Exception):
    pass


def _cli_env(db: Database) -> dict[str, str]:
    return {**os.environ, "CDC_AUDIT_DSN": db.dsn}


def _decoded_commit_order(db: Database, slot: str) -> list[int]:
    """xids of the transactions that changed `conc`, in the order test_decoding commits them."""
    order: list[int] = []
    current: int | None = None
    touched = False
    with db.connect() as conn:
        cursor = conn.execute(
            "SELECT data FROM pg_logical_slot_get_changes(%s, NULL, NULL, 'include-xids', '1',"
            " 'skip-empty-xacts', '1')",
            (slot,),
        )
        for (line,) in cursor:
            if line.startswith("BEGIN "):
                current, touched = int(line.split()[1]), False
            elif line.startswith("COMMIT "):
                if touched:
                    assert current is not None
                    order.append(current)
                current = None
            elif line.startswith("table public.conc:"):
                touched = True
    return order


@pytest.fixture
def trail(database: Database, write_policy: WritePolicy) -> Database:
    database.execute(SCHEMA_SQL)
    installer.apply(database.dsn, load_policy(write_policy(TABLES)))
    return database


def test_sixteen_writers_no_cross_talk_in_commit_order(trail: Database) -> None:
    trail.execute("SELECT pg_create_logical_replication_slot('conc_order', 'test_decoding')")
    worker = subprocess.Popen(
        [sys.executable, "-m", "cdc_audit.cli", "worker"],
        env=_cli_env(trail),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    stop = threading.Event()
    seed = random.randrange(10**6)
    writers = [Writer(trail, k, stop, seed + k) for k in range(WRITERS)]
    threads = [threading.Thread(target=w.run, name=f"writer-{w.number}") for w in writers]
    try:
        for thread in threads:
            thread.start()
        time.sleep(SECONDS)
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=60)
        worker.send_signal(signal.SIGTERM)
        try:
            _, worker_log = worker.communicate(timeout=60)
        finally:
            worker.kill()
    errors = [f"{w.actor}: {w.error!r}" for w in writers if w.error is not None]
    assert not errors, f"seed {seed}: writers failed: {errors}"
    assert worker.returncode == 0, worker_log[-2000:]
    drained = subprocess.run(
        [sys.executable, "-m", "cdc_audit.cli", "worker", "--drain"],
        env=_cli_env(trail),
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert drained.returncode == 0, drained.stderr
    committed = [c for w in writers for c in w.committed]
    assert len(committed) >= WRITERS * 5, f"only {len(committed)} transactions committed"

    events = trail.execute(
        "SELECT seq, commit_lsn::text, xid, kind, row_key, old, new, actor_id, reason,"
        " context_missing FROM cdc_audit.event WHERE stream = 'user' AND table_name = 'conc'"
        " ORDER BY seq"
    )
    where = f"seed {seed}, {len(committed)} transactions, {len(events)} events"

    # No cross-talk: each change carries the context of the writer whose row it is.
    forged = []
    for seq, _, _, kind, _, old, new, actor_id, reason, missing in events:
        row = new if kind != "delete" else old
        if missing or actor_id != row["actor"]:
            forged.append(f"seq {seq}: {kind} of {row['actor']}'s row by {actor_id!r}")
        elif kind != "delete" and reason != row["note"]:
            forged.append(f"seq {seq}: {kind} with reason {reason!r}, written as {row['note']!r}")
        elif kind != "delete" and not (reason or "").startswith(f"{actor_id}:"):
            forged.append(f"seq {seq}: {actor_id!r} with another writer's reason {reason!r}")
    assert not forged, f"{where}: context crossed between writers: {forged[:10]}"

    # Exactly once: the trail's changes per transaction are the ones each writer committed.
    by_xid: dict[int, Counter[Change]] = {}
    for _, _, xid, kind, row_key, *_ in events:
        by_xid.setdefault(int(xid), Counter())[(kind, int(row_key["id"]))] += 1
    expected = {c.xid: Counter(c.changes) for c in committed if c.changes}
    lost = sorted(set(expected) - set(by_xid))
    forged_txns = sorted(set(by_xid) - set(expected))
    differing = [x for x in expected if x in by_xid and by_xid[x] != expected[x]]
    rolled_back = {x for w in writers for x in w.rolled_back} & set(by_xid)
    assert not lost, f"{where}: committed transactions missing from the trail: {lost[:10]}"
    assert not rolled_back, f"{where}: rolled-back transactions in the trail: {sorted(rolled_back)}"
    assert not forged_txns, f"{where}: transactions nobody committed: {forged_txns[:10]}"
    assert not differing, (
        f"{where}: changes lost or duplicated in xids {differing[:5]}: "
        + "; ".join(f"{by_xid[x] - expected[x]} extra, {expected[x] - by_xid[x]} missing"
                    for x in differing[:3])
    )  # fmt: skip
    assert not any(e[4]["id"] < 0 for e in events), f"{where}: a rolled-back savepoint's row"

    # Commit order: LSNs ascend with seq, transactions are contiguous, and their order is the
    # one logical decoding itself reports.
    lsns = [parse_lsn(e[1]) for e in events]
    backwards = [events[i][0] for i in range(1, len(lsns)) if lsns[i] < lsns[i - 1]]
    assert not backwards, f"{where}: commit_lsn decreases at seq {backwards[:10]}"
    order = [int(e[2]) for e in events]
    runs = [x for i, x in enumerate(order) if i == 0 or x != order[i - 1]]
    interleaved = [x for x, n in Counter(runs).items() if n > 1]
    assert not interleaved, f"{where}: transactions interleaved in the trail: {interleaved[:10]}"
    decoded = [x for x in _decoded_commit_order(trail, "conc_order") if x in expected]
    assert runs == decoded, f"{where}: trail order differs from commit order" + _first_diff(
        runs, decoded
    )
    with trail.connect() as conn:
        verdict = verify_stream(conn, "cdc_audit", "user")
    assert verdict.ok, f"{where}: {verdict}"
    rolled = sum(len(w.rolled_back) for w in writers)
    print(f"{where}, {rolled} rolled back: every event with its writer's context, in commit order")


def _first_diff(trail_order: list[int], decoded: list[int]) -> str:
    for i, (a, b) in enumerate(zip(trail_order, decoded, strict=False)):
        if a != b:
            return f" at position {i}: trail xid {a}, decoding xid {b}"
    return f": {len(trail_order)} transactions in the trail, {len(decoded)} decoded"
