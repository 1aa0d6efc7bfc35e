"""What every command handler needs: settings and arguments resolved the same way everywhere.

Command groups that live in their own modules (`snapshot_commands`, `drift_commands`,
`job_commands`) register themselves through an `AddCommand`, so the parser stays in one place.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

from . import keys
from .errors import InvalidInput
from .policy import LoadedPolicy, load_policy
from .settings import Settings

Handler = Callable[[argparse.Namespace, Settings], int]
AddCommand = Callable[[str, Handler, str], argparse.ArgumentParser]
"""Adds a sub-command (name, handler, help) with --dsn/--policy and returns its parser."""


def say(message: str) -> None:
    """A line for people, on stderr (stdout is for results scripts read)."""
    print(message, file=sys.stderr, flush=True)


def policy_of(args: argparse.Namespace, settings: Settings) -> LoadedPolicy:
    path = getattr(args, "policy", None) or settings.policy
    if path is None:
        raise InvalidInput("no policy given: use --policy FILE or set CDC_AUDIT_POLICY")
    return load_policy(Path(path))


def dsn_of(args: argparse.Namespace, settings: Settings) -> str | None:
    return getattr(args, "dsn", None) or settings.dsn


def schema_of(args: argparse.Namespace, settings: Settings) -> str:
    """--schema, else the policy's schema when a policy is given, else the default."""
    if getattr(args, "schema", None):
        return str(args.schema)
    if getattr(args, "policy", None) or settings.policy:
        return policy_of(args, settings).policy.schema_name
    return "cdc_audit"


def add_schema_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--schema", help="audit schema (default: the policy's, or cdc_audit)")


def signing_key_of(settings: Settings) -> keys.SigningKey | None:
    path = settings.signing_key_file
    return None if path is None else keys.load_signing_key(Path(path))


def require_signing_key(settings: Settings, what: str) -> keys.SigningKey:
    """The signing key, or a one-line error saying how to give it."""
    key = signing_key_of(settings)
    if key is None:
        raise InvalidInput(
            f"{what} is signed: set CDC_AUDIT_SIGNING_KEY_FILE to the worker's private key"
        )
    return key


def redaction_key_of(settings: Settings) -> bytes | None:
    """The secret of `hash` redaction, read as the worker reads it (None when not set)."""
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
