"""People: bounce scores, tokens for double opt-in, the consent record, reply limits, GDPR export and erasure."""

from __future__ import annotations

import json
from typing import Any

import aiosqlite

from listserv.errors import DuplicateError, StoreError, UnknownList
from listserv.store.base import integrity_errors
from listserv.store.lists import ListsPart
from listserv.store.records import (
    _TOKEN_COLS,
    MEMBER_COLS,
    BounceState,
    ConsentEvent,
    MemberRecord,
    TokenRecord,
    _consent,
    _now,
    _member,
    _token,
)


class PeoplePart(ListsPart):
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
            f"SELECT {MEMBER_COLS} FROM members WHERE list_id = ? AND address = ?", (list_id, address),
        )
        return _member(row) if row else None

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
            except integrity_errors():
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
            await db.execute("DELETE FROM one_last_digest WHERE list_id = ? AND address = ?", (list_id, address))
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
            await db.execute("DELETE FROM one_last_digest WHERE address = ?", (address,))
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

