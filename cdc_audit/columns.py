"""The column policy of one audited table, applied to decoded tuples.

A `RowShaper` is built once per Relation message (the shape of the table as the server sent
it) and then turns each tuple of text values into the objects stored in the trail:

- values are converted to canonical JSON values by their type (`values.converter_for`);
- `exclude` columns are never stored, nor listed in `changed`, nor part of `row_key`;
- `redact: hash` stores ``"hmac-sha256:" + hex(HMAC-SHA256(key, canonical_bytes(value)))``,
  so equal values give equal tokens (history and joins still work) without revealing them;
  `redact: mask` stores ``"***"``; NULL stays null either way (its absence is no secret);
- `row_key` holds the key columns after the same exclusion and redaction, so it never leaks
  what `old`/`new` hide;
- an unchanged TOAST value (`UNCHANGED`) in a new tuple is filled from the old tuple when the
  server sent the whole old row (REPLICA IDENTITY FULL); otherwise the column is left out of
  `new` and named in `unchanged_toast` rather than stored as a placeholder.

`changed` compares the text the server sent, before conversion: equal text is an equal value
for every type, and comparing strings is cheaper than converting both sides. It is known only
when the whole old row is available; without one (REPLICA IDENTITY DEFAULT) it is None.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Final, Literal

from cdc_audit.canonical import JsonValue, canonical_bytes
from cdc_audit.pgoutput import UNCHANGED, Relation, TupleValue
from cdc_audit.policy import TablePolicy
from cdc_audit.records import record
from cdc_audit.values import converter_for

__all__ = ["HASH_PREFIX", "MASK", "RowShaper", "ShapedChange"]

HASH_PREFIX: Final = "hmac-sha256:"
MASK: Final = "***"

JsonObject = dict[str, JsonValue]
_Transform = Callable[[str], JsonValue]


@record
class ShapedChange:
    """One row change after the column policy.

    `only_excluded` is true for an update whose only differences are in excluded columns:
    nothing stored would show it, so the caller drops it.
    """

    row_key: JsonObject | None
    old: JsonObject | None
    new: JsonObject | None
    changed: tuple[str, ...] | None = None
    unchanged_toast: frozenset[str] = field(default_factory=frozenset)
    only_excluded: bool = False


@dataclass(frozen=True, slots=True)
class _Kept:
    """A stored column: its position in the tuple, name and text -> stored value function."""

    index: int
    name: str
    transform: _Transform


class RowShaper:
    """Applies a TablePolicy to the tuples of one Relation shape.

    `redaction_key` is the secret for `hash` redaction (required only when the policy hashes
    a column). `key_columns` overrides the relation's key flags, which under REPLICA
    IDENTITY FULL mark every column: pass the primary key from the catalog. Key columns the
    relation does not have are ignored.
    """

    __slots__ = ("_excluded", "_kept", "_key_names", "_old_values", "relation")

    def __init__(
        self,
        relation: Relation,
        policy: TablePolicy,
        redaction_key: bytes | None = None,
        key_columns: Sequence[str] | None = None,
    ) -> None:
        self.relation = relation
        self._old_values: Literal["full", "key"] = policy.old_values
        excluded = set(policy.exclude)
        hasher = _hasher(redaction_key, policy)
        self._kept = tuple(
            _Kept(i, c.name, _transform(c.type_oid, policy.redact.get(c.name), hasher))
            for i, c in enumerate(relation.columns)
            if c.name not in excluded
        )
        self._excluded = tuple(i for i, c in enumerate(relation.columns) if c.name in excluded)
        names = relation.column_names
        wanted = (
            [c.name for c in relation.columns if c.is_key]
            if key_columns is None
            else [k for k in key_columns if k in names]
        )
        self._key_names = tuple(k for k in wanted if k not in excluded)

    # ---- the three kinds of change

    def insert(self, new: Sequence[TupleValue]) -> ShapedChange:
        """Shape an inserted row."""
        row, unchanged = self._shape(new)
        return ShapedChange(self._row_key(row), None, row, None, unchanged)

    def delete(self, old_kind: str, old: Sequence[TupleValue]) -> ShapedChange:
        """Shape a deleted row; `old_kind` 'K' means only the key columns were sent."""
        row, unchanged = self._shape(old)
        key = self._row_key(row)
        return ShapedChange(key, self._old_row(old_kind, row, key), None, None, unchanged)

    def update(
        self,
        old_kind: str | None,
        old: Sequence[TupleValue] | None,
        new: Sequence[TupleValue],
    ) -> ShapedChange:
        """Shape an update; `old` is the whole row ('O'), the key ('K') or absent (None)."""
        if old_kind != "O" or old is None:
            return self._update_without_old_row(old_kind, old, new)
        old_row, _ = self._shape(old)
        new_row: JsonObject = {}
        changed: list[str] = []
        missing: list[str] = []
        for kept in self._kept:
            before, after = old[kept.index], new[kept.index]
            if after is UNCHANGED:
                after = before  # REPLICA IDENTITY FULL: the old row has the value
            if after is UNCHANGED:
                missing.append(kept.name)
                continue
            if after == before:
                new_row[kept.name] = old_row[kept.name]
                continue
            changed.append(kept.name)
            new_row[kept.name] = None if after is None else kept.transform(after)
        only_excluded = not changed and self._excluded_changed(old, new)
        old_stored = old_row if self._old_values == "full" else self._key_only(old_row)
        return ShapedChange(
            self._row_key(new_row),
            old_stored,
            new_row,
            tuple(sorted(changed)),
            frozenset(missing),
            only_excluded,
        )

    # ---- helpers

    def _update_without_old_row(
        self, old_kind: str | None, old: Sequence[TupleValue] | None, new: Sequence[TupleValue]
    ) -> ShapedChange:
        # Without the whole old row nothing can say which columns changed, and an unchanged
        # TOAST value has nowhere to be filled from.
        new_row, unchanged = self._shape(new)
        old_row: JsonObject | None = None
        if old is not None:
            shaped_old, _ = self._shape(old)
            old_row = self._key_only(shaped_old)
        return ShapedChange(self._row_key(new_row), old_row, new_row, None, unchanged)

    def _shape(self, values: Sequence[TupleValue]) -> tuple[JsonObject, frozenset[str]]:
        row: JsonObject = {}
        unchanged: list[str] = []
        for kept in self._kept:
            value = values[kept.index]
            if value is None:
                row[kept.name] = None
            elif value is UNCHANGED:
                unchanged.append(kept.name)
            else:
                row[kept.name] = kept.transform(value)
        return row, frozenset(unchanged)

    def _row_key(self, row: JsonObject) -> JsonObject | None:
        if not self._key_names:
            return None
        return {name: row[name] for name in self._key_names if name in row}

    def _key_only(self, row: JsonObject) -> JsonObject:
        return {name: row[name] for name in self._key_names if name in row}

    def _old_row(self, old_kind: str, row: JsonObject, key: JsonObject | None) -> JsonObject:
        # 'K' sends NULL for every non-key column: those nulls are not the row's values.
        if old_kind == "K" or self._old_values == "key":
            return dict(key or {})
        return row

    def _excluded_changed(self, old: Sequence[TupleValue], new: Sequence[TupleValue]) -> bool:
        return any(new[i] is not UNCHANGED and new[i] != old[i] for i in self._excluded)


def _hasher(key: bytes | None, policy: TablePolicy) -> hmac.HMAC | None:
    if "hash" not in policy.redact.values():
        return None
    if not key:
        raise ValueError(f"{policy.table}: hash redaction needs a non-empty redaction key")
    # Keyed once; each value copies the keyed state instead of re-deriving the key pads.
    return hmac.new(key, digestmod=hashlib.sha256)


def _transform(type_oid: int, redact: str | None, hasher: hmac.HMAC | None) -> _Transform:
    convert = converter_for(type_oid)
    if redact == "mask":
        return lambda _text: MASK
    if redact == "hash":
        if hasher is None:  # _hasher returns one whenever a column is hashed
            raise AssertionError("hash redaction without a hasher")
        keyed = hasher

        def token(text: str) -> JsonValue:
            mac = keyed.copy()
            mac.update(canonical_bytes(convert(text)))
            return HASH_PREFIX + mac.hexdigest()

        return token
    return convert
