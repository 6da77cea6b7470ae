"""Members by e-mail: join, leave, confirm, help, who, set; and moderation by reply.

This stage handles the mail that ``smtp_in`` stored for a list's command
addresses (``LIST-request``, ``LIST-join``, ``LIST-leave``, ``LIST-confirm+TOKEN``)
and looks after held posts (the moderators' notice with one-tap reply
addresses, the sender's "your post is held" notice, a daily reminder, expiry).

Safety rules, all enforced here:

* double opt-in: a join or leave only happens after the address concerned
  answers a confirmation sent *to that address* (so a forged request reaches
  only its victim's mailbox, once), with a random, single-use, expiring token;
* a confirmation counts only if it comes from the address concerned: its From
  *and* its envelope sender are that address.  Any other sender is refused
  (the code stays valid) and told why, once per code and address, within the
  reply limits.  Where the web listener runs, the confirmation also carries
  a link: its page has a button (GET changes nothing: link scanners fetch
  every URL), and pressing it confirms, since only that mailbox got the link;
* at most one pending confirmation per address and list, no resend within
  ``[limits] confirm_resend_interval``, daily caps per address and overall,
  and at most ``replies_per_address_per_day`` automatic replies per address;
* never answer automatic mail (RFC 3834 §2): an empty envelope sender,
  ``Auto-Submitted`` other than ``no``, or ``Precedence: bulk|junk|list``;
* moderation tokens are capabilities sent only to the staff; the first one
  used decides, every later one gets "already handled by X".
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import logging
import re
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from listserv import dkim
from listserv.commands import Command, first_text, parse_message, parse_setting
from listserv.config import Config
from listserv.errors import StoreError
from listserv.message import normalize_address, parse
from listserv.rewrite import header_values
from listserv.settings import ListSettings, effective_settings
from listserv.store import IncomingRecord, Store, TokenRecord
from listserv.texts import compose
from listserv.unsubscribe import Tokens, member_for_token

__all__ = ["MembershipStage", "automatic_reason"]

log = logging.getLogger("listserv.membership")

COMMAND_KINDS = ("request", "join", "leave", "confirm")
REMINDER_INTERVAL = 86400.0


def automatic_reason(mail_from: str, raw: bytes) -> str | None:
    """Why this mail must not be answered (RFC 3834 §2), or None."""
    if not mail_from:
        return "empty envelope sender"
    headers = header_values(raw)
    auto = " ".join(headers.get("auto-submitted", [""])[0].split()).lower()
    if auto and auto.split(";")[0].strip() != "no":
        return f"Auto-Submitted: {auto}"
    precedence = headers.get("precedence", [""])[0].strip().lower()
    if precedence in ("bulk", "junk", "list"):
        return f"Precedence: {precedence}"
    if any(name in headers for name in ("list-id", "x-autoreply", "x-autorespond")):
        return "sent by a list or an autoresponder"
    return None


@dataclass(frozen=True, slots=True)
class ListView:
    id: int
    name: str
    settings: ListSettings
    domain: str

    def addr(self, suffix: str = "") -> str:
        return f"{self.name}{'-' + suffix if suffix else ''}@{self.domain}"

    @property
    def title(self) -> str:
        return self.settings.title or self.name

    @property
    def list_id(self) -> str:
        return f"<{self.name}.{self.domain}>"

    def in_language(self, language: str) -> ListView:
        """The same list, writing in a member's own language (their ``language`` option)."""
        if language not in ("pl", "en") or language == self.settings.language:
            return self
        return dataclasses.replace(self, settings=dataclasses.replace(self.settings, language=language))

    def context(self, **extra: Any) -> dict[str, Any]:
        base = {
            "name": self.name, "title": self.title, "description": self.settings.description,
            "post_address": self.addr(), "request_address": self.addr("request"),
            "join_address": self.addr("join"), "leave_address": self.addr("leave"),
            "owner_address": self.addr("owner"),
        }
        base.update(extra)
        return base


def _message_info(raw: bytes) -> tuple[str, str, str, str]:
    """(From address, Message-ID, References, Subject) of a request, never raising."""
    parsed = parse(raw, attachments=False)
    refs = " ".join(" ".join(header_values(raw).get("references", [])).split())
    return (parsed.from_addresses[0] if parsed.from_addresses else "", parsed.message_id, refs,
            parsed.subject)


