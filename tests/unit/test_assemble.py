"""Transaction assembly: context per stream, policy filtering, app/DDL events, ordinals."""

from __future__ import annotations

import itertools
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cdc_audit.assemble import AssemblyError, TransactionAssembler
from cdc_audit.chain import DraftEvent
from cdc_audit.pgoutput import (
    Begin,
    Column,
    Commit,
    Delete,
    Insert,
    LogicalMessage,
    Origin,
    PgOutputMessage,
    Relation,
    Truncate,
    TupleValue,
    TypeMessage,
    Update,
    datetime_to_pg_timestamp,
)
from cdc_audit.policy import Policy

INT4, TEXT, TIMESTAMPTZ = 23, 25, 1184
COMMIT_TIME = datetime(2024, 5, 1, 12, 0, 0, 123456, tzinfo=UTC)
WALL_TIME = datetime(2024, 5, 1, 12, 30, tzinfo=UTC)

ACCOUNTS = Relation(
    100,
    "public",
    "accounts",
    "f",
    (
        Column(1, "id", INT4, -1),
        Column(1, "email", TEXT, -1),
        Column(1, "updated_at", TIMESTAMPTZ, -1),
        Column(1, "note", TEXT, -1),
    ),
)
ROLES = Relation(
    200, "public", "roles", "d", (Column(1, "id", INT4, -1), Column(0, "note", TEXT, -1))
)
OTHER = Relation(
    300, "public", "other", "d", (Column(1, "id", INT4, -1), Column(0, "note", TEXT, -1))
)


def make_policy(schema: str = "cdc_audit", ddl: bool = True) -> Policy:
    data: dict[str, object] = {
        "version": 1,
        "schema": schema,
        "streams": {"user": {}, "admin": {"require": ["actor_id", "reason"]}},
        "tables": [
            {
                "table": "public.accounts",
                "stream": "user",
                "exclude": ["updated_at"],
                "redact": {"email": "hash"},
            },
            {"table": "public.roles", "stream": "admin", "operations": ["insert", "update"]},
        ],
        "app_events": {"stream": "user"},
    }
    if ddl:
        data["ddl"] = {"stream": "admin"}
    return Policy.model_validate(data)


def assembler(policy: Policy | None = None) -> TransactionAssembler:
    ids = (uuid.UUID(int=i) for i in itertools.count(1))
    return TransactionAssembler(
        policy or make_policy(),
        b"secret",
        key_columns=lambda schema, table: ["id"] if table == "accounts" else None,
        clock=lambda: WALL_TIME,
        new_id=lambda: next(ids),
    )


def begin(xid: int = 7, lsn: int = 0x1_0000_0100) -> Begin:
    return Begin(lsn, datetime_to_pg_timestamp(COMMIT_TIME), xid)


def commit(lsn: int = 0x1_0000_0100) -> Commit:
    return Commit(0, lsn, lsn + 0x30, datetime_to_pg_timestamp(COMMIT_TIME))


def message(
    prefix: str, content: object, transactional: bool = True, lsn: int = 0x50
) -> LogicalMessage:
    return LogicalMessage(transactional, lsn, prefix, orjson.dumps(content))


def ctx(stream: str = "user", missing: list[str] | None = None, **fields: object) -> LogicalMessage:
    """A context message as capture_context emits it (version 2)."""
    said = {
        "actor_id": "u42",
        "reason": "ticket 7",
        "actor_role": "support",
        "extra": {"approval": "A-1"},
        **fields,
    }
    content = {
        "v": 2,
        "stream": stream,
        "generation": "1",
        "missing": missing or [],
        "db": {"session_user": "app", "xid": "7"},
        "ctx": said,
    }
    return message("cdc_audit.ctx", content)


def ctx_v1(
    stream: str = "user", missing: list[str] | None = None, **fields: object
) -> LogicalMessage:
    """A context message of version 1 (flat), as a slot may still hold after an upgrade."""
    content = {
        "actor_id": "u42",
        "reason": "ticket 7",
        "actor_role": "support",
        "extra": {"approval": "A-1"},
        **fields,
        "v": 1,
        "stream": stream,
        "generation": "1",
        "missing": missing or [],
        "db": {"session_user": "app", "xid": "7"},
    }
    return message("cdc_audit.ctx", content)


def account(id: int, note: str = "n", updated: str = "2024-05-01 00:00:00+00") -> list[TupleValue]:
    return [str(id), f"u{id}@example.com", updated, note]


def feed(asm: TransactionAssembler, *messages: PgOutputMessage) -> list[DraftEvent]:
    return [draft for m in messages for draft in asm.feed(m)]


