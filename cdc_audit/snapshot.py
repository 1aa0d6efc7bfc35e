"""Hashed snapshots of audited tables, and reconciling the trail between two of them.

A snapshot is the digest of a table's whole content at one consistent point, signed like a
checkpoint. Two snapshots of the same table and the trail between them make a proof: replay
the recorded row changes on the first digest and you must arrive at the second. A change that
reached the table but not the trail (a slot advanced by hand, a table dropped from the
publication for a while) leaves the digests apart; a change that bypassed the context trigger
(``session_replication_role = replica``, a disabled trigger) is in the WAL, so it is in the
trail (flagged ``context_missing``) and the digests agree.

THE SNAPSHOT DIGEST (version 1)

- **Row object**: the JSON object the worker stores as an event's ``new`` for that row: every
  published column (not dropped, not generated) except the policy's ``exclude`` columns, keyed
  by column name, the value converted from PostgreSQL's text output by the type rules of
  `cdc_audit.values` (under the session settings of `cdc_audit.replication.SESSION_SETTINGS`),
  then ``redact: hash`` replaced by ``"hmac-sha256:" + hex(HMAC-SHA256(redaction key,
  canonical bytes of the value))`` and ``redact: mask`` by ``"***"``; SQL NULL is ``null``
  (see `cdc_audit.columns`). The same code (`RowShaper`) shapes both, so they cannot drift.
- **Row hash**: ``H(row) = int.from_bytes(SHAKE256(b"cdc-audit row v1" + b"\\x00" +
  canonical_bytes(row), 256 bytes), "big")``: the 2048-bit big-endian integer of 256 bytes of
  SHAKE256 output over the domain tag, a zero byte and the row object's canonical JSON
  (`cdc_audit.canonical`: UTF-8, no whitespace, keys sorted, numbers as PostgreSQL printed).
- **Table digest**: ``(sum of H(row) over all rows) mod 2**2048``, written as 512 lower-case
  hex characters (big-endian, zero-padded), together with the row count. The sum is a
  multiset hash: it does not depend on row order, and a row can be added or removed from it
  without the others, which is what makes replaying the trail possible. Two different row
  multisets with the same digest would need a collision of this sum, which is believed as
  hard as a generalised birthday problem over 2048 bits (Bellare-Micciancio's AdHash with a
  large modulus).

Rows are read through a server-side cursor in primary-key order (any order gives the same
digest), so memory stays flat whatever the table's size.

THE CONSISTENCY POINT

1. ``lsn_before = pg_current_wal_insert_lsn()``, then one transaction takes a transaction id
   N and commits; the snapshot waits until no transaction older than N is still running.
   Every transaction whose commit record lies before ``lsn_before`` then has finished, so it
   is visible in the snapshot below. (Reading the position alone is not enough: a
   transaction can write its commit record, then wait for its flush or a synchronous
   standby, and leave the process array only after a snapshot was taken.)
2. A REPEATABLE READ, read-only transaction: ``pg_current_snapshot()`` as its first statement
   (``xmin:xmax:xip,...``, 64-bit transaction ids), the rows, then ``lsn_after =
   pg_current_wal_insert_lsn()``. Every transaction visible in the snapshot wrote its commit
   record before ``lsn_after``.

A transaction is *in* the snapshot iff it is visible to that txid snapshot: its id is below
xmin, or below xmax and not listed in xip.

RECONCILE (from snapshot S1 to S2 of table T)

Both statements' signatures are checked against the registered keys. The events replayed are
the ``insert``, ``update``, ``delete`` and ``truncate`` events of T whose ``commit_lsn`` lies
between ``S1.lsn_before`` and ``S2.lsn_after`` and whose transaction (the event's 32-bit
``xid``, widened to 64 bits against each snapshot's xmax) is not visible in S1 and is visible
in S2, in ``(commit_lsn, seq)`` order: insert adds ``H(new)``, delete subtracts ``H(old)``,
update subtracts ``H(old)`` and adds ``H(new)``, truncate resets to zero rows. The result must
equal S2's digest and row count. This needs ``old_values: full`` (a delete must carry the
whole row), all four operations audited and no ``when`` filter; an erased event has no row
values left to replay; DDL that changes the row shape between the snapshots (a column added
with a default rewrites every row without a row event) makes the digests incomparable.
"""

from __future__ import annotations

import hashlib
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any, Final

import psycopg
from psycopg import sql
from psycopg.rows import TupleRow
from psycopg.types.string import TextLoader

