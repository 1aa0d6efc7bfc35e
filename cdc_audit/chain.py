"""The per-stream hash chain, UUIDv7 event ids and RFC 6962 Merkle roots.

THE CHAIN SPECIFICATION (version 1). Verifiers in any language implement exactly this.

Every event of a stream has a sequence number ``seq`` (1, 2, 3, ... with no gaps) and two
canonical JSON documents, encoded by the rules of `cdc_audit.canonical` (UTF-8, no
whitespace, keys sorted by code point, no floats):

1. The **payload**, the part that may later be erased. An object with exactly these keys,
   each present, ``null`` when absent::

       actor_id   string | null
       changed    array of strings (sorted) | null
       context    object | null
       new        object | null
       old        object | null
       reason     string | null
       row_key    object | null

2. The **header**, never erased. An object with exactly these keys::

       commit_lsn       string "X/Y" as PostgreSQL prints an LSN (upper-case hex, no
                        leading zeros, e.g. "16/B374D848") | null
       commit_time      string, ISO 8601 in UTC: "YYYY-MM-DDTHH:MM:SS+00:00", with
                        ".ffffff" (exactly 6 digits) before "+00:00" when the microseconds
                        are not zero (what Python's datetime.isoformat() prints for UTC)
       context_missing  true | false
       event_id         string, the UUID in lower-case 8-4-4-4-12 hex form
       kind             string (insert, update, delete, truncate, ddl, app, ...)
       payload_hash     string, lower-case hex of payload_hash below (64 characters)
       schema_name      string | null
       seq              integer
       stream           string
       table_name       string | null
       xid              integer | null

Then, with ``||`` byte concatenation::

    payload_hash = SHA-256(canonical(payload))
    hash         = SHA-256(prev_hash || canonical(header))

where ``prev_hash`` is the 32 raw bytes of the previous event's ``hash`` in the same stream,
and 32 zero bytes (`GENESIS`) for seq 1. Because the header carries ``payload_hash``, this is
DESIGN's ``SHA-256(prev_hash || header || SHA-256(payload))`` with the digest inside the
header: a payload can be erased later and the chain still verifies from ``payload_hash``.

Merkle roots and audit paths (for checkpoints, RFC 6962) are specified in `cdc_audit.merkle`.
"""

from __future__ import annotations

import hashlib
import os
import time
import uuid
import weakref
from collections.abc import Callable, Mapping
from dataclasses import field
from datetime import UTC, datetime
from typing import Final, Protocol

from cdc_audit.canonical import JsonValue, canonical_bytes, canonical_bytes_trusted
from cdc_audit.merkle import merkle_root
from cdc_audit.pgoutput import format_lsn
from cdc_audit.records import record

__all__ = [
    "GENESIS",
    "HEADER_FIELDS",
    "PAYLOAD_FIELDS",
    "DraftEvent",
    "SealedEvent",
    "StreamChain",
    "Uuid7Generator",
    "chain_hash",
    "format_commit_time",
    "header_bytes",
    "merkle_root",
    "payload_bytes",
    "payload_object",
    "uuid7",
    "uuid_text",
]

PAYLOAD_FIELDS: Final = ("actor_id", "changed", "context", "new", "old", "reason", "row_key")
"""The keys of the payload object, in canonical order."""

HEADER_FIELDS: Final = (
    "commit_lsn", "commit_time", "context_missing", "event_id", "kind", "payload_hash",
    "schema_name", "seq", "stream", "table_name", "xid",
)  # fmt: skip
"""The keys of the header object, in canonical order."""

GENESIS: Final = bytes(32)
"""prev_hash of the first event (seq 1) of every stream."""

JsonObject = dict[str, JsonValue]


@record
class DraftEvent:
    """Everything of an event except its place in the chain (seq, prev_hash, hash).

    `ordinal` numbers the drafts of one transaction from 0 so the worker can resume inside a
    large transaction; `unchanged_toast` names columns whose unchanged TOAST value was not
    sent and could not be filled in. Neither is part of the chain.
    """

    stream: str
    kind: str
    event_id: uuid.UUID
    commit_lsn: int | None
    commit_time: datetime
    xid: int | None
    schema_name: str | None = None
    table_name: str | None = None
    row_key: JsonObject | None = None
    old: JsonObject | None = None
    new: JsonObject | None = None
    changed: tuple[str, ...] | None = None
    actor_id: str | None = None
    reason: str | None = None
    context: JsonObject | None = None
    context_missing: bool = False
    ordinal: int = 0
    unchanged_toast: frozenset[str] = field(default_factory=frozenset)

    def payload(self) -> JsonObject:
        """The payload object of the chain spec."""
        return payload_object(self)


