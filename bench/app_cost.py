"""What auditing costs the application: pgbench TPC-B, unaudited, audited by cdc-audit, and
audited by the classic row trigger, measured interleaved on one private PostgreSQL.

1. setup: a template database made by ``pgbench -i -s SCALE`` and vacuumed;
2. rounds (``--rounds``, default 3): in each, every configuration runs once, in this order:
   - ``unaudited``: TPC-B as pgbench's built-in script (``-f`` of the same text), nothing
     else: the baseline of the round;
   - ``cdc-audit (a)``: ``cdc-audit apply`` of a policy over the four pgbench tables, the
     TPC-B script with ``cdc_audit.set_context(...)`` at the start of each transaction, and
     no worker: the slot retains the changes, as when the worker runs on another host;
   - ``classic trigger``: one ``AFTER INSERT OR UPDATE OR DELETE ... FOR EACH ROW`` trigger
     per table writing the table, the operation, ``to_jsonb(OLD)``, ``to_jsonb(NEW)``, the
     actor, ``current_user``, ``now()`` and the transaction id into an audit table, with a
     context statement (``set_config`` of the actor, reason and trace id) in each transaction;
   - ``unaudited + context``: the unaudited database with that same ``set_config``
     statement: what one more statement per transaction costs by itself;
   - ``cdc-audit (b)``: as (a), with ``cdc-audit worker`` running on the same machine; after
     the run, the trail must hold every committed change (4 per transaction) within
     ``--catch-up-timeout`` seconds.
   Each run gets a fresh database copied from the template (same data, same size), its
   configuration, ``VACUUM ANALYZE`` and a ``CHECKPOINT``, then ``pgbench -n -M prepared
   -c 4 -j 2 -T SECONDS --log``; the database is dropped afterwards (its slot first). TPS and
   the average latency come from pgbench's report, p50/p95/p99 from its per-transaction log,
   WAL bytes per transaction from ``pg_current_wal_lsn()`` before and after the run. Ratios
   are taken against the unaudited run of the same round.
3. catch-up (``--catch-up-changes``, default 1,000,000): with cdc-audit applied and no
   worker, pgbench commits TPC-B transactions until that many row changes wait in the slot;
   then ``cdc-audit worker --drain`` seals them: events/s, wall clock from spawn to exit.

``--quick`` is a smoke run: scale 2, 1 round of 5 s, 20,000 changes to catch up.
"""

from __future__ import annotations

import argparse
import json
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql

from bench.common import Spread, latency_of, parse_pgbench_log, parse_pgbench_summary
from bench.worker_throughput import (
    POLICY,
    WORKLOAD,
    Bench,
    BenchError,
    Usage,
    _last_line,
    _wait_usage,
    find_pgbench,
    machine_facts,
    say,
)
from cdc_audit.ephemeral import EphemeralCluster
from cdc_audit.errors import CdcAuditError

TEMPLATE = "app_template"
EVENTS_PER_TRANSACTION = 4
"""TPC-B: three updates and one insert."""

TARGET_A = 0.85
TARGET_B = 0.60
TARGET_LAG_P99 = 2.0
TARGET_CATCH_UP = 10_000.0

UNAUDITED = "unaudited"
CDC_A = "cdc-audit (a)"
CLASSIC = "classic trigger"
CONTEXT = "unaudited + context"
CDC_B = "cdc-audit (b)"
CDC_A_NO_TRIGGER = "cdc-audit (a) without context trigger"
CDC_A_FLOOR = "cdc-audit (a) trigger floor"
CONFIGS = (UNAUDITED, CDC_A, CLASSIC, CONTEXT, CDC_B)
EXPERIMENTS = (CDC_A_NO_TRIGGER, CDC_A_FLOOR)

