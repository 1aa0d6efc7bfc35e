"""Decoder for PostgreSQL's pgoutput logical replication protocol and its CopyData framing.

The worker asks for ``proto_version '1'`` with ``messages 'true'`` and without ``streaming``,
``two_phase`` or ``binary``. Protocol versions 2 to 4 only change the layout of messages inside
*streamed* transactions (they add an xid) and add message types for streaming and two-phase
commit, so with those options off every message has the version 1 layout. A message type we did
not ask for (stream, two-phase) or a binary tuple value is reported as a `DecodeError` rather
than guessed at: silently mis-decoding a change is worse than stopping.

Layout reference: "Logical Replication Message Formats" and "Streaming Replication Protocol" in
the PostgreSQL documentation. All integers are big-endian.

Every decoding failure (truncated or corrupted input, unknown message type, bad UTF-8, a tuple
whose column count disagrees with its relation) raises `DecodeError` with the byte offset of the
problem; no other exception escapes the decoder for any input bytes.
"""

from __future__ import annotations

import enum
import re
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Final, Literal, TypeAlias

from cdc_audit.errors import CdcAuditError, InvalidInput
from cdc_audit.records import record

__all__ = [
    "PG_EPOCH",
    "UNCHANGED",
    "Begin",
    "Column",
    "Commit",
    "DecodeError",
    "Delete",
    "Insert",
    "InvalidLsn",
    "LogicalMessage",
    "Origin",
    "PgOutputMessage",
    "Relation",
    "RelationCache",
    "Truncate",
    "TupleValue",
    "TypeMessage",
    "Unchanged",
    "Update",
    "datetime_to_pg_timestamp",
    "decode_keepalive",
    "decode_message",
    "decode_xlogdata",
    "encode_standby_status",
    "format_lsn",
    "parse_lsn",
    "pg_now",
    "pg_timestamp_to_datetime",
]

Buffer: TypeAlias = bytes | bytearray | memoryview


class DecodeError(CdcAuditError):
    """A replication message that cannot be decoded.

    `offset` is the byte position in the message where decoding failed (for a truncated
    message: its length).
    """

    def __init__(self, message: str, offset: int) -> None:
        self.message = message
        self.offset = offset
        super().__init__(f"{message} (at byte {offset})")


class InvalidLsn(InvalidInput, ValueError):
    """A string that is not an LSN in PostgreSQL's ``X/X`` notation.

    Also a ValueError so that it works as an argument-parser type function.
    """


class Unchanged(enum.Enum):
    """Type of `UNCHANGED`: a TOASTed value the server did not send because it did not change."""

    UNCHANGED = "UNCHANGED"

    def __repr__(self) -> str:
        return "UNCHANGED"


UNCHANGED: Final = Unchanged.UNCHANGED
"""Marks a tuple column sent as 'u' (unchanged out-of-line TOAST value, content not sent)."""

TupleValue: TypeAlias = str | Unchanged | None
"""One column of a tuple: decoded text, None for SQL NULL, or `UNCHANGED`."""

# Microseconds between the Unix epoch and the PostgreSQL epoch (2000-01-01 00:00:00 UTC).
_PG_EPOCH_UNIX_US: Final = 946_684_800_000_000
PG_EPOCH: Final = datetime(2000, 1, 1, tzinfo=UTC)


# --------------------------------------------------------------------------------------------
# Messages


@record
class Begin:
    """'B': start of a committed transaction. Times are microseconds since `PG_EPOCH`."""

    final_lsn: int
    commit_time: int
    xid: int


@record
class Commit:
    """'C': end of a transaction. `end_lsn` is the position to confirm once it is sealed."""

    flags: int
    commit_lsn: int
    end_lsn: int
    commit_time: int


@dataclass(frozen=True, slots=True)
class Origin:
    """'O': the transaction was replicated from another node."""

    commit_lsn: int
    name: str


@dataclass(frozen=True, slots=True)
class Column:
    """One published column of a relation, in tuple order."""

    flags: int
    name: str
    type_oid: int
    typmod: int

    @property
    def is_key(self) -> bool:
        """Whether the column is part of the replica identity."""
        return bool(self.flags & 1)


