"""How fast a sealed trail verifies, online and offline, and where the time goes.

Everything runs against a private, throwaway PostgreSQL (`EphemeralCluster`), with the
helpers and style of `bench.worker_throughput`:

1. setup: a table ``ledger`` audited in stream ``user``, checkpoints every 10,000 events into
   a directory anchor, a signing key (``cdc-audit keygen``, ``keys add``);
2. a scale curve of cumulative trail sizes (10k, 100k, ``--events`` (default 200k), and 1M
   with ``--full``). To reach each size, INSERT ... SELECT generate_series and an UPDATE of
   the same rows (half the events are updates with old and new values) in transactions of at
   most 50,000 rows, each with the context set, then ``cdc-audit worker --drain`` seals them
   (events/s sealed). At each size:
   - ``cdc-audit verify`` online (the anchor comes from the applied policy): events/s;
   - ``cdc-audit export`` to a file, then ``cdc-audit verify --file`` offline: events/s;
3. at the ``--events`` size, in a fresh child process (so that this one stays small and the
   peak RSS of the commands, from wait4, stays theirs), what the commands are made of:
   - online: reading the stream only (`read_stream_rows`, the server renders each event as
     one JSON array), reading and parsing it (orjson), `verify_stream` without and with the
     anchor;
   - offline: parsing the export only (each line parsed and proven canonical), `verify_export`
     whole;
   - pure verification: `StreamVerifier.record` fed event lines already parsed (from the
     export), and the cost of each of its steps per event (payload and header objects, their
     encoding, the SHA-256s, the Merkle leaf);
4. ``--profile FILE``: `verify_export` of that export under cProfile, top functions with %.

Figures "net" leave out the CPU a command spends before its first event: that of
``cdc-audit verify --help`` (interpreter start and imports, median of 3), or of a
``worker --drain`` with nothing to seal.

The issue's target: verify at least 100,000 events/s on one core.
Run ``python -m bench.verify_throughput --help``; ``--quick`` is a smoke run.
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import hashlib
import json
import multiprocessing
import pstats
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import orjson
import psycopg

from bench.worker_throughput import (
    DATABASE,
    ROOT,
    Bench,
    BenchError,
    _last_line,
    _us,
    _verdict,
    _wait_usage,
    code_version,
    machine_facts,
    say,
)
from cdc_audit.canonical import canonical_bytes_trusted
from cdc_audit.chain import HEADER_FIELDS, PAYLOAD_FIELDS
from cdc_audit.checkpoints import Checkpoint, DirectoryAnchor
from cdc_audit.ephemeral import EphemeralCluster
from cdc_audit.errors import CdcAuditError
from cdc_audit.export import (
    check_event_line,  # verify_export's feed
    verify_export,
)
from cdc_audit.export import parse_lines as parse_export  # verify_export's parser
from cdc_audit.keys import PublicKey, load_public_key
from cdc_audit.merkle import MerkleBuilder
from cdc_audit.purge_record import PurgeStart
from cdc_audit.verify import StreamVerifier, read_stream_rows, verify_stream

TARGET_RATE = 100_000.0
SCHEMA = "cdc_audit"
STREAM = "user"
TXN_ROWS = 50_000
CHECKPOINT_EVERY = 10_000
REPEATS = 3
"""Repeats of the cheap in-process measurements (the median is kept): the machine is shared."""
PURE = "pure: StreamVerifier over parsed event lines and checkpoints"

POLICY = """\
version: 1
schema: cdc_audit
context:
  require: [actor_id]
  on_missing: record
streams:
  user: {{retention: 400d}}
tables:
  - {{table: public.ledger, stream: user}}
