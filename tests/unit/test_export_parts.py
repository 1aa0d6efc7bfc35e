"""Verifying an export on several processes gives the verdict of one pass, whatever was done
to the file. The exports are built here from sealed drafts and signed checkpoints, with no
database; parts are made small so that a few hundred events make several of them."""

from __future__ import annotations

import itertools
import subprocess
import sys
import uuid
from collections.abc import Callable
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import orjson
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from cdc_audit.canonical import canonical_bytes
from cdc_audit.chain import DraftEvent, SealedEvent, StreamChain
from cdc_audit.checkpoints import Checkpoint
from cdc_audit.export import checkpoint_line, verify_export
from cdc_audit.export_parts import split_export, verify_export_parallel
from cdc_audit.keys import PublicKey, SigningKey
from cdc_audit.merkle import merkle_root
from cdc_audit.verify import StreamVerdict

SIGNER = SigningKey.of(Ed25519PrivateKey.from_private_bytes(bytes(range(32))))
KEYS = {SIGNER.key_id: SIGNER.public_key()}
EVENTS = 600
EVERY = 50  # a checkpoint every 50 events
PART_BYTES = 300_000  # about 70 events' lines: several parts
START = datetime(2026, 1, 5, 9, 30, tzinfo=UTC)


def _draft(n: int) -> DraftEvent:
    return DraftEvent(
        stream="user",
        kind="update",
        event_id=uuid.UUID(int=(0x017F22E279B07000 << 64) | (0x8 << 60) | n),
        commit_lsn=0x16B3740000 + n * 64,
        commit_time=START + timedelta(milliseconds=n),
        xid=1000 + n,
        schema_name="public",
        table_name="accounts",
        row_key={"id": n},
        old={"id": n, "balance": f"{n}.00", "note": "x" * 2000},
        new={"id": n, "balance": f"{n + 1}.00", "note": "x" * 2000},
        changed=("balance",),
        actor_id=f"user-{n % 7}",
        reason="monthly run",
        context={"db": {"session_user": "app"}, "missing": []},
    )


def _event_line(event: SealedEvent) -> bytes:
    line = {
        "type": "event",
        **event.header(),
        **event.draft.payload(),
        "prev_hash": event.prev_hash.hex(),
        "hash": event.hash.hex(),
        "signature": None,
        "key_id": None,
        "erased": False,
    }
    return canonical_bytes(line) + b"\n"


def _checkpoint(events: list[SealedEvent]) -> Checkpoint:
    unsigned = Checkpoint(
        stream="user",
        first_seq=events[0].seq,
        last_seq=events[-1].seq,
        head_hash=events[-1].hash,
        merkle_root=merkle_root([e.hash for e in events]),
        created_at=START + timedelta(hours=1),
        key_id=SIGNER.key_id,
    )
    return replace(unsigned, signature=SIGNER.sign(unsigned.statement_bytes()))


def _checkpoint_line(checkpoint: Checkpoint) -> bytes:
    return canonical_bytes(checkpoint_line(checkpoint)) + b"\n"


def export_lines(events: int = EVENTS, every: int = EVERY) -> list[bytes]:
    """A stream's export: its events, each checkpoint after the last event it signs."""
    chain = StreamChain("user")
    lines: list[bytes] = []
    pending: list[SealedEvent] = []
    for n in range(1, events + 1):
        sealed = chain.seal(_draft(n))
        pending.append(sealed)
        lines.append(_event_line(sealed))
        if n % every == 0:
            lines.append(_checkpoint_line(_checkpoint(pending)))
            pending = []
    return lines


def _write(tmp_path: Path, lines: list[bytes]) -> Path:
    path = tmp_path / "user.jsonl"
    path.write_bytes(b"".join(lines))
    return path


def _both(path: Path, keys: dict[str, PublicKey] = KEYS) -> tuple[StreamVerdict, StreamVerdict]:
    return verify_export(path, keys), verify_export_parallel(
        path, keys, jobs=4, min_part_bytes=PART_BYTES
    )


