"""Ed25519 signing keys: generate, load, fingerprint, register, retire.

The private key lives only with the worker (``CDC_AUDIT_SIGNING_KEY_FILE``); the database holds
public keys in ``{schema}.signing_key``, so that an auditor can verify signatures with nothing
but what the database (or an export) carries, and a superuser cannot sign anything.

The **key id** is part of the trail's format: checkpoints and signed events carry it, and
``signing_key.key_id`` is keyed by it. It is the first 32 lowercase hex characters (128 bits)
of SHA-256 of the 32-byte raw public key (see :func:`key_id`). Never change how it is computed.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import psycopg
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed448, rsa, x448, x25519
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)
from psycopg import sql
from psycopg.rows import TupleRow

from .db import database_error
from .errors import CdcAuditError, InvalidInput, NotInstalled

__all__ = [
    "PRIVATE_KEY_FILE",
    "PUBLIC_KEY_FILE",
    "KeyRow",
    "PublicKey",
    "SigningKey",
    "generate",
    "key_id",
    "list_keys",
    "load_public_key",
    "load_signing_key",
    "public_key_from_pem",
    "register",
    "registered_keys",
    "require_registered",
    "retire",
]

log = logging.getLogger("cdc_audit.keys")

PRIVATE_KEY_FILE = "signing_key.pem"
PUBLIC_KEY_FILE = "signing_key.pub.pem"
KEY_ID_LENGTH = 32
"""Hex characters of the key id: 128 bits of SHA-256, plenty against accidental collisions."""

_KEY_ID = re.compile(rf"[0-9a-f]{{{KEY_ID_LENGTH}}}")
_PEM_LABEL = re.compile(rb"-----BEGIN ([A-Z0-9 ]+)-----")
_ALGORITHM = "ed25519"

Connection = psycopg.Connection[TupleRow]


def key_id(public_key: Ed25519PublicKey) -> str:
    """The key id: first 32 lowercase hex characters of SHA-256 of the raw 32-byte public key.

    Derived from the key itself (not assigned by the database), so an offline verifier with only
    a public key file can tell which checkpoints it signed.
    """
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:KEY_ID_LENGTH]


@dataclass(frozen=True)
class PublicKey:
    """A public key, its key id and its canonical SubjectPublicKeyInfo PEM.

    ``pem`` is re-serialised from the key, not copied from the file, so that the same key always
    has the same text in ``signing_key.public_key`` whatever line endings its file had.
    """

    public: Ed25519PublicKey
    key_id: str
    pem: str

    @classmethod
    def of(cls, public: Ed25519PublicKey) -> PublicKey:
        pem = public.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        ).decode("ascii")
        return cls(public, key_id(public), pem)

    def verify(self, signature: bytes, data: bytes) -> bool:
        """True when `signature` signs `data`; a bad signature is an answer, not an exception."""
        try:
            self.public.verify(signature, data)
        except InvalidSignature:
            return False
        return True


@dataclass(frozen=True)
class SigningKey:
    """The worker's private key and its key id (the id that goes next to each signature)."""

    private: Ed25519PrivateKey = field(repr=False)
    key_id: str

    @classmethod
    def of(cls, private: Ed25519PrivateKey) -> SigningKey:
        return cls(private, key_id(private.public_key()))

    def sign(self, data: bytes) -> bytes:
        return self.private.sign(data)

    def public_key(self) -> PublicKey:
        return PublicKey.of(self.private.public_key())


