"""The read side: filtered, paged queries over the trail and the history of one row.

A role that may read ``<schema>.event`` (the auditor, the owner) queries it directly, with
every index at hand; any other role reads through ``<schema>.visible_event``, the view that
shows it what it may see (the streams marked ``readers: true``, without the context's ``db``
facts and signatures): the same code gives each role correct results, and the view's security
barrier costs readers the indexes for some filters. SQL is composed with `psycopg.sql` and
every value travels as a parameter.

Filters (`EventFilter`, built from user input by `make_filter`):

- ``actor``: ``actor_id`` equals; ``stream``: ``stream`` equals; ``kind``: one of the kinds;
- ``table``: ``schema.table`` as written in SQL (unquoted names fold to lower case, an
  unqualified name is in ``public``);
- ``key``: the row key, as ``id=42``, ``a=1,b=x`` or JSON; compared with jsonb equality on
  ``row_key``. An integer also matches the same digits as text, so ``id=42`` finds an integer
  key and ``id=abc`` a text one (numeric keys and bigints beyond 2**53 are stored as strings);
- ``since`` (inclusive) and ``until`` (exclusive): ISO 8601 with an offset, or relative
  (``30s``, ``15min``, ``2h``, ``7d``, ``1w``: now minus that);
- ``reason_contains``: a literal substring of ``reason`` (``strpos``, so ``%`` and ``_`` are
  plain characters);
- ``context``: ``{key: value}`` pairs the event's context must contain (jsonb ``@>`` on its
  top-level keys);
- ``limit`` and ``after``: keyset pagination. Events come in ``(stream, seq)`` order (or the
  reverse with ``order="newest"``); ``after`` is the last cursor (``stream:seq``) of the
  previous page. New events only ever get higher sequence numbers, so paging never skips or
  repeats an event, whatever is sealed between pages.

History (`row_history`, `row_as_of`): every event of one row in commit order (its inserts,
updates, deletes, and the truncates of its table), following changes of its primary key: an
update that moves the row from key A to key B (the ``old`` of the update holds A, its
``row_key`` B) joins the histories of A and B.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from itertools import product
from typing import Any, Final, Literal, overload

import psycopg
from psycopg import sql
from psycopg.rows import TupleRow

from cdc_audit.canonical import JsonNumber, JsonValue, canonical_bytes
from cdc_audit.db import connect
from cdc_audit.errors import DatabaseError, InvalidInput, NotInstalled
from cdc_audit.predicate import TableName, parse_table_name
from cdc_audit.trail_commands import parse_row_key
from cdc_audit.values import parse_json_fast

__all__ = [
    "EVENT_FIELDS",
    "AuditReader",
    "Cursor",
    "Event",
    "EventFilter",
    "RowHistory",
    "RowState",
    "build_events_query",
    "make_filter",
    "parse_cursor",
    "parse_duration",
    "parse_key",
    "parse_time",
]

Order = Literal["oldest", "newest"]
JsonObject = dict[str, JsonValue]

EVENT_FIELDS: Final = (
    "stream", "seq", "event_id", "commit_lsn", "commit_time", "xid", "kind", "schema_name",
    "table_name", "row_key", "old", "new", "changed", "actor_id", "reason", "context",
    "context_missing", "payload_hash", "prev_hash", "hash", "signature", "key_id", "erased_at",
)  # fmt: skip
"""The fields of an `Event`, in the order of the trail's columns (and of CSV output)."""

_JSON_FIELDS: Final = frozenset({"row_key", "old", "new", "context"})
_MAX_KEY_VARIANTS: Final = 64
_MAX_KEY_CHANGES: Final = 100

# ---- parsing user input

