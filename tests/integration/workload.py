"""A concurrent workload on an audited table, with the database's own record of what committed.

Every change to the audited table `acct` is made by a statement that also writes the change,
through a data-modifying CTE over its RETURNING rows, into the unaudited table `ledger`, in
the same transaction. Work that rolls back vanishes from both, so after the fact the ledger
says exactly which changes committed: (xid, kind, id, old n, new n), one row per row change.

`CommitWatcher` is a second oracle, by position: a pgoutput slot of its own on the same
publication, read through the SQL interface, that tells for every committed transaction with
audited changes its xid, the end LSN of its commit record and how many row changes it made.
"""

from __future__ import annotations

import random
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import psycopg

from .pg import Database

SCHEMA = """
CREATE TABLE acct (id bigint PRIMARY KEY, n int NOT NULL, pad text);
CREATE TABLE ledger (xid bigint NOT NULL, kind text NOT NULL, id bigint NOT NULL,
                     old_n int, new_n int);
"""

CONTEXT = "SELECT cdc_audit.set_context(actor_id => 'w1', reason => 'crash test')"
ACTOR = "w1"
REASON = "crash test"

_XID = "pg_current_xact_id()::text::bigint"
_LOG_INSERTS = f"INSERT INTO ledger SELECT {_XID}, 'insert', id, NULL, n FROM changed"
_LOG_UPDATES = f"INSERT INTO ledger SELECT {_XID}, 'update', id, n - %(delta)s, n FROM changed"
_LOG_DELETES = f"INSERT INTO ledger SELECT {_XID}, 'delete', id, n, NULL FROM changed"

INSERT_VALUES = (
    "WITH changed AS (INSERT INTO acct SELECT * FROM unnest(%(ids)s::bigint[], %(ns)s::int[],"
    " %(pads)s::text[]) RETURNING id, n) " + _LOG_INSERTS
)
INSERT_SERIES = (
    "WITH changed AS (INSERT INTO acct"
    " SELECT g, (g %% 997)::int, repeat(md5(g::text), (g %% 4)::int)"
    " FROM generate_series(%(lo)s::bigint, %(hi)s::bigint) g"
    " RETURNING id, n) " + _LOG_INSERTS
)
UPDATE_IDS = (
    "WITH changed AS (UPDATE acct SET n = n + %(delta)s WHERE id = ANY(%(ids)s::bigint[])"
    " RETURNING id, n) " + _LOG_UPDATES
)
UPDATE_RANGE = (
    "WITH changed AS (UPDATE acct SET n = n + %(delta)s, pad = 'big update'"
    " WHERE id BETWEEN %(lo)s AND %(hi)s RETURNING id, n) " + _LOG_UPDATES
)
DELETE_IDS = (
    "WITH changed AS (DELETE FROM acct WHERE id = ANY(%(ids)s::bigint[]) RETURNING id, n) "
    + _LOG_DELETES
)
SCRATCH = "CREATE TABLE scratch (id bigint PRIMARY KEY, n int NOT NULL);"
"""A second audited table for `op_truncate` (not part of SCHEMA: only suites that audit it)."""
INSERT_SCRATCH = (
    "WITH changed AS (INSERT INTO scratch SELECT g, (g %% 997)::int"
    " FROM generate_series(%(lo)s::bigint, %(hi)s::bigint) g RETURNING id, n) " + _LOG_INSERTS
)
LOG_TRUNCATE = f"INSERT INTO ledger VALUES ({_XID}, 'truncate', 0, NULL, NULL)"
LOG_COPIED = (
    f"INSERT INTO ledger SELECT {_XID}, 'insert', id, NULL, n FROM acct"
    " WHERE id BETWEEN %(lo)s AND %(hi)s"
)

# Text that COPY, JSON and the trail's own COPY must all carry faithfully.
AWKWARD = ["tab\there", "new\nline", "back\\slash", "quote ' \"", "é ✓ 日本", "", "\\N", "\r"]

