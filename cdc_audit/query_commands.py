"""Commands of the read side: `query` and `history`, over `cdc_audit.query`.

Output: ``--format table`` (aligned columns for people; the default when stdout is a
terminal), ``jsonl`` (one event per line; the default otherwise, so pipes get something a
program reads), ``json`` (one array) or ``csv`` (one row per event, JSON fields as compact
JSON text, quoted as CSV needs so that no value splits a record).
"""

from __future__ import annotations

import argparse
import csv
import sys
from collections.abc import Iterable, Iterator
from typing import Final, TextIO

from .canonical import JsonValue, canonical_bytes
from .cli_common import AddCommand, add_schema_option, dsn_of, say, schema_of
from .errors import InvalidInput
from .query import EVENT_FIELDS, AuditReader, Event, RowHistory, RowState, make_filter
from .settings import Settings

FORMATS: Final = ("table", "json", "jsonl", "csv")
DEFAULT_LIMIT: Final = 100
_CELL: Final = 48


def add_commands(command: AddCommand) -> None:
    """Register this module's sub-commands."""
    query = command("query", cmd_query, "find events by actor, table, row, kind, time, context")
    add_schema_option(query)
    query.add_argument("--actor", metavar="ID", help="actor_id equals ID")
    query.add_argument("--table", metavar="TABLE", help="schema.table (unqualified: public)")
    query.add_argument("--key", metavar="KEY", help='row key: id=42, a=1,b=x or {"id": 42}')
    query.add_argument(
        "--kind",
        action="append",
        metavar="KIND",
        help="insert, update, delete, truncate, ddl, app, privilege, ... (repeat or a,b)",
    )
    query.add_argument("--stream", metavar="STREAM")
    query.add_argument("--since", metavar="TIME", help="ISO 8601 with offset, or 2h, 7d (incl.)")
    query.add_argument("--until", metavar="TIME", help="ISO 8601 with offset, or 2h, 7d (excl.)")
    query.add_argument("--reason-contains", metavar="TEXT", help="literal substring of reason")
    query.add_argument(
        "--context",
        action="append",
        metavar="KEY=VALUE",
        help="the context holds KEY with VALUE (repeatable)",
    )
    query.add_argument(
        "--limit",
        type=int,
        default=DEFAULT_LIMIT,
        metavar="N",
        help=f"at most N events ({DEFAULT_LIMIT}; 0: no limit)",
    )
    query.add_argument(
        "--after", metavar="CURSOR", help="continue after STREAM:SEQ (or SEQ with --stream)"
    )
    query.add_argument(
        "--order", choices=("oldest", "newest"), default="oldest", help="by stream and seq"
    )
    _format_option(query)

    history = command("history", cmd_history, "every version of one row, or the row as of a time")
    add_schema_option(history)
    history.add_argument("table", metavar="TABLE", help="schema.table (unqualified: public)")
    history.add_argument("key", metavar="KEY", help='row key: id=42, a=1,b=x or {"id": 42}')
    history.add_argument(
        "--as-of", metavar="TIME", help="reconstruct the row as it was then (ISO 8601 or 2h)"
    )
    _format_option(history)


def _format_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--format",
        choices=FORMATS,
        help="table on a terminal, else jsonl",
    )


def _format(args: argparse.Namespace) -> str:
    chosen: str | None = args.format
    if chosen is not None:
        return chosen
    return "table" if sys.stdout.isatty() else "jsonl"


def _reader(args: argparse.Namespace, settings: Settings) -> AuditReader:
    dsn = dsn_of(args, settings)
    if not dsn:
        raise InvalidInput("no database given: use --dsn or set CDC_AUDIT_DSN")
    return AuditReader(dsn, schema_of(args, settings))


def _kinds(values: list[str] | None) -> list[str]:
    return [k.strip() for v in values or () for k in v.split(",") if k.strip()]


