"""The worker's side of the trail tables: chain heads, progress, and batches written by COPY.

A batch is written in one transaction: the sealed events (COPY, text format built here, since
every value is already text or canonical JSON) and the progress row that says how far the
stream has been sealed. Either both are in the trail or neither is, which is what makes a
restart exactly-once.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Final

import psycopg
from psycopg import sql
from psycopg.rows import TupleRow

from cdc_audit.canonical import JsonValue, canonical_bytes, canonical_bytes_trusted
from cdc_audit.chain import GENESIS, SealedEvent, StreamChain, format_commit_time, uuid_text
from cdc_audit.checkpoints import Checkpoint
from cdc_audit.errors import CdcAuditError, NotInstalled
from cdc_audit.names import InstallNames
from cdc_audit.pgoutput import format_lsn, parse_lsn
from cdc_audit.policy import LoadedPolicy, parse_policy
from cdc_audit.verify import stored_checkpoints

__all__ = ["EVENT_COLUMNS", "CopyEncoder", "Progress", "TrailWriter", "copy_row"]

EVENT_COLUMNS: Final = (
    "stream",
    "seq",
    "event_id",
    "commit_lsn",
    "commit_time",
    "xid",
    "kind",
    "schema_name",
    "table_name",
    "row_key",
    "old",
    "new",
    "changed",
    "actor_id",
    "reason",
    "context",
    "context_missing",
    "payload_hash",
    "prev_hash",
    "hash",
    "signature",
    "key_id",
)
"""The columns a batch fills, in the order of `copy_row`'s fields."""

_NULL: Final = b"\\N"
# COPY text format: a backslash starts an escape; tab, newline and CR delimit.
_COPY_ESCAPES: Final = str.maketrans({"\\": "\\\\", "\t": "\\t", "\n": "\\n", "\r": "\\r"})


def _text(value: str | None) -> bytes:
    if value is None:
        return _NULL
    return value.translate(_COPY_ESCAPES).encode()


def _json(value: JsonValue) -> bytes:
    if value is None:
        return _NULL
    # Canonical JSON escapes every control character, so only backslashes need doubling.
    return canonical_bytes_trusted(value).replace(b"\\", b"\\\\")


def _array(items: Sequence[str] | None) -> bytes:
    if items is None:
        return _NULL
    quoted = ('"' + item.replace("\\", "\\\\").replace('"', '\\"') + '"' for item in items)
    return _text("{" + ",".join(quoted) + "}")


class CopyEncoder:
    """Lines of COPY text format for sealed events, fields in `EVENT_COLUMNS` order.

    Most fields repeat within a transaction (stream, table, actor, commit position, context),
    so their encodings are remembered for the life of one encoder: use one per batch.
    """

    __slots__ = ("_contexts", "_last_lsn", "_last_time", "_texts")

    def __init__(self) -> None:
        self._texts: dict[str, bytes] = {}
        self._last_lsn: tuple[int | None, bytes] = (None, _NULL)
        self._last_time: tuple[datetime | None, bytes] = (None, b"")
        # Keyed by identity: the drafts of a transaction share one context object, and the
        # batch keeps every one of them alive while this encoder is in use.
        self._contexts: dict[int, bytes] = {}

    def _text(self, value: str | None) -> bytes:
        if value is None:
            return _NULL
        encoded = self._texts.get(value)
        if encoded is None:
            encoded = _text(value)
            if len(value) < 256:
                self._texts[value] = encoded
        return encoded

    def _context(self, value: JsonValue) -> bytes:
        if value is None:
            return _NULL
        key = id(value)
        encoded = self._contexts.get(key)
        if encoded is None:
            encoded = self._contexts[key] = _json(value)
        return encoded

    def _commit_lsn(self, lsn: int | None) -> bytes:
        if lsn != self._last_lsn[0]:
            self._last_lsn = (lsn, _NULL if lsn is None else format_lsn(lsn).encode())
        return self._last_lsn[1]

    def _commit_time(self, when: datetime) -> bytes:
        if when is not self._last_time[0]:
            self._last_time = (when, format_commit_time(when).encode())
        return self._last_time[1]

    def row(self, event: SealedEvent) -> bytes:
        draft = event.draft
        text = self._text
        fields = (
            text(draft.stream),
            str(event.seq).encode(),
            uuid_text(draft.event_id).encode(),
            self._commit_lsn(draft.commit_lsn),
            self._commit_time(draft.commit_time),
            _NULL if draft.xid is None else str(draft.xid).encode(),
            text(draft.kind),
            text(draft.schema_name),
            text(draft.table_name),
            _json(draft.row_key),
            _json(draft.old),
            _json(draft.new),
            _array(draft.changed),
            text(draft.actor_id),
            text(draft.reason),
            self._context(draft.context),
            b"t" if draft.context_missing else b"f",
            b"\\\\x" + event.payload_hash.hex().encode(),
            b"\\\\x" + event.prev_hash.hex().encode(),
            b"\\\\x" + event.hash.hex().encode(),
            _NULL if event.signature is None else b"\\\\x" + event.signature.hex().encode(),
            text(event.key_id),
        )
        return b"\t".join(fields) + b"\n"


