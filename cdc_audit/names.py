"""Names of everything an installation creates, derived from the audit schema's name.

The schema name is restricted by the policy to a short lower-case identifier, so every name
here is a plain identifier too; roles and slots are cluster-wide, so they carry the schema
(roles, shared by every audited database of the cluster) or the database (the slot).
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

from psycopg import sql

ROLE_SUFFIXES = ("owner", "writer", "reader", "auditor", "app")
SLOT_NAME_LIMIT = 63


@dataclass(frozen=True)
class InstallNames:
    schema: str
    database: str
    slot_override: str | None = None

    def role(self, suffix: str) -> str:
        return f"{self.schema}_{suffix}"

    @property
    def roles(self) -> dict[str, str]:
        return {suffix: self.role(suffix) for suffix in ROLE_SUFFIXES}

    @property
    def publication(self) -> str:
        return self.schema

    @property
    def slot(self) -> str:
        return self.slot_override or default_slot_name(self.schema, self.database)

    @property
    def context_trigger(self) -> str:
        return f"{self.schema}_context"

    @property
    def approval_trigger(self) -> str:
        """Sorts before the context trigger: statement triggers fire in name order, and the
        approval check puts the approval's id into the context the context trigger emits."""
        return f"{self.schema}_approval"

    @property
    def ddl_event_trigger(self) -> str:
        return f"{self.schema}_ddl"

    @property
    def drop_event_trigger(self) -> str:
        return f"{self.schema}_drop"

    def setting(self, name: str) -> str:
        """A custom configuration parameter in the schema's namespace (e.g. cdc_audit.ctx)."""
        return f"{self.schema}.{name}"

    def message_prefix(self, kind: str) -> str:
        return f"{self.schema}.{kind}"

    def template_params(self, app_stream: str | None) -> dict[str, sql.Composable]:
        """Placeholders shared by every SQL template."""
        params: dict[str, sql.Composable] = {
            "schema": sql.Identifier(self.schema),
            "schema_name": sql.Literal(self.schema),
            "owner_name": sql.Literal(self.role("owner")),
            "auditor_name": sql.Literal(self.role("auditor")),
            "approval_trigger_name": sql.Literal(self.approval_trigger),
            "guc_ctx": sql.Literal(self.setting("ctx")),
            "guc_gen": sql.Literal(self.setting("generation")),
            "guc_emitted": sql.Literal(self.setting("emitted_")),
            "msg_ctx": sql.Literal(self.message_prefix("ctx")),
            "msg_app": sql.Literal(self.message_prefix("app")),
            "msg_ddl": sql.Literal(self.message_prefix("ddl")),
            "msg_mark": sql.Literal(self.message_prefix("mark")),
            "msg_erase": sql.Literal(self.message_prefix("erase")),
            "msg_purge": sql.Literal(self.message_prefix("purge")),
            "msg_privilege": sql.Literal(self.message_prefix("privilege")),
            "guc_erasing": sql.Literal(self.setting("erasing")),
            "app_stream": sql.SQL("{}::text").format(sql.Literal(app_stream)),
        }
        for suffix, role in self.roles.items():
            params[suffix] = sql.Identifier(role)
        return params


def default_slot_name(schema: str, database: str) -> str:
    """`<schema>_<database>`, made a valid slot name; a short hash keeps altered names unique."""
    cleaned = re.sub(r"[^a-z0-9_]", "_", database.lower())
    name = f"{schema}_{cleaned}"
    if cleaned != database or len(name) > SLOT_NAME_LIMIT:
        digest = hashlib.sha256(database.encode()).hexdigest()[:8]
        name = f"{name[: SLOT_NAME_LIMIT - 9]}_{digest}"
    return name
