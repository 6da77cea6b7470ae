"""Bytes to the frozen records the posting rules read; address helpers.  No I/O.

Parsing here is deliberately minimal (headers, plus the leaf content types for
the attachment rule) and never raises on broken mail: a header that cannot be
decoded is read with replacement characters, a missing one is empty.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from email.utils import getaddresses

from typing import TYPE_CHECKING

from listserv.errors import AddressError

if TYPE_CHECKING:
    from listserv.auth import AuthResult

__all__ = [
    "Membership",
    "ParsedMessage",
    "Post",
    "decode_header_text",
    "normalize_address",
    "parse",
]

# Deliberately permissive: real members have addresses like o'brien@ and
# jan.kowalski+lista@; we only refuse what cannot be routed.
_ADDRESS = re.compile(r"^[^@\s<>()\[\],;:\"\\]+@[A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?\.[A-Za-z0-9-]{2,}$")


def normalize_address(text: str) -> str:
    """Lower-case and validate one bare e-mail address; raise AddressError."""
    address = text.strip().strip("<>").strip()
    if not _ADDRESS.match(address) or ".." in address:
        raise AddressError(f"{text.strip()!r} is not a valid e-mail address")
    local, _, domain = address.rpartition("@")
    # Local parts are case-sensitive by RFC 5321 §2.4, but no provider our
    # members use treats them so; folding case avoids duplicate members.
    return f"{local.lower()}@{domain.lower()}"


def decode_header_text(value: str) -> str:
    """Decode RFC 2047 encoded-words (RFC 2047 §6) leniently; never raises."""
    from listserv.rewrite import decode_header_text as decode

    try:
        return " ".join(decode(value).split())
    except Exception:  # noqa: BLE001 - a header we cannot decode is shown as it came
        return " ".join(value.split())


@dataclass(frozen=True, slots=True)
class ParsedMessage:
    """What the rules need from the message itself, parsed once at DATA."""

    from_addresses: tuple[str, ...]
    subject: str
    message_id: str  # without angle brackets; "" if absent
    list_ids: tuple[str, ...]  # the list-label of each List-Id (RFC 2919)
    auto_submitted: str
    precedence: str
    header_recipient_count: int
    attachment_types: tuple[str, ...]


def _addresses(headers: dict[str, list[str]], *names: str) -> list[str]:
    values: list[str] = []
    for name in names:
        values.extend(headers.get(name, []))
    out = []
    for _, addr in getaddresses(values):
        try:
            out.append(normalize_address(addr))
        except AddressError:
            continue
    return out


def _first(headers: dict[str, list[str]], name: str) -> str:
    values = headers.get(name)
    return values[0] if values else ""


def parse(raw: bytes, *, attachments: bool = True) -> ParsedMessage:
    """Read the headers the rules need; never raises on broken input.

    ``attachments=False`` skips walking the MIME tree for the leaf types (the
    costly part), for lists that hold no attachment type.
    """
    from listserv.rewrite import attachment_types, header_values

    headers = header_values(raw)
    msgid = _first(headers, "message-id").strip()
    m = re.search(r"<([^<>\s]+)>", msgid)
    msgid = m.group(1) if m else msgid.strip("<> \t")
    list_ids = []
    for value in headers.get("list-id", []):
        m = re.search(r"<([^<>]+)>", value)
        list_ids.append((m.group(1) if m else value).strip().lower())
    return ParsedMessage(
        from_addresses=tuple(_addresses(headers, "from")),
        subject=decode_header_text(_first(headers, "subject")),
        message_id=msgid,
        list_ids=tuple(list_ids),
        auto_submitted=_first(headers, "auto-submitted").strip().lower(),
        precedence=_first(headers, "precedence").strip().lower(),
        header_recipient_count=len(_addresses(headers, "to", "cc")),
        attachment_types=attachment_types(raw) if attachments else (),
    )


@dataclass(frozen=True, slots=True)
class Membership:
    """The sender's standing on one list, read from the store at DATA time."""

    role: str  # "member" | "moderator" | "owner"
    moderated: bool


@dataclass(frozen=True, slots=True)
class Post:
    """One message to one list's posting address, as the rules see it."""

    list_name: str
    list_label: str  # "seap-planning.lists.example.org", our own List-Id
    mail_from: str  # envelope sender; "" for a null reverse-path
    sender: str  # the address membership is checked for (From:, else envelope)
    message: ParsedMessage
    membership: Membership | None
    banned: bool
    always_accept: bool = False  # a moderator chose "approve and always accept this sender"
    auth: AuthResult | None = None  # what DKIM/SPF/DMARC said on arrival; None: not checked


def sender_of(mail_from: str, message: ParsedMessage) -> str:
    """The author address used for the membership check.

    Mailman checks From: first, as members post from their own address while
    the envelope may be a provider's bounce address (SRS, VERP).
    """
    if message.from_addresses:
        return message.from_addresses[0]
    try:
        return normalize_address(mail_from)
    except AddressError:
        return ""


def archiving_refused(raw: bytes) -> bool:
    """True if the author asked not to be archived.

    ``X-No-Archive: yes`` (the Usenet convention most archives honour) and
    ``Archive: no`` (RFC 2369 §3.6 lists Archive among list-related fields;
    the value "no" is what Mailman and HyperKitty check).
    """
    from listserv.rewrite import header_values

    headers = header_values(raw)
    if _first(headers, "x-no-archive").strip().lower().startswith("yes"):
        return True
    return _first(headers, "archive").strip().lower().startswith("no")
