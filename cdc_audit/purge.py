"""Retention purge: drop whole partitions of the trail once their stream's retention has passed.

The trail is partitioned by month and, inside each month, by stream, so one stream's month
goes when that stream's retention has passed, as one instant DROP (no DELETE, no vacuum).
Before anything is dropped, the purge records it as an event of the purged stream, sealed by
the worker into the chain and signed with the rest; only then is the partition dropped. What
remains verifies from that record.

THE PURGE RECORD (version 1): the ``new`` of a ``purge`` event, one per stream and partition.

    partition        the dropped table
    range_from/to    its month (ISO 8601, UTC)
    cutoff           events older than this were expired (now - retention)
    retention        the stream's retention as written in the policy
    purge_id         a UUID naming this purge
    first_seq        first and last sequence number dropped, and how many
    last_seq
    event_count
    last_hash        hex hash of event last_seq: the prev_hash of what remains
    checkpoint       the signed checkpoint covering last_seq ({"signature", "statement"})
    merkle_size      how many events of that checkpoint's range were dropped
                     (last_seq - checkpoint first_seq + 1)
    merkle_frontier  hex roots of the perfect subtrees over those events, largest first
                     (`cdc_audit.merkle.MerkleBuilder.frontier`): with them, the checkpoint's
                     Merkle root is recomputed from the events that remain

A verifier that finds a stream starting at seq N + 1 > 1 starts from the purge record whose
last_seq is N: it checks the checkpoint's signature, continues the chain from last_hash and the
checkpoint's Merkle root from the frontier, and must meet the purge event itself further on,
identical, or the record is refused.

A partition is dropped only when every event in it is older than its stream's retention, it
holds the oldest events left of each of its streams (no hole in the middle of a chain), and a
signed checkpoint covers its last event. Partitions shared by streams (months made before
streams had their own, and the default partition) go when every stream in them is expired.
"""

from __future__ import annotations

import calendar
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta

import psycopg
from psycopg import sql
from psycopg.rows import TupleRow

from .archive import archive_before_purge
from .canonical import JsonValue, canonical_bytes
from .checkpoints import Checkpoint
from .db import connect
from .errors import CdcAuditError, InvalidInput
from .job_context import JobContext
from .keys import SigningKey
from .merkle import MerkleBuilder
from .policy import Duration, Policy
from .purge_record import purge_record_ending_at
from .verify import stored_checkpoints

__all__ = [
    "LeafPlan",
    "PurgeResult",
    "StreamPart",
    "cutoff",
    "plan_purge",
    "purge",
    "purge_job",
]

_POLL = 0.05
RECORD_VERSION = 1


@dataclass(frozen=True)
class StreamPart:
    """One stream's events in one partition."""

    stream: str
    first_seq: int
    last_seq: int
    count: int
    newest: datetime


@dataclass
class LeafPlan:
    """One partition of the trail and what the purge will do with it."""

    name: str
    range_from: datetime
    range_to: datetime
    stream: str | None
    parts: list[StreamPart]
    drop: bool = False
    reason: str = ""
    cutoff: datetime | None = None
    records: list[dict[str, JsonValue]] = field(default_factory=list)

    def describe(self) -> str:
        span = f"{self.range_from:%Y-%m-%d} to {self.range_to:%Y-%m-%d}"
        held = ", ".join(
            f"{p.stream} seq {p.first_seq}-{p.last_seq} ({p.count} events)" for p in self.parts
        )
        what = f"{self.name} ({span}): {held or 'empty'}"
        return f"{'drop' if self.drop else 'keep'} {what}" + (
            "" if self.drop else f": {self.reason}"
        )


@dataclass(frozen=True)
class PurgeResult:
    plans: list[LeafPlan]
    dropped: list[str]
    events: int
    seconds: dict[str, float] = field(default_factory=dict)
    """Time spent recording (until the worker sealed and signed the records) and dropping."""


def cutoff(now: datetime, retention: Duration) -> datetime:
    """`now` minus the retention, with months and years on the calendar (6mo before 31 Aug
    is 28 or 29 Feb), shorter units exactly."""
    if retention.unit in ("mo", "y"):
        months = retention.count * (12 if retention.unit == "y" else 1)
        total = now.year * 12 + (now.month - 1) - months
        year, month = divmod(total, 12)
        day = min(now.day, calendar.monthrange(year, month + 1)[1])
        return now.replace(year=year, month=month + 1, day=day)
    return now - timedelta(seconds=retention.approx_seconds)


