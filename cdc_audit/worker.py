"""The worker: tails the slot, seals every committed change once, in commit order.

One session of the worker:

1. connects, and becomes the active worker of the slot by taking a session advisory lock on
   the connection that writes the trail (a second worker waits as a standby and takes over
   when the first one's connection ends: the lock is tied to the very connection that could
   write, so two workers never write at once);
2. reads its progress and the policy in force there, and starts streaming at that position;
3. feeds the messages to the assembler, seals the drafts into their stream's chain, and after
   each read writes the batch and the progress in one transaction (`TrailWriter.write`);
4. only then confirms to the server the end LSN of the last whole transaction written.

Resuming is exactly-once: a transaction whose commit LSN is below the stored end LSN was
sealed whole and is skipped; inside the transaction recorded as partly sealed, the drafts
with an ordinal below the stored count are skipped; a non-transactional message below the
stored end LSN is skipped. Any connection failure ends the session and a new one starts from
what the trail holds, after a backoff.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from types import FrameType
from typing import Final

import psycopg
from psycopg import sql
from psycopg.rows import TupleRow

from cdc_audit import keys
from cdc_audit.assemble import TransactionAssembler
from cdc_audit.canonical import JsonValue
from cdc_audit.chain import DraftEvent, SealedEvent, StreamChain, Uuid7Generator
from cdc_audit.checkpointer import Checkpointer
from cdc_audit.checkpoints import Checkpoint, DirectoryAnchor
from cdc_audit.db import connect, database_error, with_keepalives
from cdc_audit.errors import CdcAuditError, DatabaseError, InvalidInput
from cdc_audit.health import WorkerHealth
from cdc_audit.job_context import JobContext
from cdc_audit.jobs import JobScheduler
from cdc_audit.keys import SigningKey
from cdc_audit.names import InstallNames
from cdc_audit.pgoutput import Begin, Commit, LogicalMessage, format_lsn, pg_timestamp_to_datetime
from cdc_audit.policy import Policy
from cdc_audit.replication import ReplicationError, ReplicationStream, SlotLost, StreamOptions
from cdc_audit.trail import (
    Progress,
    TrailWriter,
    install_names,
    slot_confirmed,
    worker_identity,
)

__all__ = ["Worker", "WorkerOptions", "install_signal_handlers"]

log = logging.getLogger("cdc_audit.worker")

_BACKOFF_MAX: Final = 30.0
_DRAIN_GIVE_UP: Final = 120.0
"""Seconds of failing sessions after which `--drain` gives up instead of retrying."""


@dataclass(frozen=True)
class WorkerOptions:
    schema: str = "cdc_audit"
    drain: bool = False
    """Seal everything committed before the worker started, then return."""
    batch_messages: int = 5000
    """Most replication messages read before a batch is written (bounds memory)."""
    read_timeout: float = 0.5
    heartbeat_seconds: float = 10.0
    """Commit a marker when the server's WAL moved but nothing was confirmed for this long."""
    status_interval: float = 10.0
    standby_poll: float = 1.0
    jobs_every_seconds: float | None = None
    """Run every scheduled job at this interval instead of its cron schedule."""
    log_interval: float = 10.0


