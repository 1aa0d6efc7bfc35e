"""`make bench-snapshot`: how fast a hashed table snapshot digests rows, against merely
reading them.

Everything runs against a private, throwaway PostgreSQL (`EphemeralCluster`), with the
helpers and style of `bench.worker_throughput`:

1. setup: a table ``ledger`` of ``--rows`` rows (default 1,000,000: bigint primary key,
   text, numeric, timestamptz, jsonb), loaded with generate_series and analysed, then
   audited in stream ``user`` (``cdc-audit apply``) with a registered signing key;
2. rounds, interleaved A B A B (``--rounds``, default 3), in this process:
   - A, baseline: the same rows read as text through the same kind of server-side cursor
     (REPEATABLE READ, the decoding session's settings, primary-key order, 5,000 rows a
     fetch), no conversion and no hashing;
   - B, snapshot: `cdc_audit.snapshot.snapshot_tables` for the table: the consistency point,
     the same read, each row shaped as the worker shapes an event's ``new`` (type
     conversion, column policy), its canonical JSON, SHAKE256 and the modular sum, the
     signed statement stored;
3. the medians (with min and max) of rows/s and of this process's CPU per row, and the ratio
   of the snapshot's rate to the baseline's.

Run ``python -m bench.snapshot_digest --help``; ``--quick`` is a smoke run (100,000 rows).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import psycopg
from psycopg import sql
from psycopg.types.string import TextLoader

from bench.worker_throughput import (
    DATABASE,
    Bench,
    BenchError,
    _last_line,
    code_version,
    machine_facts,
    say,
)
from cdc_audit.ephemeral import EphemeralCluster
from cdc_audit.errors import CdcAuditError
from cdc_audit.job_context import utc_now
from cdc_audit.keys import load_signing_key
from cdc_audit.policy import load_policy
from cdc_audit.replication import SESSION_SETTINGS
from cdc_audit.snapshot import snapshot_tables

FETCH_ROWS = 5_000
COLUMNS = ("id", "account", "amount", "memo", "booked_at", "doc")

POLICY = """\
version: 1
schema: cdc_audit
context:
  require: [actor_id]
  on_missing: record
streams:
  user: {retention: 400d}
tables:
  - {table: public.ledger, stream: user}
"""

LEDGER = """
CREATE TABLE ledger (
    id          bigint PRIMARY KEY,
    account     int NOT NULL,
    amount      numeric(14, 2) NOT NULL,
    memo        text,
    booked_at   timestamptz NOT NULL,
    doc         jsonb
)
"""
LOAD = """
INSERT INTO ledger
SELECT g, g %% 9973, round((g %% 100000) / 7.0, 2), 'payment ' || md5(g::text),
       timestamptz '2025-01-01 00:00:00+00' + g * interval '1 second',
       jsonb_build_object('ref', g, 'channel', 'web', 'fee', round((g %% 1000) / 3.0, 2),
                          'tags', jsonb_build_array('a', 'b'))
