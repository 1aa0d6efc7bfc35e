"""Plans are data: the steps that bring a database to a policy, computed against what is there.

A plan is built from the policy and a snapshot of the catalog (`catalog.Installed`), without
changing anything; `cdc-audit plan` prints it and `cdc-audit apply` runs it. Applying a plan
and planning again gives an empty plan.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from psycopg import Connection, sql
from psycopg.rows import TupleRow

from . import __version__, sqlfiles
from .catalog import Installed, Relation, TableInfo
from .errors import InvalidInput, PolicyError, PolicyProblem
from .names import InstallNames
from .policy import LoadedPolicy, Policy, TablePolicy

TableKey = tuple[str, str]
Statement = sql.SQL | sql.Composed
ROW_FILTER_MIN_SERVER = 150000
OPERATION_ORDER = ("insert", "update", "delete", "truncate")
CAPTURE_TRIGGER_VERSION = 2
"""Version of the context trigger's definition (2: no WHEN clause, the gate is in the function)."""


@dataclass(frozen=True)
class Step:
    kind: str
    target: str
    description: str
    statements: tuple[Statement, ...]
    after_commit: bool = False


@dataclass(frozen=True)
class Plan:
    steps: tuple[Step, ...]

    @property
    def empty(self) -> bool:
        return not self.steps

    def in_transaction(self) -> list[Step]:
        return [step for step in self.steps if not step.after_commit]

    def after_commit(self) -> list[Step]:
        return [step for step in self.steps if step.after_commit]

    def render(self, conn: Connection[TupleRow] | None = None) -> str:
        """The SQL of the plan, readable, in the order apply runs it."""
        chunks: list[str] = []
        body = self.in_transaction()
        if body:
            chunks.append("BEGIN;")
            chunks.extend(_render_step(step, conn) for step in body)
            chunks.append("COMMIT;")
        chunks.extend(_render_step(step, conn) for step in self.after_commit())
        return "\n\n".join(chunks) + "\n" if chunks else ""


def _render_step(step: Step, conn: Connection[TupleRow] | None) -> str:
    lines = [f"-- {step.description}"]
    lines.extend(
        statement.as_string(conn).strip().rstrip(";") + ";" for statement in step.statements
    )
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Desired state of one audited table


@dataclass(frozen=True)
class TableTarget:
    policy: TablePolicy
    info: TableInfo
    required: tuple[str, ...]
    on_missing: str

    @property
    def key(self) -> TableKey:
        return (self.info.relation.schema, self.info.relation.name)

    @property
    def operations(self) -> tuple[str, ...]:
        return tuple(op for op in OPERATION_ORDER if op in self.policy.operations)

    @property
    def definition_sha256(self) -> str:
        """Everything that shapes the database objects of this table, hashed."""
        definition: dict[str, object] = {
            "stream": self.policy.stream,
            "operations": self.operations,
            "old_values": self.policy.old_values,
            "when": self.policy.when.sql if self.policy.when else None,
            "required": self.required,
            "on_missing": self.on_missing,
            # Bumped when the context trigger's definition changes, so that apply replaces
            # the triggers of tables audited by an earlier version.
            "capture": CAPTURE_TRIGGER_VERSION,
        }
        if self.policy.require_approval:
            definition["require_approval"] = True
        return hashlib.sha256(json.dumps(definition, sort_keys=True).encode()).hexdigest()

    def wanted_identity(self, current: str) -> str:
        if self.policy.old_values == "full":
            return "f"
        return "d" if current == "f" else current


def resolve_tables(
    loaded: LoadedPolicy,
    tables: Mapping[TableKey, TableInfo | None],
    server_version: int,
) -> list[TableTarget]:
    """Check the policy's tables against the catalog; every problem is reported at once."""
    policy = loaded.policy
    problems: list[PolicyProblem] = []
    targets: list[TableTarget] = []
    for index, table in enumerate(policy.tables):
        found = tables.get((table.table.schema, table.table.name))
        located = _Locator(loaded.source, table.line, f"tables[{index}]")
        table_problems = _table_problems(table, found, server_version, located)
        problems.extend(table_problems)
        if found is not None and not table_problems:
            required, on_missing = policy.requirements(table.stream)
            targets.append(TableTarget(table, found, tuple(required), on_missing))
    if problems:
        raise PolicyError(problems)
    return targets


