"""Text values to canonical JSON values, by type OID."""

from __future__ import annotations

import json
from datetime import UTC, date, datetime, timedelta, timezone

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from psycopg.postgres import types as pg_types

from cdc_audit.canonical import JsonNumber, JsonValue, canonical_bytes
from cdc_audit.values import (
    MAX_JSON_DEPTH,
    _civil_from_days,
    _days_from_civil,
    convert,
    converter_for,
    parse_json_exact,
    parse_json_fast,
)


def oid(name: str) -> int:
    info = pg_types.get(name)
    assert info is not None
    return info.oid


def array_oid(name: str) -> int:
    info = pg_types.get(name)
    assert info is not None
    return info.array_oid


# ---- scalars --------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["int2", "int4", "int8", "oid", "xid", "cid", "xid8"])
def test_integers(name: str) -> None:
    assert convert(oid(name), "42") == 42
    assert convert(oid(name), "0") == 0


def test_negative_integers() -> None:
    assert convert(oid("int4"), "-2147483648") == -2147483648
    assert convert(oid("int2"), "-1") == -1


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("9007199254740991", 9007199254740991),
        ("-9007199254740991", -9007199254740991),
        ("9007199254740992", "9007199254740992"),
        ("-9007199254740992", "-9007199254740992"),
        ("9223372036854775807", "9223372036854775807"),
        ("-9223372036854775808", "-9223372036854775808"),
    ],
)
def test_int8_is_a_number_only_while_safe(text: str, expected: JsonValue) -> None:
    assert convert(oid("int8"), text) == expected


@pytest.mark.parametrize(
    ("name", "text"),
    [
        ("numeric", "2.50"),
        ("numeric", "-0.000000000000000000001"),
        ("numeric", "123456789012345678901234567890.123"),
        ("numeric", "NaN"),
        ("numeric", "Infinity"),
        ("money", "$1,234.50"),
        ("float4", "3.4028235e+38"),
        ("float8", "0.1"),
        ("float8", "-Infinity"),
        ("float8", "NaN"),
        ("float8", "1e-310"),
    ],
)
def test_decimal_numbers_stay_exact_strings(name: str, text: str) -> None:
    assert convert(oid(name), text) == text
    assert type(convert(oid(name), text)) is str


def test_bool() -> None:
    assert convert(oid("bool"), "t") is True
    assert convert(oid("bool"), "f") is False


@pytest.mark.parametrize(
    ("name", "text"),
    [
        ("text", "hello\nworld"),
        ("varchar", "x"),
        ("bpchar", "ab   "),
        ("name", "Accounts"),
        ("uuid", "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11"),
        ("inet", "192.168.0.1/24"),
        ("cidr", "10.0.0.0/8"),
        ("macaddr", "08:00:2b:01:02:03"),
        ("interval", "1 year 2 mons 3 days 04:05:06.789"),
        ("time", "04:05:06.789"),
        ("timetz", "04:05:06+02"),
        ("bytea", "\\x00ff"),
        ("point", "(1,2)"),
        ("int4range", "[1,5)"),
        ("tsvector", "'a' 'b'"),
        ("int2vector", "1 2 3"),
    ],
)
def test_text_like_types_are_unchanged(name: str, text: str) -> None:
    assert convert(oid(name), text) == text


def test_unknown_oids_are_unchanged() -> None:
    for type_oid in (0, 705, 16384, 99999, 2**32 - 1):  # 705: the "unknown" pseudo-type
        assert convert(type_oid, '(1,"x")') == '(1,"x")'


def test_converter_for_matches_convert() -> None:
    conv = converter_for(oid("int4"))
    assert conv("7") == convert(oid("int4"), "7") == 7


@pytest.mark.parametrize(
    ("name", "text"),
    [
        ("int4", "abc"),
        ("int4", " 1"),
        ("int4", "1_000"),
        ("int4", "+1"),
        ("int4", "-"),
        ("int4", "١٢"),
        ("int8", ""),
        ("bool", "true"),
        ("date", "28/11/2026"),
        ("timestamptz", "Sat Nov 28 06:53:25.123456 2026 UTC"),
        ("timestamp", "2026-13-28 06:53:25"),
        ("timestamp", "2026-11-28 06:53:25+00"),
    ],
)
def test_unexpected_shapes_are_kept_as_text(name: str, text: str) -> None:
    assert convert(oid(name), text) == text


