"""Scenario 6b, corrupted replication messages: real pgoutput messages, captured from a slot of
a real server, truncated and damaged, give the decoder's own DecodeError (never IndexError,
struct.error or UnicodeDecodeError); what still decodes is sealed or refused with a cdc-audit
error; and a worker that meets a corrupted message stops without confirming it.

The worker has no failpoint that corrupts a message, so the seam is the function the
replication stream decodes with (`cdc_audit.replication.decode_message`): the bytes really come
from the server, the corruption is applied where they are decoded, and everything after it (the
session, the writer, the confirmation to the server) is the real worker.
"""

from __future__ import annotations

import contextlib
import os
import struct
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cdc_audit import installer
from cdc_audit import replication as replication_module
from cdc_audit.assemble import TransactionAssembler
from cdc_audit.chain import StreamChain
from cdc_audit.errors import CdcAuditError
from cdc_audit.pgoutput import (
    Begin,
    Commit,
    DecodeError,
    Delete,
    Insert,
    LogicalMessage,
    Origin,
    PgOutputMessage,
    Relation,
    RelationCache,
    Truncate,
    TypeMessage,
    Update,
    decode_keepalive,
    decode_message,
    decode_xlogdata,
    parse_lsn,
)
from cdc_audit.policy import Policy, load_policy
from cdc_audit.verify import verify_stream
from cdc_audit.worker import Worker, WorkerOptions

from ..integration.fix_policy import WritePolicy
from ..integration.pg import Database
from .scale import scaled

pytestmark = pytest.mark.reliability

TABLES = """\
  - {table: public.kinds, stream: user, old_values: full}
  - {table: public.accounts, stream: user}
"""
EXTRA = "app_events: {stream: user}\n"
SCHEMA_SQL = """
CREATE TABLE accounts (id int PRIMARY KEY, owner text, note text);
CREATE TABLE kinds (
    id bigint PRIMARY KEY, t text, n numeric, f float8, b bool, j jsonb, js json, by bytea,
    ts timestamptz, d date, iv interval, a int[], ta text[], u uuid, big text
);
ALTER TABLE kinds REPLICA IDENTITY FULL;
"""
MESSAGE_TYPES = (
    Begin,
    Commit,
    Origin,
    Relation,
    TypeMessage,
    Insert,
    Update,
    Delete,
    Truncate,
    LogicalMessage,
)
MARKER = "corrupt-this-row"


@dataclass
class Capture:
    db: Database
    policy: Policy
    messages: list[bytes]
    relations: RelationCache


def _write_workload(db: Database, rows: int = 3) -> None:
    with db.connect() as conn:
        with conn.transaction():
            conn.execute("SELECT cdc_audit.set_context(actor_id => 'u1', reason => 'fuzz')")
            for i in range(rows):
                conn.execute(
                    "INSERT INTO kinds VALUES (%s, %s, 12.50, 1.5e300, true,"
                    ' \'{"a": [1, 2.50, null], "b\\u0001": "x"}\','
                    ' \'{"dup": 1, "dup": 2, "nul": "\\u0000"}\','
                    " '\\x00ff'::bytea, '2026-11-28 12:00:00+02', '2026-02-28', '1 day 2 hours',"
                    " '{1,NULL,3}', '{\"a,b\",\"c\\\"d\"}', gen_random_uuid(), repeat('x', 5000))",
                    (i, f"row {i} 'quoted' \\ back\nline \u2028"),
                )
            conn.execute("UPDATE kinds SET t = 'changed', n = n + 1 WHERE id = 0")
            conn.execute("DELETE FROM kinds WHERE id = 1")
            conn.execute("INSERT INTO accounts VALUES (1, 'o', 'n')")
            conn.execute("SELECT cdc_audit.log_event('fuzz.app', 'r:1')")
        conn.execute("SELECT cdc_audit.log_event('fuzz.login', 'r:2', 'failure', durable => true)")
        with conn.transaction():
            conn.execute("SELECT cdc_audit.set_context(actor_id => 'u2')")
            conn.execute("TRUNCATE kinds")


@pytest.fixture
def capture(database: Database, write_policy: WritePolicy) -> Capture:
    database.execute(SCHEMA_SQL)
    loaded = load_policy(write_policy(TABLES, EXTRA))
    installer.apply(database.dsn, loaded)
    database.execute("SELECT pg_create_logical_replication_slot('fuzz_capture', 'pgoutput')")
    _write_workload(database)
    rows = database.execute(
        "SELECT data FROM pg_logical_slot_peek_binary_changes('fuzz_capture', NULL, NULL,"
        " 'proto_version', '1', 'publication_names', 'cdc_audit', 'messages', 'true')"
    )
    messages = [bytes(row[0]) for row in rows]
    relations = RelationCache()
    for raw in messages:
        decoded = decode_message(raw, relations)
        if isinstance(decoded, Relation):
            relations.add(decoded)
    kinds = {chr(raw[0]) for raw in messages}
    assert kinds >= set("BCRIUDTM"), f"the capture lacks message types: {sorted(kinds)}"
    return Capture(database, loaded.policy, messages, relations)


