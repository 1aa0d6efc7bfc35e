"""The query layer's input parsing and SQL composition (no database: rendered SQL is checked
for placeholders, values only ever appear among the parameters)."""

from __future__ import annotations

import io
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
from psycopg import sql

from cdc_audit.canonical import JsonNumber
from cdc_audit.errors import InvalidInput
from cdc_audit.predicate import TableName
from cdc_audit.query import (
    Cursor,
    Event,
    EventFilter,
    RowHistory,
    build_events_query,
    key_variants,
    make_filter,
    parse_cursor,
    parse_key,
    parse_time,
    reconstruct,
)
from cdc_audit.query_commands import write_events

NOW = datetime(2026, 3, 10, 12, 0, tzinfo=UTC)


def render(composed: sql.Composable) -> str:
    # as_string needs no connection for SQL/Identifier composition in psycopg >= 3.2
    return composed.as_string(None)


@pytest.mark.parametrize(
    ("text", "delta"),
    [
        ("2h", timedelta(hours=2)),
        ("30min", timedelta(minutes=30)),
        ("30m", timedelta(minutes=30)),
        ("7d", timedelta(days=7)),
        ("1w", timedelta(weeks=1)),
        ("45s", timedelta(seconds=45)),
        ("3 days ago", timedelta(days=3)),
        ("now", timedelta(0)),
    ],
)
def test_relative_times_are_now_minus(text: str, delta: timedelta) -> None:
    assert parse_time(text, now=NOW) == NOW - delta


def test_iso_times_need_an_offset() -> None:
    assert parse_time("2026-01-31T12:00:00Z") == datetime(2026, 1, 31, 12, tzinfo=UTC)
    plus2 = parse_time("2026-01-31 12:00:00+02:00")
    assert plus2.utcoffset() == timedelta(hours=2)
    for naive in ("2026-01-31T12:00:00", "2026-01-31"):
        with pytest.raises(InvalidInput, match="no time zone"):
            parse_time(naive)
    for bad in ("yesterday", "2x", "12 parsecs", "", "2026-13-01T00:00Z"):
        with pytest.raises(InvalidInput):
            parse_time(bad)


def test_errors_are_one_line() -> None:
    for call in (
        lambda: parse_time("2026-01-31T12:00:00"),
        lambda: parse_key("nonsense"),
        lambda: parse_cursor("12"),
        lambda: make_filter(table="a.b.c"),
    ):
        with pytest.raises(InvalidInput) as caught:
            call()
        assert "\n" not in str(caught.value)


def test_row_keys() -> None:
    assert parse_key("id=42") == {"id": 42}
    assert parse_key("id=abc") == {"id": "abc"}
    assert parse_key("a=1,b=x") == {"a": 1, "b": "x"}
    assert parse_key('{"id": 42, "at": "2026-01-01"}') == {"id": 42, "at": "2026-01-01"}
    big = str(2**60)
    assert parse_key(f"id={big}") == {"id": big}  # beyond 2**53: stored as a string
    for bad in ("", "id", "[1]", "{nope"):
        with pytest.raises(InvalidInput):
            parse_key(bad)


def test_integer_keys_also_match_their_text_form() -> None:
    assert key_variants({"id": 42}) == [{"id": 42}, {"id": "42"}]
    assert key_variants({"id": "abc"}) == [{"id": "abc"}]
    assert key_variants({"a": 1, "b": True}) == [{"a": 1, "b": True}, {"a": "1", "b": True}]
    assert key_variants({"n": JsonNumber("1.50")}) == [
        {"n": JsonNumber("1.50")},
        {"n": "1.50"},
    ]


def test_cursors() -> None:
    assert parse_cursor("user:12") == Cursor("user", 12)
    assert parse_cursor("12", "user") == Cursor("user", 12)
    assert parse_cursor("a:b:7") == Cursor("a:b", 7)
    with pytest.raises(InvalidInput, match="needs a stream"):
        parse_cursor("12")
    with pytest.raises(InvalidInput, match="selects admin"):
        parse_cursor("user:12", "admin")
    for bad in ("user:", ":3", "user:x", "user:-1"):
        with pytest.raises(InvalidInput):
            parse_cursor(bad)


def test_no_filter_selects_everything_in_stream_order() -> None:
    query, params = build_events_query("cdc_audit", EventFilter())
    text = render(query)
    assert text.startswith("SELECT stream, seq, event_id::text")
    assert 'FROM "cdc_audit".visible_event ORDER BY stream, seq' in text
    assert "WHERE" not in text and params == []


HOSTILE = "'; DROP TABLE x; --%_\"é☃\n"
JAN1 = datetime(2026, 1, 1, tzinfo=UTC)
CONTEXT_JSON = '{"trace_id":"\'; DROP TABLE x; --%_\\"é☃\\n"}'