def plan_purge(
    conn: psycopg.Connection[TupleRow], schema: str, policy: Policy, now: datetime
) -> list[LeafPlan]:
    """Every partition of the trail, oldest first, with whether it goes and why (not)."""
    first_left: dict[str, int] = {}
    plans: list[LeafPlan] = []
    for leaf in _leaves(conn, schema):
        plans.append(leaf)
        _decide(conn, schema, policy, now, leaf, first_left)
        if leaf.drop:
            for part in leaf.parts:
                first_left[part.stream] = part.last_seq + 1
    conn.commit()
    return plans


def _leaves(conn: psycopg.Connection[TupleRow], schema: str) -> Iterator[LeafPlan]:
    ident = sql.Identifier(schema)
    leaves = conn.execute(
        sql.SQL("SELECT leaf_name, range_from, range_to, stream FROM {}.event_leaves()").format(
            ident
        )
    ).fetchall()
    for name, range_from, range_to, stream in leaves:
        rows = conn.execute(
            sql.SQL(
                "SELECT stream, min(seq), max(seq), count(*), max(commit_time) FROM {}.{}"
                " GROUP BY stream ORDER BY stream"
            ).format(ident, sql.Identifier(name))
        ).fetchall()
        parts = [StreamPart(r[0], r[1], r[2], r[3], r[4]) for r in rows]
        yield LeafPlan(name, range_from, range_to, stream, parts)


def _decide(
    conn: psycopg.Connection[TupleRow],
    schema: str,
    policy: Policy,
    now: datetime,
    leaf: LeafPlan,
    first_left: dict[str, int],
) -> None:
    streams = [p.stream for p in leaf.parts] or ([leaf.stream] if leaf.stream else [])
    if not streams:
        streams = list(policy.streams)
    cutoffs: list[datetime] = []
    for stream in streams:
        settings = policy.streams.get(stream)
        if settings is None:
            leaf.reason = f"stream {stream} is not in the policy"
            return
        if settings.retention is None:
            leaf.reason = f"stream {stream} keeps its events (no retention)"
            return
        cutoffs.append(cutoff(now, settings.retention))
    leaf.cutoff = min(cutoffs)
    if leaf.range_to > leaf.cutoff:
        leaf.reason = (
            f"within the retention (only months ending by {leaf.cutoff:%Y-%m-%d %H:%M} go)"
        )
        return
    for part in leaf.parts:
        oldest = first_left.get(part.stream)
        if oldest is None:
            oldest = first_left[part.stream] = _first_seq(conn, schema, part.stream)
        if part.first_seq != oldest:
            leaf.reason = (
                f"older events of stream {part.stream} remain (from seq {oldest}):"
                " purging this partition would leave a hole"
            )
            return
        if part.count != part.last_seq - part.first_seq + 1:
            # Commit times are not strictly in commit order: at a month boundary, a
            # transaction may carry a time in the month after the one that follows it.
            leaf.reason = (
                f"stream {part.stream}'s events in it are not one unbroken range of seq"
                f" ({part.count} events in {part.first_seq}-{part.last_seq}): dropping it"
                " alone would leave a hole"
            )
            return
        record = _record(conn, schema, leaf, part)
        if isinstance(record, str):
            leaf.reason = record
            return
        leaf.records.append(record)
    leaf.drop = True


def _first_seq(conn: psycopg.Connection[TupleRow], schema: str, stream: str) -> int:
    row = conn.execute(
        sql.SQL("SELECT min(seq) FROM {}.event WHERE stream = %s").format(sql.Identifier(schema)),
        (stream,),
    ).fetchone()
    return int(row[0]) if row is not None and row[0] is not None else 1


