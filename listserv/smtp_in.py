"""Receive mail for the lists over SMTP or LMTP (aiosmtpd), and answer only once it is safe.

``handle_RCPT`` accepts exactly the addresses of existing lists and refuses
everything else there, before any body is sent (``550 5.1.1`` unknown address,
``550 5.7.1`` another domain: never an open relay).  ``handle_DATA`` parses the
headers, runs the posting rules, stores what it accepts or holds in one
committed transaction, and only then answers ``250``.  A rejection is the SMTP
reply itself, never a bounce mailed later.  Any error inside a hook becomes
``451 4.3.0`` so the sending MTA keeps the message and retries.

Every reply lives in this module as a ``Reply`` constant.
"""

from __future__ import annotations

import asyncio
import dataclasses
import fnmatch
import ipaddress
import logging
import re
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from email.utils import formatdate
from typing import Any

from aiosmtpd.lmtp import LMTP
from aiosmtpd.smtp import SMTP, Envelope, Session

from listserv import message as msg
from listserv.auth import AuthResult
from listserv.dns import Resolver
from listserv.config import Config, ServerConfig
from listserv.message import Membership, Post
from listserv.offload import AuthRequest, Receiving
from listserv.pipeline import decide
from listserv.settings import effective_settings
from listserv.store import IncomingRow, PolicySnapshot, Store
from listserv.types import Accept, Discard, Hold, Reject, Reply

__all__ = ["ConnectionLimiter", "ListHandler", "Target", "parse_recipient", "read_data", "server_factory"]

log = logging.getLogger("listserv.smtp_in")

REPLY_OK_RCPT = Reply(250, "2.1.5", "OK")
REPLY_UNKNOWN = Reply(550, "5.1.1", "No such list or address here")
REPLY_RELAY_DENIED = Reply(550, "5.7.1", "Relaying denied: this server only takes mail for its lists")
REPLY_BAD_ADDRESS = Reply(501, "5.1.3", "Bad recipient address syntax")
REPLY_TOO_BIG = Reply(552, "5.3.4", "Message too big for this list server")
REPLY_TEMPFAIL = Reply(451, "4.3.0", "Temporary local problem, please try again later")
REPLY_NO_RCPT = Reply(503, "5.5.1", "No valid recipients")
REPLY_LINE_TOO_LONG = Reply(500, "5.5.2", "Line too long: at most 998 characters per line (RFC 5321 section 4.5.3.1.6)")
REPLY_TOO_MANY_RCPTS = Reply(452, "4.5.3", "Too many recipients in this transaction; send the rest in another")
REPLY_TOO_MANY_ERRORS = Reply(421, "4.7.0", "Too many refused recipients; closing the connection")
REPLY_TIMEOUT = Reply(421, "4.4.2", "Timeout waiting for data; closing the connection")
REPLY_TOO_MANY_CONNECTIONS = Reply(421, "4.7.0", "Too many connections to this list server; try again later")
REPLY_TOO_MANY_FROM_YOU = Reply(421, "4.7.0", "Too many connections from your address; try again later")


def header_too_big(limit: int) -> Reply:
    return Reply(552, "5.3.4", f"Header section too big: this list server takes at most {limit} bytes of header")


def too_many_fields(limit: int) -> Reply:
    return Reply(552, "5.3.4", f"Too many header fields: this list server takes at most {limit}")


# Sub-addresses of a list, as Mailman and mlmmj name them.  The value says
# whether a "+detail" part is allowed (tokens, VERP) or required.
SUFFIXES: dict[str, str] = {
    "request": "no",
    "join": "no",
    "leave": "optional",  # LIST-leave+TOKEN: one-click mailto form (RFC 8058 issue)
    "confirm": "required",  # LIST-confirm+TOKEN
    "owner": "no",
    "bounces": "optional",  # LIST-bounces+user=example.org (VERP)
}


@dataclass(frozen=True, slots=True)
class Target:
    """What one recipient address means: a list and which of its addresses."""

    list_name: str
    kind: str  # "post" or one of SUFFIXES
    detail: str


# The site's own role addresses at the list domain: postmaster (RFC 5321
# §4.5.1 requires it, and the bare "postmaster" too) and abuse (RFC 2142 §2).
# Their mail goes to [server] postmaster.
SITE_ADDRESSES = frozenset({"postmaster", "abuse"})


