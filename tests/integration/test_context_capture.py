"""What the statement triggers emit, when, and what they refuse."""

from __future__ import annotations

import json

import psycopg
import pytest

from cdc_audit import context, installer
from cdc_audit.assemble import context_fields
from cdc_audit.policy import load_policy

from .fix_policy import WritePolicy
from .pg import Database, DecodingWatcher

TABLES = "  - {table: public.accounts, stream: user}\n  - {table: public.roles, stream: admin}\n"


@pytest.fixture
def audited(database: Database, write_policy: WritePolicy) -> Database:
    database.execute(
        "CREATE TABLE accounts (id int PRIMARY KEY, owner text, note text);"
        "CREATE TABLE roles (id int PRIMARY KEY, name text);"
        "CREATE TABLE scratch (id int)"
    )
    installer.apply(database.dsn, load_policy(write_policy(TABLES, "app_events: {stream: user}\n")))
    return database


def read_context(content: str) -> dict[str, object]:
    """A context message as the worker reads it, with the stream it names."""
    message = json.loads(content)
    return {**context_fields(message), "stream": message["stream"]}


def in_one_transaction(database: Database, *statements: str) -> None:
    """What an application does: set its context and write, in one transaction."""
    with database.connect() as conn, conn.transaction():
        for statement in statements:
            conn.execute(statement)


def contexts(watcher: DecodingWatcher) -> list[dict[str, object]]:
    return [read_context(m.content) for m in watcher.messages("cdc_audit.ctx")]


def test_one_message_per_context_change_and_none_for_other_tables(audited: Database) -> None:
    watcher = DecodingWatcher(audited)
    with audited.connect() as conn, conn.transaction():
        conn.execute("SELECT cdc_audit.set_context(actor_id => 'u1', reason => 'ticket 7')")
        conn.execute("INSERT INTO scratch VALUES (1)")
        conn.execute("INSERT INTO accounts VALUES (1, 'a', 'x')")
        conn.execute("INSERT INTO accounts VALUES (2, 'b', 'y')")
        conn.execute("UPDATE accounts SET note = 'z'")
        conn.execute("SELECT cdc_audit.set_context(actor_id => 'u2', reason => 'ticket 8')")
        conn.execute("DELETE FROM accounts WHERE id = 2")
        conn.execute("INSERT INTO roles VALUES (1, 'admin')")
    with audited.connect() as conn:
        conn.execute("INSERT INTO scratch VALUES (2)")
    changes = watcher.changes()
    kinds = [c.kind for c in changes]
    assert kinds == [
        "begin",
        "change",
        "message",
        "change",
        "change",
        "change",
        "change",
        "message",
        "change",
        "message",
        "change",
        "commit",
        "begin",
        "change",
        "commit",
    ]
    emitted = contexts_from(changes)
    assert [(m["actor_id"], m["stream"]) for m in emitted] == [
        ("u1", "user"),
        ("u2", "user"),
        ("u2", "admin"),
    ]
    # The second transaction touched no audited table: no context for it.
    assert all(c.message is None for c in changes[-3:])


def contexts_from(changes: list) -> list[dict[str, object]]:  # type: ignore[type-arg]
    return [read_context(c.message.content) for c in changes if c.message]


def test_message_carries_application_and_database_facts(audited: Database) -> None:
    app_user = audited.login_role("svc", "cdc_audit_app")
    audited.execute(f"GRANT ALL ON accounts TO {app_user}")
    watcher = DecodingWatcher(audited)
    with (
        psycopg.connect(audited.dsn_as(app_user), application_name="billing") as conn,
        conn.transaction(),
    ):
        conn.execute(
            "SELECT cdc_audit.set_context(actor_id => 'u42', actor_role => 'support',"
            " reason => 'refund', on_behalf_of => 'u7', session_id => 's1',"
            " client_ip => '10.1.2.3', trace_id => 't-1', extra => '{\"ticket\": 7}')"
        )
        conn.execute("INSERT INTO accounts VALUES (1, 'a', 'x')")
        xid = conn.execute("SELECT pg_current_xact_id()::text").fetchone()[0]  # type: ignore[index]
        pid = conn.info.backend_pid
    [message] = contexts(watcher)
    assert {
        k: message[k]
        for k in (
            "actor_id",
            "actor_role",
            "reason",
            "on_behalf_of",
            "session_id",
            "client_ip",
            "trace_id",
            "extra",
        )
    } == {
        "actor_id": "u42",
        "actor_role": "support",
        "reason": "refund",
        "on_behalf_of": "u7",
        "session_id": "s1",
        "client_ip": "10.1.2.3",
        "trace_id": "t-1",
        "extra": {"ticket": 7},
    }
    assert message["missing"] == []
    assert message["db"] == {
        "session_user": app_user,
        "current_user": app_user,
        "application_name": "billing",
        "client_addr": "127.0.0.1",
        "backend_pid": pid,
        "database": audited.name,
        "xid": xid,
    }


