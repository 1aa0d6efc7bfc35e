"""Scenario 2, database crash: PostgreSQL is stopped with `pg_ctl stop -m immediate` (no
shutdown checkpoint: the restart runs crash recovery) and started again, over and over, while
a workload commits and one worker process runs throughout. The worker reconnects by itself
with backoff; the slot may come back behind the trail (its position is saved only at
checkpoints), so transactions already sealed are offered again and must be skipped; nothing
committed is lost. Runs on a private cluster: the session's shared one is never crashed.
"""

from __future__ import annotations

import json
import random
import signal
import time
from collections.abc import Callable
from pathlib import Path

import psycopg
import pytest

from ..integration.fix_policy import WritePolicy
from .conftest import PrivateCluster
from .harness import (
    OPERATIONS_WITH_TRUNCATE,
    SEED,
    ResilientWorkload,
    WorkerProcess,
    chain_problems,
    compare_with_ledger,
    confirmed_flush,
    crash,
    create_database,
    drain,
    install,
    lsn,
    restart,
    sealed_up_to,
    sized,
    slot_name,
)

pytestmark = pytest.mark.reliability

CRASHES = sized(4, 10)
RUN_BETWEEN = sized((1.0, 3.0), (1.0, 6.0))
"""Seconds of workload between the worker's recovery and the next crash."""
DOWN = (0.0, 1.5)
"""Seconds the server stays down."""
RECOVERY_TIMEOUT = 90.0


def test_immediate_shutdowns_lose_nothing_and_duplicate_nothing(
    private_cluster: PrivateCluster, write_policy: WritePolicy, tmp_path: Path
) -> None:
    cluster = private_cluster()
    db = create_database(cluster, "crashed")
    install(db, write_policy)
    slot = slot_name(db)
    rng = random.Random(SEED)
    workload = ResilientWorkload(
        db, SEED, threads=2, pause=0.05, big=(2.0,), operations=OPERATIONS_WITH_TRUNCATE
    )
    worker = WorkerProcess(db.dsn, tmp_path / "worker.log", CDC_AUDIT_BATCH_MESSAGES="500")
    steps: list[str] = []

    def context() -> str:
        return f"seed {SEED}; " + "; ".join(steps) + f"\n    worker log:\n    {worker.tail(20)}"

    def recovered(after: int) -> bool:
        assert worker.running(), f"the worker exited with {worker.process.returncode}"
        with db.connect() as conn:
            return confirmed_flush(conn, slot) > after

    rewound = 0
    recoveries = []
    try:
        workload.start()
        for index in range(CRASHES):
            with db.connect() as conn:
                target = lsn(conn, "SELECT pg_current_wal_lsn()")
            recoveries.append(
                _wait(f"crash {index}: the worker to recover", recovered, target, context)
            )
            time.sleep(rng.uniform(*RUN_BETWEEN))
            crash(cluster)
            time.sleep(rng.uniform(*DOWN))
            restart(cluster)
            with db.connect() as conn:
                behind = sealed_up_to(conn) - confirmed_flush(conn, slot)
            rewound += behind > 0
            steps.append(f"crash {index}: slot {behind} bytes behind the trail after restart")
            workload.raise_errors()
        with db.connect() as conn:
            target = lsn(conn, "SELECT pg_current_wal_lsn()")
        recoveries.append(_wait("the worker to recover", recovered, target, context))
    finally:
        workload.finish()
    workload.raise_errors()
    code = worker.stop(signal.SIGTERM)
    drained = drain(db.dsn)
    stats = workload.stats
    summary = (
        f"seed {SEED}: {CRASHES} crashes, slot behind the trail after {rewound} of them,"
        f" recoveries {', '.join(f'{r:.1f}s' for r in recoveries)}; writers reconnected"
        f" {workload.reconnects} times; committed {dict(stats.committed)}"
    )
    print(f"\n{summary}")
    assert code == 0, f"the worker exited {code} on SIGTERM\n{summary}\n{context()}"
    assert drained.returncode == 0, f"drain failed: {drained.stderr}\n{summary}"
    assert not worker.errors(), f"the worker logged errors: {worker.errors()[:3]}\n{summary}"
    # Each crash is a new outage: the backoff starts again from its shortest wait, instead of
    # going on from where the previous outage left it (30 s after a few crashes).
    retries = [
        json.loads(line).get("retry_in")
        for line in worker.text().splitlines()
        if '"session failed, retrying"' in line
    ]
    assert retries.count(0.5) >= CRASHES, f"backoff of each retry: {retries}\n{summary}"
    difference = compare_with_ledger(db)
    assert difference is None, f"{difference}\n{summary}\n{context()}"
    problems = chain_problems(db)
    assert not problems, "\n".join(problems) + f"\n{summary}"
    assert stats.committed["truncate"] and stats.big_xids, summary


def _wait(what: str, done: Callable[[int], bool], target: int, context: Callable[[], str]) -> float:
    """Seconds until `done(target)`; fails after RECOVERY_TIMEOUT."""
    started = time.monotonic()
    while True:
        try:
            if done(target):
                return time.monotonic() - started
        except psycopg.OperationalError:
            pass
        assert time.monotonic() - started < RECOVERY_TIMEOUT, (
            f"{what}: not within {RECOVERY_TIMEOUT:.0f}s\n{context()}"
        )
        time.sleep(0.2)
