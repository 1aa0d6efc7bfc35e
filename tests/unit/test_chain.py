"""The hash chain spec (fixed vectors), tamper evidence, UUIDv7 and RFC 6962 Merkle roots."""

from __future__ import annotations

import dataclasses
import hashlib
import os
import uuid
from datetime import UTC, datetime, timedelta, timezone

import pytest

from cdc_audit.canonical import JsonValue
from cdc_audit.chain import (
    GENESIS,
    BufferedRandomBits,
    DraftEvent,
    SealedEvent,
    StreamChain,
    Uuid7Generator,
    chain_hash,
    format_commit_time,
    header_bytes,
    payload_bytes,
    uuid7,
)

# ---- fixed vectors: the spec a verifier in another language must reproduce -------------------

DRAFT_1 = DraftEvent(
    stream="user",
    kind="update",
    event_id=uuid.UUID("017f22e2-79b0-7cc3-98c4-dc0c0c07398f"),
    commit_lsn=0x16B374D848,
    commit_time=datetime(2024, 5, 1, 12, 0, 0, 250000, tzinfo=UTC),
    xid=731,
    schema_name="public",
    table_name="accounts",
    row_key={"id": 42},
    old={"id": 42, "balance": "100.50"},
    new={"id": 42, "balance": "90.50"},
    changed=("balance",),
    actor_id="u42",
    reason="ticket 7",
    context={"db": {"session_user": "app"}, "missing": []},
)
DRAFT_2 = DraftEvent(
    stream="user",
    kind="app",
    event_id=uuid.UUID("017f22e2-79b1-7000-8000-000000000001"),
    commit_lsn=None,
    commit_time=datetime(2024, 5, 1, 12, 0, 1, tzinfo=UTC),
    xid=None,
    new={"action": "auth.login.failed", "outcome": "failure"},
    context_missing=True,
)

PAYLOAD_1 = (
    b'{"actor_id":"u42","changed":["balance"],"context":{"db":{"session_user":"app"},'
    b'"missing":[]},"new":{"balance":"90.50","id":42},"old":{"balance":"100.50","id":42},'
    b'"reason":"ticket 7","row_key":{"id":42}}'
)
PAYLOAD_HASH_1 = "24a4cb6a829ac5ea4069784dc7ba7e63a2a41bbbf74ff8579260b3db67469c61"
HEADER_1 = (
    b'{"commit_lsn":"16/B374D848","commit_time":"2024-05-01T12:00:00.250000+00:00",'
    b'"context_missing":false,"event_id":"017f22e2-79b0-7cc3-98c4-dc0c0c07398f",'
    b'"kind":"update","payload_hash":"'
    + PAYLOAD_HASH_1.encode()
    + b'","schema_name":"public","seq":1,"stream":"user","table_name":"accounts","xid":731}'
)
HASH_1 = "336117eee62ed2c53c5352be1a66cd4a98034412b4aeba9cedd8589d218c3152"

PAYLOAD_2 = (
    b'{"actor_id":null,"changed":null,"context":null,'
    b'"new":{"action":"auth.login.failed","outcome":"failure"},'
    b'"old":null,"reason":null,"row_key":null}'
)
PAYLOAD_HASH_2 = "4ff886f2c8e8f90e197da57932fd6a24d51b883254f7a14790d81eb8440cb2c6"
HEADER_2 = (
    b'{"commit_lsn":null,"commit_time":"2024-05-01T12:00:01+00:00","context_missing":true,'
    b'"event_id":"017f22e2-79b1-7000-8000-000000000001","kind":"app","payload_hash":"'
    + PAYLOAD_HASH_2.encode()
    + b'","schema_name":null,"seq":2,"stream":"user","table_name":null,"xid":null}'
)
HASH_2 = "134fd8b7d7cbdaff671ee87539ad7e697157211dd4cd8e65d7962a91af7adbda"


def _seal_both() -> tuple[SealedEvent, SealedEvent]:
    chain = StreamChain("user")
    return chain.seal(DRAFT_1), chain.seal(DRAFT_2)


def test_first_event_matches_the_fixed_vector() -> None:
    first, _ = _seal_both()
    assert payload_bytes(DRAFT_1.payload()) == PAYLOAD_1
    assert first.payload_hash.hex() == PAYLOAD_HASH_1
    assert header_bytes(first.header()) == HEADER_1
    assert first.seq == 1
    assert first.prev_hash == GENESIS == bytes(32)
    assert first.hash.hex() == HASH_1