from cdc_audit import catalog, keys
from cdc_audit.canonical import JsonValue, canonical_bytes_trusted
from cdc_audit.chain import format_commit_time
from cdc_audit.columns import RowShaper
from cdc_audit.db import connect
from cdc_audit.errors import CdcAuditError, InvalidInput, NotInstalled
from cdc_audit.job_context import JobContext
from cdc_audit.pgoutput import Column, Relation, format_lsn, parse_lsn
from cdc_audit.policy import OPERATIONS, Policy, TablePolicy
from cdc_audit.predicate import TableName
from cdc_audit.replication import SESSION_SETTINGS
from cdc_audit.trail import TrailWriter, applied_policy, install_names, slot_confirmed
from cdc_audit.values import parse_json_exact, parse_json_fast

__all__ = [
    "DIGEST_BITS",
    "ROW_DOMAIN",
    "STATEMENT_VERSION",
    "Digest",
    "ReconcileMismatch",
    "Reconciliation",
    "Snapshot",
    "TxidSnapshot",
    "reconcile",
    "row_hash",
    "snapshot_job",
    "snapshot_tables",
    "widen_xid",
]

Connection = psycopg.Connection[TupleRow]
JsonObject = dict[str, JsonValue]
Progress = Callable[[str], None]

ROW_DOMAIN: Final = b"cdc-audit row v1\x00"
DIGEST_BITS: Final = 2048
_DIGEST_BYTES: Final = DIGEST_BITS // 8
_MODULUS: Final = 1 << DIGEST_BITS
STATEMENT_VERSION: Final = 1
PROGRESS_EVERY: Final = 100_000
"""Rows (or events) between two progress reports."""
WAIT_SECONDS: Final = 300.0
"""How long a snapshot waits for transactions older than its start to finish."""
_FETCH_ROWS: Final = 5_000
_XID_BITS: Final = 32
_XID_MASK: Final = (1 << _XID_BITS) - 1
_ROW_KINDS: Final = ("insert", "update", "delete", "truncate")


class ReconcileMismatch(CdcAuditError):
    """The trail does not account for the change between two snapshots, or a snapshot was
    altered (exit 1, like any integrity failure)."""

    exit_code = 1


# ------------------------------------------------------------------------------ the digest


def row_hash_of_bytes(canonical: bytes) -> int:
    """H of a row given its canonical JSON bytes (see the module docstring)."""
    return int.from_bytes(hashlib.shake_256(ROW_DOMAIN + canonical).digest(_DIGEST_BYTES), "big")


def row_hash(row: JsonObject) -> int:
    """H(row): the 2048-bit integer a row contributes to a table digest."""
    return row_hash_of_bytes(canonical_bytes_trusted(row))


@dataclass
class Digest:
    """A table digest being built or replayed: the sum of row hashes and the row count.

    The sum is reduced modulo 2**2048 only when read (`value`, `hex`): Python integers grow
    by one bit per doubling of the rows, so adding unreduced is cheaper.
    """

    total: int = 0
    count: int = 0

    def add(self, row: JsonObject) -> None:
        self.total += row_hash(row)
        self.count += 1

    def remove(self, row: JsonObject) -> None:
        self.total -= row_hash(row)
        self.count -= 1

    def reset(self) -> None:
        self.total = 0
        self.count = 0

    @property
    def value(self) -> int:
        return self.total % _MODULUS

    @property
    def hex(self) -> str:
        """512 lower-case hex characters."""
        return f"{self.value:0{DIGEST_BITS // 4}x}"

    @classmethod
    def from_hex(cls, text: str, count: int) -> Digest:
        if len(text) != DIGEST_BITS // 4 or text != text.lower():
            raise ValueError(f"a digest is {DIGEST_BITS // 4} lower-case hex characters")
        return cls(int(text, 16), count)

    def same_as(self, other: Digest) -> bool:
        return self.value == other.value and self.count == other.count


# ------------------------------------------------------------------------- txid snapshots


def widen_xid(xid: int, reference: int) -> int:
    """The 64-bit transaction id whose low 32 bits are `xid`, nearest to `reference`.

    Event xids are 32-bit (as pgoutput sends them); snapshots have 64-bit ids (epoch in the
    high half). The nearest candidate is the one within 2**31 of the reference, which is
    right for every transaction of the window between two snapshots, across a wraparound
    too.
    """
    if not 0 <= xid <= _XID_MASK:
        raise ValueError(f"not a 32-bit transaction id: {xid}")
    delta = (xid - reference) & _XID_MASK
    if delta >= 1 << (_XID_BITS - 1):
        delta -= 1 << _XID_BITS
    return reference + delta


