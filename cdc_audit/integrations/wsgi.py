"""WSGI middleware: the current actor for the length of each request.

    from cdc_audit.integrations.wsgi import AuditContextMiddleware
    app.wsgi_app = AuditContextMiddleware(app.wsgi_app)          # Flask

It reads the actor from a header set by the auth proxy (`X-Forwarded-User` by default), the
request id from `X-Request-ID` (generated when absent) as `trace_id`, and the client address,
and runs the application, including the iteration of its response, in a copy of the context:
nothing set for one request is visible to the next one on the same thread. `resolve` can add
fields from the environ (e.g. the user a session cookie names). The database side is one of
the hooks (`psycopg.transaction`, `sqlalchemy.instrument`).
"""

from __future__ import annotations

import contextvars
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from ._request import RequestRules, Resolver
from .actor import Actor, current_context

WSGIApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]


class AuditContextMiddleware:
    def __init__(
        self,
        app: WSGIApp,
        *,
        rules: RequestRules | None = None,
        resolve: Resolver | None = None,
    ) -> None:
        self.app = app
        self.rules = rules or RequestRules()
        self.resolve = resolve

    def actor_for(self, environ: dict[str, Any]) -> Actor:
        headers = {
            key[5:].replace("_", "-").lower(): str(value)
            for key, value in environ.items()
            if key.startswith("HTTP_")
        }
        actor = self.rules.actor(headers, environ.get("REMOTE_ADDR"), None)
        if self.resolve is not None:
            actor = actor.merged(**(self.resolve(environ) or {}))
        return actor

    def __call__(
        self, environ: dict[str, Any], start_response: Callable[..., Any]
    ) -> Iterable[bytes]:
        ctx = contextvars.copy_context()
        actor = self.actor_for(environ)
        ctx.run(current_context.set, actor)
        return _InContext(ctx, ctx.run(self.app, environ, start_response))


class _InContext:
    """The response iterable, iterated and closed inside the request's context."""

    def __init__(self, ctx: contextvars.Context, body: Iterable[bytes]) -> None:
        self.ctx = ctx
        self.body = body
        self.iterator: Iterator[bytes] | None = None

    def __iter__(self) -> Iterator[bytes]:
        return self

    def __next__(self) -> bytes:
        if self.iterator is None:
            self.iterator = self.ctx.run(iter, self.body)
        return self.ctx.run(next, self.iterator)

    def close(self) -> None:
        close = getattr(self.body, "close", None)
        if close is not None:
            self.ctx.run(close)
