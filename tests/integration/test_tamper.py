"""The tamper matrix: what a superuser does to the trail, and what verify says (DESIGN guarantee 3).

One base trail is built once for the module, the way a user builds one: keygen, apply a policy
(stream `user` signed by checkpoints every 10 events, stream `admin` signed every row, both
anchored in a directory), a workload of 50 `user` events and 5 `admin` events, `worker --drain`
with the signing key. Every case then runs on a fresh database cloned from it
(``CREATE DATABASE ... TEMPLATE``, with a copy of its anchor directory under the clone's name),
tampers as a superuser who knows the chain, checkpoint and export specifications would, and
checks:

- ``cdc-audit verify --stream S`` (online: registered keys and the anchor): the exit code, the
  first bad sequence number and the stable part of the message, on stdout and on stderr;
- ``cdc-audit export`` of the tampered stream, then ``cdc-audit verify --file`` with the real
  public key (offline): the same verdict, EXCEPT where only the anchor (or the database's
  erasure records) can tell. Each such case says why in `offline_differs`.

Online and offline verdicts are checked against one expectation per case, so "the same" means
equal exit code, seq and message. The base is built with child processes; verify and export
run through `cdc_audit.cli.main` in this process (a child process costs ~0.8 s of imports),
except for the cases marked `process=True` and a share of the edited exports, which run as
child processes to show the real exit codes and one-line errors.

Separately, an export edited by hand: one byte changed at ~30 positions spread over the file
(fixed seed) must fail offline verification with exit 1 and one line, never a traceback.
"""

from __future__ import annotations

import hashlib
import io
import os
import random
import re
import shutil
import subprocess
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, redirect_stderr, redirect_stdout
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest

from cdc_audit import keys
from cdc_audit.canonical import JsonValue, canonical_bytes
from cdc_audit.chain import chain_hash
from cdc_audit.checkpoints import Checkpoint
from cdc_audit.cli import main as cli_main
from cdc_audit.ephemeral import EphemeralCluster
from cdc_audit.merkle import merkle_root
from cdc_audit.verify import StoredEvent, read_stream, stored_checkpoints

from .fix_policy import BASE_POLICY
from .pg import Database, run_cli

SCHEMA = "cdc_audit"
USER_EVENTS = 50
ADMIN_EVENTS = 5
EVERY = 10

SIGNED_BASE = BASE_POLICY.replace(
    "admin: {retention: 7y,", "admin: {retention: 7y, sign: every_row,"
)

# ------------------------------------------------------------------------------ the base trail


@dataclass
class BaseTrail:
    db: Database
    tmp: Path
    anchors: Path
    private_key: Path
    public_key: Path
    export: Path
    """An export of the untouched `user` stream."""
    admin_export: Path
    """An export of the untouched `admin` stream, whose every event is signed."""


def _cli(dsn: str, *args: str, process: bool = True) -> subprocess.CompletedProcess[str]:
    """`cdc-audit --dsn DSN ARGS...`: in a child process, or (`process=False`, to keep the
    matrix fast) through the same entry point, `cdc_audit.cli.main`, in this process. Either
    way an unexpected exception fails the test: a traceback in the child, raised here."""
    if process:
        return run_cli("--dsn", dsn, *args)
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        code = cli_main(["--dsn", dsn, *args])
    return subprocess.CompletedProcess(["cdc-audit", *args], code, out.getvalue(), err.getvalue())


def _ok(result: subprocess.CompletedProcess[str]) -> subprocess.CompletedProcess[str]:
    assert result.returncode == 0, (result.stdout, result.stderr)
    return result


