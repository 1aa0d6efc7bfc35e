"""Canonical JSON: the exact bytes that are hashed into the chain.

Two encodings of the same value must never differ, or a verifier recomputing a hash on another
machine (or another version of this code) would report tampering that did not happen. The
rules, a subset of RFC 8785 (JCS) chosen so that orjson produces them at full speed:

- UTF-8, no insignificant whitespace, object keys sorted by Unicode code point (the same order
  as their UTF-8 bytes). RFC 8785 sorts by UTF-16 code units; the two orders differ only for
  keys that mix characters above U+FFFF with characters in U+E000..U+FFFF.
- Strings escape only ``"``, ``\\`` and the control characters below U+0020: ``\\b \\f \\n
  \\r \\t`` by name, the others as ``\\u00xx`` with lowercase hex. Everything else, including
  U+007F, U+2028 and U+2029, is written as UTF-8. Lone surrogates are refused.
- No floating point at all: a float has no single textual form we want to depend on. Numbers
  are ints within +-(2**53 - 1) (exact in every JSON parser), or `JsonNumber`, whose text is
  written verbatim (for numbers from json/jsonb columns, kept as PostgreSQL printed them).
  Larger integers and PostgreSQL numeric/float values travel as strings.
- Values are None, bool, int, str, JsonNumber, list (or tuple) and dict with keys of exact
  type str; values that are subclasses of str, int, list or dict (such as StrEnum members)
  are written as their plain value.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Final, TypeAlias, cast

import orjson

__all__ = [
    "MAX_DEPTH",
    "MAX_SAFE_INT",
    "JsonNumber",
    "JsonValue",
    "canonical_bytes",
    "canonical_bytes_trusted",
]

MAX_SAFE_INT: Final = 2**53 - 1
"""Largest integer every JSON implementation represents exactly (IEEE 754 double)."""

MAX_DEPTH: Final = 254
"""Deepest nesting of arrays and objects (orjson's limit; deeper input raises TypeError)."""

# RFC 8259 number grammar.
_NUMBER_RE: Final = re.compile(r"-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][-+]?[0-9]+)?")


class JsonNumber(str):
    """A JSON number kept as its exact source text, emitted verbatim by `canonical_bytes`.

    Construction checks the JSON number grammar, so a JsonNumber can never inject anything
    else into the canonical bytes.
    """

    __slots__ = ()

    def __new__(cls, text: str) -> JsonNumber:
        if _NUMBER_RE.fullmatch(text) is None:
            raise ValueError(f"not a JSON number: {text!r}")
        return super().__new__(cls, text)

    def __repr__(self) -> str:
        return f"JsonNumber({str.__repr__(self)})"


JsonValue: TypeAlias = (
    "bool | int | str | JsonNumber | list[JsonValue] | tuple[JsonValue, ...] | "
    "dict[str, JsonValue] | None"
)
"""What `canonical_bytes` accepts. No floats, by design."""

_OPTIONS: Final = (
    orjson.OPT_SORT_KEYS
    # Raises (TypeError) for ints beyond +-(2**53 - 1) instead of writing them.
    | orjson.OPT_STRICT_INTEGER
    # Route str/int/list/dict subclasses to _default, so JsonNumber is not quoted, and
    # datetimes/dataclasses too, so they are refused instead of given orjson's own format.
    | orjson.OPT_PASSTHROUGH_SUBCLASS
    | orjson.OPT_PASSTHROUGH_DATETIME
    | orjson.OPT_PASSTHROUGH_DATACLASS
)

# Exact types that need no checking below them; float is absent on purpose.
_LEAVES: Final = frozenset({str, int, bool, type(None), JsonNumber})


def _default(obj: object) -> object:
    """orjson's hook for everything it does not encode natively under _OPTIONS."""
    if isinstance(obj, JsonNumber):
        return orjson.Fragment(obj.encode())
    if isinstance(obj, str):
        return str.__str__(obj)
    if isinstance(obj, int):
        return int.__index__(obj)
    if isinstance(obj, list | tuple):
        return list(obj)
    if isinstance(obj, dict):
        return dict(obj)
    raise TypeError(f"not allowed in canonical JSON: {type(obj).__name__}")


def _check(value: object, depth: int) -> None:
    """Refuse what orjson would encode but canonical JSON must not contain.

    orjson writes floats, UUIDs, enums and Fragments natively and has no option to refuse
    them, so walk the containers first. `depth` counts the containers around `value`, itself
    included. This costs about as much as orjson itself, so the common case stays lean: exact
    dict/list/tuple, leaves of the plain types skipped without a call.
    """
    kind = type(value)
    if kind is dict:
        members: Iterable[object] = cast("dict[str, object]", value).values()
    elif kind is list or kind is tuple:
        members = cast("Iterable[object]", value)
    else:
        _check_unusual(value, depth)
        return
    if depth > MAX_DEPTH:
        raise TypeError(f"canonical JSON nests at most {MAX_DEPTH} arrays and objects")
    leaves = _LEAVES
    for item in members:
        if type(item) not in leaves:
            _check(item, depth + 1)


def _check_unusual(value: object, depth: int) -> None:
    """The slow path of _check: subclasses of the allowed types, and refusals."""
    members: Iterable[object]
    if isinstance(value, dict):
        members = value.values()
    elif isinstance(value, list | tuple):
        members = value
    elif value is None or isinstance(value, str | int):
        return
    else:
        raise TypeError(f"not allowed in canonical JSON: {type(value).__name__}")
    if depth > MAX_DEPTH:
        raise TypeError(f"canonical JSON nests at most {MAX_DEPTH} arrays and objects")
    for item in members:
        _check(item, depth + 1)


def canonical_bytes(value: JsonValue) -> bytes:
    """Encode `value` as canonical JSON (see the module docstring for the rules).

    Raises TypeError for a float, an int outside +-(2**53 - 1), a non-str key, a lone
    surrogate, nesting deeper than `MAX_DEPTH`, or any type outside `JsonValue`.
    """
    _check(value, 1)
    return orjson.dumps(value, default=_default, option=_OPTIONS)


def canonical_bytes_trusted(value: JsonValue) -> bytes:
    """`canonical_bytes` without the walk that refuses what is not allowed.

    For values whose types are guaranteed by how they were made (the value converters, the
    exact JSON parser, the chain's own header fields) or that were just encoded whole by
    `canonical_bytes`: the walk costs as much as the encoding itself, on every event.
    orjson still refuses integers beyond +-(2**53 - 1) and non-str keys.
    """
    return orjson.dumps(value, default=_default, option=_OPTIONS)
