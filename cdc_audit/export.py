"""Exports of a stream as JSON Lines, and their verification with no database.

THE EXPORT FORMAT (version 1). One JSON object per line, in canonical JSON (so one byte
changed anywhere changes what is verified), in stream order:

- ``{"type": "checkpoint", "signature": hex, "statement": {...}}``: a signed checkpoint
  (`cdc_audit.checkpoints`), right after the last event it covers. An export that does not
  start at seq 1 starts with the checkpoint that precedes its first event, and verification
  starts from that checkpoint's head hash.
- ``{"type": "event", ...}``: an event with every column of the trail: ``stream``, ``seq``,
  ``event_id``, ``commit_lsn``, ``commit_time`` (ISO 8601 UTC), ``xid``, ``kind``,
  ``schema_name``, ``table_name``, ``row_key``, ``old``, ``new``, ``changed``, ``actor_id``,
  ``reason``, ``context``, ``context_missing``, and ``payload_hash``, ``prev_hash``, ``hash``,
  ``signature`` as lower-case hex (``signature`` and ``key_id`` null when not signed), and
  ``erased`` (true when the payload was erased: its fields are null, payload_hash remains).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import IO, Any, Final

import orjson
import psycopg
from psycopg import sql
from psycopg.rows import TupleRow

from cdc_audit.canonical import JsonValue, canonical_bytes, canonical_bytes_trusted
from cdc_audit.chain import HEADER_FIELDS, PAYLOAD_FIELDS
from cdc_audit.checkpoints import Checkpoint
from cdc_audit.errors import InvalidInput
from cdc_audit.keys import PublicKey
from cdc_audit.purge_record import PurgeStart, parse_purge_record, purge_record_ending_at
from cdc_audit.values import parse_json_exact
from cdc_audit.verify import (
    StoredEvent,
    StreamVerdict,
    StreamVerifier,
    TrailProblem,
    read_stream,
    stored_checkpoints,
)

__all__ = [
    "ExportRange",
    "checkpoint_line",
    "event_from_line",
    "event_line",
    "export_stream",
    "verify_export",
]

_EVENT_KEYS: Final = frozenset(
    {
        "type", "stream", "seq", "event_id", "commit_lsn", "commit_time", "xid", "kind",
        "schema_name", "table_name", "row_key", "old", "new", "changed", "actor_id", "reason",
        "context", "context_missing", "payload_hash", "prev_hash", "hash", "signature",
        "key_id", "erased",
    }
)  # fmt: skip


@dataclass(frozen=True)
class ExportRange:
    from_seq: int = 1
    to_seq: int | None = None
    since: datetime | None = None
    until: datetime | None = None


def event_line(event: StoredEvent) -> dict[str, JsonValue]:
    return {
        "type": "event",
        **event.header(),
        **event.payload(),
        "prev_hash": event.prev_hash.hex(),
        "hash": event.hash.hex(),
        "signature": None if event.signature is None else event.signature.hex(),
        "key_id": event.key_id,
        "erased": event.erased,
    }


def checkpoint_line(checkpoint: Checkpoint) -> dict[str, JsonValue]:
    return {"type": "checkpoint", **checkpoint.record()}


def export_stream(
    conn: psycopg.Connection[TupleRow],
    schema: str,
    stream: str,
    selection: ExportRange,
    out: IO[bytes],
) -> tuple[int, int, int]:
    """Write the stream's events in `selection` with their checkpoints; (first, last, count).

    The range is widened to whole checkpoint ranges (back to the checkpoint that precedes it,
    on to the one that covers its end), so that every event in it can be verified. Exported to
    the end, it also carries any checkpoint beyond the last event, which shows a cut tail.
    """
    first, last = _resolve(conn, schema, stream, selection)
    checkpoints = stored_checkpoints(conn, schema, stream)
    if last is not None:
        covering = [c for c in checkpoints if c.first_seq <= last <= c.last_seq]
        last = covering[0].last_seq if covering else last
    before = [c for c in checkpoints if c.last_seq < first]
    purged = _purged_up_to(conn, schema, stream)
    if purged is not None and (not before or before[-1].last_seq <= purged.last_seq):
        # What the export would start from was purged: start from the purge record, and
        # reach the purge event itself, which proves the record.
        first = purged.last_seq + 1
        out.write(canonical_bytes(purge_line(stream, purged.record)) + b"\n")
        last = None if last is None else max(last, purged.seq)
        checkpoints = [c for c in checkpoints if c.last_seq > purged.last_seq]
        before = []
    elif before:
        first = before[-1].last_seq + 1
        out.write(canonical_bytes(checkpoint_line(before[-1])) + b"\n")
    elif first > 1:
        first = 1
    after = iter([c for c in checkpoints if c.last_seq >= first])
    upcoming = next(after, None)
    count = 0
    for event in read_stream(conn, schema, stream, first - 1):
        if last is not None and event.seq > last:
            break
        out.write(canonical_bytes(event_line(event)) + b"\n")
        count += 1
        while upcoming is not None and upcoming.last_seq == event.seq:
            out.write(canonical_bytes(checkpoint_line(upcoming)) + b"\n")
            upcoming = next(after, None)
    if last is None:
        while upcoming is not None:
            out.write(canonical_bytes(checkpoint_line(upcoming)) + b"\n")
            upcoming = next(after, None)
    return first, first + count - 1, count


def purge_line(stream: str, record: dict[str, Any]) -> dict[str, JsonValue]:
    return {"type": "purge", "stream": stream, "record": record}


def _purged_up_to(
    conn: psycopg.Connection[TupleRow], schema: str, stream: str
) -> PurgeStart | None:
    """The purge record the stream's remaining events start after, if any were purged."""
    row = conn.execute(
        sql.SQL("SELECT min(seq) FROM {}.event WHERE stream = %s").format(sql.Identifier(schema)),
        (stream,),
    ).fetchone()
    first = int(row[0]) if row is not None and row[0] is not None else 1
    return None if first <= 1 else purge_record_ending_at(conn, schema, stream, first - 1)


