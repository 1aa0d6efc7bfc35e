"""Each context helper against a real PostgreSQL, checked in the sealed trail."""

from __future__ import annotations

import asyncio
import io
import itertools
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest

import cdc_audit
from cdc_audit.ephemeral import EphemeralCluster
from cdc_audit.integrations import acting_as
from cdc_audit.integrations import psycopg as audit_pg

from .fix_policy import WritePolicy
from .pg import Database
from .trailkit import app_events, drain, events, install, row_actors

ids = itertools.count(1)


@pytest.fixture
def trail(database: Database, write_policy: WritePolicy) -> Database:
    return install(database, write_policy)


def insert(conn: psycopg.Connection[Any], owner: str | None) -> int:
    row = next(ids)
    conn.execute("INSERT INTO accounts (id, owner) VALUES (%s, %s)", (row, owner))
    return row


# --- psycopg -------------------------------------------------------------------------------


def test_psycopg_context_transaction_and_nothing_without_an_actor(trail: Database) -> None:
    with trail.connect() as conn:
        with cdc_audit.context(conn, actor_id="u1", reason="ticket 7"):
            a = insert(conn, "u1")
        with acting_as(actor_id="u2"), audit_pg.transaction(conn):
            b = insert(conn, "u2")
            with acting_as(reason="nested"):  # adds to u2, in a later transaction
                pass
        with audit_pg.transaction(conn):  # no actor: nothing sent, recorded as missing
            c = insert(conn, None)
        with (
            acting_as(actor_id="u3", extra={"ticket": 9}),
            conn.pipeline(),
            audit_pg.transaction(conn),
        ):
            d = insert(conn, "u3")
    drain(trail)
    seen = row_actors(trail)
    assert seen[a] == ("u1", "u1", False)
    assert seen[b] == ("u2", "u2", False)
    assert seen[c] == (None, None, True)
    assert seen[d] == ("u3", "u3", False)
    [e] = events(trail, f"row_key->>'id' = '{d}'")
    assert e["context"]["extra"] == {"ticket": 9}
    assert [x["reason"] for x in events(trail, "kind = 'insert'")] == ["ticket 7", None, None, None]


def test_psycopg_async_helpers(trail: Database) -> None:
    async def main() -> tuple[int, int, int]:
        async with await psycopg.AsyncConnection.connect(trail.dsn, autocommit=True) as conn:
            async with cdc_audit.acontext(conn, actor_id="a1"):
                await conn.execute("INSERT INTO accounts (id, owner) VALUES (1001, 'a1')")
            with acting_as(actor_id="a2"):
                async with audit_pg.atransaction(conn):
                    await conn.execute("INSERT INTO accounts (id, owner) VALUES (1002, 'a2')")
            async with conn.transaction():
                await cdc_audit.aset_context(conn, actor_id="a3")
                await cdc_audit.alog_event(conn, "admin.user.role_granted", "user:9")
                await conn.execute("INSERT INTO accounts (id, owner) VALUES (1003, 'a3')")
        return 1001, 1002, 1003

    a, b, c = asyncio.run(main())
    drain(trail)
    seen = row_actors(trail)
    assert [seen[a][0], seen[b][0], seen[c][0]] == ["a1", "a2", "a3"]
    assert app_events(trail) == [("admin.user.role_granted", "a3", "success")]


def test_context_inside_an_open_transaction_restores_the_previous_one(trail: Database) -> None:
    with trail.connect(autocommit=False) as conn:
        cdc_audit.set_context(conn, actor_id="outer")
        with cdc_audit.context(conn, actor_id="inner"):
            insert(conn, "inner")
        insert(conn, "outer")
        conn.commit()
    drain(trail)
    assert [(v[0], v[1]) for v in row_actors(trail).values()] == [
        ("inner", "inner"),
        ("outer", "outer"),
    ]


# --- app events ----------------------------------------------------------------------------