class MembershipStage:
    def __init__(self, config: Config, store: Store, key: dkim.Signer,
                 clock: Callable[[], float] = time.time, tokens: Tokens | None = None) -> None:
        self.config = config
        self.tokens = tokens
        self.store = store
        self.key = key
        self.clock = clock
        self._last_housekeeping = 0.0
        # One expiry-and-reminder pass at a time: a pass checks the
        # reminder log, then sends and logs; two passes at once (the loop's
        # and an operator's or test's) would both find none and remind twice.
        self._housekeeping = asyncio.Lock()

    # -- the loop step --------------------------------------------------------

    async def process(self) -> None:
        for kind in COMMAND_KINDS:
            for record in await self.store.incoming_with(kind, "new", limit=50):
                try:
                    summary = await self._handle(record)
                except Exception as exc:  # noqa: BLE001 - one bad request must not stop the others
                    log.exception("cannot handle %s mail %s", kind, record.id)
                    summary = f"failed: {exc!r}"[:500]
                    await self.store.set_incoming_status(record.id, "failed", expect="new", reason=summary)
                    continue
                await self.store.set_incoming_status(record.id, "done", expect="new", reason=summary[:1000])
                log.info("handled list=%s kind=%s id=%s from=%s: %s", record.list_name, kind, record.id,
                         record.sender or record.mail_from, summary)
        for record in await self.store.incoming_with("post", "held", limit=20, unnotified=True):
            await self.notify_held(record)
        now = self.clock()
        if now - self._last_housekeeping > 60:
            self._last_housekeeping = now
            await self._expire_and_remind(now)

    async def _view(self, list_id: int) -> ListView:
        lst = await self.store.get_list_by_id(list_id)
        return ListView(lst.id, lst.name, effective_settings(self.config.list_defaults, lst.settings_json),
                        self.config.server.domain)

    # -- sending, with the limits ------------------------------------------------

    async def _may_send(self, to: str, kind: str) -> bool:
        now = self.clock()
        limits = self.config.limits
        day = now - 86400
        if await self.store.count_autoreplies(day, address=to) >= limits.replies_per_address_per_day:
            log.warning("not answering %s: %d automatic replies today already", to,
                        limits.replies_per_address_per_day)
            return False
        if kind == "confirm":
            if await self.store.count_autoreplies(day, address=to, kind="confirm") >= \
                    limits.confirmations_per_address_per_day:
                log.warning("no confirmation to %s: daily limit per address reached", to)
                return False
            if await self.store.count_autoreplies(day, kind="confirm") >= limits.confirmations_per_day:
                log.warning("no confirmation to %s: the server's daily limit is reached", to)
                return False
        return True

    async def _send(
        self, view: ListView, to: str | list[str], template: str, context: dict[str, Any], *,
        kind: str, auto: str = "auto-replied", in_reply_to: str = "", references: str = "",
        from_addr: str = "", attach: bytes | None = None, limited: bool = True,
    ) -> bool:
        recipients = to if isinstance(to, list) else [to]
        if not recipients:
            return False
        if limited and not await self._may_send(recipients[0], kind):
            return False
        data = compose(
            template, view.settings.language, view.context(**context), from_name=view.title,
            from_addr=from_addr or view.addr("request"), to=to, list_id=view.list_id,
            domain=view.domain, auto=auto, in_reply_to=in_reply_to, references=references, attach=attach,
        )
        await self.store.enqueue(
            list_id=view.id, kind="notice", envelope_from=view.addr("bounces"),
            data=dkim.sign_message(data, self.key), recipients=recipients,
        )
        for rcpt in recipients:
            if limited:
                await self.store.log_autoreply(rcpt, view.id, kind, at=self.clock())
        return True

    def _expires_text(self, view: ListView, when: float) -> str:
        return time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(when))

    # -- requests ---------------------------------------------------------------------

    async def _handle(self, record: IncomingRecord) -> str:
        why = automatic_reason(record.mail_from, record.data)
        if why is not None:
            return f"ignored (automatic mail: {why})"
        view = await self._view(record.list_id)
        requester = record.sender or _safe_address(record.mail_from)
        if not requester:
            return "ignored (no sender address)"
        from_addr, msgid, refs, subject = _message_info(record.data)
        reply = {"in_reply_to": msgid, "references": refs}
        member = await self.store.member(view.id, requester)
        if member is not None and member.language:
            view = view.in_language(member.language)  # the member's `language` option
        if record.kind == "join":
            return "; ".join(await self._join(view, requester, requester, msgid, refs))
        if record.kind == "leave" and record.detail:
            return await self._one_click_leave(view, record.detail, requester, msgid, refs)
        if record.kind == "leave":
            return "; ".join(await self._leave(view, requester, requester, msgid, refs))
        if record.kind == "confirm":
            result = await self._confirm(view, record.detail, requester, record, reply)
            if isinstance(result, Mismatch):
                return await self._answer_mismatch(view, record, result, reply)
            return result
        # LIST-request: commands in the Subject and the first text part.
        parsed = parse_message(record.data, subject)
        results: list[str] = []
        only_help = bool(parsed.commands) and all(c.name == "help" for c in parsed.commands)
        if only_help:
            await self._send(view, requester, "help", {}, kind="reply", in_reply_to=reply["in_reply_to"], references=reply["references"])
            return "help sent"
        for command in parsed.commands:
            results.extend(await self._command(view, command, requester, record, reply))
        for line in parsed.not_understood:
            results.append(_t(view, f"Nie rozumiem: „{line}”", f'Not understood: "{line}"'))
        if not parsed.commands:
            results.append(_t(view, "Nie znaleziono poleceń. Napisz „pomoc”, aby dostać listę poleceń.",
                              'No commands found. Send "help" for the list of commands.'))
        await self._send(view, requester, "command_reply", {"results": results, "subject": subject},
                         kind="reply", in_reply_to=reply["in_reply_to"], references=reply["references"])
        return "; ".join(results)

    async def _command(self, view: ListView, command: Command, requester: str, record: IncomingRecord,
                       reply: dict[str, str]) -> list[str]:
        prefix = f"> {command.line}"
        if command.name in ("join", "leave"):
            target = requester
            for arg in command.args:
                if arg.lower().startswith("address="):
                    try:
                        target = normalize_address(arg.split("=", 1)[1])
                    except Exception:  # noqa: BLE001 - AddressError and friends
                        return [prefix, _t(view, "  Nieprawidłowy adres.", "  Invalid address.")]
            handler = self._join if command.name == "join" else self._leave
            return [prefix, *("  " + r for r in await handler(view, target, requester, reply["in_reply_to"],
                                                               reply["references"]))]
        if command.name == "confirm":
            # A mismatch is answered here by the command reply itself.
            result = await self._confirm(view, command.args[0], requester, record, reply)
            return [prefix, "  " + (result.text if isinstance(result, Mismatch) else result)]
        if command.name == "help":
            return [prefix, _t(view, "  Pomoc: zob. polecenia poniżej.", "  Help: see the commands below."),
                    *self._help_lines(view)]
        if command.name == "who":
            return [prefix, *("  " + r for r in await self._who(view, requester))]
        if command.name == "set":
            member = await self.store.member(view.id, requester)
            if member is None:
                return [prefix, _t(view, f"  {requester} nie jest na liście.", f"  {requester} is not a member.")]
            changes = parse_setting(command.args)
            if changes is None:
                return [prefix, _t(view, "  Nie rozumiem tego ustawienia. Napisz „pomoc”, aby zobaczyć możliwe.",
                                   '  Setting not understood. Send "help" for the settings there are.')]
            if "delivery" in changes:
                await self.store.set_delivery(view.id, requester, str(changes["delivery"]))
            else:
                await self.store.set_member_options(view.name, requester, changes, method="mail",
                                                    detail=f"set {' '.join(command.args)}")
            member = await self.store.member(view.id, requester)
            assert member is not None
            if "language" in changes:
                view = view.in_language(member.language)
            return [prefix, _t(view, "  Zmieniono. Twoje ustawienia:", "  Done. Your settings:"),
                    *("    " + line for line in member_settings_lines(view, member))]
        return [prefix]

    def _help_lines(self, view: ListView) -> list[str]:
        from listserv.texts import render

        _, body = render("help", view.settings.language, view.context())
        return ["", *body.splitlines()]

    async def _who(self, view: ListView, requester: str) -> list[str]:
        policy_ = view.settings.who_policy
        if policy_ == "nobody" or (policy_ == "members" and await self.store.member(view.id, requester) is None):
            return [_t(view, "Lista uczestników nie jest udostępniana.", "The member list is not available.")]
        members = await self.store.members(view.name)
        return [m.address for m in members if m.delivery != "disabled"] or ["-"]

    async def _join(self, view: ListView, target: str, requester: str, msgid: str, refs: str) -> list[str]:
        if view.settings.subscription_policy == "closed":
            return [_t(view, "Na tę listę zapisują tylko jej właściciele.",
                       "Only the owners add members to this list.")]
        if await self.store.member(view.id, target) is not None:
            if target == requester:
                return [_t(view, f"{target} jest już na liście.", f"{target} is already a member.")]
            return [_t(view, f"Prośba dla {target} przyjęta.", f"Request for {target} received.")]
        sent = await self._confirmation(view, target, "join", requester, msgid, refs)
        return [sent]

    async def _one_click_leave(self, view: ListView, token: str, requester: str, msgid: str, refs: str) -> str:
        """LIST-leave+TOKEN (the mailto form of RFC 8058's List-Unsubscribe): no confirmation
        round trip, because the token proves the copy was addressed to that member."""
        address = None
        if self.tokens is not None:
            address = await member_for_token(self.store, self.tokens, view.name, token)
        if address is None:
            await self._send(view, requester, "command_reply",
                             {"results": [_t(view, "Ten link do wypisania jest nieważny albo adres nie jest już "
                                                   "na liście. Aby się wypisać, napisz na " + view.addr("leave"),
                                             "This unsubscribe link is not valid, or the address is no longer "
                                             "on the list. To leave, write to " + view.addr("leave"))],
                              "subject": ""}, kind="reply", in_reply_to=msgid, references=refs)
            return "refused: invalid unsubscribe token"
        if await self.store.leave(view.id, address, method="email", detail="one-click mailto unsubscribe"):
            await self._send(view, address, "goodbye", {"address": address}, kind="reply", limited=False,
                             in_reply_to=msgid, references=refs)
        return f"{address} left by one-click mailto"

    async def _leave(self, view: ListView, target: str, requester: str, msgid: str, refs: str) -> list[str]:
        if await self.store.member(view.id, target) is None:
            if target == requester:
                return [_t(view, f"{target} nie jest na liście.", f"{target} is not a member.")]
            return [_t(view, f"Prośba dla {target} przyjęta.", f"Request for {target} received.")]
        return [await self._confirmation(view, target, "leave", requester, msgid, refs)]

    async def _confirmation(self, view: ListView, target: str, action: str, requester: str, msgid: str,
                            refs: str) -> str:
        now = self.clock()
        pending = await self.store.pending_token(view.id, target, action, now)
        if pending is not None and now - pending.created_at < self.config.limits.confirm_resend_interval:
            return _t(view, f"Potwierdzenie do {target} zostało już wysłane; sprawdź skrzynkę.",
                      f"A confirmation was already sent to {target}; please check that mailbox.")
        if pending is not None:
            token, expires = pending.token, pending.expires_at
        else:
            token = new_token()
            expires = now + view.settings.confirm_expiry
            await self.store.create_token(token, view.id, target, action,
                                          {"requester": requester, "request": msgid}, expires)
        web = self.config.web
        # The link is the other way to confirm; only where the web listener runs.
        confirm_url = f"{web.base_url}c/{token}" if web.base_url and web.listen is not None else ""
        sent = await self._send(
            view, target, f"confirm_{action}",
            {"address": target, "requester": requester, "token": token, "confirm_url": confirm_url,
             "expires": self._expires_text(view, expires)},
            kind="confirm", from_addr=view.addr(f"confirm+{token}"),
            in_reply_to=msgid if target == requester else "", references=refs if target == requester else "",
        )
        if not sent:
            return _t(view, "Limit wiadomości na dziś został wyczerpany; spróbuj jutro.",
                      "Too many messages today; please try again tomorrow.")
        return _t(view, f"Wysłano prośbę o potwierdzenie do {target}.", f"A confirmation was sent to {target}.")

    async def _confirm(self, view: ListView, token: str, who: str, record: IncomingRecord,
                       reply: dict[str, str]) -> str | Mismatch:
        tok = await self.store.get_token(token)
        now = self.clock()
        if tok is None or tok.list_id != view.id:
            return _t(view, "Nieznany kod potwierdzenia.", "Unknown confirmation code.")
        if tok.action == "moderate":
            return await self._moderate(view, tok, who, record)
        if tok.action == "reenable":
            # Any reply to the "delivery paused" notice proves the mailbox works again.
            if tok.expires_at <= now or not await self.store.use_token(token, who, now):
                return _t(view, "Ten kod jest już nieważny.", "This code is no longer valid.")
            if await self.store.reenable(view.id, tok.address):
                log.info("re-enabled list=%s rcpt=%s", view.name, tok.address)
                return _t(view, f"Wznowiono wysyłanie do {tok.address}.", f"Delivery to {tok.address} resumed.")
            return _t(view, f"Wysyłanie do {tok.address} nie było wstrzymane.",
                      f"Delivery to {tok.address} was not paused.")
        if tok.used_at is not None:
            return _t(view, "Ten kod został już użyty.", "This confirmation code was already used.")
        if tok.expires_at <= now:
            return _t(view, "Kod wygasł; wyślij prośbę ponownie.", "The code has expired; please ask again.")
        mismatch = _not_from_the_address(view, token, tok.address, record)
        if mismatch is not None:
            # The code stays unused: the address concerned can still confirm.
            log.warning("confirmation list=%s for %s refused: %s", view.name, tok.address, mismatch.why)
            return mismatch
        if not await self.store.use_token(token, who, now):
            return _t(view, "Ten kod został już użyty.", "This confirmation code was already used.")
        detail = f"confirmed by mail from {who}, Message-ID <{reply['in_reply_to']}>"
        return await self._apply(view, tok, "email", detail, reply["in_reply_to"], reply["references"])

    async def _apply(self, view: ListView, tok: TokenRecord, method: str, detail: str,
                     in_reply_to: str = "", references: str = "") -> str:
        """The confirmed join or leave: done (or put to the owners), and the member told."""
        if tok.action == "join":
            if view.settings.subscription_policy == "moderate":
                await self._ask_owners(view, tok.address, detail)
                return _t(view, f"Potwierdzono; zapis {tok.address} czeka na zgodę właściciela.",
                          f"Confirmed; {tok.address} now waits for an owner's approval.")
            if await self.store.join(view.id, tok.address, method=method, detail=detail):
                await self._send(view, tok.address, "welcome", {"address": tok.address}, kind="reply",
                                 limited=False, in_reply_to=in_reply_to, references=references)
                return _t(view, f"{tok.address} zapisano na listę.", f"{tok.address} has joined the list.")
            return _t(view, f"{tok.address} jest już na liście.", f"{tok.address} is already a member.")
        if await self.store.leave(view.id, tok.address, method=method, detail=detail):
            await self._send(view, tok.address, "goodbye", {"address": tok.address}, kind="reply",
                             limited=False, in_reply_to=in_reply_to, references=references)
            return _t(view, f"{tok.address} wypisano z listy.", f"{tok.address} has left the list.")
        return _t(view, f"{tok.address} nie jest na liście.", f"{tok.address} is not a member.")

    async def confirmation_for_link(self, token: str) -> tuple[ListView, TokenRecord] | None:
        """The pending join or leave a confirmation link stands for, or None (unknown, used, expired)."""
        tok = await self.store.get_token(token)
        if tok is None or tok.action not in ("join", "leave") or tok.used_at is not None \
                or tok.expires_at <= self.clock():
            return None
        return await self._view(tok.list_id), tok

    async def confirm_by_link(self, token: str) -> tuple[bool, str]:
        """The other way to confirm: the link in the confirmation mail, opened and its button pressed.

        The link reached only the address concerned (the confirmation is
        mailed to it and nowhere else), so holding it proves that mailbox, as
        a reply from it does.  Returns (done, the text for the page).
        """
        found = await self.confirmation_for_link(token)
        if found is None:
            return False, ""
        view, tok = found
        if not await self.store.use_token(token, f"web link for {tok.address}", self.clock()):
            return False, ""
        detail = "confirmed with the link in the confirmation mail"
        return True, await self._apply(view, tok, "web", detail)

    async def request_by_web(self, list_name: str, address: str, *, language: str = "") -> tuple[ListView, str]:
        """The public list page's form: mail the address what it needs, and say the same to anyone.

        A newcomer gets the join confirmation (the same double opt-in, limits
        and expiry as ``LIST-join``; nothing is subscribed until that mailbox
        answers); a member gets the link to their preferences page.  The page
        never tells a visitor whether an address is on the list: the answer
        is one text for both.  ``language`` is the page's, when the visitor
        chose one: the answer and the mail are in it.  Raises UnknownList.
        """
        lst = await self.store.get_list(list_name)
        view = (await self._view(lst.id)).in_language(language)
        neutral = _t(view, f"Jeśli adres {address} może zapisać się na listę lub już na niej jest, wysłaliśmy na "
                           "niego wiadomość: zapis trzeba potwierdzić z tej skrzynki, a uczestnik dostaje link "
                           "do swoich ustawień.",
                     f"If {address} can join the list or is on it already, we have sent it a message: a join "
                     "must be confirmed from that mailbox, and a member gets the link to their settings.")
        member = await self.store.member(view.id, address)
        if member is not None:
            if self.tokens is not None and self.config.web.base_url:
                link = f"{self.config.web.base_url}p/{self.tokens.prefs_token(address)}"
                await self._send(view.in_language(member.language), address, "prefs_link",
                                 {"link": link, "address": address}, kind="confirm")
            return view, neutral
        if view.settings.subscription_policy == "closed":
            return view, _t(view, "Na tę listę zapisują tylko jej właściciele.",
                            "Only the owners add members to this list.")
        await self._confirmation(view, address, "join", address, "", "")
        log.info("join requested on the web list=%s address=%s", view.name, address)
        return view, neutral

    async def _answer_mismatch(self, view: ListView, record: IncomingRecord, mismatch: Mismatch,
                               reply: dict[str, str]) -> str:
        """Tell the sender why, once per code and sending address, within the reply limits.

        The answer goes to the envelope sender (RFC 3834 §4: responses go to
        the Return-Path), so a forged From is not bounced at its owner.
        """
        to = _safe_address(record.mail_from) or mismatch.from_addr
        once = f"mismatch:{mismatch.token}"
        if not to or await self.store.count_autoreplies(0.0, address=to, kind=once):
            return f"refused ({mismatch.why}); already answered"
        if await self._send(view, to, "command_reply", {"results": [mismatch.text], "subject": mismatch.subject},
                            kind=once, in_reply_to=reply["in_reply_to"], references=reply["references"]):
            return f"refused ({mismatch.why}); answered {to}"
        return f"refused ({mismatch.why}); not answered (reply limit)"

    # -- moderation ------------------------------------------------------------------------

    async def _action_tokens(self, view: ListView, about: str, payload: dict[str, Any], actions: tuple[str, ...],
                             expires: float) -> dict[str, str]:
        out = {}
        for action in actions:
            token = new_token()
            await self.store.create_token(token, view.id, about, "moderate", {**payload, "action": action}, expires)
            out[action] = f"mailto:{view.addr(f'confirm+{token}')}"
        return out

    async def _ask_owners(self, view: ListView, address: str, detail: str) -> None:
        owners = await self.store.owners(view.id)
        expires = self.clock() + view.settings.held_expiry
        actions = await self._action_tokens(view, address, {"kind": "subscription", "about": address,
                                                            "detail": detail}, ("approve", "discard"), expires)
        await self._send(view, owners, "subscription_request", {"address": address, "actions": actions},
                         kind="notice", auto="auto-generated", from_addr=view.addr("owner"), limited=False)

    async def notify_held(self, record: IncomingRecord) -> None:
        """One notice to the staff with one-tap actions, and (once) a notice to the sender."""
        view = await self._view(record.list_id)
        staff = await self.store.staff(record.list_id)
        if staff:
            expires = record.received_at + view.settings.held_expiry
            actions = await self._action_tokens(
                view, record.sender, {"kind": "held", "held_id": record.id},
                ("approve", "always", "reject", "discard"), max(expires, self.clock() + 3600),
            )
            await self._send(
                view, staff, "held_notice",
                {"held_id": record.id, "sender": record.sender, "subject": record.subject, "reason": record.reason,
                 "actions": actions},
                kind="notice", auto="auto-generated", from_addr=view.addr("owner"), attach=record.data,
                limited=False,
            )
        else:
            log.warning("held list=%s id=%s: no owner or moderator to notify", view.name, record.id)
        author = await self.store.member(record.list_id, record.sender) if record.sender else None
        # A member with the `ack` option is told either way: a receipt when
        # the post went out (listserv.prepare), this notice when it did not.
        if (view.settings.notify_held_sender or (author is not None and author.ack)) and record.sender and \
                automatic_reason(record.mail_from, record.data) is None:
            _, msgid, refs, _ = _message_info(record.data)
            if author is not None and author.language:
                view = view.in_language(author.language)
            await self._send(view, record.sender, "held_sender",
                             {"subject": record.subject, "reason": record.reason}, kind="reply",
                             in_reply_to=msgid, references=refs)
        await self.store.set_incoming_status(record.id, "held", notified=True)
        log.info("notified list=%s held=%s staff=%d", view.name, record.id, len(staff))

    async def _moderate(self, view: ListView, tok: TokenRecord, who: str, record: IncomingRecord) -> str:
        payload = tok.payload
        now = self.clock()
        action = str(payload.get("action", ""))
        if payload.get("kind") == "subscription":
            if not await self.store.use_token(tok.token, who, now):
                return await self._already(view, tok, who, record)
            await self.store.spend_tokens_for(view.id, "moderate", "about", tok.address, who, now)
            if action == "approve":
                detail = f"{payload.get('detail', '')}; approved by {who}"
                if await self.store.join(view.id, tok.address, method="email", detail=detail):
                    await self._send(view, tok.address, "welcome", {"address": tok.address}, kind="reply",
                                     limited=False)
                return f"subscription of {tok.address} approved by {who}"
            return f"subscription of {tok.address} refused by {who}"
        held_id = int(payload.get("held_id", 0))
        if not await self.store.use_token(tok.token, who, now):
            return await self._already(view, tok, who, record)
        try:
            post = await self.store.get_incoming(held_id)
        except StoreError:
            return "the held post no longer exists"
        try:
            if action in ("approve", "always"):
                await self.store.set_incoming_status(held_id, "accepted", expect="held",
                                                     reason=f"approved by {who} by e-mail")
                if action == "always" and post.sender:
                    await self.store.accept_sender(view.id, post.sender)
            elif action == "reject":
                reason = _reply_text(record.data)
                await self.store.set_incoming_status(held_id, "rejected", expect="held",
                                                     reason=f"rejected by {who}: {reason}"[:500])
                if post.sender:
                    _, msgid, refs, _ = _message_info(post.data)
                    await self._send(view, post.sender, "rejection", {"subject": post.subject, "reason": reason},
                                     kind="reply", limited=False, in_reply_to=msgid, references=refs)
            else:
                await self.store.set_incoming_status(held_id, "discarded", expect="held",
                                                     reason=f"discarded by {who} by e-mail")
        except StoreError:
            return await self._already(view, tok, who, record)
        await self.store.spend_tokens_for(view.id, "moderate", "held_id", held_id, who, now)
        return f"held post {held_id}: {action} by {who}"

    async def _already(self, view: ListView, tok: TokenRecord, who: str, record: IncomingRecord) -> str:
        held_id = int(tok.payload.get("held_id", 0))
        outcome, by = "", ""
        if held_id:
            try:
                post = await self.store.get_incoming(held_id)
                outcome = post.reason or post.status
                m = re.search(r" by (\S+)", post.reason)
                by = m.group(1) if m else ""
            except StoreError:
                outcome = "removed"
        else:
            fresh = await self.store.get_token(tok.token)
            by = fresh.used_by if fresh else ""
            outcome = "handled"
        _, msgid, refs, _ = _message_info(record.data)
        await self._send(view, who, "already_handled",
                         {"held_id": held_id, "subject": tok.payload.get("about", ""), "outcome": outcome,
                          "by": by}, kind="reply", in_reply_to=msgid, references=refs)
        return f"already handled ({outcome})"

    async def _expire_and_remind(self, now: float) -> None:
        async with self._housekeeping:
            await self._expire_and_remind_once(now)

    async def _expire_and_remind_once(self, now: float) -> None:
        by_list: dict[int, list[IncomingRecord]] = {}
        for post in await self.store.held_before(now - 3600):
            view = await self._view(post.list_id)
            if now - post.received_at >= view.settings.held_expiry:
                try:
                    await self.store.set_incoming_status(post.id, "expired", expect="held",
                                                         reason="expired without a moderator's decision")
                except StoreError:
                    continue
                await self.store.spend_tokens_for(view.id, "moderate", "held_id", post.id, "expiry", now)
                if post.sender and automatic_reason(post.mail_from, post.data) is None:
                    await self._send(view, post.sender, "held_expired",
                                     {"subject": post.subject, "since": _day(post.received_at)}, kind="reply")
                log.info("expired list=%s held=%s", view.name, post.id)
                continue
            if now - post.received_at >= REMINDER_INTERVAL:
                by_list.setdefault(post.list_id, []).append(post)
        for list_id, posts in by_list.items():
            marker = f"list:{list_id}"
            if await self.store.count_autoreplies(now - REMINDER_INTERVAL, address=marker, kind="reminder"):
                continue
            view = await self._view(list_id)
            owners = await self.store.owners(list_id)
            rows = [{"id": p.id, "since": _day(p.received_at), "sender": p.sender, "subject": p.subject,
                     "reason": p.reason} for p in posts]
            if await self._send(view, owners, "reminder", {"posts": rows}, kind="notice", auto="auto-generated",
                                from_addr=view.addr("owner"), limited=False):
                await self.store.log_autoreply(marker, list_id, "reminder", at=self.clock())