@dataclass(frozen=True, slots=True)
class Relation:
    """'R': the shape of a relation, sent before its first change and after it changes.

    `namespace` is empty for pg_catalog. `replica_identity` is pg_class.relreplident:
    'd' default (primary key), 'n' nothing, 'f' full, 'i' index.
    """

    oid: int
    namespace: str
    name: str
    replica_identity: str
    columns: tuple[Column, ...]

    @property
    def column_names(self) -> tuple[str, ...]:
        """Column names in tuple order."""
        return tuple(c.name for c in self.columns)


@dataclass(frozen=True, slots=True)
class TypeMessage:
    """'Y': a non-built-in data type used by a following Relation."""

    oid: int
    namespace: str
    name: str


@record
class Insert:
    """'I': a new row."""

    relation_oid: int
    new: list[TupleValue]


@record
class Update:
    """'U': a changed row.

    `old_kind` is 'K' (old tuple holds only the replica identity key, others NULL; sent only
    when the key changed), 'O' (whole old row, REPLICA IDENTITY FULL) or None (no old tuple).
    """

    relation_oid: int
    old_kind: Literal["K", "O"] | None
    old: list[TupleValue] | None
    new: list[TupleValue]


@record
class Delete:
    """'D': a removed row; `old_kind` as for `Update`, but never None."""

    relation_oid: int
    old_kind: Literal["K", "O"]
    old: list[TupleValue]


@dataclass(frozen=True, slots=True)
class Truncate:
    """'T': one TRUNCATE statement over one or more relations."""

    options: int
    relation_oids: tuple[int, ...]

    @property
    def cascade(self) -> bool:
        """TRUNCATE ... CASCADE."""
        return bool(self.options & 1)

    @property
    def restart_identity(self) -> bool:
        """TRUNCATE ... RESTART IDENTITY."""
        return bool(self.options & 2)


@record
class LogicalMessage:
    """'M': a pg_logical_emit_message() payload.

    A transactional message arrives between Begin and Commit; a non-transactional one arrives
    on its own, even if the emitting transaction later rolled back.
    """

    transactional: bool
    lsn: int
    prefix: str
    content: bytes


PgOutputMessage: TypeAlias = (
    Begin
    | Commit
    | Origin
    | Relation
    | TypeMessage
    | Insert
    | Update
    | Delete
    | Truncate
    | LogicalMessage
)


class RelationCache:
    """Relations by OID, as announced by Relation messages.

    The worker calls `add` for each Relation message (after comparing with the previous shape,
    if it cares); `decode_message` reads it to check tuple column counts.
    """

    __slots__ = ("_by_oid",)

    def __init__(self) -> None:
        self._by_oid: dict[int, Relation] = {}

    def add(self, relation: Relation) -> None:
        """Record or replace the shape of `relation.oid`."""
        self._by_oid[relation.oid] = relation

    def get(self, oid: int) -> Relation | None:
        """The relation with this OID, or None if none was announced."""
        return self._by_oid.get(oid)

    def __getitem__(self, oid: int) -> Relation:
        return self._by_oid[oid]

    def __contains__(self, oid: object) -> bool:
        return oid in self._by_oid

    def __len__(self) -> int:
        return len(self._by_oid)

    def clear(self) -> None:
        """Forget every relation (the server re-sends them on a new replication session)."""
        self._by_oid.clear()


# --------------------------------------------------------------------------------------------
# Decoding

_U32: Final = struct.Struct(">I")
_I32: Final = struct.Struct(">i")
_I16: Final = struct.Struct(">h")
_BEGIN: Final = struct.Struct(">QqI")
_COMMIT: Final = struct.Struct(">BQQq")
_ORIGIN_LSN: Final = struct.Struct(">Q")
_COLUMN_TYPE: Final = struct.Struct(">Ii")
_MESSAGE_HEAD: Final = struct.Struct(">BQ")
_TRUNCATE_HEAD: Final = struct.Struct(">iB")
_XLOGDATA: Final = struct.Struct(">QQq")
_KEEPALIVE: Final = struct.Struct(">QqB")
_STANDBY_STATUS: Final = struct.Struct(">cQQQqB")

_SUPPORTED_PROTO_VERSIONS: Final = frozenset({1, 2, 3, 4})
_REPLICA_IDENTITIES: Final = frozenset("dnfi")

