"""Admin attestations and time-bounded approvals, enforced by the database.

A table with `require_approval: true` accepts a change only while its actor holds an
unexpired approval granted by somebody else (`cdc-audit approve`); the change's events carry
the approval's id, and the approval is itself an event in the admin stream. A stream that
requires `reason` and `approval` refuses a statement without them, naming what is missing.
"""

from __future__ import annotations

import time
from typing import Any

import psycopg
import pytest

from cdc_audit import installer
from cdc_audit.context import context, set_context
from cdc_audit.policy import load_policy

from .fix_policy import WritePolicy
from .pg import Database, run_cli
from .trailkit import drain, events

TABLES = (
    "  - {table: public.accounts, stream: user}\n"
    "  - {table: public.roles, stream: admin, require_approval: true}\n"
)
EXTRA = "ddl: {stream: admin}\n"


@pytest.fixture
def approvals(database: Database, write_policy: WritePolicy) -> Database:
    database.execute(
        "CREATE TABLE accounts (id int PRIMARY KEY, owner text);"
        "CREATE TABLE roles (id int PRIMARY KEY, name text)"
    )
    installer.apply(database.dsn, load_policy(write_policy(TABLES, EXTRA)))
    return database


def approve(db: Database, *args: str) -> Any:
    return run_cli("--dsn", db.dsn, "approve", *args)


