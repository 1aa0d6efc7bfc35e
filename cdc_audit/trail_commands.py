"""What `checkpoint`, `verify` and `export` do, behind the command line's argument parsing."""

from __future__ import annotations

import sys
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import replace
from datetime import datetime
from pathlib import Path
from typing import BinaryIO

import psycopg
from psycopg import sql
from psycopg.rows import TupleRow

from cdc_audit import keys
from cdc_audit.canonical import MAX_SAFE_INT, JsonValue, canonical_bytes
from cdc_audit.checkpoints import Checkpoint, DirectoryAnchor
from cdc_audit.errors import CdcAuditError, InvalidInput
from cdc_audit.export import ExportRange, export_stream
from cdc_audit.export_parts import verify_export_parallel
from cdc_audit.pgoutput import parse_lsn
from cdc_audit.predicate import parse_table_name
from cdc_audit.trail import applied_policy, install_names, slot_confirmed, trail_streams
from cdc_audit.values import parse_json_exact
from cdc_audit.verify import StreamVerdict, verify_stream

__all__ = [
    "erase",
    "export_range",
    "export_to",
    "parse_row_key",
    "public_keys",
    "request_checkpoint",
    "verify_database",
    "verify_file",
    "write_new",
]

_POLL = 0.2


def request_checkpoint(
    conn: psycopg.Connection[TupleRow], schema: str, *, timeout: float
) -> list[Checkpoint]:
    """Ask the running worker to sign and anchor every stream's newest events; each stream's
    newest checkpoint once it has.

    The request is a marker in the stream: once the worker has confirmed past it, everything
    committed before the request is sealed and signed.
    """
    _require_installed(conn, schema)
    table = sql.Identifier(schema)
    row = conn.execute(sql.SQL("SELECT {}.mark('checkpoint')::text").format(table)).fetchone()
    conn.commit()
    assert row is not None
    marker = parse_lsn(row[0])
    slot = install_names(conn, schema).slot
    deadline = time.monotonic() + timeout
    while slot_confirmed(conn, slot) <= marker:
        if time.monotonic() > deadline:
            raise CdcAuditError(
                f"no checkpoint was signed within {timeout:g} s: is `cdc-audit worker` running,"
                " with CDC_AUDIT_SIGNING_KEY_FILE set?"
            )
        time.sleep(_POLL)
    # Each stream's newest checkpoint: it covers everything committed before the request
    # (the worker signs every batch; the request made it anchor the newest one too).
    rows = conn.execute(
        sql.SQL(
            "SELECT DISTINCT ON (stream) statement::text, signature FROM {}.checkpoint"
            " ORDER BY stream, last_seq DESC"
        ).format(table)
    ).fetchall()
    conn.commit()
    return [Checkpoint.from_row(text, bytes(sig), f"{schema}.checkpoint") for text, sig in rows]


def _require_installed(conn: psycopg.Connection[TupleRow], schema: str) -> None:
    install_names(conn, schema)


def _policy_anchor(conn: psycopg.Connection[TupleRow], schema: str) -> Path | None:
    found = applied_policy(conn, schema)
    return None if found is None else found[1].policy.checkpoints.anchor_dir


def verify_database(
    conn: psycopg.Connection[TupleRow],
    schema: str,
    stream: str | None,
    anchor_dir: str | None,
    progress: Callable[[str], None],
    since_last: bool = False,
) -> list[StreamVerdict]:
    """Verify every stream (or one) against the registered keys and the anchor."""
    _require_installed(conn, schema)
    directory = Path(anchor_dir) if anchor_dir else _policy_anchor(conn, schema)
    anchor = None if directory is None else DirectoryAnchor(directory, conn.info.dbname, schema)
    registered = keys.registered_keys(conn, schema)
    streams = [stream] if stream else trail_streams(conn, schema)
    if stream and stream not in trail_streams(conn, schema):
        raise InvalidInput(f"stream {stream} has no events in {schema}.event")
    verdicts = []
    for name in streams:
        started = time.monotonic()

        def report(done: int, name: str = name, started: float = started) -> None:
            rate = done / max(time.monotonic() - started, 1e-9)
            progress(f"verifying stream {name}: {done} events ({rate:,.0f}/s)")

        since = last_verified_checkpoint(conn, schema, name) if since_last else None
        verdict = verify_stream(conn, schema, name, registered, anchor, report, since)
        verdicts.append(verdict)
    verdicts = _check_erasures(conn, schema, verdicts)
    for verdict in verdicts:
        record_verdict(conn, schema, verdict, progress)
    return verdicts


