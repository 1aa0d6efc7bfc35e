"""Column values from pgoutput's text form to canonical JSON values, by type OID.

The worker is expected to pin the decoding session's output settings (TimeZone=UTC,
DateStyle=ISO, IntervalStyle=iso_8601, extra_float_digits=3, bytea_output=hex), so that the
text of a value depends only on the value. Nothing here reads the local time zone or locale.

Rules (`converter_for` picks one per column once; `convert` is the one-off form):

- int2, int4, oid, xid, cid: JSON integer.
- int8, xid8: JSON integer when within +-(2**53 - 1), else the decimal string (exact in every
  JSON reader).
- numeric, money, float4, float8: the string PostgreSQL printed, unchanged ('NaN',
  'Infinity' and '-Infinity' included); with extra_float_digits=3 floats print as the
  shortest text that round-trips.
- bool: true/false.
- json, jsonb: parsed into JSON values with numbers kept exactly: integers within +-(2**53 - 1)
  become ints, every other number a `JsonNumber` holding its digits in the form PostgreSQL's
  numeric prints them (2.50 stays 2.50; 1e5 becomes 100000, 1.0E-3 becomes 0.0010 and -0
  becomes 0, as a json value turns when stored in jsonb), so that the trail's jsonb columns
  give back exactly the value that was hashed. A json value with duplicate object keys (json,
  unlike jsonb, keeps them), an invalid Unicode escape or a \u0000 escape (which jsonb
  refuses), a number beyond numeric's range, and any value nesting deeper than
  `MAX_JSON_DEPTH`, is kept as its text, since parsing or storing it would lose or break
  something.
- timestamptz: ``YYYY-MM-DDTHH:MM:SS[.ffffff]+00:00`` in UTC: a fraction only when non-zero,
  then always 6 digits. Any other offset the server printed is converted to UTC.
- timestamp: the same without the offset. date: ``YYYY-MM-DD``.
  Dates before 1 AD use ISO 8601 astronomical years (1 BC is 0000, 44 BC is -0043); years
  after 9999 keep their extra digits without a sign. 'infinity' and '-infinity' stay text.
- Arrays of the types above (and of the other built-in types that use ',' as delimiter):
  JSON arrays, nested for several dimensions, NULL elements as null, elements converted by
  the element type's rule. An array printed with explicit lower bounds (``[0:1]={1,2}``)
  cannot be a JSON array without losing its bounds, so it stays text.
- Everything else (text, varchar, bpchar, name, uuid, inet, cidr, macaddr, interval, time,
  timetz, bytea as ``\\x..`` hex, enums, domains, composites, ranges, geometric types, user
  types, unknown OIDs): the text unchanged.

A converter never raises: text that does not have the shape its type OID promises (which the
server does not send) is kept as the text itself, so a surprise never loses an event.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from decimal import Decimal
from typing import Final, NoReturn, cast

import orjson

from cdc_audit.canonical import MAX_SAFE_INT, JsonNumber, JsonValue

__all__ = [
    "MAX_JSON_DEPTH",
    "Converter",
    "convert",
    "converter_for",
    "parse_json_exact",
    "parse_json_fast",
]

Converter = Callable[[str], JsonValue]
"""Turns the text of one non-NULL value into its canonical JSON value."""

MAX_JSON_DEPTH: Final = 200
"""Deepest json/jsonb nesting converted; deeper values stay text. Leaves room below
canonical JSON's limit of 254 for the event, row and array levels around a value."""


# --------------------------------------------------------------------------------------------
# Scalars


def _to_text(text: str) -> JsonValue:
    return text


def _to_int(text: str) -> JsonValue:
    # int() would accept ' 1', '1_0' and '+1', which the server never prints for these types;
    # the digits check keeps the result a faithful image of the text.
    body = text[1:] if text[:1] == "-" else text
    if body.isdigit() and body.isascii() and len(body) <= 16:
        value = int(text)
        if -MAX_SAFE_INT <= value <= MAX_SAFE_INT:
            return value
    return text


def _to_bool(text: str) -> JsonValue:
    if text == "t":
        return True
    if text == "f":
        return False
    return text