@dataclass(frozen=True)
class KeyRow:
    """One row of ``signing_key`` as ``keys list`` shows it."""

    key_id: str
    algorithm: str
    added_at: datetime
    added_by: str
    retired_at: datetime | None

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready: timestamps as ISO 8601 with time zone, as everywhere in the contract."""
        return {
            "key_id": self.key_id,
            "algorithm": self.algorithm,
            "added_at": self.added_at.isoformat(),
            "added_by": self.added_by,
            "retired_at": None if self.retired_at is None else self.retired_at.isoformat(),
        }


# --- files ---------------------------------------------------------------------------------


def generate(out_dir: Path) -> tuple[Path, Path, str]:
    """Write a new key pair into `out_dir`; returns (private path, public path, key id).

    The private file is created with O_EXCL and mode 0600 in one call, so it is never visible
    to others for an instant and an existing key (which may have signed the trail) is never
    overwritten. Either both files are written or neither is left behind.
    """
    _make_private_dir(out_dir)
    key = SigningKey.of(Ed25519PrivateKey.generate())
    private_pem = key.private.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    private_path = out_dir / PRIVATE_KEY_FILE
    public_path = out_dir / PUBLIC_KEY_FILE
    created: list[Path] = []
    try:
        for path, data, mode in (
            (private_path, private_pem, 0o600),
            (public_path, key.public_key().pem.encode("ascii"), 0o644),
        ):
            _write_new(path, data, mode)
            created.append(path)
    except BaseException:
        for path in created:
            with suppress(OSError):
                path.unlink()
        raise
    return private_path, public_path, key.key_id


def _make_private_dir(out_dir: Path) -> None:
    """Create `out_dir` for the owner only; an existing directory is left as it is."""
    try:
        out_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    except FileExistsError:
        raise InvalidInput(f"{out_dir}: exists and is not a directory") from None
    except OSError as exc:
        raise InvalidInput(f"{out_dir}: cannot create directory: {exc.strerror}") from None


def _write_new(path: Path, data: bytes, mode: int) -> None:
    """Create `path` exclusively with `mode` (whatever the umask), write and sync `data`."""
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, mode)
    except FileExistsError:
        raise InvalidInput(f"{path} already exists; refusing to overwrite a signing key") from None
    except OSError as exc:
        raise InvalidInput(f"{path}: cannot create: {exc.strerror}") from None
    try:
        with os.fdopen(fd, "wb") as file:
            os.fchmod(file.fileno(), mode)
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
    except OSError as exc:
        with suppress(OSError):
            path.unlink()
        raise InvalidInput(f"{path}: cannot write: {exc.strerror}") from None


def load_signing_key(path: Path) -> SigningKey:
    """The worker's private key from a PKCS#8 PEM file, with a one-line error for anything else."""
    data = _read(path)
    _warn_if_exposed(path)
    return SigningKey.of(_parse_private(str(path), data))


def load_public_key(path: Path) -> PublicKey:
    """A public key from a SubjectPublicKeyInfo PEM file; refuses a private key file."""
    return public_key_from_pem(_read(path).decode("ascii", "replace"), source=str(path))


def public_key_from_pem(text: str, *, source: str = "public key") -> PublicKey:
    """A public key from PEM text; `source` names where the text came from in errors."""
    data = text.encode("utf-8", "replace")
    label = _pem_label(source, data)
    if "PRIVATE KEY" in label:
        raise InvalidInput(
            f"{source}: is a private key, not a public key: give the .pub.pem file"
            " (the private key stays with the worker)"
        )
    if "PUBLIC KEY" not in label:
        raise InvalidInput(f"{source}: holds a PEM {label}, not a public key")
    try:
        public = serialization.load_pem_public_key(data)
    except (ValueError, TypeError):
        raise InvalidInput(f"{source}: its PEM {label} block cannot be decoded") from None
    if not isinstance(public, Ed25519PublicKey):
        raise _not_ed25519(source, public)
    return PublicKey.of(public)


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise InvalidInput(f"{path}: no such file") from None
    except IsADirectoryError:
        raise InvalidInput(f"{path}: is a directory, not a key file") from None
    except OSError as exc:
        raise InvalidInput(f"{path}: cannot read: {exc.strerror}") from None


def _warn_if_exposed(path: Path) -> None:
    """A private key others can read is a key anyone on the host could sign the trail with."""
    with suppress(OSError):
        mode = path.stat().st_mode & 0o777
        if mode & 0o077:
            log.warning(
                "%s: mode %04o lets group or others access the signing key; chmod 600 %s",
                path,
                mode,
                path,
            )


def _pem_label(source: str, data: bytes) -> str:
    match = _PEM_LABEL.search(data)
    if match is None:
        raise InvalidInput(
            f"{source}: not a PEM file (no -----BEGIN ...----- line; cdc-audit keygen writes one)"
        )
    return match[1].decode("ascii")


