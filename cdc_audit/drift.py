"""Drift: where the live catalog no longer matches the applied policy, and the privileges job.

A check compares the database with what `apply` installed (the audited tables, the last
applied policy) and, when a policy file is given, with that file too (through the plan `apply`
would run). Each finding is one line naming the object. `run_checks` is what `cdc-audit drift`
and the scheduled privileges job run: the privilege snapshot diff (see `privileges`) and the
drift check, both recorded in the trail, in one transaction.

Trigger and event trigger states (`tgenabled`, `evtenabled`): `O` fires in ordinary sessions
(what apply creates); `A` fires always, also under `session_replication_role = replica`
(stronger than needed: not drift); `R` fires only under `session_replication_role = replica`,
so never for applications; `D` never fires. `R` and `D` are drift.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Final

from psycopg import Connection, sql
from psycopg.rows import TupleRow
from psycopg.types.json import Jsonb

from . import catalog, installer, privileges
from .catalog import Installed, TableInfo
from .db import connect
from .errors import InvalidInput, NotInstalled
from .job_context import JobContext
from .names import InstallNames
from .policy import LoadedPolicy, TablePolicy
from .predicate import TableName
from .trail import applied_policy

JsonObject = dict[str, Any]

_IDENTITY: Final = {"d": "DEFAULT", "f": "FULL", "n": "NOTHING", "i": "USING INDEX"}
_FIRES_NOWHERE: Final = {
    "D": "is disabled",
    "R": "fires only in replica sessions (ENABLE REPLICA), never for applications",
}
# Guard triggers of the audit schema's tables: the row guard first, then the TRUNCATE guard.
_GUARDS: Final = {
    "event": ("append_only", "append_only_truncate"),
    "checkpoint": ("append_only", "append_only_truncate"),
    "policy_version": ("append_only", "append_only_truncate"),
    "signing_key": ("retire_only", "append_only_truncate"),
    "privilege_snapshot": ("append_only", "append_only_truncate"),
    "drift_check": ("append_only", "append_only_truncate"),
    "purge_log": ("append_only", "append_only_truncate"),
    "verification": ("append_only", "append_only_truncate"),
    "snapshot": ("append_only", "append_only_truncate"),
}
# Plan steps that are not drift: recording the policy (reported by comparing hashes) and
# creating trail partitions ahead of time (the worker does that itself).
_NOT_DRIFT_STEPS: Final = frozenset({"record_policy", "partitions"})


@dataclass(frozen=True)
class Finding:
    """One difference between the database and the policy, naming the object."""

    code: str
    object: str
    message: str
    about: str | None = field(default=None, compare=False)
    """The audited table or plan target it concerns, when not `object` itself."""

    @property
    def line(self) -> str:
        return f"{self.object}: {self.message}"

    @property
    def subject(self) -> str:
        return self.about or self.object

    def as_dict(self) -> JsonObject:
        return {"code": self.code, "object": self.object, "message": self.message}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Finding:
        return cls(str(data.get("code")), str(data.get("object")), str(data.get("message")))


@dataclass(frozen=True)
class DriftReport:
    schema: str
    findings: tuple[Finding, ...]
    policy_version_id: int | None

    @property
    def drift(self) -> bool:
        return bool(self.findings)


# ------------------------------------------------------------------------------- checks


def check_drift(
    conn: Connection[TupleRow], schema: str, policy_file: LoadedPolicy | None = None
) -> DriftReport:
    """Every finding, in a stable order. Read-only; raises NotInstalled without a capture."""
    installed = catalog.read_installed(
        conn, InstallNames(schema, conn.info.dbname), recorded_slot=True
    )
    if not installed.schema_exists or "runtime_sha256" not in installed.settings:
        raise NotInstalled(
            f"cdc-audit is not installed in schema {schema} of {conn.info.dbname}:"
            " run cdc-audit apply"
        )
    catalog.read_tables(conn, installed, set())
    found = applied_policy(conn, schema)
    applied_id, applied = found if found is not None else (None, None)
    findings = [
        *_role_findings(installed),
        *_emit_findings(installed),
        *_publication_findings(conn, installed),
        *_table_findings(conn, installed, applied),
        *_event_trigger_findings(conn, installed, applied),
        *_slot_findings(installed),
        *_guard_findings(conn, installed),
    ]
    findings.extend(_policy_findings(conn, installed, applied, policy_file, findings))
    return DriftReport(schema, tuple(findings), applied_id)


def _role_findings(installed: Installed) -> list[Finding]:
    return [
        Finding("role_missing", role, "role is missing")
        for role in installed.names.roles.values()
        if role not in installed.roles
    ]


def _emit_findings(installed: Installed) -> list[Finding]:
    if not installed.emit_message_public:
        return []
    return [
        Finding(
            "emit_message_public",
            "pg_logical_emit_message",
            "PUBLIC may execute it: any role can forge context messages and application events",
        )
    ]


def _publication_findings(conn: Connection[TupleRow], installed: Installed) -> list[Finding]:
    pub = installed.names.publication
    row = conn.execute(
        "SELECT pubinsert, pubupdate, pubdelete, pubtruncate, pubviaroot, puballtables"
        " FROM pg_catalog.pg_publication WHERE pubname = %s",
        (pub,),
    ).fetchone()
    if row is None:
        return [Finding("publication_missing", pub, "publication is missing: nothing is captured")]
    findings = []
    operations = dict(zip(("insert", "update", "delete", "truncate"), row[:4], strict=True))
    skipped = [op for op, published in operations.items() if not published]
    if skipped:
        findings.append(
            Finding(
                "publication_options",
                pub,
                f"publication does not publish {', '.join(skipped)}: those changes are lost",
            )
        )
    if not row[4]:
        findings.append(
            Finding(
                "publication_options",
                pub,
                "publish_via_partition_root is off: partitions' changes arrive under their own"
                " names",
            )
        )
    if row[5]:
        findings.append(
            Finding("publication_options", pub, "publication is FOR ALL TABLES, the trail's too")
        )
    return findings


def _published(conn: Connection[TupleRow], publication: str) -> set[tuple[str, str]]:
    """Tables the publication sends changes of (partitioned tables through their root)."""
    return {
        (row[0], row[1])
        for row in conn.execute(
            "SELECT schemaname::text, tablename::text FROM pg_catalog.pg_publication_tables"
            " WHERE pubname = %s",
            (publication,),
        )
    }


def _trigger_states(
    conn: Connection[TupleRow], installed: Installed
) -> dict[int, tuple[str, bool]]:
    """Context triggers by relation oid: (tgenabled, whether it calls capture_context)."""
    oids = [
        relation.oid
        for info in installed.tables.values()
        if info is not None
        for relation in info.all_relations
    ]
    rows = conn.execute(
        """
        SELECT t.tgrelid::bigint, t.tgenabled::text,
               p.proname = 'capture_context'
               AND p.pronamespace = (SELECT oid FROM pg_catalog.pg_namespace WHERE nspname = %s)
          FROM pg_catalog.pg_trigger t JOIN pg_catalog.pg_proc p ON p.oid = t.tgfoid
         WHERE t.tgname = %s AND t.tgrelid = ANY(%s::oid[])
        """,
        (installed.names.schema, installed.names.context_trigger, oids),
    )
    return {row[0]: (row[1], bool(row[2])) for row in rows}


def _table_findings(
    conn: Connection[TupleRow], installed: Installed, applied: LoadedPolicy | None
) -> list[Finding]:
    published = _published(conn, installed.names.publication)
    triggers = _trigger_states(conn, installed)
    policies = (
        {}
        if applied is None
        else {(t.table.schema, t.table.name): t for t in applied.policy.tables}
    )
    findings: list[Finding] = []
    for key in sorted(installed.audited):
        name = TableName(*key).qualified()
        info = installed.tables.get(key)
        if info is None:
            findings.append(
                Finding("table_missing", name, "audited table is missing (dropped or renamed)")
            )
            continue
        findings.extend(_trigger_findings(installed, info, triggers, name))
        findings.extend(_approval_findings(installed, info, policies.get(key), name))
        findings.extend(_identity_findings(info, policies.get(key), name))
        if installed.publication_exists and key not in published:
            findings.append(
                Finding(
                    "not_published",
                    name,
                    f"not in publication {installed.names.publication}: its changes are lost",
                )
            )
    for key in sorted(published - set(installed.audited)):
        findings.append(
            Finding(
                "published_not_audited",
                TableName(*key).qualified(),
                f"in publication {installed.names.publication} but not audited by the policy",
            )
        )
    return findings


def _approval_findings(
    installed: Installed, info: TableInfo, policy: TablePolicy | None, table: str
) -> list[Finding]:
    """A table that requires approval whose approval check was dropped or disabled."""
    if policy is None or not policy.require_approval:
        return []
    trigger = installed.names.approval_trigger
    return [
        Finding(
            "approval_check_missing",
            TableName(relation.schema, relation.name).qualified(),
            f"approval check {trigger} is missing or disabled: changes are accepted without"
            " an approval",
            about=table,
        )
        for relation in info.all_relations
        if relation.oid not in installed.approval_trigger_oids
    ]


def _trigger_findings(
    installed: Installed,
    info: TableInfo,
    triggers: dict[int, tuple[str, bool]],
    table: str,
) -> list[Finding]:
    trigger = installed.names.context_trigger
    findings = []
    for relation in info.all_relations:
        name = TableName(relation.schema, relation.name).qualified()
        state = triggers.get(relation.oid)
        if state is None and relation.oid == info.relation.oid:
            findings.append(
                Finding(
                    "trigger_missing",
                    name,
                    f"context trigger {trigger} is missing: changes are recorded without context",
                )
            )
        elif state is None:
            findings.append(
                Finding(
                    "partition_without_trigger",
                    name,
                    f"partition of {table} without the context trigger {trigger}: writes made"
                    " directly to it carry no context",
                    about=table,
                )
            )
        elif state[0] in _FIRES_NOWHERE:
            findings.append(
                Finding(
                    "trigger_disabled",
                    name,
                    f"context trigger {trigger} {_FIRES_NOWHERE[state[0]]}",
                    about=table,
                )
            )
        elif not state[1]:
            findings.append(
                Finding(
                    "trigger_replaced",
                    name,
                    f"context trigger {trigger} does not call"
                    f" {installed.names.schema}.capture_context",
                    about=table,
                )
            )
    return findings


def _identity_findings(info: TableInfo, policy: TablePolicy | None, table: str) -> list[Finding]:
    if policy is None:
        return []
    findings = []
    for relation in info.all_relations:
        have = _IDENTITY.get(relation.replica_identity, relation.replica_identity)
        name = TableName(relation.schema, relation.name).qualified()
        if policy.old_values == "full" and relation.replica_identity != "f":
            message = (
                f"REPLICA IDENTITY {have}, the policy needs FULL (old_values: full):"
                " old values of updates and deletes are lost"
            )
        elif policy.old_values == "key" and relation.replica_identity == "n":
            message = (
                "REPLICA IDENTITY NOTHING, the policy needs the key (old_values: key):"
                " updates and deletes fail"
            )
        elif policy.old_values == "key" and relation.replica_identity == "f":
            message = "REPLICA IDENTITY FULL, the policy keeps only the key (old_values: key)"
        else:
            continue
        findings.append(Finding("replica_identity", name, message, about=table))
    return findings


def _event_trigger_findings(
    conn: Connection[TupleRow], installed: Installed, applied: LoadedPolicy | None
) -> list[Finding]:
    names = installed.names
    wanted = (
        applied.policy.ddl is not None if applied is not None else bool(installed.event_triggers)
    )
    if not wanted:
        return []
    states: dict[str, str] = dict(
        conn.execute(
            "SELECT evtname::text, evtenabled::text FROM pg_catalog.pg_event_trigger"
            " WHERE evtname = ANY(%s)",
            ([names.ddl_event_trigger, names.drop_event_trigger],),
        ).fetchall()
    )
    findings = []
    ddl = names.ddl_event_trigger  # what the plan's step is named after
    for trigger in (names.ddl_event_trigger, names.drop_event_trigger):
        state = states.get(trigger)
        if state is None:
            message = "event trigger is missing: schema changes are not recorded"
            findings.append(Finding("event_trigger_missing", trigger, message, about=ddl))
        elif state in _FIRES_NOWHERE:
            message = f"event trigger {_FIRES_NOWHERE[state]}: schema changes are not recorded"
            findings.append(Finding("event_trigger_disabled", trigger, message, about=ddl))
    return findings


def _slot_findings(installed: Installed) -> list[Finding]:
    slot = installed.slot
    name = installed.names.slot
    if slot is None:
        return [
            Finding(
                "slot_missing",
                name,
                "replication slot is missing: changes committed meanwhile never reach the trail",
            )
        ]
    if slot.plugin != "pgoutput":
        return [Finding("slot_plugin", name, f"replication slot uses {slot.plugin}, not pgoutput")]
    if slot.wal_status == "lost":
        return [Finding("slot_lost", name, "replication slot lost WAL it needed (wal_status lost)")]
    return []


def _guard_findings(conn: Connection[TupleRow], installed: Installed) -> list[Finding]:
    """Guard triggers of the trail's tables and of every partition of `event`.

    Row triggers are cloned onto partitions; statement (TRUNCATE) triggers are not, so each
    table that holds rows carries its own. Tables not there yet are the plan's business.
    """
    schema = installed.names.schema
    rows = conn.execute(
        """
        WITH guarded AS (
            SELECT c.oid, c.relname, c.relname AS guarded_as, c.relkind
              FROM pg_catalog.pg_class c
             WHERE c.relnamespace = (SELECT oid FROM pg_catalog.pg_namespace WHERE nspname = %s)
               AND c.relname = ANY(%s) AND NOT c.relispartition
            UNION ALL
            SELECT c.oid, c.relname, 'event', c.relkind
              FROM pg_catalog.pg_partition_tree(to_regclass(format('%%I.event', %s::text))) t
              JOIN pg_catalog.pg_class c ON c.oid = t.relid
             WHERE t.level > 0
        )
        SELECT g.relname::text, g.guarded_as::text, g.relkind::text, t.tgname::text,
               t.tgenabled::text
          FROM guarded g LEFT JOIN pg_catalog.pg_trigger t ON t.tgrelid = g.oid
        """,
        (schema, list(_GUARDS), schema),
    ).fetchall()
    expected: dict[str, tuple[str, ...]] = {}
    present: dict[str, dict[str, str]] = {}
    for relation, guarded_as, kind, trigger, enabled in rows:
        guards: tuple[str, ...] = _GUARDS[guarded_as]
        if relation != guarded_as and kind == "p":
            guards = guards[:1]  # a partitioned partition holds no rows to truncate
        expected[relation] = guards
        triggers = present.setdefault(relation, {})
        if trigger is not None:
            triggers[trigger] = enabled
    findings = []
    for relation in sorted(expected):
        name = TableName(schema, relation).qualified()
        for trigger in expected[relation]:
            state = present[relation].get(trigger)
            if state is None:
                message = f"guard trigger {trigger} is missing: the trail can be altered"
                findings.append(Finding("guard_missing", name, message))
            elif state in _FIRES_NOWHERE:
                message = f"guard trigger {trigger} {_FIRES_NOWHERE[state]}"
                findings.append(Finding("guard_disabled", name, message))
    return findings


def _policy_findings(
    conn: Connection[TupleRow],
    installed: Installed,
    applied: LoadedPolicy | None,
    policy_file: LoadedPolicy | None,
    found: Iterable[Finding],
) -> list[Finding]:
    """What apply would change (against the file, else the applied policy), not yet named."""
    findings = []
    if policy_file is not None and policy_file.sha256 != installed.last_policy_sha256:
        applied_as = (
            "no policy is applied"
            if installed.last_policy_sha256 is None
            else f"the applied policy is version {installed.last_policy_version},"
            f" sha256 {installed.last_policy_sha256[:12]}, applied {installed.last_applied_at}"
        )
        findings.append(
            Finding(
                "policy_differs",
                "policy",
                f"{policy_file.source} (sha256 {policy_file.sha256[:12]}) is not applied:"
                f" {applied_as}",
            )
        )
    wanted = policy_file or applied
    if wanted is None:
        return findings
    try:
        plan = installer.compute_plan(conn, wanted)
    except InvalidInput as exc:
        problems = getattr(exc, "problems", None) or [exc]
        return [*findings, *(Finding("policy", "policy", str(p)) for p in problems)]
    named = {finding.subject for finding in found}
    for step in plan.steps:
        if step.kind in _NOT_DRIFT_STEPS or step.target in named:
            continue
        target = installed.names.schema if step.kind in ("migrate", "runtime") else step.target
        findings.append(Finding("plan", target, f"apply would: {step.description}"))
    return findings


# ------------------------------------------------------------------------------- recording


@dataclass(frozen=True)
class CheckResult:
    """One run of the privilege snapshot and the drift check."""

    report: DriftReport
    privileges: privileges.SnapshotResult | None
    """None when the audit schema predates privilege snapshots (apply upgrades it)."""
    drift_recorded: bool
    """A `drift` event was emitted: the findings differ from the previous check's."""

    def summary(self) -> str:
        snapshot = "privileges not snapshotted (run cdc-audit apply)"
        if self.privileges is not None:
            snapshot = self.privileges.summary()
        count = len(self.report.findings)
        drift = f"{count} drift finding(s)" if count else "no drift"
        if self.drift_recorded:
            drift += " (changed since the last check: recorded)"
        return f"{snapshot}; {drift}"

    def as_json(self) -> JsonObject:
        snap = self.privileges
        return {
            "schema": self.report.schema,
            "drift": [
                finding.as_dict() | {"line": finding.line} for finding in self.report.findings
            ],
            "drift_recorded": self.drift_recorded,
            "policy_version_id": self.report.policy_version_id,
            "privileges": None
            if snap is None
            else {
                "digest": snap.digest,
                "baseline": snap.baseline,
                "counts": snap.counts,
                "changes": list(snap.changes),
            },
        }


