"""What the worker signs: a checkpoint per stream for every batch it writes (and every N
events within a batch, which bounds a range).

The checkpointer follows each stream's events as they are sealed, keeping only what the next
checkpoint needs: where its range starts and the hashes of the range for its Merkle root.
"""

from __future__ import annotations

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


class Checkpointer:
    def __init__(
        self,
        key: SigningKey,
        policy: CheckpointPolicy,
        *,
        now: Callable[[], datetime] | None = None,
    ) -> None:
        self.key = key
        self.every_events = policy.every_events
        self._now = now if now is not None else (lambda: datetime.now(UTC))
        self._ranges: dict[str, _Range] = {}

    def loaded(self, stream: str) -> bool:
        return stream in self._ranges

    def load(self, stream: str, last_checkpoint_seq: int, hashes: Iterable[bytes]) -> None:
        """Start following `stream`, whose last checkpoint ends at `last_checkpoint_seq`
        (0 for none) and whose events after it have `hashes`."""
        self._ranges[stream] = _Range(last_checkpoint_seq + 1, list(hashes))

    def add(self, stream: str, digest: bytes) -> bool:
        """Follow one more sealed event; True when the stream's range is full."""
        pending = self._ranges[stream]
        pending.hashes.append(digest)
        return len(pending.hashes) >= self.every_events

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
