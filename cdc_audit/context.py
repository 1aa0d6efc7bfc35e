"""Telling the database who is acting, from Python.

    with cdc_audit.context(conn, actor_id="u42", reason="ticket 7"):
        conn.execute("UPDATE accounts SET ...")

    async with cdc_audit.acontext(aconn, actor_id="u42"):    # psycopg.AsyncConnection
        await aconn.execute("UPDATE accounts SET ...")

The context lives in transaction-local settings, so it is correct behind a transaction-mode
pooler and never leaks into the next transaction. Inside a transaction that is already open,
the block sets the context and puts the previous one back when it ends; outside one, the block
is its own transaction, committed when the block ends (rolled back if it raises).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator, Mapping
from contextlib import asynccontextmanager, contextmanager
from typing import Any

import psycopg
from psycopg import pq, sql
from psycopg.types.json import Jsonb

CONTEXT_FIELDS = (
    "actor_id",
    "actor_role",
    "reason",
    "on_behalf_of",
    "session_id",
    "client_ip",
    "trace_id",
    "approval",
)


def context_query(
    *,
    schema: str = "cdc_audit",
    extra: Mapping[str, Any] | None = None,
    **fields: str | None,
) -> tuple[sql.Composed, list[Any]]:
    """The `set_context` call for these fields, and its parameters (unset fields are left out)."""
    unknown = sorted(set(fields) - set(CONTEXT_FIELDS))
    if unknown:
        raise TypeError(f"unknown context field(s): {', '.join(unknown)}")
    names = [name for name in CONTEXT_FIELDS if fields.get(name) is not None]
    args = [sql.SQL("{} => {}").format(sql.Identifier(n), sql.Placeholder()) for n in names]
    values: list[Any] = [fields[n] for n in names]
    if extra is not None:
        args.append(sql.SQL("extra => {}").format(sql.Placeholder()))
        values.append(Jsonb(dict(extra)))
    query = sql.SQL("SELECT {}.set_context({})").format(
        sql.Identifier(schema), sql.SQL(", ").join(args)
    )
    return query, values


def set_context(
    conn: psycopg.Connection[Any],
    *,
    schema: str = "cdc_audit",
    extra: Mapping[str, Any] | None = None,
    **fields: str | None,
) -> None:
    """Set the context of the current transaction (one round trip)."""
    query, values = context_query(schema=schema, extra=extra, **fields)
    conn.execute(query, values)


async def aset_context(
    conn: psycopg.AsyncConnection[Any],
    *,
    schema: str = "cdc_audit",
    extra: Mapping[str, Any] | None = None,
    **fields: str | None,
) -> None:
    """`set_context` for an `AsyncConnection` (one round trip)."""
    query, values = context_query(schema=schema, extra=extra, **fields)
    await conn.execute(query, values)


def _current(conn: psycopg.Connection[Any], schema: str) -> dict[str, Any]:
    row = conn.execute(
        sql.SQL("SELECT {}.current_context()").format(sql.Identifier(schema))
    ).fetchone()
    return dict(row[0]) if row and row[0] else {}


def _restore(conn: psycopg.Connection[Any], schema: str, previous: dict[str, Any]) -> None:
    extra = previous.pop("extra", None)
    set_context(conn, schema=schema, extra=extra, **previous)


@contextmanager
def context(
    conn: psycopg.Connection[Any],
    *,
    schema: str = "cdc_audit",
    extra: Mapping[str, Any] | None = None,
    **fields: str | None,
) -> Iterator[psycopg.Connection[Any]]:
    """Run the block with this actor context; see the module docstring."""
    if conn.info.transaction_status == pq.TransactionStatus.IDLE:
        with conn.transaction():
            set_context(conn, schema=schema, extra=extra, **fields)
            yield conn
        return
    previous = _current(conn, schema)
    set_context(conn, schema=schema, extra=extra, **fields)
    try:
        yield conn
    finally:
        if conn.info.transaction_status == pq.TransactionStatus.INTRANS:
            _restore(conn, schema, previous)


async def _acurrent(conn: psycopg.AsyncConnection[Any], schema: str) -> dict[str, Any]:
    cursor = await conn.execute(
        sql.SQL("SELECT {}.current_context()").format(sql.Identifier(schema))
    )
    row = await cursor.fetchone()
    return dict(row[0]) if row and row[0] else {}


@asynccontextmanager
async def acontext(
    conn: psycopg.AsyncConnection[Any],
    *,
    schema: str = "cdc_audit",
    extra: Mapping[str, Any] | None = None,
    **fields: str | None,
) -> AsyncIterator[psycopg.AsyncConnection[Any]]:
    """`context` for an `AsyncConnection`: `async with cdc_audit.acontext(conn, ...)`."""
    if conn.info.transaction_status == pq.TransactionStatus.IDLE:
        async with conn.transaction():
            await aset_context(conn, schema=schema, extra=extra, **fields)
            yield conn
        return
    previous = await _acurrent(conn, schema)
    await aset_context(conn, schema=schema, extra=extra, **fields)
    try:
        yield conn
    finally:
        if conn.info.transaction_status == pq.TransactionStatus.INTRANS:
            previous_extra = previous.pop("extra", None)
            await aset_context(conn, schema=schema, extra=previous_extra, **previous)