def test_second_event_links_to_the_first() -> None:
    first, second = _seal_both()
    assert payload_bytes(DRAFT_2.payload()) == PAYLOAD_2
    assert second.payload_hash.hex() == PAYLOAD_HASH_2
    assert header_bytes(second.header()) == HEADER_2
    assert second.seq == 2
    assert second.prev_hash == first.hash
    assert second.hash.hex() == HASH_2


def test_vectors_follow_the_written_formula() -> None:
    """hash = SHA-256(prev_hash || header), payload_hash = SHA-256(payload): no hidden input."""
    assert hashlib.sha256(PAYLOAD_1).hexdigest() == PAYLOAD_HASH_1
    assert hashlib.sha256(bytes(32) + HEADER_1).hexdigest() == HASH_1
    assert hashlib.sha256(bytes.fromhex(HASH_1) + HEADER_2).hexdigest() == HASH_2


# ---- tamper evidence ---------------------------------------------------------------------------

HEADER_CHANGES: dict[str, JsonValue] = {
    "stream": "admin",
    "seq": 2,
    "event_id": "017f22e2-79b0-7cc3-98c4-dc0c0c07398e",
    "commit_lsn": "16/B374D849",
    "commit_time": "2024-05-01T12:00:00.250001+00:00",
    "xid": 732,
    "kind": "delete",
    "schema_name": "private",
    "table_name": "account",
    "context_missing": True,
    "payload_hash": "00" * 32,
}


@pytest.mark.parametrize("field", sorted(HEADER_CHANGES))
def test_changing_any_header_field_changes_the_hash(field: str) -> None:
    first, _ = _seal_both()
    header = first.header()
    assert chain_hash(GENESIS, header) == first.hash
    header[field] = HEADER_CHANGES[field]
    assert chain_hash(GENESIS, header) != first.hash


def test_header_has_exactly_the_specified_fields() -> None:
    first, _ = _seal_both()
    assert set(first.header()) == set(HEADER_CHANGES)


PAYLOAD_CHANGES: dict[str, JsonValue] = {
    "row_key": {"id": 43},
    "old": {"id": 42, "balance": "100.51"},
    "new": None,
    "changed": ["balance", "id"],
    "context": {"db": {"session_user": "admin"}, "missing": []},
    "actor_id": "u43",
    "reason": "ticket 8",
}


@pytest.mark.parametrize("field", sorted(PAYLOAD_CHANGES))
def test_changing_any_payload_field_breaks_its_digest(field: str) -> None:
    first, _ = _seal_both()
    payload = DRAFT_1.payload()
    assert hashlib.sha256(payload_bytes(payload)).digest() == first.payload_hash
    payload[field] = PAYLOAD_CHANGES[field]
    assert hashlib.sha256(payload_bytes(payload)).digest() != first.payload_hash


def test_changing_a_payload_with_its_digest_breaks_the_chain() -> None:
    first, _ = _seal_both()
    forged = dataclasses.replace(DRAFT_1, actor_id="someone else")
    forged_header = first.header()
    forged_header["payload_hash"] = hashlib.sha256(payload_bytes(forged.payload())).hexdigest()
    assert chain_hash(GENESIS, forged_header) != first.hash


def test_an_erased_payload_keeps_the_chain_verifiable() -> None:
    chain = StreamChain("user")
    sealed = [
        chain.seal(dataclasses.replace(DRAFT_1, actor_id=f"u{i}", event_id=uuid.uuid4()))
        for i in range(5)
    ]
    # A verifier holding only headers (payloads erased) still walks the whole chain.
    prev = GENESIS
    for event in sealed:
        assert chain_hash(prev, event.header()) == event.hash
        prev = event.hash
    assert prev == chain.head


def test_reordering_events_breaks_the_chain() -> None:
    first, second = _seal_both()
    assert chain_hash(GENESIS, second.header()) != second.hash
    assert chain_hash(second.hash, first.header()) != first.hash


# ---- StreamChain -------------------------------------------------------------------------------


def test_resumed_chain_continues_identically() -> None:
    first, second = _seal_both()
    resumed = StreamChain("user", next_seq=2, head=first.hash)
    assert resumed.seal(DRAFT_2) == second


def test_draft_for_another_stream_is_refused_without_using_a_seq() -> None:
    chain = StreamChain("user")
    with pytest.raises(ValueError, match="admin"):
        chain.seal(dataclasses.replace(DRAFT_1, stream="admin"))
    assert chain.seal(DRAFT_1).seq == 1


def test_bad_resume_points_are_refused() -> None:
    with pytest.raises(ValueError):
        StreamChain("user", next_seq=0)
    with pytest.raises(ValueError):
        StreamChain("user", next_seq=5, head=b"short")
    with pytest.raises(ValueError):
        StreamChain("user", next_seq=1, head=b"\x01" * 32)


