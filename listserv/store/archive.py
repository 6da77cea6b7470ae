"""The archive index: posts as archived (the source of truth) and what the archive derived from them."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from listserv.errors import StoreError
from listserv.store.base import StoreBase


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
                f"SELECT {ArchivePart._META_COLS}, mbox FROM archive_meta WHERE list_id = ? AND month = ?"
                " ORDER BY date, archive_id",
                (list_id, month),
            )
            return [ArchivePart._meta(r, bytes(r[15])) for r in cur]
        finally:
            conn.close()

