"""Canonical JSON is deterministic: the same logical value always gives the same bytes.

Property tests over what real events carry: text with characters outside the BMP, control
characters, quotes, backslashes and U+2028/2029; integers at the edge of the safe range;
JSON numbers with big and small exponents, made the way the worker makes them (by
`parse_json_exact` of JSON text); nested arrays and objects. Whatever order a dict was built
in, however a JSON value was spelled (escapes, whitespace, key order, exponent), the canonical
bytes are the same, parse back to the same bytes, and are plain JSON to any other parser.
"""

from __future__ import annotations

import dataclasses
import json
import random
import uuid
from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from cdc_audit.canonical import (
    MAX_SAFE_INT,
    JsonNumber,
    JsonValue,
    canonical_bytes,
    canonical_bytes_trusted,
)
from cdc_audit.chain import DraftEvent, StreamChain
from cdc_audit.values import parse_json_exact, parse_json_fast

# ---- strategies ---------------------------------------------------------------------------------

# Characters that need care: every control character, the two JSON metacharacters, DEL, the
# two separators JavaScript treats as line ends, the BMP's last characters, astral ones (which
# UTF-16 writes as surrogate pairs), and the ends of the code point range.
SPECIAL_CHARS = [
    *(chr(c) for c in range(1, 0x20)),
    '"',
    "\\",
    "/",
    "\x7f",
    "\u2028",
    "\u2029",
    "\ufeff",
    "\ue000",
    "\uffff",
    "\U00010000",
    "\U0001f600",
    "\U0010ffff",
    "é",
]

# NUL is left out: PostgreSQL's text and jsonb cannot hold it, and `parse_json_exact` keeps a
# document with a \u0000 escape as its text (see test_nul_escape_keeps_the_document_as_text).
chars = st.one_of(
    st.characters(min_codepoint=1, max_codepoint=0x10FFFF, exclude_categories=["Cs"]),
    st.sampled_from(SPECIAL_CHARS),
)
texts = st.text(chars, max_size=12)
keys = st.text(chars, max_size=6)

safe_ints = st.one_of(
    st.integers(-MAX_SAFE_INT, MAX_SAFE_INT),
    st.integers(MAX_SAFE_INT - 1000, MAX_SAFE_INT),
    st.integers(-MAX_SAFE_INT, -MAX_SAFE_INT + 1000),
    st.sampled_from([0, 1, -1, 2**31, -(2**31), 2**32, 2**52, -(2**52)]),
)


@st.composite
def number_texts(draw: st.DrawFn) -> str:
    """JSON number text: big and small magnitudes, long mantissas, signed exponents."""
    sign = draw(st.sampled_from(["", "-"]))
    whole = draw(
        st.one_of(
            st.just("0"),
            st.integers(1, 10**6).map(str),
            st.integers(2**53 - 3, 2**53 + 3).map(str),  # around the safe integer limit
            st.integers(10**17, 10**40).map(str),
        )
    )
    text = sign + whole
    if draw(st.booleans()):
        text += "." + draw(st.text("0123456789", min_size=1, max_size=20))
    if draw(st.booleans()):
        exponent = draw(st.one_of(st.integers(-30, 30), st.integers(-400, 400)))
        text += draw(st.sampled_from("eE"))
        text += ("+" if draw(st.booleans()) else "") if exponent >= 0 else "-"
        text += str(abs(exponent))
    return text


def _exact(text: str) -> int | JsonNumber:
    value = parse_json_exact(text)
    assert isinstance(value, int | JsonNumber), (text, value)
    return value


exact_numbers = number_texts().map(_exact)

leaves = st.one_of(st.none(), st.booleans(), safe_ints, texts, exact_numbers)
json_values = st.recursive(
    leaves,
    lambda children: st.one_of(
        st.lists(children, max_size=4), st.dictionaries(keys, children, max_size=4)
    ),
    max_leaves=25,
)
json_objects = st.dictionaries(keys, json_values, max_size=5)


# ---- helpers ------------------------------------------------------------------------------------


