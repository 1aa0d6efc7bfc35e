"""The current actor, action names and the request rules, without a database."""

from __future__ import annotations

import asyncio
import io
from typing import Any

import pytest

from cdc_audit.app_events import event_query, validate_action
from cdc_audit.integrations import Actor, acting_as, current_actor
from cdc_audit.integrations._request import RequestRules
from cdc_audit.integrations._sqltext import set_context_text


def test_acting_as_layers_and_restores() -> None:
    assert current_actor() is None
    with acting_as(actor_id="u1", extra={"a": 1}) as outer:
        assert current_actor() == outer
        with acting_as(reason="ticket 7", extra={"b": 2}) as inner:
            assert (inner.actor_id, inner.reason) == ("u1", "ticket 7")
            assert inner.extra == {"a": 1, "b": 2}
        with acting_as(reason="fresh", inherit=False) as fresh:
            assert fresh.actor_id is None
        assert current_actor() == outer
    assert current_actor() is None


def test_an_empty_actor_counts_as_none_and_unknown_fields_are_refused() -> None:
    with acting_as():
        assert current_actor() is None
    with pytest.raises(TypeError, match="unknown context field"), acting_as(user="x"):
        pass


def test_tasks_see_their_own_actor() -> None:
    async def worker(name: str) -> str | None:
        with acting_as(actor_id=name):
            await asyncio.sleep(0)
            actor = current_actor()
            return actor.actor_id if actor else None

    async def main() -> list[str | None]:
        return list(await asyncio.gather(*(worker(f"u{n}") for n in range(5))))

    assert asyncio.run(main()) == [f"u{n}" for n in range(5)]


@pytest.mark.parametrize("action", ["auth.login.failed", "admin.user.role_granted", "a.b"])
def test_good_action_names(action: str) -> None:
    assert validate_action(action) == action


@pytest.mark.parametrize(
    "action", ["login", "Auth.login", "auth..x", "auth.login.", "auth.1x", "a b.c", "", "a.b" * 99]
)
def test_bad_action_names(action: str) -> None:
    with pytest.raises(ValueError):
        validate_action(action)


def test_event_query_checks_outcome_and_details() -> None:
    with pytest.raises(ValueError, match="outcome"):
        event_query("auth.login.failed", outcome="")
    with pytest.raises(TypeError, match="mapping"):
        event_query("auth.login.failed", details=["x"])  # type: ignore[arg-type]
    _query, values = event_query("auth.login.failed", "web", durable=True)
    assert values[0] == "auth.login.failed" and values[-1] is True


def test_set_context_text_quotes_nothing_from_the_actor() -> None:
    text, values = set_context_text(Actor(actor_id="o'hara; DROP", extra={"k": "v"}))
    assert text == 'SELECT "cdc_audit".set_context(actor_id => %s, extra => %s::jsonb)'
    assert values == ["o'hara; DROP", '{"k": "v"}']
    with pytest.raises(ValueError, match="identifier"):
        set_context_text(Actor(actor_id="x"), schema='x"; DROP')


def test_request_rules() -> None:
    rules = RequestRules()
    actor = rules.actor({"x-forwarded-user": " alice ", "x-request-id": "r1"}, "::1", None)
    assert (actor.actor_id, actor.trace_id, actor.client_ip) == ("alice", "r1", "::1")
    anonymous = rules.actor({"x-forwarded-for": "1.2.3.4"}, "unix-socket", None)
    assert anonymous.actor_id is None and anonymous.client_ip is None
    assert anonymous.trace_id and len(anonymous.trace_id) == 32  # generated
    trusting = RequestRules(trust_forwarded_for=True, actor_header=None)
    assert trusting.actor({"x-forwarded-for": "1.2.3.4, 10.0.0.1"}, "10.0.0.1", None).client_ip == (
        "1.2.3.4"
    )


def test_wsgi_middleware_runs_the_body_in_the_request_context() -> None:
    from cdc_audit.integrations.wsgi import AuditContextMiddleware

    seen: list[str | None] = []

    def app(environ: dict[str, Any], start_response: Any) -> Any:
        start_response("200 OK", [])

        def body() -> Any:
            actor = current_actor()
            seen.append(actor.actor_id if actor else None)
            yield b"x"

        return body()

    wrapped = AuditContextMiddleware(app, resolve=lambda environ: {"reason": "r"})
    environ = {
        "HTTP_X_FORWARDED_USER": "bob",
        "REMOTE_ADDR": "127.0.0.1",
        "wsgi.input": io.BytesIO(),
    }
    body = wrapped(environ, lambda *a: None)
    assert current_actor() is None
    assert list(body) == [b"x"]
    assert seen == ["bob"]


def test_asgi_middleware_passes_lifespan_and_resets() -> None:
    from cdc_audit.integrations.asgi import AuditContextMiddleware

    seen: list[Any] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        seen.append((scope["type"], current_actor()))

    async def main() -> None:
        wrapped = AuditContextMiddleware(app)
        await wrapped({"type": "lifespan"}, None, None)  # type: ignore[arg-type]
        scope = {"type": "http", "headers": [(b"x-forwarded-user", b"eve")], "client": None}
        await wrapped(scope, None, None)  # type: ignore[arg-type]
        assert current_actor() is None

    asyncio.run(main())
    assert seen[0] == ("lifespan", None)
    assert seen[1][1].actor_id == "eve"
