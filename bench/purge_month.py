"""How long a retention purge of one month of events takes, against deleting the same rows.

On a private, throwaway PostgreSQL (`EphemeralCluster`):

1. setup: a policy with stream ``user`` (retention 30 days) and a registered signing key;
2. a month of history: ``--events`` (default 1,000,000) events of stream ``user`` with commit
   times in January 2026, sealed and signed (a checkpoint every 10,000 events) the way the
   worker writes them, through the trail writer; then a worker is started to seal the purge
   records;
3. baseline, in the same run: the same rows copied into a plain table with the event table's
   indexes, then ``DELETE`` of all of them and the ``VACUUM`` that reclaims the space (what a
   retention by DELETE costs);
4. the purge: `cdc_audit.purge.purge` (what ``cdc-audit purge`` and the scheduled job run), timed
   as a whole and in its parts: planning (which partitions, the checkpoint and Merkle
   frontier of the range), recording (emitting the purge record and waiting until the worker
   has sealed and signed it) and the drop itself;
5. ``cdc-audit verify`` of what remains must exit 0.

Run ``python -m bench.purge_month --help``; ``--quick`` is a smoke run (100,000 events).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path

import psycopg

from bench.worker_throughput import DATABASE, Bench, BenchError, machine_facts, say
from cdc_audit.chain import DraftEvent
from cdc_audit.checkpointer import Checkpointer
from cdc_audit.db import connect
from cdc_audit.ephemeral import EphemeralCluster
from cdc_audit.keys import load_signing_key
from cdc_audit.policy import CheckpointPolicy, load_policy
from cdc_audit.purge import plan_purge, purge
from cdc_audit.trail import Progress, TrailWriter, install_names

POLICY = """\
version: 1
schema: cdc_audit
streams:
  user: {retention: 30d}
tables:
  - {table: public.accounts, stream: user}
