"""`cdc-audit query`, `cdc-audit history` and `AuditReader` against a real trail, sealed by the
worker from real changes."""

from __future__ import annotations

import csv
import io
import json
import subprocess
import sys
import uuid
from collections.abc import Iterator
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest

from cdc_audit import AuditReader
from cdc_audit.cli import main as cli_main
from cdc_audit.ephemeral import EphemeralCluster
from cdc_audit.query import Event, RowHistory, RowState

from .pg import Database, run_cli

POLICY = """\
version: 1
schema: cdc_audit
context:
  require: [actor_id]
  on_missing: record
streams:
  user: {readers: true}
  admin: {}
tables:
  - {table: public.accounts, stream: user, exclude: [secret]}
  - {table: public.roles, stream: admin}
  - {table: public.tagged, stream: user}
ddl: {stream: admin}
"""

HOSTILE = "'; DROP TABLE accounts; --"
NOTE = 'line one,\nline "two", 100% é☃'
SNOWMAN = "trace-☃-é"


def _drain(db: Database) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "cdc_audit.cli", "--dsn", db.dsn, "worker", "--drain"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr


def _cli(dsn: str, *args: str) -> subprocess.CompletedProcess[str]:
    """The CLI's entry point in this process (fast); exceptions propagate."""
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        code = cli_main(["--dsn", dsn, *args])
    return subprocess.CompletedProcess(["cdc-audit", *args], code, out.getvalue(), err.getvalue())


def _jsonl(result: subprocess.CompletedProcess[str]) -> list[dict[str, Any]]:
    assert result.returncode == 0, result.stderr
    return [json.loads(line) for line in result.stdout.splitlines()]


@dataclass
class Scenario:
    db: Database
    policy: Path
    # (moment after a commit, {(table, key): row as SELECTed then (without excluded columns)})
    moments: list[tuple[datetime, dict[tuple[str, int], dict[str, Any]]]] = field(
        default_factory=list
    )

    def reader(self, user: str | None = None) -> AuditReader:
        return AuditReader(self.db.dsn if user is None else self.db.dsn_as(user))

    def events(self, **filters: Any) -> list[Event]:
        with self.reader() as reader:
            return list(reader.events(**filters))

    def snapshot(self, conn: psycopg.Connection[Any]) -> None:
        rows = conn.execute(
            "SELECT id, to_jsonb(a) - 'secret' FROM accounts a ORDER BY id"
        ).fetchall()
        moment = conn.execute("SELECT clock_timestamp()").fetchone()
        conn.commit()
        assert moment is not None
        self.moments.append((moment[0], {("accounts", r[0]): r[1] for r in rows}))


def ctx(conn: psycopg.Connection[Any], actor: str | None, **more: str) -> None:
    names = ", ".join(f"{k} => %s" for k in ("actor_id", *more))
    conn.execute(f"SELECT cdc_audit.set_context({names})", (actor, *more.values()))


def _build(db: Database, tmp: Path) -> Scenario:
    db.execute(
        "CREATE TABLE accounts (id int PRIMARY KEY, owner text, note text, secret text);"
        "CREATE TABLE roles (id int PRIMARY KEY, name text);"
        "CREATE TABLE tagged (code text PRIMARY KEY, v int)"
    )
    policy = tmp / "policy.yaml"
    policy.write_text(POLICY)
    result = run_cli("apply", "--dsn", db.dsn, "--policy", str(policy))
    assert result.returncode == 0, result.stderr
    s = Scenario(db, policy)
    with db.connect(autocommit=False) as conn:
        s.snapshot(conn)
        ctx(conn, "alice", reason="opening", trace_id="t-1")
        conn.execute("INSERT INTO accounts VALUES (1, 'alice', 'n1', 's'), (2, 'bob', NULL, 's')")
        conn.execute("INSERT INTO accounts VALUES (3, 'carl', 'n3', 's')")
        conn.commit()
        s.snapshot(conn)
        ctx(conn, "bob", reason="fix 100% of it_now", on_behalf_of="carol")
        conn.execute("UPDATE accounts SET owner = 'bob', note = %s WHERE id = 1", (NOTE,))
        conn.commit()
        s.snapshot(conn)
        ctx(conn, "eve", reason=HOSTILE, trace_id=SNOWMAN)
        conn.execute("UPDATE accounts SET id = 10 WHERE id = 2")  # the key changes
        conn.commit()
        s.snapshot(conn)
        ctx(conn, "alice", reason="closing")
        conn.execute("DELETE FROM accounts WHERE id = 3")
        conn.execute("UPDATE accounts SET note = 'moved', secret = 'x' WHERE id = 10")
        conn.commit()
        s.snapshot(conn)
        conn.execute("INSERT INTO accounts VALUES (4, 'nobody', NULL, NULL)")  # no context
        conn.commit()
        s.snapshot(conn)
        ctx(conn, "root", reason="grant")
        conn.execute("INSERT INTO roles VALUES (1, 'admin')")
        conn.execute("GRANT SELECT ON accounts TO PUBLIC")
        conn.commit()
        ctx(conn, "tagger", reason="tags")
        conn.execute("INSERT INTO tagged VALUES ('42', 1), ('abc', 2), ('Ünï''\"%', 3)")
        conn.commit()
        ctx(conn, "dave", reason="reset")
        conn.execute("TRUNCATE accounts")
        conn.commit()
        s.snapshot(conn)
        ctx(conn, "alice", reason="again")
        conn.execute("INSERT INTO accounts VALUES (1, 'alice again', NULL, NULL)")
        conn.commit()
        s.snapshot(conn)
    _drain(db)
    return s


