"""How big the reliability scenarios run: ``CDC_AUDIT_RELIABILITY`` is ``bounded`` (the
default, what CI runs: a few minutes for the whole suite) or ``full`` (longer, more examples)."""

from __future__ import annotations

import os
from typing import TypeVar

_T = TypeVar("_T", int, float)

MODE = os.environ.get("CDC_AUDIT_RELIABILITY", "bounded").strip().lower() or "bounded"
if MODE not in ("bounded", "full"):
    raise ValueError(f"CDC_AUDIT_RELIABILITY must be bounded or full, not {MODE!r}")
FULL = MODE == "full"


def scaled(bounded: _T, full: _T) -> _T:
    """`bounded` in the CI form, `full` in the fuller one (example counts, seconds, rows)."""
    return full if FULL else bounded
