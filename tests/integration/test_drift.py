"""`cdc-audit drift` against a real PostgreSQL: each kind of drift is found, named and recorded."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from cdc_audit import drift

from .fix_policy import WritePolicy
from .pg import Database, run_cli
from .test_worker import Trail

TABLES = """\
  - {table: public.accounts, stream: user}
  - {table: public.roles, stream: admin, old_values: key}
  - {table: public.measurements, stream: user}
"""
EXTRA = "ddl: {stream: admin}\napp_events: {stream: user}\n"


@pytest.fixture
def installed(database: Database, write_policy: WritePolicy) -> Trail:
    database.execute(
        "CREATE TABLE accounts (id int PRIMARY KEY, owner text);"
        "CREATE TABLE roles (id int PRIMARY KEY, name text);"
        "CREATE TABLE measurements (id int, at date, v int, PRIMARY KEY (id, at))"
        " PARTITION BY RANGE (at);"
        "CREATE TABLE measurements_2025 PARTITION OF measurements"
        " FOR VALUES FROM ('2025-01-01') TO ('2026-01-01');"
        "CREATE TABLE unaudited (id int)"
    )
    trail = Trail(database, write_policy(TABLES, EXTRA))
    trail.apply()
    return trail


def drift_cli(trail: Trail, *args: str) -> subprocess.CompletedProcess[str]:
    return run_cli("drift", "--dsn", trail.db.dsn, *args)


def assert_clean(trail: Trail) -> None:
    result = drift_cli(trail)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout == ""
    assert "no drift" in result.stderr


Case = tuple[str, str, str, bool, str]
# (what is done out of band, the start of a line it must produce, how to undo it by hand when
#  apply does not repair it, whether `apply` repairs it, the finding's code)
CASES: dict[str, Case] = {
    "trigger dropped": (
        "DROP TRIGGER cdc_audit_context ON accounts",
        "public.accounts: context trigger cdc_audit_context is missing",
        "",
        True,
        "trigger_missing",
    ),
    "trigger disabled": (
        "ALTER TABLE accounts DISABLE TRIGGER cdc_audit_context",
        "public.accounts: context trigger cdc_audit_context is disabled",
        "ALTER TABLE accounts ENABLE TRIGGER cdc_audit_context",
        False,
        "trigger_disabled",
    ),
    "trigger enabled for replica sessions only": (
        "ALTER TABLE roles ENABLE REPLICA TRIGGER cdc_audit_context",
        "public.roles: context trigger cdc_audit_context fires only in replica sessions",
        "ALTER TABLE roles ENABLE TRIGGER cdc_audit_context",
        False,
        "trigger_disabled",
    ),
    "table removed from the publication": (
        "ALTER PUBLICATION cdc_audit DROP TABLE accounts",
        "public.accounts: not in publication cdc_audit",
        "",
        True,
        "not_published",
    ),
    "replica identity changed to default": (
        "ALTER TABLE accounts REPLICA IDENTITY DEFAULT",
        "public.accounts: REPLICA IDENTITY DEFAULT, the policy needs FULL",
        "",
        True,
        "replica_identity",
    ),
    "new partition without the trigger": (
        "CREATE TABLE measurements_2026 PARTITION OF measurements"
        " FOR VALUES FROM ('2026-01-01') TO ('2027-01-01')",
        "public.measurements_2026: partition of public.measurements without the context trigger",
        "",
        True,
        "partition_without_trigger",
    ),
    "event trigger disabled": (
        "ALTER EVENT TRIGGER cdc_audit_ddl DISABLE",
        "cdc_audit_ddl: event trigger is disabled",
        "ALTER EVENT TRIGGER cdc_audit_ddl ENABLE",
        False,
        "event_trigger_disabled",
    ),
    "event trigger dropped": (
        "DROP EVENT TRIGGER cdc_audit_drop",
        "cdc_audit_drop: event trigger is missing",
        "",
        True,
        "event_trigger_missing",
    ),
    "slot dropped": (
        "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots"
        " WHERE slot_name LIKE 'cdc_audit_%'",
        "_slot_: replication slot is missing",
        "",
        True,
        "slot_missing",
    ),
    "publication dropped": (
        "DROP PUBLICATION cdc_audit",
        "cdc_audit: publication is missing",
        "",
        True,
        "publication_missing",
    ),
    "guard trigger disabled": (
        "ALTER TABLE cdc_audit.checkpoint DISABLE TRIGGER append_only",
        "cdc_audit.checkpoint: guard trigger append_only is disabled",
        "ALTER TABLE cdc_audit.checkpoint ENABLE TRIGGER append_only",
        False,
        "guard_disabled",
    ),
    "emit message given back to public": (
        "GRANT EXECUTE ON FUNCTION pg_logical_emit_message(boolean, text, text) TO PUBLIC;"
        "GRANT EXECUTE ON FUNCTION pg_logical_emit_message(boolean, text, bytea) TO PUBLIC",
        "pg_logical_emit_message: PUBLIC may execute it",
        "",
        True,
        "emit_message_public",
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_each_kind_of_drift_is_named_and_apply_repairs_it(installed: Trail, case: str) -> None:
    trail = installed
    assert_clean(trail)
    change, expected, undo, repaired_by_apply, code = CASES[case]
    slot = trail.db.scalar("SELECT value FROM cdc_audit.install_setting WHERE key = 'slot_name'")
    trail.db.execute(change)

    result = drift_cli(trail)
    assert result.returncode == 1, result.stderr
    lines = result.stdout.splitlines()
    assert any(line.startswith(expected.replace("_slot_", slot)) for line in lines), lines
    # JSON names the same findings, with a machine-readable code.
    as_json = json.loads(drift_cli(trail, "--format", "json").stdout)
    assert code in {finding["code"] for finding in as_json["drift"]}

    if repaired_by_apply:
        trail.apply()
    else:
        trail.db.execute(undo)
    assert_clean(trail)


def test_drift_is_recorded_once_per_change_of_findings(installed: Trail) -> None:
    trail = installed
    assert_clean(trail)
    trail.db.execute("ALTER TABLE accounts REPLICA IDENTITY DEFAULT")
    assert drift_cli(trail).returncode == 1
    assert drift_cli(trail).returncode == 1  # the same findings: checked, not recorded again
    trail.db.execute("ALTER TABLE accounts DISABLE TRIGGER cdc_audit_context")
    assert drift_cli(trail).returncode == 1
    trail.db.execute("ALTER TABLE accounts ENABLE TRIGGER cdc_audit_context")
    trail.apply()
    assert_clean(trail)
    assert trail.db.scalar("SELECT count(*) FROM cdc_audit.drift_check") == 5

    trail.drain()
    events = trail.events("kind = 'drift'")
    assert [e["stream"] for e in events] == ["admin"] * 3
    appeared = [[f["code"] for f in e["new"]["appeared"]] for e in events]
    resolved = [[f["code"] for f in e["new"]["resolved"]] for e in events]
    assert appeared == [["replica_identity"], ["trigger_disabled"], []]
    assert resolved == [[], [], ["trigger_disabled", "replica_identity"]]
    assert events[-1]["new"]["findings"] == []
    trail.assert_chains_verify()

    with trail.db.connect() as conn:
        latest = drift.latest_drift(conn, "cdc_audit")
    assert latest is not None and latest["findings"] == []


def test_a_policy_file_that_differs_from_the_applied_one_is_drift(
    installed: Trail, write_policy: WritePolicy
) -> None:
    trail = installed
    other = write_policy(TABLES + "  - {table: public.unaudited, stream: user}\n", EXTRA)
    result = drift_cli(trail, "--policy", str(other))
    assert result.returncode == 1, result.stderr
    lines = result.stdout.splitlines()
    assert any(line.startswith("policy: ") and "is not applied" in line for line in lines), lines
    assert "public.unaudited: apply would: audit public.unaudited (stream user)" in lines
    same = drift_cli(trail, "--policy", str(trail.policy))
    assert same.returncode == 0, same.stdout + same.stderr


def test_a_dropped_audited_table_is_named(installed: Trail) -> None:
    trail = installed
    trail.db.execute("DROP TABLE roles")
    result = drift_cli(trail)
    assert result.returncode == 1
    assert "public.roles: audited table is missing (dropped or renamed)" in result.stdout


def test_the_worker_role_runs_the_job(installed: Trail) -> None:
    """The scheduled job runs as the worker's login role: writer, not superuser."""
    trail = installed
    worker = trail.db.login_role("worker", "cdc_audit_writer")
    trail.db.execute(f"ALTER ROLE {worker} REPLICATION")
    result = run_cli("drift", "--dsn", trail.db.dsn_as(worker))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "privilege baseline recorded" in result.stderr


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (lambda tmp: ["--policy", str(tmp / "missing.yaml")], 2, "policy file not found"),
        (lambda tmp: ["--schema", "elsewhere"], 3, "not installed in schema elsewhere"),
    ],
)
def test_bad_input_exits_2_and_no_installation_exits_3(
    installed: Trail,
    tmp_path: Path,
    args: Callable[[Path], list[str]],
    code: int,
    message: str,
) -> None:
    result = drift_cli(installed, *args(tmp_path))
    assert result.returncode == code, result.stderr
    assert message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
