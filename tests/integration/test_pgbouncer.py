"""Through a real PgBouncer in transaction pooling mode: context never leaks between
transactions or clients sharing a server connection, and app events keep their context."""

from __future__ import annotations

import asyncio
import os
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

import cdc_audit
from cdc_audit.ephemeral import EphemeralCluster
from cdc_audit.integrations import acting_as
from cdc_audit.integrations import psycopg as audit_pg
from cdc_audit.integrations.pgbouncer import PgBouncer, find_pgbouncer

from .fix_policy import WritePolicy
from .pg import Database
from .trailkit import app_events, drain, events, install, row_actors

ROOT = Path(__file__).resolve().parents[2]
THREADS, TASKS, ROUNDS = 6, 6, 8


@pytest.fixture(scope="module")
def bouncer(pg_cluster: EphemeralCluster) -> Iterator[PgBouncer]:
    if find_pgbouncer() is None and os.geteuid() == 0:
        subprocess.run(["bash", str(ROOT / "scripts/ensure-pgbouncer.sh")], check=False)
    if find_pgbouncer() is None:
        pytest.skip("pgbouncer is not installed and cannot be installed without root")
    with PgBouncer(pg_cluster.port, pool_size=2) as running:
        yield running


@pytest.fixture
def trail(database: Database, write_policy: WritePolicy) -> Database:
    return install(database, write_policy)


def connect(bouncer: PgBouncer, db: Database) -> psycopg.Connection[Any]:
    # Transaction pooling: no server-side prepared statements across transactions.
    return psycopg.connect(bouncer.dsn(db.name), autocommit=True, prepare_threshold=None)


def plan(client: str) -> list[tuple[int, str | None, str]]:
    """(row offset, actor or None, what to do) for each transaction of one client."""
    steps = []
    for i in range(ROUNDS):
        actor = None if i % 4 == 3 else f"{client}-{i}"
        steps.append((i, actor, "rollback" if i % 5 == 4 else "commit"))
    return steps


def test_concurrent_clients_never_see_each_others_context(
    bouncer: PgBouncer, trail: Database
) -> None:
    expected: dict[int, str | None] = {}
    leaks: list[str] = []

    def record(base: int, steps: list[tuple[int, str | None, str]]) -> None:
        for i, actor, end in steps:
            if end == "commit":
                expected[base + i] = actor

    def thread_client(n: int) -> None:
        base = 10_000 + 100 * n
        steps = plan(f"th{n}")
        with connect(bouncer, trail) as conn:
            for i, actor, end in steps:
                with acting_as(actor_id=actor, inherit=False):
                    try:
                        with audit_pg.transaction(conn):
                            said = conn.execute("SELECT cdc_audit.current_context()").fetchone()
                            if (said[0] if said else {}).get("actor_id") != actor:
                                leaks.append(f"th{n}/{i}: {said}")
                            conn.execute(
                                "INSERT INTO accounts (id, owner) VALUES (%s, %s)",
                                (base + i, actor),
                            )
                            if actor is not None:
                                cdc_audit.log_event(conn, "test.row.written", str(base + i))
                            if end == "rollback":
                                raise _Rollback
                    except _Rollback:
                        pass
        record(base, steps)

    async def task_client(n: int, conn: psycopg.AsyncConnection[Any]) -> None:
        base = 20_000 + 100 * n
        steps = plan(f"tk{n}")
        for i, actor, end in steps:
            with acting_as(actor_id=actor, inherit=False):
                try:
                    async with audit_pg.atransaction(conn):
                        await asyncio.sleep(0)
                        cur = await conn.execute("SELECT cdc_audit.current_context()")
                        said = await cur.fetchone()
                        if (said[0] if said else {}).get("actor_id") != actor:
                            leaks.append(f"tk{n}/{i}: {said}")
                        await conn.execute(
                            "INSERT INTO accounts (id, owner) VALUES (%s, %s)", (base + i, actor)
                        )
                        if actor is not None:
                            await cdc_audit.alog_event(conn, "test.row.written", str(base + i))
                        if end == "rollback":
                            raise _Rollback
                except _Rollback:
                    pass
        record(base, steps)

    async def tasks() -> None:
        conns = [
            await psycopg.AsyncConnection.connect(
                bouncer.dsn(trail.name), autocommit=True, prepare_threshold=None
            )
            for _ in range(TASKS)
        ]
        try:
            await asyncio.gather(*(task_client(n, c) for n, c in enumerate(conns)))
        finally:
            for c in conns:
                await c.close()

    threads = [threading.Thread(target=thread_client, args=(n,)) for n in range(THREADS)]
    for t in threads:
        t.start()
    asyncio.run(tasks())
    for t in threads:
        t.join(timeout=120)
    assert not leaks
    assert len(expected) == (THREADS + TASKS) * sum(1 for s in plan("x") if s[2] == "commit")
    drain(trail)

    seen = row_actors(trail)
    assert set(seen) == set(expected)  # rolled-back rows are absent
    for row, actor in expected.items():
        assert seen[row] == (actor, actor, actor is None), row
    apps = events(trail, "kind = 'app'")
    assert sorted((int(e["new"]["resource"]), e["actor_id"]) for e in apps) == sorted(
        (row, actor) for row, actor in expected.items() if actor is not None
    )
    # The pool really was shared: more clients than server connections.
    assert bouncer.pool_size < THREADS + TASKS