BIG_ROWS = 20_000

OPERATIONS: tuple[tuple[str, int], ...] = (
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
)
"""The writers' operations (each one transaction, `_Writer.op_<name>`) and their weights."""


class _Rollback(Exception):
    """Raised inside a transaction block to roll it back on purpose."""


@dataclass
class WorkloadStats:
    committed: Counter[str] = field(default_factory=Counter)
    rolled_back: Counter[str] = field(default_factory=Counter)
    big_xids: list[int] = field(default_factory=list)


class _Writer:
    """One thread, one connection, its own range of ids (so threads never touch each other's
    rows and every row's history is linear)."""

    def __init__(
        self, workload: Workload, index: int, rng: random.Random, big: tuple[float, ...]
    ) -> None:
        self.workload = workload
        self.index = index
        self.rng = rng
        self.base = (index + 1) * 1_000_000_000
        self.next_id = self.base
        self.big_at = list(big)  # seconds after start for the large transactions
        self.big_lo: int | None = None
        self.conn: psycopg.Connection[Any] | None = None

    # ---- helpers

    def ids(self, count: int) -> list[int]:
        first = self.next_id
        self.next_id += count
        return list(range(first, first + count))

    def existing(self, count: int) -> list[int]:
        """Ids that may exist (rolled back or deleted ones are simply not matched)."""
        if self.next_id == self.base:
            return []
        return [self.rng.randrange(self.base, self.next_id) for _ in range(count)]

    def insert_values(self, cur: psycopg.Cursor[Any], count: int) -> None:
        ids = self.ids(count)
        ns = [self.rng.randrange(1000) for _ in ids]
        pads = [self.rng.choice(AWKWARD) + str(i) for i in ids]
        cur.execute(INSERT_VALUES, {"ids": ids, "ns": ns, "pads": pads})

    def update(self, cur: psycopg.Cursor[Any], count: int) -> None:
        ids = self.existing(count)
        cur.execute(UPDATE_IDS, {"ids": ids, "delta": self.rng.randint(1, 9)})

    def delete(self, cur: psycopg.Cursor[Any], count: int) -> None:
        cur.execute(DELETE_IDS, {"ids": self.existing(count)})

    def series(self, cur: psycopg.Cursor[Any], count: int) -> tuple[int, int]:
        ids = self.ids(count)
        cur.execute(INSERT_SERIES, {"lo": ids[0], "hi": ids[-1]})
        return ids[0], ids[-1]

    # ---- operations: each is one transaction that starts by setting the context

    def op_insert_one(self, cur: psycopg.Cursor[Any]) -> None:
        self.insert_values(cur, 1)

    def op_update_one(self, cur: psycopg.Cursor[Any]) -> None:
        self.update(cur, 1)

    def op_delete_one(self, cur: psycopg.Cursor[Any]) -> None:
        self.delete(cur, 1)

    def op_series(self, cur: psycopg.Cursor[Any]) -> None:
        self.series(cur, self.rng.randint(20, 150))

    def op_copy(self, cur: psycopg.Cursor[Any]) -> None:
        ids = self.ids(self.rng.randint(20, 200))
        with cur.copy("COPY acct (id, n, pad) FROM STDIN") as copy:
            for i in ids:
                copy.write_row((i, self.rng.randrange(1000), self.rng.choice(AWKWARD)))
        cur.execute(LOG_COPIED, {"lo": ids[0], "hi": ids[-1]})

    def op_mixed(self, cur: psycopg.Cursor[Any]) -> None:
        self.insert_values(cur, self.rng.randint(1, 5))
        self.update(cur, self.rng.randint(1, 8))
        self.delete(cur, self.rng.randint(1, 3))
        self.update(cur, self.rng.randint(1, 8))  # the same row twice in one transaction, too

    def op_savepoint_rolled_back(self, cur: psycopg.Cursor[Any]) -> None:
        self.insert_values(cur, 2)
        cur.execute("SAVEPOINT sp")
        self.series(cur, 30)
        self.update(cur, 5)
        self.delete(cur, 2)
        cur.execute("ROLLBACK TO SAVEPOINT sp")
        self.update(cur, 3)
        cur.execute("RELEASE SAVEPOINT sp")

    def op_savepoint_first(self, cur: psycopg.Cursor[Any]) -> None:
        # The first audited statement of the transaction is inside the savepoint that is
        # rolled back: its context message goes with it, and the next one must be sent again.
        cur.execute("SAVEPOINT first")
        self.insert_values(cur, 3)
        cur.execute("ROLLBACK TO SAVEPOINT first")
        self.insert_values(cur, 2)
        cur.execute("SAVEPOINT second")
        self.update(cur, 4)
        cur.execute("RELEASE SAVEPOINT second")  # a committed subtransaction
        self.series(cur, 25)

    def op_savepoint_error(self, cur: psycopg.Cursor[Any]) -> None:
        self.insert_values(cur, 2)
        conn = cur.connection
        try:
            with conn.transaction():  # psycopg: SAVEPOINT ... ROLLBACK TO SAVEPOINT on error
                self.update(cur, 3)
                dup = self.ids(1) * 2
                cur.execute(INSERT_VALUES, {"ids": dup, "ns": [1, 2], "pads": ["a", "b"]})
        except psycopg.errors.UniqueViolation:
            pass
        self.delete(cur, 2)

    def op_rollback(self, cur: psycopg.Cursor[Any]) -> None:
        self.series(cur, self.rng.randint(10, 100))
        self.update(cur, 5)
        self.delete(cur, 3)
        raise _Rollback

    def op_error(self, cur: psycopg.Cursor[Any]) -> None:
        self.insert_values(cur, 3)
        self.update(cur, 2)
        dup = self.ids(1) * 2
        cur.execute(INSERT_VALUES, {"ids": dup, "ns": [1, 2], "pads": ["a", "b"]})

    def op_truncate(self, cur: psycopg.Cursor[Any]) -> None:
        # Locked first: two writers that both inserted and then truncate would deadlock.
        cur.execute("LOCK TABLE scratch IN ACCESS EXCLUSIVE MODE")
        ids = self.ids(self.rng.randint(1, 20))
        cur.execute(INSERT_SCRATCH, {"lo": ids[0], "hi": ids[-1]})
        cur.execute("TRUNCATE scratch")
        cur.execute(LOG_TRUNCATE)
        self.insert_values(cur, 1)

    def op_big_insert(self, cur: psycopg.Cursor[Any]) -> None:
        self.big_lo, _ = self.series(cur, BIG_ROWS)
        self.workload.stats.big_xids.append(_xid(cur))

    def op_big_update(self, cur: psycopg.Cursor[Any]) -> None:
        assert self.big_lo is not None
        hi = self.big_lo + BIG_ROWS - 1
        cur.execute(UPDATE_RANGE, {"lo": self.big_lo, "hi": hi, "delta": 1})
        self.workload.stats.big_xids.append(_xid(cur))

    # ---- the loop

    def next_op(self, elapsed: float) -> str:
        if self.big_at and elapsed >= self.big_at[0]:
            self.big_at.pop(0)
            return "big_insert" if self.big_lo is None else "big_update"
        operations = self.workload.operations
        names = [name for name, _ in operations]
        return self.rng.choices(names, [weight for _, weight in operations])[0]

    def run(self) -> None:
        workload = self.workload
        with workload.db.connect() as conn:
            self.conn = conn
            started = time.monotonic()
            while not workload.stop.is_set():
                name = self.next_op(time.monotonic() - started)
                operation: Callable[[psycopg.Cursor[Any]], None] = getattr(self, f"op_{name}")
                try:
                    with conn.transaction(), conn.cursor() as cur:
                        cur.execute(CONTEXT)
                        operation(cur)
                except (_Rollback, psycopg.errors.UniqueViolation):
                    workload.count(workload.stats.rolled_back, name)
                else:
                    workload.count(workload.stats.committed, name)
                workload.stop.wait(self.rng.uniform(0.0, workload.pause))


