"""Verifying a large export on several cores.

The file is cut after checkpoint lines into about as many parts as there are cores, and each
part is verified by its own process. A part other than the first starts from the checkpoint
that ends the part before it: that checkpoint's last seq and head hash stand in for the
events before. This checks exactly what one pass checks, because the part before proves that
checkpoint against the events it hashed (its range, head hash, Merkle root and signature), as
one pass does; a checkpoint that does not hold fails that part. The verdict is that of the
first part, in file order, that fails, so it names the same first bad seq as one pass.

An export that starts from a purge record is verified in one pass: that record must be met
again further on, maybe in any part.
"""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Iterator, Mapping
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import IO, Final

from cdc_audit.checkpoints import Checkpoint
from cdc_audit.export import (
    MalformedLine,
    parse_lines,
    verify_export,
    verify_export_lines,
    verify_lines,
)
from cdc_audit.keys import PublicKey, public_key_from_pem
from cdc_audit.purge_record import PurgeStart
from cdc_audit.verify import StreamVerdict, StreamVerifier

__all__ = ["Part", "split_export", "usable_cpus", "verify_export_parallel"]

MIN_PART_BYTES: Final = 8 << 20
"""Below this (several thousand events) a part gains less than its process costs."""

_CHECKPOINT_MARK: Final = b'"type":"checkpoint"'


@dataclass(frozen=True)
class Part:
    """Lines `start` to `end` (byte offsets) of an export, verified on their own."""

    start: int
    end: int
    resume: Checkpoint | None
    """The checkpoint that ends the part before; None for the first part."""


def usable_cpus() -> int:
    """The cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def split_export(path: Path, parts: int, *, min_part_bytes: int = MIN_PART_BYTES) -> list[Part]:
    """Up to `parts` parts of about equal size, each but the last ending with a checkpoint
    line; one part when the file is small, has no checkpoint to cut after, or starts from a
    purge record."""
    size = path.stat().st_size
    wanted = min(parts, size // min_part_bytes)
    whole = [Part(0, size, None)]
    if wanted < 2:
        return whole
    with path.open("rb") as file:
        if _starts_from_purge(file.readline()):
            return whole
        cuts: list[tuple[int, Checkpoint]] = []
        for k in range(1, wanted):
            target = size * k // wanted
            if cuts and target <= cuts[-1][0]:
                continue
            found = _next_checkpoint(file, target)
            if found is None:
                break
            cuts.append(found)
    result: list[Part] = []
    start, resume = 0, None
    for end, checkpoint in cuts:
        if end < size:
            result.append(Part(start, end, resume))
            start, resume = end, checkpoint
    result.append(Part(start, size, resume))
    return result


def _starts_from_purge(line: bytes) -> bool:
    try:
        return isinstance(next(parse_lines([line]), None), PurgeStart)
    except MalformedLine:
        return False  # one pass names it


def _next_checkpoint(file: IO[bytes], offset: int) -> tuple[int, Checkpoint] | None:
    """The first checkpoint line that starts after `offset`: where it ends, and itself."""
    file.seek(offset)
    file.readline()  # the rest of the line `offset` falls in
    position = file.tell()
    for raw in iter(file.readline, b""):
        position += len(raw)
        # The mark can also sit inside a row's values: only a line that parses as a
        # checkpoint counts.
        if _CHECKPOINT_MARK in raw:
            try:
                item = next(parse_lines([raw]))
            except MalformedLine:
                continue
            if isinstance(item, Checkpoint):
                return position, item
    return None


def verify_export_parallel(
    path: Path, keys: Mapping[str, PublicKey], jobs: int, *, min_part_bytes: int = MIN_PART_BYTES
) -> StreamVerdict:
    """`verify_export` on up to `jobs` processes; the same verdict."""
    parts = split_export(path, jobs, min_part_bytes=min_part_bytes) if jobs > 1 else []
    if len(parts) < 2:
        return verify_export(path, keys)
    pems = {key_id: key.pem for key_id, key in keys.items()}
    size = path.stat().st_size
    # fork: a child starts at once, with everything imported (spawn re-imports, ~0.4 s).
    methods = multiprocessing.get_all_start_methods()
    context = multiprocessing.get_context("fork" if "fork" in methods else None)
    with ProcessPoolExecutor(max_workers=len(parts), mp_context=context) as pool:
        futures = [pool.submit(_verify_part, str(path), part, size, pems) for part in parts]
        return _combine([future.result() for future in futures])


def _verify_part(path: str, part: Part, size: int, pems: Mapping[str, str]) -> StreamVerdict:
    keys = {key_id: public_key_from_pem(pem) for key_id, pem in pems.items()}
    last_part = part.end == size
    with open(path, "rb") as file:
        file.seek(part.start)
        lines = _lines_until(file, part.end - part.start)
        if part.resume is None:
            return verify_export_lines(Path(path), lines, keys, last_part=last_part)
        verifier = StreamVerifier(part.resume.stream, keys)
        verifier.resume_after(part.resume)
        return verify_lines(
            verifier,
            parse_lines(lines),
            lines_before=lambda: _count_lines(path, part.start),
            last_part=last_part,
        )


def _lines_until(file: IO[bytes], length: int) -> Iterator[bytes]:
    """The next lines of `file`, `length` bytes of them."""
    left = length
    while left > 0:
        raw = file.readline(left)
        if not raw:
            return
        left -= len(raw)
        yield raw


def _count_lines(path: str, end: int) -> int:
    count = 0
    with open(path, "rb") as file:
        while file.tell() < end:
            block = file.read(min(1 << 20, end - file.tell()))
            if not block:
                break
            count += block.count(b"\n")
    return count


def _combine(verdicts: list[StreamVerdict]) -> StreamVerdict:
    """The parts' verdicts, in file order, as the verdict of one pass: up to the first that
    fails."""
    taken: list[StreamVerdict] = []
    for verdict in verdicts:
        taken.append(verdict)
        if not verdict.ok:
            break
    return replace(
        taken[-1],
        stream=verdicts[0].stream,
        checked=sum(v.checked for v in taken),
        checkpoints=sum(v.checkpoints for v in taken),
        erased=sum(v.erased for v in taken),
    )