@dataclass(frozen=True)
class _Locator:
    source: str
    line: int | None
    key: str

    def problem(self, key: str, message: str) -> PolicyProblem:
        return PolicyProblem(self.source, self.line, f"{self.key}.{key}", message)


def _table_problems(
    table: TablePolicy, info: TableInfo | None, server_version: int, at: _Locator
) -> list[PolicyProblem]:
    name = table.table.qualified()
    if info is None:
        return [at.problem("table", f"table {name} does not exist in this database")]
    if info.kind not in ("r", "p"):
        return [at.problem("table", f"{name} is not a table (relkind {info.kind!r})")]
    if info.partition_of is not None:
        return [
            at.problem(
                "table",
                f"{name} is a partition of {info.partition_of}; audit the partitioned table",
            )
        ]
    problems = [
        at.problem(key, f"column {column!r} does not exist in {name}")
        for key, columns in (("exclude", table.exclude), ("redact", list(table.redact)))
        for column in columns
        if column not in info.columns
    ]
    problems.extend(_when_problems(table, info, server_version, at))
    if table.old_values == "key" and not info.primary_key and info.relation.replica_identity != "i":
        problems.append(
            at.problem("old_values", f"{name} has no primary key; use old_values: full")
        )
    return problems


def _when_problems(
    table: TablePolicy, info: TableInfo, server_version: int, at: _Locator
) -> list[PolicyProblem]:
    if table.when is None:
        return []
    if server_version < ROW_FILTER_MIN_SERVER:
        return [at.problem("when", "row filters need PostgreSQL 15 or newer")]
    problems = [
        at.problem("when", f"column {column!r} does not exist in {table.table.qualified()}")
        for column in sorted(table.when.columns - info.columns)
    ]
    outside_key = sorted(table.when.columns - set(info.primary_key))
    if table.old_values == "key" and outside_key:
        # UPDATE and DELETE would fail in the application: the filter must see old values.
        problems.append(
            at.problem(
                "when",
                f"uses {', '.join(outside_key)} outside the primary key; with old_values: key "
                "a row filter may only use key columns (use old_values: full)",
            )
        )
    return problems


# ---------------------------------------------------------------------------------------------
# Building the plan


class PlanBuilder:
    """Accumulates steps in the order they must run."""

    def __init__(self, names: InstallNames, app_stream: str | None) -> None:
        self.names = names
        self.params = names.template_params(app_stream)
        self.steps: list[Step] = []

    def add(self, kind: str, target: str, description: str, *statements: Statement) -> None:
        self.steps.append(Step(kind, target, description, tuple(statements)))

    def add_after_commit(self, kind: str, target: str, description: str, stmt: Statement) -> None:
        self.steps.append(Step(kind, target, description, (stmt,), after_commit=True))

    def template(self, relative: str, **extra: sql.Composable) -> sql.Composed:
        return sqlfiles.render(relative, {**self.params, **extra})

    def as_owner(self, *statements: Statement) -> tuple[Statement, ...]:
        owner = sql.Identifier(self.names.role("owner"))
        return (sql.SQL("SET LOCAL ROLE {}").format(owner), *statements, sql.SQL("RESET ROLE"))

    def build(self) -> Plan:
        return Plan(tuple(self.steps))


def runtime_sha256(builder: PlanBuilder) -> str:
    text = "\n".join(sqlfiles.read(name) for name in sqlfiles.RUNTIME_FILES)
    params = repr(sorted((k, repr(v)) for k, v in builder.params.items()))
    return hashlib.sha256((text + params + __version__).encode()).hexdigest()


