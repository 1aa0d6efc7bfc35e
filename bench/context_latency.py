"""What setting the audit context adds to each transaction: round trips and time.

On a private, throwaway PostgreSQL (`EphemeralCluster`) with `public.accounts` audited (so the
statement trigger and its context message run in every variant), each transaction is one
small ``UPDATE accounts SET balance = balance + 1 WHERE id = $1`` through psycopg 3:

- ``none``: ``with conn.transaction(): UPDATE`` (BEGIN, UPDATE, COMMIT);
- ``context``: the same through ``integrations.psycopg.transaction`` with an actor set, which
  adds ``SELECT cdc_audit.set_context(...)``;
- ``pipe-none`` / ``pipe-context``: both inside ``conn.pipeline()``, where the context call is
  queued with the UPDATE;
- ``sqlalchemy-none`` / ``sqlalchemy-context``: ``engine.begin()``, without and with
  ``integrations.sqlalchemy.instrument``;
- the first two again through a PgBouncer in transaction pooling mode, when one is installed.

Variants run interleaved (A B A B ...) for ``--rounds`` rounds of ``--transactions`` each; the
report gives the median, min and max over rounds of the mean time per transaction, and the
added microseconds and ratio against the variant without context. Round trips are counted
on the wire, in a separate pass: the connection goes through a small TCP relay that counts
each time the client starts sending after the server has answered.

Run ``python -m bench.context_latency --help``; ``--quick`` is a smoke run.
"""

from __future__ import annotations

import argparse
import os
import platform
import selectors
import socket
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from pathlib import Path
from typing import Any

import psycopg

from cdc_audit import installer
from cdc_audit.ephemeral import EphemeralCluster
from cdc_audit.integrations import acting_as
from cdc_audit.integrations import psycopg as audit_pg
from cdc_audit.integrations.pgbouncer import PgBouncer, find_pgbouncer
from cdc_audit.policy import load_policy

POLICY = """\
version: 1
schema: cdc_audit
streams:
  user: {retention: 30d}
tables:
  - {table: public.accounts, stream: user}
"""
ROWS = 100
UPDATE = "UPDATE accounts SET balance = balance + 1 WHERE id = %s"


class Relay:
    """A loopback TCP relay to `port` that counts client turns (= round trips)."""

    def __init__(self, port: int) -> None:
        self.upstream = port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self.listener.getsockname()[1]
        self.turns = 0
        self.stop = False
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        client, _ = self.listener.accept()
        server = socket.create_connection(("127.0.0.1", self.upstream))
        for sock in (client, server):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sel = selectors.DefaultSelector()
        sel.register(client, selectors.EVENT_READ, server)
        sel.register(server, selectors.EVENT_READ, client)
        last_from_client = False
        while not self.stop:
            for key, _ in sel.select(timeout=0.2):
                source: socket.socket = key.fileobj  # type: ignore[assignment]
                data = source.recv(65536)
                if not data:
                    client.close()
                    server.close()
                    return
                from_client = source is client
                if from_client and not last_from_client:
                    self.turns += 1
                last_from_client = from_client
                key.data.sendall(data)

    def close(self) -> None:
        self.stop = True
        self.listener.close()


Step = Callable[[int], None]


def actor_block(context: bool) -> AbstractContextManager[Any]:
    if not context:
        return nullcontext()
    return acting_as(actor_id="bench-user", reason="latency", trace_id="t-1")


class Variant:
    def __init__(self, name: str, baseline: str | None, make: Callable[[int], Any]) -> None:
        self.name = name
        self.baseline = baseline
        self.make = make  # port -> (step, closer)
        self.times: list[float] = []
        self.round_trips: float = 0.0


def psycopg_variant(
    dbname: str, *, context: bool, pipeline: bool
) -> Callable[[int], tuple[Step, Callable[[], None]]]:
    def make(port: int) -> tuple[Step, Callable[[], None]]:
        conn = psycopg.connect(
            f"host=127.0.0.1 port={port} dbname={dbname} user=postgres",
            autocommit=True,
            prepare_threshold=None,
        )

        def step(i: int) -> None:
            piped: AbstractContextManager[Any] = conn.pipeline() if pipeline else nullcontext()
            with actor_block(context), piped, audit_pg.transaction(conn):
                conn.execute(UPDATE, (i % ROWS + 1,))

        return step, conn.close

    return make


def sqlalchemy_variant(
    dbname: str, *, context: bool
) -> Callable[[int], tuple[Step, Callable[[], None]]]:
    def make(port: int) -> tuple[Step, Callable[[], None]]:
        from sqlalchemy import create_engine, text

        from cdc_audit.integrations import sqlalchemy as audit_sa

        engine = create_engine(
            f"postgresql+psycopg://postgres@127.0.0.1:{port}/{dbname}",
            connect_args={"prepare_threshold": None},
            pool_size=1,
        )
        if context:
            audit_sa.instrument(engine)
        statement = text("UPDATE accounts SET balance = balance + 1 WHERE id = :id")
        with engine.connect():
            pass  # connect outside the counted transactions

        def step(i: int) -> None:
            with actor_block(context), engine.begin() as conn:
                conn.execute(statement, {"id": i % ROWS + 1})

        return step, engine.dispose

    return make


