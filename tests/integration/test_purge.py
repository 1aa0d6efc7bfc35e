"""Retention purge: whole partitions go once their stream's retention has passed, recorded in
the chain first, and what remains still verifies, online and from an export.

Events cannot be committed in the past, so the old months are written the way the worker
writes them (sealed and signed with the worker's key, through the trail writer) with commit
times in January and February 2026; the worker then seals everything newer for real.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg
import pytest

from cdc_audit.chain import DraftEvent
from cdc_audit.checkpointer import Checkpointer
from cdc_audit.db import connect
from cdc_audit.keys import load_signing_key
from cdc_audit.policy import CheckpointPolicy, load_policy
from cdc_audit.purge import purge
from cdc_audit.trail import Progress, TrailWriter, install_names

from .fix_policy import WritePolicy
from .pg import Database, run_cli
from .test_worker import RunningWorker, ctx

POLICY = """\
version: 1
schema: cdc_audit
context:
  require: [actor_id]
  on_missing: record
streams:
  user: {retention: 30d}
  admin: {retention: 7y}
tables:
  - {table: public.accounts, stream: user}
  - {table: public.roles, stream: admin}
"""
JANUARY = datetime(2026, 1, 10, 12, 0, tzinfo=UTC)
FEBRUARY = datetime(2026, 2, 10, 12, 0, tzinfo=UTC)


class Purged:
    def __init__(self, db: Database, tmp: Path, policy: Path) -> None:
        self.db = db
        self.tmp = tmp
        self.policy = policy
        self.key = tmp / "keys" / "signing_key.pem"

    def cli(self, *args: str) -> Any:
        env = {
            **os.environ,
            "CDC_AUDIT_DSN": self.db.dsn,
            "CDC_AUDIT_POLICY": str(self.policy),
            "CDC_AUDIT_SIGNING_KEY_FILE": str(self.key),
        }
        return run_cli(*args, env=env)

    def worker(self) -> RunningWorker:
        return RunningWorker(
            {
                **os.environ,
                "CDC_AUDIT_DSN": self.db.dsn,
                "CDC_AUDIT_SIGNING_KEY_FILE": str(self.key),
                "CDC_AUDIT_HEARTBEAT_SECONDS": "0.5",
            }
        )

    def seal_history(self, stream: str, months: list[tuple[datetime, int]], every: int) -> None:
        """Seal events of `stream` at the given commit times, signed every `every` events
        (so a checkpoint range can span two months), as the worker would have."""
        key = load_signing_key(self.key)
        with connect(self.db.dsn) as conn:
            writer = TrailWriter(conn, install_names(conn, "cdc_audit"))
            chain = writer.chain(stream)
            signer = Checkpointer(key, CheckpointPolicy(every_events=every))
            signer.load(stream, 0, [])
            sealed, checkpoints = [], []
            for when, count in months:
                for n in range(count):
                    draft = DraftEvent(
                        stream=stream,
                        kind="insert",
                        event_id=uuid.uuid4(),
                        commit_lsn=None,
                        commit_time=when.replace(minute=n),
                        xid=None,
                        schema_name="public",
                        table_name="accounts",
                        row_key={"id": len(sealed) + 1},
                        new={"id": len(sealed) + 1},
                        actor_id="history",
                    )
                    event = chain.seal(draft)
                    sealed.append(event)
                    if signer.add(stream, event.hash):
                        checkpoints.append(signer.make(chain))
            if signer.pending():
                checkpoints.append(signer.make(chain))
            writer.write(sealed, Progress(), checkpoints)

    def count(self, stream: str) -> int:
        return int(
            self.db.scalar("SELECT count(*) FROM cdc_audit.event WHERE stream = %s", (stream,))
        )

    def leaves(self) -> list[str]:
        return [r[0] for r in self.db.execute("SELECT leaf_name FROM cdc_audit.event_leaves()")]


@pytest.fixture
def purged(database: Database, write_policy: WritePolicy, tmp_path: Path) -> Iterator[Purged]:
    database.execute(
        "CREATE TABLE accounts (id int PRIMARY KEY, owner text);"
        "CREATE TABLE roles (id int PRIMARY KEY, name text)"
    )
    policy = tmp_path / "policy.yaml"
    policy.write_text(POLICY)
    setup = Purged(database, tmp_path, policy)
    assert setup.cli("keygen", "--out", str(tmp_path / "keys")).returncode == 0
    assert setup.cli("apply").returncode == 0
    assert setup.cli("keys", "add", str(tmp_path / "keys" / "signing_key.pub.pem")).returncode == 0
    yield setup


def _write_now(db: Database, ids: range) -> None:
    with db.connect(autocommit=False) as conn:
        for i in ids:
            ctx(conn, "alice", "now")
            conn.execute("INSERT INTO accounts VALUES (%s, 'x')", (i,))
            conn.execute("INSERT INTO roles VALUES (%s, 'r')", (i,))
            conn.commit()


def _verify_ok(purged: Purged, stream: str) -> str:
    result = purged.cli("verify", "--stream", stream)
    assert result.returncode == 0, (result.stdout, result.stderr)
    return str(result.stdout)


def test_nothing_young_is_purged_and_a_dry_run_changes_nothing(purged: Purged) -> None:
    purged.seal_history("user", [(JANUARY, 10)], every=4)
    before = purged.leaves()
    dry = purged.cli("purge", "--dry-run")
    assert dry.returncode == 0, dry.stderr
    lines = dry.stdout.splitlines()
    assert "drop event_2026_01_user (2026-01-01 to 2026-02-01): user seq 1-10 (10 events)" in lines
    assert any(
        line.startswith("keep event_2026_01_admin") and "retention" in line for line in lines
    )
    assert "1 partition(s) and 10 event(s) would be purged" in dry.stderr
    assert purged.leaves() == before
    assert purged.count("user") == 10


def test_purge_records_then_drops_and_what_remains_verifies(purged: Purged) -> None:
    # January 1-10 and February 11-20, one checkpoint spanning both months (7-20).
    purged.seal_history("user", [(JANUARY, 10), (FEBRUARY, 10)], every=6)
    worker = purged.worker()
    try:
        _write_now(purged.db, range(1, 6))
        # In early March, with 30 days of retention, January has gone and February not yet.
        march = datetime(2026, 3, 5, tzinfo=UTC)
        with connect(purged.db.dsn) as conn:
            result = purge(conn, "cdc_audit", load_policy(purged.policy).policy, march)
        assert "event_2026_01_user" in result.dropped
        assert "event_2026_02_user" not in result.dropped
        assert result.events == 10
        assert "event_2026_01_user" not in purged.leaves()
        assert purged.db.scalar("SELECT min(seq) FROM cdc_audit.event WHERE stream = 'user'") == 11
        # The record is in the chain, and the log says what went.
        record = purged.db.execute(
            "SELECT new FROM cdc_audit.event WHERE stream = 'user' AND kind = 'purge'"
        )
        assert len(record) == 1
        fields = record[0][0]
        assert (fields["first_seq"], fields["last_seq"], fields["event_count"]) == (1, 10, 10)
        assert fields["merkle_size"] == 4  # seq 7-10 of the checkpoint 7-20
        assert purged.db.execute(
            "SELECT stream, partition_name, first_seq, last_seq FROM cdc_audit.purge_log"
        ) == [("user", "event_2026_01_user", 1, 10)]
        assert "events verified" in _verify_ok(purged, "user")
        _verify_ok(purged, "admin")

        # Today February has gone too (its checkpoint started in January: the frontier).
        dropped = purged.cli("purge")
        assert dropped.returncode == 0, dropped.stderr
        assert "purged 1 partition(s), 10 event(s)" in dropped.stdout
        assert purged.db.scalar("SELECT min(seq) FROM cdc_audit.event WHERE stream = 'user'") == 21
        _write_now(purged.db, range(6, 9))
        assert purged.cli("checkpoint").returncode == 0
        _verify_ok(purged, "user")
        # The export starts from the purge record and verifies offline too.
        export = purged.tmp / "user.jsonl"
        exported = purged.cli("export", "--stream", "user", "--output", str(export))
        assert exported.returncode == 0, exported.stderr
        first = export.read_text().splitlines()[0]
        assert first.startswith('{"record":') and '"type":"purge"' in first
        offline = purged.cli(
            "verify", "--file", str(export), "--public-key", str(purged.key.with_suffix(".pub.pem"))
        )
        assert offline.returncode == 0, (offline.stdout, offline.stderr)
        # Events sealed today were never touched.
        assert purged.count("admin") == 8
    finally:
        code, log = worker.stop()
        assert code == 0, log


def test_a_partition_dropped_without_a_purge_record_fails_verification(purged: Purged) -> None:
    purged.seal_history("user", [(JANUARY, 10), (FEBRUARY, 5)], every=5)
    with psycopg.connect(purged.db.dsn, autocommit=True) as conn:
        conn.execute("DROP TABLE cdc_audit.event_2026_01_user")
    result = purged.cli("verify", "--stream", "user")
    assert result.returncode == 1
    assert "FAILED at seq 1: events 1-10 are missing and no purge record accounts for them" in (
        result.stdout
    )


def test_the_drop_function_refuses_what_has_no_sealed_record(purged: Purged) -> None:
    purged.seal_history("user", [(JANUARY, 3)], every=3)
    with pytest.raises(psycopg.errors.InvalidParameterValue, match="no sealed purge event"):
        purged.db.execute(
            "SELECT cdc_audit.drop_event_partition('event_2026_01_user', '2026-03-01')"
        )
    with pytest.raises(psycopg.errors.InvalidParameterValue, match="may hold events younger"):
        purged.db.execute(
            "SELECT cdc_audit.drop_event_partition('event_2026_01_user', '2026-01-05')"
        )
    assert purged.count("user") == 3


def test_purge_waits_for_the_worker_and_drops_nothing_without_it(purged: Purged) -> None:
    purged.seal_history("user", [(JANUARY, 3)], every=3)
    result = purged.cli("purge", "--timeout", "1")
    assert result.returncode == 3
    assert result.stderr.strip().endswith("nothing was dropped (is `cdc-audit worker` running?)")
    assert purged.count("user") == 3
