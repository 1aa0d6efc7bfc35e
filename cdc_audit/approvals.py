"""Time-bounded approvals: an approver lets one actor change one table until a deadline.

    approval = cdc_audit.approvals.approve(
        conn, actor="ops-anna", table="public.roles", expires=timedelta(hours=1),
        approver="sec-bob", reason="CHG-1234 grant support access")

Tables whose policy says `require_approval: true` then accept changes by that actor until the
approval expires; every change's event carries `approval_id` in its context, and the approval
itself is recorded in the trail (action `admin.approval.granted`). The database enforces all
of it (runtime/approvals.sql): an approver cannot approve their own changes, an approval
cannot be changed or withdrawn early, only left to expire.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import psycopg
from psycopg import sql

from .db import database_error
from .errors import InvalidInput

__all__ = ["Approval", "approve"]

# SQLSTATEs of approve()'s refusals: bad input the user can fix.
_REFUSALS = frozenset({"22023", "22P02", "22007", "22008"})


@dataclass(frozen=True)
class Approval:
    approval_id: int
    actor: str
    table: str
    approver: str
    reason: str
    granted_at: datetime
    expires_at: datetime


def approve(
    conn: psycopg.Connection[Any],
    *,
    actor: str,
    table: str,
    expires: timedelta,
    approver: str,
    reason: str,
    schema: str = "cdc_audit",
) -> Approval:
    """Grant the approval and record it, in the connection's current transaction.

    `table` is `schema.table` (a bare name means `public.<name>`). Raises `InvalidInput` when
    the database refuses: self-approval, an unknown table or one that needs no approval, an
    empty reason, or an expiry that is not in the future.
    """
    qualified = table if "." in table else f"public.{table}"
    query = sql.SQL(
        "SELECT approval_id, granted_at, expires_at FROM {}.approve({}, {}, {}, {}, {})"
    ).format(sql.Identifier(schema), *(sql.Placeholder() for _ in range(5)))
    try:
        row = conn.execute(query, (actor, qualified, expires, approver, reason)).fetchone()
    except psycopg.Error as exc:
        if exc.sqlstate in _REFUSALS:
            raise InvalidInput(_message(exc)) from None
        raise database_error(exc, "approve") from exc
    assert row is not None  # approve() returns exactly one row or raises
    return Approval(row[0], actor, qualified, approver, reason, row[1], row[2])


def _message(exc: psycopg.Error) -> str:
    text = (exc.diag.message_primary or str(exc)).strip()
    return text.removeprefix("cdc-audit: ")