_UNITS: Final = {
    "s": 1, "sec": 1, "secs": 1, "second": 1, "seconds": 1,
    "m": 60, "min": 60, "mins": 60, "minute": 60, "minutes": 60,
    "h": 3600, "hr": 3600, "hrs": 3600, "hour": 3600, "hours": 3600,
    "d": 86400, "day": 86400, "days": 86400,
    "w": 604800, "week": 604800, "weeks": 604800,
}  # fmt: skip
_RELATIVE: Final = re.compile(r"(\d{1,9})\s*([a-z]+)(?:\s+ago)?", re.IGNORECASE)
_SPAN: Final = re.compile(r"(\d{1,9})\s*([a-z]+)", re.IGNORECASE)


def parse_duration(text: str, *, what: str = "duration") -> timedelta:
    """A span such as ``30s``, ``15min``, ``2h``, ``7d`` or ``1w``."""
    match = _SPAN.fullmatch(text.strip())
    if not match:
        raise InvalidInput(f"{what}: {text!r} is not a duration such as 30s, 15min, 2h, 7d or 1w")
    return _span(match, text, what)


def _span(match: re.Match[str], text: str, what: str) -> timedelta:
    unit = _UNITS.get(match[2].lower())
    if unit is None:
        raise InvalidInput(
            f"{what}: unknown unit in {text!r}: use s, min, h, d or w (as in 2h or 7d)"
        )
    return timedelta(seconds=int(match[1]) * unit)


def parse_time(text: str, *, now: datetime | None = None, what: str = "time") -> datetime:
    """An ISO 8601 time with an offset (``2026-01-31T12:00:00Z``, ``...+02:00``), ``now``, or
    a relative time (``30s``, ``15min``, ``2h``, ``7d``, ``1w``, optionally followed by
    ``ago``) meaning now minus that. A time without an offset is refused: it would silently
    mean the server's or the client's zone."""
    stripped = text.strip()
    current = now or datetime.now(UTC)
    if stripped.lower() == "now":
        return current
    match = _RELATIVE.fullmatch(stripped)
    if match:
        return current - _span(match, text, what)
    try:
        value = datetime.fromisoformat(stripped)
    except ValueError:
        raise InvalidInput(
            f"{what}: {text!r} is neither an ISO 8601 time (2026-01-31T12:00:00Z) nor a"
            " relative one (2h, 30min, 7d, 1w)"
        ) from None
    if value.tzinfo is None or value.utcoffset() is None:
        raise InvalidInput(
            f"{what}: {text!r} has no time zone: add an offset (Z or +02:00), as in"
            f" {value.isoformat()}Z"
        )
    return value


def _time(value: datetime | str | None, what: str) -> datetime | None:
    if value is None:
        return None
    if isinstance(value, str):
        return parse_time(value, what=what)
    if value.tzinfo is None or value.utcoffset() is None:
        raise InvalidInput(f"{what}: a datetime without a time zone is ambiguous: give tzinfo")
    return value


def parse_key(text: str) -> JsonObject:
    """A row key: ``id=42``, ``a=1,b=x`` or a JSON object."""
    if not text.strip():
        raise InvalidInput("key: empty: write id=42, a=1,b=x or a JSON object")
    key = parse_row_key(text)
    if not key:
        raise InvalidInput("key: {} names no column: write id=42, a=1,b=x or a JSON object")
    return key


def key_variants(key: Mapping[str, JsonValue]) -> list[JsonObject]:
    """The stored forms a key given by a user may have: an integer (or a JSON number) also as
    its digits in a string, since a numeric or text key column stores strings."""
    choices: list[list[JsonValue]] = []
    for value in key.values():
        if isinstance(value, bool) or not isinstance(value, int | JsonNumber):
            choices.append([value])
        elif isinstance(value, JsonNumber):
            choices.append([value, str.__str__(value)])
        else:
            choices.append([value, str(value)])
    variants: list[JsonObject] = []
    for values in product(*choices):
        variants.append(dict(zip(key.keys(), values, strict=True)))
        if len(variants) >= _MAX_KEY_VARIANTS:
            break
    return variants