def reordered(value: Any, rng: random.Random) -> Any:
    """The same value with every dict rebuilt in a shuffled key order."""
    if isinstance(value, dict):
        items = list(value.items())
        rng.shuffle(items)
        return {k: reordered(v, rng) for k, v in items}
    if isinstance(value, list):
        return [reordered(v, rng) for v in value]
    return value


def tagged(value: Any) -> Any:
    """A comparable image of a parsed JSON value: numbers as Decimal, booleans kept apart."""
    if value is None or isinstance(value, bool):
        return ("literal", value)
    if isinstance(value, JsonNumber):
        return ("number", Decimal(str.__str__(value)))
    if isinstance(value, int | Decimal):
        return ("number", Decimal(value))
    if isinstance(value, str):
        return ("string", value)
    if isinstance(value, list | tuple):
        return ("array", [tagged(v) for v in value])
    if isinstance(value, dict):
        return ("object", {k: tagged(v) for k, v in value.items()})
    raise AssertionError(f"unexpected {type(value).__name__}")


_WHITESPACE = frozenset(b" \t\n\r")


def outside_strings(data: bytes) -> bytes:
    """The bytes of a JSON text that are not inside string literals (quotes included)."""
    out = bytearray()
    inside = escaped = False
    for byte in data:
        if inside:
            if escaped:
                escaped = False
            elif byte == 0x5C:  # backslash
                escaped = True
            elif byte == 0x22:
                inside = False
        elif byte == 0x22:
            inside = True
        else:
            out.append(byte)
    assert not inside, "unterminated string"
    return bytes(out)


def object_key_orders(data: bytes) -> list[list[str]]:
    """The keys of every object of a JSON text, in the order they are written."""
    seen: list[list[str]] = []

    def hook(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        seen.append([k for k, _ in pairs])
        return dict(pairs)

    json.loads(data, object_pairs_hook=hook)
    return seen


def respelled(value: Any, rng: random.Random) -> str:
    """JSON text of `value` spelled differently: escapes, white space, key order, exponents.

    Every spelling is of the same value *as jsonb stores it*: a number keeps its digits and
    its display scale (12.50 may become 1250e-2 or 0.1250E+2, never 12.5).
    """
    if value is None or isinstance(value, bool):
        return json.dumps(value)
    if isinstance(value, JsonNumber | int):
        return _respell_number(
            str.__str__(value) if isinstance(value, JsonNumber) else str(value), rng
        )
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=rng.random() < 0.5)
    space = rng.choice(["", " ", "\n  ", "\t"])
    if isinstance(value, list):
        inner = f",{space}".join(respelled(v, rng) for v in value)
        return f"[{space}{inner}{space}]"
    assert isinstance(value, dict)
    items = list(value.items())
    rng.shuffle(items)
    inner = f",{space}".join(
        f"{json.dumps(k, ensure_ascii=rng.random() < 0.5)}{space}:{space}{respelled(v, rng)}"
        for k, v in items
    )
    return f"{{{space}{inner}{space}}}"


def _respell_number(text: str, rng: random.Random) -> str:
    sign = "-" if text.startswith("-") else ""
    body = text.removeprefix("-")
    whole, _, fraction = body.partition(".")
    digits = (whole + fraction).lstrip("0") or "0"
    exponent = -len(fraction)  # the value is digits * 10**exponent, with this display scale
    if digits == "0":
        zero_choices = [text, f"{sign}0e{exponent}", f"-0{'.' + fraction if fraction else ''}"]
        return rng.choice(zero_choices)
    point = rng.randrange(0, len(digits) + 1)  # where the decimal point goes in `digits`
    head, tail = digits[:point], digits[point:]
    mantissa = (head or "0") + ("." + tail if tail else "")
    shift = exponent + len(tail)
    letter = rng.choice("eE")
    return f"{sign}{mantissa}{letter}{'+' if shift >= 0 and rng.random() < 0.5 else ''}{shift}"


# ---- properties ---------------------------------------------------------------------------------


@settings(max_examples=300, deadline=None)
@given(json_values, st.randoms(use_true_random=False))
def test_dict_insertion_order_does_not_change_the_bytes(
    value: JsonValue, rng: random.Random
) -> None:
    assert canonical_bytes(reordered(value, rng)) == canonical_bytes(value)


