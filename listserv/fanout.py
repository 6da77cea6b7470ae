"""Deliver: claim due copies from the store, send them in batches, record each outcome.

The deliver stage of each worker claims due copies with a lease
(``Store.claim_deliveries``: ``lease_owner``, ``lease_until``), groups them into
transactions of up to ``max_recipients`` RCPTs (``plan_batches``; VERP'd and
personalized copies go one per transaction) and sends them over its share of
``connections``.  Each outcome is stored in the statement that clears the
lease: 2xx -> sent, 5xx -> failed (recorded against that recipient), 4xx or a
network failure -> retried with exponential backoff and jitter until
``retry_period`` has passed.

Preparing posts is ``listserv.prepare``; this stage only reads the queue.  A
worker that dies leaves its leases to run out (or to be given back when it
restarts under the same name); the copies are pending still, so delivery
resumes where it stopped and only the batches that were on the wire can reach
a recipient twice.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import random
import re
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

from listserv import dkim
from listserv.config import Config
from listserv.rewrite import header_values
from listserv.store import DueDelivery, Outcome, Store
from listserv.transport import Transport
from listserv.types import Reply
from listserv.unsubscribe import Tokens, prefs_url, unsubscribe_headers, unsubscribe_url
from listserv.wake import CHANNELS, Wakeup


__all__ = ["Batch", "Fanout", "bounces_address", "plan_batches", "retry_delay"]

log = logging.getLogger("listserv.fanout")

MAX_BACKOFF = 4 * 3600.0
POLL = 1.0  # seconds between looks at the store when no wake-up comes (a lost one only delays)
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
# Where a member's own preferences page link goes (listserv.prefs).
PREFS_PLACEHOLDER = "@@LISTSERV_PREFS_URL@@"
_MARKERS = re.compile(rb"@@LISTSERV_(?:UNSUBSCRIBE|PREFS)_URL@@")


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

    The body is hashed up to the first member link once per post; each copy
    extends a copy of that hash state with its links and the rest (RFC 6376
    simple body canonicalization is a plain byte stream, so this is exact).
    A body carries at most one of each marker: the one-click unsubscribe link
    (``PERSONAL_PLACEHOLDER``) and the preferences page (``PREFS_PLACEHOLDER``).
    """

    list_name: str
    head: bytes  # header block with the shared List-Unsubscribe line removed
    prefix: bytes
    slots: tuple[str, ...]  # which link follows: "unsubscribe" | "prefs"
    rest: tuple[bytes, ...]  # the bytes after each link
    prefix_hash: dkim.BodyHasher
    # Filled by _stuffed() on first use: the dot-stuffed parts, made once per post.
    stuffed_cache: dict[str, tuple[bytes, bytes, tuple[bytes, ...], bytes]] = dataclasses.field(
        default_factory=dict, compare=False, repr=False)
    # Filled by _signer() on first use: the shared headers parsed and
    # canonicalized once per post (and key), so each copy's signature only
    # canonicalizes that copy's own header fields.
    signer_cache: list[dkim.HeaderTemplate] = dataclasses.field(
        default_factory=list, compare=False, repr=False)

    @property
    def has_link(self) -> bool:
        return bool(self.slots)

    @classmethod
    def build(cls, list_name: str, data: bytes, shared_unsubscribe: bytes) -> PersonalTemplate:
        head, body = dkim.split_message(data)
        head = head.replace(shared_unsubscribe, b"", 1)
        pieces = _MARKERS.split(body)
        markers = _MARKERS.findall(body)
        if not markers or len(set(markers)) != len(markers):
            # No marker (the footer could not carry one), or a marker twice
            # (the author's own text has one): the body goes out as it is.
            return cls(list_name, head, body, (), (), dkim.BodyHasher(body))
        slots = tuple("prefs" if m == PREFS_PLACEHOLDER.encode() else "unsubscribe" for m in markers)
        return cls(list_name, head, pieces[0], slots, tuple(pieces[1:]), dkim.BodyHasher(pieces[0]))

    def copy_for(self, headers: list[tuple[str, str]], link: str, key: dkim.Signer, prefs: str = "") -> bytes:
        return self._copy(headers, link, prefs, key, wire=False)

    def wire_copy_for(self, headers: list[tuple[str, str]], link: str, key: dkim.Signer, prefs: str = "") -> bytes:
        """The same copy as DATA sends it (dot-stuffed, ending CRLF.CRLF), from parts stuffed once."""
        return self._copy(headers, link, prefs, key, wire=True)

    def _tail(self, link: str, prefs: str, rest: tuple[bytes, ...]) -> bytes:
        links = {"unsubscribe": link.encode(), "prefs": (prefs or link).encode()}
        return b"".join(links[slot] + part for slot, part in zip(self.slots, rest))

    def _copy(self, headers: list[tuple[str, str]], link: str, prefs: str, key: dkim.Signer, *,
              wire: bool) -> bytes:
        # The copy is head + its own header fields + CRLF + prefix + links and
        # the rest; its signature is what dkim.sign() gives for those bytes
        # (HeaderTemplate).
        extra = dkim.HeaderTemplate.render(headers)
        hasher = self.prefix_hash.copy()
        tail = self._tail(link, prefs, self.rest)
        if tail:
            hasher.update(tail)
        signature = self._signer(key).sign(headers, hasher.b64digest())
        if not wire:
            return b"".join((signature, self.head, extra, b"\r\n", self.prefix, tail))
        head, prefix, rest, ending = self._stuffed()
        return b"".join((signature, head, extra, b"\r\n", prefix, self._tail(link, prefs, rest), ending))

    def _signer(self, key: dkim.Signer) -> dkim.HeaderTemplate:
        cache = self.signer_cache
        if not cache or cache[0].key is not key:
            cache[:] = [dkim.HeaderTemplate(self.head, key)]
        return cache[0]

    def _stuffed(self) -> tuple[bytes, bytes, tuple[bytes, ...], bytes]:
        # RFC 5321 §4.5.2 transparency, done once per post: the head and the
        # prefix start at the beginning of a line; each part after a link
        # starts right after it (inside a line the link begins, and a link
        # never starts with ".").
        cached = self.stuffed_cache.get("parts")
        if cached is None:
            def stuff(part: bytes, at_line_start: bool) -> bytes:
                out = part.replace(b"\r\n.", b"\r\n..")
                return b"." + out if at_line_start and out.startswith(b".") else out

            last = self.prefix + b"".join(self.rest)
            ending = b".\r\n" if last.endswith(b"\r\n") or not last else b"\r\n.\r\n"
            cached = (stuff(self.head, True), stuff(self.prefix, True),
                      tuple(stuff(part, False) for part in self.rest), ending)
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


