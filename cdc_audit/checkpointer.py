"""When and what the worker signs: one checkpoint per stream every N events or T seconds.

The checkpointer follows each stream's events as they are sealed, keeping only what the next
checkpoint needs: where its range starts and the hashes of the range for its Merkle root.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime

from cdc_audit.chain import StreamChain, merkle_root
from cdc_audit.checkpoints import Checkpoint
from cdc_audit.keys import SigningKey
from cdc_audit.policy import CheckpointPolicy

__all__ = ["Checkpointer"]


@dataclass
class _Range:
    """The events of one stream sealed since its last checkpoint."""

    first_seq: int
    hashes: list[bytes] = field(default_factory=list)
    started: float | None = None
    """Monotonic time of the first event of the range (for every_seconds)."""


class Checkpointer:
    def __init__(
        self,
        key: SigningKey,
        policy: CheckpointPolicy,
        *,
        clock: Callable[[], float] = time.monotonic,
        now: Callable[[], datetime] | None = None,
    ) -> None:
        self.key = key
        self.every_events = policy.every_events
        self.every_seconds = policy.every_seconds
        self._clock = clock
        self._now = now if now is not None else (lambda: datetime.now(UTC))
        self._ranges: dict[str, _Range] = {}

    def loaded(self, stream: str) -> bool:
        return stream in self._ranges

    def load(self, stream: str, last_checkpoint_seq: int, hashes: Iterable[bytes]) -> None:
        """Start following `stream`, whose last checkpoint ends at `last_checkpoint_seq`
        (0 for none) and whose events after it have `hashes`."""
        pending = _Range(last_checkpoint_seq + 1, list(hashes))
        if pending.hashes:
            pending.started = self._clock()
        self._ranges[stream] = pending

    def add(self, stream: str, digest: bytes) -> bool:
        """Follow one more sealed event; True when the stream's range is full."""
        pending = self._ranges[stream]
        if not pending.hashes:
            pending.started = self._clock()
        pending.hashes.append(digest)
        return len(pending.hashes) >= self.every_events

    def due(self) -> list[str]:
        """Streams whose range is older than every_seconds."""
        now = self._clock()
        return [
            stream
            for stream, pending in self._ranges.items()
            if pending.started is not None and now - pending.started >= self.every_seconds
        ]

    def pending(self) -> list[str]:
        """Streams with events not yet covered by a checkpoint."""
        return [stream for stream, pending in self._ranges.items() if pending.hashes]

    def make(self, chain: StreamChain) -> Checkpoint:
        """Sign the range of `chain`'s stream up to its head, and start the next range."""
        pending = self._ranges[chain.stream]
        last_seq = chain.next_seq - 1
        if not pending.hashes or pending.first_seq + len(pending.hashes) - 1 != last_seq:
            raise ValueError(f"checkpoint range of stream {chain.stream} is out of step")
        unsigned = Checkpoint(
            stream=chain.stream,
            first_seq=pending.first_seq,
            last_seq=last_seq,
            head_hash=chain.head,
            merkle_root=merkle_root(pending.hashes),
            created_at=self._now(),
            key_id=self.key.key_id,
        )
        self._ranges[chain.stream] = _Range(last_seq + 1)
        return replace(unsigned, signature=self.key.sign(unsigned.statement_bytes()))