@dataclass(frozen=True)
class TxidSnapshot:
    """pg_current_snapshot(): which transactions a snapshot sees."""

    xmin: int
    xmax: int
    xip: frozenset[int] = frozenset()

    @classmethod
    def parse(cls, text: str) -> TxidSnapshot:
        """Parse ``xmin:xmax:xip1,xip2,...`` (pg_snapshot's text form)."""
        parts = text.strip().split(":")
        if len(parts) != 3:
            raise ValueError(f"not a txid snapshot (xmin:xmax:xip,...): {text!r}")
        try:
            xmin, xmax = int(parts[0]), int(parts[1])
            xip = frozenset(int(x) for x in parts[2].split(",")) if parts[2] else frozenset()
        except ValueError:
            raise ValueError(f"not a txid snapshot (xmin:xmax:xip,...): {text!r}") from None
        if not 0 < xmin <= xmax or any(not xmin <= x < xmax for x in xip):
            raise ValueError(f"inconsistent txid snapshot: {text!r}")
        return cls(xmin, xmax, xip)

    def visible(self, full_xid: int) -> bool:
        """Whether the (committed) transaction `full_xid` is visible in this snapshot."""
        if full_xid < self.xmin:
            return True
        return full_xid < self.xmax and full_xid not in self.xip

    def visible_xid(self, xid: int) -> bool:
        """`visible` for a 32-bit xid, widened against this snapshot's xmax."""
        return self.visible(widen_xid(xid, self.xmax))


# ---------------------------------------------------------------------------- snapshots


@dataclass(frozen=True)
class Snapshot:
    """One row of the snapshot table; `statement` is what the signature signs."""

    schema_name: str
    table_name: str
    taken_at: datetime
    lsn_before: str
    lsn_after: str
    txid_snapshot: str
    row_count: int
    digest: str
    key_id: str
    signature: bytes = b""
    policy_version_id: int | None = None
    id: int | None = None

    @property
    def table(self) -> TableName:
        return TableName(self.schema_name, self.table_name)

    def statement(self) -> JsonObject:
        return {
            "type": "snapshot",
            "version": STATEMENT_VERSION,
            "schema_name": self.schema_name,
            "table_name": self.table_name,
            "taken_at": format_commit_time(self.taken_at),
            "lsn_before": self.lsn_before,
            "lsn_after": self.lsn_after,
            "txid_snapshot": self.txid_snapshot,
            "row_count": self.row_count,
            "digest": self.digest,
            "key_id": self.key_id,
        }

    def statement_bytes(self) -> bytes:
        return canonical_bytes_trusted(self.statement())

    def digest_value(self) -> Digest:
        return Digest.from_hex(self.digest, self.row_count)

    def txids(self) -> TxidSnapshot:
        return TxidSnapshot.parse(self.txid_snapshot)

    def describe(self) -> str:
        return (
            f"snapshot {self.id} ({format_commit_time(self.taken_at)}, {self.row_count} rows,"
            f" digest {self.digest[:16]}, lsn {self.lsn_after})"
        )


_SNAPSHOT_COLUMNS: Final = sql.SQL(
    "id, schema_name, table_name, taken_at, lsn_before::text, lsn_after::text, txid_snapshot,"
    " row_count, digest, key_id, signature, policy_version_id, statement::text"
)


def _snapshot_from_row(row: Sequence[Any]) -> tuple[Snapshot, str]:
    """(snapshot, its stored statement text) from a row of `_SNAPSHOT_COLUMNS`."""
    snap = Snapshot(
        id=row[0],
        schema_name=row[1],
        table_name=row[2],
        taken_at=row[3],
        lsn_before=row[4],
        lsn_after=row[5],
        txid_snapshot=row[6],
        row_count=row[7],
        digest=row[8],
        key_id=row[9],
        signature=bytes(row[10]),
        policy_version_id=row[11],
    )
    return snap, row[12]


def _pin_session(conn: Connection) -> None:
    """The decoding session's output settings: values must print as pgoutput prints them."""
    for name, value in SESSION_SETTINGS:
        conn.execute(sql.SQL("SET {} = {}").format(sql.Identifier(name), sql.Literal(value)))
    conn.commit()


def _published_relation(conn: Connection, table: TableName) -> Relation:
    """The table's shape as pgoutput announces it: columns in attnum order, no dropped or
    generated ones, with their type OIDs."""
    rows = conn.execute(
        "SELECT c.oid::bigint, a.attname, a.atttypid::bigint, a.atttypmod"
        " FROM pg_catalog.pg_class c"
        " JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace"
        " JOIN pg_catalog.pg_attribute a ON a.attrelid = c.oid"
        " WHERE n.nspname = %s AND c.relname = %s AND a.attnum > 0"
        "  AND NOT a.attisdropped AND a.attgenerated = ''"
        " ORDER BY a.attnum",
        (table.schema, table.name),
    ).fetchall()
    if not rows:
        raise InvalidInput(f"table {table} does not exist")
    columns = tuple(Column(0, name, type_oid, typmod) for _, name, type_oid, typmod in rows)
    return Relation(rows[0][0], table.schema, table.name, "f", columns)


