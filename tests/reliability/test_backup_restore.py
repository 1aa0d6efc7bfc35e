"""Scenario 8, backup and restore: `pg_dump` of an audited database, restored with `pg_restore`
into a fresh cluster (its roles first, from `pg_dumpall --roles-only`). The restored trail is
the same, byte for byte (its exports are identical to the source's) and verifies there,
signatures and anchors included. Replication slots are not part of a dump: a worker pointed
at the restored database finds no slot, records a gap in every stream and exits 3 instead of
resuming silently from the restored progress row, and the source goes on unaffected.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from cdc_audit.ephemeral import EphemeralCluster

from ..integration.fix_policy import BASE_POLICY, WritePolicy
from ..integration.pg import Database, run_cli
from ..integration.workload import SCHEMA, SCRATCH, Workload
from .conftest import PrivateCluster
from .harness import (
    OPERATIONS_WITH_TRUNCATE,
    SEED,
    STREAMS,
    TABLES,
    chain_problems,
    compare_with_ledger,
    create_database,
    gaps,
    sized,
    slot_name,
    worker_env,
)

pytestmark = pytest.mark.reliability

WORKLOAD_SECONDS = sized(3.0, 30.0)


def _cli(dsn: str, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return run_cli(*args, env=worker_env(dsn, **env))


def _tool(cluster: EphemeralCluster, name: str, *args: str) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [str(cluster.bin_dir / name), *args],
        capture_output=True,
        text=True,
        check=False,
        timeout=300,
    )
    assert result.returncode == 0, f"{name} failed:\n{result.stderr[-3000:]}"
    return result


def _export(dsn: str, out: Path) -> dict[str, bytes]:
    out.mkdir()
    exported = {}
    for stream in STREAMS:
        path = out / f"{stream}.jsonl"
        result = _cli(dsn, "export", "--stream", stream, "--output", str(path))
        assert result.returncode == 0, result.stderr
        exported[stream] = path.read_bytes()
    return exported


def test_a_restored_trail_verifies_and_its_worker_records_the_missing_slot_as_a_gap(
    database: Database,
    pg_cluster: EphemeralCluster,
    private_cluster: PrivateCluster,
    write_policy: WritePolicy,
    tmp_path: Path,
) -> None:
    source = database
    anchors = tmp_path / "anchors"
    source.execute(SCHEMA + SCRATCH)
    policy = write_policy(
        TABLES,
        "ddl: {stream: admin}\n"
        f"checkpoints: {{every_events: 50, every_seconds: 3600, anchor_dir: {anchors}}}\n",
        base=BASE_POLICY,
    )
    assert _cli(source.dsn, "apply", "--policy", str(policy)).returncode == 0
    keys = tmp_path / "keys"
    assert _cli(source.dsn, "keygen", "--out", str(keys)).returncode == 0
    public = str(keys / "signing_key.pub.pem")
    signing = {"CDC_AUDIT_SIGNING_KEY_FILE": str(keys / "signing_key.pem")}
    added = _cli(source.dsn, "keys", "add", public)
    assert added.returncode == 0, added.stderr
    workload = Workload(source, SEED, threads=2, big=(), operations=OPERATIONS_WITH_TRUNCATE)
    workload.start()
    workload.stop.wait(WORKLOAD_SECONDS)
    workload.finish()
    workload.raise_errors()
    with source.connect(autocommit=False) as conn:  # something in the admin stream too
        conn.execute("SELECT cdc_audit.set_context(actor_id => 'dba', reason => 'backup test')")
        conn.execute("CREATE TABLE kept_aside (id int PRIMARY KEY)")
        conn.commit()
    drained = _cli(source.dsn, "worker", "--drain", "--policy", str(policy), **signing)
    assert drained.returncode == 0, drained.stderr
    assert compare_with_ledger(source) is None, compare_with_ledger(source)
    before = _export(source.dsn, tmp_path / "source")

    # Dump the roles and the database; restore both into a fresh cluster.
    target = private_cluster()
    host = ("-h", "127.0.0.1", "-U", "postgres")
    roles = tmp_path / "roles.sql"
    _tool(
        pg_cluster,
        "pg_dumpall",
        *host,
        "-p",
        str(pg_cluster.port),
        "--roles-only",
        "-f",
        str(roles),
    )
    # Roles that exist already (the superuser) make psql complain and go on, as intended.
    subprocess.run(
        [str(target.bin_dir / "psql"), *host, "-p", str(target.port), "-q", "-f", str(roles)],
        capture_output=True,
        check=False,
        timeout=300,
    )
    dump = tmp_path / "audited.dump"
    _tool(
        pg_cluster,
        "pg_dump",
        *host,
        "-p",
        str(pg_cluster.port),
        "-Fc",
        "-f",
        str(dump),
        source.name,
    )
    # Under the same name: the anchor keeps each database's checkpoints under its name.
    restored = create_database(target, source.name)
    _tool(
        target,
        "pg_restore",
        *host,
        "-p",
        str(target.port),
        "--exit-on-error",
        "-d",
        restored.name,
        str(dump),
    )

    after = _export(restored.dsn, tmp_path / "restored")
    for stream in STREAMS:
        assert after[stream] == before[stream], (
            f"stream {stream}: the restored export differs from the source's"
            f" ({len(after[stream])} bytes, not {len(before[stream])}); seed {SEED}"
        )
        offline = run_cli(
            "verify",
            "--file",
            str(tmp_path / "restored" / f"{stream}.jsonl"),
            "--public-key",
            public,
        )
        assert offline.returncode == 0, (
            f"offline verify of {stream}: {offline.stdout}{offline.stderr}"
        )
    problems = chain_problems(restored)
    assert not problems, "\n".join(problems)
    assert compare_with_ledger(restored) is None, compare_with_ledger(restored)

    # The restored database has no slot: a gap, never a silent resume.
    slot = slot_name(restored)
    events = restored.scalar("SELECT count(*) FROM cdc_audit.event")
    for attempt in range(2):
        result = _cli(restored.dsn, "worker", "--policy", str(policy), **signing)
        assert result.returncode == 3, (
            f"worker on the restored database, attempt {attempt}: exit {result.returncode}\n"
            f"{result.stderr[-2000:]}"
        )
        assert "gap recorded" in result.stderr, result.stderr[-2000:]
    recorded = gaps(restored)
    assert sorted(s for s, _, _ in recorded) == sorted(STREAMS), f"gaps: {recorded}"
    assert all(new["slot"] == slot for _, _, new in recorded), recorded
    added_events = restored.scalar("SELECT count(*) FROM cdc_audit.event") - events
    assert added_events == len(STREAMS), f"{added_events} events added, want one gap per stream"
    verified = _cli(restored.dsn, "verify", "--anchor", str(anchors))
    assert verified.returncode == 0, f"verify after the gap: {verified.stdout}{verified.stderr}"
    problems = chain_problems(restored)
    assert not problems, "\n".join(problems)

    # The source never noticed.
    assert not gaps(source), "the source recorded a gap"
    assert _cli(source.dsn, "worker", "--drain", **signing).returncode == 0