_STREAM_TYPES: Final = {
    ord("S"): "Stream Start",
    ord("E"): "Stream Stop",
    ord("c"): "Stream Commit",
    ord("A"): "Stream Abort",
}
_TWO_PHASE_TYPES: Final = {
    ord("b"): "Begin Prepare",
    ord("P"): "Prepare",
    ord("K"): "Commit Prepared",
    ord("r"): "Rollback Prepared",
    ord("p"): "Stream Prepare",
}


def _truncated(what: str, n: int) -> DecodeError:
    return DecodeError(f"truncated {what} message", n)


def _expect_end(pos: int, n: int, what: str) -> None:
    # Trailing bytes mean a length field lied somewhere; refuse rather than ignore them.
    if pos != n:
        raise DecodeError(f"{n - pos} unexpected trailing bytes in {what} message", pos)


def _cstring(buf: bytes, pos: int, what: str) -> tuple[str, int]:
    """Decode the NUL-terminated UTF-8 string at `pos`; return it and the position after."""
    try:
        end = buf.index(b"\0", pos)
    except ValueError:
        raise DecodeError(f"unterminated {what}", pos) from None
    try:
        return buf[pos:end].decode(), end + 1
    except UnicodeDecodeError as exc:
        raise DecodeError(f"{what} is not valid UTF-8", pos + exc.start) from None


def _decode_tuple(buf: bytes, pos: int, n: int, expected: int) -> tuple[list[TupleValue], int]:
    """Decode TupleData at `pos`; `expected` is the relation's column count, or -1 if unknown.

    This is the hot path (every column of every row): literal ints and local names only, no
    global lookups inside the loop.
    """
    if pos + 2 > n:
        raise DecodeError("truncated tuple data", n)
    (count,) = _I16.unpack_from(buf, pos)
    if count < 0 or (expected >= 0 and count != expected):
        raise DecodeError(f"tuple has {count} columns, relation has {expected}", pos)
    pos += 2
    values: list[TupleValue] = []
    append = values.append
    for _ in range(count):
        if pos >= n:
            raise DecodeError("truncated tuple data", n)
        kind = buf[pos]
        if kind == 0x74:  # 't': text, Int32 length + bytes
            start = pos + 5
            if start > n:
                raise DecodeError("truncated tuple data", n)
            (length,) = _I32.unpack_from(buf, pos + 1)
            pos = start + length
            if length < 0 or pos > n:
                raise DecodeError(f"text value length {length} overruns the message", start - 4)
            try:
                append(buf[start:pos].decode())
            except UnicodeDecodeError as exc:
                raise DecodeError("text value is not valid UTF-8", start + exc.start) from None
        elif kind == 0x6E:  # 'n': NULL
            append(None)
            pos += 1
        elif kind == 0x75:  # 'u': unchanged TOAST value
            append(UNCHANGED)
            pos += 1
        elif kind == 0x62:  # 'b': binary
            raise DecodeError("binary tuple value, but binary mode was not requested", pos)
        else:
            raise DecodeError(f"unknown tuple value kind {kind:#04x}", pos)
    return values, pos


def _column_count(relations: RelationCache | None, oid: int) -> int:
    if relations is None:
        return -1
    relation = relations.get(oid)
    if relation is None:
        raise DecodeError(f"change for relation OID {oid} before its Relation message", 1)
    return len(relation.columns)


def _decode_begin(buf: bytes, n: int, relations: RelationCache | None) -> Begin:
    if n != 21:
        raise DecodeError(f"Begin message must be 21 bytes, got {n}", min(n, 21))
    final_lsn, commit_time, xid = _BEGIN.unpack_from(buf, 1)
    return Begin(final_lsn, _commit_time(commit_time, "Begin", 9), xid)


def _decode_commit(buf: bytes, n: int, relations: RelationCache | None) -> Commit:
    if n != 26:
        raise DecodeError(f"Commit message must be 26 bytes, got {n}", min(n, 26))
    flags, commit_lsn, end_lsn, commit_time = _COMMIT.unpack_from(buf, 1)
    return Commit(flags, commit_lsn, end_lsn, _commit_time(commit_time, "Commit", 18))


