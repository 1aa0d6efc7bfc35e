"""What is installed now: read from the database catalog and the installation's own tables.

Every query here is read-only; the plan is computed by comparing this with the policy.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from psycopg import Connection, sql
from psycopg.rows import TupleRow, dict_row

from .names import InstallNames


@dataclass(frozen=True)
class Relation:
    schema: str
    name: str
    oid: int
    replica_identity: str  # d (default), f (full), n (nothing), i (index)

    def identifier(self) -> sql.Identifier:
        return sql.Identifier(self.schema, self.name)


@dataclass(frozen=True)
class TableInfo:
    relation: Relation
    kind: str  # r (table) or p (partitioned table)
    columns: frozenset[str]
    primary_key: tuple[str, ...]
    partition_of: str | None
    partitions: tuple[Relation, ...]  # every descendant, intermediate and leaf

    @property
    def all_relations(self) -> tuple[Relation, ...]:
        return (self.relation, *self.partitions)


@dataclass(frozen=True)
class AuditedTable:
    schema: str
    name: str
    stream: str
    definition_sha256: str
    original_replica_identity: str


@dataclass(frozen=True)
class SlotInfo:
    name: str
    plugin: str
    database: str
    active: bool
    wal_status: str | None
    confirmed_flush_lsn: str | None
    lag_bytes: int | None
    retained_bytes: int | None


@dataclass
class Installed:
    names: InstallNames
    server_version: int
    schema_exists: bool = False
    migration_version: int = 0
    migration_checksums: dict[int, str] = field(default_factory=dict)
    settings: dict[str, str] = field(default_factory=dict)
    roles: frozenset[str] = frozenset()
    bypass_rls_roles: frozenset[str] = frozenset()
    audited: dict[tuple[str, str], AuditedTable] = field(default_factory=dict)
    publication_exists: bool = False
    publication_tables: frozenset[tuple[str, str]] = frozenset()
    event_triggers: frozenset[str] = frozenset()
    slot: SlotInfo | None = None
    emit_message_public: bool = True
    missing_partitions: int = -1  # -1: unknown (no runtime yet), so ensure them
    last_policy_sha256: str | None = None
    last_policy_version: int | None = None
    last_applied_at: str | None = None
    # The policy's tables and the audited ones, as found in the catalog (None: gone).
    tables: dict[tuple[str, str], TableInfo | None] = field(default_factory=dict)
    # Relations (tables and partitions) that carry the context trigger.
    trigger_oids: frozenset[int] = frozenset()
    approval_trigger_oids: frozenset[int] = frozenset()


def _scalar(
    conn: Connection[TupleRow], query: str | sql.Composed, params: tuple[object, ...] = ()
) -> object:
    row = conn.execute(query, params).fetchone()
    return None if row is None else row[0]


def read_installed(
    conn: Connection[TupleRow], names: InstallNames, *, recorded_slot: bool = False
) -> Installed:
    """The installation in `names.schema`; with `recorded_slot`, the slot apply recorded."""
    installed = Installed(names=names, server_version=conn.info.server_version)
    found = conn.execute(
        "SELECT rolname, rolbypassrls FROM pg_roles WHERE rolname = ANY(%s)",
        (list(names.roles.values()),),
    ).fetchall()
    installed.roles = frozenset(row[0] for row in found)
    installed.bypass_rls_roles = frozenset(row[0] for row in found if row[1])
    installed.schema_exists = bool(
        _scalar(conn, "SELECT count(*) FROM pg_namespace WHERE nspname = %s", (names.schema,))
    )
    installed.emit_message_public = _emit_message_public(conn)
    installed.slot = read_slot(conn, names.slot)
    installed.event_triggers = frozenset(
        row[0]
        for row in conn.execute(
            "SELECT evtname FROM pg_event_trigger WHERE evtname = ANY(%s)",
            ([names.ddl_event_trigger, names.drop_event_trigger],),
        )
    )
    _read_publication(conn, installed)
    if installed.schema_exists:
        _read_schema_tables(conn, installed)
    recorded = installed.settings.get("slot_name")
    if recorded_slot and recorded and recorded != names.slot:
        installed.names = InstallNames(names.schema, names.database, recorded)
        installed.slot = read_slot(conn, recorded)
    return installed


def _emit_message_public(conn: Connection[TupleRow]) -> bool:
    """True while PUBLIC may still call some pg_logical_emit_message overload."""
    return bool(
        _scalar(
            conn,
            """
            SELECT bool_or(proacl IS NULL OR EXISTS (
                       SELECT FROM aclexplode(proacl) a
                        WHERE a.grantee = 0 AND a.privilege_type = 'EXECUTE'))
              FROM pg_proc
             WHERE proname = 'pg_logical_emit_message'
               AND pronamespace = 'pg_catalog'::regnamespace
            """,
        )
    )


def _read_publication(conn: Connection[TupleRow], installed: Installed) -> None:
    pub = installed.names.publication
    installed.publication_exists = bool(
        _scalar(conn, "SELECT count(*) FROM pg_publication WHERE pubname = %s", (pub,))
    )
    installed.publication_tables = frozenset(
        (row[0], row[1])
        for row in conn.execute(
            """
            SELECT n.nspname, c.relname
              FROM pg_publication_rel pr
              JOIN pg_publication p ON p.oid = pr.prpubid
              JOIN pg_class c ON c.oid = pr.prrelid
              JOIN pg_namespace n ON n.oid = c.relnamespace
             WHERE p.pubname = %s
            """,
            (pub,),
        )
    )


def _table_exists(conn: Connection[TupleRow], schema: str, table: str) -> bool:
    return bool(
        _scalar(
            conn,
            """SELECT count(*) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
                WHERE n.nspname = %s AND c.relname = %s""",
            (schema, table),
        )
    )


def _read_schema_tables(conn: Connection[TupleRow], installed: Installed) -> None:
    schema = installed.names.schema
    ident = sql.Identifier(schema)
    if not _table_exists(conn, schema, "schema_migration"):
        return
    for version, checksum in conn.execute(
        sql.SQL("SELECT version, checksum FROM {}.schema_migration ORDER BY version").format(ident)
    ):
        installed.migration_checksums[version] = checksum
    installed.migration_version = max(installed.migration_checksums, default=0)
    installed.settings = dict(
        conn.execute(sql.SQL("SELECT key, value FROM {}.install_setting").format(ident)).fetchall()
    )
    for row in conn.execute(
        sql.SQL(
            "SELECT schema_name, table_name, stream, definition_sha256, original_replica_identity"
            " FROM {}.audited_table"
        ).format(ident)
    ):
        installed.audited[(row[0], row[1])] = AuditedTable(*row)
    last = conn.execute(
        sql.SQL(
            "SELECT sha256, policy_version, applied_at::text FROM {}.policy_version"
            " WHERE action = 'apply' ORDER BY id DESC LIMIT 1"
        ).format(ident)
    ).fetchone()
    if last is not None:
        installed.last_policy_sha256, installed.last_policy_version, installed.last_applied_at = (
            last
        )
    if "runtime_sha256" in installed.settings:
        installed.missing_partitions = int(
            str(_scalar(conn, sql.SQL("SELECT {}.missing_event_partitions()").format(ident)))
        )
    else:
        installed.missing_partitions = -1


def read_slot(conn: Connection[TupleRow], slot: str) -> SlotInfo | None:
    with conn.cursor(row_factory=dict_row) as cur:
        row = cur.execute(
            """
            SELECT slot_name AS name, plugin, database, active, wal_status,
                   confirmed_flush_lsn::text AS confirmed_flush_lsn,
                   (pg_current_wal_lsn() - confirmed_flush_lsn)::bigint AS lag_bytes,
                   (pg_current_wal_lsn() - restart_lsn)::bigint AS retained_bytes
              FROM pg_replication_slots WHERE slot_name = %s
            """,
            (slot,),
        ).fetchone()
    return None if row is None else SlotInfo(**row)


def read_table(conn: Connection[TupleRow], schema: str, name: str) -> TableInfo | None:
    """The table, its columns, primary key and partitions; None when it does not exist."""
    row = conn.execute(
        """
        SELECT c.oid, c.relkind::text, c.relreplident::text,
               (SELECT p.oid::regclass::text
                  FROM pg_inherits i JOIN pg_class p ON p.oid = i.inhparent
                 WHERE i.inhrelid = c.oid AND c.relispartition)
          FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
         WHERE n.nspname = %s AND c.relname = %s
        """,
        (schema, name),
    ).fetchone()
    if row is None:
        return None
    oid, kind, replident, parent = row
    columns = frozenset(
        r[0]
        for r in conn.execute(
            "SELECT attname FROM pg_attribute WHERE attrelid = %s::oid AND attnum > 0"
            " AND NOT attisdropped",
            (oid,),
        )
    )
    primary_key = tuple(
        r[0]
        for r in conn.execute(
            """SELECT a.attname FROM pg_index i
                 JOIN LATERAL unnest(i.indkey) WITH ORDINALITY AS k(attnum, ord) ON true
                 JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum
                WHERE i.indrelid = %s::oid AND i.indisprimary ORDER BY k.ord""",
            (oid,),
        )
    )
    partitions = tuple(
        Relation(*r)
        for r in conn.execute(
            """SELECT n.nspname, c.relname, c.oid, c.relreplident::text
                 FROM pg_partition_tree(%s::oid::regclass) t
                 JOIN pg_class c ON c.oid = t.relid
                 JOIN pg_namespace n ON n.oid = c.relnamespace
                WHERE t.level > 0 ORDER BY t.level, c.relname""",
            (oid,),
        )
    )
    return TableInfo(
        relation=Relation(schema, name, oid, replident),
        kind=kind,
        columns=columns,
        primary_key=primary_key,
        partition_of=parent,
        partitions=partitions,
    )


def read_tables(
    conn: Connection[TupleRow], installed: Installed, keys: set[tuple[str, str]]
) -> None:
    """Look up `keys` (and every audited table) with their partitions and context triggers."""
    for key in sorted(keys | set(installed.audited)):
        installed.tables[key] = read_table(conn, *key)
    oids = [
        relation.oid
        for info in installed.tables.values()
        if info is not None
        for relation in info.all_relations
    ]
    installed.trigger_oids = _firing_trigger_relations(conn, installed.names.context_trigger, oids)
    installed.approval_trigger_oids = _firing_trigger_relations(
        conn, installed.names.approval_trigger, oids
    )


def _firing_trigger_relations(
    conn: Connection[TupleRow], trigger: str, oids: list[int]
) -> frozenset[int]:
    """Which of the relations `oids` have the trigger `trigger`, enabled. A disabled (D) or
    replica-only (R) trigger never fires for applications: apply creates it again, enabled."""
    return frozenset(
        row[0]
        for row in conn.execute(
            "SELECT tgrelid::bigint FROM pg_trigger WHERE tgname = %s"
            " AND tgrelid = ANY(%s::oid[]) AND tgenabled IN ('O', 'A')",
            (trigger, oids),
        )
    )
