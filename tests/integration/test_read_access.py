"""Readers and auditors: what each role can read of the trail, by any SQL, and reads recorded."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import psycopg
import pytest

from .fix_policy import WritePolicy
from .pg import Database, run_cli

POLICY = """\
version: 1
schema: cdc_audit
streams:
  user: {readers: true}
  admin: {}
tables:
  - {table: public.accounts, stream: user}
ddl: {stream: admin}
app_events: {stream: user}
read_audit: {stream: admin}
"""

SECRET = "s3cr3t-admin-value"
CLIENT = "10.9.8.7"

EVENT = (
    "INSERT INTO cdc_audit.event (stream, seq, event_id, commit_time, kind, schema_name,"
    " table_name, row_key, new, actor_id, context, context_missing, payload_hash, prev_hash,"
    " hash, signature, key_id) VALUES (%s, %s, gen_random_uuid(), now(), %s, 'public', %s,"
    " %s::jsonb, %s::jsonb, %s, %s::jsonb, %s, '\\x01', '\\x00', '\\x02', '\\x03', 'k1')"
)


def _install(database: Database, write_policy: WritePolicy, *, events: bool = True) -> Path:
    database.execute("CREATE TABLE accounts (id int PRIMARY KEY, note text)")
    policy = write_policy(base=POLICY)
    applied = run_cli("apply", "--dsn", database.dsn, "--policy", str(policy))
    assert applied.returncode == 0, applied.stderr
    context = f'{{"trace_id": "t", "db": {{"client_addr": "{CLIENT}"}}}}'
    rows: list[tuple[Any, ...]] = [
        (
            "user",
            1,
            "update",
            "accounts",
            '{"id": 1}',
            '{"note": "hello"}',
            "alice",
            context,
            False,
        ),
        ("user", 2, "insert", "accounts", '{"id": 2}', '{"note": "x"}', None, context, True),
        (
            "admin",
            1,
            "ddl",
            "roles",
            '{"id": 1}',
            f'{{"note": "{SECRET}"}}',
            SECRET,
            context,
            False,
        ),
        (
            "admin",
            2,
            "update",
            "roles",
            '{"id": 1}',
            f'{{"note": "{SECRET}"}}',
            "root",
            context,
            True,
        ),
    ]
    for row in rows if events else []:
        database.execute(EVENT, row)
    return policy


def _leaves(database: Database) -> list[str]:
    rows = database.execute("SELECT leaf_name FROM cdc_audit.event_leaves()")
    months = database.execute(
        "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid"
        " WHERE i.inhparent = 'cdc_audit.event'::regclass"
    )
    return [str(r[0]) for r in rows + months]


def _all_text(conn: psycopg.Connection[Any], query: str) -> str:
    notices: list[str] = []
    conn.add_notice_handler(lambda d: notices.append(str(d.message_primary)))
    rows = conn.execute(query.encode()).fetchall()
    return repr(rows) + repr(notices)


def test_reader_cannot_see_admin_events_or_unredacted_values_by_any_sql(
    database: Database, write_policy: WritePolicy
) -> None:
    _install(database, write_policy)
    reader = database.login_role("ann", "cdc_audit_reader")
    leaves = _leaves(database)
    assert any(name.endswith("_admin") for name in leaves)
    with psycopg.connect(database.dsn_as(reader), autocommit=True) as conn:
        # The table, every partition, COPY: refused outright.
        for table in ["event", *leaves]:
            for query in (
                f"SELECT * FROM cdc_audit.{table}",
                f"SELECT count(*) FROM cdc_audit.{table}",
                f"EXPLAIN ANALYZE SELECT * FROM cdc_audit.{table}",
            ):
                with pytest.raises(psycopg.errors.InsufficientPrivilege):
                    conn.execute(query.encode())
            with (
                pytest.raises(psycopg.errors.InsufficientPrivilege),
                conn.cursor().copy(f"COPY cdc_audit.{table} TO STDOUT".encode()) as copy,
            ):
                list(copy)
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("SET ROLE cdc_audit_auditor")
        for table in ("checkpoint", "install_setting", "policy_version"):
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                conn.execute(f"SELECT * FROM cdc_audit.{table}".encode())
        # A leaky function of the reader's own, given every row a view could hand it.
        conn.execute(
            "CREATE FUNCTION pg_temp.peek(r anyelement) RETURNS boolean LANGUAGE plpgsql"
            " COST 0.0000001 AS $$ BEGIN RAISE NOTICE 'peek %', r::text; RETURN true; END $$"
        )
        reads = [
            "SELECT * FROM cdc_audit.visible_event",
            "SELECT * FROM cdc_audit.visible_event v WHERE pg_temp.peek(v.*)",
            "SELECT * FROM cdc_audit.visible_event v WHERE pg_temp.peek(v.new)"
            " AND v.stream = 'admin'",
            "SELECT * FROM cdc_audit.recent_events",
            "SELECT * FROM cdc_audit.recent_events r WHERE pg_temp.peek(r.*)",
            "SELECT * FROM cdc_audit.admin_actions",
            "SELECT * FROM cdc_audit.admin_actions a WHERE pg_temp.peek(a.*)",
            "SELECT * FROM cdc_audit.changes_by_actor",
            "SELECT * FROM cdc_audit.row_history",
            "SELECT * FROM cdc_audit.row_history h WHERE pg_temp.peek(h.*)",
            "SELECT * FROM cdc_audit.events_missing_context",
            "SELECT * FROM cdc_audit.events_missing_context m WHERE pg_temp.peek(m.*)",
            "SELECT * FROM cdc_audit.visible_events_where()",
            "SELECT * FROM cdc_audit.visible_events_where(of_streams => ARRAY['admin'])",
            "SELECT * FROM cdc_audit.audited_events(now() - interval '1 day', now() + interval"
            " '1 day')",
            "SELECT * FROM cdc_audit.audited_events(now() - interval '1 day', now() + interval"
            f" '1 day', '{SECRET}')",
            "SELECT * FROM cdc_audit.audited_row_history('public', 'roles', '{\"id\": 1}')",
            "EXPLAIN (ANALYZE, VERBOSE) SELECT * FROM cdc_audit.visible_event"
            " WHERE stream = 'admin'",
            "EXPLAIN (ANALYZE, VERBOSE) SELECT * FROM cdc_audit.visible_events_where()",
        ]
        for query in reads:
            text = _all_text(conn, query)
            assert SECRET not in text and CLIENT not in text and "root" not in text, query
        streams = conn.execute("SELECT DISTINCT stream FROM cdc_audit.visible_event").fetchall()
        assert streams == [("user",)]
        rows = conn.execute(
            "SELECT stream, seq, context, signature, key_id FROM cdc_audit.recent_events"
        ).fetchall()
        assert rows == [
            ("user", 2, {"trace_id": "t"}, None, None),
            ("user", 1, {"trace_id": "t"}, None, None),
        ]
        history = conn.execute(
            "SELECT seq, new FROM cdc_audit.audited_row_history("
            " 'public', 'accounts', '{\"id\": 1}')"
        ).fetchall()
        assert history == [(1, {"note": "hello"})]
        missing = conn.execute(
            "SELECT stream, seq FROM cdc_audit.events_missing_context"
        ).fetchall()
        assert missing == [("user", 2)]


def test_auditor_sees_everything_and_admin_actions_follow_the_admin_streams(
    database: Database, write_policy: WritePolicy
) -> None:
    _install(database, write_policy)
    auditor = database.login_role("bob", "cdc_audit_auditor")
    with psycopg.connect(database.dsn_as(auditor), autocommit=True) as conn:
        assert conn.execute("SELECT count(*) FROM cdc_audit.event").fetchone() == (4,)
        rows = conn.execute(
            "SELECT stream, seq, context, signature FROM cdc_audit.recent_events"
            " WHERE stream = 'admin' ORDER BY seq"
        ).fetchall()
        assert [r[:2] for r in rows] == [("admin", 1), ("admin", 2)]
        assert rows[0][2]["db"] == {"client_addr": CLIENT} and rows[0][3] == b"\x03"
        admin = conn.execute(
            "SELECT stream, seq, kind FROM cdc_audit.admin_actions ORDER BY stream, seq"
        ).fetchall()
        assert admin == [("admin", 1, "ddl"), ("admin", 2, "update")]
        by_actor = conn.execute(
            "SELECT actor_id, table_name, kind, events FROM cdc_audit.changes_by_actor"
            " WHERE actor_id = 'alice'"
        ).fetchall()
        assert by_actor == [("alice", "accounts", "update", 1)]
        history = conn.execute(
            "SELECT stream, seq FROM cdc_audit.audited_row_history("
            " 'public', 'roles', '{\"id\": 1}')"
        ).fetchall()
        assert history == [("admin", 1), ("admin", 2)]


def test_reads_by_the_auditor_are_recorded_in_the_read_audit_stream(
    database: Database, write_policy: WritePolicy
) -> None:
    policy = _install(database, write_policy, events=False)
    auditor = database.login_role("carol", "cdc_audit_auditor")
    # apply recorded the policy's read_audit stream; without it nothing is recorded.
    assert database.execute(
        "SELECT value FROM cdc_audit.install_setting WHERE key = 'read_audit_stream'"
    ) == [("admin",)]
    database.execute(
        "UPDATE cdc_audit.install_setting SET value = '' WHERE key = 'read_audit_stream'"
    )
    with psycopg.connect(database.dsn_as(auditor), autocommit=True) as conn:
        assert conn.execute("SELECT cdc_audit.record_read('events', '{}')").fetchone() == (False,)
    database.execute(
        "UPDATE cdc_audit.install_setting SET value = 'admin' WHERE key = 'read_audit_stream'"
    )
    with psycopg.connect(database.dsn_as(auditor), autocommit=False) as conn:
        conn.execute(
            "SELECT seq FROM cdc_audit.audited_row_history('public', 'accounts', '{\"id\": 1}')"
        ).fetchall()
        conn.rollback()  # the read is recorded all the same
        conn.execute(
            "SELECT * FROM cdc_audit.audited_events(now() - interval '1 hour', now(), 'alice')"
        ).fetchall()
        conn.commit()
        with pytest.raises(psycopg.errors.InvalidParameterValue):
            conn.execute("SELECT cdc_audit.record_read('Bad Name', '{}')")
        conn.rollback()
    env = {**os.environ, "CDC_AUDIT_DSN": database.dsn, "CDC_AUDIT_POLICY": str(policy)}
    drained = run_cli("worker", "--drain", env=env)
    assert drained.returncode == 0, drained.stderr
    recorded = database.execute(
        "SELECT new->>'action', new->'details' FROM cdc_audit.event"
        " WHERE stream = 'admin' AND kind = 'app' ORDER BY seq"
    )
    assert [r[0] for r in recorded] == ["audit.read.row_history", "audit.read.events"]
    first, second = (r[1] for r in recorded)
    assert first["filters"] == {
        "schema_name": "public",
        "table_name": "accounts",
        "row_key": {"id": 1},
    }
    assert first["role"] == auditor and first["session_user"] == auditor
    assert second["filters"]["actor_id"] == "alice"
