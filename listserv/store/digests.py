"""Digests: the posts waiting for each list's next digest, and the digests queued.

A post is added to ``digest_posts`` in the transaction that queues it for the
``each`` members (``QueuePart.enqueue``), so it is in the next digest exactly
when it went out.  ``queue_digest`` takes the waiting posts, numbers the digest
and queues its copies in one transaction: a digest is queued once, and after
that it is a durable item of the delivery queue like any post.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import aiosqlite

from listserv.errors import StoreError
from listserv.store.base import StoreBase, integrity_errors
from listserv.store.records import DIGEST_MODES, DigestPost, _now

_POST_COLS = ("p.id, p.incoming_id, p.message_id, p.subject, p.author, p.sender, p.archived_at, p.size,"
              " p.added_at, p.data, coalesce(m.organisation, '')")


@dataclass(frozen=True, slots=True)
class DigestEntry:
    """What ``enqueue`` stores for the next digest with a post."""

    message_id: str
    subject: str
    author: str
    sender: str
    archived_at: str
    data: bytes


@dataclass(frozen=True, slots=True)
class DigestCopy:
    """One message of a digest and who gets it (one per mode, or per member whose copy differs)."""

    kind: str
    envelope_from: str
    data: bytes
    recipients: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class DigestState:
    """A list's digest at a glance (for the scheduler and ``status``)."""

    list_id: int
    list_name: str
    waiting: int
    waiting_bytes: int
    oldest_at: float | None
    last_volume: int
    last_issue: int
    last_at: float | None
    members: int  # members with delivery enabled in a digest mode


async def add_digest_post(db: aiosqlite.Connection, list_id: int, incoming_id: int, entry: DigestEntry,
                          now: float) -> None:
    """Inside the caller's transaction: the post waits for its list's next digest (once)."""
    await db.execute(
        "INSERT INTO digest_posts (list_id, incoming_id, message_id, subject, author, sender, archived_at,"
        " size, added_at, data) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
        " ON CONFLICT (list_id, incoming_id) DO NOTHING",
        (list_id, incoming_id, entry.message_id, entry.subject, entry.author, entry.sender, entry.archived_at,
         len(entry.data), now, entry.data),
    )


def _post(r: Any) -> DigestPost:
    return DigestPost(r[0], r[1], r[2], r[3], r[4], r[5], r[6], r[7], r[8], bytes(r[9]), r[10])


def next_number(last: tuple[int, int, float] | None, now_year: int, last_year: int | None) -> tuple[int, int]:
    """(volume, issue) of the next digest: a new volume each calendar year (as Mailman's yearly default)."""
    if last is None:
        return 1, 1
    volume, issue, _ = last
    if last_year is not None and now_year != last_year:
        return volume + 1, 1
    return volume, issue + 1


