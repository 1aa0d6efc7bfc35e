"""Archival: sealed events and their checkpoints copied out of the database, signed.

Before a partition is purged (when the policy has an `archive` section) and on the `archive`
job's schedule, each stream's signed events are written to the archive location as gzip
segments in the export format, then listed in a new manifest signed with the worker's key
(formats in `cdc_audit.archive_manifest`, locations in `cdc_audit.archive_store`).

Archiving is incremental and idempotent: a run starts after the newest manifest's last seq
and goes to the stream's newest checkpoint, so a segment always ends where a checkpoint does;
a run with nothing new writes nothing. A segment that a crashed run already wrote is written
again to the same bytes (gzip with no name and no time), which the store accepts; different
bytes under the same name are refused.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import psycopg
from psycopg import sql
from psycopg.rows import TupleRow

from .archive_manifest import (
    Manifest,
    ManifestError,
    SegmentEntry,
    parse_manifest,
    segment_name,
    sign_manifest,
    stream_of,
)
from .archive_store import ArchiveStore, open_store
from .canonical import canonical_bytes
from .checkpoints import Checkpoint
from .db import connect
from .errors import CdcAuditError, InvalidInput
from .export import checkpoint_line, event_line, purge_line
from .job_context import JobContext
from .keys import PublicKey, SigningKey, load_signing_key, registered_keys, require_registered
from .policy import Policy
from .purge_record import PurgeStart, purge_record_ending_at
from .settings import Settings
from .trail import trail_streams
from .verify import read_stream, stored_checkpoints

__all__ = [
    "SEGMENT_EVENTS",
    "StreamArchived",
    "archive_before_purge",
    "archive_job",
    "archive_streams",
    "newest_manifest",
    "segment_ranges",
]

SEGMENT_EVENTS: Final = 50_000
"""A segment holds whole checkpoint ranges, up to about this many events (one range if more)."""

Progress = Callable[[str], None]


class ArchiveCorrupt(CdcAuditError):
    """The archive's newest manifest does not hold: nothing more is added to it."""


@dataclass(frozen=True)
class StreamArchived:
    """What one run did for one stream."""

    stream: str
    written: list[SegmentEntry]
    manifest: Manifest | None
    """The newest manifest after the run (None: nothing of the stream is archived)."""

    @property
    def events(self) -> int:
        return sum(s.events for s in self.written)

    def describe(self) -> str:
        if self.manifest is None:
            return f"stream {self.stream}: nothing signed to archive yet"
        span = f"seq {self.manifest.first_seq}-{self.manifest.last_seq}"
        if not self.written:
            return f"stream {self.stream}: up to date ({span} archived)"
        return (
            f"stream {self.stream}: {len(self.written)} new segment(s), {self.events} event(s);"
            f" archived {span}"
        )


def segment_ranges(
    start: int, checkpoint_ends: list[int], limit: int = SEGMENT_EVENTS
) -> list[tuple[int, int]]:
    """Split start..(last checkpoint end) into segments ending at checkpoint ends, each of at
    most `limit` events unless a single checkpoint range is longer."""
    ranges: list[tuple[int, int]] = []
    first = start
    pending: int | None = None
    for end in checkpoint_ends:
        if end < first:
            continue
        if pending is not None and end - first + 1 > limit:
            ranges.append((first, pending))
            first = pending + 1
        pending = end
    if pending is not None:
        ranges.append((first, pending))
    return ranges


def newest_manifest(
    store: ArchiveStore, stream: str, names: list[str], keys: dict[str, PublicKey]
) -> Manifest | None:
    """The stream's newest manifest, signature checked; None when nothing is archived."""
    found = [
        (found[1], name) for name in names if (found := stream_of(name)) and found[0] == stream
    ]
    if not found:
        return None
    name = max(found)[1]
    data = store.read(name)
    if data is None:
        raise ArchiveCorrupt(f"{store.uri}: {name} disappeared while archiving")
    try:
        return parse_manifest(data, keys)
    except ManifestError as exc:
        raise ArchiveCorrupt(
            f"{store.uri}: {name}: {exc}; nothing was added (run cdc-audit verify --archive)"
        ) from None