def in_txn(asm: TransactionAssembler, *messages: PgOutputMessage) -> list[DraftEvent]:
    return feed(asm, begin(), ACCOUNTS, ROLES, OTHER, *messages, commit())


# ---- row changes and context -------------------------------------------------------------------


def test_insert_carries_commit_facts_and_context() -> None:
    [draft] = in_txn(assembler(), ctx(), Insert(100, account(1)))
    assert draft.stream == "user"
    assert draft.kind == "insert"
    assert draft.commit_lsn == 0x1_0000_0100
    assert draft.commit_time == COMMIT_TIME
    assert draft.xid == 7
    assert (draft.schema_name, draft.table_name) == ("public", "accounts")
    assert draft.row_key == {"id": 1}
    assert draft.new is not None and "updated_at" not in draft.new
    assert str(draft.new["email"]).startswith("hmac-sha256:")
    assert draft.actor_id == "u42"
    assert draft.reason == "ticket 7"
    assert draft.context == {
        "actor_role": "support",
        "extra": {"approval": "A-1"},
        "missing": [],
        "db": {"session_user": "app", "xid": "7"},
    }
    assert draft.context_missing is False
    assert draft.ordinal == 0


def test_context_messages_of_both_versions_give_the_same_event() -> None:
    # A slot may still hold version 1 messages when an upgraded worker starts reading it.
    [v1] = in_txn(assembler(), ctx_v1(), Insert(100, account(1)))
    [v2] = in_txn(assembler(), ctx(), Insert(100, account(1)))
    assert (v1.actor_id, v1.reason, v1.context) == (v2.actor_id, v2.reason, v2.context)


def test_the_triggers_facts_win_over_what_the_application_claims() -> None:
    claimed = {"session_user": "someone-else"}
    [draft] = in_txn(assembler(), ctx(db=claimed, missing_fields="x"), Insert(100, account(1)))
    assert draft.context is not None
    assert draft.context["db"] == {"session_user": "app", "xid": "7"}
    assert draft.context["missing_fields"] == "x"


def test_context_is_attached_per_stream() -> None:
    drafts = in_txn(assembler(), ctx("user"), Insert(200, ["1", "r"]), Insert(100, account(1)))
    roles, accounts = drafts
    assert roles.stream == "admin"
    assert roles.context_missing is True
    assert roles.actor_id is None and roles.context is None
    assert accounts.stream == "user"
    assert accounts.context_missing is False
    assert accounts.actor_id == "u42"


def test_context_with_missing_fields_is_flagged_but_kept() -> None:
    [draft] = in_txn(
        assembler(), ctx("admin", missing=["reason"], reason=None), Insert(200, ["1", "r"])
    )
    assert draft.context_missing is True
    assert draft.actor_id == "u42"
    assert draft.reason is None
    assert draft.context is not None and draft.context["missing"] == ["reason"]


def test_latest_context_of_the_stream_wins() -> None:
    drafts = in_txn(
        assembler(),
        ctx(actor_id="first"),
        Insert(100, account(1)),
        ctx(actor_id="second"),
        Insert(100, account(2)),
    )
    assert [d.actor_id for d in drafts] == ["first", "second"]


def test_context_does_not_leak_into_the_next_transaction() -> None:
    asm = assembler()
    in_txn(asm, ctx(), Insert(100, account(1)))
    [draft] = in_txn(asm, Insert(100, account(2)))
    assert draft.context_missing is True
    assert draft.actor_id is None


def test_malformed_context_does_not_stop_the_stream() -> None:
    bad = LogicalMessage(True, 1, "cdc_audit.ctx", b"\xff not json")
    [draft] = in_txn(assembler(), bad, Insert(100, account(1)))
    assert draft.context_missing is True


def test_update_delete_and_changed() -> None:
    drafts = in_txn(
        assembler(),
        Update(100, "O", account(1, "a"), account(1, "b")),
        Delete(100, "O", account(1, "b")),
    )
    update, delete = drafts
    assert update.kind == "update"
    assert update.changed == ("note",)
    assert update.old is not None and update.old["note"] == "a"
    assert update.new is not None and update.new["note"] == "b"
    assert delete.kind == "delete"
    assert delete.new is None
    assert delete.row_key == {"id": 1}
    assert [d.ordinal for d in drafts] == [0, 1]


def test_update_of_only_excluded_columns_is_dropped() -> None:
    old, new = (
        account(1, updated="2024-01-01 00:00:00+00"),
        account(1, updated="2024-02-01 00:00:00+00"),
    )
    assert in_txn(assembler(), Update(100, "O", old, new)) == []


