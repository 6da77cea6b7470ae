"""Lists, members and bans: who is on which list, in which role, and who may not post."""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from typing import Any

import aiosqlite

from listserv.errors import DuplicateError, StoreError, UnknownList
from listserv.store.base import StoreBase, integrity_errors
from listserv.store.records import (
    ROLES,
    DELIVERY_MODES,
    DIGEST_MODES,
    MEMBER_COLS,
    MEMBER_LANGUAGES,
    ListRecord,
    MemberRecord,
    Recipient,
    _consent,
    _member,
    _now,
)


# The member columns `members set` and the preferences page may change.
MEMBER_OPTIONS = ("role", "moderated", "delivery", "display_name", "organisation", "delivery_mode", "not_me",
                  "ack", "no_dupes", "language")


def _option_text(value: Any) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    return str(value)


class ListsPart(StoreBase):
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
            await db.execute("DELETE FROM one_last_digest WHERE list_id = ?", (list_id,))
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
                await db.execute("DELETE FROM one_last_digest WHERE list_id = ? AND address = ?", (lst.id, address))
                await _consent(db, list_name, address, "left", method, detail)

    async def members(self, list_name: str) -> list[MemberRecord]:
        lst = await self.get_list(list_name)
        rows = await self._fetchall(
            f"SELECT {MEMBER_COLS} FROM members WHERE list_id = ? ORDER BY address", (lst.id,),
        )
        return [_member(r) for r in rows]

    async def set_member(self, list_name: str, address: str, key: str, value: Any, *,
                         method: str = "", detail: str = "") -> None:
        """Change one member's column; with a method, the change goes into the consent record too."""
        await self.set_member_options(list_name, address, {key: value}, method=method, detail=detail)

    async def set_member_options(self, list_name: str, address: str, changes: dict[str, Any], *,
                                 method: str = "", detail: str = "") -> None:
        """Change several of a member's columns at once (all or none)."""
        unknown = [k for k in changes if k not in MEMBER_OPTIONS]
        if unknown:
            raise StoreError(f"unknown member setting {unknown[0]!r}; known: {', '.join(MEMBER_OPTIONS)}")
        if "delivery_mode" in changes and changes["delivery_mode"] not in DELIVERY_MODES:
            raise StoreError(f"delivery_mode must be one of {', '.join(DELIVERY_MODES)}")
        if "language" in changes and changes["language"] not in MEMBER_LANGUAGES:
            raise StoreError("language must be pl, en, or empty for the list's")
        if not changes:
            return
        lst = await self.get_list(list_name)
        sets = ", ".join(f"{k} = ?" for k in changes)
        async with self.transaction() as db:
            before = None
            if "delivery_mode" in changes:
                row = await (await db.execute("SELECT delivery_mode FROM members WHERE list_id = ? AND address = ?",
                                              (lst.id, address))).fetchone()
                before = row[0] if row else None
            cur = await db.execute(
                f"UPDATE members SET {sets} WHERE list_id = ? AND address = ?",
                (*changes.values(), lst.id, address),
            )
            if cur.rowcount == 0:
                raise StoreError(f"{address} is not a member of {list_name}")
            if before in DIGEST_MODES and changes["delivery_mode"] not in DIGEST_MODES:
                # The posts that waited for their digest are not sent to them
                # singly: they get them in one last digest (Mailman 3 does the same).
                await db.execute("INSERT OR REPLACE INTO one_last_digest (list_id, address, delivery_mode)"
                                 " VALUES (?, ?, ?)", (lst.id, address, before))
            elif changes.get("delivery_mode") in DIGEST_MODES:
                await db.execute("DELETE FROM one_last_digest WHERE list_id = ? AND address = ?", (lst.id, address))
            if method:
                text = ", ".join(f"{k}={_option_text(v)}" for k, v in changes.items())
                await _consent(db, list_name, address, "changed", method, f"{text}; {detail}" if detail else text)

    async def member_lists(self, address: str) -> list[tuple[ListRecord, MemberRecord]]:
        """Every list this address is on, with its membership (the preferences page)."""
        rows = await self._fetchall(
            "SELECT l.id, l.name, l.settings, l.created_at, "
            + ", ".join(f"m.{c.strip()}" for c in MEMBER_COLS.split(","))
            + " FROM members m JOIN lists l ON l.id = m.list_id WHERE m.address = ? ORDER BY l.name",
            (address,),
        )
        return [(ListRecord(r[0], r[1], r[2], r[3]), _member(r[4:])) for r in rows]

    async def member_addresses(self) -> list[str]:
        """Every address on any list, once (the preferences page finds a token's owner among them)."""
        return [r[0] for r in await self._fetchall("SELECT DISTINCT address FROM members")]

    async def recipients(self, list_id: int) -> list[str]:
        """Every member with delivery enabled, whatever their mode."""
        rows = await self._fetchall(
            "SELECT address FROM members WHERE list_id = ? AND delivery = 'enabled' ORDER BY address",
            (list_id,),
        )
        return [r[0] for r in rows]

    async def post_recipients(self, list_id: int) -> list[Recipient]:
        """Members with delivery enabled, with the options that decide what each of them gets."""
        rows = await self._fetchall(
            "SELECT address, delivery_mode, not_me, no_dupes, ack FROM members"
            " WHERE list_id = ? AND delivery = 'enabled' ORDER BY address",
            (list_id,),
        )
        return [Recipient(r[0], r[1], bool(r[2]), bool(r[3]), bool(r[4])) for r in rows]

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
            except integrity_errors():
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