checkpoints: {{every_events: {every}, every_seconds: 3600, anchor_dir: {anchor}}}
"""

LEDGER = """
CREATE TABLE ledger (
    id          bigint PRIMARY KEY,
    account     int NOT NULL,
    amount      numeric(14, 2) NOT NULL,
    currency    text NOT NULL,
    memo        text,
    booked_at   timestamptz NOT NULL
)
"""
INSERT = """
INSERT INTO ledger
SELECT g, g %% 9973, round((g %% 100000) / 7.0, 2), 'EUR', 'payment ' || md5(g::text),
       timestamptz '2025-01-01 00:00:00+00' + g * interval '1 second'
FROM generate_series(%s::bigint, %s::bigint) g
"""
UPDATE = """
UPDATE ledger SET amount = amount + 1, memo = memo || ' (corrected)'
WHERE id BETWEEN %s AND %s
"""


# ------------------------------------------------------------------------------- results


@dataclass
class Timed:
    """A command or an in-process step: wall clock and CPU."""

    events: int
    seconds: float
    cpu_seconds: float
    rss_mb: float = 0.0
    server_cpu: float = 0.0
    """CPU of the cluster's processes meanwhile (online steps)."""

    @property
    def rate(self) -> float:
        return self.events / max(self.seconds, 1e-9)

    @property
    def cpu_rate(self) -> float:
        """Events per second of this process's CPU: the rate on one core."""
        return self.events / max(self.cpu_seconds, 1e-9)


@dataclass
class Point:
    """One size of the scale curve."""

    events: int
    sealed_events: int
    seal: Timed
    verify_online: Timed
    export: Timed
    export_bytes: int
    verify_offline: Timed
    checkpoints: int
    verify_offline_one: Timed | None = None
    """`verify --file --jobs 1`: one pass, the baseline of the parallel verification."""


@dataclass
class Results:
    machine: dict[str, str] = field(default_factory=dict)
    startup: Timed | None = None
    """`cdc-audit verify --help`: interpreter start and imports, no work (median of 3)."""
    seal_startup: Timed | None = None
    """`cdc-audit worker --drain` with nothing to seal."""
    curve: list[Point] = field(default_factory=list)
    inproc: dict[str, Timed] = field(default_factory=dict)
    steps_us: dict[str, float] = field(default_factory=dict)
    """Per-event microseconds of each step of the pure verification."""
    profile_top: list[tuple[str, float, float]] = field(default_factory=list)
    """(function, tottime s, % of the total) of the offline verification under cProfile."""


# ------------------------------------------------------------------------------- helpers