def count_round_trips(variant: Variant, port: int, n: int) -> float:
    relay = Relay(port)
    try:
        step, close = variant.make(relay.port)
        step(0)  # warm up: connection set-up, type and dialect look-ups
        before = relay.turns
        for i in range(n):
            step(i)
        turns = relay.turns - before
        close()
        return turns / n
    finally:
        relay.close()


@contextmanager
def setup(work: Path) -> Iterator[tuple[EphemeralCluster, str]]:
    cluster = EphemeralCluster()
    cluster.start()
    try:
        with psycopg.connect(cluster.dsn(), autocommit=True) as admin:
            admin.execute('CREATE DATABASE "bench" TEMPLATE template0')
        dsn = cluster.dsn("bench")
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute("CREATE TABLE accounts (id int PRIMARY KEY, owner text, balance int)")
            conn.execute(
                "INSERT INTO accounts SELECT g, 'o' || g, 0 FROM generate_series(1, %s) g",
                (ROWS,),
            )
        policy = work / "policy.yaml"
        policy.write_text(POLICY)
        installer.apply(dsn, load_policy(policy))
        yield cluster, "bench"
    finally:
        cluster.stop()


def run(args: argparse.Namespace) -> int:
    with tempfile.TemporaryDirectory() as tmp, setup(Path(tmp)) as (cluster, dbname):
        bouncer: PgBouncer | None = None
        if find_pgbouncer() is not None and not args.no_pgbouncer:
            bouncer = PgBouncer(cluster.port, pool_size=2).start()
        try:
            variants = [
                (Variant("none", None, psycopg_variant(dbname, context=False, pipeline=False)),
                 cluster.port),
                (Variant("context", "none",
                         psycopg_variant(dbname, context=True, pipeline=False)), cluster.port),
                (Variant("pipe-none", None,
                         psycopg_variant(dbname, context=False, pipeline=True)), cluster.port),
                (Variant("pipe-context", "pipe-none",
                         psycopg_variant(dbname, context=True, pipeline=True)), cluster.port),
                (Variant("sqlalchemy-none", None, sqlalchemy_variant(dbname, context=False)),
                 cluster.port),
                (Variant("sqlalchemy-context", "sqlalchemy-none",
                         sqlalchemy_variant(dbname, context=True)), cluster.port),
            ]  # fmt: skip
            if bouncer is not None:
                variants += [
                    (Variant("pgbouncer-none", None,
                             psycopg_variant(dbname, context=False, pipeline=False)),
                     bouncer.port),
                    (Variant("pgbouncer-context", "pgbouncer-none",
                             psycopg_variant(dbname, context=True, pipeline=False)),
                     bouncer.port),
                ]  # fmt: skip
            print(f"machine: {machine()}", flush=True)
            print(f"round trips per transaction (wire, {args.count} transactions):", flush=True)
            for variant, port in variants:
                variant.round_trips = count_round_trips(variant, port, args.count)
                print(f"  {variant.name:20} {variant.round_trips:.2f}", flush=True)
            steps = [(v, *v.make(port)) for v, port in variants]
            for _variant, step, _close in steps:
                for i in range(50):
                    step(i)  # warm up
            for r in range(args.rounds):
                for variant, step, _close in steps:
                    start = time.perf_counter()
                    for i in range(args.transactions):
                        step(i)
                    elapsed = time.perf_counter() - start
                    variant.times.append(elapsed / args.transactions * 1e6)
                print(f"round {r + 1}/{args.rounds} done", flush=True)
            for _variant, _step, close in steps:
                close()
            report([v for v, _ in variants], args)
        finally:
            if bouncer is not None:
                bouncer.stop()
    return 0


def report(variants: list[Variant], args: argparse.Namespace) -> None:
    by_name = {v.name: v for v in variants}
    print(
        f"\n{args.rounds} interleaved rounds of {args.transactions} transactions per variant;"
        " µs per transaction (median [min-max] of the round means)"
    )
    print(
        f"| {'variant':20} | round trips | µs/tx median [min-max] | added µs | ratio |\n"
        f"|{'-' * 22}|-------------|------------------------|----------|-------|"
    )
    for v in variants:
        med = statistics.median(v.times)
        spread = f"{med:7.0f} [{min(v.times):.0f}-{max(v.times):.0f}]"
        added = ratio = ""
        if v.baseline is not None:
            base = statistics.median(by_name[v.baseline].times)
            added = f"{med - base:+.0f}"
            ratio = f"{med / base:.2f}"
        print(f"| {v.name:20} | {v.round_trips:11.2f} | {spread:22} | {added:>8} | {ratio:>5} |")


def machine() -> str:
    cpu = ""
    with open("/proc/cpuinfo") as info:
        for line in info:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return (
        f"{cpu}, {os.cpu_count()} CPUs, Linux {platform.release()}, Python"
        f" {platform.python_version()}, psycopg {psycopg.__version__}"
    )


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.context_latency", description=__doc__)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--transactions", type=int, default=1000)
    parser.add_argument("--count", type=int, default=100, help="transactions for wire counts")
    parser.add_argument("--no-pgbouncer", action="store_true")
    parser.add_argument("--quick", action="store_true", help="3 rounds of 100 (smoke run)")
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds, args.transactions, args.count = 3, 100, 20
    return args


def main(argv: Sequence[str] | None = None) -> int:
    return run(parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
