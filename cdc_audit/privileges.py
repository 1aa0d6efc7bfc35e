"""Privilege snapshots: roles, memberships and privileges, and what changed between two of them.

CREATE/ALTER/DROP ROLE and GRANT of a role fire no event trigger (they act on cluster-wide
objects), so they cannot be captured as they happen. Instead the privileges job reads a
canonical, sorted description of the privilege state, compares it with the previous snapshot,
and records each difference as a `privilege` event of the trail (the first snapshot is a
baseline: one event with counts). What is described:

- every role but PostgreSQL's predefined `pg_*` roles: its attributes, connection limit,
  expiry and per-role settings (never a password or its hash);
- every role membership: role, member, grantor, admin option (and, from PostgreSQL 16, the
  inherit and set options);
- privileges on the audited tables and their partitions (table and column privileges), on
  every relation of the audit schema, on the audit schema itself, on its functions and on
  `pg_logical_emit_message`, and on the database — from `aclexplode`, with PostgreSQL's
  defaults filled in where an ACL is still NULL, so a first GRANT shows only what it added,
  and without an owner's own privileges on its object (they come with ownership).

`diff`, `describe` and `digest` are pure; `read_state` and `take_snapshot` use the database.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Final

from psycopg import Connection, sql
from psycopg.rows import TupleRow
from psycopg.types.json import Jsonb

from .canonical import canonical_bytes

JsonObject = dict[str, Any]

STATE_VERSION: Final = 1
"""Shape of a stored state; a snapshot of another shape is replaced by a new baseline."""


@dataclass(frozen=True)
class Section:
    """One list of the state: how its entries are keyed and what their differences are called."""

    name: str
    key: tuple[str, ...]
    added: str
    removed: str
    altered: str


SECTIONS: Final = (
    Section("roles", ("role",), "role_created", "role_dropped", "role_altered"),
    Section(
        "memberships",
        ("role", "member", "grantor"),
        "membership_granted",
        "membership_revoked",
        "membership_altered",
    ),
    Section(
        "privileges",
        ("object_type", "object", "grantee", "grantor", "privilege"),
        "privilege_granted",
        "privilege_revoked",
        "privilege_altered",
    ),
)


# ------------------------------------------------------------------------------- pure logic


def canonical_state(
    roles: Sequence[JsonObject],
    memberships: Sequence[JsonObject],
    privileges: Sequence[JsonObject],
) -> JsonObject:
    """The state with each list sorted by its key, so equal states have equal digests."""
    lists = {"roles": roles, "memberships": memberships, "privileges": privileges}
    state: JsonObject = {"v": STATE_VERSION}
    for section in SECTIONS:
        entries = lists[section.name]
        state[section.name] = [entries[i] for i in _order(section, entries)]
    return state


def _order(section: Section, entries: Sequence[JsonObject]) -> list[int]:
    keys = [_key(section, entry) for entry in entries]
    return sorted(range(len(entries)), key=keys.__getitem__)


def digest(state: Mapping[str, Any]) -> str:
    """SHA-256 (hex) of the state's canonical JSON."""
    return hashlib.sha256(canonical_bytes(dict(state))).hexdigest()


def counts(state: Mapping[str, Any]) -> JsonObject:
    return {section.name: len(state.get(section.name) or ()) for section in SECTIONS}


def diff(before: Mapping[str, Any], after: Mapping[str, Any]) -> list[JsonObject]:
    """Every difference from `before` to `after`, one JSON object each, in a stable order.

    An entry only in `after` is `<section>_created/granted`, only in `before` is
    `..._dropped/revoked` (each with the whole entry); an entry in both whose other fields
    differ is `..._altered`, with its key fields and the changed fields `before` and `after`.
    """
    changes: list[JsonObject] = []
    for section in SECTIONS:
        old = _index(section, before.get(section.name) or ())
        new = _index(section, after.get(section.name) or ())
        for key in sorted(old.keys() | new.keys()):
            change = _difference(section, old.get(key), new.get(key))
            if change is not None:
                changes.append(change)
    return changes