def _resolve(
    conn: psycopg.Connection[TupleRow], schema: str, stream: str, selection: ExportRange
) -> tuple[int, int | None]:
    """Turn times into sequence numbers: (first seq, last seq or None for the end)."""
    first, last = selection.from_seq, selection.to_seq
    table = sql.Identifier(schema)
    if selection.since is not None:
        row = conn.execute(
            sql.SQL("SELECT min(seq) FROM {}.event WHERE stream = %s AND commit_time >= %s").format(
                table
            ),
            (stream, selection.since),
        ).fetchone()
        first = max(first, row[0] if row and row[0] is not None else 1 << 62)
    if selection.until is not None:
        row = conn.execute(
            sql.SQL("SELECT max(seq) FROM {}.event WHERE stream = %s AND commit_time < %s").format(
                table
            ),
            (stream, selection.until),
        ).fetchone()
        bound = row[0] if row and row[0] is not None else 0
        last = bound if last is None else min(last, bound)
    return first, last


# ------------------------------------------------------------------------------ verifying


class MalformedLine(Exception):
    """A line that is not a well-formed, canonical export line.

    `line` counts from the first line read (None: the problem is not one line's); a caller
    that read from the middle of a file adds the lines before it (`describe`).
    """

    def __init__(self, line: int | None, detail: str) -> None:
        super().__init__(self.describe_at(line, detail))
        self.line = line
        self.detail = detail

    @staticmethod
    def describe_at(line: int | None, detail: str) -> str:
        return detail if line is None else f"line {line}{detail}"

    def describe(self, lines_before: int = 0) -> str:
        return self.describe_at(
            None if self.line is None else self.line + lines_before, self.detail
        )


def verify_export(path: Path, keys: Mapping[str, PublicKey]) -> StreamVerdict:
    """Verify an export file; the verdict names the first bad sequence number.

    A line that is not a well-formed export line is an integrity failure too (an export is
    evidence: an edited one must not pass as a shorter one). `cdc_audit.export_parts` does
    the same on several cores.
    """
    with path.open("rb") as lines:
        return verify_export_lines(path, lines, keys)


def verify_export_lines(
    path: Path, lines: Iterable[bytes], keys: Mapping[str, PublicKey], *, last_part: bool = True
) -> StreamVerdict:
    """`verify_export` of the lines from the start of `path`, all or (`last_part` false) the
    first of several parts."""
    items = parse_lines(lines)
    try:
        first = next(items, None)
    except MalformedLine as exc:
        return StreamVerifier("?", keys).verdict(TrailProblem(1, exc.describe()))
    if first is None:
        raise InvalidInput(f"{path}: the export is empty")
    stream = first.stream if isinstance(first, Checkpoint | PurgeStart) else first["stream"]
    verifier = StreamVerifier(stream if isinstance(stream, str) else "?", keys)
    try:
        if isinstance(first, Checkpoint):
            verifier.start_after(first)
        elif isinstance(first, PurgeStart):
            verifier.start_after_purge(first)
        else:
            check_event_line(verifier, first)
    except TrailProblem as bad:
        return verifier.verdict(bad)
    return verify_lines(verifier, items, last_part=last_part)


