"""A logical replication client streaming pgoutput over psycopg's libpq layer.

`ReplicationStream` opens a ``replication=database`` connection, pins the session settings that
shape how values are rendered as text, checks the slot, runs ``START_REPLICATION`` and then
drives the CopyBoth stream itself through ``conn.pgconn``:

- only the asynchronous ``get_copy_data(1)`` is used, with ``select()`` on the socket for
  waiting, because the blocking form holds the GIL and cannot time out;
- keepalives that request a reply are answered at once, and a status update is sent every
  `StreamOptions.status_interval` seconds, or ``wal_sender_timeout`` ends the connection;
- that periodic update asks the server for a reply, and a connection that brings nothing
  back for `StreamOptions.silence_timeout` seconds after such a request is presumed dead (a
  silent network failure would otherwise leave the stream waiting until TCP gives up);
- the position reported to the server (flush = apply = write) is only what the caller passed
  to `ReplicationStream.confirm`, since the server frees WAL up to it.

The walsender accepts only the simple query protocol, so every statement sent here is a
parameterless string (psycopg then uses the simple protocol).
"""

from __future__ import annotations

import re
import select
import time
from dataclasses import dataclass
from types import TracebackType
from typing import Final

import psycopg
from psycopg import pq, sql
from psycopg.rows import TupleRow

from cdc_audit.db import with_keepalives
from cdc_audit.errors import CdcAuditError, InvalidInput
from cdc_audit.pgoutput import (
    Begin,
    Commit,
    PgOutputMessage,
    Relation,
    RelationCache,
    decode_keepalive,
    decode_message,
    decode_xlogdata,
    encode_standby_status,
    format_lsn,
    parse_lsn,
    pg_now,
)
from cdc_audit.records import record

__all__ = [
    "SESSION_SETTINGS",
    "ReplicationError",
    "ReplicationStream",
    "SlotLost",
    "StreamItem",
    "StreamOptions",
]

SESSION_SETTINGS: Final[tuple[tuple[str, str], ...]] = (
    ("TimeZone", "UTC"),
    ("DateStyle", "ISO, YMD"),
    ("IntervalStyle", "iso_8601"),
    ("extra_float_digits", "3"),
    ("bytea_output", "hex"),
)
"""Settings pinned in the decoding session: pgoutput renders values as text with them, and
that text is what gets hashed, so it must not depend on server, database or role defaults.
Plain ``SET`` is accepted on a ``replication=database`` connection (checked on PostgreSQL 15)."""

# PostgreSQL's own rule for slot names (ReplicationSlotValidateName).
_SLOT_NAME: Final = re.compile(r"[a-z0-9_]{1,63}")
_OPEN_TIMEOUT: Final = 30.0
_CLOSE_TIMEOUT: Final = 5.0
_KEEPALIVE: Final = 0x6B  # 'k'
_XLOGDATA: Final = 0x77  # 'w'


class SlotLost(CdcAuditError):
    """The replication slot does not exist or its WAL was removed (``wal_status = 'lost'``).

    Either way the changes since the last confirmed position cannot be read any more: a gap.
    """


class ReplicationError(CdcAuditError):
    """The replication connection failed, was refused or broke the protocol."""


@dataclass(frozen=True)
class StreamOptions:
    """What to stream and how often to report progress."""

    slot: str
    publication: str
    start_lsn: int = 0
    """0 starts at the slot's confirmed position; the server never starts earlier than it."""
    proto_version: int = 1
    status_interval: float = 10.0
    """Seconds between unsolicited standby status updates."""
    silence_timeout: float = 30.0
    """Seconds without any message after a requested reply before the stream fails."""


@record
class StreamItem:
    """One decoded pgoutput message with the positions of its XLogData header."""

    data_start: int
    """XLogData start LSN; 0 for some messages, so use Commit's LSNs for positions."""
    wal_end: int
    message: PgOutputMessage


def _one_line(text: str) -> str:
    text = text.strip()
    return text.splitlines()[0] if text else ""


def _first_line(exc: BaseException) -> str:
    return _one_line(str(exc)) or type(exc).__name__


def _repl_ident(name: str) -> str:
    # The replication command grammar has its own scanner: double-quoted identifiers and
    # single-quoted strings with doubled quotes, no E'' strings, so psycopg.sql does not apply.
    if "\0" in name:
        raise InvalidInput("identifier contains a NUL byte")
    return '"' + name.replace('"', '""') + '"'


