"""Mail to postmaster@ and abuse@ the list domain: kept, and forwarded to the site administrator.

RFC 5321 §4.5.1 requires every SMTP server to take mail for ``postmaster``;
RFC 2142 §2 names ``abuse``.  ``smtp_in`` stores such mail like a list's
owner mail (kind ``postmaster``, list id 0 for the site) before it answers
``250``.  This stage, run on each pass of the worker like the other stages,
forwards it to ``[server] postmaster``, signed for the list domain, from the
null reverse-path (RFC 5321 §4.5.5: a bounce of the forwarded copy must not
come back here and loop).  With no ``postmaster`` configured the mail stays
stored and unforwarded (``new``); the warning says so once per start, and it
is forwarded on the first pass after the setting is made.
"""

from __future__ import annotations

import logging

from listserv import dkim
from listserv.config import Config
from listserv.store import Store

__all__ = ["PostmasterStage"]

log = logging.getLogger("listserv.postmaster")


class PostmasterStage:
    def __init__(self, config: Config, store: Store, keys: dkim.Signer) -> None:
        self.config = config
        self.store = store
        self.keys = keys
        self._warned = False

    async def process(self) -> None:
        records = await self.store.incoming_with("postmaster", "new", limit=20)
        if not records:
            return
        to = self.config.server.postmaster
        if not to:
            if not self._warned:
                self._warned = True
                log.warning("mail to postmaster@%s is kept but not forwarded: set [server] postmaster"
                            " (first waiting: id=%d from=%s)", self.config.server.domain, records[0].id,
                            records[0].mail_from or "<>")
            return
        for record in records:
            try:
                signed = dkim.sign_message(record.data, self.keys)
            except Exception as exc:  # noqa: BLE001 - e.g. no From: it cannot leave signed
                # Kept and recorded (visible in `listserv status`), never retried in a loop.
                await self.store.set_incoming_status(record.id, "failed", expect="new",
                                                     reason=f"cannot be forwarded: {exc}"[:500])
                log.warning("postmaster mail id=%s not forwarded: %s", record.id, exc)
                continue
            await self.store.enqueue(
                list_id=0, kind="owner", envelope_from="", data=signed, recipients=[to],
                incoming_id=record.id, incoming_status="done", incoming_expect="new",
            )
            log.info("forwarded postmaster mail id=%s rcpt=%s to=%s", record.id, record.rcpt, to)