# ---- json / jsonb -----------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["json", "jsonb"])
def test_json_numbers_are_exact(name: str) -> None:
    text = '{"a": 2.50, "b": [1, 1e5, 12345678901234567890, -9007199254740991], "c": -0}'
    value = convert(oid(name), text)
    assert value == {
        "a": JsonNumber("2.50"),
        "b": [1, JsonNumber("100000"), JsonNumber("12345678901234567890"), -9007199254740991],
        "c": 0,
    }
    assert isinstance(value, dict)
    assert type(value["a"]) is JsonNumber
    assert canonical_bytes(value) == (
        b'{"a":2.50,"b":[1,100000,12345678901234567890,-9007199254740991],"c":0}'
    )


@pytest.mark.parametrize(
    ("text", "numeric_text"),
    [
        ("1e5", "100000"),
        ("1E+2", "100"),
        ("1.0E-3", "0.0010"),
        ("-0.5e1", "-5"),
        ("12.345e1", "123.45"),
        ("-0.0", "0.0"),
        ("0.000", "0.000"),
        ("-1.25", "-1.25"),
    ],
)
def test_json_numbers_take_the_form_jsonb_stores(text: str, numeric_text: str) -> None:
    # The trail keeps values in jsonb columns: what is hashed must be what jsonb gives back.
    assert convert(oid("json"), f"[{text}]") == [JsonNumber(numeric_text)]


@pytest.mark.parametrize("text", ['["a\\u0000b"]', "[1e999999]", "[1e-20000]"])
def test_json_that_jsonb_cannot_store_stays_text(text: str) -> None:
    assert convert(oid("json"), text) == text


def test_json_scalars_and_strings() -> None:
    assert convert(oid("jsonb"), "null") is None
    assert convert(oid("jsonb"), "true") is True
    assert convert(oid("jsonb"), '"x\\u00e9\\n"') == "xé\n"
    assert convert(oid("json"), ' [ "\\ud83d\\ude00" ] ') == ["😀"]
    huge = "1" * 5000  # more digits than int() accepts by default
    assert convert(oid("jsonb"), huge) == JsonNumber(huge)


@pytest.mark.parametrize(
    "text",
    [
        '{"a": 1, "a": 2}',  # the json type keeps duplicate keys; a dict cannot
        '{"x": {"a": 1, "a": 1}}',
        '"\\ud800"',  # lone surrogate escape: no valid string
        '{"\\udc00": 1}',
        "NaN",
        "[Infinity]",
        "{'a': 1}",
        "",
    ],
)
def test_json_that_cannot_be_kept_exactly_stays_text(text: str) -> None:
    assert convert(oid("json"), text) == text


def test_json_nesting_limit() -> None:
    ok = "[" * MAX_JSON_DEPTH + "]" * MAX_JSON_DEPTH
    too_deep = "[" * (MAX_JSON_DEPTH + 1) + "]" * (MAX_JSON_DEPTH + 1)
    parsed = convert(oid("jsonb"), ok)
    assert isinstance(parsed, list)
    assert canonical_bytes({"row": {"col": parsed}}) == b'{"row":{"col":' + ok.encode() + b"}}"
    assert convert(oid("jsonb"), too_deep) == too_deep
    absurd = "[" * 100_000 + "]" * 100_000  # beyond the parser's recursion limit
    assert convert(oid("json"), absurd) == absurd


def test_many_brackets_but_shallow_json_is_parsed() -> None:
    text = "[" + ",".join(["[]"] * 500) + "]"
    assert convert(oid("jsonb"), text) == [[]] * 500


def test_parse_json_exact_for_message_contents() -> None:
    assert parse_json_exact('{"actor_id": "u42", "amount": 10.0}') == {
        "actor_id": "u42",
        "amount": JsonNumber("10.0"),
    }