_CONTEXT_LINE = next(line for line in WORKLOAD.splitlines() if "set_context" in line)
SET_CONFIG = (
    "SELECT set_config('audit.actor_id', 'bench', true), set_config('audit.reason', 'tpc-b',"
    " true), set_config('audit.trace_id', 't' || :aid, true);"
)
SCRIPTS = {
    UNAUDITED: WORKLOAD.replace(_CONTEXT_LINE + "\n", ""),
    CDC_A: WORKLOAD,
    CLASSIC: WORKLOAD.replace(_CONTEXT_LINE, SET_CONFIG),
    CONTEXT: WORKLOAD.replace(_CONTEXT_LINE, SET_CONFIG),
    CDC_B: WORKLOAD,
    CDC_A_NO_TRIGGER: WORKLOAD,
    CDC_A_FLOOR: WORKLOAD,
}

APP_POLICY = "".join(line for line in POLICY.splitlines(keepends=True) if "public.big" not in line)

CLASSIC_SQL = """
CREATE TABLE audit_log (
    id          bigserial PRIMARY KEY,
    table_name  text NOT NULL,
    op          text NOT NULL,
    old_row     jsonb,
    new_row     jsonb,
    actor_id    text,
    reason      text,
    trace_id    text,
    db_user     text NOT NULL,
    changed_at  timestamptz NOT NULL,
    txid        bigint NOT NULL
);
CREATE FUNCTION audit_row() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO audit_log (table_name, op, old_row, new_row, actor_id, reason, trace_id,
                           db_user, changed_at, txid)
    VALUES (TG_TABLE_NAME, TG_OP,
            CASE WHEN TG_OP <> 'INSERT' THEN to_jsonb(OLD) END,
            CASE WHEN TG_OP <> 'DELETE' THEN to_jsonb(NEW) END,
            current_setting('audit.actor_id', true), current_setting('audit.reason', true),
            current_setting('audit.trace_id', true), current_user, now(), txid_current());
    RETURN NULL;
END
$$;
CREATE TRIGGER audit AFTER INSERT OR UPDATE OR DELETE ON pgbench_accounts
    FOR EACH ROW EXECUTE FUNCTION audit_row();
CREATE TRIGGER audit AFTER INSERT OR UPDATE OR DELETE ON pgbench_branches
    FOR EACH ROW EXECUTE FUNCTION audit_row();
CREATE TRIGGER audit AFTER INSERT OR UPDATE OR DELETE ON pgbench_tellers
    FOR EACH ROW EXECUTE FUNCTION audit_row();
CREATE TRIGGER audit AFTER INSERT OR UPDATE OR DELETE ON pgbench_history
    FOR EACH ROW EXECUTE FUNCTION audit_row();
"""


# Two experiments on one run's database each, bounding what capturing the context with
# statement triggers can cost. Without the context triggers, what is left is the rest of
# cdc-audit's write path: REPLICA IDENTITY FULL, the publication, the slot and set_context.
# (Run through `AppBench.sql`, which passes parameters: hence %% for a literal %.)
DROP_CONTEXT_TRIGGERS = """
DO $drop$
DECLARE t record;
BEGIN
    FOR t IN SELECT tgname, tgrelid::regclass AS rel FROM pg_trigger
              WHERE tgfoid = 'cdc_audit.capture_context'::regproc LOOP
        EXECUTE format('DROP TRIGGER %%I ON %%s', t.tgname, t.rel);
    END LOOP;
END
$drop$
"""
# The floor: the triggers stay, and capture_context does the least any trigger-based capture
# must: on every statement, check its gate; once per transaction, close it. No message, no
# facts, no checks.
GATE_ONLY_CAPTURE = """
CREATE OR REPLACE FUNCTION cdc_audit.capture_context() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER
AS $fn$
DECLARE
    generation pg_catalog.text := 'e' OPERATOR(pg_catalog.||)
        coalesce(pg_catalog.current_setting('cdc_audit.generation', true), '');
BEGIN
    IF coalesce(pg_catalog.current_setting('cdc_audit.emitted_' OPERATOR(pg_catalog.||)
                TG_ARGV[0], true), '') OPERATOR(pg_catalog.=) generation THEN
        RETURN NULL;
    END IF;
    PERFORM pg_catalog.set_config('cdc_audit.emitted_' OPERATOR(pg_catalog.||) TG_ARGV[0],
                                  generation, true);
    RETURN NULL;
END
$fn$
"""


