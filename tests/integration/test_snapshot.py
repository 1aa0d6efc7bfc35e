"""Hashed snapshots and `cdc-audit reconcile` against a real server and worker."""

from __future__ import annotations

import hmac
import re
import subprocess
from pathlib import Path
from typing import Any

import psycopg
import pytest

from cdc_audit.canonical import JsonNumber, JsonValue, canonical_bytes
from cdc_audit.job_context import utc_now
from cdc_audit.keys import generate, load_public_key, load_signing_key, register
from cdc_audit.policy import load_policy
from cdc_audit.snapshot import Digest, snapshot_tables
from cdc_audit.values import parse_json_exact

from .fix_policy import WritePolicy
from .pg import Database
from .test_signing import Signed
from .test_worker import ctx

REDACTION_KEY = b"0123456789abcdef0123456789abcdef"
TABLES = """\
  - table: public.accounts
    stream: user
    exclude: [note]
    redact: {email: hash, pin: mask}
"""
EXTRA = "ddl: {stream: admin}\n"
SNAPSHOT_LINE = re.compile(
    r"^public\.accounts: snapshot (\d+): (\d+) rows, digest ([0-9a-f]{16}),"
    r" lsn [0-9A-F]+/[0-9A-F]+$"
)


class Snaps(Signed):
    """An installed database, a registered signing key, a redaction key; CLI helpers."""

    def run(self, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
        result: subprocess.CompletedProcess[str] = self.cli(
            *args,
            CDC_AUDIT_POLICY=str(self.policy),
            CDC_AUDIT_SIGNING_KEY_FILE=str(self.keys["k1"] / "signing_key.pem"),
            CDC_AUDIT_REDACTION_KEY_FILE=str(self.tmp / "redaction.key"),
            **env,
        )
        return result

    def drain(self, key: str = "k1") -> subprocess.CompletedProcess[str]:
        result = self.run("worker", "--drain")
        assert result.returncode == 0, result.stderr
        return result

    def snapshot(self) -> int:
        """Take a snapshot of accounts (in this process) and seal everything up to it; its
        id. The command itself is tested on its own."""
        made = list(
            snapshot_tables(
                self.db.dsn,
                load_policy(self.policy).policy,
                load_signing_key(self.keys["k1"] / "signing_key.pem"),
                REDACTION_KEY,
                now=utc_now,
            )
        )
        assert len(made) == 1 and made[0].id is not None
        self.drain()
        return made[0].id

    def reconcile(self, *args: str) -> subprocess.CompletedProcess[str]:
        return self.run("reconcile", "public.accounts", *args)

    def sql(self, *statements: str, actor: str | None = "u1") -> None:
        with self.db.connect(autocommit=False) as conn:
            if actor is not None:
                ctx(conn, actor, "test")
            for statement in statements:
                conn.execute(statement.encode())
            conn.commit()


def _snaps(db: Database, policy: Path, tmp: Path) -> Snaps:
    (tmp / "redaction.key").write_bytes(REDACTION_KEY + b"\n")
    snaps = Snaps(db, tmp, policy)
    applied = snaps.cli("apply", "--policy", str(policy))
    assert applied.returncode == 0, applied.stderr
    snaps.keys["k1"] = tmp / "k1"
    _, public, _ = generate(tmp / "k1")
    with db.connect() as conn:
        assert register(conn, "cdc_audit", load_public_key(public))
    return snaps


@pytest.fixture
def snaps(database: Database, write_policy: WritePolicy, tmp_path: Path) -> Snaps:
    database.execute(
        "CREATE TABLE accounts (id int PRIMARY KEY, owner text, balance numeric,"
        " email text, pin text, note text, opened timestamptz, tags int[])"
    )
    return _snaps(database, write_policy(TABLES, EXTRA), tmp_path)


def _token(value: JsonValue) -> str:
    return "hmac-sha256:" + hmac.new(REDACTION_KEY, canonical_bytes(value), "sha256").hexdigest()


def _one_line(result: subprocess.CompletedProcess[str]) -> str:
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    return lines[0]


def test_a_snapshot_is_the_signed_digest_of_the_rows_as_the_trail_stores_them(
    snaps: Snaps,
) -> None:
    snaps.sql(
        "INSERT INTO accounts VALUES"
        " (1, 'ann', 2.50, 'ann@example.com', '1234', 'private', '2025-01-02 03:04:05+02',"
        "  '{1,2}'), (2, 'bob', NULL, NULL, '9', 'x', NULL, NULL)"
    )
    result = snaps.run("snapshot")
    assert result.returncode == 0, result.stderr
    match = SNAPSHOT_LINE.match(result.stdout.strip())
    assert match and match[2] == "2", result.stdout

    # The digest, recomputed here from the documented definition: exclude drops `note`,
    # hash and mask redact, numeric keeps its digits, timestamptz is UTC ISO 8601.
    expected = Digest()
    expected.add(
        {
            "id": 1,
            "owner": "ann",
            "balance": "2.50",
            "email": _token("ann@example.com"),
            "pin": "***",
            "opened": "2025-01-02T01:04:05+00:00",
            "tags": [1, 2],
        }
    )
    expected.add(
        {
            "id": 2,
            "owner": "bob",
            "balance": None,
            "email": None,
            "pin": "***",
            "opened": None,
            "tags": None,
        }
    )
    row = snaps.db.execute(
        "SELECT digest, row_count, statement::text, signature, key_id, lsn_before <= lsn_after,"
        " policy_version_id IS NOT NULL FROM cdc_audit.snapshot WHERE id = %s",
        (int(match[1]),),
    )[0]
    digest, count, statement, signature, key_id, ordered, has_policy = row
    assert (digest, count) == (expected.hex, 2) and digest.startswith(match[3])
    assert ordered and has_policy
    public = load_public_key(snaps.keys["k1"] / "signing_key.pub.pem")
    assert key_id == public.key_id
    assert public.verify(bytes(signature), canonical_bytes(_parse(statement)))
    assert _parse(statement)["digest"] == digest

    # The trail is append-only for the snapshot table too.
    with pytest.raises(psycopg.Error, match="append-only"):
        snaps.db.execute("UPDATE cdc_audit.snapshot SET row_count = 3")


def _parse(text: str) -> dict[str, Any]:
    value = parse_json_exact(text)
    assert isinstance(value, dict)
    return value


def test_reconcile_replays_a_workload_between_two_snapshots(snaps: Snaps) -> None:
    snaps.sql(
        "INSERT INTO accounts (id, owner, balance, email, pin, note)"
        " SELECT g, 'o' || g, g * 1.5, 'u' || g || '@x', 'p', 'n' FROM generate_series(1, 20) g"
    )
    first = snaps.snapshot()
    snaps.sql("INSERT INTO accounts (id, owner, email) VALUES (21, 'new', 'new@x')")
    snaps.sql(
        "UPDATE accounts SET balance = balance + 1 WHERE id <= 5",  # a multi-row statement
        "UPDATE accounts SET email = 'changed@x' WHERE id = 6",
        "UPDATE accounts SET note = 'only an excluded column' WHERE id = 7",
        "DELETE FROM accounts WHERE id IN (8, 9)",
    )
    snaps.sql(
        "INSERT INTO accounts (id, owner) VALUES (100, 'gone soon')",
        "DELETE FROM accounts WHERE id = 100",
    )
    with snaps.db.connect(autocommit=False) as conn:  # rolled back: in neither
        ctx(conn, "u1", "oops")
        conn.execute("DELETE FROM accounts")
        conn.rollback()
    snaps.sql("UPDATE accounts SET owner = 'renamed', tags = '{7}' WHERE id = 21")
    snaps.drain()
    second = snaps.snapshot()

    result = snaps.reconcile()
    assert result.returncode == 0, result.stdout + result.stderr
    digest = snaps.db.scalar("SELECT digest FROM cdc_audit.snapshot WHERE id = %s", (second,))
    assert result.stdout.strip() == (
        f"public.accounts: reconciled: snapshot {first} (20 rows) + 12 event(s) replayed"
        f" (2 insert, 7 update, 3 delete) = snapshot {second} (19 rows, digest {digest[:16]})"
    )

    # A TRUNCATE, then new rows: replay restarts from an empty table.
    snaps.sql(
        "TRUNCATE accounts",
        "INSERT INTO accounts (id, owner) VALUES (1, 'again'), (2, 'twice')",
    )
    third = snaps.snapshot()
    result = snaps.reconcile()
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"snapshot {second} (19 rows) + 3 event(s) replayed (2 insert, 1 truncate)" in (
        result.stdout
    )
    # Any pair, in either window.
    assert snaps.reconcile("--from", str(first), "--to", str(third)).returncode == 0


def test_a_change_that_bypassed_the_context_trigger_is_in_the_trail_and_reconciles(
    snaps: Snaps,
) -> None:
    snaps.sql("INSERT INTO accounts (id, owner) VALUES (1, 'ann'), (2, 'bob')")
    snaps.snapshot()
    snaps.sql(
        "SET LOCAL session_replication_role = replica",
        "ALTER TABLE accounts DISABLE TRIGGER cdc_audit_context",
        "UPDATE accounts SET owner = 'mallory' WHERE id = 2",
        "INSERT INTO accounts (id, owner) VALUES (3, 'sneaky')",
        "ALTER TABLE accounts ENABLE TRIGGER cdc_audit_context",
        actor=None,
    )
    snaps.drain()
    snaps.snapshot()
    missing = snaps.db.execute(
        "SELECT kind, (new->>'id')::int FROM cdc_audit.event WHERE table_name = 'accounts'"
        " AND context_missing ORDER BY seq"
    )
    assert missing == [("update", 2), ("insert", 3)]
    result = snaps.reconcile()
    assert result.returncode == 0, result.stdout + result.stderr
    assert "2 event(s) replayed (1 insert, 1 update)" in result.stdout


def test_a_change_that_escaped_the_trail_fails_reconcile(snaps: Snaps) -> None:
    snaps.sql("INSERT INTO accounts (id, owner) VALUES (1, 'ann'), (2, 'bob')")
    first = snaps.snapshot()
    snaps.sql("UPDATE accounts SET owner = 'seen' WHERE id = 1")
    snaps.sql(
        "ALTER PUBLICATION cdc_audit DROP TABLE accounts",
        "UPDATE accounts SET owner = 'unseen' WHERE id = 2",
        "INSERT INTO accounts (id, owner) VALUES (3, 'unseen')",
        actor=None,
    )
    snaps.sql("ALTER PUBLICATION cdc_audit ADD TABLE accounts", actor=None)
    snaps.drain()
    second = snaps.snapshot()
    result = snaps.reconcile()
    assert result.returncode == 1, result.stdout + result.stderr
    assert _one_line(result) == (
        f"cdc-audit: public.accounts: the trail does not account for the change from snapshot"
        f" {first} to snapshot {second} (expected 2 rows, found 3, digests differ, 1 event(s)"
        " replayed)"
    )
    lines = result.stdout.splitlines()
    assert lines[0].startswith("public.accounts: the trail does not account for the change")
    assert (
        "expected (snapshot" in lines[2] and "1 event(s) replayed (1 update)): 2 rows" in lines[2]
    )
    assert f"found (snapshot {second}): 3 rows" in lines[3]


def test_an_altered_snapshot_fails_its_signature(snaps: Snaps) -> None:
    snaps.sql("INSERT INTO accounts (id, owner) VALUES (1, 'ann')")
    first = snaps.snapshot()
    second = snaps.snapshot()
    assert snaps.reconcile().returncode == 0
    snaps.sql(
        "SET LOCAL session_replication_role = replica",
        f"UPDATE cdc_audit.snapshot SET row_count = 5 WHERE id = {first}",
        actor=None,
    )
    result = snaps.reconcile()
    assert result.returncode == 1
    assert _one_line(result) == (
        f"cdc-audit: snapshot {first}: its columns differ from its signed statement:"
        " the snapshot table was altered"
    )
    # Statement and columns rewritten together: the signature no longer matches.
    snaps.sql(
        "SET LOCAL session_replication_role = replica",
        f"UPDATE cdc_audit.snapshot SET statement = jsonb_set(statement, '{{row_count}}', '5')"
        f" WHERE id = {first}",
        f"UPDATE cdc_audit.snapshot SET digest = repeat('0', 512),"
        f" statement = jsonb_set(statement, '{{digest}}', to_jsonb(repeat('0', 512)))"
        f" WHERE id = {second}",
        actor=None,
    )
    result = snaps.reconcile()
    assert result.returncode == 1
    assert _one_line(result) == (
        f"cdc-audit: snapshot {first}: the signature does not verify; snapshot {second}: the"
        " signature does not verify: the snapshot table was altered"
    )


def test_an_erased_event_or_ddl_in_between_cannot_be_concluded(snaps: Snaps) -> None:
    snaps.sql("INSERT INTO accounts (id, owner) VALUES (1, 'ann')")
    first = snaps.snapshot()
    snaps.sql("INSERT INTO accounts (id, owner, email) VALUES (2, 'forget me', 'f@x')")
    snaps.drain()
    event_id = snaps.db.scalar(
        "SELECT event_id FROM cdc_audit.event WHERE kind = 'insert' AND new->>'id' = '2'"
    )
    erased = snaps.run("erase", "--event", str(event_id), "--reason", "gdpr")
    assert erased.returncode == 0, erased.stderr
    snaps.snapshot()
    result = snaps.reconcile()
    assert result.returncode == 3
    assert "was erased: its row values are gone" in _one_line(result)

    # A column added with a default changes every row without a row event.
    before = snaps.snapshot()
    snaps.sql("ALTER TABLE accounts ADD COLUMN region text DEFAULT 'eu'")
    snaps.drain()
    snaps.snapshot()
    result = snaps.reconcile()
    assert result.returncode == 3, result.stdout + result.stderr
    line = _one_line(result)
    assert "cannot conclude: DDL on the table between snapshots" in line
    assert "ALTER TABLE" in line and "reconcile from a snapshot taken after it" in line
    assert "DDL on the table in between: admin/" in result.stdout
    # The erased event again, in a wider window.
    assert snaps.reconcile("--from", str(first), "--to", str(before)).returncode == 3


def test_bad_input_gets_one_line_and_exit_2(snaps: Snaps) -> None:
    no_key = snaps.cli("snapshot", "--policy", str(snaps.policy))
    assert no_key.returncode == 2
    assert _one_line(no_key) == (
        "cdc-audit: a snapshot is signed: set CDC_AUDIT_SIGNING_KEY_FILE to the worker's private"
        " key"
    )
    no_policy = snaps.cli("snapshot")
    assert no_policy.returncode == 2 and "no policy given" in _one_line(no_policy)
    other = snaps.run("snapshot", "--table", "public.nope")
    assert other.returncode == 2
    assert _one_line(other) == "cdc-audit: public.nope is not audited by the policy"

    unknown = snaps.run("reconcile", "public.nope")
    assert unknown.returncode == 2
    assert _one_line(unknown) == (
        "cdc-audit: no snapshot of public.nope: take them with cdc-audit snapshot"
    )
    first = snaps.snapshot()
    single = snaps.reconcile()
    assert single.returncode == 2
    assert _one_line(single) == (
        "cdc-audit: public.accounts has 1 snapshot(s); reconcile needs two: take another with"
        " cdc-audit snapshot"
    )
    wrong = snaps.reconcile("--from", str(first + 100))
    assert wrong.returncode == 2
    assert _one_line(wrong) == (
        f"cdc-audit: snapshot {first + 100} is not a snapshot of public.accounts"
    )
    assert snaps.reconcile("--to", "abc").returncode == 2

    # Taken, but not sealed yet: operational, exit 3.
    snaps.run("snapshot")
    late = snaps.reconcile()
    assert late.returncode == 3
    assert "the worker has sealed the stream up to" in _one_line(late)


def test_tables_that_cannot_be_replayed_are_refused(
    database: Database, write_policy: WritePolicy, tmp_path: Path
) -> None:
    database.execute(
        "CREATE TABLE accounts (id int PRIMARY KEY, owner text, status text);"
        "INSERT INTO accounts VALUES (1, 'ann', 'open')"
    )
    policy = write_policy("  - {table: public.accounts, stream: user, old_values: key}\n", EXTRA)
    snaps = _snaps(database, policy, tmp_path)
    snaps.snapshot()
    snaps.snapshot()
    result = snaps.reconcile()
    assert result.returncode == 2
    assert _one_line(result).startswith(
        "cdc-audit: public.accounts is audited with old_values: key (policy version 1): a"
        " delete does not record the whole row"
    )

    snaps.policy = write_policy(
        "  - {table: public.accounts, stream: user, when: \"status <> 'draft'\"}\n", EXTRA
    )
    assert snaps.cli("apply", "--policy", str(snaps.policy)).returncode == 0
    snaps.snapshot()
    snaps.snapshot()
    result = snaps.reconcile()
    assert result.returncode == 2
    assert "has a when filter (policy version 2)" in _one_line(result)
    # Across the apply, the column rules differ too.
    across = snaps.reconcile("--from", "2", "--to", "3")
    assert across.returncode == 2


def test_a_policy_file_that_differs_from_the_applied_one_is_refused(
    snaps: Snaps, write_policy: WritePolicy
) -> None:
    snaps.policy = write_policy("  - {table: public.accounts, stream: user}\n", EXTRA)
    result = snaps.run("snapshot")
    assert result.returncode == 2
    assert _one_line(result) == (
        "cdc-audit: public.accounts: the policy given differs from the applied policy (version"
        " 1) for this table: run cdc-audit apply first"
    )


def test_a_numeric_and_json_heavy_row_hashes_like_its_event(
    database: Database, write_policy: WritePolicy, tmp_path: Path
) -> None:
    database.execute(
        "CREATE TABLE accounts (id bigint PRIMARY KEY, doc jsonb, j json, f float8, b bool,"
        " raw bytea, at timestamptz, d date, big bigint, n numeric)"
    )
    snaps = _snaps(database, write_policy("  - {table: public.accounts, stream: user}\n"), tmp_path)
    snaps.snapshot()
    snaps.sql(
        'INSERT INTO accounts VALUES (1, \'{"a": 2.50, "b": [1e3, null]}\', \'{"x": 1.0E-3}\','
        " 0.1, true, '\\x00ff', '0044-03-15 12:00:00 BC', '2025-12-31', 9007199254740993,"
        " 'NaN')"
    )
    snaps.sql("UPDATE accounts SET f = 1e300, b = false WHERE id = 1")
    snaps.drain()
    second = snaps.snapshot()
    result = snaps.reconcile()
    assert result.returncode == 0, result.stdout + result.stderr
    # The row's stored `new` is the object the snapshot hashed.
    new = snaps.db.scalar(
        "SELECT new::text FROM cdc_audit.event WHERE kind = 'update' ORDER BY seq DESC LIMIT 1"
    )
    digest = Digest()
    digest.add(_parse(new))
    stored = snaps.db.scalar("SELECT digest FROM cdc_audit.snapshot WHERE id = %s", (second,))
    assert stored == digest.hex
    assert _parse(new)["doc"] == {"a": JsonNumber("2.50"), "b": [1000, None]}


def test_the_workers_role_may_snapshot_a_table_it_may_read(snaps: Snaps) -> None:
    snaps.sql("INSERT INTO accounts (id, owner) VALUES (1, 'ann')")
    worker = snaps.db.login_role("worker", "cdc_audit_writer")
    as_worker = snaps.db.dsn_as(worker)
    denied = snaps.run("snapshot", "--dsn", as_worker)
    assert denied.returncode == 3
    assert _one_line(denied) == (
        f"cdc-audit: snapshot of public.accounts: role {worker} may not read it (GRANT SELECT"
        " ON public.accounts to it, or to cdc_audit_writer for the worker's job)"
    )
    snaps.db.execute("GRANT SELECT ON accounts TO cdc_audit_writer")
    made = snaps.run("snapshot", "--dsn", as_worker)
    assert made.returncode == 0, made.stderr
    assert SNAPSHOT_LINE.match(made.stdout.strip())
