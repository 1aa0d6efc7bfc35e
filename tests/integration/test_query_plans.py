"""The common questions use the trail's indexes and partitions (EXPLAIN on realistic counts)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

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
ddl: {stream: admin}
"""

EVENTS = 60_000

# Events in the trail's format, spread over the last three months: 50 actors, 20 tables,
# 2,000 keys a table, every 50th event in the admin stream.
LOAD = """\
INSERT INTO cdc_audit.event (stream, seq, event_id, commit_time, kind, schema_name,
    table_name, row_key, new, actor_id, context, payload_hash, prev_hash, hash)
SELECT CASE WHEN i %% 50 = 3 THEN 'admin' ELSE 'user' END, i, gen_random_uuid(),
       now() - interval '85 days' + (i::float8 / %(n)s) * interval '85 days',
       CASE WHEN i %% 50 = 3 THEN 'ddl' ELSE 'update' END,
       'public', 't' || (i %% 20), jsonb_build_object('id', (i / 20) %% 2000),
       jsonb_build_object('v', i), 'u' || (i %% 50),
       jsonb_build_object('trace_id', md5(i::text), 'db', jsonb_build_object('pid', i)),
       '\\x01', '\\x00', '\\x02'
  FROM generate_series(1, %(n)s) AS i
"""


@pytest.fixture
def loaded(database: Database, write_policy: WritePolicy) -> Iterator[Database]:
    database.execute("CREATE TABLE accounts (id int PRIMARY KEY)")
    policy = write_policy(base=POLICY)
    assert run_cli("apply", "--dsn", database.dsn, "--policy", str(policy)).returncode == 0
    for month in range(4):
        database.execute(
            "SELECT cdc_audit.ensure_event_partition(now() - make_interval(months => %s))",
            (month,),
        )
    with database.connect() as conn:
        conn.execute(LOAD.encode(), {"n": EVENTS})
        conn.execute("ANALYZE cdc_audit.event")
        big = conn.execute(
            "SELECT c.relname FROM cdc_audit.event_leaves() l JOIN pg_class c"
            " ON c.relname = l.leaf_name AND c.relnamespace = 'cdc_audit'::regnamespace"
            " WHERE c.reltuples >= 5000"
        ).fetchall()
    BIG.clear()
    BIG.update(str(name) for (name,) in big)
    yield database


def _nodes(plan: dict[str, Any]) -> Iterator[dict[str, Any]]:
    yield plan
    for child in plan.get("Plans", []):
        yield from _nodes(child)


def _explain(conn: psycopg.Connection[Any], query: str, params: tuple[Any, ...] = ()) -> Any:
    row = conn.execute(f"EXPLAIN (FORMAT JSON) {query}".encode(), params).fetchone()
    assert row is not None
    document = row[0] if not isinstance(row[0], str) else json.loads(row[0])
    return list(_nodes(document[0]["Plan"]))


def _scans(nodes: list[dict[str, Any]]) -> list[tuple[str, str, str]]:
    """(node type, relation, index) of every scan that reads a table."""
    return [
        (n["Node Type"], n.get("Relation Name", ""), n.get("Index Name", ""))
        for n in nodes
        if "Relation Name" in n
    ]


BIG: set[str] = set()
"""Partitions with enough rows (after ANALYZE) that reading one whole is never the best plan."""


def _check(scans: list[tuple[str, str, str]], index_columns: str) -> None:
    """Every sizeable partition scanned is read through an index whose name says its columns."""
    assert scans, "no scan"
    assert any(relation in BIG for _, relation, _ in scans), scans
    for kind, relation, index in scans:
        if relation not in BIG:
            continue  # an empty or nearly empty month is cheaper to read whole
        assert kind in ("Index Scan", "Index Only Scan", "Bitmap Heap Scan", "Bitmap Index Scan")
        if kind != "Bitmap Heap Scan":
            assert index_columns in index, (relation, index)


