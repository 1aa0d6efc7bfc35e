"""Canonical JSON against a slow, obviously correct reference encoder."""

from __future__ import annotations

import enum
import json
import uuid
from collections import OrderedDict
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cdc_audit.canonical import MAX_DEPTH, MAX_SAFE_INT, JsonNumber, JsonValue, canonical_bytes

# ---- reference implementation -----------------------------------------------------------------

_NAMED_ESCAPES = {
    '"': '\\"',
    "\\": "\\\\",
    "\b": "\\b",
    "\f": "\\f",
    "\n": "\\n",
    "\r": "\\r",
    "\t": "\\t",
}


def _ref_string(text: str) -> str:
    out = ['"']
    for char in text:
        code = ord(char)
        if char in _NAMED_ESCAPES:
            out.append(_NAMED_ESCAPES[char])
        elif code < 0x20:
            out.append(f"\\u{code:04x}")
        elif 0xD800 <= code <= 0xDFFF:
            raise TypeError("lone surrogate")
        else:
            out.append(char)
    out.append('"')
    return "".join(out)


def _ref(value: object, depth: int = 0) -> str:
    if value is None:
        return "null"
    if value is True:
        return "true"
    if value is False:
        return "false"
    if isinstance(value, JsonNumber):
        return str.__str__(value)
    if isinstance(value, str):
        return _ref_string(value)
    if isinstance(value, int):
        if abs(value) > MAX_SAFE_INT:
            raise TypeError("unsafe integer")
        return str(int(value))
    if isinstance(value, list | tuple | dict) and depth >= MAX_DEPTH:
        raise TypeError("too deep")
    if isinstance(value, list | tuple):
        return "[" + ",".join(_ref(item, depth + 1) for item in value) + "]"
    if isinstance(value, dict):
        if any(type(key) is not str for key in value):
            raise TypeError("key not str")
        items = sorted(value.items())  # code point order
        return "{" + ",".join(f"{_ref_string(k)}:{_ref(v, depth + 1)}" for k, v in items) + "}"
    raise TypeError(type(value).__name__)


def reference_bytes(value: object) -> bytes:
    return _ref(value).encode()


# ---- examples -----------------------------------------------------------------------------


def test_sorted_keys_and_no_whitespace() -> None:
    value: JsonValue = {"b": [1, {"z": None, "a": True}], "a": "x", "": False, "A": -1}
    assert canonical_bytes(value) == b'{"":false,"A":-1,"a":"x","b":[1,{"a":true,"z":null}]}'


def test_string_escapes_follow_rfc_8785() -> None:
    text = "".join(chr(c) for c in range(0x20)) + '"\\/\x7f\u2028\u2029é😀'
    expected = (
        '"\\u0000\\u0001\\u0002\\u0003\\u0004\\u0005\\u0006\\u0007\\b\\t\\n\\u000b\\f\\r'
        "\\u000e\\u000f\\u0010\\u0011\\u0012\\u0013\\u0014\\u0015\\u0016\\u0017\\u0018"
        '\\u0019\\u001a\\u001b\\u001c\\u001d\\u001e\\u001f\\"\\\\/\x7f\u2028\u2029é😀"'
    )
    assert canonical_bytes(text) == expected.encode()
    assert canonical_bytes(text) == reference_bytes(text)


def test_json_numbers_are_verbatim() -> None:
    value: JsonValue = {"n": [JsonNumber("2.50"), JsonNumber("-0"), JsonNumber("1E+400")]}
    assert canonical_bytes(value) == b'{"n":[2.50,-0,1E+400]}'


def test_safe_integer_bounds() -> None:
    assert canonical_bytes([MAX_SAFE_INT, -MAX_SAFE_INT]) == b"[9007199254740991,-9007199254740991]"
    for unsafe in (MAX_SAFE_INT + 1, -MAX_SAFE_INT - 1, 2**64):
        with pytest.raises(TypeError):
            canonical_bytes([unsafe])


def test_tuples_and_empty_containers() -> None:
    assert canonical_bytes({"t": (1, "a"), "l": [], "d": {}}) == b'{"d":{},"l":[],"t":[1,"a"]}'


class Kind(enum.StrEnum):
    INSERT = "insert"


class Level(enum.IntEnum):
    HIGH = 3


def test_str_and_int_subclasses_are_written_as_plain_values() -> None:
    value: JsonValue = {"kind": Kind.INSERT, "level": Level.HIGH}
    assert canonical_bytes(value) == b'{"kind":"insert","level":3}'