FROM generate_series(1, %s::bigint) g
"""


@dataclass
class Timed:
    rows: int
    seconds: float
    cpu_seconds: float

    @property
    def rate(self) -> float:
        return self.rows / max(self.seconds, 1e-9)

    @property
    def cpu_us(self) -> float:
        return self.cpu_seconds * 1e6 / max(self.rows, 1)


@dataclass
class Results:
    machine: dict[str, str] = field(default_factory=dict)
    rows: int = 0
    table_mb: float = 0.0
    load_seconds: float = 0.0
    baseline: list[Timed] = field(default_factory=list)
    snapshot: list[Timed] = field(default_factory=list)


def timed(work: Callable[[], int]) -> Timed:
    cpu = time.process_time()
    started = time.perf_counter()
    rows = work()
    return Timed(rows, time.perf_counter() - started, time.process_time() - cpu)


def read_only(dsn: str) -> int:
    """The baseline: every row as text, as the snapshot reads them, and nothing else."""
    with psycopg.connect(dsn) as conn:
        for name, value in SESSION_SETTINGS:
            conn.execute(sql.SQL("SET {} = {}").format(sql.Identifier(name), sql.Literal(value)))
        conn.commit()
        conn.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
        conn.read_only = True
        conn.execute("SELECT pg_current_snapshot()")
        count = 0
        with conn.cursor(name="bench_read") as cursor:
            cursor.execute(
                sql.SQL("SELECT {} FROM ledger ORDER BY id").format(
                    sql.SQL(", ").join(map(sql.Identifier, COLUMNS))
                )
            )
            for column in cursor.description or ():
                cursor.adapters.register_loader(column.type_code, TextLoader)
            while rows := cursor.fetchmany(FETCH_ROWS):
                count += len(rows)
        conn.commit()
    return count


class SnapshotBench(Bench):
    def __init__(self, cluster: EphemeralCluster, work: Path) -> None:
        super().__init__(cluster, work, pgbench="", scale=0)
        self.private_key = work / "keys" / "signing_key.pem"

    def load(self, rows: int) -> float:
        with psycopg.connect(self.cluster.dsn(), autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {DATABASE}")
        self.sql(LEDGER)
        started = time.perf_counter()
        self.sql(LOAD, (rows,))
        self.sql("VACUUM (ANALYZE) ledger")
        seconds = time.perf_counter() - started
        self.policy.write_text(POLICY)
        self.cli("--policy", str(self.policy), "apply")
        self.cli("keygen", "--out", str(self.work / "keys"))
        self.cli("keys", "add", str(self.work / "keys" / "signing_key.pub.pem"))
        return seconds

    def snapshot(self) -> int:
        made = list(
            snapshot_tables(
                self.dsn,
                load_policy(self.policy).policy,
                load_signing_key(self.private_key),
                now=utc_now,
            )
        )
        if len(made) != 1:
            raise BenchError(f"expected one snapshot, got {len(made)}")
        return made[0].row_count


def _spread(values: Sequence[float], fmt: str) -> str:
    return (
        f"{format(statistics.median(values), fmt)}"
        f" (min {format(min(values), fmt)}, max {format(max(values), fmt)})"
    )


def summary(results: Results) -> list[str]:
    base, snap = results.baseline, results.snapshot
    base_rate = statistics.median(t.rate for t in base)
    snap_rate = statistics.median(t.rate for t in snap)
    ratios = [s.rate / b.rate for b, s in zip(base, snap, strict=True)]
    extra = [s.cpu_us - b.cpu_us for b, s in zip(base, snap, strict=True)]
    return [
        f"| {results.rows:,} rows ({results.table_mb:.0f} MB), {len(base)} rounds | rows/s,"
        " median (min, max) | this process's CPU µs/row, median (min, max) |",
        "|---|---:|---:|",
        f"| A: read as text (server-side cursor) | {_spread([t.rate for t in base], ',.0f')} |"
        f" {_spread([t.cpu_us for t in base], '.2f')} |",
        f"| B: snapshot digest (`snapshot_tables`) | {_spread([t.rate for t in snap], ',.0f')}"
        f" | {_spread([t.cpu_us for t in snap], '.2f')} |",
        "",
        f"B/A, the snapshot's rate relative to the read alone: {snap_rate / base_rate:.2f}"
        f" (per round: {', '.join(f'{r:.2f}' for r in ratios)}); shaping and hashing add"
        f" {statistics.median(extra):.1f} µs of CPU a row; the whole snapshot of"
        f" {results.rows:,} rows takes {statistics.median(t.seconds for t in snap):.1f} s.",
    ]


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.snapshot_digest",
        description="Benchmark the snapshot digest against reading the same rows.",
    )
    parser.add_argument("--rows", type=int, help="table size (default 1000000; quick 100000)")
    parser.add_argument("--rounds", type=int, default=3, help="A B rounds (default 3)")
    parser.add_argument("--quick", action="store_true", help="a smoke run: 100,000 rows")
    parser.add_argument("--json", type=Path, metavar="FILE", help="also write the results here")
    args = parser.parse_args(argv)
    if args.rows is None:
        args.rows = 100_000 if args.quick else 1_000_000
    if args.rows < 1 or args.rounds < 1:
        parser.error("--rows and --rounds must be at least 1")
    return args


def run(args: argparse.Namespace) -> int:
    results = Results(rows=args.rows)
    cluster = EphemeralCluster()
    with tempfile.TemporaryDirectory(prefix="cdc-audit-bench-snapshot-") as tmp:
        try:
            cluster.start()
            say(f"PostgreSQL on port {cluster.port} in {cluster.base_dir} (pid {cluster.pid})")
            bench = SnapshotBench(cluster, Path(tmp))
            results.load_seconds = bench.load(args.rows)
            results.table_mb = int(bench.one("SELECT pg_table_size('ledger')")) / 1e6
            results.machine = machine_facts(bench)
            for key, value in results.machine.items():
                say(f"  {key}: {value}")
            say(
                f"setup: ledger, {args.rows:,} rows, {results.table_mb:.0f} MB, loaded in"
                f" {results.load_seconds:.1f} s"
            )
            for round_no in range(1, args.rounds + 1):
                base = timed(lambda: read_only(bench.dsn))
                snap = timed(bench.snapshot)
                for label, measured in (("A read", base), ("B snapshot", snap)):
                    if measured.rows != args.rows:
                        raise BenchError(f"{label} saw {measured.rows} rows of {args.rows}")
                results.baseline.append(base)
                results.snapshot.append(snap)
                say(
                    f"round {round_no}: A read {base.seconds:.2f} s = {base.rate:,.0f} rows/s"
                    f" ({base.cpu_us:.2f} µs CPU a row); B snapshot {snap.seconds:.2f} s ="
                    f" {snap.rate:,.0f} rows/s ({snap.cpu_us:.2f} µs CPU a row);"
                    f" B/A {snap.rate / base.rate:.2f}"
                )
            now = code_version()
            if now != results.machine["code"]:
                say(f"WARNING: the code changed during the run: {results.machine['code']} -> {now}")
        finally:
            cluster.stop()
    say("")
    for line in summary(results):
        say(line)
    if args.json is not None:
        args.json.write_text(json.dumps(asdict(results), indent=2) + "\n")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        return run(args)
    except (BenchError, CdcAuditError) as exc:
        print(f"snapshot_digest: {exc}", file=sys.stderr)
        return 1
    except psycopg.Error as exc:
        print(f"snapshot_digest: database error: {_last_line(str(exc))}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("snapshot_digest: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
