"""The verifier's per-event checks, fed the way the online and offline readers feed them."""

from __future__ import annotations

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from cdc_audit.canonical import JsonValue
from cdc_audit.chain import SealedEvent, StreamChain
from cdc_audit.keys import SigningKey
from cdc_audit.verify import PayloadMismatch, StreamVerifier, TrailProblem, _chain_time

from .test_chain import DRAFT_1, DRAFT_2


def _feed(
    verifier: StreamVerifier,
    event: SealedEvent,
    *,
    payload: dict[str, JsonValue] | None = None,
    signature: str | None = None,
    key_id: str | None = None,
) -> None:
    verifier.record(
        event.seq,
        event.draft.stream,
        event.header(),
        event.draft.payload() if payload is None else payload,
        False,
        event.prev_hash.hex(),
        event.hash.hex(),
        signature,
        key_id,
    )


def _sealed() -> tuple[SealedEvent, SealedEvent]:
    chain = StreamChain("user")
    return chain.seal(DRAFT_1), chain.seal(DRAFT_2)


def test_a_sealed_chain_verifies() -> None:
    first, second = _sealed()
    verifier = StreamVerifier("user", {})
    _feed(verifier, first)
    _feed(verifier, second)
    assert verifier.checked == 2
    assert verifier.prev == second.hash


def test_a_payload_mismatch_changes_nothing_so_the_reader_can_retry() -> None:
    # A reader that parsed 90.50 as a float gets a different payload: the retry with the
    # exactly parsed payload must find the verifier where it was.
    first, _ = _sealed()
    verifier = StreamVerifier("user", {})
    inexact = {**DRAFT_1.payload(), "new": {"id": 42, "balance": 90.5}}
    with pytest.raises(PayloadMismatch) as failed:
        _feed(verifier, first, payload=inexact)
    assert failed.value.seq == 1
    assert (verifier.checked, verifier.next_seq, verifier.range.size) == (0, 1, 0)
    _feed(verifier, first)
    assert verifier.checked == 1


def test_an_event_signature_must_be_lower_case_hex() -> None:
    key = SigningKey.of(Ed25519PrivateKey.generate())
    first, _ = _sealed()
    signature = key.sign(first.hash).hex()
    keys = {key.key_id: key.public_key()}
    _feed(StreamVerifier("user", keys), first, signature=signature, key_id=key.key_id)
    with pytest.raises(TrailProblem, match="signature invalid"):
        _feed(StreamVerifier("user", keys), first, signature=signature.upper(), key_id=key.key_id)
    with pytest.raises(TrailProblem, match="signature invalid"):
        _feed(StreamVerifier("user", keys), first, signature="zz", key_id=key.key_id)


@pytest.mark.parametrize(
    ("printed", "chain"),
    [
        ("2026-11-28T09:37:57.210481+00:00", "2026-11-28T09:37:57.210481+00:00"),
        ("2026-11-28T09:37:57.21+00:00", "2026-11-28T09:37:57.210000+00:00"),
        ("2026-11-28T09:37:57.5+00:00", "2026-11-28T09:37:57.500000+00:00"),
        ("2026-11-28T09:37:57.00001+00:00", "2026-11-28T09:37:57.000010+00:00"),
        ("2026-11-28T09:37:57+00:00", "2026-11-28T09:37:57+00:00"),
    ],
)
def test_time_printed_by_postgresql_is_read_in_the_chains_form(printed: str, chain: str) -> None:
    # to_json(timestamptz) drops the fraction's trailing zeros; the chain keeps six digits.
    assert _chain_time(printed) == chain