def _commit_time(value: int, what: str, offset: int) -> int:
    # A commit time is "now"; one a datetime cannot hold (outside years 1-9999) is damage,
    # and would otherwise fail later, as an OverflowError, where the time is converted.
    if not _MIN_TIME_US <= value <= _MAX_TIME_US:
        raise DecodeError(f"{what} commit time {value} is out of range", offset)
    return value


def _decode_origin(buf: bytes, n: int, relations: RelationCache | None) -> Origin:
    if n < 10:
        raise _truncated("Origin", n)
    (commit_lsn,) = _ORIGIN_LSN.unpack_from(buf, 1)
    name, pos = _cstring(buf, 9, "origin name")
    _expect_end(pos, n, "Origin")
    return Origin(commit_lsn, name)


def _decode_relation(buf: bytes, n: int, relations: RelationCache | None) -> Relation:
    if n < 6:
        raise _truncated("Relation", n)
    (oid,) = _U32.unpack_from(buf, 1)
    namespace, pos = _cstring(buf, 5, "relation namespace")
    name, pos = _cstring(buf, pos, "relation name")
    if pos + 3 > n:
        raise _truncated("Relation", n)
    identity = chr(buf[pos])
    if identity not in _REPLICA_IDENTITIES:
        raise DecodeError(f"unknown replica identity {identity!r}", pos)
    (ncols,) = _I16.unpack_from(buf, pos + 1)
    if ncols < 0:
        raise DecodeError(f"negative column count {ncols}", pos + 1)
    pos += 3
    columns = []
    for _ in range(ncols):
        if pos >= n:
            raise _truncated("Relation", n)
        flags = buf[pos]
        column_name, pos = _cstring(buf, pos + 1, "column name")
        if pos + 8 > n:
            raise _truncated("Relation", n)
        type_oid, typmod = _COLUMN_TYPE.unpack_from(buf, pos)
        pos += 8
        columns.append(Column(flags, column_name, type_oid, typmod))
    _expect_end(pos, n, "Relation")
    return Relation(oid, namespace, name, identity, tuple(columns))


def _decode_type(buf: bytes, n: int, relations: RelationCache | None) -> TypeMessage:
    if n < 7:
        raise _truncated("Type", n)
    (oid,) = _U32.unpack_from(buf, 1)
    namespace, pos = _cstring(buf, 5, "type namespace")
    name, pos = _cstring(buf, pos, "type name")
    _expect_end(pos, n, "Type")
    return TypeMessage(oid, namespace, name)


def _decode_insert(buf: bytes, n: int, relations: RelationCache | None) -> Insert:
    if n < 6:
        raise _truncated("Insert", n)
    (oid,) = _U32.unpack_from(buf, 1)
    if buf[5] != 0x4E:  # 'N'
        raise DecodeError(f"expected 'N' in Insert, got {buf[5]:#04x}", 5)
    new, pos = _decode_tuple(buf, 6, n, _column_count(relations, oid))
    _expect_end(pos, n, "Insert")
    return Insert(oid, new)


def _decode_update(buf: bytes, n: int, relations: RelationCache | None) -> Update:
    if n < 6:
        raise _truncated("Update", n)
    (oid,) = _U32.unpack_from(buf, 1)
    expected = _column_count(relations, oid)
    marker = buf[5]
    old_kind: Literal["K", "O"] | None = None
    old: list[TupleValue] | None = None
    pos = 6
    if marker == 0x4B or marker == 0x4F:  # 'K' or 'O'
        old_kind = "K" if marker == 0x4B else "O"
        old, pos = _decode_tuple(buf, 6, n, expected)
        if pos >= n:
            raise _truncated("Update", n)
        marker = buf[pos]
        pos += 1
    if marker != 0x4E:  # 'N'
        raise DecodeError(f"expected 'N' in Update, got {marker:#04x}", pos - 1)
    new, pos = _decode_tuple(buf, pos, n, expected)
    _expect_end(pos, n, "Update")
    return Update(oid, old_kind, old, new)


