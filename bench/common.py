"""Pure helpers shared by the benchmarks and the suite: pgbench's output and per-transaction
logs, the read benchmark's printed latencies, and median [min-max] summaries.

Nothing here connects to a database or starts a process, so it is unit tested on its own.
"""

from __future__ import annotations

import math
import re
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass


class ParseError(ValueError):
    """Output that does not have the expected shape."""


# ------------------------------------------------------------------------------- statistics


@dataclass(frozen=True)
class Spread:
    """The median of repeated measurements, with their minimum and maximum."""

    median: float
    min: float
    max: float
    n: int

    @classmethod
    def of(cls, values: Iterable[float]) -> Spread:
        data = [float(v) for v in values]
        if not data:
            raise ValueError("no values to summarise")
        return cls(statistics.median(data), min(data), max(data), len(data))

    def render(self, fmt: str = ",.0f") -> str:
        """``median [min-max]``, or the single value when there was one measurement."""
        if self.n == 1:
            return f"{self.median:{fmt}}"
        return f"{self.median:{fmt}} [{self.min:{fmt}}\u2013{self.max:{fmt}}]"


def percentile(values: Sequence[float], fraction: float) -> float:
    """Nearest-rank percentile (0 < fraction <= 1) of `values`, which need not be sorted."""
    if not values:
        raise ValueError("no values")
    if not 0.0 < fraction <= 1.0:
        raise ValueError("fraction must be in (0, 1]")
    ordered = sorted(values)
    rank = max(1, math.ceil(fraction * len(ordered)))
    return ordered[rank - 1]


# ------------------------------------------------------------------------------- pgbench


@dataclass(frozen=True)
class PgbenchSummary:
    """What pgbench prints at the end of a run."""

    transactions: int
    failed: int
    latency_avg_ms: float
    tps: float


_PROCESSED = re.compile(r"^number of transactions actually processed: (\d+)", re.MULTILINE)
_FAILED = re.compile(r"^number of failed transactions: (\d+)", re.MULTILINE)
_LATENCY = re.compile(r"^latency average = ([0-9.]+) ms", re.MULTILINE)
_TPS = re.compile(r"^tps = ([0-9.]+)", re.MULTILINE)


def parse_pgbench_summary(stdout: str) -> PgbenchSummary:
    """Transactions, failures, average latency and TPS from pgbench's report (PostgreSQL
    14+ wording; `failed` is 0 for versions that do not print it)."""
    found = {}
    for name, pattern in (("processed", _PROCESSED), ("latency", _LATENCY), ("tps", _TPS)):
        match = pattern.search(stdout)
        if match is None:
            raise ParseError(f"pgbench's report has no {name} line")
        found[name] = match.group(1)
    failed = _FAILED.search(stdout)
    return PgbenchSummary(
        transactions=int(found["processed"]),
        failed=int(failed.group(1)) if failed else 0,
        latency_avg_ms=float(found["latency"]),
        tps=float(found["tps"]),
    )


def parse_pgbench_log(lines: Iterable[str]) -> list[float]:
    """Latencies in ms of the transactions in pgbench's per-transaction log (``--log``).

    A line is ``client_id transaction_no time script_no time_epoch time_us [...]`` with
    `time` in microseconds; failed or skipped transactions carry a word there and are left
    out.
    """
    out: list[float] = []
    for number, line in enumerate(lines, 1):
        fields = line.split()
        if not fields:
            continue
        if len(fields) < 6:
            raise ParseError(f"pgbench log line {number} has {len(fields)} fields: {line!r}")
        if fields[2].isdigit():
            out.append(int(fields[2]) / 1000.0)
    return out


@dataclass(frozen=True)
class Latency:
    avg_ms: float
    p50_ms: float
    p95_ms: float
    p99_ms: float
    count: int


def latency_of(latencies_ms: Sequence[float]) -> Latency:
    return Latency(
        avg_ms=statistics.fmean(latencies_ms),
        p50_ms=percentile(latencies_ms, 0.50),
        p95_ms=percentile(latencies_ms, 0.95),
        p99_ms=percentile(latencies_ms, 0.99),
        count=len(latencies_ms),
    )


# ------------------------------------------------------------------------------- read latency


@dataclass(frozen=True)
class ReadLatency:
    group: str
    query: str
    p50_ms: float
    p95_ms: float
    max_ms: float


_READ_LINE = re.compile(
    r"^  (?P<name>\S.*?)\s+(?P<p50>\d+\.\d+)\s+(?P<p95>\d+\.\d+)\s+(?P<max>\d+\.\d+)"
    r"(?:\s+(?:ok|OVER TARGET))?\s*$"
)


def parse_read_latency(stdout: str) -> list[ReadLatency]:
    """The latency lines `bench.read_latency` prints: a group line ending in ``:`` and then
    ``  name  p50 p95 max  verdict`` per query; the baseline line has the group ``baseline``.
    """
    group = ""
    out: list[ReadLatency] = []
    started = False
    for line in stdout.splitlines():
        if line.startswith("latency in ms"):
            started = True
            continue
        if not started:
            continue
        match = _READ_LINE.match(line)
        if match is not None:
            name = match.group("name").strip()
            this_group = group
            if name.startswith("baseline: "):
                this_group, name = "baseline", name.removeprefix("baseline: ")
            out.append(
                ReadLatency(
                    this_group,
                    name,
                    float(match.group("p50")),
                    float(match.group("p95")),
                    float(match.group("max")),
                )
            )
        elif line.endswith(":") and not line.startswith(" "):
            group = line[:-1]
    return out
