"""plan / apply / upgrade / uninstall against a real PostgreSQL."""

from __future__ import annotations

import json
from pathlib import Path

import psycopg
import pytest

from cdc_audit import installer
from cdc_audit.policy import load_policy
from cdc_audit.sqlfiles import migrations

from .fix_policy import WritePolicy
from .pg import Database, run_cli

ACCOUNTS = "  - {table: public.accounts, stream: user, exclude: [updated_at]}\n"
ROLES = "  - {table: public.roles, stream: admin, old_values: key}\n"
EXTRA = "ddl: {stream: admin}\napp_events: {stream: user}\n"
LATEST_MIGRATION = migrations()[-1].version


@pytest.fixture
def app_tables(database: Database) -> Database:
    database.execute(
        "CREATE TABLE accounts"
        " (id int PRIMARY KEY, owner text, status text, updated_at timestamptz);"
        "CREATE TABLE roles (id int PRIMARY KEY, name text);"
        "CREATE TABLE scratch (id int)"
    )
    return database


def apply(db: Database, policy: Path, **kwargs: object) -> installer.ApplyResult:
    return installer.apply(db.dsn, load_policy(policy), **kwargs)  # type: ignore[arg-type]


def plan_text(db: Database, policy: Path) -> str:
    with db.connect(autocommit=False) as conn:
        return installer.compute_plan(conn, load_policy(policy)).render(conn)


def test_apply_installs_everything_and_twice_is_a_no_op(
    app_tables: Database, write_policy: WritePolicy
) -> None:
    db = app_tables
    policy = write_policy(ACCOUNTS + ROLES, EXTRA)
    first = apply(db, policy)
    assert not first.plan.empty
    assert db.scalar("SELECT count(*) FROM pg_roles WHERE rolname LIKE 'cdc\\_audit\\_%'") == 5
    published = db.execute(
        "SELECT schemaname, tablename FROM pg_publication_tables WHERE pubname = 'cdc_audit'"
        " ORDER BY 2"
    )
    assert published == [("public", "accounts"), ("public", "roles")]
    identities = dict(
        db.execute(
            "SELECT relname, relreplident::text FROM pg_class"
            " WHERE relname IN ('accounts', 'roles')"
        )
    )
    assert identities == {"accounts": "f", "roles": "d"}
    assert (
        db.scalar("SELECT plugin FROM pg_replication_slots WHERE slot_name = %s", (first.slot,))
        == "pgoutput"
    )
    assert db.scalar("SELECT count(*) FROM pg_event_trigger WHERE evtname LIKE 'cdc_audit%'") == 2
    assert db.scalar("SELECT max(version) FROM cdc_audit.schema_migration") == LATEST_MIGRATION
    recorded = db.execute("SELECT action, sha256, policy_text FROM cdc_audit.policy_version")
    assert recorded == [("apply", load_policy(policy).sha256, policy.read_text())]

    assert plan_text(db, policy) == ""
    second = apply(db, policy)
    assert second.plan.empty
    assert db.scalar("SELECT count(*) FROM cdc_audit.policy_version") == 1


def test_plan_shows_sql_and_changes_nothing(
    app_tables: Database, write_policy: WritePolicy
) -> None:
    policy = write_policy(ACCOUNTS)
    result = run_cli("--dsn", app_tables.dsn, "plan", "--policy", str(policy))
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("BEGIN;")
    assert 'CREATE TABLE "cdc_audit".event (' in result.stdout
    assert 'ALTER PUBLICATION "cdc_audit" ADD TABLE "public"."accounts"' in result.stdout
    assert "pg_create_logical_replication_slot" in result.stdout
    assert app_tables.scalar("SELECT count(*) FROM pg_namespace WHERE nspname = 'cdc_audit'") == 0

    assert run_cli("--dsn", app_tables.dsn, "apply", "--policy", str(policy)).returncode == 0
    again = run_cli("--dsn", app_tables.dsn, "plan", "--policy", str(policy))
    assert (again.returncode, again.stdout) == (0, "")
    assert "nothing to do" in again.stderr


