"""Archive locations, segment boundaries, signed manifests and the `archive` policy key, with
no database (the round trips through PostgreSQL are in tests/integration/test_archive.py)."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from cdc_audit.archive import segment_ranges
from cdc_audit.archive_manifest import (
    ManifestError,
    SegmentEntry,
    parse_manifest,
    segment_name,
    sign_manifest,
    stream_of,
)
from cdc_audit.archive_store import ArchiveConflict, DirectoryStore, parse_archive_uri
from cdc_audit.errors import PolicyError
from cdc_audit.job_context import JobContext
from cdc_audit.jobs import JobScheduler
from cdc_audit.keys import generate, load_signing_key
from cdc_audit.policy import ArchivePolicy, JobsPolicy, load_policy, parse_policy

# ------------------------------------------------------------------------------ locations


@pytest.mark.parametrize(
    ("uri", "directory", "bucket", "prefix"),
    [
        ("file:///var/lib/cdc-audit/archive", "/var/lib/cdc-audit/archive", None, ""),
        ("/srv/archive", "/srv/archive", None, ""),
        ("archive", "archive", None, ""),
        ("s3://audit-bucket", None, "audit-bucket", ""),
        ("s3://audit-bucket/prod/trail/", None, "audit-bucket", "prod/trail"),
    ],
)
def test_archive_locations_parse(
    uri: str, directory: str | None, bucket: str | None, prefix: str
) -> None:
    location = parse_archive_uri(uri)
    assert location.directory == (None if directory is None else Path(directory))
    assert (location.bucket, location.prefix) == (bucket, prefix)


@pytest.mark.parametrize(
    ("uri", "message"),
    [
        ("ftp://host/archive", "unknown archive scheme 'ftp'"),
        ("s3:///prefix", "names no bucket"),
        ("file://relative/path", "needs an absolute path"),
        ("  ", "expected an archive location"),
    ],
)
def test_bad_archive_locations_say_what_is_valid(uri: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_archive_uri(uri)


# ------------------------------------------------------------------------------ segments


def test_segments_end_where_checkpoints_end_and_stay_bounded() -> None:
    ends = [4, 8, 12, 16, 20, 24]
    assert segment_ranges(1, ends, limit=8) == [(1, 8), (9, 16), (17, 24)]
    assert segment_ranges(1, ends, limit=10) == [(1, 8), (9, 16), (17, 24)]
    assert segment_ranges(9, ends, limit=100) == [(9, 24)]
    # A checkpoint range longer than the limit is one segment, never split mid-range.
    assert segment_ranges(1, [30, 33], limit=8) == [(1, 30), (31, 33)]
    assert segment_ranges(25, ends, limit=8) == []


# ------------------------------------------------------------------------------ the store


def test_a_directory_store_writes_once_and_never_overwrites(tmp_path: Path) -> None:
    store = DirectoryStore(tmp_path / "archive", "archive")
    assert store.read("user/x") is None
    assert store.write_once("user/x", b"one") is True
    assert store.write_once("user/x", b"one") is False  # the same bytes again: idempotent
    with pytest.raises(ArchiveConflict, match="already holds different content"):
        store.write_once("user/x", b"two")
    assert store.read("user/x") == b"one"
    assert store.names() == ["user/x"]
    assert (tmp_path / "archive" / "user" / "x").stat().st_mode & 0o222 == 0


# ------------------------------------------------------------------------------ manifests


def _entry(first: int, last: int) -> SegmentEntry:
    return SegmentEntry(
        name=segment_name("user", first, last),
        first_seq=first,
        last_seq=last,
        events=last - first + 1,
        checkpoints=1,
        bytes=100,
        sha256="ab" * 32,
        prev_hash="00" * 32,
        last_hash="cd" * 32,
        first_time="2026-01-10T12:00:00+00:00",
        last_time="2026-01-10T12:09:00+00:00",
    )


@pytest.fixture(scope="module")
def key_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    private, public, _ = generate(tmp_path_factory.mktemp("keys") / "k")
    return private, public


def test_a_manifest_round_trips_and_any_edit_breaks_its_signature(
    key_files: tuple[Path, Path],
) -> None:
    key = load_signing_key(key_files[0])
    keys = {key.key_id: key.public_key()}
    manifest = sign_manifest("user", [_entry(1, 10), _entry(11, 20)], key)
    assert manifest.name() == "user/manifest-00000000000000000020.json"
    assert stream_of(manifest.name()) == ("user", 20)
    data = manifest.file_bytes()
    assert parse_manifest(data, keys) == manifest
    with pytest.raises(ManifestError, match="signature is invalid"):
        parse_manifest(data.replace(b'"events":10', b'"events":11', 1), keys)
    with pytest.raises(ManifestError, match="unregistered key"):
        parse_manifest(data, {})
    with pytest.raises(ManifestError, match="canonical"):
        parse_manifest(data.replace(b'{"signature"', b'{ "signature"', 1), keys)
    with pytest.raises(ManifestError, match="not JSON"):
        parse_manifest(b"\xff", keys)
    forged = replace(manifest, segments=(_entry(1, 10),))
    with pytest.raises(ManifestError, match="signature is invalid"):
        parse_manifest(forged.file_bytes(), keys)


# ------------------------------------------------------------------------------ policy


def test_the_archive_policy_key_and_its_job(tmp_path: Path) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text(
        "version: 1\nstreams:\n  user: {retention: 30d}\n"
        "archive: {to: 's3://audit/trail', lock_days: 400}\n"
        "jobs: {archive: '0 4 * * *'}\n"
    )
    policy = load_policy(path).policy
    assert policy.archive == ArchivePolicy(to="s3://audit/trail", lock_days=400)
    assert policy.jobs == JobsPolicy(archive="0 4 * * *")


def test_archive_policy_errors_name_file_line_and_key(tmp_path: Path) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text(
        "version: 1\nstreams:\n  user: {}\narchive:\n  to: ftp://host/x\n  lock_days: -1\n"
    )
    with pytest.raises(PolicyError) as caught:
        load_policy(path)
    messages = [str(p) for p in caught.value.problems]
    assert any(m.startswith(f"{path}:5: archive.to: 'ftp://host/x'") for m in messages)
    assert any(m.startswith(f"{path}:6: archive.lock_days:") for m in messages)


# ------------------------------------------------------------------------------ the CLI


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CDC_AUDIT_")}
    return subprocess.run(
        [sys.executable, "-m", "cdc_audit.cli", *args],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
        env=env,
    )


def test_verify_archive_refuses_bad_input_in_one_line(
    tmp_path: Path, key_files: tuple[Path, Path]
) -> None:
    public = str(key_files[1])
    bad_uri = _cli("verify", "--archive", "ftp://host/x", "--public-key", public)
    assert bad_uri.returncode == 2
    assert bad_uri.stderr.count("\n") == 1 and "unknown archive scheme" in bad_uri.stderr
    empty = _cli("verify", "--archive", str(tmp_path / "nothing"), "--public-key", public)
    assert empty.returncode == 2
    assert empty.stderr.strip().endswith("no archive manifest found there")
    (tmp_path / "nothing" / "user").mkdir(parents=True)
    (tmp_path / "nothing" / "user" / "manifest-00000000000000000001.json").write_text("{}")
    no_db = _cli("verify", "--archive", str(tmp_path / "nothing"))
    assert no_db.returncode == 2
    assert "give --public-key KEY to verify the archive offline" in no_db.stderr


def test_the_archive_job_runs_on_its_schedule() -> None:
    policy = parse_policy("version: 1\nstreams: {user: {}}\narchive: {to: /x}\n")
    scheduler = JobScheduler(
        JobContext("dbname=unused", policy), JobsPolicy(archive="0 4 * * *", verify="0 * * * *")
    )
    assert scheduler.scheduled == ["archive", "verify"]