def archive_streams(
    conn: psycopg.Connection[TupleRow],
    schema: str,
    store: ArchiveStore,
    key: SigningKey,
    streams: list[str] | None = None,
    progress: Progress = lambda _: None,
    segment_events: int = SEGMENT_EVENTS,
) -> list[StreamArchived]:
    """Archive every stream (or those named) up to its newest checkpoint."""
    # An auditor checks manifests against the registered keys: sign with nothing else.
    require_registered(conn, schema, key)
    keys = registered_keys(conn, schema)
    names = store.names()
    known = trail_streams(conn, schema)
    for stream in streams or []:
        if stream not in known:
            raise InvalidInput(f"stream {stream} has no events in {schema}.event")
    with _one_archiver(conn, schema):
        return [
            _archive_stream(
                conn, schema, store, key, stream, (names, keys), progress, segment_events
            )
            for stream in streams or known
        ]


@contextlib.contextmanager
def _one_archiver(conn: psycopg.Connection[TupleRow], schema: str) -> Iterator[None]:
    """One archive run per installation at a time: two runs that saw different newest
    checkpoints would each write a manifest, and the older would not be a prefix of the
    newer. (The same run twice writes the same bytes, which is harmless.)"""
    lock = sql.SQL("SELECT pg_advisory_lock(hashtextextended(%s, 0))")
    unlock = sql.SQL("SELECT pg_advisory_unlock(hashtextextended(%s, 0))")
    name = f"cdc_audit.archive.{schema}"
    conn.execute(lock, (name,))
    conn.commit()
    try:
        yield
    finally:
        conn.rollback()
        conn.execute(unlock, (name,))
        conn.commit()


def _archive_stream(
    conn: psycopg.Connection[TupleRow],
    schema: str,
    store: ArchiveStore,
    key: SigningKey,
    stream: str,
    known: tuple[list[str], dict[str, PublicKey]],
    progress: Progress,
    segment_events: int,
) -> StreamArchived:
    current = newest_manifest(store, stream, *known)
    start, purged = _start(conn, schema, stream, current)
    checkpoints = stored_checkpoints(conn, schema, stream, start - 1)
    segments = list(current.segments) if current else []
    written: list[SegmentEntry] = []
    ends = [c.last_seq for c in checkpoints]
    for first, last in segment_ranges(start, ends, segment_events):
        covered = [c for c in checkpoints if first <= c.last_seq <= last]
        lead = purged if first == start else None
        entry = _write_segment(conn, schema, store, stream, (first, last), covered, lead)
        segments.append(entry)
        written.append(entry)
        progress(f"archived {entry.name} ({entry.events} events, {entry.bytes} bytes)")
    if not written:
        return StreamArchived(stream, [], current)
    manifest = sign_manifest(stream, segments, key)
    store.write_once(manifest.name(), manifest.file_bytes())
    return StreamArchived(stream, written, manifest)


def _start(
    conn: psycopg.Connection[TupleRow], schema: str, stream: str, current: Manifest | None
) -> tuple[int, PurgeStart | None]:
    """The first seq to archive, and the purge record it starts from when older events
    were purged before anything was archived."""
    start = 1 if current is None else current.last_seq + 1
    row = conn.execute(
        sql.SQL("SELECT min(seq) FROM {}.event WHERE stream = %s").format(sql.Identifier(schema)),
        (stream,),
    ).fetchone()
    first_left = start if row is None or row[0] is None else int(row[0])
    if first_left <= start:
        return start, None
    if current is not None:
        raise CdcAuditError(
            f"stream {stream}: events {start}-{first_left - 1} were purged without being"
            f" archived (the archive ends at seq {current.last_seq}); nothing was added"
        )
    purged = purge_record_ending_at(conn, schema, stream, first_left - 1)
    if purged is None:
        raise CdcAuditError(
            f"stream {stream}: events 1-{first_left - 1} are missing and no purge record"
            " accounts for them; run cdc-audit verify"
        )
    return first_left, purged


