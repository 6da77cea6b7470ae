"""Received mail: the group commit that precedes every 250, and the stages' view of what arrived."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

import aiosqlite

from listserv.errors import StoreError
from listserv.store.lists import ListsPart
from listserv.store.records import (
    IncomingRecord,
    IncomingRow,
    PolicySnapshot,
    _now,
)


class IncomingPart(ListsPart):
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

    async def claim_incoming(self, kind: str, status: str, owner: str, now: float, until: float,
                             limit: int) -> list[IncomingRecord]:
        """Lease up to limit received messages of this kind and status to owner, oldest first.

        Recording the stage's outcome (a new status) clears the lease; a
        worker that dies leaves it to run out, and another claims the message.
        """
        async with self.transaction() as db:
            claimed = await db.execute_fetchall(
                "UPDATE incoming SET lease_owner = ?, lease_until = ? WHERE id IN ("
                " SELECT id FROM incoming WHERE status = ? AND kind = ?"
                " AND (lease_until IS NULL OR lease_until < ?)"
                f" ORDER BY id LIMIT ?{self.SKIP_LOCKED}) RETURNING id",
                (owner, until, status, kind, now, limit),
            )
            ids = [int(r[0]) for r in claimed]
            if not ids:
                return []
            rows = await db.execute_fetchall(
                f"SELECT {self._INCOMING_COLS} FROM incoming i LEFT JOIN lists l ON l.id = i.list_id"
                f" WHERE i.id IN ({', '.join('?' * len(ids))}) ORDER BY i.id",
                ids,
            )
        return [self._incoming(r) for r in rows]

    async def release_incoming(self, incoming_id: int, owner: str, retry_at: float) -> None:
        """Give a claimed message back for another try at retry_at (its stage failed on it for now)."""
        async with self.transaction() as db:
            await db.execute(
                "UPDATE incoming SET lease_until = ? WHERE id = ? AND lease_owner = ?", (retry_at, incoming_id, owner)
            )

    async def next_incoming_lease_end(self, kind: str, status: str, now: float) -> float | None:
        """When the first lease on such messages held by another worker runs out (None: none leased)."""
        row = await self._fetchone(
            "SELECT min(lease_until) FROM incoming WHERE status = ? AND kind = ? AND lease_until >= ?",
            (status, kind, now),
        )
        return float(row[0]) if row and row[0] is not None else None

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
        # A new status is the stage's record of what it did: the lease goes with it.
        sets = ["status = ?", "updated_at = ?", "lease_owner = NULL", "lease_until = NULL"]
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

    async def held_before(self, before: float) -> list[IncomingRecord]:
        rows = await self._fetchall(
            f"SELECT {self._INCOMING_COLS} FROM incoming i LEFT JOIN lists l ON l.id = i.list_id"
            " WHERE i.kind = 'post' AND i.status = 'held' AND i.received_at < ? ORDER BY i.id",
            (before,),
        )
        return [self._incoming(r) for r in rows]

