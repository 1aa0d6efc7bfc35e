"""Inclusion proofs: one event, shown to a third party, proven part of a signed checkpoint.

THE PROOF FORMAT (version 1), a canonical JSON object::

    type         "cdc-audit-proof"
    v            1
    event        the event, as an export's event line (`cdc_audit.export`)
    checkpoint   the covering checkpoint, as an anchor record {"signature", "statement"}
    leaf_index   the event's position in the checkpoint's range: seq - first_seq
    audit_path   RFC 6962 audit path, lower-case hex hashes from the leaf up

Checking it needs only the signer's public key: the event's payload gives its payload_hash,
its header and prev_hash give its hash, the hash and the audit path give a Merkle root, and
that root, with the tree size (the checkpoint's count), is what the key signed. The tree size
and root are taken from the signed statement, never from the proof's other fields.
"""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import psycopg
from psycopg import sql
from psycopg.rows import TupleRow

from cdc_audit.canonical import JsonValue, canonical_bytes
from cdc_audit.checkpoints import Checkpoint
from cdc_audit.errors import CdcAuditError, IntegrityError, InvalidInput
from cdc_audit.export import event_from_line, event_line
from cdc_audit.keys import PublicKey
from cdc_audit.merkle import audit_path, root_from_path
from cdc_audit.values import parse_json_exact
from cdc_audit.verify import read_stream, stored_checkpoints

__all__ = ["ProofVerdict", "make_proof", "verify_proof"]

_TYPE: Final = "cdc-audit-proof"
_VERSION: Final = 1
_KEYS: Final = frozenset({"type", "v", "event", "checkpoint", "leaf_index", "audit_path"})


def make_proof(
    conn: psycopg.Connection[TupleRow], schema: str, event_id: str
) -> dict[str, JsonValue]:
    """The proof for one event; the event must be covered by a checkpoint."""
    stream, seq = _locate(conn, schema, event_id)
    covering = [
        c for c in stored_checkpoints(conn, schema, stream) if c.first_seq <= seq <= c.last_seq
    ]
    if not covering:
        raise CdcAuditError(
            f"event {event_id} (stream {stream}, seq {seq}) is not covered by a checkpoint yet:"
            " run cdc-audit checkpoint, then prove it"
        )
    checkpoint = covering[0]
    events = [
        e for e in read_stream(conn, schema, stream, checkpoint.first_seq - 1)
        if e.seq <= checkpoint.last_seq
    ]  # fmt: skip
    index = seq - checkpoint.first_seq
    return {
        "type": _TYPE,
        "v": _VERSION,
        "event": event_line(events[index]),
        "checkpoint": checkpoint.record(),
        "leaf_index": index,
        "audit_path": [h.hex() for h in audit_path([e.hash for e in events], index)],
    }


def _locate(conn: psycopg.Connection[TupleRow], schema: str, event_id: str) -> tuple[str, int]:
    try:
        wanted = str(uuid.UUID(event_id))
    except ValueError:
        raise InvalidInput(f"{event_id!r} is not an event id (a UUID)") from None
    row = conn.execute(
        sql.SQL("SELECT stream, seq FROM {}.event WHERE event_id = %s").format(
            sql.Identifier(schema)
        ),
        (wanted,),
    ).fetchone()
    if row is None:
        raise InvalidInput(f"no event {wanted} in {schema}.event")
    return row[0], row[1]


@dataclass(frozen=True)
class ProofVerdict:
    event_id: str
    stream: str
    seq: int
    checkpoint: Checkpoint

    def describe(self) -> str:
        c = self.checkpoint
        return (
            f"event {self.event_id} (stream {self.stream}, seq {self.seq}) is included in the"
            f" checkpoint of seq {c.first_seq}-{c.last_seq} signed by key {c.key_id}: ok"
        )


def verify_proof(path: Path, keys: Mapping[str, PublicKey]) -> ProofVerdict:
    """Check a proof file; IntegrityError (exit 1) naming what does not hold."""
    proof = _read(path)
    checkpoint = Checkpoint.from_record(proof["checkpoint"], f"{path}: checkpoint")
    event = event_from_line(proof["event"], f"{path}: event")
    index, steps = proof["leaf_index"], proof["audit_path"]
    if not isinstance(index, int) or not isinstance(steps, list):
        raise InvalidInput(f"{path}: leaf_index must be an integer, audit_path a list")

    def fail(what: str) -> IntegrityError:
        return IntegrityError(event.stream, event.seq, what)

    key = keys.get(checkpoint.key_id)
    if key is None:
        raise fail(f"the checkpoint is signed by key {checkpoint.key_id}, not a given one")
    if not key.verify(checkpoint.signature, checkpoint.statement_bytes()):
        raise fail("checkpoint signature invalid")
    if event.stream != checkpoint.stream or index != event.seq - checkpoint.first_seq:
        raise fail("the event is not at the position the proof claims in the checkpoint")
    if not event.erased and (
        hashlib.sha256(canonical_bytes(event.payload())).digest() != event.payload_hash
    ):
        raise fail("payload changed: it does not match its payload_hash")
    if hashlib.sha256(event.prev_hash + canonical_bytes(event.header())).digest() != event.hash:
        raise fail("header changed: the event's hash does not match its fields")
    try:
        path_hashes = [bytes.fromhex(h) for h in steps]
        root = root_from_path(event.hash, index, checkpoint.count, path_hashes)
    except (TypeError, ValueError) as exc:
        raise fail(f"malformed audit path: {exc}") from None
    if root != checkpoint.merkle_root:
        raise fail("the audit path does not lead to the checkpoint's Merkle root")
    return ProofVerdict(event.event_id, event.stream, event.seq, checkpoint)


def _read(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise InvalidInput(f"{path}: cannot read the proof: {exc.strerror}") from None
    proof = parse_json_exact(text)
    if not isinstance(proof, dict) or set(proof) != _KEYS:
        raise InvalidInput(f"{path}: not a cdc-audit proof (expected the keys {sorted(_KEYS)})")
    if proof["type"] != _TYPE or proof["v"] != _VERSION:
        raise InvalidInput(f"{path}: unsupported proof type or version")
    return proof
