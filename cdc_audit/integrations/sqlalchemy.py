"""SQLAlchemy: every transaction an engine begins carries the current actor's context.

    import cdc_audit.integrations.sqlalchemy as audit_sa
    from cdc_audit.integrations import acting_as

    engine = create_engine("postgresql+psycopg://...")
    audit_sa.instrument(engine)          # or an AsyncEngine

    with acting_as(actor_id="u42"), Session(engine) as session, session.begin():
        session.add(...)                 # BEGIN; set_context(...); INSERT ...; COMMIT

A listener on the engine's "begin" event sends one `set_context` statement through the
DB-API connection when an actor is set (one extra round trip per transaction), nothing
otherwise. Sessions, `engine.begin()` and `connection.begin()` all go through it. An engine
in AUTOCOMMIT isolation has no transaction to carry the context: use a transactional engine
for audited writes. Needs the `sqlalchemy` extra (`pip install 'cdc-audit[sqlalchemy]'`).
"""

from __future__ import annotations

from dataclasses import dataclass
from weakref import WeakKeyDictionary

from sqlalchemy import event
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.ext.asyncio import AsyncEngine

from ._sqltext import quoted_schema, set_context_text
from .actor import current_actor


@dataclass(frozen=True)
class _BeginListener:
    schema: str

    def __call__(self, conn: Connection) -> None:
        actor = current_actor()
        if actor is None:
            return
        text, values = set_context_text(actor, self.schema)
        cursor = conn.connection.cursor()
        try:
            cursor.execute(text, values)
        finally:
            cursor.close()


_listeners: WeakKeyDictionary[Engine, _BeginListener] = WeakKeyDictionary()


def _sync(engine: Engine | AsyncEngine) -> Engine:
    return engine.sync_engine if isinstance(engine, AsyncEngine) else engine


def instrument(engine: Engine | AsyncEngine, *, schema: str = "cdc_audit") -> None:
    """Set the current actor's context at the start of each transaction of `engine`."""
    quoted_schema(schema)
    sync = _sync(engine)
    uninstrument(sync)
    listener = _BeginListener(schema)
    event.listen(sync, "begin", listener)
    _listeners[sync] = listener


def uninstrument(engine: Engine | AsyncEngine) -> None:
    """Undo `instrument`."""
    sync = _sync(engine)
    listener = _listeners.pop(sync, None)
    if listener is not None and event.contains(sync, "begin", listener):
        event.remove(sync, "begin", listener)
