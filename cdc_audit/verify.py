"""Verification: recompute every hash, link, Merkle root and signature of a stream.

Every event is re-hashed from its columns: the payload from row_key/old/new/changed/actor_id/
reason/context (read as jsonb text and parsed with exact numbers, the same values the worker
hashed), the header from the other columns, and the link from the previous event's hash.
Checkpoints are checked against the events they cover (range, head hash, Merkle root) and
their signature against the registered public keys (retired ones included: what they signed
stays valid). Online, the newest checkpoints are compared with the anchor, which is what
catches a superuser who rewrote or cut the tail and re-signed it.

`StreamVerifier` is fed events and checkpoints in stream order, from the database or from an
export alike, and stops at the first problem, naming its sequence number.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Final

import psycopg
from psycopg import sql
from psycopg.rows import TupleRow

from cdc_audit.canonical import JsonValue, canonical_bytes_trusted
from cdc_audit.chain import GENESIS, format_commit_time, payload_object
from cdc_audit.checkpoints import Checkpoint, DirectoryAnchor
from cdc_audit.keys import PublicKey, public_key_from_pem, registered_keys
from cdc_audit.merkle import MerkleBuilder
from cdc_audit.pgoutput import parse_lsn
from cdc_audit.values import parse_json_fast

__all__ = [
    "StoredEvent",
    "StreamVerdict",
    "StreamVerifier",
    "read_stream",
    "stored_checkpoints",
    "verify_events",
    "verify_stream",
]

_FETCH: Final = 5000
encode: Final = canonical_bytes_trusted
_PROGRESS_EVERY: Final = 100_000


@dataclass(slots=True)  # not frozen: a frozen dataclass is slower to build, once per event
class StoredEvent:
    """One row of the event table, with JSON columns parsed exactly."""

    stream: str
    seq: int
    event_id: str
    commit_lsn: str | None
    commit_time: datetime
    xid: int | None
    kind: str
    schema_name: str | None
    table_name: str | None
    row_key: JsonValue
    old: JsonValue
    new: JsonValue
    changed: tuple[str, ...] | None
    actor_id: str | None
    reason: str | None
    context: JsonValue
    context_missing: bool
    payload_hash: bytes
    prev_hash: bytes
    hash: bytes
    signature: bytes | None = None
    key_id: str | None = None
    erased: bool = False
    """The payload was erased (erase_event): its fields are null, payload_hash stays."""

    def payload(self) -> dict[str, JsonValue]:
        return payload_object(self)

    def header(self) -> dict[str, JsonValue]:
        return {
            "commit_lsn": self.commit_lsn,
            "commit_time": format_commit_time(self.commit_time),
            "context_missing": self.context_missing,
            "event_id": self.event_id,
            "kind": self.kind,
            "payload_hash": self.payload_hash.hex(),
            "schema_name": self.schema_name,
            "seq": self.seq,
            "stream": self.stream,
            "table_name": self.table_name,
            "xid": self.xid,
        }


@dataclass(frozen=True)
class StreamVerdict:
    stream: str
    checked: int
    head: bytes
    first_bad_seq: int | None = None
    problem: str | None = None
    last_seq: int = 0
    checkpoints: int = 0
    signed_up_to: int = 0
    """last_seq of the newest valid checkpoint (0: nothing signed)."""
    anchored_up_to: int | None = None
    """last_seq of the newest anchored checkpoint; None when there is no anchor."""
    erased: int = 0

    @property
    def ok(self) -> bool:
        return self.problem is None

    def describe(self) -> str:
        """One line for people: the verdict and what it rests on."""
        if not self.ok:
            return f"stream {self.stream}: FAILED at seq {self.first_bad_seq}: {self.problem}"
        parts = [
            f"{self.checked} events verified",
            f"{self.checkpoints} checkpoint(s), signed up to seq {self.signed_up_to}"
            if self.checkpoints
            else "unsigned (no checkpoint)",
        ]
        if self.erased:
            parts.append(f"{self.erased} erased payload(s)")
        if self.anchored_up_to is None:
            parts.append("unanchored")
        else:
            parts.append(f"anchored up to seq {self.anchored_up_to}")
        return f"stream {self.stream}: ok: " + ", ".join(parts)


class TrailProblem(Exception):
    """The first thing found wrong in a stream, at `seq`."""

    def __init__(self, seq: int, problem: str) -> None:
        self.seq = seq
        self.problem = problem
        super().__init__(problem)


class StreamVerifier:
    """Checks one stream fed in order: its events, each checkpoint right after its last event.

    `keys` maps key ids to public keys (retired ones included). A verification that starts
    inside a stream (an export from seq N) starts from the checkpoint before it:
    `start_after(checkpoint)`.
    """

    def __init__(self, stream: str, keys: Mapping[str, PublicKey]) -> None:
        self.stream = stream
        self.keys = keys
        self.next_seq = 1
        self.prev = GENESIS
        self.range_first = 1
        self.range = MerkleBuilder()
        self.checked = 0
        self.checkpoints = 0
        self.signed_up_to = 0
        self.erased = 0

    def start_after(self, checkpoint: Checkpoint) -> None:
        """Begin after `checkpoint` (whose own range is not available), trusting its signature."""
        self._check_signature(checkpoint, checkpoint.last_seq)
        self.next_seq = self.range_first = checkpoint.last_seq + 1
        self.prev = checkpoint.head_hash
        self.signed_up_to = checkpoint.last_seq
        self.checkpoints += 1

    def event(self, event: StoredEvent) -> None:
        seq = event.seq
        if event.stream != self.stream:
            raise TrailProblem(seq, f"event of stream {event.stream} inside stream {self.stream}")
        if seq != self.next_seq:
            what = "missing" if seq > self.next_seq else "repeated or out of order"
            raise TrailProblem(
                self.next_seq,
                f"sequence gap: expected seq {self.next_seq}, found {seq} (events {what})",
            )
        if event.prev_hash != self.prev:
            raise TrailProblem(seq, "link broken: prev_hash is not the previous event's hash")
        if event.erased:
            if any(value is not None for value in event.payload().values()):
                raise TrailProblem(seq, "payload changed: marked erased but not empty")
            self.erased += 1
        # Values come from the exact JSON parser and the columns' own types: nothing in them
        # can be what canonical JSON refuses, so the refusal walk is skipped (it would double
        # the cost of verifying).
        elif hashlib.sha256(encode(event.payload())).digest() != event.payload_hash:
            raise TrailProblem(seq, "payload changed: it does not match its payload_hash")
        if hashlib.sha256(self.prev + encode(event.header())).digest() != event.hash:
            raise TrailProblem(seq, "header changed: the event's hash does not match its fields")
        if event.signature is not None or event.key_id is not None:
            self._check_event_signature(event)
        self.prev = event.hash
        self.range.add(event.hash)
        self.next_seq += 1
        self.checked += 1

    def _check_event_signature(self, event: StoredEvent) -> None:
        key = self.keys.get(event.key_id or "")
        if key is None:
            raise TrailProblem(event.seq, f"signed by unregistered key {event.key_id}")
        if event.signature is None or not key.verify(event.signature, event.hash):
            raise TrailProblem(event.seq, "signature invalid")

    def checkpoint(self, checkpoint: Checkpoint) -> None:
        last = self.next_seq - 1
        if checkpoint.last_seq > last:
            raise TrailProblem(
                last + 1,
                f"tail truncated: checkpoint signs up to seq "
                f"{checkpoint.last_seq} but the trail ends at seq {last}",
            )
        if checkpoint.first_seq != self.range_first or checkpoint.last_seq != last:
            raise TrailProblem(
                checkpoint.last_seq,
                f"checkpoint covers seq {checkpoint.first_seq}-"
                f"{checkpoint.last_seq}, expected {self.range_first}-{last}",
            )
        # A checkpoint that does not hold puts its whole range in doubt: name where it starts.
        if checkpoint.head_hash != self.prev:
            raise TrailProblem(
                checkpoint.first_seq, "checkpoint head hash does not match the event it signs"
            )
        if checkpoint.merkle_root != self.range.root():
            raise TrailProblem(
                checkpoint.first_seq, "checkpoint Merkle root does not match its events"
            )
        self._check_signature(checkpoint, checkpoint.first_seq)
        self.range_first = last + 1
        self.range = MerkleBuilder()
        self.signed_up_to = last
        self.checkpoints += 1

    def _check_signature(self, checkpoint: Checkpoint, seq: int) -> None:
        key = self.keys.get(checkpoint.key_id)
        if key is None:
            raise TrailProblem(
                seq,
                f"checkpoint signed by unregistered key {checkpoint.key_id} (not a key given,"
                " or the anchor does not know it)",
            )
        if not key.verify(checkpoint.signature, checkpoint.statement_bytes()):
            raise TrailProblem(seq, "checkpoint signature invalid")

    def finish(self) -> None:
        """After the last event: once a stream is signed, every event must be."""
        last = self.next_seq - 1
        if self.checkpoints and self.signed_up_to < last:
            raise TrailProblem(
                self.signed_up_to + 1,
                f"events {self.signed_up_to + 1}-{last} are covered by no checkpoint: the"
                " worker signs every batch it writes, so they were added by someone else (or"
                " sealed by a worker without its signing key)",
            )

    def verdict(
        self, bad: TrailProblem | None = None, anchored_up_to: int | None = None
    ) -> StreamVerdict:
        return StreamVerdict(
            stream=self.stream,
            checked=self.checked,
            head=self.prev,
            first_bad_seq=None if bad is None else bad.seq,
            problem=None if bad is None else bad.problem,
            last_seq=self.next_seq - 1,
            checkpoints=self.checkpoints,
            signed_up_to=self.signed_up_to,
            anchored_up_to=anchored_up_to,
            erased=self.erased,
        )


def _lsn_text(value: str | None) -> str | None:
    # pg_lsn prints the way the chain spec wants ("16/B374D848"); normalise anyway.
    if value is None:
        return None
    lsn = parse_lsn(value)
    return f"{lsn >> 32:X}/{lsn & 0xFFFFFFFF:X}"


def _json(text: str | None) -> JsonValue:
    return None if text is None else parse_json_fast(text)


def _stored(row: tuple[Any, ...]) -> StoredEvent:
    return StoredEvent(
        stream=row[0],
        seq=row[1],
        event_id=str(row[2]),
        commit_lsn=_lsn_text(row[3]),
        commit_time=row[4],
        xid=row[5],
        kind=row[6],
        schema_name=row[7],
        table_name=row[8],
        row_key=_json(row[9]),
        old=_json(row[10]),
        new=_json(row[11]),
        changed=None if row[12] is None else tuple(row[12]),
        actor_id=row[13],
        reason=row[14],
        context=_json(row[15]),
        context_missing=row[16],
        payload_hash=bytes(row[17]),
        prev_hash=bytes(row[18]),
        hash=bytes(row[19]),
        signature=None if row[20] is None else bytes(row[20]),
        key_id=row[21],
        erased=row[22],
    )


def read_stream(
    conn: psycopg.Connection[TupleRow], schema: str, stream: str, after_seq: int = 0
) -> Iterator[StoredEvent]:
    """The events of `stream` after `after_seq`, in seq order, fetched in chunks."""
    query = sql.SQL(
        "SELECT stream, seq, event_id, commit_lsn::text, commit_time, xid, kind, schema_name,"
        " table_name, row_key::text, old::text, new::text, changed, actor_id, reason,"
        " context::text, context_missing, payload_hash, prev_hash, hash, signature, key_id,"
        " erased_at IS NOT NULL"
        " FROM {}.event WHERE stream = %s AND seq > %s ORDER BY seq"
    ).format(sql.Identifier(schema))
    # A server-side cursor lives in a transaction, whatever the connection's mode.
    with conn.transaction(), conn.cursor(name=f"read_stream_{stream}") as cursor:
        cursor.itersize = _FETCH
        cursor.execute(query, (stream, after_seq))
        for row in cursor:
            yield _stored(row)


def verify_events(stream: str, events: Iterable[StoredEvent]) -> StreamVerdict:
    """Check seq continuity, payload hashes and the links of a stream's events (no keys)."""
    verifier = StreamVerifier(stream, {})
    try:
        for event in events:
            verifier.event(event)
    except TrailProblem as bad:
        return verifier.verdict(bad)
    return verifier.verdict()


