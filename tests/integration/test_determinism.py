"""The same changes hash the same, whatever the settings of the sessions that wrote and sealed them.

Two databases get the same tables, the same policy and the same logical changes:

- ``odd``: database defaults ``TimeZone=Pacific/Chatham`` (+12:45/+13:45), ``DateStyle=SQL,
  DMY``, ``IntervalStyle=postgres_verbose``, ``extra_float_digits=0``, ``bytea_output=escape``,
  role-in-database defaults on top (``TimeZone=Pacific/Marquesas``, ``extra_float_digits=-3``),
  and a worker process started with ``TZ``, ``PGTZ``, ``PGDATESTYLE`` and ``PGOPTIONS`` all set
  to other odd values;
- ``plain``: UTC and ISO everywhere.

In each database one transaction writes every row twice, into ``typed_a`` and ``typed_b``,
with the writing session's own settings changed (``SET LOCAL``) in between. The values cover
timestamptz (also as part of the primary key), timestamp, date, interval, float8, numeric,
bytea, json, jsonb, time, timetz and arrays of timestamptz, date, float8 and interval,
including BC dates, years past 9999, infinities, NaN, -0 and 5e-324.

Then ``cdc-audit worker --drain`` seals both, and:

- inside each database, the two tables' events have byte-identical payload hashes (same
  transaction, so same context too);
- across the databases, old/new/row_key/changed are byte-identical canonical JSON, the contexts
  are identical but for the database facts (backend pid, xid, database name), and changes made
  with the context bypassed (no context at all) have byte-identical payload hashes;
- every stored payload hashes to its payload_hash, and the values are the pinned forms
  (UTC ISO 8601 timestamps, ISO 8601 intervals, shortest round-trip floats, hex bytea).
"""

from __future__ import annotations

import hashlib
import itertools
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import psycopg
import pytest
from psycopg.types.json import Json, Jsonb

from cdc_audit.canonical import JsonValue, canonical_bytes
from cdc_audit.chain import payload_object
from cdc_audit.ephemeral import EphemeralCluster
from cdc_audit.values import parse_json_exact

from .fix_policy import WritePolicy
from .pg import Database, run_cli
from .test_worker import Trail

TABLES = """\
  - {table: public.typed_a, stream: user}
  - {table: public.typed_b, stream: user}
"""

COLUMNS = """
    id        int,
    at        timestamptz,
    local_at  timestamp,
    day       date,
    span      interval,
    ratio     float8,
    amount    numeric,
    blob      bytea,
    doc       json,
    docb      jsonb,
    moments   timestamptz[],
    days      date[],
    ratios    float8[],
    spans     interval[],
    clock     time,
    clock_tz  timetz,
    PRIMARY KEY (id, at)
"""

ODD_DATABASE_DEFAULTS = {
    "TimeZone": "Pacific/Chatham",
    "DateStyle": "SQL, DMY",
    "IntervalStyle": "postgres_verbose",
    "extra_float_digits": "0",
    "bytea_output": "escape",
}
ODD_ROLE_DEFAULTS = {"TimeZone": "Pacific/Marquesas", "extra_float_digits": "-3"}
PLAIN_DATABASE_DEFAULTS = {
    "TimeZone": "UTC",
    "DateStyle": "ISO, MDY",
    "IntervalStyle": "postgres",
    "extra_float_digits": "1",
    "bytea_output": "hex",
}
# The worker process of the odd database: the C library's zone, libpq's PGTZ/PGDATESTYLE
# (sent as startup options of both its connections) and PGOPTIONS for the rest.
ODD_WORKER_ENV = {
    "TZ": "Asia/Kolkata",
    "PGTZ": "Australia/Eucla",
    "PGDATESTYLE": "Postgres, DMY",
    "PGOPTIONS": "-c IntervalStyle=sql_standard -c extra_float_digits=-15 -c bytea_output=escape",
}
# What the writing session sets before each table's statements (SET LOCAL).
WRITER_SETTINGS = {
    "odd": (
        {
            "TimeZone": "Asia/Kathmandu",
            "DateStyle": "German, DMY",
            "IntervalStyle": "sql_standard",
            "extra_float_digits": "-15",
            "bytea_output": "escape",
        },
        {
            "TimeZone": "America/St_Johns",
            "DateStyle": "Postgres, MDY",
            "IntervalStyle": "iso_8601",
            "extra_float_digits": "2",
            "bytea_output": "hex",
        },
    ),
    "plain": (
        {"TimeZone": "UTC", "DateStyle": "ISO, MDY", "IntervalStyle": "postgres"},
        {"TimeZone": "Pacific/Kiritimati", "DateStyle": "SQL, MDY", "extra_float_digits": "3"},
    ),
}