# ---- dates and times --------------------------------------------------------------------------

TSTZ = oid("timestamptz")
TS = oid("timestamp")
DATE = oid("date")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2026-11-28 06:53:25.123456+00", "2026-11-28T06:53:25.123456+00:00"),
        ("2026-11-28 06:53:25+00", "2026-11-28T06:53:25+00:00"),
        ("2026-11-28 06:53:25.5+00", "2026-11-28T06:53:25.500000+00:00"),
        ("2026-11-28 06:53:25.000001+00", "2026-11-28T06:53:25.000001+00:00"),
        ("0099-01-01 00:00:00+00", "0099-01-01T00:00:00+00:00"),
        # Offsets, if the session's TimeZone was not UTC after all, are converted.
        ("2026-11-28 06:53:25.5+05:30", "2026-11-28T01:23:25.500000+00:00"),
        ("2026-01-01 00:00:00-03", "2026-01-01T03:00:00+00:00"),
        ("1900-01-01 00:10:00+00:53:28", "1899-12-31T23:16:32+00:00"),
        ("2024-02-29 23:30:00-01", "2024-03-01T00:30:00+00:00"),
        # Before 1 AD: astronomical years; after 9999: more digits.
        ("0044-03-15 12:00:00+00 BC", "-0043-03-15T12:00:00+00:00"),
        ("0001-12-31 23:00:00-02 BC", "0001-01-01T01:00:00+00:00"),
        ("0001-01-01 00:30:00+01", "0000-12-31T23:30:00+00:00"),
        ("4714-11-24 00:00:00+00 BC", "-4713-11-24T00:00:00+00:00"),
        ("294276-12-31 23:59:59.999999+00", "294276-12-31T23:59:59.999999+00:00"),
        ("infinity", "infinity"),
        ("-infinity", "-infinity"),
    ],
)
def test_timestamptz(text: str, expected: str) -> None:
    assert convert(TSTZ, text) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2026-11-28 06:53:25.123456", "2026-11-28T06:53:25.123456"),
        ("2026-11-28 06:53:25", "2026-11-28T06:53:25"),
        ("2026-11-28 06:53:25.25", "2026-11-28T06:53:25.250000"),
        ("0001-01-01 00:00:00 BC", "0000-01-01T00:00:00"),
        ("12026-11-28 06:53:25", "12026-11-28T06:53:25"),
        ("infinity", "infinity"),
    ],
)
def test_timestamp(text: str, expected: str) -> None:
    assert convert(TS, text) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2026-11-28", "2026-11-28"),
        ("0044-03-15 BC", "-0043-03-15"),
        ("0001-01-01 BC", "0000-01-01"),
        ("5874897-12-31", "5874897-12-31"),
        ("-infinity", "-infinity"),
    ],
)
def test_date(text: str, expected: str) -> None:
    assert convert(DATE, text) == expected


def _pg_iso_timestamptz(moment: datetime) -> str:
    """What PostgreSQL prints with DateStyle=ISO in the moment's own zone."""
    text = moment.strftime("%Y-%m-%d %H:%M:%S")
    if moment.microsecond:
        text += f".{moment.microsecond:06d}".rstrip("0")
    offset = moment.utcoffset()
    assert offset is not None
    seconds = int(offset.total_seconds())
    sign = "-" if seconds < 0 else "+"
    hours, rest = divmod(abs(seconds), 3600)
    minutes, secs = divmod(rest, 60)
    text += f"{sign}{hours:02d}"
    if minutes or secs:
        text += f":{minutes:02d}"
    if secs:
        text += f":{secs:02d}"
    return text


@settings(max_examples=300, deadline=None)
@given(
    st.datetimes(min_value=datetime(1000, 1, 2), max_value=datetime(9999, 12, 30)),
    st.integers(-15 * 3600, 15 * 3600),
)
def test_timestamptz_agrees_with_datetime(naive: datetime, offset_seconds: int) -> None:
    zone = timezone(timedelta(seconds=offset_seconds))
    moment = naive.replace(tzinfo=zone)
    converted = convert(TSTZ, _pg_iso_timestamptz(moment))
    assert isinstance(converted, str)
    assert datetime.fromisoformat(converted) == moment
    assert converted == moment.astimezone(UTC).isoformat()