def copy_row(event: SealedEvent) -> bytes:
    """One line of COPY text format for `event` (see `CopyEncoder`)."""
    return CopyEncoder().row(event)


def trail_streams(conn: psycopg.Connection[TupleRow], schema: str) -> list[str]:
    """Every stream that has events (a loose index scan over the primary key)."""
    rows = conn.execute(
        sql.SQL(
            "WITH RECURSIVE s(stream) AS ("
            " (SELECT stream FROM {0}.event ORDER BY stream LIMIT 1)"
            " UNION ALL SELECT (SELECT e.stream FROM {0}.event e WHERE e.stream > s.stream"
            " ORDER BY e.stream LIMIT 1) FROM s WHERE s.stream IS NOT NULL)"
            " SELECT stream FROM s WHERE stream IS NOT NULL"
        ).format(sql.Identifier(schema))
    ).fetchall()
    return [r[0] for r in rows]


def applied_policy(
    conn: psycopg.Connection[TupleRow], schema: str, version_id: int | None = None
) -> tuple[int, LoadedPolicy] | None:
    """The applied policy with this id (policy_version), or the latest; None when none."""
    row = conn.execute(
        sql.SQL(
            "SELECT id, policy_text, sha256 FROM {}.policy_version"
            " WHERE action = 'apply' AND policy_text IS NOT NULL"
            " AND (%s::bigint IS NULL OR id = %s) ORDER BY id DESC LIMIT 1"
        ).format(sql.Identifier(schema)),
        (version_id, version_id),
    ).fetchone()
    if row is None:
        return None
    policy_id, text, digest = row
    source = f"policy version {policy_id}"
    return policy_id, LoadedPolicy(parse_policy(text, source), text, digest, source)


def install_names(conn: psycopg.Connection[TupleRow], schema: str) -> InstallNames:
    """The names of the installation in `schema`, with the slot `apply` recorded."""
    row = conn.execute(
        "SELECT to_regclass(format('%%I.install_setting', %s::text)) IS NOT NULL", (schema,)
    ).fetchone()
    if row is None or not row[0]:
        conn.rollback()
        raise NotInstalled(f"cdc-audit is not installed in schema {schema}: run cdc-audit apply")
    slot = conn.execute(
        sql.SQL("SELECT value FROM {}.install_setting WHERE key = 'slot_name'").format(
            sql.Identifier(schema)
        )
    ).fetchone()
    conn.commit()
    return InstallNames(schema, conn.info.dbname, slot[0] if slot else None)


def slot_confirmed(conn: psycopg.Connection[TupleRow], slot: str) -> int:
    """The slot's confirmed_flush_lsn (0 when the slot is missing)."""
    row = conn.execute(
        "SELECT confirmed_flush_lsn::text FROM pg_catalog.pg_replication_slots"
        " WHERE slot_name = %s",
        (slot,),
    ).fetchone()
    conn.commit()
    return parse_lsn(row[0]) if row is not None and row[0] is not None else 0


@dataclass(frozen=True)
class Progress:
    """How far a slot's stream has been sealed (the progress row)."""

    end_lsn: int = 0
    """End LSN of the last whole transaction sealed: transactions committed before it are in."""
    partial_lsn: int | None = None
    """Commit LSN of a transaction sealed only in part, in batches..."""
    partial_done: int = 0
    """...and how many of its events (ordinals 0 to partial_done - 1) are sealed."""
    policy_version_id: int | None = None
    last_commit_time: datetime | None = None


def worker_identity() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


