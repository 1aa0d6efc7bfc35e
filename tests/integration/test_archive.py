"""Archival: what a purge drops is archived first (to a directory or an S3-compatible bucket),
the archive verifies offline, archive and remaining trail verify as one chain, and any change
to the archive is caught.

The months purged are sealed in January and February 2026 as in test_purge; the S3 store is
moto's server, started on a loopback port by the test.
"""

from __future__ import annotations

import gzip
import shutil
import socket
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import boto3
import pytest
from botocore.exceptions import ClientError
from moto.server import ThreadedMotoServer

from cdc_audit.archive import archive_job, archive_streams
from cdc_audit.archive_store import open_store
from cdc_audit.db import connect
from cdc_audit.job_context import JobContext
from cdc_audit.keys import load_signing_key
from cdc_audit.policy import load_policy

from .fix_policy import WritePolicy
from .pg import Database
from .test_purge import FEBRUARY, JANUARY, POLICY, Purged, _write_now

pytestmark = pytest.mark.integration


def _setup(database: Database, tmp_path: Path, target: str) -> Purged:
    database.execute(
        "CREATE TABLE accounts (id int PRIMARY KEY, owner text);"
        "CREATE TABLE roles (id int PRIMARY KEY, name text)"
    )
    policy = tmp_path / "policy.yaml"
    policy.write_text(POLICY + f"archive: {{to: '{target}', lock_days: 1}}\n")
    setup = Purged(database, tmp_path, policy)
    assert setup.cli("keygen", "--out", str(tmp_path / "keys")).returncode == 0
    assert setup.cli("apply").returncode == 0
    assert setup.cli("keys", "add", str(setup.key.with_suffix(".pub.pem"))).returncode == 0
    return setup


def _ok(purged: Purged, *args: str) -> str:
    result = purged.cli(*args)
    assert result.returncode == 0, (result.stdout, result.stderr)
    return str(result.stdout)


def _round_trip(purged: Purged, uri: str) -> None:
    """archive -> purge -> verify the archive offline and with the trail, as one chain."""
    # January 1-10 and February 11-20, one checkpoint spanning both months (7-12, ...).
    purged.seal_history("user", [(JANUARY, 10), (FEBRUARY, 10)], every=6)
    worker = purged.worker()
    try:
        _write_now(purged.db, range(1, 4))
        assert purged.cli("checkpoint").returncode == 0
        dropped = _ok(purged, "purge")
        assert "purged 2 partition(s), 20 event(s)" in dropped
        assert purged.db.scalar("SELECT min(seq) FROM cdc_audit.event WHERE stream = 'user'") == 21
        pub = str(purged.key.with_suffix(".pub.pem"))
        offline = _ok(purged, "verify", "--archive", uri, "--public-key", pub)
        assert "archive of stream user: ok:" in offline
        joined = _ok(purged, "verify", "--archive", uri)
        assert "archive of stream user: ok:" in joined
        assert "stream user: ok:" in joined.replace("archive of stream user", "")
        # Newer events join the archive on the next run, and a run with nothing new adds nothing.
        _write_now(purged.db, range(4, 6))
        assert purged.cli("checkpoint").returncode == 0
        assert "new segment(s)" in _ok(purged, "archive")
        store = open_store(uri)
        before = store.names()
        again = _ok(purged, "archive")
        assert "up to date" in again and "new segment" not in again
        assert store.names() == before
        _ok(purged, "verify", "--archive", uri, "--public-key", pub)
        _ok(purged, "verify", "--archive", uri)
    finally:
        code, log = worker.stop()
        assert code == 0, log


def test_directory_round_trip_archive_purge_verify(
    database: Database, write_policy: WritePolicy, tmp_path: Path
) -> None:
    archive = tmp_path / "archive"
    purged = _setup(database, tmp_path, archive.as_uri())
    _round_trip(purged, archive.as_uri())
    segments = sorted((archive / "user").glob("segment-*.jsonl.gz"))
    assert segments and all(s.stat().st_mode & 0o222 == 0 for s in segments)
    # The segments, decompressed in order, are an export that verifies offline as such.
    export = tmp_path / "user.jsonl"
    export.write_bytes(b"".join(gzip.decompress(s.read_bytes()) for s in segments))
    _ok(
        purged,
        "verify",
        "--file",
        str(export),
        "--public-key",
        str(purged.key.with_suffix(".pub.pem")),
    )
    # The scheduled job does what the command does: here, nothing new.
    context = JobContext(
        purged.db.dsn, load_policy(purged.policy).policy, load_signing_key(purged.key)
    )
    assert archive_job(context).startswith("archive: nothing new")
    # With the trail too, an altered archive fails the stream it holds.
    altered = tmp_path / "altered"
    shutil.copytree(archive, altered)
    for path in altered.rglob("*"):
        path.chmod(0o755 if path.is_dir() else 0o644)
    _flip_byte(altered / "user", 0)
    broken = purged.cli("verify", "--archive", str(altered))
    assert broken.returncode == 1
    assert "is not the one its manifest signs" in broken.stdout
    assert "stream user: FAILED at seq 1: the archive does not verify" in broken.stdout
    # An archive that lacks what was purged does not make the trail whole.
    other = (tmp_path / "admin-only").as_uri()
    _ok(purged, "archive", "--to", other, "--stream", "admin")
    partial = purged.cli("verify", "--archive", other)
    assert partial.returncode == 1
    assert (
        "stream user: FAILED at seq 1: events 1-20 were purged and the archive does not hold them"
        in partial.stdout
    )


