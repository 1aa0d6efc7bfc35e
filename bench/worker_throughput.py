"""`make bench`: how fast the worker seals, against how fast the stream can merely be read.

Everything runs in one process against a private, throwaway PostgreSQL (`EphemeralCluster`),
so that every ratio compares figures measured on the same machine within minutes:

1. setup: pgbench's TPC-B tables (plus a table ``big`` for step 4), a policy auditing them in
   stream ``user`` applied with ``cdc-audit apply``, and a TPC-B script that says who acts
   (``cdc_audit.set_context``) at the start of every transaction;
2. rounds, interleaved: with the worker stopped, pgbench commits a fixed number of
   transactions, which both the worker's slot and a second pgoutput slot (``bench_raw``,
   created where the drained worker's slot stands) retain. Then
   - raw: `ReplicationStream` reads ``bench_raw`` to an end marker, only counting the row
     messages: events/s received and decoded, the baseline;
   - sealed: ``cdc-audit worker --drain`` seals the worker's slot: events/s sealed, the
     worker's peak RSS and CPU (from wait4), the cluster's CPU (from /proc);
3. lag: a continuous ``cdc-audit worker`` runs while pgbench runs; commit-to-sealed lag of
   every event (``sealed_at - commit_time``), sustained sealed events/s, pgbench TPS;
4. one transaction inserting ``--big-rows`` rows, read raw and then drained: rate and RSS;
5. ``--write-cost``: round 1's sealed rows copied again with no worker, into the event table
   and plain tables: the server's share of sealing;
6. ``--profile FILE``: one more round drained under cProfile (main thread only).

Run ``python -m bench.worker_throughput --help`` for the knobs; ``--quick`` is a smoke run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import pstats
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql

from cdc_audit.ephemeral import EphemeralCluster, find_pg_bin
from cdc_audit.errors import CdcAuditError
from cdc_audit.pgoutput import Commit, Delete, Insert, LogicalMessage, Update, parse_lsn
from cdc_audit.replication import ReplicationStream, StreamOptions

ROOT = Path(__file__).resolve().parent.parent
RAW_SLOT = "bench_raw"
PUBLICATION = "cdc_audit"
END_PREFIX = "bench.end"
DATABASE = "bench"

Params = Sequence[object] | Mapping[str, object]

TARGET_RATIO = 0.5
TARGET_RATE = 10_000.0
TARGET_RSS_MB = 200.0

POLICY = """\
version: 1
schema: cdc_audit
context:
  require: [actor_id]
  on_missing: record
streams:
  user: {retention: 400d}
tables:
  - {table: public.pgbench_accounts, stream: user, exclude: [filler]}
  - {table: public.pgbench_branches, stream: user, exclude: [filler]}
  - {table: public.pgbench_tellers, stream: user, exclude: [filler]}
  - {table: public.pgbench_history, stream: user}
  - {table: public.big, stream: user}
"""

# TPC-B as pgbench's built-in script, plus the context call the application would make.
WORKLOAD = """\
\\set aid random(1, 100000 * :scale)
\\set bid random(1, 1 * :scale)
\\set tid random(1, 10 * :scale)
\\set delta random(-5000, 5000)
BEGIN;
SELECT cdc_audit.set_context(actor_id => 'bench', reason => 'tpc-b', trace_id => 't' || :aid);
UPDATE pgbench_accounts SET abalance = abalance + :delta WHERE aid = :aid;
SELECT abalance FROM pgbench_accounts WHERE aid = :aid;
UPDATE pgbench_tellers SET tbalance = tbalance + :delta WHERE tid = :tid;
UPDATE pgbench_branches SET bbalance = bbalance + :delta WHERE bid = :bid;
INSERT INTO pgbench_history (tid, bid, aid, delta, mtime)
  VALUES (:tid, :bid, :aid, :delta, CURRENT_TIMESTAMP);
END;
"""


class BenchError(Exception):
    """A step failed; the message is one line for the user."""


# ------------------------------------------------------------------------------- results


@dataclass
class Round:
    events_raw: int
    raw_seconds: float
    events_sealed: int
    sealed_seconds: float
    worker_rss_mb: float
    startup_seconds: float
    accumulate_tps: float
    reader_cpu: float
    """CPU seconds of this process while reading the raw slot."""
    server_cpu_raw: float
    """CPU seconds of the cluster's processes (walsender) while reading the raw slot."""
    worker_cpu: float
    server_cpu_sealed: float
    batches: int
    """Transactions the worker wrote (distinct ``sealed_at``)."""

    @property
    def raw_rate(self) -> float:
        return self.events_raw / self.raw_seconds

    @property
    def sealed_rate(self) -> float:
        return self.events_sealed / self.sealed_seconds

    @property
    def sealed_rate_net(self) -> float:
        return self.events_sealed / max(1e-9, self.sealed_seconds - self.startup_seconds)

    @property
    def ratio(self) -> float:
        return self.sealed_rate / self.raw_rate

    @property
    def ratio_net(self) -> float:
        return self.sealed_rate_net / self.raw_rate