@settings(max_examples=300, deadline=None)
@given(st.integers(-3_000_000, 3_000_000))
def test_civil_day_arithmetic(days: int) -> None:
    year, month, day = _civil_from_days(days)
    assert _days_from_civil(year, month, day) == days
    if 1 <= year <= 9999:
        assert date(year, month, day) == date(1970, 1, 1) + timedelta(days=days)


# ---- arrays ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "text", "expected"),
    [
        ("int4", "{1,2,NULL,-4}", [1, 2, None, -4]),
        ("int4", "{}", []),
        ("int4", "{{1,2},{3,4}}", [[1, 2], [3, 4]]),
        ("int4", "{{{1},{2}},{{3},{4}}}", [[[1], [2]], [[3], [4]]]),
        ("int8", "{1,9223372036854775807}", [1, "9223372036854775807"]),
        ("int2", "{7}", [7]),
        ("bool", "{t,f,NULL}", [True, False, None]),
        ("numeric", "{2.50,NaN,NULL}", ["2.50", "NaN", None]),
        ("float8", "{0.1,Infinity,-Infinity}", ["0.1", "Infinity", "-Infinity"]),
        (
            "text",
            '{"a b",NULL,"NULL",null,"q\\"x","back\\\\slash",plain,"","{}",","," "}',
            ["a b", None, "NULL", None, 'q"x', "back\\slash", "plain", "", "{}", ",", " "],
        ),
        ("varchar", '{"é ü",😀}', ["é ü", "😀"]),
        (
            "uuid",
            "{a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11}",
            ["a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11"],
        ),
        ("bytea", '{"\\\\x0102",NULL}', ["\\x0102", None]),
        (
            "timestamptz",
            '{"2026-11-28 06:53:25.5+00",NULL,infinity}',
            ["2026-11-28T06:53:25.500000+00:00", None, "infinity"],
        ),
        ("date", '{2026-11-28,"0044-03-15 BC"}', ["2026-11-28", "-0043-03-15"]),
        (
            "jsonb",
            '{"{\\"a\\": 1.0}","[1, 2]",NULL,"\\"s\\""}',
            [{"a": JsonNumber("1.0")}, [1, 2], None, "s"],
        ),
        ("inet", "{10.0.0.1,::1/128}", ["10.0.0.1", "::1/128"]),
    ],
)
def test_arrays(name: str, text: str, expected: JsonValue) -> None:
    assert convert(array_oid(name), text) == expected


def test_array_element_types_are_kept() -> None:
    value = convert(array_oid("numeric"), "{1.0}")
    assert isinstance(value, list)
    assert type(value[0]) is str  # numeric elements stay exact strings, never JsonNumber


@pytest.mark.parametrize(
    "text",
    [
        "[0:1]={1,2}",  # explicit lower bounds: a JSON array would lose them
        "[1:1][-2:-1]={{1,2}}",
        "{1,{2}}",
        "{{1},2}",
        "{1,}",
        "{,1}",
        "{1 ,2}",
        "{1",
        "{1}}",
        "{1}{2}",
        '{"unterminated}',
        "{a\\b}",
        "",
        "1,2",
    ],
)
def test_arrays_that_are_not_plain_literals_stay_text(text: str) -> None:
    assert convert(array_oid("int4"), text) == text


def test_box_and_unknown_arrays_stay_text() -> None:
    assert convert(array_oid("box"), "{(1,1),(0,0);(2,2),(1,1)}") == "{(1,1),(0,0);(2,2),(1,1)}"
    assert convert(99999, "{1,2}") == "{1,2}"