def last_verified_checkpoint(
    conn: psycopg.Connection[TupleRow], schema: str, stream: str
) -> Checkpoint | None:
    """The newest checkpoint a successful verification of `stream` reached (None: none)."""
    ident = sql.Identifier(schema)
    row = conn.execute(
        sql.SQL(
            "SELECT c.statement::text, c.signature FROM {0}.verification v"
            " JOIN {0}.checkpoint c ON c.stream = v.stream AND c.last_seq = v.signed_up_to"
            " WHERE v.stream = %s AND v.ok ORDER BY v.id DESC LIMIT 1"
        ).format(ident),
        (stream,),
    ).fetchone()
    conn.commit()
    if row is None:
        return None
    return Checkpoint.from_row(row[0], bytes(row[1]), f"{schema}.checkpoint")


def record_verdict(
    conn: psycopg.Connection[TupleRow],
    schema: str,
    verdict: StreamVerdict,
    say: Callable[[str], None],
) -> None:
    """Keep the verdict (time, range, outcome) for `status` and the next `--since-last`."""
    try:
        conn.execute(
            sql.SQL(
                "INSERT INTO {}.verification (stream, first_seq, last_seq, checked, ok,"
                " first_bad_seq, problem, signed_up_to, anchored_up_to)"
                " VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s)"
            ).format(sql.Identifier(schema)),
            (
                verdict.stream,
                verdict.last_seq - verdict.checked + 1,
                verdict.last_seq,
                verdict.checked,
                verdict.ok,
                verdict.first_bad_seq,
                verdict.problem,
                verdict.signed_up_to,
                verdict.anchored_up_to,
            ),
        )
        conn.commit()
    except (psycopg.errors.InsufficientPrivilege, psycopg.errors.UndefinedTable) as exc:
        conn.rollback()
        why = exc.diag.message_primary
        say(f"cdc-audit: the verdict of stream {verdict.stream} was not recorded: {why}")


def latest_verdicts(conn: psycopg.Connection[TupleRow], schema: str) -> list[dict[str, object]]:
    """Each stream's newest recorded verification (for status and metrics)."""
    rows = conn.execute(
        sql.SQL(
            "SELECT DISTINCT ON (stream) stream, verified_at, first_seq, last_seq, ok,"
            " first_bad_seq, problem FROM {}.verification ORDER BY stream, id DESC"
        ).format(sql.Identifier(schema))
    ).fetchall()
    conn.commit()
    names = ("stream", "verified_at", "first_seq", "last_seq", "ok", "first_bad_seq", "problem")
    return [dict(zip(names, row, strict=True)) for row in rows]


def _check_erasures(
    conn: psycopg.Connection[TupleRow], schema: str, verdicts: list[StreamVerdict]
) -> list[StreamVerdict]:
    """An erased payload must have its erasure recorded in the trail, or it was just removed."""
    row = conn.execute(
        sql.SQL(
            "SELECT e.stream, e.seq FROM {0}.event e WHERE e.erased_at IS NOT NULL"
            " AND e.event_id::text NOT IN (SELECT r.new ->> 'event_id' FROM {0}.event r"
            " WHERE r.kind = 'erasure' AND r.new ->> 'event_id' IS NOT NULL)"
            " ORDER BY e.stream, e.seq LIMIT 1"
        ).format(sql.Identifier(schema))
    ).fetchone()
    conn.commit()
    if row is None:
        return verdicts
    stream, seq = row
    problem = "payload erased without a recorded erasure (or the worker has not sealed it yet)"
    return [
        replace(v, first_bad_seq=seq, problem=problem) if v.stream == stream and v.ok else v
        for v in verdicts
    ]


def public_keys(paths: Sequence[str]) -> dict[str, keys.PublicKey]:
    """The given public key files by key id; offline verification needs at least one."""
    if not paths:
        raise InvalidInput("offline verification needs the signer's public key: --public-key KEY")
    loaded = [keys.load_public_key(Path(p)) for p in paths]
    return {k.key_id: k for k in loaded}


def verify_file(path: Path, public_key_files: Sequence[str], jobs: int = 1) -> StreamVerdict:
    found = public_keys(public_key_files)
    if not path.is_file():
        raise InvalidInput(f"{path}: no such export file")
    return verify_export_parallel(path, found, jobs)