@dataclass
class Lag:
    seconds: float
    pgbench_tps: float
    events: int
    sealed_during_run: int
    p50: float
    p99: float
    max: float
    catch_up: float
    worker_rss_mb: float
    worker_cpu: float
    server_cpu: float

    @property
    def sustained_rate(self) -> float:
        return self.sealed_during_run / self.seconds

    @property
    def committed_rate(self) -> float:
        return self.events / self.seconds


@dataclass
class Big:
    rows: int
    insert_seconds: float
    events_raw: int
    raw_seconds: float
    events_sealed: int
    sealed_seconds: float
    worker_rss_mb: float
    worker_cpu: float
    server_cpu_sealed: float
    batches: int
    """Transactions the worker wrote (distinct ``sealed_at``)."""


@dataclass
class WriteCost:
    target: str
    batch: int
    rows: int
    seconds: float
    server_cpu: float


@dataclass
class Results:
    machine: dict[str, str] = field(default_factory=dict)
    startup_seconds: float = 0.0
    startup_rss_mb: float = 0.0
    startup_cpu: float = 0.0
    rounds: list[Round] = field(default_factory=list)
    lag: Lag | None = None
    big: Big | None = None
    write_cost: list[WriteCost] = field(default_factory=list)


@dataclass(frozen=True)
class Usage:
    """How a child process ended and what it used (from wait4)."""

    code: int
    rss_mb: float
    cpu_seconds: float


@dataclass(frozen=True)
class RawRead:
    events: int
    seconds: float
    cpu_seconds: float
    """CPU of this process, which reads and decodes."""
    server_cpu: float
    """CPU of the cluster meanwhile (mostly the walsender decoding WAL)."""


@dataclass(frozen=True)
class Drain:
    seconds: float
    rss_mb: float
    cpu_seconds: float
    """User + system CPU of the worker process."""
    server_cpu: float
    """User + system CPU of the cluster's processes meanwhile (walsender, backends)."""
    batches: int
    """Transactions that wrote events (distinct ``sealed_at``, the batch's now())."""


# ------------------------------------------------------------------------------- helpers


def say(text: str) -> None:
    print(text, flush=True)


def _last_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else "(no output)"


def _wait_usage(proc: subprocess.Popen[bytes]) -> Usage:
    """Wait for `proc` with wait4: its exit code, its own peak RSS (Linux reports KiB), CPU."""
    _pid, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return Usage(proc.returncode, usage.ru_maxrss / 1024.0, usage.ru_utime + usage.ru_stime)


_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def server_cpu_seconds(postmaster: int | None) -> float:
    """CPU seconds used so far by the cluster: the postmaster with its reaped children, plus
    its live children (backends, walsenders), read from /proc."""
    if postmaster is None:
        return 0.0
    ticks = 0
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(entry.path, "stat").read_text()
        except OSError:
            continue
        # Fields after "(comm)": state, ppid, ... utime, stime, cutime, cstime (14th-17th).
        fields = stat.rsplit(")", 1)[1].split()
        pid, ppid = int(entry.name), int(fields[1])
        if pid == postmaster:
            ticks += sum(int(f) for f in fields[11:15])
        elif ppid == postmaster:
            ticks += int(fields[11]) + int(fields[12])
    return ticks / _CLOCK_TICKS