DOC = (
    '{"b": [1.0, 2.50, 1e5, -0, 1E-3, 12345678901234567890, -9007199254740993],'
    ' "a": "\\u00e9\\ud83d\\ude00 \u2028\u2029 \U0001f600", "esc": "\\"\\\\\\/\\n\\t\\u0001",'
    ' "nested": {"z": {"y": [null, true, false, {}]}, "big": 1.5e300, "small": -2.5E-30}}'
)

# Every value is written so that it means the same whatever the writing session's settings:
# timestamps with explicit offsets (or via psycopg's datetime with its zone), dates and
# intervals in ISO 8601, floats and numerics as digits. (id, at) is the primary key.
INSERT = """
INSERT INTO {table} VALUES
 (1, %(at)s, '2024-01-02 03:04:05.123456', '2024-02-29',
  'P1Y2M-3DT4H5M6.789S', 0.1::float8 + 0.2::float8,
  %(amount)s, %(blob)s, %(doc)s, %(docb)s,
  ARRAY['2024-01-02 03:04:05.25+00', '1999-12-31 23:59:59.999999-08', 'infinity', NULL,
        '0044-03-15 12:00:00+00 BC', '12345-06-07 08:09:10+05:30',
        '2024-04-07 02:45:00+13:45', '2024-09-29 02:45:00+12:45']::timestamptz[],
  ARRAY['2024-02-29', '0001-01-01 BC', 'infinity', '-infinity']::date[],
  ARRAY['1e300', '-0', '5e-324', 'NaN', '-Infinity', '0.1']::float8[] || (1::float8 / 3),
  ARRAY[make_interval(years => 1, months => -2, days => 3, hours => -4, secs => 5.5),
        'PT0S', 'P-1D']::interval[],
  '04:05:06.789', '04:05:06.789+05:45'),
 (2, '1970-01-01 00:00:00+00', '0001-01-01 00:00:00 BC', '-infinity',
  'P-1DT-0.000001S', '-0'::float8,
  'NaN', '\\x'::bytea, '[]', '{{}}',
  '{{}}', NULL, ARRAY[NULL]::float8[], NULL, NULL, NULL),
 (3, '2024-04-07 02:45:00+13:45', 'infinity', '10000-01-01',
  make_interval(secs => 0.000001), 1e-300::float8,
  '-0.000', %(blob3)s, '{{"k": [1, "2", {{"3": null}}]}}', '[1.0, "x", {{"a": {{"b": 2}}}}]',
  ARRAY[ARRAY['2024-01-01 00:00:00+14', NULL], ARRAY['infinity', '1900-01-01 00:00:00+00']]
    ::timestamptz[],
  ARRAY['2024-01-01']::date[], ARRAY['Infinity']::float8[], ARRAY['P1M']::interval[],
  '24:00:00', '00:00:00-15:59')
"""
UPDATE = """
UPDATE {table} SET amount = amount * 3, span = span - 'PT1S',
    moments = moments || '2000-01-01 00:00:00.5+03'::timestamptz, ratio = 'Infinity'
WHERE id = 1
"""
DELETE = "DELETE FROM {table} WHERE id = 3"
# Made with the context trigger bypassed: no context at all, so the whole payload is the same
# in both databases and so must its hash be.
UNCONTEXTED = "UPDATE {table} SET docb = docb || '{{\"later\": 1.10}}', day = day + 1 WHERE id = 1"


