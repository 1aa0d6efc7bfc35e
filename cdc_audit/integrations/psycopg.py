"""psycopg 3: open transactions that carry the current actor's context.

    from cdc_audit.integrations import acting_as
    from cdc_audit.integrations.psycopg import transaction

    with acting_as(actor_id="u42"):
        with transaction(conn):                 # BEGIN; set_context(...); ...; COMMIT
            conn.execute("UPDATE accounts SET ...")

`transaction` is `conn.transaction()` plus one `set_context` statement when an actor is set
(none otherwise): one extra round trip per transaction, measured on the wire by
bench/context_latency.py (docs/integration.md has the figures).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from typing import Any

import psycopg

from .actor import Actor, current_actor


def apply_actor(
    conn: psycopg.Connection[Any], actor: Actor | None = None, *, schema: str = "cdc_audit"
) -> bool:
    """Set `actor` (default: the current one) as the context of the open transaction.

    Returns whether anything was sent. In autocommit mode outside a transaction block the
    setting would vanish with its own one-statement transaction: use `transaction()`.
    """
    actor = actor or current_actor()
    if actor is None:
        return False
    query, values = actor.query(schema)
    conn.execute(query, values)
    return True


async def aapply_actor(
    conn: psycopg.AsyncConnection[Any], actor: Actor | None = None, *, schema: str = "cdc_audit"
) -> bool:
    """`apply_actor` for an `AsyncConnection`."""
    actor = actor or current_actor()
    if actor is None:
        return False
    query, values = actor.query(schema)
    await conn.execute(query, values)
    return True


@contextmanager
def transaction(
    conn: psycopg.Connection[Any], *, schema: str = "cdc_audit", **kwargs: Any
) -> Iterator[psycopg.Transaction]:
    """`conn.transaction(**kwargs)` that starts by setting the current actor's context.

    Nested in an open transaction it is a savepoint, and the context it sets lasts until the
    end of the enclosing transaction (or until the savepoint is rolled back).
    """
    with conn.transaction(**kwargs) as tx:
        apply_actor(conn, schema=schema)
        yield tx


@asynccontextmanager
async def atransaction(
    conn: psycopg.AsyncConnection[Any], *, schema: str = "cdc_audit", **kwargs: Any
) -> AsyncIterator[psycopg.AsyncTransaction]:
    """`transaction` for an `AsyncConnection`."""
    async with conn.transaction(**kwargs) as tx:
        await aapply_actor(conn, schema=schema)
        yield tx
