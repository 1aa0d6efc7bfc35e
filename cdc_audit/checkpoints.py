"""Signed checkpoints of a stream, and the anchor that keeps copies outside the database.

THE CHECKPOINT SPECIFICATION (version 1), next to the chain's in `cdc_audit.chain`.

A checkpoint covers the events ``first_seq`` to ``last_seq`` of one stream (the range since
the previous checkpoint of that stream, so consecutive checkpoints tile the stream). Its
**statement** is the canonical JSON object::

    v             1
    stream        string
    first_seq     integer
    last_seq      integer
    count         integer, last_seq - first_seq + 1
    head_hash     lower-case hex of the hash of event last_seq
    merkle_root   lower-case hex of the RFC 6962 Merkle root whose leaves are the 32-byte
                  hashes of events first_seq..last_seq, in order
    created_at    ISO 8601 UTC, as the chain's commit_time
    key_id        the signing key's id (see `cdc_audit.keys.key_id`)

and its **signature** is Ed25519 over the canonical bytes of the statement.

The **anchor** keeps one file per anchored checkpoint, never overwritten:
``<anchor_dir>/<database>/<schema>/<stream>/<last_seq, 20 digits>.json`` holding the
canonical JSON ``{"signature": hex, "statement": {...}}``, and the public key of every key
the worker signed with: ``<anchor_dir>/<database>/<schema>/keys/<key_id>.pub.pem``. The worker
signs every batch it writes and anchors a checkpoint every N events or T seconds per stream
and when it stops. A superuser who rewrites or cuts
the trail cannot rewrite the anchor too when it lives elsewhere (another host, a WORM bucket).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Final

from cdc_audit.canonical import JsonValue, canonical_bytes
from cdc_audit.chain import format_commit_time
from cdc_audit.errors import CdcAuditError, InvalidInput
from cdc_audit.values import parse_json_exact

__all__ = ["STATEMENT_VERSION", "AnchorConflict", "Checkpoint", "DirectoryAnchor"]

STATEMENT_VERSION: Final = 1
_STATEMENT_KEYS: Final = frozenset(
    {
        "v",
        "stream",
        "first_seq",
        "last_seq",
        "count",
        "head_hash",
        "merkle_root",
        "created_at",
        "key_id",
    }
)


class AnchorConflict(CdcAuditError):
    """The anchor already holds a different checkpoint for the same position."""


@dataclass(frozen=True)
class Checkpoint:
    stream: str
    first_seq: int
    last_seq: int
    head_hash: bytes
    merkle_root: bytes
    created_at: datetime
    key_id: str
    signature: bytes = b""

    @property
    def count(self) -> int:
        return self.last_seq - self.first_seq + 1

    def statement(self) -> dict[str, JsonValue]:
        return {
            "v": STATEMENT_VERSION,
            "stream": self.stream,
            "first_seq": self.first_seq,
            "last_seq": self.last_seq,
            "count": self.count,
            "head_hash": self.head_hash.hex(),
            "merkle_root": self.merkle_root.hex(),
            "created_at": format_commit_time(self.created_at),
            "key_id": self.key_id,
        }

    def statement_bytes(self) -> bytes:
        """What the signature signs."""
        return canonical_bytes(self.statement())

    def record(self) -> dict[str, JsonValue]:
        """The statement with its signature: an anchor file's content, an export line's body."""
        return {"signature": self.signature.hex(), "statement": self.statement()}

    @classmethod
    def from_row(cls, statement_text: str, signature: bytes, source: str) -> Checkpoint:
        """A row of the checkpoint table (statement as text, signature as bytes)."""
        record = {"statement": parse_json_exact(statement_text), "signature": signature.hex()}
        return cls.from_record(record, source)

    @classmethod
    def from_record(cls, record: Any, source: str) -> Checkpoint:
        """Parse `record` ({"statement": ..., "signature": hex}); InvalidInput naming `source`."""
        if not isinstance(record, dict):
            raise InvalidInput(f"{source}: a checkpoint must be a JSON object")
        statement = record.get("statement")
        signature = record.get("signature")
        if not isinstance(statement, dict) or set(statement) != _STATEMENT_KEYS:
            raise InvalidInput(f"{source}: the checkpoint statement is missing or malformed")
        if statement["v"] != STATEMENT_VERSION:
            raise InvalidInput(f"{source}: checkpoint version {statement['v']} is not supported")
        try:
            checkpoint = cls(
                stream=_str(statement["stream"]),
                first_seq=_int(statement["first_seq"]),
                last_seq=_int(statement["last_seq"]),
                head_hash=bytes.fromhex(_str(statement["head_hash"])),
                merkle_root=bytes.fromhex(_str(statement["merkle_root"])),
                created_at=datetime.fromisoformat(_str(statement["created_at"])),
                key_id=_str(statement["key_id"]),
                signature=bytes.fromhex(_str(signature)),
            )
        except (TypeError, ValueError) as exc:
            raise InvalidInput(f"{source}: malformed checkpoint: {exc}") from None
        if checkpoint.statement() != statement:
            raise InvalidInput(f"{source}: the checkpoint statement is not in canonical form")
        return checkpoint


def _str(value: object) -> str:
    if not isinstance(value, str):
        raise TypeError(f"expected a string, got {type(value).__name__}")
    return value


def _int(value: object) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"expected an integer, got {type(value).__name__}")
    return value


class DirectoryAnchor:
    """Checkpoint copies in a directory tree, one file per checkpoint, never overwritten."""

    def __init__(self, root: Path, database: str, schema: str) -> None:
        self.root = root
        self.base = root / _component(database) / _component(schema)

    def __str__(self) -> str:
        return str(self.root)

    def _dir(self, stream: str) -> Path:
        return self.base / _component(stream)

    def path(self, checkpoint: Checkpoint) -> Path:
        return self._dir(checkpoint.stream) / f"{checkpoint.last_seq:020d}.json"

    def write(self, checkpoint: Checkpoint) -> bool:
        """Store `checkpoint`; False if that very checkpoint was already there.

        Raises AnchorConflict if a different checkpoint holds its place: the anchor is never
        overwritten, whatever the database says.
        """
        path = self.path(checkpoint)
        what = f"checkpoint for seq {checkpoint.last_seq} of stream {checkpoint.stream}"
        return _write_once(path, canonical_bytes(checkpoint.record()), what)

    def write_key(self, key_id: str, public_pem: str) -> bool:
        """Record a signing key's public half next to the checkpoints it will sign.

        The anchor is the auditor's root of trust for keys too: a key that only the database's
        key table knows (a superuser can add one) signs nothing the anchor vouches for.
        """
        path = self.base / "keys" / f"{_component(key_id)}.pub.pem"
        return _write_once(path, public_pem.encode(), f"key {key_id}")

    def key_pems(self) -> dict[str, str]:
        """The public keys recorded in the anchor, by key id."""
        directory = self.base / "keys"
        if not directory.is_dir():
            return {}
        return {
            path.name.removesuffix(".pub.pem"): path.read_text(encoding="ascii")
            for path in sorted(directory.glob("*.pub.pem"))
        }

    def checkpoints(self, stream: str) -> list[Checkpoint]:
        """Every anchored checkpoint of `stream`, in sequence order."""
        directory = self._dir(stream)
        if not directory.is_dir():
            return []
        found = []
        for path in sorted(directory.glob("*.json")):
            record = parse_json_exact(path.read_text(encoding="utf-8"))
            found.append(Checkpoint.from_record(record, str(path)))
        return found

    def latest(self, stream: str) -> Checkpoint | None:
        anchored = self.checkpoints(stream)
        return anchored[-1] if anchored else None


def _write_once(path: Path, data: bytes, what: str) -> bool:
    """Create `path` read-only with `data`; False if it already holds exactly that.

    Raises AnchorConflict when it holds something else: an anchor is never overwritten.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o444)
    except FileExistsError:
        if path.read_bytes() == data:
            return False
        raise AnchorConflict(f"anchor {path} already holds a different {what}") from None
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    return True


def _component(name: str) -> str:
    """A path component for a name that may hold any character but NUL."""
    safe = "".join(c if c.isalnum() or c in "-_." else f"%{ord(c):02x}" for c in name)
    return safe if safe not in ("", ".", "..") else f"%{safe}"