# ------------------------------------------------------------------------------- results


@dataclass
class Sealing:
    """cdc-audit (b): what the worker running beside the load did."""

    expected: int
    """Row changes committed (4 per transaction)."""
    sealed: int
    """Row events in the trail at the end (after waiting up to the catch-up timeout)."""
    sealed_during_run: int
    lag_p50: float
    lag_p99: float
    lag_max: float
    caught_up_after: float
    """Seconds from the end of the load until the trail held every change (-1: it did not)."""
    worker_cpu: float
    worker_rss_mb: float


@dataclass
class Run:
    config: str
    round: int
    seconds: float
    transactions: int
    failed: int
    tps: float
    latency_avg_ms: float
    """From pgbench's report."""
    latency_p50_ms: float
    latency_p95_ms: float
    latency_p99_ms: float
    """From pgbench's per-transaction log."""
    wal_bytes: int
    pgbench_cpu: float
    server_cpu: float
    """CPU seconds of the cluster's processes during the run."""
    sealing: Sealing | None = None

    @property
    def wal_per_transaction(self) -> float:
        return self.wal_bytes / max(1, self.transactions)


@dataclass
class CatchUp:
    changes: int
    accumulate_tps: float
    sealed: int
    seconds: float
    idle_seconds: float
    """A `worker --drain` with nothing to seal: start-up and connecting."""
    worker_cpu: float
    worker_rss_mb: float

    @property
    def rate(self) -> float:
        return self.sealed / max(1e-9, self.seconds)

    @property
    def rate_net(self) -> float:
        return self.sealed / max(1e-9, self.seconds - self.idle_seconds)


@dataclass
class Results:
    command: str = ""
    machine: dict[str, str] = field(default_factory=dict)
    scale: int = 0
    clients: int = 0
    jobs: int = 0
    seconds: int = 0
    rounds: int = 0
    runs: list[Run] = field(default_factory=list)
    catch_up: CatchUp | None = None
    capture: dict[str, list[float]] = field(default_factory=dict)
    """``--capture-loop``: µs per loop iteration of each variant, one value per round."""


# ------------------------------------------------------------------------------- the bench