INTERESTING_INTS = [0, 1, -1, 2, 0x7FFF, 0x8000, 0x7FFFFFFF, -0x80000000, 0xFFFF, 1 << 20]


@st.composite
def corruptions(draw: st.DrawFn, original: bytes) -> bytes:
    """`original` truncated, bit-flipped, with a length field overwritten, bytes inserted or
    removed: the ways a broken connection, proxy or server bug would damage a message."""
    data = bytearray(original)
    for _ in range(draw(st.integers(1, 3))):
        where = draw(st.integers(0, max(0, len(data) - 1)))
        action = draw(st.sampled_from(["cut", "flip", "int16", "int32", "insert", "delete"]))
        if action == "cut":
            del data[where:]
        elif action == "flip" and data:
            data[where] ^= 1 << draw(st.integers(0, 7))
        elif action in ("int16", "int32"):
            value = draw(st.sampled_from(INTERESTING_INTS))
            packed = struct.pack(">i", value)[2:] if action == "int16" else struct.pack(">i", value)
            data[where : where + len(packed)] = packed
        elif action == "insert":
            data[where:where] = draw(st.binary(min_size=1, max_size=8))
        else:
            del data[where : where + draw(st.integers(1, 16))]
    return bytes(data)


def decode_or_decode_error(data: bytes, relations: RelationCache) -> PgOutputMessage | None:
    try:
        message = decode_message(data, relations)
    except DecodeError as error:
        assert 0 <= error.offset <= len(data), f"offset {error.offset} outside {len(data)} bytes"
        assert str(error).strip() and "\n" not in str(error), repr(str(error))
        return None
    assert isinstance(message, MESSAGE_TYPES), type(message)
    return message


