"""Ed25519 keys without a database: files, modes, key ids, signatures, loading errors."""

from __future__ import annotations

import hashlib
import logging
import re
import stat
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from cdc_audit import keys
from cdc_audit.errors import InvalidInput


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def raw(key: keys.PublicKey) -> bytes:
    return key.public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def refused(message: str) -> AbstractContextManager[Any]:
    """The error must be exactly `message`: one line, naming the file and what is wrong."""
    assert "\n" not in message
    return pytest.raises(InvalidInput, match=f"^{re.escape(message)}$")


def test_generate_writes_owner_only_private_and_readable_public(tmp_path: Path) -> None:
    out = tmp_path / "new" / "keys"
    private, public, kid = keys.generate(out)
    assert (private, public) == (out / "signing_key.pem", out / "signing_key.pub.pem")
    assert mode(out) == 0o700
    assert mode(private) == 0o600
    assert mode(public) == 0o644
    assert private.read_text().startswith("-----BEGIN PRIVATE KEY-----\n")
    assert public.read_text().startswith("-----BEGIN PUBLIC KEY-----\n")
    assert keys.load_signing_key(private).key_id == kid
    assert keys.load_public_key(public).key_id == kid


def test_generate_refuses_to_overwrite_a_key(tmp_path: Path) -> None:
    private, public, _ = keys.generate(tmp_path)
    before = private.read_bytes(), public.read_bytes()
    with refused(f"{private} already exists; refusing to overwrite a signing key"):
        keys.generate(tmp_path)
    assert (private.read_bytes(), public.read_bytes()) == before


