"""Verification: recompute every hash, link, Merkle root and signature of a stream.

Every event is re-hashed from its columns: the payload from row_key/old/new/changed/actor_id/
reason/context (the jsonb values as PostgreSQL prints them, which is what the worker hashed),
the header from the other columns, and the link from the previous event's hash. The server
renders each event as one JSON array and orjson parses it; the rare event holding a number
orjson cannot keep exactly is parsed again with exact numbers before its verdict counts.
Checkpoints are checked against the events they cover (range, head hash, Merkle root) and
their signature against the registered public keys (retired ones included: what they signed
stays valid). Online, the newest checkpoints are compared with the anchor, which is what
catches a superuser who rewrote or cut the tail and re-signed it.

`StreamVerifier` is fed events and checkpoints in stream order, from the database or from an
export alike, and stops at the first problem, naming its sequence number.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Generator, Iterable, Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime
from hashlib import sha256
from typing import Any, Final, cast

import orjson
import psycopg
from psycopg import sql
from psycopg.rows import TupleRow

from cdc_audit.canonical import JsonValue, canonical_bytes_trusted
from cdc_audit.chain import GENESIS, format_commit_time, payload_object
from cdc_audit.checkpoints import Checkpoint, DirectoryAnchor
from cdc_audit.keys import PublicKey, public_key_from_pem, registered_keys
from cdc_audit.merkle import MerkleBuilder
from cdc_audit.pgoutput import parse_lsn
from cdc_audit.purge_record import PurgeStart, purge_record_ending_at
from cdc_audit.values import parse_json_exact, parse_json_fast

__all__ = [
    "StoredEvent",
    "StreamVerdict",
    "StreamVerifier",
    "read_stream",
    "read_stream_rows",
    "stored_checkpoints",
    "verify_events",
    "verify_stream",
]

_FETCH: Final = 1000
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


class PayloadMismatch(TrailProblem):
    """The payload does not hash to its payload_hash (as parsed: see `StreamVerifier.record`)."""


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
        self.prev_hex = GENESIS.hex()
        self.range_first = 1
        self.range = MerkleBuilder()
        self.checked = 0
        self.checkpoints = 0
        self.signed_up_to = 0
        self.erased = 0
        self.purge_record: dict[str, Any] | None = None
        """The purge record verification started from, until it is met in the chain."""
        self.resumed = False
        """Begun after a checkpoint verified elsewhere (`resume_after`): the stream is signed."""

    def start_after(self, checkpoint: Checkpoint) -> None:
        """Begin after `checkpoint` (whose own range is not available), trusting its signature."""
        self._check_signature(checkpoint, checkpoint.last_seq)
        self.next_seq = self.range_first = checkpoint.last_seq + 1
        self.prev = checkpoint.head_hash
        self.prev_hex = checkpoint.head_hash.hex()
        self.signed_up_to = checkpoint.last_seq
        self.checkpoints += 1

    def resume_after(self, checkpoint: Checkpoint) -> None:
        """Continue after `checkpoint`, which another verifier checked as the last item of the
        part before this one (`cdc_audit.export_parts`): it is not checked or counted again."""
        self.next_seq = self.range_first = checkpoint.last_seq + 1
        self.prev = checkpoint.head_hash
        self.prev_hex = checkpoint.head_hash.hex()
        self.signed_up_to = checkpoint.last_seq
        self.resumed = True

    def start_after_purge(self, start: PurgeStart) -> None:
        """Begin after events a purge dropped, from its record (see `cdc_audit.purge`).

        The record is trusted this far only: its checkpoint's signature must hold, and the
        purge event itself must be met further on, identical (`finish` refuses otherwise).
        """
        checkpoint = start.checkpoint
        first = start.last_seq + 1
        if (
            checkpoint.stream != self.stream
            or not checkpoint.first_seq <= start.last_seq <= checkpoint.last_seq
            or start.merkle_size != start.last_seq - checkpoint.first_seq + 1
        ):
            raise TrailProblem(first, "the purge record does not match the checkpoint it names")
        self._check_signature(checkpoint, first)
        try:
            self.range = MerkleBuilder.resume(start.merkle_size, start.merkle_frontier)
        except ValueError as exc:
            raise TrailProblem(first, f"the purge record is malformed: {exc}") from None
        self.next_seq = first
        self.prev = start.last_hash
        self.prev_hex = start.last_hash.hex()
        self.range_first = checkpoint.first_seq
        self.signed_up_to = checkpoint.first_seq - 1
        self.purge_record = start.record
        if checkpoint.last_seq == start.last_seq:
            self.checkpoint(checkpoint)  # the dropped events were signed as a whole range

    def event(self, event: StoredEvent) -> None:
        self.record(
            event.seq,
            event.stream,
            event.header(),
            event.payload(),
            event.erased,
            event.prev_hash.hex(),
            event.hash.hex(),
            None if event.signature is None else event.signature.hex(),
            event.key_id,
        )

    def record(
        self,
        seq: int,
        stream: str,
        header: dict[str, JsonValue],
        payload: dict[str, JsonValue],
        erased: bool,
        prev_hash: str,
        hash_hex: str,
        signature: str | None,
        key_id: str | None,
    ) -> None:
        """Check the next event, given as its chain objects and the hex of its hashes.

        This is the per-event path of every verification, so it takes what the readers
        already hold instead of a `StoredEvent`: building one costs as much as hashing it.
        Nothing is changed before all checks pass, so a caller may retry after
        `PayloadMismatch` with a payload parsed more carefully.
        """
        if stream != self.stream:
            raise TrailProblem(seq, f"event of stream {stream} inside stream {self.stream}")
        if seq != self.next_seq:
            what = "missing" if seq > self.next_seq else "repeated or out of order"
            raise TrailProblem(
                self.next_seq,
                f"sequence gap: expected seq {self.next_seq}, found {seq} (events {what})",
            )
        if prev_hash != self.prev_hex:
            raise TrailProblem(seq, "link broken: prev_hash is not the previous event's hash")
        if erased:
            if any(value is not None for value in payload.values()):
                raise TrailProblem(seq, "payload changed: marked erased but not empty")
        # Values come from a JSON parser and the columns' own types: nothing in them can be
        # what canonical JSON refuses, so the refusal walk is skipped (it would double the
        # cost of verifying).
        elif sha256(encode(payload)).hexdigest() != header["payload_hash"]:
            raise PayloadMismatch(seq, "payload changed: it does not match its payload_hash")
        digest = sha256(self.prev + encode(header)).digest()
        if digest.hex() != hash_hex:
            raise TrailProblem(seq, "header changed: the event's hash does not match its fields")
        if signature is not None or key_id is not None:
            self._check_event_signature(seq, digest, signature, key_id)
        if erased:
            self.erased += 1
        # Met in the chain: the purge record verification started from holds.
        if self.purge_record is not None and payload.get("new") == self.purge_record:
            self.purge_record = None
        self.prev = digest
        self.prev_hex = hash_hex
        self.range.add(digest)
        self.next_seq += 1
        self.checked += 1

    def _check_event_signature(
        self, seq: int, digest: bytes, signature: str | None, key_id: str | None
    ) -> None:
        key = self.keys.get(key_id or "")
        if key is None:
            raise TrailProblem(seq, f"signed by unregistered key {key_id}")
        try:
            raw = None if signature is None else bytes.fromhex(signature)
        except ValueError:
            raw = None
        # Lower-case hex only: an export line must not verify with a byte changed anywhere.
        if raw is None or raw.hex() != signature or not key.verify(raw, digest):
            raise TrailProblem(seq, "signature invalid")

    def checkpoint(self, checkpoint: Checkpoint) -> None:
        last = self.next_seq - 1
        if checkpoint.stream != self.stream:
            raise TrailProblem(
                checkpoint.first_seq,
                f"checkpoint of stream {checkpoint.stream} inside stream {self.stream}",
            )
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
        if self.purge_record is not None:
            raise TrailProblem(
                int(self.purge_record.get("last_seq", 0)) + 1,
                "verification started from a purge record that is not in the chain",
            )
        if (self.checkpoints or self.resumed) and self.signed_up_to < last:
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
    since: Checkpoint | None = None,
) -> StreamVerdict:
    """Verify a stream as stored: events, checkpoints and signatures, then the anchor.

    Without `keys`, the registered keys are read from the installation. With `since` (a
    checkpoint verified before), only what follows it is read again. A stream whose oldest
    events were purged starts from the purge record of the last event dropped.
    """
    if keys is None:
        keys = registered_keys(conn, schema)
    if anchor is not None:
        keys = _trusted_by_anchor(keys, anchor)
    checkpoints = stored_checkpoints(conn, schema, stream)
    verifier = StreamVerifier(stream, keys)
    try:
        after = _start(conn, schema, stream, verifier, since)
        pending = iter([c for c in checkpoints if c.last_seq > after])
        upcoming = next(pending, None)
        for text in read_stream_rows(conn, schema, stream, after):
            _check_row(verifier, text)
            seq = verifier.next_seq - 1
            while upcoming is not None and upcoming.last_seq == seq:
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


def _start(
    conn: psycopg.Connection[TupleRow],
    schema: str,
    stream: str,
    verifier: StreamVerifier,
    since: Checkpoint | None,
) -> int:
    """Set `verifier` where reading starts; the seq to read after."""
    row = conn.execute(
        sql.SQL("SELECT min(seq) FROM {}.event WHERE stream = %s").format(sql.Identifier(schema)),
        (stream,),
    ).fetchone()
    first = int(row[0]) if row is not None and row[0] is not None else 1
    if since is not None and since.last_seq >= first - 1:
        verifier.start_after(since)
        return since.last_seq
    if first == 1:
        return 0
    try:
        start = purge_record_ending_at(conn, schema, stream, first - 1)
    except ValueError as exc:
        raise TrailProblem(first, str(exc)) from None
    if start is None:
        raise TrailProblem(
            1, f"events 1-{first - 1} are missing and no purge record accounts for them"
        )
    verifier.start_after_purge(start)
    return start.last_seq


# One JSON array per event, rendered by the server: one parse per event instead of a row of
# typed columns to load and four jsonb texts to parse, and a server that streams while the
# verifier hashes. Nothing here is trusted: a rendering that differed from the columns would
# only fail the hashes. Under TimeZone UTC, to_json(timestamptz) prints the chain's time
# format except for trailing zeros of the fraction (see _chain_time).
_ROWS_QUERY: Final = """
SELECT '[' || seq
    || ',' || to_json(event_id::text)
    || ',' || coalesce(to_json(commit_lsn::text)::text, 'null')
    || ',' || to_json(commit_time)
    || ',' || coalesce(xid::text, 'null')
    || ',' || to_json(kind)
    || ',' || coalesce(to_json(schema_name)::text, 'null')
    || ',' || coalesce(to_json(table_name)::text, 'null')
    || ',' || context_missing
    || ',"' || encode(payload_hash, 'hex')
    || '","' || encode(prev_hash, 'hex')
    || '","' || encode(hash, 'hex')
    || '",' || coalesce(to_json(encode(signature, 'hex'))::text, 'null')
    || ',' || coalesce(to_json(key_id)::text, 'null')
    || ',' || (erased_at IS NOT NULL)
    || ',{{"actor_id":' || coalesce(to_json(actor_id)::text, 'null')
    || ',"changed":' || coalesce(to_json(changed)::text, 'null')
    || ',"context":' || coalesce(context::text, 'null')
    || ',"new":' || coalesce(new::text, 'null')
    || ',"old":' || coalesce(old::text, 'null')
    || ',"reason":' || coalesce(to_json(reason)::text, 'null')
    || ',"row_key":' || coalesce(row_key::text, 'null')
    || '}}]'
