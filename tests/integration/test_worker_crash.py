"""Killing the worker (SIGKILL) at any point during a concurrent workload and restarting loses
and duplicates nothing; chains stay intact (DESIGN.md, guarantee 2).

Three threads write to an audited table while the worker is started and killed again and
again: at random moments, and through its failpoints exactly before and after a batch commit
(after the commit, the batch is in the trail but its LSN was never confirmed to the server).
Batches are sometimes tiny, so large transactions are sealed over many batches and kills land
in the middle of them. After each kill, with the worker's connections gone, the trail, its
progress row and the slot must agree with what the server says committed (see
`Harness.check_positions`). At the end a drain seals the rest, and the trail must equal the ledger
that the workload kept in the same transactions: the same changes, each exactly once, chained
without gaps, verified, in commit order, with the context of the transaction that made them.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from cdc_audit.verify import verify_stream

from .fix_policy import WritePolicy
from .pg import Database, run_cli
from .workload import ACTOR, OPERATIONS, REASON, SCHEMA, CommitWatcher, Workload

SEED = int(os.environ.get("CDC_AUDIT_CRASH_SEED", "20250611"))
RANDOM_KILLS = 18
FAILPOINT_RUNS = {"after_commit": 4, "before_commit": 3}
KILL_DELAY = (0.2, 3.0)
"""Seconds between starting a worker and killing it (the worker needs ~0.5 s to start)."""
BATCH_SIZES = (50, 50, 50, 200, 1000, 5000)
"""CDC_AUDIT_BATCH_MESSAGES per run: 50 seals a 20k-row transaction in ~400 batches."""
FAILPOINT_WAIT = 15.0
BIG_AT = (2.0, 14.0)
"""When the first writer runs its large transactions (seconds after the workload starts)."""
PAUSE = 0.08
"""Longest pause of a writer between two transactions (seconds)."""
FAILING = {"rollback", "error"}
"""Operations that always roll back."""

Row = tuple[int, str, int, int | None, int | None]
"""(xid, kind, id, old n, new n): one row change, as the ledger and the trail both give it."""


@dataclass
class Run:
    index: int
    batch: int
    failpoint: str | None
    delay: float
    log: Path
    returncode: int | None = None
    ended: str = ""
    observed: dict[str, Any] = field(default_factory=dict)

    def describe(self) -> str:
        how = f"failpoint {self.failpoint}" if self.failpoint else f"kill at {self.delay:.2f}s"
        seen = " ".join(f"{k}={v}" for k, v in self.observed.items())
        return f"run {self.index:2d}: batch {self.batch:4d}, {how}: {self.ended} {seen}"


def _schedule(rng: random.Random, logs: Path) -> list[Run]:
    failpoints = [
        f"{name}:{rng.randint(1, 6)}"
        for name, count in FAILPOINT_RUNS.items()
        for _ in range(count)
    ]
    plan: list[str | None] = [None] * RANDOM_KILLS + list(failpoints)
    rng.shuffle(plan)
    return [
        Run(
            index=i,
            batch=rng.choice(BATCH_SIZES),
            failpoint=failpoint,
            delay=rng.uniform(*KILL_DELAY),
            log=logs / f"worker{i:02d}.log",
        )
        for i, failpoint in enumerate(plan)
    ]


class Harness:
    """The installed database, the worker runs, and what was seen along the way."""

    def __init__(self, db: Database, seed: int, logs: Path) -> None:
        self.db = db
        self.seed = seed
        self.logs = logs
        self.runs: list[Run] = []
        self.procs: list[subprocess.Popen[bytes]] = []
        self.observer = db.connect()
        self.slot: str = self.scalar(
            "SELECT value FROM cdc_audit.install_setting WHERE key = 'slot_name'"
        )
        self.last_end_lsn = 0
        self.partial_kills = 0
        self.partials_seen: set[str] = set()
        self.kills_with_progress = 0
        self.last_events = 0

    def scalar(self, query: str, params: tuple[Any, ...] = ()) -> Any:
        row = self.observer.execute(query.encode(), params or None).fetchone()
        return None if row is None else row[0]

    def env(self, run: Run | None = None) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("CDC_AUDIT_")}
        env["CDC_AUDIT_DSN"] = self.db.dsn
        if run is not None:
            env["CDC_AUDIT_BATCH_MESSAGES"] = str(run.batch)
            if run.failpoint:
                env["CDC_AUDIT_FAILPOINT"] = run.failpoint
        return env

    def context(self, tail_runs: int = 3) -> str:
        """Seed, every run, and the end of the last logs: what a failure message needs."""
        lines = [f"seed {self.seed} (set CDC_AUDIT_CRASH_SEED to replay the schedule)"]
        lines += [r.describe() for r in self.runs]
        for run in self.runs[max(0, len(self.runs) - tail_runs) :] if tail_runs else []:
            text = run.log.read_text(errors="replace") if run.log.exists() else ""
            tail = "\n    ".join(text.splitlines()[-8:])
            lines.append(f"--- {run.log.name} (last lines)\n    {tail}")
        return "\n".join(lines)

    # ---- one worker run

    def run_once(self, run: Run) -> None:
        self.runs.append(run)
        with run.log.open("wb") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", "cdc_audit.cli", "worker"],
                env=self.env(run),
                stdout=log,
                stderr=log,
            )
        self.procs.append(proc)
        if run.failpoint:
            try:
                proc.wait(FAILPOINT_WAIT)
                run.ended = "killed itself"
            except subprocess.TimeoutExpired:
                proc.kill()
                run.ended = "failpoint not reached: killed"
        else:
            time.sleep(run.delay)
            exited = proc.poll()
            assert exited is None, (
                f"the worker exited by itself with {exited}\n{self.context(tail_runs=1)}"
            )
            proc.kill()
            run.ended = "killed"
        run.returncode = proc.wait(30)
        assert run.returncode == -signal.SIGKILL, (
            f"the worker ended with {run.returncode}, not by SIGKILL\n{self.context(1)}"
        )
        _assert_no_errors(run.log.read_text(errors="replace"), self.context(1))

    def wait_until_gone(self, keep: set[int]) -> None:
        """Wait until the killed worker's backends are gone: its walsender (the slot is free)
        and its trail connection (nothing of it can still commit)."""
        deadline = time.monotonic() + 20
        while True:
            row = self.observer.execute(
                "SELECT (SELECT active FROM pg_replication_slots WHERE slot_name = %s),"
                " (SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
                "   AND backend_type IN ('client backend', 'walsender')"
                "   AND pid <> ALL(%s::int[]))",
                (self.slot, list(keep)),
            ).fetchone()
            assert row is not None
            if not row[0] and row[1] == 0:
                return
            assert time.monotonic() < deadline, (
                f"the killed worker's backends linger: slot active={row[0]}, others={row[1]}"
            )
            time.sleep(0.05)

    # ---- positions

    def check_positions(self, watcher: CommitWatcher, run: Run | None) -> None:
        """With no worker running: the slot, the progress row and the trail agree with what
        the server says committed (the watcher).

        - every transaction whose commit the slot confirmed is sealed, whole: the slot never
          moved past what the trail holds (it may move past it only over WAL without audited
          changes, by an idle confirm);
        - every transaction the progress row counts as sealed (commit end <= end_lsn) is in
          the trail whole, and nothing else is, except the first `partial_done` changes of
          the transaction the progress row names as partly sealed.
        """
        with self.observer.transaction():
            self.observer.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
            confirmed = int(
                self.scalar(
                    "SELECT confirmed_flush_lsn - '0/0' FROM pg_replication_slots"
                    " WHERE slot_name = %s",
                    (self.slot,),
                )
            )
            progress = self.observer.execute(
                "SELECT end_lsn - '0/0', partial_lsn::text, partial_done FROM cdc_audit.progress"
            ).fetchone()
            sealed = self.observer.execute(
                "SELECT xid, min(commit_lsn)::text, count(*), count(DISTINCT commit_lsn)"
                " FROM cdc_audit.event WHERE stream = 'user' GROUP BY xid"
            ).fetchall()
        commits = watcher.poll()
        end_lsn = int(progress[0]) if progress else 0
        partial_lsn = progress[1] if progress else None
        partial_done = (progress[2] or 0) if progress else 0
        where = f"after {run.describe()}" if run else "after the drain"
        problems: list[str] = []

        if end_lsn < self.last_end_lsn:
            problems.append(f"progress end_lsn went back: {self.last_end_lsn} -> {end_lsn}")
        trail = {xid: (lsn, count, lsns) for xid, lsn, count, lsns in sealed}
        for xid, (lsn, count, lsns) in trail.items():
            commit = commits.get(xid)
            if commit is None:
                problems.append(f"xid {xid}: {count} events of a transaction never committed")
                continue
            if lsns != 1:
                problems.append(f"xid {xid}: events with {lsns} different commit LSNs")
            if commit.end_lsn <= end_lsn:
                if count != commit.changes:
                    problems.append(
                        f"xid {xid}: sealed whole per progress, but {count} events"
                        f" of {commit.changes}"
                    )
            elif lsn == partial_lsn:
                if count != partial_done:
                    problems.append(
                        f"xid {xid}: partly sealed, {count} events but progress says {partial_done}"
                    )
            else:
                problems.append(
                    f"xid {xid}: {count} events beyond progress end_lsn {end_lsn}"
                    f" (commit ends at {commit.end_lsn})"
                )
        if partial_lsn is not None and partial_lsn not in {lsn for lsn, _, _ in trail.values()}:
            problems.append(
                f"progress says {partial_done} events of {partial_lsn} are sealed: none are"
            )
        for commit in commits.values():
            if commit.end_lsn <= max(end_lsn, confirmed) and commit.xid not in trail:
                problems.append(
                    f"xid {commit.xid}: committed ({commit.changes} changes, ends"
                    f" {commit.end_lsn}), confirmed or counted, not in the trail"
                )
            if end_lsn < commit.end_lsn <= confirmed:
                problems.append(
                    f"xid {commit.xid}: the slot confirmed {confirmed}, past its"
                    f" commit {commit.end_lsn}, but progress stops at {end_lsn}"
                )
        assert not problems, (
            f"{where}: {len(problems)} problem(s):\n  "
            + "\n  ".join(problems[:20])
            + f"\n{self.context()}"
        )

        events = sum(count for _, count, _ in trail.values())
        if run is not None:
            run.observed.update(
                events=events,
                partial=partial_done if partial_lsn else "-",
                slot_vs_progress=confirmed - end_lsn,
            )
            if partial_lsn is not None and partial_lsn not in self.partials_seen:
                self.partials_seen.add(partial_lsn)
                self.partial_kills += 1
            self.kills_with_progress += events > self.last_events
        self.last_events = events
        self.last_end_lsn = end_lsn

    def stop_all(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait(30)
        self.observer.close()


@pytest.fixture
def harness(database: Database, write_policy: WritePolicy, tmp_path: Path) -> Iterator[Harness]:
    database.execute(SCHEMA)
    policy = write_policy(tables="  - {table: public.acct, stream: user, old_values: full}\n")
    applied = run_cli("apply", "--dsn", database.dsn, "--policy", str(policy))
    assert applied.returncode == 0, applied.stderr
    logs = tmp_path / "logs"
    logs.mkdir()
    harness = Harness(database, SEED, logs)
    try:
        yield harness
    finally:
        harness.stop_all()


def test_sigkill_at_any_point_loses_and_duplicates_nothing(harness: Harness) -> None:
    db = harness.db
    rng = random.Random(SEED)
    schedule = _schedule(rng, harness.logs)
    watcher = CommitWatcher(db)
    workload = Workload(db, SEED, threads=3, pause=PAUSE, big=BIG_AT)
    started = time.monotonic()
    try:
        workload.start()
        time.sleep(0.5)
        keep = workload.backend_pids() | {harness.observer.info.backend_pid}
        for run in schedule:
            harness.run_once(run)
            harness.wait_until_gone(keep)
            harness.check_positions(watcher, run)
            workload.raise_errors()
    finally:
        workload.finish()
    workload.raise_errors()
    kill_phase = time.monotonic() - started

    drain_started = time.monotonic()
    drained = subprocess.run(
        [sys.executable, "-m", "cdc_audit.cli", "worker", "--drain"],
        env=harness.env(),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    drain_time = time.monotonic() - drain_started
    assert drained.returncode == 0, f"drain failed:\n{drained.stderr}\n{harness.context()}"
    _assert_no_errors(drained.stderr, harness.context(0))
    harness.wait_until_gone({harness.observer.info.backend_pid})
    harness.check_positions(watcher, None)

    expected = Counter[Row](
        (xid, kind, id_, old_n, new_n)
        for xid, kind, id_, old_n, new_n in db.execute(
            "SELECT xid, kind, id, old_n, new_n FROM ledger"
        )
    )
    actual = Counter[Row](
        (xid, kind, int(id_), _int(old_n), _int(new_n))
        for xid, kind, id_, old_n, new_n in db.execute(
            "SELECT xid, kind, row_key ->> 'id', old ->> 'n', new ->> 'n'"
            " FROM cdc_audit.event WHERE stream = 'user'"
        )
    )
    summary = (
        f"{sum(expected.values())} changes committed in {len({r[0] for r in expected})}"
        f" transactions; {len(schedule)} worker runs in {kill_phase:.1f}s, drain"
        f" {drain_time:.1f}s; committed ops {dict(workload.stats.committed)}, rolled back"
        f" {dict(workload.stats.rolled_back)}"
    )
    print(f"\n{summary}\n{harness.context(tail_runs=0)}")

    lost, duplicated_or_extra = expected - actual, actual - expected
    assert not lost and not duplicated_or_extra, (
        f"trail differs from the ledger: {sum(lost.values())} lost,"
        f" {sum(duplicated_or_extra.values())} duplicated or unexpected\n"
        f"  lost (xid, kind, id, old n, new n) x count: {_first(lost)}\n"
        f"  extra in the trail: {_first(duplicated_or_extra)}\n"
        f"  (trail holds {sum(actual.values())}, ledger {sum(expected.values())})\n"
        f"{summary}\n{harness.context()}"
    )

    count, low, high, distinct_seq, distinct_ids = db.execute(
        "SELECT count(*), min(seq), max(seq), count(DISTINCT seq), count(DISTINCT event_id)"
        " FROM cdc_audit.event WHERE stream = 'user'"
    )[0]
    seed = f"(seed {SEED})"
    assert (low, high, distinct_seq) == (1, count, count), f"seq is not 1..N without gaps {seed}"
    assert distinct_ids == count, f"event_id is not unique {seed}"
    others = db.execute("SELECT stream, kind, count(*) FROM cdc_audit.event GROUP BY 1, 2")
    assert others == [("user", k, n) for _, k, n in others], f"other streams: {others} {seed}"

    contexts = db.execute(
        "SELECT actor_id, reason, context_missing, count(*) FROM cdc_audit.event GROUP BY 1, 2, 3"
    )
    assert contexts == [(ACTOR, REASON, False, count)], f"contexts in the trail: {contexts} {seed}"

    out_of_order = db.execute(
        "SELECT seq, commit_lsn::text, previous::text FROM (SELECT seq, commit_lsn,"
        " lag(commit_lsn) OVER (ORDER BY seq) AS previous FROM cdc_audit.event"
        " WHERE stream = 'user') e WHERE commit_lsn < previous LIMIT 5"
    )
    assert not out_of_order, f"seq is not commit order: {out_of_order} {seed}"
    # Each row's history, in seq order, is one continuous story: inserted, updated from the
    # value it had, deleted last. A replayed or skipped change breaks it.
    broken = db.execute(
        "SELECT id, seq, kind, old_n, prev_kind, prev_new FROM ("
        " SELECT id, seq, kind, old_n, lag(kind) OVER w AS prev_kind,"
        "  lag(new_n) OVER w AS prev_new, lag(seq) OVER w AS prev_seq FROM ("
        "   SELECT (row_key ->> 'id')::bigint AS id, seq, kind, (old ->> 'n')::int AS old_n,"
        "    (new ->> 'n')::int AS new_n FROM cdc_audit.event WHERE stream = 'user') e"
        " WINDOW w AS (PARTITION BY id ORDER BY seq)) h"
        " WHERE (prev_seq IS NULL AND kind <> 'insert') OR (prev_seq IS NOT NULL AND"
        "  (kind = 'insert' OR prev_kind = 'delete' OR old_n IS DISTINCT FROM prev_new))"
        " LIMIT 5"
    )
    assert not broken, (
        f"broken row histories (id, seq, kind, old, prev kind, prev new): {broken} {seed}"
    )

    with db.connect() as conn:
        verdict = verify_stream(conn, "cdc_audit", "user")
    assert verdict.ok, f"verify: {verdict.problem}\n{harness.context()}"
    assert verdict.checked == count, f"verify checked {verdict.checked} of {count} {seed}"

    # The run was not a toy: it exercised what it claims to.
    stats = workload.stats
    assert len(stats.big_xids) == len(BIG_AT), f"large transactions: {stats.big_xids}"
    assert all(stats.committed[op] for op, _ in OPERATIONS if op not in FAILING), stats.committed
    assert stats.rolled_back["rollback"] and stats.rolled_back["error"], stats.rolled_back
    assert sum(r.ended == "killed itself" for r in harness.runs) >= 4, harness.context(0)
    # A third: on a loaded machine a worker killed early may not have sealed anything yet.
    assert harness.kills_with_progress >= len(schedule) // 3, harness.context(0)
    assert harness.partial_kills >= 1, f"no kill inside a large transaction\n{harness.context(0)}"


def _assert_no_errors(log: str, context: str) -> None:
    bad = [line for line in log.splitlines() if '"level":"error"' in line or "Traceback" in line]
    assert not bad, f"the worker logged errors: {bad[:3]}\n{context}"


def _int(text: str | None) -> int | None:
    return None if text is None else int(text)


def _first(counter: Counter[Row], limit: int = 12) -> str:
    items = sorted(counter.items())[:limit]
    more = f" ... and {len(counter) - limit} more" if len(counter) > limit else ""
    return ", ".join(f"{row} x{n}" for row, n in items) + more
