"""`make demo`: the main job end to end on a private, throwaway PostgreSQL.

Starts a cluster, creates pgbench's TPC-B tables, applies an example policy, runs a short
workload whose every transaction says who is acting, seals it with the worker, and shows who
changed what per stream, the chain heads, and each chain re-verified from what is stored.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psycopg

from . import installer, status
from .ephemeral import EphemeralCluster
from .names import InstallNames
from .policy import load_policy

POLICY = """\
version: 1
schema: cdc_audit
context:
  require: [actor_id]
  on_missing: record
streams:
  user: {retention: 400d}
  admin: {retention: 7y, sign: every_row, require: [actor_id, reason], on_missing: reject}
tables:
  - {table: public.pgbench_accounts, stream: user, exclude: [filler]}
  - {table: public.pgbench_tellers, stream: user, exclude: [filler]}
  - {table: public.pgbench_history, stream: user, operations: [insert]}
  - {table: public.pgbench_branches, stream: admin, exclude: [filler]}
ddl: {stream: admin}
app_events: {stream: user}
checkpoints: {every_events: 5000, every_seconds: 60, anchor_dir: ANCHOR_DIR}
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
UPDATE pgbench_branches SET bbalance = bbalance + 100 WHERE bid = 1;
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
    policy_file.write_text(POLICY.replace("ANCHOR_DIR", str(work / "anchors")))
    result = installer.apply(dsn, load_policy(policy_file), progress=lambda s: say(f"  apply: {s}"))
    say(f"applied the policy: {len(result.plan.steps)} steps, slot {result.slot}")
    private_key = work / "keys" / "signing_key.pem"
    cli(dsn, "keygen", "--out", str(private_key.parent))
    cli(dsn, "keys", "add", str(private_key.parent / "signing_key.pub.pem"))
    say("made the worker's Ed25519 signing key and registered its public key")
    with psycopg.connect(dsn) as conn:
        conn.execute(
            "SELECT cdc_audit.set_context(actor_id => 'dba-demo', reason => 'application role')"
        )
        conn.execute("CREATE ROLE shop_app LOGIN IN ROLE cdc_audit_app")
        conn.execute("GRANT SELECT, INSERT, UPDATE ON ALL TABLES IN SCHEMA public TO shop_app")

    script = work / "transfer.sql"
    script.write_text(WORKLOAD)
    app_dsn = cluster.dsn("shop", user="shop_app")
    run([pgbench, "-n", "-T", "5", "-c", "2", "-j", "2", "-f", str(script), app_dsn])
    _admin_change(app_dsn)
    say("ran a 5-second workload: 12 actors moving money, one admin change with a reason")

    seal(dsn, private_key)
    show_trail(dsn)
    prove_it(dsn, work)
    with psycopg.connect(dsn) as conn:
        sys.stdout.write(
            status.render_text(status.collect(conn, InstallNames("cdc_audit", "shop")))
        )


def _admin_change(dsn: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(ADMIN_CHANGE)


def cli(dsn: str, *args: str, check: bool = True, **env: str) -> subprocess.CompletedProcess[str]:
    """Run `cdc-audit ARGS` against the demo database."""
    return subprocess.run(
        [sys.executable, "-m", "cdc_audit.cli", *args],
        env={**os.environ, "CDC_AUDIT_DSN": dsn, **env},
        check=check,
        capture_output=True,
        text=True,
    )


def seal(dsn: str, private_key: Path) -> None:
    """Run the worker until everything committed so far is sealed and signed."""
    started = time.monotonic()
    cli(dsn, "worker", "--drain", CDC_AUDIT_SIGNING_KEY_FILE=str(private_key))
    say(
        f"\nsealed the slot into the trail with `cdc-audit worker --drain` in "
        f"{time.monotonic() - started:.1f} s"
    )


def show_trail(dsn: str) -> None:
    """Who changed what, per stream, from the sealed trail; then each chain re-verified."""
    with psycopg.connect(dsn) as conn:
        tables = conn.execute(
            "SELECT stream, coalesce(table_name, '(' || kind || ' events)'), kind, count(*)"
            " FROM cdc_audit.event GROUP BY 1, 2, 3 ORDER BY 1, 2, 3"
        ).fetchall()
        actors = conn.execute(
            "SELECT coalesce(actor_id, '(no context)'), count(*) FROM cdc_audit.event"
            " GROUP BY 1 ORDER BY 2 DESC, 1 LIMIT 5"
        ).fetchall()
        admin = conn.execute(
            "SELECT seq, kind, table_name, actor_id, reason, row_key::text, changed"
            " FROM cdc_audit.event WHERE stream = 'admin' ORDER BY seq LIMIT 5"
        ).fetchall()
        heads = conn.execute(
            "SELECT DISTINCT ON (stream) stream, seq, encode(hash, 'hex') FROM cdc_audit.event"
            " ORDER BY stream, seq DESC"
        ).fetchall()
        say("the trail, per stream (who changed what):")
        for stream, table, kind, count in tables:
            say(f"  {stream:<6} {table:<20} {kind:<8} {count:>7}")
        say("  top actors:  " + ", ".join(f"{a} ({n})" for a, n in actors))
        say("admin stream (changes need a reason):")
        for seq, kind, table, actor, reason, key, changed in admin:
            say(f"  #{seq} {kind} {table} {key} by {actor}, reason {reason!r}, changed {changed}")
        say("chain heads:")
        for stream, seq, digest in heads:
            say(f"  {stream:<6} seq {seq:>7}  head {digest[:16]}…")
    say("")


def prove_it(dsn: str, work: Path) -> None:
    """verify, offline verification of an export, and a superuser's edit being caught."""
    public_key = str(work / "keys" / "signing_key.pub.pem")
    say("$ cdc-audit verify")
    say(_indent(cli(dsn, "verify").stdout))
    export = work / "admin.jsonl"
    cli(dsn, "export", "--stream", "admin", "--output", str(export))
    offline = cli(dsn, "verify", "--file", str(export), "--public-key", public_key)
    say("$ cdc-audit export --stream admin ... && cdc-audit verify --file ... --public-key ...")
    say(_indent(offline.stdout))
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("SET session_replication_role = replica")  # past the guard triggers
        conn.execute(
            "UPDATE cdc_audit.event SET actor_id = 'someone-else'"
            " WHERE stream = 'user' AND seq = 1234"
        )
    say("a superuser rewrites who made event 1234 of stream user; then:")
    say("$ cdc-audit verify")
    tampered = cli(dsn, "verify", check=False)
    say(_indent(tampered.stdout) + f"  (exit code {tampered.returncode})")


def _indent(text: str) -> str:
    return "\n".join(f"  {line}" for line in text.strip().splitlines())


if __name__ == "__main__":
    sys.exit(main())