class Worker:
    """Runs sessions until stopped, drained, or a gap is found. See the module docstring."""

    def __init__(
        self,
        dsn: str,
        options: WorkerOptions,
        redaction_key: bytes | None = None,
        stop: threading.Event | None = None,
        signing_key: SigningKey | None = None,
    ) -> None:
        self.dsn = dsn
        self.options = options
        self.redaction_key = redaction_key
        self.signing_key = signing_key
        self.stop = stop if stop is not None else threading.Event()
        self.sealed: Counter[str] = Counter()
        self.missing_context: Counter[str] = Counter()
        """Events sealed flagged `context_missing`, per stream (for metrics)."""
        self.health = WorkerHealth()
        self._failpoints = _Failpoints.from_environment()
        self.made_progress = False
        """Whether the current session confirmed anything (a later failure is a new outage)."""
        self._backends: list[tuple[int, datetime]] = []
        """(pid, backend_start) of the server backends of the last session that streamed."""
        self.jobs: JobScheduler | None = None
        self.active = False
        """Whether this worker holds the slot now (for metrics)."""

    def run(self) -> int:
        """Exit code 0 when stopped or drained; raises CdcAuditError on a fatal problem."""
        backoff = 0.5
        failing_since: float | None = None
        while not self.stop.is_set():
            self.health.beat()
            self.made_progress = False
            try:
                self._session()
                return 0
            except (ReplicationError, psycopg.OperationalError, DatabaseError) as exc:
                if isinstance(exc, SlotLost):
                    raise
                if self.made_progress:
                    # A session that made progress failed: a new outage, not more of the last.
                    backoff, failing_since = 0.5, None
                now = time.monotonic()
                failing_since = failing_since or now
                if self.options.drain and now - failing_since > _DRAIN_GIVE_UP:
                    raise CdcAuditError(f"worker gave up draining: {_first_line(exc)}") from exc
                _log(
                    logging.WARNING,
                    "session failed, retrying",
                    error=_first_line(exc),
                    retry_in=backoff,
                )
                self.stop.wait(backoff)
                backoff = min(backoff * 2, _BACKOFF_MAX)
            except psycopg.Error as exc:
                # Refused, not broken (a privilege, a missing object): retrying cannot help.
                raise database_error(exc, "sealing") from exc
        _log(logging.INFO, "stopped")
        return 0

    # ---- one session

    def _session(self) -> None:
        with _connect(self.dsn) as conn:
            self._end_stale_backends(conn)
            names = install_names(conn, self.options.schema)
            writer = TrailWriter(conn, names)
            target = writer.mark("drain") if self.options.drain else None
            if not self._lead(conn, names, target):
                return
            progress = writer.read_progress()
            policy_id, loaded = writer.load_policy(progress.policy_version_id)
            _require_redaction_key(loaded.policy, self.redaction_key)
            self._require_signing_key(conn, names, loaded.policy)
            stream = ReplicationStream(
                self.dsn,
                StreamOptions(
                    slot=names.slot,
                    publication=names.publication,
                    start_lsn=progress.end_lsn,
                    status_interval=self.options.status_interval,
                ),
            )
            try:
                stream.open()
            except SlotLost as exc:
                self._record_gap(writer, loaded.policy, progress, str(exc))
                raise
            self._backends = _own_backends(conn, names.slot)
            _log(
                logging.INFO,
                "streaming",
                slot=names.slot,
                start_lsn=format_lsn(progress.end_lsn),
                policy_version=policy_id,
                drain_target=_lsn_or_none(target),
            )
            jobs = None if self.options.drain else self._start_jobs(loaded.policy)
            self.health.start(progress.last_commit_time)
            self.active = True
            try:
                _Session(self, writer, stream, progress, policy_id, loaded.policy, target).run()
            finally:
                self.active = False
                self.health.stop()
                stream.close()
                if jobs is not None:
                    jobs.shutdown()

    def _end_stale_backends(self, conn: psycopg.Connection[TupleRow]) -> None:
        """End the server backends a failed session left behind. A connection that died
        silently keeps its backend on the server (until the server's TCP keepalive gives up,
        hours by default), holding the advisory lock, so that this worker would wait behind
        itself as a standby, and the slot."""
        backends, self._backends = self._backends, []
        if backends:
            conn.execute(
                "SELECT pg_catalog.pg_terminate_backend(a.pid) FROM pg_catalog.pg_stat_activity a"
                " JOIN unnest(%s::int[], %s::timestamptz[]) AS s(pid, started)"
                " ON a.pid = s.pid AND a.backend_start = s.started",
                ([pid for pid, _ in backends], [started for _, started in backends]),
            )
            conn.commit()

    def _start_jobs(self, policy: Policy) -> JobScheduler | None:
        """The policy's scheduled jobs, run while this worker is the active one."""
        context = JobContext(
            dsn=self.dsn,
            policy=policy,
            signing_key=self.signing_key,
            redaction_key=self.redaction_key,
            progress=lambda line: _log(logging.INFO, "job progress", detail=line),
        )
        jobs = JobScheduler(context, policy.jobs, every_seconds=self.options.jobs_every_seconds)
        if not jobs.scheduled:
            return None
        jobs.start()
        self.jobs = jobs
        _log(logging.INFO, "jobs scheduled", jobs=jobs.scheduled)
        return jobs

    def _require_signing_key(
        self, conn: psycopg.Connection[TupleRow], names: InstallNames, policy: Policy
    ) -> None:
        if self.signing_key is not None:
            keys.require_registered(conn, names.schema, self.signing_key)
            conn.commit()
            return
        every_row = [name for name, stream in policy.streams.items() if stream.sign == "every_row"]
        if every_row:
            raise InvalidInput(
                f"stream {every_row[0]} is signed every row: set CDC_AUDIT_SIGNING_KEY_FILE"
                " to the worker's private key (cdc-audit keygen makes one)"
            )
        _log(logging.WARNING, "no signing key: the trail is chained but no checkpoint is signed")

    def _lead(
        self, conn: psycopg.Connection[TupleRow], names: InstallNames, target: int | None
    ) -> bool:
        """Become the slot's active worker; False when stopped, or drained by the active one."""
        waiting = False
        while True:
            self.health.beat()
            row = conn.execute(
                "SELECT pg_try_advisory_lock(hashtextextended(%s, 0))",
                (f"cdc-audit worker {names.slot}",),
            ).fetchone()
            conn.commit()
            if row is not None and row[0]:
                if waiting:
                    _log(logging.INFO, "taking over as the active worker", slot=names.slot)
                return True
            if not waiting:
                _log(logging.INFO, "standby: another worker is active", slot=names.slot)
                waiting = True
            if target is not None and slot_confirmed(conn, names.slot) > target:
                _log(logging.INFO, "drained by the active worker", slot=names.slot)
                return False
            if self.stop.wait(self.options.standby_poll):
                return False

    def _record_gap(
        self, writer: TrailWriter, policy: Policy, progress: Progress, reason: str
    ) -> None:
        """A lost slot: one gap event in every stream (once per loss), then a loud error."""
        streams = sorted(set(policy.streams) | set(writer.trail_streams()))
        new_id = Uuid7Generator()
        now = datetime.now(UTC)
        details: dict[str, JsonValue] = {
            "slot": writer.names.slot,
            "reason": reason,
            "sealed_up_to": format_lsn(progress.end_lsn),
            "detected_by": worker_identity(),
        }
        events = []
        for stream in streams:
            if _last_is_same_gap(writer, stream, details):
                continue
            draft = DraftEvent(
                stream=stream,
                kind="gap",
                event_id=new_id(),
                commit_lsn=None,
                commit_time=now,
                xid=None,
                new=details,
            )
            events.append(writer.chain(stream).seal(draft))
        if events:
            events, checkpoints = self._sign_gap(writer, policy, events)
            writer.write(events, progress, checkpoints)
            anchor_dir = policy.checkpoints.anchor_dir
            if checkpoints and anchor_dir is not None:
                anchor = DirectoryAnchor(anchor_dir, writer.names.database, writer.names.schema)
                for checkpoint in checkpoints:
                    anchor.write(checkpoint)
        _log(
            logging.ERROR,
            "replication slot lost: gap recorded",
            slot=writer.names.slot,
            reason=reason,
            streams=[e.draft.stream for e in events],
        )

    def _sign_gap(
        self, writer: TrailWriter, policy: Policy, events: list[SealedEvent]
    ) -> tuple[list[SealedEvent], list[Checkpoint]]:
        """Gap events signed like any batch (a checkpoint per stream, and each event on
        streams signed every row): unsigned, they would read as added by someone else."""
        key = self.signing_key
        if key is None:
            return events, []
        signer = Checkpointer(key, policy.checkpoints)
        every_row = {name for name, st in policy.streams.items() if st.sign == "every_row"}
        signed, checkpoints = [], []
        for event in events:
            stream = event.draft.stream
            if stream in every_row:
                event = replace(event, signature=key.sign(event.hash), key_id=key.key_id)
            last = writer.checkpoints(stream)
            last_seq = last[-1].last_seq if last else 0
            signer.load(stream, last_seq, writer.hashes_after(stream, last_seq))
            signer.add(stream, event.hash)
            checkpoints.append(signer.make(writer.chain(stream)))
            signed.append(event)
        return signed, checkpoints


