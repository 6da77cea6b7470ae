"""Deliver: turn accepted posts into signed copies and fan them out, durably and in batches.

The worker does two things in a loop.

1. *Prepare*: each accepted post (oldest first) is rewritten once for its list,
   signed once (DKIM comes last, on the final bytes), and queued for every
   member with delivery enabled, in one transaction that also marks the post
   ``queued``.  Mail to ``LIST-owner`` is forwarded to the owners, and the
   other stages given to the worker run (commands, held-post notices).
2. *Deliver*: due copies are grouped into batches of up to
   ``max_recipients`` RCPTs per transaction (``plan_batches``) and sent over
   ``connections`` parallel connections.  Each batch's outcome is stored in
   one transaction: 2xx -> sent, 5xx -> failed (recorded against that
   recipient), 4xx or a network failure -> retried with exponential backoff
   and jitter until ``retry_period`` has passed.

Nothing is marked "in flight" in the database: after a crash every copy not
recorded as sent is still pending, so delivery resumes where it stopped and
only the recipients of the batches that were on the wire can get a copy twice.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import logging
import random
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

from listserv import dkim
from listserv.auth import arc_seal, our_auth_results
from listserv.config import Config
from listserv.dmarc import TxtResolver, is_strict
from listserv.message import archiving_refused
from listserv.rewrite import ListContext, header_values, message_id_hash, rewrite
from listserv.settings import ListSettings, effective_settings
from listserv.store import ArchiveEntry, DueDelivery, IncomingRecord, Outcome, Store
from listserv.transport import Transport
from listserv.types import Reply
from listserv.unsubscribe import Tokens, unsubscribe_headers, unsubscribe_url


__all__ = ["Batch", "Fanout", "bounces_address", "plan_batches", "retry_delay"]

log = logging.getLogger("listserv.fanout")

MAX_BACKOFF = 4 * 3600.0
PROBE_EVERY = 10  # verp = "probe": one post in this many goes VERP'd
OUTCOME_FLUSH_SIZE = 64  # single copies recorded per transaction at most
OUTCOME_FLUSH_DELAY = 0.02  # seconds an outcome may wait for others


@dataclass(frozen=True, slots=True)
class Batch:
    outbox_id: int
    deliveries: tuple[DueDelivery, ...]


# Outbox kinds sent one recipient per transaction: the envelope (VERP) or the
# copy itself (personalized) differs per recipient.
PER_RECIPIENT_KINDS = frozenset({"post-verp", "post-personal"})
PERSONAL_PLACEHOLDER = "@@LISTSERV_UNSUBSCRIBE_URL@@"


def plan_batches(due: Sequence[DueDelivery], max_recipients: int) -> list[Batch]:
    """Group due copies by message and cut them into transactions of at most max_recipients.

    VERP'd and personalized copies go one recipient per transaction.
    """
    batches: list[Batch] = []
    current: list[DueDelivery] = []
    for item in due:
        limit = 1 if item.kind in PER_RECIPIENT_KINDS else max_recipients
        if current and (item.outbox_id != current[0].outbox_id or len(current) >= limit):
            batches.append(Batch(current[0].outbox_id, tuple(current)))
            current = []
        current.append(item)
    if current:
        batches.append(Batch(current[0].outbox_id, tuple(current)))
    return batches


def bounces_address(list_name: str, domain: str, recipient: str | None = None) -> str:
    """The envelope sender of a copy: LIST-bounces@domain, or with VERP
    LIST-bounces+anna=gmina.pl@domain (the recipient's '@' as '='), so a
    bounce names its recipient even when its text cannot be parsed."""
    if recipient:
        local, _, rdomain = recipient.rpartition("@")
        return f"{list_name}-bounces+{local}={rdomain}@{domain}"
    return f"{list_name}-bounces@{domain}"


def verp_recipient(detail: str) -> str | None:
    """The recipient encoded in the +detail of a VERP bounce address, or None."""
    local, eq, rdomain = detail.rpartition("=")
    if not eq or not local or "." not in rdomain:
        return None
    return f"{local}@{rdomain}".lower()


@dataclass(frozen=True, slots=True)
class OutboxMessage:
    envelope_from: str
    data: bytes
    list_id: int
    list_name: str
    message_id: str


@dataclass(frozen=True, slots=True)
class PersonalTemplate:
    """A rewritten post split where each member's copy differs, hashed once.

    The body is hashed up to the unsubscribe link once per post; each copy
    extends a copy of that hash state with its link and the rest (RFC 6376
    simple body canonicalization is a plain byte stream, so this is exact).
    """

    list_name: str
    head: bytes  # header block with the shared List-Unsubscribe line removed
    prefix: bytes
    suffix: bytes  # b"" and no link in the body when the footer could not carry one
    prefix_hash: dkim.BodyHasher
    has_link: bool
    # Filled by _stuffed() on first use: the dot-stuffed parts, made once per post.
    stuffed_cache: dict[str, tuple[bytes, bytes, bytes, bytes]] = dataclasses.field(
        default_factory=dict, compare=False, repr=False)
    # Filled by _signer() on first use: the shared headers parsed and
    # canonicalized once per post (and key), so each copy's signature only
    # canonicalizes that copy's own header fields.
    signer_cache: list[dkim.HeaderTemplate] = dataclasses.field(
        default_factory=list, compare=False, repr=False)

    @classmethod
    def build(cls, list_name: str, data: bytes, shared_unsubscribe: bytes) -> PersonalTemplate:
        head, body = dkim.split_message(data)
        head = head.replace(shared_unsubscribe, b"", 1)
        marker = PERSONAL_PLACEHOLDER.encode()
        if body.count(marker) == 1:
            prefix, suffix = body.split(marker)
            return cls(list_name, head, prefix, suffix, dkim.BodyHasher(prefix), True)
        return cls(list_name, head, body, b"", dkim.BodyHasher(body), False)

    def copy_for(self, headers: list[tuple[str, str]], link: str, key: dkim.Signer) -> bytes:
        return self._copy(headers, link, key, wire=False)

    def wire_copy_for(self, headers: list[tuple[str, str]], link: str, key: dkim.Signer) -> bytes:
        """The same copy as DATA sends it (dot-stuffed, ending CRLF.CRLF), from parts stuffed once."""
        return self._copy(headers, link, key, wire=True)

    def _copy(self, headers: list[tuple[str, str]], link: str, key: dkim.Signer, *, wire: bool) -> bytes:
        # The copy is head + its own header fields + CRLF + prefix + link + suffix;
        # its signature is what dkim.sign() gives for those bytes (HeaderTemplate).
        extra = dkim.HeaderTemplate.render(headers)
        hasher = self.prefix_hash.copy()
        link_part = link.encode() if self.has_link else b""
        if self.has_link:
            hasher.update(link_part + self.suffix)
        signature = self._signer(key).sign(headers, hasher.b64digest())
        if not wire:
            return b"".join((signature, self.head, extra, b"\r\n", self.prefix, link_part,
                             self.suffix if self.has_link else b""))
        stuffed = self._stuffed()
        return b"".join((signature, stuffed[0], extra, b"\r\n", stuffed[1], link_part, stuffed[2], stuffed[3]))

    def _signer(self, key: dkim.Signer) -> dkim.HeaderTemplate:
        cache = self.signer_cache
        if not cache or cache[0].key is not key:
            cache[:] = [dkim.HeaderTemplate(self.head, key)]
        return cache[0]

    def _stuffed(self) -> tuple[bytes, bytes, bytes, bytes]:
        # RFC 5321 §4.5.2 transparency, done once per post: every part starts
        # at the beginning of a line except the suffix, which starts right
        # after the link (a line the link begins and that never starts with ".").
        cached = self.stuffed_cache.get("parts")
        if cached is None:
            def stuff(part: bytes, at_line_start: bool) -> bytes:
                out = part.replace(b"\r\n.", b"\r\n..")
                return b"." + out if at_line_start and out.startswith(b".") else out

            tail = self.suffix if self.has_link else b""
            last = self.prefix + tail
            ending = b".\r\n" if last.endswith(b"\r\n") or not last else b"\r\n.\r\n"
            cached = (stuff(self.head, True), stuff(self.prefix, True), stuff(tail, False), ending)
            self.stuffed_cache["parts"] = cached
        return cached


def retry_delay(attempts: int, initial: float, rng: Callable[[], float] = random.random) -> float:
    """Exponential backoff with ±20 % jitter, so retries of many copies spread out."""
    base = min(initial * 2.0 ** max(attempts - 1, 0), MAX_BACKOFF)
    return base * (0.8 + 0.4 * rng())


def message_id_of(data: bytes) -> str:
    """The Message-ID a copy carries, without angle brackets: what `grep` looks for in the log."""
    values = header_values(data).get("message-id", [])
    return values[0].strip().strip("<>").strip() if values else ""


def generated_message_id(record: IncomingRecord, domain: str) -> str:
    # Derived from the stored message, so a post prepared twice (after a
    # crash) gets the same Message-ID and the same Archived-At.
    digest = hashlib.sha1(record.data).hexdigest()[:20]
    return f"listserv.{record.id}.{digest}@{domain}"


class Fanout:
    def __init__(
        self,
        config: Config,
        store: Store,
        transport: Transport,
        key: dkim.DkimKey | dkim.KeySet,
        resolve_txt: TxtResolver | None = None,
        retry_initial: float = 60.0,
        clock: Callable[[], float] = time.time,
        on_archived: Callable[[str, str], Awaitable[None]] | None = None,
        stages: Sequence[Callable[[], Awaitable[None]]] = (),
        tokens: Tokens | None = None,
        on_failed: Callable[[int, str, Reply], Awaitable[None]] | None = None,
    ) -> None:
        self.config = config
        self.store = store
        self.transport = transport
        # Every copy is signed with all of keys (RSA, and Ed25519 when
        # configured); the ARC seal with the RSA key alone.
        self.keys = dkim.KeySet.of(key)
        self.key = self.keys.rsa
        self.resolve_txt = resolve_txt
        self.retry_initial = retry_initial
        self.clock = clock
        # Called with (list name, Message-ID-Hash) once a post is stored for
        # the archive; the archive stage updates its pages in the background.
        self.on_archived = on_archived
        # Other work the worker does each pass (e-mail commands, held posts).
        self.stages = tuple(stages)
        # Member tokens for one-click unsubscribe; None: no personalized copies.
        self.tokens = tokens
        # Told (list id, recipient, reply) of each copy of a post that failed
        # for good: bounce scoring counts the member's own failures.
        self.on_failed = on_failed
        self._templates: OrderedDict[int, PersonalTemplate] = OrderedDict()
        self._outcomes: list[Outcome] = []
        self._outcome_ids: list[int] = []
        self._flush_task: asyncio.Task[None] | None = None
        self._flush_lock = asyncio.Lock()
        self._wake = asyncio.Event()
        self._deliver_wake = asyncio.Event()
        self._stopping = False
        self._inflight: set[int] = set()
        self._finished: list[int] = []
        self._batches: asyncio.Queue[Batch] = asyncio.Queue()
        self._queued_batches = 0
        self._messages: OrderedDict[int, OutboxMessage] = OrderedDict()
        self._senders: list[asyncio.Task[None]] = []
        self._busy_senders = 0
        # While the relay itself is down (421, unreachable, timed out), every
        # copy waits for the same next round, so that when it is back the
        # queue goes out in its order: oldest post first.
        self._relay_failures = 0
        self._relay_retry_at = 0.0

    def wake(self) -> None:
        """New mail arrived (or a test wants a pass now): prepare, then deliver."""
        self._wake.set()
        self._deliver_wake.set()

    # -- main loop -------------------------------------------------------------

    async def run(self) -> None:
        """Two loops: one prepares what arrived (and runs the stages), one feeds the senders.

        They are apart so that each finished batch wakes only the cheap
        scheduling step, not a round of queries for new mail.
        """
        self._senders = [
            asyncio.create_task(self._sender(i), name=f"fanout-sender-{i}")
            for i in range(self.config.delivery.connections)
        ]
        scheduler = asyncio.create_task(self._schedule_loop(), name="fanout-scheduler")
        try:
            while not self._stopping:
                self._wake.clear()
                try:
                    await self.prepare()
                except Exception:  # noqa: BLE001 - the worker must survive anything
                    log.exception("preparing mail failed; retrying shortly")
                self._deliver_wake.set()  # what was just queued may be due
                if self._stopping:
                    break
                # Poll at least every second: the CLI (another process)
                # approves held posts and queues notices through the database.
                try:
                    await asyncio.wait_for(self._wake.wait(), 1.0)
                except TimeoutError:
                    pass
        finally:
            scheduler.cancel()
            await asyncio.gather(scheduler, return_exceptions=True)

    async def _schedule_loop(self) -> None:
        while not self._stopping:
            self._deliver_wake.clear()
            try:
                await self.schedule()
                timeout = await self._sleep_for()
            except Exception:  # noqa: BLE001 - the worker must survive anything
                log.exception("scheduling deliveries failed; retrying shortly")
                timeout = 1.0
            try:
                await asyncio.wait_for(self._deliver_wake.wait(), timeout)
            except TimeoutError:
                pass

    async def _sleep_for(self) -> float:
        if self._queued_batches or self._busy_senders or self._outcomes:
            # Copies on the wire are still "pending" and due in the database;
            # the senders wake us as they finish, so no busy polling here.
            return 1.0
        nxt = await self.store.next_attempt_at()
        if nxt is None:
            return 1.0
        return max(0.0, min(1.0, nxt - self.clock()))

    async def stop(self, grace: float = 30.0) -> None:
        """Stop taking new work; let batches on the wire finish (up to grace seconds).

        Batches not yet started stay pending in the database and go out
        after the restart.
        """
        self._stopping = True
        self._wake.set()
        self._deliver_wake.set()
        while not self._batches.empty():
            self._batches.get_nowait()
            self._batches.task_done()
        deadline = time.monotonic() + grace
        while self._busy_senders and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        for task in self._senders:
            task.cancel()
        await asyncio.gather(*self._senders, return_exceptions=True)
        try:
            await self.flush()  # what went out is recorded, so it is not sent again
        except Exception:  # noqa: BLE001
            log.exception("could not record the last outcomes; those copies may go out twice")
        if self._flush_task is not None:
            self._flush_task.cancel()
            await asyncio.gather(self._flush_task, return_exceptions=True)
        await self.transport.close()

    async def drain(self, timeout: float = 60.0) -> None:
        """Wait until nothing is due or in flight (tests and benchmarks)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.wake()
            await asyncio.sleep(0.02)
            if self._queued_batches or self._busy_senders or self._outcomes:
                continue
            if await self.store.unhandled_incoming():
                continue
            nxt = await self.store.next_attempt_at()
            if nxt is None or nxt > self.clock():
                return
        accepted = await self.store.incoming_with("post", "accepted", limit=5)
        raise TimeoutError(
            f"fan-out did not drain: queued={self._queued_batches} busy={self._busy_senders} "
            f"unrecorded={len(self._outcomes)} accepted={[r.id for r in accepted]} "
            f"next_attempt_at={await self.store.next_attempt_at()} now={self.clock()}"
        )

    # -- prepare ---------------------------------------------------------------

    async def prepare(self) -> None:
        for record in await self.store.incoming_with("post", "accepted", limit=20):
            await self._prepare_post(record)
        for record in await self.store.incoming_with("owner", "new", limit=20):
            await self._forward_owner_mail(record)
        for stage in self.stages:
            await stage()

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
                ctx = dataclasses.replace(ctx, unsubscribe_placeholder=PERSONAL_PLACEHOLDER)
            rewritten = rewrite(record.data, ctx, message_id=message_id, munge_from=munge, author=record.sender)
            if personal and rewritten.data.count(PERSONAL_PLACEHOLDER.encode()) != 1:
                # The footer went where the marker cannot be found (a base64
                # body): no per-member link in the body, only in the headers.
                ctx = dataclasses.replace(ctx, unsubscribe_placeholder="")
                rewritten = rewrite(record.data, ctx, message_id=message_id, munge_from=munge,
                                    author=record.sender)
            prepared = rewritten.data
            if PERSONAL_PLACEHOLDER.encode() not in prepared:
                # RFC 8617: sealed once, over what every copy shares.  A body
                # with each member's own link cannot be sealed once (the seal
                # covers the body), so personal_footer lists go unsealed.
                authserv_id = self.config.server.domain
                prepared = await arc_seal(prepared, self.key, authserv_id=authserv_id,
                                          auth_results=our_auth_results(record.data, authserv_id) or "arc=none")
            if personal:
                kind, data = "post-personal", prepared  # signed per copy
            else:
                verp = settings.verp == "always" or (settings.verp == "probe" and record.id % PROBE_EVERY == 0)
                kind, data = ("post-verp" if verp else "post"), self._sign(prepared)
            recipients = await self.store.recipients(record.list_id)
            archive = None
            if not archiving_refused(record.data):
                # The archive keeps the post as its author wrote it (the
                # DMARC From rewrite is for delivery only), with its id.
                archive = ArchiveEntry(message_id, message_id_hash(message_id), record.data)
        except Exception as exc:  # noqa: BLE001 - a post we cannot prepare goes to a person
            log.exception("cannot prepare post %s", record.id)
            await self.store.set_incoming_status(
                record.id, "held", expect="accepted", reason=f"could not be prepared for the list: {exc!r}"[:500]
            )
            return
        outbox_id = await self.store.enqueue(
            list_id=record.list_id, kind=kind, envelope_from=bounces_address(name, domain), data=data,
            recipients=recipients, incoming_id=record.id, incoming_status="queued", incoming_expect="accepted",
            archive=archive,
        )
        if archive is not None and self.on_archived is not None:
            try:
                await self.on_archived(name, archive.msgid_hash)
            except Exception:  # noqa: BLE001 - the archive is derived: rebuildable, never blocks delivery
                log.exception("archive update failed for %s; `listserv archive build` repairs it", message_id)
        if rewritten.stripped:
            log.info("stripped list=%s message_id=%s types=%s", name, message_id, ",".join(rewritten.stripped))
        log.info("queued list=%s message_id=%s outbox=%s recipients=%d mode=%s", name, message_id, outbox_id,
                 len(recipients), kind)

    async def _forward_owner_mail(self, record: IncomingRecord) -> None:
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

    # -- deliver ---------------------------------------------------------------

    async def schedule(self) -> None:
        """Claim due copies and hand them to the senders as batches."""
        per_batch = self.config.delivery.max_recipients
        # Keep about two batches per connection waiting: enough to keep every
        # connection busy, few enough that a new post is not stuck behind a
        # long queue kept only in memory.
        room = 2 * self.config.delivery.connections - self._queued_batches
        if room <= 0 or self._stopping:
            return
        # Copies whose outcome is committed leave the in-flight set only now,
        # before the query: a query that started before that commit would
        # still see them pending and send them again.
        self._inflight.difference_update(self._finished)
        self._finished.clear()
        due = await self.store.due_deliveries(self.clock(), room * per_batch, self._inflight)
        for batch in plan_batches(due, per_batch):
            self._inflight.update(d.id for d in batch.deliveries)
            self._queued_batches += 1
            self._batches.put_nowait(batch)

    async def _message(self, outbox_id: int) -> OutboxMessage:
        """A queued message with what every copy needs, read and parsed once per message."""
        cached = self._messages.get(outbox_id)
        if cached is None:
            envelope_from, data = await self.store.outbox_message(outbox_id)
            list_id, list_name = await self.store.outbox_list_ref(outbox_id)
            cached = OutboxMessage(envelope_from, data, list_id, list_name, message_id_of(data))
            self._messages[outbox_id] = cached
            while len(self._messages) > 32:
                self._messages.popitem(last=False)
        return cached

    async def _sender(self, number: int) -> None:
        while True:
            batch = await self._batches.get()
            self._queued_batches -= 1
            self._busy_senders += 1
            try:
                await self._send_batch(batch)
            except Exception as exc:  # noqa: BLE001 - never lose the sender task
                log.exception("batch for outbox %s failed; it stays pending", batch.outbox_id)
                # Retried later like a temporary failure, never in a tight loop.
                now = self.clock()
                try:
                    await self._record([
                        Outcome(d.id, "pending", f"451 4.3.0 internal error: {exc!r}"[:300],
                                now + retry_delay(d.attempts + 1, self.retry_initial))
                        for d in batch.deliveries
                    ])
                except Exception:  # noqa: BLE001
                    log.exception("could not record the failure either")
                    self._finished.extend(d.id for d in batch.deliveries)
            finally:
                self._busy_senders -= 1
                self._batches.task_done()
                if self._queued_batches <= self.config.delivery.connections:
                    self._deliver_wake.set()  # running low: claim more

    async def _template(self, outbox_id: int, data: bytes) -> PersonalTemplate:
        template = self._templates.get(outbox_id)
        if template is None:
            lst = (await self._message(outbox_id)).list_name
            shared = f"List-Unsubscribe: <mailto:{lst}-leave@{self.config.server.domain}>\r\n".encode()
            template = PersonalTemplate.build(lst, data, shared)
            self._templates[outbox_id] = template
            while len(self._templates) > 8:
                self._templates.popitem(last=False)
        return template

    async def _send_batch(self, batch: Batch) -> None:
        message = await self._message(batch.outbox_id)
        envelope_from, data, list_name = message.envelope_from, message.data, message.list_name
        # Every line of a copy's story names its list and Message-ID, so that
        # `grep MESSAGE-ID` over the log tells what became of a post.
        story = f"list={list_name} message_id={message.message_id}"
        recipients = [d.recipient for d in batch.deliveries]
        kind = batch.deliveries[0].kind
        if kind in PER_RECIPIENT_KINDS:
            (rcpt,) = recipients
            envelope_from = bounces_address(list_name, self.config.server.domain, rcpt)
            if kind == "post-personal" and self.tokens is not None:
                template = await self._template(batch.outbox_id, data)
                member_headers = unsubscribe_headers(self.config, self.tokens, list_name, rcpt)
                # The link is the first URI of List-Unsubscribe (unsubscribe_url's
                # value): taken from there, the member's HMAC token is made once.
                first = member_headers[0][1]
                end = first.find(">")
                link = (first[1:end] if first.startswith("<") and end > 0
                        else unsubscribe_url(self.config, self.tokens, list_name, rcpt))
                send_wire = getattr(self.transport, "send_wire", None)
                if send_wire is not None:
                    wire = template.wire_copy_for(member_headers, link, self.keys)
                    refused = await send_wire(envelope_from, recipients, wire)
                    await self._after_send(batch, kind, message, story, recipients, refused)
                    return
                data = template.copy_for(member_headers, link, self.keys)
        refused = await self.transport.send(envelope_from, recipients, data)
        await self._after_send(batch, kind, message, story, recipients, refused)

    async def _after_send(self, batch: Batch, kind: str, message: OutboxMessage, story: str,
                          recipients: list[str], refused: dict[str, Reply]) -> None:
        now = self.clock()
        outcomes = []
        sent = failed = deferred = 0
        for d in batch.deliveries:
            reply = refused.get(d.recipient)
            if reply is None:
                outcomes.append(Outcome(d.id, "sent", "250 accepted by relay", now))
                sent += 1
            elif reply.permanent:
                outcomes.append(Outcome(d.id, "failed", str(reply), now))
                failed += 1
                log.info("bounced %s outbox=%s rcpt=%s reply=%r", story, batch.outbox_id, d.recipient, str(reply))
            elif now - d.first_attempt_at >= self.config.delivery.retry_period:
                outcomes.append(Outcome(d.id, "failed", f"gave up after retry period: {reply}", now))
                failed += 1
                log.info("bounced %s outbox=%s rcpt=%s reply=%r (retry period over)", story, batch.outbox_id,
                         d.recipient, str(reply))
            else:
                outcomes.append(Outcome(d.id, "pending", str(reply), self._retry_at(now, d.attempts + 1, reply)))
                deferred += 1
        if sent:
            self._relay_failures, self._relay_retry_at = 0, 0.0
        await self._record(outcomes)
        if failed and self.on_failed is not None and kind.startswith("post"):
            for d in batch.deliveries:
                reply = refused.get(d.recipient)
                if reply is not None and (reply.permanent or now - d.first_attempt_at >= self.config.delivery.retry_period):
                    try:
                        await self.on_failed(message.list_id, d.recipient, reply)
                    except Exception:  # noqa: BLE001 - scoring must never stop delivery
                        log.exception("could not record the bounce of %s", d.recipient)
        if len(recipients) == 1 and sent:
            # A batch of one (VERP'd, personalized) names its recipient, as an
            # MTA's log does: `grep` by Message-ID or by address finds it.
            log.info("delivered %s outbox=%s rcpt=%s", story, batch.outbox_id, recipients[0])
        elif len(recipients) > 1 or deferred:  # (a batch of one that bounced has its line above)
            log.info("%s %s outbox=%s sent=%d failed=%d deferred=%d%s",
                     "delivered" if sent else "deferred" if deferred else "bounced", story, batch.outbox_id, sent,
                     failed, deferred,
                     f" reply={next(iter(refused.values()))}" if deferred else "")

    def _retry_at(self, now: float, attempts: int, reply: Reply) -> float:
        if not (reply.code == 421 or reply.enhanced.startswith("4.4.")):  # this copy's own trouble
            return now + retry_delay(attempts, self.retry_initial)
        if now >= self._relay_retry_at:  # the first failure of a new round
            self._relay_failures += 1
            self._relay_retry_at = now + retry_delay(max(self._relay_failures, attempts), self.retry_initial)
        return self._relay_retry_at

    async def _record(self, outcomes: list[Outcome]) -> None:
        """Store outcomes, many copies per transaction.

        A copy leaves the in-flight set only once its outcome is committed;
        until then it cannot be claimed again.  A crash before the commit
        sends those few copies again: the duplicates allowed for what is on
        the wire.
        """
        self._outcomes.extend(outcomes)
        # A batch is recorded at once (one transaction for many recipients
        # anyway); single-copy transactions are gathered a few at a time.
        if len(outcomes) > 1 or len(self._outcomes) >= OUTCOME_FLUSH_SIZE:
            await self.flush()
        elif self._flush_task is None or self._flush_task.done():
            self._flush_task = asyncio.create_task(self._flush_later())

    async def _flush_later(self) -> None:
        # Loop: outcomes that arrive while a flush is committing would
        # otherwise wait for the next copy to be sent, maybe for ever.
        while self._outcomes:
            await asyncio.sleep(OUTCOME_FLUSH_DELAY)
            try:
                await self.flush()
            except Exception:  # noqa: BLE001 - retried on the next round
                log.exception("could not record delivery outcomes; retrying")

    async def flush(self) -> None:
        async with self._flush_lock:
            outcomes, self._outcomes = self._outcomes, []
            if not outcomes:
                return
            try:
                await self.store.record_outcomes(outcomes)
            except BaseException:
                # Not recorded: the copies stay pending and in flight until
                # the next flush tries again.
                self._outcomes[:0] = outcomes
                raise
            self._finished.extend(o.delivery_id for o in outcomes)
            self._deliver_wake.set()