def test_unaudited_tables_and_operations_are_skipped() -> None:
    drafts = in_txn(
        assembler(),
        Insert(300, ["1", "x"]),
        Delete(200, "K", ["1", None]),  # roles audits insert and update only
        Insert(200, ["2", "y"]),
        Update(300, None, None, ["1", "z"]),
        Insert(100, account(3)),
    )
    assert [(d.table_name, d.kind, d.ordinal) for d in drafts] == [
        ("roles", "insert", 0),
        ("accounts", "insert", 1),
    ]


def test_truncate_makes_one_event_per_audited_relation() -> None:
    drafts = in_txn(assembler(), Truncate(3, (100, 200, 300)))
    [draft] = drafts
    assert (draft.kind, draft.table_name, draft.stream) == ("truncate", "accounts", "user")
    assert draft.new == {"cascade": True, "restart_identity": True}
    assert draft.row_key is None


def test_relation_change_rebuilds_the_column_policy() -> None:
    asm = assembler()
    in_txn(asm, Insert(100, account(1)))
    altered = Relation(
        100, "public", "accounts", "f", (*ACCOUNTS.columns, Column(1, "extra", INT4, -1))
    )
    renamed = Relation(
        100,
        "public",
        "accounts",
        "f",
        (ACCOUNTS.columns[0], Column(1, "mail", TEXT, -1), *ACCOUNTS.columns[2:]),
    )
    drafts = feed(
        asm,
        begin(8),
        altered,
        Insert(100, [*account(2), "5"]),
        renamed,
        Insert(100, account(3)),
        commit(),
    )
    assert drafts[0].new is not None and drafts[0].new["extra"] == 5
    assert drafts[1].new is not None
    assert drafts[1].new["mail"] == "u3@example.com"  # no longer the hashed 'email'
    assert "email" not in drafts[1].new


def test_origin_and_type_messages_are_ignored() -> None:
    drafts = in_txn(
        assembler(), Origin(1, "node"), TypeMessage(9, "public", "mood"), Insert(100, account(1))
    )
    assert len(drafts) == 1


# ---- application and DDL events ----------------------------------------------------------------

APP = {
    "actor_id": "u42",
    "session_id": "s1",
    "v": 1,
    "stream": "user",
    "action": "auth.login.failed",
    "resource": "web",
    "outcome": "failure",
    "details": {"attempt": 3},
    "durable": False,
    "db": {"session_user": "app"},
}


def test_transactional_app_event_is_part_of_its_transaction() -> None:
    drafts = in_txn(assembler(), Insert(100, account(1)), message("cdc_audit.app", APP))
    app = drafts[1]
    assert app.kind == "app"
    assert app.stream == "user"
    assert app.new == {
        "action": "auth.login.failed",
        "resource": "web",
        "outcome": "failure",
        "details": {"attempt": 3},
    }
    assert app.actor_id == "u42"
    assert app.context == {"session_id": "s1", "durable": False, "db": {"session_user": "app"}}
    assert app.context_missing is False
    assert (app.commit_lsn, app.commit_time, app.xid, app.ordinal) == (
        0x1_0000_0100,
        COMMIT_TIME,
        7,
        1,
    )


def test_durable_app_event_outside_a_transaction_uses_its_lsn_and_wall_time() -> None:
    content = {**APP, "actor_id": None, "durable": True}
    [app] = feed(
        assembler(), message("cdc_audit.app", content, transactional=False, lsn=0x2_0000_0010)
    )
    assert app.commit_lsn == 0x2_0000_0010
    assert app.commit_time == WALL_TIME
    assert app.xid is None
    assert app.ordinal == 0
    assert app.context_missing is True  # the user stream requires actor_id


def test_ddl_goes_to_the_ddl_stream_with_its_requirements() -> None:
    content = {
        "actor_id": "dba",
        "v": 1,
        "command_tag": "ALTER TABLE",
        "objects": [{"object_identity": "public.accounts"}],
        "statement": "alter table accounts add column x int",
        "db": {"session_user": "dba"},
    }
    [ddl] = in_txn(assembler(), message("cdc_audit.ddl", content))
    assert (ddl.kind, ddl.stream) == ("ddl", "admin")
    assert ddl.new == {
        "command_tag": "ALTER TABLE",
        "objects": [{"object_identity": "public.accounts"}],
        "statement": "alter table accounts add column x int",
    }
    assert ddl.actor_id == "dba"
    assert ddl.context == {"db": {"session_user": "dba"}}
    assert ddl.context_missing is True  # admin requires a reason too
    [with_reason] = in_txn(
        assembler(), message("cdc_audit.ddl", {**content, "reason": "migration 12"})
    )
    assert with_reason.context_missing is False