def test_set_role_is_reported_as_current_user(audited: Database) -> None:
    audited.execute("GRANT ALL ON accounts TO cdc_audit_app")
    watcher = DecodingWatcher(audited)
    with audited.connect() as conn, conn.transaction():
        conn.execute("SET LOCAL ROLE cdc_audit_app")
        conn.execute("SELECT cdc_audit.set_context(actor_id => 'u1')")
        conn.execute("INSERT INTO accounts VALUES (1, 'a', 'x')")
    [message] = contexts(watcher)
    assert message["db"]["current_user"] == "cdc_audit_app"  # type: ignore[index]
    assert message["db"]["session_user"] == "postgres"  # type: ignore[index]


def test_missing_context_is_recorded_or_rejected_per_stream(audited: Database) -> None:
    watcher = DecodingWatcher(audited)
    audited.execute("INSERT INTO accounts VALUES (1, 'a', 'x')")  # user stream: record
    with pytest.raises(psycopg.Error) as refused:
        audited.execute("INSERT INTO roles VALUES (1, 'x')")  # admin stream: reject
    assert refused.value.sqlstate == "CA001"
    assert "INSERT on public.roles needs audit context: actor_id, reason missing" in str(
        refused.value
    )
    with pytest.raises(psycopg.Error, match="reason missing"):
        in_one_transaction(
            audited,
            "SELECT cdc_audit.set_context(actor_id => 'u1')",
            "UPDATE roles SET name = 'y'",
        )
    in_one_transaction(
        audited,
        "SELECT cdc_audit.set_context(actor_id => 'u1', reason => 'promotion')",
        "INSERT INTO roles VALUES (1, 'x')",
    )
    emitted = contexts(watcher)
    assert [(m["stream"], m["missing"]) for m in emitted] == [("user", ["actor_id"]), ("admin", [])]
    assert audited.scalar("SELECT count(*) FROM roles") == 1


def test_context_does_not_leak_into_the_next_transaction(audited: Database) -> None:
    watcher = DecodingWatcher(audited)
    with audited.connect() as conn:
        with conn.transaction():
            conn.execute("SELECT cdc_audit.set_context(actor_id => 'u1')")
            conn.execute("INSERT INTO accounts VALUES (1, 'a', 'x')")
        conn.execute("INSERT INTO accounts VALUES (2, 'b', 'y')")  # same backend, no context
    first, second = contexts(watcher)
    assert first["actor_id"] == "u1"
    assert "actor_id" not in second and second["missing"] == ["actor_id"]


def test_savepoint_rollback_emits_again(audited: Database) -> None:
    watcher = DecodingWatcher(audited)
    with audited.connect() as conn, conn.transaction():
        conn.execute("SELECT cdc_audit.set_context(actor_id => 'u1')")
        with pytest.raises(psycopg.errors.UniqueViolation), conn.transaction():
            conn.execute("INSERT INTO accounts VALUES (1, 'a', 'x')")
            conn.execute("INSERT INTO accounts VALUES (1, 'a', 'x')")
        conn.execute("INSERT INTO accounts VALUES (2, 'b', 'y')")
    changes = watcher.changes()
    assert [c.kind for c in changes] == ["begin", "message", "change", "commit"], changes
    assert "id[integer]:2" in changes[2].text


def test_hostile_context_values_are_stored_faithfully(audited: Database) -> None:
    watcher = DecodingWatcher(audited)
    hostile = "O'Brien\"; DROP TABLE accounts; --\n\r\t\\ \u2028 ünï"
    huge = "x" * (1024 * 1024)
    with audited.connect() as conn, conn.transaction():
        conn.execute(
            "SELECT cdc_audit.set_context(actor_id => %s, reason => %s, extra => %s)",
            (hostile, huge, json.dumps({"k'\"": hostile})),
        )
        conn.execute("INSERT INTO accounts VALUES (1, 'a', 'x')")
    [message] = contexts(watcher)
    assert message["actor_id"] == hostile
    assert message["reason"] == huge
    assert message["extra"] == {"k'\"": hostile}
    assert audited.scalar("SELECT count(*) FROM accounts") == 1


def test_bad_context_values_get_clear_errors(audited: Database) -> None:
    with pytest.raises(psycopg.Error, match="client_ip 'not an ip' is not an IP address"):
        audited.execute("SELECT cdc_audit.set_context(client_ip => 'not an ip')")
    with pytest.raises(psycopg.Error, match="extra must be a JSON object"):
        audited.execute("SELECT cdc_audit.set_context(extra => '[1]')")