class TrailWriter:
    """Reads chain heads and progress, and writes sealed batches, over one connection.

    The connection is not in autocommit mode: `write` commits. After any error the caller
    must discard this writer and its chains (a failed batch has advanced the heads in memory).
    """

    def __init__(self, conn: psycopg.Connection[TupleRow], names: InstallNames) -> None:
        self.conn = conn
        self.names = names
        self._schema = sql.Identifier(names.schema)
        self._chains: dict[str, StreamChain] = {}
        self._months: set[tuple[int, int]] = set()
        self._copy = sql.SQL("COPY {}.event ({}) FROM STDIN").format(
            self._schema, sql.SQL(", ").join(map(sql.Identifier, EVENT_COLUMNS))
        )
        self._identity = worker_identity()
        self._append_as: sql.Composed | None = None
        self._append_checked = False

    # ---- reading what is there

    def read_progress(self) -> Progress:
        row = self.conn.execute(
            sql.SQL(
                "SELECT end_lsn::text, partial_lsn::text, partial_done, policy_version_id,"
                " last_commit_time FROM {}.progress WHERE slot_name = %s"
            ).format(self._schema),
            (self.names.slot,),
        ).fetchone()
        self.conn.commit()
        if row is None:
            return Progress()
        end, partial, done, policy_id, last_time = row
        return Progress(
            end_lsn=parse_lsn(end),
            partial_lsn=None if partial is None else parse_lsn(partial),
            partial_done=done or 0,
            policy_version_id=policy_id,
            last_commit_time=last_time,
        )

    def loaded_chain(self, stream: str) -> StreamChain | None:
        """The head of `stream` if it has been read already (no database access)."""
        return self._chains.get(stream)

    def chain(self, stream: str) -> StreamChain:
        """The head of `stream`, read from the trail the first time it is asked for."""
        chain = self._chains.get(stream)
        if chain is None:
            row = self.conn.execute(
                sql.SQL(
                    "SELECT seq, hash FROM {}.event WHERE stream = %s ORDER BY seq DESC LIMIT 1"
                ).format(self._schema),
                (stream,),
            ).fetchone()
            head = (1, GENESIS) if row is None else (row[0] + 1, bytes(row[1]))
            chain = StreamChain(stream, *head, trusted=True)
            self._chains[stream] = chain
        return chain

    def trail_streams(self) -> list[str]:
        return trail_streams(self.conn, self.names.schema)

    def load_policy(self, version_id: int | None) -> tuple[int, LoadedPolicy]:
        """The applied policy with this id, or the latest one when `version_id` is None."""
        found = applied_policy(self.conn, self.names.schema, version_id)
        self.conn.commit()
        if found is None:
            what = "no policy has been applied" if version_id is None else f"policy {version_id}"
            raise NotInstalled(f"{what} in schema {self.names.schema}: run cdc-audit apply")
        return found

    def key_columns(self, schema: str, table: str) -> list[str] | None:
        """The primary key columns of a table, in key order; None without a primary key."""
        rows = self.conn.execute(
            "SELECT a.attname FROM pg_catalog.pg_index i"
            " JOIN pg_catalog.pg_attribute a ON a.attrelid = i.indrelid"
            "  AND a.attnum = ANY (i.indkey::int2[])"
            " WHERE i.indrelid = to_regclass(format('%%I.%%I', %s::text, %s::text))"
            "  AND i.indisprimary"
            " ORDER BY array_position(i.indkey::int2[], a.attnum)",
            (schema, table),
        ).fetchall()
        return [r[0] for r in rows] or None

    # ---- writing

    def write(
        self,
        events: Sequence[SealedEvent],
        progress: Progress,
        checkpoints: Sequence[Checkpoint] = (),
    ) -> None:
        """Append `events` and `checkpoints` and set `progress`, in one transaction."""
        cursor = self.conn.cursor()
        self._ensure_partitions(e.draft.commit_time for e in events)
        if events:
            role = self._append_role()
            if role is not None:
                cursor.execute(role)
            with cursor.copy(self._copy) as copy:
                copy.write(self._copy_data(events))
        for checkpoint in checkpoints:
            cursor.execute(
                sql.SQL(
                    "INSERT INTO {}.checkpoint (stream, first_seq, last_seq, event_count,"
                    " head_hash, merkle_root, created_at, key_id, signature, statement)"
                    " VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s::jsonb)"
                ).format(self._schema),
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
        cursor.execute(
            sql.SQL(
                "INSERT INTO {}.progress AS p (slot_name, end_lsn, partial_lsn, partial_done,"
                " policy_version_id, last_commit_time, worker, updated_at)"
                " VALUES (%s, %s::pg_lsn, %s::pg_lsn, %s, %s, %s, %s, now())"
                " ON CONFLICT (slot_name) DO UPDATE SET end_lsn = excluded.end_lsn,"
                " partial_lsn = excluded.partial_lsn, partial_done = excluded.partial_done,"
                " policy_version_id = excluded.policy_version_id,"
                " last_commit_time = coalesce(excluded.last_commit_time, p.last_commit_time),"
                " worker = excluded.worker, updated_at = now()"
            ).format(self._schema),
            (
                self.names.slot,
                format_lsn(progress.end_lsn),
                None if progress.partial_lsn is None else format_lsn(progress.partial_lsn),
                progress.partial_done if progress.partial_lsn is not None else None,
                progress.policy_version_id,
                progress.last_commit_time,
                self._identity,
            ),
        )
        self.conn.commit()

    def _append_role(self) -> sql.Composed | None:
        """`SET LOCAL ROLE <writer>` when this login may take the writer role (which bypasses
        row-level security, refused to COPY otherwise), so the batch is written exactly as a
        least-privileged worker writes it; None when the login is not a member."""
        if not self._append_checked:
            writer = self.names.role("writer")
            row = self.conn.execute(
                sql.SQL(
                    "SELECT pg_has_role(current_user, {}, 'MEMBER'),"
                    " row_security_active({}::regclass), current_user"
                ).format(sql.Literal(writer), sql.Literal(f"{self.names.schema}.event"))
            ).fetchone()
            assert row is not None
            member, guarded, login = row
            if not member and guarded:
                raise CdcAuditError(
                    f"role {login} cannot append to the trail: row-level security guards"
                    f" {self.names.schema}.event; GRANT {writer} TO {login}"
                )
            if member:
                self._append_as = sql.SQL("SET LOCAL ROLE {}").format(sql.Identifier(writer))
            self._append_checked = True
        return self._append_as

    @staticmethod
    def _copy_data(events: Iterable[SealedEvent]) -> bytes:
        encoder = CopyEncoder()
        return b"".join([encoder.row(event) for event in events])

    def _ensure_partitions(self, times: Iterable[datetime]) -> None:
        for when in times:
            month = (when.year, when.month)
            if month not in self._months:
                self.conn.execute(
                    sql.SQL("SELECT {}.ensure_event_partition(%s)").format(self._schema), (when,)
                )
                self._months.add(month)

    def checkpoints(self, stream: str, after_seq: int = 0) -> list[Checkpoint]:
        """The stream's checkpoints ending after `after_seq`, in order."""
        found = stored_checkpoints(self.conn, self.names.schema, stream, after_seq)
        self.conn.commit()
        return found

    def hashes_after(self, stream: str, after_seq: int) -> Iterator[bytes]:
        """Hashes of the stream's events after `after_seq`, in order, fetched in chunks."""
        query = sql.SQL(
            "SELECT hash FROM {}.event WHERE stream = %s AND seq > %s ORDER BY seq"
        ).format(self._schema)
        with self.conn.cursor(name=f"hashes_{stream}") as cursor:
            cursor.itersize = 10_000
            cursor.execute(query, (stream, after_seq))
            for (digest,) in cursor:
                yield bytes(digest)
        self.conn.commit()

    def rotation_recorded(self, stream: str, after_seq: int, key_id: str) -> bool:
        """Whether a key_rotation event to `key_id` follows `after_seq` in the stream."""
        row = self.conn.execute(
            sql.SQL(
                "SELECT EXISTS (SELECT FROM {}.event WHERE stream = %s AND seq > %s"
                " AND kind = 'key_rotation' AND new ->> 'key_id' = %s)"
            ).format(self._schema),
            (stream, after_seq, key_id),
        ).fetchone()
        self.conn.commit()
        return bool(row and row[0])

    def mark(self, token: str) -> int:
        """Commit a marker message into the stream; returns its LSN."""
        row = self.conn.execute(
            sql.SQL("SELECT {}.mark(%s)::text").format(self._schema), (token,)
        ).fetchone()
        self.conn.commit()
        assert row is not None
        return parse_lsn(row[0])