def _parse_private(source: str, data: bytes) -> Ed25519PrivateKey:
    label = _pem_label(source, data)
    if "PUBLIC KEY" in label:
        raise InvalidInput(
            f"{source}: is a public key, not a private key: give the {PRIVATE_KEY_FILE}"
            " that cdc-audit keygen wrote"
        )
    if "PRIVATE KEY" not in label:
        raise InvalidInput(f"{source}: holds a PEM {label}, not a private key")
    try:
        private = serialization.load_pem_private_key(data, password=None)
    except TypeError:
        raise InvalidInput(
            f"{source}: is an encrypted private key; cdc-audit needs it unencrypted"
            " (protect the file with mode 0600 instead)"
        ) from None
    except ValueError:
        raise InvalidInput(f"{source}: its PEM {label} block cannot be decoded") from None
    if not isinstance(private, Ed25519PrivateKey):
        raise _not_ed25519(source, private)
    return private


_KINDS: tuple[tuple[tuple[type, ...], str], ...] = (
    ((rsa.RSAPrivateKey, rsa.RSAPublicKey), "an RSA"),
    ((ec.EllipticCurvePrivateKey, ec.EllipticCurvePublicKey), "an EC"),
    ((dsa.DSAPrivateKey, dsa.DSAPublicKey), "a DSA"),
    ((ed448.Ed448PrivateKey, ed448.Ed448PublicKey), "an Ed448"),
    ((x25519.X25519PrivateKey, x25519.X25519PublicKey), "an X25519"),
    ((x448.X448PrivateKey, x448.X448PublicKey), "an X448"),
)


def _not_ed25519(source: str, key: object) -> InvalidInput:
    kind = next((name for types, name in _KINDS if isinstance(key, types)), "another kind of")
    return InvalidInput(
        f"{source}: is {kind} key, not an Ed25519 key: create one with cdc-audit keygen"
    )


# --- database --------------------------------------------------------------------------------


@contextmanager
def _database(doing: str) -> Iterator[None]:
    """Database failures become one-line errors that keep the SQLSTATE."""
    try:
        yield
    except psycopg.Error as exc:
        raise database_error(exc, doing) from exc


def _table(schema: str) -> sql.Identifier:
    return sql.Identifier(schema, "signing_key")


def _require_table(conn: Connection, schema: str) -> None:
    """Say "not installed" instead of a bare "relation does not exist" (and keep the
    transaction usable, which a failed statement would not)."""
    row = conn.execute(
        "SELECT to_regclass(format('%%I.signing_key', %s::text)) IS NOT NULL", (schema,)
    ).fetchone()
    if not row or not row[0]:
        raise NotInstalled(
            f"{schema}.signing_key does not exist: cdc-audit is not installed in schema"
            f" {schema} (run cdc-audit apply)"
        )


def _stored(conn: Connection, schema: str, kid: str) -> tuple[str, datetime | None] | None:
    """(public key PEM, retired_at) of a registered key, or None."""
    row = conn.execute(
        sql.SQL("SELECT public_key, retired_at FROM {} WHERE key_id = %s").format(_table(schema)),
        (kid,),
    ).fetchone()
    return None if row is None else (row[0], row[1])


def _same_key(stored_pem: str, key: PublicKey) -> bool:
    try:
        stored = public_key_from_pem(stored_pem)
    except InvalidInput:
        return False
    return stored.pem == key.pem


def _mismatch(schema: str, kid: str) -> CdcAuditError:
    return CdcAuditError(
        f"{schema}.signing_key holds a different public key under key id {kid}:"
        " the key table was altered"
    )


def _when(moment: datetime) -> str:
    return moment.isoformat(timespec="seconds")


