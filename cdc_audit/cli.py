"""The `cdc-audit` command. Thin: parses arguments, calls the parts, maps errors to exit codes."""

from __future__ import annotations

import argparse
import gc
import json
import sys
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NoReturn

from pydantic import ValidationError

from . import __version__, installer, logs, status
from .db import connect
from .errors import CdcAuditError, InvalidInput
from .names import InstallNames
from .policy import LoadedPolicy, load_policy
from .settings import Settings
from .worker import Worker, WorkerOptions, install_signal_handlers

Handler = Callable[[argparse.Namespace, Settings], int]


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line and exit code 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n")


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _policy(args: argparse.Namespace, settings: Settings) -> LoadedPolicy:
    path = getattr(args, "policy", None) or settings.policy
    if path is None:
        raise InvalidInput("no policy given: use --policy FILE or set CDC_AUDIT_POLICY")
    return load_policy(Path(path))


def _dsn(args: argparse.Namespace, settings: Settings) -> str | None:
    return getattr(args, "dsn", None) or settings.dsn


def _schema(args: argparse.Namespace, settings: Settings) -> str:
    """--schema, else the policy's schema when a policy is given, else the default."""
    if getattr(args, "schema", None):
        return str(args.schema)
    if getattr(args, "policy", None) or settings.policy:
        return _policy(args, settings).policy.schema_name
    return "cdc_audit"


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
    )
    logs.configure()
    # The worker allocates many short-lived, acyclic objects per event: collecting cycles
    # after every 700 allocations costs about a sixth of its CPU for nothing.
    gc.freeze()
    gc.set_threshold(100_000, 50, 50)
    stop = threading.Event()
    restore = install_signal_handlers(stop)
    try:
        return Worker(dsn, options, _redaction_key(settings), stop).run()
    finally:
        restore()


def _redaction_key(settings: Settings) -> bytes | None:
    path = settings.redaction_key_file
    if path is None:
        return None
    try:
        key = Path(path).read_bytes().strip()
    except OSError as exc:
        raise InvalidInput(
            f"CDC_AUDIT_REDACTION_KEY_FILE: cannot read {path}: {exc.strerror}"
        ) from None
    if len(key) < 16:
        raise InvalidInput(
            f"CDC_AUDIT_REDACTION_KEY_FILE: {path} holds {len(key)} bytes; use at least 16"
            " random bytes (for instance: head -c 32 /dev/urandom | base64)"
        )
    return key


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
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        handler: Handler = args.handler
        return handler(args, _settings())
    except CdcAuditError as exc:
        for line in _error_lines(exc):
            _say(line)
        return exc.exit_code
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
