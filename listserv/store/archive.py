"""The archive index: posts as archived (the source of truth) and what the archive derived from them."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from listserv.errors import StoreError
from listserv.store.base import StoreBase, is_url

# Answered from the covering index archive_by_list alone (migration 11), in row order.
ARCHIVE_INDEX_SQL = (
    "SELECT id, message_id, msgid_hash, received_at FROM archive WHERE list_id = ? AND removed = 0 ORDER BY id"
)


class _PgReadOnly:
    """psycopg's connection, taking the parts' SQL as sqlite3's does (translated once)."""

    def __init__(self, url: str) -> None:
        import psycopg

        self.conn = psycopg.connect(url, autocommit=True)

    def execute(self, sql: str, params: Sequence[Any] = ()) -> Any:
        from listserv.store.pg import translate

        return self.conn.execute(translate(sql), tuple(params))

    def close(self) -> None:
        self.conn.close()


def read_only(target: Any) -> Any:
    """A plain, synchronous read connection for the archive's build workers (other processes):
    sqlite3 on the SQLite file, psycopg on a postgresql:// URL."""
    if is_url(target):
        return _PgReadOnly(target)
    import sqlite3

    return sqlite3.connect(f"file:{target}?mode=ro", uri=True)


class ArchivePart(StoreBase):
    # -- archive ---------------------------------------------------------------
    # The archive stage's reads and writes.  ``archive`` rows are the source of
    # truth; ``archive_meta`` / ``archive_refs`` / ``archive_months`` are
    # derived and rebuilt by `listserv archive build --full`.  The static
    # ``read_*`` helpers use plain sqlite3 so that build worker processes can
    # read blobs without an event loop.

    from listserv.archive_types import ArchiveMeta as ArchiveMetaT
    from listserv.archive_types import ArchiveRow as ArchiveRowT

    _META_COLS = (
        "archive_id, list_id, msgid_hash, message_id, thread, parent, refs, date, month, subject, nsubject,"
        " author, snippet, search, attachments"
    )

    @staticmethod
    def _meta(r: Sequence[Any], mbox: bytes = b"") -> ArchiveMetaT:
        from listserv.archive_types import ArchiveMeta

        # Positional, in the columns' order (a month page reads a thousand of these).
        return ArchiveMeta(r[0], r[1], r[2], r[3], r[4], r[5], tuple(x for x in r[6].split("\n") if x) if r[6] else (),
                           r[7], r[8], r[9], r[10], r[11], r[12], r[13], r[14], mbox)

    async def archive_index(self, list_id: int) -> list[tuple[int, str, str, float]]:
        """(row id, Message-ID, Message-ID-Hash, received_at) of every message shown in a list's archive."""
        rows = await self._fetchall(ARCHIVE_INDEX_SQL, (list_id,))
        return [(r[0], r[1], r[2], r[3]) for r in rows]

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

    async def archive_identity(self, list_id: int, message_id: str, data: bytes) -> tuple[str, bool]:
        """The Message-ID a post is archived under, and whether that entry exists already.

        Its own id when free or held by the same post (a true duplicate:
        ``True``); else the derived id of ``archive_ids`` (``True`` if this
        content came before under it too).  The fan-out computes Archived-At
        from the returned id, so every copy points at its own page.
        """
        from listserv.archive_ids import derived_message_id, same_post
        from listserv.rewrite import message_id_hash

        row = await self._fetchone("SELECT data FROM archive WHERE list_id = ? AND msgid_hash = ?",
                                   (list_id, message_id_hash(message_id)))
        if row is None:
            return message_id, False
        if same_post(bytes(row[0]), data):
            return message_id, True
        derived = derived_message_id(message_id, data)
        row = await self._fetchone("SELECT 1 FROM archive WHERE list_id = ? AND msgid_hash = ?",
                                   (list_id, message_id_hash(derived)))
        return derived, row is not None

    async def archive_import(self, list_id: int, entries: Sequence[tuple[str, str, float, bytes]],
                             stored: list[tuple[str, str, float, bytes]] | None = None) -> int:
        """Add (Message-ID, hash, received_at, data) rows from an imported archive; returns how many were new.

        A message already archived (same bytes or same content, see
        ``archive_ids``) is not added again; a different message reusing a
        Message-ID is added under a derived id.  ``stored``, if given, gets
        the rows added, as stored (a derived id in place of the reused one);
        it stays empty if some row was not added after all (another writer
        stored the same Message-ID meanwhile).
        """
        from listserv.archive_ids import derived_message_id, same_post
        from listserv.rewrite import message_id_hash

        if not entries:
            return 0
        hashes = list(dict.fromkeys(h for _, h, _, _ in entries))
        taken: dict[str, bytes | None] = {}  # hash -> data (None: not loaded yet)
        for start in range(0, len(hashes), 500):
            chunk = hashes[start : start + 500]
            rows = await self._fetchall(
                f"SELECT msgid_hash FROM archive WHERE list_id = ? AND msgid_hash IN ({','.join('?' * len(chunk))})",
                (list_id, *chunk),
            )
            taken.update((r[0], None) for r in rows)
        rows_out: list[tuple[int, str, str, float, bytes]] = []
        for mid, h, at, data in entries:
            if h in taken:
                known = taken[h]
                if known is None:
                    r = await self._fetchone("SELECT data FROM archive WHERE list_id = ? AND msgid_hash = ?",
                                             (list_id, h))
                    known = taken[h] = bytes(r[0]) if r is not None else b""
                if same_post(known, data):
                    continue
                mid = derived_message_id(mid, data)
                h = message_id_hash(mid)
                if h in taken:
                    continue
                r = await self._fetchone("SELECT 1 FROM archive WHERE list_id = ? AND msgid_hash = ?", (list_id, h))
                if r is not None:
                    taken[h] = None
                    continue
            taken[h] = data
            rows_out.append((list_id, mid, h, at, data))
        async with self.transaction() as db:
            before = db.total_changes
            await db.executemany(
                "INSERT INTO archive (list_id, message_id, msgid_hash, received_at, source, data)"
                " VALUES (?, ?, ?, ?, 'import', ?) ON CONFLICT (list_id, msgid_hash) DO NOTHING",
                rows_out,
            )
            added = int(db.total_changes - before)
        if stored is not None and added == len(rows_out):
            stored.extend((mid, h, at, data) for _, mid, h, at, data in rows_out)
        return added

    async def archive_drop_meta(self, archive_ids: Sequence[int]) -> None:
        """Forget what was derived from these messages (a page that could not be written): unbuilt again."""
        async with self.transaction() as db:
            for aid in archive_ids:
                async with db.execute("SELECT list_id, month FROM archive_meta WHERE archive_id = ?", (aid,)) as cur:
                    old = await cur.fetchone()
                if old is None:
                    continue
                await db.execute("UPDATE archive_months SET count = count - 1 WHERE list_id = ? AND month = ?",
                                 (old[0], old[1]))
                await db.execute("DELETE FROM archive_meta WHERE archive_id = ?", (aid,))
                await db.execute("DELETE FROM archive_refs WHERE archive_id = ?", (aid,))

    # -- bookkeeping: failures and builds (`listserv archive status`)

    async def archive_record_failures(self, list_id: int, failures: Sequence[tuple[int, str]]) -> None:
        """Remember messages that could not be rendered, with the reason (replacing an older one)."""
        if not failures:
            return
        import time

        now = time.time()
        async with self.transaction() as db:
            await db.executemany(
                "INSERT INTO archive_failures (archive_id, list_id, reason, at) VALUES (?, ?, ?, ?)"
                " ON CONFLICT (archive_id) DO UPDATE SET reason = excluded.reason, at = excluded.at",
                [(aid, list_id, reason[:1000], now) for aid, reason in failures],
            )

    async def archive_clear_failures(self, list_id: int, archive_ids: Sequence[int] | None = None) -> None:
        async with self.transaction() as db:
            if archive_ids is None:
                await db.execute("DELETE FROM archive_failures WHERE list_id = ?", (list_id,))
            else:
                await db.executemany("DELETE FROM archive_failures WHERE archive_id = ?",
                                     [(aid,) for aid in archive_ids])

    async def archive_failures(self, list_id: int) -> list[tuple[str, str, float]]:
        """(Message-ID, reason, when) of each message of the list that could not be rendered."""
        rows = await self._fetchall(
            "SELECT a.message_id, f.reason, f.at FROM archive_failures f JOIN archive a ON a.id = f.archive_id"
            " WHERE f.list_id = ? AND a.removed = 0 ORDER BY f.at, f.archive_id",
            (list_id,),
        )
        return [(r[0], r[1], r[2]) for r in rows]

    async def archive_note_build(self, list_id: int, *, full_seconds: float | None = None,
                                 messages: int | None = None) -> None:
        """Record a full build (with its duration) or an incremental update, now."""
        import time

        now = time.time()
        async with self.transaction() as db:
            if full_seconds is not None:
                await db.execute(
                    "INSERT INTO archive_builds (list_id, full_at, full_seconds, full_messages, updated_at)"
                    " VALUES (?, ?, ?, ?, ?) ON CONFLICT (list_id) DO UPDATE SET full_at = excluded.full_at,"
                    " full_seconds = excluded.full_seconds, full_messages = excluded.full_messages,"
                    " updated_at = excluded.updated_at",
                    (list_id, now, full_seconds, messages, now),
                )
            else:
                await db.execute(
                    "INSERT INTO archive_builds (list_id, updated_at) VALUES (?, ?)"
                    " ON CONFLICT (list_id) DO UPDATE SET updated_at = excluded.updated_at",
                    (list_id, now),
                )

    async def archive_status(self, list_id: int) -> dict[str, Any]:
        """Counts and times for `listserv archive status`."""
        stored = await self._fetchone(
            "SELECT count(*), coalesce(sum(removed), 0) FROM archive WHERE list_id = ?", (list_id,))
        built = await self._fetchone(
            "SELECT count(*), count(DISTINCT thread) FROM archive_meta WHERE list_id = ?", (list_id,))
        months = await self._fetchone("SELECT count(*) FROM archive_months WHERE list_id = ? AND count > 0",
                                      (list_id,))
        builds = await self._fetchone(
            "SELECT full_at, full_seconds, full_messages, updated_at FROM archive_builds WHERE list_id = ?",
            (list_id,))
        assert stored is not None and built is not None and months is not None
        return {
            "messages": int(stored[0]) - int(stored[1]), "removed": int(stored[1]),
            "message_pages": int(built[0]), "threads": int(built[1]), "months": int(months[0]),
            "full_at": builds[0] if builds else None, "full_seconds": builds[1] if builds else None,
            "full_messages": builds[2] if builds else None, "updated_at": builds[3] if builds else None,
        }

    async def archive_clear_meta(self, list_id: int) -> None:
        async with self.transaction() as db:
            await db.execute("DELETE FROM archive_meta WHERE list_id = ?", (list_id,))
            await db.execute("DELETE FROM archive_refs WHERE list_id = ?", (list_id,))
            await db.execute("DELETE FROM archive_months WHERE list_id = ?", (list_id,))
            await db.execute("DELETE FROM archive_failures WHERE list_id = ?", (list_id,))

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
            # Delete (500 rows a statement), then a plain INSERT: "INSERT OR
            # REPLACE" may change two rows, so SQLite keeps a statement journal
            # for every row inserted (a temporary file as big as the pages each
            # insert touched); a DELETE journals only the pages it changes.
            for start in range(0, len(ids), 500):
                chunk = [aid for (aid,) in ids[start : start + 500]]
                marks = ",".join("?" * len(chunk))
                await db.execute(f"DELETE FROM archive_refs WHERE archive_id IN ({marks})", chunk)
                await db.execute(f"DELETE FROM archive_meta WHERE archive_id IN ({marks})", chunk)
            await db.executemany(
                f"INSERT INTO archive_meta ({self._META_COLS}, mbox)"
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
                    " ON CONFLICT (list_id, month) DO UPDATE SET count = archive_months.count + 1",
                    [(m.list_id, m.month) for m in metas],
                )

    async def archive_recount_months(self, list_id: int) -> None:
        async with self.transaction() as db:
            await db.execute("DELETE FROM archive_months WHERE list_id = ?", (list_id,))
            await db.execute(
                "INSERT INTO archive_months (list_id, month, count)"
                " SELECT list_id, month, count(*) FROM archive_meta WHERE list_id = ? GROUP BY list_id, month",
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

    async def archive_meta_referring_any(self, list_id: int, message_ids: Sequence[str]) -> list[ArchiveMetaT]:
        """Messages whose References name any of these Message-IDs (one query for a message's whole chain)."""
        ids = list(dict.fromkeys(message_ids))[-200:]
        if not ids:
            return []
        rows = await self._fetchall(
            f"SELECT DISTINCT {', '.join('m.' + c.strip() for c in self._META_COLS.split(','))}"
            " FROM archive_refs r JOIN archive_meta m ON m.archive_id = r.archive_id"
            f" WHERE r.list_id = ? AND r.ref IN ({','.join('?' * len(ids))})",
            (list_id, *ids),
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
        out: dict[int, tuple[str, float, bytes]] = {}
        conn = read_only(path)
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
        out: dict[int, tuple[str, float, bytes]] = {}
        conn = read_only(path)
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
        conn = read_only(path)
        try:
            cur = conn.execute(
                f"SELECT {ArchivePart._META_COLS}, mbox FROM archive_meta WHERE list_id = ? AND month = ?"
                " ORDER BY date, archive_id",
                (list_id, month),
            )
            return [ArchivePart._meta(r, bytes(r[15])) for r in cur]
        finally:
            conn.close()