def baseline(state: Mapping[str, Any], state_digest: str) -> JsonObject:
    """The one change recorded for a first snapshot: how much there is, not each entry."""
    return {"change": "baseline", **counts(state), "snapshot": state_digest}


def describe(change: Mapping[str, Any]) -> str:
    """One line for people: what changed, on what, for whom, granted by whom."""
    kind = str(change.get("change"))
    if kind == "baseline":
        return (
            f"privilege baseline: {change.get('roles')} role(s), "
            f"{change.get('memberships')} membership(s), {change.get('privileges')} privilege(s)"
        )
    verb = kind.split("_", 1)[1] if "_" in kind else kind
    if kind.startswith("role_"):
        detail = _altered_detail(change) if verb == "altered" else _role_flags(change)
        return f"role {verb}: {change.get('role')}{detail}"
    if kind.startswith("membership_"):
        detail = _altered_detail(change) if verb == "altered" else _admin(change)
        return (
            f"membership {verb}: {change.get('member')} in {change.get('role')}"
            f" (by {change.get('grantor')}){detail}"
        )
    detail = _altered_detail(change) if verb == "altered" else _grantable(change)
    return (
        f"privilege {verb}: {change.get('privilege')} on {change.get('object_type')}"
        f" {change.get('object')} to {change.get('grantee')} (by {change.get('grantor')}){detail}"
    )


def _key(section: Section, entry: Mapping[str, Any]) -> tuple[str, ...]:
    return tuple("" if entry.get(field) is None else str(entry.get(field)) for field in section.key)


def _index(
    section: Section, entries: Sequence[Mapping[str, Any]]
) -> dict[tuple[str, ...], JsonObject]:
    return {_key(section, entry): dict(entry) for entry in entries}


def _difference(
    section: Section, old: JsonObject | None, new: JsonObject | None
) -> JsonObject | None:
    if old is None and new is not None:
        return {"change": section.added, **new}
    if new is None and old is not None:
        return {"change": section.removed, **old}
    assert old is not None and new is not None
    fields = sorted((old.keys() | new.keys()) - set(section.key))
    changed = [f for f in fields if old.get(f) != new.get(f)]
    if not changed:
        return None
    return {
        "change": section.altered,
        **{field: new.get(field) for field in section.key},
        "before": {field: old.get(field) for field in changed},
        "after": {field: new.get(field) for field in changed},
    }


_ROLE_FLAGS: Final = ("superuser", "createrole", "createdb", "login", "replication", "bypassrls")


def _role_flags(change: Mapping[str, Any]) -> str:
    flags = [flag for flag in _ROLE_FLAGS if change.get(flag)]
    return f" ({', '.join(flags)})" if flags else ""


def _admin(change: Mapping[str, Any]) -> str:
    return " with admin option" if change.get("admin_option") else ""


def _grantable(change: Mapping[str, Any]) -> str:
    return " with grant option" if change.get("grantable") else ""


def _altered_detail(change: Mapping[str, Any]) -> str:
    before = change.get("before") or {}
    after = change.get("after") or {}
    parts = [
        f"{field} {_shown(before.get(field))} -> {_shown(after.get(field))}" for field in after
    ]
    return f": {', '.join(parts)}" if parts else ""


def _shown(value: object) -> str:
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


# ------------------------------------------------------------------------------- database


_ROLES_QUERY: Final = """
SELECT rolname::text, rolsuper, rolinherit, rolcreaterole, rolcreatedb, rolcanlogin,
       rolreplication, rolbypassrls, rolconnlimit,
       CASE WHEN rolvaliduntil IS NULL THEN NULL
            WHEN isfinite(rolvaliduntil)
            THEN to_char(rolvaliduntil AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"')
            ELSE rolvaliduntil::text END,
       coalesce(rolconfig, ARRAY[]::text[])
  FROM pg_catalog.pg_roles
 WHERE rolname !~ '^pg_'
"""

