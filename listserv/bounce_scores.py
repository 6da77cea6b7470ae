"""Bounce handling: who failed, whose fault it was, and what happens to the member.

Bounces arrive two ways: as mail to ``LIST-bounces[+VERP]@`` (read by
``bounces.read_bounce``), and as a 5xx the relay gives at delivery time (or a
temporary failure that outlived the retry period).  Both become events.

Only the member's own failures count: a gone mailbox or domain adds 1 to the
member's score, a full mailbox or a give-up after retries adds 0.5, at most
once a day, and the score halves every ``HALF_LIFE``.  A refusal caused by the
post or its author (policy: DMARC, spam, reputation, 5.7.x) never counts
against the member; those are summed per list and reported to the owners
once a day.  That is the Mailman complaint this avoids: a Yahoo author's
DMARC failure at Gmail must not disable the Gmail member.

At ``bounce_score_threshold`` delivery pauses and the member gets a notice
(a probe: if it bounces too, that is one more bounce) with a reply address
that re-enables delivery; after ``bounce_warnings`` such notices
``bounce_warning_interval`` apart, the member is removed and the owners told.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from listserv import dkim
from listserv.bounces import classify_reply, read_bounce
from listserv.config import Config
from listserv.fanout import bounces_address, verp_recipient
from listserv.membership import ListView, new_token
from listserv.settings import effective_settings
from listserv.store import IncomingRecord, Store
from listserv.texts import compose
from listserv.types import Reply

__all__ = ["BounceStage", "HALF_LIFE", "weight_of"]

log = logging.getLogger("listserv.bounces")

HALF_LIFE = 7 * 86400.0
REPORT_INTERVAL = 86400.0


def weight_of(kind: str, cause: str) -> float:
    """How much one failure counts against the member (0: not their fault, or not a failure)."""
    if cause in ("policy", "auto_reply", "feedback_report", "not_a_bounce") or kind == "none":
        return 0.0
    if kind == "permanent" and cause in ("mailbox_gone", "host_unknown"):
        return 1.0
    return 0.5  # a full mailbox, an unknown permanent cause, a temporary failure that never cleared


class BounceStage:
    def __init__(self, config: Config, store: Store, key: dkim.Signer,
                 clock: Callable[[], float] = time.time) -> None:
        self.config = config
        self.store = store
        self.key = key
        self.clock = clock
        self._last_housekeeping = 0.0

    async def _view(self, list_id: int) -> ListView:
        lst = await self.store.get_list_by_id(list_id)
        return ListView(lst.id, lst.name, effective_settings(self.config.list_defaults, lst.settings_json),
                        self.config.server.domain)

    async def process(self) -> None:
        for record in await self.store.incoming_with("bounces", "new", limit=100):
            try:
                summary = await self._read(record)
            except Exception as exc:  # noqa: BLE001 - one odd bounce must not stop the rest
                log.exception("cannot handle bounce %s", record.id)
                summary = f"failed: {exc!r}"[:500]
                await self.store.set_incoming_status(record.id, "failed", expect="new", reason=summary)
                continue
            await self.store.set_incoming_status(record.id, "done", expect="new", reason=summary[:1000])
        now = self.clock()
        if now - self._last_housekeeping > 600:
            self._last_housekeeping = now
            await self.housekeeping(now)

    async def _read(self, record: IncomingRecord) -> str:
        verp = verp_recipient(record.detail) if record.detail else None
        report = read_bounce(record.data, verp)
        if report.kind == "none" or not report.addresses:
            log.info("bounce-mail list=%s id=%s not counted: %s", record.list_name, record.id, report.cause)
            return f"not counted: {report.cause}"
        for address in report.addresses:
            await self.bounce(record.list_id, address, kind=report.kind, cause=report.cause, status=report.status,
                              diagnostic=report.diagnostic, source="dsn")
        return f"{report.kind} {report.cause} {report.status} for {', '.join(report.addresses)}"

    async def on_delivery_failure(self, list_id: int, recipient: str, reply: Reply) -> None:
        """A copy the relay refused for good (or gave up on after the retry period)."""
        kind, cause = classify_reply(reply.code, reply.enhanced, reply.text)
        await self.bounce(list_id, recipient, kind=kind, cause=cause, status=reply.enhanced or str(reply.code),
                          diagnostic=reply.text, source="relay")

    async def bounce(self, list_id: int, address: str, *, kind: str, cause: str, status: str, diagnostic: str,
                     source: str) -> None:
        view = await self._view(list_id)
        now = self.clock()
        weight = weight_of(kind, cause)
        state = await self.store.record_bounce(
            list_id, address.lower(), kind=kind, cause=cause, status=status, diagnostic=diagnostic, source=source,
            weight=weight, now=now, half_life=HALF_LIFE,
        )
        log.info("bounced list=%s rcpt=%s kind=%s cause=%s status=%s counted=%s score=%s", view.name, address,
                 kind, cause, status, weight > 0, f"{state.score:.2f}" if state else "-")
        if state is None or state.delivery != "enabled" or state.score < view.settings.bounce_score_threshold:
            return
        if await self.store.disable_for_bounces(list_id, state.address, now):
            log.info("disabled list=%s rcpt=%s score=%.2f", view.name, state.address, state.score)
            await self._warn(view, state.address, state.reason, view.settings.bounce_warnings - 1)

    async def _warn(self, view: ListView, address: str, reason: str, remaining: int) -> None:
        token = new_token()
        expires = self.clock() + view.settings.bounce_warning_interval * (remaining + 1) + 86400
        await self.store.create_token(token, view.id, address, "reenable", {}, expires)
        member = await self.store.member(view.id, address)
        if member is not None and member.language:
            view = view.in_language(member.language)  # the member's `language` option: the notice is theirs
        data = compose(
            "bounce_disabled", view.settings.language,
            view.context(address=address, reason=reason or "-", remaining=remaining),
            from_name=view.title, from_addr=view.addr(f"confirm+{token}"), to=address, list_id=view.list_id,
            domain=view.domain, auto="auto-generated",
        )
        await self.store.enqueue(list_id=view.id, kind="notice", envelope_from=bounces_address(view.name, view.domain, address),
                                 data=dkim.sign_message(data, self.key), recipients=[address])

    async def housekeeping(self, now: float) -> None:
        """Reminders to paused members, removal after the last one, the owners' policy report."""
        for list_id, address, state in await self.store.disabled_members():
            view = await self._view(list_id)
            if state.warned_at is not None and now - state.warned_at < view.settings.bounce_warning_interval:
                continue
            if state.warnings_sent >= view.settings.bounce_warnings:
                if await self.store.leave(list_id, address, method="bounce",
                                          detail=f"removed after bounces: {state.reason}"[:300]):
                    owners = await self.store.owners(list_id)
                    data = compose(
                        "bounce_removed", view.settings.language,
                        view.context(address=address, reason=state.reason or "-", warnings=state.warnings_sent),
                        from_name=view.title, from_addr=view.addr("owner"), to=owners, list_id=view.list_id,
                        domain=view.domain, auto="auto-generated",
                    )
                    if owners:
                        await self.store.enqueue(list_id=list_id, kind="notice",
                                                 envelope_from=view.addr("bounces"),
                                                 data=dkim.sign_message(data, self.key), recipients=owners)
                    log.info("removed list=%s rcpt=%s after %d warnings", view.name, address, state.warnings_sent)
                continue
            # The notice is queued before the warning is counted: a crash in
            # between repeats a reminder rather than counting one never sent
            # (and whoever sees the count sees the notice queued).
            await self._warn(view, address, state.reason,
                             view.settings.bounce_warnings - state.warnings_sent - 1)
            await self.store.note_warning(list_id, address, now)
        await self._policy_report(now)

    async def _policy_report(self, now: float) -> None:
        marker_kind = "policy-report"
        rows = await self.store.policy_bounces_since(now - REPORT_INTERVAL)
        by_list: dict[int, list[dict[str, object]]] = {}
        for list_id, status, count, example in rows:
            by_list.setdefault(list_id, []).append({"status": status or "?", "count": count,
                                                     "example": example[:160]})
        for list_id, items in by_list.items():
            marker = f"list:{list_id}"
            if await self.store.count_autoreplies(now - REPORT_INTERVAL, address=marker, kind=marker_kind):
                continue
            view = await self._view(list_id)
            owners = await self.store.owners(list_id)
            if not owners:
                continue
            data = compose("policy_report", view.settings.language, view.context(rows=items),
                           from_name=view.title, from_addr=view.addr("owner"), to=owners, list_id=view.list_id,
                           domain=view.domain, auto="auto-generated")
            await self.store.enqueue(list_id=list_id, kind="notice", envelope_from=view.addr("bounces"),
                                     data=dkim.sign_message(data, self.key), recipients=owners)
            await self.store.log_autoreply(marker, list_id, marker_kind, at=self.clock())

