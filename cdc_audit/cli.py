"""The `cdc-audit` command. Thin: parses arguments, calls the parts, maps errors to exit codes."""

from __future__ import annotations

import argparse
import gc
import json
import sys
import threading
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import NoReturn

import psycopg
from pydantic import ValidationError

from . import (
    __version__,
    approval_commands,
    archive_commands,
    drift_commands,
    installer,
    job_commands,
    keys,
    logs,
    query_commands,
    snapshot_commands,
    status,
    trail_commands,
)
from .canonical import canonical_bytes
from .cli_common import (
    Handler,
    dsn_of,
    policy_of,
    redaction_key_of,
    say,
    schema_of,
    signing_key_of,
)
from .db import connect, database_error
from .errors import CdcAuditError, DatabaseError, IntegrityError, InvalidInput
from .export_parts import usable_cpus
from .metrics import serve_metrics
from .names import InstallNames
from .proof import make_proof, verify_proof
from .settings import Settings
from .worker import Worker, WorkerOptions, install_signal_handlers


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line and exit code 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n")


_say = say
_policy = policy_of
_dsn = dsn_of
_schema = schema_of
_signing_key = signing_key_of
_redaction_key = redaction_key_of


def cmd_check(args: argparse.Namespace, settings: Settings) -> int:
    loaded = _policy(args, settings)
    policy = loaded.policy
    print(
        f"{loaded.source}: ok: {len(policy.streams)} stream(s), {len(policy.tables)} table(s), "
        f"schema {policy.schema_name}"
    )
    return 0


def cmd_plan(args: argparse.Namespace, settings: Settings) -> int:
    loaded = _policy(args, settings)
    with connect(_dsn(args, settings)) as conn:
        computed = installer.compute_plan(conn, loaded)
        text = computed.render(conn)
        conn.rollback()
    if computed.empty:
        _say("nothing to do: the database matches the policy")
    else:
        sys.stdout.write(text)
    return 0


def cmd_apply(args: argparse.Namespace, settings: Settings) -> int:
    loaded = _policy(args, settings)
    result = installer.apply(_dsn(args, settings), loaded, progress=lambda s: _say(f"- {s}"))
    if result.plan.empty:
        _say("nothing to do: the database matches the policy")
    else:
        _say(f"applied {len(result.plan.steps)} step(s); replication slot {result.slot}")
    return 0


def cmd_uninstall(args: argparse.Namespace, settings: Settings) -> int:
    schema = _schema(args, settings)
    installer.uninstall(
        _dsn(args, settings), schema, args.drop_data, progress=lambda s: _say(f"- {s}")
    )
    kept = "dropped, with the trail" if args.drop_data else "removed; the trail is kept"
    _say(f"cdc-audit {kept} (schema {schema})")
    return 0


def cmd_status(args: argparse.Namespace, settings: Settings) -> int:
    schema = _schema(args, settings)
    with connect(_dsn(args, settings)) as conn:
        report = status.collect(conn, InstallNames(schema, conn.info.dbname))
    if args.format == "json":
        print(json.dumps(report, indent=2, sort_keys=True, default=str))
    else:
        sys.stdout.write(status.render_text(report))
    return 0 if report["installed"] else 3


def cmd_worker(args: argparse.Namespace, settings: Settings) -> int:
    dsn = _dsn(args, settings)
    if not dsn:
        raise InvalidInput("no database given: use --dsn or set CDC_AUDIT_DSN")
    options = WorkerOptions(
        schema=_schema(args, settings),
        drain=args.drain,
        batch_messages=settings.batch_messages,
        heartbeat_seconds=settings.heartbeat_seconds,
        jobs_every_seconds=settings.jobs_every_seconds,
    )
    logs.configure()
    # The worker allocates many short-lived, acyclic objects per event: collecting cycles
    # after every 700 allocations costs about a sixth of its CPU for nothing.
    gc.freeze()
    gc.set_threshold(100_000, 50, 50)
    stop = threading.Event()
    restore = install_signal_handlers(stop)
    try:
        worker = Worker(dsn, options, _redaction_key(settings), stop, _signing_key(settings))
        if settings.metrics_port is not None:
            serve_metrics(worker, settings.metrics_port, settings.ready_max_lag_seconds)
        return worker.run()
    finally:
        restore()