@pytest.mark.parametrize(
    ("filters", "clause", "expected"),
    [
        ({"actor": HOSTILE}, "actor_id = %s", [HOSTILE]),
        ({"table": "Sales.Orders"}, "schema_name = %s AND table_name = %s", ["sales", "orders"]),
        ({"table": '"We;ird"'}, "schema_name = %s AND table_name = %s", ["public", "We;ird"]),
        ({"key": "id=7"}, "row_key = ANY (%s::jsonb[])", [['{"id":7}', '{"id":"7"}']]),
        ({"kind": ["insert", "ddl"]}, "kind = ANY (%s::text[])", [["insert", "ddl"]]),
        ({"stream": HOSTILE}, "stream = %s", [HOSTILE]),
        ({"since": "2026-01-01T00:00:00Z"}, "commit_time >= %s", [JAN1]),
        ({"until": "2026-01-01T00:00:00Z"}, "commit_time < %s", [JAN1]),
        ({"reason_contains": HOSTILE}, "strpos(reason, %s) > 0", [HOSTILE]),
        ({"context": [f"trace_id={HOSTILE}"]}, "context @> %s::jsonb", [CONTEXT_JSON]),
        ({"after": "user:5"}, "(stream, seq) > (%s::text, %s::bigint)", ["user", 5]),
    ],
)  # fmt: skip
def test_each_filter_is_a_constant_clause_with_parameters(
    filters: dict[str, Any], clause: str, expected: list[Any]
) -> None:
    query, params = build_events_query("cdc_audit", make_filter(**filters))
    text = render(query)
    assert f" WHERE {clause} ORDER BY stream, seq" in text
    assert params == expected
    assert "DROP" not in text and "é" not in text


def test_filters_combine_with_and_order_and_limit() -> None:
    flt = make_filter(actor="u1", stream="user", after="9", kind="update", limit=50, order="newest")
    assert flt.after == Cursor("user", 9)
    query, params = build_events_query('we"ird', flt)
    text = render(query)
    assert 'FROM "we""ird".visible_event' in text
    assert text.endswith(
        " WHERE actor_id = %s AND kind = ANY (%s::text[]) AND stream = %s"
        " AND (stream, seq) < (%s::text, %s::bigint) ORDER BY stream DESC, seq DESC LIMIT %s"
    )
    assert params == ["u1", ["update"], "user", "user", 9, 50]


def test_bad_filters_are_invalid_input() -> None:
    for bad in (
        {"table": "a.b.c"},
        {"table": ""},
        {"limit": -1},
        {"after": "12"},
        {"context": ["novalue"]},
        {"since": datetime(2026, 1, 1)},  # naive on purpose
        {"order": "sideways"},
        {"key": {}},
    ):
        with pytest.raises(InvalidInput):
            make_filter(**bad)


def test_describe_lists_the_conditions() -> None:
    flt = make_filter(actor="a", table="t", key="id=1", since="2026-01-01T01:00:00+01:00")
    assert flt.describe() == {
        "actor": "a",
        "table": "public.t",
        "key": {"id": 1},
        "since": "2026-01-01T00:00:00+00:00",
        "order": "oldest",
    }


def _event(seq: int, kind: str, key: Any, new: Any, at: datetime, old: Any = None) -> Event:
    return Event(
        "user", seq, f"e{seq}", "0/1", at, 1, kind, "public", "t", key, old, new, None,
        "u", None, {}, False, "00", "00", "00", None, None, None,
    )  # fmt: skip


def test_reconstruct_follows_lives_and_key_changes() -> None:
    t = [NOW + timedelta(minutes=i) for i in range(10)]
    events = [
        _event(1, "insert", {"id": 1}, {"id": 1, "v": "a"}, t[1]),
        _event(2, "update", {"id": 1}, {"id": 1, "v": "b"}, t[2], {"id": 1, "v": "a"}),
        _event(3, "update", {"id": 2}, {"id": 2, "v": "b"}, t[3], {"id": 1, "v": "b"}),
        _event(4, "delete", {"id": 2}, None, t[4], {"id": 2, "v": "b"}),
        _event(5, "insert", {"id": 2}, {"id": 2, "v": "c"}, t[5]),
        _event(6, "truncate", None, {"cascade": False}, t[6]),
    ]
    history = RowHistory(TableName("public", "t"), {"id": 2}, events)
    before = reconstruct(history, t[0])
    assert not before.exists and before.event is None
    # At t[2] the row that would become id=2 was id=1 with v=b.
    moved = reconstruct(history, t[2])
    assert moved.exists and moved.row == {"id": 1, "v": "b"} and moved.key == {"id": 1}
    assert "its key was then id=1" in moved.note()
    assert reconstruct(history, t[3]).row == {"id": 2, "v": "b"}
    gone = reconstruct(history, t[4])
    assert not gone.exists and gone.event is not None and gone.event.kind == "delete"
    assert reconstruct(history, t[5]).row == {"id": 2, "v": "c"}
    truncated = reconstruct(history, t[9])
    assert not truncated.exists and truncated.event is not None
    assert truncated.event.kind == "truncate"


def test_csv_keeps_newlines_and_commas_inside_one_record() -> None:
    import csv

    event = _event(1, "insert", {"id": 1}, {"id": 1, "v": "a,\nb"}, NOW)
    out = io.StringIO()
    write_events(out, [event, event], "csv", history=False)
    rows = list(csv.reader(io.StringIO(out.getvalue())))
    assert len(rows) == 3 and rows[1][rows[0].index("new")] == '{"id":1,"v":"a,\\nb"}'
    assert rows[1][rows[0].index("commit_time")] == "2026-03-10T12:00:00+00:00"


def test_table_output_keeps_one_line_per_event() -> None:
    tz = timezone(timedelta(hours=2))
    event = _event(1, "insert", {"id": 1}, {}, NOW.astimezone(tz))
    event = Event(**{**event.__dict__, "reason": "line\nbreak"})
    out = io.StringIO()
    write_events(out, [event], "table", history=False)
    assert out.getvalue().count("\n") == 2 and "line\\nbreak" in out.getvalue()
