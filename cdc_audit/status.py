"""What `cdc-audit status` reports: installation, policy, audited tables, slot and lag."""

from __future__ import annotations

from typing import Any

import psycopg
from psycopg import sql
from psycopg.rows import TupleRow

from . import catalog
from .catalog import Installed
from .drift import latest_drift
from .names import InstallNames
from .predicate import TableName
from .trail_commands import latest_verdicts

# Migration that gave the progress row its commit time and worker columns.
_PROGRESS_WITH_TIMES = 3
_VERIFICATIONS = 5
_DRIFT_CHECKS = 7


def collect(conn: psycopg.Connection[TupleRow], names: InstallNames) -> dict[str, Any]:
    installed = catalog.read_installed(conn, names, recorded_slot=True)
    names = installed.names
    catalog.read_tables(conn, installed, set())
    return {
        "installed": installed.schema_exists and "runtime_sha256" in installed.settings,
        "database": names.database,
        "schema": names.schema,
        "schema_version": installed.migration_version,
        "policy": {
            "version": installed.last_policy_version,
            "sha256": installed.last_policy_sha256,
            "applied_at": installed.last_applied_at,
        },
        "tables": _tables(installed),
        "slot": None if installed.slot is None else vars(installed.slot),
        "worker": _worker(conn, installed),
        "publication": names.publication if installed.publication_exists else None,
        "ddl_capture": bool(installed.event_triggers),
        "emit_message_locked": not installed.emit_message_public,
        "verification": _verification(conn, installed),
        "drift": _drift(conn, installed),
    }


def _verification(conn: psycopg.Connection[TupleRow], installed: Installed) -> list[dict[str, Any]]:
    """Each stream's newest recorded verification (from verify or the scheduled job)."""
    if installed.migration_version < _VERIFICATIONS:
        return []
    return latest_verdicts(conn, installed.names.schema)


def _drift(conn: psycopg.Connection[TupleRow], installed: Installed) -> dict[str, Any] | None:
    """The newest drift check (from the drift command or the scheduled job)."""
    if installed.migration_version < _DRIFT_CHECKS:
        return None
    return latest_drift(conn, installed.names.schema)


def _worker(conn: psycopg.Connection[TupleRow], installed: Installed) -> dict[str, Any] | None:
    """The worker's last batch: how far it sealed, and how late it was then and since."""
    if installed.migration_version < _PROGRESS_WITH_TIMES:
        return None
    row = conn.execute(
        sql.SQL(
            "SELECT end_lsn::text, worker, updated_at,"
            " extract(epoch FROM updated_at - last_commit_time)::float8,"
            " extract(epoch FROM now() - updated_at)::float8"
            " FROM {}.progress WHERE slot_name = %s"
        ).format(sql.Identifier(installed.names.schema)),
        (installed.names.slot,),
    ).fetchone()
    if row is None:
        return None
    end_lsn, worker, updated_at, lag, since = row
    return {
        "sealed_up_to": end_lsn,
        "last_worker": worker,
        "last_batch_at": updated_at,
        "lag_seconds": None if lag is None else round(max(lag, 0.0), 3),
        "seconds_since_last_batch": round(since, 3),
    }


def _tables(installed: Installed) -> list[dict[str, Any]]:
    rows = []
    for key, audited in sorted(installed.audited.items()):
        info = installed.tables.get(key)
        relations = info.all_relations if info else ()
        rows.append(
            {
                "table": TableName(*key).qualified(),
                "stream": audited.stream,
                "exists": info is not None,
                "partitions": len(relations) - 1 if relations else 0,
                "relations_without_trigger": sum(
                    1 for r in relations if r.oid not in installed.trigger_oids
                ),
                "published": key in installed.publication_tables,
            }
        )
    return rows


def render_text(report: dict[str, Any]) -> str:
    if not report["installed"]:
        return f"cdc-audit is not installed in schema {report['schema']} of {report['database']}\n"
    policy = report["policy"]
    lines = [
        f"database     {report['database']}, schema {report['schema']} "
        f"(audit schema version {report['schema_version']})",
        f"policy       version {policy['version']}, sha256 {str(policy['sha256'])[:16]}, "
        f"applied {policy['applied_at']}",
        f"ddl capture  {'on' if report['ddl_capture'] else 'off'}",
    ]
    for table in report["tables"]:
        health = "ok" if table["exists"] and table["published"] else "DRIFT"
        if table["relations_without_trigger"]:
            health = f"DRIFT: {table['relations_without_trigger']} relation(s) without trigger"
        lines.append(f"table        {table['table']} -> {table['stream']} [{health}]")
    slot = report["slot"]
    if slot is None:
        lines.append("slot         MISSING")
    else:
        lines.append(
            f"slot         {slot['name']}: {'active' if slot['active'] else 'inactive'}, "
            f"wal_status {slot['wal_status']}, lag {slot['lag_bytes']} bytes, "
            f"retained {slot['retained_bytes']} bytes"
        )
    worker = report.get("worker")
    if worker is None:
        lines.append("worker       nothing sealed yet")
    else:
        lines.append(
            f"worker       sealed up to {worker['sealed_up_to']}, "
            f"{worker['lag_seconds']} s behind commit at its last batch, "
            f"{worker['seconds_since_last_batch']} s ago (by {worker['last_worker']})"
        )
    for verdict in report.get("verification") or []:
        outcome = (
            "ok"
            if verdict["ok"]
            else f"FAILED at seq {verdict['first_bad_seq']}: {verdict['problem']}"
        )
        lines.append(
            f"verified     stream {verdict['stream']} seq {verdict['first_seq']}-"
            f"{verdict['last_seq']} at {verdict['verified_at']}: {outcome}"
        )
    drift = report.get("drift")
    if drift is not None:
        findings = drift.get("findings") or []
        lines.append(
            f"drift        {len(findings)} finding(s) at {drift.get('checked_at')}"
            if findings
            else f"drift        none at {drift.get('checked_at')}"
        )
        lines.extend(f"             - {finding}" for finding in findings)
    return "\n".join(lines) + "\n"