def _json_int(text: str) -> int | JsonNumber:
    # A 17-digit number may already be unsafe; longer ones certainly are, and int() refuses
    # more than 4300 digits: keep those as their text without converting.
    if len(text) <= 17:
        value = int(text)
        if -MAX_SAFE_INT <= value <= MAX_SAFE_INT:
            return value  # '-0' too: numeric prints it as 0
    return _number(text)


# numeric's limits: 131072 digits before the decimal point, 16383 after.
_NUMERIC_MAX_WEIGHT: Final = 131071
_NUMERIC_MAX_SCALE: Final = 16383


class _NumberOutOfRange(ValueError):
    """A JSON number that jsonb (PostgreSQL's numeric) cannot hold."""


def _number(text: str) -> JsonNumber:
    """The number as numeric prints it: what jsonb gives back after storing `text`."""
    # The json scanner has already matched the JSON number grammar that JsonNumber checks.
    if "e" not in text and "E" not in text and not text.startswith("-0"):
        return str.__new__(JsonNumber, text)  # already in numeric's form
    value = Decimal(text)
    exponent = value.as_tuple().exponent
    assert isinstance(exponent, int)  # finite: the grammar has no NaN or Infinity
    if value.adjusted() > _NUMERIC_MAX_WEIGHT or -exponent > _NUMERIC_MAX_SCALE:
        raise _NumberOutOfRange(text)
    if value.is_zero():
        value = value.copy_abs()
    # Fixed point with scale max(0, -exponent): numeric's display scale for this input.
    return str.__new__(JsonNumber, format(value, "f"))


def _reject_constant(name: str) -> NoReturn:
    raise ValueError(f"{name} is not JSON")


def _unique_pairs(pairs: list[tuple[str, JsonValue]]) -> dict[str, JsonValue]:
    result = dict(pairs)
    if len(result) != len(pairs):
        raise ValueError("duplicate object key")
    return result


_JSONB_DECODER: Final = json.JSONDecoder(
    parse_float=_number, parse_int=_json_int, parse_constant=_reject_constant
)
# The json type keeps its input text verbatim, duplicate keys included; jsonb cannot have any.
_JSON_DECODER: Final = json.JSONDecoder(
    parse_float=_number,
    parse_int=_json_int,
    parse_constant=_reject_constant,
    object_pairs_hook=_unique_pairs,
)


def _json_value_ok(value: object, depth: int) -> bool:
    """Whether `value` nests at most MAX_JSON_DEPTH containers and has only valid strings."""
    if isinstance(value, str):
        return "\x00" not in value and (value.isascii() or _encodable(value))
    if isinstance(value, dict):
        if depth >= MAX_JSON_DEPTH:
            return False
        return all(_encodable(k) and _json_value_ok(v, depth + 1) for k, v in value.items())
    if isinstance(value, list):
        if depth >= MAX_JSON_DEPTH:
            return False
        return all(_json_value_ok(v, depth + 1) for v in value)
    return True


def _encodable(text: str) -> bool:
    if "\x00" in text:  # from a \u0000 escape: jsonb cannot store it
        return False
    try:
        text.encode()
    except UnicodeEncodeError:  # a lone surrogate from a \ud800-style escape
        return False
    return True


def _parse_json(decoder: json.JSONDecoder, text: str) -> JsonValue:
    try:
        value: JsonValue = decoder.decode(text)
    except (ValueError, RecursionError):
        return text
    # Cheap, C-speed screens for the rare values that need the slow walk: many brackets may
    # mean deep nesting; a \u escape may hide a lone surrogate.
    if (text.count("[") + text.count("{") > MAX_JSON_DEPTH or "\\u" in text) and not (
        _json_value_ok(value, 0)
    ):
        return text
    return value


def parse_json_exact(text: str) -> JsonValue:
    """Parse JSON text without losing number precision (see the module docstring).

    For json/jsonb column values and for logical message contents such as the context. Text
    that is not JSON, has duplicate keys or nests too deep is returned unchanged, as a string.
    """
    return _parse_json(_JSON_DECODER, text)


