"""An application role can neither forge audit messages nor read or change the trail."""

from __future__ import annotations

import json
from collections.abc import Iterator

import psycopg
import pytest

from cdc_audit import installer
from cdc_audit.policy import load_policy

from .fix_policy import WritePolicy
from .pg import Database, DecodingWatcher

TABLES = "  - {table: public.accounts, stream: user}\n"
EXTRA = "ddl: {stream: admin}\napp_events: {stream: user}\n"


@pytest.fixture
def installed(database: Database, write_policy: WritePolicy) -> Database:
    database.execute("CREATE TABLE accounts (id int PRIMARY KEY, owner text)")
    installer.apply(database.dsn, load_policy(write_policy(TABLES, EXTRA)))
    return database


@pytest.fixture
def app_conn(installed: Database) -> Iterator[psycopg.Connection[object]]:
    user = installed.login_role("app", "cdc_audit_app")
    installed.execute(f"GRANT ALL ON accounts TO {user}")
    with psycopg.connect(installed.dsn_as(user), autocommit=True) as conn:
        yield conn


@pytest.mark.parametrize(
    "statement",
    [
        "SELECT pg_logical_emit_message(true, 'cdc_audit.ctx', '{\"actor_id\": \"ceo\"}')",
        "SELECT pg_logical_emit_message(false, 'cdc_audit.app', '\\x00'::bytea)",
        "SELECT * FROM cdc_audit.event",
        "SELECT * FROM cdc_audit.checkpoint",
        "INSERT INTO cdc_audit.event (stream, seq, event_id, commit_time, kind, payload_hash,"
        " prev_hash, hash) VALUES ('user', 1, gen_random_uuid(), now(), 'insert', '', '', '')",
        "UPDATE cdc_audit.progress SET end_lsn = '0/0'",
        "SELECT cdc_audit.ensure_event_partitions(1)",
        "SELECT cdc_audit.capture_context()",
        "SET session_replication_role = replica",
        "ALTER TABLE accounts DISABLE TRIGGER cdc_audit_context",
    ],
)
def test_application_role_is_refused(app_conn: psycopg.Connection[object], statement: str) -> None:
    with pytest.raises(psycopg.Error) as refused:
        app_conn.execute(statement)
    assert refused.value.sqlstate in ("42501", "0A000", "42883", "42809"), refused.value


def test_application_role_can_set_context_and_log_events(
    installed: Database, app_conn: psycopg.Connection[object]
) -> None:
    watcher = DecodingWatcher(installed)
    with app_conn.transaction():
        app_conn.execute("SELECT cdc_audit.set_context(actor_id => 'u1')")
        app_conn.execute("SELECT cdc_audit.log_event('admin.user.role_granted', 'user:7')")
        app_conn.execute("INSERT INTO accounts VALUES (1, 'a')")
    with pytest.raises(psycopg.errors.RaiseException), app_conn.transaction():
        app_conn.execute(
            "SELECT cdc_audit.log_event('auth.login.failed', 'user:7', 'failure',"
            ' \'{"ip": "1.2.3.4"}\', durable => true)'
        )
        app_conn.execute("SELECT cdc_audit.log_event('rolled.back')")
        app_conn.execute("DO $$ BEGIN RAISE EXCEPTION 'login failed'; END $$")
    # A rollback does not flush the WAL; the next commit does, and decoding reads flushed WAL.
    installed.execute("SELECT pg_logical_emit_message(true, 'flush', '')")
    events = [
        json.loads(m.content) | {"transactional": m.transactional}
        for m in watcher.messages("cdc_audit.app")
    ]
    assert [(e["action"], e["transactional"], e["outcome"]) for e in events] == [
        ("admin.user.role_granted", True, "success"),
        ("auth.login.failed", False, "failure"),
    ]
    assert events[0]["actor_id"] == "u1" and events[0]["stream"] == "user"
    assert events[1]["details"] == {"ip": "1.2.3.4"}


def test_log_event_rejects_bad_actions(app_conn: psycopg.Connection[object]) -> None:
    for action in ("", "Login Failed", "auth..x", "x'; DROP TABLE accounts; --"):
        with pytest.raises(psycopg.Error, match="is not a dotted lower-case name"):
            app_conn.execute("SELECT cdc_audit.log_event(%s)", (action,))
    with pytest.raises(psycopg.Error, match="details must be a JSON object"):
        app_conn.execute("SELECT cdc_audit.log_event('a.b', details => '[1]')")