def create_new(path: Path, what: str) -> BinaryIO:
    """Open a file that must not exist yet (exports and proofs are never overwritten); the
    caller closes it."""
    try:
        return path.open("xb")
    except FileExistsError:
        raise InvalidInput(f"{path} already exists; refusing to overwrite {what}") from None
    except OSError as exc:
        raise InvalidInput(f"{path}: cannot write {what}: {exc.strerror}") from None


def write_new(path: Path, data: bytes, what: str) -> None:
    """Write a file that must not exist yet."""
    with create_new(path, f"a {what}") as out:
        out.write(data)


def export_range(
    from_seq: int, to_seq: int | None, since: str | None, until: str | None
) -> ExportRange:
    if from_seq < 1 or (to_seq is not None and to_seq < from_seq):
        raise InvalidInput("--from-seq must be at least 1 and --to-seq not below it")
    return ExportRange(from_seq, to_seq, _time("--since", since), _time("--until", until))


def _time(option: str, text: str | None) -> datetime | None:
    if text is None:
        return None
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise InvalidInput(f"{option}: {text!r} is not an ISO 8601 time") from None
    if moment.tzinfo is None:
        raise InvalidInput(f"{option}: {text!r} needs a time zone (e.g. Z or +02:00)")
    return moment


def export_to(
    conn: psycopg.Connection[TupleRow],
    schema: str,
    stream: str,
    selection: ExportRange,
    output: str,
) -> tuple[int, int, int]:
    _require_installed(conn, schema)
    if output == "-":
        return export_stream(conn, schema, stream, selection, sys.stdout.buffer)
    with create_new(Path(output), "an export") as out:
        return export_stream(conn, schema, stream, selection, out)


def erase(
    conn: psycopg.Connection[TupleRow],
    schema: str,
    *,
    event_id: str | None,
    table: str | None,
    key: str | None,
    reason: str,
) -> int:
    """Erase the payload of one event, or of every event of one row; the count erased.

    One transaction: either every matching payload is erased (and each erasure recorded) or
    none is.
    """
    _require_installed(conn, schema)
    if not reason.strip():
        raise InvalidInput("--reason must say why the payload is erased")
    ids = [_event_id(event_id)] if event_id else _row_event_ids(conn, schema, table, key)
    if not ids:
        raise InvalidInput("no event matches: nothing erased")
    erase_one = sql.SQL("SELECT {}.erase_event(%s, %s)").format(sql.Identifier(schema))
    erased = 0
    with conn.transaction():
        for target in ids:
            row = conn.execute(erase_one, (target, reason)).fetchone()
            erased += int(row[0]) if row else 0
    return erased


def _event_id(text: str) -> str:
    try:
        return str(uuid.UUID(text))
    except ValueError:
        raise InvalidInput(f"{text!r} is not an event id (a UUID)") from None


def _row_event_ids(
    conn: psycopg.Connection[TupleRow], schema: str, table: str | None, key: str | None
) -> list[str]:
    if table is None or key is None:
        raise InvalidInput("say what to erase: --event EVENT_ID, or --table TABLE --key KEY")
    try:
        name = parse_table_name(table)
    except ValueError as exc:
        raise InvalidInput(f"--table: {exc}") from None
    rows = conn.execute(
        sql.SQL(
            "SELECT event_id::text FROM {}.event WHERE schema_name = %s AND table_name = %s"
            " AND row_key = %s::jsonb AND erased_at IS NULL ORDER BY stream, seq"
        ).format(sql.Identifier(schema)),
        (name.schema, name.name, canonical_bytes(parse_row_key(key)).decode()),
    ).fetchall()
    return [r[0] for r in rows]


def parse_row_key(text: str) -> dict[str, JsonValue]:
    """A row key as JSON (``{"id": 42}``) or as ``column=value[,column=value]`` pairs, where
    values made of digits are numbers (as the trail stores integer keys) and others text."""
    if text.lstrip().startswith("{"):
        value = parse_json_exact(text)
        if not isinstance(value, dict):
            raise InvalidInput(f"--key: {text!r} is not a JSON object")
        return value
    key: dict[str, JsonValue] = {}
    for pair in text.split(","):
        column, sep, raw = pair.partition("=")
        if not sep or not column.strip():
            raise InvalidInput(f"--key: expected column=value, got {pair!r}")
        number = raw.strip()
        is_int = number.lstrip("-").isdigit() and abs(int(number)) <= MAX_SAFE_INT
        key[column.strip()] = int(number) if is_int else raw
    return key
