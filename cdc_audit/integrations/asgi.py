"""ASGI middleware: the current actor for the length of each request or websocket.

    from cdc_audit.integrations.asgi import AuditContextMiddleware
    app.add_middleware(AuditContextMiddleware)                  # FastAPI / Starlette
    app = AuditContextMiddleware(app)                           # any ASGI app

Same rules as the WSGI middleware: the actor from a header set by the auth proxy
(`X-Forwarded-User` by default), the request id (`X-Request-ID`, generated when absent) as
`trace_id`, the client address; `resolve` may add fields from the scope. The contextvar is
set in the request's task and reset when the application returns, so it never outlives the
request; tasks the application starts copy it, as asyncio does with every contextvar.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from ._request import RequestRules, Resolver
from .actor import Actor, current_context

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


class AuditContextMiddleware:
    def __init__(
        self,
        app: ASGIApp,
        *,
        rules: RequestRules | None = None,
        resolve: Resolver | None = None,
    ) -> None:
        self.app = app
        self.rules = rules or RequestRules()
        self.resolve = resolve

    def actor_for(self, scope: Scope) -> Actor:
        headers: dict[str, str] = {}
        for name, value in scope.get("headers") or ():
            headers[bytes(name).decode("latin-1").lower()] = bytes(value).decode("latin-1")
        client = scope.get("client")
        actor = self.rules.actor(headers, client[0] if client else None, None)
        if self.resolve is not None:
            actor = actor.merged(**(self.resolve(scope) or {}))
        return actor

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope.get("type") not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        token = current_context.set(self.actor_for(scope))
        try:
            await self.app(scope, receive, send)
        finally:
            current_context.reset(token)
