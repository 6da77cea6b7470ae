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
from listserv.auth import AuthResult, client_from_trusted_received, strip_our_auth_results, verify_inbound
from listserv.dns import Resolver
from listserv.config import Config
from listserv.message import Membership, Post
from listserv.pipeline import decide
from listserv.rewrite import attachment_types
from listserv.settings import effective_settings
from listserv.store import IncomingRow, PolicySnapshot, Store
from listserv.types import Accept, Discard, Hold, Reject, Reply

__all__ = ["ListHandler", "Target", "parse_recipient", "server_factory"]

log = logging.getLogger("listserv.smtp_in")

REPLY_OK_RCPT = Reply(250, "2.1.5", "OK")
REPLY_UNKNOWN = Reply(550, "5.1.1", "No such list or address here")
REPLY_RELAY_DENIED = Reply(550, "5.7.1", "Relaying denied: this server only takes mail for its lists")
REPLY_BAD_ADDRESS = Reply(501, "5.1.3", "Bad recipient address syntax")
REPLY_TOO_BIG = Reply(552, "5.3.4", "Message too big for this list server")
REPLY_TEMPFAIL = Reply(451, "4.3.0", "Temporary local problem, please try again later")
REPLY_NO_RCPT = Reply(503, "5.5.1", "No valid recipients")

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


def parse_recipient(address: str, domain: str, list_names: set[str] | frozenset[str]) -> Target | Reply:
    """Map a recipient to a list address, or the reply that refuses it."""
    address = address.strip().strip("<>")
    local, at, rcpt_domain = address.rpartition("@")
    if not at or not local:
        return REPLY_BAD_ADDRESS
    if rcpt_domain.lower().rstrip(".") != domain:
        return REPLY_RELAY_DENIED
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
        local = address.rpartition("@")[0].lower().partition("+")[0]
        names = await self._list_names(local)
        target = parse_recipient(address, self.config.server.domain, names)
        if isinstance(target, Reply):
            log.info("refused rcpt=%s reply=%r peer=%s", address, str(target), session.peer)
            return str(target)
        if address.lower() not in (r.lower() for r in envelope.rcpt_tos):
            envelope.rcpt_tos.append(address)
            envelope.rcpt_options.extend(rcpt_options)
        return str(REPLY_OK_RCPT)

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
        parsed = msg.parse(raw, attachments=False)
        sender = msg.sender_of(mail_from, parsed)
        peer = f"{session.peer[0]}" if isinstance(session.peer, tuple) else str(session.peer)
        # The store is read once per list: whether to check the sender, and
        # then what the rules need.
        snapshots: dict[str, PolicySnapshot | None] = {}
        for _, t in targets:
            if isinstance(t, Target) and t.list_name not in snapshots:
                snapshots[t.list_name] = await self.store.policy_snapshot(t.list_name, sender)
        post_settings = [
            effective_settings(self.config.list_defaults, snap.settings_json)
            for _, t in targets
            if isinstance(t, Target) and t.kind == "post" and (snap := snapshots.get(t.list_name)) is not None
        ]
        if any(ls.attachments.hold for ls in post_settings):
            # Only a list that holds some attachment type needs the MIME walk.
            parsed = dataclasses.replace(parsed, attachment_types=attachment_types(raw))
        auth_result: AuthResult | None = None
        body = raw
        if self.resolver is not None and any(ls.sender_authentication != "off" for ls in post_settings):
            auth_result = await self._authenticate(raw, mail_from, peer, session.host_name or "")
            authserv_id = self.config.server.domain
            # RFC 8601 §5: results claiming our authserv-id are ours to
            # write; any that arrive with the message are forged.
            body = auth_result.header_field(authserv_id) + strip_our_auth_results(raw, authserv_id)
        data = _received_header(self.config, session, envelope, lmtp) + body

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

    async def _authenticate(self, raw: bytes, mail_from: str, peer: str, helo: str) -> AuthResult:
        client_ip = peer
        try:
            trusted = any(ipaddress.ip_address(peer) in net for net in self._trusted)
        except ValueError:
            trusted = False
        if trusted:
            # Postfix in front of us: SPF is about the client it talked to.
            found = client_from_trusted_received(raw, self.config.server.trusted_relays)
            client_ip, helo = found if found is not None else ("", "")
        assert self.resolver is not None
        return await verify_inbound(raw, mail_from=mail_from, client_ip=client_ip, helo=helo,
                                    resolver=self.resolver, timeout=self.config.dns.timeout)

    async def _decide_one(
        self, target: Target, snap: PolicySnapshot | None, rcpt: str, mail_from: str, sender: str,
        parsed: msg.ParsedMessage, peer: str, data: bytes, auth_result: AuthResult | None = None,
    ) -> tuple[Reply, IncomingRow | None]:
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
        if isinstance(status, str) and status.startswith("552 "):
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


class ListSMTP(_SizeReplies, _FastAddresses, SMTP):
    pass


class ListLMTP(_SizeReplies, _FastAddresses, LMTP):
    pass


def server_factory(config: Config, handler: ListHandler) -> Callable[[], SMTP]:
    cls = ListLMTP if config.server.protocol == "lmtp" else ListSMTP

    def factory() -> SMTP:
        return cls(
            handler,
            data_size_limit=config.server.max_message_size,
            hostname=config.server.hostname,
            ident="listserv",
            timeout=config.server.timeout,
            decode_data=False,
        )

    return factory
