"""Prepare: turn an accepted post into the message its list sends, once per post.

The prepare stage claims accepted posts from the store (oldest first, with a
lease), rewrites each once for its list (List-* headers, subject tag, footer,
DMARC-safe From), ARC-seals what every copy shares, signs it (DKIM comes last,
on the final bytes; personalized copies are signed per member at delivery),
and queues it for every member with delivery enabled, in one transaction that
also marks the post ``queued`` and stores it for the archive.  Mail to
``LIST-owner`` is forwarded to the owners the same way.  A post that cannot be
prepared is held for a person, never dropped.

Nothing passes to the next stages but rows and a wake-up: the deliver stage
(``listserv.fanout``) and the archive stage (``listserv.archive``) find their
work in the store.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import hashlib
import logging
from collections.abc import Awaitable, Callable

from listserv import dkim
from listserv.auth import arc_seal_message, our_auth_results
from listserv.config import Config
from listserv.dmarc import TxtResolver, is_strict
from listserv.errors import ArchiveIdTaken
from listserv.fanout import PERSONAL_PLACEHOLDER, PREFS_PLACEHOLDER, bounces_address
from listserv.message import archiving_refused, normalize_address
from listserv.rewrite import ListContext, Rewritten, decode_header_text, header_values, message_id_hash, rewrite
from listserv.settings import ListSettings, effective_settings
from listserv.store import ArchiveEntry, DigestEntry, IncomingRecord, Recipient, Store
from listserv.unsubscribe import Tokens
from listserv.wake import Wakeup

__all__ = ["PROBE_EVERY", "Preparer", "copy_recipients", "generated_message_id", "named_recipients"]

log = logging.getLogger("listserv.prepare")

PROBE_EVERY = 10  # verp = "probe": one post in this many goes VERP'd
CLAIM = 50  # posts claimed per transaction
RETRY_AFTER = 30.0  # seconds before a message whose preparation failed in the store is tried again


def generated_message_id(record: IncomingRecord, domain: str) -> str:
    # Derived from the stored message, so a post prepared twice (after a
    # crash) gets the same Message-ID and the same Archived-At.
    digest = hashlib.sha1(record.data).hexdigest()[:20]
    return f"listserv.{record.id}.{digest}@{domain}"


def named_recipients(raw: bytes) -> frozenset[str]:
    """The addresses in a post's To and Cc (for no_dupes), lower-cased; never raises."""
    from email.utils import getaddresses

    headers = header_values(raw)
    out = set()
    for _, addr in getaddresses([*headers.get("to", []), *headers.get("cc", [])]):
        try:
            out.add(normalize_address(addr))
        except Exception:  # noqa: BLE001 - AddressError: not an address we could send to anyway
            continue
    return frozenset(out)


def copy_recipients(members: list[Recipient], sender: str, named: frozenset[str]) -> list[str]:
    """Who gets a post as a single copy, by each member's options (pure).

    Digest and index members get it in their digest instead; ``not_me``
    skips the author's own post; ``no_dupes`` skips a member the author
    wrote to directly in To or Cc (they have it already, as Mailman does).
    """
    out = []
    for m in members:
        if m.delivery_mode != "each":
            continue
        if m.not_me and m.address == sender:
            continue
        if m.no_dupes and m.address in named and m.address != sender:
            continue
        out.append(m.address)
    return out


def author_name(raw: bytes) -> str:
    """The display name of the post's From (else its address), decoded: for a digest's contents."""
    from email.utils import parseaddr

    values = header_values(raw).get("from", [])
    if not values:
        return ""
    name, addr = parseaddr(decode_header_text(values[0]))
    return " ".join((name or addr).split())[:200]


class _NoWakeup:
    def notify(self, channel: str) -> None:
        pass