class AppBench(Bench):
    """`Bench` pointed at one database per run, copied from the pgbench template."""

    def __init__(self, cluster: EphemeralCluster, work: Path, pgbench: str, scale: int) -> None:
        super().__init__(cluster, work, pgbench, scale)
        self.admin = cluster.dsn()
        self.runs = 0

    def use(self, database: str) -> None:
        self.dsn = self.cluster.dsn(database)
        self.env["CDC_AUDIT_DSN"] = self.dsn

    def admin_sql(self, query: str) -> None:
        with psycopg.connect(self.admin, autocommit=True) as conn:
            conn.execute(query.encode())

    def setup_template(self) -> None:
        self.admin_sql(f"CREATE DATABASE {TEMPLATE}")
        self.use(TEMPLATE)
        init = subprocess.run(
            [self.pgbench, "-i", "-q", "-s", str(self.scale), self.dsn],
            capture_output=True,
            text=True,
            check=False,
        )
        if init.returncode != 0:
            raise BenchError(f"pgbench -i failed: {_last_line(init.stderr)}")
        self.sql("VACUUM ANALYZE")
        self.policy.write_text(APP_POLICY)
        for name, text in SCRIPTS.items():
            self.script_path(name).write_text(text)

    def script_path(self, config: str) -> Path:
        return self.work / f"tpcb-{config.replace(' ', '_').replace('(', '').replace(')', '')}.sql"

    def fresh(self, config: str) -> str:
        """A new database copied from the template, configured for `config`, vacuumed and
        checkpointed; returns its name."""
        self.runs += 1
        name = f"app_run_{self.runs}"
        self.admin_sql(f"CREATE DATABASE {name} TEMPLATE {TEMPLATE}")
        self.use(name)
        if config in (CDC_A, CDC_B, *EXPERIMENTS):
            self.cli("--policy", str(self.policy), "apply")
            self.slot = str(
                self.one("SELECT value FROM cdc_audit.install_setting WHERE key = 'slot_name'")
            )
            if config == CDC_A_NO_TRIGGER:
                self.sql(DROP_CONTEXT_TRIGGERS)
            elif config == CDC_A_FLOOR:
                self.sql(GATE_ONLY_CAPTURE)
        elif config == CLASSIC:
            self.sql(CLASSIC_SQL)
        self.sql("VACUUM ANALYZE")
        self.sql("CHECKPOINT")
        return name

    def drop(self, name: str) -> None:
        self.use(TEMPLATE)
        self.sql(
            "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots"
            " WHERE database = %s",
            (name,),
        )
        self.admin_sql(f"DROP DATABASE {name} WITH (FORCE)")

    def wal_lsn(self) -> str:
        return str(self.one("SELECT pg_current_wal_lsn()::text"))

    def wal_since(self, lsn: str) -> int:
        return int(self.one("SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), %s::pg_lsn)", (lsn,)))

    def pgbench_run(
        self, config: str, clients: int, jobs: int, *limit: str
    ) -> tuple[str, Usage, Path]:
        """pgbench with `config`'s script and a per-transaction log; its stdout, usage and
        log prefix."""
        prefix = self.work / f"pgbench-{self.runs}"
        cmd = [
            self.pgbench,
            "-n",
            "-M",
            "prepared",
            "-c",
            str(clients),
            "-j",
            str(jobs),
            "-s",
            str(self.scale),
            "-f",
            str(self.script_path(config)),
            "--log",
            f"--log-prefix={prefix}",
            *limit,
            self.dsn,
        ]
        out, err = self.work / "pgbench.out", self.work / "pgbench.err"
        with out.open("wb") as stdout, err.open("wb") as stderr:
            proc = subprocess.Popen(cmd, stdout=stdout, stderr=stderr, cwd=self.work)
            usage = _wait_usage(proc)
        if usage.code != 0:
            raise BenchError(f"pgbench failed: {_last_line(err.read_text(errors='replace'))}")
        return out.read_text(errors="replace"), usage, prefix

    def row_events(self) -> int:
        return int(
            self.one(
                "SELECT count(*) FROM cdc_audit.event WHERE kind IN ('insert', 'update', 'delete')"
            )
        )

    def start_worker(self) -> subprocess.Popen[bytes]:
        worker = self.worker()
        deadline = time.monotonic() + 30
        while not self.one(
            "SELECT active FROM pg_replication_slots WHERE slot_name = %s", (self.slot,)
        ):
            if worker.poll() is not None or time.monotonic() > deadline:
                raise BenchError("the worker did not start streaming")
            time.sleep(0.1)
        return worker


def _read_log(prefix: Path) -> list[float]:
    latencies: list[float] = []
    for path in sorted(prefix.parent.glob(prefix.name + ".*")):
        with path.open() as lines:
            latencies += parse_pgbench_log(lines)
        path.unlink()
    return latencies


def measure(bench: AppBench, config: str, number: int, args: argparse.Namespace) -> Run:
    name = bench.fresh(config)
    worker = bench.start_worker() if config == CDC_B else None
    try:
        start_lsn = bench.wal_lsn()
        server = bench.server_cpu()
        stdout, usage, prefix = bench.pgbench_run(
            config, args.clients, args.jobs, "-T", str(args.seconds)
        )
        ended = bench.one("SELECT clock_timestamp()")
        wal = bench.wal_since(start_lsn)
        server_cpu = bench.server_cpu() - server
        report = parse_pgbench_summary(stdout)
        latency = latency_of(_read_log(prefix))
        run = Run(
            config=config,
            round=number,
            seconds=float(args.seconds),
            transactions=report.transactions,
            failed=report.failed,
            tps=report.tps,
            latency_avg_ms=report.latency_avg_ms,
            latency_p50_ms=latency.p50_ms,
            latency_p95_ms=latency.p95_ms,
            latency_p99_ms=latency.p99_ms,
            wal_bytes=wal,
            pgbench_cpu=usage.cpu_seconds,
            server_cpu=server_cpu,
        )
        if worker is not None:
            run.sealing = follow_worker(bench, worker, ended, args.catch_up_timeout)
            worker = None
    finally:
        if worker is not None and worker.poll() is None:
            worker.send_signal(signal.SIGTERM)
            worker.wait()
        bench.drop(name)
    return run