@pytest.mark.parametrize(
    "statement",
    [
        "UPDATE cdc_audit.event SET actor_id = 'someone else'",
        "DELETE FROM cdc_audit.event",
        "TRUNCATE cdc_audit.event",
        "UPDATE cdc_audit.checkpoint SET signature = ''",
        "DELETE FROM cdc_audit.policy_version",
        "TRUNCATE cdc_audit.policy_version",
        "DELETE FROM cdc_audit.signing_key",
        "UPDATE cdc_audit.signing_key SET public_key = 'mine'",
    ],
)
def test_guard_triggers_refuse_even_the_superuser(installed: Database, statement: str) -> None:
    installed.execute(
        "INSERT INTO cdc_audit.event (stream, seq, event_id, commit_time, kind, payload_hash,"
        " prev_hash, hash) VALUES ('user', 1, gen_random_uuid(), now(), 'insert', '\\x01',"
        " '\\x00', '\\x02');"
        "INSERT INTO cdc_audit.signing_key (key_id, public_key) VALUES ('k1', 'pem');"
        "INSERT INTO cdc_audit.checkpoint (stream, first_seq, last_seq, event_count, head_hash,"
        " merkle_root, key_id, signature, statement) VALUES ('user', 1, 1, 1, '\\x02', '\\x02',"
        " 'k1', '\\x03', '{}')"
    )
    with pytest.raises(psycopg.Error) as refused:
        installed.execute(statement)
    assert refused.value.sqlstate == "CA002"
    assert "append-only" in str(refused.value) or "keys can only be retired" in str(refused.value)


def test_a_partition_of_the_trail_cannot_be_truncated(installed: Database) -> None:
    partition = installed.scalar(
        "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid"
        " WHERE i.inhparent = 'cdc_audit.event'::regclass LIMIT 1"
    )
    with pytest.raises(psycopg.Error) as refused:
        installed.execute(f"TRUNCATE cdc_audit.{partition}")
    assert refused.value.sqlstate == "CA002"


def test_a_key_can_be_retired_once(installed: Database) -> None:
    installed.execute("INSERT INTO cdc_audit.signing_key (key_id, public_key) VALUES ('k1', 'pem')")
    installed.execute("UPDATE cdc_audit.signing_key SET retired_at = now() WHERE key_id = 'k1'")
    with pytest.raises(psycopg.Error):
        installed.execute("UPDATE cdc_audit.signing_key SET retired_at = NULL WHERE key_id = 'k1'")


def test_writer_may_append_but_not_rewrite(installed: Database) -> None:
    worker = installed.login_role("worker", "cdc_audit_writer")
    with psycopg.connect(installed.dsn_as(worker), autocommit=True) as conn:
        conn.execute(
            "INSERT INTO cdc_audit.event (stream, seq, event_id, commit_time, kind, payload_hash,"
            " prev_hash, hash) VALUES ('user', 1, gen_random_uuid(), now(), 'insert', '\\x01',"
            " '\\x00', '\\x02')"
        )
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("UPDATE cdc_audit.event SET actor_id = 'x'")
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("SELECT pg_logical_emit_message(true, 'cdc_audit.ctx', 'x')")


def test_auditor_reads_but_cannot_write(installed: Database) -> None:
    auditor = installed.login_role("auditor", "cdc_audit_auditor")
    with psycopg.connect(installed.dsn_as(auditor), autocommit=True) as conn:
        assert conn.execute("SELECT count(*) FROM cdc_audit.event").fetchone() == (0,)
        assert conn.execute("SELECT count(*) FROM cdc_audit.policy_version").fetchone() == (1,)
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("INSERT INTO cdc_audit.signing_key (key_id, public_key) VALUES ('k', 'p')")


def test_ddl_and_grants_are_captured(installed: Database) -> None:
    watcher = DecodingWatcher(installed)
    with installed.connect() as conn, conn.transaction():
        conn.execute("SELECT cdc_audit.set_context(actor_id => 'dba1', reason => 'migration 12')")
        conn.execute("ALTER TABLE accounts ADD COLUMN email text")
        conn.execute("GRANT SELECT ON accounts TO cdc_audit_reader")
    installed.execute("CREATE TEMP TABLE scratch (id int)")
    installed.execute("DROP TABLE accounts")
    messages = [json.loads(m.content) for m in watcher.messages("cdc_audit.ddl")]
    assert [m["command_tag"] for m in messages] == ["ALTER TABLE", "GRANT", "DROP TABLE"]
    assert messages[0]["actor_id"] == "dba1"
    assert messages[0]["objects"][0]["object_identity"] == "public.accounts"
    assert messages[0]["statement"] == "ALTER TABLE accounts ADD COLUMN email text"
    assert messages[2]["dropped"][0]["object_identity"] == "public.accounts"