def _record(
    conn: psycopg.Connection[TupleRow], schema: str, leaf: LeafPlan, part: StreamPart
) -> dict[str, JsonValue] | str:
    """The purge record of one stream's part (or why it cannot be made yet)."""
    covering = [
        c
        for c in stored_checkpoints(conn, schema, part.stream, part.last_seq - 1)
        if c.first_seq <= part.last_seq
    ]
    if not covering:
        return (
            f"no signed checkpoint covers seq {part.last_seq} of stream {part.stream} yet"
            " (is the worker running with its signing key?)"
        )
    checkpoint = covering[0]
    builder = _frontier_before(conn, schema, part, checkpoint)
    if builder is None:
        return (
            f"the checkpoint covering seq {part.last_seq} of stream {part.stream} starts in"
            " a partition already purged, and no purge record keeps its frontier"
        )
    start = max(checkpoint.first_seq, part.first_seq)
    last_hash = b""
    for seq, digest in _hashes(conn, schema, part.stream, start, part.last_seq):
        builder.add(digest)
        last_hash = digest
        if seq == part.last_seq:
            break
    return {
        "action": "purge",
        "version": RECORD_VERSION,
        "partition": leaf.name,
        "range_from": leaf.range_from.isoformat(),
        "range_to": leaf.range_to.isoformat(),
        "cutoff": leaf.cutoff.isoformat() if leaf.cutoff else None,
        "first_seq": part.first_seq,
        "last_seq": part.last_seq,
        "event_count": part.count,
        "last_hash": last_hash.hex(),
        "checkpoint": checkpoint.record(),
        "merkle_size": builder.size,
        "merkle_frontier": [root.hex() for root in builder.frontier()],
    }


def _frontier_before(
    conn: psycopg.Connection[TupleRow], schema: str, part: StreamPart, checkpoint: Checkpoint
) -> MerkleBuilder | None:
    """A Merkle builder holding the checkpoint's leaves before this part's first event."""
    if checkpoint.first_seq >= part.first_seq:
        return MerkleBuilder()
    previous = purge_record_ending_at(conn, schema, part.stream, part.first_seq - 1)
    if previous is None or previous.checkpoint.last_seq != checkpoint.last_seq:
        return None
    return MerkleBuilder.resume(previous.merkle_size, previous.merkle_frontier)


def _hashes(
    conn: psycopg.Connection[TupleRow], schema: str, stream: str, first: int, last: int
) -> Iterator[tuple[int, bytes]]:
    rows = conn.execute(
        sql.SQL(
            "SELECT seq, hash FROM {}.event WHERE stream = %s AND seq BETWEEN %s AND %s"
            " ORDER BY seq"
        ).format(sql.Identifier(schema)),
        (stream, first, last),
    )
    for seq, digest in rows:
        yield int(seq), bytes(digest)


def purge(
    conn: psycopg.Connection[TupleRow],
    schema: str,
    policy: Policy,
    now: datetime,
    *,
    dry_run: bool = False,
    timeout: float = 60.0,
    progress: Callable[[str], None] = lambda _: None,
    signing_key: SigningKey | None = None,
) -> PurgeResult:
    """Plan, and unless `dry_run`, record and drop every partition that may go.

    With the policy's `archive`, what goes is archived first (manifests signed with
    `signing_key`, else CDC_AUDIT_SIGNING_KEY_FILE's), and nothing is dropped if that fails.
    """
    plans = plan_purge(conn, schema, policy, now)
    result = PurgeResult(plans, [], 0, {"record": 0.0, "drop": 0.0})
    if dry_run:
        return result
    _archive_first(conn, schema, policy, plans, signing_key, progress)
    events = 0
    for leaf in plans:
        if not leaf.drop:
            continue
        events += _drop(conn, schema, leaf, timeout, result.seconds)
        result.dropped.append(leaf.name)
        progress(leaf.describe())
    return replace(result, events=events)


def _archive_first(
    conn: psycopg.Connection[TupleRow],
    schema: str,
    policy: Policy,
    plans: list[LeafPlan],
    signing_key: SigningKey | None,
    progress: Callable[[str], None],
) -> None:
    needs: dict[str, int] = {}
    for part in (p for leaf in plans if leaf.drop for p in leaf.parts):
        needs[part.stream] = max(needs.get(part.stream, 0), part.last_seq)
    if policy.archive is None or not needs:
        return
    try:
        archive_before_purge(conn, schema, policy, signing_key, needs, progress)
    except CdcAuditError as exc:
        conn.rollback()
        failed = InvalidInput if isinstance(exc, InvalidInput) else CdcAuditError
        raise failed(f"archiving before the purge failed: {exc}; nothing was dropped") from None