def test_durable_events_survive_rollback_and_both_kinds_carry_the_context(
    trail: Database,
) -> None:
    with trail.connect(autocommit=False) as conn:
        cdc_audit.set_context(conn, actor_id="u8", reason="login")
        cdc_audit.log_event(
            conn, "auth.login.failed", "web", "failure", {"user": "bob"}, durable=True
        )
        cdc_audit.log_event(conn, "auth.login.attempted", "web")
        conn.rollback()
        cdc_audit.set_context(conn, actor_id="u9")
        cdc_audit.log_event(conn, "auth.login.succeeded", "web")
        cdc_audit.log_event(conn, "auth.session.opened", "web", durable=True)
        conn.commit()
    drain(trail)
    assert sorted(app_events(trail)) == [
        ("auth.login.failed", "u8", "failure"),
        ("auth.login.succeeded", "u9", "success"),
        ("auth.session.opened", "u9", "success"),
    ]
    failed = events(trail, "new->>'action' = 'auth.login.failed'")[0]
    assert failed["reason"] == "login"
    assert failed["new"]["details"] == {"user": "bob"}
    assert failed["xid"] is None  # non-transactional: sealed outside any transaction


def test_log_event_refuses_a_badly_named_action_before_sending_it(trail: Database) -> None:
    with trail.connect() as conn:
        for bad in ("login", "Auth.Login", "auth..failed", "auth.login failed", ""):
            with pytest.raises(ValueError, match="naming convention"):
                cdc_audit.log_event(conn, bad)


# --- SQLAlchemy ----------------------------------------------------------------------------


def sa_url(database: Database, driver: str = "psycopg") -> str:
    params = dict(part.split("=", 1) for part in database.dsn.split())
    return (
        f"postgresql+{driver}://{params['user']}@{params['host']}:{params['port']}"
        f"/{params['dbname']}"
    )


def test_sqlalchemy_engine_and_session(trail: Database) -> None:
    from sqlalchemy import create_engine, text
    from sqlalchemy.orm import Session

    from cdc_audit.integrations import sqlalchemy as audit_sa

    engine = create_engine(sa_url(trail), pool_size=1, max_overflow=0)
    audit_sa.instrument(engine)
    try:
        with acting_as(actor_id="s1", extra={"via": "session"}), Session(engine) as session:
            with session.begin():
                session.execute(text("INSERT INTO accounts (id, owner) VALUES (2001, 's1')"))
            with session.begin():  # a second transaction on the same pooled connection
                session.execute(text("INSERT INTO accounts (id, owner) VALUES (2002, 's1')"))
        with engine.begin() as conn:  # no actor: nothing sent
            conn.execute(text("INSERT INTO accounts (id, owner) VALUES (2003, NULL)"))
        with acting_as(actor_id="s2"), engine.connect() as conn:
            conn.execute(text("INSERT INTO accounts (id, owner) VALUES (2004, 's2')"))
            conn.rollback()
            conn.execute(text("INSERT INTO accounts (id, owner) VALUES (2005, 's2')"))
            conn.commit()
    finally:
        audit_sa.uninstrument(engine)
        engine.dispose()
    drain(trail)
    assert row_actors(trail) == {
        2001: ("s1", "s1", False),
        2002: ("s1", "s1", False),
        2003: (None, None, True),
        2005: ("s2", "s2", False),
    }


def test_sqlalchemy_async_engine(trail: Database) -> None:
    from sqlalchemy import text
    from sqlalchemy.ext.asyncio import create_async_engine

    from cdc_audit.integrations import sqlalchemy as audit_sa

    async def main() -> None:
        engine = create_async_engine(sa_url(trail, "psycopg_async"))
        audit_sa.instrument(engine)
        try:

            async def client(n: int) -> None:
                with acting_as(actor_id=f"t{n}"):
                    async with engine.begin() as conn:
                        await conn.execute(
                            text("INSERT INTO accounts (id, owner) VALUES (:id, :owner)"),
                            {"id": 3000 + n, "owner": f"t{n}"},
                        )

            await asyncio.gather(*(client(n) for n in range(6)))
        finally:
            await engine.dispose()

    asyncio.run(main())
    drain(trail)
    assert {k: v[:2] for k, v in row_actors(trail).items()} == {
        3000 + n: (f"t{n}", f"t{n}") for n in range(6)
    }


# --- WSGI and ASGI middlewares -------------------------------------------------------------


