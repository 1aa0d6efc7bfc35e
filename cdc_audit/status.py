"""What `cdc-audit status` reports: installation, policy, audited tables, slot and lag.

The lag and per-stream figures are the ones the worker's metrics give (docs/worker.md), read
from the database, so that a script without access to the worker's port sees the same.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

import psycopg
from psycopg import sql
from psycopg.rows import TupleRow

from . import catalog
from .catalog import Installed
from .drift import latest_drift
from .names import InstallNames
from .predicate import TableName
from .trail import trail_streams
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
        "lag": vars(read_lag(conn, installed.names.slot)),
        "streams": _streams(conn, installed),
    }


@dataclass(frozen=True)
class SlotLag:
    """How far the slot is behind, from the server's side."""

    bytes: int | None
    """The server's current WAL position minus the slot's confirmed position."""
    seconds: float | None
    """How long committed WAL waits before the worker confirms it sealed: the flush lag the
    server measures on the worker's replication connection (0 when it has caught up and the
    server stopped measuring); None while no worker streams the slot, or when this role may
    not see replication statistics."""
    retained_wal_bytes: int | None
    """WAL the slot keeps on the server's disk (current position minus its restart_lsn)."""
    slot_lost: bool
    """The slot is missing, or the WAL it needs was removed (wal_status lost)."""
    worker_streaming: bool


def read_lag(conn: psycopg.Connection[TupleRow], slot: str) -> SlotLag:
    row = conn.execute(
        "SELECT s.wal_status, s.active,"
        " (pg_current_wal_lsn() - s.confirmed_flush_lsn)::bigint,"
        " (pg_current_wal_lsn() - s.restart_lsn)::bigint,"
        " r.state IS NOT NULL, extract(epoch FROM r.flush_lag)::float8"
        " FROM pg_replication_slots s LEFT JOIN pg_stat_replication r ON r.pid = s.active_pid"
        " WHERE s.slot_name = %s",
        (slot,),
    ).fetchone()
    conn.commit()
    if row is None:
        return SlotLag(None, None, None, slot_lost=True, worker_streaming=False)
    wal_status, active, lag_bytes, retained, visible, flush_lag = row
    seconds = round(flush_lag or 0.0, 3) if active and visible else None
    return SlotLag(
        None if lag_bytes is None else max(0, lag_bytes),
        seconds,
        retained,
        slot_lost=wal_status == "lost",
        worker_streaming=bool(active),
    )


@dataclass(frozen=True)
class StreamCounts:
    events: int
    last_seq: int
    missing_context: int
    gaps: int


def stream_counts(conn: psycopg.Connection[TupleRow], schema: str, stream: str) -> StreamCounts:
    """Events held (from the first and last seq: a stream's seqs have no holes, and a purge
    removes a prefix), events missing context and gap events (partial indexes, migration 13):
    a few index pages whatever the trail's size."""
    row = conn.execute(
        sql.SQL(
            "SELECT (SELECT min(seq) FROM {0}.event WHERE stream = %(s)s),"
            " (SELECT max(seq) FROM {0}.event WHERE stream = %(s)s),"
            " (SELECT count(*) FROM {0}.event WHERE stream = %(s)s AND context_missing),"
            " (SELECT count(*) FROM {0}.event WHERE stream = %(s)s AND kind = 'gap')"
        ).format(sql.Identifier(schema)),
        {"s": stream},
    ).fetchone()
    conn.commit()
    assert row is not None
    first, last, missing, gaps = row
    events = 0 if last is None else last - first + 1
    return StreamCounts(events, last or 0, missing, gaps)


def last_checkpoint_at(
    conn: psycopg.Connection[TupleRow], schema: str, stream: str
) -> datetime | None:
    """When the stream's newest signed checkpoint was made."""
    row = conn.execute(
        sql.SQL(
            "SELECT created_at FROM {}.checkpoint WHERE stream = %s ORDER BY last_seq DESC LIMIT 1"
        ).format(sql.Identifier(schema)),
        (stream,),
    ).fetchone()
    conn.commit()
    return None if row is None else row[0]


def _streams(conn: psycopg.Connection[TupleRow], installed: Installed) -> list[dict[str, Any]]:
    """Per stream: events in the trail, last seq, missing context, gaps, checkpoint, verify."""
    if not installed.schema_exists or installed.migration_version < _VERIFICATIONS:
        return []
    schema = installed.names.schema
    verdicts = {str(v["stream"]): v for v in latest_verdicts(conn, schema)}
    streams = sorted(
        set(trail_streams(conn, schema)) | {a.stream for a in installed.audited.values()}
    )
    return [_stream(conn, schema, stream, verdicts.get(stream)) for stream in streams]


def _stream(
    conn: psycopg.Connection[TupleRow],
    schema: str,
    stream: str,
    verdict: dict[str, object] | None,
) -> dict[str, Any]:
    counts = stream_counts(conn, schema, stream)
    return {
        "stream": stream,
        "events": counts.events,
        "last_seq": counts.last_seq,
        "missing_context": counts.missing_context,
        "gaps": counts.gaps,
        "last_checkpoint_at": last_checkpoint_at(conn, schema, stream),
        "last_verify": None
        if verdict is None
        else {
            "ok": verdict["ok"],
            "verified_at": verdict["verified_at"],
            "first_bad_seq": verdict["first_bad_seq"],
        },
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
    lines.extend(_lag_lines(report))
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


def _lag_lines(report: dict[str, Any]) -> list[str]:
    lag = report.get("lag") or {}
    seconds = lag.get("seconds")
    behind = "no worker streaming" if seconds is None else f"{seconds} s behind commit"
    lines = [
        f"lag          {lag.get('bytes')} bytes, {behind}, "
        f"retained WAL {lag.get('retained_wal_bytes')} bytes"
        + (", SLOT LOST" if lag.get("slot_lost") else "")
    ]
    for stream in report.get("streams") or []:
        verify = stream["last_verify"]
        verdict = (
            "never verified"
            if verify is None
            else f"verified {'ok' if verify['ok'] else 'FAILED'} at {verify['verified_at']}"
        )
        lines.append(
            f"stream       {stream['stream']}: {stream['events']} events, last seq "
            f"{stream['last_seq']}, {stream['missing_context']} missing context, "
            f"{stream['gaps']} gaps, last checkpoint {stream['last_checkpoint_at'] or 'none'}, "
            f"{verdict}"
        )
    return lines