_MEMBERSHIPS_QUERY: Final = """
SELECT pg_catalog.pg_get_userbyid(am.roleid)::text, pg_catalog.pg_get_userbyid(am.member)::text,
       pg_catalog.pg_get_userbyid(am.grantor)::text, am.admin_option,
       (to_jsonb(am) ->> 'inherit_option')::boolean, (to_jsonb(am) ->> 'set_option')::boolean
  FROM pg_catalog.pg_auth_members am
"""

# Relations: the audit schema's and every audited table with its partitions. Defaults are
# filled in for a NULL ACL so that "nothing granted yet" and "the defaults" read the same; an
# owner's own privileges on its object are left out (they come with ownership, and a new
# partition would otherwise show up as a grant).
_PRIVILEGES_QUERY: Final = """
WITH audit AS (
    SELECT oid FROM pg_catalog.pg_namespace WHERE nspname = %(schema)s
), audited AS (
    SELECT to_regclass(format('%%I.%%I', a.schema_name, a.table_name)) AS root FROM {audited} a
), rels AS (
    SELECT c.oid FROM pg_catalog.pg_class c, audit
     WHERE c.relnamespace = audit.oid AND c.relkind IN ('r', 'p', 'v', 'm', 'S', 'f')
    UNION
    SELECT root::oid FROM audited WHERE root IS NOT NULL
    UNION
    SELECT t.relid::oid FROM audited CROSS JOIN LATERAL pg_catalog.pg_partition_tree(root) t
), acl AS (
    SELECT CASE c.relkind WHEN 'S' THEN 'sequence' WHEN 'v' THEN 'view'
                          WHEN 'm' THEN 'materialized view' WHEN 'f' THEN 'foreign table'
                          ELSE 'table' END AS object_type,
           format('%%I.%%I', n.nspname, c.relname) AS object, c.relowner AS owner, e.*
      FROM rels
      JOIN pg_catalog.pg_class c ON c.oid = rels.oid
      JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
     CROSS JOIN LATERAL aclexplode(coalesce(c.relacl, acldefault(
               CASE WHEN c.relkind = 'S' THEN 's' ELSE 'r' END::"char", c.relowner))) e
    UNION ALL
    SELECT 'column', format('%%I.%%I (%%I)', n.nspname, c.relname, a.attname), c.relowner, e.*
      FROM rels
      JOIN pg_catalog.pg_class c ON c.oid = rels.oid
      JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
      JOIN pg_catalog.pg_attribute a
        ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped AND a.attacl IS NOT NULL
     CROSS JOIN LATERAL aclexplode(a.attacl) e
    UNION ALL
    SELECT 'schema', format('%%I', n.nspname), n.nspowner, e.*
      FROM pg_catalog.pg_namespace n
      JOIN audit ON audit.oid = n.oid
     CROSS JOIN LATERAL aclexplode(coalesce(n.nspacl, acldefault('n', n.nspowner))) e
    UNION ALL
    SELECT 'function',
           format('%%I.%%I(%%s)', n.nspname, p.proname, pg_get_function_identity_arguments(p.oid)),
           p.proowner, e.*
      FROM pg_catalog.pg_proc p
      JOIN pg_catalog.pg_namespace n ON n.oid = p.pronamespace
     CROSS JOIN LATERAL aclexplode(coalesce(p.proacl, acldefault('f', p.proowner))) e
     WHERE p.pronamespace IN (SELECT oid FROM audit)
        OR (n.nspname = 'pg_catalog' AND p.proname = 'pg_logical_emit_message')
    UNION ALL
    SELECT 'database', format('%%I', d.datname), d.datdba, e.*
      FROM pg_catalog.pg_database d
     CROSS JOIN LATERAL aclexplode(coalesce(d.datacl, acldefault('d', d.datdba))) e
     WHERE d.datname = current_database()
)
SELECT object_type, object,
       CASE WHEN grantee = 0 THEN 'PUBLIC' ELSE pg_catalog.pg_get_userbyid(grantee)::text END,
       pg_catalog.pg_get_userbyid(grantor)::text, privilege_type, is_grantable
  FROM acl
 WHERE grantee <> owner OR grantor <> owner
"""


