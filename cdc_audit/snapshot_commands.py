"""`cdc-audit snapshot` and `cdc-audit reconcile`: hashed table snapshots and the proof that
the trail accounts for every change between two of them (see `cdc_audit.snapshot`)."""

from __future__ import annotations

import argparse

from .cli_common import (
    AddCommand,
    add_schema_option,
    dsn_of,
    policy_of,
    redaction_key_of,
    require_signing_key,
    say,
    schema_of,
)
from .db import connect
from .errors import InvalidInput
from .job_context import utc_now
from .predicate import TableName, parse_table_name
from .settings import Settings
from .snapshot import reconcile, snapshot_tables


def _table(text: str) -> TableName:
    try:
        return parse_table_name(text)
    except ValueError as exc:
        raise InvalidInput(str(exc)) from None


def cmd_snapshot(args: argparse.Namespace, settings: Settings) -> int:
    loaded = policy_of(args, settings)
    key = require_signing_key(settings, "a snapshot")
    only = None if args.table is None else _table(args.table)
    made = 0
    for snap in snapshot_tables(
        dsn_of(args, settings),
        loaded.policy,
        key,
        redaction_key_of(settings),
        only=only,
        progress=lambda line: say(f"- {line}"),
        now=utc_now,
    ):
        made += 1
        print(
            f"{snap.table}: snapshot {snap.id}: {snap.row_count} rows, digest"
            f" {snap.digest[:16]}, lsn {snap.lsn_after}",
            flush=True,
        )
    if not made:
        say("the policy audits no table: nothing to snapshot")
    return 0


def cmd_reconcile(args: argparse.Namespace, settings: Settings) -> int:
    table = _table(args.table)
    schema = schema_of(args, settings)
    with connect(dsn_of(args, settings), application_name="cdc-audit reconcile") as conn:
        result = reconcile(
            conn,
            schema,
            table,
            args.from_id,
            args.to_id,
            progress=lambda line: say(f"- {line}"),
        )
    for line in result.describe():
        print(line)
    result.raise_unless_ok()
    return 0


def add_commands(command: AddCommand) -> None:
    """Register this module's sub-commands."""
    snapshot = command(
        "snapshot", cmd_snapshot, "take a signed, hashed snapshot of each audited table"
    )
    add_schema_option(snapshot)
    snapshot.add_argument(
        "--table", metavar="SCHEMA.TABLE", help="only this table (default: every audited table)"
    )
    rec = command(
        "reconcile",
        cmd_reconcile,
        "prove the trail accounts for every change of a table between two snapshots",
    )
    add_schema_option(rec)
    rec.add_argument("table", metavar="TABLE", help="the audited table (schema.table)")
    rec.add_argument("--from", dest="from_id", type=int, metavar="ID", help="older snapshot id")
    rec.add_argument(
        "--to", dest="to_id", type=int, metavar="ID", help="newer snapshot id (default: newest)"
    )