def _applied_policy(conn: Connection, schema: str, version_id: int | None) -> tuple[int, Policy]:
    install_names(conn, schema)  # NotInstalled, with its message, when there is nothing
    found = applied_policy(conn, schema, version_id)
    if found is None:
        what = "no policy has been applied" if version_id is None else f"policy {version_id}"
        raise NotInstalled(f"{what} in schema {schema}: run cdc-audit apply")
    return found[0], found[1].policy


def _table_policy(policy: Policy, table: TableName) -> TablePolicy | None:
    for candidate in policy.tables:
        if (candidate.table.schema, candidate.table.name) == (table.schema, table.name):
            return candidate
    return None


def _rules(table: TablePolicy) -> dict[str, Any]:
    """What shapes a table's rows and events (everything but where it sits in the file)."""
    return table.model_dump(mode="json")


def _wait_for_older_transactions(
    conn: Connection, horizon: int, timeout: float, progress: Progress, table: TableName
) -> None:
    """Return once no transaction with an id below `horizon` is still running."""
    started = time.monotonic()
    reported = started
    delay = 0.01
    while True:
        row = conn.execute("SELECT pg_snapshot_xmin(pg_current_snapshot())::text").fetchone()
        conn.commit()
        oldest = int(row[0]) if row else horizon
        if oldest >= horizon:
            return
        now = time.monotonic()
        if now - started > timeout:
            raise CdcAuditError(
                f"snapshot of {table}: transaction {oldest} has been running for more than"
                f" {timeout:.0f} s; a snapshot waits for the transactions older than it (end"
                " or roll back that transaction, then try again)"
            )
        if now - reported >= 10:
            progress(f"{table}: waiting for transaction {oldest} to finish")
            reported = now
        time.sleep(delay)
        delay = min(delay * 2, 0.5)


def _digest_rows(
    conn: Connection,
    table: TableName,
    relation: Relation,
    shaper: RowShaper,
    primary_key: Sequence[str],
    progress: Progress,
) -> Digest:
    """Read every row (text output, server-side cursor, primary-key order) into a Digest."""
    estimate = conn.execute(
        "SELECT reltuples::bigint FROM pg_catalog.pg_class WHERE oid = %s::oid", (relation.oid,)
    ).fetchone()
    of = f" of ~{estimate[0]:,}" if estimate and estimate[0] > 0 else ""
    query = sql.SQL("SELECT {} FROM {}").format(
        sql.SQL(", ").join(sql.Identifier(c.name) for c in relation.columns),
        sql.Identifier(table.schema, table.name),
    )
    if primary_key:
        query = sql.SQL("{} ORDER BY {}").format(
            query, sql.SQL(", ").join(map(sql.Identifier, primary_key))
        )
    digest = Digest()
    total = 0
    count = 0
    insert = shaper.insert
    domain = ROW_DOMAIN
    shake = hashlib.shake_256
    encode = canonical_bytes_trusted
    with conn.cursor(name="cdc_audit_snapshot") as cursor:
        cursor.itersize = _FETCH_ROWS
        cursor.execute(query)
        # Every value as the text its type's output function printed, as pgoutput sends it
        # (a domain arrives under its base type's OID, hence the description's OIDs).
        for column in cursor.description or ():
            cursor.adapters.register_loader(column.type_code, TextLoader)
        while True:
            rows = cursor.fetchmany(_FETCH_ROWS)
            if not rows:
                break
            for row in rows:
                new = insert(row).new
                total += int.from_bytes(shake(domain + encode(new)).digest(_DIGEST_BYTES), "big")
            before = count
            count += len(rows)
            if count // PROGRESS_EVERY != before // PROGRESS_EVERY:
                progress(f"{table}: {count:,}{of} rows digested")
    digest.total = total % _MODULUS
    digest.count = count
    return digest


