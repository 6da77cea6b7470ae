"""The outbox and the delivery queue: one row per message, one per recipient and its outcome."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from listserv.errors import ArchiveIdTaken, StoreError
from listserv.store.digests import DigestEntry, add_digest_post
from listserv.store.incoming import IncomingPart
from listserv.store.records import (
    ArchiveEntry,
    DueDelivery,
    Outcome,
    _now,
)


class QueuePart(IncomingPart):
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
        digest: DigestEntry | None = None,
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
            if digest is not None and incoming_id is not None:
                await add_digest_post(db, list_id, incoming_id, digest, now)
            if incoming_id is not None and (incoming_status is not None or mark_notified):
                row = await (await db.execute("SELECT status FROM incoming WHERE id = ?", (incoming_id,))).fetchone()
                if row is None:
                    raise StoreError(f"no message with id {incoming_id}")
                await self._set_status(
                    db, incoming_id, incoming_status or row[0], expect=incoming_expect,
                    notified=True if mark_notified else None,
                )
            if archive is not None:
                # A true duplicate (same post again) keeps the first entry.
                cur = await db.execute(
                    "INSERT OR IGNORE INTO archive (list_id, message_id, msgid_hash, received_at, source, data,"
                    " render_pending) VALUES (?, ?, ?, ?, ?, ?, 1)",
                    (list_id, archive.message_id, archive.msgid_hash, now, archive.source, archive.data),
                )
                if cur.rowcount == 0:
                    from listserv.archive_ids import same_post

                    row = await (await db.execute(
                        "SELECT data FROM archive WHERE list_id = ? AND msgid_hash = ?",
                        (list_id, archive.msgid_hash),
                    )).fetchone()
                    if row is not None and not same_post(bytes(row[0]), archive.data):
                        # A different post took the id since archive_identity
                        # chose it (two workers preparing twins at once):
                        # nothing is queued; the caller chooses again.
                        raise ArchiveIdTaken(f"Message-ID {archive.message_id} was archived meanwhile")
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

    async def claim_deliveries(self, owner: str, now: float, until: float, limit: int) -> list[DueDelivery]:
        """Lease up to limit due copies to owner until the given time, oldest message first.

        A copy stays leased until its outcome is recorded (which clears the
        lease) or the lease runs out: then another worker may claim it, so a
        worker that died mid-batch only leaves its batch to be sent again.
        """
        async with self.transaction() as db:
            claimed = await db.execute_fetchall(
                "UPDATE deliveries SET lease_owner = ?, lease_until = ? WHERE id IN ("
                " SELECT id FROM deliveries WHERE status = 'pending' AND next_attempt_at <= ?"
                " AND (lease_until IS NULL OR lease_until < ?)"
                f" ORDER BY outbox_id, id LIMIT ?{self.SKIP_LOCKED}) RETURNING id",
                (owner, until, now, now, limit),
            )
            ids = [int(r[0]) for r in claimed]
            if not ids:
                return []
            rows = await db.execute_fetchall(
                "SELECT d.id, d.outbox_id, d.recipient, d.attempts, o.created_at, o.kind"
                " FROM deliveries d JOIN outbox o ON o.id = d.outbox_id"
                f" WHERE d.id IN ({', '.join('?' * len(ids))}) ORDER BY d.outbox_id, d.id",
                ids,
            )
        return [DueDelivery(r[0], r[1], r[2], r[3], r[4], r[5]) for r in rows]

    async def next_claimable_at(self, now: float) -> float | None:
        """When a pending copy can next be claimed: its retry time, or its lease's end if later."""
        row = await self._fetchone(
            "SELECT min(CASE WHEN lease_until IS NOT NULL AND lease_until >= ? AND lease_until > next_attempt_at"
            " THEN lease_until ELSE next_attempt_at END) FROM deliveries WHERE status = 'pending'",
            (now,),
        )
        return float(row[0]) if row and row[0] is not None else None

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
                " attempts = attempts + 1, next_attempt_at = ?, lease_owner = NULL, lease_until = NULL"
                " WHERE id = ?",
                [(o.status, o.reply, now, o.next_attempt_at, o.delivery_id) for o in outcomes],
            )

    async def retry_now(self) -> int:
        async with self.transaction() as db:
            cur = await db.execute(
                "UPDATE deliveries SET next_attempt_at = 0 WHERE status = 'pending'"
            )
            return cur.rowcount

    async def queue_summary(self) -> list[dict[str, Any]]:
        """Per queued message: list, kind, counts by status, oldest pending, last reply."""
        rows = await self._fetchall(
            "SELECT o.id, coalesce(l.name, ''), o.kind, o.created_at,"
            " sum(d.status = 'pending'), sum(d.status = 'sent'), sum(d.status = 'failed'),"
            " min(CASE WHEN d.status = 'pending' THEN d.next_attempt_at END),"
            " max(CASE WHEN d.status = 'pending' AND d.attempts > 0 THEN d.last_reply END)"
            " FROM outbox o JOIN deliveries d ON d.outbox_id = o.id LEFT JOIN lists l ON l.id = o.list_id"
            " GROUP BY o.id, l.name HAVING sum(d.status = 'pending') > 0 ORDER BY o.id"
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