@dataclass(frozen=True)
class Cursor:
    """A position in the trail: the last event of a page."""

    stream: str
    seq: int

    def __str__(self) -> str:
        return f"{self.stream}:{self.seq}"


def parse_cursor(text: str, stream: str | None = None) -> Cursor:
    """``STREAM:SEQ``, or ``SEQ`` when the query selects one stream."""
    head, sep, tail = text.strip().rpartition(":")
    digits = tail.strip()
    if not digits.isdigit() or not digits.isascii():
        raise InvalidInput(f"after: {text!r}: expected STREAM:SEQ (as in user:1234) or SEQ")
    if not sep:
        if stream is None:
            raise InvalidInput(
                f"after: {text!r} needs a stream: write STREAM:SEQ, or select one with --stream"
            )
        return Cursor(stream, int(digits))
    if not head:
        raise InvalidInput(f"after: {text!r}: the stream before ':' is empty")
    if stream is not None and head != stream:
        raise InvalidInput(f"after: {text!r} is in stream {head}, but the query selects {stream}")
    return Cursor(head, int(digits))


def _table(value: TableName | str | None) -> TableName | None:
    if value is None or isinstance(value, TableName):
        return value
    try:
        return parse_table_name(value)
    except ValueError as exc:
        raise InvalidInput(f"table: {exc}") from None


def _context(value: Mapping[str, str] | Iterable[str] | None) -> dict[str, str] | None:
    if value is None:
        return None
    if isinstance(value, Mapping):
        pairs = dict(value)
    else:
        pairs = {}
        for item in value:
            name, sep, text = item.partition("=")
            if not sep or not name:
                raise InvalidInput(f"context: expected KEY=VALUE, got {item!r}")
            pairs[name] = text
    for name, text in pairs.items():
        if not isinstance(name, str) or not isinstance(text, str):
            raise InvalidInput("context: keys and values are strings")
    return pairs or None


# ---- the filter


@dataclass(frozen=True)
class EventFilter:
    """What `AuditReader.events` selects; every field is optional (None: no condition)."""

    actor: str | None = None
    table: TableName | None = None
    key: Mapping[str, JsonValue] | None = None
    kind: tuple[str, ...] = ()
    stream: str | None = None
    since: datetime | None = None
    until: datetime | None = None
    reason_contains: str | None = None
    context: Mapping[str, str] | None = None
    limit: int | None = None
    after: Cursor | None = None
    order: Order = "oldest"

    def describe(self) -> JsonObject:
        """The conditions, as JSON (recorded by the audit of reads)."""
        described: JsonObject = {}
        if self.actor is not None:
            described["actor"] = self.actor
        if self.table is not None:
            described["table"] = self.table.qualified()
        if self.key is not None:
            described["key"] = dict(self.key)
        if self.kind:
            described["kind"] = list(self.kind)
        for name in ("stream", "reason_contains"):
            value = getattr(self, name)
            if value is not None:
                described[name] = value
        for name in ("since", "until"):
            moment = getattr(self, name)
            if moment is not None:
                described[name] = _iso(moment)
        if self.context:
            described["context"] = dict(self.context)
        if self.limit is not None:
            described["limit"] = self.limit
        if self.after is not None:
            described["after"] = str(self.after)
        described["order"] = self.order
        return described


