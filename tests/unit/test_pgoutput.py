"""pgoutput decoder on byte sequences built per "Logical Replication Message Formats"."""

from __future__ import annotations

import struct
from datetime import UTC, datetime

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cdc_audit.errors import CdcAuditError, InvalidInput
from cdc_audit.pgoutput import (
    PG_EPOCH,
    UNCHANGED,
    Begin,
    Column,
    Commit,
    DecodeError,
    Delete,
    Insert,
    InvalidLsn,
    LogicalMessage,
    Origin,
    Relation,
    RelationCache,
    Truncate,
    TupleValue,
    TypeMessage,
    Update,
    datetime_to_pg_timestamp,
    decode_keepalive,
    decode_message,
    decode_xlogdata,
    encode_standby_status,
    format_lsn,
    parse_lsn,
    pg_now,
    pg_timestamp_to_datetime,
)

# ---- builders: the documented wire layout, written independently of the decoder ------------

COMMIT_TIME = datetime_to_pg_timestamp(datetime(2026, 11, 28, 6, 53, 25, 123456, tzinfo=UTC))


def cstr(text: str) -> bytes:
    return text.encode() + b"\0"


def tuple_data(values: list[TupleValue]) -> bytes:
    out = struct.pack(">h", len(values))
    for value in values:
        if value is None:
            out += b"n"
        elif value is UNCHANGED:
            out += b"u"
        else:
            assert isinstance(value, str)
            raw = value.encode()
            out += b"t" + struct.pack(">i", len(raw)) + raw
    return out


def begin_msg(final_lsn: int = 0x16B374D848, ts: int = COMMIT_TIME, xid: int = 7421) -> bytes:
    return b"B" + struct.pack(">QqI", final_lsn, ts, xid)


def commit_msg(commit_lsn: int = 0x16B374D848, end_lsn: int = 0x16B374D878) -> bytes:
    return b"C" + struct.pack(">BQQq", 0, commit_lsn, end_lsn, COMMIT_TIME)


def relation_msg(
    oid: int, namespace: str, name: str, identity: bytes, columns: list[tuple[int, str, int, int]]
) -> bytes:
    out = b"R" + struct.pack(">I", oid) + cstr(namespace) + cstr(name) + identity
    out += struct.pack(">h", len(columns))
    for flags, col_name, type_oid, typmod in columns:
        out += struct.pack(">B", flags) + cstr(col_name) + struct.pack(">Ii", type_oid, typmod)
    return out


def insert_msg(oid: int, new: list[TupleValue]) -> bytes:
    return b"I" + struct.pack(">I", oid) + b"N" + tuple_data(new)


def update_msg(
    oid: int, new: list[TupleValue], old: list[TupleValue] | None = None, kind: bytes = b"O"
) -> bytes:
    out = b"U" + struct.pack(">I", oid)
    if old is not None:
        out += kind + tuple_data(old)
    return out + b"N" + tuple_data(new)


def delete_msg(oid: int, old: list[TupleValue], kind: bytes = b"K") -> bytes:
    return b"D" + struct.pack(">I", oid) + kind + tuple_data(old)


def truncate_msg(options: int, oids: list[int]) -> bytes:
    return (
        b"T" + struct.pack(">iB", len(oids), options) + b"".join(struct.pack(">I", o) for o in oids)
    )


def message_msg(transactional: bool, lsn: int, prefix: str, content: bytes) -> bytes:
    head = b"M" + struct.pack(">BQ", 1 if transactional else 0, lsn) + cstr(prefix)
    return head + struct.pack(">i", len(content)) + content


def origin_msg(lsn: int, name: str) -> bytes:
    return b"O" + struct.pack(">Q", lsn) + cstr(name)


def type_msg(oid: int, namespace: str, name: str) -> bytes:
    return b"Y" + struct.pack(">I", oid) + cstr(namespace) + cstr(name)


ACCOUNTS_OID = 16385
ACCOUNTS_REL = relation_msg(
    ACCOUNTS_OID,
    "Billing",
    "Accounts Ünïcode",
    b"f",
    [(1, "Id", 20, -1), (0, "eMail", 25, -1), (0, "Balance", 1700, 655366), (0, "Notes", 25, -1)],
)


@pytest.fixture
def relations() -> RelationCache:
    cache = RelationCache()
    relation = decode_message(ACCOUNTS_REL)
    assert isinstance(relation, Relation)
    cache.add(relation)
    return cache


# ---- each message type ------------------------------------------------------------------------


