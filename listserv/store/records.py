"""The frozen records the store hands out and takes in."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any

import aiosqlite

ROLES = ("member", "moderator", "owner")
DELIVERY_STATES = ("enabled", "disabled", "nomail")
# How a member receives the list (apart from whether: DELIVERY_STATES).
DELIVERY_MODES = ("each", "digest_mime", "digest_plain", "index")
DIGEST_MODES = DELIVERY_MODES[1:]
MEMBER_LANGUAGES = ("", "pl", "en")  # "": the list's language


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
    delivery_mode: str = "each"
    not_me: bool = False  # no copy of my own posts
    ack: bool = False  # a receipt when my post went out
    no_dupes: bool = True  # no list copy when I am in the post's To or Cc
    language: str = ""  # "": the list's


MEMBER_COLS = ("address, display_name, organisation, role, moderated, delivery, created_at,"
               " delivery_mode, not_me, ack, no_dupes, language")


def _member(r: Any) -> MemberRecord:
    return MemberRecord(r[0], r[1], r[2], r[3], bool(r[4]), r[5], r[6], r[7], bool(r[8]), bool(r[9]),
                        bool(r[10]), r[11])


@dataclass(frozen=True, slots=True)
class Recipient:
    """A member who gets the list's mail, with what decides which mail (listserv.prepare)."""

    address: str
    delivery_mode: str
    not_me: bool
    no_dupes: bool
    ack: bool = False


@dataclass(frozen=True, slots=True)
class DigestPost:
    """A post waiting for (or taken by) a digest: what the table of contents and the parts need."""

    id: int
    incoming_id: int
    message_id: str
    subject: str
    author: str
    sender: str
    archived_at: str
    size: int
    added_at: float
    data: bytes
    organisation: str = ""


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