def parse_json_fast(text: str) -> JsonValue:
    """`parse_json_exact` for JSON that PostgreSQL printed or canonical JSON, several times
    faster: orjson parses, and only a document holding a number orjson cannot keep exactly
    (a fraction, an exponent, an integer beyond +-(2**53 - 1)) is parsed again exactly.

    For reading the trail back (verification), not for column values from the stream: those
    go through the json/jsonb converters, which also refuse duplicate keys.
    """
    try:
        value = orjson.loads(text)
    except orjson.JSONDecodeError:
        return parse_json_exact(text)
    if _inexact(value):
        return parse_json_exact(text)
    return cast("JsonValue", value)


def _inexact(value: object) -> bool:
    """Whether orjson's result holds a float or an integer beyond +-(2**53 - 1)."""
    pending = [value]
    while pending:
        item = pending.pop()
        kind = type(item)
        if kind is dict:
            pending.extend(cast("dict[str, object]", item).values())
        elif kind is list:
            pending.extend(cast("list[object]", item))
        elif kind is int:
            if not -MAX_SAFE_INT <= cast(int, item) <= MAX_SAFE_INT:
                return True
        elif kind is float:
            return True
    return False


def _to_jsonb(text: str) -> JsonValue:
    return _parse_json(_JSONB_DECODER, text)


# ---- dates and times

# ISO DateStyle output. Years have at least 4 digits; ' BC' marks years before 1 AD; offsets
# are +hh, +hh:mm or +hh:mm:ss (historical local mean time offsets have seconds).
_TSTZ_UTC_RE: Final = re.compile(r"(\d{4}-\d\d-\d\d) (\d\d:\d\d:\d\d)(?:\.(\d{1,6}))?\+00")
_TIMESTAMP_RE: Final = re.compile(
    r"(\d{4,})-(\d\d)-(\d\d) (\d\d):(\d\d):(\d\d)(?:\.(\d{1,6}))?"
    r"(?:([+-])(\d\d)(?::(\d\d)(?::(\d\d))?)?)?( BC)?"
)
_DATE_RE: Final = re.compile(r"(\d{4,})-(\d\d)-(\d\d)( BC)?")
_PLAIN_DATE_RE: Final = re.compile(r"\d{4}-\d\d-\d\d")


def _days_from_civil(year: int, month: int, day: int) -> int:
    """Days since 1970-01-01 in the proleptic Gregorian calendar, for any astronomical year.

    datetime cannot represent years before 1 or after 9999; PostgreSQL can.
    """
    year -= month <= 2
    era = year // 400
    yoe = year - era * 400
    doy = (153 * (month + (-3 if month > 2 else 9)) + 2) // 5 + day - 1
    doe = yoe * 365 + yoe // 4 - yoe // 100 + doy
    return era * 146097 + doe - 719468


