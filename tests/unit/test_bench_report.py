"""The benchmark suite's pure parts: parsing pgbench and the read benchmark, summaries, and
the generated section of docs/benchmarks.md."""

from __future__ import annotations

import sys
from typing import Any

import pytest

from bench.app_cost import SCRIPTS, SET_CONFIG
from bench.common import (
    ParseError,
    Spread,
    latency_of,
    parse_pgbench_log,
    parse_pgbench_summary,
    parse_read_latency,
    percentile,
)
from bench.suite import (
    BEGIN,
    END,
    ROOT,
    render,
    render_app,
    render_capture,
    shown,
    splice,
    targets,
)

PGBENCH_15 = """\
pgbench (15.18 (Debian 15.18-0+deb12u1))
transaction type: /tmp/x/tpcb.sql
scaling factor: 10
query mode: prepared
number of clients: 4
number of threads: 2
maximum number of tries: 1
duration: 30 s
number of transactions actually processed: 95123
number of failed transactions: 2 (0.002%)
latency average = 1.262 ms
initial connection time = 8.123 ms
tps = 3170.766142 (without initial connection time)
"""


def test_pgbench_summary() -> None:
    got = parse_pgbench_summary(PGBENCH_15)
    assert got.transactions == 95123
    assert got.failed == 2
    assert got.latency_avg_ms == 1.262
    assert got.tps == pytest.approx(3170.766142)


def test_pgbench_summary_without_failure_line() -> None:
    text = PGBENCH_15.replace("number of failed transactions: 2 (0.002%)\n", "")
    assert parse_pgbench_summary(text).failed == 0


def test_pgbench_summary_refuses_other_output() -> None:
    with pytest.raises(ParseError, match="tps"):
        parse_pgbench_summary(PGBENCH_15.replace("tps =", "tpx ="))


def test_pgbench_log_latencies_skip_failed_and_blank() -> None:
    lines = [
        "0 1 1500 0 1662132851 580065\n",
        "1 1 250 0 1662132851 581837\n",
        "\n",
        "2 1 failed 0 1662132851 581860\n",
        "3 1 skipped 0 1662132851 581870\n",
        "3 2 3000 0 1662132851 581870 12\n",
    ]
    assert parse_pgbench_log(lines) == [1.5, 0.25, 3.0]


def test_pgbench_log_refuses_short_lines() -> None:
    with pytest.raises(ParseError, match="line 2"):
        parse_pgbench_log(["0 1 1500 0 1662132851 580065", "0 2 1500"])


def test_percentile_nearest_rank() -> None:
    data = [float(v) for v in range(100, 0, -1)]  # unsorted on purpose
    assert percentile(data, 0.5) == 50.0
    assert percentile(data, 0.95) == 95.0
    assert percentile(data, 0.99) == 99.0
    assert percentile(data, 1.0) == 100.0
    assert percentile([7.0], 0.95) == 7.0
    with pytest.raises(ValueError):
        percentile([], 0.5)
    with pytest.raises(ValueError):
        percentile([1.0], 0.0)


def test_latency_of() -> None:
    got = latency_of([1.0, 2.0, 3.0, 10.0])
    assert got.avg_ms == 4.0
    assert (got.p50_ms, got.p95_ms, got.p99_ms, got.count) == (2.0, 10.0, 10.0, 4)


def test_spread_median_min_max_and_rendering() -> None:
    s = Spread.of([3.0, 1.0, 2.0, 10.0])
    assert (s.median, s.min, s.max, s.n) == (2.5, 1.0, 10.0, 4)
    assert Spread.of([0.8712, 0.9, 0.85]).render(".2f") == "0.87 [0.85\u20130.90]"
    assert Spread.of([12345.6]).render() == "12,346"
    with pytest.raises(ValueError):
        Spread.of([])


READ_OUTPUT = """\
  code: abc
loaded in 494 s (20,243 events/s)

latency in ms over 200 runs: p50 / p95 / max
  baseline: SELECT 1 round trip                                 0.04    0.06    0.22
auditor, on event:
  actor + 7-day window, first 100 (a `cdc-audit query` page)     3.80    8.80   11.40  ok
  actor + 7-day window, all of it                               14.60  281.60  661.50  OVER TARGET
reader, curated:
  row history of one key (audited_row_history)                   2.80    3.70    6.00  ok
target: p95 < 50 ms; 1 query(ies) over it
"""


def test_read_latency_lines() -> None:
    got = parse_read_latency(READ_OUTPUT)
    assert [(r.group, r.query, r.p95_ms) for r in got] == [
        ("baseline", "SELECT 1 round trip", 0.06),
        ("auditor, on event", "actor + 7-day window, first 100 (a `cdc-audit query` page)", 8.8),
        ("auditor, on event", "actor + 7-day window, all of it", 281.6),
        ("reader, curated", "row history of one key (audited_row_history)", 3.7),
    ]
    assert got[2].p50_ms == 14.6 and got[2].max_ms == 661.5