def test_wsgi_middleware_sets_the_actor_per_request_and_never_after(trail: Database) -> None:
    from wsgiref.util import setup_testing_defaults

    from cdc_audit.integrations.actor import current_actor
    from cdc_audit.integrations.wsgi import AuditContextMiddleware

    conn = trail.connect()

    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        row = int(environ["PATH_INFO"].strip("/"))
        with audit_pg.transaction(conn):
            conn.execute(
                "INSERT INTO accounts (id, owner) VALUES (%s, %s)",
                (row, environ.get("HTTP_X_FORWARDED_USER")),
            )
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"ok"]

    wrapped = AuditContextMiddleware(app)

    def request(path: str, **headers: str) -> None:
        environ: dict[str, Any] = {"PATH_INFO": path, "REMOTE_ADDR": "10.1.2.3", **headers}
        setup_testing_defaults(environ)
        environ["wsgi.input"] = io.BytesIO()
        body = wrapped(environ, lambda status, headers, exc_info=None: None)
        assert b"".join(body) == b"ok"
        assert current_actor() is None

    request("/4001", HTTP_X_FORWARDED_USER="w1", HTTP_X_REQUEST_ID="req-1")
    request("/4002")
    request("/4003", HTTP_X_FORWARDED_USER="w3")
    conn.close()
    drain(trail)
    assert {k: v[:2] for k, v in row_actors(trail).items()} == {
        4001: ("w1", "w1"),
        4002: (None, None),
        4003: ("w3", "w3"),
    }
    first = events(trail, "row_key->>'id' = '4001'")[0]["context"]
    assert (first["trace_id"], first["client_ip"]) == ("req-1", "10.1.2.3")


def test_asgi_middleware_concurrent_requests_keep_their_own_actor(trail: Database) -> None:
    from cdc_audit.integrations.actor import current_actor
    from cdc_audit.integrations.asgi import AuditContextMiddleware

    async def main() -> None:
        async with await psycopg.AsyncConnection.connect(trail.dsn, autocommit=True) as conn:
            lock = asyncio.Lock()

            async def app(scope: Any, receive: Any, send: Any) -> None:
                row = int(scope["path"].strip("/"))
                await asyncio.sleep(0)  # let the other requests interleave
                owner = dict(scope["headers"]).get(b"x-forwarded-user", b"").decode() or None
                async with lock, audit_pg.atransaction(conn):
                    await conn.execute(
                        "INSERT INTO accounts (id, owner) VALUES (%s, %s)", (row, owner)
                    )
                await send({"type": "http.response.start", "status": 200, "headers": []})
                await send({"type": "http.response.body", "body": b"ok"})

            wrapped = AuditContextMiddleware(app)

            async def request(row: int, user: str | None) -> None:
                headers = [(b"x-forwarded-user", user.encode())] if user else []
                scope = {
                    "type": "http",
                    "path": f"/{row}",
                    "headers": headers,
                    "client": ("127.0.0.1", 5000),
                }

                async def receive() -> dict[str, Any]:
                    return {"type": "http.request", "body": b""}

                async def send(message: Any) -> None:
                    pass

                await wrapped(scope, receive, send)
                assert current_actor() is None

            await asyncio.gather(
                *(request(5000 + n, f"h{n}" if n % 3 else None) for n in range(12))
            )

    asyncio.run(main())
    drain(trail)
    expected = {5000 + n: (f"h{n}", f"h{n}") if n % 3 else (None, None) for n in range(12)}
    assert {k: v[:2] for k, v in row_actors(trail).items()} == expected


# --- Django --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def django_trail(
    pg_cluster: EphemeralCluster, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Database]:
    pytest.importorskip("django")
    import django
    from django.conf import settings

    from cdc_audit import installer
    from cdc_audit.policy import load_policy

    from .fix_policy import BASE_POLICY
    from .trailkit import EXTRA, SCHEMA_SQL, TABLES

    name = "django_integration"
    with psycopg.connect(pg_cluster.dsn(), autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}" TEMPLATE template0')
    db = Database(name=name, cluster=pg_cluster)
    db.execute(SCHEMA_SQL)
    policy = tmp_path_factory.mktemp("django") / "policy.yaml"
    policy.write_text(BASE_POLICY + "tables:\n" + TABLES + EXTRA)
    installer.apply(db.dsn, load_policy(policy))
    if not settings.configured:
        settings.configure(
            DEBUG=False,
            ALLOWED_HOSTS=["testserver"],
            ROOT_URLCONF=__name__,
            INSTALLED_APPS=[],
            MIDDLEWARE=[
                f"{__name__}.FakeAuthenticationMiddleware",
                "cdc_audit.integrations.django.AuditContextMiddleware",
            ],
            DATABASES={
                "default": {
                    "ENGINE": "django.db.backends.postgresql",
                    "NAME": name,
                    "USER": "postgres",
                    "HOST": "127.0.0.1",
                    "PORT": str(pg_cluster.port),
                    "ATOMIC_REQUESTS": False,
                }
            },
            USE_TZ=True,
        )
        django.setup()
    try:
        yield db
    finally:
        from django.db import connections

        connections.close_all()
        db.drop()