FROM {schema}.event WHERE stream = %s AND seq > %s ORDER BY seq
"""


def read_stream_rows(
    conn: psycopg.Connection[TupleRow], schema: str, stream: str, after_seq: int = 0
) -> Iterator[str]:
    """The events of `stream` after `after_seq` in seq order, as the JSON arrays of
    `_ROWS_QUERY`, streamed (memory stays flat whatever the trail's size)."""
    query = sql.SQL(_ROWS_QUERY).format(schema=sql.Identifier(schema))
    with conn.transaction(), conn.cursor() as cursor:
        cursor.execute("SET LOCAL TimeZone = 'UTC'")
        # Read in primary key order as it streams: a plan that sorts the whole stream first
        # (the planner's choice for a full read) delays the first event and spills to disk.
        cursor.execute("SET LOCAL enable_sort = off")
        if psycopg.pq.version() >= 170000:
            # libpq 17's chunked rows: the server keeps sending while this side hashes.
            rows = cast(
                "Generator[tuple[Any, ...], None, None]",  # what psycopg returns
                cursor.stream(query, (stream, after_seq), size=_FETCH),
            )
            try:
                for (text,) in rows:
                    yield text
            except GeneratorExit:
                # Stopped early (a bad event): cancel, or closing would read the rest.
                conn.cancel_safe()
                with contextlib.suppress(psycopg.errors.QueryCanceled):
                    rows.close()
                raise
            return
        with conn.cursor(name=f"read_stream_rows_{stream}") as named:
            named.itersize = _FETCH
            named.execute(query, (stream, after_seq))
            for (text,) in named:
                yield text


def _check_row(verifier: StreamVerifier, text: str) -> None:
    """Feed one row of `read_stream_rows` to `verifier`.

    orjson parses first. A number it cannot keep exactly (a fraction, an exponent, a large
    integer) can only make the payload hash differ or the encoding refuse; then the row is
    parsed again with exact numbers, and only that verdict counts.
    """
    try:
        _check_fields(verifier, orjson.loads(text))
    except (PayloadMismatch, TypeError, orjson.JSONDecodeError):
        try:
            _check_fields(verifier, parse_json_exact(text))
        except TypeError as exc:
            raise TrailProblem(verifier.next_seq, f"unreadable event: {exc}") from None


def _check_fields(verifier: StreamVerifier, fields: Any) -> None:
    (seq, event_id, commit_lsn, commit_time, xid, kind, schema_name, table_name,
     context_missing, payload_hash, prev_hash, hash_hex, signature, key_id, erased,
     payload) = fields  # fmt: skip
    header: dict[str, JsonValue] = {
        "commit_lsn": commit_lsn,
        "commit_time": _chain_time(commit_time),
        "context_missing": context_missing,
        "event_id": event_id,
        "kind": kind,
        "payload_hash": payload_hash,
        "schema_name": schema_name,
        "seq": seq,
        "stream": verifier.stream,
        "table_name": table_name,
        "xid": xid,
    }
    verifier.record(
        seq, verifier.stream, header, payload, erased, prev_hash, hash_hex, signature, key_id
    )


def _chain_time(text: str) -> str:
    """to_json(timestamptz) in UTC to the chain's form: six fraction digits, or none."""
    if len(text) in (25, 32):  # no fraction, or six digits: already the chain's form
        return text
    head, dot, rest = text.partition(".")
    if not dot:
        return text
    fraction, plus, zone = rest.partition("+")
    return f"{head}.{fraction.ljust(6, '0')}{plus}{zone}"


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
