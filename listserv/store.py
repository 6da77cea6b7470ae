"""All state, and all SQL: lists, members, bans, received mail, the delivery queue.

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

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiosqlite

from listserv.errors import DuplicateError, StoreError, UnknownList

__all__ = ["Store"]

MIGRATIONS: tuple[str, ...] = (
    # 0 -> 1: the core pipeline.
    """
    CREATE TABLE lists (
        id          INTEGER PRIMARY KEY,
        name        TEXT NOT NULL UNIQUE,
        settings    TEXT NOT NULL DEFAULT '{}',   -- JSON: this list's overrides
        created_at  REAL NOT NULL
    );
    CREATE TABLE members (
        id            INTEGER PRIMARY KEY,
        list_id       INTEGER NOT NULL REFERENCES lists(id) ON DELETE CASCADE,
        address       TEXT NOT NULL,
        display_name  TEXT NOT NULL DEFAULT '',
        organisation  TEXT NOT NULL DEFAULT '',
        role          TEXT NOT NULL DEFAULT 'member',   -- member | moderator | owner
        moderated     INTEGER NOT NULL DEFAULT 0,
        delivery      TEXT NOT NULL DEFAULT 'enabled',  -- enabled | disabled | nomail
        created_at    REAL NOT NULL,
        UNIQUE (list_id, address)
    );
    CREATE INDEX members_by_address ON members(address);
    CREATE TABLE bans (
        id          INTEGER PRIMARY KEY,
        list_id     INTEGER NOT NULL DEFAULT 0,  -- 0: site-wide
        pattern     TEXT NOT NULL,
        created_at  REAL NOT NULL,
        UNIQUE (list_id, pattern)
    );
    CREATE TABLE incoming (
        id           INTEGER PRIMARY KEY,
        list_id      INTEGER NOT NULL,
        kind         TEXT NOT NULL,   -- post | request | join | leave | confirm | owner | bounces
        detail       TEXT NOT NULL DEFAULT '',  -- the +suffix of the address (token, VERP)
        mail_from    TEXT NOT NULL,
        rcpt         TEXT NOT NULL,
        peer         TEXT NOT NULL DEFAULT '',
        received_at  REAL NOT NULL,
        message_id   TEXT NOT NULL DEFAULT '',
        sender       TEXT NOT NULL DEFAULT '',
        subject      TEXT NOT NULL DEFAULT '',
        status       TEXT NOT NULL,
        reason       TEXT NOT NULL DEFAULT '',
        notified     INTEGER NOT NULL DEFAULT 0,
        updated_at   REAL NOT NULL,
        data         BLOB NOT NULL
    );
    CREATE INDEX incoming_by_status ON incoming(status, id);
    CREATE TABLE outbox (
        id             INTEGER PRIMARY KEY,
        list_id        INTEGER NOT NULL,
        incoming_id    INTEGER,          -- the post or owner mail this copy is for
        kind           TEXT NOT NULL,    -- post | owner | notice
        envelope_from  TEXT NOT NULL,
        created_at     REAL NOT NULL,
        data           BLOB NOT NULL
    );
    CREATE TABLE deliveries (
        id               INTEGER PRIMARY KEY,
        outbox_id        INTEGER NOT NULL REFERENCES outbox(id) ON DELETE CASCADE,
        recipient        TEXT NOT NULL,
        status           TEXT NOT NULL DEFAULT 'pending',  -- pending | sent | failed
        attempts         INTEGER NOT NULL DEFAULT 0,
        next_attempt_at  REAL NOT NULL,
        last_reply       TEXT NOT NULL DEFAULT '',
        updated_at       REAL NOT NULL
    );
    CREATE INDEX deliveries_pending ON deliveries(outbox_id, id) WHERE status = 'pending';
    CREATE INDEX deliveries_by_outbox ON deliveries(outbox_id, status);
    """,
    # 1 -> 2: remember which of the config's [[lists]] were created, so a list
    # the administrator removed is not brought back at the next start.
    """
    CREATE TABLE seeded_lists (
        name        TEXT PRIMARY KEY,
        created_at  REAL NOT NULL
    );
    INSERT INTO seeded_lists (name, created_at) SELECT name, created_at FROM lists;
    """,
    # 2 -> 3: the archive's source of truth (the archive stage renders from
    # it; posts as distributed, before the per-copy signature), and what the
    # e-mail commands need: tokens, the consent record, reply rate limits.
    """
    CREATE TABLE archive (
        id           INTEGER PRIMARY KEY,
        list_id      INTEGER NOT NULL,
        message_id   TEXT NOT NULL,
        msgid_hash   TEXT NOT NULL,     -- base32(sha1(Message-ID)), the URL key
        received_at  REAL NOT NULL,
        source       TEXT NOT NULL,     -- post | import
        removed      INTEGER NOT NULL DEFAULT 0,
        data         BLOB NOT NULL,
        UNIQUE (list_id, msgid_hash)
    );
    CREATE TABLE tokens (
        token        TEXT PRIMARY KEY,
        list_id      INTEGER NOT NULL,
        address      TEXT NOT NULL,
        action       TEXT NOT NULL,     -- join | leave | moderate
        payload      TEXT NOT NULL DEFAULT '{}',
        created_at   REAL NOT NULL,
        expires_at   REAL NOT NULL,
        used_at      REAL,
        used_by      TEXT NOT NULL DEFAULT ''
    );
    CREATE INDEX tokens_by_address ON tokens(address, list_id, action);
    CREATE TABLE consent_events (
        id         INTEGER PRIMARY KEY,
        list_name  TEXT NOT NULL,       -- kept by name: the record outlives the list
        address    TEXT NOT NULL,
        event      TEXT NOT NULL,       -- joined | left | changed | forgotten
        method     TEXT NOT NULL,       -- email | cli | import | bounce | web
        detail     TEXT NOT NULL DEFAULT '',
        at         REAL NOT NULL
    );
    CREATE INDEX consent_by_address ON consent_events(address);
    CREATE TABLE autoreplies (
        id       INTEGER PRIMARY KEY,
        address  TEXT NOT NULL,
        list_id  INTEGER NOT NULL,
        kind     TEXT NOT NULL,          -- confirm | reply | notice
        at       REAL NOT NULL
    );
    CREATE INDEX autoreplies_by_address ON autoreplies(address, at);
    CREATE TABLE accepted_senders (
        list_id     INTEGER NOT NULL,
        address     TEXT NOT NULL,
        created_at  REAL NOT NULL,
        PRIMARY KEY (list_id, address)
    );
    """,
    # 3 -> 4: what the archive derived from each message (thread, texts with
    # addresses hidden, its mbox entry), so an incremental update reads only
    # the rows of one thread and one month.  Rebuilt by `archive build --full`.
    """
    CREATE TABLE archive_meta (
        archive_id   INTEGER PRIMARY KEY,   -- archive.id
        list_id      INTEGER NOT NULL,
        msgid_hash   TEXT NOT NULL,
        message_id   TEXT NOT NULL,
        thread       TEXT NOT NULL,          -- Message-ID-Hash of the thread's topmost message
        parent       TEXT NOT NULL DEFAULT '',
        refs         TEXT NOT NULL DEFAULT '',  -- References, one per line
        date         REAL NOT NULL,
        month        TEXT NOT NULL,          -- YYYY-MM
        subject      TEXT NOT NULL,
        nsubject     TEXT NOT NULL,
        author       TEXT NOT NULL,
        snippet      TEXT NOT NULL,
        search       TEXT NOT NULL,
        attachments  INTEGER NOT NULL DEFAULT 0,
        mbox         BLOB NOT NULL
    );
    CREATE INDEX archive_meta_thread ON archive_meta(list_id, thread);
    CREATE INDEX archive_meta_month ON archive_meta(list_id, month, date);
    CREATE INDEX archive_meta_date ON archive_meta(list_id, date);
    CREATE INDEX archive_meta_msgid ON archive_meta(list_id, message_id);
    CREATE INDEX archive_meta_subject ON archive_meta(list_id, nsubject, date);
    CREATE TABLE archive_refs (
        list_id     INTEGER NOT NULL,
        ref         TEXT NOT NULL,
        archive_id  INTEGER NOT NULL
    );
    CREATE INDEX archive_refs_by_ref ON archive_refs(list_id, ref);
    CREATE INDEX archive_refs_by_id ON archive_refs(archive_id);
    CREATE TABLE archive_months (
        list_id  INTEGER NOT NULL,
        month    TEXT NOT NULL,
        count    INTEGER NOT NULL,
        PRIMARY KEY (list_id, month)
    ) WITHOUT ROWID;
    """,
    # 4 -> 5: bounces.  Every bounce read (or refusal at delivery) is an
    # event; only the member's own failures raise their score.
    """
    CREATE TABLE bounce_events (
        id          INTEGER PRIMARY KEY,
        list_id     INTEGER NOT NULL,
        address     TEXT NOT NULL,
        at          REAL NOT NULL,
        kind        TEXT NOT NULL,              -- permanent | temporary
        cause       TEXT NOT NULL,
        status      TEXT NOT NULL DEFAULT '',
        diagnostic  TEXT NOT NULL DEFAULT '',
        source      TEXT NOT NULL,              -- dsn | relay
        counted     INTEGER NOT NULL DEFAULT 0  -- 1: it raised the member's score
    );
    CREATE INDEX bounce_events_by_address ON bounce_events(list_id, address, at);
    ALTER TABLE members ADD COLUMN bounce_score REAL NOT NULL DEFAULT 0;
    ALTER TABLE members ADD COLUMN bounce_scored_at REAL;
    ALTER TABLE members ADD COLUMN bounce_reason TEXT NOT NULL DEFAULT '';
    ALTER TABLE members ADD COLUMN disabled_at REAL;
    ALTER TABLE members ADD COLUMN warnings_sent INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE members ADD COLUMN warned_at REAL;
    """,
)

ROLES = ("member", "moderator", "owner")
DELIVERY_STATES = ("enabled", "disabled", "nomail")


@dataclass(frozen=True, slots=True)
class ListRecord:
    id: int
    name: str
    settings_json: str
    created_at: float


@dataclass(frozen=True, slots=True)
class MemberRecord:
    address: str
    display_name: str
    organisation: str
    role: str
    moderated: bool
    delivery: str
    created_at: float


@dataclass(frozen=True, slots=True)
class PolicySnapshot:
    """What the posting rules need from the store, read in one query."""

    list_id: int
    settings_json: str
    role: str | None
    moderated: bool
    ban_patterns: tuple[str, ...]
    always_accept: bool = False


@dataclass(frozen=True, slots=True)
class IncomingRow:
    list_id: int
    kind: str
    detail: str
    mail_from: str
    rcpt: str
    peer: str
    message_id: str
    sender: str
    subject: str
    status: str
    reason: str
    data: bytes


@dataclass(frozen=True, slots=True)
class IncomingRecord:
    id: int
    list_id: int
    list_name: str
    kind: str
    detail: str
    mail_from: str
    rcpt: str
    received_at: float
    message_id: str
    sender: str
    subject: str
    status: str
    reason: str
    data: bytes


@dataclass(frozen=True, slots=True)
class DueDelivery:
    id: int
    outbox_id: int
    recipient: str
    attempts: int
    first_attempt_at: float  # when the copy was queued (for the retry period)
    kind: str = "post"  # the outbox kind: post | post-verp | post-personal | owner | notice


@dataclass(frozen=True, slots=True)
class BounceState:
    address: str
    score: float
    scored_at: float | None
    reason: str
    delivery: str
    disabled_at: float | None
    warnings_sent: int
    warned_at: float | None


@dataclass(frozen=True, slots=True)
class TokenRecord:
    token: str
    list_id: int
    address: str
    action: str  # join | leave | moderate
    payload: dict[str, Any]
    created_at: float
    expires_at: float
    used_at: float | None
    used_by: str


_TOKEN_COLS = "token, list_id, address, action, payload, created_at, expires_at, used_at, used_by"


def _token(r: Any) -> TokenRecord:
    return TokenRecord(r[0], r[1], r[2], r[3], json.loads(r[4] or "{}"), r[5], r[6], r[7], r[8])


@dataclass(frozen=True, slots=True)
class ConsentEvent:
    list_name: str
    address: str
    event: str
    method: str
    detail: str
    at: float


async def _consent(db: aiosqlite.Connection, list_name: str, address: str, event: str, method: str,
                   detail: str) -> None:
    await db.execute(
        "INSERT INTO consent_events (list_name, address, event, method, detail, at) VALUES (?, ?, ?, ?, ?, ?)",
        (list_name, address, event, method, detail, _now()),
    )


@dataclass(frozen=True, slots=True)
class ArchiveEntry:
    """One message for the archive, stored with the post that is queued."""

    message_id: str
    msgid_hash: str
    data: bytes
    source: str = "post"


@dataclass(frozen=True, slots=True)
class Outcome:
    """What happened to one delivery attempt."""

    delivery_id: int
    status: str  # "sent" | "failed" | "pending" (retry later)
    reply: str
    next_attempt_at: float = 0.0


def _now() -> float:
    return time.time()


class Store:
    """The state database.  Open with ``await Store.open(path)``."""

    def __init__(self, writer: aiosqlite.Connection, reader: aiosqlite.Connection, path: Path) -> None:
        self.path = path
        self._writer = writer
        self._reader = reader
        self._lock = asyncio.Lock()
        self._pending: list[tuple[Sequence[IncomingRow], asyncio.Future[None]]] = []
        self._commit_wakeup = asyncio.Event()
        self._committer: asyncio.Task[None] | None = None
        self._closed = False

    # -- lifecycle ---------------------------------------------------------

    @classmethod
    async def open(cls, path: Path) -> Store:
        path.parent.mkdir(parents=True, exist_ok=True)
        opened: list[aiosqlite.Connection] = []
        try:
            opened.append(await _connect(path))
            opened.append(await _connect(path))
            store = cls(opened[0], opened[1], path)
            await store._migrate()
        except BaseException as exc:
            # aiosqlite's threads are not daemons: a connection left open
            # would keep a failed CLI command from ever exiting.
            for conn in opened:
                await _close_quietly(conn)
            if isinstance(exc, StoreError) or not isinstance(exc, Exception):
                raise
            raise StoreError(f"cannot open the state database {path}: {exc}") from exc
        return store

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._committer is not None:
            # Let the group commit finish what it holds first: those clients
            # are still owed an answer.  It exits once nothing is pending.
            self._commit_wakeup.set()
            try:
                await asyncio.wait_for(asyncio.shield(self._committer), 30)
            except (TimeoutError, asyncio.CancelledError):
                self._committer.cancel()
        for _, fut in self._pending:
            if not fut.done():
                fut.set_exception(StoreError("store closed"))
        await self._reader.close()
        await self._writer.close()

    async def _migrate(self) -> None:
        async with self._lock:
            async with self._writer.execute("PRAGMA user_version") as cur:
                row = await cur.fetchone()
            version = int(row[0]) if row else 0
            if version > len(MIGRATIONS):
                raise StoreError(
                    f"{self.path} has schema version {version}, newer than this listserv "
                    f"knows ({len(MIGRATIONS)}); upgrade listserv"
                )
            for target in range(version, len(MIGRATIONS)):
                await self._writer.execute("BEGIN IMMEDIATE")
                try:
                    for statement in _split_sql(MIGRATIONS[target]):
                        await self._writer.execute(statement)
                    await self._writer.execute(f"PRAGMA user_version = {target + 1}")
                    await self._writer.commit()
                except BaseException:
                    await self._writer.rollback()
                    raise

    @contextlib.asynccontextmanager
    async def transaction(self) -> AsyncIterator[aiosqlite.Connection]:
        """One write transaction; commits on success, rolls back on error."""
        async with self._lock:
            await self._writer.execute("BEGIN IMMEDIATE")
            try:
                yield self._writer
            except BaseException:
                await self._writer.rollback()
                raise
            await self._writer.commit()

    async def _fetchall(self, sql: str, params: Sequence[Any] = ()) -> list[aiosqlite.Row]:
        # One hop to the reader's thread, the statement run to completion
        # there: a statement left open between hops would pin an old read
        # snapshot for every other query on this connection.
        return list(await self._reader.execute_fetchall(sql, params))

    async def _fetchone(self, sql: str, params: Sequence[Any] = ()) -> aiosqlite.Row | None:
        rows = await self._reader.execute_fetchall(sql, params)
        for row in rows:
            return row
        return None

    # -- lists ---------------------------------------------------------------

    async def seeded_names(self) -> set[str]:
        return {r[0] for r in await self._fetchall("SELECT name FROM seeded_lists")}

    async def create_list(
        self, name: str, settings: dict[str, Any], owners: Iterable[str], *, seeded: bool = False
    ) -> int:
        async with self.transaction() as db:
            async with db.execute("SELECT 1 FROM lists WHERE name = ?", (name,)) as cur:
                if await cur.fetchone():
                    raise DuplicateError(f"list {name!r} exists already")
            cur2 = await db.execute(
                "INSERT INTO lists (name, settings, created_at) VALUES (?, ?, ?)",
                (name, json.dumps(settings, ensure_ascii=False), _now()),
            )
            list_id = cur2.lastrowid
            assert list_id is not None
            if seeded:
                await db.execute(
                    "INSERT OR IGNORE INTO seeded_lists (name, created_at) VALUES (?, ?)", (name, _now())
                )
            await db.executemany(
                "INSERT INTO members (list_id, address, role, created_at) VALUES (?, ?, 'owner', ?)",
                [(list_id, owner, _now()) for owner in dict.fromkeys(owners)],
            )
            return list_id

    async def get_list(self, name: str) -> ListRecord:
        row = await self._fetchone("SELECT id, name, settings, created_at FROM lists WHERE name = ?", (name,))
        if row is None:
            raise UnknownList(f"no list named {name!r}")
        return ListRecord(row[0], row[1], row[2], row[3])

    async def get_list_by_id(self, list_id: int) -> ListRecord:
        row = await self._fetchone("SELECT id, name, settings, created_at FROM lists WHERE id = ?", (list_id,))
        if row is None:
            raise UnknownList(f"no list with id {list_id}")
        return ListRecord(row[0], row[1], row[2], row[3])

    async def lists(self) -> list[ListRecord]:
        rows = await self._fetchall("SELECT id, name, settings, created_at FROM lists ORDER BY name")
        return [ListRecord(r[0], r[1], r[2], r[3]) for r in rows]

    async def list_names(self) -> set[str]:
        return {r[0] for r in await self._fetchall("SELECT name FROM lists")}

    async def list_counts(self) -> dict[str, int]:
        rows = await self._fetchall(
            "SELECT l.name, count(m.id) FROM lists l LEFT JOIN members m ON m.list_id = l.id GROUP BY l.id"
        )
        return {r[0]: r[1] for r in rows}

    async def remove_list(self, name: str) -> None:
        async with self.transaction() as db:
            cur = await db.execute("SELECT id FROM lists WHERE name = ?", (name,))
            row = await cur.fetchone()
            if row is None:
                raise UnknownList(f"no list named {name!r}")
            list_id = row[0]
            # Mail already accepted for the list is still delivered; only its
            # definition, members and bans go.  The consent record stays.
            await db.execute(
                "INSERT INTO consent_events (list_name, address, event, method, detail, at)"
                " SELECT ?, address, 'left', 'cli', 'the list was removed', ? FROM members WHERE list_id = ?",
                (name, _now(), list_id),
            )
            await db.execute("DELETE FROM members WHERE list_id = ?", (list_id,))
            await db.execute("DELETE FROM accepted_senders WHERE list_id = ?", (list_id,))
            # Its held posts can no longer be decided on: they are discarded,
            # with the reason recorded, rather than left to a list that is gone.
            await db.execute(
                "UPDATE incoming SET status = 'discarded', reason = 'the list was removed', updated_at = ?"
                " WHERE list_id = ? AND status IN ('held', 'new')",
                (_now(), list_id),
            )
            await db.execute("DELETE FROM bans WHERE list_id = ?", (list_id,))
            await db.execute("DELETE FROM lists WHERE id = ?", (list_id,))

    async def set_list_setting(self, name: str, key: str, value: Any) -> None:
        """Change one stored override in place (no read-modify-write race with another CLI)."""
        async with self.transaction() as db:
            cur = await db.execute(
                "UPDATE lists SET settings = json_set(settings, '$.' || ?, json(?)) WHERE name = ?",
                (key, json.dumps(value, ensure_ascii=False), name),
            )
            if cur.rowcount == 0:
                raise UnknownList(f"no list named {name!r}")

    async def set_list_settings(self, name: str, overrides: dict[str, Any]) -> None:
        """Replace a list's stored overrides (already validated by the caller)."""
        async with self.transaction() as db:
            cur = await db.execute(
                "UPDATE lists SET settings = ? WHERE name = ?",
                (json.dumps(overrides, ensure_ascii=False), name),
            )
            if cur.rowcount == 0:
                raise UnknownList(f"no list named {name!r}")

    # -- members -------------------------------------------------------------

    async def add_members(
        self, list_name: str, members: Sequence[tuple[str, str, str]], role: str = "member", *,
        method: str = "cli", detail: str = "",
    ) -> int:
        """Add (address, display name, organisation) rows; all or nothing."""
        if role not in ROLES:
            raise StoreError(f"role must be one of {', '.join(ROLES)}")
        lst = await self.get_list(list_name)
        seen: set[str] = set()
        for address, _, _ in members:
            if address in seen:
                raise DuplicateError(f"{address} is given twice")
            seen.add(address)
        async with self.transaction() as db:
            existing: set[str] = set()
            async with db.execute("SELECT address FROM members WHERE list_id = ?", (lst.id,)) as cur:
                async for row in cur:
                    existing.add(row[0])
            dupes = sorted(seen & existing)
            if dupes:
                more = f" (and {len(dupes) - 1} more)" if len(dupes) > 1 else ""
                raise DuplicateError(f"{dupes[0]} is already a member of {list_name}{more}")
            now = _now()
            await db.executemany(
                "INSERT INTO members (list_id, address, display_name, organisation, role, created_at)"
                " VALUES (?, ?, ?, ?, ?, ?)",
                [(lst.id, a, n, o, role, now) for a, n, o in members],
            )
            await db.executemany(
                "INSERT INTO consent_events (list_name, address, event, method, detail, at)"
                " VALUES (?, ?, 'joined', ?, ?, ?)",
                [(list_name, a, method, detail, now) for a, _, _ in members],
            )
        return len(members)

    async def remove_members(
        self, list_name: str, addresses: Sequence[str], *, method: str = "cli", detail: str = ""
    ) -> None:
        lst = await self.get_list(list_name)
        async with self.transaction() as db:
            for address in addresses:
                cur = await db.execute(
                    "DELETE FROM members WHERE list_id = ? AND address = ?", (lst.id, address)
                )
                if cur.rowcount == 0:
                    raise StoreError(f"{address} is not a member of {list_name}")
                await _consent(db, list_name, address, "left", method, detail)

    async def members(self, list_name: str) -> list[MemberRecord]:
        lst = await self.get_list(list_name)
        rows = await self._fetchall(
            "SELECT address, display_name, organisation, role, moderated, delivery, created_at"
            " FROM members WHERE list_id = ? ORDER BY address",
            (lst.id,),
        )
        return [MemberRecord(r[0], r[1], r[2], r[3], bool(r[4]), r[5], r[6]) for r in rows]

    async def set_member(self, list_name: str, address: str, key: str, value: Any) -> None:
        columns = {"role": "role", "moderated": "moderated", "delivery": "delivery",
                   "display_name": "display_name", "organisation": "organisation"}
        if key not in columns:
            raise StoreError(f"unknown member setting {key!r}; known: {', '.join(columns)}")
        lst = await self.get_list(list_name)
        async with self.transaction() as db:
            cur = await db.execute(
                f"UPDATE members SET {columns[key]} = ? WHERE list_id = ? AND address = ?",
                (value, lst.id, address),
            )
            if cur.rowcount == 0:
                raise StoreError(f"{address} is not a member of {list_name}")

    async def recipients(self, list_id: int) -> list[str]:
        rows = await self._fetchall(
            "SELECT address FROM members WHERE list_id = ? AND delivery = 'enabled' ORDER BY address",
            (list_id,),
        )
        return [r[0] for r in rows]

    async def staff(self, list_id: int) -> list[str]:
        """Owners and moderators: who is told about held posts."""
        rows = await self._fetchall(
            "SELECT address FROM members WHERE list_id = ? AND role IN ('owner', 'moderator') ORDER BY address",
            (list_id,),
        )
        return [r[0] for r in rows]

    async def owners(self, list_id: int) -> list[str]:
        rows = await self._fetchall(
            "SELECT address FROM members WHERE list_id = ? AND role = 'owner' ORDER BY address", (list_id,)
        )
        return [r[0] for r in rows]

    # -- bans ----------------------------------------------------------------

    async def _list_id_or_site(self, list_name: str | None) -> int:
        return 0 if list_name is None else (await self.get_list(list_name)).id

    async def add_ban(self, pattern: str, list_name: str | None) -> None:
        list_id = await self._list_id_or_site(list_name)
        async with self.transaction() as db:
            try:
                await db.execute(
                    "INSERT INTO bans (list_id, pattern, created_at) VALUES (?, ?, ?)",
                    (list_id, pattern, _now()),
                )
            except aiosqlite.IntegrityError:
                raise DuplicateError(f"{pattern} is banned already") from None

    async def remove_ban(self, pattern: str, list_name: str | None) -> None:
        list_id = await self._list_id_or_site(list_name)
        async with self.transaction() as db:
            cur = await db.execute("DELETE FROM bans WHERE list_id = ? AND pattern = ?", (list_id, pattern))
            if cur.rowcount == 0:
                raise StoreError(f"{pattern} is not banned {'site-wide' if list_name is None else 'on ' + list_name}")

    async def bans(self, list_name: str | None) -> list[str]:
        list_id = await self._list_id_or_site(list_name)
        rows = await self._fetchall("SELECT pattern FROM bans WHERE list_id = ? ORDER BY pattern", (list_id,))
        return [r[0] for r in rows]

    # -- receiving -------------------------------------------------------------

    async def policy_snapshot(self, list_name: str, sender: str) -> PolicySnapshot | None:
        """The list, the sender's membership and the ban patterns, in one read."""
        row = await self._fetchone(
            "SELECT l.id, l.settings, m.role, m.moderated,"
            " (SELECT group_concat(pattern, char(10)) FROM bans b WHERE b.list_id IN (0, l.id)),"
            " EXISTS (SELECT 1 FROM accepted_senders a WHERE a.list_id = l.id AND a.address = ?)"
            " FROM lists l LEFT JOIN members m ON m.list_id = l.id AND m.address = ?"
            " WHERE l.name = ?",
            (sender, sender, list_name),
        )
        if row is None:
            return None
        return PolicySnapshot(
            list_id=row[0],
            settings_json=row[1],
            role=row[2],
            moderated=bool(row[3]),
            ban_patterns=tuple(row[4].split("\n")) if row[4] else (),
            always_accept=bool(row[5]),
        )

    async def submit_incoming(self, rows: Sequence[IncomingRow]) -> None:
        """Store received mail durably; returns only after the commit.

        Concurrent callers are committed together (group commit), so many
        sessions share one transaction and one fsync.
        """
        if self._closed:
            raise StoreError("store closed")
        if self._committer is None:
            self._committer = asyncio.create_task(self._commit_loop(), name="store-group-commit")
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._pending.append((rows, fut))
        self._commit_wakeup.set()
        await fut

    async def _commit_loop(self) -> None:
        while True:
            await self._commit_wakeup.wait()
            self._commit_wakeup.clear()
            batch, self._pending = self._pending, []
            if not batch:
                if self._closed:
                    return
                continue
            now = _now()
            params = [
                (r.list_id, r.kind, r.detail, r.mail_from, r.rcpt, r.peer, now, r.message_id, r.sender,
                 r.subject, r.status, r.reason, now, r.data)
                for rows, _ in batch
                for r in rows
            ]
            try:
                async with self.transaction() as db:
                    await db.executemany(
                        "INSERT INTO incoming (list_id, kind, detail, mail_from, rcpt, peer, received_at,"
                        " message_id, sender, subject, status, reason, updated_at, data)"
                        " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                        params,
                    )
            except Exception as exc:  # every waiting client gets a 451
                for _, fut in batch:
                    if not fut.done():
                        fut.set_exception(exc)
                continue
            for _, fut in batch:
                if not fut.done():
                    fut.set_result(None)
            if self._closed and not self._pending:
                return

    # -- the worker's view of incoming mail -------------------------------------

    _INCOMING_COLS = (
        "i.id, i.list_id, coalesce(l.name, ''), i.kind, i.detail, i.mail_from, i.rcpt, i.received_at,"
        " i.message_id, i.sender, i.subject, i.status, i.reason, i.data"
    )

    def _incoming(self, r: aiosqlite.Row) -> IncomingRecord:
        return IncomingRecord(*r)

    async def incoming_with(self, kind: str, status: str, limit: int = 50, unnotified: bool = False) -> list[IncomingRecord]:
        rows = await self._fetchall(
            f"SELECT {self._INCOMING_COLS} FROM incoming i LEFT JOIN lists l ON l.id = i.list_id"
            f" WHERE i.status = ? AND i.kind = ? {'AND i.notified = 0' if unnotified else ''}"
            " ORDER BY i.id LIMIT ?",
            (status, kind, limit),
        )
        return [self._incoming(r) for r in rows]

    async def unhandled_incoming(self) -> int:
        """Received mail some stage still has to act on (posts to prepare, notices to send, commands)."""
        row = await self._fetchone(
            "SELECT count(*) FROM incoming WHERE status = 'accepted' OR (status = 'held' AND notified = 0)"
            " OR (status = 'new' AND kind IN ('request', 'join', 'leave', 'confirm', 'owner', 'bounces'))"
        )
        return int(row[0]) if row else 0

    async def get_incoming(self, incoming_id: int) -> IncomingRecord:
        row = await self._fetchone(
            f"SELECT {self._INCOMING_COLS} FROM incoming i LEFT JOIN lists l ON l.id = i.list_id WHERE i.id = ?",
            (incoming_id,),
        )
        if row is None:
            raise StoreError(f"no message with id {incoming_id}")
        return self._incoming(row)

    async def held(self, list_name: str | None = None) -> list[IncomingRecord]:
        sql = (
            f"SELECT {self._INCOMING_COLS} FROM incoming i LEFT JOIN lists l ON l.id = i.list_id"
            " WHERE i.kind = 'post' AND i.status = 'held'"
        )
        params: tuple[Any, ...] = ()
        if list_name is not None:
            await self.get_list(list_name)
            sql += " AND l.name = ?"
            params = (list_name,)
        return [self._incoming(r) for r in await self._fetchall(sql + " ORDER BY i.id", params)]

    async def set_incoming_status(
        self, incoming_id: int, status: str, *, expect: str | None = None, reason: str | None = None,
        notified: bool | None = None,
    ) -> None:
        async with self.transaction() as db:
            await self._set_status(db, incoming_id, status, expect=expect, reason=reason, notified=notified)

    async def _set_status(
        self, db: aiosqlite.Connection, incoming_id: int, status: str, *, expect: str | None = None,
        reason: str | None = None, notified: bool | None = None,
    ) -> None:
        sets = ["status = ?", "updated_at = ?"]
        params: list[Any] = [status, _now()]
        if reason is not None:
            sets.append("reason = ?")
            params.append(reason)
        if notified is not None:
            sets.append("notified = ?")
            params.append(int(notified))
        sql = f"UPDATE incoming SET {', '.join(sets)} WHERE id = ?"
        params.append(incoming_id)
        if expect is not None:
            sql += " AND status = ?"
            params.append(expect)
        cur = await db.execute(sql, params)
        if cur.rowcount == 0:
            row = await (await db.execute("SELECT status FROM incoming WHERE id = ?", (incoming_id,))).fetchone()
            if row is None:
                raise StoreError(f"no message with id {incoming_id}")
            raise StoreError(f"message {incoming_id} is not {expect} (it is {row[0]})")

    # -- the outbox and the delivery queue ----------------------------------------

    async def enqueue(
        self,
        *,
        list_id: int,
        kind: str,
        envelope_from: str,
        data: bytes,
        recipients: Sequence[str],
        incoming_id: int | None = None,
        incoming_status: str | None = None,
        incoming_expect: str | None = None,
        mark_notified: bool = False,
        archive: ArchiveEntry | None = None,
    ) -> int:
        """Queue one message for its recipients, and move its source along, atomically.

        Either the copy is queued and the incoming row has its new status, or
        neither happened; so a crash between the two cannot send a post twice
        or lose it.
        """
        async with self.transaction() as db:
            now = _now()
            cur = await db.execute(
                "INSERT INTO outbox (list_id, incoming_id, kind, envelope_from, created_at, data)"
                " VALUES (?, ?, ?, ?, ?, ?)",
                (list_id, incoming_id, kind, envelope_from, now, data),
            )
            outbox_id = cur.lastrowid
            assert outbox_id is not None
            await db.executemany(
                "INSERT INTO deliveries (outbox_id, recipient, next_attempt_at, updated_at) VALUES (?, ?, ?, ?)",
                [(outbox_id, rcpt, now, now) for rcpt in dict.fromkeys(recipients)],
            )
            if incoming_id is not None and (incoming_status is not None or mark_notified):
                row = await (await db.execute("SELECT status FROM incoming WHERE id = ?", (incoming_id,))).fetchone()
                if row is None:
                    raise StoreError(f"no message with id {incoming_id}")
                await self._set_status(
                    db, incoming_id, incoming_status or row[0], expect=incoming_expect,
                    notified=True if mark_notified else None,
                )
            if archive is not None:
                # A duplicate Message-ID keeps the first message (as HyperKitty does).
                await db.execute(
                    "INSERT OR IGNORE INTO archive (list_id, message_id, msgid_hash, received_at, source, data)"
                    " VALUES (?, ?, ?, ?, ?, ?)",
                    (list_id, archive.message_id, archive.msgid_hash, now, archive.source, archive.data),
                )
            return outbox_id

    async def due_deliveries(self, now: float, limit: int, exclude: set[int]) -> list[DueDelivery]:
        """Pending copies whose time has come, oldest message first."""
        rows = await self._fetchall(
            "SELECT d.id, d.outbox_id, d.recipient, d.attempts, o.created_at, o.kind"
            " FROM deliveries d JOIN outbox o ON o.id = d.outbox_id"
            " WHERE d.status = 'pending' AND d.next_attempt_at <= ?"
            " ORDER BY d.outbox_id, d.id LIMIT ?",
            (now, limit + len(exclude)),
        )
        out = [DueDelivery(r[0], r[1], r[2], r[3], r[4], r[5]) for r in rows if r[0] not in exclude]
        return out[:limit]

    async def next_attempt_at(self) -> float | None:
        row = await self._fetchone("SELECT min(next_attempt_at) FROM deliveries WHERE status = 'pending'")
        return float(row[0]) if row and row[0] is not None else None

    async def outbox_list_ref(self, outbox_id: int) -> tuple[int, str]:
        """(list id, list name) of a queued message; the name is "" if the list was removed."""
        row = await self._fetchone(
            "SELECT o.list_id, coalesce(l.name, '') FROM outbox o LEFT JOIN lists l ON l.id = o.list_id"
            " WHERE o.id = ?",
            (outbox_id,),
        )
        if row is None:
            raise StoreError(f"no outbox message {outbox_id}")
        return int(row[0]), str(row[1])

    async def outbox_list(self, outbox_id: int) -> str:
        row = await self._fetchone(
            "SELECT coalesce(l.name, '') FROM outbox o LEFT JOIN lists l ON l.id = o.list_id WHERE o.id = ?",
            (outbox_id,),
        )
        if row is None:
            raise StoreError(f"no outbox message {outbox_id}")
        return str(row[0])

    async def outbox_message(self, outbox_id: int) -> tuple[str, bytes]:
        row = await self._fetchone("SELECT envelope_from, data FROM outbox WHERE id = ?", (outbox_id,))
        if row is None:
            raise StoreError(f"no outbox message {outbox_id}")
        return row[0], bytes(row[1])

    async def record_outcomes(self, outcomes: Sequence[Outcome]) -> None:
        """Store the results of one batch in one transaction."""
        now = _now()
        async with self.transaction() as db:
            await db.executemany(
                "UPDATE deliveries SET status = ?, last_reply = ?, updated_at = ?,"
                " attempts = attempts + 1, next_attempt_at = ? WHERE id = ?",
                [(o.status, o.reply, now, o.next_attempt_at, o.delivery_id) for o in outcomes],
            )

    async def retry_now(self) -> int:
        async with self.transaction() as db:
            cur = await db.execute(
                "UPDATE deliveries SET next_attempt_at = 0 WHERE status = 'pending'"
            )
            return cur.rowcount

    # -- bounces ----------------------------------------------------------------------

    async def record_bounce(
        self, list_id: int, address: str, *, kind: str, cause: str, status: str, diagnostic: str, source: str,
        weight: float, now: float, half_life: float,
    ) -> BounceState | None:
        """Record one bounce; if weight > 0, raise the member's decayed score (once a day at most).

        Returns the member's bounce state after it, or None if not a member.
        """
        async with self.transaction() as db:
            row = await (await db.execute(
                "SELECT bounce_score, bounce_scored_at, delivery FROM members WHERE list_id = ? AND address = ?",
                (list_id, address),
            )).fetchone()
            counted = False
            if row is not None and weight > 0:
                score, scored_at = float(row[0]), row[1]
                # At most one increment per day: a dead mailbox bounces every
                # post, and a busy day must not remove a member at once.
                if scored_at is None or now - float(scored_at) >= 86400:
                    if scored_at is not None:
                        score *= 0.5 ** ((now - float(scored_at)) / half_life)
                    score += weight
                    counted = True
                    await db.execute(
                        "UPDATE members SET bounce_score = ?, bounce_scored_at = ?, bounce_reason = ?"
                        " WHERE list_id = ? AND address = ?",
                        (score, now, f"{status} {cause}: {diagnostic}"[:300], list_id, address),
                    )
            await db.execute(
                "INSERT INTO bounce_events (list_id, address, at, kind, cause, status, diagnostic, source, counted)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (list_id, address, now, kind, cause, status, diagnostic[:500], source, int(counted)),
            )
        return await self.bounce_state(list_id, address)

    async def bounce_state(self, list_id: int, address: str) -> BounceState | None:
        row = await self._fetchone(
            "SELECT address, bounce_score, bounce_scored_at, bounce_reason, delivery, disabled_at, warnings_sent,"
            " warned_at FROM members WHERE list_id = ? AND address = ?",
            (list_id, address),
        )
        return BounceState(*row) if row else None

    async def bounce_states(self, list_id: int | None = None) -> list[tuple[str, BounceState]]:
        sql = (
            "SELECT l.name, m.address, m.bounce_score, m.bounce_scored_at, m.bounce_reason, m.delivery,"
            " m.disabled_at, m.warnings_sent, m.warned_at FROM members m JOIN lists l ON l.id = m.list_id"
            " WHERE (m.bounce_score > 0 OR m.delivery = 'disabled')"
        )
        params: tuple[Any, ...] = ()
        if list_id is not None:
            sql += " AND m.list_id = ?"
            params = (list_id,)
        rows = await self._fetchall(sql + " ORDER BY l.name, m.bounce_score DESC, m.address", params)
        return [(r[0], BounceState(*r[1:])) for r in rows]

    async def disable_for_bounces(self, list_id: int, address: str, now: float) -> bool:
        async with self.transaction() as db:
            cur = await db.execute(
                "UPDATE members SET delivery = 'disabled', disabled_at = ?, warnings_sent = 1, warned_at = ?"
                " WHERE list_id = ? AND address = ? AND delivery = 'enabled'",
                (now, now, list_id, address),
            )
            return cur.rowcount == 1

    async def note_warning(self, list_id: int, address: str, now: float) -> None:
        async with self.transaction() as db:
            await db.execute(
                "UPDATE members SET warnings_sent = warnings_sent + 1, warned_at = ? WHERE list_id = ? AND address = ?",
                (now, list_id, address),
            )

    async def reenable(self, list_id: int, address: str) -> bool:
        async with self.transaction() as db:
            cur = await db.execute(
                "UPDATE members SET delivery = 'enabled', disabled_at = NULL, warnings_sent = 0, warned_at = NULL,"
                " bounce_score = 0, bounce_reason = '' WHERE list_id = ? AND address = ? AND delivery = 'disabled'",
                (list_id, address),
            )
            return cur.rowcount == 1

    async def disabled_members(self) -> list[tuple[int, str, BounceState]]:
        rows = await self._fetchall(
            "SELECT list_id, address, bounce_score, bounce_scored_at, bounce_reason, delivery, disabled_at,"
            " warnings_sent, warned_at FROM members WHERE delivery = 'disabled' AND disabled_at IS NOT NULL"
        )
        return [(r[0], r[1], BounceState(*r[1:])) for r in rows]

    async def policy_bounces_since(self, since: float) -> list[tuple[int, str, int, str]]:
        """Policy refusals (the post's or author's fault) per list: (list_id, status+cause, count, example)."""
        rows = await self._fetchall(
            "SELECT list_id, status, count(*), max(diagnostic) FROM bounce_events"
            " WHERE cause = 'policy' AND at >= ? GROUP BY list_id, status ORDER BY list_id",
            (since,),
        )
        return [(r[0], r[1], r[2], r[3]) for r in rows]

    # -- membership by e-mail: tokens, consent, reply limits ------------------------

    async def member(self, list_id: int, address: str) -> MemberRecord | None:
        row = await self._fetchone(
            "SELECT address, display_name, organisation, role, moderated, delivery, created_at"
            " FROM members WHERE list_id = ? AND address = ?",
            (list_id, address),
        )
        return MemberRecord(row[0], row[1], row[2], row[3], bool(row[4]), row[5], row[6]) if row else None

    async def create_token(
        self, token: str, list_id: int, address: str, action: str, payload: dict[str, Any], expires_at: float
    ) -> None:
        async with self.transaction() as db:
            await db.execute(
                "INSERT INTO tokens (token, list_id, address, action, payload, created_at, expires_at)"
                " VALUES (?, ?, ?, ?, ?, ?, ?)",
                (token, list_id, address, action, json.dumps(payload, ensure_ascii=False), _now(), expires_at),
            )

    async def pending_token(self, list_id: int, address: str, action: str, now: float) -> TokenRecord | None:
        """The newest unused, unexpired token for this address, list and action."""
        row = await self._fetchone(
            f"SELECT {_TOKEN_COLS} FROM tokens WHERE list_id = ? AND address = ? AND action = ?"
            " AND used_at IS NULL AND expires_at > ? ORDER BY created_at DESC LIMIT 1",
            (list_id, address, action, now),
        )
        return _token(row) if row else None

    async def get_token(self, token: str) -> TokenRecord | None:
        row = await self._fetchone(f"SELECT {_TOKEN_COLS} FROM tokens WHERE token = ?", (token,))
        return _token(row) if row else None

    async def use_token(self, token: str, by: str, now: float) -> bool:
        """Spend a token once; False if it was used, expired or never existed."""
        async with self.transaction() as db:
            cur = await db.execute(
                "UPDATE tokens SET used_at = ?, used_by = ? WHERE token = ? AND used_at IS NULL AND expires_at > ?",
                (now, by, token, now),
            )
            return cur.rowcount == 1

    async def spend_tokens_for(self, list_id: int, action: str, key: str, value: Any, by: str, now: float) -> None:
        """Mark every token whose payload[key] == value as used (the other buttons of a notice)."""
        async with self.transaction() as db:
            await db.execute(
                "UPDATE tokens SET used_at = ?, used_by = ? WHERE list_id = ? AND action = ? AND used_at IS NULL"
                " AND json_extract(payload, '$.' || ?) = ?",
                (now, by, list_id, action, key, value),
            )

    async def count_autoreplies(self, since: float, address: str | None = None, kind: str | None = None) -> int:
        sql = "SELECT count(*) FROM autoreplies WHERE at >= ?"
        params: list[Any] = [since]
        if address is not None:
            sql += " AND address = ?"
            params.append(address)
        if kind is not None:
            sql += " AND kind = ?"
            params.append(kind)
        row = await self._fetchone(sql, params)
        return int(row[0]) if row else 0

    async def log_autoreply(self, address: str, list_id: int, kind: str, at: float | None = None) -> None:
        """Note one automatic mail; ``at`` is the caller's clock (the limits compare with it)."""
        async with self.transaction() as db:
            await db.execute(
                "INSERT INTO autoreplies (address, list_id, kind, at) VALUES (?, ?, ?, ?)",
                (address, list_id, kind, _now() if at is None else at),
            )

    async def join(self, list_id: int, address: str, *, method: str, detail: str, display_name: str = "") -> bool:
        """Add a member and record how consent was given; False if already a member."""
        async with self.transaction() as db:
            row = await (await db.execute("SELECT name FROM lists WHERE id = ?", (list_id,))).fetchone()
            if row is None:
                raise UnknownList(f"no list with id {list_id}")
            try:
                await db.execute(
                    "INSERT INTO members (list_id, address, display_name, created_at) VALUES (?, ?, ?, ?)",
                    (list_id, address, display_name, _now()),
                )
            except aiosqlite.IntegrityError:
                return False
            await _consent(db, row[0], address, "joined", method, detail)
            return True

    async def leave(self, list_id: int, address: str, *, method: str, detail: str) -> bool:
        async with self.transaction() as db:
            row = await (await db.execute("SELECT name FROM lists WHERE id = ?", (list_id,))).fetchone()
            if row is None:
                raise UnknownList(f"no list with id {list_id}")
            cur = await db.execute("DELETE FROM members WHERE list_id = ? AND address = ?", (list_id, address))
            if cur.rowcount == 0:
                return False
            await _consent(db, row[0], address, "left", method, detail)
            return True

    async def set_delivery(self, list_id: int, address: str, delivery: str) -> bool:
        async with self.transaction() as db:
            cur = await db.execute(
                "UPDATE members SET delivery = ? WHERE list_id = ? AND address = ?", (delivery, list_id, address)
            )
            return cur.rowcount == 1

    async def consent_history(self, list_name: str, address: str) -> list[ConsentEvent]:
        rows = await self._fetchall(
            "SELECT list_name, address, event, method, detail, at FROM consent_events"
            " WHERE list_name = ? AND address = ? ORDER BY at, id",
            (list_name, address),
        )
        return [ConsentEvent(*r) for r in rows]

    async def change_address(self, list_name: str, old: str, new: str, *, by: str) -> None:
        """Move a member to a new address, keeping role, settings and history."""
        lst = await self.get_list(list_name)
        async with self.transaction() as db:
            if await (await db.execute(
                "SELECT 1 FROM members WHERE list_id = ? AND address = ?", (lst.id, new))).fetchone():
                raise DuplicateError(f"{new} is already a member of {list_name}")
            cur = await db.execute(
                "UPDATE members SET address = ? WHERE list_id = ? AND address = ?", (new, lst.id, old)
            )
            if cur.rowcount == 0:
                raise StoreError(f"{old} is not a member of {list_name}")
            await db.execute(
                "UPDATE consent_events SET address = ? WHERE list_name = ? AND address = ?", (new, list_name, old)
            )
            await _consent(db, list_name, new, "changed", "cli", f"address changed from {old} by {by}")

    async def accept_sender(self, list_id: int, address: str) -> None:
        async with self.transaction() as db:
            await db.execute(
                "INSERT OR IGNORE INTO accepted_senders (list_id, address, created_at) VALUES (?, ?, ?)",
                (list_id, address, _now()),
            )

    async def held_before(self, before: float) -> list[IncomingRecord]:
        rows = await self._fetchall(
            f"SELECT {self._INCOMING_COLS} FROM incoming i LEFT JOIN lists l ON l.id = i.list_id"
            " WHERE i.kind = 'post' AND i.status = 'held' AND i.received_at < ? ORDER BY i.id",
            (before,),
        )
        return [self._incoming(r) for r in rows]

    async def person_export(self, address: str) -> dict[str, Any]:
        """Everything stored about one address (GDPR Art. 15), as plain data."""
        memberships = await self._fetchall(
            "SELECT l.name, m.display_name, m.organisation, m.role, m.moderated, m.delivery, m.created_at"
            " FROM members m JOIN lists l ON l.id = m.list_id WHERE m.address = ? ORDER BY l.name",
            (address,),
        )
        consent = await self._fetchall(
            "SELECT list_name, event, method, detail, at FROM consent_events WHERE address = ? ORDER BY at, id",
            (address,),
        )
        mail = await self._fetchall(
            "SELECT i.id, coalesce(l.name, ''), i.kind, i.status, i.reason, i.subject, i.message_id, i.received_at"
            " FROM incoming i LEFT JOIN lists l ON l.id = i.list_id WHERE i.sender = ? OR i.mail_from = ?"
            " ORDER BY i.id",
            (address, address),
        )
        deliveries = await self._fetchall(
            "SELECT coalesce(l.name, ''), o.kind, d.status, d.attempts, d.last_reply, d.updated_at"
            " FROM deliveries d JOIN outbox o ON o.id = d.outbox_id LEFT JOIN lists l ON l.id = o.list_id"
            " WHERE d.recipient = ? AND d.status != 'sent' ORDER BY d.id",
            (address,),
        )
        tokens = await self._fetchall(
            "SELECT coalesce(l.name, ''), t.action, t.created_at, t.expires_at, t.used_at"
            " FROM tokens t LEFT JOIN lists l ON l.id = t.list_id WHERE t.address = ? ORDER BY t.created_at",
            (address,),
        )
        accepted = await self._fetchall(
            "SELECT l.name, a.created_at FROM accepted_senders a JOIN lists l ON l.id = a.list_id"
            " WHERE a.address = ?", (address,),
        )
        return {
            "address": address,
            "memberships": [
                {"list": r[0], "display_name": r[1], "organisation": r[2], "role": r[3], "moderated": bool(r[4]),
                 "delivery": r[5], "since": r[6]} for r in memberships
            ],
            "consent": [{"list": r[0], "event": r[1], "method": r[2], "detail": r[3], "at": r[4]} for r in consent],
            "messages": [
                {"id": r[0], "list": r[1], "kind": r[2], "status": r[3], "reason": r[4], "subject": r[5],
                 "message_id": r[6], "received_at": r[7]} for r in mail
            ],
            "undelivered": [
                {"list": r[0], "kind": r[1], "status": r[2], "attempts": r[3], "last_reply": r[4], "at": r[5]}
                for r in deliveries
            ],
            "tokens": [
                {"list": r[0], "action": r[1], "created_at": r[2], "expires_at": r[3], "used_at": r[4]}
                for r in tokens
            ],
            "always_accepted_on": [{"list": r[0], "since": r[1]} for r in accepted],
        }

    async def person_forget(self, address: str, *, by: str) -> dict[str, int]:
        """Erase an address everywhere (GDPR Art. 17), keeping only the record that consent ended.

        Held and stored mail from the address is deleted; copies still
        queued for it are dropped; the archive is not touched here (it is
        public, and `archive remove` takes messages down one by one).
        """
        counts: dict[str, int] = {}
        async with self.transaction() as db:
            lists = await (await db.execute(
                "SELECT l.name FROM members m JOIN lists l ON l.id = m.list_id WHERE m.address = ?", (address,)
            )).fetchall()
            for (list_name,) in lists:
                await _consent(db, list_name, address, "left", "cli", f"erased on request (forget) by {by}")
            counts["memberships"] = (await db.execute("DELETE FROM members WHERE address = ?", (address,))).rowcount
            counts["messages"] = (await db.execute(
                "DELETE FROM incoming WHERE sender = ? OR mail_from = ?", (address, address))).rowcount
            counts["pending_copies"] = (await db.execute(
                "DELETE FROM deliveries WHERE recipient = ? AND status != 'sent'", (address,))).rowcount
            await db.execute("UPDATE deliveries SET recipient = '(erased)' WHERE recipient = ?", (address,))
            counts["tokens"] = (await db.execute("DELETE FROM tokens WHERE address = ?", (address,))).rowcount
            await db.execute("DELETE FROM autoreplies WHERE address = ?", (address,))
            await db.execute("DELETE FROM accepted_senders WHERE address = ?", (address,))
            await db.execute("DELETE FROM bans WHERE pattern = ?", (address,))
            # What the law asks to keep: that consent was given and withdrawn,
            # and when; nothing else (the detail texts may quote Message-IDs).
            await db.execute(
                "UPDATE consent_events SET detail = '' WHERE address = ? AND detail NOT LIKE 'erased on request%'",
                (address,),
            )
        return counts

    async def queue_summary(self) -> list[dict[str, Any]]:
        """Per queued message: list, kind, counts by status, oldest pending, last reply."""
        rows = await self._fetchall(
            "SELECT o.id, coalesce(l.name, ''), o.kind, o.created_at,"
            " sum(d.status = 'pending'), sum(d.status = 'sent'), sum(d.status = 'failed'),"
            " min(CASE WHEN d.status = 'pending' THEN d.next_attempt_at END),"
            " max(CASE WHEN d.status = 'pending' AND d.attempts > 0 THEN d.last_reply END)"
            " FROM outbox o JOIN deliveries d ON d.outbox_id = o.id LEFT JOIN lists l ON l.id = o.list_id"
            " GROUP BY o.id HAVING sum(d.status = 'pending') > 0 ORDER BY o.id"
        )
        return [
            {
                "outbox_id": r[0], "list": r[1], "kind": r[2], "queued_at": r[3], "pending": r[4],
                "sent": r[5], "failed": r[6], "next_attempt_at": r[7], "last_reply": r[8] or "",
            }
            for r in rows
        ]

    async def delivery_counts(self, outbox_id: int | None = None) -> dict[str, int]:
        sql = "SELECT status, count(*) FROM deliveries"
        params: tuple[Any, ...] = ()
        if outbox_id is not None:
            sql += " WHERE outbox_id = ?"
            params = (outbox_id,)
        rows = await self._fetchall(sql + " GROUP BY status", params)
        return {r[0]: r[1] for r in rows}

    async def deliveries_for(self, outbox_id: int) -> list[tuple[str, str, str]]:
        rows = await self._fetchall(
            "SELECT recipient, status, last_reply FROM deliveries WHERE outbox_id = ? ORDER BY id", (outbox_id,)
        )
        return [(r[0], r[1], r[2]) for r in rows]


    # -- archive ---------------------------------------------------------------
    # The archive stage's reads and writes.  ``archive`` rows are the source of
    # truth; ``archive_meta`` / ``archive_refs`` / ``archive_months`` are
    # derived and rebuilt by `listserv archive build --full`.  The static
    # ``read_*`` helpers use plain sqlite3 so that build worker processes can
    # read blobs without an event loop.

    from listserv.archive_types import ArchiveMeta as ArchiveMetaT, ArchiveRow as ArchiveRowT

    _META_COLS = (
        "archive_id, list_id, msgid_hash, message_id, thread, parent, refs, date, month, subject, nsubject,"
        " author, snippet, search, attachments"
    )

    @staticmethod
    def _meta(r: Sequence[Any], mbox: bytes = b"") -> ArchiveMetaT:
        from listserv.archive_types import ArchiveMeta

        return ArchiveMeta(
            archive_id=r[0], list_id=r[1], msgid_hash=r[2], message_id=r[3], thread=r[4], parent=r[5],
            refs=tuple(x for x in r[6].split("\n") if x), date=r[7], month=r[8], subject=r[9], nsubject=r[10],
            author=r[11], snippet=r[12], search=r[13], attachments=r[14], mbox=mbox,
        )

    async def archive_index(self, list_id: int) -> list[tuple[int, str, float]]:
        """(row id, Message-ID, received_at) of every message shown in a list's archive."""
        rows = await self._fetchall(
            "SELECT id, message_id, received_at FROM archive WHERE list_id = ? AND removed = 0 ORDER BY id",
            (list_id,),
        )
        return [(r[0], r[1], r[2]) for r in rows]

    async def archive_unbuilt(self, list_id: int) -> list[str]:
        """Message-ID-Hashes of messages not yet in the built archive."""
        rows = await self._fetchall(
            "SELECT a.msgid_hash FROM archive a LEFT JOIN archive_meta m ON m.archive_id = a.id"
            " WHERE a.list_id = ? AND a.removed = 0 AND m.archive_id IS NULL ORDER BY a.id",
            (list_id,),
        )
        return [r[0] for r in rows]

    async def archive_row(self, list_id: int, msgid_hash: str) -> ArchiveRowT | None:
        from listserv.archive_types import ArchiveRow

        r = await self._fetchone(
            "SELECT id, list_id, message_id, msgid_hash, received_at, removed, data FROM archive"
            " WHERE list_id = ? AND msgid_hash = ?",
            (list_id, msgid_hash),
        )
        return None if r is None else ArchiveRow(r[0], r[1], r[2], r[3], r[4], bool(r[5]), bytes(r[6]))

    async def archive_data(self, ids: Sequence[int]) -> dict[int, tuple[str, float, bytes]]:
        out: dict[int, tuple[str, float, bytes]] = {}
        for start in range(0, len(ids), 500):
            chunk = list(ids[start : start + 500])
            rows = await self._fetchall(
                f"SELECT id, message_id, received_at, data FROM archive WHERE id IN ({','.join('?' * len(chunk))})",
                chunk,
            )
            out.update({r[0]: (r[1], r[2], bytes(r[3])) for r in rows})
        return out

    async def archive_import(self, list_id: int, entries: Sequence[tuple[str, str, float, bytes]]) -> int:
        """Add (Message-ID, hash, received_at, data) rows from an imported archive; returns how many were new.

        A Message-ID already in the list's archive keeps its first message.
        """
        async with self.transaction() as db:
            before = db.total_changes
            await db.executemany(
                "INSERT OR IGNORE INTO archive (list_id, message_id, msgid_hash, received_at, source, data)"
                " VALUES (?, ?, ?, ?, 'import', ?)",
                [(list_id, mid, h, at, data) for mid, h, at, data in entries],
            )
            return int(db.total_changes - before)

    async def archive_clear_meta(self, list_id: int) -> None:
        async with self.transaction() as db:
            await db.execute("DELETE FROM archive_meta WHERE list_id = ?", (list_id,))
            await db.execute("DELETE FROM archive_refs WHERE list_id = ?", (list_id,))
            await db.execute("DELETE FROM archive_months WHERE list_id = ?", (list_id,))

    async def archive_put_meta(self, metas: Sequence[ArchiveMetaT], *, count_months: bool = True) -> None:
        """Insert (or replace) derived rows; with count_months the month counts follow."""
        if not metas:
            return
        async with self.transaction() as db:
            ids = [(m.archive_id,) for m in metas]
            if count_months:
                for (aid,) in ids:
                    async with db.execute(
                        "SELECT list_id, month FROM archive_meta WHERE archive_id = ?", (aid,)
                    ) as cur:
                        old = await cur.fetchone()
                    if old is not None:
                        await db.execute(
                            "UPDATE archive_months SET count = count - 1 WHERE list_id = ? AND month = ?",
                            (old[0], old[1]),
                        )
            await db.executemany("DELETE FROM archive_refs WHERE archive_id = ?", ids)
            await db.executemany(
                f"INSERT OR REPLACE INTO archive_meta ({self._META_COLS}, mbox)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [
                    (m.archive_id, m.list_id, m.msgid_hash, m.message_id, m.thread, m.parent, "\n".join(m.refs),
                     m.date, m.month, m.subject, m.nsubject, m.author, m.snippet, m.search, m.attachments, m.mbox)
                    for m in metas
                ],
            )
            await db.executemany(
                "INSERT INTO archive_refs (list_id, ref, archive_id) VALUES (?, ?, ?)",
                [(m.list_id, ref, m.archive_id) for m in metas for ref in dict.fromkeys(m.refs)],
            )
            if count_months:
                await db.executemany(
                    "INSERT INTO archive_months (list_id, month, count) VALUES (?, ?, 1)"
                    " ON CONFLICT (list_id, month) DO UPDATE SET count = count + 1",
                    [(m.list_id, m.month) for m in metas],
                )

    async def archive_recount_months(self, list_id: int) -> None:
        async with self.transaction() as db:
            await db.execute("DELETE FROM archive_months WHERE list_id = ?", (list_id,))
            await db.execute(
                "INSERT INTO archive_months (list_id, month, count)"
                " SELECT list_id, month, count(*) FROM archive_meta WHERE list_id = ? GROUP BY month",
                (list_id,),
            )

    async def archive_set_thread(self, list_id: int, old_threads: Sequence[str], thread: str) -> None:
        async with self.transaction() as db:
            await db.executemany(
                "UPDATE archive_meta SET thread = ? WHERE list_id = ? AND thread = ?",
                [(thread, list_id, old) for old in old_threads],
            )

    async def archive_meta_by_message_ids(self, list_id: int, message_ids: Sequence[str]) -> list[ArchiveMetaT]:
        if not message_ids:
            return []
        ids = list(dict.fromkeys(message_ids))[-200:]
        rows = await self._fetchall(
            f"SELECT {self._META_COLS} FROM archive_meta WHERE list_id = ?"
            f" AND message_id IN ({','.join('?' * len(ids))})",
            (list_id, *ids),
        )
        return [self._meta(r) for r in rows]

    async def archive_meta_referring(self, list_id: int, message_id: str) -> list[ArchiveMetaT]:
        """Messages whose References name this Message-ID (replies that came first)."""
        rows = await self._fetchall(
            f"SELECT {', '.join('m.' + c.strip() for c in self._META_COLS.split(','))}"
            " FROM archive_refs r JOIN archive_meta m ON m.archive_id = r.archive_id"
            " WHERE r.list_id = ? AND r.ref = ?",
            (list_id, message_id),
        )
        return [self._meta(r) for r in rows]

    async def archive_meta_by_subject(self, list_id: int, nsubject: str, before: float) -> ArchiveMetaT | None:
        r = await self._fetchone(
            f"SELECT {self._META_COLS} FROM archive_meta WHERE list_id = ? AND nsubject = ? AND date <= ?"
            " ORDER BY date DESC LIMIT 1",
            (list_id, nsubject, before),
        )
        return None if r is None else self._meta(r)

    async def archive_thread_meta(self, list_id: int, thread: str) -> list[ArchiveMetaT]:
        # Sorted here: with ORDER BY in SQL the planner walks the list's whole
        # date index instead of the thread index (time growing with the archive).
        rows = await self._fetchall(
            f"SELECT {self._META_COLS} FROM archive_meta WHERE list_id = ? AND thread = ?",
            (list_id, thread),
        )
        return sorted((self._meta(r) for r in rows), key=lambda m: (m.date, m.archive_id))

    async def archive_month_meta(self, list_id: int, month: str, *, with_mbox: bool = False) -> list[ArchiveMetaT]:
        cols = self._META_COLS + (", mbox" if with_mbox else "")
        rows = await self._fetchall(
            f"SELECT {cols} FROM archive_meta WHERE list_id = ? AND month = ? ORDER BY date, archive_id",
            (list_id, month),
        )
        return [self._meta(r, bytes(r[15]) if with_mbox else b"") for r in rows]

    async def archive_months(self, list_id: int) -> list[tuple[str, int]]:
        rows = await self._fetchall(
            "SELECT month, count FROM archive_months WHERE list_id = ? AND count > 0 ORDER BY month DESC", (list_id,)
        )
        return [(r[0], r[1]) for r in rows]

    async def archive_latest(self, list_id: int, limit: int) -> list[ArchiveMetaT]:
        rows = await self._fetchall(
            f"SELECT {self._META_COLS} FROM archive_meta WHERE list_id = ? ORDER BY date DESC, archive_id DESC"
            " LIMIT ?",
            (list_id, limit),
        )
        return [self._meta(r) for r in rows]

    async def archive_remove(self, message_id: str) -> list[ArchiveMetaT]:
        """Take a message down from every list's archive (kept in the store, marked removed).

        ``message_id`` may be the Message-ID (with or without <>) or its hash.
        Returns the derived rows that were deleted, so their pages can be
        rewritten; raises StoreError if no archived message matches.
        """
        mid = message_id.strip()
        if mid.startswith("<") and mid.endswith(">"):
            mid = mid[1:-1].strip()
        async with self.transaction() as db:
            async with db.execute(
                "SELECT id FROM archive WHERE message_id IN (?, ?) OR msgid_hash = ?", (mid, f"<{mid}>", mid)
            ) as cur:
                ids = [r[0] for r in await cur.fetchall()]
            if not ids:
                raise StoreError(f"no archived message {message_id}")
            marks = ",".join("?" * len(ids))
            async with db.execute(f"SELECT {self._META_COLS} FROM archive_meta WHERE archive_id IN ({marks})",
                                  ids) as cur:
                metas = [self._meta(r) for r in await cur.fetchall()]
            await db.execute(f"UPDATE archive SET removed = 1 WHERE id IN ({marks})", ids)
            await db.execute(f"DELETE FROM archive_meta WHERE archive_id IN ({marks})", ids)
            await db.execute(f"DELETE FROM archive_refs WHERE archive_id IN ({marks})", ids)
            await db.executemany(
                "UPDATE archive_months SET count = count - 1 WHERE list_id = ? AND month = ?",
                [(m.list_id, m.month) for m in metas],
            )
        return metas

    @staticmethod
    def read_archive_data(path: Path, ids: Sequence[int]) -> dict[int, tuple[str, float, bytes]]:
        """(Message-ID, received_at, data) by row id, read with plain sqlite3 (build workers)."""
        import sqlite3

        out: dict[int, tuple[str, float, bytes]] = {}
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        try:
            for start in range(0, len(ids), 500):
                chunk = list(ids[start : start + 500])
                cur = conn.execute(
                    f"SELECT id, message_id, received_at, data FROM archive WHERE id IN ({','.join('?' * len(chunk))})",
                    chunk,
                )
                out.update({r[0]: (r[1], r[2], bytes(r[3])) for r in cur})
        finally:
            conn.close()
        return out

    @staticmethod
    def read_archive_data_by_hash(path: Path, list_id: int,
                                  hashes: Sequence[str]) -> dict[int, tuple[str, float, bytes]]:
        """Like ``read_archive_data``, by Message-ID-Hash (an import's batch, before it knows row ids)."""
        import sqlite3

        out: dict[int, tuple[str, float, bytes]] = {}
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        try:
            for start in range(0, len(hashes), 500):
                chunk = list(hashes[start : start + 500])
                cur = conn.execute(
                    "SELECT id, message_id, received_at, data FROM archive WHERE list_id = ? AND removed = 0"
                    f" AND msgid_hash IN ({','.join('?' * len(chunk))})",
                    (list_id, *chunk),
                )
                out.update({r[0]: (r[1], r[2], bytes(r[3])) for r in cur})
        finally:
            conn.close()
        return out

    @staticmethod
    def read_month_meta(path: Path, list_id: int, month: str) -> list[ArchiveMetaT]:
        """A month's derived rows with their mbox entries, with plain sqlite3 (build workers)."""
        import sqlite3

        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        try:
            cur = conn.execute(
                f"SELECT {Store._META_COLS}, mbox FROM archive_meta WHERE list_id = ? AND month = ?"
                " ORDER BY date, archive_id",
                (list_id, month),
            )
            return [Store._meta(r, bytes(r[15])) for r in cur]
        finally:
            conn.close()

    # -- operator's view ---------------------------------------------------------
    # What `listserv status` shows, what the fan-out's log lines name, and the
    # online backup.  Delivery rows are counted only for messages queued within
    # `horizon` seconds, through the outbox index, so `status` stays quick on a
    # database with years of copies in it.

    async def _first_outbox_since(self, since: float) -> int:
        row = await self._fetchone("SELECT min(id) FROM outbox WHERE created_at >= ?", (since,))
        return int(row[0]) if row and row[0] is not None else 1 << 62

    async def operator_status(self, now: float, horizon: float) -> dict[str, Any]:
        """Queue depths, the oldest waiting copy, and traffic in the last hour and day.

        ``failed`` and the traffic figures cover messages queued in the last
        ``horizon`` seconds (the caller passes a week plus the retry period).
        """
        hour, day = now - 3600, now - 86400
        first = await self._first_outbox_since(now - horizon)
        incoming = await self._fetchone(
            "SELECT (SELECT count(*) FROM incoming WHERE status IN ('new', 'accepted')),"
            " (SELECT count(*) FROM incoming WHERE status = 'held' AND kind = 'post'),"
            " (SELECT min(received_at) FROM incoming WHERE status IN ('new', 'accepted'))"
        )
        posts = await self._fetchone(
            "SELECT coalesce(sum(received_at >= ?), 0), count(*) FROM incoming"
            " WHERE kind = 'post' AND received_at >= ?",
            (hour, day),
        )
        pending = await self._fetchone(
            "SELECT coalesce(sum(attempts = 0), 0), coalesce(sum(attempts > 0), 0)"
            " FROM deliveries WHERE status = 'pending'"
        )
        done = await self._fetchone(
            "SELECT coalesce(sum(status = 'sent' AND updated_at >= ?), 0),"
            " coalesce(sum(status = 'sent' AND updated_at >= ?), 0),"
            " coalesce(sum(status = 'failed' AND updated_at >= ?), 0),"
            " coalesce(sum(status = 'failed' AND updated_at >= ?), 0),"
            " coalesce(sum(status = 'failed'), 0)"
            " FROM deliveries WHERE outbox_id >= ? AND status IN ('sent', 'failed')",
            (hour, day, hour, day, first),
        )
        oldest = await self._fetchone(
            "SELECT o.id, coalesce(l.name, ''), o.kind, o.created_at, coalesce(i.message_id, '')"
            " FROM deliveries d JOIN outbox o ON o.id = d.outbox_id LEFT JOIN lists l ON l.id = o.list_id"
            " LEFT JOIN incoming i ON i.id = o.incoming_id"
            " WHERE d.status = 'pending' ORDER BY d.outbox_id LIMIT 1"
        )
        assert incoming is not None and posts is not None and pending is not None and done is not None
        return {
            "incoming": incoming[0], "held": incoming[1], "oldest_incoming_at": incoming[2],
            "waiting": pending[0], "retrying": pending[1], "failed": done[4],
            "posts_hour": posts[0], "posts_day": posts[1],
            "sent_hour": done[0], "sent_day": done[1], "bounced_hour": done[2], "bounced_day": done[3],
            "oldest_waiting": None if oldest is None else {
                "outbox_id": oldest[0], "list": oldest[1], "kind": oldest[2], "queued_at": oldest[3],
                "message_id": oldest[4],
            },
        }

    async def recent_errors(self, now: float, horizon: float, limit: int = 5) -> list[dict[str, Any]]:
        """The latest refusals: copies given up, and copies waiting for a retry, newest first."""
        first = await self._first_outbox_since(now - horizon)
        rows = await self._fetchall(
            "SELECT d.updated_at, CASE d.status WHEN 'failed' THEN 'bounced' ELSE 'deferred' END,"
            " d.recipient, d.last_reply, coalesce(l.name, ''), coalesce(i.message_id, '')"
            " FROM deliveries d JOIN outbox o ON o.id = d.outbox_id LEFT JOIN lists l ON l.id = o.list_id"
            " LEFT JOIN incoming i ON i.id = o.incoming_id"
            " WHERE d.outbox_id >= ? AND (d.status = 'failed' OR (d.status = 'pending' AND d.attempts > 0))"
            " ORDER BY d.updated_at DESC, d.id DESC LIMIT ?",
            (first, limit),
        )
        return [
            {"at": r[0], "outcome": r[1], "recipient": r[2], "reply": r[3], "list": r[4], "message_id": r[5]}
            for r in rows
        ]

    async def outbox_list_name(self, outbox_id: int) -> str:
        """The list a queued message belongs to (for the fan-out's log lines)."""
        row = await self._fetchone(
            "SELECT coalesce(l.name, '') FROM outbox o LEFT JOIN lists l ON l.id = o.list_id WHERE o.id = ?",
            (outbox_id,),
        )
        return str(row[0]) if row else ""

    async def backup(self, target: Path) -> None:
        """Write a consistent copy of the whole database to ``target``, which must not exist.

        ``VACUUM INTO`` copies one snapshot: in WAL mode it never blocks the
        server's writes, and a commit made meanwhile is either wholly in the
        copy or not at all.  The copy is written beside the target first and
        linked into place, so ``target`` never holds half a database and an
        existing file is never replaced.
        """
        import os

        target = target.absolute()
        if target.exists():
            raise StoreError(f"{target} exists; backups never overwrite, give a new file name")
        if not target.parent.is_dir():
            raise StoreError(f"{target.parent} is not a directory")
        tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
        try:
            await self._reader.execute("VACUUM INTO ?", (str(tmp),))
            os.chmod(tmp, 0o600)  # member addresses: personal data
            fd = os.open(tmp, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            os.link(tmp, target)  # fails, rather than replaces, if target appeared meanwhile
        except FileExistsError:
            raise StoreError(f"{target} exists; backups never overwrite, give a new file name") from None
        except (OSError, aiosqlite.Error) as exc:
            raise StoreError(f"cannot write the backup {target}: {exc}") from exc
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)


async def _close_quietly(conn: aiosqlite.Connection) -> None:
    with contextlib.suppress(Exception):
        await conn.close()
    # Wait for the worker thread too, so a failing CLI command exits at once.
    thread = getattr(conn, "_thread", None)
    if thread is not None:
        thread.join(5)  # an error path only: blocking briefly is fine


async def _connect(path: Path) -> aiosqlite.Connection:
    conn = await aiosqlite.connect(path, isolation_level=None)
    try:
        await _pragmas(conn)
    except BaseException:
        await _close_quietly(conn)
        raise
    return conn


async def _pragmas(conn: aiosqlite.Connection) -> None:
    await conn.execute("PRAGMA journal_mode = WAL")
    # FULL: in WAL mode each commit is fsynced, so a post answered 250 survives
    # a power cut, not only a crash of this process.
    await conn.execute("PRAGMA synchronous = FULL")
    await conn.execute("PRAGMA foreign_keys = ON")
    # The CLI writes while the server runs; wait for the lock instead of failing.
    await conn.execute("PRAGMA busy_timeout = 10000")


def _split_sql(script: str) -> list[str]:
    return [s.strip() for s in script.split(";") if s.strip()]
