"""Fixtures that write policy files for tests."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

BASE_POLICY = """\
version: 1
schema: cdc_audit
context:
  require: [actor_id]
  on_missing: record
streams:
  user: {retention: 400d}
  admin: {retention: 7y, require: [actor_id, reason], on_missing: reject}
"""

WritePolicy = Callable[..., Path]


@pytest.fixture
def write_policy(tmp_path: Path) -> WritePolicy:
    """Write BASE_POLICY plus the given tables/extra YAML; returns the file's path."""
    counter = iter(range(1000))

    def write(tables: str = "", extra: str = "", base: str = BASE_POLICY) -> Path:
        path = tmp_path / f"policy{next(counter)}.yaml"
        text = base
        if tables:
            text += "tables:\n" + tables
        text += extra
        path.write_text(text)
        return path

    return write