def test_parts_end_with_checkpoint_lines_and_cover_the_file(tmp_path: Path) -> None:
    path = _write(tmp_path, export_lines())
    parts = split_export(path, 4, min_part_bytes=PART_BYTES)
    assert len(parts) == 4
    data = path.read_bytes()
    assert parts[0].start == 0 and parts[-1].end == len(data)
    for before, after in itertools.pairwise(parts):
        assert before.end == after.start
        last_line = data[: before.end].splitlines()[-1]
        assert orjson.loads(last_line)["type"] == "checkpoint"
        assert after.resume is not None and orjson.loads(last_line)["statement"]["last_seq"] == (
            after.resume.last_seq
        )


def test_a_clean_export_verifies_the_same_on_several_processes(tmp_path: Path) -> None:
    one, several = _both(_write(tmp_path, export_lines()))
    assert one.ok and several == one
    assert several.checked == EVENTS and several.checkpoints == EVENTS // EVERY
    assert several.signed_up_to == EVENTS


def test_small_files_and_one_job_take_one_pass(tmp_path: Path) -> None:
    path = _write(tmp_path, export_lines())
    assert len(split_export(path, 4)) == 1  # under the default part size
    assert len(split_export(path, 1, min_part_bytes=PART_BYTES)) == 1
    assert verify_export_parallel(path, KEYS, jobs=1) == verify_export(path, KEYS)


def _edit_event(
    seq: int, change: Callable[[dict[str, object]], None]
) -> Callable[[list[bytes]], None]:
    def tamper(lines: list[bytes]) -> None:
        for i, raw in enumerate(lines):
            record = orjson.loads(raw)
            if record["type"] == "event" and record["seq"] == seq:
                change(record)
                lines[i] = canonical_bytes(record) + b"\n"
                return
        raise AssertionError(f"no event {seq}")

    return tamper


def _set(key: str, value: object) -> Callable[[dict[str, object]], None]:
    return lambda record: record.__setitem__(key, value)


def _drop_event(seq: int) -> Callable[[list[bytes]], None]:
    def tamper(lines: list[bytes]) -> None:
        lines[:] = [raw for raw in lines if b'"seq":%d,' % seq not in raw]

    return tamper


def _replace_line(index: int, text: bytes) -> Callable[[list[bytes]], None]:
    def tamper(lines: list[bytes]) -> None:
        lines[index] = text

    return tamper


def _checkpoint_ending(
    seq: int, change: Callable[[Checkpoint], Checkpoint]
) -> Callable[[list[bytes]], None]:
    def tamper(lines: list[bytes]) -> None:
        for i, raw in enumerate(lines):
            record = orjson.loads(raw)
            if record["type"] == "checkpoint" and record["statement"]["last_seq"] == seq:
                body = {k: v for k, v in record.items() if k != "type"}
                lines[i] = _checkpoint_line(change(Checkpoint.from_record(body, "test")))
                return
        raise AssertionError(f"no checkpoint ending at {seq}")

    return tamper


def _resign(checkpoint: Checkpoint) -> Checkpoint:
    return replace(checkpoint, signature=SIGNER.sign(checkpoint.statement_bytes()))


def _cut_after_last_checkpoint_and_append(lines: list[bytes]) -> None:
    """Events beyond the last checkpoint, sealed correctly but signed by nobody."""
    chain = StreamChain("user")
    extra = [chain.seal(_draft(n)) for n in range(1, EVENTS + 3)][EVENTS:]
    lines.extend(_event_line(e) for e in extra)