def test_the_common_queries_use_the_indexes_and_prune_partitions(loaded: Database) -> None:
    with loaded.connect() as conn:
        leaves = conn.execute(
            "SELECT count(*) FROM cdc_audit.event_leaves() WHERE stream IS NOT NULL"
        ).fetchone()
        assert leaves is not None and leaves[0] >= 8

        # Actor + 7-day window: the actor/time index, and only the months the window touches.
        scans = _scans(
            _explain(
                conn,
                "SELECT * FROM cdc_audit.event WHERE actor_id = 'u7'"
                " AND commit_time >= now() - interval '20 days'"
                " AND commit_time < now() - interval '13 days' ORDER BY commit_time",
            )
        )
        _check(scans, "actor_id_commit_time")
        assert len({relation[:-6] for _, relation, _ in scans if "_2" in relation}) <= 2 * 3

        # Row history of one key: the row/time index.
        scans = _scans(
            _explain(
                conn,
                "SELECT * FROM cdc_audit.event WHERE schema_name = 'public'"
                " AND table_name = 't3' AND row_key = '{\"id\": 17}' ORDER BY commit_time",
            )
        )
        _check(scans, "schema_name_table_name_row_key")

        # The recent 100: newest month first through the time index, stopping at 100.
        nodes = _explain(conn, "SELECT * FROM cdc_audit.event ORDER BY commit_time DESC LIMIT 100")
        assert nodes[0]["Node Type"] == "Limit"
        assert not any(n["Node Type"] == "Sort" for n in nodes)
        _check(_scans(nodes), "commit_time_idx")

        # Admin actions of a month: the admin stream's partition of that month only.
        scans = _scans(
            _explain(
                conn,
                "SELECT * FROM cdc_audit.event WHERE stream = 'admin'"
                " AND commit_time >= date_trunc('month', now()) - interval '1 month'"
                " AND commit_time < date_trunc('month', now())"
                " ORDER BY commit_time DESC LIMIT 100",
            )
        )
        assert {relation for _, relation, _ in scans} <= {
            r for (r,) in conn.execute("SELECT leaf_name FROM cdc_audit.event_leaves()")
        }
        assert all(relation.endswith("_admin") for _, relation, _ in scans), scans
        assert len(scans) <= 2


def test_curated_reads_use_the_indexes_inside_the_visibility_rule(loaded: Database) -> None:
    reader = loaded.login_role("ann", "cdc_audit_reader")
    with loaded.connect() as conn:
        # auto_explain shows the plans of the statements run inside the functions; loading it
        # takes a superuser, who then acts as the reader.
        conn.execute("LOAD 'auto_explain'")
        conn.execute("SET auto_explain.log_min_duration = 0")
        conn.execute("SET auto_explain.log_nested_statements = on")
        conn.execute("SET auto_explain.log_format = json")
        plans: list[str] = []
        conn.add_notice_handler(lambda d: plans.append(str(d.message_primary)))
        conn.execute("SET client_min_messages = log")
        conn.execute("SET auto_explain.log_level = notice")
        conn.execute(f"SET ROLE {reader}".encode())
        conn.execute(
            "SELECT * FROM cdc_audit.visible_events_where(in_schema => 'public',"
            " in_table => 't3', key => '{\"id\": 17}')"
        ).fetchall()
        conn.execute("SELECT * FROM cdc_audit.recent_events LIMIT 100").fetchall()
        conn.execute(
            "SELECT * FROM cdc_audit.visible_events_where(since => now() - interval '20 days',"
            " until => now() - interval '13 days', actor => 'u7')"
        ).fetchall()
    inner = [json.loads(p[p.index("{") :]) for p in plans if "cdc_audit.event e" in p]
    assert len(inner) == 3, plans
    expected = ("schema_name_table_name_row_key", "commit_time_idx", "actor_id_commit_time")
    for document, index_columns in zip(inner, expected, strict=True):
        scans = _scans(list(_nodes(document["Plan"])))
        # The reader's visibility prunes the admin stream's partitions away.
        assert not any(relation.endswith("_admin") for _, relation, _ in scans), scans
        _check(scans, index_columns)
