"""Plan, apply and uninstall: the database side of a policy.

`apply` runs the plan in one transaction, serialised against concurrent installers by an
advisory lock, then creates the replication slot (which cannot be created in a transaction
that has written anything).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import psycopg
from psycopg import sql
from psycopg.rows import TupleRow

from . import __version__, catalog, plan
from .catalog import Installed
from .db import connect, database_error
from .errors import DatabaseError, InvalidInput, NotInstalled
from .names import InstallNames
from .policy import LoadedPolicy

Progress = Callable[[str], None]


def _lock(conn: psycopg.Connection[TupleRow], names: InstallNames) -> None:
    conn.execute(
        "SELECT pg_advisory_xact_lock(hashtext('cdc-audit install ' || %s))", (names.schema,)
    )


def _require_superuser(conn: psycopg.Connection[TupleRow]) -> None:
    row = conn.execute("SELECT rolsuper FROM pg_roles WHERE rolname = current_user").fetchone()
    if not (row and row[0]):
        raise InvalidInput(
            "apply and uninstall need a superuser (event triggers and the emit privilege demand it)"
        )


def _run(conn: psycopg.Connection[TupleRow], steps: list[plan.Step], progress: Progress) -> None:
    for step in steps:
        progress(step.description)
        for statement in step.statements:
            conn.execute(statement)


def read_state(
    conn: psycopg.Connection[TupleRow], loaded: LoadedPolicy
) -> tuple[Installed, list[plan.TableTarget]]:
    names = plan.policy_names(loaded.policy, conn.info.dbname)
    installed = catalog.read_installed(conn, names)
    keys = {(t.table.schema, t.table.name) for t in loaded.policy.tables}
    catalog.read_tables(conn, installed, keys)
    targets = plan.resolve_tables(loaded, installed.tables, installed.server_version)
    return installed, targets


def compute_plan(
    conn: psycopg.Connection[TupleRow], loaded: LoadedPolicy, target_migration: int | None = None
) -> plan.Plan:
    installed, targets = read_state(conn, loaded)
    return plan.build_apply_plan(loaded, installed, targets, target_migration)


@dataclass(frozen=True)
class ApplyResult:
    plan: plan.Plan
    slot: str


def apply(
    dsn: str | None,
    loaded: LoadedPolicy,
    progress: Progress = lambda _: None,
    target_migration: int | None = None,
) -> ApplyResult:
    with connect(dsn, autocommit=True) as conn:
        _require_superuser(conn)
        try:
            with conn.transaction():
                _lock(conn, plan.policy_names(loaded.policy, conn.info.dbname))
                computed = compute_plan(conn, loaded, target_migration)
                _run(conn, computed.in_transaction(), progress)
            _run(conn, computed.after_commit(), progress)
        except psycopg.Error as exc:
            raise database_error(exc, "apply") from exc
        names = plan.policy_names(loaded.policy, conn.info.dbname)
    return ApplyResult(computed, names.slot)


def build_uninstall_plan(installed: Installed, drop_data: bool) -> plan.Plan:
    names = installed.names
    builder = plan.PlanBuilder(names, None)
    if installed.event_triggers:
        builder.add(
            "drop_event_triggers",
            names.ddl_event_trigger,
            "event triggers",
            *plan.drop_event_trigger_statements(installed.event_triggers),
        )
    plan.plan_released_tables(builder, installed, wanted=set())
    if installed.publication_exists:
        builder.add(
            "drop_publication",
            names.publication,
            f"publication {names.publication}",
            sql.SQL("DROP PUBLICATION {}").format(sql.Identifier(names.publication)),
        )
    if not installed.emit_message_public and names.role("owner") in installed.roles:
        builder.add(
            "restore_emit_privilege",
            "pg_logical_emit_message",
            "give pg_logical_emit_message back to PUBLIC",
            builder.template("capture/restore_emit_message_privilege.sql"),
        )
    if installed.schema_exists:
        _plan_schema_removal(builder, installed, drop_data)
    if installed.slot is not None:
        builder.add_after_commit(
            "drop_slot",
            names.slot,
            f"replication slot {names.slot}",
            sql.SQL("SELECT pg_drop_replication_slot({})").format(sql.Literal(names.slot)),
        )
    return builder.build()


def _plan_schema_removal(builder: plan.PlanBuilder, installed: Installed, drop_data: bool) -> None:
    names = installed.names
    schema = sql.Identifier(names.schema)
    if drop_data:
        builder.add(
            "drop_schema",
            names.schema,
            f"schema {names.schema} with the whole trail (--drop-data)",
            sql.SQL("DROP SCHEMA {} CASCADE").format(schema),
        )
        return
    builder.add(
        "drop_runtime",
        names.schema,
        "capture functions (the trail, its guards and its history stay)",
        builder.template("capture/drop_runtime.sql"),
        sql.SQL(
            "INSERT INTO {}.policy_version (action, schema_version, software_version)"
            " VALUES ('uninstall', {}, {})"
        ).format(schema, sql.Literal(installed.migration_version), sql.Literal(__version__)),
    )


def uninstall(
    dsn: str | None, schema: str, drop_data: bool, progress: Progress = lambda _: None
) -> plan.Plan:
    with connect(dsn, autocommit=True) as conn:
        _require_superuser(conn)
        names = InstallNames(schema=schema, database=conn.info.dbname)
        try:
            with conn.transaction():
                _lock(conn, names)
                installed = catalog.read_installed(conn, names, recorded_slot=True)
                names = installed.names
                catalog.read_tables(conn, installed, set())
                if not drop_data and not _capture_installed(installed):
                    raise NotInstalled(
                        f"cdc-audit capture is not installed in schema {schema}"
                        + (
                            " (its trail is kept; --drop-data removes it)"
                            if installed.schema_exists
                            else ""
                        )
                    )
                if drop_data and not installed.schema_exists and installed.slot is None:
                    raise NotInstalled(f"cdc-audit is not installed in schema {schema}")
                if installed.slot is not None and installed.slot.active:
                    raise DatabaseError(
                        f"replication slot {names.slot} is in use: stop the worker first"
                    )
                built = build_uninstall_plan(installed, drop_data)
                _run(conn, built.in_transaction(), progress)
            _run(conn, built.after_commit(), progress)
            if drop_data:
                _drop_roles(conn, names, progress)
        except psycopg.Error as exc:
            raise database_error(exc, "uninstall") from exc
    return built


def _capture_installed(installed: Installed) -> bool:
    return bool(
        installed.audited
        or installed.slot is not None
        or installed.publication_exists
        or installed.event_triggers
        or "runtime_sha256" in installed.settings
    )


def _drop_roles(
    conn: psycopg.Connection[TupleRow], names: InstallNames, progress: Progress
) -> None:
    """Roles are cluster-wide: drop each one no other database still uses."""
    for role in names.roles.values():
        try:
            with conn.transaction():
                conn.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(role)))
            progress(f"dropped role {role}")
        except psycopg.errors.DependentObjectsStillExist:
            progress(f"kept role {role}: another database still uses it")