def _decode_delete(buf: bytes, n: int, relations: RelationCache | None) -> Delete:
    if n < 6:
        raise _truncated("Delete", n)
    (oid,) = _U32.unpack_from(buf, 1)
    marker = buf[5]
    if marker == 0x4B:
        old_kind: Literal["K", "O"] = "K"
    elif marker == 0x4F:
        old_kind = "O"
    else:
        raise DecodeError(f"expected 'K' or 'O' in Delete, got {marker:#04x}", 5)
    old, pos = _decode_tuple(buf, 6, n, _column_count(relations, oid))
    _expect_end(pos, n, "Delete")
    return Delete(oid, old_kind, old)


def _decode_truncate(buf: bytes, n: int, relations: RelationCache | None) -> Truncate:
    if n < 6:
        raise _truncated("Truncate", n)
    count, options = _TRUNCATE_HEAD.unpack_from(buf, 1)
    # Check the length before building a format string from an untrusted count.
    if count < 0 or n != 6 + 4 * count:
        raise DecodeError(f"Truncate of {count} relations does not fit {n} bytes", 1)
    oids = struct.unpack_from(f">{count}I", buf, 6)
    return Truncate(options, oids)


def _decode_logical_message(buf: bytes, n: int, relations: RelationCache | None) -> LogicalMessage:
    # No xid field: it exists (protocol >= 2) only inside streamed transactions, which we
    # refuse, so the layout is the same in every protocol version.
    if n < 11:
        raise _truncated("logical decoding Message", n)
    flags, lsn = _MESSAGE_HEAD.unpack_from(buf, 1)
    prefix, pos = _cstring(buf, 10, "message prefix")
    if pos + 4 > n:
        raise _truncated("logical decoding Message", n)
    (length,) = _I32.unpack_from(buf, pos)
    pos += 4
    if length < 0 or pos + length != n:
        raise DecodeError(f"message content length {length} does not match the message", pos - 4)
    return LogicalMessage(bool(flags & 1), lsn, prefix, buf[pos:n])


_Decoder: TypeAlias = Callable[[bytes, int, RelationCache | None], PgOutputMessage]

_DECODERS: Final[dict[int, _Decoder]] = {
    ord("B"): _decode_begin,
    ord("C"): _decode_commit,
    ord("O"): _decode_origin,
    ord("R"): _decode_relation,
    ord("Y"): _decode_type,
    ord("I"): _decode_insert,
    ord("U"): _decode_update,
    ord("D"): _decode_delete,
    ord("T"): _decode_truncate,
    ord("M"): _decode_logical_message,
}


def _unrequested(kind: int, proto_version: int) -> DecodeError:
    if kind in _STREAM_TYPES:
        what = f"{_STREAM_TYPES[kind]} message {chr(kind)!r}"
        if proto_version < 2:
            return DecodeError(f"{what} does not exist in protocol version {proto_version}", 0)
        return DecodeError(f"{what} received, but streaming was not requested", 0)
    if kind in _TWO_PHASE_TYPES:
        what = f"{_TWO_PHASE_TYPES[kind]} message {chr(kind)!r}"
        if proto_version < 3:
            return DecodeError(f"{what} does not exist in protocol version {proto_version}", 0)
        return DecodeError(f"{what} received, but two_phase was not requested", 0)
    return DecodeError(f"unknown message type {kind:#04x}", 0)


def decode_message(
    data: Buffer, relations: RelationCache | None = None, *, proto_version: int = 1
) -> PgOutputMessage:
    """Decode one pgoutput message (the payload of an XLogData message).

    With `relations`, the column count of every Insert/Update/Delete tuple is checked against
    the relation's last Relation message, and a change to an unannounced relation is an error.
    The cache is not modified: the caller adds each returned `Relation`.

    Raises DecodeError for any input that is not a well-formed message of the layout requested
    with `proto_version`, and ValueError for an unsupported `proto_version`.
    """
    if proto_version not in _SUPPORTED_PROTO_VERSIONS:
        raise ValueError(f"unsupported pgoutput protocol version {proto_version}")
    # One copy of a memoryview is cheaper than the per-field cost of working on it, and gives
    # bytes.index for C strings.
    buf = data if type(data) is bytes else bytes(data)
    n = len(buf)
    if n == 0:
        raise DecodeError("empty message", 0)
    decoder = _DECODERS.get(buf[0])
    if decoder is None:
        raise _unrequested(buf[0], proto_version)
    return decoder(buf, n, relations)


# --------------------------------------------------------------------------------------------
# CopyData framing of the streaming replication protocol


