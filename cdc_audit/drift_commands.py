"""`cdc-audit drift`: the privilege snapshot diff and the drift check, once (for cron users)."""

from __future__ import annotations

import argparse
import json

from . import drift
from .cli_common import AddCommand, add_schema_option, dsn_of, policy_of, say, schema_of
from .db import connect
from .job_context import utc_now
from .settings import Settings


def cmd_drift(args: argparse.Namespace, settings: Settings) -> int:
    """Findings on stdout, privilege changes recorded on stderr; exit 1 when there is drift."""
    schema = schema_of(args, settings)
    given = getattr(args, "policy", None) or settings.policy
    loaded = policy_of(args, settings) if given else None
    with connect(dsn_of(args, settings), application_name="cdc-audit drift") as conn:
        result = drift.run_checks(conn, schema, loaded, utc_now())
    if result.privileges is not None:
        for line in result.privileges.lines():
            say(f"recorded: {line}")
    if args.format == "json":
        print(json.dumps(result.as_json(), indent=2, sort_keys=True, default=str))
    else:
        for finding in result.report.findings:
            print(finding.line)
    say(result.summary())
    return 1 if result.report.drift else 0


def add_commands(command: AddCommand) -> None:
    """Register this module's sub-commands."""
    parser = command(
        "drift",
        cmd_drift,
        "snapshot privileges and check the database against the policy (exit 1 on drift)",
    )
    add_schema_option(parser)
    parser.add_argument("--format", choices=("text", "json"), default="text")