class _User:
    is_authenticated = True

    def __init__(self, pk: str) -> None:
        self.pk = pk


class FakeAuthenticationMiddleware:
    """Stands in for django.contrib.auth: the user named by a test header is logged in."""

    def __init__(self, get_response: Any) -> None:
        self.get_response = get_response

    def __call__(self, request: Any) -> Any:
        name = request.headers.get("X-Test-User")
        request.user = _User(name) if name else type("Anon", (), {"is_authenticated": False})()
        return self.get_response(request)


sent: list[str] = []


def _record(execute: Any, sql: str, params: Any, many: bool, context: Any) -> Any:
    """Inside the audit wrapper: sees each query as it goes to the server."""
    sent.append(sql)
    return execute(sql, params, many, context)


def _write_view(request: Any, row: int) -> Any:
    from django.db import connection, transaction
    from django.http import HttpResponse

    owner = request.headers.get("X-Test-User")
    sent.clear()
    with connection.execute_wrapper(_record), connection.cursor() as cursor:
        cursor.execute("SELECT %s::int", [1])  # a read first: also carries the context
        cursor.execute(
            "INSERT INTO accounts (id, owner, note) VALUES (%s, %s, '100%%')", [row, owner]
        )
        assert cursor.rowcount == 1
        cursor.execute("UPDATE accounts SET note = note || '!' WHERE id = %s", [row])
        if request.GET.get("explicit"):
            with transaction.atomic():
                cursor.execute("INSERT INTO accounts (id, owner) VALUES (%s, %s)", [row + 1, owner])
                cursor.execute("SELECT id FROM accounts WHERE id = %s", [row + 1])
                assert cursor.fetchone() == (row + 1,)
    return HttpResponse("ok")


urlpatterns: list[Any] = []
try:
    from django.urls import path

    urlpatterns = [path("write/<int:row>", _write_view)]
except ImportError:  # pragma: no cover - the django extra is not installed
    pass


@pytest.mark.parametrize("atomic_requests", [False, True], ids=["autocommit", "atomic"])
def test_django_middleware_with_and_without_atomic_requests(
    django_trail: Database, atomic_requests: bool
) -> None:
    from django.db import connections
    from django.test import Client

    connections.settings["default"]["ATOMIC_REQUESTS"] = atomic_requests
    base = 7000 if atomic_requests else 6000
    client = Client()
    users = ["d1", None, "d3", "d1"]
    for n, user in enumerate(users):
        headers = {"X-Test-User": user} if user else {}
        response = client.get(
            f"/write/{base + 10 * n}", {"explicit": "1"} if n == 2 else {}, headers=headers
        )
        assert response.status_code == 200
    response = client.get(
        f"/write/{base + 90}", headers={"X-Test-User": "d9", "X-Request-ID": "r9"}
    )
    assert response.status_code == 200
    # One query per statement: the context rides in each transaction's first statement, that
    # is every statement in autocommit mode and the first one under ATOMIC_REQUESTS.
    assert len(sent) == 3
    carried = [q.startswith('SELECT "cdc_audit".set_context(') for q in sent]
    assert carried == ([True, False, False] if atomic_requests else [True, True, True])
    assert sent[0].endswith("; SELECT %s::int")
    drain(django_trail)
    seen = {k: v for k, v in row_actors(django_trail).items() if base <= k < base + 1000}
    assert {k: v[:2] for k, v in seen.items()} == {
        base: ("d1", "d1"),
        base + 10: (None, None),
        base + 20: ("d3", "d3"),
        base + 21: ("d3", "d3"),
        base + 30: ("d1", "d1"),
        base + 90: ("d9", "d9"),
    }
    updates = events(django_trail, f"kind = 'update' AND (row_key->>'id')::int >= {base}")
    assert [(u["row_key"]["id"], u["actor_id"], u["new"]["note"]) for u in updates][:1] == [
        (base, "d1", "100%!")
    ]
    traced = events(django_trail, f"row_key->>'id' = '{base + 90}'")[0]
    assert traced["context"]["trace_id"] == "r9"
