"""The operator's view: status counts, every stage's last errors, and the online backup."""

from __future__ import annotations

import contextlib
import logging
import time
from pathlib import Path
from typing import Any

import aiosqlite

from listserv.errors import StoreError
from listserv.store.base import StoreBase

log = logging.getLogger("listserv.store")

#: The stages whose last errors `status` and `doctor` show, in the order a post meets them.
STAGES = ("prepare", "deliver", "requests", "bounces", "archive")
_KEEP_PER_STAGE = 20  # distinct errors kept per stage (each one counted)
_REQUEST_KINDS = ("request", "join", "leave", "confirm", "owner")


class StatusPart(StoreBase):
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

    async def record_stage_error(self, stage: str, detail: str, at: float | None = None) -> None:
        """Note that ``stage`` failed with ``detail`` (for the errors that leave no row).

        The same error again only raises its count and time, and each stage
        keeps its latest ``_KEEP_PER_STAGE`` distinct errors, so a stage that
        fails on every post does not grow the database.  Called from an
        ``except`` block: it never raises (a failing database must not turn one
        error into two); a failure to record is logged.
        """
        now = time.time() if at is None else at
        detail = " ".join(detail.split())[:500]
        try:
            async with self.transaction() as db:
                async with db.execute(
                    "INSERT INTO stage_errors (stage, detail, first_at, last_at) VALUES (?, ?, ?, ?)"
                    " ON CONFLICT (stage, detail) DO UPDATE SET last_at = excluded.last_at, count = stage_errors.count + 1"
                    " RETURNING id",
                    (stage, detail, now, now),
                ) as cur:
                    await cur.fetchall()
                await db.execute(
                    "DELETE FROM stage_errors WHERE stage = ? AND id NOT IN"
                    " (SELECT id FROM stage_errors WHERE stage = ? ORDER BY last_at DESC, id DESC LIMIT ?)",
                    (stage, stage, _KEEP_PER_STAGE),
                )
        except Exception:  # noqa: BLE001 - see the docstring
            log.warning("could not record a %s error: %s", stage, detail, exc_info=True)

    async def stage_errors(self, now: float, horizon: float, limit: int = 3) -> dict[str, list[dict[str, Any]]]:
        """Each stage's latest errors since ``now - horizon``, newest first (at most ``limit`` each).

        Each is ``{"at", "first_at", "count", "detail"}``.  ``deliver`` comes
        from the delivery rows (refused and deferred copies), ``requests`` and
        ``bounces`` from the received mail they could not handle, and every
        stage also from what was recorded with ``record_stage_error``.
        """
        since = now - horizon
        out: dict[str, list[dict[str, Any]]] = {stage: [] for stage in STAGES}
        for e in await self.recent_errors(now, horizon, limit):
            out["deliver"].append({
                "at": e["at"], "first_at": e["at"], "count": 1,
                "detail": f"{e['outcome']}  {e['list'] or '-'}  <{e['message_id'] or '-'}>  {e['recipient']}  "
                          f"{e['reply']}",
            })
        kinds = ", ".join("?" for _ in _REQUEST_KINDS)
        rows = await self._fetchall(
            f"SELECT i.updated_at, CASE WHEN i.kind IN ({kinds}) THEN 'requests' ELSE 'bounces' END,"
            " i.kind, coalesce(l.name, ''), i.sender, i.mail_from, i.reason"
            " FROM incoming i LEFT JOIN lists l ON l.id = i.list_id"
            f" WHERE i.status = 'failed' AND i.updated_at >= ? AND i.kind IN ({kinds}, 'bounces')"
            " ORDER BY i.updated_at DESC, i.id DESC LIMIT ?",
            (*_REQUEST_KINDS, since, *_REQUEST_KINDS, limit * 2),
        )
        for r in rows:
            out[r[1]].append({"at": r[0], "first_at": r[0], "count": 1,
                              "detail": f"{r[2]} mail to {r[3] or '-'} from {r[4] or r[5] or '<>'}: {r[6]}"})
        # The archive stage records each message it cannot render in
        # archive_failures (``listserv archive status``); it is the archive
        # stage's error as much as one recorded with record_stage_error.
        rows = await self._fetchall(
            "SELECT f.at, coalesce(l.name, ''), a.message_id, f.reason FROM archive_failures f"
            " JOIN archive a ON a.id = f.archive_id LEFT JOIN lists l ON l.id = f.list_id"
            " WHERE f.at >= ? ORDER BY f.at DESC, f.archive_id DESC LIMIT ?",
            (since, limit),
        )
        for r in rows:
            out["archive"].append({"at": r[0], "first_at": r[0], "count": 1,
                                   "detail": f"message <{r[2]}> of list={r[1]} not rendered: {r[3]}"})
        rows = await self._fetchall(
            "SELECT stage, last_at, first_at, count, detail FROM stage_errors WHERE last_at >= ?"
            " ORDER BY last_at DESC, id DESC",
            (since,),
        )
        for r in rows:
            out.setdefault(r[0], []).append({"at": r[1], "first_at": r[2], "count": r[3], "detail": r[4]})
        return {stage: sorted(errors, key=lambda e: -e["at"])[:limit] for stage, errors in out.items()}

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

