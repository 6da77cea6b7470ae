"""Leases that are not one row's: the stages that run in one worker at a time, and the archive's queue.

The posts to prepare (``incoming``) and the copies to deliver
(``deliveries``) are claimed row by row by any number of workers
(``IncomingPart.claim_incoming``, ``QueuePart.claim_deliveries``).  Two stages
run in one worker at a time across every node instead: the e-mail commands and
bounces (their handlers read and act on whole lists) and the archive (it
rewrites shared pages).  A worker holds such a stage with a lease in
``stage_leases`` and renews it while it works; one that dies leaves it to run
out.  The archive's work itself is rows too: archive rows with
``render_pending = 1``, claimed with their own leases and cleared once rendered.
"""

from __future__ import annotations

from collections.abc import Sequence

from listserv.store.base import StoreBase


class WorkPart(StoreBase):
    async def claim_stage(self, stage: str, owner: str, now: float, until: float) -> bool:
        """Take (or renew) the one lease of a stage; False while another worker holds it."""
        async with self.transaction() as db:
            rows = await db.execute_fetchall(
                "INSERT INTO stage_leases (stage, lease_owner, lease_until) VALUES (?, ?, ?)"
                " ON CONFLICT (stage) DO UPDATE SET lease_owner = excluded.lease_owner,"
                " lease_until = excluded.lease_until"
                " WHERE stage_leases.lease_owner = excluded.lease_owner OR stage_leases.lease_until < ?"
                " RETURNING stage",
                (stage, owner, until, now),
            )
        return bool(list(rows))

    async def stage_holder(self, stage: str) -> tuple[str, float] | None:
        row = await self._fetchone("SELECT lease_owner, lease_until FROM stage_leases WHERE stage = ?", (stage,))
        return None if row is None else (str(row[0]), float(row[1]))

    async def claim_archive_work(self, owner: str, now: float, until: float,
                                 limit: int) -> list[tuple[int, str, str]]:
        """Lease archive rows not yet rendered: (row id, list name, Message-ID-Hash), oldest first."""
        async with self.transaction() as db:
            claimed = await db.execute_fetchall(
                "UPDATE archive SET lease_owner = ?, lease_until = ? WHERE id IN ("
                " SELECT id FROM archive WHERE render_pending = 1 AND (lease_until IS NULL OR lease_until < ?)"
                f" ORDER BY id LIMIT ?{self.SKIP_LOCKED}) RETURNING id",
                (owner, until, now, limit),
            )
            ids = [int(r[0]) for r in claimed]
            if not ids:
                return []
            rows = await db.execute_fetchall(
                "SELECT a.id, coalesce(l.name, ''), a.msgid_hash FROM archive a LEFT JOIN lists l ON l.id = a.list_id"
                f" WHERE a.id IN ({', '.join('?' * len(ids))}) ORDER BY a.id",
                ids,
            )
        return [(int(r[0]), str(r[1]), str(r[2])) for r in rows]

    async def archive_rendered(self, ids: Sequence[int]) -> None:
        """Record that the archive stage is done with these rows (rendered, or nothing to render)."""
        if not ids:
            return
        async with self.transaction() as db:
            await db.executemany(
                "UPDATE archive SET render_pending = 0, lease_owner = NULL, lease_until = NULL WHERE id = ?",
                [(i,) for i in ids],
            )

    async def archive_pending(self) -> int:
        row = await self._fetchone("SELECT count(*) FROM archive WHERE render_pending = 1")
        return int(row[0]) if row else 0

    async def release_leases(self, owner: str) -> int:
        """Give back every lease owner holds (a worker restarting under its name, or stopping).

        What it had claimed is claimable again at once, instead of when the
        leases run out.
        """
        released = 0
        async with self.transaction() as db:
            for table in ("deliveries", "incoming", "archive"):
                cur = await db.execute(
                    f"UPDATE {table} SET lease_owner = NULL, lease_until = NULL WHERE lease_owner = ?", (owner,)
                )
                released += max(cur.rowcount, 0)
            await db.execute("DELETE FROM stage_leases WHERE lease_owner = ?", (owner,))
        return released
