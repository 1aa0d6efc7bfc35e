"""The column policy: exclude, redact, changed, TOAST fill, row keys."""

from __future__ import annotations

import hashlib
import hmac

import pytest

from cdc_audit.canonical import JsonNumber, JsonValue, canonical_bytes
from cdc_audit.columns import HASH_PREFIX, MASK, RowShaper
from cdc_audit.pgoutput import UNCHANGED, Column, Relation, TupleValue
from cdc_audit.policy import TablePolicy

KEY = b"redaction secret"

INT4, TEXT, TIMESTAMPTZ, JSONB = 23, 25, 1184, 3802

RELATION = Relation(
    oid=16384,
    namespace="public",
    name="accounts",
    replica_identity="d",
    columns=(
        Column(1, "id", INT4, -1),
        Column(0, "email", TEXT, -1),
        Column(0, "ssn", TEXT, -1),
        Column(0, "updated_at", TIMESTAMPTZ, -1),
        Column(0, "doc", JSONB, -1),
        Column(0, "note", TEXT, -1),
    ),
)
# REPLICA IDENTITY FULL flags every column as part of the key.
RELATION_FULL = Relation(
    16384,
    "public",
    "accounts",
    "f",
    tuple(Column(1, c.name, c.type_oid, c.typmod) for c in RELATION.columns),
)


def policy(**overrides: object) -> TablePolicy:
    fields: dict[str, object] = {
        "table": "public.accounts",
        "stream": "user",
        "exclude": ["updated_at"],
        "redact": {"email": "hash", "ssn": "mask"},
    }
    fields.update(overrides)
    return TablePolicy.model_validate(fields)


def token(value: JsonValue) -> str:
    mac = hmac.new(KEY, canonical_bytes(value), hashlib.sha256)
    return HASH_PREFIX + mac.hexdigest()


def row(
    id: TupleValue = "1",
    email: TupleValue = "a@example.com",
    ssn: TupleValue = "123-45-6789",
    updated_at: TupleValue = "2024-05-01 12:00:00+00",
    doc: TupleValue = '{"n": 2.50}',
    note: TupleValue = "hello",
) -> list[TupleValue]:
    return [id, email, ssn, updated_at, doc, note]


def full_shaper(**overrides: object) -> RowShaper:
    return RowShaper(RELATION_FULL, policy(**overrides), KEY, key_columns=["id"])


# ---- insert: conversion, exclusion, redaction --------------------------------------------------


def test_insert_converts_excludes_and_redacts() -> None:
    shaped = RowShaper(RELATION, policy(), KEY).insert(row())
    assert shaped.new == {
        "id": 1,
        "email": token("a@example.com"),
        "ssn": MASK,
        "doc": {"n": JsonNumber("2.50")},
        "note": "hello",
    }
    assert "updated_at" not in (shaped.new or {})
    assert canonical_bytes(shaped.new)  # storable as canonical JSON
    assert shaped.old is None
    assert shaped.changed is None
    assert shaped.row_key == {"id": 1}


def test_redaction_keeps_null_as_null() -> None:
    shaped = RowShaper(RELATION, policy(), KEY).insert(row(email=None, ssn=None))
    assert shaped.new is not None
    assert shaped.new["email"] is None
    assert shaped.new["ssn"] is None


def test_equal_values_give_equal_tokens_and_the_key_matters() -> None:
    shaper = RowShaper(RELATION, policy(), KEY)
    a = shaper.insert(row(id="1")).new
    b = shaper.insert(row(id="2")).new
    c = shaper.insert(row(email="b@example.com")).new
    other = RowShaper(RELATION, policy(), b"another key").insert(row()).new
    assert a and b and c and other
    assert a["email"] == b["email"]
    assert a["email"] != c["email"]
    assert a["email"] != other["email"]
    assert "a@example.com" not in str(a)


def test_hash_tokens_are_of_the_converted_value() -> None:
    rel = Relation(1, "public", "t", "d", (Column(1, "id", INT4, -1),))
    shaped = RowShaper(rel, policy(table="public.t", exclude=[], redact={"id": "hash"}), KEY)
    assert shaped.insert(["42"]).new == {"id": token(42)}
    assert token(42) != token("42")


def test_hash_redaction_needs_a_key() -> None:
    with pytest.raises(ValueError, match="redaction key"):
        RowShaper(RELATION, policy(), None)
    RowShaper(RELATION, policy(redact={"ssn": "mask"}), None)  # masking needs none


def test_policy_columns_the_table_lacks_are_ignored() -> None:
    shaped = RowShaper(RELATION, policy(exclude=["gone"], redact={"gone2": "mask"}), KEY)
    assert shaped.insert(row()).new == {
        "id": 1,
        "email": "a@example.com",
        "ssn": "123-45-6789",
        "updated_at": "2024-05-01T12:00:00+00:00",
        "doc": {"n": JsonNumber("2.50")},
        "note": "hello",
    }