def test_scripts_differ_only_in_the_context_statement() -> None:
    plain = SCRIPTS["unaudited"]
    assert "set_context" not in plain and "set_config" not in plain
    assert "cdc_audit.set_context(" in SCRIPTS["cdc-audit (a)"]
    assert SCRIPTS["classic trigger"] == SCRIPTS["unaudited + context"]
    assert SET_CONFIG in SCRIPTS["classic trigger"]
    # Removing the one context line from each gives the same TPC-B transaction.
    for name in ("cdc-audit (a)", "classic trigger"):
        lines = [line for line in SCRIPTS[name].splitlines() if "set_con" not in line]
        assert lines == plain.splitlines()


def _run(config: str, rnd: int, tps: float, p95: float, **sealing: Any) -> dict[str, Any]:
    return {
        "config": config,
        "round": rnd,
        "seconds": 30.0,
        "transactions": int(tps * 30),
        "tps": tps,
        "latency_avg_ms": 1000 * 4 / tps,
        "latency_p95_ms": p95,
        "wal_per_transaction": 500.0,
        "pgbench_cpu": 1.0,
        "server_cpu": 2.0,
        "sealing": sealing or None,
    }


APP = {
    "scale": 10,
    "clients": 4,
    "jobs": 2,
    "seconds": 30,
    "rounds": 2,
    "runs": [
        _run("unaudited", 1, 4000, 2.0),
        _run("cdc-audit (a)", 1, 3600, 2.4),
        _run("classic trigger", 1, 1600, 6.0),
        _run("unaudited", 2, 3000, 3.0),
        _run("cdc-audit (a)", 2, 2400, 3.3),
        _run("classic trigger", 2, 1200, 9.0),
    ],
    "catch_up": None,
}


def test_app_table_ratios_are_per_round() -> None:
    lines = render_app(APP)
    row = next(line for line in lines if "worker stopped" in line)
    # Round ratios: 3600/4000 = 0.90 and 2400/3000 = 0.80 -> median 0.85.
    assert "| 3,000 [2,400\u20133,600] | 0.85 [0.80\u20130.90] |" in row
    assert "| 1.15 [1.10\u20131.20] |" in row  # p95 ratios 2.4/2.0 and 3.3/3.0
    assert not any("running on the same" in line for line in lines)  # no (b) runs: no row


def test_capture_table_only_when_measured() -> None:
    assert render_capture(APP) == []
    lines = render_capture({**APP, "capture": {"trigger as installed": [102.4, 101.8, 118.3]}})
    assert lines[-1] == "| trigger as installed | 102.4 [101.8\u2013118.3] |"


def test_targets_compare_with_the_classic_trigger() -> None:
    got = {goal: (measured, met) for goal, measured, met in targets({"app": {"data": APP}})}
    measured, met = got["cdc-audit (a): TPS ≥ 0.85 of unaudited, above the classic trigger"]
    assert met is True
    assert measured == "0.85 [0.80\u20130.90]; classic trigger 0.40"


def test_render_marks_quick_runs_and_splice_keeps_the_narrative() -> None:
    meta = {"command": "python -m bench.app_cost --quick", "quick": True, "seconds": 60.0,
            "finished": "2026-11-28 13:00 UTC"}  # fmt: skip
    lines = render({"app": {"meta": meta, "data": APP}})
    text = "\n".join(lines)
    assert "Quick mode" in text
    assert "Command: `python -m bench.app_cost --quick`" in text
    assert "| cdc-audit (a): TPS ≥ 0.85 of unaudited, above the classic trigger |" in text

    doc = f"# Benchmarks\n\nintro\n\n{BEGIN}\nold figures\n{END}\n\n## Interpretation\nkept\n"
    new = splice(doc, ["new figures"])
    assert (
        new == f"# Benchmarks\n\nintro\n\n{BEGIN}\nnew figures\n{END}\n\n## Interpretation\nkept\n"
    )
    assert splice("# Benchmarks\n", ["x"]) == f"# Benchmarks\n\n{BEGIN}\nx\n{END}\n"


def test_reads_target_names_the_queries_over_it() -> None:
    latencies = [
        {"group": "baseline", "query": "SELECT 1 round trip", "p50_ms": 0.1, "p95_ms": 99.0,
         "max_ms": 0.3},
        {"group": "auditor", "query": "row history", "p50_ms": 2.0, "p95_ms": 4.0, "max_ms": 5.0},
        {"group": "reader", "query": "admin", "p50_ms": 40.0, "p95_ms": 61.0, "max_ms": 80.0},
    ]  # fmt: skip
    (goal, measured, met), *_ = targets({"reads": {"data": {"latencies": latencies}}})
    assert goal == "reads: each p95 < 50 ms"
    assert measured == "1 of 2 under; reader: admin 61 ms"
    assert met is False


def test_commands_are_shown_from_the_repository_root() -> None:
    command = [sys.executable, "-m", "bench.app_cost", "--json", str(ROOT / "build/bench/a.json")]
    assert shown(command) == ".venv/bin/python -m bench.app_cost --json build/bench/a.json"
    assert shown(["x", "--json", "/elsewhere/a.json"]) == "x --json a.json"
    assert shown(["x", "--configs", "a (b),c"]) == "x --configs 'a (b),c'"
