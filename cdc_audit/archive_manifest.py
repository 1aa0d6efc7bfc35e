"""The archive's formats: segments and the signed manifest that lists them.

THE ARCHIVE FORMAT (version 1). Under an archive location (`cdc_audit.archive_store`), each
stream has its own folder of objects, never overwritten:

- ``<stream>/segment-<first_seq>-<last_seq>.jsonl.gz`` (seq as 20 digits): gzip (no name, mtime
  0, so the same events always give the same bytes) of export lines (`cdc_audit.export`):
  the events first_seq..last_seq, each checkpoint right after the last event it covers. A
  stream's first segment starts at seq 1, or, when older events were purged before anything
  was archived, with the ``{"type": "purge", ...}`` line of the purge record they left.
  Segments end where a checkpoint ends, so everything archived is signed.
- ``<stream>/manifest-<last_seq>.json``: canonical JSON ``{"signature": hex, "statement":
  {...}}`` with an Ed25519 signature over the canonical bytes of the statement::

      type       "cdc_audit.archive_manifest"
      v          1
      stream     the stream
      first_seq  first and last seq archived
      last_seq
      last_hash  hex hash of event last_seq
      key_id     the signing key's id (as checkpoints name it)
      segments   in seq order, each {name, first_seq, last_seq, events, checkpoints,
                 bytes, sha256 (of the object), prev_hash (of its first event), last_hash,
                 first_time, last_time (commit times of its first and last event)}

  Each archive run that adds segments writes a new manifest listing every segment so far;
  the newest (highest last_seq) is the one verification starts from, and every older one
  must list a prefix of it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Final

from .canonical import JsonValue, canonical_bytes
from .keys import PublicKey, SigningKey
from .values import parse_json_exact

__all__ = [
    "MANIFEST_TYPE",
    "Manifest",
    "ManifestError",
    "SegmentEntry",
    "manifest_name",
    "parse_manifest",
    "segment_name",
    "sign_manifest",
    "stream_of",
]

MANIFEST_TYPE: Final = "cdc_audit.archive_manifest"
VERSION: Final = 1
_MANIFEST_NAME = re.compile(r"([a-z][a-z0-9_]{0,39})/manifest-([0-9]{20})\.json\Z")
_SEGMENT_KEYS: Final = frozenset(
    {
        "name", "first_seq", "last_seq", "events", "checkpoints", "bytes", "sha256",
        "prev_hash", "last_hash", "first_time", "last_time",
    }
)  # fmt: skip
_STATEMENT_KEYS: Final = frozenset(
    {"type", "v", "stream", "first_seq", "last_seq", "last_hash", "key_id", "segments"}
)


class ManifestError(ValueError):
    """A manifest that is not well-formed, or whose signature does not hold."""


def segment_name(stream: str, first_seq: int, last_seq: int) -> str:
    return f"{stream}/segment-{first_seq:020d}-{last_seq:020d}.jsonl.gz"


def manifest_name(stream: str, last_seq: int) -> str:
    return f"{stream}/manifest-{last_seq:020d}.json"


def stream_of(name: str) -> tuple[str, int] | None:
    """(stream, last_seq) of a manifest's object name; None for any other object."""
    found = _MANIFEST_NAME.match(name)
    return None if found is None else (found[1], int(found[2]))


@dataclass(frozen=True)
class SegmentEntry:
    """One segment as its manifest lists it."""

    name: str
    first_seq: int
    last_seq: int
    events: int
    checkpoints: int
    bytes: int
    sha256: str
    prev_hash: str
    last_hash: str
    first_time: str
    last_time: str

    def record(self) -> dict[str, JsonValue]:
        return {key: getattr(self, key) for key in sorted(_SEGMENT_KEYS)}

    @classmethod
    def from_record(cls, record: Any) -> SegmentEntry:
        if not isinstance(record, dict) or set(record) != _SEGMENT_KEYS:
            raise ManifestError("a segment entry must have exactly the segment fields")
        entry = cls(**record)
        numbers = (entry.first_seq, entry.last_seq, entry.events, entry.checkpoints, entry.bytes)
        if not all(type(n) is int for n in numbers):
            raise ManifestError(f"segment {entry.name}: seq, counts and size must be integers")
        return entry


@dataclass(frozen=True)
class Manifest:
    """A stream's archive as one signed statement."""

    stream: str
    segments: tuple[SegmentEntry, ...]
    key_id: str
    signature: bytes = b""

    @property
    def first_seq(self) -> int:
        return self.segments[0].first_seq

    @property
    def last_seq(self) -> int:
        return self.segments[-1].last_seq

    @property
    def last_hash(self) -> str:
        return self.segments[-1].last_hash

    def statement(self) -> dict[str, JsonValue]:
        return {
            "type": MANIFEST_TYPE,
            "v": VERSION,
            "stream": self.stream,
            "first_seq": self.first_seq,
            "last_seq": self.last_seq,
            "last_hash": self.last_hash,
            "key_id": self.key_id,
            "segments": [segment.record() for segment in self.segments],
        }

    def statement_bytes(self) -> bytes:
        """What the signature signs."""
        return canonical_bytes(self.statement())

    def file_bytes(self) -> bytes:
        return canonical_bytes({"signature": self.signature.hex(), "statement": self.statement()})

    def name(self) -> str:
        return manifest_name(self.stream, self.last_seq)


def sign_manifest(stream: str, segments: list[SegmentEntry], key: SigningKey) -> Manifest:
    unsigned = Manifest(stream, tuple(segments), key.key_id)
    return Manifest(stream, tuple(segments), key.key_id, key.sign(unsigned.statement_bytes()))


def parse_manifest(data: bytes, keys: dict[str, PublicKey]) -> Manifest:
    """A manifest file back, once proven canonical and signed by one of `keys`."""
    try:
        record = parse_json_exact(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise ManifestError("the manifest is not JSON (edited?)") from None
    if not isinstance(record, dict) or set(record) != {"signature", "statement"}:
        raise ManifestError("not a manifest: expected {signature, statement} (edited?)")
    statement = record["statement"]
    if not isinstance(statement, dict) or set(statement) != _STATEMENT_KEYS:
        raise ManifestError("the manifest statement does not have exactly the manifest fields")
    if statement["type"] != MANIFEST_TYPE or statement["v"] != VERSION:
        raise ManifestError(f"not a version {VERSION} archive manifest")
    segments = statement["segments"]
    if not isinstance(segments, list) or not segments:
        raise ManifestError("a manifest lists at least one segment")
    manifest = Manifest(
        str(statement["stream"]),
        tuple(SegmentEntry.from_record(s) for s in segments),
        str(statement["key_id"]),
        _signature(record["signature"]),
    )
    try:
        canonical = manifest.file_bytes() == data
    except TypeError:
        canonical = False
    if not canonical:
        raise ManifestError("the manifest is not in canonical form (edited?)")
    key = keys.get(manifest.key_id)
    if key is None:
        raise ManifestError(f"the manifest is signed by unregistered key {manifest.key_id}")
    if not key.verify(manifest.signature, manifest.statement_bytes()):
        raise ManifestError("the manifest signature is invalid (edited?)")
    return manifest


def _signature(text: Any) -> bytes:
    try:
        raw = bytes.fromhex(text)
    except (TypeError, ValueError):
        raise ManifestError("the manifest signature is not hex") from None
    if raw.hex() != text:
        raise ManifestError("the manifest signature is not lower-case hex")
    return raw