@pytest.fixture(scope="module")
def base(
    pg_cluster: EphemeralCluster, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[BaseTrail]:
    tmp = tmp_path_factory.mktemp("tamper")
    db = Database(name=f"tamper_base_{uuid.uuid4().hex[:8]}", cluster=pg_cluster)
    with psycopg.connect(pg_cluster.dsn(), autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{db.name}" TEMPLATE template0')
    try:
        yield _build(db, tmp)
    finally:
        db.drop()


def _build(db: Database, tmp: Path) -> BaseTrail:
    db.execute(
        "CREATE TABLE accounts (id int PRIMARY KEY, owner text, balance numeric);"
        "CREATE TABLE roles (id int PRIMARY KEY, name text)"
    )
    anchors = tmp / "anchors"
    policy = tmp / "policy.yaml"
    policy.write_text(
        SIGNED_BASE
        + "tables:\n"
        + "  - {table: public.accounts, stream: user}\n"
        + "  - {table: public.roles, stream: admin}\n"
        + f"checkpoints: {{every_events: {EVERY}, every_seconds: 3600, anchor_dir: {anchors}}}\n"
    )
    _ok(_cli(db.dsn, "keygen", "--out", str(tmp / "keys")))
    private, public = tmp / "keys" / "signing_key.pem", tmp / "keys" / "signing_key.pub.pem"
    _ok(_cli(db.dsn, "apply", "--dsn", db.dsn, "--policy", str(policy)))
    _ok(_cli(db.dsn, "keys", "add", str(public)))
    with db.connect(autocommit=False) as conn:
        for txn in range(USER_EVENTS // 5):
            conn.execute("SELECT cdc_audit.set_context(actor_id => 'u1', reason => 'r')")
            for n in range(txn * 5 + 1, txn * 5 + 6):
                conn.execute("INSERT INTO accounts VALUES (%s, %s, %s)", (n, f"owner{n}", n))
            conn.commit()
        for n in range(1, ADMIN_EVENTS + 1):
            conn.execute("SELECT cdc_audit.set_context(actor_id => 'root', reason => 'grant')")
            conn.execute("INSERT INTO roles VALUES (%s, %s)", (n, f"role{n}"))
            conn.commit()
    drained = run_cli(
        "worker",
        "--drain",
        env={**os.environ, "CDC_AUDIT_DSN": db.dsn, "CDC_AUDIT_SIGNING_KEY_FILE": str(private)},
    )
    _ok(drained)
    # The base is what the matrix assumes: check it before anything is tampered with.
    assert db.execute(
        "SELECT stream, count(*), min(seq), max(seq), count(signature) FROM cdc_audit.event"
        " GROUP BY stream ORDER BY stream"
    ) == [("admin", ADMIN_EVENTS, 1, ADMIN_EVENTS, ADMIN_EVENTS), ("user", USER_EVENTS, 1, 50, 0)]
    assert db.execute(
        "SELECT stream, first_seq, last_seq FROM cdc_audit.checkpoint ORDER BY stream, last_seq"
    ) == [("admin", 1, 5), *[("user", s, s + EVERY - 1) for s in range(1, USER_EVENTS, EVERY)]]
    assert _ok(_cli(db.dsn, "verify")).stdout.splitlines() == [
        "stream admin: ok: 5 events verified, 1 checkpoint(s), signed up to seq 5,"
        " anchored up to seq 5",
        "stream user: ok: 50 events verified, 5 checkpoint(s), signed up to seq 50,"
        " anchored up to seq 50",
    ]
    export = tmp / "user.jsonl"
    _ok(_cli(db.dsn, "export", "--stream", "user", "--output", str(export)))
    admin_export = tmp / "admin.jsonl"
    _ok(_cli(db.dsn, "export", "--stream", "admin", "--output", str(admin_export)))
    # The clones do not stream: the base's slot would only hold WAL back.
    db.execute(
        "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots"
        " WHERE database = current_database()"
    )
    return BaseTrail(db, tmp, anchors, private, public, export, admin_export)


# ------------------------------------------------------------------------------ verdicts

_FAILED = re.compile(r"stream (?P<stream>\S+): FAILED at seq (?P<seq>\d+): (?P<problem>.+)")


@dataclass(frozen=True)
class Verdict:
    code: int
    seq: int | None
    problem: str | None
    line: str
    """The stream's line on stdout."""


def verdict(result: subprocess.CompletedProcess[str]) -> Verdict:
    """Parse one stream's verdict; whatever it is, it has the shape the contract promises."""
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 1, (result.stdout, result.stderr)
    line = lines[0]
    if result.returncode == 0:
        assert re.fullmatch(r"stream \S+: ok: .+", line), line
        assert result.stderr == "", result.stderr
        return Verdict(0, None, None, line)
    assert result.returncode == 1, (result.returncode, result.stdout, result.stderr)
    failed = _FAILED.fullmatch(line)
    assert failed is not None, line
    stream, seq, problem = failed["stream"], int(failed["seq"]), failed["problem"]
    # The one-line reason on stderr says the same thing.
    assert result.stderr.splitlines()[-1:] == [f"cdc-audit: stream {stream}: seq {seq}: {problem}"]
    return Verdict(1, seq, problem, line)


@dataclass(frozen=True)
class Expect:
    """An expected verdict: exit 0 (with `says` in the ok line), or exit 1 at `seq` (or at a
    seq within `seq_in`, inclusive) with `says` in the problem."""

    code: int
    says: str
    seq: int | None = None
    seq_in: tuple[int, int] | None = None

    def check(self, got: Verdict) -> None:
        assert got.code == self.code, got
        assert self.says in got.line, got
        if self.code == 0:
            return
        assert got.seq is not None
        if self.seq_in is not None:
            assert self.seq_in[0] <= got.seq <= self.seq_in[1], got
        else:
            assert got.seq == self.seq, got


OK_ONLINE = Expect(0, "ok: 50 events verified, 5 checkpoint(s), signed up to seq 50, anchored")
OK_OFFLINE = Expect(0, "ok: 50 events verified, 5 checkpoint(s), signed up to seq 50, unanchored")

# ------------------------------------------------------------------------------ a clone to tamper


@dataclass
class Clone:
    db: Database
    base: BaseTrail
    tmp: Path
    process: bool = False
    """Run verify and export as child processes (else in this process)."""
    attacker_public_key: Path | None = None
    """Set by a case whose attacker made a key of their own."""

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return _cli(self.db.dsn, *args, process=self.process)

    @contextmanager
    def tampering(self) -> Iterator[psycopg.Connection[Any]]:
        """A superuser session with the guard triggers out of the way; committed at the end."""
        with self.db.connect(autocommit=False) as conn:
            conn.execute("SET session_replication_role = replica")
            yield conn
            conn.commit()

    def verify_online(self, stream: str) -> Verdict:
        return verdict(self.cli("verify", "--stream", stream))

    def export(self, stream: str) -> Path:
        path = self.tmp / f"{stream}-{uuid.uuid4().hex[:6]}.jsonl"
        _ok(self.cli("export", "--stream", stream, "--output", str(path)))
        return path

    def verify_offline(self, path: Path, *extra_keys: Path) -> Verdict:
        public = [a for k in (self.base.public_key, *extra_keys) for a in ("--public-key", str(k))]
        return verdict(self.cli("verify", "--file", str(path), *public))

    def attacker(self) -> keys.SigningKey:
        """A key pair of the attacker's own (never registered by the real owner)."""
        private, public, _ = keys.generate(self.tmp / "attacker")
        self.attacker_public_key = public
        return keys.load_signing_key(private)

    def real_key(self) -> keys.SigningKey:
        """The worker's private key (a case where even it would not help the attacker)."""
        return keys.load_signing_key(self.base.private_key)


@pytest.fixture
def clone(base: BaseTrail, tmp_path: Path) -> Iterator[Clone]:
    db = Database(name=f"tamper_{uuid.uuid4().hex[:10]}", cluster=base.db.cluster)
    with psycopg.connect(base.db.cluster.dsn(), autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{db.name}" TEMPLATE "{base.db.name}"')
    # The anchor is per database: the clone's copy is the one the real worker wrote.
    shutil.copytree(base.anchors / base.db.name, base.anchors / db.name)
    try:
        yield Clone(db, base, tmp_path)
    finally:
        db.drop()
        shutil.rmtree(base.anchors / db.name, ignore_errors=True)


# ------------------------------------------------------------------------------ forging tools

_COLUMNS = (
    "stream, seq, event_id, commit_lsn, commit_time, xid, kind, schema_name, table_name,"
    " row_key, old, new, changed, actor_id, reason, context, context_missing, payload_hash,"
    " prev_hash, hash, signature, key_id"
)


def _jsonb(value: JsonValue) -> str | None:
    return None if value is None else canonical_bytes(value).decode()


def events_of(conn: psycopg.Connection[Any], stream: str) -> list[StoredEvent]:
    return list(read_stream(conn, SCHEMA, stream))


def rechain(events: Sequence[StoredEvent], prev: bytes) -> list[StoredEvent]:
    """What an attacker who read cdc_audit.chain does: every hash recomputed, links whole."""
    out = []
    for event in events:
        digest = hashlib.sha256(canonical_bytes(event.payload())).digest()
        event = replace(event, prev_hash=prev, payload_hash=digest)
        event = replace(event, hash=chain_hash(prev, event.header()))
        out.append(event)
        prev = event.hash
    return out


def insert_events(conn: psycopg.Connection[Any], events: Sequence[StoredEvent]) -> None:
    for e in events:
        conn.execute(
            f"INSERT INTO cdc_audit.event ({_COLUMNS}) VALUES (%s, %s, %s::uuid, %s::pg_lsn,"
            " %s, %s, %s, %s, %s, %s::jsonb, %s::jsonb, %s::jsonb, %s, %s, %s, %s::jsonb, %s,"
            " %s, %s, %s, %s, %s)",
            (
                e.stream, e.seq, e.event_id, e.commit_lsn, e.commit_time, e.xid, e.kind,
                e.schema_name, e.table_name, _jsonb(e.row_key), _jsonb(e.old), _jsonb(e.new),
                None if e.changed is None else list(e.changed), e.actor_id, e.reason,
                _jsonb(e.context), e.context_missing, e.payload_hash, e.prev_hash, e.hash,
                e.signature, e.key_id,
            ),
        )  # fmt: skip


def signed_checkpoints(
    events: Sequence[StoredEvent], signer: keys.SigningKey, every: int = EVERY
) -> list[Checkpoint]:
    """Checkpoints over `events` made exactly as cdc_audit.checkpoints specifies."""
    made = []
    for start in range(0, len(events), every):
        chunk = events[start : start + every]
        unsigned = Checkpoint(
            stream=chunk[0].stream,
            first_seq=chunk[0].seq,
            last_seq=chunk[-1].seq,
            head_hash=chunk[-1].hash,
            merkle_root=merkle_root([e.hash for e in chunk]),
            created_at=datetime.now(UTC),
            key_id=signer.key_id,
        )
        made.append(resign(unsigned, signer))
    return made


def resign(checkpoint: Checkpoint, signer: keys.SigningKey) -> Checkpoint:
    return replace(checkpoint, signature=signer.sign(checkpoint.statement_bytes()))


def put_checkpoint(conn: psycopg.Connection[Any], checkpoint: Checkpoint) -> None:
    """Replace (or add) the checkpoint row ending at the same seq."""
    conn.execute(
        "DELETE FROM cdc_audit.checkpoint WHERE stream = %s AND last_seq = %s",
        (checkpoint.stream, checkpoint.last_seq),
    )
    conn.execute(
        "INSERT INTO cdc_audit.checkpoint (stream, first_seq, last_seq, event_count, head_hash,"
        " merkle_root, created_at, key_id, signature, statement)"
        " VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s::jsonb)",
        (
            checkpoint.stream,
            checkpoint.first_seq,
            checkpoint.last_seq,
            checkpoint.count,
            checkpoint.head_hash,
            checkpoint.merkle_root,
            checkpoint.created_at,
            checkpoint.key_id,
            checkpoint.signature,
            canonical_bytes(checkpoint.statement()).decode(),
        ),
    )


def register_key(conn: psycopg.Connection[Any], public: Path) -> None:
    """A superuser may INSERT into signing_key: the guard refuses only changes and removals."""
    key = keys.load_public_key(public)
    conn.execute(
        "INSERT INTO cdc_audit.signing_key (key_id, public_key) VALUES (%s, %s)",
        (key.key_id, key.pem),
    )


def checkpoint_at(conn: psycopg.Connection[Any], stream: str, last_seq: int) -> Checkpoint:
    return next(c for c in stored_checkpoints(conn, SCHEMA, stream) if c.last_seq == last_seq)


def mallory(event: StoredEvent) -> StoredEvent:
    """The event with the row's owner changed: what the attacker wants the trail to say."""
    assert isinstance(event.new, dict)
    return replace(event, new={**event.new, "owner": "mallory"})


# ------------------------------------------------------------------------------ the tampering


def untouched(clone: Clone) -> None:
    pass


def sql(*statements: str) -> Callable[[Clone], None]:
    def tamper(clone: Clone) -> None:
        with clone.tampering() as conn:
            for statement in statements:
                conn.execute(statement.encode())

    return tamper


USER = "stream = 'user'"


def insert_a_copy_renumbering_the_rest(clone: Clone) -> None:
    """A copy of seq 30 (new event id) inserted as seq 31, later events moved up by one."""
    with clone.tampering() as conn:
        conn.execute(f"UPDATE cdc_audit.event SET seq = seq + 1000 WHERE {USER} AND seq > 30")
        conn.execute(f"UPDATE cdc_audit.event SET seq = seq - 999 WHERE {USER} AND seq > 1000")
        conn.execute(
            f"INSERT INTO cdc_audit.event ({_COLUMNS}) SELECT"
            f" {_COLUMNS.replace('seq, event_id', '31, gen_random_uuid()')}"
            f" FROM cdc_audit.event WHERE {USER} AND seq = 30"
        )


def insert_a_forged_event_rechaining_the_rest(clone: Clone) -> None:
    """A forged event as seq 31, the rest renumbered, every hash recomputed: the chain holds,
    the checkpoints (left as they were) no longer match."""
    with clone.tampering() as conn:
        events = events_of(conn, "user")
        forged = replace(mallory(events[29]), event_id=str(uuid.uuid4()))
        tail = [replace(e, seq=31 + i) for i, e in enumerate([forged, *events[30:]])]
        conn.execute(f"DELETE FROM cdc_audit.event WHERE {USER} AND seq > 30")
        insert_events(conn, rechain(tail, events[29].hash))


def append_a_forged_event(stream: str) -> Callable[[Clone], None]:
    """A forged last event, correctly chained, after the last checkpoint; unsigned."""

    def tamper(clone: Clone) -> None:
        with clone.tampering() as conn:
            events = events_of(conn, stream)
            last = events[-1]
            forged = replace(
                last, seq=last.seq + 1, event_id=str(uuid.uuid4()), signature=None, key_id=None
            )
            insert_events(conn, rechain([forged], last.hash))

    return tamper


def append_a_forged_event_signed_by_the_attacker(clone: Clone) -> None:
    """On the every-row stream: the forged event carries a signature, by the attacker's key."""
    signer = clone.attacker()
    with clone.tampering() as conn:
        last = events_of(conn, "admin")[-1]
        (forged,) = rechain(
            [replace(last, seq=last.seq + 1, event_id=str(uuid.uuid4()))], last.hash
        )
        insert_events(
            conn, [replace(forged, signature=signer.sign(forged.hash), key_id=signer.key_id)]
        )


def append_forged_events_with_a_checkpoint(clone: Clone) -> None:
    """Seq 51-55 forged and chained, a checkpoint over them signed by a key the attacker
    registered: everything in the database agrees, only the anchor lacks that checkpoint."""
    signer = clone.attacker()
    with clone.tampering() as conn:
        events = events_of(conn, "user")
        forged = rechain(
            [
                replace(mallory(events[-1]), seq=USER_EVENTS + i, event_id=str(uuid.uuid4()))
                for i in range(1, 6)
            ],
            events[-1].hash,
        )
        insert_events(conn, forged)
        for checkpoint in signed_checkpoints(forged, signer):
            put_checkpoint(conn, checkpoint)
        assert clone.attacker_public_key is not None
        register_key(conn, clone.attacker_public_key)


def rewrite_the_tail(*, register: bool) -> Callable[[Clone], None]:
    """Seq 31-50 rewritten (owner = mallory), every hash recomputed, checkpoints 40 and 50
    replaced by ones signed with the attacker's key (registered in the database or not)."""

    def tamper(clone: Clone) -> None:
        signer = clone.attacker()
        with clone.tampering() as conn:
            events = events_of(conn, "user")
            forged = rechain([mallory(e) for e in events[30:]], events[29].hash)
            conn.execute(f"DELETE FROM cdc_audit.event WHERE {USER} AND seq > 30")
            insert_events(conn, forged)
            for checkpoint in signed_checkpoints(forged, signer):
                put_checkpoint(conn, checkpoint)
            if register:
                assert clone.attacker_public_key is not None
                register_key(conn, clone.attacker_public_key)

    return tamper


def replace_checkpoint_30(change: Callable[[Checkpoint], Checkpoint]) -> Callable[[Clone], None]:
    """Checkpoint 30 changed, then re-signed with the worker's own private key."""

    def tamper(clone: Clone) -> None:
        with clone.tampering() as conn:
            forged = change(checkpoint_at(conn, "user", 30))
            put_checkpoint(conn, resign(forged, clone.real_key()))

    return tamper


def erase_behind_the_trails_back(clone: Clone) -> None:
    """What `erase` does to seq 17, but not through erase_event: no erasure is recorded."""
    sql(
        "UPDATE cdc_audit.event SET row_key = NULL, old = NULL, new = NULL, changed = NULL,"
        " actor_id = NULL, reason = NULL, context = NULL, erased_at = now()"
        f" WHERE {USER} AND seq = 17"
    )(clone)


# ------------------------------------------------------------------------------ the matrix


@dataclass(frozen=True)
class Case:
    id: str
    tamper: Callable[[Clone], None]
    online: Expect
    stream: str = "user"
    offline: Expect | None = None
    """The offline verdict when it differs from the online one; None: the same."""
    offline_differs: str = ""
    """Why offline cannot say what online says (required with `offline`)."""
    offline_with_attacker_key: Expect | None = None
    """Offline, when the auditor is also handed the attacker's public key."""
    process: bool = False
    """Run verify and export as child processes (a few cases; the rest run in-process)."""


PAYLOAD = "payload changed: it does not match its payload_hash"
HEADER = "header changed: the event's hash does not match its fields"
LINK = "link broken: prev_hash is not the previous event's hash"
ANCHOR_ONLY = (
    "only the anchor can tell: without it the export is a consistent, validly signed trail"
)
UNSIGNED = "are covered by no checkpoint"
UNKNOWN_KEY = "checkpoint signed by unregistered key"

CASES = [
    Case(
        "control",
        untouched,
        OK_ONLINE,
        offline=OK_OFFLINE,
        offline_differs="only the word 'unanchored'",
        process=True,
    ),
    Case(
        "payload_of_seq_17",
        sql(
            "UPDATE cdc_audit.event SET new = jsonb_set(new, '{owner}', '\"mallory\"')"
            f" WHERE {USER} AND seq = 17"
        ),
        Expect(1, PAYLOAD, 17),
        process=True,
    ),
    Case(
        "commit_time_of_seq_17",
        sql(
            "UPDATE cdc_audit.event SET commit_time = commit_time + interval '1 microsecond'"
            f" WHERE {USER} AND seq = 17"
        ),
        Expect(1, HEADER, 17),
    ),
    Case(
        "kind_of_seq_17",
        sql(f"UPDATE cdc_audit.event SET kind = 'delete' WHERE {USER} AND seq = 17"),
        Expect(1, HEADER, 17),
    ),
    Case(
        "table_name_of_seq_17",
        sql(f"UPDATE cdc_audit.event SET table_name = 'roles' WHERE {USER} AND seq = 17"),
        Expect(1, HEADER, 17),
    ),
    Case(
        "delete_seq_23",
        sql(f"DELETE FROM cdc_audit.event WHERE {USER} AND seq = 23"),
        Expect(1, "sequence gap: expected seq 23, found 24 (events missing)", 23),
    ),
    Case("insert_a_copy_as_seq_31", insert_a_copy_renumbering_the_rest, Expect(1, LINK, 31)),
    Case(
        # The forged event is seq 31; what fails is the checkpoint over 31-40 (see
        # test_a_rewritten_range_is_named_by_its_first_seq for which seq is named).
        "insert_a_forged_seq_31_rechained",
        insert_a_forged_event_rechaining_the_rest,
        Expect(1, "checkpoint head hash does not match the event it signs", 31),
    ),
    Case(
        "append_a_forged_seq_51_rechained",
        append_a_forged_event("user"),
        Expect(1, UNSIGNED, 51),  # the worker signs every batch it writes
    ),
    Case(
        "append_forged_51_to_55_with_a_checkpoint_by_a_registered_attacker_key",
        append_forged_events_with_a_checkpoint,
        # Registered in the database, but the anchor does not know the key.
        Expect(1, UNKNOWN_KEY, 51),
        offline=Expect(1, UNKNOWN_KEY, 51),
        offline_differs="the same verdict: the auditor's key did not sign it",
        offline_with_attacker_key=Expect(0, "ok: 55 events verified, 6 checkpoint(s)"),
    ),
    Case(
        "swap_seq_12_and_13",
        sql(
            f"UPDATE cdc_audit.event SET seq = -12 WHERE {USER} AND seq = 12",
            f"UPDATE cdc_audit.event SET seq = 12 WHERE {USER} AND seq = 13",
            f"UPDATE cdc_audit.event SET seq = 13 WHERE {USER} AND seq = -12",
        ),
        Expect(1, LINK, 12),
    ),
    Case(
        "delete_seq_46_to_50_and_their_checkpoint",
        sql(
            f"DELETE FROM cdc_audit.event WHERE {USER} AND seq >= 46",
            f"DELETE FROM cdc_audit.checkpoint WHERE {USER} AND last_seq = 50",
        ),
        Expect(
            1,
            "tail truncated: the anchor holds a checkpoint up to seq 50"
            " but the trail ends at seq 45",
            46,
        ),
        offline=Expect(1, UNSIGNED, 41),
        offline_differs="offline has no anchor: it sees events that no checkpoint covers",
    ),
    Case(
        "delete_seq_46_to_50_keeping_their_checkpoint",
        sql(f"DELETE FROM cdc_audit.event WHERE {USER} AND seq >= 46"),
        Expect(1, "tail truncated: checkpoint signs up to seq 50 but the trail ends at seq 45", 46),
    ),
    Case(
        "rewrite_from_seq_31_resigned_by_an_unregistered_key",
        rewrite_the_tail(register=False),
        Expect(1, UNKNOWN_KEY, 31),
    ),
    Case(
        "rewrite_from_seq_31_resigned_by_a_registered_attacker_key",
        rewrite_the_tail(register=True),
        # Registered in the database, but the anchor does not know the key.
        Expect(1, UNKNOWN_KEY, 31),
        offline=Expect(1, UNKNOWN_KEY, 31),
        offline_differs="the same verdict: the auditor's key did not sign it",
        offline_with_attacker_key=Expect(0, "ok: 50 events verified, 5 checkpoint(s)"),
    ),
    Case(
        "checkpoint_30_with_another_merkle_root_resigned_by_the_real_key",
        replace_checkpoint_30(lambda c: replace(c, merkle_root=hashlib.sha256(b"forged").digest())),
        Expect(1, "checkpoint Merkle root does not match its events", 21),
    ),
    Case(
        "checkpoint_30_with_another_created_at_resigned_by_the_real_key",
        replace_checkpoint_30(lambda c: replace(c, created_at=c.created_at + timedelta(seconds=1))),
        Expect(1, "the checkpoint at seq 30 differs from the anchored one", 21),
        offline=OK_OFFLINE,
        offline_differs=ANCHOR_ONLY + " (a true statement, signed by the real key)",
    ),
    Case(
        "checkpoint_30_with_a_bad_signature",
        sql(
            "UPDATE cdc_audit.checkpoint SET signature = set_byte(signature, 0,"
            f" get_byte(signature, 0) # 1) WHERE {USER} AND last_seq = 30"
        ),
        Expect(1, "checkpoint signature invalid", 21),
    ),
    Case(
        "delete_checkpoint_30",
        sql(f"DELETE FROM cdc_audit.checkpoint WHERE {USER} AND last_seq = 30"),
        Expect(1, "checkpoint covers seq 31-40, expected 21-40", 40),
    ),
    Case(
        "delete_checkpoint_50",
        sql(f"DELETE FROM cdc_audit.checkpoint WHERE {USER} AND last_seq = 50"),
        Expect(1, "the checkpoint at seq 50 differs from the anchored one", 41),
        offline=Expect(1, UNSIGNED, 41),
        offline_differs="offline has no anchor: it sees events that no checkpoint covers",
    ),
    Case(
        "every_row_signature_of_seq_3_corrupted",
        sql(
            "UPDATE cdc_audit.event SET signature = set_byte(signature, 5,"
            " get_byte(signature, 5) # 1) WHERE stream = 'admin' AND seq = 3"
        ),
        Expect(1, "signature invalid", 3),
        stream="admin",
    ),
    Case(
        "every_row_forged_seq_6_signed_by_the_attacker",
        append_a_forged_event_signed_by_the_attacker,
        Expect(1, "signed by unregistered key", 6),
        stream="admin",
    ),
    Case(
        "every_row_forged_seq_6_unsigned",
        append_a_forged_event("admin"),
        Expect(1, UNSIGNED, 6),
        stream="admin",
    ),
    Case(
        "payload_of_seq_17_erased_behind_the_trails_back",
        erase_behind_the_trails_back,
        Expect(1, "payload erased without a recorded erasure", 17),
        offline=Expect(0, "1 erased payload(s)"),
        offline_differs=(
            "only the database can tell: the erasure records are events of the DDL stream (or"
            " of this one), which a one-stream export does not cross-check; offline shows the"
            " erased payload as erased"
        ),
    ),
]


@pytest.mark.parametrize("case", [pytest.param(case, id=case.id) for case in CASES])
def test_tamper_matrix(clone: Clone, case: Case) -> None:
    assert case.offline is None or case.offline_differs, "say why offline differs"
    clone.process = case.process
    case.tamper(clone)
    case.online.check(clone.verify_online(case.stream))
    _check_offline(clone, case, clone.export(case.stream))


def _check_offline(clone: Clone, case: Case, export: Path) -> None:
    expected = case.offline if case.offline is not None else case.online
    expected.check(clone.verify_offline(export))
    if case.offline_with_attacker_key is not None:
        assert clone.attacker_public_key is not None
        case.offline_with_attacker_key.check(
            clone.verify_offline(export, clone.attacker_public_key)
        )


def test_a_rewritten_range_is_named_by_its_first_seq(clone: Clone) -> None:
    rewrite_the_tail(register=True)(clone)
    assert clone.verify_online("user").seq == 31


# ------------------------------------------------------------------------------ edited exports


def _verify_file(base: BaseTrail, path: Path, *, process: bool = False) -> Verdict:
    args = ("verify", "--file", str(path), "--public-key", str(base.public_key))
    return verdict(_cli(base.db.dsn, *args, process=process))


_COMMIT_TIME = re.compile(rb'"commit_time":"([^"]*)"')
_HEX = re.compile(rb'"(?:payload_hash|prev_hash|hash|signature)":"([0-9a-f]+)"')


def test_any_byte_changed_in_an_export_fails_offline_verification(
    base: BaseTrail, tmp_path: Path
) -> None:
    data = base.export.read_bytes()
    rng = random.Random(20261128)
    # The first byte, the last newline, and one position in each 28th of the file.
    samples = 28
    edits: list[tuple[int, int]] = []
    while len(edits) < samples + 2:
        k = len(edits)
        if k < samples:
            pos = rng.randrange(len(data) * k // samples, len(data) * (k + 1) // samples)
        else:
            pos = 0 if k == samples else len(data) - 1
        new = rng.choice([b for b in range(256) if b != data[pos]])
        edits.append((pos, new))
    OK_OFFLINE.check(_verify_file(base, base.export, process=True))
    for i, (pos, new) in enumerate(edits):
        path = tmp_path / f"edited-{i:02d}.jsonl"
        path.write_bytes(data[:pos] + bytes([new]) + data[pos + 1 :])
        # verdict() checks the shape: one stdout line, exit 1, the same one line on stderr.
        got = _verify_file(base, path, process=i % 10 == 0)
        context = data[max(0, pos - 30) : pos + 10]
        assert got.code == 1, (pos, bytes([new]), context, got)


@pytest.mark.parametrize(
    ("field", "old", "new"),
    [
        pytest.param("commit_time", b"T", b" ", id="date-time-separator"),
        pytest.param("commit_time", b".", b",", id="decimal-comma"),
        pytest.param("commit_time", b"+", b"-", id="offset-sign"),
        pytest.param("commit_time", b":", b".", id="offset-colon"),
        pytest.param("hash", b"", b"", id="hash-upper-case"),
        pytest.param("payload_hash", b"", b"", id="payload-hash-upper-case"),
        pytest.param("signature", b"", b"", id="checkpoint-signature-upper-case"),
        pytest.param("event signature", b"", b"", id="event-signature-upper-case"),
    ],
)
def test_equivalent_spellings_in_an_export_fail_too(
    base: BaseTrail, tmp_path: Path, field: str, old: bytes, new: bytes
) -> None:
    source = base.admin_export if field == "event signature" else base.export
    assert _verify_file(base, source).code == 0
    data = source.read_bytes()
    if field == "signature":  # a checkpoint line's signature
        pattern = rb'"signature":"([0-9a-f]+)","statement"'
    elif field == "event signature":  # a stream signed every_row
        pattern = rb'"signature":"([0-9a-f]+)","stream"'
    else:
        pattern = rb'"' + field.encode() + rb'":"([^"]+)"'
    match = next(m for m in re.finditer(pattern, data) if old in m[1])
    value, start = match[1], match.start(1)
    if old:  # the last such separator (the offset's ':' is after the time's)
        pos = start + value.rindex(old)
    else:
        pos = start + next(i for i, c in enumerate(value) if chr(c) in "abcdef")
        new = data[pos : pos + 1].upper()
    edited = tmp_path / "edited.jsonl"
    edited.write_bytes(data[:pos] + new + data[pos + 1 :])
    assert edited.read_bytes() != data
    assert _verify_file(base, edited).code == 1