def insert_params() -> dict[str, Any]:
    return {
        # 2024-01-02 03:04:05.25 UTC, given in Tokyo time: psycopg sends the offset.
        "at": datetime(2024, 1, 2, 12, 4, 5, 250000, tzinfo=ZoneInfo("Asia/Tokyo")),
        "amount": Decimal("123456789012345678901234567890.000000000000000001"),
        "blob": b"\x00\xff\\'\"\n",
        "blob3": bytes(range(256)),
        "doc": Json(DOC, dumps=lambda text: text),
        "docb": Jsonb(DOC, dumps=lambda text: text),
    }


# ---- fixtures ---------------------------------------------------------------------------------

_names = itertools.count(1)


@dataclass
class Twin:
    label: str
    trail: Trail
    worker_env: dict[str, str]
    public_key: Path


def _alter(db: Database, what: str, settings: dict[str, str]) -> None:
    for name, value in settings.items():
        db.execute(f"ALTER {what} SET {name} = '{value}'")


@pytest.fixture
def twins(
    database: Database,
    pg_cluster: EphemeralCluster,
    write_policy: WritePolicy,
    tmp_path: Path,
) -> Iterator[tuple[Twin, Twin]]:
    """(odd, plain): two installed databases with the same tables and policy."""
    odd_name = f"{database.name[:50]}_odd{next(_names)}"
    with psycopg.connect(pg_cluster.dsn(), autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{odd_name}" TEMPLATE template0')
    odd = Database(name=odd_name, cluster=pg_cluster)
    try:
        # Defaults first: installing, writing, sealing and verifying all happen under them.
        user = odd.scalar("SELECT current_user")
        _alter(odd, f'DATABASE "{odd.name}"', ODD_DATABASE_DEFAULTS)
        _alter(odd, f'ROLE "{user}" IN DATABASE "{odd.name}"', ODD_ROLE_DEFAULTS)
        _alter(database, f'DATABASE "{database.name}"', PLAIN_DATABASE_DEFAULTS)
        # A new session in the odd database really gets the odd defaults.
        assert odd.scalar("SHOW TimeZone") == "Pacific/Marquesas"
        assert odd.scalar("SHOW DateStyle") == "SQL, DMY"
        assert odd.scalar("SHOW extra_float_digits") == "-3"
        policy = write_policy(TABLES)
        keys = run_cli("keygen", "--out", str(tmp_path / "keys"))
        assert keys.returncode == 0, keys.stderr
        private, public = (Path(line.split(": ", 1)[1]) for line in keys.stdout.splitlines()[1:3])
        pair = []
        for label, db in (("odd", odd), ("plain", database)):
            db.execute(f"CREATE TABLE typed_a ({COLUMNS}); CREATE TABLE typed_b ({COLUMNS})")
            trail = Trail(db, policy)
            trail.apply()
            added = run_cli("keys", "add", str(public), "--dsn", db.dsn)
            assert added.returncode == 0, added.stderr
            env = {"CDC_AUDIT_SIGNING_KEY_FILE": str(private)}
            if label == "odd":
                env.update(ODD_WORKER_ENV)
            pair.append(Twin(label, trail, env, public))
        yield pair[0], pair[1]
    finally:
        odd.drop()


# ---- writing ----------------------------------------------------------------------------------


def _set_local(conn: psycopg.Connection[Any], settings: dict[str, str]) -> None:
    for name, value in settings.items():
        conn.execute(f"SET LOCAL {name} = '{value}'")


def write_changes(twin: Twin) -> None:
    """The same changes in every database: each statement into typed_a, then typed_b, in one
    transaction, with the writing session's settings changed before each table."""
    first, second = WRITER_SETTINGS[twin.label]
    with twin.trail.db.connect(autocommit=False) as conn:
        for statement, params in ((INSERT, insert_params()), (UPDATE, None), (DELETE, None)):
            conn.execute(
                "SELECT cdc_audit.set_context(actor_id => %s, reason => %s, trace_id => %s)",
                ("ann \U0001f600", 'quote " and \\ and \u2028', "t-1"),
            )
            for table, settings in (("typed_a", first), ("typed_b", second)):
                _set_local(conn, settings)
                conn.execute(statement.format(table=table), params)
            conn.commit()
        # The trigger bypassed: recorded with context_missing and no context.
        conn.execute("SET LOCAL session_replication_role = replica")
        for table, settings in (("typed_a", first), ("typed_b", second)):
            _set_local(conn, settings)
            conn.execute(UNCONTEXTED.format(table=table))
        conn.commit()


# ---- reading ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Sealed:
    """One sealed row event, as canonical bytes of its parts."""

    table: str
    kind: str
    row_key: bytes
    old: bytes
    new: bytes
    changed: bytes
    actor_id: str | None
    reason: str | None
    context: JsonValue
    context_missing: bool
    payload_hash: str
    payload: bytes

    def comparable(self) -> tuple[Any, ...]:
        """Everything but the database facts of the context (pid, xid, database name)."""
        context = self.context
        if isinstance(context, dict):
            context = {k: v for k, v in context.items() if k != "db"}
        return (
            self.kind,
            self.row_key,
            self.old,
            self.new,
            self.changed,
            self.actor_id,
            self.reason,
            canonical_bytes(context),
            self.context_missing,
        )


class _Row:
    def __init__(self, **fields: Any) -> None:
        self.__dict__.update(fields)


def sealed_events(db: Database) -> dict[str, list[Sealed]]:
    """table -> its row events in seq order. Read with psycopg's ISO session defaults."""
    out: dict[str, list[Sealed]] = {"typed_a": [], "typed_b": []}
    with psycopg.connect(db.dsn, options="-c DateStyle=ISO -c TimeZone=UTC") as conn:
        rows = conn.execute(
            "SELECT table_name, kind, row_key::text, old::text, new::text, changed, actor_id,"
            " reason, context::text, context_missing, encode(payload_hash, 'hex')"
            " FROM cdc_audit.event WHERE table_name IS NOT NULL ORDER BY seq"
        ).fetchall()
    for table, kind, row_key, old, new, changed, actor, reason, context, missing, digest in rows:
        parsed: dict[str, JsonValue] = {
            name: None if text is None else parse_json_exact(text)
            for name, text in (("row_key", row_key), ("old", old), ("new", new), ("ctx", context))
        }
        payload = canonical_bytes(
            payload_object(
                _Row(  # type: ignore[arg-type]
                    actor_id=actor,
                    changed=None if changed is None else tuple(changed),
                    context=parsed["ctx"],
                    new=parsed["new"],
                    old=parsed["old"],
                    reason=reason,
                    row_key=parsed["row_key"],
                )
            )
        )
        out[table].append(
            Sealed(
                table=table,
                kind=kind,
                row_key=canonical_bytes(parsed["row_key"]),
                old=canonical_bytes(parsed["old"]),
                new=canonical_bytes(parsed["new"]),
                changed=canonical_bytes(changed),
                actor_id=actor,
                reason=reason,
                context=parsed["ctx"],
                context_missing=missing,
                payload_hash=digest,
                payload=payload,
            )
        )
    return out


# ---- the test ---------------------------------------------------------------------------------

# The pinned forms, as hashed (row 1 as inserted).
EXPECTED_ROW_1: dict[str, JsonValue] = {
    "at": "2024-01-02T03:04:05.250000+00:00",
    "local_at": "2024-01-02T03:04:05.123456",
    "day": "2024-02-29",
    "span": "P1Y2M-3DT4H5M6.789S",
    "ratio": "0.30000000000000004",
    "amount": "123456789012345678901234567890.000000000000000001",
    "blob": "\\x00ff5c27220a",
    "moments": [
        "2024-01-02T03:04:05.250000+00:00",
        "2000-01-01T07:59:59.999999+00:00",
        "infinity",
        None,
        "-0043-03-15T12:00:00+00:00",
        "12345-06-07T02:39:10+00:00",
        "2024-04-06T13:00:00+00:00",
        "2024-09-28T14:00:00+00:00",
    ],
    "days": ["2024-02-29", "0000-01-01", "infinity", "-infinity"],
    "ratios": ["1e+300", "-0", "5e-324", "NaN", "-Infinity", "0.1", "0.3333333333333333"],
    "spans": ["P10M3DT-3H-59M-54.5S", "PT0S", "P-1D"],
    "clock": "04:05:06.789",
    "clock_tz": "04:05:06.789+05:45",
}


def test_same_changes_hash_the_same_under_any_session_settings(
    twins: tuple[Twin, Twin], tmp_path: Path
) -> None:
    odd, plain = twins
    for twin in (odd, plain):
        write_changes(twin)
        twin.trail.drain(**twin.worker_env)

    events = {twin.label: sealed_events(twin.trail.db) for twin in (odd, plain)}
    for label, tables in events.items():
        a, b = tables["typed_a"], tables["typed_b"]
        assert [e.kind for e in a] == ["insert"] * 3 + ["update", "delete", "update"], label
        # Same transaction, same context: the whole payload is the same, hash and all.
        assert [e.payload_hash for e in a] == [e.payload_hash for e in b], label
        assert [e.payload for e in a] == [e.payload for e in b], label
        for event in a + b:
            # The stored payload is exactly what was hashed.
            assert hashlib.sha256(event.payload).hexdigest() == event.payload_hash
    for table in ("typed_a", "typed_b"):
        left, right = events["odd"][table], events["plain"][table]
        assert [e.comparable() for e in left] == [e.comparable() for e in right], table
        # Without a context there are no database facts: the payload hashes are identical.
        assert left[-1].context_missing and right[-1].context_missing
        assert left[-1].payload_hash == right[-1].payload_hash
        assert left[-1].payload == right[-1].payload
        # With one, only the database facts differ.
        assert left[0].context != right[0].context

    first = parse_json_exact(events["odd"]["typed_a"][0].new.decode())
    assert isinstance(first, dict)
    for column, expected in EXPECTED_ROW_1.items():
        assert first[column] == expected, column
    assert canonical_bytes(first["doc"]) == canonical_bytes(parse_json_exact(DOC))
    assert canonical_bytes(first["docb"]) == canonical_bytes(parse_json_exact(DOC))
    assert first["id"] == 1
    row_key = parse_json_exact(events["odd"]["typed_a"][0].row_key.decode())
    assert row_key == {"id": 1, "at": "2024-01-02T03:04:05.250000+00:00"}

    # Both trails verify, online and from an export, under the odd settings too.
    for twin in (odd, plain):
        env = twin.trail.env(**twin.worker_env)
        verified = run_cli("verify", env=env)
        assert verified.returncode == 0, (twin.label, verified.stderr)
        assert "stream user: ok: 12 events verified" in verified.stdout
        export = tmp_path / f"{twin.label}.jsonl"
        exported = run_cli("export", "--stream", "user", "--output", str(export), env=env)
        assert exported.returncode == 0, (twin.label, exported.stderr)
        offline = run_cli(
            "verify", "--file", str(export), "--public-key", str(twin.public_key), env=env
        )
        assert offline.returncode == 0, (twin.label, offline.stderr)
        assert "stream user: ok: 12 events verified" in offline.stdout


def test_commands_work_whatever_the_database_datestyle(
    database: Database, write_policy: WritePolicy, tmp_path: Path
) -> None:
    database.execute("CREATE TABLE typed_a (id int PRIMARY KEY, at timestamptz)")
    database.execute(f"ALTER DATABASE \"{database.name}\" SET DateStyle = 'SQL, DMY'")
    trail = Trail(database, write_policy("  - {table: public.typed_a, stream: user}\n"))
    trail.apply()
    database.execute("INSERT INTO typed_a VALUES (1, '2024-01-02 03:04:05+00')")
    trail.drain()
    export = tmp_path / "export.jsonl"
    for args in (
        ("status",),
        ("verify",),
        ("export", "--stream", "user", "--output", str(export)),
    ):
        result = run_cli(*args, env=trail.env())
        assert result.returncode == 0, (args, result.stderr[-300:])
