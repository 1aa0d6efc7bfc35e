"""`cdc-audit approve`: grant a time-bounded approval for one actor and one table."""

from __future__ import annotations

import argparse
import json

from .approvals import approve
from .cli_common import AddCommand, add_schema_option, dsn_of, say, schema_of
from .db import connect
from .query import parse_duration
from .settings import Settings


def cmd_approve(args: argparse.Namespace, settings: Settings) -> int:
    """Prints the approval (id and expiry) on stdout; the refusal reasons exit 2."""
    expires = parse_duration(args.expires, what="--expires")
    schema = schema_of(args, settings)
    with connect(dsn_of(args, settings), application_name="cdc-audit approve") as conn:
        approval = approve(
            conn,
            actor=args.actor,
            table=args.table,
            expires=expires,
            approver=args.approver,
            reason=args.reason,
            schema=schema,
        )
        conn.commit()
    if args.format == "json":
        print(
            json.dumps(
                {
                    "approval_id": approval.approval_id,
                    "actor_id": approval.actor,
                    "table": approval.table,
                    "approver": approval.approver,
                    "reason": approval.reason,
                    "granted_at": approval.granted_at.isoformat(),
                    "expires_at": approval.expires_at.isoformat(),
                },
                sort_keys=True,
            )
        )
    else:
        print(approval.approval_id)
        say(
            f"approval {approval.approval_id}: {approval.actor} may change {approval.table}"
            f" until {approval.expires_at.isoformat()} (approved by {approval.approver})"
        )
    return 0


def add_commands(command: AddCommand) -> None:
    """Register this module's sub-commands."""
    parser = command(
        "approve",
        cmd_approve,
        "let an actor change a table that requires approval, until the approval expires",
    )
    add_schema_option(parser)
    parser.add_argument("--actor", required=True, help="the actor_id the approval is for")
    parser.add_argument(
        "--table", required=True, help="schema.table (a table with require_approval: true)"
    )
    parser.add_argument(
        "--expires", required=True, help="how long the approval lasts: 30min, 1h, 2d ..."
    )
    parser.add_argument("--approver", required=True, help="who approves (must not be the actor)")
    parser.add_argument("--reason", required=True, help="why, e.g. a change ticket")
    parser.add_argument("--format", choices=("text", "json"), default="text")
