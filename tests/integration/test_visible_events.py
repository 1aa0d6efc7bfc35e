"""The base view of the read side: each role sees what the policy lets it see."""

from __future__ import annotations

import psycopg
import pytest

from .fix_policy import WritePolicy
from .pg import Database, run_cli

POLICY = """\
version: 1
schema: cdc_audit
streams:
  user: {readers: true}
  admin: {}
tables:
  - {table: public.accounts, stream: user}
"""


def test_readers_see_reader_streams_without_context_details_auditors_see_all(
    database: Database, write_policy: WritePolicy
) -> None:
    database.execute("CREATE TABLE accounts (id int PRIMARY KEY)")
    policy = write_policy(base=POLICY)
    assert run_cli("apply", "--dsn", database.dsn, "--policy", str(policy)).returncode == 0
    for stream, seq in (("user", 1), ("admin", 1)):
        database.execute(
            "INSERT INTO cdc_audit.event (stream, seq, event_id, commit_time, kind, payload_hash,"
            " prev_hash, hash, context, signature, key_id) VALUES (%s, %s, gen_random_uuid(),"
            " now(), 'insert', '\\x01', '\\x00', '\\x02',"
            ' \'{"trace_id": "t1", "db": {"client_addr": "10.0.0.7"}}\', \'\\x03\', \'k\')',
            (stream, seq),
        )
    reader = database.login_role("ann", "cdc_audit_reader")
    auditor = database.login_role("bob", "cdc_audit_auditor")
    query = "SELECT stream, context, signature FROM cdc_audit.visible_event ORDER BY stream"
    with psycopg.connect(database.dsn_as(reader)) as conn:
        assert conn.execute(query).fetchall() == [("user", {"trace_id": "t1"}, None)]
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("SELECT count(*) FROM cdc_audit.event")
    with psycopg.connect(database.dsn_as(auditor)) as conn:
        rows = conn.execute(query).fetchall()
        assert [r[0] for r in rows] == ["admin", "user"]
        assert rows[1][1]["db"] == {"client_addr": "10.0.0.7"} and rows[1][2] == b"\x03"
