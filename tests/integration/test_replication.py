"""The replication client against a real server: content, order, settings, positions."""

from __future__ import annotations

import json
import time

import pytest

from cdc_audit import installer
from cdc_audit.assemble import context_fields
from cdc_audit.pgoutput import (
    Begin,
    Commit,
    Delete,
    Insert,
    LogicalMessage,
    PgOutputMessage,
    Relation,
    Truncate,
    Update,
    parse_lsn,
)
from cdc_audit.policy import load_policy
from cdc_audit.replication import (
    ReplicationError,
    ReplicationStream,
    SlotLost,
    StreamItem,
    StreamOptions,
)

from .fix_policy import WritePolicy
from .pg import Database

TABLES = "  - {table: public.accounts, stream: user}\n  - {table: public.typed, stream: user}\n"


class Audited:
    def __init__(self, db: Database, slot: str) -> None:
        self.db = db
        self.slot = slot

    def stream(self, status_interval: float = 10.0) -> ReplicationStream:
        options = StreamOptions(self.slot, "cdc_audit", status_interval=status_interval)
        return ReplicationStream(self.db.dsn, options)

    def confirmed_flush(self) -> int:
        text = self.db.scalar(
            "SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = %s",
            (self.slot,),
        )
        return parse_lsn(text)


@pytest.fixture
def audited(database: Database, write_policy: WritePolicy) -> Audited:
    database.execute(
        "CREATE TABLE accounts (id int PRIMARY KEY, owner text, note text);"
        "CREATE TABLE typed (id int PRIMARY KEY, at timestamptz, f float8, d interval, b bytea);"
        "CREATE TABLE scratch (id int)"
    )
    result = installer.apply(database.dsn, load_policy(write_policy(TABLES)))
    return Audited(database, result.slot)


def read_transactions(
    stream: ReplicationStream, count: int, timeout: float = 5.0
) -> list[StreamItem]:
    """Read until `count` Commits have arrived (fails after `timeout` seconds)."""
    deadline = time.monotonic() + timeout
    items: list[StreamItem] = []
    while sum(isinstance(i.message, Commit) for i in items) < count:
        assert time.monotonic() < deadline, f"only {items} arrived"
        items += stream.read(0.2)
    return items


def audited_messages(items: list[StreamItem]) -> list[PgOutputMessage]:
    """The messages, without logical messages of other prefixes (those of every transaction
    arrive whatever the publication)."""
    return [
        i.message
        for i in items
        if not (isinstance(i.message, LogicalMessage) and i.message.prefix != "cdc_audit.ctx")
    ]


def test_committed_changes_stream_in_commit_order_with_context(audited: Audited) -> None:
    db = audited.db
    with audited.stream() as stream:
        with db.connect() as conn:
            with conn.transaction():
                conn.execute("SELECT cdc_audit.set_context(actor_id => 'u1', reason => 'r 1')")
                conn.execute("INSERT INTO accounts VALUES (1, 'ann', 'x'), (2, 'bob', 'y')")
                conn.execute("UPDATE accounts SET note = 'z' WHERE id = 1")
                conn.execute("DELETE FROM accounts WHERE id = 2")
            with conn.transaction(force_rollback=True):
                conn.execute("SELECT cdc_audit.set_context(actor_id => 'ghost')")
                conn.execute("INSERT INTO accounts VALUES (3, 'ghost', 'never')")
            with conn.transaction():
                conn.execute("SELECT cdc_audit.set_context(actor_id => 'u2')")
                conn.execute("TRUNCATE accounts")
        messages = audited_messages(read_transactions(stream, 2))
        assert stream.idle_confirmable() == stream.server_wal_end

    kinds = [type(m) for m in messages]
    assert kinds == [
        Begin,
        LogicalMessage,
        Relation,
        Insert,
        Insert,
        Update,
        Delete,
        Commit,
        Begin,
        LogicalMessage,
        # TRUNCATE gives the table a new relfilenode; the relcache invalidation makes pgoutput
        # announce the relation again: a Relation can come at any time, not only once.
        Relation,
        Truncate,
        Commit,
    ]
    contexts = [
        context_fields(json.loads(m.content)) for m in messages if isinstance(m, LogicalMessage)
    ]
    assert [c["actor_id"] for c in contexts] == ["u1", "u2"]
    assert all(m.transactional for m in messages if isinstance(m, LogicalMessage))
    relation = messages[2]
    assert isinstance(relation, Relation)
    assert (relation.namespace, relation.name) == ("public", "accounts")
    assert relation.column_names == ("id", "owner", "note")
    rows = [m for m in messages if isinstance(m, Insert | Update | Delete)]
    assert [r.new for r in rows if isinstance(r, Insert)] == [["1", "ann", "x"], ["2", "bob", "y"]]
    update, delete = rows[2], rows[3]
    assert isinstance(update, Update) and update.new == ["1", "ann", "z"]
    assert isinstance(delete, Delete) and delete.old[0] == "2"
    truncate = messages[11]
    assert isinstance(truncate, Truncate) and truncate.relation_oids == (relation.oid,)
    first, second = (m for m in messages if isinstance(m, Commit))
    assert first.end_lsn <= second.commit_lsn