class PayloadFields(Protocol):
    """What a payload is made of, whether a draft or an event read back from the trail."""

    @property
    def actor_id(self) -> str | None: ...
    @property
    def changed(self) -> tuple[str, ...] | None: ...
    @property
    def context(self) -> JsonValue: ...
    @property
    def new(self) -> JsonValue: ...
    @property
    def old(self) -> JsonValue: ...
    @property
    def reason(self) -> str | None: ...
    @property
    def row_key(self) -> JsonValue: ...


def payload_object(event: PayloadFields) -> JsonObject:
    """The payload object of the chain spec: exactly these seven keys."""
    return {
        "actor_id": event.actor_id,
        "changed": event.changed,
        "context": event.context,
        "new": event.new,
        "old": event.old,
        "reason": event.reason,
        "row_key": event.row_key,
    }


@record
class SealedEvent:
    """A draft with its place in the chain: the row the worker writes."""

    draft: DraftEvent
    seq: int
    prev_hash: bytes
    payload_hash: bytes
    hash: bytes
    signature: bytes | None = None
    """Ed25519 over `hash`, on streams signed every row."""
    key_id: str | None = None

    def header(self) -> JsonObject:
        """The header object of the chain spec."""
        return _header(self.draft, self.seq, self.payload_hash.hex())


def format_commit_time(value: datetime) -> str:
    """The chain's text form of a timestamp (see the module docstring); naive is refused."""
    if value.tzinfo is None:
        raise ValueError("naive datetime: commit times must carry a time zone")
    if value.tzinfo is not UTC:
        value = value.astimezone(UTC)
    return value.isoformat()


def _header(draft: DraftEvent, seq: int, payload_hash_hex: str) -> JsonObject:
    lsn = draft.commit_lsn
    return {
        "commit_lsn": None if lsn is None else format_lsn(lsn),
        "commit_time": format_commit_time(draft.commit_time),
        "context_missing": draft.context_missing,
        "event_id": uuid_text(draft.event_id),
        "kind": draft.kind,
        "payload_hash": payload_hash_hex,
        "schema_name": draft.schema_name,
        "seq": seq,
        "stream": draft.stream,
        "table_name": draft.table_name,
        "xid": draft.xid,
    }


def uuid_text(value: uuid.UUID) -> str:
    """str(value), about three times faster (it is on the per-event path)."""
    h = f"{value.int:032x}"
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def payload_bytes(payload: Mapping[str, JsonValue]) -> bytes:
    """Canonical bytes of a payload object (hash them for payload_hash)."""
    return canonical_bytes(dict(payload))


def header_bytes(header: Mapping[str, JsonValue]) -> bytes:
    """Canonical bytes of a header object."""
    return canonical_bytes(dict(header))


def chain_hash(prev_hash: bytes, header: Mapping[str, JsonValue]) -> bytes:
    """hash = SHA-256(prev_hash || canonical(header)); needs no payload, only its digest."""
    if len(prev_hash) != 32:
        raise ValueError(f"prev_hash must be 32 bytes, got {len(prev_hash)}")
    return hashlib.sha256(prev_hash + header_bytes(header)).digest()


class StreamChain:
    """The head of one stream's chain: seals drafts in order, assigning gapless seqs.

    Start a fresh stream with the defaults; resume one with the last sealed seq + 1 and that
    event's hash, as read back from the trail.
    """

    __slots__ = ("_commit_key", "_commit_text", "_encode_payload", "head", "next_seq", "stream")

    def __init__(
        self, stream: str, next_seq: int = 1, head: bytes = GENESIS, *, trusted: bool = False
    ) -> None:
        if next_seq < 1:
            raise ValueError(f"next_seq must be at least 1, got {next_seq}")
        if len(head) != 32:
            raise ValueError(f"head must be 32 bytes, got {len(head)}")
        if next_seq == 1 and head != GENESIS:
            raise ValueError("seq 1 must follow the genesis hash")
        self.stream = stream
        self.next_seq = next_seq
        self.head = head
        # Every event of a transaction has the same commit LSN and time: format them once.
        self._commit_key: tuple[int | None, datetime] | None = None
        self._commit_text: tuple[str | None, str] = (None, "")
        # `trusted`: the drafts come from the assembler, whose values are made by the value
        # converters and the exact JSON parser, so walking them for refusals is wasted work.
        self._encode_payload = canonical_bytes_trusted if trusted else canonical_bytes

    def seal(self, draft: DraftEvent) -> SealedEvent:
        """Give `draft` the next seq, link it to the head and advance the head."""
        if draft.stream != self.stream:
            raise ValueError(f"event for stream {draft.stream!r} sealed on {self.stream!r}")
        seq = self.next_seq
        prev = self.head
        digest = hashlib.sha256(self._encode_payload(draft.payload())).digest()
        lsn_text, time_text = self._commit_texts(draft)
        # Every header field is a str, int, bool or None made here: nothing to refuse.
        header = canonical_bytes_trusted(
            {
                "commit_lsn": lsn_text,
                "commit_time": time_text,
                "context_missing": draft.context_missing,
                "event_id": uuid_text(draft.event_id),
                "kind": draft.kind,
                "payload_hash": digest.hex(),
                "schema_name": draft.schema_name,
                "seq": seq,
                "stream": draft.stream,
                "table_name": draft.table_name,
                "xid": draft.xid,
            }
        )
        new_head = hashlib.sha256(prev + header).digest()
        # Advance only once everything above succeeded: a refused draft leaves no gap.
        self.next_seq = seq + 1
        self.head = new_head
        return SealedEvent(draft, seq, prev, digest, new_head)

    def _commit_texts(self, draft: DraftEvent) -> tuple[str | None, str]:
        key = (draft.commit_lsn, draft.commit_time)
        if key != self._commit_key:
            lsn = draft.commit_lsn
            lsn_text = None if lsn is None else format_lsn(lsn)
            self._commit_text = (lsn_text, format_commit_time(draft.commit_time))
            self._commit_key = key
        return self._commit_text