def decode_xlogdata(data: Buffer) -> tuple[int, int, int, memoryview]:
    """Split an XLogData ('w') CopyData message.

    Returns (wal_start, wal_end, send_time, payload); send_time is microseconds since
    `PG_EPOCH`; payload is a zero-copy view for `decode_message`. wal_start can be 0 for some
    messages: use the Commit message's LSNs for positions.
    """
    view = memoryview(data)
    if len(view) < 25:
        raise DecodeError(f"XLogData message must be at least 25 bytes, got {len(view)}", len(view))
    if view[0] != 0x77:  # 'w'
        raise DecodeError(f"expected XLogData 'w', got {view[0]:#04x}", 0)
    wal_start, wal_end, send_time = _XLOGDATA.unpack_from(view, 1)
    return wal_start, wal_end, send_time, view[25:]


def decode_keepalive(data: Buffer) -> tuple[int, int, bool]:
    """Decode a primary keepalive ('k'): (wal_end, send_time, reply_requested).

    A keepalive that requests a reply must be answered promptly, or wal_sender_timeout ends the
    connection.
    """
    view = memoryview(data)
    if len(view) != 18:
        raise DecodeError(
            f"keepalive message must be 18 bytes, got {len(view)}", min(len(view), 18)
        )
    if view[0] != 0x6B:  # 'k'
        raise DecodeError(f"expected keepalive 'k', got {view[0]:#04x}", 0)
    wal_end, send_time, reply = _KEEPALIVE.unpack_from(view, 1)
    return wal_end, send_time, reply != 0


def encode_standby_status(
    written: int, flushed: int, applied: int, now: int, reply: bool = False
) -> bytes:
    """Build a standby status update ('r') to send with put_copy_data.

    LSNs are the next byte after what was written/flushed/applied; `now` is microseconds since
    `PG_EPOCH` (see `pg_now`). The server frees WAL up to `flushed`, so pass only positions
    whose events are durably committed locally.
    """
    try:
        return _STANDBY_STATUS.pack(b"r", written, flushed, applied, now, 1 if reply else 0)
    except struct.error as exc:
        raise ValueError(f"standby status field out of range: {exc}") from None


# --------------------------------------------------------------------------------------------
# LSNs and timestamps

_LSN_RE: Final = re.compile(r"([0-9A-Fa-f]{1,8})/([0-9A-Fa-f]{1,8})")
_LSN_MAX: Final = (1 << 64) - 1


def format_lsn(lsn: int) -> str:
    """Format an LSN as PostgreSQL does: ``format_lsn(0x16B374D848) == "16/B374D848"``."""
    if not 0 <= lsn <= _LSN_MAX:
        raise ValueError(f"LSN out of range: {lsn}")
    return f"{lsn >> 32:X}/{lsn & 0xFFFFFFFF:X}"


def parse_lsn(text: str) -> int:
    """Parse PostgreSQL's ``X/X`` LSN notation (either case); raises InvalidLsn otherwise."""
    match = _LSN_RE.fullmatch(text)
    if match is None:
        raise InvalidLsn(f"not an LSN (expected hex 'X/X', like 16/B374D848): {text!r}")
    return (int(match[1], 16) << 32) | int(match[2], 16)


_MIN_TIME_US: Final = (datetime(1, 1, 1, tzinfo=UTC) - PG_EPOCH) // timedelta(microseconds=1)
_MAX_TIME_US: Final = (datetime.max.replace(tzinfo=UTC) - PG_EPOCH) // timedelta(microseconds=1)


def pg_now() -> int:
    """The current time in microseconds since `PG_EPOCH`, for `encode_standby_status`."""
    return time.time_ns() // 1000 - _PG_EPOCH_UNIX_US


def pg_timestamp_to_datetime(us: int) -> datetime:
    """Convert protocol microseconds since `PG_EPOCH` to an aware UTC datetime."""
    return PG_EPOCH + timedelta(microseconds=us)


def datetime_to_pg_timestamp(value: datetime) -> int:
    """Convert an aware datetime to microseconds since `PG_EPOCH`."""
    if value.tzinfo is None:
        raise ValueError("naive datetime: a time zone is required")
    delta = value - PG_EPOCH
    return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds
