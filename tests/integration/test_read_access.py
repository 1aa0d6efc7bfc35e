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


def test_row_level_security_keeps_streams_apart_even_when_select_is_granted(
    database: Database, write_policy: WritePolicy
) -> None:
    """A grant made by mistake does not open the trail: rows follow the policies of `event`."""
    _install(database, write_policy)
    assert database.execute(
        "SELECT relrowsecurity FROM pg_class WHERE oid = 'cdc_audit.event'::regclass"
    ) == [(True,)]
    reader = database.login_role("dan", "cdc_audit_reader")
    snooper = database.login_role("eve")
    database.execute(f"GRANT USAGE ON SCHEMA cdc_audit TO {snooper}")
    database.execute(f"GRANT SELECT ON cdc_audit.event TO cdc_audit_reader, {snooper}")
    with psycopg.connect(database.dsn_as(reader), autocommit=True) as conn:
        seen = conn.execute(
            "SELECT stream, seq FROM cdc_audit.event ORDER BY stream, seq"
        ).fetchall()
        assert seen == [("user", 1), ("user", 2)]
        text = _all_text(conn, "SELECT * FROM cdc_audit.event WHERE stream = 'admin'")
        assert SECRET not in text and "root" not in text
    with psycopg.connect(database.dsn_as(snooper), autocommit=True) as conn:
        assert conn.execute("SELECT count(*) FROM cdc_audit.event").fetchone() == (0,)
        with conn.cursor().copy("COPY (SELECT * FROM cdc_audit.event) TO STDOUT") as copy:
            assert b"".join(bytes(chunk) for chunk in copy) == b""


def test_a_least_privileged_worker_appends_under_row_level_security(
    database: Database, write_policy: WritePolicy
) -> None:
    """The worker appends by COPY, which row-level security refuses to roles it applies to:
    it writes as the writer role, which bypasses it; a login outside that role is told so."""
    _install(database, write_policy, events=False)
    assert (
        database.scalar("SELECT rolbypassrls FROM pg_roles WHERE rolname = 'cdc_audit_writer'")
        is True
    )
    sealer = database.login_role("sealer2", "cdc_audit_writer")
    database.execute(f"ALTER ROLE {sealer} REPLICATION")
    with database.connect(autocommit=False) as conn:
        conn.execute("SELECT cdc_audit.set_context(actor_id => 'alice')")
        conn.execute("INSERT INTO accounts VALUES (7, 'seven')")
        conn.commit()
    env = {**os.environ, "CDC_AUDIT_DSN": database.dsn_as(sealer)}
    drained = run_cli("worker", "--drain", env=env)
    assert drained.returncode == 0, drained.stderr
    assert database.execute(
        "SELECT stream, actor_id, row_key FROM cdc_audit.event WHERE kind = 'insert'"
    ) == [("user", "alice", {"id": 7})]

    outsider = database.login_role("sealer3")
    database.execute(f"ALTER ROLE {outsider} REPLICATION")
    database.execute(f"GRANT USAGE ON SCHEMA cdc_audit TO {outsider}")
    database.execute(
        "GRANT SELECT, INSERT, UPDATE ON ALL TABLES IN SCHEMA cdc_audit TO " + outsider
    )
    database.execute(f"GRANT EXECUTE ON ALL FUNCTIONS IN SCHEMA cdc_audit TO {outsider}")
    with database.connect(autocommit=False) as conn:
        conn.execute("SELECT cdc_audit.set_context(actor_id => 'alice')")
        conn.execute("INSERT INTO accounts VALUES (8, 'eight')")
        conn.commit()
    refused = run_cli(
        "worker", "--drain", env={**os.environ, "CDC_AUDIT_DSN": database.dsn_as(outsider)}
    )
    assert refused.returncode == 3, refused.stderr
    assert (
        f"role {outsider} cannot append to the trail: row-level security guards"
        f" cdc_audit.event; GRANT cdc_audit_writer TO {outsider}"
    ) in refused.stderr
    assert database.scalar("SELECT count(*) FROM cdc_audit.event WHERE kind = 'insert'") == 1


def test_pages_of_admin_actions_and_of_an_actors_window(
    database: Database, write_policy: WritePolicy
) -> None:
    """audited_admin_actions: the newest administrative actions, each once, visible ones only;
    audited_events with a page size: the first events of the window in commit order."""
    _install(database, write_policy)
    database.execute(
        "INSERT INTO cdc_audit.event (stream, seq, event_id, commit_time, kind, schema_name,"
        " table_name, new, actor_id, context, context_missing, payload_hash, prev_hash, hash)"
        " SELECT 'user', 2 + n, gen_random_uuid(), now() + n * interval '1 second',"
        " CASE WHEN n % 3 = 0 THEN 'drift' ELSE 'insert' END, 'public', 'accounts',"
        " '{}'::jsonb, 'alice', '{}'::jsonb, false, '\\x01', '\\x00', '\\x02'"
        " FROM generate_series(1, 9) AS n"
    )
    window = "now() - interval '1 day', now() + interval '1 day'"
    auditor = database.login_role("fay", "cdc_audit_auditor")
    reader = database.login_role("gus", "cdc_audit_reader")
    with psycopg.connect(database.dsn_as(auditor), autocommit=True) as conn:
        newest = conn.execute(
            f"SELECT stream, seq, kind FROM cdc_audit.audited_admin_actions({window}, 4)"
        ).fetchall()
        assert newest == [
            ("user", 11, "drift"),
            ("user", 8, "drift"),
            ("user", 5, "drift"),
            ("admin", 2, "update"),
        ]
        every = conn.execute(
            f"SELECT stream, seq FROM cdc_audit.audited_admin_actions({window}, 100)"
        ).fetchall()
        view = conn.execute(
            "SELECT stream, seq FROM cdc_audit.admin_actions"
            " ORDER BY commit_time DESC, stream DESC, seq DESC"
        ).fetchall()
        assert every == view and len(every) == len(set(every)) == 5
        page = conn.execute(
            f"SELECT seq FROM cdc_audit.audited_events({window}, 'alice', 3)"
        ).fetchall()
        assert page == [(1,), (3,), (4,)]
    with psycopg.connect(database.dsn_as(reader), autocommit=True) as conn:
        seen = conn.execute(
            f"SELECT stream, seq FROM cdc_audit.audited_admin_actions({window}, 100)"
        ).fetchall()
        assert seen == [("user", 11), ("user", 8), ("user", 5)]


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
