"""The error tree. The CLI catches `CdcAuditError` in one place and maps it to an exit code."""

from __future__ import annotations

import re
from dataclasses import dataclass

# Line breaks and other control characters a hostile file can put into a quoted value.
_NOT_ONE_LINE = re.compile("[\x00-\x08\x0a-\x1f\x7f-\x9f\u2028\u2029]")


class CdcAuditError(Exception):
    """Root of every error cdc-audit raises on purpose."""

    exit_code = 3


class InvalidInput(CdcAuditError):
    """Bad arguments, policy or context: the user can fix it (exit 2)."""

    exit_code = 2


@dataclass(frozen=True)
class PolicyProblem:
    """One thing wrong in a policy file, located precisely enough to fix it."""

    file: str
    line: int | None
    key: str
    message: str

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}" if self.line is not None else self.file
        key = f" {self.key}:" if self.key else ""
        # One line whatever the file holds: the CLI prints one problem per line.
        return _NOT_ONE_LINE.sub(_escaped, f"{where}:{key} {self.message}")


def _escaped(match: re.Match[str]) -> str:
    return repr(match.group())[1:-1]


class PolicyError(InvalidInput):
    """A policy file that cannot be used; `problems` lists every issue found."""

    def __init__(self, problems: list[PolicyProblem]) -> None:
        self.problems = problems
        super().__init__(str(problems[0]) if problems else "invalid policy")


class DatabaseError(CdcAuditError):
    """The database refused or failed an operation; keeps the SQLSTATE when there is one."""

    exit_code = 3

    def __init__(self, message: str, sqlstate: str | None = None) -> None:
        self.sqlstate = sqlstate
        super().__init__(message)


class NotInstalled(CdcAuditError):
    """The database has no cdc-audit installation in the expected schema."""

    exit_code = 3


class IntegrityError(CdcAuditError):
    """Verification found the trail altered; names the stream and first bad sequence number."""

    exit_code = 1

    def __init__(self, stream: str, seq: int | None, message: str) -> None:
        self.stream = stream
        self.seq = seq
        super().__init__(f"stream {stream}: seq {seq}: {message}")