def cmd_checkpoint(args: argparse.Namespace, settings: Settings) -> int:
    schema = _schema(args, settings)
    with connect(_dsn(args, settings)) as conn:
        made = trail_commands.request_checkpoint(conn, schema, timeout=args.timeout)
    for checkpoint in made:
        print(
            f"{checkpoint.stream}: signed up to seq {checkpoint.last_seq} by {checkpoint.key_id},"
            f" head {checkpoint.head_hash.hex()[:16]}"
        )
    if not made:
        _say("nothing is signed yet: is the worker running with CDC_AUDIT_SIGNING_KEY_FILE?")
    return 0


def cmd_prove(args: argparse.Namespace, settings: Settings) -> int:
    schema = _schema(args, settings)
    with connect(_dsn(args, settings)) as conn:
        proof = make_proof(conn, schema, args.event_id)
    trail_commands.write_new(Path(args.output), canonical_bytes(proof) + b"\n", "proof")
    _say(f"wrote the inclusion proof of event {args.event_id} to {args.output}")
    return 0


def cmd_verify(args: argparse.Namespace, settings: Settings) -> int:
    if args.proof is not None:
        proven = verify_proof(Path(args.proof), trail_commands.public_keys(args.public_key))
        print(proven.describe())
        return 0
    if args.archive is not None:
        return archive_commands.verify_archive(args, settings)
    if args.jobs is not None and args.jobs < 1:
        raise InvalidInput(f"--jobs must be at least 1, not {args.jobs}")
    if args.file is not None:
        jobs = args.jobs if args.jobs is not None else usable_cpus()
        verdicts = [trail_commands.verify_file(Path(args.file), args.public_key, jobs)]
    else:
        schema = _schema(args, settings)
        with connect(_dsn(args, settings)) as conn:
            verdicts = trail_commands.verify_database(
                conn, schema, args.stream, args.anchor, progress=_say, since_last=args.since_last
            )
    for verdict in verdicts:
        print(verdict.describe())
    failed = [v for v in verdicts if not v.ok]
    if failed:
        first = failed[0]
        raise IntegrityError(first.stream, first.first_bad_seq, first.problem or "")
    return 0


def cmd_erase(args: argparse.Namespace, settings: Settings) -> int:
    schema = _schema(args, settings)
    with connect(_dsn(args, settings)) as conn:
        erased = trail_commands.erase(
            conn, schema, event_id=args.event, table=args.table, key=args.key, reason=args.reason
        )
    _say(f"erased the payload of {erased} event(s); the erasure is recorded in the trail")
    return 0


def cmd_export(args: argparse.Namespace, settings: Settings) -> int:
    schema = _schema(args, settings)
    selection = trail_commands.export_range(args.from_seq, args.to_seq, args.since, args.until)
    with connect(_dsn(args, settings)) as conn:
        first, last, count = trail_commands.export_to(
            conn, schema, args.stream, selection, args.output
        )
    _say(f"exported {count} event(s) of stream {args.stream} (seq {first}-{last}) to {args.output}")
    return 0


def cmd_keygen(args: argparse.Namespace, settings: Settings) -> int:
    private, public, key_id = keys.generate(Path(args.out))
    print(f"key id: {key_id}")
    print(f"private key: {private}")
    print(f"public key: {public}")
    _say(
        f"next: cdc-audit keys add {public}; give the worker"
        f" CDC_AUDIT_SIGNING_KEY_FILE={private} (and nobody else)"
    )
    return 0


def cmd_keys_add(args: argparse.Namespace, settings: Settings) -> int:
    key = keys.load_public_key(Path(args.public_key_file))
    schema = _schema(args, settings)
    with connect(_dsn(args, settings)) as conn:
        added = keys.register(conn, schema, key)
    if added:
        _say(f"registered key {key.key_id} in {schema}.signing_key")
    else:
        _say(f"key {key.key_id} is already registered in {schema}.signing_key; nothing to do")
    return 0