class Bench:
    """The cluster, the database and the commands of one benchmark run."""

    def __init__(self, cluster: EphemeralCluster, work: Path, pgbench: str, scale: int) -> None:
        self.cluster = cluster
        self.work = work
        self.pgbench = pgbench
        self.scale = scale
        self.dsn = cluster.dsn(DATABASE)
        self.script = work / "tpcb_context.sql"
        self.policy = work / "policy.yaml"
        self.slot = ""
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("CDC_AUDIT_")}
        self.env["CDC_AUDIT_DSN"] = self.dsn
        self.env["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p
        )
        self._logs = 0

    # ---- database

    def sql(self, query: str, params: Params = ()) -> list[tuple[Any, ...]]:
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            cur = conn.execute(query, params)
            return cur.fetchall() if cur.description else []

    def one(self, query: str, params: Params = ()) -> Any:
        rows = self.sql(query, params)
        return rows[0][0] if rows else None

    def event_count(self) -> int:
        return int(self.one("SELECT count(*) FROM cdc_audit.event"))

    def end_marker(self) -> int:
        """Commit a transactional message the raw reader stops at; returns its LSN."""
        lsn = self.one("SELECT pg_logical_emit_message(true, %s, '')::text", (END_PREFIX,))
        return parse_lsn(str(lsn))

    def new_raw_slot(self) -> None:
        self.drop_raw_slot()
        self.sql("SELECT pg_create_logical_replication_slot(%s, 'pgoutput')", (RAW_SLOT,))

    def drop_raw_slot(self) -> None:
        self.sql(
            "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots"
            " WHERE slot_name = %s",
            (RAW_SLOT,),
        )

    # ---- commands

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        cmd = [sys.executable, "-m", "cdc_audit.cli", *args]
        result = subprocess.run(
            cmd, env=self.env, cwd=ROOT, capture_output=True, text=True, check=False
        )
        if result.returncode != 0:
            raise BenchError(f"cdc-audit {' '.join(args)}: {_last_line(result.stderr)}")
        return result

    def run_pgbench(self, *args: str) -> float:
        """Run pgbench with the context-setting TPC-B script; returns its TPS."""
        cmd = [
            self.pgbench,
            "-n",
            "-M",
            "prepared",
            "-s",
            str(self.scale),
            "-f",
            str(self.script),
            *args,
            self.dsn,
        ]
        result = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if result.returncode != 0:
            raise BenchError(f"pgbench failed: {_last_line(result.stderr or result.stdout)}")
        match = re.search(r"^tps = ([0-9.]+)", result.stdout, re.MULTILINE)
        if match is None:
            raise BenchError(f"no tps in pgbench's output: {_last_line(result.stdout)}")
        return float(match.group(1))

    def worker(self, *args: str, profile: Path | None = None) -> subprocess.Popen[bytes]:
        self._logs += 1
        log = (self.work / f"worker-{self._logs}.log").open("wb")
        prefix = ["-m", "cProfile", "-o", str(profile)] if profile is not None else []
        cmd = [sys.executable, *prefix, "-m", "cdc_audit.cli", "worker", *args]
        try:
            return subprocess.Popen(
                cmd, env=self.env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT
            )
        finally:
            log.close()

    def drain(self, profile: Path | None = None) -> Drain:
        """`cdc-audit worker --drain`, timed, with its peak RSS."""
        since = self.one("SELECT clock_timestamp()")
        server = self.server_cpu()
        started = time.perf_counter()
        proc = self.worker("--drain", profile=profile)
        usage = _wait_usage(proc)
        seconds = time.perf_counter() - started
        if usage.code != 0:
            log = (self.work / f"worker-{self._logs}.log").read_text(errors="replace")
            raise BenchError(f"worker --drain exited {usage.code}: {_last_line(log)}")
        server = self.server_cpu() - server
        batches = self.one(
            "SELECT count(DISTINCT sealed_at) FROM cdc_audit.event WHERE sealed_at >= %s",
            (since,),
        )
        return Drain(seconds, usage.rss_mb, usage.cpu_seconds, server, int(batches))

    def server_cpu(self) -> float:
        return server_cpu_seconds(self.cluster.pid)

    # ---- steps

    def setup(self) -> None:
        with psycopg.connect(self.cluster.dsn(), autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {DATABASE}")
        init = subprocess.run(
            [self.pgbench, "-i", "-q", "-s", str(self.scale), self.dsn],
            capture_output=True,
            text=True,
            check=False,
        )
        if init.returncode != 0:
            raise BenchError(f"pgbench -i failed: {_last_line(init.stderr)}")
        self.sql("CREATE TABLE big (id bigint PRIMARY KEY, v text NOT NULL)")
        self.policy.write_text(POLICY)
        self.script.write_text(WORKLOAD)
        self.cli("--policy", str(self.policy), "apply")
        self.slot = str(
            self.one("SELECT value FROM cdc_audit.install_setting WHERE key = 'slot_name'")
        )

    def read_raw(self, marker: int, timeout: float) -> RawRead:
        """Stream ``bench_raw`` up to the end marker, counting the row events."""
        events = 0
        server = self.server_cpu()
        cpu = time.process_time()
        started = time.perf_counter()
        deadline = started + timeout
        options = StreamOptions(slot=RAW_SLOT, publication=PUBLICATION)
        with ReplicationStream(self.dsn, options) as stream:
            seen_marker = False
            while True:
                for item in stream.read(0.5, max_items=5000):
                    message = item.message
                    if isinstance(message, Insert | Update | Delete):
                        events += 1
                    elif isinstance(message, LogicalMessage):
                        if message.prefix == END_PREFIX and message.lsn >= marker:
                            seen_marker = True
                    elif isinstance(message, Commit) and seen_marker:
                        return RawRead(
                            events,
                            time.perf_counter() - started,
                            time.process_time() - cpu,
                            self.server_cpu() - server,
                        )
                if time.perf_counter() > deadline:
                    raise BenchError(f"raw read did not reach the end marker in {timeout:.0f} s")


# ------------------------------------------------------------------------------- the run


def machine_facts(bench: Bench) -> dict[str, str]:
    cpu = ""
    with open("/proc/cpuinfo") as info:
        for line in info:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem_kib = 0
    with open("/proc/meminfo") as info:
        for line in info:
            if line.startswith("MemTotal:"):
                mem_kib = int(line.split()[1])
    settings = {
        name: str(bench.one(f"SHOW {name}"))
        for name in (
            "server_version",
            "shared_buffers",
            "fsync",
            "synchronous_commit",
            "wal_level",
            "logical_decoding_work_mem",
            "max_wal_size",
        )
    }
    return {
        "code": code_version(),
        "cpu": cpu or platform.processor(),
        "nproc": str(os.cpu_count()),
        "ram": f"{mem_kib / 1024 / 1024:.1f} GiB",
        "kernel": platform.release(),
        "python": platform.python_version(),
        "psycopg": psycopg.__version__,
        "postgresql": settings.pop("server_version"),
        "settings": ", ".join(f"{k}={v}" for k, v in settings.items()),
    }


def code_version() -> str:
    """The commit measured, and whether the package's files differed from it."""
    try:
        head = subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(ROOT), "status", "--porcelain", "--", "cdc_audit", "sql"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown (not a git checkout)"
    return f"{head} with uncommitted changes in cdc_audit/ or sql/" if dirty else head


def run_rounds(bench: Bench, args: argparse.Namespace, results: Results) -> None:
    per_client = max(1, args.transactions // args.clients)
    for number in range(1, args.rounds + 1):
        # The worker's slot is drained here: the raw slot starts where it stands.
        bench.new_raw_slot()
        before = bench.event_count()
        tps = bench.run_pgbench(
            "-c", str(args.clients), "-j", str(args.jobs), "-t", str(per_client)
        )
        marker = bench.end_marker()
        raw = bench.read_raw(marker, timeout=args.timeout)
        bench.drop_raw_slot()
        say(
            f"round {number}: {per_client * args.clients} transactions at {tps:.0f} TPS;"
            f" raw read {raw.events} events in {raw.seconds:.2f} s"
            f" = {raw.events / raw.seconds:,.0f} events/s"
            f" (reader CPU {_us(raw.cpu_seconds, raw.events)}, server CPU"
            f" {_us(raw.server_cpu, raw.events)} per event)"
        )
        drain = bench.drain()
        sealed = bench.event_count() - before
        result = Round(
            events_raw=raw.events,
            raw_seconds=raw.seconds,
            events_sealed=sealed,
            sealed_seconds=drain.seconds,
            worker_rss_mb=drain.rss_mb,
            startup_seconds=results.startup_seconds,
            accumulate_tps=tps,
            reader_cpu=raw.cpu_seconds,
            server_cpu_raw=raw.server_cpu,
            worker_cpu=drain.cpu_seconds,
            server_cpu_sealed=drain.server_cpu,
            batches=drain.batches,
        )
        results.rounds.append(result)
        say(
            f"round {number}: sealed {sealed} events in {drain.seconds:.2f} s"
            f" = {result.sealed_rate:,.0f} events/s"
            f" ({result.sealed_rate_net:,.0f} net of startup);"
            f" sealed/raw {result.ratio:.2f} ({result.ratio_net:.2f} net);"
            f" worker peak RSS {drain.rss_mb:.0f} MB; worker CPU"
            f" {_us(drain.cpu_seconds, sealed)}, server CPU {_us(drain.server_cpu, sealed)}"
            f" per event; {drain.batches} batches ({sealed / max(1, drain.batches):.0f} events"
            " each)"
        )
        if sealed != raw.events:
            say(f"  note: the raw slot held {raw.events} row events, the trail got {sealed}")


def _us(seconds: float, events: int) -> str:
    return f"{seconds * 1e6 / max(1, events):.0f} µs"


def run_lag(bench: Bench, args: argparse.Namespace) -> Lag:
    server = bench.server_cpu()
    worker = bench.worker()
    try:
        deadline = time.monotonic() + 30
        while not bench.one(
            "SELECT active FROM pg_replication_slots WHERE slot_name = %s", (bench.slot,)
        ):
            if worker.poll() is not None or time.monotonic() > deadline:
                raise BenchError("the continuous worker did not start streaming")
            time.sleep(0.1)
        start = bench.one("SELECT clock_timestamp()")
        tps = bench.run_pgbench(
            "-c", str(args.clients), "-j", str(args.jobs), "-T", str(args.lag_seconds)
        )
        end = bench.one("SELECT clock_timestamp()")
        say(f"lag: pgbench ran {args.lag_seconds} s at {tps:.0f} TPS with the worker running")
        # A drain started now waits as a standby until the active worker sealed past it.
        bench.drain()
    finally:
        if worker.poll() is None:
            worker.send_signal(signal.SIGTERM)
        usage = (
            _wait_usage(worker) if worker.returncode is None else Usage(worker.returncode, 0.0, 0.0)
        )
    server_cpu = bench.server_cpu() - server
    if usage.code != 0:
        raise BenchError(f"the continuous worker exited {usage.code}")
    row = bench.sql(
        "SELECT count(*), count(*) FILTER (WHERE sealed_at <= %(end)s),"
        " percentile_cont(0.5) WITHIN GROUP (ORDER BY lag),"
        " percentile_cont(0.99) WITHIN GROUP (ORDER BY lag), max(lag),"
        " extract(epoch FROM max(sealed_at) - %(end)s)"
        " FROM (SELECT sealed_at, extract(epoch FROM sealed_at - commit_time) AS lag"
        "       FROM cdc_audit.event WHERE commit_time BETWEEN %(start)s AND %(end)s"
        "       AND kind IN ('insert', 'update', 'delete')) e",
        {"start": start, "end": end},
    )[0]
    seconds = (end - start).total_seconds()
    lag = Lag(
        seconds=seconds,
        pgbench_tps=tps,
        events=int(row[0]),
        sealed_during_run=int(row[1]),
        p50=float(row[2]),
        p99=float(row[3]),
        max=float(row[4]),
        catch_up=max(0.0, float(row[5])),
        worker_rss_mb=usage.rss_mb,
        worker_cpu=usage.cpu_seconds,
        server_cpu=server_cpu,
    )
    say(
        f"lag: {lag.events} events committed in {seconds:.1f} s ({lag.committed_rate:,.0f}/s),"
        f" {lag.sealed_during_run} sealed during the run ({lag.sustained_rate:,.0f}/s);"
        f" commit-to-sealed lag p50 {lag.p50:.3f} s, p99 {lag.p99:.3f} s, max {lag.max:.3f} s;"
        f" caught up {lag.catch_up:.1f} s after the load stopped;"
        f" worker peak RSS {usage.rss_mb:.0f} MB, worker CPU {usage.cpu_seconds:.1f} s,"
        f" cluster CPU (pgbench's backends included) {server_cpu:.1f} s"
    )
    return lag


def run_big(bench: Bench, args: argparse.Namespace) -> Big:
    bench.new_raw_slot()
    before = bench.event_count()
    started = time.perf_counter()
    with psycopg.connect(bench.dsn) as conn:
        conn.execute("SELECT cdc_audit.set_context(actor_id => 'bench-big', reason => 'bulk')")
        conn.execute(
            "INSERT INTO big SELECT g, md5(g::text) FROM generate_series(1, %s) g",
            (args.big_rows,),
        )
    insert_seconds = time.perf_counter() - started
    marker = bench.end_marker()
    raw = bench.read_raw(marker, timeout=args.timeout)
    bench.drop_raw_slot()
    say(
        f"big: one transaction of {args.big_rows} inserts took {insert_seconds:.1f} s;"
        f" raw read {raw.events} events in {raw.seconds:.2f} s"
        f" = {raw.events / raw.seconds:,.0f} events/s"
    )
    drain = bench.drain()
    sealed = bench.event_count() - before
    big = Big(
        rows=args.big_rows,
        insert_seconds=insert_seconds,
        events_raw=raw.events,
        raw_seconds=raw.seconds,
        events_sealed=sealed,
        sealed_seconds=drain.seconds,
        worker_rss_mb=drain.rss_mb,
        worker_cpu=drain.cpu_seconds,
        server_cpu_sealed=drain.server_cpu,
        batches=drain.batches,
    )
    say(
        f"big: sealed {sealed} events in {drain.seconds:.1f} s"
        f" = {sealed / drain.seconds:,.0f} events/s; worker peak RSS {drain.rss_mb:.0f} MB;"
        f" worker CPU {_us(drain.cpu_seconds, sealed)}, server CPU"
        f" {_us(drain.server_cpu, sealed)} per event; {drain.batches} batches"
    )
    return big


_COPY_COLUMNS = (
    "seq, event_id, commit_lsn, commit_time, xid, kind, schema_name, table_name, row_key, old,"
    " new, changed, actor_id, reason, context, context_missing, payload_hash, prev_hash, hash"
)
_WRITE_TARGETS = (
    ("cdc_audit.event", "the event table (partitioned; primary key, 3 btree + 1 BRIN index)"),
    ("bench_copy_pk", "a plain table with the same columns and primary key only"),
    ("bench_copy_heap", "a plain table with the same columns, no index"),
)


def run_write_cost(bench: Bench, results: Results) -> list[WriteCost]:
    """The server's share: COPY the rows the worker sealed in round 1 again, with no worker.

    Rows go to scratch streams (the cluster is thrown away afterwards), in batches of the
    size the worker wrote and of 5000, into the event table and into plain tables, each batch
    its own transaction as in the worker.
    """
    first = results.rounds[0]
    worker_batch = max(
        1,
        round(
            statistics.median(
                [r.events_sealed / r.batches for r in results.rounds if r.batches] or [5000.0]
            )
        ),
    )
    out: list[WriteCost] = []
    with psycopg.connect(bench.dsn) as conn:
        data = bytearray()
        query = sql.SQL(
            "COPY (SELECT {} FROM cdc_audit.event WHERE stream = 'user'"
            " AND kind IN ('insert', 'update', 'delete') ORDER BY seq LIMIT {}) TO STDOUT"
        ).format(sql.SQL(_COPY_COLUMNS), sql.Literal(first.events_sealed))
        with conn.cursor().copy(query) as copy:
            for chunk in copy:
                data += chunk
        lines = bytes(data).splitlines(keepends=True)
        conn.execute("CREATE TABLE bench_copy_heap (LIKE cdc_audit.event INCLUDING DEFAULTS)")
        conn.execute("CREATE TABLE bench_copy_pk (LIKE cdc_audit.event INCLUDING DEFAULTS)")
        conn.execute("ALTER TABLE bench_copy_pk ADD PRIMARY KEY (stream, seq, commit_time)")
        conn.commit()
        for target, _label in _WRITE_TARGETS:
            for batch in sorted({worker_batch, 5000}):
                prefix = f"copy_{len(out)}\t".encode()
                server = bench.server_cpu()
                started = time.perf_counter()
                for i in range(0, len(lines), batch):
                    into = sql.SQL("COPY {} (stream, {}) FROM STDIN").format(
                        sql.Identifier(*target.split(".")), sql.SQL(_COPY_COLUMNS)
                    )
                    with conn.cursor().copy(into) as copy:
                        copy.write(b"".join(prefix + line for line in lines[i : i + batch]))
                    conn.commit()
                cost = WriteCost(
                    target,
                    batch,
                    len(lines),
                    time.perf_counter() - started,
                    bench.server_cpu() - server,
                )
                out.append(cost)
                say(
                    f"write cost: COPY {len(lines)} sealed rows into {target} in batches of"
                    f" {batch}: {cost.rows / cost.seconds:,.0f} rows/s,"
                    f" server CPU {_us(cost.server_cpu, cost.rows)} per row"
                )
    return out


def run_profile(bench: Bench, args: argparse.Namespace, out: Path) -> None:
    """One more accumulation, drained under cProfile; prints the top functions."""
    per_client = max(1, args.transactions // args.clients)
    bench.run_pgbench("-c", str(args.clients), "-j", str(args.jobs), "-t", str(per_client))
    before = bench.event_count()
    drain = bench.drain(profile=out)
    sealed = bench.event_count() - before
    say(f"profile: sealed {sealed} events in {drain.seconds:.1f} s under cProfile -> {out}")
    stats = pstats.Stats(str(out))
    stats.sort_stats("tottime").print_stats(25)
    stats.sort_stats("cumulative").print_stats(40)


# ------------------------------------------------------------------------------- report


def _stats(values: Sequence[float]) -> tuple[float, float, float]:
    return statistics.median(values), min(values), max(values)


def summary(results: Results) -> list[str]:
    lines = ["| figure | median | min | max |", "|---|---:|---:|---:|"]

    def row(name: str, values: Sequence[float], fmt: str) -> None:
        med, lo, hi = _stats(values)
        lines.append(f"| {name} | {med:{fmt}} | {lo:{fmt}} | {hi:{fmt}} |")

    rounds = results.rounds
    if rounds:
        n = len(rounds)
        row(f"raw receive+decode, events/s ({n} rounds)", [r.raw_rate for r in rounds], ",.0f")
        row(
            "sealed by `worker --drain`, events/s (wall clock)",
            [r.sealed_rate for r in rounds],
            ",.0f",
        )
        row(
            f"sealed, events/s net of {results.startup_seconds:.2f} s startup",
            [r.sealed_rate_net for r in rounds],
            ",.0f",
        )
        row("ratio sealed/raw (wall clock)", [r.ratio for r in rounds], ".2f")
        row("ratio sealed/raw (net of startup)", [r.ratio_net for r in rounds], ".2f")
        row("worker peak RSS, MB", [r.worker_rss_mb for r in rounds], ".0f")
        row(
            "raw: reader CPU per event, µs",
            [r.reader_cpu * 1e6 / r.events_raw for r in rounds],
            ".1f",
        )
        row(
            "raw: server CPU per event, µs",
            [r.server_cpu_raw * 1e6 / r.events_raw for r in rounds],
            ".1f",
        )
        row(
            f"sealed: worker CPU per event, µs (net of {results.startup_cpu:.2f} s startup CPU)",
            [(r.worker_cpu - results.startup_cpu) * 1e6 / r.events_sealed for r in rounds],
            ".1f",
        )
        row(
            "sealed: server CPU per event, µs",
            [r.server_cpu_sealed * 1e6 / r.events_sealed for r in rounds],
            ".1f",
        )
        row("events per round", [float(r.events_sealed) for r in rounds], ",.0f")
        row(
            "events per batch written by the worker",
            [r.events_sealed / max(1, r.batches) for r in rounds],
            ",.0f",
        )
        row(
            "pgbench TPS while accumulating (worker stopped)",
            [r.accumulate_tps for r in rounds],
            ",.0f",
        )
    lag = results.lag
    if lag is not None:
        lines += [
            "",
            "| concurrent run (worker streaming while pgbench runs) | value |",
            "|---|---:|",
            f"| pgbench TPS | {lag.pgbench_tps:,.0f} |",
            f"| events committed, per s | {lag.committed_rate:,.0f} |",
            f"| events sealed during the run, per s | {lag.sustained_rate:,.0f} |",
            f"| commit-to-sealed lag p50, s | {lag.p50:.3f} |",
            f"| commit-to-sealed lag p99, s | {lag.p99:.3f} |",
            f"| commit-to-sealed lag max, s | {lag.max:.3f} |",
            f"| caught up after the load stopped, s | {lag.catch_up:.1f} |",
            f"| worker peak RSS, MB | {lag.worker_rss_mb:.0f} |",
            f"| worker CPU during the load and the catch-up, s | {lag.worker_cpu:.1f} |",
        ]
    big = results.big
    if big is not None:
        lines += [
            "",
            f"| one transaction of {big.rows:,} inserts | value |",
            "|---|---:|",
            f"| raw receive+decode, events/s | {big.events_raw / big.raw_seconds:,.0f} |",
            f"| sealed, events/s (wall clock) | {big.events_sealed / big.sealed_seconds:,.0f} |",
            f"| worker peak RSS, MB | {big.worker_rss_mb:.0f} |",
            f"| sealed: worker CPU per event, µs |"
            f" {big.worker_cpu * 1e6 / big.events_sealed:.1f} |",
            f"| events per batch written by the worker |"
            f" {big.events_sealed / max(1, big.batches):,.0f} |",
            f"| sealed: server CPU per event, µs |"
            f" {big.server_cpu_sealed * 1e6 / big.events_sealed:.1f} |",
        ]
    if results.write_cost:
        lines += [
            "",
            "| COPY of the sealed rows with no worker (server's share) | batch | rows/s |"
            " server CPU µs/row |",
            "|---|---:|---:|---:|",
        ]
        labels = dict(_WRITE_TARGETS)
        for cost in results.write_cost:
            lines.append(
                f"| {labels[cost.target]} | {cost.batch:,} | {cost.rows / cost.seconds:,.0f} |"
                f" {cost.server_cpu * 1e6 / cost.rows:.1f} |"
            )
    return lines


def verdicts(results: Results) -> list[str]:
    out = []
    if results.rounds:
        ratio = statistics.median(r.ratio for r in results.rounds)
        rate = statistics.median(r.sealed_rate for r in results.rounds)
        out.append(
            _verdict(
                f"sealed/raw >= {TARGET_RATIO:.0%}",
                ratio >= TARGET_RATIO,
                f"{ratio:.2f} (median, wall clock)",
            )
        )
        out.append(
            _verdict(
                f"sealed >= {TARGET_RATE:,.0f} events/s",
                rate >= TARGET_RATE,
                f"{rate:,.0f} (median, wall clock)",
            )
        )
    if results.big is not None:
        rss = results.big.worker_rss_mb
        out.append(
            _verdict(
                f"RSS < {TARGET_RSS_MB:.0f} MB for {results.big.rows:,} rows",
                rss < TARGET_RSS_MB,
                f"{rss:.0f} MB peak",
            )
        )
    return out


def _verdict(target: str, ok: bool, measured: str) -> str:
    return f"{'PASS' if ok else 'MISS'}  {target}: {measured}"


# ------------------------------------------------------------------------------- main


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.worker_throughput",
        description="Benchmark the cdc-audit worker on a private, throwaway PostgreSQL.",
    )
    parser.add_argument("--quick", action="store_true", help="small workloads: a smoke run")
    parser.add_argument("--scale", type=int, help="pgbench scale (default 5; quick 1)")
    parser.add_argument(
        "--transactions",
        type=int,
        help="TPC-B transactions per round, 4 row events each (default 40000; quick 2000)",
    )
    parser.add_argument("--rounds", type=int, help="interleaved raw/sealed rounds (default 3)")
    parser.add_argument("--clients", type=int, default=4, help="pgbench -c (default 4)")
    parser.add_argument("--jobs", type=int, default=2, help="pgbench -j (default 2)")
    parser.add_argument(
        "--lag-seconds", type=int, help="concurrent run length, 0 skips it (default 20; quick 5)"
    )
    parser.add_argument(
        "--big-rows",
        type=int,
        help="rows of the single big transaction, 0 skips it (default 1000000; quick 20000)",
    )
    parser.add_argument(
        "--timeout", type=float, default=900.0, help="give up reading a slot after this (s)"
    )
    parser.add_argument(
        "--write-cost",
        action=argparse.BooleanOptionalAction,
        help="COPY the sealed rows again without the worker: the server's share (default on;"
        " quick off)",
    )
    parser.add_argument("--json", type=Path, metavar="FILE", help="also write the results here")
    parser.add_argument(
        "--profile",
        type=Path,
        metavar="FILE",
        help="after the rounds, drain one more round under cProfile into FILE and print the top",
    )
    args = parser.parse_args(argv)
    quick = args.quick
    defaults = {
        "scale": 1 if quick else 5,
        "transactions": 2000 if quick else 40_000,
        "rounds": 2 if quick else 3,
        "lag_seconds": 5 if quick else 20,
        "big_rows": 20_000 if quick else 1_000_000,
        "write_cost": not quick,
    }
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    for name in ("scale", "transactions", "rounds", "clients", "jobs"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    return args


def find_pgbench() -> str:
    try:
        candidate = find_pg_bin() / "pgbench"
    except CdcAuditError:
        candidate = None
    if candidate is not None and os.access(candidate, os.X_OK):
        return str(candidate)
    on_path = shutil.which("pgbench")
    if on_path is None:
        raise BenchError(
            "pgbench not found (next to pg_ctl or on PATH): install it with PostgreSQL's"
            " client tools (e.g. apt-get install postgresql-contrib)"
        )
    return on_path


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        pgbench = find_pgbench()
        return run(args, pgbench)
    except (BenchError, CdcAuditError) as exc:
        print(f"worker_throughput: {exc}", file=sys.stderr)
        return 1
    except psycopg.Error as exc:
        print(f"worker_throughput: database error: {_last_line(str(exc))}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("worker_throughput: interrupted", file=sys.stderr)
        return 130


def run(args: argparse.Namespace, pgbench: str) -> int:
    results = Results()
    cluster = EphemeralCluster()
    with tempfile.TemporaryDirectory(prefix="cdc-audit-bench-") as tmp:
        try:
            cluster.start()
            say(f"PostgreSQL on port {cluster.port} in {cluster.base_dir} (pid {cluster.pid})")
            bench = Bench(cluster, Path(tmp), pgbench, args.scale)
            bench.setup()
            results.machine = machine_facts(bench)
            for key, value in results.machine.items():
                say(f"  {key}: {value}")
            say(
                f"setup: pgbench scale {args.scale}, policy applied, slot {bench.slot};"
                f" {args.rounds} rounds of {args.transactions} transactions,"
                f" -c {args.clients} -j {args.jobs}"
            )
            empty = bench.drain()
            results.startup_seconds, results.startup_rss_mb = empty.seconds, empty.rss_mb
            results.startup_cpu = empty.cpu_seconds
            say(
                f"startup: worker --drain with nothing to seal took {empty.seconds:.2f} s"
                f" (peak RSS {empty.rss_mb:.0f} MB)"
            )
            run_rounds(bench, args, results)
            if args.lag_seconds > 0:
                results.lag = run_lag(bench, args)
            if args.big_rows > 0:
                results.big = run_big(bench, args)
            if args.write_cost:
                results.write_cost = run_write_cost(bench, results)
            if args.profile is not None:
                run_profile(bench, args, args.profile.resolve())
        finally:
            cluster.stop()
    say("")
    for line in summary(results):
        say(line)
    say("")
    for line in verdicts(results):
        say(line)
    if args.json is not None:
        args.json.write_text(json.dumps(_as_json(results), indent=2) + "\n")
    return 0


def _as_json(results: Results) -> dict[str, Any]:
    data = asdict(results)
    for item, raw in zip(data["rounds"], results.rounds, strict=True):
        item.update(
            raw_rate=raw.raw_rate,
            sealed_rate=raw.sealed_rate,
            sealed_rate_net=raw.sealed_rate_net,
            ratio=raw.ratio,
            ratio_net=raw.ratio_net,
        )
    return data


if __name__ == "__main__":
    sys.exit(main())