class Preparer:
    def __init__(self, config: Config, store: Store, key: dkim.DkimKey | dkim.KeySet, *,
                 resolve_txt: TxtResolver | None = None, tokens: Tokens | None = None,
                 wakeup: Wakeup | None = None) -> None:
        self.config = config
        self.store = store
        # Every copy is signed with all of keys (RSA, and Ed25519 when
        # configured); the ARC seal with the RSA key alone.
        self.keys = dkim.KeySet.of(key)
        self.key = self.keys.rsa
        self.resolve_txt = resolve_txt
        # Member tokens for one-click unsubscribe; None: no personalized copies.
        self.tokens = tokens
        self.wakeup: Wakeup | _NoWakeup = wakeup or _NoWakeup()

    async def run_once(self, owner: str, now: float, until: float) -> int:
        """Claim what arrived (posts, then owner mail), prepare it, record it; returns how many were claimed.

        The caller runs this again at once while it returns a full claim, so
        a backlog is worked off at the stage's own speed, not one claim per poll.
        """
        posts = await self.store.claim_incoming("post", "accepted", owner, now, until, CLAIM)
        for record in posts:
            await self._guarded(self.prepare_post, record, owner, now)
        owner_mail = await self.store.claim_incoming("owner", "new", owner, now, until, CLAIM)
        for record in owner_mail:
            await self._guarded(self.forward_owner_mail, record, owner, now)
        return max(len(posts), len(owner_mail))

    async def _guarded(self, step: Callable[[IncomingRecord], Awaitable[None]], record: IncomingRecord,
                       owner: str, now: float) -> None:
        # A post that cannot be prepared is held by prepare_post itself; what
        # fails here is the store (a lock held too long, a full disk): the
        # message stays claimed for a short while, then any worker tries again.
        try:
            await step(record)
        except Exception:  # noqa: BLE001 - one message must not stop the others
            log.exception("could not record the preparation of message %s; it is tried again shortly", record.id)
            try:
                await self.store.release_incoming(record.id, owner, now + RETRY_AFTER)
            except Exception:  # noqa: BLE001 - then its lease runs out
                log.exception("could not give message %s back either", record.id)

    async def _settings(self, list_id: int) -> tuple[str, ListSettings]:
        lst = await self.store.get_list_by_id(list_id)
        return lst.name, effective_settings(self.config.list_defaults, lst.settings_json)

    async def _munge_from(self, settings: ListSettings, author: str) -> bool:
        if settings.dmarc_mitigation == "always":
            return True
        if settings.dmarc_mitigation == "never" or "@" not in author:
            return False
        if self.resolve_txt is None:
            return True
        return await is_strict(author.rpartition("@")[2], self.resolve_txt)

    def _sign(self, data: bytes) -> bytes:
        return dkim.sign_message(data, self.keys)

    async def prepare_post(self, record: IncomingRecord) -> None:
        try:
            await self._prepare_post(record)
        except ArchiveIdTaken:
            # Its twin (same Message-ID, other content) was queued by another
            # worker meanwhile; preparing again gives this post a derived id.
            await self._prepare_post(record)

    async def _prepare_post(self, record: IncomingRecord) -> None:
        domain = self.config.server.domain
        try:
            name, settings = await self._settings(record.list_id)
            message_id = record.message_id or generated_message_id(record, domain)
            # The archive's id for this post (a derived one when another post
            # already has its Message-ID): Archived-At points at its own page.
            message_id, _ = await self.store.archive_identity(record.list_id, message_id, record.data)
            ctx = ListContext(name=name, domain=domain, settings=settings,
                              archive_base_url=self.config.archive.base_url)
            munge = await self._munge_from(settings, record.sender)
            personal = settings.personalize and self.tokens is not None
            if personal and settings.personal_footer:
                ctx = dataclasses.replace(ctx, unsubscribe_placeholder=PERSONAL_PLACEHOLDER,
                                          prefs_placeholder=PREFS_PLACEHOLDER if self.config.web.base_url else "")
            build = functools.partial(self._build, record, ctx, message_id, munge, personal, settings)
            if len(record.data) >= self.config.server.offload_threshold:
                # A big post's rewrite and signatures take seconds of CPU; on
                # this loop they would stall the other stages mid-transaction,
                # and an open transaction holds SQLite's write lock, which the
                # receiver needs before its next 250.  In a thread the loop
                # keeps turning (the GIL is handed over every few ms).
                rewritten, kind, data, unsigned = await asyncio.to_thread(build)
            else:
                rewritten, kind, data, unsigned = build()
            members = await self.store.post_recipients(record.list_id)
            recipients = copy_recipients(members, record.sender, named_recipients(record.data))
            # Every post waits for the next digest too (whoever is on digests
            # when it goes out): the copy an `each` member gets, minus the
            # per-copy headers, and where a member's own link would stand,
            # the list's leave address (a digest's parts are shared).
            digest = DigestEntry(
                message_id, record.subject, author_name(record.data) or record.sender, record.sender,
                ctx.permalink(message_id),
                unsigned.replace(PERSONAL_PLACEHOLDER.encode(), f"mailto:{ctx.leave_address}".encode())
                .replace(PREFS_PLACEHOLDER.encode(), self._list_page(name).encode()),
            )
            acks = [m.address for m in members if m.ack and m.address == record.sender]
            archive = None
            if not archiving_refused(record.data):
                # The archive keeps the post as its author wrote it (the
                # DMARC From rewrite is for delivery only), with its id.
                archive = ArchiveEntry(message_id, message_id_hash(message_id), record.data)
        except Exception as exc:  # noqa: BLE001 - a post we cannot prepare goes to a person
            log.exception("cannot prepare post %s", record.id)
            await self.store.record_stage_error("prepare", f"cannot prepare post {record.id} (held): {exc!r}")
            await self.store.set_incoming_status(
                record.id, "held", expect="accepted", reason=f"could not be prepared for the list: {exc!r}"[:500]
            )
            self.wakeup.notify("requests")  # the moderators are told it waits
            return
        outbox_id = await self.store.enqueue(
            list_id=record.list_id, kind=kind, envelope_from=bounces_address(name, domain), data=data,
            recipients=recipients, incoming_id=record.id, incoming_status="queued", incoming_expect="accepted",
            archive=archive, digest=digest,
        )
        if acks:
            await self._acknowledge(record, name, settings, acks[0], len(recipients))
        # Recorded: the deliver stage and (for an archived post) the archive
        # stage find their work in the store; this only saves them a poll.
        self.wakeup.notify("deliver")
        if archive is not None:
            self.wakeup.notify("archive")
        if rewritten.stripped:
            log.info("stripped list=%s message_id=%s types=%s", name, message_id, ",".join(rewritten.stripped))
        log.info("queued list=%s message_id=%s outbox=%s recipients=%d mode=%s", name, message_id, outbox_id,
                 len(recipients), kind)

    def _build(self, record: IncomingRecord, ctx: ListContext, message_id: str, munge: bool, personal: bool,
               settings: ListSettings) -> tuple[Rewritten, str, bytes, bytes]:
        """The CPU part of preparing: rewrite, ARC seal, sign (pure: no I/O, no store).

        Returns the rewritten post, its outbox kind, what is queued, and
        the same without a signature (for the digests).
        """
        rewritten = rewrite(record.data, ctx, message_id=message_id, munge_from=munge, author=record.sender)
        if personal and (rewritten.data.count(PERSONAL_PLACEHOLDER.encode()) != 1 or (
                ctx.prefs_placeholder and rewritten.data.count(PREFS_PLACEHOLDER.encode()) != 1)):
            # The footer went where the markers cannot be found (a base64
            # body): no per-member link in the body, only in the headers.
            ctx = dataclasses.replace(ctx, unsubscribe_placeholder="", prefs_placeholder="")
            rewritten = rewrite(record.data, ctx, message_id=message_id, munge_from=munge, author=record.sender)
        prepared = rewritten.data
        if PERSONAL_PLACEHOLDER.encode() not in prepared:
            # RFC 8617: sealed once, over what every copy shares.  A body
            # with each member's own link cannot be sealed once (the seal
            # covers the body), so personal_footer lists go unsealed.
            authserv_id = self.config.server.domain
            prepared = arc_seal_message(prepared, self.key, authserv_id=authserv_id,
                                        auth_results=our_auth_results(record.data, authserv_id) or "arc=none")
        if personal:
            return rewritten, "post-personal", prepared, prepared  # signed per copy
        verp = settings.verp == "always" or (settings.verp == "probe" and record.id % PROBE_EVERY == 0)
        return rewritten, ("post-verp" if verp else "post"), self._sign(prepared), prepared

    def _list_page(self, name: str) -> str:
        """The list's public page (join, and a link to one's settings), or ""."""
        base = self.config.web.base_url
        return f"{base}j/{name}" if base else ""

    async def _acknowledge(self, record: IncomingRecord, name: str, settings: ListSettings, to: str,
                           copies: int) -> None:
        """The `ack` option: a short receipt to the author that the post went out (RFC 3834 auto-replied)."""
        from listserv.texts import compose

        domain = self.config.server.domain
        member = await self.store.member(record.list_id, to)
        language = (member.language if member is not None and member.language else settings.language)
        title = settings.title or name
        try:
            data = compose(
                "post_ack", language, {"title": title, "name": name, "subject": record.subject,
                                       "post_address": f"{name}@{domain}", "copies": copies,
                                       "request_address": f"{name}-request@{domain}"},
                from_name=title, from_addr=f"{name}-request@{domain}", to=to, list_id=f"<{name}.{domain}>",
                domain=domain, in_reply_to=record.message_id,
            )
            await self.store.enqueue(list_id=record.list_id, kind="notice",
                                     envelope_from=bounces_address(name, domain), data=self._sign(data),
                                     recipients=[to])
        except Exception:  # noqa: BLE001 - the post went out; a receipt that cannot is only logged
            log.exception("could not send the receipt for post %s to %s", record.id, to)

    async def forward_owner_mail(self, record: IncomingRecord) -> None:
        domain = self.config.server.domain
        name, _ = await self._settings(record.list_id)
        owners = await self.store.owners(record.list_id)
        why = "" if owners else "the list has no owner to forward it to"
        if not why:
            try:
                signed = self._sign(record.data)
            except Exception as exc:  # noqa: BLE001 - e.g. no From: it cannot leave signed
                why = f"cannot be forwarded: {exc}"
        if why:
            # Kept and recorded (visible in `listserv status` and `person
            # export`), never dropped silently, and never retried in a loop.
            await self.store.set_incoming_status(record.id, "failed", expect="new", reason=why[:500])
            log.warning("owner-mail list=%s id=%s not forwarded: %s", name, record.id, why)
            return
        await self.store.enqueue(
            list_id=record.list_id, kind="owner", envelope_from=bounces_address(name, domain),
            data=signed, recipients=owners, incoming_id=record.id, incoming_status="done",
            incoming_expect="new",
        )
        log.info("forwarded list=%s owner-mail=%s owners=%d", name, record.id, len(owners))
        self.wakeup.notify("deliver")
