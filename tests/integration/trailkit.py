"""An installed trail for the integration-helper tests: drain it, read what it sealed."""

from __future__ import annotations

import os
import subprocess
import sys
from typing import Any

from cdc_audit import installer
from cdc_audit.policy import load_policy

from .fix_policy import WritePolicy
from .pg import Database

TABLES = "  - {table: public.accounts, stream: user}\n"
EXTRA = "app_events: {stream: user}\n"
SCHEMA_SQL = "CREATE TABLE accounts (id int PRIMARY KEY, owner text, note text)"


def install(database: Database, write_policy: WritePolicy) -> Database:
    database.execute(SCHEMA_SQL)
    installer.apply(database.dsn, load_policy(write_policy(TABLES, EXTRA)))
    return database


def drain(database: Database) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "cdc_audit.cli", "worker", "--drain"],
        env={**os.environ, "CDC_AUDIT_DSN": database.dsn},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr


def events(database: Database, where: str = "true") -> list[dict[str, Any]]:
    with database.connect() as conn:
        cursor = conn.execute(
            "SELECT kind, table_name, row_key, new, actor_id, reason, context, context_missing,"
            f" xid FROM cdc_audit.event WHERE {where} ORDER BY commit_lsn, stream, seq"
        )
        names = [c.name for c in cursor.description or []]
        return [dict(zip(names, row, strict=True)) for row in cursor.fetchall()]


def row_actors(database: Database) -> dict[int, tuple[str | None, str | None, bool]]:
    """Row id -> (actor, the `owner` the writer put in the row, context_missing)."""
    return {
        e["row_key"]["id"]: (e["actor_id"], e["new"]["owner"], e["context_missing"])
        for e in events(database, "kind = 'insert'")
    }


def app_events(database: Database) -> list[tuple[str, str | None, str]]:
    return [
        (e["new"]["action"], e["actor_id"], e["new"]["outcome"])
        for e in events(database, "kind = 'app'")
    ]