def register(conn: Connection, schema: str, key: PublicKey) -> bool:
    """Add a public key; False when this very key is already there (adding is idempotent).

    A retired key is refused rather than silently left retired: the caller meant to sign with
    it, and the table allows retiring only once, never un-retiring.
    """
    with _database("keys add"):
        _require_table(conn, schema)
        inserted = conn.execute(
            sql.SQL(
                "INSERT INTO {} (key_id, public_key, algorithm) VALUES (%s, %s, %s)"
                " ON CONFLICT (key_id) DO NOTHING RETURNING key_id"
            ).format(_table(schema)),
            (key.key_id, key.pem, _ALGORITHM),
        ).fetchone()
        if inserted is not None:
            return True
        stored = _stored(conn, schema, key.key_id)
    if stored is None or not _same_key(stored[0], key):
        raise _mismatch(schema, key.key_id)
    if stored[1] is not None:
        raise InvalidInput(
            f"key {key.key_id} is registered in {schema}.signing_key but was retired at"
            f" {_when(stored[1])}; a retired key stays retired: make a new one with"
            " cdc-audit keygen"
        )
    return False


def list_keys(conn: Connection, schema: str) -> list[KeyRow]:
    """Every registered key, oldest first, retired ones included."""
    with _database("keys list"):
        _require_table(conn, schema)
        rows = conn.execute(
            sql.SQL(
                "SELECT key_id, algorithm, added_at, added_by, retired_at FROM {}"
                " ORDER BY added_at, key_id"
            ).format(_table(schema))
        ).fetchall()
    return [KeyRow(*row) for row in rows]


def retire(conn: Connection, schema: str, key_id: str) -> None:
    """Stop a key from signing; its signatures stay verifiable (the row is kept for ever)."""
    kid = key_id.strip().lower()
    shown = kid if _KEY_ID.fullmatch(kid) else repr(key_id)
    with _database("keys retire"):
        _require_table(conn, schema)
        done = conn.execute(
            sql.SQL(
                "UPDATE {} SET retired_at = now() WHERE key_id = %s AND retired_at IS NULL"
                " RETURNING key_id"
            ).format(_table(schema)),
            (kid,),
        ).fetchone()
        if done is not None:
            return
        stored = _stored(conn, schema, kid)
    if stored is None:
        raise InvalidInput(
            f"no key {shown} is registered in {schema}.signing_key; cdc-audit keys list shows them"
        )
    retired = "" if stored[1] is None else f" at {_when(stored[1])}"
    raise InvalidInput(f"key {shown} was already retired{retired}")


def registered_keys(conn: Connection, schema: str) -> dict[str, PublicKey]:
    """Every key by key id, retired ones included: signatures they made must still verify.

    A row whose PEM does not hash to its key id is refused, not skipped: a verifier that
    trusted it would accept whatever a forger signed under that id.
    """
    with _database("reading signing keys"):
        _require_table(conn, schema)
        rows = conn.execute(
            sql.SQL("SELECT key_id, algorithm, public_key FROM {} ORDER BY key_id").format(
                _table(schema)
            )
        ).fetchall()
    keys: dict[str, PublicKey] = {}
    for kid, algorithm, pem in rows:
        if algorithm != _ALGORITHM:
            raise CdcAuditError(
                f"{schema}.signing_key: key {kid} has algorithm {algorithm!r}; only"
                f" {_ALGORITHM} is supported"
            )
        key = public_key_from_pem(pem, source=f"{schema}.signing_key key {kid}")
        if key.key_id != kid:
            raise _mismatch(schema, kid)
        keys[kid] = key
    return keys


def require_registered(conn: Connection, schema: str, key: SigningKey) -> None:
    """Refuse to sign with a key an auditor could not find (or that was retired)."""
    with _database("reading signing keys"):
        _require_table(conn, schema)
        stored = _stored(conn, schema, key.key_id)
    if stored is None:
        raise InvalidInput(
            f"signing key {key.key_id} is not registered in {schema}.signing_key:"
            " run cdc-audit keys add <public key file>"
        )
    pem, retired_at = stored
    if retired_at is not None:
        raise InvalidInput(
            f"signing key {key.key_id} was retired at {_when(retired_at)}: generate a new key"
            " (cdc-audit keygen), register it (cdc-audit keys add) and give it to the worker"
        )
    if not _same_key(pem, key.public_key()):
        raise _mismatch(schema, key.key_id)