def follow_worker(
    bench: AppBench, worker: subprocess.Popen[bytes], end: Any, timeout: float
) -> Sealing:
    """After the load: wait until the trail holds every committed change, stop the worker,
    and take the commit-to-sealed lag of every event."""
    expected = EVENTS_PER_TRANSACTION * int(bench.one("SELECT count(*) FROM pgbench_history"))
    load_end = time.monotonic()
    deadline = load_end + timeout
    sealed = bench.row_events()
    while sealed < expected and time.monotonic() < deadline and worker.poll() is None:
        time.sleep(0.1)
        sealed = bench.row_events()
    caught_up = time.monotonic() - load_end if sealed >= expected else -1.0
    if worker.poll() is None:
        worker.send_signal(signal.SIGTERM)
    usage = _wait_usage(worker) if worker.returncode is None else Usage(worker.returncode, 0, 0)
    if usage.code != 0:
        log = (bench.work / f"worker-{bench._logs}.log").read_text(errors="replace")
        raise BenchError(f"the worker exited {usage.code}: {_last_line(log)}")
    row = bench.sql(
        "SELECT count(*) FILTER (WHERE sealed_at <= %(end)s),"
        " percentile_cont(0.5) WITHIN GROUP (ORDER BY lag),"
        " percentile_cont(0.99) WITHIN GROUP (ORDER BY lag), max(lag)"
        " FROM (SELECT sealed_at, extract(epoch FROM sealed_at - commit_time) AS lag"
        "       FROM cdc_audit.event WHERE kind IN ('insert', 'update', 'delete')) e",
        {"end": end},
    )[0]
    return Sealing(
        expected=expected,
        sealed=sealed,
        sealed_during_run=int(row[0]),
        lag_p50=float(row[1] or 0.0),
        lag_p99=float(row[2] or 0.0),
        lag_max=float(row[3] or 0.0),
        caught_up_after=caught_up,
        worker_cpu=usage.cpu_seconds,
        worker_rss_mb=usage.rss_mb,
    )