def test_begin() -> None:
    msg = decode_message(begin_msg())
    assert msg == Begin(final_lsn=0x16B374D848, commit_time=COMMIT_TIME, xid=7421)
    assert pg_timestamp_to_datetime(msg.commit_time) == datetime(
        2026, 11, 28, 6, 53, 25, 123456, tzinfo=UTC
    )


def test_commit() -> None:
    msg = decode_message(commit_msg())
    assert msg == Commit(0, 0x16B374D848, 0x16B374D878, COMMIT_TIME)


def test_relation_keeps_mixed_case_and_unicode_names() -> None:
    msg = decode_message(ACCOUNTS_REL)
    assert isinstance(msg, Relation)
    assert (msg.oid, msg.namespace, msg.name, msg.replica_identity) == (
        ACCOUNTS_OID,
        "Billing",
        "Accounts Ünïcode",
        "f",
    )
    assert msg.columns[0] == Column(1, "Id", 20, -1)
    assert msg.columns[2].typmod == 655366
    assert [c.is_key for c in msg.columns] == [True, False, False, False]
    assert msg.column_names == ("Id", "eMail", "Balance", "Notes")


def test_relation_in_pg_catalog_has_empty_namespace() -> None:
    msg = decode_message(relation_msg(1, "", "t", b"d", []))
    assert isinstance(msg, Relation)
    assert msg.namespace == ""
    assert msg.columns == ()


def test_insert_with_null_text_and_unchanged(relations: RelationCache) -> None:
    values: list[TupleValue] = ["42", None, "", UNCHANGED]
    msg = decode_message(insert_msg(ACCOUNTS_OID, values), relations)
    assert msg == Insert(ACCOUNTS_OID, ["42", None, "", UNCHANGED])


def test_insert_decodes_utf8_text(relations: RelationCache) -> None:
    values: list[TupleValue] = ["1", "zoë@example.com", "1e3", "line\nbreak \u2028 😀"]
    msg = decode_message(insert_msg(ACCOUNTS_OID, values), relations)
    assert isinstance(msg, Insert)
    assert msg.new == values


def test_update_with_key_old_tuple(relations: RelationCache) -> None:
    old: list[TupleValue] = ["1", None, None, None]
    new: list[TupleValue] = ["2", "a@b", "3.50", UNCHANGED]
    msg = decode_message(update_msg(ACCOUNTS_OID, new, old, b"K"), relations)
    assert msg == Update(ACCOUNTS_OID, "K", old, new)


def test_update_with_full_old_tuple(relations: RelationCache) -> None:
    old: list[TupleValue] = ["1", "a@b", "3.50", "long toasted value"]
    new: list[TupleValue] = ["1", "a@b", "4.00", UNCHANGED]
    msg = decode_message(update_msg(ACCOUNTS_OID, new, old, b"O"), relations)
    assert msg == Update(ACCOUNTS_OID, "O", old, new)


def test_update_without_old_tuple(relations: RelationCache) -> None:
    new: list[TupleValue] = ["1", None, "0", "x"]
    msg = decode_message(update_msg(ACCOUNTS_OID, new), relations)
    assert msg == Update(ACCOUNTS_OID, None, None, new)


@pytest.mark.parametrize("kind", ["K", "O"])
def test_delete(relations: RelationCache, kind: str) -> None:
    old: list[TupleValue] = ["9", None, None, None]
    msg = decode_message(delete_msg(ACCOUNTS_OID, old, kind.encode()), relations)
    assert msg == Delete(ACCOUNTS_OID, kind, old)  # type: ignore[arg-type]


def test_truncate_of_several_relations() -> None:
    msg = decode_message(truncate_msg(3, [16385, 16390, 4294967295]))
    assert msg == Truncate(3, (16385, 16390, 4294967295))
    assert isinstance(msg, Truncate)
    assert msg.cascade and msg.restart_identity
    plain = decode_message(truncate_msg(0, [1]))
    assert isinstance(plain, Truncate)
    assert not plain.cascade and not plain.restart_identity


def test_transactional_message_has_no_xid_field() -> None:
    content = b'{"actor_id": "u42"}'
    msg = decode_message(message_msg(True, 0x1_0000_0001, "cdc_audit.ctx", content))
    assert msg == LogicalMessage(True, 0x1_0000_0001, "cdc_audit.ctx", content)


def test_non_transactional_message_with_utf8_prefix_and_binary_content() -> None:
    content = bytes(range(256)) + b"\0\0"
    msg = decode_message(message_msg(False, 5, "préfixe.ünï", content))
    assert msg == LogicalMessage(False, 5, "préfixe.ünï", content)