def take_snapshot(
    conn: Connection,
    schema: str,
    table: TablePolicy,
    policy_version_id: int,
    signing_key: keys.SigningKey,
    redaction_key: bytes | None,
    *,
    progress: Progress = lambda _: None,
    now: Callable[[], datetime],
    wait_seconds: float = WAIT_SECONDS,
) -> Snapshot:
    """Digest one table at a consistent point, sign the statement, store it; returns it."""
    name = TableName(table.table.schema, table.table.name)
    info = catalog.read_table(conn, name.schema, name.name)
    conn.commit()
    if info is None:
        raise InvalidInput(f"table {name} does not exist")
    relation = _published_relation(conn, name)
    conn.commit()
    try:
        shaper = RowShaper(relation, table, redaction_key, info.primary_key)
    except ValueError:
        raise InvalidInput(
            f"{name} has hash-redacted columns: set CDC_AUDIT_REDACTION_KEY_FILE to the"
            " worker's redaction key"
        ) from None

    # 1. Everything committed before lsn_before must be visible in the snapshot.
    lsn_before = _one(conn, "SELECT pg_current_wal_insert_lsn()::text")
    horizon = int(_one(conn, "SELECT pg_current_xact_id()::text"))
    conn.commit()
    _wait_for_older_transactions(conn, horizon, wait_seconds, progress, name)

    # 2. One REPEATABLE READ transaction: its snapshot, the rows, the position after.
    taken_at = now()
    conn.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
    conn.read_only = True
    try:
        txids = _one(conn, "SELECT pg_current_snapshot()::text")
        digest = _digest_rows(conn, name, relation, shaper, info.primary_key, progress)
        lsn_after = _one(conn, "SELECT pg_current_wal_insert_lsn()::text")
        conn.commit()
    except psycopg.errors.InsufficientPrivilege:
        raise CdcAuditError(
            f"snapshot of {name}: role {conn.info.user} may not read it (GRANT SELECT ON"
            f" {name} to it, or to {schema}_writer for the worker's job)"
        ) from None
    finally:
        conn.rollback()
        conn.isolation_level = None
        conn.read_only = None

    snap = Snapshot(
        schema_name=name.schema,
        table_name=name.name,
        taken_at=taken_at,
        lsn_before=lsn_before,
        lsn_after=lsn_after,
        txid_snapshot=txids,
        row_count=digest.count,
        digest=digest.hex,
        key_id=signing_key.key_id,
        policy_version_id=policy_version_id,
    )
    statement = snap.statement_bytes()
    signature = signing_key.sign(statement)
    row = conn.execute(
        sql.SQL(
            "INSERT INTO {}.snapshot (schema_name, table_name, taken_at, lsn_before, lsn_after,"
            " txid_snapshot, row_count, digest, statement, key_id, signature, policy_version_id)"
            " VALUES (%s, %s, %s, %s::pg_lsn, %s::pg_lsn, %s, %s, %s, %s::jsonb, %s, %s, %s)"
            " RETURNING id"
        ).format(sql.Identifier(schema)),
        (
            snap.schema_name,
            snap.table_name,
            snap.taken_at,
            snap.lsn_before,
            snap.lsn_after,
            snap.txid_snapshot,
            snap.row_count,
            snap.digest,
            statement.decode(),
            snap.key_id,
            signature,
            policy_version_id,
        ),
    ).fetchone()
    conn.commit()
    assert row is not None
    return replace(snap, signature=signature, id=row[0])


def _one(conn: Connection, query: str) -> str:
    row = conn.execute(query).fetchone()
    if row is None or row[0] is None:
        raise CdcAuditError(f"no result from {query}")
    return str(row[0])


def snapshot_tables(
    dsn: str | None,
    policy: Policy,
    signing_key: keys.SigningKey,
    redaction_key: bytes | None = None,
    *,
    only: TableName | None = None,
    progress: Progress = lambda _: None,
    now: Callable[[], datetime],
    wait_seconds: float = WAIT_SECONDS,
) -> Iterator[Snapshot]:
    """Snapshot every audited table of `policy` (or only `only`), one after the other.

    The rows are shaped by the column rules of the policy applied in the database (the rules
    the worker seals with); a table whose rules in `policy` differ from them is refused, since
    its digest could never match its events.
    """
    schema = policy.schema_name
    wanted = [t for t in policy.tables if only is None or _same_table(t, only)]
    if only is not None and not wanted:
        raise InvalidInput(f"{only} is not audited by the policy")
    with connect(dsn, application_name="cdc-audit snapshot") as conn:
        _require_snapshot_table(conn, schema)
        keys.require_registered(conn, schema, signing_key)
        policy_id, applied = _applied_policy(conn, schema, None)
        targets = []
        for table in wanted:
            name = TableName(table.table.schema, table.table.name)
            current = _table_policy(applied, name)
            if current is None:
                raise InvalidInput(
                    f"{name} is not audited by the applied policy (version {policy_id}):"
                    " run cdc-audit apply first"
                )
            if _rules(current) != _rules(table):
                raise InvalidInput(
                    f"{name}: the policy given differs from the applied policy (version"
                    f" {policy_id}) for this table: run cdc-audit apply first"
                )
            targets.append(current)
        _pin_session(conn)
        for table in targets:
            yield take_snapshot(
                conn,
                schema,
                table,
                policy_id,
                signing_key,
                redaction_key,
                progress=progress,
                now=now,
                wait_seconds=wait_seconds,
            )