class _NoWakeup:
    def notify(self, channel: str) -> None:
        pass

    async def wait(self, channel: str, timeout: float) -> bool:
        await asyncio.sleep(timeout)
        return False


class Fanout:
    """The deliver stage of one worker: claims due copies with a lease, sends them, records each outcome.

    ``connections`` is this worker's share of ``[delivery] connections``
    (all of them when one process does all the work).  ``owner`` names the
    worker in the leases it takes.
    """

    def __init__(
        self,
        config: Config,
        store: Store,
        transport: Transport,
        key: dkim.DkimKey | dkim.KeySet,
        *,
        tokens: Tokens | None = None,
        on_failed: Callable[[int, str, Reply], Awaitable[None]] | None = None,
        wakeup: Wakeup | None = None,
        owner: str = "local",
        connections: int | None = None,
    ) -> None:
        self.config = config
        self.store = store
        self.transport = transport
        # Every copy is signed with all of keys (RSA, and Ed25519 when configured).
        self.keys = dkim.KeySet.of(key)
        # Member tokens for one-click unsubscribe; None: no personalized copies.
        self.tokens = tokens
        # Told (list id, recipient, reply) of each copy of a post that failed
        # for good: bounce scoring counts the member's own failures.
        self.on_failed = on_failed
        self.wakeup: Wakeup | _NoWakeup = wakeup or _NoWakeup()
        self.owner = owner
        self.connections = connections or config.delivery.connections
        self.retry_initial = 60.0
        self.clock: Callable[[], float] = time.time
        self.lease = float(config.server.lease)
        # Rows claimed per claim: enough for every connection to have a full
        # batch (or a run of single copies), few enough that a worker never
        # sits on copies another worker could be sending.
        self.claim_size = self.connections * max(config.delivery.max_recipients, 32)
        self._templates: OrderedDict[int, PersonalTemplate] = OrderedDict()
        self._outcomes: list[Outcome] = []
        self._flush_task: asyncio.Task[None] | None = None
        self._flush_lock = asyncio.Lock()
        self._deliver_wake = asyncio.Event()
        self._stopping = False
        self._batches: asyncio.Queue[Batch] = asyncio.Queue()
        self._queued_batches = 0
        self._queued_copies = 0
        self._messages: OrderedDict[int, OutboxMessage] = OrderedDict()
        self._senders: list[asyncio.Task[None]] = []
        self._busy_senders = 0
        # While the relay itself is down (421, unreachable, timed out), every
        # copy waits for the same next round, so that when it is back the
        # queue goes out in its order: oldest post first.
        self._relay_failures = 0
        self._relay_retry_at = 0.0

    def wake(self) -> None:
        """Tell every stage of this node to look at the store now (new mail; tests)."""
        for channel in CHANNELS:
            self.wakeup.notify(channel)
        self._deliver_wake.set()

    # -- main loop -------------------------------------------------------------

    async def run(self) -> None:
        """Claim due copies and feed them to the senders, until stopped.

        It wakes when copies are queued (the "deliver" wake-up), when the
        senders run low, or when the store says the next copy is due
        (a retry, or a lease running out); and at least every POLL seconds.
        """
        self._senders = [
            asyncio.create_task(self._sender(i), name=f"fanout-sender-{i}")
            for i in range(self.connections)
        ]
        listener = asyncio.create_task(self._listen(), name="fanout-wakeups")
        try:
            while not self._stopping:
                self._deliver_wake.clear()
                try:
                    await self.schedule()
                    timeout = await self._sleep_for()
                except Exception:  # noqa: BLE001 - the worker must survive anything
                    log.exception("scheduling deliveries failed; retrying shortly")
                    timeout = POLL
                try:
                    await asyncio.wait_for(self._deliver_wake.wait(), timeout)
                except TimeoutError:
                    pass
        finally:
            listener.cancel()
            await asyncio.gather(listener, return_exceptions=True)

    async def _listen(self) -> None:
        while not self._stopping:
            if await self.wakeup.wait("deliver", POLL):
                self._deliver_wake.set()

    async def _sleep_for(self) -> float:
        if self._queued_batches or self._busy_senders or self._outcomes:
            # The senders wake us as they finish, so no busy polling here.
            return POLL
        now = self.clock()
        nxt = await self.store.next_claimable_at(now)
        if nxt is None:
            return POLL
        return max(0.0, min(POLL, nxt - now))

    async def stop(self, grace: float = 30.0) -> None:
        """Stop taking new work; let batches on the wire finish (up to grace seconds).

        Batches claimed but not yet started stay pending in the database; the
        worker gives their leases back when it stops (``Store.release_leases``).
        """
        self._stopping = True
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
        """Wait until nothing is due or in flight (tests and benchmarks).

        It looks at the store, so it waits for every stage of this node:
        posts still to prepare, commands still to handle, copies still due.
        """
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not (self._queued_batches or self._busy_senders or self._outcomes
                    or await self.store.unhandled_incoming()):
                nxt = await self.store.next_attempt_at()
                if nxt is None or nxt > self.clock():
                    return
            # Only while there is work: a stage woken for nothing would still
            # be running its pass when the caller goes on.
            self.wake()
            await asyncio.sleep(0.02)
        accepted = await self.store.incoming_with("post", "accepted", limit=5)
        raise TimeoutError(
            f"fan-out did not drain: queued={self._queued_batches} busy={self._busy_senders} "
            f"unrecorded={len(self._outcomes)} accepted={[r.id for r in accepted]} "
            f"next_attempt_at={await self.store.next_attempt_at()} now={self.clock()}"
        )

    # -- deliver ---------------------------------------------------------------

    async def schedule(self) -> None:
        """Claim due copies (with a lease in the store) and hand them to the senders as batches."""
        if self._stopping or self._queued_copies >= self.claim_size:
            return
        now = self.clock()
        due = await self.store.claim_deliveries(self.owner, now, now + self.lease, self.claim_size)
        for batch in plan_batches(due, self.config.delivery.max_recipients):
            self._queued_batches += 1
            self._queued_copies += len(batch.deliveries)
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
            self._queued_copies -= len(batch.deliveries)
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
                    # Their leases run out (or go back at the restart): retried then.
                    log.exception("could not record the failure either")
            finally:
                self._busy_senders -= 1
                self._batches.task_done()
                if self._queued_copies < self.claim_size // 2 or self._queued_batches <= self.connections:
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
                prefs = prefs_url(self.config, self.tokens, rcpt) if "prefs" in template.slots else ""
                send_wire = getattr(self.transport, "send_wire", None)
                if send_wire is not None:
                    wire = template.wire_copy_for(member_headers, link, self.keys, prefs)
                    refused = await send_wire(envelope_from, recipients, wire)
                    await self._after_send(batch, kind, message, story, recipients, refused)
                    return
                data = template.copy_for(member_headers, link, self.keys, prefs)
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
        """Store outcomes, many copies per transaction; recording clears each copy's lease.

        Until the commit the copies stay leased to this worker, so nobody
        else claims them.  A crash before the commit sends those few copies
        again: the duplicates allowed for what is on the wire.
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
            self._deliver_wake.set()