def test_generate_leaves_nothing_when_the_public_file_exists(tmp_path: Path) -> None:
    public = tmp_path / "signing_key.pub.pem"
    public.write_text("someone else's key\n")
    with refused(f"{public} already exists; refusing to overwrite a signing key"):
        keys.generate(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["signing_key.pub.pem"]
    assert public.read_text() == "someone else's key\n"


def test_generate_into_a_file_is_refused(tmp_path: Path) -> None:
    target = tmp_path / "file"
    target.write_text("")
    with refused(f"{target}: exists and is not a directory"):
        keys.generate(target)


def test_key_id_is_truncated_sha256_of_the_raw_public_key(tmp_path: Path) -> None:
    _, public_path, kid = keys.generate(tmp_path)
    public = keys.load_public_key(public_path)
    assert kid == hashlib.sha256(raw(public)).hexdigest()[:32]
    assert len(kid) == 32 and kid == kid.lower()
    assert keys.key_id(public.public) == kid
    assert keys.load_public_key(public_path).key_id == kid, "stable across loads"


def test_key_id_of_a_known_key_never_changes() -> None:
    """Part of the trail's format: checkpoints carry it, so it is pinned here."""
    private = Ed25519PrivateKey.from_private_bytes(bytes(range(32)))
    public_raw = bytes.fromhex("03a107bff3ce10be1d70dd18e74bc09967e4d6309ba50d5f1ddc8664125531b8")
    assert (
        keys.SigningKey.of(private)
        .public_key()
        .public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        == public_raw
    )
    assert keys.key_id(private.public_key()) == "56475aa75463474c0285df5dbf2bcab7"
    assert hashlib.sha256(public_raw).hexdigest().startswith("56475aa75463474c0285df5dbf2bcab7")


def test_sign_and_verify_round_trip(tmp_path: Path) -> None:
    private_path, public_path, _ = keys.generate(tmp_path)
    signer = keys.load_signing_key(private_path)
    verifier = keys.load_public_key(public_path)
    data = b"stream user seq 1..100 head 00ff"
    signature = signer.sign(data)
    assert len(signature) == 64
    assert verifier.verify(signature, data)
    assert signer.public_key() == verifier


def test_tampered_data_or_signature_fails_without_raising(tmp_path: Path) -> None:
    private_path, public_path, _ = keys.generate(tmp_path)
    signer = keys.load_signing_key(private_path)
    verifier = keys.load_public_key(public_path)
    data = b"checkpoint"
    signature = signer.sign(data)
    flipped = bytes([signature[0] ^ 1]) + signature[1:]
    assert not verifier.verify(signature, data + b"!")
    assert not verifier.verify(flipped, data)
    assert not verifier.verify(signature[:-1], data)
    assert not verifier.verify(b"", data)
    other = keys.SigningKey.of(Ed25519PrivateKey.generate())
    assert not verifier.verify(other.sign(data), data)


def test_public_key_pem_round_trips_and_is_canonical(tmp_path: Path) -> None:
    _, public_path, kid = keys.generate(tmp_path)
    text = public_path.read_text()
    key = keys.public_key_from_pem(text.replace("\n", "\r\n"))
    assert (key.key_id, key.pem) == (kid, text)


def test_signing_key_repr_does_not_show_the_private_key(tmp_path: Path) -> None:
    private_path, _, kid = keys.generate(tmp_path)
    assert repr(keys.load_signing_key(private_path)) == f"SigningKey(key_id='{kid}')"


def test_private_key_given_as_public_key_is_refused(tmp_path: Path) -> None:
    private_path, _, _ = keys.generate(tmp_path)
    with refused(
        f"{private_path}: is a private key, not a public key: give the .pub.pem file"
        " (the private key stays with the worker)"
    ):
        keys.load_public_key(private_path)


def test_public_key_given_as_signing_key_is_refused(tmp_path: Path) -> None:
    _, public_path, _ = keys.generate(tmp_path)
    with refused(
        f"{public_path}: is a public key, not a private key: give the signing_key.pem"
        " that cdc-audit keygen wrote"
    ):
        keys.load_signing_key(public_path)


def test_missing_and_unreadable_files(tmp_path: Path) -> None:
    missing = tmp_path / "nope.pem"
    with refused(f"{missing}: no such file"):
        keys.load_signing_key(missing)
    with refused(f"{missing}: no such file"):
        keys.load_public_key(missing)
    with refused(f"{tmp_path}: is a directory, not a key file"):
        keys.load_public_key(tmp_path)


def test_not_pem(tmp_path: Path) -> None:
    path = tmp_path / "key.der"
    path.write_bytes(
        Ed25519PrivateKey.generate().private_bytes(
            serialization.Encoding.DER,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    message = f"{path}: not a PEM file (no -----BEGIN ...----- line; cdc-audit keygen writes one)"
    with refused(message):
        keys.load_signing_key(path)
    with refused(message):
        keys.load_public_key(path)


def test_damaged_pem_and_other_pem_kinds(tmp_path: Path) -> None:
    damaged = tmp_path / "damaged.pem"
    damaged.write_text("-----BEGIN PUBLIC KEY-----\nnot base64!\n-----END PUBLIC KEY-----\n")
    with refused(f"{damaged}: its PEM PUBLIC KEY block cannot be decoded"):
        keys.load_public_key(damaged)
    cert = tmp_path / "cert.pem"
    cert.write_text("-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n")
    with refused(f"{cert}: holds a PEM CERTIFICATE, not a public key"):
        keys.load_public_key(cert)
    with refused(f"{cert}: holds a PEM CERTIFICATE, not a private key"):
        keys.load_signing_key(cert)


def test_keys_of_other_algorithms_are_refused(tmp_path: Path) -> None:
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    ec_key = ec.generate_private_key(ec.SECP256R1())
    for name, key, kind in (("rsa", rsa_key, "an RSA"), ("ec", ec_key, "an EC")):
        private = tmp_path / f"{name}.pem"
        private.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        public = tmp_path / f"{name}.pub.pem"
        public.write_bytes(
            key.public_key().public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )
        )
        with refused(
            f"{private}: is {kind} key, not an Ed25519 key: create one with cdc-audit keygen"
        ):
            keys.load_signing_key(private)
        with refused(
            f"{public}: is {kind} key, not an Ed25519 key: create one with cdc-audit keygen"
        ):
            keys.load_public_key(public)


def test_encrypted_private_key_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "encrypted.pem"
    path.write_bytes(
        Ed25519PrivateKey.generate().private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"secret"),
        )
    )
    with refused(
        f"{path}: is an encrypted private key; cdc-audit needs it unencrypted"
        " (protect the file with mode 0600 instead)"
    ):
        keys.load_signing_key(path)


def test_pem_text_errors_name_their_source() -> None:
    with refused(
        "row k1: not a PEM file (no -----BEGIN ...----- line; cdc-audit keygen writes one)"
    ):
        keys.public_key_from_pem("garbage", source="row k1")


def test_a_private_key_others_can_read_is_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    private_path, _, kid = keys.generate(tmp_path)
    with caplog.at_level(logging.WARNING, logger="cdc_audit.keys"):
        keys.load_signing_key(private_path)
    assert caplog.records == []
    private_path.chmod(0o640)
    with caplog.at_level(logging.WARNING, logger="cdc_audit.keys"):
        assert keys.load_signing_key(private_path).key_id == kid
    assert [r.getMessage() for r in caplog.records] == [
        f"{private_path}: mode 0640 lets group or others access the signing key;"
        f" chmod 600 {private_path}"
    ]
