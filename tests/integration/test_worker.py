"""The worker against a real server: every committed change once, in commit order, with context."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psycopg
import pytest

from cdc_audit.verify import verify_stream

from .fix_policy import WritePolicy
from .pg import Database, run_cli

TABLES = """\
  - {table: public.accounts, stream: user}
  - {table: public.roles, stream: admin}
  - {table: public.measurements, stream: user}
"""
EXTRA = "app_events: {stream: user}\nddl: {stream: admin}\n"


class RunningWorker:
    """`cdc-audit worker` in the background, its log lines in a temporary file."""

    def __init__(self, env: dict[str, str]) -> None:
        self.log = tempfile.TemporaryFile(mode="w+")  # noqa: SIM115 (closed by stop)
        self.process = subprocess.Popen(
            [sys.executable, "-m", "cdc_audit.cli", "worker"], env=env, stderr=self.log
        )
        self.result: tuple[int, str] | None = None

    def running(self) -> bool:
        return self.process.poll() is None

    def stop(self, sig: int = signal.SIGTERM) -> tuple[int, str]:
        """Send `sig`, wait for the exit; (exit code, log). Idempotent."""
        if self.result is None:
            if self.running():
                self.process.send_signal(sig)
            try:
                code = self.process.wait(timeout=30)
            finally:
                self.process.kill()
                self.process.wait()
            self.log.seek(0)
            self.result = (code, self.log.read())
            self.log.close()
        return self.result


class Trail:
    """An installed database and the worker that seals it."""

    def __init__(self, db: Database, policy: Path) -> None:
        self.db = db
        self.policy = policy

    def env(self, **extra: str) -> dict[str, str]:
        return {**os.environ, "CDC_AUDIT_DSN": self.db.dsn, **extra}

    def apply(self, policy: Path | None = None) -> None:
        result = run_cli("apply", "--dsn", self.db.dsn, "--policy", str(policy or self.policy))
        assert result.returncode == 0, result.stderr

    def drain(self, **env: str) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            [sys.executable, "-m", "cdc_audit.cli", "worker", "--drain"],
            env=self.env(**env),
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert result.returncode == 0, result.stderr
        return result

    def start(self, **env: str) -> RunningWorker:
        return RunningWorker(self.env(**env))

    def events(self, where: str = "true") -> list[dict[str, Any]]:
        with self.db.connect() as conn:
            cursor = conn.execute(
                "SELECT stream, seq, kind, table_name, row_key, old, new, changed, actor_id,"
                " reason, context, context_missing, xid, commit_lsn"
                f" FROM cdc_audit.event WHERE {where} ORDER BY commit_lsn, stream, seq"
            )
            names = [c.name for c in cursor.description or []]
            return [dict(zip(names, row, strict=True)) for row in cursor.fetchall()]

    def rows(self, table: str) -> list[tuple[str, Any, Any]]:
        return [
            (e["kind"], e["row_key"], e["new"] or e["old"])
            for e in self.events(f"table_name = '{table}'")
        ]

    def assert_chains_verify(self) -> None:
        with self.db.connect() as conn:
            for stream in ("user", "admin"):
                verdict = verify_stream(conn, "cdc_audit", stream)
                assert verdict.ok, verdict

    def confirmed_flush(self) -> str:
        return str(
            self.db.scalar(
                "SELECT confirmed_flush_lsn FROM pg_replication_slots WHERE slot_name LIKE"
                " 'cdc_audit_%'"
            )
        )

    def wait_until_streaming(self) -> None:
        deadline = time.monotonic() + 30
        while not self.db.scalar(
            "SELECT coalesce(bool_or(active), false) FROM pg_replication_slots"
            " WHERE slot_name LIKE 'cdc_audit_%'"
        ):
            assert time.monotonic() < deadline, "the worker did not start streaming"
            time.sleep(0.1)

    def progress_end(self) -> str:
        return str(self.db.scalar("SELECT end_lsn FROM cdc_audit.progress"))


@pytest.fixture
def trail(database: Database, write_policy: WritePolicy) -> Trail:
    database.execute(
        "CREATE TABLE accounts (id int PRIMARY KEY, owner text, balance numeric, doc text);"
        "CREATE TABLE roles (id int PRIMARY KEY, name text);"
        "CREATE TABLE measurements (id int, at date, v int, PRIMARY KEY (id, at))"
        " PARTITION BY RANGE (at);"
        "CREATE TABLE measurements_2025 PARTITION OF measurements"
        " FOR VALUES FROM ('2025-01-01') TO ('2026-01-01');"
        "CREATE TABLE measurements_2026 PARTITION OF measurements"
        " FOR VALUES FROM ('2026-01-01') TO ('2027-01-01');"
        "CREATE TABLE unaudited (id int)"
    )
    t = Trail(database, write_policy(TABLES, EXTRA))
    t.apply()
    return t


def ctx(conn: psycopg.Connection[Any], actor: str, reason: str | None = None) -> None:
    conn.execute("SELECT cdc_audit.set_context(actor_id => %s, reason => %s)", (actor, reason))


def test_every_committed_change_once_in_commit_order_with_its_context(trail: Trail) -> None:
    with trail.db.connect(autocommit=False) as conn:
        ctx(conn, "alice", "opening")
        conn.execute("INSERT INTO accounts VALUES (1, 'alice', 10), (2, 'bob', 20), (3, 'c', 0)")
        conn.commit()
        ctx(conn, "bob")
        conn.execute("UPDATE accounts SET balance = balance + 1 WHERE id = 1")
        conn.execute("SAVEPOINT s1")
        conn.execute("UPDATE accounts SET balance = 999 WHERE id = 2")
        conn.execute("ROLLBACK TO SAVEPOINT s1")
        conn.execute("DELETE FROM accounts WHERE id = 3")
        conn.commit()
        ctx(conn, "mallory")
        conn.execute("INSERT INTO accounts VALUES (4, 'never', 0)")
        conn.rollback()
        ctx(conn, "carol")
        with conn.cursor().copy("COPY accounts (id, owner, balance) FROM STDIN") as copy:
            for i in range(10, 13):
                copy.write_row((i, f"copied {i}", "1.50"))
        conn.commit()
        ctx(conn, "dave", "cleanup")
        conn.execute("TRUNCATE accounts")
        conn.commit()
        conn.execute("INSERT INTO unaudited VALUES (1)")  # no context, not audited
        conn.commit()
    trail.drain()

    rows = trail.rows("accounts")
    assert rows == [
        ("insert", {"id": 1}, {"id": 1, "owner": "alice", "balance": "10", "doc": None}),
        ("insert", {"id": 2}, {"id": 2, "owner": "bob", "balance": "20", "doc": None}),
        ("insert", {"id": 3}, {"id": 3, "owner": "c", "balance": "0", "doc": None}),
        ("update", {"id": 1}, {"id": 1, "owner": "alice", "balance": "11", "doc": None}),
        ("delete", {"id": 3}, {"id": 3, "owner": "c", "balance": "0", "doc": None}),
        ("insert", {"id": 10}, {"id": 10, "owner": "copied 10", "balance": "1.50", "doc": None}),
        ("insert", {"id": 11}, {"id": 11, "owner": "copied 11", "balance": "1.50", "doc": None}),
        ("insert", {"id": 12}, {"id": 12, "owner": "copied 12", "balance": "1.50", "doc": None}),
        ("truncate", None, {"cascade": False, "restart_identity": False}),
    ]
    actors = [(e["kind"], e["actor_id"], e["reason"]) for e in trail.events("stream = 'user'")]
    assert actors == [
        *[("insert", "alice", "opening")] * 3,
        ("update", "bob", None),
        ("delete", "bob", None),
        *[("insert", "carol", None)] * 3,
        ("truncate", "dave", "cleanup"),
    ]
    update = trail.events("kind = 'update'")[0]
    assert update["changed"] == ["balance"]
    assert update["old"]["balance"] == "10"
    # Commit order: LSNs never go down along a stream's sequence numbers.
    seqs = trail.events("stream = 'user'")
    assert [e["seq"] for e in seqs] == list(range(1, len(seqs) + 1))
    trail.assert_chains_verify()


def test_context_missing_is_recorded_not_dropped(trail: Trail) -> None:
    with trail.db.connect(autocommit=False) as conn:
        conn.execute("INSERT INTO accounts VALUES (1, 'x', 1)")
        conn.commit()
        conn.execute("SET session_replication_role = replica")  # bypasses every trigger
        ctx(conn, "eve")
        conn.execute("INSERT INTO accounts VALUES (2, 'y', 2)")
        conn.commit()
    trail.drain()
    events = trail.events("table_name = 'accounts'")
    assert [(e["row_key"]["id"], e["actor_id"], e["context_missing"]) for e in events] == [
        (1, None, True),
        (2, None, True),
    ]


def test_partitioned_table_changes_arrive_under_the_root(trail: Trail) -> None:
    with trail.db.connect(autocommit=False) as conn:
        ctx(conn, "sensor")
        conn.execute("INSERT INTO measurements VALUES (1, '2025-06-01', 5), (1, '2026-02-01', 6)")
        conn.commit()
        ctx(conn, "direct")
        conn.execute("UPDATE measurements_2026 SET v = 7")  # straight into a partition
        conn.commit()
    trail.drain()
    events = trail.events("table_name = 'measurements'")
    assert [(e["kind"], e["row_key"], e["new"]["v"], e["actor_id"]) for e in events] == [
        ("insert", {"id": 1, "at": "2025-06-01"}, 5, "sensor"),
        ("insert", {"id": 1, "at": "2026-02-01"}, 6, "sensor"),
        ("update", {"id": 1, "at": "2026-02-01"}, 7, "direct"),
    ]


def test_columns_added_dropped_and_renamed_mid_stream(trail: Trail) -> None:
    with trail.db.connect(autocommit=False) as conn:
        ctx(conn, "a")
        conn.execute("INSERT INTO accounts VALUES (1, 'before', 1)")
        conn.commit()
        conn.execute("ALTER TABLE accounts ADD COLUMN tier text DEFAULT 'gold'")
        conn.commit()
        ctx(conn, "a")
        conn.execute("INSERT INTO accounts VALUES (2, 'added', 2)")
        conn.commit()
        conn.execute("ALTER TABLE accounts RENAME COLUMN owner TO holder")
        conn.execute("ALTER TABLE accounts DROP COLUMN doc")
        conn.commit()
        ctx(conn, "a")
        conn.execute("UPDATE accounts SET holder = 'renamed' WHERE id = 1")
        conn.commit()
    trail.drain()
    news = [e["new"] for e in trail.events("table_name = 'accounts'")]
    assert news == [
        {"id": 1, "owner": "before", "balance": "1", "doc": None},
        {"id": 2, "owner": "added", "balance": "2", "doc": None, "tier": "gold"},
        {"id": 1, "holder": "renamed", "balance": "1", "tier": "gold"},
    ]
    ddl = [e["new"] for e in trail.events("kind = 'ddl'")]
    assert [d["command_tag"] for d in ddl] == ["ALTER TABLE"] * 4  # add, rename, drop column
    dropped = [d["dropped"] for d in ddl if "dropped" in d]
    assert [o["object_identity"] for o in dropped[0]] == ["public.accounts.doc"]
    trail.assert_chains_verify()


def test_a_large_toasted_value_is_kept_whole_when_another_column_changes(trail: Trail) -> None:
    big = "".join(chr(0x41 + (i * 7919) % 26) for i in range(1_000_000))  # not compressible much
    with trail.db.connect(autocommit=False) as conn:
        ctx(conn, "t")
        conn.execute("INSERT INTO accounts VALUES (1, 'toast', 1, %s)", (big,))
        conn.commit()
        ctx(conn, "t")
        conn.execute("UPDATE accounts SET balance = 2 WHERE id = 1")
        conn.commit()
    trail.drain()
    update = trail.events("kind = 'update'")[0]
    assert update["changed"] == ["balance"]
    assert update["new"]["doc"] == big
    assert update["old"]["doc"] == big
    trail.assert_chains_verify()


def test_app_events_and_ddl_reach_their_streams(trail: Trail) -> None:
    with trail.db.connect(autocommit=False) as conn:
        ctx(conn, "u7")
        conn.execute("SELECT cdc_audit.log_event('auth.login.succeeded', 'web')")
        conn.commit()
        ctx(conn, "u8")
        conn.execute(
            "SELECT cdc_audit.log_event('auth.login.failed', 'web', 'failure', '{\"ip\": 1}',"
            " durable => true)"
        )
        conn.execute("SELECT cdc_audit.log_event('never.recorded', 'web')")
        conn.rollback()  # the durable one survives, the other does not
        ctx(conn, "dba", "ticket 1")
        conn.execute("CREATE INDEX accounts_owner ON accounts (owner)")
        conn.commit()
    trail.drain()
    apps = trail.events("kind = 'app'")
    assert [(e["new"]["action"], e["actor_id"], e["new"]["outcome"]) for e in apps] == [
        ("auth.login.succeeded", "u7", "success"),
        ("auth.login.failed", "u8", "failure"),
    ]
    assert apps[1]["new"]["details"] == {"ip": 1}
    assert apps[1]["xid"] is None  # non-transactional: survived the rollback
    ddl = trail.events("kind = 'ddl'")
    assert [(e["stream"], e["new"]["command_tag"], e["actor_id"]) for e in ddl] == [
        ("admin", "CREATE INDEX", "dba")
    ]
    trail.assert_chains_verify()


def test_restart_seals_nothing_twice(trail: Trail) -> None:
    with trail.db.connect(autocommit=False) as conn:
        ctx(conn, "a")
        conn.execute("INSERT INTO accounts SELECT g, 'o' FROM generate_series(1, 50) g")
        conn.commit()
    trail.drain()
    trail.drain()
    with trail.db.connect(autocommit=False) as conn:
        ctx(conn, "a")
        conn.execute("DELETE FROM accounts WHERE id <= 10")
        conn.commit()
    trail.drain()
    kinds = [e["kind"] for e in trail.events("table_name = 'accounts'")]
    assert kinds == ["insert"] * 50 + ["delete"] * 10
    assert trail.confirmed_flush() >= trail.progress_end()
    trail.assert_chains_verify()
    status = run_cli("--dsn", trail.db.dsn, "status", "--format", "json")
    worker = json.loads(status.stdout)["worker"]
    assert worker["sealed_up_to"] == trail.progress_end()
    assert 0 <= worker["lag_seconds"] < 60
    assert "sealed up to" in run_cli("--dsn", trail.db.dsn, "status").stdout


@pytest.mark.parametrize("failpoint", ["before_commit:3", "after_commit:3"])
def test_a_crash_inside_a_large_transaction_resumes_exactly_where_it_stopped(
    trail: Trail, failpoint: str
) -> None:
    with trail.db.connect(autocommit=False) as conn:
        ctx(conn, "bulk", "migration")
        conn.execute("INSERT INTO accounts SELECT g, 'o' || g FROM generate_series(1, 2000) g")
        conn.execute("INSERT INTO roles VALUES (1, 'admin')")
        conn.commit()
    crashed = subprocess.run(
        [sys.executable, "-m", "cdc_audit.cli", "worker", "--drain"],
        env=trail.env(CDC_AUDIT_BATCH_MESSAGES="300", CDC_AUDIT_FAILPOINT=failpoint),
        capture_output=True,
        timeout=120,
        check=False,
    )
    assert crashed.returncode == -signal.SIGKILL
    partial = trail.db.scalar("SELECT count(*) FROM cdc_audit.event")
    assert 0 < partial < 2001
    trail.drain(CDC_AUDIT_BATCH_MESSAGES="300")
    ids = [e["row_key"]["id"] for e in trail.events("table_name = 'accounts'")]
    assert sorted(ids) == list(range(1, 2001))
    assert len(trail.events("table_name = 'roles'")) == 1
    trail.assert_chains_verify()


def test_sigterm_finishes_the_batch_confirms_and_exits_zero(trail: Trail) -> None:
    worker = trail.start()
    try:
        with trail.db.connect(autocommit=False) as conn:
            for i in range(20):
                ctx(conn, "w")
                conn.execute("INSERT INTO accounts VALUES (%s, 'x')", (i,))
                conn.commit()
        deadline = time.monotonic() + 30
        while trail.db.scalar("SELECT count(*) FROM cdc_audit.event") < 20:
            assert time.monotonic() < deadline, "the worker did not seal the changes"
            time.sleep(0.1)
    finally:
        code, log = worker.stop(signal.SIGTERM)
    assert code == 0, log
    assert '"msg":"stopping: batch written and confirmed"' in log
    assert trail.confirmed_flush() >= trail.progress_end()
    assert (
        trail.db.scalar(
            "SELECT active FROM pg_replication_slots WHERE slot_name LIKE 'cdc_audit_%'"
        )
        is False
    )


def test_a_standby_takes_over_when_the_active_worker_dies(trail: Trail) -> None:
    first = trail.start()
    trail.wait_until_streaming()
    second = trail.start()
    try:
        time.sleep(2)
        assert first.running() and second.running()
        first.stop(signal.SIGKILL)
        with trail.db.connect(autocommit=False) as conn:
            ctx(conn, "after")
            conn.execute("INSERT INTO accounts VALUES (1, 'sealed by the standby')")
            conn.commit()
        deadline = time.monotonic() + 30
        while trail.db.scalar("SELECT count(*) FROM cdc_audit.event") < 1:
            assert time.monotonic() < deadline, "the standby did not take over"
            time.sleep(0.2)
    finally:
        first.stop(signal.SIGKILL)
        code, log = second.stop()
    assert code == 0, log
    assert "standby: another worker is active" in log
    assert "taking over as the active worker" in log


def test_drain_while_a_worker_runs_waits_for_it(trail: Trail) -> None:
    active = trail.start()
    try:
        trail.wait_until_streaming()
        with trail.db.connect(autocommit=False) as conn:
            ctx(conn, "x")
            conn.execute("INSERT INTO accounts VALUES (1, 'y')")
            conn.commit()
        result = trail.drain()
        assert "drained by the active worker" in result.stderr
        assert trail.db.scalar("SELECT count(*) FROM cdc_audit.event") == 1
    finally:
        active.stop()


def test_a_lost_slot_is_a_recorded_gap_and_the_worker_refuses_to_resume(trail: Trail) -> None:
    with trail.db.connect(autocommit=False) as conn:
        ctx(conn, "x", "r")
        conn.execute("INSERT INTO accounts VALUES (1, 'y')")
        conn.execute("INSERT INTO roles VALUES (1, 'y')")
        conn.commit()
    trail.drain()
    slot = trail.db.scalar(
        "SELECT slot_name FROM pg_replication_slots WHERE slot_name LIKE 'cdc_audit_%'"
    )
    trail.db.execute("SELECT pg_drop_replication_slot(%s)", (slot,))
    for _ in range(2):
        result = run_cli("worker", env=trail.env())
        assert result.returncode == 3
        assert "does not exist" in result.stderr
        assert "gap recorded" in result.stderr
    gaps = trail.events("kind = 'gap'")
    assert sorted(e["stream"] for e in gaps) == ["admin", "user"]  # once each, not per attempt
    assert gaps[0]["new"]["slot"] == slot
    trail.assert_chains_verify()


def test_a_policy_applied_while_streaming_takes_effect_at_that_point(
    trail: Trail, write_policy: WritePolicy
) -> None:
    with trail.db.connect(autocommit=False) as conn:
        ctx(conn, "a")
        conn.execute("INSERT INTO accounts VALUES (1, 'visible', 1)")
        conn.commit()
    trail.drain()
    stricter = TABLES.replace(
        "{table: public.accounts, stream: user}",
        "{table: public.accounts, stream: user, exclude: [doc], redact: {owner: mask}}",
    )
    with trail.db.connect(autocommit=False) as conn:
        ctx(conn, "a")
        conn.execute("UPDATE accounts SET owner = 'old rules' WHERE id = 1")
        conn.commit()
    trail.apply(write_policy(stricter, EXTRA))
    with trail.db.connect(autocommit=False) as conn:
        ctx(conn, "a")
        conn.execute("UPDATE accounts SET owner = 'new rules' WHERE id = 1")
        conn.commit()
    trail.drain()
    news = [e["new"] for e in trail.events("table_name = 'accounts'")]
    assert news[1] == {"id": 1, "owner": "old rules", "balance": "1", "doc": None}
    assert news[2] == {"id": 1, "owner": "***", "balance": "1"}


def test_idle_audited_tables_do_not_hold_wal_back(trail: Trail) -> None:
    worker = trail.start(CDC_AUDIT_HEARTBEAT_SECONDS="1")
    try:
        start = trail.db.scalar("SELECT pg_current_wal_lsn()")
        with trail.db.connect(autocommit=False) as conn:
            for _ in range(30):
                conn.execute("INSERT INTO unaudited SELECT generate_series(1, 2000)")
                conn.commit()
                time.sleep(0.1)
        deadline = time.monotonic() + 30
        while True:
            retained = trail.db.scalar(
                "SELECT pg_current_wal_lsn() - confirmed_flush_lsn FROM pg_replication_slots"
                " WHERE slot_name LIKE 'cdc_audit_%'"
            )
            if retained < 64 * 1024:
                break
            assert time.monotonic() < deadline, f"the slot still retains {retained} bytes"
            time.sleep(0.5)
        written = trail.db.scalar("SELECT pg_current_wal_lsn() - %s::pg_lsn", (start,))
        assert written > 1_000_000  # the other table really was busy
    finally:
        worker.stop()


def test_hostile_values_are_stored_faithfully_and_verify(trail: Trail) -> None:
    trail.db.execute("CREATE TABLE docs (id int PRIMARY KEY, j json, t text)")
    policy = trail.policy.read_text().replace(
        "tables:\n", "tables:\n  - {table: public.docs, stream: user}\n"
    )
    trail.policy.write_text(policy)
    trail.apply()
    nasty = "quote ' \" back \\ tab \t cr \r lf \n sep \u2028 end"
    values = [
        (1, '{"a": 1e3, "b": -0, "c": 1.0E-3, "d": 2.50}', nasty),
        (2, '["nul \\u0000 inside"]', "x" * 1_000_000),
        (3, '{"k": 1, "k": 2}', "{}"),
        (4, "[1e999999]", "\\N"),
    ]
    with trail.db.connect(autocommit=False) as conn:
        ctx(conn, nasty, nasty)
        for row in values:
            conn.execute("INSERT INTO docs VALUES (%s, %s, %s)", row)
        conn.commit()
    trail.drain()
    events = trail.events("table_name = 'docs'")
    assert [e["new"]["j"] for e in events] == [
        {"a": 1000, "b": 0, "c": 0.001, "d": 2.5},  # psycopg reads jsonb numbers as floats
        '["nul \\u0000 inside"]',  # jsonb cannot hold \u0000: kept as the text
        '{"k": 1, "k": 2}',  # duplicate keys: kept as the text
        "[1e999999]",  # beyond numeric: kept as the text
    ]
    assert [e["new"]["t"] for e in events] == [nasty, "x" * 1_000_000, "{}", "\\N"]
    assert all(e["actor_id"] == nasty and e["reason"] == nasty for e in events)
    with trail.db.connect() as conn:
        exact = conn.execute(
            "SELECT new -> 'j' ->> 'c', new -> 'j' ->> 'd' FROM cdc_audit.event"
            " WHERE row_key = '{\"id\": 1}'"
        ).fetchone()
    assert exact == ("0.0010", "2.50")
    trail.assert_chains_verify()


def test_the_worker_runs_as_a_least_privileged_role(trail: Trail) -> None:
    trail.db.execute("CREATE ROLE sealer LOGIN REPLICATION IN ROLE cdc_audit_writer")
    try:
        with trail.db.connect(autocommit=False) as conn:
            ctx(conn, "a")
            conn.execute("INSERT INTO accounts VALUES (1, 'x')")
            conn.commit()
        result = run_cli(
            "worker", "--drain", env=trail.env(CDC_AUDIT_DSN=trail.db.dsn_as("sealer"))
        )
        assert result.returncode == 0, result.stderr
        assert len(trail.events("table_name = 'accounts'")) == 1
        trail.assert_chains_verify()
        # The trail is append-only for it too.
        with (
            psycopg.connect(trail.db.dsn_as("sealer")) as conn,
            pytest.raises(psycopg.errors.InsufficientPrivilege),
        ):
            conn.execute("UPDATE cdc_audit.event SET actor_id = 'forged'")
    finally:
        trail.db.execute("DROP OWNED BY sealer; DROP ROLE sealer")


def test_a_role_without_the_writer_grants_gets_one_line_and_exit_3(trail: Trail) -> None:
    trail.db.execute("CREATE ROLE outsider LOGIN REPLICATION")
    try:
        result = run_cli(
            "worker", "--drain", env=trail.env(CDC_AUDIT_DSN=trail.db.dsn_as("outsider"))
        )
        assert result.returncode == 3
        assert result.stderr.startswith("cdc-audit: ") and "permission denied" in result.stderr
        assert "Traceback" not in result.stderr
    finally:
        trail.db.execute("DROP OWNED BY outsider; DROP ROLE outsider")
