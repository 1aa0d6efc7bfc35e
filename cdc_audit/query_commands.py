"""Commands of the read side (filled in with the query layer)."""

from __future__ import annotations

from .cli_common import AddCommand


def add_commands(command: AddCommand) -> None:
    """Register this module's sub-commands."""