def _same_table(table: TablePolicy, name: TableName) -> bool:
    return (table.table.schema, table.table.name) == (name.schema, name.name)


def _require_snapshot_table(conn: Connection, schema: str) -> None:
    row = conn.execute(
        "SELECT to_regclass(format('%%I.snapshot', %s::text)) IS NOT NULL", (schema,)
    ).fetchone()
    conn.commit()
    if not row or not row[0]:
        raise NotInstalled(
            f"{schema}.snapshot does not exist: cdc-audit is not installed in schema {schema},"
            " or its schema predates snapshots (run cdc-audit apply)"
        )


def snapshot_job(context: JobContext) -> str:
    """The scheduled job: snapshot every audited table; a one-line summary."""
    if context.signing_key is None:
        raise InvalidInput(
            "snapshots are signed: set CDC_AUDIT_SIGNING_KEY_FILE to the worker's private key"
        )
    made = list(
        snapshot_tables(
            context.dsn,
            context.policy,
            context.signing_key,
            context.redaction_key,
            progress=context.progress,
            now=context.now,
        )
    )
    if not made:
        return "snapshot: no audited tables"
    rows = sum(s.row_count for s in made)
    tables = ", ".join(f"{s.table} ({s.row_count} rows, id {s.id})" for s in made)
    return f"snapshot: {len(made)} table(s), {rows} rows: {tables}"


# ---------------------------------------------------------------------------- reconcile


@dataclass
class Reconciliation:
    """What replaying the trail from `first` to `second` found."""

    first: Snapshot
    second: Snapshot
    expected: Digest
    replayed: Counter[str] = field(default_factory=Counter)
    ddl: list[str] = field(default_factory=list)
    """DDL on the table between the snapshots ("stream/seq COMMAND"), if any."""

    @property
    def found(self) -> Digest:
        return self.second.digest_value()

    @property
    def ok(self) -> bool:
        return self.expected.same_as(self.found)

    @property
    def events(self) -> int:
        return sum(self.replayed.values())

    def replay_summary(self) -> str:
        kinds = ", ".join(f"{self.replayed[k]} {k}" for k in _ROW_KINDS if self.replayed[k])
        return f"{self.events} event(s) replayed" + (f" ({kinds})" if kinds else "")

    def describe(self) -> list[str]:
        table = self.first.table
        if self.ok:
            return [
                f"{table}: reconciled: snapshot {self.first.id} ({self.first.row_count} rows)"
                f" + {self.replay_summary()} = snapshot {self.second.id}"
                f" ({self.second.row_count} rows, digest {self.second.digest[:16]})"
            ]
        return [
            f"{table}: the trail does not account for the change from snapshot"
            f" {self.first.id} to snapshot {self.second.id}",
            f"  snapshot {self.first.id}: {self.first.row_count} rows, digest"
            f" {self.first.digest[:16]}, taken {format_commit_time(self.first.taken_at)}",
            f"  expected (snapshot {self.first.id} + {self.replay_summary()}):"
            f" {self.expected.count} rows, digest {self.expected.hex[:16]}",
            f"  found (snapshot {self.second.id}): {self.second.row_count} rows, digest"
            f" {self.second.digest[:16]}, taken {format_commit_time(self.second.taken_at)}",
            *(f"  DDL on the table in between: {d}" for d in self.ddl),
        ]

    def raise_unless_ok(self) -> None:
        """Exit 1 when the trail misses something; 3 when DDL makes the digests incomparable."""
        if self.ok:
            return
        table = self.first.table
        counts = f"expected {self.expected.count} rows, found {self.second.row_count}"
        if self.ddl:
            raise CdcAuditError(
                f"{table}: cannot conclude: DDL on the table between snapshots {self.first.id}"
                f" and {self.second.id} ({self.ddl[0]}) may have changed the row shape"
                f" ({counts}); reconcile from a snapshot taken after it"
            )
        raise ReconcileMismatch(
            f"{table}: the trail does not account for the change from snapshot"
            f" {self.first.id} to snapshot {self.second.id} ({counts}, digests differ,"
            f" {self.events} event(s) replayed)"
        )


def list_snapshots(conn: Connection, schema: str, table: TableName) -> list[Snapshot]:
    """Every snapshot of `table`, oldest first."""
    _require_snapshot_table(conn, schema)
    rows = conn.execute(
        sql.SQL(
            "SELECT {} FROM {}.snapshot WHERE schema_name = %s AND table_name = %s ORDER BY id"
        ).format(_SNAPSHOT_COLUMNS, sql.Identifier(schema)),
        (table.schema, table.name),
    ).fetchall()
    conn.commit()
    return [_snapshot_from_row(row)[0] for row in rows]