def cmd_keys_list(args: argparse.Namespace, settings: Settings) -> int:
    schema = _schema(args, settings)
    with connect(_dsn(args, settings)) as conn:
        rows = keys.list_keys(conn, schema)
    if args.format == "json":
        print(json.dumps([row.as_dict() for row in rows], indent=2))
    elif not rows:
        _say(f"no keys registered in {schema}.signing_key: cdc-audit keys add registers one")
    else:
        for row in rows:
            state = "active" if row.retired_at is None else f"retired {_seconds(row.retired_at)}"
            print(
                f"{row.key_id}  {row.algorithm}  added {_seconds(row.added_at)}"
                f" by {row.added_by}  {state}"
            )
    return 0


def _seconds(moment: datetime) -> str:
    return moment.isoformat(timespec="seconds")


def cmd_keys_retire(args: argparse.Namespace, settings: Settings) -> int:
    schema = _schema(args, settings)
    with connect(_dsn(args, settings)) as conn:
        keys.retire(conn, schema, args.key_id)
    kid = args.key_id.strip().lower()
    _say(f"retired key {kid}: it may sign nothing more; what it signed still verifies")
    return 0


def _common(parser: argparse.ArgumentParser, suppress: bool) -> None:
    default = argparse.SUPPRESS if suppress else None
    parser.add_argument("--dsn", default=default, help="libpq connection string (CDC_AUDIT_DSN)")
    parser.add_argument(
        "--policy", default=default, metavar="FILE", help="policy file (CDC_AUDIT_POLICY)"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="cdc-audit", description="Tamper-evident audit trail for PostgreSQL.")
    parser.add_argument("--version", action="version", version=f"cdc-audit {__version__}")
    _common(parser, suppress=False)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    commands.required = True

    def command(name: str, handler: Handler, help_text: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help_text, description=help_text)
        _common(sub, suppress=True)
        sub.set_defaults(handler=handler)
        return sub

    command("check", cmd_check, "validate the policy file (no database)")
    command("plan", cmd_plan, "print the SQL that apply would run")
    command("apply", cmd_apply, "install or update the database objects of the policy")
    uninstall = command("uninstall", cmd_uninstall, "remove capture objects (keeps the trail)")
    uninstall.add_argument("--schema", help="audit schema (default: the policy's, or cdc_audit)")
    uninstall.add_argument(
        "--drop-data", action="store_true", help="also drop the trail and the roles"
    )
    status_cmd = command("status", cmd_status, "installation, policy, tables, slot and lag")
    status_cmd.add_argument("--schema", help="audit schema (default: the policy's, or cdc_audit)")
    status_cmd.add_argument("--format", choices=("text", "json"), default="text")
    worker = command("worker", cmd_worker, "seal the replication stream into the trail")
    worker.add_argument("--schema", help="audit schema (default: the policy's, or cdc_audit)")
    worker.add_argument(
        "--drain",
        action="store_true",
        help="seal everything committed before the worker started, then exit 0",
    )
    keygen = command("keygen", cmd_keygen, "generate an Ed25519 signing key pair")
    keygen.add_argument(
        "--out", required=True, metavar="DIR", help="directory for the two key files"
    )
    checkpoint = command("checkpoint", cmd_checkpoint, "have the worker sign a checkpoint now")
    checkpoint.add_argument("--schema", help="audit schema (default: the policy's, or cdc_audit)")
    checkpoint.add_argument("--timeout", type=float, default=60.0, help="seconds to wait (60)")
    verify = command("verify", cmd_verify, "prove the trail (or an export) was not altered")
    verify.add_argument("--schema", help="audit schema (default: the policy's, or cdc_audit)")
    verify.add_argument("--stream", help="verify only this stream")
    verify.add_argument("--anchor", metavar="DIR", help="anchor directory (default: the policy's)")
    verify.add_argument(
        "--since-last",
        action="store_true",
        help="start after the newest checkpoint a successful verification reached",
    )
    verify.add_argument("--file", metavar="EXPORT", help="verify an export, with no database")
    verify.add_argument(
        "--jobs",
        type=int,
        metavar="N",
        help="processes for --file (default: one per usable core; 1: a single pass)",
    )
    verify.add_argument("--proof", metavar="PROOF", help="verify an inclusion proof (offline)")
    verify.add_argument(
        "--archive",
        metavar="URI",
        help="verify an archive: offline with --public-key, else with the trail as one chain",
    )
    verify.add_argument(
        "--public-key", action="append", default=[], metavar="KEY", help="public key file(s)"
    )
    prove = command("prove", cmd_prove, "an inclusion proof of one event, checkable offline")
    prove.add_argument("--schema", help="audit schema (default: the policy's, or cdc_audit)")
    prove.add_argument("event_id", metavar="EVENT_ID")
    prove.add_argument("--output", required=True, metavar="PROOF.json")
    erase = command("erase", cmd_erase, "erase event payloads (headers and hashes stay)")
    erase.add_argument("--schema", help="audit schema (default: the policy's, or cdc_audit)")
    target = erase.add_mutually_exclusive_group(required=True)
    target.add_argument("--event", metavar="EVENT_ID", help="one event")
    target.add_argument("--table", metavar="TABLE", help="every event of one row (with --key)")
    erase.add_argument("--key", metavar="KEY", help='row key: id=42 or {"id": 42}')
    erase.add_argument("--reason", required=True, help="why (recorded in the trail)")
    export = command("export", cmd_export, "write a stream and its checkpoints as JSON Lines")
    export.add_argument("--schema", help="audit schema (default: the policy's, or cdc_audit)")
    export.add_argument("--stream", required=True)
    export.add_argument("--from-seq", type=int, default=1, metavar="SEQ")
    export.add_argument("--to-seq", type=int, metavar="SEQ")
    export.add_argument("--since", metavar="TIME", help="ISO 8601 time (inclusive)")
    export.add_argument("--until", metavar="TIME", help="ISO 8601 time (exclusive)")
    export.add_argument("--output", required=True, metavar="FILE", help="file, or - for stdout")
    job_commands.add_commands(command)
    archive_commands.add_commands(command)
    snapshot_commands.add_commands(command)
    drift_commands.add_commands(command)
    query_commands.add_commands(command)
    approval_commands.add_commands(command)
    # `keys` always has an action (required), whose handler replaces this one.
    _keys_commands(command("keys", cmd_keys_list, "register, list and retire signing keys"))
    return parser


