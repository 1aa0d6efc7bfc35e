"""Roles, memberships and grants made out of band become privilege events of the admin stream."""

from __future__ import annotations

from typing import Any

import psycopg
import pytest

from cdc_audit.drift import privileges_job
from cdc_audit.job_context import JobContext
from cdc_audit.policy import load_policy

from .fix_policy import WritePolicy
from .pg import Database, run_cli
from .test_worker import Trail

TABLES = "  - {table: public.accounts, stream: user}\n"
EXTRA = "ddl: {stream: admin}\n"


@pytest.fixture
def trail(database: Database, write_policy: WritePolicy) -> Trail:
    database.execute("CREATE TABLE accounts (id int PRIMARY KEY, owner text)")
    # Roles are cluster-wide: names unique to this test's database keep tests apart.
    t = Trail(database, write_policy(TABLES, EXTRA))
    t.apply()
    return t


def privilege_events(trail: Trail) -> list[dict[str, Any]]:
    return [e["new"] | {"_stream": e["stream"]} for e in trail.events("kind = 'privilege'")]


def drift(trail: Trail) -> str:
    result = run_cli("drift", "--dsn", trail.db.dsn)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stderr


def test_roles_memberships_and_grants_out_of_band_become_admin_events(trail: Trail) -> None:
    db = trail.db
    suffix = db.name[:4]
    bob, carol, temp = f"bob_{suffix}", f"carol_{suffix}", f"temp_{suffix}"
    db.execute(f"CREATE ROLE {carol} NOLOGIN; CREATE ROLE {temp}")

    first = drift(trail)
    assert "privilege baseline recorded" in first
    assert "recorded: privilege baseline:" in first
    again = drift(trail)
    assert "no privilege change" in again
    assert db.scalar("SELECT count(*) FROM cdc_audit.privilege_snapshot") == 1

    db.execute(
        f"CREATE ROLE {bob} LOGIN CONNECTION LIMIT 5;"
        f"GRANT cdc_audit_reader TO {bob} WITH ADMIN OPTION;"
        f"GRANT SELECT, UPDATE (owner) ON accounts TO {bob};"
        f"ALTER ROLE {carol} CREATEDB VALID UNTIL '2100-01-01 00:00:00+00';"
        f"DROP ROLE {temp}"
    )
    changed = drift(trail)
    assert f"recorded: role created: {bob} (login)" in changed
    assert f"recorded: role dropped: {temp}" in changed
    assert (
        f"recorded: role altered: {carol}: createdb false -> true,"
        " valid_until none -> 2100-01-01T00:00:00.000000Z"
    ) in changed
    assert (
        f"recorded: membership granted: {bob} in cdc_audit_reader (by postgres) with admin option"
    ) in changed
    assert f"recorded: privilege granted: SELECT on table public.accounts to {bob}" in changed
    assert (
        f"recorded: privilege granted: UPDATE on column public.accounts (owner) to {bob}"
    ) in changed
    assert "no privilege change" in drift(trail)

    trail.drain()
    events = privilege_events(trail)
    assert {e["_stream"] for e in events} == {"admin"}
    assert events[0]["change"] == "baseline"
    assert events[0]["roles"] >= 7  # the superuser, the five audit roles, carol and temp
    changes = {(e["change"], e.get("role") or e.get("grantee")) for e in events[1:]}
    assert changes == {
        ("role_created", bob),
        ("role_dropped", temp),
        ("role_altered", carol),
        ("membership_granted", "cdc_audit_reader"),
        ("privilege_granted", bob),
    }
    created = next(e for e in events if e["change"] == "role_created")
    assert created["login"] is True and created["connection_limit"] == 5
    assert created["superuser"] is False
    altered = next(e for e in events if e["change"] == "role_altered")
    assert altered["before"] == {"createdb": False, "valid_until": None}
    assert altered["after"] == {"createdb": True, "valid_until": "2100-01-01T00:00:00.000000Z"}
    membership = next(e for e in events if e["change"] == "membership_granted")
    assert (membership["member"], membership["grantor"], membership["admin_option"]) == (
        bob,
        "postgres",
        True,
    )
    granted = sorted(
        (e["object_type"], e["object"], e["privilege"])
        for e in events
        if e["change"] == "privilege_granted"
    )
    assert granted == [
        ("column", "public.accounts (owner)", "UPDATE"),
        ("table", "public.accounts", "SELECT"),
    ]
    # No password or hash is ever part of the state.
    state = str(db.scalar("SELECT state FROM cdc_audit.privilege_snapshot ORDER BY id DESC"))
    assert "password" not in state and "SCRAM" not in state
    # Who noticed: the database facts of the session that ran the check.
    noticed = trail.events("kind = 'privilege'")[-1]["context"]["db"]
    assert noticed["session_user"] == "postgres"
    assert noticed["application_name"] == "cdc-audit drift"

    verify = run_cli("verify", "--dsn", db.dsn, "--policy", str(trail.policy))
    assert verify.returncode == 0, verify.stdout + verify.stderr


def test_revocations_and_the_scheduled_job(trail: Trail) -> None:
    db = trail.db
    dave = f"dave_{db.name[:4]}"
    db.execute(
        f"CREATE ROLE {dave}; GRANT cdc_audit_auditor TO {dave};GRANT SELECT ON accounts TO {dave}"
    )
    lines: list[str] = []
    policy = load_policy(trail.policy).policy
    context = JobContext(dsn=db.dsn, policy=policy, progress=lines.append)
    assert privileges_job(context).startswith("privileges: privilege baseline recorded")
    assert privileges_job(context) == "privileges: no privilege change; no drift"

    db.execute(
        f"REVOKE cdc_audit_auditor FROM {dave}; REVOKE SELECT ON accounts FROM {dave};"
        f"DROP ROLE {dave}"
    )
    summary = privileges_job(context)
    assert summary == "privileges: 3 privilege change(s) recorded; no drift", lines
    assert f"membership revoked: {dave} in cdc_audit_auditor (by postgres)" in lines
    revoked = f"privilege revoked: SELECT on table public.accounts to {dave} (by postgres)"
    assert revoked in lines
    assert f"role dropped: {dave}" in lines

    trail.drain()
    kinds = [e["change"] for e in privilege_events(trail)]
    assert kinds == ["baseline", "role_dropped", "membership_revoked", "privilege_revoked"]
    verify = run_cli("verify", "--dsn", db.dsn, "--policy", str(trail.policy))
    assert verify.returncode == 0, verify.stdout + verify.stderr


def test_the_recording_function_is_not_for_everyone(trail: Trail) -> None:
    db = trail.db
    stranger = db.login_role("stranger")
    with db.connect(user=stranger) as conn, pytest.raises(psycopg.errors.InsufficientPrivilege):
        conn.execute("SELECT cdc_audit.record_privilege_change('{}'::jsonb)")