def build_apply_plan(
    loaded: LoadedPolicy,
    installed: Installed,
    targets: list[TableTarget],
    target_migration: int | None = None,
) -> Plan:
    policy = loaded.policy
    builder = PlanBuilder(installed.names, policy.app_events.stream if policy.app_events else None)
    migrated = _plan_foundation(builder, installed, target_migration)
    _plan_runtime(builder, installed, ",".join(sorted(policy.streams)))
    _plan_read_settings(builder, installed, policy)
    _plan_publication(builder, installed)
    plan_released_tables(builder, installed, {t.key for t in targets})
    for target in targets:
        _plan_table(builder, installed, target)
    _plan_event_triggers(builder, installed, want=policy.ddl is not None)
    if migrated or builder.steps or installed.last_policy_sha256 != loaded.sha256:
        _plan_record(builder, loaded, target_migration)
    if installed.slot is None:
        builder.add_after_commit(
            "create_slot",
            installed.names.slot,
            f"replication slot {installed.names.slot} (pgoutput); created outside the transaction",
            sql.SQL("SELECT pg_create_logical_replication_slot({}, 'pgoutput')").format(
                sql.Literal(installed.names.slot)
            ),
        )
    return builder.build()


def _plan_foundation(builder: PlanBuilder, installed: Installed, target: int | None) -> bool:
    names = installed.names
    for suffix, role in names.roles.items():
        # The worker appends by COPY as the writer, which row-level security would refuse.
        bypass = suffix == "writer"
        if role not in installed.roles:
            builder.add(
                "create_role",
                role,
                f"role {role} ({suffix})" + (", bypassing row-level security" if bypass else ""),
                sql.SQL("CREATE ROLE {} NOLOGIN" + (" BYPASSRLS" if bypass else "")).format(
                    sql.Identifier(role)
                ),
            )
        elif bypass and role not in installed.bypass_rls_roles:
            builder.add(
                "alter_role",
                role,
                f"role {role} bypasses row-level security (the worker appends by COPY)",
                sql.SQL("ALTER ROLE {} BYPASSRLS").format(sql.Identifier(role)),
            )
    if not installed.schema_exists:
        builder.add(
            "create_schema",
            names.schema,
            f"schema {names.schema}, owned by {names.role('owner')}",
            sql.SQL("CREATE SCHEMA {} AUTHORIZATION {}").format(
                sql.Identifier(names.schema), sql.Identifier(names.role("owner"))
            ),
        )
    return _plan_migrations(builder, installed, target)


def _plan_migrations(builder: PlanBuilder, installed: Installed, target: int | None) -> bool:
    available = sqlfiles.migrations()
    newest = available[-1].version
    if installed.migration_version > newest:
        raise InvalidInput(
            f"the installed audit schema is version {installed.migration_version}, newer than "
            f"this cdc-audit ({newest}); upgrade cdc-audit"
        )
    for migration in available:
        recorded = installed.migration_checksums.get(migration.version)
        if recorded is not None and recorded != migration.checksum:
            raise InvalidInput(
                f"migration {migration.version} ({migration.name}) differs from the one "
                "installed; a released migration must never change"
            )
    pending = [
        m
        for m in available
        if m.version > installed.migration_version and (target is None or m.version <= target)
    ]
    for migration in pending:
        record = sql.SQL(
            "INSERT INTO {}.schema_migration (version, name, checksum) VALUES ({}, {}, {})"
        ).format(
            sql.Identifier(installed.names.schema),
            sql.Literal(migration.version),
            sql.Literal(migration.name),
            sql.Literal(migration.checksum),
        )
        builder.add(
            "migrate",
            str(migration.version),
            f"audit schema migration {migration.version:04d} {migration.name}",
            *builder.as_owner(builder.template(migration.relative), record),
        )
    return bool(pending)


