"""Helpers for tests that talk to the throwaway cluster."""

from __future__ import annotations

import re
import subprocess
import sys
import uuid
from dataclasses import dataclass
from typing import Any

import psycopg

from cdc_audit.ephemeral import EphemeralCluster


@dataclass
class Database:
    name: str
    cluster: EphemeralCluster

    @property
    def dsn(self) -> str:
        return self.cluster.dsn(self.name)

    def dsn_as(self, user: str) -> str:
        return self.cluster.dsn(self.name, user=user)

    def connect(
        self, *, user: str | None = None, autocommit: bool = True
    ) -> psycopg.Connection[Any]:
        return psycopg.connect(self.cluster.dsn(self.name, user=user), autocommit=autocommit)

    def execute(self, query: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        with self.connect() as conn:
            cur = conn.execute(query.encode(), params or None)
            return cur.fetchall() if cur.description else []

    def scalar(self, query: str, params: tuple[Any, ...] = ()) -> Any:
        rows = self.execute(query, params)
        return rows[0][0] if rows else None

    def login_role(self, role: str, *member_of: str) -> str:
        """A throwaway login role granted the given roles; returns its name."""
        name = f"{role}_{uuid.uuid4().hex[:8]}"
        grants = f" IN ROLE {', '.join(member_of)}" if member_of else ""
        self.execute(f"CREATE ROLE {name} LOGIN{grants}")
        return name

    def drop(self) -> None:
        with psycopg.connect(self.cluster.dsn(), autocommit=True) as admin:
            for (slot,) in admin.execute(
                "SELECT slot_name FROM pg_replication_slots WHERE database = %s", (self.name,)
            ).fetchall():
                admin.execute("SELECT pg_drop_replication_slot(%s)", (slot,))
            admin.execute(f'DROP DATABASE IF EXISTS "{self.name}" WITH (FORCE)')


@dataclass(frozen=True)
class Message:
    transactional: bool
    prefix: str
    content: str


@dataclass(frozen=True)
class Change:
    """One line of test_decoding output: BEGIN, COMMIT, a message or a row change."""

    kind: str  # begin, commit, message, change
    text: str
    message: Message | None = None


_MESSAGE = re.compile(
    r"^message: transactional: (\d) prefix: (.*?), sz: (\d+) content:(.*)$", re.DOTALL
)


class DecodingWatcher:
    """A test_decoding slot that shows what logical decoding sees, in commit order."""

    def __init__(self, db: Database, slot: str = "test_watch") -> None:
        self.db = db
        self.slot = f"{slot}_{uuid.uuid4().hex[:8]}"
        db.execute("SELECT pg_create_logical_replication_slot(%s, 'test_decoding')", (self.slot,))

    def changes(self) -> list[Change]:
        rows = self.db.execute(
            "SELECT data FROM pg_logical_slot_get_changes(%s, NULL, NULL, 'include-xids', '0')",
            (self.slot,),
        )
        return _without_empty_transactions([_parse(row[0]) for row in rows])

    def messages(self, prefix: str) -> list[Message]:
        return [c.message for c in self.changes() if c.message and c.message.prefix == prefix]


def _without_empty_transactions(changes: list[Change]) -> list[Change]:
    """test_decoding's skip-empty-xacts also moves messages ahead of BEGIN: filter here."""
    kept: list[Change] = []
    for change in changes:
        if change.kind == "commit" and kept and kept[-1].kind == "begin":
            kept.pop()
        else:
            kept.append(change)
    return kept


def _parse(line: str) -> Change:
    if line.startswith("BEGIN"):
        return Change("begin", line)
    if line.startswith("COMMIT"):
        return Change("commit", line)
    match = _MESSAGE.match(line)
    if match:
        return Change("message", line, Message(match[1] == "1", match[2], match[4]))
    return Change("change", line)


def run_cli(
    *args: str, env: dict[str, str] | None = None, input_text: str | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "cdc_audit.cli", *args],
        capture_output=True,
        text=True,
        env=env,
        input=input_text,
        check=False,
        timeout=120,
    )
