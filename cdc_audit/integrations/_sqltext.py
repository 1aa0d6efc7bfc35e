"""The `set_context` call as plain DB-API text with %s placeholders, for drivers other than
psycopg's own API (SQLAlchemy's and Django's cursors)."""

from __future__ import annotations

import json
import re
from typing import Any

from .actor import Actor

_SCHEMA = re.compile(r"[a-z_][a-z0-9_]{0,62}")


def quoted_schema(schema: str) -> str:
    if not _SCHEMA.fullmatch(schema):
        raise ValueError(f"schema {schema!r} is not a lower-case SQL identifier")
    return f'"{schema}"'


def set_context_text(actor: Actor, schema: str = "cdc_audit") -> tuple[str, list[Any]]:
    """`SELECT "schema".set_context(name => %s, ...)` and its parameters."""
    fields = actor.fields()
    args = [f"{name} => %s" for name in fields]
    values: list[Any] = list(fields.values())
    if actor.extra:
        args.append("extra => %s::jsonb")
        values.append(json.dumps(dict(actor.extra), ensure_ascii=False, sort_keys=True))
    return f"SELECT {quoted_schema(schema)}.set_context({', '.join(args)})", values