def _xid(cur: psycopg.Cursor[Any]) -> int:
    row = cur.execute(f"SELECT {_XID}").fetchone()
    assert row is not None
    return int(row[0])


class Workload:
    """`threads` writers until `stop()`; `big` lists when (seconds after start) the first
    writer runs its large transactions: an insert of BIG_ROWS rows, then updates of them."""

    def __init__(
        self,
        db: Database,
        seed: int,
        threads: int = 3,
        pause: float = 0.03,
        big: tuple[float, ...] = (2.0,),
        operations: tuple[tuple[str, int], ...] = OPERATIONS,
    ) -> None:
        self.db = db
        self.pause = pause
        self.operations = operations
        self.stop = threading.Event()
        self.stats = WorkloadStats()
        self.errors: list[BaseException] = []
        self._lock = threading.Lock()
        self._writers = [
            _Writer(self, i, random.Random(seed * 100 + i), big if i == 0 else ())
            for i in range(threads)
        ]
        self._threads = [
            threading.Thread(target=self._run, args=(w,), name=f"writer-{w.index}", daemon=True)
            for w in self._writers
        ]

    def count(self, counter: Counter[str], name: str) -> None:
        with self._lock:
            counter[name] += 1

    def _run(self, writer: _Writer) -> None:
        try:
            writer.run()
        except BaseException as exc:  # reported by finish()
            self.errors.append(exc)
            self.stop.set()

    def backend_pids(self) -> set[int]:
        return {w.conn.info.backend_pid for w in self._writers if w.conn is not None}

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    def finish(self, timeout: float = 60.0) -> None:
        """Stop the writers and wait for them."""
        self.stop.set()
        for thread in self._threads:
            thread.join(timeout)
        alive = [t.name for t in self._threads if t.is_alive()]
        assert not alive, f"workload threads did not stop: {alive}"

    def raise_errors(self) -> None:
        """Raise what a writer raised, if any did."""
        if self.errors:
            error = self.errors[0]
            raise AssertionError(f"a workload thread failed: {error!r}") from error