def parse_recipient(address: str, domain: str, list_names: set[str] | frozenset[str]) -> Target | Reply:
    """Map a recipient to a list address, or the reply that refuses it."""
    address = address.strip().strip("<>")
    if address.lower() == "postmaster":  # RFC 5321 §4.5.1: without a domain, too
        return Target("", "postmaster", "")
    local, at, rcpt_domain = address.rpartition("@")
    if not at or not local:
        return REPLY_BAD_ADDRESS
    if rcpt_domain.lower().rstrip(".") != domain:
        return REPLY_RELAY_DENIED
    if local.lower() in SITE_ADDRESSES:
        return Target("", "postmaster", "")
    base, plus, detail = local.partition("+")
    # The list part is matched without case; the +detail (a token, a VERP
    # address) is kept as it came.
    base = base.lower()
    if base in list_names:
        return REPLY_UNKNOWN if plus else Target(base, "post", "")
    name, dash, suffix = base.rpartition("-")
    if not dash or suffix not in SUFFIXES or name not in list_names:
        return REPLY_UNKNOWN
    rule = SUFFIXES[suffix]
    if (rule == "no" and plus) or (rule == "required" and not detail):
        return REPLY_UNKNOWN
    return Target(name, suffix, detail)


def _banned(sender: str, patterns: tuple[str, ...]) -> bool:
    # A pattern is an address, or a glob like "*@spam.example".
    return any(fnmatch.fnmatchcase(sender, p.lower()) for p in patterns)