def _plan_read_settings(builder: PlanBuilder, installed: Installed, policy: Policy) -> None:
    """Record what the read side needs from the policy (the curated views read them)."""
    readable = ",".join(sorted(name for name, s in policy.streams.items() if s.readers))
    wanted = {
        "reader_streams": (
            readable,
            f"the reader role sees stream(s): {readable.replace(',', ', ') or 'none'}",
        ),
        "read_audit_stream": (
            policy.read_audit.stream if policy.read_audit else "",
            f"reads through the query functions are recorded in stream {policy.read_audit.stream}"
            if policy.read_audit
            else "reads are not recorded (no read_audit)",
        ),
        "admin_streams": (
            policy.ddl.stream if policy.ddl else "",
            f"admin_actions shows stream {policy.ddl.stream}"
            if policy.ddl
            else "admin_actions shows administrative kinds only (no ddl stream)",
        ),
    }
    for key, (value, description) in wanted.items():
        if installed.settings.get(key) == value:
            continue
        builder.add(
            "read_setting",
            key,
            description,
            sql.SQL(
                "INSERT INTO {}.install_setting (key, value) VALUES ({}, {}) "
                "ON CONFLICT (key) DO UPDATE SET value = excluded.value"
            ).format(sql.Identifier(installed.names.schema), sql.Literal(key), sql.Literal(value)),
        )


def _plan_runtime(builder: PlanBuilder, installed: Installed, streams: str) -> None:
    digest = runtime_sha256(builder)
    schema = sql.Identifier(installed.names.schema)
    if installed.settings.get("runtime_sha256") != digest:
        files = [builder.template(name) for name in sqlfiles.RUNTIME_FILES]
        remember = sql.SQL(
            "INSERT INTO {}.install_setting (key, value) VALUES ('runtime_sha256', {}) "
            "ON CONFLICT (key) DO UPDATE SET value = excluded.value"
        ).format(schema, sql.Literal(digest))
        builder.add(
            "runtime",
            installed.names.schema,
            "context, application event and DDL capture functions; privileges",
            *builder.as_owner(*files),
            remember,
        )
    if installed.missing_partitions != 0 or installed.settings.get("streams") != streams:
        record_streams = sql.SQL(
            "INSERT INTO {}.install_setting (key, value) VALUES ('streams', {}) "
            "ON CONFLICT (key) DO UPDATE SET value = excluded.value"
        ).format(schema, sql.Literal(streams))
        builder.add(
            "partitions",
            installed.names.schema,
            "monthly partitions of the trail, by stream, from last month to three months ahead",
            record_streams,
            sql.SQL("SELECT {}.ensure_event_partitions(3)").format(schema),
        )
    if installed.emit_message_public:
        builder.add(
            "emit_privilege",
            "pg_logical_emit_message",
            "only the audit owner may emit logical messages (PUBLIC may by default)",
            builder.template("capture/emit_message_privilege.sql"),
        )


def _plan_publication(builder: PlanBuilder, installed: Installed) -> None:
    if installed.publication_exists:
        return
    builder.add(
        "create_publication",
        installed.names.publication,
        f"publication {installed.names.publication}; partitioned tables publish through their root",
        sql.SQL("CREATE PUBLICATION {} WITH (publish_via_partition_root = true)").format(
            sql.Identifier(installed.names.publication)
        ),
    )


def _plan_table(builder: PlanBuilder, installed: Installed, target: TableTarget) -> None:
    recorded = installed.audited.get(target.key)
    changed = recorded is None or recorded.definition_sha256 != target.definition_sha256
    relations = target.info.all_relations
    needs_trigger = (
        relations if changed else [r for r in relations if r.oid not in installed.trigger_oids]
    )
    statements: list[Statement] = [
        *_identity_statements(target),
        *_approval_statements(
            builder,
            target,
            relations if changed else _lacking_approval_check(installed, target),
            recorded is not None,
        ),
        *(_trigger_statement(builder, target, relation) for relation in needs_trigger),
        *_publication_statements(installed, target, changed),
    ]
    if changed:
        statements.append(_remember_table(installed.names, target))
    if statements:
        verb = "audit" if recorded is None else "update auditing of"
        builder.add(
            "table",
            target.policy.table.qualified(),
            f"{verb} {target.policy.table.qualified()} (stream {target.policy.stream})",
            *statements,
        )


def _identity_statements(target: TableTarget) -> list[Statement]:
    statements: list[Statement] = []
    for relation in target.info.all_relations:
        wanted = target.wanted_identity(relation.replica_identity)
        if wanted != relation.replica_identity:
            statements.append(_set_identity(relation, wanted))
    return statements