def run_checks(
    conn: Connection[TupleRow],
    schema: str,
    policy_file: LoadedPolicy | None,
    now: datetime,
) -> CheckResult:
    """Snapshot privileges and check drift; record both and commit (one transaction)."""
    conn.execute("SELECT pg_advisory_xact_lock(hashtext('cdc-audit privileges ' || %s))", (schema,))
    report = check_drift(conn, schema, policy_file)
    snapshot: privileges.SnapshotResult | None = None
    recorded = False
    if privileges.snapshots_installed(conn, schema):
        snapshot = privileges.take_snapshot(conn, schema, now)
        recorded = record_drift(conn, report, now)
    conn.commit()
    return CheckResult(report, snapshot, recorded)


def record_drift(conn: Connection[TupleRow], report: DriftReport, now: datetime) -> bool:
    """Store the check; emit a `drift` event when its findings differ from the last check's."""
    ident = sql.Identifier(report.schema)
    row = conn.execute(
        sql.SQL("SELECT findings FROM {}.drift_check ORDER BY id DESC LIMIT 1").format(ident)
    ).fetchone()
    before = _findings_of(row[0] if row else [])
    after = list(report.findings)
    conn.execute(
        sql.SQL(
            "INSERT INTO {}.drift_check (checked_at, findings, policy_version_id)"
            " VALUES (%s, %s, %s)"
        ).format(ident),
        (now, Jsonb([f.as_dict() for f in after]), report.policy_version_id),
    )
    if set(before) == set(after):
        return False
    event = drift_event(before, after, report.policy_version_id)
    conn.execute(sql.SQL("SELECT {}.record_privilege_change(%s)").format(ident), (Jsonb(event),))
    return True


