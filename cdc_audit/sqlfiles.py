"""SQL templates shipped with the package (the top-level `sql/` directory).

Templates are psycopg `sql.SQL` format strings: `{name}` placeholders are filled with
`sql.Identifier` or `sql.Literal`, so nothing from a policy is ever spliced in as text.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from functools import cache
from importlib import resources
from pathlib import Path

from psycopg import sql

_MIGRATION_NAME = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")


def sql_root() -> Path:
    """`cdc_audit/sql` in an installed wheel; the repository's `sql/` in a source checkout."""
    packaged = Path(str(resources.files("cdc_audit"))) / "sql"
    if packaged.is_dir():
        return packaged
    return Path(__file__).resolve().parent.parent / "sql"


@cache
def read(relative: str) -> str:
    return (sql_root() / relative).read_text(encoding="utf-8")


def render(relative: str, params: dict[str, sql.Composable]) -> sql.Composed:
    return sql.SQL(read(relative)).format(**params)


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    relative: str

    @property
    def checksum(self) -> str:
        return hashlib.sha256(read(self.relative).encode()).hexdigest()


@cache
def migrations() -> tuple[Migration, ...]:
    """Numbered schema migrations in order; the highest number is this release's version."""
    found = []
    for path in sorted((sql_root() / "migrations").iterdir()):
        match = _MIGRATION_NAME.match(path.name)
        if match:
            found.append(Migration(int(match[1]), match[2], f"migrations/{path.name}"))
    return tuple(found)


RUNTIME_FILES = (
    "runtime/context.sql",
    "runtime/app_events.sql",
    "runtime/ddl.sql",
    "runtime/partitions.sql",
    "runtime/worker.sql",
    "runtime/erasure.sql",
    "runtime/grants.sql",
    "runtime/snapshots.sql",
    "runtime/privileges.sql",
    "runtime/retention.sql",
    "runtime/read_audit.sql",
    "runtime/approvals.sql",
)