def make_filter(
    *,
    actor: str | None = None,
    table: TableName | str | None = None,
    key: Mapping[str, JsonValue] | str | None = None,
    kind: str | Sequence[str] | None = None,
    stream: str | None = None,
    since: datetime | str | None = None,
    until: datetime | str | None = None,
    reason_contains: str | None = None,
    context: Mapping[str, str] | Iterable[str] | None = None,
    limit: int | None = None,
    after: Cursor | str | int | None = None,
    order: Order = "oldest",
) -> EventFilter:
    """An `EventFilter` from user input (strings as the command line takes them, or typed
    values); anything malformed raises `InvalidInput` with one line saying what."""
    kinds = (kind,) if isinstance(kind, str) else tuple(kind or ())
    if isinstance(key, str):
        key = parse_key(key)
    elif key is not None and not key:
        raise InvalidInput("key: an empty key names no row")
    if limit is not None and (isinstance(limit, bool) or limit < 0):
        raise InvalidInput(f"limit: {limit!r} is not a count (0 or more)")
    if order not in ("oldest", "newest"):
        raise InvalidInput(f"order: {order!r}: use oldest or newest")
    if isinstance(after, bool):
        raise InvalidInput(f"after: {after!r} is not a position")
    cursor = parse_cursor(str(after), stream) if isinstance(after, int | str) else after
    since_time, until_time = _time(since, "since"), _time(until, "until")
    return EventFilter(
        actor=actor,
        table=_table(table),
        key=key,
        kind=kinds,
        stream=stream,
        since=since_time,
        until=until_time,
        reason_contains=reason_contains,
        context=_context(context),
        limit=limit or None,
        after=cursor,
        order=order,
    )


def _json_param(value: JsonValue) -> str:
    return canonical_bytes(value).decode()


_SELECT_LIST: Final = sql.SQL(
    "stream, seq, event_id::text, commit_lsn::text, commit_time, xid, kind, schema_name,"
    " table_name, row_key::text, old::text, new::text, changed, actor_id, reason,"
    " context::text, context_missing, encode(payload_hash, 'hex'), encode(prev_hash, 'hex'),"
    " encode(hash, 'hex'), encode(signature, 'hex'), key_id, erased_at"
)


def build_events_query(
    schema: str, flt: EventFilter, relation: str = "visible_event"
) -> tuple[sql.Composed, list[Any]]:
    """The SELECT for `flt` over ``<schema>.<relation>`` (the view, or the event table for
    a role that may read it) and its parameters."""
    where: list[sql.Composable] = []
    params: list[Any] = []

    def condition(text: str, *values: Any) -> None:
        where.append(sql.SQL(text))  # constant SQL: values only ever go to `params`
        params.extend(values)

    if flt.actor is not None:
        condition("actor_id = %s", flt.actor)
    if flt.table is not None:
        condition("schema_name = %s AND table_name = %s", flt.table.schema, flt.table.name)
    if flt.key is not None:
        variants = [_json_param(v) for v in key_variants(flt.key)]
        condition("row_key = ANY (%s::jsonb[])", variants)
    if flt.kind:
        condition("kind = ANY (%s::text[])", list(flt.kind))
    if flt.stream is not None:
        condition("stream = %s", flt.stream)
    if flt.since is not None:
        condition("commit_time >= %s", flt.since)
    if flt.until is not None:
        condition("commit_time < %s", flt.until)
    if flt.reason_contains is not None:
        condition("strpos(reason, %s) > 0", flt.reason_contains)
    if flt.context:
        condition("context @> %s::jsonb", _json_param(dict(flt.context)))
    if flt.after is not None:
        direction = ">" if flt.order == "oldest" else "<"
        condition(f"(stream, seq) {direction} (%s::text, %s::bigint)", *_after(flt.after))
    query = sql.SQL("SELECT {} FROM {}.{}").format(
        _SELECT_LIST, sql.Identifier(_schema_name(schema)), _relation_sql(relation)
    )
    if where:
        query += sql.SQL(" WHERE ") + sql.SQL(" AND ").join(where)
    query += sql.SQL(
        " ORDER BY stream, seq" if flt.order == "oldest" else " ORDER BY stream DESC, seq DESC"
    )
    if flt.limit is not None:
        query += sql.SQL(" LIMIT %s")
        params.append(flt.limit)
    return sql.Composed([query]), params


def _relation_sql(relation: str) -> sql.SQL:
    if relation not in ("event", "visible_event"):
        raise ValueError(f"not a relation of the trail: {relation!r}")
    return sql.SQL(relation)  # one of two constant names, never user input