@pytest.fixture(scope="module")
def scenario(
    pg_cluster: EphemeralCluster, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Scenario]:
    db = Database(name=f"query_{uuid.uuid4().hex[:8]}", cluster=pg_cluster)
    with psycopg.connect(pg_cluster.dsn(), autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{db.name}" TEMPLATE template0')
    try:
        yield _build(db, tmp_path_factory.mktemp("query"))
    finally:
        db.drop()


def _keys(events: list[Event]) -> list[tuple[str, str | None, Any]]:
    return [(e.kind, e.table_name, e.row_key) for e in events]


# ---- filters


def test_each_filter_alone(scenario: Scenario) -> None:
    everything = scenario.events()
    assert [(e.stream, e.seq) for e in everything] == sorted((e.stream, e.seq) for e in everything)
    by_actor = scenario.events(actor="bob")
    assert _keys(by_actor) == [("update", "accounts", {"id": 1})]
    assert by_actor[0].changed == ("note", "owner")
    assert {e.table_name for e in scenario.events(table="tagged")} == {"tagged"}
    assert {e.table_name for e in scenario.events(table="public.roles")} == {"roles"}
    assert scenario.events(table='"Accounts"') == []  # quoted: case kept, no such table
    assert [e.kind for e in scenario.events(key="id=3")] == ["insert", "delete"]
    assert [e.new for e in scenario.events(table="tagged", key="code=42")] == [
        {"code": "42", "v": 1}
    ]
    assert [e.row_key for e in scenario.events(key={"code": "abc"})] == [{"code": "abc"}]
    assert [e.row_key for e in scenario.events(key='{"id": 10}')] == [{"id": 10}, {"id": 10}]
    assert [e.kind for e in scenario.events(kind="truncate")] == ["truncate"]
    ddl = scenario.events(kind=["ddl"])
    assert len(ddl) == 1 and isinstance(ddl[0].new, dict) and ddl[0].new["command_tag"] == "GRANT"
    admin = scenario.events(stream="admin")
    assert {e.stream for e in admin} == {"admin"} and len(admin) == 2
    missing = [e for e in everything if e.context_missing]
    assert _keys(missing) == [("insert", "accounts", {"id": 4})]
    assert [e.reason for e in scenario.events(reason_contains="100%")] == ["fix 100% of it_now"]
    assert [e.actor_id for e in scenario.events(context={"on_behalf_of": "carol"})] == ["bob"]
    assert [e.actor_id for e in scenario.events(context=[f"trace_id={SNOWMAN}"])] == ["eve"]


def test_time_windows(scenario: Scenario) -> None:
    everything = scenario.events()
    times = sorted(e.commit_time for e in everything)
    middle = scenario.moments[3][0]
    since = scenario.events(since=middle)
    until = scenario.events(until=middle)
    assert since and until and len(since) + len(until) == len(everything)
    assert all(e.commit_time >= middle for e in since)
    assert all(e.commit_time < middle for e in until)
    iso = middle.isoformat()
    assert scenario.events(since=iso) == since
    assert scenario.events(since="1h") == everything  # relative: all of it is recent
    assert scenario.events(until="1h") == []
    assert scenario.events(since=times[0], until=times[0] + timedelta(microseconds=1))


def test_filters_combine(scenario: Scenario) -> None:
    found = scenario.events(actor="alice", table="accounts", kind=["insert"], stream="user")
    assert _keys(found) == [
        ("insert", "accounts", {"id": 1}),
        ("insert", "accounts", {"id": 2}),
        ("insert", "accounts", {"id": 3}),
        ("insert", "accounts", {"id": 1}),
    ]
    assert scenario.events(actor="alice", reason_contains="again", key="id=1", limit=5) == [
        found[-1]
    ]
    assert scenario.events(actor="bob", kind="insert") == []


def test_hostile_values_are_taken_literally(scenario: Scenario) -> None:
    assert [e.actor_id for e in scenario.events(reason_contains=HOSTILE)] == ["eve"]
    assert [e.actor_id for e in scenario.events(reason_contains="'; DROP")] == ["eve"]
    # % and _ are characters, not patterns.
    assert {e.reason for e in scenario.events(reason_contains="%")} == {"fix 100% of it_now"}
    assert {e.reason for e in scenario.events(reason_contains="_")} == {"fix 100% of it_now"}
    assert scenario.events(reason_contains="o%n") == []
    for value in (HOSTILE, "%", "_", "é☃", "\"'\\", "\n"):
        assert scenario.events(actor=value) == []
        assert scenario.events(stream=value) == []
        assert scenario.events(context={"trace_id": value}) == []
        assert scenario.events(kind=value) == []
    tricky = scenario.events(table="tagged", key={"code": "Ünï'\"%"})
    assert [e.new for e in tricky] == [{"code": "Ünï'\"%", "v": 3}]
    assert scenario.db.scalar("SELECT count(*) FROM accounts") == 1  # nothing was dropped


# ---- pagination


def test_pages_follow_each_other(scenario: Scenario) -> None:
    everything = scenario.events()
    pages: list[Event] = []
    after: str | None = None
    while True:
        page = scenario.events(limit=3, after=after)
        pages += page
        if len(page) < 3:
            break
        after = str(page[-1].cursor)
    assert pages == everything
    newest = scenario.events(order="newest", limit=2)
    assert newest == list(reversed(everything))[:2]
    assert scenario.events(order="newest", after=newest[-1].cursor, limit=1) == [
        list(reversed(everything))[2]
    ]


def test_paging_while_events_arrive_has_no_gap_and_no_duplicate(
    database: Database, tmp_path: Path
) -> None:
    database.execute(
        "CREATE TABLE accounts (id int PRIMARY KEY, owner text, note text, secret text);"
        "CREATE TABLE roles (id int PRIMARY KEY, name text);"
        "CREATE TABLE tagged (code text PRIMARY KEY, v int)"
    )
    policy = tmp_path / "policy.yaml"
    policy.write_text(POLICY)
    assert run_cli("apply", "--dsn", database.dsn, "--policy", str(policy)).returncode == 0
    next_id = iter(range(1, 10_000))

    def commit(n: int) -> None:
        with database.connect(autocommit=False) as conn:
            ctx(conn, "pager", reason="page")
            for _ in range(n):
                i = next(next_id)
                conn.execute("INSERT INTO accounts VALUES (%s, 'o', NULL, NULL)", (i,))
                conn.execute("INSERT INTO roles VALUES (%s, 'r')", (i,))
        _drain(database)

    commit(6)
    with AuditReader(database.dsn) as reader:
        initial = [(e.stream, e.seq) for e in reader.events()]
    assert len(initial) == 12
    seen: list[tuple[str, int]] = []
    one_stream: list[int] = []
    after_all: str | None = None
    after_user: str | None = None
    with AuditReader(database.dsn) as reader:
        for _ in range(12):
            page = list(reader.events(limit=4, after=after_all))
            seen += [(e.stream, e.seq) for e in page]
            if page:
                after_all = str(page[-1].cursor)
            user_page = list(reader.events(stream="user", limit=4, after=after_user))
            one_stream += [e.seq for e in user_page]
            if user_page:
                after_user = str(user_page[-1].seq)  # SEQ alone: one stream is selected
            commit(1)  # new events arrive between pages, in both streams
        while rest := list(reader.events(stream="user", limit=4, after=after_user)):
            one_stream += [e.seq for e in rest]
            after_user = str(rest[-1].seq)
        user_total = len(list(reader.events(stream="user")))
    assert len(seen) == len(set(seen)), "a duplicate"
    assert seen == sorted(seen)
    # No gap: every event that existed when paging began is on a page, and within a stream
    # the pages are contiguous from 1, the events sealed between pages included (they arrive
    # at higher sequence numbers, ahead of the cursor while it is in their stream).
    assert set(initial) <= set(seen)
    for stream in ("admin", "user"):
        seqs = [q for s, q in seen if s == stream]
        assert seqs == list(range(1, len(seqs) + 1))
    assert len([1 for s, _ in seen if s == "user"]) > 6  # new user events were paged too
    assert one_stream == list(range(1, user_total + 1))


# ---- history and as-of


def test_history_follows_the_row_through_its_key_change(scenario: Scenario) -> None:
    with scenario.reader() as reader:
        found = reader.history("accounts", "id=10")
        same = reader.history("public.accounts", {"id": 2})
    assert isinstance(found, RowHistory)
    assert [(e.kind, e.row_key, e.actor_id) for e in found.events] == [
        ("insert", {"id": 2}, "alice"),
        ("update", {"id": 10}, "eve"),
        ("update", {"id": 10}, "alice"),
        ("truncate", None, "dave"),
    ]
    assert found.events[1].reason == HOSTILE and found.events[1].changed == ("id",)
    assert found.keys == [{"id": 2}, {"id": 10}]
    assert same.events == found.events
    with scenario.reader() as reader:
        one = reader.history("accounts", "id=1")
    assert [(e.kind, e.actor_id) for e in one.events] == [
        ("insert", "alice"),
        ("update", "bob"),
        ("truncate", "dave"),
        ("insert", "alice"),
    ]


def test_as_of_matches_the_rows_as_they_were(scenario: Scenario) -> None:
    with scenario.reader() as reader:
        histories = {i: reader.history("accounts", {"id": i}) for i in (1, 2, 3, 4, 10)}
    from cdc_audit.query import reconstruct

    for moment, rows in scenario.moments:
        for i, history in histories.items():
            state = reconstruct(history, moment)
            expected = rows.get(("accounts", i))
            if i == 10 and expected is None:
                # Before its key changed, the row known as 10 is the one that had key 2.
                expected = rows.get(("accounts", 2))
            assert state.row == expected, (moment, i, state.note())
            assert state.exists is (expected is not None)
    # Through the API's own call: key 10 before the key change is the row under key 2.
    before_move = scenario.moments[2]
    with scenario.reader() as reader:
        state = reader.history("accounts", "id=10", as_of=before_move[0])
    assert isinstance(state, RowState)
    assert state.row == before_move[1][("accounts", 2)] and state.key == {"id": 2}
    assert "secret" not in (state.row or {})
    assert "excluded columns are absent" in state.note()


# ---- the command line


def test_output_formats_parse(scenario: Scenario) -> None:
    dsn = scenario.db.dsn
    lines = _jsonl(_cli(dsn, "query", "--actor", "bob"))
    assert [e["new"]["note"] for e in lines] == [NOTE]
    assert lines[0]["commit_time"].endswith("+00:00") and lines[0]["changed"] == ["note", "owner"]
    array = json.loads(_cli(dsn, "query", "--table", "accounts", "--format", "json").stdout)
    assert len(array) == len(scenario.events(table="accounts"))
    result = _cli(dsn, "query", "--actor", "bob", "--format", "csv")
    rows = list(csv.DictReader(io.StringIO(result.stdout)))
    assert len(rows) == 1
    assert json.loads(rows[0]["new"])["note"] == NOTE
    assert rows[0]["reason"] == "fix 100% of it_now" and rows[0]["actor_id"] == "bob"
    table = _cli(dsn, "query", "--actor", "bob", "--format", "table").stdout.splitlines()
    assert len(table) == 2 and table[0].startswith("CURSOR") and "user:" in table[1]
    history = _cli(dsn, "history", "accounts", "id=10", "--format", "table").stdout
    assert history.startswith("# public.accounts, key") and "truncate" in history
    as_of = _cli(dsn, "history", "accounts", "id=1", "--as-of", "1h")
    assert as_of.returncode == 0 and json.loads(as_of.stdout)["exists"] is False
    assert "did not exist" in as_of.stderr
    now = _cli(dsn, "history", "accounts", "id=1", "--as-of", "now", "--format", "table")
    assert "alice again" in now.stdout and now.stdout.startswith("# public.accounts id=1")


def test_cli_pages_and_says_where_to_continue(scenario: Scenario) -> None:
    dsn = scenario.db.dsn
    first = _cli(dsn, "query", "--stream", "user", "--limit", "2")
    assert [e["seq"] for e in _jsonl(first)] == [1, 2]
    assert first.stderr.strip() == "next: --after user:2"
    second = _cli(dsn, "query", "--stream", "user", "--limit", "2", "--after", "2")
    assert [e["seq"] for e in _jsonl(second)] == [3, 4]
    assert _jsonl(_cli(dsn, "query", "--limit", "1", "--after", "user:4"))[0]["seq"] == 5


def test_bad_input_exits_2_with_one_line(scenario: Scenario) -> None:
    dsn = scenario.db.dsn
    for args in (
        ("query", "--since", "2026-01-01T00:00:00"),
        ("query", "--since", "yesterday"),
        ("query", "--after", "12"),
        ("query", "--key", "nonsense"),
        ("query", "--table", "a.b.c"),
        ("query", "--context", "novalue"),
        ("query", "--limit", "-1"),
        ("history", "accounts", "{bad"),
        ("history", "accounts", "id=1", "--as-of", "2026-01-01"),
    ):
        result = _cli(dsn, *args)
        assert result.returncode == 2, (args, result.stderr)
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr
        assert result.stdout == ""
    nothing = _cli(dsn, "query", "--actor", "nobody at all")
    assert (nothing.returncode, nothing.stdout, nothing.stderr) == (0, "", "no events match\n")
    absent = _cli(dsn, "query", "--schema", "elsewhere")
    assert absent.returncode == 3 and len(absent.stderr.strip().splitlines()) == 1
    process = run_cli("--dsn", dsn, "query", "--since", "2026-01-01T00:00:00")
    assert process.returncode == 2 and "no time zone" in process.stderr


def test_a_reader_sees_only_reader_streams(scenario: Scenario) -> None:
    reader_role = scenario.db.login_role("ann", "cdc_audit_reader")
    with scenario.reader(reader_role) as reader:
        seen = list(reader.events())
        admin = list(reader.events(stream="admin"))
        roles = reader.history("roles", "id=1")
    assert seen and {e.stream for e in seen} == {"user"} and admin == []
    assert roles.events == []
    assert all(e.signature is None for e in seen)
    assert all(isinstance(e.context, dict) and "db" not in e.context for e in seen if e.context)
    auditor = [e for e in scenario.events(stream="user") if e.context]
    assert any(isinstance(e.context, dict) and "db" in e.context for e in auditor)
    result = _cli(scenario.db.dsn_as(reader_role), "query", "--limit", "0")
    assert {e["stream"] for e in _jsonl(result)} == {"user"}
    assert _cli(scenario.db.dsn_as(reader_role), "query", "--kind", "ddl").stderr == (
        "no events match\n"
    )
    nobody = scenario.db.login_role("nobody")
    refused = _cli(scenario.db.dsn_as(nobody), "query")
    assert refused.returncode == 3 and len(refused.stderr.strip().splitlines()) == 1


def test_the_api_pages_internally_and_allows_queries_while_iterating(scenario: Scenario) -> None:
    everything = scenario.events()
    with AuditReader(scenario.db.dsn, page_size=2) as reader:
        collected = []
        for event in reader.events():
            collected.append(event)
            if event.kind == "delete":  # another query in the middle of the iteration
                assert reader.history("accounts", event.row_key or {}).events
        assert collected == everything
        assert list(reader.events(limit=3)) == everything[:3]
        assert list(reader.events(limit=5, order="newest")) == everything[::-1][:5]


def test_reads_are_recorded_when_the_policy_audits_them(database: Database, tmp_path: Path) -> None:
    database.execute(
        "CREATE TABLE accounts (id int PRIMARY KEY, owner text, note text, secret text);"
        "CREATE TABLE roles (id int PRIMARY KEY, name text);"
        "CREATE TABLE tagged (code text PRIMARY KEY, v int)"
    )
    policy = tmp_path / "policy.yaml"
    policy.write_text(POLICY + "read_audit: {stream: admin}\n")
    assert run_cli("apply", "--dsn", database.dsn, "--policy", str(policy)).returncode == 0
    with AuditReader(database.dsn) as reader:
        assert list(reader.events(actor="bob", since="2026-01-01T00:00:00+01:00")) == []
        reader.history("accounts", "id=1", as_of="2026-01-01T00:00:00Z")
    _drain(database)
    with AuditReader(database.dsn) as reader:
        reads = list(reader.events(kind="app", stream="admin"))
    news: list[Any] = [e.new for e in reads]
    assert [n["action"] for n in news] == [
        "audit.read.events",
        "audit.read.history",
    ]
    assert [n["details"]["filters"] for n in news] == [
        {"actor": "bob", "since": "2025-12-31T23:00:00+00:00", "order": "oldest"},
        {"table": "public.accounts", "key": {"id": 1}, "as_of": "2026-01-01T00:00:00+00:00"},
    ]
