"""The worker signs: checkpoints, anchors, every-row signatures, key rotation, proofs."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import Any

import psycopg
import pytest

from .fix_policy import BASE_POLICY, WritePolicy
from .pg import Database, run_cli
from .test_worker import RunningWorker, ctx

SIGNED_BASE = BASE_POLICY.replace(
    "admin: {retention: 7y,", "admin: {retention: 7y, sign: every_row,"
)


class Signed:
    def __init__(self, db: Database, tmp: Path, policy: Path) -> None:
        self.db = db
        self.tmp = tmp
        self.anchors = tmp / "anchors"
        self.policy = policy
        self.keys: dict[str, Path] = {}

    def cli(self, *args: str, **env: str) -> Any:
        return run_cli(*args, env={**os.environ, "CDC_AUDIT_DSN": self.db.dsn, **env})

    def keygen(self, name: str, register: bool = True) -> Path:
        out = self.tmp / name
        assert self.cli("keygen", "--out", str(out)).returncode == 0
        if register:
            added = self.cli("keys", "add", str(out / "signing_key.pub.pem"))
            assert added.returncode == 0, added.stderr
        self.keys[name] = out
        return out / "signing_key.pem"

    def drain(self, key: str = "k1") -> Any:
        private = str(self.keys[key] / "signing_key.pem")
        result = self.cli("worker", "--drain", CDC_AUDIT_SIGNING_KEY_FILE=private)
        assert result.returncode == 0, result.stderr
        return result

    def write(self, count: int, table: str = "accounts", start: int = 0) -> None:
        with self.db.connect(autocommit=False) as conn:
            for i in range(start, start + count):
                ctx(conn, "u1", "because")
                conn.execute(f"INSERT INTO {table} VALUES (%s, 'x')", (i,))
                conn.commit()

    def checkpoints(self, stream: str) -> list[tuple[int, int, str]]:
        return [
            (r[0], r[1], r[2])
            for r in self.db.execute(
                "SELECT first_seq, last_seq, key_id FROM cdc_audit.checkpoint"
                " WHERE stream = %s ORDER BY last_seq",
                (stream,),
            )
        ]

    def pub(self, key: str = "k1") -> str:
        return str(self.keys[key] / "signing_key.pub.pem")


@pytest.fixture
def signed(database: Database, write_policy: WritePolicy, tmp_path: Path) -> Signed:
    database.execute(
        "CREATE TABLE accounts (id int PRIMARY KEY, owner text);"
        "CREATE TABLE roles (id int PRIMARY KEY, name text)"
    )
    anchors = tmp_path / "anchors"
    policy = write_policy(
        "  - {table: public.accounts, stream: user}\n  - {table: public.roles, stream: admin}\n",
        f"checkpoints: {{every_events: 10, every_seconds: 3600, anchor_dir: {anchors}}}\n",
        base=SIGNED_BASE,
    )
    s = Signed(database, tmp_path, policy)
    result = run_cli("apply", "--dsn", database.dsn, "--policy", str(policy))
    assert result.returncode == 0, result.stderr
    return s


def test_checkpoints_every_n_events_and_the_tail_are_signed_and_anchored(signed: Signed) -> None:
    signed.keygen("k1")
    signed.write(25)
    signed.drain()
    key_id = signed.checkpoints("user")[0][2]
    assert signed.checkpoints("user") == [(1, 10, key_id), (11, 20, key_id), (21, 25, key_id)]
    files = sorted((signed.anchors / signed.db.name / "cdc_audit" / "user").iterdir())
    assert [f.name for f in files] == [f"{n:020d}.json" for n in (10, 20, 25)]
    assert stat.S_IMODE(files[0].stat().st_mode) == 0o444
    record = json.loads(files[-1].read_text())
    assert record["statement"]["last_seq"] == 25 and record["statement"]["count"] == 5
    verify = signed.cli("verify")
    assert verify.returncode == 0, verify.stdout + verify.stderr
    assert "stream user: ok: 25 events verified, 3 checkpoint(s), signed up to seq 25," in (
        verify.stdout
    )
    assert "anchored up to seq 25" in verify.stdout


def test_without_an_anchor_verify_says_unanchored(
    database: Database, write_policy: WritePolicy, tmp_path: Path
) -> None:
    database.execute("CREATE TABLE accounts (id int PRIMARY KEY, owner text)")
    policy = write_policy("  - {table: public.accounts, stream: user}\n")
    assert run_cli("apply", "--dsn", database.dsn, "--policy", str(policy)).returncode == 0
    s = Signed(database, tmp_path, policy)
    s.keygen("k1")
    s.write(3)
    s.drain()
    verify = s.cli("verify")
    assert verify.returncode == 0
    assert "unanchored" in verify.stdout and "anchored up to" not in verify.stdout


def test_every_row_streams_carry_a_signature_on_each_event(signed: Signed) -> None:
    signed.keygen("k1")
    signed.write(3, table="roles")
    signed.drain()
    rows = signed.db.execute(
        "SELECT signature IS NOT NULL, key_id FROM cdc_audit.event WHERE stream = 'admin'"
        " AND kind = 'insert'"
    )
    assert len(rows) == 3 and all(has and key for has, key in rows)
    user = signed.db.execute(
        "SELECT count(*) FROM cdc_audit.event WHERE signature IS NOT NULL AND stream = 'user'"
    )
    assert user == [(0,)]


def test_the_worker_refuses_an_unregistered_key_and_every_row_without_a_key(
    signed: Signed,
) -> None:
    private = signed.keygen("stranger", register=False)
    refused = signed.cli("worker", "--drain", CDC_AUDIT_SIGNING_KEY_FILE=str(private))
    assert refused.returncode == 2
    assert "is not registered in cdc_audit.signing_key: run cdc-audit keys add" in refused.stderr
    keyless = signed.cli("worker", "--drain")
    assert keyless.returncode == 2
    assert "stream admin is signed every row: set CDC_AUDIT_SIGNING_KEY_FILE" in keyless.stderr


def test_rotation_is_recorded_and_old_signatures_still_verify(signed: Signed) -> None:
    signed.keygen("k1")
    signed.write(12)
    signed.drain()
    signed.keygen("k2")
    old_id = signed.checkpoints("user")[0][2]
    retire = signed.cli("keys", "retire", old_id)
    assert retire.returncode == 0, retire.stderr
    signed.write(5, start=100)
    signed.drain("k2")
    signed.drain("k2")  # a restart records the rotation once
    rotations = signed.db.execute(
        "SELECT stream, new->>'previous_key_id', new->>'key_id' FROM cdc_audit.event"
        " WHERE kind = 'key_rotation' ORDER BY stream"
    )
    new_id = signed.checkpoints("user")[-1][2]
    assert new_id != old_id
    assert rotations == [("user", old_id, new_id)]  # admin has nothing signed to rotate
    verify = signed.cli("verify")
    assert verify.returncode == 0, verify.stdout + verify.stderr
    # Offline, both public keys are needed: each signed part of the stream.
    export = signed.tmp / "user.jsonl"
    assert signed.cli("export", "--stream", "user", "--output", str(export)).returncode == 0
    only_new = signed.cli("verify", "--file", str(export), "--public-key", signed.pub("k2"))
    assert only_new.returncode == 1 and "unregistered key" in only_new.stdout
    both = signed.cli(
        "verify", "--file", str(export), "--public-key", signed.pub("k1"),
        "--public-key", signed.pub("k2"),
    )  # fmt: skip
    assert both.returncode == 0, both.stdout


def test_checkpoint_on_request_while_the_worker_runs(signed: Signed) -> None:
    signed.keygen("k1")
    worker = RunningWorker(
        {
            **os.environ,
            "CDC_AUDIT_DSN": signed.db.dsn,
            "CDC_AUDIT_SIGNING_KEY_FILE": str(signed.keys["k1"] / "signing_key.pem"),
        }
    )
    try:
        signed.write(4)
        made = signed.cli("checkpoint", "--timeout", "30")
        assert made.returncode == 0, made.stderr
        assert "user: signed up to seq 4 by" in made.stdout
        anchored = signed.anchors / signed.db.name / "cdc_audit" / "user"
        assert (anchored / f"{4:020d}.json").exists()
        signed.write(2, start=10)
        again = signed.cli("checkpoint", "--timeout", "30")
        assert again.returncode == 0 and "user: signed up to seq 6 by" in again.stdout
        assert (anchored / f"{6:020d}.json").exists()
    finally:
        code, log = worker.stop()
    assert code == 0, log


def test_checkpoint_without_a_worker_times_out_with_a_reason(signed: Signed) -> None:
    signed.write(2)
    result = signed.cli("checkpoint", "--timeout", "1")
    assert result.returncode == 3
    assert "is `cdc-audit worker` running" in result.stderr


def test_an_inclusion_proof_verifies_offline_and_catches_an_edit(signed: Signed) -> None:
    signed.keygen("k1")
    signed.write(25)
    signed.drain()
    event_id = str(
        signed.db.scalar("SELECT event_id FROM cdc_audit.event WHERE stream = 'user' AND seq = 17")
    )
    proof = signed.tmp / "proof.json"
    made = signed.cli("prove", event_id, "--output", str(proof))
    assert made.returncode == 0, made.stderr
    ok = signed.cli("verify", "--proof", str(proof), "--public-key", signed.pub())
    assert ok.returncode == 0, ok.stderr
    assert f"event {event_id} (stream user, seq 17) is included in the checkpoint of seq 11-20" in (
        ok.stdout
    )
    document = json.loads(proof.read_text())
    document["event"]["new"]["owner"] = "forged"
    forged = signed.tmp / "forged.json"
    forged.write_text(json.dumps(document))
    bad = signed.cli("verify", "--proof", str(forged), "--public-key", signed.pub())
    assert bad.returncode == 1
    assert "seq 17: payload changed" in bad.stderr
    document = json.loads(proof.read_text())
    document["leaf_index"] = 5
    forged.unlink()
    forged.write_text(json.dumps(document))
    moved = signed.cli("verify", "--proof", str(forged), "--public-key", signed.pub())
    assert moved.returncode == 1 and "position" in moved.stderr
    assert signed.cli("prove", event_id, "--output", str(proof)).returncode == 2  # no overwrite


def test_an_export_from_the_middle_verifies_from_the_preceding_checkpoint(signed: Signed) -> None:
    signed.keygen("k1")
    signed.write(25)
    signed.drain()
    export = signed.tmp / "part.jsonl"
    made = signed.cli("export", "--stream", "user", "--from-seq", "15", "--output", str(export))
    assert made.returncode == 0, made.stderr
    assert "(seq 11-25)" in made.stderr
    lines = export.read_text().splitlines()
    assert json.loads(lines[0])["type"] == "checkpoint"
    assert json.loads(lines[0])["statement"]["last_seq"] == 10
    verify = signed.cli("verify", "--file", str(export), "--public-key", signed.pub())
    assert verify.returncode == 0, verify.stdout
    assert "15 events verified" in verify.stdout and "unanchored" in verify.stdout

    again = signed.cli("export", "--stream", "user", "--output", str(export))
    assert again.returncode == 2
    assert again.stderr.strip().endswith(
        f"{export} already exists; refusing to overwrite an export"
    )
    nowhere = signed.tmp / "missing" / "all.jsonl"
    lost = signed.cli("export", "--stream", "user", "--output", str(nowhere))
    assert lost.returncode == 2 and "Traceback" not in lost.stderr
    assert lost.stderr.strip().endswith(
        f"{nowhere}: cannot write an export: No such file or directory"
    )


def test_erasure_removes_payloads_keeps_the_chain_and_is_recorded(signed: Signed) -> None:
    signed.keygen("k1")
    signed.write(12)
    signed.drain()
    target = str(
        signed.db.scalar("SELECT event_id FROM cdc_audit.event WHERE stream = 'user' AND seq = 3")
    )
    one = signed.cli("erase", "--event", target, "--reason", "GDPR request 17")
    assert one.returncode == 0, one.stderr
    by_key = signed.cli("erase", "--table", "accounts", "--key", "id=7", "--reason", "GDPR 18")
    assert by_key.returncode == 0 and "of 1 event(s)" in by_key.stderr
    signed.drain()
    erased = signed.db.execute(
        "SELECT seq, new IS NULL AND old IS NULL AND actor_id IS NULL AND row_key IS NULL,"
        " erased_at IS NOT NULL FROM cdc_audit.event WHERE erased_at IS NOT NULL ORDER BY seq"
    )
    assert erased == [(3, True, True), (8, True, True)]
    recorded = signed.db.execute(
        "SELECT new->>'seq', new->>'why' FROM cdc_audit.event WHERE kind = 'erasure' ORDER BY seq"
    )
    assert recorded == [("3", "GDPR request 17"), ("8", "GDPR 18")]
    verify = signed.cli("verify")
    assert verify.returncode == 0, verify.stdout + verify.stderr
    assert "2 erased payload(s)" in verify.stdout
    export = signed.tmp / "erased.jsonl"
    assert signed.cli("export", "--stream", "user", "--output", str(export)).returncode == 0
    offline = signed.cli("verify", "--file", str(export), "--public-key", signed.pub())
    assert offline.returncode == 0, offline.stdout
    assert '"erased":true' in export.read_text()
    again = signed.cli("erase", "--event", target, "--reason", "twice")
    assert again.returncode == 0 and "of 0 event(s)" in again.stderr


def test_an_erasure_not_done_through_erase_is_caught(signed: Signed) -> None:
    signed.keygen("k1")
    signed.write(5)
    signed.drain()
    with signed.db.connect() as conn:
        conn.execute("SET session_replication_role = replica")
        conn.execute(
            "UPDATE cdc_audit.event SET new = NULL, old = NULL, row_key = NULL, actor_id = NULL,"
            " reason = NULL, context = NULL, changed = NULL, erased_at = now()"
            " WHERE stream = 'user' AND seq = 2"
        )
    verify = signed.cli("verify")
    assert verify.returncode == 1
    assert "stream user: FAILED at seq 2: payload erased without a recorded erasure" in (
        verify.stdout
    )


def test_the_guard_allows_only_a_whole_erasure(signed: Signed) -> None:
    signed.keygen("k1")
    signed.write(2)
    signed.drain()
    with signed.db.connect() as conn:
        conn.execute("SET ROLE cdc_audit_owner")
        conn.execute("SELECT set_config('cdc_audit.erasing', 'on', false)")
        with pytest.raises(psycopg.DatabaseError, match="append-only"):
            conn.execute("UPDATE cdc_audit.event SET actor_id = 'forged' WHERE seq = 1")
        with pytest.raises(psycopg.DatabaseError, match="append-only"):
            conn.execute(
                "UPDATE cdc_audit.event SET new = NULL, old = NULL, row_key = NULL,"
                " actor_id = NULL, reason = NULL, context = NULL, changed = NULL,"
                " erased_at = now(), kind = 'app' WHERE seq = 1"
            )


@pytest.mark.parametrize("failpoint", ["before_commit:3", "after_commit:3"])
def test_a_crash_between_signed_batches_leaves_a_trail_that_verifies(
    signed: Signed, failpoint: str
) -> None:
    private = signed.keygen("k1")
    with signed.db.connect(autocommit=False) as conn:
        ctx(conn, "bulk", "load")
        conn.execute("INSERT INTO accounts SELECT g, 'o' FROM generate_series(1, 2000) g")
        conn.commit()
    crashed = signed.cli(
        "worker",
        "--drain",
        CDC_AUDIT_SIGNING_KEY_FILE=str(private),
        CDC_AUDIT_BATCH_MESSAGES="300",
        CDC_AUDIT_FAILPOINT=failpoint,
    )
    assert crashed.returncode == -9
    signed.drain()
    assert signed.db.scalar("SELECT count(*) FROM cdc_audit.event WHERE stream = 'user'") == 2000
    verify = signed.cli("verify")
    assert verify.returncode == 0, verify.stdout + verify.stderr
    assert "signed up to seq 2000, anchored up to seq 2000" in verify.stdout
