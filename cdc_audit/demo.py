"""`make demo`: the main job end to end on a private, throwaway PostgreSQL.

Starts a cluster, creates pgbench's TPC-B tables, applies an example policy, runs a short
workload whose every transaction says who is acting, then reads the replication slot with the
pgoutput decoder and shows who changed what — each change joined with its context.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

import psycopg

from . import installer, status
from .ephemeral import EphemeralCluster
from .names import InstallNames
from .pgoutput import (
    Begin,
    Commit,
    Delete,
    Insert,
    LogicalMessage,
    RelationCache,
    Update,
    decode_message,
)
from .pgoutput import Relation as RelationMessage
from .policy import load_policy

POLICY = """\
version: 1
schema: cdc_audit
context:
  require: [actor_id]
  on_missing: record
streams:
  user: {retention: 400d}
  admin: {retention: 7y, require: [actor_id, reason], on_missing: reject}
tables:
  - {table: public.pgbench_accounts, stream: user, exclude: [filler]}
  - {table: public.pgbench_tellers, stream: user, exclude: [filler]}
  - {table: public.pgbench_history, stream: user, operations: [insert]}
  - {table: public.pgbench_branches, stream: admin, exclude: [filler]}
ddl: {stream: admin}
app_events: {stream: user}
"""

WORKLOAD = """\
\\set aid random(1, 100000 * :scale)
\\set bid random(1, 1 * :scale)
\\set tid random(1, 10 * :scale)
\\set delta random(-5000, 5000)
\\set actor random(1, 12)
BEGIN;
SELECT cdc_audit.set_context(actor_id => 'user-' || :actor, reason => 'transfer',
                             trace_id => 'trace-' || :aid);
UPDATE pgbench_accounts SET abalance = abalance + :delta WHERE aid = :aid;
UPDATE pgbench_tellers SET tbalance = tbalance + :delta WHERE tid = :tid;
INSERT INTO pgbench_history (tid, bid, aid, delta, mtime) VALUES (:tid, :bid, :aid, :delta, now());
END;
"""

ADMIN_CHANGE = """
BEGIN;
SELECT cdc_audit.set_context(actor_id => 'ops-anna', reason => 'branch audit CHG-1234');
UPDATE pgbench_branches SET bbalance = 0 WHERE bid = 1;
COMMIT;
"""


def say(text: str) -> None:
    print(text, flush=True)


def run(cmd: list[str]) -> None:
    subprocess.run(cmd, check=True, capture_output=True, text=True)


def main() -> int:
    cluster = EphemeralCluster()
    try:
        cluster.start()
        say(f"PostgreSQL started in {cluster.base_dir} on port {cluster.port} (pid {cluster.pid})")
        with tempfile.TemporaryDirectory(prefix="cdc-audit-demo-") as work:
            demo(cluster, Path(work))
    finally:
        cluster.stop()
        say("PostgreSQL stopped; its directory is removed")
    return 0


def demo(cluster: EphemeralCluster, work: Path) -> None:
    with psycopg.connect(cluster.dsn(), autocommit=True) as admin:
        admin.execute("CREATE DATABASE shop")
    dsn = cluster.dsn("shop")
    pgbench = str(cluster.bin_dir / "pgbench")
    run([pgbench, "-i", "-q", "-s", "1", dsn])
    say("created pgbench's TPC-B tables in database shop")

    policy_file = work / "policy.yaml"
    policy_file.write_text(POLICY)
    result = installer.apply(dsn, load_policy(policy_file), progress=lambda s: say(f"  apply: {s}"))
    say(f"applied the policy: {len(result.plan.steps)} steps, slot {result.slot}")
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("CREATE ROLE shop_app LOGIN IN ROLE cdc_audit_app")
        conn.execute("GRANT SELECT, INSERT, UPDATE ON ALL TABLES IN SCHEMA public TO shop_app")

    script = work / "transfer.sql"
    script.write_text(WORKLOAD)
    app_dsn = cluster.dsn("shop", user="shop_app")
    run([pgbench, "-n", "-T", "5", "-c", "2", "-j", "2", "-f", str(script), app_dsn])
    _admin_change(app_dsn)
    say("ran a 5-second workload: 12 actors moving money, one admin change with a reason")

    show_trail(dsn, result.slot)
    with psycopg.connect(dsn) as conn:
        sys.stdout.write(
            status.render_text(status.collect(conn, InstallNames("cdc_audit", "shop")))
        )


def _admin_change(dsn: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(ADMIN_CHANGE)


def show_trail(dsn: str, slot: str) -> None:
    """Decode what the slot holds, attach each change to its context, and summarise."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT data FROM pg_logical_slot_peek_binary_changes(%s, NULL, NULL,"
            " 'proto_version', '1', 'publication_names', 'cdc_audit', 'messages', 'true')",
            (slot,),
        ).fetchall()
    relations = RelationCache()
    by_actor: Counter[str] = Counter()
    by_table: Counter[tuple[str, str]] = Counter()
    contexts: dict[str, dict[str, object]] = {}
    transactions = 0
    for (data,) in rows:
        message = decode_message(data, relations)
        if isinstance(message, RelationMessage):
            relations.add(message)
        elif isinstance(message, Begin):
            contexts = {}
        elif isinstance(message, Commit):
            transactions += 1
        elif isinstance(message, LogicalMessage) and message.prefix == "cdc_audit.ctx":
            context = json.loads(message.content)
            contexts[str(context["stream"])] = context
        elif isinstance(message, Insert | Update | Delete):
            table = relations[message.relation_oid].name
            stream = "admin" if table == "pgbench_branches" else "user"
            actor = str(contexts.get(stream, {}).get("actor_id", "(no context)"))
            by_actor[actor] += 1
            by_table[(table, type(message).__name__.lower())] += 1
    say(f"\nthe slot holds {transactions} committed transactions; every change has its actor:")
    for (table, kind), count in sorted(by_table.items()):
        say(f"  {table:<20} {kind:<7} {count:>7}")
    say("  top actors:  " + ", ".join(f"{a} ({n})" for a, n in by_actor.most_common(5)))
    admin = [a for a in by_actor if a.startswith("ops-")]
    say(f"  admin stream: {', '.join(admin) or 'none'}")
    say("(read from the slot without consuming it: the slot keeps every change until sealed)\n")


if __name__ == "__main__":
    sys.exit(main())
