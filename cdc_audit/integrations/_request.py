"""What the ASGI and WSGI middlewares take from a request: shared rules."""

from __future__ import annotations

import ipaddress
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from .actor import Actor

MAX_HEADER_VALUE = 1000


@dataclass(frozen=True)
class RequestRules:
    """Which headers to read. The actor header must be one that the auth proxy in front of
    the application sets and strips from client requests, or any client can claim to be
    anyone; likewise `trust_forwarded_for` only behind a proxy that sets X-Forwarded-For."""

    actor_header: str | None = "x-forwarded-user"
    request_id_header: str | None = "x-request-id"
    generate_request_id: bool = True
    trust_forwarded_for: bool = False
    reason_header: str | None = None

    def actor(
        self,
        headers: Mapping[str, str],
        peer: str | None,
        base: Actor | None,
    ) -> Actor:
        """The actor for a request with these (lower-case) headers from this peer address."""
        actor_id = _clean(headers.get(self.actor_header)) if self.actor_header else None
        trace_id = _clean(headers.get(self.request_id_header)) if self.request_id_header else None
        if trace_id is None and self.generate_request_id:
            trace_id = uuid.uuid4().hex
        reason = _clean(headers.get(self.reason_header)) if self.reason_header else None
        client_ip = peer
        if self.trust_forwarded_for and headers.get("x-forwarded-for"):
            client_ip = headers["x-forwarded-for"].split(",")[0].strip()
        return (base or Actor()).merged(
            actor_id=actor_id, trace_id=trace_id, reason=reason, client_ip=_ip(client_ip)
        )


Resolver = Callable[[Any], Mapping[str, Any] | None]
"""Called with the request (WSGI environ or ASGI scope); returns more context fields."""


def _clean(value: str | None) -> str | None:
    if value is None:
        return None
    value = value.strip()
    return value[:MAX_HEADER_VALUE] or None


def _ip(value: str | None) -> str | None:
    """An IP address as text, or None for anything else (unix sockets, garbage)."""
    if not value:
        return None
    try:
        return str(ipaddress.ip_address(value.strip()))
    except ValueError:
        return None
