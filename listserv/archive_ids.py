"""Which archive entry a post is: its own Message-ID, a derived one, or a copy already archived.

Message-IDs are meant to be unique (RFC 5322 §3.6.4) but are not: broken
clients and scripts reuse them.  As public-inbox does, a post whose
Message-ID is already archived with *other* content gets a derived id
(computed from its content, so it is the same on every run and after a
crash); the page still shows the Message-ID the post carries.  A post with
the *same* content (the same bytes, or the same post re-sent by an MTA with
other trace headers) is the archived one.  Pure; no I/O.
"""

from __future__ import annotations

import hashlib
import re

__all__ = ["content_digest", "derived_message_id", "same_post"]

# The fields that make a post what it is; trace and signature fields
# (Received, DKIM-Signature, ARC-*, Authentication-Results, Return-Path ...)
# change when an MTA re-sends it and are left out.
_IDENTITY_FIELDS = (b"from", b"to", b"cc", b"subject", b"date", b"message-id", b"in-reply-to", b"references",
                    b"content-type", b"content-transfer-encoding")
_FIELD = re.compile(rb"^([!-9;-~]+)[ \t]*:(.*(?:\r?\n[ \t].*)*)", re.MULTILINE)
_WSP = re.compile(rb"\s+")
_TRAILING_WSP = re.compile(rb"[ \t]+(?=\n)")


def _split(raw: bytes) -> tuple[bytes, bytes]:
    data = raw.replace(b"\r\n", b"\n")
    end = data.find(b"\n\n")
    if data.startswith(b"\n"):
        return b"", data[1:]
    if end < 0:
        return data, b""
    return data[: end + 1], data[end + 2 :]


def content_digest(raw: bytes) -> str:
    """SHA-256 over the identity fields (whitespace folded) and the body (line ends and trailing blanks normalised)."""
    head, body = _split(raw)
    h = hashlib.sha256()
    fields: dict[bytes, list[bytes]] = {}
    for m in _FIELD.finditer(head):
        name = m.group(1).lower()
        if name in _IDENTITY_FIELDS:
            fields.setdefault(name, []).append(_WSP.sub(b" ", m.group(2)).strip())
    for name in _IDENTITY_FIELDS:
        for value in fields.get(name, ()):
            h.update(name + b":" + value + b"\n")
    h.update(b"\n")
    h.update(_TRAILING_WSP.sub(b"", body).rstrip(b"\n"))
    return h.hexdigest()


def same_post(a: bytes, b: bytes) -> bool:
    return a == b or content_digest(a) == content_digest(b)


def derived_message_id(message_id: str, raw: bytes) -> str:
    """The archive id of a post that reuses ``message_id`` with other content."""
    local, at, domain = message_id.rpartition("@")
    digest = content_digest(raw)[:24]
    if at:
        return f"{local}.dup-{digest}@{domain}"
    return f"{message_id}.dup-{digest}"