def verify_lines(
    verifier: StreamVerifier,
    items: Iterator[Checkpoint | PurgeStart | dict[str, Any]],
    *,
    lines_before: Callable[[], int] = lambda: 0,
    last_part: bool = True,
) -> StreamVerdict:
    """Feed `verifier` the rest of an export's lines, as `parse_lines` yields them.

    For a part of a file read from its middle (`cdc_audit.export_parts`), `lines_before`
    counts the lines ahead of it (only when a malformed line must be named), and only the
    last part checks the stream's end (`StreamVerifier.finish`).
    """
    try:
        for item in items:
            if isinstance(item, Checkpoint):
                verifier.checkpoint(item)
            elif isinstance(item, PurgeStart):
                raise MalformedLine(None, "a purge line may only start an export")
            else:
                check_event_line(verifier, item)
        if last_part:
            verifier.finish()
    except MalformedLine as exc:
        return verifier.verdict(TrailProblem(verifier.next_seq, exc.describe(lines_before())))
    except TrailProblem as bad:
        return verifier.verdict(bad)
    return verifier.verdict()


def check_event_line(verifier: StreamVerifier, record: dict[str, Any]) -> None:
    """Hash an event line's own values: any edit of them shows as a hash that differs."""
    verifier.record(
        record["seq"],
        record["stream"],
        {name: record[name] for name in HEADER_FIELDS},
        {name: record[name] for name in PAYLOAD_FIELDS},
        record["erased"] is True,
        record["prev_hash"],
        record["hash"],
        record["signature"],
        record["key_id"],
    )


def parse_lines(lines: Iterable[bytes]) -> Iterator[Checkpoint | PurgeStart | dict[str, Any]]:
    """Each line as a checkpoint or an event line's object, once it is proven canonical.

    Re-encoding must give the line back byte for byte, so no edit can hide behind an
    equivalent spelling, and whatever orjson parsed (a fraction included) encodes again to
    the very text that was hashed. Line numbers count from the first of `lines`.
    """
    for number, raw in enumerate(lines, start=1):
        record = _canonical_record(raw)
        if record is None:
            raise MalformedLine(number, " is not a canonical export line (edited?)")
        kind = record.get("type")
        if kind == "event":
            if record.keys() != _EVENT_KEYS:
                raise MalformedLine(number, ": an event line must have exactly the event fields")
            yield record
        elif kind == "checkpoint":
            try:
                body = {k: v for k, v in record.items() if k != "type"}
                checkpoint = Checkpoint.from_record(body, "checkpoint line")
                if canonical_bytes_trusted(checkpoint_line(checkpoint)) + b"\n" != raw:
                    raise InvalidInput("the checkpoint line is not in canonical form")
            except InvalidInput as exc:
                raise MalformedLine(number, f": {exc}") from None
            yield checkpoint
        elif kind == "purge" and set(record) == {"type", "stream", "record"}:
            try:
                yield parse_purge_record(record["record"], record["stream"], "purge record")
            except ValueError as exc:
                raise MalformedLine(number, f": {exc}") from None
        else:
            raise MalformedLine(number, f": unknown line type {kind!r}")


def _canonical_record(raw: bytes) -> dict[str, Any] | None:
    """The line's object if the line is exactly its canonical encoding plus a newline."""
    try:
        record = orjson.loads(raw)
        encoded = canonical_bytes_trusted(record)
    except (orjson.JSONDecodeError, TypeError):
        # An integer beyond +-(2**53 - 1), say: the exact parser keeps its text.
        record = parse_json_exact(raw.decode("utf-8", errors="replace").removesuffix("\n"))
        try:
            encoded = canonical_bytes_trusted(record)
        except TypeError:
            return None
    if not isinstance(record, dict) or encoded + b"\n" != raw:
        return None
    return record


def event_from_line(record: Any, where: str) -> StoredEvent:
    """An event line (or a proof's event) back into a StoredEvent; InvalidInput if malformed."""
    if not isinstance(record, dict) or record.get("type") != "event":
        raise InvalidInput(f"{where}: not an event line")
    if set(record) != _EVENT_KEYS:
        raise InvalidInput(f"{where}: an event line must have exactly the event fields")
    try:
        changed = record["changed"]
        return StoredEvent(
            stream=record["stream"],
            seq=record["seq"],
            event_id=record["event_id"],
            commit_lsn=record["commit_lsn"],
            commit_time=datetime.fromisoformat(record["commit_time"]),
            xid=record["xid"],
            kind=record["kind"],
            schema_name=record["schema_name"],
            table_name=record["table_name"],
            row_key=record["row_key"],
            old=record["old"],
            new=record["new"],
            changed=None if changed is None else tuple(changed),
            actor_id=record["actor_id"],
            reason=record["reason"],
            context=record["context"],
            context_missing=record["context_missing"],
            payload_hash=bytes.fromhex(record["payload_hash"]),
            prev_hash=bytes.fromhex(record["prev_hash"]),
            hash=bytes.fromhex(record["hash"]),
            signature=None if record["signature"] is None else bytes.fromhex(record["signature"]),
            key_id=record["key_id"],
            erased=record["erased"] is True,
        )
    except (TypeError, ValueError) as exc:
        raise InvalidInput(f"{where}: malformed event: {exc}") from None
