"""`record`: the dataclass of values made once or more for every event on the worker's path.

A frozen dataclass sets each field through `object.__setattr__` in its `__init__`: 3.1 µs
for a `DraftEvent` against 0.7 µs for the same class not frozen, and every event makes
several such records (the decoded message, the shaped change, the draft, the sealed event),
about a tenth of the worker's time. A `record` is frozen to the type checker, which refuses
any assignment to its fields, and a plain slotted dataclass at run time. Like a frozen one it
is never changed in place (`dataclasses.replace` makes a new one); unlike one it is not
hashable, which none of them needs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TypeVar, dataclass_transform

__all__ = ["record"]

_Class = TypeVar("_Class")


@dataclass_transform(frozen_default=True, field_specifiers=(field,))
def record(cls: type[_Class]) -> type[_Class]:
    """A slotted dataclass that the type checker holds frozen."""
    return dataclass(slots=True)(cls)