def test_ddl_without_a_ddl_stream_is_not_recorded() -> None:
    asm = assembler(make_policy(ddl=False))
    assert in_txn(asm, message("cdc_audit.ddl", {"command_tag": "CREATE TABLE"})) == []


def test_prefixes_come_from_the_policy_schema() -> None:
    asm = assembler(make_policy(schema="audit"))
    drafts = in_txn(
        asm,
        message("cdc_audit.app", APP),
        message("audit.ctxx", {}),
        message("other.ctx", {"stream": "user", "actor_id": "forged"}),
        Insert(100, account(1)),
        message("audit.app", APP),
    )
    assert [d.kind for d in drafts] == ["insert", "app"]
    assert drafts[0].actor_id is None


# ---- protocol order ----------------------------------------------------------------------------


def test_out_of_order_messages_are_refused() -> None:
    asm = assembler()
    with pytest.raises(AssemblyError, match="outside a transaction"):
        asm.feed(Insert(100, account(1)))
    with pytest.raises(AssemblyError, match="Commit without Begin"):
        asm.feed(commit())
    asm.feed(begin())
    assert asm.in_transaction
    with pytest.raises(AssemblyError, match="inside"):
        asm.feed(begin(8))
    with pytest.raises(AssemblyError, match="before its Relation"):
        asm.feed(Insert(999, ["1"]))


# ---- arbitrary sequences of transactions -------------------------------------------------------


@dataclass(frozen=True)
class Op:
    kind: str  # insert, update, delete, truncate, ctx, app
    table: int  # relation OID


OPS = st.builds(
    Op,
    st.sampled_from(["insert", "update", "delete", "truncate", "ctx", "app"]),
    st.sampled_from([100, 200, 300]),
)
UNITS = st.lists(
    st.one_of(st.lists(OPS, max_size=12), st.just("durable_app")),
    max_size=8,
)
AUDITED = {100: {"insert", "update", "delete", "truncate"}, 200: {"insert", "update"}}


def _tag(draft: DraftEvent) -> str:
    if draft.kind == "app":
        assert draft.new is not None
        details = draft.new["details"]
        assert isinstance(details, dict)
        return str(details["tag"])
    if draft.kind == "truncate":
        return f"truncate:{draft.xid}:{draft.table_name}"
    row = draft.new if draft.new is not None else draft.old
    assert row is not None
    return str(row["note"])


def _build(
    units: list[list[Op] | str],
) -> tuple[list[PgOutputMessage], list[str], list[int | None]]:
    """Messages for `units`, the tags of the events they must produce and each event's xid."""
    messages: list[PgOutputMessage] = []
    tags: list[str] = []
    xids: list[int | None] = []
    tag = itertools.count()
    for xid, unit in enumerate(units, start=1):
        if isinstance(unit, str):
            t = f"t{next(tag)}"
            messages.append(
                message("cdc_audit.app", {**APP, "details": {"tag": t}}, transactional=False)
            )
            tags.append(t)
            xids.append(None)
            continue
        messages += [begin(xid), ACCOUNTS, ROLES, OTHER]
        for op in unit:
            t = f"t{next(tag)}"
            audited = op.kind in AUDITED.get(op.table, set())
            width = 4 if op.table == 100 else 2
            row: list[TupleValue] = ["1", *[None] * (width - 2), t]
            if op.kind == "insert":
                messages.append(Insert(op.table, row))
            elif op.kind == "update":
                old: list[TupleValue] = ["1", *[None] * (width - 2), "old"]
                messages.append(Update(op.table, "O", old, row))
            elif op.kind == "delete":
                messages.append(Delete(op.table, "O", row))
            elif op.kind == "truncate":
                messages.append(Truncate(0, (op.table,)))
                t = f"truncate:{xid}:{ {100: 'accounts', 200: 'roles', 300: 'other'}[op.table] }"
            elif op.kind == "ctx":
                messages.append(ctx("user" if op.table == 100 else "admin"))
            else:
                messages.append(message("cdc_audit.app", {**APP, "details": {"tag": t}}))
                audited = True
            if audited:
                tags.append(t)
                xids.append(xid)
        messages.append(commit())
    return messages, tags, xids


@settings(max_examples=150, deadline=None)
@given(UNITS)
def test_events_come_out_in_feed_order_with_contiguous_ordinals(
    units: list[list[Op] | str],
) -> None:
    messages, tags, xids = _build(units)
    drafts = feed(assembler(), *messages)
    assert [_tag(d) for d in drafts] == tags
    assert [d.xid for d in drafts] == xids
    for xid, group in itertools.groupby(drafts, key=lambda d: d.xid):
        ordinals = [d.ordinal for d in group]
        assert ordinals == (list(range(len(ordinals))) if xid is not None else [0] * len(ordinals))