def test_policy_change_is_planned_and_recorded(
    app_tables: Database, write_policy: WritePolicy
) -> None:
    db = app_tables
    apply(db, write_policy(ACCOUNTS))
    changed = write_policy(
        "  - {table: public.accounts, stream: user, operations: [insert, update],"
        " when: \"status <> 'draft'\"}\n"
    )
    text = plan_text(db, changed)
    assert "CREATE OR REPLACE TRIGGER" in text and "BEFORE INSERT OR UPDATE ON" in text
    assert "WHERE (status <> 'draft')" in text
    apply(db, changed)
    rowfilter = db.scalar(
        "SELECT rowfilter FROM pg_publication_tables WHERE tablename = 'accounts'"
    )
    assert rowfilter is not None and "draft" in rowfilter
    assert db.scalar("SELECT count(*) FROM cdc_audit.policy_version") == 2
    assert plan_text(db, changed) == ""


def test_upgrade_from_an_older_schema_keeps_recorded_events(
    app_tables: Database, write_policy: WritePolicy
) -> None:
    db = app_tables
    policy = write_policy(ACCOUNTS)
    apply(db, policy, target_migration=1)
    assert db.scalar("SELECT max(version) FROM cdc_audit.schema_migration") == 1
    assert db.scalar("SELECT count(*) FROM pg_indexes WHERE indexname = 'event_actor_time'") == 0
    db.execute(
        "INSERT INTO cdc_audit.event (stream, seq, event_id, commit_time, kind, payload_hash,"
        " prev_hash, hash, actor_id) VALUES ('user', 1, gen_random_uuid(), now(), 'insert',"
        " '\\x01', '\\x00', '\\x02', 'u1')"
    )
    before = db.execute("SELECT * FROM cdc_audit.event")

    text = plan_text(db, policy)
    assert "migration 0002 event_indexes" in text
    # Later migrations add tables of their own; the trail's are never made again.
    assert "CREATE TABLE cdc_audit.event " not in text
    apply(db, policy)
    assert db.scalar("SELECT max(version) FROM cdc_audit.schema_migration") == LATEST_MIGRATION
    assert db.scalar("SELECT count(*) FROM pg_indexes WHERE indexname = 'event_actor_time'") == 1
    # Later migrations may add columns at the end; what was recorded stays as it was.
    after = db.execute("SELECT * FROM cdc_audit.event")
    assert [row[: len(before[0])] for row in after] == before
    assert plan_text(db, policy) == ""


def test_removing_a_table_undoes_its_capture_but_keeps_its_events(
    app_tables: Database, write_policy: WritePolicy
) -> None:
    db = app_tables
    apply(db, write_policy(ACCOUNTS + ROLES))
    db.execute(
        "INSERT INTO cdc_audit.event (stream, seq, event_id, commit_time, kind, schema_name,"
        " table_name, payload_hash, prev_hash, hash) VALUES ('admin', 1, gen_random_uuid(), now(),"
        " 'insert', 'public', 'roles', '\\x01', '\\x00', '\\x02')"
    )
    apply(db, write_policy(ACCOUNTS))
    assert (
        db.scalar(
            "SELECT count(*) FROM pg_trigger WHERE tgrelid = 'roles'::regclass"
            " AND tgname = 'cdc_audit_context'"
        )
        == 0
    )
    assert db.scalar("SELECT count(*) FROM pg_publication_tables WHERE tablename = 'roles'") == 0
    assert db.scalar("SELECT relreplident::text FROM pg_class WHERE relname = 'roles'") == "d"
    assert db.scalar("SELECT count(*) FROM cdc_audit.event WHERE table_name = 'roles'") == 1


def test_uninstall_keeps_the_trail_and_drop_data_removes_it(
    app_tables: Database, write_policy: WritePolicy
) -> None:
    db = app_tables
    policy = write_policy(ACCOUNTS, EXTRA)
    apply(db, policy)
    result = run_cli("--dsn", db.dsn, "uninstall", "--policy", str(policy))
    assert result.returncode == 0, result.stderr
    assert db.scalar("SELECT count(*) FROM pg_trigger WHERE tgname = 'cdc_audit_context'") == 0
    assert db.scalar("SELECT count(*) FROM pg_event_trigger") == 0
    assert db.scalar("SELECT count(*) FROM pg_publication") == 0
    assert (
        db.scalar("SELECT count(*) FROM pg_replication_slots WHERE database = current_database()")
        == 0
    )
    assert db.scalar("SELECT relreplident::text FROM pg_class WHERE relname = 'accounts'") == "d"
    assert (
        db.scalar(
            "SELECT has_function_privilege('public', "
            "'pg_logical_emit_message(boolean,text,text)', 'EXECUTE')"
        )
        is True
    )
    assert db.scalar("SELECT count(*) FROM cdc_audit.policy_version") == 2
    assert (
        db.scalar(
            "SELECT to_regprocedure("
            "'cdc_audit.set_context(text,text,text,text,text,text,text,jsonb,text)')"
        )
        is None
    )

    again = run_cli("--dsn", db.dsn, "uninstall", "--policy", str(policy))
    assert again.returncode == 3
    assert "capture is not installed in schema cdc_audit (its trail is kept" in again.stderr

    assert apply(db, policy).plan.steps, "a later apply reinstalls the capture"
    result = run_cli("--dsn", db.dsn, "uninstall", "--drop-data", "--schema", "cdc_audit")
    assert result.returncode == 0, result.stderr
    assert db.scalar("SELECT count(*) FROM pg_namespace WHERE nspname = 'cdc_audit'") == 0