TAMPERINGS = {
    # Each lands in a different part: 400 and 500 are past the first cut.
    "a payload value changed": _edit_event(420, _set("actor_id", "mallory")),
    "a header value changed": _edit_event(505, _set("kind", "insert")),
    "an event removed": _drop_event(333),
    "a line that is not JSON": _replace_line(450, b"{not json\n"),
    "a line in another spelling": _replace_line(
        460, export_lines()[460].replace(b'"kind":', b'"kind" :')
    ),
    "a checkpoint at a cut re-signed with another root": _checkpoint_ending(
        300, lambda c: _resign(replace(c, merkle_root=bytes(32)))
    ),
    "a checkpoint at a cut with a bad signature": _checkpoint_ending(
        350, lambda c: replace(c, signature=bytes(64))
    ),
    "a checkpoint of another stream": _checkpoint_ending(
        400, lambda c: _resign(replace(c, stream="admin"))
    ),
    "unsigned events after the last checkpoint": _cut_after_last_checkpoint_and_append,
    "a purge line in the middle": _replace_line(
        470, b'{"record":{},"stream":"user","type":"purge"}\n'
    ),
}


@pytest.mark.parametrize("tamper", TAMPERINGS.values(), ids=TAMPERINGS.keys())
def test_a_tampered_export_fails_at_the_same_seq_on_several_processes(
    tmp_path: Path, tamper: Callable[[list[bytes]], None]
) -> None:
    lines = export_lines()
    tamper(lines)
    path = _write(tmp_path, lines)
    assert len(split_export(path, 4, min_part_bytes=PART_BYTES)) > 2
    one, several = _both(path)
    assert not one.ok
    assert several == one


def test_a_malformed_line_is_named_by_its_line_in_the_whole_file(tmp_path: Path) -> None:
    lines = export_lines()
    lines[500] = b"{not json\n"
    _, several = _both(_write(tmp_path, lines))
    assert several.problem == "line 501 is not a canonical export line (edited?)"


def test_an_unknown_key_fails_verification_on_every_path(tmp_path: Path) -> None:
    path = _write(tmp_path, export_lines())
    stranger = SigningKey.of(Ed25519PrivateKey.from_private_bytes(bytes(range(1, 33))))
    one, several = _both(path, {stranger.key_id: stranger.public_key()})
    assert not one.ok and several == one
    assert "unregistered key" in (several.problem or "")


def test_a_last_part_with_no_checkpoint_still_needs_its_events_signed(tmp_path: Path) -> None:
    lines = export_lines(events=300)
    chain = StreamChain("user")
    sealed = [chain.seal(_draft(n)) for n in range(1, 601)]
    lines.extend(_event_line(e) for e in sealed[300:])  # well chained, signed by nobody
    path = _write(tmp_path, lines)
    parts = split_export(path, 2, min_part_bytes=PART_BYTES)
    assert len(parts) == 2
    assert parts[1].resume is not None and parts[1].resume.last_seq == 300
    one = verify_export(path, KEYS)
    several = verify_export_parallel(path, KEYS, jobs=2, min_part_bytes=PART_BYTES)
    assert several == one
    assert several.first_bad_seq == 301
    assert "covered by no checkpoint" in (several.problem or "")


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "cdc_audit.cli", "verify", *args],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )


def test_verify_file_uses_every_core_and_says_the_same(tmp_path: Path) -> None:
    # Big enough for two parts of the default size, with a tampered event in the second.
    lines = export_lines(events=4000, every=500)
    lines[3000] = lines[3000].replace(b'"actor_id":"user-', b'"actor_id":"root-')
    path = _write(tmp_path, lines)
    assert len(split_export(path, 2)) == 2
    public = tmp_path / "signing_key.pub.pem"
    public.write_text(SIGNER.public_key().pem)
    common = ("--file", str(path), "--public-key", str(public))
    one, several = _cli(*common, "--jobs", "1"), _cli(*common)
    assert (one.returncode, one.stdout, one.stderr) == (
        several.returncode,
        several.stdout,
        several.stderr,
    )
    assert several.returncode == 1
    assert "FAILED at seq 2996: payload changed" in several.stdout + several.stderr
    refused = _cli(*common, "--jobs", "0")
    assert (refused.returncode, refused.stderr.strip()) == (
        2,
        "cdc-audit: --jobs must be at least 1, not 0",
    )