def grant(db: Database, actor: str, expires: str = "1h", approver: str = "sec-bob") -> int:
    result = approve(
        db, "--actor", actor, "--table", "public.roles", "--expires", expires,
        "--approver", approver, "--reason", "CHG-1234 grant support access",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    return int(result.stdout)


def change_roles(
    db: Database, actor: str | None, sql: str = "INSERT INTO roles VALUES (1, 'x')"
) -> None:
    with db.connect(autocommit=False) as conn:
        if actor is not None:
            set_context(conn, actor_id=actor, reason="support ticket 9")
        conn.execute(sql)
        conn.commit()


def refusal(
    db: Database, actor: str | None, sql: str = "INSERT INTO roles VALUES (1, 'x')"
) -> psycopg.Error:
    with pytest.raises(psycopg.Error) as caught:
        change_roles(db, actor, sql)
    return caught.value


def test_a_change_without_an_approval_is_refused_naming_what_to_do(approvals: Database) -> None:
    error = refusal(approvals, "ops-anna")
    assert error.sqlstate == "CA003"
    assert error.diag.message_primary == (
        "cdc-audit: INSERT on public.roles by 'ops-anna' needs an unexpired approval"
        " (none was granted)"
    )
    assert error.diag.message_hint is not None
    assert "cdc-audit approve --actor ops-anna --table public.roles" in error.diag.message_hint

    anonymous = refusal(approvals, None)
    assert anonymous.sqlstate == "CA003"
    assert "the audit context names no actor_id" in str(anonymous)
    assert approvals.scalar("SELECT count(*) FROM roles") == 0

    # Tables without the rule are not affected.
    with approvals.connect(autocommit=False) as conn:
        set_context(conn, actor_id="ops-anna")
        conn.execute("INSERT INTO accounts VALUES (1, 'a')")
        conn.commit()


def test_an_approved_change_carries_the_approval_and_the_approval_is_an_admin_event(
    approvals: Database,
) -> None:
    approval_id = grant(approvals, "ops-anna")
    change_roles(approvals, "ops-anna")
    with approvals.connect(autocommit=False) as conn:
        set_context(conn, actor_id="ops-anna", reason="support ticket 9")
        conn.execute("UPDATE roles SET name = 'y'")
        # A new context in the same transaction still carries the approval on the next change.
        set_context(conn, actor_id="ops-anna", reason="follow-up")
        conn.execute("DELETE FROM roles")
        conn.commit()
    # Somebody else is not covered by ops-anna's approval.
    assert refusal(approvals, "ops-carl").sqlstate == "CA003"

    drain(approvals)
    changes = events(approvals, "table_name = 'roles'")
    assert [c["kind"] for c in changes] == ["insert", "update", "delete"]
    assert [c["context"]["approval_id"] for c in changes] == [approval_id] * 3
    assert [c["reason"] for c in changes] == ["support ticket 9", "support ticket 9", "follow-up"]

    (granted,) = events(approvals, "kind = 'app' AND stream = 'admin'")
    assert granted["actor_id"] == "sec-bob"
    assert granted["reason"] == "CHG-1234 grant support access"
    assert granted["new"]["action"] == "admin.approval.granted"
    assert granted["new"]["resource"] == "public.roles"
    details = granted["new"]["details"]
    assert details["approval_id"] == approval_id
    assert (details["actor_id"], details["approver"]) == ("ops-anna", "sec-bob")

    stored = approvals.execute(
        "SELECT actor_id, approver, schema_name, table_name, expires_at - granted_at"
        " FROM cdc_audit.approval WHERE approval_id = %s",
        (approval_id,),
    )
    assert [tuple(map(str, row)) for row in stored] == [
        ("ops-anna", "sec-bob", "public", "roles", "1:00:00")
    ]


def test_an_approval_expires(approvals: Database) -> None:
    approval_id = grant(approvals, "ops-anna", expires="2s")
    change_roles(approvals, "ops-anna")
    expires_at = approvals.scalar(
        "SELECT expires_at FROM cdc_audit.approval WHERE approval_id = %s", (approval_id,)
    )
    deadline = time.monotonic() + 30
    while approvals.scalar("SELECT clock_timestamp() <= %s", (expires_at,)):
        assert time.monotonic() < deadline, "the database clock did not pass the expiry"
        time.sleep(0.2)

    error = refusal(approvals, "ops-anna", "UPDATE roles SET name = 'late'")
    assert error.sqlstate == "CA003"
    assert "needs an unexpired approval (the last one expired at " in str(error)
    assert approvals.scalar("SELECT name FROM roles") == "x"

    grant(approvals, "ops-anna", expires="1h")
    change_roles(approvals, "ops-anna", "UPDATE roles SET name = 'renewed'")
    assert approvals.scalar("SELECT name FROM roles") == "renewed"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["--actor", "ops-anna", "--approver", "ops-anna"],
            "'ops-anna' cannot approve their own changes",
        ),
        (
            ["--actor", "ops-anna", "--approver", " OPS-ANNA "],
            "'ops-anna' cannot approve their own changes",
        ),
        (
            ["--actor", "ops-anna", "--table", "public.accounts"],
            "public.accounts does not require approval (set require_approval: true on it"
            " in the policy and apply)",
        ),
        (
            ["--actor", "ops-anna", "--table", "public.nowhere"],
            "table 'public.nowhere' does not exist (name it as schema.table)",
        ),
        (["--actor", "ops-anna", "--expires", "soon"], "--expires: 'soon' is not a duration"),
        (["--actor", "ops-anna", "--expires", "0s"], "an approval must expire after it is granted"),
        (["--actor", "ops-anna", "--reason", "  "], "an approval needs an actor, an approver"),
    ],
)
def test_refused_approvals_exit_2_with_one_line(
    approvals: Database, args: list[str], message: str
) -> None:
    defaults = {
        "--table": "public.roles",
        "--expires": "1h",
        "--approver": "sec-bob",
        "--reason": "CHG-1",
    }
    given = dict(zip(args[::2], args[1::2], strict=True))
    merged = [part for key, value in {**defaults, **given}.items() for part in (key, value)]
    result = approve(approvals, *merged)
    assert result.returncode == 2, result.stderr
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert message in result.stderr
    assert approvals.scalar("SELECT count(*) FROM cdc_audit.approval") == 0


def test_an_actor_cannot_approve_themselves_through_the_context(approvals: Database) -> None:
    """The session says it acts as the actor: it may not name another approver for itself."""
    with approvals.connect(autocommit=False) as conn:
        set_context(conn, actor_id="ops-anna")
        with pytest.raises(psycopg.Error, match="'ops-anna' cannot approve their own changes"):
            conn.execute(
                "SELECT cdc_audit.approve('ops-anna', 'public.roles', '1h', 'sec-bob', 'x')"
            )


def test_approvals_are_append_only_and_not_for_applications(approvals: Database) -> None:
    approval_id = grant(approvals, "ops-anna")
    with pytest.raises(psycopg.Error, match="append-only"):
        approvals.execute(
            "UPDATE cdc_audit.approval SET expires_at = expires_at + interval '1 year'"
            " WHERE approval_id = %s",
            (approval_id,),
        )
    app = approvals.login_role("approvals_app", "cdc_audit_app")
    checks = approvals.execute(
        "SELECT has_function_privilege(%s, 'cdc_audit.approve(text,text,interval,text,text)',"
        " 'EXECUTE'), has_table_privilege(%s, 'cdc_audit.approval', 'INSERT'),"
        " has_function_privilege('public', 'cdc_audit.approve(text,text,interval,text,text)',"
        " 'EXECUTE')",
        (app, app),
    )
    assert checks == [(False, False, False)]