class Row(list[JsonValue]):
    pass


def test_container_subclasses_are_checked_and_written_as_plain_values() -> None:
    value = OrderedDict([("b", Row([1, "x"])), ("a", OrderedDict(z=None))])
    assert canonical_bytes(value) == b'{"a":{"z":null},"b":[1,"x"]}'  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        canonical_bytes(OrderedDict(a=Row([1.5])))  # type: ignore[list-item]


@dataclass
class Point:
    x: int


@pytest.mark.parametrize(
    "value",
    [
        1.5,
        float("nan"),
        [0.0],
        {"a": {"b": [1, 2.0]}},
        Decimal("1.5"),
        b"bytes",
        {1: "int key"},
        {JsonNumber("1"): "str subclass key"},
        uuid.UUID(int=1),
        datetime(2026, 1, 1, tzinfo=UTC),
        Point(1),
        {"a", "set"},
        orjson.Fragment(b"[1,2]"),
        "\ud800",
        {"\udc00": 1},
        enum.Enum("Color", "RED").RED,  # type: ignore[attr-defined]
    ],
)
def test_refused_values(value: object) -> None:
    with pytest.raises(TypeError):
        canonical_bytes(value)  # type: ignore[arg-type]


def test_nesting_limit() -> None:
    ok: JsonValue = 0
    for _ in range(MAX_DEPTH):
        ok = [ok]
    assert canonical_bytes(ok) == b"[" * MAX_DEPTH + b"0" + b"]" * MAX_DEPTH
    with pytest.raises(TypeError, match="nests at most"):
        canonical_bytes({"deeper": ok})


@pytest.mark.parametrize("text", ["0", "-0", "2.50", "1e5", "1E+400", "-12.5e-3", "123456789"])
def test_json_number_accepts_the_json_grammar(text: str) -> None:
    assert JsonNumber(text) == text
    assert repr(JsonNumber(text)) == f"JsonNumber({text!r})"


@pytest.mark.parametrize(
    "text", ["", "01", "+1", ".5", "1.", "NaN", "Infinity", "0x10", "1,2", " 1"]
)
def test_json_number_refuses_other_text(text: str) -> None:
    with pytest.raises(ValueError, match="not a JSON number"):
        JsonNumber(text)


# ---- property: the fast path equals the reference -------------------------------------------


@st.composite
def json_numbers(draw: st.DrawFn) -> JsonNumber:
    """Any text of the JSON number grammar."""
    text = draw(st.sampled_from(["", "-"])) + str(draw(st.integers(0, 10**21)))
    if draw(st.booleans()):
        text += "." + draw(st.text("0123456789", min_size=1, max_size=8))
    if draw(st.booleans()):
        text += draw(st.sampled_from("eE")) + draw(st.sampled_from(["", "+", "-"]))
        text += str(draw(st.integers(0, 999)))
    return JsonNumber(text)


texts = st.text(max_size=12)
leaves = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-MAX_SAFE_INT, MAX_SAFE_INT),
    texts,
    json_numbers(),
)
json_values = st.recursive(
    leaves,
    lambda children: st.one_of(
        st.lists(children, max_size=5), st.dictionaries(texts, children, max_size=5)
    ),
    max_leaves=30,
)


@settings(max_examples=200, deadline=None)
@given(json_values)
def test_matches_reference(value: JsonValue) -> None:
    assert canonical_bytes(value) == reference_bytes(value)


def _numbers_as_text(value: object) -> object:
    if isinstance(value, bool) or value is None:
        return value
    if isinstance(value, int):
        return str(value)
    if isinstance(value, list):
        return [_numbers_as_text(item) for item in value]
    if isinstance(value, dict):
        return {key: _numbers_as_text(item) for key, item in value.items()}
    return value


@settings(max_examples=50, deadline=None)
@given(json_values)
def test_output_is_json_that_reads_back(value: JsonValue) -> None:
    parsed = json.loads(canonical_bytes(value), parse_float=str, parse_int=str)
    assert parsed == _numbers_as_text(value)


@settings(max_examples=100, deadline=None)
@given(st.dictionaries(st.text(), st.integers(-5, 5), min_size=2, max_size=8))
def test_key_order_is_code_point_order(value: dict[str, JsonValue]) -> None:
    keys = list(orjson.loads(canonical_bytes(value)))
    assert keys == sorted(value)
    assert [k.encode() for k in keys] == sorted(k.encode() for k in value)
