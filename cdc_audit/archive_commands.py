"""`archive`, and `verify --archive`: the command line of `cdc_audit.archive`."""

from __future__ import annotations

import argparse
from pathlib import Path

import psycopg
from psycopg.rows import TupleRow

from . import keys
from .archive import archive_streams
from .archive_store import ArchiveStore, open_store
from .archive_verify import (
    ArchiveVerdict,
    join_trail,
    require_archive,
    trail_start,
    verify_archive_stream,
)
from .checkpoints import DirectoryAnchor
from .cli_common import (
    AddCommand,
    add_schema_option,
    dsn_of,
    policy_of,
    require_signing_key,
    say,
    schema_of,
)
from .db import connect
from .errors import IntegrityError, InvalidInput
from .settings import Settings
from .trail import applied_policy
from .trail_commands import public_keys, verify_database
from .verify import StreamVerdict

__all__ = ["add_commands", "cmd_archive", "verify_archive"]


def _target(args: argparse.Namespace, settings: Settings) -> tuple[ArchiveStore, str]:
    """The archive location (--to, else the policy's) and the audit schema."""
    has_policy = bool(getattr(args, "policy", None) or settings.policy)
    policy = policy_of(args, settings).policy if has_policy else None
    configured = None if policy is None else policy.archive
    uri = args.to or (None if configured is None else configured.to)
    if uri is None:
        raise InvalidInput("say where to archive: --to URI, or archive: {to: URI} in the policy")
    lock_days = None if configured is None else configured.lock_days
    schema = args.schema or (policy.schema_name if policy else "cdc_audit")
    return open_store(uri, lock_days), schema


def cmd_archive(args: argparse.Namespace, settings: Settings) -> int:
    store, schema = _target(args, settings)
    key = require_signing_key(settings, "an archive manifest")
    with connect(dsn_of(args, settings)) as conn:
        done = archive_streams(
            conn, schema, store, key, [args.stream] if args.stream else None, say
        )
    for result in done:
        print(result.describe())
    say(f"archive {store.uri}: {store.lock()}")
    return 0


def verify_archive(args: argparse.Namespace, settings: Settings) -> int:
    """`verify --archive URI`: offline with --public-key, else joined to the trail."""
    store = open_store(args.archive)
    if args.public_key:
        verdicts = _offline(store, args.stream, public_keys(args.public_key))
        failed = [v.verdict for v in verdicts if not v.ok]
    else:
        failed = _joined(args, settings, store)
    if failed:
        first = failed[0]
        raise IntegrityError(first.stream, first.first_bad_seq, first.problem or "")
    return 0


def _offline(
    store: ArchiveStore, stream: str | None, found: dict[str, keys.PublicKey]
) -> list[ArchiveVerdict]:
    streams = [stream] if stream else require_archive(store)
    verdicts = [verify_archive_stream(store, name, found) for name in streams]
    for verdict in verdicts:
        print(verdict.describe())
    return verdicts


def _joined(
    args: argparse.Namespace, settings: Settings, store: ArchiveStore
) -> list[StreamVerdict]:
    """Verify the trail as usual, then the archive, and that the trail continues it."""
    if not dsn_of(args, settings):
        raise InvalidInput(
            "verify --archive: give --public-key KEY to verify the archive offline, or a"
            " database (--dsn or CDC_AUDIT_DSN) to verify it with the trail as one chain"
        )
    schema = schema_of(args, settings)
    archived = set(require_archive(store))
    with connect(dsn_of(args, settings)) as conn:
        trail = verify_database(conn, schema, args.stream, args.anchor, progress=say)
        trusted = _trusted_keys(conn, schema, args.anchor)
        failed = []
        for verdict in trail:
            from_archive = None
            if verdict.stream in archived:
                want = frozenset({trail_start(conn, schema, verdict.stream)})
                from_archive = verify_archive_stream(store, verdict.stream, trusted, want)
                print(from_archive.describe())
            joined = join_trail(conn, schema, from_archive, verdict)
            print(joined.describe())
            if not joined.ok:
                failed.append(joined)
    return failed


def _trusted_keys(
    conn: psycopg.Connection[TupleRow], schema: str, anchor_dir: str | None
) -> dict[str, keys.PublicKey]:
    """The registered keys; with an anchor, only those it knows (as verify trusts them)."""
    registered = keys.registered_keys(conn, schema)
    directory = Path(anchor_dir) if anchor_dir else _policy_anchor(conn, schema)
    if directory is None:
        return registered
    anchored = DirectoryAnchor(directory, conn.info.dbname, schema).key_pems()
    return {
        key_id: key
        for key_id, key in registered.items()
        if key_id in anchored and keys.public_key_from_pem(anchored[key_id]).key_id == key_id
    }


def _policy_anchor(conn: psycopg.Connection[TupleRow], schema: str) -> Path | None:
    found = applied_policy(conn, schema)
    conn.commit()
    return None if found is None else found[1].policy.checkpoints.anchor_dir


def add_commands(command: AddCommand) -> None:
    """Register `archive`; `verify --archive` is an option of `verify`."""
    sub = command("archive", cmd_archive, "copy sealed events and checkpoints to the archive")
    add_schema_option(sub)
    sub.add_argument("--to", metavar="URI", help="file:///dir, a path or s3://bucket/prefix")
    sub.add_argument("--stream", help="archive only this stream")