def _keys_commands(parent: argparse.ArgumentParser) -> None:
    """`keys add|list|retire`: sub-commands of `keys`, each with its own handler."""
    actions = parent.add_subparsers(dest="keys_command", metavar="ACTION", parser_class=_Parser)
    actions.required = True

    def action(name: str, handler: Handler, help_text: str) -> argparse.ArgumentParser:
        sub = actions.add_parser(name, help=help_text, description=help_text)
        _common(sub, suppress=True)
        sub.add_argument("--schema", help="audit schema (default: the policy's, or cdc_audit)")
        sub.set_defaults(handler=handler)
        return sub

    add = action("add", cmd_keys_add, "register a public key so its signatures can be verified")
    add.add_argument("public_key_file", metavar="PUBLIC_KEY_FILE")
    listing = action("list", cmd_keys_list, "show registered keys, retired ones included")
    listing.add_argument("--format", choices=("text", "json"), default="text")
    retire = action("retire", cmd_keys_retire, "stop a key from signing (it still verifies)")
    retire.add_argument("key_id", metavar="KEY_ID")


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        handler: Handler = args.handler
        return handler(args, _settings())
    except CdcAuditError as exc:
        for line in _error_lines(exc):
            _say(line)
        return exc.exit_code
    except psycopg.Error as exc:
        # A database failure a command did not expect: operational (3), never mistaken for
        # the integrity failure (1) a crash would otherwise exit with.
        _say(f"cdc-audit: database error: {database_error(exc, 'the command')}")
        return DatabaseError.exit_code
    except KeyboardInterrupt:
        _say("cdc-audit: interrupted")
        return 130


def _settings() -> Settings:
    try:
        return Settings()
    except ValidationError as exc:
        first = exc.errors()[0]
        name = "CDC_AUDIT_" + str(first["loc"][0]).upper() if first["loc"] else "settings"
        raise InvalidInput(f"{name}: {first['msg']}") from None


def _error_lines(exc: CdcAuditError) -> list[str]:
    problems = getattr(exc, "problems", None)
    if problems:
        return [f"cdc-audit: {problem}" for problem in problems]
    return [f"cdc-audit: {exc}"]


if __name__ == "__main__":
    sys.exit(main())