def _pick(
    snapshots: list[Snapshot], table: TableName, from_id: int | None, to_id: int | None
) -> tuple[Snapshot, Snapshot]:
    if not snapshots:
        raise InvalidInput(f"no snapshot of {table}: take them with cdc-audit snapshot")
    by_id = {s.id: s for s in snapshots}
    for given in (from_id, to_id):
        if given is not None and given not in by_id:
            raise InvalidInput(f"snapshot {given} is not a snapshot of {table}")
    ids = [s.id for s in snapshots]
    if to_id is None:
        to_id = ids[-1] if from_id is None or from_id != ids[-1] else None
    if to_id is None:
        raise InvalidInput(f"snapshot {from_id} is the newest snapshot of {table}: no later one")
    if from_id is None:
        earlier = [i for i in ids if i is not None and i < to_id]
        if not earlier:
            raise InvalidInput(
                f"{table} has {len(snapshots)} snapshot(s); reconcile needs two: take another"
                " with cdc-audit snapshot"
            )
        from_id = earlier[-1]
    if from_id >= to_id:
        raise InvalidInput(f"--from {from_id} must be an older snapshot than --to {to_id}")
    return by_id[from_id], by_id[to_id]


def _check_signatures(conn: Connection, schema: str, pair: Sequence[Snapshot]) -> None:
    registered = keys.registered_keys(conn, schema)
    conn.commit()
    stored = {
        row[0]: row[1]
        for row in conn.execute(
            sql.SQL("SELECT id, statement::text FROM {}.snapshot WHERE id = ANY(%s)").format(
                sql.Identifier(schema)
            ),
            ([s.id for s in pair],),
        )
    }
    conn.commit()
    failed = []
    for snap in pair:
        key = registered.get(snap.key_id)
        if key is None:
            failed.append(
                f"snapshot {snap.id} is signed by key {snap.key_id}, which is not registered"
            )
        elif parse_json_exact(stored.get(snap.id) or "null") != snap.statement():
            failed.append(f"snapshot {snap.id}: its columns differ from its signed statement")
        elif not key.verify(snap.signature, snap.statement_bytes()):
            failed.append(f"snapshot {snap.id}: the signature does not verify")
    if failed:
        raise ReconcileMismatch("; ".join(failed) + ": the snapshot table was altered")


def _replayable(policy: Policy, policy_id: int | None, table: TableName) -> TablePolicy:
    rules = _table_policy(policy, table)
    where = f"policy version {policy_id}"
    if rules is None:
        raise InvalidInput(f"{table} is not audited by {where}")
    if rules.old_values != "full":
        raise InvalidInput(
            f"{table} is audited with old_values: key ({where}): a delete does not record the"
            " whole row, so reconcile cannot replay it; use old_values: full"
        )
    if rules.when is not None:
        raise InvalidInput(
            f"{table} has a when filter ({where}): changes it filters out are not in the trail,"
            " so reconcile cannot replay them"
        )
    missing = [op for op in OPERATIONS if op not in rules.operations]
    if missing:
        raise InvalidInput(
            f"{table} is not audited for {', '.join(missing)} ({where}): reconcile needs every"
            " insert, update, delete and truncate in the trail"
        )
    return rules


def _check_policies(conn: Connection, schema: str, pair: Sequence[Snapshot]) -> None:
    first, second = pair
    rules = []
    for snap in pair:
        policy_id, policy = _applied_policy(conn, schema, snap.policy_version_id)
        rules.append(_rules(_replayable(policy, policy_id, snap.table)))
    if rules[0] != rules[1]:
        raise InvalidInput(
            f"{first.table}: its column rules changed between snapshot {first.id} (policy version"
            f" {first.policy_version_id}) and snapshot {second.id} (policy version"
            f" {second.policy_version_id}): the two digests describe different row forms"
        )


def _check_sealed(conn: Connection, schema: str, second: Snapshot) -> None:
    names = install_names(conn, schema)
    end = TrailWriter(conn, names).read_progress().end_lsn
    sealed = max(end, slot_confirmed(conn, names.slot))
    if sealed < parse_lsn(second.lsn_after):
        raise CdcAuditError(
            f"the worker has sealed the stream up to {format_lsn(sealed)}, before snapshot"
            f" {second.id} (lsn {second.lsn_after}): run the worker (or cdc-audit worker"
            " --drain) and try again"
        )


