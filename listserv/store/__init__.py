"""All state, and all SQL: lists, members, bans, received mail, the delivery queue.

One module per concern, each a part of ``Store`` with the SQL of that concern:
``lists`` (lists, members, bans), ``incoming`` (the group commit, received
mail, held posts), ``queue`` (outbox and deliveries), ``people`` (bounces,
tokens, consent, reply limits, GDPR), ``archive`` (the archive index),
``status`` (the operator's view, backup), ``work`` (stage leases, the
archive's queue), ``digests`` (posts waiting for a digest, digests queued).  ``base`` holds the connections and
migrations, ``schema`` the versioned schema, ``records`` the frozen records.

SQLite in WAL mode through aiosqlite.  The schema is versioned with ``PRAGMA
user_version``; ``MIGRATIONS[i]`` takes the database from version i to i+1.

Two connections: a writer, whose transactions are serialised by a lock (one
aiosqlite connection cannot hold two transactions at once), and a reader for
the lookups made while an SMTP client waits, so that a lookup never queues
behind a commit.  Received mail goes through ``submit_incoming``, a group
commit: sessions that finish DATA at the same moment share one transaction and
one fsync (``synchronous=FULL``), and each is answered only after that commit.

The handoff between the stages is in the tables:
``incoming`` (what arrived; posts carry a status: accepted, held, discarded,
rejected, queued) -> ``outbox`` (one rewritten, signed message) ->
``deliveries`` (one row per recipient of that message: pending, sent, failed).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from listserv.store.archive import ArchivePart
from listserv.store.base import is_url
from listserv.store.digests import DigestCopy, DigestEntry, DigestsPart, DigestState, next_number
from listserv.store.people import PeoplePart
from listserv.store.queue import QueuePart
from listserv.store.records import (
    DELIVERY_MODES,
    DELIVERY_STATES,
    DIGEST_MODES,
    ROLES,
    DigestPost,
    Recipient,
    ArchiveEntry,
    BounceState,
    ConsentEvent,
    DueDelivery,
    IncomingRecord,
    IncomingRow,
    ListRecord,
    MemberRecord,
    Outcome,
    PolicySnapshot,
    TokenRecord,
)
from listserv.store.schema import MIGRATIONS
from listserv.store.status import StatusPart
from listserv.store.work import WorkPart

__all__ = [
    "DELIVERY_MODES", "DELIVERY_STATES", "DIGEST_MODES", "DigestCopy", "DigestEntry", "DigestPost", "DigestState", "next_number",
    "MIGRATIONS", "Recipient", "ROLES", "ArchiveEntry", "BounceState", "ConsentEvent", "DueDelivery",
    "IncomingRecord", "IncomingRow", "ListRecord", "MemberRecord", "Outcome", "PolicySnapshot", "PgStore", "Store",
    "TokenRecord", "open_store",
]


class Store(QueuePart, PeoplePart, DigestsPart, ArchivePart, StatusPart, WorkPart):
    """The state database: every part over one pair of connections.  Open with ``await open_store(target)``."""


def pg_store_class() -> Any:
    """``PgStore``, made on first use: importing psycopg for every CLI command cost 0.1 s."""
    cls = globals().get("_PgStore")
    if cls is None:
        from listserv.store.pg import PgBase

        class PgStore(PgBase, Store):
            """The same parts on PostgreSQL (listserv.store.pg): several nodes, one state."""

        PgStore.__qualname__ = "PgStore"
        cls = globals()["_PgStore"] = PgStore
    return cls


def __getattr__(name: str) -> Any:
    if name == "PgStore":
        return pg_store_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


async def open_store(target: Path | str) -> Store:
    """The store at ``Config.store_target``: a SQLite file, or a ``postgresql://`` URL."""
    if is_url(target):
        store: Store = await pg_store_class().open_url(str(target))
        return store
    return await Store.open(Path(target))