def test_a_stream_can_require_reason_and_an_approval_reference(
    database: Database, write_policy: WritePolicy
) -> None:
    database.execute("CREATE TABLE roles (id int PRIMARY KEY, name text)")
    policy = write_policy(
        "  - {table: public.roles, stream: admin}\n",
        base=(
            "version: 1\nschema: cdc_audit\nstreams:\n  user: {}\n"
            "  admin: {require: [actor_id, reason, approval], on_missing: reject}\n"
        ),
    )
    installer.apply(database.dsn, load_policy(policy))
    with database.connect(autocommit=False) as conn:
        set_context(conn, actor_id="ops-anna")
        with pytest.raises(psycopg.Error) as caught:
            conn.execute("INSERT INTO roles VALUES (1, 'x')")
    assert caught.value.sqlstate == "CA001"
    assert caught.value.diag.message_primary == (
        "cdc-audit: INSERT on public.roles needs audit context: approval, reason missing"
    )
    with (
        database.connect() as conn,
        context(conn, actor_id="ops-anna", reason="grant support", approval="CAB-77"),
    ):
        conn.execute("INSERT INTO roles VALUES (1, 'x')")
    drain(database)
    (event,) = events(database, "table_name = 'roles'")
    assert (event["reason"], event["context"]["approval"]) == ("grant support", "CAB-77")
    assert event["context_missing"] is False


def test_dropping_the_rule_removes_the_check_and_uninstall_leaves_no_trigger(
    approvals: Database, write_policy: WritePolicy
) -> None:
    relaxed = write_policy(TABLES.replace(", require_approval: true", ""), EXTRA)
    installer.apply(approvals.dsn, load_policy(relaxed))
    change_roles(approvals, "ops-anna")
    strict = write_policy(TABLES, EXTRA)
    installer.apply(approvals.dsn, load_policy(strict))
    assert refusal(approvals, "ops-anna", "UPDATE roles SET name = 'y'").sqlstate == "CA003"

    result = run_cli("--dsn", approvals.dsn, "uninstall", "--policy", str(strict))
    assert result.returncode == 0, result.stderr
    assert (
        approvals.scalar(
            "SELECT count(*) FROM pg_trigger"
            " WHERE tgname IN ('cdc_audit_approval', 'cdc_audit_context')"
        )
        == 0
    )
    change_roles(approvals, None, "UPDATE roles SET name = 'free'")


def test_an_application_role_changes_an_approved_table(approvals: Database) -> None:
    """The check runs as the audit owner: the application needs no privilege on approvals."""
    app = approvals.login_role("approved_app", "cdc_audit_app")
    approvals.execute(f"GRANT INSERT, UPDATE, SELECT ON roles TO {app}")
    grant(approvals, "ops-anna")
    with psycopg.connect(approvals.dsn_as(app)) as conn:
        set_context(conn, actor_id="ops-anna", reason="support ticket 9")
        conn.execute("INSERT INTO roles VALUES (5, 'support')")
        conn.commit()
        set_context(conn, actor_id="ops-dave", reason="support ticket 9")
        with pytest.raises(psycopg.Error, match="by 'ops-dave' needs an unexpired approval"):
            conn.execute("UPDATE roles SET name = 'root'")
    assert approvals.scalar("SELECT name FROM roles WHERE id = 5") == "support"


def test_a_dropped_approval_check_is_drift_and_apply_restores_it(
    approvals: Database, write_policy: WritePolicy
) -> None:
    approvals.execute("DROP TRIGGER cdc_audit_approval ON roles")
    change_roles(approvals, "ops-anna")  # unguarded now: drift must say so
    found = run_cli("--dsn", approvals.dsn, "drift")
    assert found.returncode == 1, found.stderr
    assert (
        "approval check cdc_audit_approval is missing or disabled: changes are accepted"
        " without an approval"
    ) in found.stdout
    installer.apply(approvals.dsn, load_policy(write_policy(TABLES, EXTRA)))
    assert refusal(approvals, "ops-anna", "UPDATE roles SET name = 'y'").sqlstate == "CA003"
    assert "approval check" not in run_cli("--dsn", approvals.dsn, "drift").stdout