class DigestsPart(StoreBase):
    async def waiting_digest_posts(self, list_id: int, limit: int | None = None) -> list[DigestPost]:
        """The posts of the list's next digest, oldest first."""
        sql = (f"SELECT {_POST_COLS} FROM digest_posts p"
               " LEFT JOIN members m ON m.list_id = p.list_id AND m.address = p.sender"
               " WHERE p.list_id = ? AND p.digest_id IS NULL ORDER BY p.id")
        params: tuple[Any, ...] = (list_id,)
        if limit is not None:
            sql += " LIMIT ?"
            params += (limit,)
        return [_post(r) for r in await self._fetchall(sql, params)]

    async def digest_posts_of(self, digest_id: int) -> list[DigestPost]:
        rows = await self._fetchall(
            f"SELECT {_POST_COLS} FROM digest_posts p"
            " LEFT JOIN members m ON m.list_id = p.list_id AND m.address = p.sender"
            " WHERE p.digest_id = ? ORDER BY p.id", (digest_id,))
        return [_post(r) for r in rows]

    async def digest_states(self) -> list[DigestState]:
        """Every list's waiting posts, last digest and digest members."""
        marks = ", ".join("?" * len(DIGEST_MODES))
        rows = await self._fetchall(
            "SELECT l.id, l.name,"
            " (SELECT count(*) FROM digest_posts p WHERE p.list_id = l.id AND p.digest_id IS NULL),"
            " (SELECT coalesce(sum(size), 0) FROM digest_posts p WHERE p.list_id = l.id AND p.digest_id IS NULL),"
            " (SELECT min(added_at) FROM digest_posts p WHERE p.list_id = l.id AND p.digest_id IS NULL),"
            " (SELECT count(*) FROM members m WHERE m.list_id = l.id AND m.delivery = 'enabled'"
            f"  AND m.delivery_mode IN ({marks}))"
            " FROM lists l ORDER BY l.name",
            DIGEST_MODES,
        )
        last = {r[0]: (r[1], r[2], r[3]) for r in await self._fetchall(
            "SELECT d.list_id, d.volume, d.issue, d.created_at FROM digests d"
            " WHERE d.id = (SELECT max(id) FROM digests e WHERE e.list_id = d.list_id)")}
        out = []
        for r in rows:
            volume, issue, at = last.get(r[0], (0, 0, None))
            out.append(DigestState(r[0], r[1], r[2], r[3], r[4], volume, issue, at, r[5]))
        return out

    async def last_digest(self, list_id: int) -> tuple[int, int, float] | None:
        row = await self._fetchone(
            "SELECT volume, issue, created_at FROM digests WHERE list_id = ? ORDER BY id DESC LIMIT 1", (list_id,))
        return (int(row[0]), int(row[1]), float(row[2])) if row else None

    async def digest_members(self, list_id: int) -> list[tuple[str, str, str]]:
        """(address, delivery mode, language) of the members who get digests, by address.

        With them, the members owed one last digest (they left a digest mode
        while posts waited), in the mode they left.
        """
        marks = ", ".join("?" * len(DIGEST_MODES))
        rows = await self._fetchall(
            "SELECT address, delivery_mode, language FROM members WHERE list_id = ? AND delivery = 'enabled'"
            f" AND delivery_mode IN ({marks})"
            " UNION ALL SELECT l.address, l.delivery_mode, m.language FROM one_last_digest l"
            " JOIN members m ON m.list_id = l.list_id AND m.address = l.address"
            f" WHERE l.list_id = ? AND m.delivery = 'enabled' AND m.delivery_mode NOT IN ({marks})"
            " ORDER BY 1",
            (list_id, *DIGEST_MODES, list_id, *DIGEST_MODES),
        )
        return [(r[0], r[1], r[2]) for r in rows]

    async def single_copies(self, list_id: int, incoming_ids: Sequence[int]) -> set[tuple[str, int]]:
        """(recipient, post) pairs already queued as a single copy: a digest does not repeat them."""
        if not incoming_ids:
            return set()
        # Only the copies to members now on digests come back (usually none),
        # not the hundreds of thousands to the `each` members; CROSS JOIN
        # keeps SQLite's order: the posts' outbox rows, their deliveries (by
        # outbox_id, indexed), then the member (by list and address).
        marks = ", ".join("?" * len(DIGEST_MODES))
        rows = await self._fetchall(
            "SELECT d.recipient, o.incoming_id FROM outbox o CROSS JOIN deliveries d ON d.outbox_id = o.id"
            " CROSS JOIN members m ON m.list_id = o.list_id AND m.address = d.recipient"
            f" WHERE o.list_id = ? AND o.digest_id IS NULL AND o.incoming_id IN ({', '.join('?' * len(incoming_ids))})"
            f" AND o.kind LIKE 'post%' AND (m.delivery_mode IN ({marks}) OR EXISTS (SELECT 1 FROM one_last_digest l"
            " WHERE l.list_id = m.list_id AND l.address = m.address))",
            (list_id, *incoming_ids, *DIGEST_MODES),
        )
        return {(r[0], int(r[1])) for r in rows}

    async def queue_digest(self, list_id: int, volume: int, issue: int, post_ids: Sequence[int], reason: str,
                           copies: Sequence[DigestCopy], members: Sequence[str] = ()) -> int:
        """Number the digest, take its posts and queue its copies, in one transaction.

        ``members`` are the addresses it was built for: a last digest owed
        to any of them (``one_last_digest``) is settled by this one.

        Raises StoreError when another worker took one of the posts or the
        number meanwhile: then nothing is queued and the caller builds again.
        """
        async with self.transaction() as db:
            now = _now()
            try:
                cur = await db.execute(
                    "INSERT INTO digests (list_id, volume, issue, created_at, posts, reason) VALUES (?, ?, ?, ?, ?, ?)",
                    (list_id, volume, issue, now, len(post_ids), reason),
                )
            except integrity_errors():
                raise StoreError(f"digest {volume}/{issue} of list {list_id} exists already") from None
            digest_id = cur.lastrowid
            assert digest_id is not None
            if post_ids:
                cur = await db.execute(
                    f"UPDATE digest_posts SET digest_id = ? WHERE digest_id IS NULL AND id IN"
                    f" ({', '.join('?' * len(post_ids))})",
                    (digest_id, *post_ids),
                )
                if cur.rowcount != len(post_ids):
                    raise StoreError("the digest's posts were taken by another digest meanwhile")
                # Their bytes are in the digest's outbox rows now (and the
                # post itself in the archive): the waiting copy can go.
                await db.execute(
                    f"UPDATE digest_posts SET data = x'' WHERE id IN ({', '.join('?' * len(post_ids))})",
                    tuple(post_ids))
            if members:
                await db.executemany("DELETE FROM one_last_digest WHERE list_id = ? AND address = ?",
                                     [(list_id, address) for address in members])
            for copy in copies:
                if not copy.recipients:
                    continue
                cur = await db.execute(
                    "INSERT INTO outbox (list_id, incoming_id, kind, envelope_from, created_at, data, digest_id)"
                    " VALUES (?, NULL, ?, ?, ?, ?, ?)",
                    (list_id, copy.kind, copy.envelope_from, now, copy.data, digest_id),
                )
                outbox_id = cur.lastrowid
                await db.executemany(
                    "INSERT INTO deliveries (outbox_id, recipient, next_attempt_at, updated_at) VALUES (?, ?, ?, ?)",
                    [(outbox_id, rcpt, now, now) for rcpt in dict.fromkeys(copy.recipients)],
                )
            return int(digest_id)

    async def drop_digest_posts(self, list_id: int, post_ids: Sequence[int]) -> int:
        """Nobody takes digests on this list: the waiting posts are let go (they went out singly)."""
        if not post_ids:
            return 0
        async with self.transaction() as db:
            cur = await db.execute(
                f"DELETE FROM digest_posts WHERE list_id = ? AND digest_id IS NULL AND id IN"
                f" ({', '.join('?' * len(post_ids))})", (list_id, *post_ids))
            return int(cur.rowcount or 0)

    async def digest_history(self, list_id: int, limit: int = 10) -> list[tuple[int, int, int, float, int, str]]:
        """The last digests: (id, volume, issue, created_at, posts, reason), newest first."""
        rows = await self._fetchall(
            "SELECT id, volume, issue, created_at, posts, reason FROM digests WHERE list_id = ?"
            " ORDER BY id DESC LIMIT ?", (list_id, limit))
        return [(r[0], r[1], r[2], r[3], r[4], r[5]) for r in rows]
