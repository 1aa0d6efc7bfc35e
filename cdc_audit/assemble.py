"""Turning decoded pgoutput messages into draft events, one message at a time.

`TransactionAssembler.feed` takes the messages of the replication stream in order and returns
the drafts each one produces, at once: nothing of a transaction is buffered, so memory stays
bounded whatever its size. That works because Begin already carries what every event of the
transaction needs from the commit: its LSN (``final_lsn``), time and xid.

What it keeps between messages: the relations (with a `RowShaper` per audited table, rebuilt
whenever a new Relation message announces a changed shape) and, inside a transaction, the
latest context message of each stream. The context trigger emits one context message per
stream (its first argument), so a change on stream S takes S's latest context; a change on S
with none is recorded with ``context_missing`` — never attached to another stream's context,
which may have been checked against other requirements.

Logical messages of every transaction arrive whatever the publication, so only the policy
schema's prefixes (``<schema>.ctx``, ``<schema>.app``, ``<schema>.ddl``) are read.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Final

from cdc_audit.canonical import JsonValue
from cdc_audit.chain import DraftEvent, Uuid7Generator
from cdc_audit.columns import RowShaper, ShapedChange
from cdc_audit.context import CONTEXT_FIELDS
from cdc_audit.errors import CdcAuditError
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
    pg_timestamp_to_datetime,
)
from cdc_audit.policy import Policy, TablePolicy
from cdc_audit.records import record
from cdc_audit.values import parse_json_exact

__all__ = ["AssemblyError", "KeyColumns", "TransactionAssembler", "context_fields"]

JsonObject = dict[str, JsonValue]

KeyColumns = Callable[[str, str], Sequence[str] | None]
"""(schema, table) -> the primary key columns from the catalog, or None to use the relation's
replica identity flags."""

# Keys of context messages that describe the message, not the transaction's actor.
_BOOKKEEPING: Final = frozenset({"v", "generation", "stream"})
# Keys of an erasure message that say what was erased and why (stored in `new`).
_ERASURE_FIELDS: Final = ("event_id", "stream", "seq", "schema_name", "table_name", "why")
# Keys of an app event that are the event itself (stored in `new`).
_APP_FIELDS: Final = ("action", "resource", "outcome", "details")
# Keys of app and DDL messages that describe who acted and how (stored in `context`): what
# log_event and the DDL triggers copy from the session context and the database, and whether
# an app event was emitted to survive a rollback.
_CONTEXT_KEYS: Final = frozenset({*CONTEXT_FIELDS, "extra", "db", "durable"})


class AssemblyError(CdcAuditError):
    """Messages out of protocol order (a change outside a transaction, an unknown relation)."""


@record
class _Context:
    """One context, split into the event fields it fills."""

    actor_id: str | None
    reason: str | None
    context: JsonObject | None
    missing: bool


_NO_CONTEXT: Final = _Context(None, None, None, True)


@dataclass(slots=True)
class _Transaction:
    lsn: int
    time: datetime
    xid: int
    ordinal: int
    contexts: dict[str, _Context]


@dataclass(frozen=True, slots=True)
class _Audited:
    policy: TablePolicy
    shaper: RowShaper


class TransactionAssembler:
    """Feeds on decoded messages in stream order, returns the draft events they make.

    `redaction_key` is the secret of `hash` redaction; `key_columns` gives the primary key
    of a table (see `KeyColumns`); `clock` is the wall time used as commit time of
    non-transactional app events, which have none; `new_id` makes event ids.
    """

    def __init__(
        self,
        policy: Policy,
        redaction_key: bytes | None = None,
        *,
        key_columns: KeyColumns | None = None,
        clock: Callable[[], datetime] | None = None,
        new_id: Callable[[], uuid.UUID] | None = None,
    ) -> None:
        self._redaction_key = redaction_key
        self._key_columns = key_columns
        self._clock = clock if clock is not None else _utc_now
        self._new_id = new_id if new_id is not None else Uuid7Generator()
        self._announced: dict[int, Relation] = {}
        self._relations: dict[int, _Audited | None] = {}
        self._txn: _Transaction | None = None
        self.set_policy(policy)

    @property
    def policy(self) -> Policy:
        return self._policy

    def set_policy(self, policy: Policy) -> None:
        """Seal what follows with `policy` (same schema), re-shaping the known relations.

        The server announces a relation once per session and again only when its shape
        changes, so the relations already seen are re-read under the new column rules.
        """
        self._policy = policy
        self._tables = {(t.table.schema, t.table.name): t for t in policy.tables}
        schema = policy.schema_name
        self._prefix_ctx = f"{schema}.ctx"
        self._prefix_app = f"{schema}.app"
        self._prefix_ddl = f"{schema}.ddl"
        self._prefix_erase = f"{schema}.erase"
        self._prefix_purge = f"{schema}.purge"
        self._prefix_privilege = f"{schema}.privilege"
        self._relations.clear()
        for relation in self._announced.values():
            self._relation(relation)

    @property
    def in_transaction(self) -> bool:
        """Whether a Begin has been fed without its Commit."""
        return self._txn is not None

    def feed(self, message: PgOutputMessage) -> list[DraftEvent]:
        """The drafts `message` produces, in order (often none, at most one per relation)."""
        if isinstance(message, Insert | Update | Delete):
            return self._change(message)
        if isinstance(message, LogicalMessage):
            return self._message(message)
        if isinstance(message, Begin):
            self._begin(message)
        elif isinstance(message, Commit):
            self._commit()
        elif isinstance(message, Relation):
            self._relation(message)
        elif isinstance(message, Truncate):
            return self._truncate(message)
        # Origin and Type messages carry nothing the trail records.
        return []

    # ---- transaction boundaries and relations

    def _begin(self, begin: Begin) -> None:
        if self._txn is not None:
            raise AssemblyError(f"Begin of xid {begin.xid} inside xid {self._txn.xid}")
        when = pg_timestamp_to_datetime(begin.commit_time)
        self._txn = _Transaction(begin.final_lsn, when, begin.xid, 0, {})

    def _commit(self) -> None:
        if self._txn is None:
            raise AssemblyError("Commit without Begin")
        self._txn = None

    def _relation(self, relation: Relation) -> None:
        self._announced[relation.oid] = relation
        table = self._tables.get((relation.namespace, relation.name))
        if table is None:
            self._relations[relation.oid] = None
            return
        keys = self._key_columns(relation.namespace, relation.name) if self._key_columns else None
        shaper = RowShaper(relation, table, self._redaction_key, keys)
        self._relations[relation.oid] = _Audited(table, shaper)

    def _audited(self, oid: int, operation: str) -> _Audited | None:
        if oid not in self._relations:
            raise AssemblyError(f"change for relation OID {oid} before its Relation message")
        audited = self._relations[oid]
        if audited is None or operation not in audited.policy.operations:
            return None
        return audited

    def _open(self, what: str) -> _Transaction:
        if self._txn is None:
            raise AssemblyError(f"{what} outside a transaction")
        return self._txn

    # ---- row changes

    def _change(self, message: Insert | Update | Delete) -> list[DraftEvent]:
        txn = self._open(type(message).__name__)
        if isinstance(message, Insert):
            kind = "insert"
            audited = self._audited(message.relation_oid, kind)
            if audited is None:
                return []
            shaped = audited.shaper.insert(message.new)
        elif isinstance(message, Update):
            kind = "update"
            audited = self._audited(message.relation_oid, kind)
            if audited is None:
                return []
            shaped = audited.shaper.update(message.old_kind, message.old, message.new)
            if shaped.only_excluded:
                return []  # nothing stored would show what changed
        else:
            kind = "delete"
            audited = self._audited(message.relation_oid, kind)
            if audited is None:
                return []
            shaped = audited.shaper.delete(message.old_kind, message.old)
        return [self._row_draft(txn, audited, kind, shaped)]

    def _row_draft(
        self, txn: _Transaction, audited: _Audited, kind: str, shaped: ShapedChange
    ) -> DraftEvent:
        stream = audited.policy.stream
        ctx = txn.contexts.get(stream, _NO_CONTEXT)
        table = audited.policy.table
        draft = DraftEvent(
            stream=stream,
            kind=kind,
            event_id=self._new_id(),
            commit_lsn=txn.lsn,
            commit_time=txn.time,
            xid=txn.xid,
            schema_name=table.schema,
            table_name=table.name,
            row_key=shaped.row_key,
            old=shaped.old,
            new=shaped.new,
            changed=shaped.changed,
            actor_id=ctx.actor_id,
            reason=ctx.reason,
            context=ctx.context,
            context_missing=ctx.missing,
            ordinal=txn.ordinal,
            unchanged_toast=shaped.unchanged_toast,
        )
        txn.ordinal += 1
        return draft

    def _truncate(self, message: Truncate) -> list[DraftEvent]:
        txn = self._open("Truncate")
        options: JsonObject = {
            "cascade": message.cascade,
            "restart_identity": message.restart_identity,
        }
        drafts = []
        for oid in message.relation_oids:
            audited = self._audited(oid, "truncate")
            if audited is not None:
                shaped = ShapedChange(None, None, dict(options))
                drafts.append(self._row_draft(txn, audited, "truncate", shaped))
        return drafts

    # ---- logical messages

    def _message(self, message: LogicalMessage) -> list[DraftEvent]:
        prefix = message.prefix
        if prefix == self._prefix_ctx:
            self._context_message(message)
            return []
        if prefix == self._prefix_app:
            content = _content(message)
            stream = content.get("stream")
            if not isinstance(stream, str):
                if self._policy.app_events is None:
                    return []
                stream = self._policy.app_events.stream
            new = {key: content.get(key) for key in _APP_FIELDS}
            return [self._message_draft(message, "app", stream, content, new)]
        if prefix == self._prefix_erase:
            return [self._erasure(message)]
        if prefix == self._prefix_purge:
            return self._purge(message)
        if prefix == self._prefix_privilege:
            return [self._administrative(message)]
        if prefix == self._prefix_ddl:
            if self._policy.ddl is None:
                return []
            content = _content(message)
            new = {k: v for k, v in content.items() if k not in _CONTEXT_KEYS | _BOOKKEEPING}
            return [self._message_draft(message, "ddl", self._policy.ddl.stream, content, new)]
        return []

    def _erasure(self, message: LogicalMessage) -> DraftEvent:
        """An erase_event call: recorded in the DDL stream (administrative acts), else in the
        erased event's own stream."""
        content = _content(message)
        stream = self._policy.ddl.stream if self._policy.ddl is not None else None
        if stream is None:
            named = content.get("stream")
            stream = named if isinstance(named, str) else next(iter(self._policy.streams))
        new = {k: content.get(k) for k in _ERASURE_FIELDS}
        return self._message_draft(message, "erasure", stream, content, new)

    def _purge(self, message: LogicalMessage) -> list[DraftEvent]:
        """A purge about to drop sealed events: recorded in the purged stream itself, so the
        record is chained and signed with what remains (see `cdc_audit.purge`)."""
        content = _content(message)
        stream = content.get("stream")
        if not isinstance(stream, str) or stream not in self._policy.streams:
            return []
        new = {k: v for k, v in content.items() if k not in _CONTEXT_KEYS | _BOOKKEEPING}
        return [self._message_draft(message, "purge", stream, content, new)]

    def _administrative(self, message: LogicalMessage) -> DraftEvent:
        """An administrative fact the jobs observed (a privilege change, drift from the
        policy): in the DDL stream, else in the first stream of the policy."""
        content = _content(message)
        kind = "drift" if content.get("kind") == "drift" else "privilege"
        stream = (
            self._policy.ddl.stream
            if self._policy.ddl is not None
            else next(iter(self._policy.streams))
        )
        skip = _CONTEXT_KEYS | _BOOKKEEPING | {"kind"}
        new = {k: v for k, v in content.items() if k not in skip}
        return self._message_draft(message, kind, stream, content, new)

    def _context_message(self, message: LogicalMessage) -> None:
        # A context outside a transaction has no changes to attach to.
        if self._txn is None or not message.transactional:
            return
        content = _content(message)
        stream = content.get("stream")
        if not isinstance(stream, str):
            return  # not from the context trigger, which always names its stream
        rest = context_fields(content)
        actor_id = _take_text(rest, "actor_id")
        reason = _take_text(rest, "reason")
        missing = bool(rest.get("missing"))
        self._txn.contexts[stream] = _Context(actor_id, reason, rest, missing)

    def _message_draft(
        self,
        message: LogicalMessage,
        kind: str,
        stream: str,
        content: JsonObject,
        new: JsonObject,
    ) -> DraftEvent:
        rest = {k: v for k, v in content.items() if k in _CONTEXT_KEYS}
        actor_id = _take_text(rest, "actor_id")
        reason = _take_text(rest, "reason")
        txn = self._txn if message.transactional else None
        if txn is None:
            # Non-transactional: it has no commit, so its own LSN and the time it was read.
            lsn, when, xid, ordinal = message.lsn, self._clock(), None, 0
        else:
            lsn, when, xid, ordinal = txn.lsn, txn.time, txn.xid, txn.ordinal
            txn.ordinal += 1
        return DraftEvent(
            stream=stream,
            kind=kind,
            event_id=self._new_id(),
            commit_lsn=lsn,
            commit_time=when,
            xid=xid,
            new=new,
            actor_id=actor_id,
            reason=reason,
            context=rest,
            context_missing=self._lacks_required(stream, content),
            ordinal=ordinal,
        )

    def _lacks_required(self, stream: str, content: JsonObject) -> bool:
        """Whether app/DDL content misses a context field the stream requires."""
        if stream in self._policy.streams:
            required, _ = self._policy.requirements(stream)
        else:
            required = list(self._policy.context.require)
        return any(content.get(name) in (None, "") for name in required)


def context_fields(content: JsonObject) -> JsonObject:
    """What a context message says about the transaction: what the application said, with the
    trigger's `missing` and `db` beside it, without the message's bookkeeping.

    Version 2 nests what the application said under "ctx"; version 1 (which a slot may still
    hold after an upgrade) has it at the top level. The trigger's own keys win over the
    application's, as they did in version 1.
    """
    if content.get("v") == 2:
        said = content.get("ctx")
        fields = dict(said) if isinstance(said, dict) else {}
        for key in ("missing", "db"):
            if key in content:
                fields[key] = content[key]
        return fields
    return {k: v for k, v in content.items() if k not in _BOOKKEEPING}


def _content(message: LogicalMessage) -> JsonObject:
    """A message's JSON object; anything else is kept as text rather than lost."""
    text = message.content.decode("utf-8", errors="replace")
    value = parse_json_exact(text)
    if isinstance(value, dict):
        return value
    return {"unparsed": text}


def _take_text(fields: JsonObject, key: str) -> str | None:
    """Pop a text field out of `fields`; a non-text value stays where it was."""
    value = fields.get(key)
    if value is None or isinstance(value, str):
        fields.pop(key, None)
        return value
    return None


def _utc_now() -> datetime:
    return datetime.now(UTC)