def _set_identity(relation: Relation, identity: str) -> Statement:
    keyword = {"f": "FULL", "d": "DEFAULT", "n": "NOTHING"}[identity]
    return sql.SQL("ALTER TABLE {} REPLICA IDENTITY " + keyword).format(relation.identifier())


def _trigger_statement(
    builder: PlanBuilder, target: TableTarget, relation: Relation
) -> sql.Composed:
    names = builder.names
    events = sql.SQL(" OR ").join(sql.SQL(op.upper()) for op in target.operations)
    return builder.template(
        "capture/context_trigger.sql",
        trigger=sql.Identifier(names.context_trigger),
        events=events,
        table=relation.identifier(),
        stream=sql.Literal(target.policy.stream),
        on_missing=sql.Literal(target.on_missing),
        required=sql.Literal(",".join(sorted(target.required))),
    )


def _approval_statements(
    builder: PlanBuilder, target: TableTarget, relations: Iterable[Relation], was_audited: bool
) -> list[Statement]:
    """The approval check of a table that requires approval, or its removal when it no longer
    does (nothing for a table audited for the first time without it)."""
    names = builder.names
    if not target.policy.require_approval:
        return [_drop_approval_trigger(names, r) for r in relations] if was_audited else []
    events = sql.SQL(" OR ").join(sql.SQL(op.upper()) for op in target.operations)
    return [
        builder.template(
            "capture/approval_trigger.sql",
            trigger=sql.Identifier(names.approval_trigger),
            events=events,
            table=relation.identifier(),
            table_schema=sql.Literal(target.key[0]),
            table_name=sql.Literal(target.key[1]),
        )
        for relation in relations
    ]


def _lacking_approval_check(installed: Installed, target: TableTarget) -> list[Relation]:
    """Relations of a table that requires approval whose check was dropped or disabled."""
    if not target.policy.require_approval:
        return []
    return [r for r in target.info.all_relations if r.oid not in installed.approval_trigger_oids]


def _drop_approval_trigger(names: InstallNames, relation: Relation) -> Statement:
    return sql.SQL("DROP TRIGGER IF EXISTS {} ON {}").format(
        sql.Identifier(names.approval_trigger), relation.identifier()
    )


def _publication_statements(
    installed: Installed, target: TableTarget, changed: bool
) -> list[Statement]:
    publication = sql.Identifier(installed.names.publication)
    table = target.info.relation.identifier()
    member = target.key in installed.publication_tables
    statements: list[Statement] = []
    if member and changed:
        # Row filters cannot be altered in place; drop and add in the same transaction.
        statements.append(sql.SQL("ALTER PUBLICATION {} DROP TABLE {}").format(publication, table))
    if changed or not member:
        add = sql.SQL("ALTER PUBLICATION {} ADD TABLE {}").format(publication, table)
        if target.policy.when is not None:
            add = sql.SQL("{} WHERE ({})").format(add, sql.SQL(target.policy.when.sql))
        statements.append(add)
    return statements


def _remember_table(names: InstallNames, target: TableTarget) -> Statement:
    original = target.info.relation.replica_identity
    return sql.SQL(
        "INSERT INTO {}.audited_table"
        " (schema_name, table_name, stream, definition_sha256, original_replica_identity)"
        " VALUES ({}, {}, {}, {}, {})"
        " ON CONFLICT (schema_name, table_name) DO UPDATE SET stream = excluded.stream,"
        " definition_sha256 = excluded.definition_sha256, installed_at = now()"
    ).format(
        sql.Identifier(names.schema),
        sql.Literal(target.key[0]),
        sql.Literal(target.key[1]),
        sql.Literal(target.policy.stream),
        sql.Literal(target.definition_sha256),
        sql.Literal(original),
    )


def plan_released_tables(builder: PlanBuilder, installed: Installed, wanted: set[TableKey]) -> None:
    for key, audited in sorted(installed.audited.items()):
        if key in wanted:
            continue
        builder.add(
            "release_table",
            sql.Identifier(*key).as_string(),
            f"stop auditing {sql.Identifier(*key).as_string()} (its recorded events stay)",
            *release_statements(installed, key, audited.original_replica_identity),
        )