def test_sealing_uses_the_same_header_as_the_spec_helpers() -> None:
    chain = StreamChain("user")
    for event in (
        chain.seal(DRAFT_1),
        chain.seal(dataclasses.replace(DRAFT_1, commit_lsn=None, xid=None)),
        chain.seal(DRAFT_2),
    ):
        assert chain_hash(event.prev_hash, event.header()) == event.hash


def test_commit_time_is_written_in_utc() -> None:
    tz = timezone(timedelta(hours=2))
    assert format_commit_time(datetime(2024, 5, 1, 14, 0, tzinfo=tz)) == "2024-05-01T12:00:00+00:00"
    assert format_commit_time(datetime(2024, 5, 1, 12, 0, 0, 5, tzinfo=UTC)) == (
        "2024-05-01T12:00:00.000005+00:00"
    )
    with pytest.raises(ValueError, match="naive"):
        format_commit_time(datetime(2024, 5, 1))


def test_same_instant_in_another_zone_seals_identically() -> None:
    local = DRAFT_1.commit_time.astimezone(timezone(timedelta(hours=-5)))
    assert StreamChain("user").seal(dataclasses.replace(DRAFT_1, commit_time=local)).hash == (
        bytes.fromhex(HASH_1)
    )


# ---- UUIDv7 ------------------------------------------------------------------------------------


def test_uuid7_matches_the_rfc_9562_example() -> None:
    # RFC 9562 appendix A.6: unix_ts_ms 0x017F22E279B0, rand_a 0xCC3, rand_b 0x18C4DC0C0C07398F.
    value = uuid7(0x017F22E279B0, (0xCC3 << 62) | 0x18C4DC0C0C07398F)
    assert value == uuid.UUID("017F22E2-79B0-7CC3-98C4-DC0C0C07398F")
    assert value.version == 7
    assert value.variant == uuid.RFC_4122


def test_uuid7_refuses_out_of_range_input() -> None:
    with pytest.raises(ValueError):
        uuid7(1 << 48, 0)
    with pytest.raises(ValueError):
        uuid7(0, 1 << 74)


def test_generator_orders_ids_within_one_millisecond() -> None:
    gen = Uuid7Generator(clock=lambda: 1_700_000_000_000, randbits=lambda bits: (1 << bits) - 1)
    ids = [gen() for _ in range(5000)]  # more than the 12-bit counter holds
    assert ids == sorted(ids, key=lambda u: u.bytes)
    assert len(set(ids)) == len(ids)
    assert all(u.version == 7 and u.variant == uuid.RFC_4122 for u in ids)
    # The counter overflowed, so the timestamp moved forward rather than wrapping.
    assert ids[-1].int >> 80 > 1_700_000_000_000


def test_generator_stays_ordered_when_the_clock_goes_back() -> None:
    times = iter([5000, 5000, 4000, 4000, 6000])
    gen = Uuid7Generator(clock=lambda: next(times), randbits=lambda bits: 0)
    ids = [gen() for _ in range(5)]
    assert ids == sorted(ids, key=lambda u: u.bytes)
    assert [u.int >> 80 for u in ids] == [5000, 5000, 5000, 5000, 6000]


def test_default_generator_uses_the_wall_clock() -> None:
    gen = Uuid7Generator()
    before = int(datetime.now(UTC).timestamp() * 1000)
    value = gen()
    assert abs((value.int >> 80) - before) < 60_000
    assert gen().bytes > value.bytes


def test_random_bits_stay_in_range_and_use_every_bit() -> None:
    draw = BufferedRandomBits()
    for bits in (1, 11, 62, 64):
        values = [draw(bits) for _ in range(2000)]  # several blocks of 512 draws
        assert all(0 <= v < 1 << bits for v in values)
        # Every bit position is set sometimes and clear sometimes (false alarm < 2^-1990).
        for position in range(bits):
            seen = {(v >> position) & 1 for v in values}
            assert seen == {0, 1}, (bits, position)
    with pytest.raises(ValueError, match="1 to 64 bits"):
        draw(65)
    with pytest.raises(ValueError, match="1 to 64 bits"):
        draw(0)


def test_a_forked_child_does_not_draw_the_parents_bytes() -> None:
    draw = BufferedRandomBits()
    draw(64)  # the parent holds a block with 511 draws left
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report its next draws and leave at once
        os.close(read_end)
        os.write(write_end, b"".join(draw(64).to_bytes(8, "big") for _ in range(4)))
        os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        child = pipe.read()
    os.waitpid(pid, 0)
    parent = b"".join(draw(64).to_bytes(8, "big") for _ in range(4))
    assert len(child) == 32
    assert child != parent


# Merkle roots and proofs are tested in test_merkle.py.