def verify_stream(
    conn: psycopg.Connection[TupleRow],
    schema: str,
    stream: str,
    keys: Mapping[str, PublicKey] | None = None,
    anchor: DirectoryAnchor | None = None,
    progress: Callable[[int], None] | None = None,
) -> StreamVerdict:
    """Verify a stream as stored: events, checkpoints and signatures, then the anchor.

    Without `keys`, the registered keys are read from the installation.
    """
    if keys is None:
        keys = registered_keys(conn, schema)
    if anchor is not None:
        keys = _trusted_by_anchor(keys, anchor)
    checkpoints = stored_checkpoints(conn, schema, stream)
    verifier = StreamVerifier(stream, keys)
    pending = iter(checkpoints)
    upcoming = next(pending, None)
    try:
        for event in read_stream(conn, schema, stream):
            verifier.event(event)
            while upcoming is not None and upcoming.last_seq == event.seq:
                verifier.checkpoint(upcoming)
                upcoming = next(pending, None)
            if progress is not None and verifier.checked % _PROGRESS_EVERY == 0:
                progress(verifier.checked)
        if upcoming is not None:
            verifier.checkpoint(upcoming)  # past the end: names the truncation
        anchored = _compare_anchor(anchor, stream, checkpoints, verifier)
        verifier.finish()
    except TrailProblem as bad:
        return verifier.verdict(bad, None)
    return verifier.verdict(None, anchored)


