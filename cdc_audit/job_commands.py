"""`purge`: the retention job, run once (for cron and systemd timer users)."""

from __future__ import annotations

import argparse

from .cli_common import AddCommand, dsn_of, policy_of, say
from .db import connect
from .job_context import utc_now
from .purge import purge
from .settings import Settings


def cmd_purge(args: argparse.Namespace, settings: Settings) -> int:
    policy = policy_of(args, settings).policy
    with connect(dsn_of(args, settings)) as conn:
        result = purge(
            conn,
            policy.schema_name,
            policy,
            utc_now(),
            dry_run=args.dry_run,
            timeout=args.timeout,
            progress=lambda line: say(f"- {line}"),
        )
    if args.dry_run:
        for leaf in result.plans:
            print(leaf.describe())
        going = [leaf for leaf in result.plans if leaf.drop]
        events = sum(p.count for leaf in going for p in leaf.parts)
        say(f"dry run: {len(going)} partition(s) and {events} event(s) would be purged")
    elif result.dropped:
        print(f"purged {len(result.dropped)} partition(s), {result.events} event(s)")
    else:
        print("nothing to purge: no partition has passed its stream's retention")
    return 0


def add_commands(command: AddCommand) -> None:
    """Register this module's sub-commands."""
    sub = command("purge", cmd_purge, "drop trail partitions past their stream's retention")
    sub.add_argument(
        "--dry-run", action="store_true", help="show what would be purged, change nothing"
    )
    sub.add_argument(
        "--timeout",
        type=float,
        default=60.0,
        help="seconds to wait for the worker to seal each purge record (60)",
    )