class _Session:
    """The streaming loop of one session (see `Worker`)."""

    def __init__(
        self,
        worker: Worker,
        writer: TrailWriter,
        stream: ReplicationStream,
        progress: Progress,
        policy_id: int,
        policy: Policy,
        target: int | None,
    ) -> None:
        self.worker = worker
        self.options = worker.options
        self.writer = writer
        self.stream = stream
        self.resume = progress
        self.target = target
        self.new_id = Uuid7Generator()
        self.assembler = TransactionAssembler(
            policy, worker.redaction_key, key_columns=self._key_columns, new_id=self.new_id
        )
        self.policy_id = policy_id
        self.pending_policy: int | None = None
        self.prefix_mark = f"{policy.schema_name}.mark"
        self.prefix_policy = f"{policy.schema_name}.policy"
        self.batch: list[SealedEvent] = []
        self.batch_checkpoints: list[Checkpoint] = []
        self.key = worker.signing_key
        self.every_row = {n for n, st in policy.streams.items() if st.sign == "every_row"}
        self.checkpointer = None if self.key is None else Checkpointer(self.key, policy.checkpoints)
        anchor_dir = policy.checkpoints.anchor_dir
        self.anchor = (
            None
            if anchor_dir is None or self.key is None
            else DirectoryAnchor(anchor_dir, writer.names.database, writer.names.schema)
        )
        self.checkpoint_requested = False
        # The anchor gets a checkpoint every N events or T seconds per stream (the policy's
        # cadence), and the newest one when the worker stops or is asked to.
        self.anchored_at: dict[str, tuple[int, float]] = {}
        self.batch_anchor: list[Checkpoint] = []
        self.inflight_anchor: list[Checkpoint] = []
        self.unanchored: dict[str, Checkpoint] = {}
        self.anchor_newest = False
        # Position of what has been sealed (in the batch or written).
        self.end_lsn = progress.end_lsn
        self.last_commit_time = progress.last_commit_time
        self.txn_lsn: int | None = None
        self.txn_skip_all = False
        self.txn_skip_below = 0
        self.txn_next_ordinal = 0
        # One batch at a time is written by a thread while the next one is sealed, so the
        # database's work overlaps ours; the stream is only touched by this thread.
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="cdc-audit-writer")
        self.inflight: Future[None] | None = None
        self.inflight_progress = progress
        self.inflight_counts: Counter[str] = Counter()
        self.inflight_missing: Counter[str] = Counter()
        self.inflight_checkpoints: list[Checkpoint] = []
        self.last_advance = time.monotonic()
        self.last_log = time.monotonic()
        self.logged_count = 0

    def run(self) -> None:
        try:
            self._start()
            self._loop()
        finally:
            self.pool.shutdown(wait=True)

    def _start(self) -> None:
        """Anchor what a crash left unanchored; record a change of signing key."""
        if self.key is None:
            return
        if self.anchor is not None:
            self.anchor.write_key(self.key.key_id, self.key.public_key().pem)
        for stream in self._all_streams():
            last = self._catch_up_anchor(stream)
            if last is not None and last.key_id != self.key.key_id:
                self._record_rotation(stream, last)

    def _all_streams(self) -> list[str]:
        return sorted(set(self.assembler.policy.streams) | set(self.writer.trail_streams()))

    def _catch_up_anchor(self, stream: str) -> Checkpoint | None:
        """Anchor the stream's newest checkpoint if a crash left it unanchored; return it."""
        anchored = self.anchor.latest(stream) if self.anchor is not None else None
        after = anchored.last_seq if anchored is not None else 0
        newer = self.writer.checkpoints(stream, after)
        if newer and self.anchor is not None:
            self.anchor.write(newer[-1])
        latest = newer[-1] if newer else anchored
        if latest is None:
            known = self.writer.checkpoints(stream)
            latest = known[-1] if known else None
        if latest is not None:
            self.anchored_at[stream] = (latest.last_seq, time.monotonic())
        return latest

    def _record_rotation(self, stream: str, last: Checkpoint) -> None:
        assert self.key is not None
        if self.writer.rotation_recorded(stream, last.last_seq, self.key.key_id):
            return
        draft = DraftEvent(
            stream=stream,
            kind="key_rotation",
            event_id=self.new_id(),
            commit_lsn=None,
            commit_time=datetime.now(UTC),
            xid=None,
            new={"key_id": self.key.key_id, "previous_key_id": last.key_id},
            context={"worker": worker_identity()},
        )
        self._append(draft)
        _log(
            logging.INFO,
            "signing key changed",
            stream=stream,
            key_id=self.key.key_id,
            previous_key_id=last.key_id,
        )

    def _loop(self) -> None:
        while True:
            self.worker.health.beat()
            items = self.stream.read(
                self.options.read_timeout, max_items=self.options.batch_messages
            )
            self.worker.health.read(full=len(items) >= self.options.batch_messages)
            for item in items:
                self._handle(item.message)
            self._checkpoints_due()
            self._flush()
            caught_up = len(items) < self.options.batch_messages
            if self.worker.stop.is_set() or (self.target is not None and caught_up):
                self._settle(block=True)
                self._flush()
            if self._drained():
                self._sign_the_tail()
                _log(
                    logging.INFO,
                    "drained",
                    sealed_up_to=format_lsn(self.stream.confirmed_lsn),
                    events=sum(self.worker.sealed.values()),
                )
                return
            if self.worker.stop.is_set():
                self._sign_the_tail()
                _log(
                    logging.INFO,
                    "stopping: batch written and confirmed",
                    confirmed=format_lsn(self.stream.confirmed_lsn),
                )
                return
            self._heartbeat_if_due()
            self._log_if_due()

    # ---- messages

    def _handle(self, message: object) -> None:
        if isinstance(message, Begin):
            self.txn_lsn = message.final_lsn
            self.txn_skip_all = message.final_lsn < self.resume.end_lsn
            partial = self.resume.partial_lsn == message.final_lsn
            self.txn_skip_below = self.resume.partial_done if partial else 0
            self.txn_next_ordinal = 0
            if not self.txn_skip_all:
                self.worker.health.received(message.final_lsn, message.commit_time)
            self.assembler.feed(message)
            return
        if isinstance(message, Commit):
            self.assembler.feed(message)
            self._commit(message)
            return
        if isinstance(message, LogicalMessage) and message.prefix in (
            self.prefix_mark,
            self.prefix_policy,
        ):
            if message.prefix == self.prefix_policy and message.transactional:
                self.pending_policy = int(message.content.decode())
            elif message.content == b"checkpoint":
                self.checkpoint_requested = True
            return
        for draft in self.assembler.feed(message):  # type: ignore[arg-type]
            self._seal(draft, message)

    def _seal(self, draft: DraftEvent, message: object) -> None:
        if self.txn_lsn is not None:
            self.txn_next_ordinal = draft.ordinal + 1
            if self.txn_skip_all or draft.ordinal < self.txn_skip_below:
                return
        else:
            # A non-transactional message: its own LSN is its position.
            assert isinstance(message, LogicalMessage)
            if message.lsn < self.resume.end_lsn:
                return
            self.end_lsn = max(self.end_lsn, message.lsn + 1)
        self._append(draft)

    def _append(self, draft: DraftEvent) -> None:
        """Seal `draft` into its chain (signing it on streams signed every row) and batch it."""
        chain = self._chain(draft.stream)
        sealed = chain.seal(draft)
        if self.key is not None and draft.stream in self.every_row:
            sealed = replace(sealed, signature=self.key.sign(sealed.hash), key_id=self.key.key_id)
        self.batch.append(sealed)
        if self.checkpointer is not None and self.checkpointer.add(draft.stream, sealed.hash):
            self._checkpoint(draft.stream)

    def _chain(self, stream: str) -> StreamChain:
        """The stream's chain, and its checkpoint range, read from the trail the first time."""
        chain = self.writer.loaded_chain(stream)
        if chain is None:
            self._settle(block=True)  # the connection is the writer's
            chain = self.writer.chain(stream)
        if self.checkpointer is not None and not self.checkpointer.loaded(stream):
            self._settle(block=True)
            last = self.writer.checkpoints(stream)
            last_seq = last[-1].last_seq if last else 0
            self.checkpointer.load(stream, last_seq, self.writer.hashes_after(stream, last_seq))
        return chain

    def _checkpoint(self, stream: str) -> None:
        """Sign the stream's events since its last checkpoint; anchor it at the cadence."""
        assert self.checkpointer is not None
        checkpoint = self.checkpointer.make(self._chain(stream))
        self.batch_checkpoints.append(checkpoint)
        seq, when = self.anchored_at.get(stream, (0, 0.0))
        policy = self.assembler.policy.checkpoints
        now = time.monotonic()
        if checkpoint.last_seq - seq >= policy.every_events or now - when >= policy.every_seconds:
            self.batch_anchor.append(checkpoint)
            self.anchored_at[stream] = (checkpoint.last_seq, now)

    def _sign_the_tail(self) -> None:
        """On the way out: everything signed (it is, batch by batch) and the newest anchored."""
        self.anchor_newest = True
        self._flush()
        self._settle(block=True)
        self._anchor_newest()

    def _checkpoints_due(self) -> None:
        if self.checkpointer is None or not self.checkpoint_requested:
            return
        self.checkpoint_requested = False
        for stream in self._all_streams():
            self._chain(stream)  # loads its range: it may hold events of earlier runs
        for stream in self.checkpointer.pending():
            self._checkpoint(stream)
        self.anchor_newest = True

    def _commit(self, commit: Commit) -> None:
        if not self.txn_skip_all:
            self.end_lsn = max(self.end_lsn, commit.end_lsn)
            self.last_commit_time = pg_timestamp_to_datetime(commit.commit_time)
        self.txn_lsn = None
        self.txn_skip_all = False
        self.txn_skip_below = 0
        self.txn_next_ordinal = 0
        if self.pending_policy is not None:
            self._switch_policy(self.pending_policy)
            self.pending_policy = None

    def _switch_policy(self, policy_id: int) -> None:
        if policy_id == self.policy_id:
            return
        # What came before the apply is already sealed under the old policy; the progress
        # written with it records the new one, so a restart from here uses the new one too.
        self._settle(block=True)
        _, loaded = self.writer.load_policy(policy_id)
        _require_redaction_key(loaded.policy, self.worker.redaction_key)
        self.assembler.set_policy(loaded.policy)
        self.policy_id = policy_id
        self._submit()
        self._settle(block=True)
        _log(logging.INFO, "policy changed", policy_version=policy_id)

    # ---- batches and positions

    def _progress(self) -> Progress:
        partial = self.txn_lsn is not None and self.txn_next_ordinal > 0
        return Progress(
            end_lsn=self.end_lsn,
            partial_lsn=self.txn_lsn if partial else None,
            partial_done=self.txn_next_ordinal if partial else 0,
            policy_version_id=self.policy_id,
            last_commit_time=self.last_commit_time,
        )

    def _flush(self) -> None:
        """Hand the batch to the writer thread; confirm what is known to be written."""
        self._settle(block=False)
        if self.batch or self.batch_checkpoints:
            self._settle(block=True)
            self._submit()
        elif self.anchor_newest and self.inflight is None:
            self._anchor_newest()
        if self.inflight is None:
            # Everything sealed is written: transactions without events count as sealed too.
            self._confirm(self.end_lsn)
            if self.txn_lsn is None:
                idle = self.stream.idle_confirmable()
                if idle is not None:
                    self._confirm(idle)
        self.stream.report_progress()

    def _submit(self) -> None:
        # Every batch is signed in the transaction that writes it: an event of the trail that
        # no checkpoint covers was not written by this worker.
        if self.checkpointer is not None:
            for stream in self.checkpointer.pending():
                self._checkpoint(stream)
        progress = self._progress()
        batch, self.batch = self.batch, []
        checkpoints, self.batch_checkpoints = self.batch_checkpoints, []
        self.inflight_anchor, self.batch_anchor = self.batch_anchor, []
        self.inflight_counts = Counter(event.draft.stream for event in batch)
        self.inflight_missing = Counter(e.draft.stream for e in batch if e.draft.context_missing)
        self.inflight_progress = progress
        self.inflight_checkpoints = checkpoints
        self.inflight = self.pool.submit(self._write, batch, progress, checkpoints)

    def _write(
        self, batch: list[SealedEvent], progress: Progress, checkpoints: list[Checkpoint]
    ) -> None:
        """In the writer thread: one batch, its checkpoints and progress, in one transaction."""
        self.worker._failpoints.hit("before_commit")
        self.writer.write(batch, progress, checkpoints)
        self.worker._failpoints.hit("after_commit")

    def _settle(self, *, block: bool) -> None:
        """Collect the batch being written (waiting for it if `block`), then confirm it."""
        inflight = self.inflight
        if inflight is None or not (block or inflight.done()):
            return
        self.inflight = None
        inflight.result()  # a failed write ends the session
        self.worker.sealed.update(self.inflight_counts)
        self.worker.missing_context.update(self.inflight_missing)
        # Anchored only once in the trail: an anchored checkpoint the trail lacks would be
        # indistinguishable from a truncated trail. A crash in between is caught up on start.
        for checkpoint in self.inflight_checkpoints:
            self.unanchored[checkpoint.stream] = checkpoint
        if self.anchor is not None:
            for checkpoint in self.inflight_anchor:
                self.anchor.write(checkpoint)
                if self.unanchored.get(checkpoint.stream) == checkpoint:
                    del self.unanchored[checkpoint.stream]
        if self.anchor_newest:
            self._anchor_newest()
        self._confirm(self.inflight_progress.end_lsn)

    def _anchor_newest(self) -> None:
        """Anchor each stream's newest checkpoint (on request, and when stopping)."""
        if self.inflight is not None or self.batch_checkpoints:
            return  # after the write in flight, at the next settle
        self.anchor_newest = False
        if self.anchor is not None:
            for stream, checkpoint in self.unanchored.items():
                self.anchor.write(checkpoint)
                self.anchored_at[stream] = (checkpoint.last_seq, time.monotonic())
        self.unanchored.clear()

    def _confirm(self, lsn: int) -> None:
        if lsn > self.stream.confirmed_lsn:
            self.stream.confirm(lsn)
            self.last_advance = time.monotonic()
            self.worker.health.confirmed(lsn)
            self.worker.made_progress = True

    def _key_columns(self, schema: str, table: str) -> list[str] | None:
        self._settle(block=True)  # the connection is the writer's
        return self.writer.key_columns(schema, table)

    def _drained(self) -> bool:
        if self.target is None or self.txn_lsn is not None or self.batch or self.inflight:
            return False
        if self.batch_checkpoints or self.checkpoint_requested or self.anchor_newest:
            return False
        return self.stream.confirmed_lsn > self.target

    def _heartbeat_if_due(self) -> None:
        behind = self.stream.server_wal_end > self.stream.confirmed_lsn
        if behind and time.monotonic() - self.last_advance >= self.options.heartbeat_seconds:
            self._settle(block=True)
            self.writer.mark("heartbeat")
            self.last_advance = time.monotonic()

    def _log_if_due(self) -> None:
        now = time.monotonic()
        if now - self.last_log < self.options.log_interval:
            return
        total = sum(self.worker.sealed.values())
        rate = (total - self.logged_count) / (now - self.last_log)
        _log(
            logging.INFO,
            "progress",
            sealed=dict(self.worker.sealed),
            rate=round(rate, 1),
            confirmed=format_lsn(self.stream.confirmed_lsn),
            lag_bytes=max(0, self.stream.server_wal_end - self.stream.confirmed_lsn),
        )
        self.last_log, self.logged_count = now, total