def test_message_with_empty_content() -> None:
    assert decode_message(message_msg(True, 1, "p", b"")) == LogicalMessage(True, 1, "p", b"")


def test_origin() -> None:
    assert decode_message(origin_msg(0xABC, "node_a")) == Origin(0xABC, "node_a")


def test_type() -> None:
    assert decode_message(type_msg(70000, "public", "Mood")) == TypeMessage(70000, "public", "Mood")


@pytest.mark.parametrize("proto_version", [1, 2, 3, 4])
def test_layouts_are_the_same_in_every_protocol_version(proto_version: int) -> None:
    data = message_msg(True, 9, "cdc_audit.ctx", b"{}")
    assert decode_message(data, proto_version=proto_version) == LogicalMessage(
        True, 9, "cdc_audit.ctx", b"{}"
    )


def test_accepts_memoryview_and_bytearray(relations: RelationCache) -> None:
    data = b"xx" + insert_msg(ACCOUNTS_OID, ["1", None, None, None])
    view = memoryview(data)[2:]
    assert decode_message(view, relations) == decode_message(bytearray(view), relations)


# ---- errors ---------------------------------------------------------------------------------


def test_decode_error_is_a_cdc_audit_error_with_offset() -> None:
    with pytest.raises(DecodeError) as info:
        decode_message(begin_msg()[:10])
    assert isinstance(info.value, CdcAuditError)
    assert info.value.offset == 10
    assert "at byte 10" in str(info.value)


def test_column_count_must_match_the_relation(relations: RelationCache) -> None:
    with pytest.raises(DecodeError, match="tuple has 3 columns, relation has 4"):
        decode_message(insert_msg(ACCOUNTS_OID, ["1", "2", "3"]), relations)
    # Without a cache there is nothing to compare with.
    assert decode_message(insert_msg(ACCOUNTS_OID, ["1", "2", "3"])) == Insert(
        ACCOUNTS_OID, ["1", "2", "3"]
    )


def test_change_before_its_relation_is_an_error(relations: RelationCache) -> None:
    with pytest.raises(DecodeError, match="before its Relation message"):
        decode_message(insert_msg(999, ["1"]), relations)


@pytest.mark.parametrize("kind", [b"S", b"E", b"c", b"A"])
def test_stream_messages_are_refused(kind: bytes) -> None:
    with pytest.raises(DecodeError, match="streaming was not requested"):
        decode_message(kind + b"\0" * 20, proto_version=2)
    with pytest.raises(DecodeError, match="does not exist in protocol version 1"):
        decode_message(kind + b"\0" * 20)


@pytest.mark.parametrize("kind", [b"b", b"P", b"K", b"r", b"p"])
def test_two_phase_messages_are_refused(kind: bytes) -> None:
    with pytest.raises(DecodeError, match="two_phase was not requested"):
        decode_message(kind + b"\0" * 20, proto_version=3)


def test_unknown_and_empty_messages() -> None:
    with pytest.raises(DecodeError, match="unknown message type 0x5a"):
        decode_message(b"Z123")
    with pytest.raises(DecodeError, match="empty"):
        decode_message(b"")


def test_unsupported_protocol_version() -> None:
    with pytest.raises(ValueError, match="protocol version 5"):
        decode_message(begin_msg(), proto_version=5)


def test_binary_values_were_not_requested() -> None:
    data = b"I" + struct.pack(">I", 1) + b"N" + struct.pack(">h", 1) + b"b" + struct.pack(">i", 0)
    with pytest.raises(DecodeError, match="binary"):
        decode_message(data)


def test_bad_utf8_in_text_value_reports_its_offset() -> None:
    data = b"I" + struct.pack(">I", 1) + b"N" + struct.pack(">h", 1) + b"t" + struct.pack(">i", 3)
    with pytest.raises(DecodeError, match="not valid UTF-8") as info:
        decode_message(data + b"a\xffb")
    assert info.value.offset == len(data) + 1