def _after(cursor: Cursor) -> tuple[str, int]:
    return cursor.stream, cursor.seq


def _schema_name(schema: str) -> str:
    if not schema:
        raise InvalidInput("schema: empty")
    return schema


# ---- results


@dataclass(frozen=True)
class Event:
    """One event as the reading role may see it. Times are timezone-aware; hashes and the
    signature are lower-case hex; JSON fields keep their numbers exactly."""

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
    payload_hash: str
    prev_hash: str
    hash: str
    signature: str | None
    key_id: str | None
    erased_at: datetime | None

    @classmethod
    def from_row(cls, row: Sequence[Any]) -> Event:
        values = dict(zip(EVENT_FIELDS, row, strict=True))
        for name in _JSON_FIELDS:
            text = values[name]
            values[name] = None if text is None else parse_json_fast(text)
        if values["changed"] is not None:
            values["changed"] = tuple(values["changed"])
        return cls(**values)

    @property
    def cursor(self) -> Cursor:
        return Cursor(self.stream, self.seq)

    @property
    def table(self) -> str | None:
        if self.table_name is None:
            return None
        return TableName(self.schema_name or "public", self.table_name).qualified()

    def to_json(self) -> JsonObject:
        """The event as a JSON object: the trail's column names, ISO 8601 times."""
        out: JsonObject = {}
        for name in EVENT_FIELDS:
            value = getattr(self, name)
            if isinstance(value, datetime):
                value = _iso(value)
            elif isinstance(value, tuple):
                value = list(value)
            out[name] = value
        return out