def release_statements(
    installed: Installed, key: TableKey, original_identity: str
) -> list[Statement]:
    """Undo what auditing did to a table: trigger, publication membership, replica identity."""
    names = installed.names
    found = installed.tables.get(key)
    relations = found.all_relations if found is not None else ()
    statements: list[Statement] = [
        sql.SQL("DROP TRIGGER IF EXISTS {} ON {}").format(
            sql.Identifier(names.context_trigger), relation.identifier()
        )
        for relation in relations
    ]
    statements.extend(_drop_approval_trigger(names, relation) for relation in relations)
    if key in installed.publication_tables:
        statements.append(
            sql.SQL("ALTER PUBLICATION {} DROP TABLE {}").format(
                sql.Identifier(names.publication), sql.Identifier(*key)
            )
        )
    if original_identity in ("d", "f", "n"):
        statements.extend(
            _set_identity(relation, original_identity)
            for relation in relations
            if relation.replica_identity != original_identity
        )
    if installed.schema_exists:
        statements.append(
            sql.SQL(
                "DELETE FROM {}.audited_table WHERE schema_name = {} AND table_name = {}"
            ).format(sql.Identifier(names.schema), sql.Literal(key[0]), sql.Literal(key[1]))
        )
    return statements


def _plan_event_triggers(builder: PlanBuilder, installed: Installed, want: bool) -> None:
    names = installed.names
    present = installed.event_triggers
    if want and present != {names.ddl_event_trigger, names.drop_event_trigger}:
        drops = drop_event_trigger_statements(present)
        builder.add(
            "event_triggers",
            names.ddl_event_trigger,
            "event triggers recording schema changes, grants and drops",
            *drops,
            builder.template(
                "capture/event_triggers.sql",
                ddl_trigger=sql.Identifier(names.ddl_event_trigger),
                drop_trigger=sql.Identifier(names.drop_event_trigger),
            ),
        )
    elif not want and present:
        builder.add(
            "drop_event_triggers",
            names.ddl_event_trigger,
            "the policy no longer records DDL",
            *drop_event_trigger_statements(present),
        )


def drop_event_trigger_statements(present: Iterable[str]) -> list[Statement]:
    return [
        sql.SQL("DROP EVENT TRIGGER IF EXISTS {}").format(sql.Identifier(t))
        for t in sorted(present)
    ]


def _plan_record(builder: PlanBuilder, loaded: LoadedPolicy, target: int | None) -> None:
    names = builder.names
    schema_version = target or sqlfiles.migrations()[-1].version
    builder.add(
        "record_policy",
        loaded.sha256[:12],
        f"record policy version {loaded.policy.version} (sha256 {loaded.sha256[:12]}…)",
        sql.SQL(
            "INSERT INTO {}.policy_version (action, policy_version, sha256, policy_text,"
            " schema_version, software_version) VALUES ('apply', {}, {}, {}, {}, {})"
        ).format(
            sql.Identifier(names.schema),
            sql.Literal(loaded.policy.version),
            sql.Literal(loaded.sha256),
            sql.Literal(loaded.text),
            sql.Literal(schema_version),
            sql.Literal(__version__),
        ),
        sql.SQL(
            "INSERT INTO {}.install_setting (key, value) VALUES ('slot_name', {})"
            " ON CONFLICT (key) DO UPDATE SET value = excluded.value"
        ).format(sql.Identifier(names.schema), sql.Literal(names.slot)),
        # Tells a running worker, at this exact point of the stream, to seal with this version.
        sql.SQL(
            "SELECT pg_logical_emit_message(true, {},"
            " (SELECT max(id)::text FROM {}.policy_version))"
        ).format(sql.Literal(names.message_prefix("policy")), sql.Identifier(names.schema)),
    )


def policy_names(policy: Policy, database: str) -> InstallNames:
    return InstallNames(schema=policy.schema_name, database=database, slot_override=policy.slot)