def test_python_helper_sets_and_restores_context(audited: Database) -> None:
    watcher = DecodingWatcher(audited)
    with audited.connect() as conn:
        with context(conn, actor_id="u1", reason="bulk fix"):
            conn.execute("INSERT INTO accounts VALUES (1, 'a', 'x')")
        with conn.transaction():
            context_module_set = conn.execute("SELECT cdc_audit.set_context(actor_id => 'outer')")
            del context_module_set
            with context(conn, actor_id="inner", extra={"step": 2}):
                conn.execute("INSERT INTO accounts VALUES (2, 'b', 'y')")
            conn.execute("INSERT INTO accounts VALUES (3, 'c', 'z')")
    emitted = contexts(watcher)
    assert [(m.get("actor_id"), m.get("reason"), m.get("extra")) for m in emitted] == [
        ("u1", "bulk fix", None),
        ("inner", None, {"step": 2}),
        ("outer", None, None),
    ]
    with audited.connect() as conn:
        assert conn.execute("SELECT cdc_audit.current_context()").fetchone() == ({},)


def test_partitioned_table_emits_for_writes_to_root_and_partitions(
    database: Database, write_policy: WritePolicy
) -> None:
    database.execute(
        "CREATE TABLE orders (id int, region text, PRIMARY KEY (id, region))"
        " PARTITION BY LIST (region);"
        "CREATE TABLE orders_eu PARTITION OF orders FOR VALUES IN ('eu');"
        "CREATE TABLE orders_us PARTITION OF orders FOR VALUES IN ('us')"
    )
    policy = write_policy("  - {table: public.orders, stream: user}\n")
    installer.apply(database.dsn, load_policy(policy))
    assert (
        database.scalar("SELECT count(*) FROM pg_trigger WHERE tgname = 'cdc_audit_context'") == 3
    )
    assert database.execute("SELECT tablename FROM pg_publication_tables") == [("orders",)]
    watcher = DecodingWatcher(database)
    in_one_transaction(
        database,
        "SELECT cdc_audit.set_context(actor_id => 'u1')",
        "INSERT INTO orders_eu VALUES (1, 'eu')",
    )
    in_one_transaction(
        database,
        "SELECT cdc_audit.set_context(actor_id => 'u2')",
        "INSERT INTO orders VALUES (2, 'us')",
    )
    assert [m["actor_id"] for m in contexts(watcher)] == ["u1", "u2"]

    # A partition added later is drift: plan shows it, apply attaches the trigger.
    database.execute("CREATE TABLE orders_ap PARTITION OF orders FOR VALUES IN ('ap')")
    with database.connect(autocommit=False) as conn:
        text = installer.compute_plan(conn, load_policy(policy)).render(conn)
    assert '"public"."orders_ap"' in text and '"public"."orders_eu"' not in text
    installer.apply(database.dsn, load_policy(policy))
    assert (
        database.scalar("SELECT count(*) FROM pg_trigger WHERE tgname = 'cdc_audit_context'") == 4
    )
    assert (
        database.scalar("SELECT relreplident::text FROM pg_class WHERE relname = 'orders_ap'")
        == "f"
    )


def test_mixed_case_and_quoted_identifiers(database: Database, write_policy: WritePolicy) -> None:
    database.execute(
        'CREATE SCHEMA "Sales";'
        'CREATE TABLE "Sales"."Order Items" (id int PRIMARY KEY, "Unit Price" numeric,'
        ' "we""ird" text, status text)'
    )
    policy = write_policy(
        '  - table: \'"Sales"."Order Items"\'\n'
        "    stream: user\n"
        '    exclude: [\'"we""ird"\']\n'
        '    when: "\\"Unit Price\\" > 10 AND status <> \'draft\'"\n'
    )
    installer.apply(database.dsn, load_policy(policy))
    assert database.execute("SELECT schemaname, tablename FROM pg_publication_tables") == [
        ("Sales", "Order Items")
    ]
    watcher = DecodingWatcher(database)
    in_one_transaction(
        database,
        "SELECT cdc_audit.set_context(actor_id => 'u1')",
        'INSERT INTO "Sales"."Order Items" VALUES (1, 12.5, \'q"\', \'open\')',
    )
    assert [m["actor_id"] for m in contexts(watcher)] == ["u1"]
    with database.connect(autocommit=False) as conn:
        assert installer.compute_plan(conn, load_policy(policy)).empty