def _ddl_between(conn: Connection, schema: str, first: Snapshot, second: Snapshot) -> list[str]:
    rows = conn.execute(
        sql.SQL(
            "SELECT stream, seq, coalesce(new->>'command_tag', 'DDL') FROM {}.event"
            " WHERE kind = 'ddl' AND commit_lsn BETWEEN %s::pg_lsn AND %s::pg_lsn"
            "  AND EXISTS (SELECT FROM jsonb_array_elements("
            "       CASE WHEN jsonb_typeof(new->'objects') = 'array' THEN new->'objects'"
            "            ELSE '[]' END"
            "    || CASE WHEN jsonb_typeof(new->'dropped') = 'array' THEN new->'dropped'"
            "            ELSE '[]' END) o"
            "   WHERE o->>'object_identity' = format('%%I.%%I', %s::text, %s::text)"
            "      OR starts_with(o->>'object_identity',"
            "                     format('%%I.%%I.', %s::text, %s::text)))"
            " ORDER BY commit_lsn, seq"
        ).format(sql.Identifier(schema)),
        (
            first.lsn_before,
            second.lsn_after,
            first.schema_name,
            first.table_name,
            first.schema_name,
            first.table_name,
        ),
    ).fetchall()
    conn.commit()
    return [f"{stream}/{seq} {tag}" for stream, seq, tag in rows]


def _replay(
    conn: Connection,
    schema: str,
    first: Snapshot,
    second: Snapshot,
    progress: Progress,
) -> tuple[Digest, Counter[str]]:
    before, after = first.txids(), second.txids()
    digest = first.digest_value()
    replayed: Counter[str] = Counter()
    seen = 0
    query = sql.SQL(
        "SELECT stream, seq, kind, xid, old::text, new::text, erased_at IS NOT NULL"
        " FROM {}.event"
        " WHERE schema_name = %s AND table_name = %s AND kind = ANY(%s)"
        "  AND commit_lsn BETWEEN %s::pg_lsn AND %s::pg_lsn"
        " ORDER BY commit_lsn, seq"
    ).format(sql.Identifier(schema))
    params = (
        first.schema_name,
        first.table_name,
        list(_ROW_KINDS),
        first.lsn_before,
        second.lsn_after,
    )
    with conn.cursor(name="cdc_audit_reconcile") as cursor:
        cursor.itersize = _FETCH_ROWS
        cursor.execute(query, params)
        for stream, seq, kind, xid, old, new, erased in cursor:
            seen += 1
            if seen % PROGRESS_EVERY == 0:
                progress(f"{first.table}: {seen:,} events read")
            if xid is None or before.visible_xid(xid) or not after.visible_xid(xid):
                continue
            if erased:
                raise CdcAuditError(
                    f"{first.table}: event {stream}/{seq} ({kind}) between snapshots"
                    f" {first.id} and {second.id} was erased: its row values are gone, so"
                    " reconcile cannot replay it; reconcile from a snapshot taken after it"
                )
            if kind == "truncate":
                digest.reset()
            else:
                if kind in ("update", "delete"):
                    digest.remove(_row(old, stream, seq, "old"))
                if kind in ("insert", "update"):
                    digest.add(_row(new, stream, seq, "new"))
            replayed[kind] += 1
    conn.commit()
    return digest, replayed


def _row(text: str | None, stream: str, seq: int, column: str) -> JsonObject:
    value = None if text is None else parse_json_fast(text)
    if not isinstance(value, dict):
        raise CdcAuditError(
            f"event {stream}/{seq} has no row in `{column}`: reconcile cannot replay it"
        )
    return value


def reconcile(
    conn: Connection,
    schema: str,
    table: TableName,
    from_id: int | None = None,
    to_id: int | None = None,
    *,
    progress: Progress = lambda _: None,
) -> Reconciliation:
    """Replay the trail of `table` from one snapshot to the next (default: the two newest).

    Raises InvalidInput (exit 2) for what cannot be reconciled (see the module docstring),
    ReconcileMismatch (exit 1) when a snapshot's signature fails, CdcAuditError (exit 3)
    when the worker has not sealed up to the second snapshot or an event was erased. The
    returned Reconciliation says whether the digests agree (`raise_unless_ok`).
    """
    first, second = _pick(list_snapshots(conn, schema, table), table, from_id, to_id)
    _check_signatures(conn, schema, (first, second))
    _check_policies(conn, schema, (first, second))
    _check_sealed(conn, schema, second)
    expected, replayed = _replay(conn, schema, first, second, progress)
    result = Reconciliation(first, second, expected, replayed)
    if not result.ok:
        result.ddl = _ddl_between(conn, schema, first, second)
    return result