def test_pinned_settings_beat_database_defaults(audited: Audited) -> None:
    db = audited.db
    db.execute(
        f"ALTER DATABASE \"{db.name}\" SET timezone = 'America/New_York';"
        f"ALTER DATABASE \"{db.name}\" SET datestyle = 'SQL, DMY';"
        f"ALTER DATABASE \"{db.name}\" SET intervalstyle = 'postgres_verbose';"
        f'ALTER DATABASE "{db.name}" SET extra_float_digits = 0;'
        f"ALTER DATABASE \"{db.name}\" SET bytea_output = 'escape'"
    )
    assert db.scalar("SHOW timezone") == "America/New_York"  # a new session gets the defaults
    with audited.stream() as stream:
        db.execute(
            "INSERT INTO typed VALUES (1, '2024-01-02 03:04:05.25+00',"
            " 0.1::float8 + 0.2::float8, '1 day 2 hours', '\\x0102')"
        )
        inserts = [i.message for i in read_transactions(stream, 1) if isinstance(i.message, Insert)]
    assert inserts[0].new == [
        "1",
        "2024-01-02 03:04:05.25+00",
        "0.30000000000000004",
        "P1DT2H",
        "\\x0102",
    ]


def test_reopen_delivers_only_what_was_not_confirmed(audited: Audited) -> None:
    db = audited.db
    with audited.stream() as stream:
        db.execute("INSERT INTO accounts VALUES (1, 'a', 'first')")
        db.execute("INSERT INTO accounts VALUES (2, 'b', 'second')")
        first, _ = (
            i.message for i in read_transactions(stream, 2) if isinstance(i.message, Commit)
        )
        assert isinstance(first, Commit)
        stream.confirm(first.end_lsn)
        stream.confirm(first.commit_lsn)  # never moves backwards
        assert stream.confirmed_lsn == first.end_lsn
    assert audited.confirmed_flush() == first.end_lsn

    with audited.stream() as stream:
        again = [i.message for i in read_transactions(stream, 1)]
        assert not stream.read(0.3)
    inserts = [m.new for m in again if isinstance(m, Insert)]
    assert inserts == [["2", "b", "second"]]


def test_read_times_out_and_idle_position_is_confirmed(audited: Audited) -> None:
    db = audited.db
    with audited.stream(status_interval=0.5) as stream:
        started = time.monotonic()
        assert stream.read(0.4) == []
        assert 0.35 <= time.monotonic() - started < 1.5

        # WAL that carries nothing published: the slot must still be able to move past it.
        before = audited.confirmed_flush()
        db.execute("INSERT INTO scratch SELECT generate_series(1, 100)")
        target = db.scalar("SELECT pg_current_wal_lsn()::text")
        deadline = time.monotonic() + 5
        while stream.server_wal_end < parse_lsn(target):
            assert time.monotonic() < deadline, "no keepalive reported the WAL end"
            assert stream.read(0.6) == []
        idle = stream.idle_confirmable()
        assert idle is not None and idle > before
        stream.confirm(idle)
        stream.read(0.7)  # longer than status_interval: a status update goes out
        assert audited.confirmed_flush() == idle


def test_open_transaction_is_not_idle(audited: Audited) -> None:
    with audited.stream() as stream:
        audited.db.execute("INSERT INTO accounts VALUES (1, 'a', 'b')")
        items = stream.read(5.0, max_items=1)
        assert [type(i.message) for i in items] == [Begin]
        assert stream.idle_confirmable() is None
        read_transactions(stream, 1)
        assert stream.idle_confirmable() is not None


def test_missing_slot_raises_slot_lost(database: Database) -> None:
    stream = ReplicationStream(database.dsn, StreamOptions(slot="no_such_slot", publication="p"))
    with pytest.raises(SlotLost, match="replication slot no_such_slot does not exist"):
        stream.open()
    stream.close()  # harmless after a failed open


def test_terminated_walsender_raises_replication_error(audited: Audited) -> None:
    with audited.stream() as stream:
        audited.db.execute(
            "SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots"
            " WHERE slot_name = %s",
            (audited.slot,),
        )
        with pytest.raises(ReplicationError, match="terminat"):
            stream.read(5.0)
