"""Django: who made each change, from the authenticated user of the request.

settings.py::

    MIDDLEWARE = [
        ...,
        "django.contrib.auth.middleware.AuthenticationMiddleware",
        "cdc_audit.integrations.django.AuditContextMiddleware",     # after authentication
        ...,
    ]
    CDC_AUDIT = {"SCHEMA": "cdc_audit"}                            # optional, see below

The middleware sets the current actor for the request: `actor_id` from the authenticated user
(its primary key, or the attribute `ACTOR_ATTRIBUTE` names), `trace_id` from the request id
header (`X-Request-ID`, generated when absent), `client_ip` from `REMOTE_ADDR`. An execute
wrapper on each PostgreSQL connection then sends the context with the first statement of
every transaction:

- when that statement starts a transaction (autocommit, or the first statement of an atomic
  block, `ATOMIC_REQUESTS` or not), `set_context(...)` is prepended to it in the same query
  (psycopg's client-side binding, Django's default): no extra round trip;
- when the context changes inside an open transaction (`acting_as(...)` in a view), or the
  statement cannot carry it (server-side binding, `executemany`, named parameters), it is
  sent as its own statement: one round trip, in a transaction of its own with the statement
  when Django is in autocommit mode.

Settings (`CDC_AUDIT`, all optional): `SCHEMA` ("cdc_audit"), `DATABASES` (aliases to
instrument; default every PostgreSQL one), `ACTOR_ATTRIBUTE` ("pk"), `REQUEST_ID_HEADER`
("X-Request-ID"). Needs Django 4.2+ with psycopg 3 (`pip install 'cdc-audit[django]'`).
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Sequence
from typing import Any

import psycopg
from django.conf import settings
from django.db import connections
from django.db.backends.signals import connection_created
from django.http import HttpRequest, HttpResponse
from psycopg import pq

from ._request import _ip
from ._sqltext import set_context_text
from .actor import Actor, current_actor, current_context


def _settings() -> dict[str, Any]:
    return dict(getattr(settings, "CDC_AUDIT", {}) or {})


class ContextExecuteWrapper:
    """Django execute wrapper that sends the current actor with each transaction."""

    def __init__(self, schema: str = "cdc_audit") -> None:
        self.schema = schema

    def __call__(
        self,
        execute: Callable[..., Any],
        sql: str,
        params: Any,
        many: bool,
        context: dict[str, Any],
    ) -> Any:
        actor = current_actor()
        wrapper = context["connection"]
        raw = wrapper.connection
        if actor is None or not isinstance(raw, psycopg.Connection):
            return execute(sql, params, many, context)
        status = raw.info.transaction_status
        if status == pq.TransactionStatus.IDLE:
            wrapper._cdc_audit_sent = None  # a new transaction starts with this statement
        elif status != pq.TransactionStatus.INTRANS:
            return execute(sql, params, many, context)
        if getattr(wrapper, "_cdc_audit_sent", None) == actor:
            return execute(sql, params, many, context)
        text, values = set_context_text(actor, self.schema)
        cursor = context["cursor"].cursor
        if (
            not many
            and isinstance(cursor, psycopg.ClientCursor)
            and (params is None or isinstance(params, list | tuple))
        ):
            # One query, one round trip: the context call, then the statement itself.
            own = sql.replace("%", "%%") if params is None else sql
            result = execute(f"{text}; {own}", [*values, *(params or ())], many, context)
            cursor.nextset()
            wrapper._cdc_audit_sent = actor
            return result
        if status == pq.TransactionStatus.IDLE and raw.autocommit:
            with raw.transaction():
                raw.execute(text, values)
                return execute(sql, params, many, context)
        raw.execute(text, values)
        wrapper._cdc_audit_sent = actor
        return execute(sql, params, many, context)


_wrappers: dict[str, ContextExecuteWrapper] = {}


def _aliases() -> list[str]:
    configured: Sequence[str] | None = _settings().get("DATABASES")
    if configured is not None:
        return list(configured)
    return [
        alias
        for alias, db in settings.DATABASES.items()
        if "postgresql" in str(db.get("ENGINE", ""))
    ]


def _ensure(wrapper: Any) -> None:
    if wrapper.alias not in _aliases():
        return
    schema = str(_settings().get("SCHEMA", "cdc_audit"))
    hook = _wrappers.setdefault(schema, ContextExecuteWrapper(schema))
    if hook not in wrapper.execute_wrappers:
        wrapper.execute_wrappers.append(hook)


def _on_connection_created(sender: Any, connection: Any, **kwargs: Any) -> None:
    _ensure(connection)


def install() -> None:
    """Add the execute wrapper to the instrumented connections (idempotent). The middleware
    calls it; call it yourself for work outside requests (management commands, tasks)."""
    connection_created.connect(_on_connection_created, dispatch_uid="cdc_audit_context")
    for alias in _aliases():
        _ensure(connections[alias])


def actor_for(request: HttpRequest) -> Actor:
    """The actor of a request: its authenticated user, request id and client address."""
    options = _settings()
    actor_id = None
    user = getattr(request, "user", None)
    if user is not None and getattr(user, "is_authenticated", False):
        value = getattr(user, str(options.get("ACTOR_ATTRIBUTE", "pk")), None)
        actor_id = None if value is None else str(value)
    header = str(options.get("REQUEST_ID_HEADER", "X-Request-ID"))
    request_id = (request.headers.get(header) or "").strip()[:200] or uuid.uuid4().hex
    return Actor(
        actor_id=actor_id, trace_id=request_id, client_ip=_ip(request.META.get("REMOTE_ADDR"))
    )


class AuditContextMiddleware:
    """Sets the current actor for each request; place it after AuthenticationMiddleware."""

    sync_capable = True
    async_capable = False

    def __init__(self, get_response: Callable[[HttpRequest], HttpResponse]) -> None:
        self.get_response = get_response
        install()

    def __call__(self, request: HttpRequest) -> HttpResponse:
        install()
        token = current_context.set(actor_for(request))
        try:
            return self.get_response(request)
        finally:
            current_context.reset(token)