def read_state(conn: Connection[TupleRow], schema: str) -> JsonObject:
    """The privilege state now, canonical and sorted (see the module's docstring)."""
    roles = [
        {
            "role": r[0],
            "superuser": r[1],
            "inherit": r[2],
            "createrole": r[3],
            "createdb": r[4],
            "login": r[5],
            "replication": r[6],
            "bypassrls": r[7],
            "connection_limit": r[8],
            "valid_until": r[9],
            "config": sorted(r[10]),
        }
        for r in conn.execute(_ROLES_QUERY)
    ]
    memberships = []
    for r in conn.execute(_MEMBERSHIPS_QUERY):
        entry: JsonObject = {"role": r[0], "member": r[1], "grantor": r[2], "admin_option": r[3]}
        # PostgreSQL 16 and later only; absent (not null) before, so digests stay stable.
        if r[4] is not None:
            entry["inherit_option"] = r[4]
        if r[5] is not None:
            entry["set_option"] = r[5]
        memberships.append(entry)
    query = sql.SQL(_PRIVILEGES_QUERY).format(audited=sql.Identifier(schema, "audited_table"))
    privileges = [
        {
            "object_type": r[0],
            "object": r[1],
            "grantee": r[2],
            "grantor": r[3],
            "privilege": r[4],
            "grantable": r[5],
        }
        for r in conn.execute(query, {"schema": schema})
    ]
    return canonical_state(roles, memberships, privileges)


@dataclass(frozen=True)
class SnapshotResult:
    """What one snapshot recorded: a baseline, the changes since the last one, or nothing."""

    digest: str
    baseline: bool
    changes: tuple[JsonObject, ...]
    counts: JsonObject

    @property
    def recorded(self) -> bool:
        return bool(self.changes)

    def lines(self) -> list[str]:
        return [describe(change) for change in self.changes]

    def summary(self) -> str:
        if self.baseline:
            c = self.counts
            return (
                f"privilege baseline recorded ({c['roles']} roles, {c['memberships']}"
                f" memberships, {c['privileges']} privileges)"
            )
        if self.changes:
            return f"{len(self.changes)} privilege change(s) recorded"
        return "no privilege change"


def snapshots_installed(conn: Connection[TupleRow], schema: str) -> bool:
    """Whether the audit schema has the snapshot tables (migration 0007)."""
    row = conn.execute(
        "SELECT to_regclass(format('%%I.privilege_snapshot', %s::text)) IS NOT NULL", (schema,)
    ).fetchone()
    return bool(row and row[0])


def take_snapshot(conn: Connection[TupleRow], schema: str, now: datetime) -> SnapshotResult:
    """Read the state, record what changed since the last snapshot, store the new one.

    Runs in the caller's transaction, which must hold the job's lock: the events are
    transactional messages, so they reach the trail exactly when the snapshot commits.
    """
    state = read_state(conn, schema)
    current = digest(state)
    ident = sql.Identifier(schema)
    last = conn.execute(
        sql.SQL("SELECT state, digest FROM {}.privilege_snapshot ORDER BY id DESC LIMIT 1").format(
            ident
        )
    ).fetchone()
    if last is not None and last[1] == current:
        return SnapshotResult(current, False, (), counts(state))
    previous = last[0] if last is not None and isinstance(last[0], dict) else None
    if previous is None or previous.get("v") != STATE_VERSION:
        first, changes = True, [baseline(state, current)]
    else:
        first, changes = False, [change | {"snapshot": current} for change in diff(previous, state)]
    for change in changes:
        conn.execute(
            sql.SQL("SELECT {}.record_privilege_change(%s)").format(ident), (Jsonb(change),)
        )
    conn.execute(
        sql.SQL(
            "INSERT INTO {}.privilege_snapshot (taken_at, state, digest) VALUES (%s, %s, %s)"
        ).format(ident),
        (now, Jsonb(state), current),
    )
    return SnapshotResult(current, first, tuple(changes), counts(state))
