"""Application events (logins, denied access, admin actions) from Python.

    cdc_audit.log_event(conn, "auth.login.failed", "web", outcome="failure",
                        details={"username": name}, durable=True)

The event carries the context of the transaction (`set_context`), like every change does.
`durable=True` records it even when the surrounding transaction rolls back: use it for failed
logins and denied access, which are usually followed by a rollback. A non-durable event is part
of its transaction: recorded on commit, gone on rollback. Action names are lower-case dotted
segments, at least two, from the general to the specific: `auth.login.failed`,
`admin.user.role_granted` (docs/integration.md lists the recommended ones).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import psycopg
from psycopg import sql
from psycopg.types.json import Jsonb

ACTION_PATTERN = re.compile(r"[a-z][a-z0-9_]*(?:\.[a-z][a-z0-9_]*)+")
MAX_ACTION_LENGTH = 200


def validate_action(action: str) -> str:
    """Return `action` if it follows the naming convention, else raise ValueError saying why."""
    if not isinstance(action, str) or not ACTION_PATTERN.fullmatch(action):
        raise ValueError(
            f"action {action!r} does not follow the naming convention: lower-case dotted"
            " segments, at least two, each starting with a letter (letters, digits, _),"
            " e.g. 'auth.login.failed' or 'admin.user.role_granted'"
        )
    if len(action) > MAX_ACTION_LENGTH:
        raise ValueError(f"action is {len(action)} characters long; at most {MAX_ACTION_LENGTH}")
    return action


def event_query(
    action: str,
    resource: str | None = None,
    outcome: str = "success",
    details: Mapping[str, Any] | None = None,
    durable: bool = False,
    *,
    schema: str = "cdc_audit",
) -> tuple[sql.Composed, list[Any]]:
    """The `log_event` call and its parameters, after checking the arguments."""
    validate_action(action)
    if not outcome:
        raise ValueError("outcome must not be empty (e.g. 'success', 'failure', 'denied')")
    if details is not None and not isinstance(details, Mapping):
        raise TypeError(f"details must be a mapping (a JSON object), not {type(details).__name__}")
    query = sql.SQL(
        "SELECT {}.log_event(action => {}, resource => {}, outcome => {}, details => {},"
        " durable => {})"
    ).format(sql.Identifier(schema), *[sql.Placeholder()] * 5)
    return query, [action, resource, outcome, Jsonb(dict(details or {})), bool(durable)]


def log_event(
    conn: psycopg.Connection[Any],
    action: str,
    resource: str | None = None,
    outcome: str = "success",
    details: Mapping[str, Any] | None = None,
    durable: bool = False,
    *,
    schema: str = "cdc_audit",
) -> None:
    """Record an application event in the trail (one round trip); see the module docstring."""
    query, values = event_query(action, resource, outcome, details, durable, schema=schema)
    conn.execute(query, values)


async def alog_event(
    conn: psycopg.AsyncConnection[Any],
    action: str,
    resource: str | None = None,
    outcome: str = "success",
    details: Mapping[str, Any] | None = None,
    durable: bool = False,
    *,
    schema: str = "cdc_audit",
) -> None:
    """`log_event` for an `AsyncConnection`."""
    query, values = event_query(action, resource, outcome, details, durable, schema=schema)
    await conn.execute(query, values)