# ---------------------------------------------------------------------------------- helpers


@contextmanager
def _connect(dsn: str) -> Iterator[psycopg.Connection[TupleRow]]:
    conn = connect(with_keepalives(dsn), application_name="cdc-audit worker")
    try:
        yield conn
    finally:
        conn.close()


def _own_backends(conn: psycopg.Connection[TupleRow], slot: str) -> list[tuple[int, datetime]]:
    """(pid, backend_start) of this connection's backend and of the slot's walsender."""
    rows = conn.execute(
        "SELECT pid, backend_start FROM pg_catalog.pg_stat_activity WHERE pid = pg_backend_pid()"
        " OR pid = (SELECT active_pid FROM pg_catalog.pg_replication_slots WHERE slot_name = %s)",
        (slot,),
    ).fetchall()
    conn.commit()
    return [(pid, started) for pid, started in rows if started is not None]


def _last_is_same_gap(writer: TrailWriter, stream: str, details: dict[str, JsonValue]) -> bool:
    row = writer.conn.execute(
        sql.SQL(
            "SELECT kind, new ->> 'slot', new ->> 'sealed_up_to' FROM {}.event"
            " WHERE stream = %s ORDER BY seq DESC LIMIT 1"
        ).format(sql.Identifier(writer.names.schema)),
        (stream,),
    ).fetchone()
    return row is not None and tuple(row) == ("gap", details["slot"], details["sealed_up_to"])