def test_bad_utf8_in_names() -> None:
    with pytest.raises(DecodeError, match="relation name is not valid UTF-8"):
        decode_message(b"R" + struct.pack(">I", 1) + cstr("") + b"\xc3(\0" + b"d\0\0")


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (begin_msg() + b"\0", "Begin message must be 21 bytes"),
        (commit_msg()[:-1], "Commit message must be 26 bytes"),
        (insert_msg(1, ["a"]) + b"x", "trailing bytes in Insert"),
        (insert_msg(1, ["a"])[:-1], "overruns"),
        (b"I" + struct.pack(">I", 1) + b"X" + tuple_data([]), "expected 'N' in Insert"),
        (b"U" + struct.pack(">I", 1) + b"O" + tuple_data(["a"]), "truncated Update"),
        (b"U" + struct.pack(">I", 1) + b"X" + tuple_data(["a"]), "expected 'N' in Update"),
        (b"D" + struct.pack(">I", 1) + b"N" + tuple_data(["a"]), "expected 'K' or 'O'"),
        (b"I" + struct.pack(">I", 1) + b"N" + struct.pack(">h", 1) + b"x", "unknown tuple value"),
        (b"I" + struct.pack(">I", 1) + b"N" + struct.pack(">h", -1), "tuple has -1 columns"),
        (b"I" + struct.pack(">I", 1) + b"N" + b"\0\1t\xff\xff\xff\xfe", "length -2"),
        (truncate_msg(0, [1, 2])[:-1], "Truncate of 2 relations"),
        (b"T" + struct.pack(">iB", -1, 0), "Truncate of -1 relations"),
        (message_msg(True, 1, "p", b"abc")[:-1], "content length 3"),
        (message_msg(True, 1, "p", b"abc") + b"!", "content length 3"),
        (b"M\1" + b"\0" * 8 + b"no terminator", "unterminated message prefix"),
        (relation_msg(1, "s", "t", b"x", []), "unknown replica identity 'x'"),
        (relation_msg(1, "s", "t", b"d", [(0, "c", 25, -1)])[:-3], "truncated Relation"),
        (origin_msg(1, "o") + b"z", "trailing bytes in Origin"),
        (type_msg(1, "s", "t")[:-1], "unterminated type name"),
    ],
)
def test_malformed_messages(data: bytes, message: str) -> None:
    with pytest.raises(DecodeError, match=message):
        decode_message(data)


# ---- robustness: any corruption gives DecodeError or a valid message ------------------------

VALID_MESSAGES = [
    begin_msg(),
    commit_msg(),
    ACCOUNTS_REL,
    insert_msg(ACCOUNTS_OID, ["42", None, "ü", UNCHANGED]),
    update_msg(ACCOUNTS_OID, ["1", "x", "2", UNCHANGED], ["1", None, None, None], b"K"),
    update_msg(ACCOUNTS_OID, ["1", "x", "2", UNCHANGED], ["1", "y", "3", "long"], b"O"),
    delete_msg(ACCOUNTS_OID, ["1", None, None, None]),
    truncate_msg(1, [16385, 16386]),
    message_msg(True, 77, "cdc_audit.ctx", b'{"actor_id":"u1"}'),
    origin_msg(5, "origin"),
    type_msg(70000, "public", "mood"),
]
MESSAGE_TYPES = (
    Begin,
    Commit,
    Origin,
    Relation,
    TypeMessage,
    Insert,
    Update,
    Delete,
    Truncate,
    LogicalMessage,
)


def _decode_or_decode_error(data: bytes, relations: RelationCache) -> None:
    try:
        result = decode_message(data, relations)
    except DecodeError as exc:
        assert 0 <= exc.offset <= len(data)
    else:
        assert isinstance(result, MESSAGE_TYPES)