def cmd_query(args: argparse.Namespace, settings: Settings) -> int:
    if args.limit < 0:
        raise InvalidInput(f"--limit: {args.limit} is not a count (0 or more)")
    flt = make_filter(
        actor=args.actor,
        table=args.table,
        key=args.key,
        kind=_kinds(args.kind),
        stream=args.stream,
        since=args.since,
        until=args.until,
        reason_contains=args.reason_contains,
        context=args.context,
        limit=args.limit,
        after=args.after,
        order=args.order,
    )
    with _reader(args, settings) as reader:
        count = 0
        last: Event | None = None

        def counted(events: Iterable[Event]) -> Iterator[Event]:
            nonlocal count, last
            for event in events:
                count += 1
                last = event
                yield event

        write_events(sys.stdout, counted(reader.events(flt)), _format(args), history=False)
    if count == 0:
        say("no events match")
    elif flt.limit is not None and count == flt.limit and last is not None:
        say(f"next: --after {last.cursor}")
    return 0


def cmd_history(args: argparse.Namespace, settings: Settings) -> int:
    out = _format(args)
    with _reader(args, settings) as reader:
        if args.as_of is not None:
            state = reader.history(args.table, args.key, as_of=args.as_of)
            write_state(sys.stdout, state, out)
            return 0
        found = reader.history(args.table, args.key)
    if not found.events:
        say("no events match")
    write_history(sys.stdout, found, out)
    return 0


# ---- output


def _json_text(value: JsonValue) -> str:
    return canonical_bytes(value).decode()


def write_events(out: TextIO, events: Iterable[Event], fmt: str, *, history: bool) -> None:
    """Write events in `fmt`; streams (nothing is held in memory but a table's rows)."""
    if fmt == "jsonl":
        for event in events:
            out.write(_json_text(event.to_json()) + "\n")
    elif fmt == "json":
        out.write("[")
        for i, event in enumerate(events):
            out.write(("\n" if i == 0 else ",\n") + _json_text(event.to_json()))
        out.write("\n]\n")
    elif fmt == "csv":
        writer = csv.writer(out)
        writer.writerow(EVENT_FIELDS)
        for event in events:
            writer.writerow(_csv_cell(v) for v in event.to_json().values())
    else:
        columns = _HISTORY_COLUMNS if history else _QUERY_COLUMNS
        rows = [_table_row(event, columns) for event in events]
        if rows:
            _write_table(out, [c.upper() for c in columns], rows)
    out.flush()


def _csv_cell(value: JsonValue) -> str:
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    return _json_text(value)


def write_history(out: TextIO, found: RowHistory, fmt: str) -> None:
    if fmt == "table" and found.events:
        keys = ", ".join(_json_text(k) for k in found.keys)
        out.write(f"# {found.table.qualified()}, key {keys}: {len(found.events)} event(s)\n")
    write_events(out, found.events, fmt, history=True)


def write_state(out: TextIO, state: RowState, fmt: str) -> None:
    """The row as of a time: the note as a header line, then the row."""
    if fmt == "table":
        out.write(f"# {state.note()}\n")
        if state.row is not None:
            rows = [[name, _cell(value)] for name, value in state.row.items()]
            _write_table(out, ["COLUMN", "VALUE"], rows)
    elif fmt == "csv":
        say(state.note())
        writer = csv.writer(out)
        writer.writerow(("column", "value"))
        for name, value in (state.row or {}).items():
            writer.writerow((name, _csv_cell(value)))
    else:
        say(state.note())
        out.write(_json_text(state.to_json()) + "\n")
    out.flush()


_QUERY_COLUMNS: Final = ("cursor", "time", "kind", "table", "key", "actor", "reason", "changed")
_HISTORY_COLUMNS: Final = ("time", "cursor", "kind", "key", "actor", "reason", "changed")


def _table_row(event: Event, columns: tuple[str, ...]) -> list[str]:
    values: dict[str, str] = {
        "cursor": str(event.cursor),
        "time": event.commit_time.astimezone().isoformat(timespec="seconds"),
        "kind": event.kind + ("*" if event.context_missing else ""),
        "table": event.table or "",
        "key": "" if event.row_key is None else _cell(event.row_key),
        "actor": _cell(event.actor_id),
        "reason": _cell(event.reason),
        "changed": ",".join(event.changed or ()),
    }
    return [values[c] for c in columns]


def _cell(value: JsonValue) -> str:
    """One line, control characters escaped, long values cut."""
    if value is None:
        return ""
    text = value if isinstance(value, str) else _json_text(value)
    text = text.encode("unicode_escape").decode("ascii") if not text.isprintable() else text
    return text if len(text) <= _CELL else text[: _CELL - 1] + "…"


def _write_table(out: TextIO, header: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        out.write("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip() + "\n")