def _require_redaction_key(policy: Policy, key: bytes | None) -> None:
    hashed = [
        f"{t.table.qualified()}.{column}"
        for t in policy.tables
        for column, how in t.redact.items()
        if how == "hash"
    ]
    if hashed and key is None:
        raise InvalidInput(
            f"the policy redacts {hashed[0]} with hash: set CDC_AUDIT_REDACTION_KEY_FILE"
            " to a file holding the secret key"
        )


def _lsn_or_none(lsn: int | None) -> str | None:
    return None if lsn is None else format_lsn(lsn)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _log(level: int, message: str, **fields: object) -> None:
    log.log(level, message, extra={"fields": fields})


class _Failpoints:
    """Crash injection for the crash tests: ``CDC_AUDIT_FAILPOINT=after_commit:3`` kills the
    process with SIGKILL the third time it passes ``after_commit``. Unset in production."""

    def __init__(self, name: str | None, countdown: int) -> None:
        self._name = name
        self._countdown = countdown

    @classmethod
    def from_environment(cls) -> _Failpoints:
        spec = os.environ.get("CDC_AUDIT_FAILPOINT", "")
        name, _, count = spec.partition(":")
        if not name:
            return cls(None, 0)
        return cls(name, int(count or "1"))

    def hit(self, name: str) -> None:
        if name != self._name:
            return
        self._countdown -= 1
        if self._countdown <= 0:
            os.kill(os.getpid(), signal.SIGKILL)


def install_signal_handlers(stop: threading.Event) -> Callable[[], None]:
    """SIGTERM and SIGINT set `stop`; returns a function restoring the previous handlers."""

    def handler(signum: int, frame: FrameType | None) -> None:
        _log(
            logging.INFO,
            "signal received: finishing the current batch",
            signal=signal.Signals(signum).name,
        )
        stop.set()

    previous = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGINT)}

    def restore() -> None:
        for signum, old in previous.items():
            signal.signal(signum, old)

    return restore