def test_sqlalchemy_and_context_helper_through_pgbouncer(
    bouncer: PgBouncer, trail: Database
) -> None:
    from sqlalchemy import create_engine, text

    from cdc_audit.integrations import sqlalchemy as audit_sa

    engine = create_engine(
        f"postgresql+psycopg://postgres@127.0.0.1:{bouncer.port}/{trail.name}",
        connect_args={"prepare_threshold": None},
        pool_size=3,
    )
    audit_sa.instrument(engine)

    def client(n: int) -> None:
        for i in range(5):
            actor = None if i == 2 else f"sa{n}-{i}"
            with acting_as(actor_id=actor, inherit=False), engine.begin() as conn:
                conn.execute(
                    text("INSERT INTO accounts (id, owner) VALUES (:id, :owner)"),
                    {"id": 30_000 + 10 * n + i, "owner": actor},
                )

    try:
        threads = [threading.Thread(target=client, args=(n,)) for n in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        with connect(bouncer, trail) as conn, cdc_audit.context(conn, actor_id="plain"):
            conn.execute("INSERT INTO accounts (id, owner) VALUES (39999, 'plain')")
    finally:
        engine.dispose()
    drain(trail)
    seen = row_actors(trail)
    assert len(seen) == 21
    for row, (actor, owner, missing) in seen.items():
        assert (actor, missing) == (owner, owner is None), row


def test_durable_app_events_survive_rollback_through_pgbouncer(
    bouncer: PgBouncer, trail: Database
) -> None:
    with connect(bouncer, trail) as conn:
        with pytest.raises(_Rollback), conn.transaction():
            cdc_audit.set_context(conn, actor_id="eve", reason="bad password")
            cdc_audit.log_event(conn, "auth.login.failed", "web", "failure", durable=True)
            cdc_audit.log_event(conn, "auth.login.attempted", "web")
            raise _Rollback
        with conn.transaction():
            cdc_audit.set_context(conn, actor_id="ann")
            cdc_audit.log_event(conn, "auth.login.succeeded", "web")
            cdc_audit.log_event(conn, "auth.mfa.verified", "web", durable=True)
        with conn.transaction():  # no context: none left over from the last transaction
            cdc_audit.log_event(conn, "system.job.started", "cron", durable=True)
    drain(trail)
    assert sorted(app_events(trail)) == [
        ("auth.login.failed", "eve", "failure"),
        ("auth.login.succeeded", "ann", "success"),
        ("auth.mfa.verified", "ann", "success"),
        ("system.job.started", None, "success"),
    ]
    failed = events(trail, "new->>'action' = 'auth.login.failed'")[0]
    assert failed["reason"] == "bad password"


class _Rollback(Exception):
    pass