def run_catch_up(bench: AppBench, args: argparse.Namespace) -> CatchUp:
    """`changes` TPC-B row changes accumulated with no worker, then one `worker --drain`."""
    name = bench.fresh(CDC_A)
    try:
        idle = bench.drain()
        transactions = max(1, args.catch_up_changes // EVENTS_PER_TRANSACTION)
        per_client = max(1, transactions // args.clients)
        stdout, _usage, prefix = bench.pgbench_run(
            CDC_A, args.clients, args.jobs, "-t", str(per_client)
        )
        _read_log(prefix)
        report = parse_pgbench_summary(stdout)
        drain = bench.drain()
        catch = CatchUp(
            changes=EVENTS_PER_TRANSACTION * report.transactions,
            accumulate_tps=report.tps,
            sealed=bench.row_events(),
            seconds=drain.seconds,
            idle_seconds=idle.seconds,
            worker_cpu=drain.cpu_seconds,
            worker_rss_mb=drain.rss_mb,
        )
    finally:
        bench.drop(name)
    if catch.sealed != catch.changes:
        raise BenchError(f"catch-up sealed {catch.sealed} of {catch.changes} changes")
    return catch


# One transaction's audited work, repeated in one backend with no network in between, each
# iteration its own transaction (per-transaction costs included): the variants differ only in
# the context statement and in the trigger that fires.
CAPTURE_LOOP = """
DO $loop$
DECLARE started timestamptz := clock_timestamp();
BEGIN
    FOR i IN {first}..{last} LOOP
        {context}
        UPDATE pgbench_accounts SET abalance = abalance + 1 WHERE aid = i;
        {end}
    END LOOP;
    RAISE NOTICE '%', extract(epoch FROM clock_timestamp() - started) * 1e6 / {count};
END
$loop$
"""
SET_CONTEXT = (
    "PERFORM cdc_audit.set_context(actor_id => 'bench', reason => 'tpc-b', trace_id => 't' || i);"
)
CAPTURE_VARIANTS = (
    # (name, database, context statement, trigger enabled, commit)
    ("set_context + UPDATE + COMMIT, context trigger disabled", CDC_A, SET_CONTEXT, False, True),
    ("set_context + UPDATE + COMMIT, trigger as installed", CDC_A, SET_CONTEXT, True, True),
    (
        "set_context + UPDATE + COMMIT, trigger floor (gate only)",
        CDC_A_FLOOR,
        SET_CONTEXT,
        True,
        True,
    ),
    ("set_context + UPDATE, no COMMIT, trigger as installed", CDC_A, SET_CONTEXT, True, False),
    ("UPDATE, no COMMIT (gate closed), trigger enabled", CDC_A, "", True, False),
    ("UPDATE, no COMMIT, trigger disabled", CDC_A, "", False, False),
)


def run_capture_loop(bench: AppBench, count: int, rounds: int) -> dict[str, list[float]]:
    """µs per iteration of each variant of `CAPTURE_LOOP`, variants interleaved per round;
    each iteration updates another row and, in the variants that commit, is a transaction."""
    names = {CDC_A: bench.fresh(CDC_A), CDC_A_FLOOR: bench.fresh(CDC_A_FLOOR)}
    out: dict[str, list[float]] = {name: [] for name, *_ in CAPTURE_VARIANTS}
    first = 1
    notices: list[str] = []
    try:
        for _ in range(rounds):
            for name, config, context, enabled, commit in CAPTURE_VARIANTS:
                with psycopg.connect(bench.cluster.dsn(names[config]), autocommit=True) as conn:
                    conn.add_notice_handler(lambda d: notices.append(d.message_primary or ""))
                    switch = "ENABLE" if enabled else "DISABLE"
                    conn.execute(f"ALTER TABLE pgbench_accounts {switch} TRIGGER USER".encode())
                    loop = sql.SQL(CAPTURE_LOOP).format(
                        first=sql.Literal(first),
                        last=sql.Literal(first + count - 1),
                        count=sql.Literal(count),
                        context=sql.SQL(context),
                        end=sql.SQL("COMMIT;" if commit else ""),
                    )
                    conn.execute(loop)
                first += count
                out[name].append(float(notices[-1]))
    finally:
        for database in names.values():
            bench.drop(database)
    return out


# ------------------------------------------------------------------------------- report


def ratios(runs: Sequence[Run], config: str, value: str) -> list[float]:
    """`value` of `config` over that of the unaudited run of the same round, per round."""
    base = {r.round: getattr(r, value) for r in runs if r.config == UNAUDITED}
    return [
        getattr(r, value) / base[r.round]
        for r in runs
        if r.config == config and r.round in base and base[r.round]
    ]


def values(runs: Sequence[Run], config: str, value: str) -> list[float]:
    return [float(getattr(r, value)) for r in runs if r.config == config]


def summary(results: Results) -> list[str]:
    runs = results.runs
    lines = [
        "| configuration | TPS | TPS ratio | latency avg ms | p95 ms | p95 ratio | WAL bytes/tx |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for config in CONFIGS + EXPERIMENTS:
        if not values(runs, config, "tps"):
            continue
        lines.append(
            f"| {config} | {Spread.of(values(runs, config, 'tps')).render()} |"
            f" {Spread.of(ratios(runs, config, 'tps')).render('.2f')} |"
            f" {Spread.of(values(runs, config, 'latency_avg_ms')).render('.2f')} |"
            f" {Spread.of(values(runs, config, 'latency_p95_ms')).render('.2f')} |"
            f" {Spread.of(ratios(runs, config, 'latency_p95_ms')).render('.2f')} |"
            f" {Spread.of(values(runs, config, 'wal_per_transaction')).render()} |"
        )
    return lines


def verdicts(results: Results) -> list[str]:
    out = []
    for config, target in ((CDC_A, TARGET_A), (CDC_B, TARGET_B)):
        got = ratios(results.runs, config, "tps")
        classic = ratios(results.runs, CLASSIC, "tps")
        if got:
            med = statistics.median(got)
            above = not classic or med > statistics.median(classic)
            ok = med >= target and above
            out.append(
                f"{'PASS' if ok else 'MISS'}  {config} TPS >= {target:.2f} of unaudited and"
                f" above the classic trigger: {med:.2f}"
                + (f" (classic {statistics.median(classic):.2f})" if classic else "")
            )
    sealing = [r.sealing for r in results.runs if r.sealing is not None]
    if sealing:
        p99 = statistics.median(s.lag_p99 for s in sealing)
        kept = all(s.sealed >= s.expected for s in sealing)
        out.append(
            f"{'PASS' if kept and p99 < TARGET_LAG_P99 else 'MISS'}  sealing keeps up, lag p99"
            f" < {TARGET_LAG_P99:.0f} s: p99 {p99:.2f} s (median), every change sealed: {kept}"
        )
    if results.catch_up is not None:
        rate = results.catch_up.rate
        out.append(
            f"{'PASS' if rate >= TARGET_CATCH_UP else 'MISS'}  catch-up >="
            f" {TARGET_CATCH_UP:,.0f} events/s: {rate:,.0f}/s"
        )
    return out


# ------------------------------------------------------------------------------- main


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.app_cost",
        description="TPC-B unaudited, audited by cdc-audit and by a classic trigger,"
        " interleaved, on a throwaway PostgreSQL.",
    )
    parser.add_argument("--quick", action="store_true", help="a smoke run (1 round of 5 s)")
    parser.add_argument("--scale", type=int, help="pgbench scale (default 10; quick 2)")
    parser.add_argument("--seconds", type=int, help="seconds per run (default 30; quick 5)")
    parser.add_argument("--rounds", type=int, help="interleaved rounds (default 3; quick 1)")
    parser.add_argument("--clients", type=int, default=4, help="pgbench -c (default 4)")
    parser.add_argument("--jobs", type=int, default=2, help="pgbench -j (default 2)")
    parser.add_argument(
        "--configs",
        default=",".join(CONFIGS),
        help=f"comma-separated configurations (default: {', '.join(CONFIGS)}; also"
        f" {', '.join(EXPERIMENTS)})",
    )
    parser.add_argument(
        "--catch-up-changes",
        type=int,
        help="row changes accumulated before the catch-up drain, 0 skips it"
        " (default 1000000; quick 20000)",
    )
    parser.add_argument(
        "--catch-up-timeout",
        type=float,
        default=120.0,
        help="seconds the worker of (b) gets after the load to seal everything (default 120)",
    )
    parser.add_argument(
        "--capture-loop",
        type=int,
        default=0,
        metavar="N",
        help="after the rounds, time N iterations of set_context + UPDATE (+ COMMIT) in one"
        " backend, the context trigger disabled, as installed and at its floor (default 0: skip)",
    )
    parser.add_argument(
        "--capture-rounds", type=int, default=3, help="interleaved rounds of the capture loop"
    )
    parser.add_argument("--json", type=Path, metavar="FILE", help="also write the results here")
    args = parser.parse_args(argv)
    defaults = {
        "scale": 2 if args.quick else 10,
        "seconds": 5 if args.quick else 30,
        "rounds": 1 if args.quick else 3,
        "catch_up_changes": 20_000 if args.quick else 1_000_000,
    }
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    unknown = [c for c in args.configs if c not in CONFIGS + EXPERIMENTS]
    if unknown:
        parser.error(f"unknown configuration(s): {', '.join(unknown)}")
    if UNAUDITED not in args.configs:
        parser.error(f"the configurations must include {UNAUDITED!r}: it is the baseline")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        return run(args, find_pgbench())
    except (BenchError, CdcAuditError) as exc:
        print(f"app_cost: {exc}", file=sys.stderr)
        return 1
    except psycopg.Error as exc:
        print(f"app_cost: database error: {_last_line(str(exc))}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("app_cost: interrupted", file=sys.stderr)
        return 130


def _describe(run: Run) -> str:
    text = (
        f"round {run.round} {run.config}: {run.tps:,.0f} TPS, latency avg"
        f" {run.latency_avg_ms:.2f} ms p95 {run.latency_p95_ms:.2f} ms,"
        f" {run.wal_per_transaction:,.0f} WAL bytes/tx, CPU per tx: pgbench"
        f" {run.pgbench_cpu * 1e6 / max(1, run.transactions):.0f} µs, server"
        f" {run.server_cpu * 1e6 / max(1, run.transactions):.0f} µs"
    )
    s = run.sealing
    if s is not None:
        text += (
            f"; worker {s.worker_cpu * 1e6 / max(1, run.transactions):.0f} µs;"
            f" sealed {s.sealed:,} of {s.expected:,} changes ({s.sealed_during_run:,} during the"
            f" run), lag p50 {s.lag_p50:.2f} s p99 {s.lag_p99:.2f} s max {s.lag_max:.2f} s,"
            f" caught up {s.caught_up_after:.1f} s after the load"
        )
    return text


def run(args: argparse.Namespace, pgbench: str) -> int:
    results = Results(
        command="python -m bench.app_cost " + " ".join(sys.argv[1:]),
        scale=args.scale,
        clients=args.clients,
        jobs=args.jobs,
        seconds=args.seconds,
        rounds=args.rounds,
    )
    cluster = EphemeralCluster()
    with tempfile.TemporaryDirectory(prefix="cdc-audit-bench-app-") as tmp:
        try:
            cluster.start()
            say(f"PostgreSQL on port {cluster.port} (pid {cluster.pid})")
            bench = AppBench(cluster, Path(tmp), pgbench, args.scale)
            bench.setup_template()
            results.machine = machine_facts(bench)
            for key, value in results.machine.items():
                say(f"  {key}: {value}")
            say(
                f"setup: pgbench scale {args.scale}; {args.rounds} round(s) of"
                f" {', '.join(args.configs)}; {args.seconds} s each, -c {args.clients}"
                f" -j {args.jobs}"
            )
            for number in range(1, args.rounds + 1):
                for config in args.configs:
                    run = measure(bench, config, number, args)
                    results.runs.append(run)
                    say(_describe(run))
            if args.catch_up_changes > 0:
                catch = run_catch_up(bench, args)
                results.catch_up = catch
                say(
                    f"catch-up: {catch.changes:,} changes accumulated at"
                    f" {catch.accumulate_tps:,.0f} TPS, sealed in {catch.seconds:.1f} s ="
                    f" {catch.rate:,.0f} events/s ({catch.rate_net:,.0f}/s net of"
                    f" {catch.idle_seconds:.2f} s start-up); worker peak RSS"
                    f" {catch.worker_rss_mb:.0f} MB"
                )
            if args.capture_loop > 0:
                results.capture = run_capture_loop(bench, args.capture_loop, args.capture_rounds)
                for name, us in results.capture.items():
                    say(f"capture loop: {name}: {Spread.of(us).render('.1f')} µs per iteration")
        finally:
            cluster.stop()
    say("")
    for line in summary(results):
        say(line)
    say("")
    for line in verdicts(results):
        say(line)
    if args.json is not None:
        args.json.write_text(json.dumps(as_json(results), indent=2) + "\n")
    return 0


def as_json(results: Results) -> dict[str, Any]:
    data = asdict(results)
    for item, run in zip(data["runs"], results.runs, strict=True):
        item["wal_per_transaction"] = run.wal_per_transaction
    if results.catch_up is not None:
        data["catch_up"].update(rate=results.catch_up.rate, rate_net=results.catch_up.rate_net)
    return data


if __name__ == "__main__":
    sys.exit(main())
