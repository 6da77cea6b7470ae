"""Records the archive stage and the store exchange (the store returns these)."""

from __future__ import annotations

import operator
from dataclasses import dataclass, fields
from typing import Any, NamedTuple, TypeVar

__all__ = ["ArchiveMeta", "ArchiveRow", "quick_pickle"]

_T = TypeVar("_T")


def quick_pickle(cls: type[_T]) -> type[_T]:
    """Pickle a frozen, slotted dataclass as (class, field values).

    The default for such classes calls ``dataclasses.fields`` for every
    object; a full build sends tens of thousands of them between processes.
    """
    values = operator.attrgetter(*(f.name for f in fields(cls)))  # type: ignore[arg-type]

    def __reduce__(self: Any) -> tuple[type[_T], tuple[Any, ...]]:
        return cls, values(self)

    cls.__reduce__ = __reduce__  # type: ignore[method-assign]
    return cls


@dataclass(frozen=True, slots=True)
class ArchiveRow:
    """One stored message, as the archive reads it."""

    id: int
    list_id: int
    message_id: str
    msgid_hash: str
    received_at: float
    removed: bool
    data: bytes


class ArchiveMeta(NamedTuple):
    """What the archive derived from one message: its place in a thread and its texts.

    Everything here is already safe to publish (addresses hidden).  ``mbox``
    is the message's entry in the per-month mbox download; it is only loaded
    when asked for (empty otherwise).

    A named tuple, not a frozen dataclass: a full build of 10,000 messages
    makes some 40,000 of these (derived in a worker, sent back, stored, read
    again for the month pages), and a frozen dataclass's ``__init__`` sets
    each of the 16 fields through ``object.__setattr__`` (2.3 µs an object
    against 0.4 µs); a tuple also pickles as itself.
    """

    archive_id: int
    list_id: int
    msgid_hash: str
    message_id: str
    thread: str  # Message-ID-Hash of the thread's topmost message (which may be missing)
    parent: str  # Message-ID of the nearest archived ancestor, or ""
    refs: tuple[str, ...]
    date: float
    month: str  # YYYY-MM (UTC)
    subject: str
    nsubject: str  # normalised for subject threading
    author: str
    snippet: str
    search: str
    attachments: int
    mbox: bytes = b""