# ---- row keys ----------------------------------------------------------------------------------


def test_row_key_follows_key_flags_or_the_override() -> None:
    assert RowShaper(RELATION, policy(), KEY).insert(row()).row_key == {"id": 1}
    # Under FULL every column is flagged: the catalog's primary key is passed instead.
    assert full_shaper().insert(row()).row_key == {"id": 1}
    both = RowShaper(RELATION_FULL, policy(), KEY, key_columns=["id", "note", "missing"])
    assert both.insert(row()).row_key == {"id": 1, "note": "hello"}


def test_row_key_never_leaks_redacted_or_excluded_values() -> None:
    shaper = RowShaper(RELATION_FULL, policy(), KEY, key_columns=["email", "ssn", "updated_at"])
    assert shaper.insert(row()).row_key == {"email": token("a@example.com"), "ssn": MASK}


def test_no_key_columns_means_no_row_key() -> None:
    rel = Relation(1, "public", "t", "n", (Column(0, "a", TEXT, -1),))
    shaper = RowShaper(rel, policy(table="public.t", exclude=[], redact={}), KEY)
    assert shaper.insert(["x"]).row_key is None


# ---- updates -----------------------------------------------------------------------------------


def test_changed_lists_stored_columns_that_differ_sorted() -> None:
    shaped = full_shaper().update(
        "O", row(), row(note="bye", email="b@example.com", updated_at="2024-05-02 00:00:00+00")
    )
    assert shaped.changed == ("email", "note")
    assert shaped.old is not None and shaped.new is not None
    assert shaped.old["note"] == "hello"
    assert shaped.new["note"] == "bye"
    assert shaped.new["email"] == token("b@example.com")
    assert not shaped.only_excluded


def test_null_transitions_count_as_changes() -> None:
    shaped = full_shaper().update("O", row(note=None), row(doc=None))
    assert shaped.changed == ("doc", "note")
    assert shaped.new is not None
    assert shaped.new["doc"] is None
    assert shaped.new["note"] == "hello"


def test_update_of_only_excluded_columns_is_reported() -> None:
    shaped = full_shaper().update("O", row(), row(updated_at="2024-06-01 00:00:00+00"))
    assert shaped.changed == ()
    assert shaped.only_excluded


def test_update_that_changes_nothing_is_not_an_excluded_only_update() -> None:
    shaped = full_shaper().update("O", row(), row())
    assert shaped.changed == ()
    assert not shaped.only_excluded


def test_unchanged_toast_is_filled_from_the_full_old_row() -> None:
    big = "x" * 10_000
    shaped = full_shaper().update("O", row(note=big), row(note=UNCHANGED, ssn="000"))
    assert shaped.new is not None
    assert shaped.new["note"] == big
    assert shaped.changed == ("ssn",)
    assert shaped.unchanged_toast == frozenset()


def test_unchanged_toast_without_old_row_is_left_out_and_named() -> None:
    shaped = RowShaper(RELATION, policy(), KEY).update(None, None, row(note=UNCHANGED))
    assert shaped.new is not None
    assert "note" not in shaped.new
    assert shaped.unchanged_toast == frozenset({"note"})
    assert shaped.changed is None  # unknown without the old row
    assert shaped.old is None


def test_unchanged_excluded_column_is_not_named() -> None:
    shaped = RowShaper(RELATION, policy(), KEY).update(None, None, row(updated_at=UNCHANGED))
    assert shaped.unchanged_toast == frozenset()


def test_key_change_without_full_identity_keeps_only_the_old_key() -> None:
    old: list[TupleValue] = ["1", None, None, None, None, None]
    shaped = RowShaper(RELATION, policy(), KEY).update("K", old, row(id="2"))
    assert shaped.old == {"id": 1}
    assert shaped.row_key == {"id": 2}
    assert shaped.changed is None


def test_old_values_key_stores_only_the_key_of_the_old_row() -> None:
    shaped = full_shaper(old_values="key").update("O", row(), row(note="bye"))
    assert shaped.old == {"id": 1}
    assert shaped.changed == ("note",)


# ---- deletes -----------------------------------------------------------------------------------


def test_delete_with_full_old_row() -> None:
    shaped = full_shaper().delete("O", row())
    assert shaped.old is not None and shaped.old["ssn"] == MASK
    assert shaped.new is None
    assert shaped.row_key == {"id": 1}


def test_delete_with_key_only_does_not_store_fake_nulls() -> None:
    shaped = RowShaper(RELATION, policy(), KEY).delete("K", ["7", None, None, None, None, None])
    assert shaped.old == {"id": 7}
    assert shaped.row_key == {"id": 7}


def test_delete_under_old_values_key() -> None:
    assert full_shaper(old_values="key").delete("O", row()).old == {"id": 1}