def _civil_from_days(days: int) -> tuple[int, int, int]:
    """Inverse of _days_from_civil."""
    days += 719468
    era = days // 146097
    doe = days - era * 146097
    yoe = (doe - doe // 1460 + doe // 36524 - doe // 146096) // 365
    doy = doe - (365 * yoe + yoe // 4 - yoe // 100)
    mp = (5 * doy + 2) // 153
    day = doy - (153 * mp + 2) // 5 + 1
    month = mp + (3 if mp < 10 else -9)
    return yoe + era * 400 + (month <= 2), month, day


def _iso_year(year: int) -> str:
    return f"{year:04d}" if year >= 0 else f"-{-year:04d}"


def _fraction(digits: str | None) -> str:
    if digits is None or int(digits) == 0:
        return ""
    return "." + digits.ljust(6, "0")


def _timestamp_parts(text: str) -> tuple[int, int, int, int, re.Match[str]] | None:
    """(astronomical year, month, day, seconds of day, match), or None if not a timestamp."""
    match = _TIMESTAMP_RE.fullmatch(text)
    if match is None:
        return None
    year, month, day, hour, minute, second = (int(match[i]) for i in range(1, 7))
    if not (1 <= month <= 12 and 1 <= day <= 31 and hour < 24 and minute < 60 and second < 60):
        return None
    if match[12]:
        year = 1 - year
    return year, month, day, hour * 3600 + minute * 60 + second, match


def _format_timestamp(days: int, seconds: int, fraction: str) -> str:
    year, month, day = _civil_from_days(days)
    hour, rest = divmod(seconds, 3600)
    minute, second = divmod(rest, 60)
    return f"{_iso_year(year)}-{month:02d}-{day:02d}T{hour:02d}:{minute:02d}:{second:02d}{fraction}"


def _to_timestamptz(text: str) -> JsonValue:
    match = _TSTZ_UTC_RE.fullmatch(text)
    if match is not None:  # the shape TimeZone=UTC gives for years 1000..9999
        return f"{match[1]}T{match[2]}{_fraction(match[3])}+00:00"
    return _timestamptz_slow(text)


def _timestamptz_slow(text: str) -> JsonValue:
    """Any ISO timestamptz: BC, 5-digit years, offsets other than +00."""
    parts = _timestamp_parts(text)
    if parts is None or parts[4][8] is None:
        return text  # 'infinity', '-infinity', or not ISO
    year, month, day, seconds, match = parts
    offset = int(match[9]) * 3600 + int(match[10] or 0) * 60 + int(match[11] or 0)
    if match[8] == "-":
        offset = -offset
    days, seconds = divmod(_days_from_civil(year, month, day) * 86400 + seconds - offset, 86400)
    return _format_timestamp(days, seconds, _fraction(match[7])) + "+00:00"


def _to_timestamp(text: str) -> JsonValue:
    parts = _timestamp_parts(text)
    if parts is None or parts[4][8] is not None:
        return text
    year, month, day, seconds, match = parts
    days, seconds = divmod(_days_from_civil(year, month, day) * 86400 + seconds, 86400)
    return _format_timestamp(days, seconds, _fraction(match[7]))


def _to_date(text: str) -> JsonValue:
    if _PLAIN_DATE_RE.fullmatch(text):
        return text  # already ISO 8601
    match = _DATE_RE.fullmatch(text)
    if match is None:
        return text
    year = int(match[1])
    if match[4]:
        year = 1 - year
    return f"{_iso_year(year)}-{match[2]}-{match[3]}"


# --------------------------------------------------------------------------------------------
# Arrays

# One token of array_out's output: a quoted element (backslash escapes inside), a brace, the
# delimiter, or an unquoted element (array_out quotes anything with braces, delimiters,
# quotes, backslashes or white space, and anything spelled NULL). Its white space is ASCII
# only (array_isspace): U+00A0, U+0085 or U+2028 stay unquoted, so `\s` must not stop there.
_ARRAY_TOKEN_RE: Final = re.compile(
    r'"((?:[^"\\]|\\.)*)"|([{},])|([^{},"\\ \t\n\r\v\f]+)', re.DOTALL
)
_UNESCAPE_RE: Final = re.compile(r"\\(.)", re.DOTALL)


class _ArraySyntaxError(ValueError):
    pass


def _parse_array(text: str, element: Converter) -> JsonValue:
    """Parse an array literal whose elements are converted by `element`."""
    if not text.startswith("{"):
        return text  # '[lo:hi]={...}' keeps its bounds as text; anything else is not ours
    try:
        return _parse_array_body(text, element)
    except _ArraySyntaxError:
        return text


def _parse_array_body(text: str, element: Converter) -> JsonValue:
    stack: list[list[JsonValue]] = []
    root: list[JsonValue] = []
    leaf_depth = 0  # depth of scalar elements, fixed by the first one seen
    expect_item = True  # after '{' or ',': an element or '{' (or '}' right after '{')
    pos, end = 0, len(text)
    while pos < end:
        match = _ARRAY_TOKEN_RE.match(text, pos)
        if match is None:
            raise _ArraySyntaxError(pos)
        pos = match.end()
        punct = match[2]
        if punct == "{":
            if not expect_item or (leaf_depth and len(stack) >= leaf_depth):
                raise _ArraySyntaxError(pos)
            inner: list[JsonValue] = []
            if stack:
                stack[-1].append(inner)
            else:
                if pos != 1:
                    raise _ArraySyntaxError(pos)
                root = inner
            stack.append(inner)
        elif punct == "}":
            if not stack or (expect_item and stack[-1]):
                raise _ArraySyntaxError(pos)
            stack.pop()
            expect_item = False
            if not stack and pos != end:
                raise _ArraySyntaxError(pos)
        elif punct == ",":
            if expect_item or not stack:
                raise _ArraySyntaxError(pos)
            expect_item = True
        else:
            if not expect_item or not stack:
                raise _ArraySyntaxError(pos)
            if leaf_depth == 0:
                leaf_depth = len(stack)
            elif leaf_depth != len(stack):
                raise _ArraySyntaxError(pos)
            stack[-1].append(_array_element(match, element))
            expect_item = False
    if stack:
        raise _ArraySyntaxError(end)
    return root


def _array_element(match: re.Match[str], element: Converter) -> JsonValue:
    quoted = match[1]
    if quoted is not None:
        if "\\" in quoted:
            quoted = _UNESCAPE_RE.sub(r"\1", quoted)
        return element(quoted)
    bare = match[3]
    # Only an unquoted NULL is SQL NULL; array_out quotes a string spelled NULL.
    if len(bare) == 4 and bare.upper() == "NULL":
        return None
    return element(bare)


# --------------------------------------------------------------------------------------------
# OID tables (pg_type.oid of built-in types, stable across PostgreSQL versions)

_SCALARS: Final[dict[int, Converter]] = {
    16: _to_bool,  # bool
    20: _to_int,  # int8: unsafe magnitudes stay text, see _to_int
    21: _to_int,  # int2
    23: _to_int,  # int4
    26: _to_int,  # oid
    28: _to_int,  # xid
    29: _to_int,  # cid
    5069: _to_int,  # xid8
    114: parse_json_exact,  # json
    3802: _to_jsonb,  # jsonb
    1082: _to_date,  # date
    1114: _to_timestamp,  # timestamp
    1184: _to_timestamptz,  # timestamptz
}

# Built-in types kept as text whose arrays use ',' as delimiter (box uses ';' and geometric
# types are text anyway, so their arrays stay text too).
_TEXT_TYPES: Final = {
    17: 1001,  # bytea
    18: 1002,  # "char"
    19: 1003,  # name
    25: 1009,  # text
    142: 143,  # xml
    650: 651,  # cidr
    700: 1021,  # float4
    701: 1022,  # float8
    774: 775,  # macaddr8
    790: 791,  # money
    829: 1040,  # macaddr
    869: 1041,  # inet
    1042: 1014,  # bpchar
    1043: 1015,  # varchar
    1083: 1183,  # time
    1186: 1187,  # interval
    1266: 1270,  # timetz
    1560: 1561,  # bit
    1562: 1563,  # varbit
    1700: 1231,  # numeric
    2950: 2951,  # uuid
    3220: 3221,  # pg_lsn
}

# Array type OID -> element type OID.
_ARRAYS: Final[dict[int, int]] = {
    1000: 16,  # bool[]
    1016: 20,  # int8[]
    1005: 21,  # int2[]
    1007: 23,  # int4[]
    1028: 26,  # oid[]
    1011: 28,  # xid[]
    1012: 29,  # cid[]
    271: 5069,  # xid8[]
    199: 114,  # json[]
    3807: 3802,  # jsonb[]
    1182: 1082,  # date[]
    1115: 1114,  # timestamp[]
    1185: 1184,  # timestamptz[]
    **{array: element for element, array in _TEXT_TYPES.items()},
}


def _array_converter(element: Converter) -> Converter:
    def convert_array(text: str) -> JsonValue:
        return _parse_array(text, element)

    return convert_array


_CONVERTERS: Final[dict[int, Converter]] = {
    **_SCALARS,
    **{
        array: _array_converter(_SCALARS.get(element, _to_text))
        for array, element in _ARRAYS.items()
    },
}


def converter_for(type_oid: int) -> Converter:
    """The converter for values of `type_oid`; resolve once per column, call once per value.

    Unknown OIDs (user types, domains, enums, composites, ranges) get the identity: the
    value's text unchanged.
    """
    return _CONVERTERS.get(type_oid, _to_text)


def convert(type_oid: int, text: str) -> JsonValue:
    """Convert the text of one non-NULL value of type `type_oid` (see the module docstring)."""
    return _CONVERTERS.get(type_oid, _to_text)(text)