def _repl_string(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def start_replication_command(options: StreamOptions) -> str:
    """The START_REPLICATION command for `options` (the slot name is validated first)."""
    if not _SLOT_NAME.fullmatch(options.slot):
        raise InvalidInput(
            f"invalid replication slot name {options.slot!r}:"
            " use 1-63 lower-case letters, digits and underscores"
        )
    plugin_options = ", ".join(
        [
            f"proto_version {_repl_string(str(options.proto_version))}",
            f"publication_names {_repl_string(_repl_ident(options.publication))}",
            "messages 'true'",
        ]
    )
    return (
        f"START_REPLICATION SLOT {_repl_ident(options.slot)} LOGICAL"
        f" {format_lsn(options.start_lsn)} ({plugin_options})"
    )


class ReplicationStream:
    """One logical replication connection streaming pgoutput.

    Use as a context manager, or call `open` and `close`. `read` returns decoded messages;
    after durably storing everything up to a Commit, pass its ``end_lsn`` to `confirm`.
    Not thread-safe.
    """

    def __init__(self, dsn: str, options: StreamOptions) -> None:
        self.dsn = dsn
        self.options = options
        self.relations = RelationCache()
        self._conn: psycopg.Connection[TupleRow] | None = None
        self._streaming = False
        self._confirmed = options.start_lsn
        self._wal_end = 0
        self._in_transaction = False
        self._last_status = 0.0
        self._reported = -1
        self._reply_requested: float | None = None
        """When a reply was requested with nothing received since (None: nothing pending)."""

    # ---------------------------------------------------------------------------------------
    # Opening

    def open(self) -> None:
        """Connect, pin the session settings, check the slot and start streaming.

        Raises SlotLost if the slot is missing or lost, ReplicationError for any other
        failure (connection refused, slot in use, publication missing, ...).
        """
        if self._conn is not None:
            raise ReplicationError("replication stream is already open")
        command = start_replication_command(self.options)
        try:
            self._conn = psycopg.connect(
                with_keepalives(self.dsn),
                replication="database",
                autocommit=True,
                application_name="cdc-audit",
            )
        except psycopg.Error as exc:
            raise ReplicationError(f"cannot connect for replication: {_first_line(exc)}") from exc
        try:
            self._prepare_session(self._conn)
            self._start(self._conn.pgconn, command)
        except BaseException:
            self._abandon()
            raise
        self.relations.clear()  # the server announces every relation again in a new session
        self._in_transaction = False
        self._last_status = time.monotonic()
        self._reply_requested = None

    def _prepare_session(self, conn: psycopg.Connection[TupleRow]) -> None:
        try:
            for name, value in SESSION_SETTINGS:
                conn.execute(
                    sql.SQL("SET {} = {}").format(sql.Identifier(name), sql.Literal(value))
                )
            # Fails unless this really is a walsender session (a proxy may drop the option).
            conn.execute("IDENTIFY_SYSTEM")
            row = conn.execute(
                sql.SQL(
                    "SELECT slot_type, plugin, database, wal_status, confirmed_flush_lsn::text,"
                    " current_database() FROM pg_catalog.pg_replication_slots"
                    " WHERE slot_name = {}"
                ).format(sql.Literal(self.options.slot))
            ).fetchone()
        except psycopg.Error as exc:
            raise ReplicationError(
                f"preparing the replication session failed: {_first_line(exc)}"
            ) from exc
        self._check_slot(row)

    def _check_slot(self, row: tuple[object, ...] | None) -> None:
        slot = self.options.slot
        if row is None:
            raise SlotLost(f"replication slot {slot} does not exist: run apply to create it")
        slot_type, plugin, database, wal_status, confirmed, current = row
        if slot_type != "logical" or plugin != "pgoutput":
            raise ReplicationError(
                f"replication slot {slot} is a {slot_type} slot with plugin {plugin},"
                " not a logical pgoutput slot"
            )
        if database != current:
            raise ReplicationError(f"replication slot {slot} belongs to database {database}")
        if wal_status == "lost":
            raise SlotLost(
                f"replication slot {slot} is lost: the server removed WAL it still needed"
            )
        # Start from what the server already holds as confirmed: reporting less would move
        # the slot backwards on servers that accept it (before PostgreSQL 17).
        if isinstance(confirmed, str):
            self._confirmed = max(self._confirmed, parse_lsn(confirmed))

    def _start(self, pgconn: pq.abc.PGconn, command: str) -> None:
        try:
            pgconn.send_query(command.encode())
            result = self._wait_result(pgconn)
        except psycopg.Error as exc:
            raise ReplicationError(f"START_REPLICATION failed: {_first_line(exc)}") from exc
        if result.status != pq.ExecStatus.COPY_BOTH:
            message = _one_line(result.get_error_message())
            status = pq.ExecStatus(result.status).name
            raise ReplicationError(f"START_REPLICATION failed: {message or status}")
        self._streaming = True

    @staticmethod
    def _wait_result(pgconn: pq.abc.PGconn) -> pq.abc.PGresult:
        """The next result, waiting on the socket rather than in a blocking libpq call."""
        deadline = time.monotonic() + _OPEN_TIMEOUT
        while pgconn.is_busy():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise ReplicationError("START_REPLICATION got no answer in time")
            select.select([pgconn.socket], [], [], remaining)
            pgconn.consume_input()
        result = pgconn.get_result()
        if result is None:
            raise ReplicationError("START_REPLICATION returned no result")
        return result

    # ---------------------------------------------------------------------------------------
    # Streaming

    def read(self, timeout: float, *, max_items: int = 10_000) -> list[StreamItem]:
        """Decoded messages available now, waiting up to `timeout` seconds for the first.

        Returns as soon as something has arrived and nothing more is waiting, after at most
        `max_items` messages (bounding memory), or after `timeout` with an empty list.
        Keepalives and periodic status updates are handled along the way. Raises
        ReplicationError if the connection breaks or the server ends the stream, DecodeError
        for a message that cannot be decoded.
        """
        pgconn = self._pgconn()
        deadline = time.monotonic() + timeout
        items: list[StreamItem] = []
        try:
            while len(items) < max_items:
                self._status_if_due()
                nbytes, data = pgconn.get_copy_data(1)
                if nbytes > 0:
                    item = self._handle(data)
                    if item is not None:
                        items.append(item)
                elif nbytes == 0:
                    if items:
                        # libpq's buffer is empty; keep going while the socket has more, so
                        # a busy stream gives batches of max_items, not of one buffer each.
                        if not self._readable_now(pgconn):
                            break
                    elif not self._wait(pgconn, deadline):
                        break
                else:
                    self._copy_ended(pgconn)
        except psycopg.Error as exc:
            self._streaming = False
            raise ReplicationError(f"replication connection failed: {_first_line(exc)}") from exc
        return items

    @staticmethod
    def _readable_now(pgconn: pq.abc.PGconn) -> bool:
        readable, _, _ = select.select([pgconn.socket], [], [], 0)
        if readable:
            pgconn.consume_input()
        return bool(readable)

    def _wait(self, pgconn: pq.abc.PGconn, deadline: float) -> bool:
        """Wait for input until the deadline or the next status update; False once past it."""
        now = time.monotonic()
        if self._reply_requested is not None:
            silent = now - self._reply_requested
            # What arrived while the caller was busy elsewhere is still to be read: not silence.
            if silent > self.options.silence_timeout and not self._readable_now(pgconn):
                self._streaming = False
                raise ReplicationError(
                    f"no answer from the server for {silent:.0f}s: connection presumed dead"
                )
        if now >= deadline:
            return False
        next_status = self._last_status + self.options.status_interval
        select.select([pgconn.socket], [], [], max(0.0, min(deadline, next_status) - now))
        pgconn.consume_input()
        return True

    def _handle(self, data: memoryview) -> StreamItem | None:
        self._reply_requested = None
        kind = data[0]
        if kind == _XLOGDATA:
            start, end, _sent, payload = decode_xlogdata(data)
            message = decode_message(
                payload, self.relations, proto_version=self.options.proto_version
            )
            self._wal_end = max(self._wal_end, end)
            self._track(message)
            return StreamItem(start, end, message)
        if kind == _KEEPALIVE:
            end, _sent, reply = decode_keepalive(data)
            self._wal_end = max(self._wal_end, end)
            if reply:
                self.send_status()
            return None
        raise ReplicationError(f"unexpected CopyData message type {kind:#04x}")

    def _track(self, message: PgOutputMessage) -> None:
        if isinstance(message, Relation):
            self.relations.add(message)
        elif isinstance(message, Begin):
            self._in_transaction = True
        elif isinstance(message, Commit):
            self._in_transaction = False

    def _copy_ended(self, pgconn: pq.abc.PGconn) -> None:
        """The server ended COPY (get_copy_data returned -1): raise with its reason."""
        self._streaming = False
        result = pgconn.get_result()
        reason = _one_line(result.get_error_message()) if result is not None else ""
        raise ReplicationError(f"the server ended replication: {reason or 'no reason given'}")

    # ---------------------------------------------------------------------------------------
    # Progress

    def confirm(self, lsn: int) -> None:
        """Record that everything before `lsn` is durably stored; never moves backwards.

        Sent with the next status update. Pass a Commit's ``end_lsn`` (its commit LSN would
        make the server send that transaction again), or `idle_confirmable`.
        """
        if lsn < 0:
            raise ValueError(f"negative LSN {lsn}")
        self._confirmed = max(self._confirmed, lsn)

    @property
    def confirmed_lsn(self) -> int:
        """The position reported to the server as flushed and applied."""
        return self._confirmed

    @property
    def server_wal_end(self) -> int:
        """The latest WAL end seen in a keepalive or XLogData header."""
        return self._wal_end

    def idle_confirmable(self) -> int | None:
        """`server_wal_end` when no transaction is open in the stream, else None.

        Everything up to the server's WAL end has then been delivered by `read`; once the
        caller has stored all it was given, confirming this lets the server free WAL that
        holds no published changes. Without it an idle slot would hold WAL back.
        """
        return None if self._in_transaction else self._wal_end

    def send_status(self, reply: bool = False) -> None:
        """Send a standby status update now, reporting the confirmed LSN.

        `reply` asks the server to answer with a keepalive.
        """
        pgconn = self._pgconn()
        lsn = self._confirmed
        try:
            # The connection stays in blocking mode for writes: a 34-byte message does not
            # fill the socket buffer, and flush() guarantees it left before we wait again.
            pgconn.put_copy_data(encode_standby_status(lsn, lsn, lsn, pg_now(), reply))
            pgconn.flush()
        except psycopg.Error as exc:
            self._streaming = False
            raise ReplicationError(f"sending status update failed: {_first_line(exc)}") from exc
        self._last_status = time.monotonic()
        self._reported = lsn
        if reply and self._reply_requested is None:
            self._reply_requested = self._last_status

    def report_progress(self, min_interval: float = 1.0) -> None:
        """Send the confirmed LSN now if it moved since the last report, at most once per
        `min_interval` seconds, so the slot frees WAL (and waiters see it) without waiting
        for the periodic update."""
        due = time.monotonic() - self._last_status >= min_interval
        if due and self._confirmed > self._reported:
            self.send_status()

    def _status_if_due(self) -> None:
        if time.monotonic() - self._last_status >= self.options.status_interval:
            self.send_status(reply=True)

    # ---------------------------------------------------------------------------------------
    # Closing

    def close(self) -> None:
        """Report the confirmed LSN, end COPY, wait briefly for the server, and disconnect.

        Waiting for the server to end COPY means the walsender has released the slot when
        this returns, so a new stream can start on it at once. Never raises.
        """
        if self._conn is None:
            return
        if self._streaming:
            try:
                self.send_status()
                self._end_copy(self._conn.pgconn)
            except (psycopg.Error, ReplicationError):
                pass  # closing anyway; the server keeps the last position it received
        self._abandon()

    def _end_copy(self, pgconn: pq.abc.PGconn) -> None:
        pgconn.put_copy_end()
        pgconn.flush()
        self._streaming = False
        deadline = time.monotonic() + _CLOSE_TIMEOUT
        # Discard what is still in flight until the server's own CopyDone (-1).
        while (nbytes := pgconn.get_copy_data(1)[0]) >= 0:
            if nbytes == 0 and not self._consume_until(pgconn, deadline):
                return
        # Then the results (CommandComplete) until libpq has none left.
        while True:
            if pgconn.is_busy():
                if not self._consume_until(pgconn, deadline):
                    return
            elif pgconn.get_result() is None:
                return

    @staticmethod
    def _consume_until(pgconn: pq.abc.PGconn, deadline: float) -> bool:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return False
        select.select([pgconn.socket], [], [], remaining)
        pgconn.consume_input()
        return True

    def _abandon(self) -> None:
        conn, self._conn = self._conn, None
        self._streaming = False
        if conn is not None:
            conn.close()

    def _pgconn(self) -> pq.abc.PGconn:
        if self._conn is None or not self._streaming:
            raise ReplicationError("replication stream is not open")
        return self._conn.pgconn

    def __enter__(self) -> ReplicationStream:
        if self._conn is None:
            self.open()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