@settings(max_examples=300, deadline=None)
@given(
    st.sampled_from(VALID_MESSAGES),
    st.data(),
)
def test_truncations_and_bit_flips_never_escape_as_other_errors(
    original: bytes, data: st.DataObject
) -> None:
    relations = RelationCache()
    rel = decode_message(ACCOUNTS_REL)
    assert isinstance(rel, Relation)
    relations.add(rel)
    corrupted = bytearray(original)
    for _ in range(data.draw(st.integers(0, 3))):
        bit = data.draw(st.integers(0, len(corrupted) * 8 - 1))
        corrupted[bit // 8] ^= 1 << (bit % 8)
    cut = data.draw(st.integers(0, len(corrupted)))
    _decode_or_decode_error(bytes(corrupted[:cut]), relations)
    _decode_or_decode_error(bytes(corrupted), relations)


@settings(max_examples=200, deadline=None)
@given(st.sampled_from(b"BCORYIUDTM"), st.binary(max_size=64))
def test_random_bodies_never_escape_as_other_errors(kind: int, body: bytes) -> None:
    _decode_or_decode_error(bytes([kind]) + body, RelationCache())


tuple_values = st.lists(
    st.one_of(st.none(), st.just(UNCHANGED), st.text(max_size=20)), min_size=0, max_size=8
)


@settings(max_examples=100, deadline=None)
@given(tuple_values, tuple_values)
def test_tuple_round_trip(new: list[TupleValue], old: list[TupleValue]) -> None:
    assert decode_message(insert_msg(3, new)) == Insert(3, new)
    assert decode_message(update_msg(3, new, old)) == Update(3, "O", old, new)


# ---- CopyData framing -------------------------------------------------------------------------


def test_xlogdata() -> None:
    payload = begin_msg()
    frame = b"w" + struct.pack(">QQq", 0x10, 0x20, 12345) + payload
    wal_start, wal_end, send_time, view = decode_xlogdata(memoryview(frame))
    assert (wal_start, wal_end, send_time) == (0x10, 0x20, 12345)
    assert isinstance(view, memoryview)
    assert bytes(view) == payload
    assert decode_message(view) == decode_message(payload)


def test_xlogdata_errors() -> None:
    with pytest.raises(DecodeError, match="at least 25 bytes"):
        decode_xlogdata(b"w" + b"\0" * 10)
    with pytest.raises(DecodeError, match="expected XLogData"):
        decode_xlogdata(b"k" + b"\0" * 30)


def test_keepalive() -> None:
    frame = b"k" + struct.pack(">QqB", 0x16B374D848, 999, 1)
    assert decode_keepalive(frame) == (0x16B374D848, 999, True)
    assert decode_keepalive(frame[:-1] + b"\0") == (0x16B374D848, 999, False)
    with pytest.raises(DecodeError, match="18 bytes"):
        decode_keepalive(frame[:-1])
    with pytest.raises(DecodeError, match="expected keepalive"):
        decode_keepalive(b"w" + frame[1:])


def test_standby_status_round_trip() -> None:
    now = pg_now()
    data = encode_standby_status(0x30, 0x20, 0x10, now, reply=True)
    assert len(data) == 34
    assert struct.unpack(">cQQQqB", data) == (b"r", 0x30, 0x20, 0x10, now, 1)
    assert data[-1] == 1
    assert encode_standby_status(1, 1, 1, 0)[-1] == 0


def test_standby_status_refuses_out_of_range() -> None:
    with pytest.raises(ValueError, match="out of range"):
        encode_standby_status(-1, 0, 0, 0)


# ---- LSNs and timestamps ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "value"),
    [("16/B374D848", 0x16B374D848), ("0/0", 0), ("FFFFFFFF/FFFFFFFF", 2**64 - 1), ("0/1", 1)],
)
def test_lsn_round_trip(text: str, value: int) -> None:
    assert parse_lsn(text) == value
    assert format_lsn(value) == text


def test_parse_lsn_accepts_lowercase() -> None:
    assert parse_lsn("16/b374d848") == 0x16B374D848


@pytest.mark.parametrize("text", ["", "16", "16/", "/1", "1/2/3", "G/0", "123456789/0", " 0/0"])
def test_parse_lsn_refuses(text: str) -> None:
    with pytest.raises(InvalidLsn) as info:
        parse_lsn(text)
    assert isinstance(info.value, InvalidInput)
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize("value", [-1, 2**64])
def test_format_lsn_refuses_out_of_range(value: int) -> None:
    with pytest.raises(ValueError, match="out of range"):
        format_lsn(value)


def test_pg_timestamps() -> None:
    assert datetime_to_pg_timestamp(PG_EPOCH) == 0
    moment = datetime(1999, 12, 31, 23, 59, 59, 999999, tzinfo=UTC)
    assert datetime_to_pg_timestamp(moment) == -1
    assert pg_timestamp_to_datetime(-1) == moment
    now = datetime.now(UTC)
    assert abs(pg_now() - datetime_to_pg_timestamp(now)) < 5_000_000
    with pytest.raises(ValueError, match="naive"):
        datetime_to_pg_timestamp(datetime(2026, 1, 1))


def test_relation_cache() -> None:
    cache = RelationCache()
    first = Relation(5, "s", "t", "d", ())
    second = Relation(5, "s", "t", "f", (Column(1, "id", 23, -1),))
    assert cache.get(5) is None and 5 not in cache
    cache.add(first)
    cache.add(second)
    assert cache[5] is second and 5 in cache and len(cache) == 1
    cache.clear()
    assert len(cache) == 0


def test_unchanged_is_a_singleton_with_a_short_repr() -> None:
    assert repr(UNCHANGED) == "UNCHANGED"
    assert repr(["a", UNCHANGED]) == "['a', UNCHANGED]"