@dataclass(frozen=True, slots=True)
class Mismatch:
    """A join/leave confirmation that did not come from the address concerned."""

    token: str
    why: str  # for the log and the incoming row
    text: str  # for the sender, in the list's language
    from_addr: str
    subject: str


def _not_from_the_address(view: ListView, token: str, address: str, record: IncomingRecord) -> Mismatch | None:
    """None if both the From and the envelope sender are ``address``, else why not.

    Only the address concerned confirms its own join or leave: a code that
    leaked (a forwarded confirmation, a shared mailbox, a guessed reply) must
    not subscribe or remove somebody from another mailbox.  Both are checked
    because each alone is easy to set to anything.
    """
    from_addr, _, _, subject = _message_info(record.data)
    envelope = _safe_address(record.mail_from)
    if from_addr == address and envelope == address:
        return None
    seen = f"From: {from_addr or '(none)'}, envelope sender: {envelope or '(none)'}"
    return Mismatch(
        token=token,
        why=f"not from {address} ({seen})",
        text=_t(view,
                f"Nie potwierdzono: potwierdzenie dla {address} przyjmujemy tylko z tego adresu, "
                f"w polu From i jako nadawcę w kopercie (ta wiadomość: {seen}). Odpowiedz na prośbę "
                f"o potwierdzenie ze skrzynki {address}. Kod jest nadal ważny.",
                f"Not confirmed: a confirmation for {address} is accepted only from that address, as the "
                f"From and as the envelope sender (this message: {seen}). Reply to the confirmation "
                f"request from the mailbox {address}. The code is still valid."),
        from_addr=from_addr, subject=subject,
    )