class VerifyBench(Bench):
    """`Bench` without pgbench: the ledger table, a signing key, timed commands."""

    def __init__(self, cluster: EphemeralCluster, work: Path) -> None:
        super().__init__(cluster, work, pgbench="", scale=0)
        self.anchor_dir = work / "anchors"
        self.public_key = work / "keys" / "signing_key.pub.pem"
        self.next_id = 1
        self._commands = 0

    def setup(self) -> None:
        with psycopg.connect(self.cluster.dsn(), autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {DATABASE}")
        self.sql(LEDGER)
        self.policy.write_text(POLICY.format(every=CHECKPOINT_EVERY, anchor=self.anchor_dir))
        self.cli("--policy", str(self.policy), "apply")
        made = self.cli("keygen", "--out", str(self.work / "keys"))
        private = Path(made.stdout.splitlines()[1].split(": ", 1)[1])
        self.cli("keys", "add", str(self.public_key))
        self.env["CDC_AUDIT_SIGNING_KEY_FILE"] = str(private)

    def generate(self, events: int) -> float:
        """Commit `events` row events (half inserts, half updates of them); returns seconds."""
        started = time.perf_counter()
        rows = max(1, events // 2)
        with psycopg.connect(self.dsn) as conn:
            done = 0
            while done < rows:
                first = self.next_id
                last = first + min(TXN_ROWS, rows - done) - 1
                for statement in (INSERT, UPDATE):
                    conn.execute(
                        "SELECT cdc_audit.set_context(actor_id => %s, reason => %s,"
                        " trace_id => %s)",
                        ("bench-verify", "ledger load", f"batch-{first}"),
                    )
                    conn.execute(statement, (first, last))
                    conn.commit()
                done += last - first + 1
                self.next_id = last + 1
        return time.perf_counter() - started

    def timed_cli(self, *args: str) -> tuple[Timed, str]:
        """Run `cdc-audit ARGS` as a child process: wall clock, its CPU and peak RSS, the
        cluster's CPU meanwhile; and its stdout."""
        self._commands += 1
        out = self.work / f"command-{self._commands}.out"
        err = self.work / f"command-{self._commands}.err"
        cmd = [sys.executable, "-m", "cdc_audit.cli", *args]
        server = self.server_cpu()
        started = time.perf_counter()
        with out.open("wb") as stdout, err.open("wb") as stderr:
            proc = subprocess.Popen(cmd, env=self.env, cwd=ROOT, stdout=stdout, stderr=stderr)
            usage = _wait_usage(proc)
        seconds = time.perf_counter() - started
        if usage.code != 0:
            raise BenchError(
                f"cdc-audit {' '.join(args)} exited {usage.code}:"
                f" {_last_line(err.read_text(errors='replace'))}"
            )
        timed = Timed(0, seconds, usage.cpu_seconds, usage.rss_mb, self.server_cpu() - server)
        return timed, out.read_text(errors="replace")

    def checkpoint_count(self) -> int:
        return int(self.one("SELECT count(*) FROM cdc_audit.checkpoint"))


def _verified_count(stdout: str) -> int:
    """Events verified, from the verdict line ("stream user: ok: N events verified, ...")."""
    for line in stdout.splitlines():
        if line.startswith(f"stream {STREAM}: ok: "):
            return int(line.split(": ok: ", 1)[1].split()[0])
    raise BenchError(f"verify did not say ok: {_last_line(stdout)}")


def timed(events: int, work: Callable[[], object]) -> Timed:
    cpu = time.process_time()
    started = time.perf_counter()
    work()
    return Timed(events, time.perf_counter() - started, time.process_time() - cpu)


def _consume(items: Iterable[object]) -> int:
    count = 0
    for _ in items:
        count += 1
    return count


# ------------------------------------------------------------------------------- steps


def run_point(bench: VerifyBench, size: int, results: Results) -> Point:
    """Grow the trail to `size` events, seal, verify online, export, verify offline."""
    before = bench.event_count()
    add = size - before
    if add > 0:
        seconds = bench.generate(add)
        say(f"{size:,}: committed {add:,} events in {seconds:.1f} s")
    drain = bench.drain()
    sealed = bench.event_count() - before
    seal = Timed(sealed, drain.seconds, drain.cpu_seconds, drain.rss_mb, drain.server_cpu)
    total = bench.event_count()
    say(
        f"{size:,}: sealed {sealed:,} events in {drain.seconds:.1f} s = {seal.rate:,.0f}/s"
        f" (worker CPU {_us(drain.cpu_seconds, sealed)}, server CPU"
        f" {_us(drain.server_cpu, sealed)} per event; peak RSS {drain.rss_mb:.0f} MB)"
    )

    online, stdout = bench.timed_cli("verify")
    online.events = _verified_count(stdout)
    if online.events != total:
        raise BenchError(f"verify checked {online.events} events, the trail holds {total}")
    say(
        f"{size:,}: verify (online, with the anchor): {online.seconds:.2f} s ="
        f" {online.rate:,.0f} events/s; its CPU {_us(online.cpu_seconds, total)}, server CPU"
        f" {_us(online.server_cpu, total)} per event; peak RSS {online.rss_mb:.0f} MB"
    )

    export = bench.work / f"export-{total}.jsonl"
    exported, _ = bench.timed_cli("export", "--stream", STREAM, "--output", str(export))
    exported.events = total
    size_bytes = export.stat().st_size
    say(
        f"{size:,}: export: {exported.seconds:.2f} s = {exported.rate:,.0f} events/s,"
        f" {size_bytes / 1e6:.0f} MB ({size_bytes / total:.0f} bytes an event)"
    )

    offline_args = ("verify", "--file", str(export), "--public-key", str(bench.public_key))
    one_pass, stdout = bench.timed_cli(*offline_args, "--jobs", "1")
    one_pass.events = _verified_count(stdout)
    offline, stdout = bench.timed_cli(*offline_args)  # every core, as users run it
    offline.events = _verified_count(stdout)
    if offline.events != total or one_pass.events != total:
        raise BenchError(
            f"verify --file checked {offline.events} (one pass: {one_pass.events}) events"
            f" of {total}"
        )
    for name, timed in (("one pass, --jobs 1", one_pass), ("every core", offline)):
        say(
            f"{size:,}: verify --file (offline, {name}): {timed.seconds:.2f} s ="
            f" {timed.rate:,.0f} events/s; CPU {_us(timed.cpu_seconds, total)} per event;"
            f" peak RSS {timed.rss_mb:.0f} MB"
        )
    say(f"{size:,}: offline, every core / one pass: {offline.rate / one_pass.rate:.2f}")
    point = Point(
        events=total,
        sealed_events=sealed,
        seal=seal,
        verify_online=online,
        export=exported,
        export_bytes=size_bytes,
        verify_offline=offline,
        checkpoints=bench.checkpoint_count(),
        verify_offline_one=one_pass,
    )
    results.curve.append(point)
    return point


@dataclass
class InProcess:
    """What `measure_inprocess` found (sent back from its child process)."""

    inproc: dict[str, Timed] = field(default_factory=dict)
    steps_us: dict[str, float] = field(default_factory=dict)
    profile_top: list[tuple[str, float, float]] = field(default_factory=list)


def run_inprocess(bench: VerifyBench, export: Path, profile: Path | None, results: Results) -> None:
    """`measure_inprocess` in a fresh child process.

    Not in this one: a process that held the parsed events stays big, and a child started
    from it afterwards (every timed command) would inherit its peak RSS in wait4's figure.
    """
    spawn = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=1, mp_context=spawn) as pool:
        found = pool.submit(
            measure_inprocess,
            bench.dsn,
            bench.event_count(),
            export,
            bench.public_key,
            bench.anchor_dir,
            profile,
        ).result()
    results.inproc.update(found.inproc)
    results.steps_us.update(found.steps_us)
    results.profile_top.extend(found.profile_top)


def measure_inprocess(
    dsn: str,
    total: int,
    export: Path,
    public_key: Path,
    anchor_dir: Path,
    profile: Path | None,
) -> InProcess:
    """The commands' parts without their process: DB read, file parse, pure verification."""
    found = InProcess()
    keys = {key.key_id: key for key in [load_public_key(public_key)]}
    anchor = DirectoryAnchor(anchor_dir, DATABASE, SCHEMA)
    with psycopg.connect(dsn) as conn:
        steps: dict[str, Callable[[], object]] = {
            "online: read only (read_stream_rows)": lambda: _consume(
                read_stream_rows(conn, SCHEMA, STREAM)
            ),
            "online: read + parse only (read_stream_rows, orjson.loads)": lambda: _consume(
                orjson.loads(row) for row in read_stream_rows(conn, SCHEMA, STREAM)
            ),
            "online: verify_stream, no anchor": lambda: _check(
                verify_stream(conn, SCHEMA, STREAM, keys, None)
            ),
            "online: verify_stream, with the anchor": lambda: _check(
                verify_stream(conn, SCHEMA, STREAM, keys, anchor)
            ),
        }
        for name, work in steps.items():
            found.inproc[name] = timed(total, work)
            conn.rollback()
    offline_steps: dict[str, Callable[[], object]] = {
        "offline: parse only (lines parsed, proven canonical)": lambda: _consume(_items(export)),
        "offline: verify_export": lambda: _check(verify_export(export, keys)),
    }
    for name, step in offline_steps.items():
        found.inproc[name] = timed(total, step)

    items = list(_items(export))
    events = [item for item in items if not isinstance(item, Checkpoint)]
    # The parsed events are this benchmark's, not the verifier's: keep the cyclic garbage
    # collector from walking them again and again (a streaming verifier holds none of them).
    gc.collect()
    gc.freeze()
    try:
        runs = [timed(len(events), lambda: _verify_items(items, keys)) for _ in range(REPEATS)]
        found.inproc[PURE] = sorted(runs, key=lambda r: r.cpu_seconds)[REPEATS // 2]
        samples = [step_costs(events) for _ in range(REPEATS)]
        found.steps_us = {name: statistics.median(s[name] for s in samples) for name in samples[0]}
    finally:
        gc.unfreeze()
    for name, value in found.inproc.items():
        say(
            f"in-process: {name}: {value.seconds:.2f} s = {value.rate:,.0f} events/s"
            f" ({_us(value.cpu_seconds, value.events)} CPU per event)"
        )
    for name, us in found.steps_us.items():
        say(f"pure verification step: {name}: {us:.2f} µs per event")
    if profile is not None:
        found.profile_top = run_profile(export, keys, profile)
    return found


def _items(export: Path) -> Iterator[dict[str, Any] | Checkpoint]:
    """The export's lines parsed exactly as `verify_export` parses them (its own parser)."""
    with export.open("rb") as lines:
        for item in parse_export(lines):
            if isinstance(item, PurgeStart):
                raise BenchError("the benchmark's export starts after a purge")
            yield item


def _check(verdict: Any) -> None:
    if not verdict.ok:
        raise BenchError(f"verification failed: {verdict.describe()}")


def _verify_items(items: Sequence[dict[str, Any] | Checkpoint], keys: dict[str, PublicKey]) -> None:
    verifier = StreamVerifier(STREAM, keys)
    for item in items:
        if isinstance(item, Checkpoint):
            verifier.checkpoint(item)
        else:
            check_event_line(verifier, item)
    if verifier.checked != sum(1 for i in items if not isinstance(i, Checkpoint)):
        raise BenchError("the pure verifier checked a different number of events")


def step_costs(events: Sequence[dict[str, Any]]) -> dict[str, float]:
    """Per-event µs of each thing `StreamVerifier.record` does, each in its own loop (so they
    do not add up exactly to the whole), less the cost of the loop itself."""
    n = len(events)
    sha = hashlib.sha256

    def loop(body: Callable[[dict[str, Any]], object]) -> float:
        started = time.perf_counter()
        for event in events:
            body(event)
        return (time.perf_counter() - started) * 1e6 / n

    def payload(event: dict[str, Any]) -> dict[str, Any]:
        return {name: event[name] for name in PAYLOAD_FIELDS}

    def header(event: dict[str, Any]) -> dict[str, Any]:
        return {name: event[name] for name in HEADER_FIELDS}

    empty = loop(lambda e: None)
    costs = {
        "build the payload object": loop(payload),
        "build + encode the payload (canonical_bytes_trusted)": loop(
            lambda e: canonical_bytes_trusted(payload(e))
        ),
        "SHA-256 of the payload bytes": 0.0,
        "build the header object": loop(header),
        "build + encode the header": loop(lambda e: canonical_bytes_trusted(header(e))),
        "SHA-256 of prev_hash + header bytes": 0.0,
        "Merkle leaf (MerkleBuilder.add)": 0.0,
    }
    payloads = [canonical_bytes_trusted(payload(e)) for e in events]
    headers = [bytes.fromhex(e["prev_hash"]) + canonical_bytes_trusted(header(e)) for e in events]
    started = time.perf_counter()
    for data in payloads:
        sha(data).hexdigest()
    costs["SHA-256 of the payload bytes"] = (time.perf_counter() - started) * 1e6 / n
    started = time.perf_counter()
    for data in headers:
        sha(data).digest()
    costs["SHA-256 of prev_hash + header bytes"] = (time.perf_counter() - started) * 1e6 / n
    hashes = [bytes.fromhex(e["hash"]) for e in events]
    builder = MerkleBuilder()
    started = time.perf_counter()
    for digest in hashes:
        builder.add(digest)
    costs["Merkle leaf (MerkleBuilder.add)"] = (time.perf_counter() - started) * 1e6 / n
    for name in list(costs):
        if name.startswith("build"):
            costs[name] = max(0.0, costs[name] - empty)
    verifier = StreamVerifier(STREAM, {})
    started = time.perf_counter()
    for event in events:
        check_event_line(verifier, event)
    costs["whole StreamVerifier.record (via the export's feed)"] = (
        (time.perf_counter() - started) * 1e6 / n
    )
    return costs


def run_profile(
    export: Path, keys: dict[str, PublicKey], out: Path
) -> list[tuple[str, float, float]]:
    """`verify_export` under cProfile: (function, own time, % of all own time), the top 20."""
    profiler = cProfile.Profile()
    profiler.enable()
    verdict = verify_export(export, keys)
    profiler.disable()
    _check(verdict)
    profiler.dump_stats(str(out))
    stats = pstats.Stats(str(out))
    raw: dict[Any, Any] = stats.stats  # type: ignore[attr-defined]
    total = sum(entry[2] for entry in raw.values())
    rows = sorted(raw.items(), key=lambda item: item[1][2], reverse=True)[:20]
    say(f"profile: verify_export of {verdict.checked:,} events under cProfile -> {out}")
    say(f"  total {total:.2f} s of own time; top functions by own time:")
    top = []
    for (filename, line, name), entry in rows:
        where = f"{Path(filename).name}:{line}({name})" if line else name
        share = 100.0 * entry[2] / total
        top.append((where, entry[2], share))
        say(f"  {share:5.1f} %  {entry[2]:6.2f} s  {entry[1]:>9,} calls  {where}")
    return top


# ------------------------------------------------------------------------------- report


def net(value: Timed, startup: Timed | None) -> Timed:
    """`value` without the start-up of a `cdc-audit` process (interpreter and imports)."""
    if startup is None:
        return value
    return Timed(
        value.events,
        max(1e-9, value.seconds - startup.seconds),
        max(1e-9, value.cpu_seconds - startup.cpu_seconds),
        value.rss_mb,
        value.server_cpu,
    )


def _rate(timed: Timed | None) -> str:
    return "" if timed is None else f"{timed.rate:,.0f}"


def summary(results: Results) -> list[str]:
    start = results.startup
    lines = [
        "| events in the trail | sealed, events/s | worker CPU µs/event (net) |"
        " `verify` online, events/s | its CPU µs/event (net) | server CPU µs/event |"
        " `export`, events/s | `verify --file`, events/s | its CPU µs/event (net) |"
        " `verify --file --jobs 1`, events/s |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for p in results.curve:
        seal = net(p.seal, results.seal_startup)
        online, offline = net(p.verify_online, start), net(p.verify_offline, start)
        lines.append(
            f"| {p.events:,} | {p.seal.rate:,.0f} |"
            f" {p.seal.cpu_seconds * 1e6 / p.sealed_events:.1f}"
            f" ({seal.cpu_seconds * 1e6 / p.sealed_events:.1f}) |"
            f" {p.verify_online.rate:,.0f} |"
            f" {p.verify_online.cpu_seconds * 1e6 / p.events:.1f}"
            f" ({online.cpu_seconds * 1e6 / p.events:.1f}) |"
            f" {p.verify_online.server_cpu * 1e6 / p.events:.1f} |"
            f" {p.export.rate:,.0f} |"
            f" {p.verify_offline.rate:,.0f} |"
            f" {p.verify_offline.cpu_seconds * 1e6 / p.events:.1f}"
            f" ({offline.cpu_seconds * 1e6 / p.events:.1f}) |"
            f" {_rate(p.verify_offline_one)} |"
        )
    if start is not None:
        lines.append(
            f"\n(net: without the start-up CPU of the process: {start.cpu_seconds:.2f} s for"
            " `cdc-audit verify --help`, interpreter and imports"
            + (
                f"; {results.seal_startup.cpu_seconds:.2f} s for an idle `worker --drain`)"
                if results.seal_startup is not None
                else ")"
            )
        )
    if results.curve:
        last = results.curve[-1]
        lines.append(
            f"export: {last.export_bytes / last.events:.0f} bytes an event;"
            f" {last.checkpoints} checkpoints at {last.events:,} events"
        )
    if results.inproc:
        lines += [
            "",
            "| in this process (no start-up) | events/s | CPU µs/event |",
            "|---|---:|---:|",
        ]
        for name, value in results.inproc.items():
            lines.append(
                f"| {name} | {value.rate:,.0f} | {value.cpu_seconds * 1e6 / value.events:.1f} |"
            )
    if results.steps_us:
        lines += ["", "| pure verification, per event | µs |", "|---|---:|"]
        for name, us in results.steps_us.items():
            lines.append(f"| {name} | {us:.2f} |")
    return lines


def verdicts(results: Results) -> list[str]:
    out: list[str] = []
    if not results.curve:
        return out
    start = results.startup
    detail = max(results.curve, key=lambda p: p.events)
    for label, value in (
        ("verify online", detail.verify_online),
        ("verify --file offline", detail.verify_offline),
    ):
        cores = net(value, start)
        out.append(
            _verdict(
                f"{label} >= {TARGET_RATE:,.0f} events/s",
                value.rate >= TARGET_RATE,
                f"{value.rate:,.0f}/s wall clock, start-up included ({cores.cpu_rate:,.0f}"
                f" events per CPU second net of start-up) at {detail.events:,} events",
            )
        )
    pure = results.inproc.get(PURE)
    if pure is not None:
        out.append(
            _verdict(
                f"pure verification (parsed events) >= {TARGET_RATE:,.0f} events/s",
                pure.cpu_rate >= TARGET_RATE,
                f"{pure.cpu_rate:,.0f} events per CPU second",
            )
        )
    if len(results.curve) >= 2:
        seal_start = results.seal_startup
        curves: dict[str, list[float]] = {
            "sealing: worker CPU": [
                net(p.seal, seal_start).cpu_seconds * 1e6 / max(1, p.sealed_events)
                for p in results.curve
            ],
            "verify online: CPU": [
                net(p.verify_online, start).cpu_seconds * 1e6 / p.events for p in results.curve
            ],
            "verify --file: CPU": [
                net(p.verify_offline, start).cpu_seconds * 1e6 / p.events for p in results.curve
            ],
        }
        for label, per_event in curves.items():
            curve = ", ".join(
                f"{us:.1f} µs at {p.events:,}"
                for us, p in zip(per_event, results.curve, strict=True)
            )
            ratio = (
                f"{per_event[-1] / per_event[0]:.2f}"
                if per_event[0] >= 0.1
                else "n/a: start-up is all of the first"
            )
            out.append(f"scale, {label} per event: {curve} (last/first {ratio}; 1.00 = linear)")
    return out


# ------------------------------------------------------------------------------- main


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.verify_throughput",
        description="Benchmark cdc-audit verify (online and offline) on a throwaway PostgreSQL.",
    )
    parser.add_argument(
        "--events",
        type=int,
        help="trail size for the detailed measurements (default 200000; quick 20000)",
    )
    parser.add_argument("--quick", action="store_true", help="small sizes: a smoke run")
    parser.add_argument(
        "--full", action="store_true", help="extend the scale curve to 1,000,000 events"
    )
    parser.add_argument("--json", type=Path, metavar="FILE", help="also write the results here")
    parser.add_argument(
        "--keep",
        type=Path,
        metavar="DIR",
        help="copy the work directory (exports, public key, logs) here at the end",
    )
    parser.add_argument(
        "--profile",
        type=Path,
        metavar="FILE",
        help="profile the offline verification (verify_export) into FILE, print the top",
    )
    args = parser.parse_args(argv)
    if args.events is None:
        args.events = 20_000 if args.quick else 200_000
    if args.events < 2:
        parser.error("--events must be at least 2")
    return args


def curve_sizes(args: argparse.Namespace) -> list[int]:
    sizes = [5_000] if args.quick else [10_000, 100_000]
    sizes = [s for s in sizes if s < args.events] + [args.events]
    if args.full:
        sizes += [s for s in (1_000_000,) if s > args.events]
    return sizes


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        return run(args)
    except (BenchError, CdcAuditError) as exc:
        print(f"verify_throughput: {exc}", file=sys.stderr)
        return 1
    except psycopg.Error as exc:
        print(f"verify_throughput: database error: {_last_line(str(exc))}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("verify_throughput: interrupted", file=sys.stderr)
        return 130


def run(args: argparse.Namespace) -> int:
    results = Results()
    cluster = EphemeralCluster()
    with tempfile.TemporaryDirectory(prefix="cdc-audit-bench-verify-") as tmp:
        try:
            cluster.start()
            say(f"PostgreSQL on port {cluster.port} in {cluster.base_dir} (pid {cluster.pid})")
            bench = VerifyBench(cluster, Path(tmp))
            bench.setup()
            results.machine = machine_facts(bench)
            for key, value in results.machine.items():
                say(f"  {key}: {value}")
            runs = [bench.timed_cli("verify", "--help")[0] for _ in range(3)]
            startup = Timed(
                0,
                statistics.median(r.seconds for r in runs),
                statistics.median(r.cpu_seconds for r in runs),
            )
            results.startup = startup
            empty = bench.drain()
            results.seal_startup = Timed(0, empty.seconds, empty.cpu_seconds, empty.rss_mb)
            say(
                f"startup: cdc-audit verify --help takes {startup.seconds:.2f} s"
                f" ({startup.cpu_seconds:.2f} s CPU; median of 3); worker --drain with nothing"
                f" to seal {empty.seconds:.2f} s ({empty.cpu_seconds:.2f} s CPU)"
            )
            sizes = curve_sizes(args)
            say(
                f"setup: ledger audited in stream {STREAM}, checkpoints every"
                f" {CHECKPOINT_EVERY:,} events, anchor {bench.anchor_dir}; sizes"
                f" {', '.join(f'{s:,}' for s in sizes)}"
            )
            detail: Path | None = None
            for size in sizes:
                point = run_point(bench, size, results)
                if size == args.events:
                    detail = bench.work / f"export-{point.events}.jsonl"
                    profile = None if args.profile is None else args.profile.resolve()
                    run_inprocess(bench, detail, profile, results)
            now = code_version()
            if now != results.machine["code"]:
                say(f"WARNING: the code changed during the run: {results.machine['code']} -> {now}")
        finally:
            cluster.stop()
            if args.keep is not None:
                shutil.copytree(tmp, args.keep, dirs_exist_ok=True)
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
    for item, point in zip(data["curve"], results.curve, strict=True):
        for name in ("seal", "verify_online", "export", "verify_offline", "verify_offline_one"):
            value: Timed | None = getattr(point, name)
            if value is not None:
                item[name].update(rate=value.rate, cpu_rate=value.cpu_rate)
    for name, value in results.inproc.items():
        data["inproc"][name].update(rate=value.rate, cpu_rate=value.cpu_rate)
    return data


if __name__ == "__main__":
    sys.exit(main())