def _trusted_by_anchor(
    keys: Mapping[str, PublicKey], anchor: DirectoryAnchor
) -> dict[str, PublicKey]:
    """With an anchor, only the keys it recorded count: the database's key table is not a
    root of trust, since a superuser can add a key of their own to it."""
    anchored = anchor.key_pems()
    return {
        key_id: key
        for key_id, key in keys.items()
        if key_id in anchored and public_key_from_pem(anchored[key_id]).key_id == key_id
    }


def _compare_anchor(
    anchor: DirectoryAnchor | None,
    stream: str,
    checkpoints: list[Checkpoint],
    verifier: StreamVerifier,
) -> int | None:
    """The newest anchored seq, after checking the anchor and the trail agree."""
    if anchor is None:
        return None
    anchored = anchor.checkpoints(stream)
    stored = {c.last_seq: c for c in checkpoints}
    last_seq = verifier.next_seq - 1
    for copy in anchored:
        if copy.last_seq > last_seq:
            raise TrailProblem(
                last_seq + 1,
                f"tail truncated: the anchor holds a checkpoint up to seq "
                f"{copy.last_seq} but the trail ends at seq {last_seq}",
            )
        if stored.get(copy.last_seq) != copy:
            raise TrailProblem(
                copy.first_seq,
                f"the checkpoint at seq {copy.last_seq} differs from "
                f"the anchored one ({anchor.path(copy)})",
            )
    return anchored[-1].last_seq if anchored else 0


def stored_checkpoints(
    conn: psycopg.Connection[TupleRow], schema: str, stream: str, after_seq: int = 0
) -> list[Checkpoint]:
    """The stream's checkpoints ending after `after_seq`, in order."""
    rows = conn.execute(
        sql.SQL(
            "SELECT statement::text, signature FROM {}.checkpoint"
            " WHERE stream = %s AND last_seq > %s ORDER BY last_seq"
        ).format(sql.Identifier(schema)),
        (stream, after_seq),
    ).fetchall()
    where = f"{schema}.checkpoint"
    return [Checkpoint.from_row(text, bytes(sig), where) for text, sig in rows]
