"""Scenario 1, worker crash loop: SIGKILL the worker again and again during a concurrent workload
of single-row statements, multi-row INSERT, COPY, savepoints rolled back, TRUNCATE and large
transactions; restart it each time; drain at the end. Nothing is lost or duplicated against
the ledger the workload wrote in the same transactions, and every chain verifies.

Kills land at random moments and, through the worker's failpoints, just before a batch commits
and just after it (the batch is in the trail, its LSN not yet confirmed to the server). After
each kill the slot, the progress row and the trail must agree with what the server decoded as
committed (`Harness.check_positions` of the integration crash test, reused here).
"""

from __future__ import annotations

import random
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from ..integration.fix_policy import WritePolicy
from ..integration.pg import Database
from ..integration.test_worker_crash import Harness, Run
from ..integration.workload import ACTOR, REASON, CommitWatcher, Workload
from .harness import (
    OPERATIONS_WITH_TRUNCATE,
    SEED,
    chain_problems,
    compare_with_ledger,
    drain,
    install,
    sized,
)

pytestmark = pytest.mark.reliability

RANDOM_KILLS = sized(9, 34)
FAILPOINTS = {"after_commit": sized(3, 10), "before_commit": sized(2, 6)}
"""Kills through failpoints; with the random ones, 50 in the full form."""
KILL_DELAY = (0.2, 3.0)
BATCH_SIZES = (50, 50, 50, 200, 1000, 5000)
BIG_AT = sized((2.0,), (2.0, 20.0, 45.0))
"""When the first writer runs a 20k-row insert, then (full form) updates of all of it."""


def _schedule(rng: random.Random, logs: Path) -> list[Run]:
    plan: list[str | None] = [None] * RANDOM_KILLS
    plan += [f"{name}:{rng.randint(1, 6)}" for name, n in FAILPOINTS.items() for _ in range(n)]
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


@pytest.fixture
def harness(database: Database, write_policy: WritePolicy, tmp_path: Path) -> Iterator[Harness]:
    install(database, write_policy)
    logs = tmp_path / "logs"
    logs.mkdir()
    harness = Harness(database, SEED, logs)
    try:
        yield harness
    finally:
        harness.stop_all()


def test_worker_killed_at_random_points_loses_and_duplicates_nothing(harness: Harness) -> None:
    db = harness.db
    rng = random.Random(SEED)
    schedule = _schedule(rng, harness.logs)
    seed = f"reliability seed {SEED} (CDC_AUDIT_RELIABILITY_SEED replays it)"
    watcher = CommitWatcher(db)
    workload = Workload(
        db, SEED, threads=3, pause=0.08, big=BIG_AT, operations=OPERATIONS_WITH_TRUNCATE
    )
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
    kills = time.monotonic() - started

    drained = drain(db.dsn)
    assert drained.returncode == 0, f"drain failed: {drained.stderr}\n{seed}\n{harness.context()}"
    harness.wait_until_gone({harness.observer.info.backend_pid})
    harness.check_positions(watcher, None)

    stats = workload.stats
    summary = (
        f"{seed}: {len(schedule)} kills in {kills:.0f}s; committed {dict(stats.committed)},"
        f" rolled back {dict(stats.rolled_back)}"
    )
    print(f"\n{summary}\n{harness.context(tail_runs=0)}")
    difference = compare_with_ledger(db)
    assert difference is None, f"{difference}\n{summary}\n{harness.context()}"

    # Each change once, and each one once per decoded commit: the server's own count.
    commits = watcher.poll()
    per_xid = dict(
        db.execute(
            "SELECT xid, count(*) FROM cdc_audit.event"
            " WHERE stream = 'user' AND table_name IS NOT NULL GROUP BY xid"
        )
    )
    miscounted = {
        xid: (c.changes, per_xid.get(xid, 0))
        for xid, c in commits.items()
        if c.changes != per_xid.get(xid, 0)
    }
    assert not miscounted, f"xid: (decoded changes, events in the trail): {miscounted}\n{summary}"

    problems = chain_problems(db)
    assert not problems, "\n".join(problems) + f"\n{summary}"
    contexts = db.execute(
        "SELECT actor_id, reason, context_missing, count(*) FROM cdc_audit.event GROUP BY 1, 2, 3"
    )
    assert [c[:3] for c in contexts] == [(ACTOR, REASON, False)], f"contexts: {contexts} {seed}"
    broken = db.execute(
        "SELECT id, seq, kind, old_n, prev_kind, prev_new FROM ("
        " SELECT id, seq, kind, old_n, lag(kind) OVER w AS prev_kind,"
        "  lag(new_n) OVER w AS prev_new, lag(seq) OVER w AS prev_seq FROM ("
        "   SELECT (row_key ->> 'id')::bigint AS id, seq, kind, (old ->> 'n')::int AS old_n,"
        "    (new ->> 'n')::int AS new_n FROM cdc_audit.event WHERE table_name = 'acct') e"
        " WINDOW w AS (PARTITION BY id ORDER BY seq)) h"
        " WHERE (prev_seq IS NULL AND kind <> 'insert') OR (prev_seq IS NOT NULL AND"
        "  (kind = 'insert' OR prev_kind = 'delete' OR old_n IS DISTINCT FROM prev_new))"
        " LIMIT 5"
    )
    assert not broken, f"row histories replayed or skipped (id, seq, kind, ...): {broken} {seed}"

    # The run exercised what it claims to.
    assert stats.committed["truncate"] and stats.committed["copy"], summary
    assert len(stats.big_xids) == len(BIG_AT), f"large transactions: {stats.big_xids} {seed}"
    assert sum(r.ended == "killed itself" for r in harness.runs) >= 3, harness.context(0)
    assert harness.kills_with_progress >= len(schedule) // 3, harness.context(0)
