"""Verifying an archive, offline or joined to what remains of the trail.

Offline (`verify --archive URI --public-key KEY`), each stream's manifests must be signed by a
given key, each older manifest must list a prefix of the newest one's segments, every segment
must be present with the size and sha256 its manifest gives, and the segments, read in order
as one export, must form one chain whose checkpoints all hold, with every event signed by a
checkpoint (segments end where checkpoints end), ending at the hash the manifest signs.

Joined to the database (`verify --archive URI` with a DSN), the trail is verified as usual and
must continue the archive: where older events were purged, the purge record the trail starts
from must name the archive's hash of the last event purged; where the archive and the trail
overlap, they must hold the same event at the archive's last seq; and no seq may be in
neither.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import zlib
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import IO, cast

import psycopg
from psycopg import sql
from psycopg.rows import TupleRow

from .archive_manifest import Manifest, ManifestError, SegmentEntry, parse_manifest, stream_of
from .archive_store import ArchiveStore
from .checkpoints import Checkpoint
from .errors import InvalidInput
from .export import MalformedLine, check_event_line, parse_lines
from .keys import PublicKey
from .purge_record import PurgeStart, purge_record_ending_at
from .verify import StreamVerdict, StreamVerifier, TrailProblem

__all__ = ["ArchiveVerdict", "archived_streams", "join_trail", "verify_archive_stream"]


@dataclass(frozen=True)
class ArchiveVerdict:
    """One stream's archive: the chain's verdict and what the trail must continue from."""

    verdict: StreamVerdict
    segments: int = 0
    first_seq: int = 0
    hashes: dict[int, str] = field(default_factory=dict)
    """Hex hash of the event at each seq asked for (where the trail picks up)."""

    @property
    def ok(self) -> bool:
        return self.verdict.ok

    def describe(self) -> str:
        v = self.verdict
        if not v.ok:
            return f"archive of stream {v.stream}: FAILED at seq {v.first_bad_seq}: {v.problem}"
        return (
            f"archive of stream {v.stream}: ok: {v.checked} events in {self.segments} segment(s)"
            f" (seq {self.first_seq}-{v.last_seq}), {v.checkpoints} checkpoint(s),"
            " manifest signed"
        )


def archived_streams(store: ArchiveStore) -> list[str]:
    return sorted({found[0] for name in store.names() if (found := stream_of(name))})


def verify_archive_stream(
    store: ArchiveStore,
    stream: str,
    keys: Mapping[str, PublicKey],
    want: frozenset[int] = frozenset(),
) -> ArchiveVerdict:
    """Verify one stream's archive; `want` names seqs whose hash the verdict should carry."""
    verifier = StreamVerifier(stream, keys)
    try:
        manifest = _manifest(store, stream, dict(keys))
    except TrailProblem as bad:
        return ArchiveVerdict(verifier.verdict(bad))
    hashes: dict[int, str] = {}
    try:
        for index, entry in enumerate(manifest.segments):
            _segment(store, verifier, entry, index == 0, want, hashes)
        verifier.finish()  # segments end where checkpoints end: everything is signed
    except TrailProblem as bad:
        return ArchiveVerdict(verifier.verdict(bad), len(manifest.segments), manifest.first_seq)
    return ArchiveVerdict(verifier.verdict(), len(manifest.segments), manifest.first_seq, hashes)


def _manifest(store: ArchiveStore, stream: str, keys: dict[str, PublicKey]) -> Manifest:
    """The newest manifest, once every manifest of the stream holds and agrees with it."""
    names = sorted(
        (found[1], name)
        for name in store.names()
        if (found := stream_of(name)) and found[0] == stream
    )
    if not names:
        raise TrailProblem(1, f"the archive holds no manifest of stream {stream}")
    manifests = [_read_manifest(store, stream, name, keys) for _, name in names]
    newest = manifests[-1]
    for (last_seq, name), older in zip(names, manifests, strict=True):
        if older.last_seq != last_seq or older.stream != stream:
            raise TrailProblem(older.first_seq, f"manifest {name} is not where its content says")
        if newest.segments[: len(older.segments)] != older.segments:
            raise TrailProblem(
                older.first_seq,
                f"manifest {name} lists segments the newest manifest does not (rewritten?)",
            )
    return newest


def _read_manifest(
    store: ArchiveStore, stream: str, name: str, keys: dict[str, PublicKey]
) -> Manifest:
    data = store.read(name)
    if data is None:
        raise TrailProblem(1, f"manifest {name} disappeared while reading")
    try:
        return parse_manifest(data, keys)
    except ManifestError as exc:
        raise TrailProblem(1, f"manifest {name}: {exc}") from None