def drift_event(
    before: Iterable[Finding], after: Iterable[Finding], policy_version_id: int | None
) -> JsonObject:
    """The content of a `drift` event: every finding now, what appeared and what was fixed."""
    old, new = list(before), list(after)
    return {
        "kind": "drift",
        "findings": [f.as_dict() for f in new],
        "appeared": [f.as_dict() for f in new if f not in old],
        "resolved": [f.as_dict() for f in old if f not in new],
        "policy_version_id": policy_version_id,
    }


def _findings_of(stored: object) -> list[Finding]:
    if not isinstance(stored, list):
        return []
    return [Finding.from_dict(item) for item in stored if isinstance(item, dict)]


def latest_drift(conn: Connection[TupleRow], schema: str) -> dict[str, Any] | None:
    """The last drift check: checked_at, findings (one line each), policy_version_id.

    None when there was none, or the audit schema or the caller's privileges do not allow
    reading it (never an error, so `status` can always call it).
    """
    readable = conn.execute(
        "SELECT CASE WHEN to_regclass(format('%%I.drift_check', %s::text)) IS NULL THEN false"
        " ELSE has_table_privilege(format('%%I.drift_check', %s::text), 'SELECT') END",
        (schema, schema),
    ).fetchone()
    if not (readable and readable[0]):
        return None
    row = conn.execute(
        sql.SQL(
            "SELECT checked_at, findings, policy_version_id FROM {}.drift_check"
            " ORDER BY id DESC LIMIT 1"
        ).format(sql.Identifier(schema))
    ).fetchone()
    if row is None:
        return None
    return {
        "checked_at": row[0],
        "findings": [finding.line for finding in _findings_of(row[1])],
        "policy_version_id": row[2],
    }


# ------------------------------------------------------------------------------- the job


def privileges_job(context: JobContext) -> str:
    """The scheduled job: privilege snapshot diff and drift check, recorded; one-line summary.

    Compares with what is installed (the last applied policy), as the worker has no file.
    """
    with connect(context.dsn, application_name="cdc-audit privileges") as conn:
        result = run_checks(conn, context.schema, None, context.now())
    if result.privileges is not None:
        for line in result.privileges.lines():
            context.progress(line)
    for finding in result.report.findings:
        context.progress(f"drift: {finding.line}")
    return f"privileges: {result.summary()}"
