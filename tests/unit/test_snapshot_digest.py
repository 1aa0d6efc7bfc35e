"""The snapshot digest's algebra, and reading txid snapshots and 32-bit xids."""

from __future__ import annotations

import hashlib
import random
from datetime import UTC, datetime

import pytest

from cdc_audit.canonical import JsonNumber, JsonValue, canonical_bytes
from cdc_audit.snapshot import (
    DIGEST_BITS,
    ROW_DOMAIN,
    Digest,
    Snapshot,
    TxidSnapshot,
    row_hash,
    widen_xid,
)

ROWS: list[dict[str, JsonValue]] = [
    {"id": i, "owner": f"o{i}", "balance": JsonNumber(f"{i}.50"), "tags": ["a", None]}
    for i in range(50)
]


def digest_of(rows: list[dict[str, JsonValue]]) -> Digest:
    digest = Digest()
    for row in rows:
        digest.add(row)
    return digest


def test_the_row_hash_is_the_documented_definition() -> None:
    row: dict[str, JsonValue] = {"b": "x", "a": 1, "n": None}
    assert canonical_bytes(row) == b'{"a":1,"b":"x","n":null}'
    expected = hashlib.shake_256(b"cdc-audit row v1\x00" + b'{"a":1,"b":"x","n":null}').digest(256)
    assert ROW_DOMAIN == b"cdc-audit row v1\x00"
    assert row_hash(row) == int.from_bytes(expected, "big")
    assert row_hash(row) < 2**DIGEST_BITS


def test_the_digest_does_not_depend_on_row_order() -> None:
    shuffled = ROWS[:]
    random.Random(7).shuffle(shuffled)
    assert digest_of(ROWS).hex == digest_of(shuffled).hex
    assert digest_of(ROWS).count == 50


def test_key_order_inside_a_row_does_not_matter_but_values_do() -> None:
    assert row_hash({"a": 1, "b": 2}) == row_hash({"b": 2, "a": 1})
    assert row_hash({"a": 1}) != row_hash({"a": "1"})
    assert row_hash({"a": JsonNumber("2.50")}) != row_hash({"a": JsonNumber("2.5")})


def test_removing_a_row_undoes_adding_it_in_any_order() -> None:
    digest = digest_of(ROWS)
    digest.remove(ROWS[10])
    digest.remove(ROWS[3])
    rest = [r for i, r in enumerate(ROWS) if i not in (3, 10)]
    assert digest.same_as(digest_of(rest))
    # An update is a removal and an addition; replaying in another order lands the same.
    updated = {**ROWS[0], "owner": "changed"}
    one = digest_of(ROWS)
    one.remove(ROWS[0])
    one.add(updated)
    two = Digest()
    two.add(updated)
    for row in ROWS[1:]:
        two.add(row)
    assert one.same_as(two)


def test_subtracting_below_zero_wraps_and_comes_back() -> None:
    digest = Digest()
    digest.remove(ROWS[0])
    assert digest.count == -1 and len(digest.hex) == 512
    digest.add(ROWS[0])
    assert digest.hex == "0" * 512 and digest.count == 0


def test_truncate_resets_to_the_empty_table() -> None:
    digest = digest_of(ROWS)
    digest.reset()
    assert digest.same_as(Digest()) and digest.hex == "0" * 512
    digest.add(ROWS[5])
    assert digest.same_as(digest_of([ROWS[5]]))


def test_the_hex_form_round_trips_and_is_checked() -> None:
    digest = digest_of(ROWS)
    text = digest.hex
    assert len(text) == 512 and text == text.lower()
    assert Digest.from_hex(text, 50).same_as(digest)
    assert not Digest.from_hex(text, 49).same_as(digest)
    with pytest.raises(ValueError, match="512"):
        Digest.from_hex(text[:-1], 50)
    with pytest.raises(ValueError):
        Digest.from_hex(text.upper(), 50)


@pytest.mark.parametrize(
    ("xid", "reference", "full"),
    [
        (100, 120, 100),
        (130, 120, 130),
        (5, (7 << 32) + 10, (7 << 32) + 5),
        # Wraparound: an xid from just before the epoch turned, seen from just after it...
        (2**32 - 3, (1 << 32) + 5, (1 << 32) - 3),
        # ...and one from just after it, seen from just before.
        (3, (1 << 32) - 2, (1 << 32) + 3),
        (2**31, 0 + 2**31, 2**31),
    ],
)
def test_a_32_bit_xid_widens_to_the_nearest_full_xid(xid: int, reference: int, full: int) -> None:
    assert widen_xid(xid, reference) == full


def test_widening_refuses_what_is_not_a_32_bit_xid() -> None:
    with pytest.raises(ValueError):
        widen_xid(2**32, 100)
    with pytest.raises(ValueError):
        widen_xid(-1, 100)


def test_visibility_in_a_txid_snapshot() -> None:
    snap = TxidSnapshot.parse("10:20:12,15")
    assert snap == TxidSnapshot(10, 20, frozenset({12, 15}))
    assert snap.visible(9)
    assert not snap.visible(12) and not snap.visible(15)
    assert snap.visible(13) and snap.visible(19)
    assert not snap.visible(20) and not snap.visible(25)
    assert TxidSnapshot.parse("725:725:") == TxidSnapshot(725, 725)
    assert not TxidSnapshot.parse("725:725:").visible(725)


def test_visibility_of_32_bit_xids_across_an_epoch() -> None:
    epoch = 3 << 32
    snap = TxidSnapshot.parse(f"{epoch + 2}:{epoch + 9}:{epoch + 4}")
    assert snap.visible_xid(2**32 - 1)  # epoch 2's last xid: long committed
    assert snap.visible_xid(3)
    assert not snap.visible_xid(4)  # in progress then
    assert not snap.visible_xid(9)


@pytest.mark.parametrize("text", ["", "1:2", "a:b:", "5:3:", "10:20:25", "10:20:5", "0:0:"])
def test_malformed_txid_snapshots_are_refused(text: str) -> None:
    with pytest.raises(ValueError, match="txid snapshot"):
        TxidSnapshot.parse(text)


def test_the_signed_statement_has_exactly_the_documented_fields() -> None:
    snap = Snapshot(
        schema_name="public",
        table_name="accounts",
        taken_at=datetime(2025, 1, 2, 3, 4, 5, 600, tzinfo=UTC),
        lsn_before="0/16B3748",
        lsn_after="0/16B3800",
        txid_snapshot="740:742:740",
        row_count=3,
        digest="0" * 512,
        key_id="ab" * 16,
    )
    statement = snap.statement()
    assert set(statement) == {
        "type",
        "version",
        "schema_name",
        "table_name",
        "taken_at",
        "lsn_before",
        "lsn_after",
        "txid_snapshot",
        "row_count",
        "digest",
        "key_id",
    }
    assert statement["type"] == "snapshot" and statement["version"] == 1
    assert statement["taken_at"] == "2025-01-02T03:04:05.000600+00:00"
    assert snap.statement_bytes() == canonical_bytes(statement)