def test_damaged_real_messages_give_decode_errors(capture: Capture) -> None:
    @settings(
        max_examples=scaled(400, 5000),
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(st.data())
    def check(data: st.DataObject) -> None:
        original = data.draw(st.sampled_from(capture.messages))
        damaged = data.draw(corruptions(original))
        decode_or_decode_error(damaged, capture.relations)
        # The same bytes in a CopyData frame, and a damaged frame header.
        frame = b"w" + struct.pack(">QQq", 0x10, 0x20, 0) + damaged
        cut = data.draw(st.integers(0, len(frame)))
        try:
            *_, payload = decode_xlogdata(frame[:cut])
            decode_or_decode_error(bytes(payload), capture.relations)
        except DecodeError:
            pass
        with contextlib.suppress(DecodeError):
            decode_keepalive(b"k" + damaged[:cut])

    check()


def test_every_truncation_of_every_real_message(capture: Capture) -> None:
    """Exhaustive where it is cheap: every proper prefix of every message is refused (the
    format has a length or a count for everything, so a cut never passes for a whole one)."""
    for raw in capture.messages:
        for cut in range(min(len(raw), 600)):
            decoded = decode_or_decode_error(raw[:cut], capture.relations)
            assert decoded is None, (
                f"{chr(raw[0])} message cut at byte {cut} of {len(raw)} decoded as {decoded!r}"
            )


def test_impossible_commit_times_are_decode_errors(capture: Capture) -> None:
    """Found by the sealing fuzz: a damaged Begin's time overflowed datetime in the assembler."""
    begin = next(raw for raw in capture.messages if raw[:1] == b"B")
    commit = next(raw for raw in capture.messages if raw[:1] == b"C")
    for commit_time in (-(2**63), -(2**62), 2**62, 2**63 - 1):
        time_bytes = struct.pack(">q", commit_time)
        for raw, at in ((begin, 9), (commit, 18)):
            damaged = raw[:at] + time_bytes + raw[at + 8 :]
            with pytest.raises(DecodeError, match=r"commit time .* is out of range"):
                decode_message(damaged)


def _seal_all(policy: Policy, messages: list[PgOutputMessage]) -> int:
    assembler = TransactionAssembler(policy, None, key_columns=lambda s, t: None)
    chains: dict[str, StreamChain] = {}
    sealed = 0
    for message in messages:
        for draft in assembler.feed(message):
            chain = chains.setdefault(draft.stream, StreamChain(draft.stream, trusted=True))
            chain.seal(draft)
            sealed += 1
    return sealed


def test_what_still_decodes_is_sealed_or_refused(capture: Capture) -> None:
    clean = [decode_message(raw) for raw in capture.messages]
    assert _seal_all(capture.policy, clean) >= 6

    @settings(
        max_examples=scaled(150, 2000),
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(st.integers(0, len(capture.messages) - 1), st.data())
    def check(index: int, data: st.DataObject) -> None:
        damaged = data.draw(corruptions(capture.messages[index]))
        relations = RelationCache()
        stream: list[PgOutputMessage] = []
        for position, raw in enumerate(capture.messages):
            message = decode_or_decode_error(damaged if position == index else raw, relations)
            if message is None:
                break  # the worker stops here: tested below against a real worker
            if isinstance(message, Relation):
                relations.add(message)
            stream.append(message)
        # Sealed, or refused with a cdc-audit error (e.g. a change outside a transaction).
        with contextlib.suppress(CdcAuditError):
            _seal_all(capture.policy, stream)

    check()


# ---- a real worker meets a corrupted message -------------------------------------------


def _corrupting(original: Callable[..., PgOutputMessage]) -> Callable[..., PgOutputMessage]:
    """`decode_message` that cuts the message carrying MARKER in half, as a broken link would."""

    def decode(data: Any, *args: Any, **kwargs: Any) -> PgOutputMessage:
        raw = bytes(data)
        if MARKER.encode() in raw:
            raw = raw[: len(raw) // 2]
        return original(raw, *args, **kwargs)

    return decode


def _slot_state(db: Database) -> tuple[int, int]:
    """(confirmed_flush_lsn of the trail's slot, end LSN in the worker's progress)."""
    confirmed = db.scalar(
        "SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name LIKE"
        " 'cdc_audit%%'"
    )
    progress = db.scalar("SELECT coalesce(max(end_lsn), '0/0')::text FROM cdc_audit.progress")
    return parse_lsn(confirmed), parse_lsn(progress)


def _insert(db: Database, actor: str, rows: list[tuple[int, str]]) -> None:
    with db.connect() as conn, conn.transaction():
        conn.execute("SELECT cdc_audit.set_context(actor_id => %s)", (actor,))
        for row_id, owner in rows:
            conn.execute("INSERT INTO accounts VALUES (%s, %s, 'n')", (row_id, owner))


def _accounts_sealed(db: Database) -> list[int]:
    return [
        row[0]
        for row in db.execute(
            "SELECT (row_key ->> 'id')::int FROM cdc_audit.event"
            " WHERE table_name = 'accounts' ORDER BY seq"
        )
    ]


def _drain(db: Database) -> int:
    return Worker(db.dsn, WorkerOptions(drain=True, read_timeout=0.2)).run()


@pytest.fixture
def trail(database: Database, write_policy: WritePolicy) -> Iterator[Database]:
    database.execute(SCHEMA_SQL)
    installer.apply(database.dsn, load_policy(write_policy(TABLES, EXTRA)))
    yield database


def test_worker_stops_on_a_corrupted_message_without_confirming_it(
    trail: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    _insert(trail, "before", [(1, "a"), (2, "b")])
    assert _drain(trail) == 0
    assert _accounts_sealed(trail) == [1, 2]
    confirmed_before, progress_before = _slot_state(trail)
    corrupted_at = parse_lsn(trail.scalar("SELECT pg_current_wal_insert_lsn()::text"))
    _insert(trail, "victim", [(3, "c"), (4, MARKER), (5, "e")])
    _insert(trail, "after", [(6, "f")])

    monkeypatch.setattr(replication_module, "decode_message", _corrupting(decode_message))
    with pytest.raises(DecodeError) as stopped:
        _drain(trail)
    assert "overruns" in str(stopped.value) or "truncated" in str(stopped.value), stopped.value
    confirmed, progress = _slot_state(trail)
    assert confirmed < corrupted_at, (
        f"the slot confirmed {confirmed:X} past the corrupted transaction at {corrupted_at:X}:"
        " its changes would be lost on restart"
    )
    assert confirmed >= confirmed_before
    assert progress < corrupted_at, "progress recorded past the corrupted transaction"
    sealed = _accounts_sealed(trail)
    assert 4 not in sealed and 6 not in sealed, f"sealed past the corrupted message: {sealed}"
    assert sealed[:2] == [1, 2] and progress >= progress_before

    # Once the stream is whole again, nothing was lost and nothing is sealed twice.
    monkeypatch.undo()
    assert _drain(trail) == 0
    sealed = _accounts_sealed(trail)
    assert sorted(sealed) == [1, 2, 3, 4, 5, 6], f"lost or duplicated after the restart: {sealed}"
    with trail.connect() as conn:
        verdict = verify_stream(conn, "cdc_audit", "user")
    assert verdict.ok, verdict


def test_worker_command_reports_a_corrupted_message_in_one_line(trail: Database) -> None:
    _insert(trail, "victim", [(7, MARKER)])
    script = (
        "import sys\n"
        "from cdc_audit import cli, replication\n"
        f"from {__name__} import _corrupting\n"
        "replication.decode_message = _corrupting(replication.decode_message)\n"
        "sys.exit(cli.main(['worker', '--drain']))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script],
        cwd=Path(__file__).parents[2],
        env={**os.environ, "CDC_AUDIT_DSN": trail.dsn},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 3, (result.returncode, result.stderr)
    errors = [line for line in result.stderr.splitlines() if line.startswith("cdc-audit:")]
    assert "Traceback" not in result.stderr, result.stderr
    assert len(errors) == 1 and "at byte" in errors[0], result.stderr
    confirmed, _ = _slot_state(trail)
    assert 7 not in _accounts_sealed(trail)
    with psycopg.connect(trail.dsn) as conn:
        lsn = conn.execute("SELECT pg_current_wal_insert_lsn()::text").fetchone()
    assert lsn is not None and confirmed < parse_lsn(lsn[0])