"""
JANUARY = datetime(2026, 1, 1, tzinfo=UTC)
BATCH = 50_000
EVERY = 10_000


class PurgeBench(Bench):
    def __init__(self, cluster: EphemeralCluster, work: Path) -> None:
        super().__init__(cluster, work, pgbench="", scale=0)

    def setup(self) -> None:
        with psycopg.connect(self.cluster.dsn(), autocommit=True) as admin:
            admin.execute(f"CREATE DATABASE {DATABASE}")
        self.sql("CREATE TABLE accounts (id bigint PRIMARY KEY, owner text)")
        self.policy.write_text(POLICY)
        self.cli("--policy", str(self.policy), "apply")
        made = self.cli("keygen", "--out", str(self.work / "keys"))
        self.private = Path(made.stdout.splitlines()[1].split(": ", 1)[1])
        self.cli("keys", "add", str(self.work / "keys" / "signing_key.pub.pem"))
        self.env["CDC_AUDIT_SIGNING_KEY_FILE"] = str(self.private)
        self.env["CDC_AUDIT_HEARTBEAT_SECONDS"] = "0.2"

    def seal_history(self, events: int) -> float:
        """Seal `events` January events of stream user, signed; returns seconds."""
        started = time.perf_counter()
        key = load_signing_key(self.private)
        spacing = timedelta(days=28) / max(events, 1)
        with connect(self.dsn) as conn:
            writer = TrailWriter(conn, install_names(conn, "cdc_audit"))
            chain = writer.chain("user")
            signer = Checkpointer(key, CheckpointPolicy(every_events=EVERY))
            signer.load("user", 0, [])
            done = 0
            while done < events:
                sealed, checkpoints = [], []
                for n in range(done, min(done + BATCH, events)):
                    event = chain.seal(_draft(n, JANUARY + n * spacing))
                    sealed.append(event)
                    if signer.add("user", event.hash):
                        checkpoints.append(signer.make(chain))
                done += len(sealed)
                if done == events and signer.pending():
                    checkpoints.append(signer.make(chain))
                writer.write(sealed, Progress(), checkpoints)
                say(f"  sealed {done:,} of {events:,} January events")
        return time.perf_counter() - started

    def delete_baseline(self) -> tuple[float, float]:
        """DELETE of the same rows from a plain copy, and the VACUUM after it (seconds)."""
        self.sql(
            "CREATE TABLE delete_copy (LIKE cdc_audit.event INCLUDING INDEXES);"
            "INSERT INTO delete_copy SELECT * FROM cdc_audit.event_2026_01_user"
        )
        started = time.perf_counter()
        self.sql("DELETE FROM delete_copy")
        deleted = time.perf_counter() - started
        started = time.perf_counter()
        self.sql("VACUUM delete_copy")
        vacuumed = time.perf_counter() - started
        self.sql("DROP TABLE delete_copy")
        return deleted, vacuumed


def _draft(n: int, when: datetime) -> DraftEvent:
    return DraftEvent(
        stream="user",
        kind="insert",
        event_id=uuid.uuid4(),
        commit_lsn=None,
        commit_time=when,
        xid=None,
        schema_name="public",
        table_name="accounts",
        row_key={"id": n + 1},
        new={"id": n + 1, "owner": f"owner {n + 1}"},
        actor_id="history",
        reason="bench",
    )


def run(args: argparse.Namespace) -> int:
    cluster = EphemeralCluster()
    with tempfile.TemporaryDirectory(prefix="cdc-audit-bench-purge-") as tmp:
        try:
            cluster.start()
            bench = PurgeBench(cluster, Path(tmp))
            bench.setup()
            for key, value in machine_facts(bench).items():
                say(f"  {key}: {value}")
            seal_seconds = bench.seal_history(args.events)
            say(f"history: {args.events:,} events sealed in {seal_seconds:.1f} s")
            deletes = [bench.delete_baseline() for _ in range(args.rounds)]
            worker = bench.worker()
            try:
                bench.cli("checkpoint")  # the worker is up and has caught up
                policy = load_policy(bench.policy).policy
                now = datetime.now(UTC)
                with connect(bench.dsn) as conn:
                    started = time.perf_counter()
                    plans = plan_purge(conn, "cdc_audit", policy, now)
                    planning = time.perf_counter() - started
                    going = [p.name for p in plans if p.drop]
                    if "event_2026_01_user" not in going:
                        raise BenchError(f"January is not purgeable: {plans[0].describe()}")
                    started = time.perf_counter()
                    result = purge(conn, "cdc_audit", policy, now)
                    whole = time.perf_counter() - started
            finally:
                worker.terminate()
                worker.wait(30)
            verified = bench.cli("verify")
            say(verified.stdout.strip())
        finally:
            cluster.stop()
    delete = statistics.median(d for d, _ in deletes)
    vacuum = statistics.median(v for _, v in deletes)
    say("")
    say(f"events in the month: {args.events:,}; dropped by the purge: {result.events:,}")
    say(f"purge, whole (plan, record, wait for the worker to seal it, drop): {whole:.3f} s")
    say(f"  planning alone (partitions, counts, checkpoint, Merkle frontier): {planning:.3f} s")
    say(f"  recording (emit, worker seals and signs the record): {result.seconds['record']:.3f} s")
    say(f"  the drop (drop_event_partition and the purge log): {result.seconds['drop']:.3f} s")
    say(
        f"baseline: DELETE of the same rows {delete:.3f} s + VACUUM {vacuum:.3f} s"
        f" (median of {args.rounds})"
    )
    say(f"ratio purge / (DELETE + VACUUM): {whole / (delete + vacuum):.3f}")
    return 0


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.purge_month", description=__doc__)
    parser.add_argument("--events", type=int, default=1_000_000, help="events in the month")
    parser.add_argument("--rounds", type=int, default=3, help="baseline repeats (median)")
    parser.add_argument("--quick", action="store_true", help="100,000 events, one round")
    args = parser.parse_args(argv)
    if args.quick:
        args.events, args.rounds = 100_000, 1
    return args


def main(argv: Sequence[str] | None = None) -> int:
    try:
        return run(parse_args(argv))
    except BenchError as exc:
        print(f"purge_month: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
