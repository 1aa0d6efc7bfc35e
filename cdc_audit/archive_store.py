"""Where archives live: a local directory or an S3-compatible bucket, written once.

An archive location is a URI: ``file:///abs/path``, a plain path, or ``s3://bucket/prefix``.
For S3, boto3 finds the endpoint and credentials the usual way (``AWS_ENDPOINT_URL``,
``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``, profiles, instance roles), so any
S3-compatible store works. Objects are never overwritten: writing a name that already holds
the same bytes is a no-op (re-running an archive is idempotent), and writing different bytes
there is an `ArchiveConflict`. When the bucket has Object Lock enabled, each object is put
with a COMPLIANCE retention of `lock_days`, so not even the bucket's owner can delete or
replace it before then.
"""

from __future__ import annotations

import base64
import hashlib
import os
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import unquote, urlsplit

from .errors import CdcAuditError, InvalidInput

__all__ = [
    "ArchiveConflict",
    "ArchiveLocation",
    "ArchiveStore",
    "ArchiveUnavailable",
    "DirectoryStore",
    "S3Store",
    "open_store",
    "parse_archive_uri",
]


class ArchiveConflict(CdcAuditError):
    """An archive object already holds different bytes: archives are never overwritten."""


class ArchiveUnavailable(CdcAuditError):
    """The archive location cannot be read or written (permissions, network, no bucket)."""


@dataclass(frozen=True)
class ArchiveLocation:
    """A parsed archive URI: a directory, or a bucket and a key prefix."""

    uri: str
    directory: Path | None = None
    bucket: str | None = None
    prefix: str = ""


def parse_archive_uri(text: str) -> ArchiveLocation:
    """`file:///abs/path`, a plain path or `s3://bucket/prefix`; ValueError says what is valid."""
    if not text.strip():
        raise ValueError("expected an archive location: file:///abs/path, a path or s3://bucket")
    parts = urlsplit(text)
    if parts.scheme == "s3":
        if not parts.netloc:
            raise ValueError(f"{text!r} names no bucket: write s3://bucket/prefix")
        return ArchiveLocation(text, bucket=parts.netloc, prefix=parts.path.strip("/"))
    if parts.scheme == "file":
        if parts.netloc not in ("", "localhost") or not parts.path.startswith("/"):
            raise ValueError(f"{text!r}: a file URI needs an absolute path (file:///abs/path)")
        return ArchiveLocation(text, directory=Path(unquote(parts.path)))
    if "://" in text:
        raise ValueError(
            f"{text!r}: unknown archive scheme {parts.scheme!r}; use file:///abs/path, a path"
            " or s3://bucket/prefix"
        )
    return ArchiveLocation(text, directory=Path(text))


class ArchiveStore(Protocol):
    """Named objects (``stream/segment-...``) in one archive location."""

    uri: str

    def read(self, name: str) -> bytes | None:
        """The object's bytes, or None when there is no such object."""

    def write_once(self, name: str, data: bytes) -> bool:
        """Store `data` under `name`; False if exactly that was there (ArchiveConflict if not)."""

    def names(self) -> list[str]:
        """Every object name in the archive."""

    def lock(self) -> str:
        """How objects are protected, for people."""


def open_store(uri: str, lock_days: int | None = None) -> ArchiveStore:
    try:
        location = parse_archive_uri(uri)
    except ValueError as exc:
        raise InvalidInput(f"archive: {exc}") from None
    if location.directory is not None:
        return DirectoryStore(location.directory, uri)
    assert location.bucket is not None
    return S3Store(location.bucket, location.prefix, uri, lock_days)