@dataclass(frozen=True)
class Committed:
    xid: int
    end_lsn: int
    changes: int


class CommitWatcher:
    """Which transactions committed audited changes, and where their commit records end."""

    def __init__(self, db: Database, publication: str = "cdc_audit") -> None:
        self.db = db
        self.publication = publication
        self.slot = f"crash_watch_{uuid.uuid4().hex[:8]}"
        db.execute("SELECT pg_create_logical_replication_slot(%s, 'pgoutput')", (self.slot,))
        self.commits: dict[int, Committed] = {}

    def poll(self) -> dict[int, Committed]:
        """Consume everything decoded so far; returns all transactions seen since creation.

        Row for row, pgoutput sends one message per change: I(nsert), U(pdate), D(elete), and
        one T(runcate) per TRUNCATE of one table; the C(ommit) row's lsn is the end of the
        commit record, the position a worker confirms.
        """
        rows = self.db.execute(
            "SELECT xid::text::bigint,"
            " count(*) FILTER (WHERE get_byte(data, 0) IN (73, 85, 68, 84)),"
            " max(lsn - '0/0') FILTER (WHERE get_byte(data, 0) = 67)"
            " FROM pg_logical_slot_get_binary_changes(%s, NULL, NULL,"
            "  'proto_version', '1', 'publication_names', %s)"
            " GROUP BY 1",
            (self.slot, self.publication),
        )
        for xid, changes, end_lsn in rows:
            assert end_lsn is not None, f"transaction {xid} decoded without its commit"
            assert xid not in self.commits, f"transaction {xid} decoded twice by the watcher"
            self.commits[xid] = Committed(xid, int(end_lsn), changes)
        return self.commits
