"""What a scheduled job is given, whether the worker's scheduler or a CLI command runs it.

Each job is a function `(JobContext) -> str` returning a one-line summary of what it did. The
clock is injectable so tests can run a job "months later" without waiting for months.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime

from .keys import SigningKey
from .policy import Policy


def utc_now() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True)
class JobContext:
    dsn: str
    policy: Policy
    signing_key: SigningKey | None = None
    redaction_key: bytes | None = None
    progress: Callable[[str], None] = lambda _: None
    """Where long jobs report how far they are (stderr from the CLI, the log in the worker)."""
    now: Callable[[], datetime] = field(default=utc_now)

    @property
    def schema(self) -> str:
        return self.policy.schema_name
