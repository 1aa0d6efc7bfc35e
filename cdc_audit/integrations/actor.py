"""The current actor: who is acting in this thread or task, in a contextvar.

    with acting_as(actor_id="u42", reason="ticket 7"):
        ...   # every transaction opened through an integration carries this context

Middlewares set it for the length of a request; `acting_as` sets it for a block, on top of
what is already set (`acting_as(reason="ticket 7")` inside a request keeps its actor).
Nothing here talks to the database: the integrations read `current_actor()` when a
transaction starts.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar, Token
from dataclasses import dataclass, field, fields, replace
from typing import Any

from ..context import CONTEXT_FIELDS, context_query


@dataclass(frozen=True)
class Actor:
    """The context fields of `set_context`; None means "not said"."""

    actor_id: str | None = None
    actor_role: str | None = None
    reason: str | None = None
    on_behalf_of: str | None = None
    session_id: str | None = None
    client_ip: str | None = None
    trace_id: str | None = None
    approval: str | None = None
    extra: Mapping[str, Any] | None = field(default=None, hash=False, compare=True)

    def fields(self) -> dict[str, str]:
        """The text fields that are set, by name (without `extra`)."""
        return {n: v for n in CONTEXT_FIELDS if (v := getattr(self, n)) is not None}

    def is_empty(self) -> bool:
        return not self.fields() and not self.extra

    def merged(self, **changes: Any) -> Actor:
        """A copy with the given fields replaced (None leaves a field as it is)."""
        unknown = sorted(set(changes) - {f.name for f in fields(self)})
        if unknown:
            raise TypeError(f"unknown context field(s): {', '.join(unknown)}")
        updates = {k: v for k, v in changes.items() if v is not None}
        if "extra" in updates and self.extra:
            updates["extra"] = {**self.extra, **updates["extra"]}
        return replace(self, **updates)

    def query(self, schema: str = "cdc_audit") -> tuple[Any, list[Any]]:
        """The psycopg `set_context` query and parameters for this actor."""
        return context_query(schema=schema, extra=self.extra, **self.fields())


current_context: ContextVar[Actor | None] = ContextVar("cdc_audit_current_context", default=None)


def current_actor() -> Actor | None:
    """The actor of this thread or task, or None when nobody said who is acting."""
    actor = current_context.get()
    return None if actor is None or actor.is_empty() else actor


def set_actor(actor: Actor | None) -> Token[Actor | None]:
    """Set the current actor; pass the token to `reset_actor` to put the previous one back."""
    return current_context.set(actor)


def reset_actor(token: Token[Actor | None]) -> None:
    current_context.reset(token)


@contextmanager
def acting_as(
    actor: Actor | None = None, /, *, inherit: bool = True, **changes: Any
) -> Iterator[Actor]:
    """Run the block as `actor` and/or with these fields set over the current actor.

    With `inherit=False` the block starts from an empty context instead of the current one.
    """
    base = actor or (current_context.get() if inherit else None) or Actor()
    new = base.merged(**changes)
    token = current_context.set(new)
    try:
        yield new
    finally:
        current_context.reset(token)