def new_token() -> str:
    """130 random bits in lower-case base32: safe in an address local part, and
    unharmed by mail systems that fold the case of local parts."""
    return base64.b32encode(secrets.token_bytes(17)).decode().rstrip("=").lower()


_MODE_TEXT = {
    "each": ("każda wiadomość osobno", "each post as it comes"),
    "digest_mime": ("przegląd (wiadomości jako załączniki MIME)", "digest (MIME, each post attached)"),
    "digest_plain": ("przegląd tekstowy", "plain-text digest"),
    "index": ("spis: tematy, autorzy i odnośniki do archiwum", "index: subjects, authors and archive links"),
}


def member_settings_lines(view: ListView, member: Any) -> list[str]:
    """A member's settings as the command reply states them."""
    def onoff(value: bool) -> str:
        return _t(view, "wł." if value else "wył.", "on" if value else "off")

    mode = _MODE_TEXT.get(member.delivery_mode, (member.delivery_mode, member.delivery_mode))
    status = {"enabled": ("tak", "yes"), "nomail": ("wstrzymane (nomail)", "paused (nomail)"),
              "disabled": ("wyłączone po zwrotach", "disabled after bounces")}.get(member.delivery, ("?", "?"))
    return [
        _t(view, f"wysyłanie: {status[0]}", f"delivery: {status[1]}"),
        _t(view, f"tryb: {mode[0]}", f"mode: {mode[1]}"),
        _t(view, f"moje własne wiadomości (notme): {onoff(not member.not_me)}",
           f"copies of my own posts (notme): {onoff(not member.not_me)}"),
        _t(view, f"potwierdzenia (ack): {onoff(member.ack)}", f"receipts (ack): {onoff(member.ack)}"),
        _t(view, f"bez duplikatów (nodupes): {onoff(member.no_dupes)}",
           f"no duplicates (nodupes): {onoff(member.no_dupes)}"),
        _t(view, f"język: {member.language or view.settings.language}",
           f"language: {member.language or view.settings.language}"),
    ]


def _t(view: ListView, pl: str, en: str) -> str:
    return pl if view.settings.language == "pl" else en


def _day(ts: float) -> str:
    return time.strftime("%Y-%m-%d", time.gmtime(ts))


def _safe_address(value: str) -> str:
    try:
        return normalize_address(value)
    except Exception:  # noqa: BLE001
        return ""


def _reply_text(raw: bytes) -> str:
    """What a moderator typed above the quoted notice (the reason for a rejection)."""
    lines = []
    for line in first_text(raw).splitlines():
        stripped = line.strip()
        if stripped.startswith(">") or stripped.startswith("-- ") or stripped == "--":
            break
        if re.match(r"^(on|w dniu|dnia|am|le)\b.*(wrote|napisał|napisała|schrieb|écrit).*:$", stripped, re.I):
            break
        if stripped:
            lines.append(stripped)
    return " ".join(lines)[:500]
