"""Recomputing the chain of a stream from what the trail stores.

Every event is re-hashed from its columns: the payload from row_key/old/new/changed/actor_id/
reason/context (read as jsonb text and parsed with exact numbers, the same values the worker
hashed), the header from the other columns, and the link from the previous event's hash. The
first event that does not match is named with what is wrong.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Final

import psycopg
from psycopg import sql
from psycopg.rows import TupleRow

from cdc_audit.canonical import JsonValue, canonical_bytes
from cdc_audit.chain import GENESIS, format_commit_time, payload_object
from cdc_audit.pgoutput import parse_lsn
from cdc_audit.values import parse_json_exact

__all__ = ["StoredEvent", "StreamVerdict", "read_stream", "verify_events", "verify_stream"]

_FETCH: Final = 5000


@dataclass(frozen=True, slots=True)
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

    @property
    def ok(self) -> bool:
        return self.problem is None


def _lsn_text(value: str | None) -> str | None:
    # pg_lsn prints the way the chain spec wants ("16/B374D848"); normalise anyway.
    if value is None:
        return None
    lsn = parse_lsn(value)
    return f"{lsn >> 32:X}/{lsn & 0xFFFFFFFF:X}"


def _json(text: str | None) -> JsonValue:
    return None if text is None else parse_json_exact(text)


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
    )


def read_stream(
    conn: psycopg.Connection[TupleRow], schema: str, stream: str, after_seq: int = 0
) -> Iterator[StoredEvent]:
    """The events of `stream` after `after_seq`, in seq order, fetched in chunks."""
    query = sql.SQL(
        "SELECT stream, seq, event_id, commit_lsn::text, commit_time, xid, kind, schema_name,"
        " table_name, row_key::text, old::text, new::text, changed, actor_id, reason,"
        " context::text, context_missing, payload_hash, prev_hash, hash"
        " FROM {}.event WHERE stream = %s AND seq > %s ORDER BY seq"
    ).format(sql.Identifier(schema))
    # A server-side cursor lives in a transaction, whatever the connection's mode.
    with conn.transaction(), conn.cursor(name=f"read_stream_{stream}") as cursor:
        cursor.itersize = _FETCH
        cursor.execute(query, (stream, after_seq))
        for row in cursor:
            yield _stored(row)


def verify_events(
    stream: str, events: Iterable[StoredEvent], first_seq: int = 1, prev: bytes = GENESIS
) -> StreamVerdict:
    """Check seq continuity, payload hashes and the chain links of consecutive events."""
    expected_seq = first_seq
    checked = 0
    for event in events:
        problem = _problem(event, expected_seq, prev)
        if problem is not None:
            return StreamVerdict(stream, checked, prev, event.seq, problem)
        prev = event.hash
        expected_seq += 1
        checked += 1
    return StreamVerdict(stream, checked, prev)


def _problem(event: StoredEvent, expected_seq: int, prev: bytes) -> str | None:
    if event.seq != expected_seq:
        return f"expected seq {expected_seq}: events are missing or out of order"
    if event.prev_hash != prev:
        return "prev_hash does not match the previous event's hash"
    if hashlib.sha256(canonical_bytes(event.payload())).digest() != event.payload_hash:
        return "the payload does not match its payload_hash"
    if hashlib.sha256(prev + canonical_bytes(event.header())).digest() != event.hash:
        return "the header does not match the event's hash"
    return None


def verify_stream(conn: psycopg.Connection[TupleRow], schema: str, stream: str) -> StreamVerdict:
    """Verify a whole stream as stored, from its first event."""
    return verify_events(stream, read_stream(conn, schema, stream))