def _segment(
    store: ArchiveStore,
    verifier: StreamVerifier,
    entry: SegmentEntry,
    first: bool,
    want: frozenset[int],
    hashes: dict[int, str],
) -> None:
    """Feed one segment to `verifier`, after checking it is the object the manifest signs."""
    data = store.read(entry.name)
    if data is None:
        raise TrailProblem(entry.first_seq, f"segment {entry.name} is missing from the archive")
    if len(data) != entry.bytes or hashlib.sha256(data).hexdigest() != entry.sha256:
        raise TrailProblem(
            entry.first_seq,
            f"segment {entry.name} is not the one its manifest signs (sha256 differs:"
            " altered or replaced)",
        )
    if verifier.next_seq != entry.first_seq and not first:
        raise TrailProblem(verifier.next_seq, f"segment {entry.name} does not continue the chain")
    # Read as it decompresses: a segment's text never has to be held whole.
    lines = cast("IO[bytes]", gzip.GzipFile(filename="", mode="rb", fileobj=io.BytesIO(data)))
    try:
        _feed(verifier, entry, lines, first, want, hashes)
    except MalformedLine as exc:
        raise TrailProblem(verifier.next_seq, f"segment {entry.name}: {exc}") from None
    except (OSError, EOFError, zlib.error) as exc:
        raise TrailProblem(
            verifier.next_seq, f"segment {entry.name} is not readable gzip: {exc}"
        ) from None
    end = verifier.next_seq - 1
    if end != entry.last_seq or verifier.prev_hex != entry.last_hash:
        raise TrailProblem(
            end + 1, f"segment {entry.name} does not end where its manifest says (seq {end})"
        )


def _feed(
    verifier: StreamVerifier,
    entry: SegmentEntry,
    lines: IO[bytes],
    first: bool,
    want: frozenset[int],
    hashes: dict[int, str],
) -> None:
    for number, item in enumerate(parse_lines(lines)):
        if isinstance(item, PurgeStart):
            if not (first and number == 0):
                raise MalformedLine(None, "a purge line may only start the first segment")
            verifier.start_after_purge(item)
        elif isinstance(item, Checkpoint):
            verifier.checkpoint(item)
        else:
            check_event_line(verifier, item)
            seq = verifier.next_seq - 1
            if seq in want:
                hashes[seq] = verifier.prev_hex


def join_trail(
    conn: psycopg.Connection[TupleRow],
    schema: str,
    archived: ArchiveVerdict | None,
    trail: StreamVerdict,
) -> StreamVerdict:
    """The trail's verdict, failed where it does not continue the archive as one chain."""
    if not trail.ok:
        return trail
    first = _first_seq(conn, schema, trail.stream)
    problem = _join_problem(conn, schema, archived, trail.stream, first)
    if problem is None:
        return trail
    return replace(trail, first_bad_seq=problem.seq, problem=problem.problem)


def trail_start(conn: psycopg.Connection[TupleRow], schema: str, stream: str) -> int:
    """The seq before the trail's first event: where the archive must hand over."""
    return _first_seq(conn, schema, stream) - 1


def _join_problem(
    conn: psycopg.Connection[TupleRow],
    schema: str,
    archived: ArchiveVerdict | None,
    stream: str,
    first: int,
) -> TrailProblem | None:
    if archived is None:
        if first > 1:
            return TrailProblem(
                1, f"events 1-{first - 1} were purged and the archive does not hold them"
            )
        return None
    if not archived.ok:
        return TrailProblem(
            archived.verdict.first_bad_seq or 1, "the archive does not verify (see above)"
        )
    last = archived.verdict.last_seq
    if first > last + 1:
        return TrailProblem(
            last + 1, f"events {last + 1}-{first - 1} are neither in the archive nor in the trail"
        )
    if first > 1:
        record = purge_record_ending_at(conn, schema, stream, first - 1)
        if record is None or record.last_hash.hex() != archived.hashes.get(first - 1):
            return TrailProblem(
                first - 1,
                "the archive and the trail are not one chain: the purge record the trail starts"
                " from names another hash for this event",
            )
    if last >= first and _hash_at(conn, schema, stream, last) != archived.verdict.head.hex():
        return TrailProblem(last, "the archive and the trail hold different events here")
    return None


def _first_seq(conn: psycopg.Connection[TupleRow], schema: str, stream: str) -> int:
    row = conn.execute(
        sql.SQL("SELECT min(seq) FROM {}.event WHERE stream = %s").format(sql.Identifier(schema)),
        (stream,),
    ).fetchone()
    conn.commit()
    return int(row[0]) if row is not None and row[0] is not None else 1


def _hash_at(conn: psycopg.Connection[TupleRow], schema: str, stream: str, seq: int) -> str | None:
    row = conn.execute(
        sql.SQL("SELECT hash FROM {}.event WHERE stream = %s AND seq = %s").format(
            sql.Identifier(schema)
        ),
        (stream, seq),
    ).fetchone()
    conn.commit()
    return None if row is None else bytes(row[0]).hex()


def require_archive(store: ArchiveStore) -> list[str]:
    """The archive's streams; an archive with none is a mistake in the URI, not a pass."""
    streams = archived_streams(store)
    if not streams:
        raise InvalidInput(f"{store.uri}: no archive manifest found there")
    return streams