def _drop(
    conn: psycopg.Connection[TupleRow],
    schema: str,
    leaf: LeafPlan,
    timeout: float,
    seconds: dict[str, float],
) -> int:
    ident = sql.Identifier(schema)
    started = time.perf_counter()
    ids = {}
    for record in leaf.records:
        purge_id = str(uuid.uuid4())
        stream = next(p.stream for p in leaf.parts if p.last_seq == record["last_seq"])
        ids[purge_id] = (stream, record)
        conn.execute(
            sql.SQL("SELECT {}.record_purge(%s::jsonb)").format(ident),
            (_json({**record, "stream": stream, "purge_id": purge_id}),),
        )
    conn.commit()
    _wait_recorded(
        conn, schema, {purge_id: stream for purge_id, (stream, _) in ids.items()}, timeout
    )
    assert leaf.cutoff is not None
    recorded = time.perf_counter()
    seconds["record"] += recorded - started
    row = conn.execute(
        sql.SQL("SELECT {}.drop_event_partition(%s, %s)").format(ident), (leaf.name, leaf.cutoff)
    ).fetchone()
    for purge_id, (stream, record) in ids.items():
        conn.execute(
            sql.SQL(
                "INSERT INTO {}.purge_log (stream, partition_name, range_from, range_to,"
                " first_seq, last_seq, event_count, last_hash, purge_event_id)"
                " VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s)"
            ).format(ident),
            (
                stream,
                leaf.name,
                leaf.range_from,
                leaf.range_to,
                record["first_seq"],
                record["last_seq"],
                record["event_count"],
                bytes.fromhex(str(record["last_hash"])),
                _purge_event_id(conn, schema, stream, purge_id),
            ),
        )
    conn.commit()
    seconds["drop"] += time.perf_counter() - recorded
    return int(row[0]) if row is not None and row[0] is not None else 0


def _json(value: dict[str, JsonValue]) -> str:
    return canonical_bytes(value).decode()


def _purge_event_id(
    conn: psycopg.Connection[TupleRow], schema: str, stream: str, purge_id: str
) -> uuid.UUID | None:
    row = conn.execute(
        sql.SQL(
            "SELECT event_id FROM {}.event WHERE stream = %s AND kind = 'purge'"
            " AND new ->> 'purge_id' = %s"
        ).format(sql.Identifier(schema)),
        (stream, purge_id),
    ).fetchone()
    return None if row is None else row[0]


def _wait_recorded(
    conn: psycopg.Connection[TupleRow], schema: str, ids: dict[str, str], timeout: float
) -> None:
    """Wait until the worker has sealed every purge record (purge id -> stream) and signed
    it; nothing may be dropped before, since only the signed chain makes the record count."""
    deadline = time.monotonic() + timeout
    while True:
        states = [_record_state(conn, schema, stream, purge_id) for purge_id, stream in ids.items()]
        if all(state == "signed" for state in states):
            return
        if time.monotonic() > deadline:
            stream = next(iter(ids.values()))
            if "missing" in states:
                raise CdcAuditError(
                    f"the worker did not seal the purge record of stream {stream} within"
                    f" {timeout:g} s; nothing was dropped (is `cdc-audit worker` running?)"
                )
            raise CdcAuditError(
                f"the purge record of stream {stream} is sealed but not signed: is the worker"
                " running with CDC_AUDIT_SIGNING_KEY_FILE? nothing was dropped"
            )
        time.sleep(_POLL)


def _record_state(
    conn: psycopg.Connection[TupleRow], schema: str, stream: str, purge_id: str
) -> str:
    row = conn.execute(
        sql.SQL(
            "SELECT EXISTS (SELECT 1 FROM {0}.checkpoint c"
            " WHERE c.stream = e.stream AND c.last_seq >= e.seq)"
            " FROM {0}.event e WHERE e.stream = %s AND e.kind = 'purge'"
            " AND e.new ->> 'purge_id' = %s"
        ).format(sql.Identifier(schema)),
        (stream, purge_id),
    ).fetchone()
    conn.commit()
    if row is None:
        return "missing"
    return "signed" if row[0] else "unsigned"


def purge_job(context: JobContext) -> str:
    """The scheduled purge: drops what may go and says what it did."""
    with connect(context.dsn) as conn:
        result = purge(
            conn,
            context.schema,
            context.policy,
            context.now(),
            progress=context.progress,
            signing_key=context.signing_key,
        )
    if not result.dropped:
        return "purge: nothing has passed its retention"
    return (
        f"purge: dropped {len(result.dropped)} partition(s), {result.events} event(s):"
        f" {', '.join(result.dropped)}"
    )