@settings(max_examples=300, deadline=None)
@given(json_values)
def test_parsing_the_bytes_back_gives_the_same_bytes(value: JsonValue) -> None:
    data = canonical_bytes(value)
    again = parse_json_exact(data.decode())
    assert canonical_bytes(again) == data
    # What the exact parser makes needs no refusal walk (verification relies on it).
    assert canonical_bytes_trusted(again) == data
    # The fast parser that verification reads the trail back with agrees, byte for byte.
    assert canonical_bytes_trusted(parse_json_fast(data.decode())) == data
    # And it is a fixed point from then on.
    assert canonical_bytes(parse_json_exact(canonical_bytes(again).decode())) == data


@settings(max_examples=300, deadline=None)
@given(json_values)
def test_the_bytes_are_utf8_json_that_any_parser_reads_as_the_same_value(
    value: JsonValue,
) -> None:
    data = canonical_bytes(value)
    text = data.decode("utf-8", errors="strict")
    parsed = json.loads(text, parse_float=Decimal, parse_int=Decimal)
    assert tagged(parsed) == tagged(value)


_NAMED = {"b": 0x08, "f": 0x0C, "n": 0x0A, "r": 0x0D, "t": 0x09}


def string_escapes(data: bytes) -> list[bytes]:
    """Every escape sequence inside the string literals of a JSON text, and a check that no
    raw control character is written inside a string."""
    escapes: list[bytes] = []
    inside = False
    i = 0
    while i < len(data):
        byte = data[i]
        if not inside:
            inside = byte == 0x22
        elif byte == 0x22:
            inside = False
        elif byte == 0x5C:
            size = 6 if data[i + 1 : i + 2] == b"u" else 2
            escapes.append(data[i : i + size])
            i += size
            continue
        else:
            assert byte >= 0x20, f"raw control character {byte:#x} inside a string"
        i += 1
    return escapes


@settings(max_examples=300, deadline=None)
@given(json_values)
def test_only_quotes_backslashes_and_control_characters_are_escaped(value: JsonValue) -> None:
    for escape in string_escapes(canonical_bytes(value)):
        letter = escape[1:2].decode()
        if letter == "u":
            code = int(escape[2:], 16)
            assert escape[2:] == f"{code:04x}".encode(), escape  # lower-case hex
            assert code < 0x20 and code not in _NAMED.values(), escape  # \n, not \u000a
        else:
            assert letter in '"\\' or letter in _NAMED, escape


@settings(max_examples=300, deadline=None)
@given(json_values)
def test_keys_sorted_by_code_point_and_no_whitespace_outside_strings(value: JsonValue) -> None:
    data = canonical_bytes(value)
    assert not (_WHITESPACE & set(outside_strings(data)))
    for order in object_key_orders(data):
        assert order == sorted(order)  # code point order
        assert [k.encode() for k in order] == sorted(k.encode() for k in order)
        assert len(set(order)) == len(order)


@settings(max_examples=300, deadline=None)
@given(json_values, st.randoms(use_true_random=False))
def test_any_spelling_of_the_same_json_gives_the_same_bytes(
    value: JsonValue, rng: random.Random
) -> None:
    """What a json column printed (escapes, spaces, key order, 1e2 for 100) does not matter."""
    expected = canonical_bytes(value)
    for _ in range(3):
        text = respelled(value, rng)
        assert canonical_bytes(parse_json_exact(text)) == expected, text
        assert canonical_bytes(parse_json_fast(text)) == expected, text


@settings(max_examples=200, deadline=None)
@given(number_texts())
def test_numbers_keep_their_digits_and_scale_exactly(text: str) -> None:
    value = _exact(text)
    data = canonical_bytes(value)
    assert Decimal(data.decode()) == Decimal(text)  # never rounded through a float
    if isinstance(value, int):
        assert -MAX_SAFE_INT <= value <= MAX_SAFE_INT
    else:  # numeric's display scale: as many fraction digits as the input asked for
        expected_scale = max(0, -int(Decimal(text).as_tuple().exponent))
        _, _, fraction = data.decode().partition(".")
        assert len(fraction) == expected_scale
        assert "e" not in data.decode().lower()
    assert canonical_bytes(parse_json_exact(data.decode())) == data


