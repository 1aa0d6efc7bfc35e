"""Commands of the snapshot jobs (filled in with the jobs themselves)."""

from __future__ import annotations

from .cli_common import AddCommand


def add_commands(command: AddCommand) -> None:
    """Register this module's sub-commands."""