class DirectoryStore:
    """Objects as read-only files under a directory."""

    def __init__(self, root: Path, uri: str) -> None:
        self.root = root
        self.uri = uri

    def _path(self, name: str) -> Path:
        return self.root.joinpath(*name.split("/"))

    def read(self, name: str) -> bytes | None:
        try:
            return self._path(name).read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise ArchiveUnavailable(f"{self._path(name)}: cannot read: {exc.strerror}") from None

    def write_once(self, name: str, data: bytes) -> bool:
        path = self._path(name)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            # Written aside, then linked into place: link refuses an existing name, so a
            # crash never leaves half an object under the real name.
            spare = path.with_name(f".{path.name}.{os.getpid()}.tmp")
            with spare.open("wb") as out:
                out.write(data)
                out.flush()
                os.fsync(out.fileno())
            spare.chmod(0o444)
            try:
                os.link(spare, path)
            except FileExistsError:
                return _same(path.read_bytes(), data, str(path))
            finally:
                spare.unlink()
        except OSError as exc:
            raise ArchiveUnavailable(f"{path}: cannot write: {exc.strerror}") from None
        return True

    def names(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(
            path.relative_to(self.root).as_posix()
            for path in self.root.rglob("*")
            if path.is_file() and not path.name.startswith(".")
        )

    def lock(self) -> str:
        return "read-only files"


def _same(existing: bytes, data: bytes, where: str) -> bool:
    if existing != data:
        raise ArchiveConflict(
            f"{where} already holds different content (sha256"
            f" {hashlib.sha256(existing).hexdigest()[:16]}, not"
            f" {hashlib.sha256(data).hexdigest()[:16]}); archives are never overwritten"
        )
    return False


class S3Store:
    """Objects in an S3-compatible bucket, under a key prefix."""

    def __init__(self, bucket: str, prefix: str, uri: str, lock_days: int | None) -> None:
        self.bucket = bucket
        self.prefix = f"{prefix}/" if prefix else ""
        self.uri = uri
        self.lock_days = lock_days
        self._client = _s3_client()
        self._locked: bool | None = None

    def _key(self, name: str) -> str:
        return self.prefix + name

    def read(self, name: str) -> bytes | None:
        try:
            answer = self._client.get_object(Bucket=self.bucket, Key=self._key(name))
            return bytes(answer["Body"].read())
        except Exception as exc:
            if _code(exc) in ("NoSuchKey", "404"):
                return None
            raise self._unavailable("read", name, exc) from None

    def write_once(self, name: str, data: bytes) -> bool:
        # Read first: a store without conditional writes still never overwrites what is there.
        existing = self.read(name)
        if existing is not None:
            return _same(existing, data, f"s3://{self.bucket}/{self._key(name)}")
        extra: dict[str, Any] = {}
        if self.locked() and self.lock_days is not None:
            extra["ObjectLockMode"] = "COMPLIANCE"
            extra["ObjectLockRetainUntilDate"] = datetime.now(UTC) + timedelta(days=self.lock_days)
        try:
            self._client.put_object(
                Bucket=self.bucket,
                Key=self._key(name),
                Body=data,
                # Object Lock requires an integrity header on every put that sets retention.
                ContentMD5=base64.b64encode(hashlib.md5(data).digest()).decode(),
                **extra,
            )
        except Exception as exc:
            raise self._unavailable("write", name, exc) from None
        return True

    def names(self) -> list[str]:
        found: list[str] = []
        try:
            pages = self._client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=self.prefix
            )
            for page in pages:
                found.extend(item["Key"][len(self.prefix) :] for item in page.get("Contents", []))
        except Exception as exc:
            raise self._unavailable("list", "", exc) from None
        return sorted(found)

    def locked(self) -> bool:
        """Whether the bucket has Object Lock enabled (asked once)."""
        if self._locked is None:
            try:
                answer = self._client.get_object_lock_configuration(Bucket=self.bucket)
                config = answer.get("ObjectLockConfiguration", {})
                self._locked = config.get("ObjectLockEnabled") == "Enabled"
            except Exception as exc:
                if _code(exc) != "ObjectLockConfigurationNotFoundError":
                    raise self._unavailable("inspect", "", exc) from None
                self._locked = False
        return self._locked

    def lock(self) -> str:
        if not self.locked():
            return "no Object Lock on the bucket"
        if self.lock_days is None:
            return "Object Lock: the bucket's default retention (no archive.lock_days)"
        return f"Object Lock COMPLIANCE for {self.lock_days} day(s)"

    def _unavailable(self, doing: str, name: str, exc: Exception) -> ArchiveUnavailable:
        where = f"s3://{self.bucket}/{self._key(name)}"
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return ArchiveUnavailable(f"{where}: cannot {doing}: {reason}")


def _code(exc: Exception) -> str:
    """The S3 error code of a botocore ClientError ('' for anything else)."""
    response = getattr(exc, "response", None)
    if not isinstance(response, dict):
        return ""
    return str(response.get("Error", {}).get("Code", ""))


def _s3_client() -> Any:
    try:
        import boto3  # an optional extra: only S3 archives need it
    except ImportError:
        raise InvalidInput("s3:// archives need boto3: pip install 'cdc-audit[s3]'") from None
    return boto3.client("s3")