# ------------------------------------------------------------------------------ UUIDv7

_MS_MAX: Final = (1 << 48) - 1
_RAND_BITS: Final = 74  # 12 bits of rand_a + 62 bits of rand_b
_COUNTER_MAX: Final = 0xFFF


def uuid7(unix_ms: int, rand: int) -> uuid.UUID:
    """The RFC 9562 UUIDv7 with this timestamp and 74 random bits.

    `rand`'s top 12 bits fill rand_a, its low 62 bits rand_b.
    """
    if not 0 <= unix_ms <= _MS_MAX:
        raise ValueError(f"unix_ms out of the 48-bit range: {unix_ms}")
    if not 0 <= rand < 1 << _RAND_BITS:
        raise ValueError("rand must be a 74-bit non-negative integer")
    rand_a = rand >> 62
    rand_b = rand & ((1 << 62) - 1)
    value = (unix_ms << 80) | (0x7 << 76) | (rand_a << 64) | (0b10 << 62) | rand_b
    return uuid.UUID(int=value)


class Uuid7Generator:
    """UUIDv7s that sort in generation order, even within one millisecond.

    RFC 9562 section 6.2 method 1: rand_a is a 12-bit counter, started at a random value
    with its top bit clear (room for at least 2048 ids in a millisecond) and incremented for
    each further id in the same millisecond. When it overflows, or when the clock goes
    backwards, the timestamp is advanced past the last one used, so order is never broken.
    """

    __slots__ = ("_clock", "_counter", "_last_ms", "_randbits")

    def __init__(
        self,
        clock: Callable[[], int] | None = None,
        randbits: Callable[[int], int] | None = None,
    ) -> None:
        self._clock = clock if clock is not None else _unix_ms
        self._randbits = randbits if randbits is not None else BufferedRandomBits()
        self._last_ms = -1
        self._counter = 0

    def __call__(self) -> uuid.UUID:
        """The next id."""
        now = self._clock()
        if now > self._last_ms:
            self._last_ms = now
            self._counter = self._randbits(11)
        elif self._counter < _COUNTER_MAX:
            self._counter += 1
        else:
            self._last_ms += 1
            self._counter = self._randbits(11)
        return uuid7(self._last_ms, (self._counter << 62) | self._randbits(62))


class BufferedRandomBits:
    """`secrets.randbits` drawn from a block of the operating system's CSPRNG at a time.

    Each `os.urandom` call releases the GIL around its system call, so in the worker, whose
    writer thread holds the GIL most of the time, one call per event id meant one GIL
    hand-over per event: a tenth of the sealing loop's time (docs/benchmarks.md). A block
    serves 512 draws of up to 64 bits. Each generator has its own (a block is not shared
    between threads), and after a fork the child starts fresh blocks, so two processes never
    draw the same bytes.
    """

    __slots__ = ("__weakref__", "_block", "_next")

    BLOCK = 4096

    def __init__(self) -> None:
        self._block = b""
        self._next = 0
        _LIVE_BUFFERS.add(self)

    def forget(self) -> None:
        """Drop the rest of the block: the next draw reads a new one."""
        self._block = b""
        self._next = 0

    def __call__(self, bits: int) -> int:
        """`bits` (1 to 64) uniformly random bits, as a non-negative int."""
        if not 0 < bits <= 64:
            raise ValueError(f"draws of 1 to 64 bits, not {bits}")
        at = self._next
        if at + 8 > len(self._block):
            self._block = os.urandom(self.BLOCK)
            at = 0
        self._next = at + 8
        return int.from_bytes(self._block[at : at + 8], "big") >> (64 - bits)


_LIVE_BUFFERS: Final[weakref.WeakSet[BufferedRandomBits]] = weakref.WeakSet()


def _forget_all_blocks() -> None:
    for buffer in list(_LIVE_BUFFERS):
        buffer.forget()


os.register_at_fork(after_in_child=_forget_all_blocks)


def _unix_ms() -> int:
    return time.time_ns() // 1_000_000
