"""A purge record read back from the trail: where verification of what remains starts.

The record's format is specified in `cdc_audit.purge`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg import sql
from psycopg.rows import TupleRow

from .checkpoints import Checkpoint
from .errors import CdcAuditError
from .values import parse_json_exact

__all__ = ["PurgeStart", "parse_purge_record", "purge_record_ending_at"]


@dataclass(frozen=True)
class PurgeStart:
    """A purge record read back: where verification of what remains starts."""

    stream: str
    first_seq: int
    last_seq: int
    last_hash: bytes
    checkpoint: Checkpoint
    merkle_size: int
    merkle_frontier: list[bytes]
    record: dict[str, Any]
    """The record as sealed (the purge event's `new`), to be met again in the chain."""
    seq: int = 0
    """The purge event's own seq (0 when read from an export line)."""


def parse_purge_record(record: Any, stream: str, source: str, seq: int = 0) -> PurgeStart:
    """A purge event's `new` as a PurgeStart; ValueError names what is malformed."""
    try:
        checkpoint = Checkpoint.from_record(record["checkpoint"], source)
        return PurgeStart(
            stream=stream,
            first_seq=int(record["first_seq"]),
            last_seq=int(record["last_seq"]),
            last_hash=bytes.fromhex(record["last_hash"]),
            checkpoint=checkpoint,
            merkle_size=int(record["merkle_size"]),
            merkle_frontier=[bytes.fromhex(h) for h in record["merkle_frontier"]],
            record=record,
            seq=seq,
        )
    except (KeyError, TypeError, ValueError, CdcAuditError) as exc:
        raise ValueError(f"{source}: malformed purge record: {exc}") from None


def purge_record_ending_at(
    conn: psycopg.Connection[TupleRow], schema: str, stream: str, last_seq: int
) -> PurgeStart | None:
    """The newest sealed purge record of `stream` whose last dropped event is `last_seq`."""
    row = conn.execute(
        sql.SQL(
            "SELECT new::text, seq FROM {}.event WHERE stream = %s AND kind = 'purge'"
            " AND new ->> 'last_seq' = %s ORDER BY seq DESC LIMIT 1"
        ).format(sql.Identifier(schema)),
        (stream, str(last_seq)),
    ).fetchone()
    if row is None:
        return None
    source = f"{schema}.event purge record at seq {row[1]}"
    return parse_purge_record(parse_json_exact(row[0]), stream, source, int(row[1]))