def test_numbers_at_the_safe_integer_limit() -> None:
    assert parse_json_exact(str(MAX_SAFE_INT)) == MAX_SAFE_INT
    assert type(parse_json_exact(str(MAX_SAFE_INT))) is int
    for unsafe in (MAX_SAFE_INT + 1, MAX_SAFE_INT + 2, -MAX_SAFE_INT - 1, 2**64):
        parsed = parse_json_exact(str(unsafe))
        assert isinstance(parsed, JsonNumber)
        assert canonical_bytes([parsed]) == f"[{unsafe}]".encode()
    assert canonical_bytes(parse_json_exact("[1e2, 100, 1E+2, 100e0, 0.1e3]")) == (
        b"[100,100,100,100,100]"
    )
    assert canonical_bytes(parse_json_exact("[2.50, 250e-2, 0.250e1, -0.0, -0e-3]")) == (
        b"[2.50,2.50,2.50,0.0,0.000]"
    )
    tiny = parse_json_exact("1e-40")
    assert canonical_bytes(tiny) == b"0." + b"0" * 39 + b"1"
    huge = parse_json_exact("-12.5E+30")
    assert canonical_bytes(huge) == b"-125" + b"0" * 29


def test_nul_escape_keeps_the_document_as_text() -> None:
    # jsonb cannot store U+0000, so a json value holding one is kept as its text (a string).
    text = '{"a": "x\\u0000y"}'
    assert parse_json_exact(text) == text
    assert canonical_bytes(parse_json_exact(text)) == canonical_bytes(text)


# ---- the chain ----------------------------------------------------------------------------------

EVENT_ID = uuid.UUID("017f22e2-79b0-7cc3-98c4-dc0c0c07398f")


@settings(max_examples=150, deadline=None)
@given(
    row_key=json_objects,
    old=st.one_of(st.none(), json_objects),
    new=st.one_of(st.none(), json_objects),
    context=st.one_of(st.none(), json_objects),
    actor=st.one_of(st.none(), texts),
    reason=st.one_of(st.none(), texts),
    rng=st.randoms(use_true_random=False),
    offset_minutes=st.integers(-14 * 60 + 1, 14 * 60 - 1),
    trusted=st.booleans(),
)
def test_sealing_ignores_the_key_order_payloads_were_built_in(
    row_key: dict[str, JsonValue],
    old: dict[str, JsonValue] | None,
    new: dict[str, JsonValue] | None,
    context: dict[str, JsonValue] | None,
    actor: str | None,
    reason: str | None,
    rng: random.Random,
    offset_minutes: int,
    trusted: bool,
) -> None:
    commit_time = datetime(2024, 5, 1, 12, 0, 0, 250000, tzinfo=UTC)
    changed = None if old is None or new is None else tuple(sorted(set(old) & set(new)))
    draft = DraftEvent(
        stream="user",
        kind="update",
        event_id=EVENT_ID,
        commit_lsn=0x16B374D848,
        commit_time=commit_time,
        xid=731,
        schema_name="public",
        table_name="t",
        row_key=row_key,
        old=old,
        new=new,
        changed=changed,
        actor_id=actor,
        reason=reason,
        context=context,
    )
    twin = dataclasses.replace(
        draft,
        row_key=reordered(row_key, rng),
        old=reordered(old, rng),
        new=reordered(new, rng),
        context=reordered(context, rng),
        # The same instant, seen from another time zone.
        commit_time=commit_time.astimezone(timezone(timedelta(minutes=offset_minutes))),
    )
    first = StreamChain("user").seal(draft)
    second = StreamChain("user", trusted=trusted).seal(twin)
    assert second.payload_hash == first.payload_hash
    assert second.hash == first.hash
    # A chain continued with both gives the same head too.
    chain_a, chain_b = StreamChain("user"), StreamChain("user", trusted=trusted)
    for one, other in ((draft, twin), (twin, draft)):
        assert chain_a.seal(one).hash == chain_b.seal(other).hash