def _write_segment(
    conn: psycopg.Connection[TupleRow],
    schema: str,
    store: ArchiveStore,
    stream: str,
    span: tuple[int, int],
    checkpoints: list[Checkpoint],
    purged: PurgeStart | None,
) -> SegmentEntry:
    first, last = span
    buffer = io.BytesIO()
    facts: dict[str, str] = {}
    count = 0
    # No file name and no time in the gzip header: the same events give the same bytes.
    with gzip.GzipFile(filename="", mode="wb", fileobj=buffer, mtime=0) as out:
        if purged is not None:
            out.write(canonical_bytes(purge_line(stream, purged.record)) + b"\n")
        pending = iter(checkpoints)
        upcoming = next(pending, None)
        for event in read_stream(conn, schema, stream, first - 1):
            if event.seq > last:
                break
            line = event_line(event)
            facts.setdefault("prev_hash", event.prev_hash.hex())
            facts.setdefault("first_time", str(line["commit_time"]))
            facts["last_time"] = str(line["commit_time"])
            facts["last_hash"] = event.hash.hex()
            out.write(canonical_bytes(line) + b"\n")
            count += 1
            while upcoming is not None and upcoming.last_seq == event.seq:
                out.write(canonical_bytes(checkpoint_line(upcoming)) + b"\n")
                upcoming = next(pending, None)
    if count != last - first + 1:
        raise CdcAuditError(
            f"stream {stream}: the trail holds {count} of events {first}-{last}; nothing was"
            " archived from there (run cdc-audit verify)"
        )
    data = buffer.getvalue()
    name = segment_name(stream, first, last)
    store.write_once(name, data)
    return SegmentEntry(
        name=name,
        first_seq=first,
        last_seq=last,
        events=count,
        checkpoints=len(checkpoints),
        bytes=len(data),
        sha256=hashlib.sha256(data).hexdigest(),
        prev_hash=facts["prev_hash"],
        last_hash=facts["last_hash"],
        first_time=facts["first_time"],
        last_time=facts["last_time"],
    )


def signing_key_or_env(key: SigningKey | None, what: str) -> SigningKey:
    """`key`, else the one CDC_AUDIT_SIGNING_KEY_FILE names: manifests are signed."""
    if key is not None:
        return key
    path = Settings().signing_key_file
    if path is None:
        raise InvalidInput(
            f"{what} signs its manifest: set CDC_AUDIT_SIGNING_KEY_FILE to the worker's key"
        )
    return load_signing_key(Path(path))


def archive_before_purge(
    conn: psycopg.Connection[TupleRow],
    schema: str,
    policy: Policy,
    key: SigningKey | None,
    needs: dict[str, int],
    progress: Progress = lambda _: None,
) -> None:
    """Archive the streams about to be purged, and make sure the archive reaches, for each,
    the last seq that goes (stream -> seq); CdcAuditError otherwise."""
    assert policy.archive is not None
    store = open_store(policy.archive.to, policy.archive.lock_days)
    signer = signing_key_or_env(key, "archiving before a purge")
    done = archive_streams(conn, schema, store, signer, sorted(needs), progress)
    for result in done:
        reached = 0 if result.manifest is None else result.manifest.last_seq
        if reached < needs[result.stream]:
            raise CdcAuditError(
                f"the archive {store.uri} holds stream {result.stream} up to seq {reached},"
                f" not {needs[result.stream]}"
            )


def archive_job(context: JobContext) -> str:
    """The scheduled archive: every stream, up to its newest checkpoint."""
    target = context.policy.archive
    if target is None:
        raise InvalidInput("the archive job needs the policy's archive: {to: URI}")
    store = open_store(target.to, target.lock_days)
    key = signing_key_or_env(context.signing_key, "the archive job")
    with connect(context.dsn) as conn:
        done = archive_streams(conn, context.schema, store, key, None, context.progress)
    written = [r for r in done if r.written]
    if not written:
        return f"archive: nothing new to archive in {store.uri}"
    segments = sum(len(r.written) for r in written)
    events = sum(r.events for r in written)
    return (
        f"archive: {segments} segment(s), {events} event(s) of {len(written)} stream(s)"
        f" to {store.uri}"
    )