def _iso(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat()


@dataclass(frozen=True)
class RowHistory:
    """Every event of one row, in commit order, and the keys the row had along the way."""

    table: TableName
    key: JsonObject
    events: list[Event]
    keys: list[JsonObject] = field(default_factory=list)


@dataclass(frozen=True)
class RowState:
    """A row as it was at `as_of`: `row` is the ``new`` of its last insert or update at or
    before that time (`event`); `exists` is False when it had not been inserted yet, or had
    been deleted or truncated by then (`event` is then the delete or truncate, if any).
    `key` is the key the row had at that time (it differs from the one asked for when the
    primary key changed later)."""

    table: TableName
    asked_key: JsonObject
    as_of: datetime
    exists: bool
    row: JsonObject | None
    event: Event | None
    key: JsonObject | None

    @property
    def erased(self) -> bool:
        return self.event is not None and self.event.erased_at is not None

    def note(self) -> str:
        """One line saying what the row is and where it comes from."""
        where = f"{self.table.qualified()} {_show_key(self.asked_key)} as of {_iso(self.as_of)}"
        if not self.exists:
            if self.event is None:
                return f"{where}: did not exist (no event of this row at or before that time)"
            return (
                f"{where}: did not exist ({self.event.kind} at {_iso(self.event.commit_time)},"
                f" {self.event.cursor})"
            )
        assert self.event is not None
        moved = ""
        if self.key is not None and self.key not in key_variants(self.asked_key):
            moved = f"; its key was then {_show_key(self.key)}"
        if self.erased:
            return (
                f"{where}: existed, but the payload of its {self.event.kind} at"
                f" {_iso(self.event.commit_time)} ({self.event.cursor}) was erased{moved}"
            )
        return (
            f"{where}: from the {self.event.kind} at {_iso(self.event.commit_time)} by"
            f" {self.event.actor_id or '(no actor)'} ({self.event.cursor}){moved};"
            " excluded columns are absent, redacted ones hold tokens"
        )

    def to_json(self) -> JsonObject:
        return {
            "table": self.table.qualified(),
            "key": self.asked_key,
            "as_of": _iso(self.as_of),
            "exists": self.exists,
            "row_key": self.key,
            "row": self.row,
            "event": None if self.event is None else self.event.to_json(),
            "note": self.note(),
        }


def _show_key(key: Mapping[str, JsonValue]) -> str:
    return ",".join(f"{k}={canonical_bytes(v).decode()}" for k, v in key.items())


def _key_id(key: JsonValue) -> bytes:
    return canonical_bytes(key)


def _old_key(event: Event) -> JsonObject | None:
    """The key an update moved the row from, when its ``old`` says (None otherwise)."""
    if event.kind != "update" or not isinstance(event.old, dict):
        return None
    if not isinstance(event.row_key, dict) or not event.row_key:
        return None
    old = event.old
    if not all(name in old for name in event.row_key):
        return None
    return {name: old[name] for name in event.row_key}


def reconstruct(history: RowHistory, as_of: datetime) -> RowState:
    """The state of the row named by `history.key` at `as_of`, replaying `history.events`.

    The row is the one holding the key at that time; if no row held it then, the row that
    took it later (after an insert or a key change), as it was then under its earlier key.
    """
    asked = {_key_id(v) for v in key_variants(history.key)}
    rows: dict[bytes, tuple[int, JsonObject | None, Event]] = {}  # key -> (life, row, event)
    ended: dict[int, Event] = {}  # life -> the delete/truncate that ended it
    lives = iter(range(1, 1 << 62))
    last_end: Event | None = None
    snapshot: dict[bytes, tuple[int, JsonObject | None, Event]] | None = None
    later_life: int | None = None
    for event in history.events:
        if snapshot is None and event.commit_time > as_of:
            snapshot = dict(rows)
        if event.kind == "truncate":
            for life, _, _ in rows.values():
                ended[life] = event
            rows.clear()
            if snapshot is None:
                last_end = event
            continue
        key = _key_id(event.row_key)
        row = event.new if isinstance(event.new, dict) else None
        if event.kind == "insert":
            rows[key] = (next(lives), row, event)
        elif event.kind == "update":
            old_key = _old_key(event)
            source = key if old_key is None else _key_id(old_key)
            previous = rows.pop(source, None)
            life = previous[0] if previous is not None else next(lives)
            rows[key] = (life, row, event)
        elif event.kind == "delete":
            gone = rows.pop(key, None)
            if gone is not None:
                ended[gone[0]] = event
            if snapshot is None and key in asked:
                last_end = event
        else:
            continue
        if snapshot is not None and later_life is None and key in asked and key in rows:
            later_life = rows[key][0]
    if snapshot is None:
        snapshot = rows
    for key in asked:
        if key in snapshot:
            _, row, event = snapshot[key]
            return RowState(history.table, history.key, as_of, True, row, event, _row_key(event))
    if later_life is not None:
        for _, (life, row, event) in snapshot.items():
            if life == later_life:
                return RowState(
                    history.table, history.key, as_of, True, row, event, _row_key(event)
                )
    return RowState(history.table, history.key, as_of, False, None, last_end, None)


def _row_key(event: Event) -> JsonObject | None:
    return event.row_key if isinstance(event.row_key, dict) else None


# ---- the reader


class AuditReader:
    """Reads the trail of one database: ``with AuditReader(dsn) as reader: ...``.

    Each `events` and `history` call is recorded by ``<schema>.record_read(what, filters)``
    when the installation has that function (the policy's ``read_audit``).
    """

    def __init__(self, dsn: str, schema: str = "cdc_audit", *, page_size: int = 1000) -> None:
        if page_size < 1:
            raise InvalidInput(f"page_size: {page_size} is not a positive count")
        self.schema = _schema_name(schema)
        self.page_size = page_size
        self._conn: psycopg.Connection[TupleRow] = connect(dsn, application_name="cdc-audit read")
        self._record_read: bool | None = None
        try:
            with self._errors():
                self._relation = self._readable_relation()
        except BaseException:
            self._conn.close()
            raise

    def _readable_relation(self) -> str:
        """`event` when this role may read the table itself, else the visibility view."""
        row = self._conn.execute(
            "SELECT coalesce(has_table_privilege(to_regclass(format('%%I.event', %s::text)),"
            " 'SELECT'), false)",
            (self.schema,),
        ).fetchone()
        self._conn.commit()
        return "event" if row is not None and row[0] else "visible_event"

    # context manager

    def __enter__(self) -> AuditReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._conn.close()

    # queries

    def events(
        self,
        flt: EventFilter | None = None,
        /,
        *,
        actor: str | None = None,
        table: TableName | str | None = None,
        key: Mapping[str, JsonValue] | str | None = None,
        kind: str | Sequence[str] | None = None,
        stream: str | None = None,
        since: datetime | str | None = None,
        until: datetime | str | None = None,
        reason_contains: str | None = None,
        context: Mapping[str, str] | Iterable[str] | None = None,
        limit: int | None = None,
        after: Cursor | str | int | None = None,
        order: Order = "oldest",
    ) -> Iterator[Event]:
        """The events matching the filters, fetched `page_size` at a time. Give either
        an `EventFilter` or the filters as keywords (see `make_filter`)."""
        if flt is None:
            flt = make_filter(
                actor=actor,
                table=table,
                key=key,
                kind=kind,
                stream=stream,
                since=since,
                until=until,
                reason_contains=reason_contains,
                context=context,
                limit=limit,
                after=after,
                order=order,
            )
        build_events_query(self.schema, flt, self._relation)  # refuses a bad filter now
        self._record("events", flt.describe())
        return self._stream(flt)

    @overload
    def history(
        self, table: TableName | str, key: Mapping[str, JsonValue] | str, as_of: None = None
    ) -> RowHistory: ...

    @overload
    def history(
        self, table: TableName | str, key: Mapping[str, JsonValue] | str, as_of: datetime | str
    ) -> RowState: ...

    def history(
        self,
        table: TableName | str,
        key: Mapping[str, JsonValue] | str,
        as_of: datetime | str | None = None,
    ) -> RowHistory | RowState:
        """Every event of one row in commit order, following changes of its key; with
        `as_of`, the row as it was at that time instead (see `RowState`)."""
        name, wanted = self._row(table, key)
        moment = _time(as_of, "as-of")
        described: JsonObject = {"table": name.qualified(), "key": wanted}
        if moment is not None:
            described["as_of"] = _iso(moment)
        self._record("history", described)
        found = self._history(name, wanted)
        return found if moment is None else reconstruct(found, moment)

    # internals

    def _row(
        self, table: TableName | str, key: Mapping[str, JsonValue] | str
    ) -> tuple[TableName, JsonObject]:
        name = _table(table)
        assert name is not None
        wanted = parse_key(key) if isinstance(key, str) else dict(key)
        if not wanted:
            raise InvalidInput("key: an empty key names no row")
        return name, wanted

    def _history(self, table: TableName, key: JsonObject) -> RowHistory:
        keys: dict[bytes, JsonValue] = {_key_id(v): v for v in key_variants(key)}
        while True:
            events = self._row_events(table, list(keys.values()))
            found = dict(keys)
            for event in events:
                old_key = _old_key(event)
                if old_key is None or old_key == event.row_key:
                    continue
                for moved in (old_key, event.row_key):
                    found.setdefault(_key_id(moved), moved)
            if len(found) == len(keys) or len(found) > _MAX_KEY_CHANGES:
                break
            keys = found
        kept: list[Event] = []
        alive: set[bytes] = set()  # keys of the row's lives at this point of the replay
        held: dict[bytes, JsonObject] = {}
        for event in events:
            if event.kind == "truncate":
                if alive:  # a truncate ends the row only while it exists
                    kept.append(event)
                    alive.clear()
                continue
            kept.append(event)
            row_key = _row_key(event)
            if row_key is None:
                continue
            held.setdefault(_key_id(row_key), row_key)
            if event.kind == "delete":
                alive.discard(_key_id(row_key))
                continue
            old_key = _old_key(event)
            if old_key is not None:
                alive.discard(_key_id(old_key))
            alive.add(_key_id(row_key))
        return RowHistory(table, key, kept, list(held.values()))

    def _row_events(self, table: TableName, keys: list[JsonValue]) -> list[Event]:
        texts = [_json_param(k) for k in keys]
        query = sql.SQL(
            "SELECT {} FROM {}.{}"
            " WHERE schema_name = %s AND table_name = %s"
            " AND (row_key = ANY (%s::jsonb[]) OR kind = 'truncate'"
            " OR (kind = 'update' AND old @> ANY (%s::jsonb[])))"
            " ORDER BY commit_lsn, stream, seq"
        ).format(_SELECT_LIST, sql.Identifier(self.schema), _relation_sql(self._relation))
        params: list[Any] = [table.schema, table.name, texts, texts]
        with self._errors():
            rows = self._conn.execute(query, params).fetchall()
            self._conn.commit()
        return [Event.from_row(r) for r in rows]

    def _stream(self, flt: EventFilter) -> Iterator[Event]:
        # Page by page, with the same keyset cursor the command line gives users: no
        # transaction stays open between pages, so the caller may run other queries on this
        # reader while iterating, and the result is the one paging by hand would give.
        remaining, after = flt.limit, flt.after
        while True:
            size = self.page_size if remaining is None else min(self.page_size, remaining)
            page = replace(flt, limit=size, after=after)
            query, params = build_events_query(self.schema, page, self._relation)
            with self._errors():
                rows = self._conn.execute(query, params).fetchall()
                self._conn.commit()
            for row in rows:
                yield Event.from_row(row)
            if remaining is not None:
                remaining -= len(rows)
            if len(rows) < size or remaining == 0:
                return
            after = Cursor(rows[-1][0], rows[-1][1])

    def _record(self, what: str, filters: JsonObject) -> None:
        """Record the read, when the installation audits reads."""
        with self._errors():
            if self._record_read is None:
                signature = sql.SQL("{}.record_read(text,jsonb)").format(
                    sql.Identifier(self.schema)
                )
                row = self._conn.execute(
                    "SELECT to_regprocedure(%s) IS NOT NULL", [signature.as_string(self._conn)]
                ).fetchone()
                self._record_read = bool(row and row[0])
                self._conn.commit()
            if self._record_read:
                self._conn.execute(
                    sql.SQL("SELECT {}.record_read(%s, %s::jsonb)").format(
                        sql.Identifier(self.schema)
                    ),
                    [what, _json_param(filters)],
                )
                self._conn.commit()

    def _errors(self) -> _ReadErrors:
        return _ReadErrors(self._conn, self.schema)


class _ReadErrors:
    """Turns the database's refusals into one-line errors that say what to do."""

    def __init__(self, conn: psycopg.Connection[TupleRow], schema: str) -> None:
        self._conn = conn
        self._schema = schema

    def __enter__(self) -> None:
        return None

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: object
    ) -> None:
        if not isinstance(exc, psycopg.Error):
            return
        if not self._conn.closed and not self._conn.autocommit:
            self._conn.rollback()
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        if isinstance(exc, psycopg.errors.UndefinedTable | psycopg.errors.InvalidSchemaName):
            raise NotInstalled(
                f"no cdc-audit trail in schema {self._schema} ({first}): check --schema,"
                " or install it with cdc-audit apply"
            ) from None
        if isinstance(exc, psycopg.errors.InsufficientPrivilege):
            raise DatabaseError(
                f"reading the trail was refused ({first}): the role needs"
                f" {self._schema}_reader or {self._schema}_auditor",
                exc.sqlstate,
            ) from None
        raise DatabaseError(f"reading the trail failed: {first}", exc.sqlstate) from None