def test_status_reports_policy_tables_and_slot(
    app_tables: Database, write_policy: WritePolicy
) -> None:
    db = app_tables
    before = run_cli("--dsn", db.dsn, "status")
    assert before.returncode == 3 and "not installed" in before.stdout
    apply(db, write_policy(ACCOUNTS))
    db.execute("INSERT INTO accounts VALUES (1, 'a', 'new', now())")
    result = run_cli("--dsn", db.dsn, "status", "--format", "json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["installed"] is True
    assert report["policy"]["version"] == 1
    assert report["tables"] == [
        {
            "table": "public.accounts",
            "stream": "user",
            "exists": True,
            "partitions": 0,
            "relations_without_trigger": 0,
            "published": True,
        }
    ]
    assert report["slot"]["active"] is False
    assert report["slot"]["lag_bytes"] > 0
    text = run_cli("--dsn", db.dsn, "status").stdout
    assert "accounts -> user [ok]" in text and "lag" in text


def test_unknown_table_and_column_are_policy_errors(
    app_tables: Database, write_policy: WritePolicy
) -> None:
    policy = write_policy(
        ACCOUNTS
        + "  - {table: public.nope, stream: user}\n"
        + "  - {table: public.roles, stream: admin, exclude: [missing_col]}\n"
    )
    result = run_cli("--dsn", app_tables.dsn, "apply", "--policy", str(policy))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert f"{policy}:11: tables[1].table: table public.nope does not exist" in lines[0]
    assert "tables[2].exclude: column 'missing_col' does not exist" in lines[1]
    assert "Traceback" not in result.stderr
    assert app_tables.scalar("SELECT count(*) FROM pg_namespace WHERE nspname = 'cdc_audit'") == 0


def test_apply_needs_a_superuser(app_tables: Database, write_policy: WritePolicy) -> None:
    user = app_tables.login_role("plain")
    result = run_cli(
        "--dsn", app_tables.dsn_as(user), "apply", "--policy", str(write_policy(ACCOUNTS))
    )
    assert result.returncode == 2
    assert "superuser" in result.stderr


def test_unreachable_database_is_a_one_line_error(write_policy: WritePolicy) -> None:
    result = run_cli(
        "--dsn",
        "host=127.0.0.1 port=1 connect_timeout=2",
        "plan",
        "--policy",
        str(write_policy(ACCOUNTS)),
    )
    assert result.returncode == 3
    assert result.stderr.startswith("cdc-audit: cannot connect")
    assert len(result.stderr.strip().splitlines()) == 1


def test_two_databases_in_one_cluster_coexist(
    app_tables: Database, write_policy: WritePolicy, pg_cluster: object
) -> None:
    other = app_tables.name + "_b"
    with psycopg.connect(app_tables.cluster.dsn(), autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{other}" TEMPLATE "{app_tables.name}"')
    second = Database(other, app_tables.cluster)
    try:
        policy = write_policy(ACCOUNTS)
        first_slot = apply(app_tables, policy).slot
        second_slot = apply(second, policy).slot
        assert first_slot != second_slot
        result = run_cli("--dsn", app_tables.dsn, "uninstall", "--drop-data")
        assert result.returncode == 0, result.stderr
        assert "another database still uses it" in result.stderr
        assert second.scalar("SELECT count(*) FROM cdc_audit.policy_version") == 1
    finally:
        second.drop()