def _array_out(value: list[object]) -> str:
    """PostgreSQL's array_out for text elements (quotes exactly when it must)."""
    parts = []
    for item in value:
        if isinstance(item, list):
            parts.append(_array_out(item))
        elif item is None:
            parts.append("NULL")
        else:
            assert isinstance(item, str)
            needs_quotes = (
                item == ""
                or item.upper() == "NULL"
                or any(c in item for c in '{},"\\')
                or any(c.isspace() for c in item)
            )
            if needs_quotes:
                parts.append('"' + item.replace("\\", "\\\\").replace('"', '\\"') + '"')
            else:
                parts.append(item)
    return "{" + ",".join(parts) + "}"


elements = st.one_of(st.none(), st.text(max_size=8))


@st.composite
def rectangular_arrays(draw: st.DrawFn) -> list[object]:
    dims = draw(st.lists(st.integers(1, 3), min_size=1, max_size=3))

    def build(level: int) -> list[object]:
        if level == len(dims) - 1:
            return [draw(elements) for _ in range(dims[level])]
        return [build(level + 1) for _ in range(dims[level])]

    return build(0)


@settings(max_examples=200, deadline=None)
@given(rectangular_arrays())
def test_text_array_round_trip(value: list[object]) -> None:
    assert convert(array_oid("text"), _array_out(value)) == value


# ---- every converter is total and its result canonical-encodable ------------------------------

KNOWN = [t.oid for t in pg_types] + [t.array_oid for t in pg_types]


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(KNOWN), st.text(max_size=30))
def test_converters_never_raise(type_oid: int, text: str) -> None:
    canonical_bytes(convert(type_oid, text))


# The worker encodes converted values without walking them for refusals (chain.StreamChain,
# trusted=True): that is only sound if no converter can ever return what canonical JSON
# refuses, whatever text the server sends.
_TYPE_NAMES = [
    "bool", "int2", "int4", "int8", "oid", "xid", "cid", "xid8", "numeric", "float4",
    "float8", "money", "json", "jsonb", "date", "timestamp", "timestamptz", "text", "bytea",
    "interval", "uuid",
]  # fmt: skip
_SHAPED_TEXT = st.one_of(
    st.text(max_size=40),
    st.from_regex(r"-?[0-9]{1,25}(\.[0-9]{1,10})?([eE][-+]?[0-9]{1,4})?", fullmatch=True),
    st.from_regex(r"\{([-0-9.eE\", {}a-z]|NULL){0,30}\}", fullmatch=True),
    st.from_regex(
        r"[0-9]{4,6}-[0-9]{2}-[0-9]{2}( [0-9:.]{8,15}([+-][0-9:]{2,8})?)?( BC)?", fullmatch=True
    ),
    st.recursive(
        st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
        lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
        max_leaves=12,
    ).map(json.dumps),
)


@settings(max_examples=400)
@given(
    st.sampled_from(_TYPE_NAMES),
    st.booleans(),
    _SHAPED_TEXT,
)
def test_no_converter_returns_what_canonical_json_refuses(
    name: str, as_array: bool, text: str
) -> None:
    value = convert(array_oid(name) if as_array else oid(name), text)
    canonical_bytes(value)  # raises TypeError for a float, an unsafe int, a bad key, ...


@settings(max_examples=300)
@given(_SHAPED_TEXT)
def test_the_fast_parser_agrees_with_the_exact_one(text: str) -> None:
    # Verification reads the trail back with parse_json_fast: it must give exactly what the
    # exact parser gives for anything PostgreSQL's jsonb or canonical JSON can print.
    exact = parse_json_exact(text)
    if isinstance(exact, str) and exact == text:
        return  # not JSON the exact parser keeps: the fast one may differ, by design
    assert canonical_bytes(parse_json_fast(text)) == canonical_bytes(exact)


@pytest.mark.parametrize(
    "text",
    ['{"a": 2.50}', "[1e3]", "9007199254740993", '{"b": [0.1, -0]}', '"x\\u00e9"'],
)
def test_the_fast_parser_keeps_numbers_exact(text: str) -> None:
    assert canonical_bytes(parse_json_fast(text)) == canonical_bytes(parse_json_exact(text))