class ListHandler:
    """The aiosmtpd handler: the hooks are the receive stage."""

    def __init__(self, config: Config, store: Store, on_stored: Callable[[], None] = lambda: None,
                 resolver: Resolver | None = None) -> None:
        self.config = config
        self.store = store
        # DNS for checking senders on arrival; None: not checked (tests of
        # other things, and `sender_authentication = off` everywhere).
        self.resolver = resolver
        self._trusted = [ipaddress.ip_network(n, strict=False) for n in config.server.trusted_relays]
        self.on_stored = on_stored
        server = config.server
        self.receiving = Receiving(resolver, workers=server.receive_workers, threshold=server.offload_threshold,
                                   nameservers=config.dns.nameservers,
                                   job_timeout=max(60.0, 8 * config.dns.timeout))
        self._names: frozenset[str] = frozenset()
        self._names_at = 0.0
        self.active = 0  # DATA transactions in progress (graceful shutdown waits on them)
        self.idle = asyncio.Event()
        self.idle.set()

    async def _list_names(self, wanted: str | None) -> frozenset[str]:
        # Cached briefly so a busy MTA's RCPTs don't each cost a query; a miss
        # always reloads, so a list created a moment ago is found at once.
        # (None: any cached set will do, the recipients were checked at RCPT.)
        now = time.monotonic()
        stale = now - self._names_at > 5.0
        if stale or (wanted is not None and not any(wanted.startswith(n) for n in self._names)):
            self._names = frozenset(await self.store.list_names())
            self._names_at = now
        return self._names

    async def handle_RCPT(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, rcpt_options: list[str]
    ) -> str:
        limits = self.config.server
        if len(envelope.rcpt_tos) >= limits.recipient_limit:
            # RFC 5321 §4.5.3.1.10: 452 for too many recipients; the client
            # sends the rest in another transaction.
            log.info("refused rcpt=%s reply=%r peer=%s", address, str(REPLY_TOO_MANY_RCPTS), session.peer)
            return str(REPLY_TOO_MANY_RCPTS)
        local = address.rpartition("@")[0].lower().partition("+")[0]
        names = await self._list_names(local)
        target = parse_recipient(address, limits.domain, names)
        if isinstance(target, Reply):
            log.info("refused rcpt=%s reply=%r peer=%s", address, str(target), session.peer)
            return await self._refused(session, target)
        if address.lower() not in (r.lower() for r in envelope.rcpt_tos):
            envelope.rcpt_tos.append(address)
            envelope.rcpt_options.extend(rcpt_options)
        return str(REPLY_OK_RCPT)

    async def _refused(self, session: Session, reply: Reply) -> str:
        # Address harvesting: after soft_error_limit refused recipients each
        # further one is answered late, and past hard_error_limit the
        # session ends (Postfix's smtpd_error_sleep_time, smtpd_hard_error_limit).
        limits = self.config.server
        errors = getattr(session, "rcpt_errors", 0) + 1
        setattr(session, "rcpt_errors", errors)  # noqa: B010 - aiosmtpd's Session has no slot for it
        if errors > limits.hard_error_limit:
            log.warning("too many refused recipients (%d) peer=%s: disconnecting", errors, session.peer)
            setattr(session, "close_after_reply", True)  # noqa: B010
            return str(REPLY_TOO_MANY_ERRORS)
        if errors > limits.soft_error_limit:
            log.info("refused recipient %d from peer=%s: slowing down %.3gs", errors, session.peer,
                     limits.error_sleep_time)
            await asyncio.sleep(limits.error_sleep_time)
        return str(reply)

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        self.active += 1
        self.idle.clear()
        try:
            return await self._handle_data(server, session, envelope)
        finally:
            self.active -= 1
            if self.active == 0:
                self.idle.set()

    async def _handle_data(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        lmtp = isinstance(server, LMTP)
        raw = envelope.original_content or b""
        if isinstance(raw, str):  # pragma: no cover - decode_data is off
            raw = raw.encode("utf-8", "surrogateescape")
        if not envelope.rcpt_tos:
            return str(REPLY_NO_RCPT)
        mail_from = _reverse_path(envelope.mail_from)
        names = await self._list_names(None)
        targets: list[tuple[str, Target | Reply]] = [
            (rcpt, parse_recipient(rcpt, self.config.server.domain, names)) for rcpt in envelope.rcpt_tos
        ]
        # Parsing and the checks below run in a worker process for big
        # messages (listserv/offload.py): the loop keeps serving the others.
        parsed = await self.receiving.parse(raw)
        sender = msg.sender_of(mail_from, parsed)
        peer = f"{session.peer[0]}" if isinstance(session.peer, tuple) else str(session.peer)
        # The store is read once per list: whether to check the sender, and
        # then what the rules need.
        snapshots: dict[str, PolicySnapshot | None] = {}
        for _, t in targets:
            if isinstance(t, Target) and t.kind != "postmaster" and t.list_name not in snapshots:
                snapshots[t.list_name] = await self.store.policy_snapshot(t.list_name, sender)
        post_settings = [
            effective_settings(self.config.list_defaults, snap.settings_json)
            for _, t in targets
            if isinstance(t, Target) and t.kind == "post" and (snap := snapshots.get(t.list_name)) is not None
        ]
        # Only a list that holds some attachment type needs the MIME walk.
        walk = any(ls.attachments.hold for ls in post_settings)
        auth_request: AuthRequest | None = None
        if self.resolver is not None and any(ls.sender_authentication != "off" for ls in post_settings):
            auth_request = self._auth_request(mail_from, peer, session.host_name or "")
        checked = await self.receiving.check(raw, attachments=walk, auth=auth_request)
        if checked.attachment_types is not None:
            parsed = dataclasses.replace(parsed, attachment_types=checked.attachment_types)
        auth_result = checked.auth
        data = _received_header(self.config, session, envelope, lmtp) + checked.body

        replies: dict[str, Reply] = {}
        rows: list[IncomingRow] = []
        seen: dict[tuple[str, str, str], Reply] = {}
        for rcpt, target in targets:
            if isinstance(target, Reply):
                replies[rcpt] = target
                continue
            key = (target.list_name, target.kind, target.detail)
            if key in seen:  # the same list twice in one transaction: deliver once
                replies[rcpt] = seen[key]
                continue
            reply, row = await self._decide_one(target, snapshots.get(target.list_name), rcpt, mail_from, sender,
                                                parsed, peer, data, auth_result)
            seen[key] = replies[rcpt] = reply
            if row is not None:
                rows.append(row)

        for rcpt, target in targets:
            # LMTP refuses per list, SMTP the whole post: either way each
            # refusing list gets its line, with the Message-ID to grep for.
            refusal = replies.get(rcpt)
            if refusal is not None and not 200 <= refusal.code < 300:
                log.info("rejected list=%s message_id=%s from=%s rcpt=%s reply=%r",
                         target.list_name if isinstance(target, Target) else "", parsed.message_id, sender, rcpt,
                         str(refusal))
        if not lmtp:
            # One SMTP reply covers every recipient.  If any list refuses the
            # post, refuse it whole and store nothing: the sender sees why, and
            # no list gets a post its sender was told failed.
            refusals = [r for r in replies.values() if not 200 <= r.code < 300]
            if refusals:
                return str(refusals[0])
        if rows:
            await self.store.submit_incoming(rows)
            self.on_stored()
        for row in rows:
            log.info(
                "%s list=%s kind=%s message_id=%s from=%s reason=%s",
                {"accepted": "accepted", "held": "held", "discarded": "discarded"}.get(row.status, "received"),
                self._name_of(targets, row), row.kind, row.message_id, row.sender, row.reason,
            )
        if lmtp:
            # RFC 2033 §4.2: one reply per accepted RCPT, in RCPT order.
            return "\r\n".join(str(replies[rcpt]) for rcpt in envelope.rcpt_tos)
        return str(next(iter(replies.values())))

    @staticmethod
    def _name_of(targets: list[tuple[str, Target | Reply]], row: IncomingRow) -> str:
        for rcpt, target in targets:
            if rcpt == row.rcpt and isinstance(target, Target):
                return target.list_name
        return ""

    def _auth_request(self, mail_from: str, peer: str, helo: str) -> AuthRequest:
        try:
            trusted = any(ipaddress.ip_address(peer) in net for net in self._trusted)
        except ValueError:
            trusted = False
        return AuthRequest(mail_from=mail_from, client_ip=peer, helo=helo, trusted=trusted,
                           trusted_relays=self.config.server.trusted_relays,
                           authserv_id=self.config.server.domain, timeout=self.config.dns.timeout)

    async def _decide_one(
        self, target: Target, snap: PolicySnapshot | None, rcpt: str, mail_from: str, sender: str,
        parsed: msg.ParsedMessage, peer: str, data: bytes, auth_result: AuthResult | None = None,
    ) -> tuple[Reply, IncomingRow | None]:
        if target.kind == "postmaster":
            # Stored like a list's owner mail, for the site administrator
            # ([server] postmaster; listserv/postmaster.py forwards it).
            # List id 0 is the site, as for site-wide bans.
            return Reply(250, "2.0.0", "Stored for the postmaster"), IncomingRow(
                list_id=0, kind="postmaster", detail="", mail_from=mail_from, rcpt=rcpt, peer=peer,
                message_id=parsed.message_id, sender=sender, subject=parsed.subject[:500], status="new",
                reason="", data=data,
            )
        if snap is None:  # removed between RCPT and DATA
            return REPLY_UNKNOWN, None

        def row(status: str, reason: str) -> IncomingRow:
            return IncomingRow(
                list_id=snap.list_id, kind=target.kind, detail=target.detail, mail_from=mail_from, rcpt=rcpt,
                peer=peer, message_id=parsed.message_id, sender=sender, subject=parsed.subject[:500],
                status=status, reason=reason, data=data,
            )

        if target.kind != "post":
            # Commands, confirmations, bounces and owner mail are stored as
            # they are, for the stage that handles each kind.
            return Reply(250, "2.0.0", f"Stored for {target.list_name}-{target.kind}"), row("new", "")
        settings = effective_settings(self.config.list_defaults, snap.settings_json)
        post = Post(
            list_name=target.list_name,
            list_label=f"{target.list_name}.{self.config.server.domain}",
            mail_from=mail_from,
            sender=sender,
            message=parsed,
            membership=Membership(snap.role, snap.moderated) if snap.role else None,
            banned=bool(sender) and _banned(sender, snap.ban_patterns),
            always_accept=snap.always_accept,
            auth=auth_result,
        )
        verdict = decide(post, settings)
        if isinstance(verdict, Reject):
            return verdict.reply, None
        if isinstance(verdict, Accept):
            return Reply(250, "2.0.0", f"Accepted for {target.list_name}"), row("accepted", verdict.reason)
        if isinstance(verdict, Hold):
            return Reply(250, "2.0.0", f"Held for moderation on {target.list_name}: {verdict.reason}"), row(
                "held", verdict.reason
            )
        assert isinstance(verdict, Discard)
        # Accepted and recorded, but not distributed (loops, bounces, auto-replies).
        return Reply(250, "2.0.0", f"Accepted (not distributed: {verdict.reason})"), row(
            "discarded", verdict.reason
        )

    async def handle_exception(self, error: Exception) -> str:
        log.error("internal error while receiving: %r", error, exc_info=error)
        return str(REPLY_TEMPFAIL)


def _reverse_path(mail_from: str | None) -> str:
    value = (mail_from or "").strip()
    return "" if value in ("", "<>") else value.strip("<>")


_HEADER_SAFE = re.compile(r"[^\x21-\x7e]")


def _received_header(config: Config, session: Session, envelope: Envelope, lmtp: bool) -> bytes:
    # RFC 5321 §4.4: a server that accepts a message inserts a trace record.
    helo = _HEADER_SAFE.sub("", session.host_name or "unknown")[:200] or "unknown"
    ip = session.peer[0] if isinstance(session.peer, tuple) else str(session.peer)
    proto = "LMTP" if lmtp else ("ESMTP" if session.extended_smtp else "SMTP")
    qid = secrets.token_hex(6)
    for_clause = f"\r\n\tfor <{envelope.rcpt_tos[0]}>" if len(envelope.rcpt_tos) == 1 else ""
    text = (
        f"Received: from {helo} ([{ip}])\r\n\tby {config.server.hostname} (listserv) with {proto} id {qid}"
        f"{for_clause}; {formatdate(localtime=False, usegmt=True)}\r\n"
    )
    return text.encode("ascii", "replace")


class _SizeReplies:
    """aiosmtpd's own 552 texts lack the RFC 3463 code; ours say 5.3.4."""

    async def push(self, status: Any) -> None:
        if isinstance(status, str) and status.startswith("552 ") and not status.startswith("552 5."):
            status = str(REPLY_TOO_BIG)
        await super().push(status)  # type: ignore[misc]


_SIMPLE_PATH = re.compile(r"^<([^<>\s\"\\@]+@[A-Za-z0-9.-]+)>$")


class _FastAddresses:
    """aiosmtpd parses every MAIL/RCPT path with the email package's full RFC 5322
    parser; plain ``<local@domain>`` (nearly all of them) needs only a regex."""

    def _getaddr(self, arg: str) -> tuple[str | None, str | None]:
        head, _, rest = arg.partition(" ")
        m = _SIMPLE_PATH.match(head)
        if m is not None:
            return m.group(1), (" " + rest if rest else "")
        return super()._getaddr(arg)  # type: ignore[misc, no-any-return]


class ConnectionLimiter:
    """Counts open sessions, in all and per client address, for ``421 4.7.0``."""

    def __init__(self, total: int, per_ip: int) -> None:
        self.total = total
        self.per_ip = per_ip
        self.open = 0
        self.by_ip: dict[str, int] = {}

    def admit(self, ip: str) -> Reply | None:
        if self.by_ip.get(ip, 0) >= self.per_ip:
            return REPLY_TOO_MANY_FROM_YOU
        if self.open >= self.total:
            return REPLY_TOO_MANY_CONNECTIONS
        self.open += 1
        self.by_ip[ip] = self.by_ip.get(ip, 0) + 1
        return None

    def release(self, ip: str) -> None:
        self.open -= 1
        left = self.by_ip.get(ip, 0) - 1
        if left > 0:
            self.by_ip[ip] = left
        else:
            self.by_ip.pop(ip, None)


# -- DATA --------------------------------------------------------------------------------

# RFC 5321 §4.5.3.1.6: 1000 octets per line with CRLF, one more for a
# transparency dot (as aiosmtpd counts).  A bare LF ends a line too.
MAX_LINE = 1001
# How much the stream buffers before handing a piece of DATA over; also the
# longest command line buffered before aiosmtpd refuses it (at 512).
_CHUNK = 64 * 1024
# The end of data is CRLF "." CRLF.  Searching for LF "." CRLF finds it and
# also a "." line after a bare LF, which is content (Postfix 3.9's
# smtpd_forbid_bare_newline = normalize): the byte before tells them apart.
_EOD = b"\n.\r\n"


class _DataState:
    """Bookkeeping while DATA arrives: size, line lengths, the header section."""

    def __init__(self, server: ServerConfig) -> None:
        self.max_size = server.max_message_size
        self.max_header = server.max_header_size
        self.max_fields = server.max_header_fields
        self.chunks: list[bytes] = []
        self.size = 0
        self.line = 0  # length of the line in progress
        self.refusal: Reply | None = None  # decided early; the rest is read and dropped
        self.in_header = True
        self.header_size = 0
        self.fields = 0
        self.line_head = b""  # first two bytes of the line in progress (for the header scan)
        self.last = b"\n"  # the last byte taken (content starts at a line start)

    def take(self, data: bytes) -> None:
        if not data:
            return
        self.last = data[-1:]
        self.size += len(data)
        if self.refusal is None and self.size > self.max_size:
            self.refuse(REPLY_TOO_BIG)
        parts = data.split(b"\n")
        # The first part continues the line in progress; the last one starts a new one.
        if len(parts) == 1:
            longest = self.line + len(data)
        else:
            longest = max(self.line + len(parts[0]) + 1, max(map(len, parts[1:-1]), default=0) + 1, len(parts[-1]))
        if self.refusal is None and longest > MAX_LINE:
            self.refuse(REPLY_LINE_TOO_LONG)
        if self.in_header and self.refusal is None:
            self._scan_header(parts)
        self.line = len(parts[-1]) if len(parts) > 1 else self.line + len(data)
        if self.refusal is None:
            self.chunks.append(data)

    def _scan_header(self, parts: list[bytes]) -> None:
        # RFC 5322 §2.2: a field starts on a line that does not begin with
        # white space; the header section ends at the first empty line.
        last = len(parts) - 1
        for i, part in enumerate(parts):
            head, length = ((self.line_head + part[:2])[:2], self.line + len(part)) if i == 0 else (part[:2], len(part))
            if i == last:  # the line goes on in the next piece
                self.line_head = head
                self.header_size += len(part)
                break
            self.header_size += len(part) + 1
            self.line_head = b""
            if length == 0 or (length == 1 and head == b"\r"):
                self.in_header = False
                break
            if head[:1] not in (b" ", b"\t"):
                self.fields += 1
        if self.header_size > self.max_header:
            self.refuse(header_too_big(self.max_header))
        elif self.fields > self.max_fields:
            self.refuse(too_many_fields(self.max_fields))

    def refuse(self, reply: Reply) -> None:
        self.refusal = reply
        self.chunks.clear()  # nothing more is kept: memory stays bounded

    def content(self) -> bytes:
        data = b"".join(self.chunks)
        self.chunks.clear()
        # RFC 5321 §4.5.2: a receiver deletes the first "." of a line; a line
        # starts at the beginning and after every LF, bare or not.
        data = data.replace(b"\n.", b"\n")
        if data.startswith(b"."):
            data = data[1:]
        if data.count(b"\n") != data.count(b"\r\n"):
            # Bare LF is stored as CRLF (Postfix's "normalize").
            data = data.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
        return data


async def read_data(reader: asyncio.StreamReader, server: ServerConfig) -> bytes | Reply:
    """Read DATA up to CRLF "." CRLF: the message, or the reply that refuses it.

    A bare LF ends a line (for the length limit) and is stored as CRLF; it
    never ends DATA, and neither does a bare CR, so no SMTP smuggling
    (``\\n.\\n``, ``\\r.\\r``, ``\\r\\n.\\n``, ...) splits one message into two.  A refusal
    (size, line length, header limits) is answered only after the end of
    data (RFC 5321 §4.2.5), without keeping what follows in memory.
    """
    state = _DataState(server)

    async def line_start() -> bool:
        # After CRLF: a lone "." line ends the data.  Read byte by byte, so
        # no byte of the next command is taken.
        first = await reader.readexactly(1)
        if first != b".":
            state.take(first)
            return False
        rest = await reader.readexactly(2)
        if rest == b"\r\n":
            return True
        state.take(first + rest)
        return False

    if not await line_start():
        while True:
            try:
                data = await reader.readuntil(_EOD)
            except asyncio.LimitOverrunError as exc:
                state.take(await reader.read(exc.consumed))
                continue
            before = data[-5:-4] if len(data) >= 5 else state.last
            if before == b"\r":
                state.take(data[:-3])
                break
            state.take(data)  # "." after a bare LF: content, and a CRLF line start follows
            if await line_start():
                break
    if state.refusal is not None:
        return state.refusal
    return state.content()


class _Limits:
    """Timeouts with a 421, DATA as Postfix reads it, connection and error limits."""

    # The StreamReader's buffer size (aiosmtpd passes this as its limit).
    line_length_limit = _CHUNK
    limiter: ConnectionLimiter | None = None
    server_config: ServerConfig | None = None
    _peer_ip = ""
    _admitted = False
    _refusal: Reply | None = None
    _busy = False

    # Attributes of aiosmtpd.SMTP used here (for mypy; the class is untyped).
    transport: Any
    session: Any
    envelope: Any
    _reader: asyncio.StreamReader
    _writer: asyncio.StreamWriter
    _timeout_duration: float

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if self.limiter is not None and not self._admitted and self._refusal is None:
            peer = transport.get_extra_info("peername")
            self._peer_ip = str(peer[0]) if isinstance(peer, tuple) else str(peer)
            self._refusal = self.limiter.admit(self._peer_ip)
            self._admitted = self._refusal is None
        super().connection_made(transport)  # type: ignore[misc]

    def connection_lost(self, error: Exception | None) -> None:
        if self._admitted and self.limiter is not None:
            self._admitted = False
            self.limiter.release(self._peer_ip)
        super().connection_lost(error)  # type: ignore[misc]

    def _create_session(self) -> Session:
        session = super()._create_session()  # type: ignore[misc]
        session.rcpt_errors = 0
        session.close_after_reply = False
        return session  # type: ignore[no-any-return]

    async def _handle_client(self) -> None:
        if self._refusal is not None:
            log.warning("refused connection peer=%s: %s", self._peer_ip, self._refusal.text)
            await self.push(str(self._refusal))
            self.transport.close()
            return
        await super()._handle_client()  # type: ignore[misc]

    async def push(self, status: Any) -> None:
        await super().push(status)  # type: ignore[misc]

    def data_received(self, data: bytes) -> None:
        # RFC 5321 §4.5.3.2: the timeouts are per read, so any bytes from
        # the client restart the clock (not only a complete command).
        super().data_received(data)  # type: ignore[misc]
        self._reset_timeout()

    def _reset_timeout(self, duration: float | None = None) -> None:
        super()._reset_timeout(duration)  # type: ignore[misc]

    def _timeout_cb(self) -> None:
        if self._busy:  # our own work (storing) is no client's silence
            self._reset_timeout()
            return
        # RFC 5321 §4.5.3.2 and §3.8: say why before closing.
        if self.transport is not None and not self.transport.is_closing():
            log.info("timeout peer=%s: closing with 421", self._peer_ip or self.session.peer)
            self.transport.write(str(REPLY_TIMEOUT).encode("ascii") + b"\r\n")
        super()._timeout_cb()  # type: ignore[misc]

    async def smtp_RCPT(self, arg: str | None) -> None:
        await super().smtp_RCPT(arg)  # type: ignore[misc]
        if self.session is not None and getattr(self.session, "close_after_reply", False):
            self.transport.close()

    async def smtp_DATA(self, arg: str) -> None:
        # aiosmtpd's DATA reads only up to CRLF, so a bare-LF message is one
        # long line (500); this one reads as Postfix 3.9 does by default.
        if await self.check_helo_needed():  # type: ignore[attr-defined]
            return
        if await self.check_auth_needed("DATA"):  # type: ignore[attr-defined]
            return
        if not self.envelope.rcpt_tos:
            await self.push("503 5.5.1 Error: need RCPT command")
            return
        if arg:
            await self.push("501 5.5.4 Syntax: DATA")
            return
        assert self.server_config is not None
        await self.push("354 End data with <CR><LF>.<CR><LF>")
        command_timeout = self._timeout_duration
        self._timeout_duration = self.server_config.data_timeout
        self._reset_timeout()
        try:
            result = await read_data(self._reader, self.server_config)
        finally:
            self._timeout_duration = command_timeout
        if isinstance(result, Reply):
            self._set_post_data_state()  # type: ignore[attr-defined]
            await self.push(str(result))
            self._reset_timeout()
            return
        self.envelope.content = self.envelope.original_content = result
        self._busy = True
        try:
            status = await self._call_handler_hook("DATA")  # type: ignore[attr-defined]
        finally:
            self._busy = False
        self._set_post_data_state()  # type: ignore[attr-defined]
        await self.push("250 OK" if not isinstance(status, str) else status)
        self._reset_timeout()


class ListSMTP(_Limits, _SizeReplies, _FastAddresses, SMTP):
    pass


class ListLMTP(_Limits, _SizeReplies, _FastAddresses, LMTP):
    pass


def server_factory(config: Config, handler: ListHandler) -> Callable[[], SMTP]:
    cls = ListLMTP if config.server.protocol == "lmtp" else ListSMTP
    limiter = ConnectionLimiter(config.server.max_connections, config.server.max_connections_per_ip)

    def factory() -> SMTP:
        session = cls(
            handler,
            data_size_limit=config.server.max_message_size,
            hostname=config.server.hostname,
            ident="listserv",
            timeout=config.server.timeout,
            decode_data=False,
        )
        session.limiter = limiter
        session.server_config = config.server
        return session

    return factory