def test_empty_fields_count_as_missing(audited: Database) -> None:
    watcher = DecodingWatcher(audited)
    in_one_transaction(
        audited,
        "SELECT cdc_audit.set_context(actor_id => '', reason => 'r')",
        "INSERT INTO accounts VALUES (1, 'a', 'x')",
    )
    # Set by hand rather than through set_context: the empty value is still missing.
    in_one_transaction(
        audited,
        "SELECT set_config('cdc_audit.ctx', '{\"actor_id\": \"\"}', true)",
        "INSERT INTO accounts VALUES (2, 'b', 'y')",
    )
    with pytest.raises(psycopg.Error, match="actor_id missing"):
        in_one_transaction(
            audited,
            "SELECT cdc_audit.set_context(actor_id => '', reason => 'r')",
            "INSERT INTO roles VALUES (1, 'x')",
        )
    first, second = contexts(watcher)
    assert "actor_id" not in first and first["missing"] == ["actor_id"]
    assert second["actor_id"] == "" and second["missing"] == ["actor_id"]


HOSTILE_SCHEMA = """
CREATE SCHEMA evil;
CREATE FUNCTION evil.b(a text, b text) RETURNS boolean LANGUAGE plpgsql
    AS $$ BEGIN RAISE EXCEPTION 'hijacked by %', current_user; END $$;
CREATE FUNCTION evil.i(a integer, b integer) RETURNS boolean LANGUAGE plpgsql
    AS $$ BEGIN RAISE EXCEPTION 'hijacked by %', current_user; END $$;
CREATE FUNCTION evil.t(a text, b text) RETURNS text LANGUAGE plpgsql
    AS $$ BEGIN RAISE EXCEPTION 'hijacked by %', current_user; END $$;
CREATE FUNCTION evil.a(a text[], b text) RETURNS text[] LANGUAGE plpgsql
    AS $$ BEGIN RAISE EXCEPTION 'hijacked by %', current_user; END $$;
CREATE FUNCTION evil.j(a jsonb, b text) RETURNS text LANGUAGE plpgsql
    AS $$ BEGIN RAISE EXCEPTION 'hijacked by %', current_user; END $$;
CREATE FUNCTION evil.k(a jsonb, b text[]) RETURNS boolean LANGUAGE plpgsql
    AS $$ BEGIN RAISE EXCEPTION 'hijacked by %', current_user; END $$;
CREATE OPERATOR evil.= (LEFTARG = text, RIGHTARG = text, FUNCTION = evil.b);
CREATE OPERATOR evil.<> (LEFTARG = text, RIGHTARG = text, FUNCTION = evil.b);
CREATE OPERATOR evil.> (LEFTARG = integer, RIGHTARG = integer, FUNCTION = evil.i);
CREATE OPERATOR evil.|| (LEFTARG = text, RIGHTARG = text, FUNCTION = evil.t);
CREATE OPERATOR evil.|| (LEFTARG = text[], RIGHTARG = text, FUNCTION = evil.a);
CREATE OPERATOR evil.->> (LEFTARG = jsonb, RIGHTARG = text, FUNCTION = evil.j);
CREATE OPERATOR evil.?& (LEFTARG = jsonb, RIGHTARG = text[], FUNCTION = evil.k);
CREATE DOMAIN evil.text AS integer;
CREATE DOMAIN evil.jsonb AS integer;
"""


def test_a_hostile_search_path_cannot_reach_into_the_capture(audited: Database) -> None:
    # capture_context runs as the audit owner without a SET search_path of its own: objects a
    # session puts ahead of pg_catalog must never be what it calls.
    audited.execute(HOSTILE_SCHEMA)
    app_user = audited.login_role("svc", "cdc_audit_app")
    # The schema is open to all, so that the audit owner may use it too.
    audited.execute(f"GRANT ALL ON accounts, roles TO {app_user}")
    audited.execute("GRANT USAGE ON SCHEMA evil TO PUBLIC")
    watcher = DecodingWatcher(audited)
    with psycopg.connect(audited.dsn_as(app_user), autocommit=True) as conn:
        conn.execute("SET search_path = evil, pg_catalog, public")
        with conn.transaction():
            conn.execute("SELECT cdc_audit.set_context(actor_id => 'u1', reason => 'r')")
            conn.execute("INSERT INTO accounts VALUES (1, 'a', 'x')")
        conn.execute("INSERT INTO accounts VALUES (2, 'b', 'y')")  # no context: the loop
        with pytest.raises(psycopg.Error) as refused:
            conn.execute("INSERT INTO roles VALUES (1, 'x')")
        assert refused.value.sqlstate == "CA001"
    first, second = contexts(watcher)
    assert (first["actor_id"], first["missing"]) == ("u1", [])
    assert "actor_id" not in second and second["missing"] == ["actor_id"]
    assert second["db"]["current_user"] == app_user  # type: ignore[index]