def test_purge_drops_nothing_when_archiving_fails(
    database: Database, write_policy: WritePolicy, tmp_path: Path
) -> None:
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("")
    purged = _setup(database, tmp_path, str(blocker / "archive"))
    purged.seal_history("user", [(JANUARY, 5)], every=5)
    result = purged.cli("purge")
    assert result.returncode == 3
    assert "archiving before the purge failed" in result.stderr
    assert result.stderr.strip().endswith("nothing was dropped")
    assert "Traceback" not in result.stderr
    assert purged.count("user") == 5


# ------------------------------------------------------------------------------ S3


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.fixture(scope="module")
def s3_endpoint() -> Iterator[str]:
    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()


@pytest.fixture
def s3_env(s3_endpoint: str, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    env = {
        "AWS_ENDPOINT_URL": s3_endpoint,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return env


def _s3() -> Any:
    return boto3.client("s3")


@pytest.mark.parametrize("locked", [True, False], ids=["object-lock", "no-lock"])
def test_s3_round_trip_archive_purge_verify(
    database: Database,
    write_policy: WritePolicy,
    tmp_path: Path,
    s3_env: dict[str, str],
    locked: bool,
) -> None:
    bucket = f"audit-{'locked' if locked else 'plain'}-{database.name[:20].replace('_', '-')}"
    _s3().create_bucket(Bucket=bucket, ObjectLockEnabledForBucket=locked)
    uri = f"s3://{bucket}/trail"
    purged = _setup(database, tmp_path, uri)
    _round_trip(purged, uri)
    keys = [o["Key"] for o in _s3().list_objects_v2(Bucket=bucket)["Contents"]]
    assert "trail/user/manifest-" in " ".join(keys)
    segment = next(k for k in keys if k.startswith("trail/user/segment-"))
    head = _s3().head_object(Bucket=bucket, Key=segment)
    if locked:
        # Under COMPLIANCE retention, not even the bucket's owner may delete the segment.
        assert head["ObjectLockMode"] == "COMPLIANCE"
        assert head["ObjectLockRetainUntilDate"] > datetime.now(UTC)
        with pytest.raises(ClientError, match="AccessDenied"):
            _s3().delete_object(Bucket=bucket, Key=segment, VersionId=head["VersionId"])
    else:
        assert "ObjectLockMode" not in head


# --------------------------------------------------------------------------- tampering


@pytest.fixture
def archived(database: Database, tmp_path: Path) -> tuple[Purged, Path]:
    """Streams user (24 events, segments of 8) and admin archived to a directory."""
    archive = tmp_path / "archive"
    purged = _setup(database, tmp_path, archive.as_uri())
    purged.seal_history("user", [(JANUARY, 12), (FEBRUARY, 12)], every=4)
    purged.seal_history("admin", [(JANUARY, 8)], every=4)
    with connect(database.dsn) as conn:
        store = open_store(archive.as_uri())
        key = load_signing_key(purged.key)
        archive_streams(conn, "cdc_audit", store, key, None, segment_events=8)
    return purged, archive


def _tampered(purged: Purged, pristine: Path, change: Any) -> Any:
    copy = purged.tmp / "tampered"
    shutil.rmtree(copy, ignore_errors=True)
    shutil.copytree(pristine, copy)
    for path in copy.rglob("*"):
        path.chmod(0o755 if path.is_dir() else 0o644)
    change(copy / "user")
    pub = str(purged.key.with_suffix(".pub.pem"))
    return purged.cli("verify", "--archive", str(copy), "--public-key", pub)


def _segments(folder: Path) -> list[Path]:
    return sorted(folder.glob("segment-*.jsonl.gz"))


def _flip_byte(folder: Path, which: int = 1) -> None:
    segment = _segments(folder)[which]
    data = bytearray(segment.read_bytes())
    data[len(data) // 2] ^= 0x01
    segment.write_bytes(bytes(data))


def _drop_segment(folder: Path) -> None:
    _segments(folder)[0].unlink()


def _edit_manifest(folder: Path) -> None:
    manifest = sorted(folder.glob("manifest-*.json"))[-1]
    manifest.write_text(manifest.read_text().replace('"events":8', '"events":9', 1))


def _substitute_segment(folder: Path) -> None:
    elsewhere = _segments(folder.parent / "admin")[0]
    shutil.copyfile(elsewhere, _segments(folder)[2])


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (_flip_byte, "segment user/segment-00000000000000000009-00000000000000000016.jsonl.gz"
         " is not the one its manifest signs"),
        (_drop_segment, "segment user/segment-00000000000000000001-00000000000000000008.jsonl.gz"
         " is missing from the archive"),
        (_edit_manifest, "the manifest signature is invalid"),
        (_substitute_segment, "segment user/segment-00000000000000000017-00000000000000000024"
         ".jsonl.gz is not the one its manifest signs"),
    ],
    ids=["flipped-byte", "dropped-segment", "edited-manifest", "substituted-segment"],
)  # fmt: skip
def test_tampering_with_the_archive_is_detected(
    archived: tuple[Purged, Path], change: Any, expected: str
) -> None:
    purged, archive = archived
    pub = str(purged.key.with_suffix(".pub.pem"))
    clean = purged.cli("verify", "--archive", str(archive), "--public-key", pub)
    assert clean.returncode == 0, (clean.stdout, clean.stderr)
    assert "archive of stream user: ok: 24 events in 3 segment(s)" in clean.stdout
    result = _tampered(purged, archive, change)
    assert result.returncode == 1, (result.stdout, result.stderr)
    assert expected in result.stdout
    assert "Traceback" not in result.stderr
