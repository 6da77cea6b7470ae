"""A member's own preferences page (``/p/TOKEN``) and each list's public join page (``/j/LIST``).

Both are served by the ``[web]`` listener beside one-click unsubscribe
(listserv.unsubscribe), as aiohttp handlers over jinja2 templates in
``templates/web/``: no accounts, no passwords, no JavaScript.

The preferences page is opened by the link in every copy's footer and every
digest.  Its token is an HMAC of the address under the server secret
(``Tokens.prefs_token``): nothing is stored per member, and rotating the secret
revokes every link.  The page lists the address's lists; each has a form to
change the delivery mode and options, and a button to leave (asked once more
before it is done).

What a browser may do with a token (the token alone is not enough to act):

- GET never changes anything (link scanners and previews fetch every URL).
- A POST must carry the hidden ``form`` field the page itself wrote (an HMAC
  of the token and the time it was written, valid ``FORM_TTL``), and must not
  come from another site: ``Sec-Fetch-Site: cross-site`` or ``same-site`` is
  refused, and so is an ``Origin`` that is not this server's (``Origin: null``
  only with ``Sec-Fetch-Site: same-origin``).  The pages may not be framed
  (``frame-ancestors 'none'``), so no other site can lure a click either.
- A token that is not a member's (forged, old secret, someone who left) is 404.

The join page asks for an address and hands it to
``MembershipStage.request_by_web``: the same double opt-in by mail as
``LIST-join``, with the same limits.  Nobody is subscribed until that mailbox
confirms, so a visitor cannot subscribe a third party; the reply never says
whether an address is on the list.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import time
import urllib.parse
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import jinja2
from aiohttp import web

from listserv.config import Config
from listserv.errors import AddressError, StoreError, UnknownList
from listserv.message import normalize_address
from listserv.settings import ListSettings, effective_settings
from listserv.store import Store
from listserv.store.records import DELIVERY_MODES, ListRecord, MemberRecord

if TYPE_CHECKING:
    from listserv.membership import MembershipStage
    from listserv.unsubscribe import Tokens

__all__ = ["PrefsPages"]

log = logging.getLogger("listserv.prefs")

TOKEN_LENGTH = 28  # Tokens.prefs_token: 17 bytes of HMAC in base32
REFRESH_INTERVAL = 1.0  # seconds between two reads of every member address (see _address_for)
FORM_TTL = 2 * 86400  # a page left open over a weekend still saves

# The options a member sets on the page: (field, store column).  Checkboxes
# send nothing when unticked (HTML), so a missing field means "off".
_FLAGS = ("not_me", "ack", "no_dupes")

HEADERS = {
    "Cache-Control": "no-store",
    # The token is in the URL: never hand it to another site in a Referer.
    "Referrer-Policy": "no-referrer",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Content-Security-Policy": ("default-src 'none'; style-src 'unsafe-inline'; form-action 'self'; "
                                "frame-ancestors 'none'; base-uri 'none'"),
}

TEXTS: dict[str, dict[str, str]] = {
    "pl": {
        "prefs_title": "Twoje ustawienia list dyskusyjnych",
        "prefs_intro": "Adres {address}. Zmiany zapisuje przycisk „Zapisz” przy każdej liście.",
        "no_lists": "Ten adres nie jest już na żadnej liście.",
        "mode": "Jak dostawać wiadomości",
        "mode_each": "Każdą wiadomość osobno",
        "mode_digest_mime": "Przegląd (skrót): wiadomości zebrane w jedną, w formacie MIME",
        "mode_digest_plain": "Przegląd jako zwykły tekst",
        "mode_index": "Tylko spis: tematy, autorzy i odnośniki do archiwum",
        "options": "Opcje",
        "nomail": "Wstrzymaj wysyłanie do mnie (np. na czas urlopu)",
        "disabled": "Wysyłanie zostało wyłączone, bo wiadomości do Ciebie wracały jako niedoręczone.",
        "reenable": "Wznów wysyłanie",
        "not_me": "Nie wysyłaj mi moich własnych wiadomości",
        "ack": "Potwierdzaj, że moja wiadomość została rozesłana",
        "no_dupes": "Nie wysyłaj drugiej kopii, gdy jestem w polu Do lub DW",
        "language": "Język wiadomości od listy",
        "language_list": "jak lista ({language})",
        "save": "Zapisz",
        "saved": "Zapisano ustawienia listy „{title}”.",
        "leave": "Wypisz mnie z tej listy",
        "leave_title": "Wypisanie z listy",
        "leave_ask": "Czy na pewno wypisać adres {address} z listy „{title}”?",
        "leave_yes": "Tak, wypisz mnie",
        "leave_no": "Nie, wróć do ustawień",
        "left_title": "Wypisano",
        "left": "Adres {address} został wypisany z listy „{title}”.",
        "rejoin": "Zapisać się ponownie można na stronie listy.",
        "back": "Wróć do ustawień",
        "bad_title": "Nieważny link",
        "bad": "Ten link jest nieważny: adres nie jest na żadnej liście albo link jest niepełny.",
        "refused_title": "Odmowa",
        "refused": "Ten formularz można wysłać tylko z tej strony. Otwórz link z wiadomości i spróbuj jeszcze raz.",
        "expired": "Formularz był otwarty zbyt długo. Odśwież stronę i spróbuj jeszcze raz.",
        "join_title": "Zapis na listę „{title}”",
        "join_intro": "Podaj swój adres e-mail. Wyślemy na niego wiadomość: zapis trzeba potwierdzić "
                      "z tej skrzynki. Bez potwierdzenia nikt nie zostanie zapisany.",
        "join_closed": "Na tę listę zapisują tylko jej właściciele. Napisz do nich: {owner}.",
        "address": "Adres e-mail",
        "join_button": "Zapisz mnie",
        "join_sent_title": "Sprawdź skrzynkę",
        "bad_address": "To nie jest poprawny adres e-mail: {address}",
        "no_list_title": "Nie ma takiej listy",
        "no_list": "Nie ma listy o tej nazwie.",
        "other_language": "English",
        "footer": "Listy dyskusyjne Porozumienia Burmistrzów",
    },
    "en": {
        "prefs_title": "Your mailing list settings",
        "prefs_intro": "Address {address}. The \u201cSave\u201d button of each list saves its changes.",
        "no_lists": "This address is not on any list any more.",
        "mode": "How to receive the list",
        "mode_each": "Each post on its own",
        "mode_digest_mime": "Digest: the posts collected into one message, MIME format",
        "mode_digest_plain": "Digest as plain text",
        "mode_index": "Index only: subjects, authors and archive links",
        "options": "Options",
        "nomail": "Pause delivery to me (e.g. while on holiday)",
        "disabled": "Delivery was stopped because mail to you kept bouncing.",
        "reenable": "Resume delivery",
        "not_me": "Do not send me my own posts",
        "ack": "Confirm when my post has gone out",
        "no_dupes": "No second copy when I am in the To or Cc",
        "language": "Language of the list's mail to me",
        "language_list": "the list's ({language})",
        "save": "Save",
        "saved": "Settings of the list \u201c{title}\u201d saved.",
        "leave": "Leave this list",
        "leave_title": "Leave the list",
        "leave_ask": "Really remove {address} from the list \u201c{title}\u201d?",
        "leave_yes": "Yes, remove me",
        "leave_no": "No, back to my settings",
        "left_title": "Unsubscribed",
        "left": "{address} has been removed from the list \u201c{title}\u201d.",
        "rejoin": "You can join again on the list's page.",
        "back": "Back to my settings",
        "bad_title": "Invalid link",
        "bad": "This link is not valid: the address is on no list, or the link is incomplete.",
        "refused_title": "Refused",
        "refused": "This form can only be sent from this page. Open the link in your mail and try again.",
        "expired": "The form was open for too long. Reload the page and try again.",
        "join_title": "Join the list \u201c{title}\u201d",
        "join_intro": "Enter your e-mail address. We will send it a message: the join must be confirmed "
                      "from that mailbox. Nobody is subscribed without that confirmation.",
        "join_closed": "Only the owners add members to this list. Write to them: {owner}.",
        "address": "E-mail address",
        "join_button": "Join",
        "join_sent_title": "Check your mailbox",
        "bad_address": "This is not a valid e-mail address: {address}",
        "no_list_title": "No such list",
        "no_list": "There is no list by that name.",
        "other_language": "Polski",
        "footer": "Covenant of Mayors discussion lists",
    },
}


@dataclass(frozen=True, slots=True)
class Membership:
    """One of the address's lists, as the page shows it."""

    name: str
    title: str
    description: str
    settings: ListSettings
    member: MemberRecord
    join_url: str


class PrefsPages:
    """The handlers of ``/p/TOKEN`` and ``/j/LIST``; ``add_routes`` puts them on an aiohttp app."""

    def __init__(self, config: Config, store: Store, tokens: Tokens, membership: MembershipStage,
                 *, clock: Any = time.time) -> None:
        from listserv.archive import templates_dir  # the same folder as the archive's templates

        self.config = config
        self.store = store
        self.tokens = tokens
        self.membership = membership
        self.clock = clock
        self.env = jinja2.Environment(loader=jinja2.FileSystemLoader(str(templates_dir() / "web")),
                                      autoescape=True, undefined=jinja2.StrictUndefined)
        # token -> address, for every member address seen so far.  Finding a
        # token's owner means one HMAC per address; this keeps that to the
        # addresses that are new since the last look (see _address_for).
        self._owners: dict[str, str] = {}
        self._seen: set[str] = set()
        self._refreshing = asyncio.Lock()
        self.refresh_interval = REFRESH_INTERVAL
        self._refreshed_at = -REFRESH_INTERVAL

    def add_routes(self, app: web.Application) -> None:
        app.router.add_get("/p/{token}", self.show)
        app.router.add_post("/p/{token}", self.change)
        app.router.add_get("/j/{list}", self.show_join)
        app.router.add_post("/j/{list}", self.join)

    # -- the member behind a token ---------------------------------------------------------

    async def _address_for(self, token: str) -> str | None:
        """The address whose preferences token this is, or None.

        A miss reads the member addresses (one query) and hashes only those
        not seen before, so a forged token costs a query, not 50,000 HMACs;
        and that query runs at most once per ``refresh_interval``: misses in
        between wait for the next one (a tarpit for guessing, never a wrong
        404 for a member who joined a moment ago).
        """
        token = token.lower()
        if len(token) != TOKEN_LENGTH or not token.isalnum():
            return None
        found = self._owners.get(token)
        if found is not None:
            return found
        async with self._refreshing:
            found = self._owners.get(token)  # another request's refresh may have found it
            if found is not None:
                return found
            wait = self._refreshed_at + self.refresh_interval - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            for address in await self.store.member_addresses():
                if address not in self._seen:
                    self._seen.add(address)
                    self._owners[self.tokens.prefs_token(address)] = address
            self._refreshed_at = time.monotonic()
        return self._owners.get(token)

    async def _memberships(self, address: str) -> list[Membership]:
        out = []
        for lst, member in await self.store.member_lists(address):
            settings = self._settings(lst)
            out.append(Membership(lst.name, settings.title or lst.name, settings.description, settings, member,
                                  self._join_url(lst.name)))
        return out

    def _settings(self, lst: ListRecord) -> ListSettings:
        return effective_settings(self.config.list_defaults, lst.settings_json)

    def _join_url(self, list_name: str) -> str:
        return f"/j/{urllib.parse.quote(list_name)}"

    # -- the hidden form field and where a POST comes from ---------------------------------

    def form_field(self, scope: str, now: float | None = None) -> str:
        """The hidden field of a form for ``scope`` (a token, or ``join:LIST``): when written, and its MAC."""
        issued = int(self.clock() if now is None else now)
        mac = hmac.new(self.tokens.secret, f"form\0{scope}\0{issued}".encode(), hashlib.sha256).hexdigest()[:32]
        return f"{issued}.{mac}"

    def _form_ok(self, scope: str, value: str) -> bool:
        issued_text, _, mac = value.partition(".")
        if not issued_text.isdigit():
            return False
        issued = int(issued_text)
        if not 0 <= self.clock() - issued <= FORM_TTL:
            return False
        return hmac.compare_digest(self.form_field(scope, issued), value)

    def _cross_site(self, request: web.Request) -> bool:
        """Did another site make the browser send this POST?  (Fetch Metadata, then Origin.)"""
        fetch_site = request.headers.get("Sec-Fetch-Site", "").lower()
        if fetch_site in ("cross-site", "same-site"):
            return True
        origin = request.headers.get("Origin")
        if origin is None:
            return False  # an old browser or a plain HTTP client: the form field decides
        if origin == "null":
            # Sandboxed frames and some privacy settings send "null"; only
            # believe it when the browser also says the request is same-origin.
            return fetch_site != "same-origin"
        ours = {f"{request.scheme}://{request.host}".lower()}
        if self.config.web.base_url:
            base = urllib.parse.urlsplit(self.config.web.base_url)
            ours.add(f"{base.scheme}://{base.netloc}".lower())
        forwarded_host = request.headers.get("X-Forwarded-Host")
        if forwarded_host:
            ours.add(f"https://{forwarded_host}".lower())
        return origin.lower().rstrip("/") not in ours

    # -- rendering -------------------------------------------------------------------------

    def _lang(self, request: web.Request, default: str) -> str:
        asked = request.query.get("lang", "")
        return asked if asked in TEXTS else (default if default in TEXTS else "pl")

    def _render(self, template: str, lang: str, status: int = 200, **context: Any) -> web.Response:
        t = TEXTS[lang]
        other = "en" if lang == "pl" else "pl"
        page = self.env.get_template(template).render(lang=lang, t=t, other_lang=other, **context)
        return web.Response(text=page, status=status, content_type="text/html", charset="utf-8",
                            headers=HEADERS)

    def _message(self, lang: str, title_key: str, text: str, status: int, back: str = "") -> web.Response:
        return self._render("message.html", lang, status, title=TEXTS[lang][title_key], text=text, back=back)

    # -- /p/TOKEN ---------------------------------------------------------------------------

    async def show(self, request: web.Request) -> web.Response:
        """GET: the member's lists and their settings. Changes nothing."""
        token = request.match_info["token"]
        address = await self._address_for(token)
        memberships = await self._memberships(address) if address else []
        if address is None or not memberships:
            lang = self._lang(request, "pl")
            return self._message(lang, "bad_title", TEXTS[lang]["bad"], 404)
        default = memberships[0].member.language or memberships[0].settings.language
        lang = self._lang(request, default)
        saved = request.query.get("saved", "")
        saved_title = next((m.title for m in memberships if m.name == saved), "")
        return self._render("prefs.html", lang, address=address, memberships=memberships, modes=DELIVERY_MODES,
                            flags=_FLAGS, form=self.form_field(token.lower()), saved=saved_title,
                            action=f"/p/{token.lower()}" + (f"?lang={lang}" if "lang" in request.query else ""),
                            self_url=f"/p/{token.lower()}")

    async def change(self, request: web.Request) -> web.Response:
        """POST: save one list's settings, ask before leaving, or leave."""
        token = request.match_info["token"].lower()
        lang = self._lang(request, "pl")
        t = TEXTS[lang]
        if self._cross_site(request):
            log.info("preferences POST from another site refused origin=%s fetch-site=%s",
                     request.headers.get("Origin", "-"), request.headers.get("Sec-Fetch-Site", "-"))
            return self._message(lang, "refused_title", t["refused"], 403)
        address = await self._address_for(token)
        if address is None:
            return self._message(lang, "bad_title", t["bad"], 404)
        try:
            form = await request.post()
        except (ValueError, web.HTTPException):
            return self._message(lang, "refused_title", t["refused"], 400)
        if not self._form_ok(token, str(form.get("form", ""))):
            return self._message(lang, "refused_title", t["expired"], 403, back=f"/p/{token}")
        list_name = str(form.get("list", ""))
        memberships = await self._memberships(address)
        if memberships and "lang" not in request.query:
            lang = self._lang(request, memberships[0].member.language or memberships[0].settings.language)
            t = TEXTS[lang]
        mine = {m.name: m for m in memberships}
        current = mine.get(list_name)
        if current is None:  # not this member's list (or gone meanwhile): nothing to change
            return self._message(lang, "bad_title", t["bad"], 404, back=f"/p/{token}")
        action = str(form.get("action", "save"))
        if action == "leave":
            return self._render("leave.html", lang, address=address, membership=current,
                                form=self.form_field(token), action=f"/p/{token}", back=f"/p/{token}")
        if action == "leave_confirmed":
            try:
                lst = await self.store.get_list(list_name)
                await self.store.leave(lst.id, address, method="web", detail="preferences page")
            except StoreError:  # the list was removed meanwhile: nothing to leave
                return self._message(lang, "bad_title", t["bad"], 404, back=f"/p/{token}")
            log.info("left on the preferences page list=%s address=%s", list_name, address)
            text = t["left"].format(address=address, title=current.title)
            return self._render("message.html", lang, title=t["left_title"], text=text,
                                back=f"/p/{token}" if len(mine) > 1 else "",
                                join_url=current.join_url)
        return await self._save(request, token, address, current, form, lang)

    async def _save(self, request: web.Request, token: str, address: str, current: Membership,
                    form: Any, lang: str) -> web.Response:
        t = TEXTS[lang]
        member = current.member
        changes: dict[str, Any] = {}
        mode = str(form.get("delivery_mode", member.delivery_mode))
        if mode not in DELIVERY_MODES:
            return self._message(lang, "refused_title", t["refused"], 400, back=f"/p/{token}")
        if mode != member.delivery_mode:
            changes["delivery_mode"] = mode
        for flag in _FLAGS:
            value = form.get(flag) is not None
            if value != getattr(member, flag):
                changes[flag] = value
        language = str(form.get("language", member.language))
        if language not in ("", "pl", "en"):
            return self._message(lang, "refused_title", t["refused"], 400, back=f"/p/{token}")
        if language != member.language:
            changes["language"] = language
        # Delivery status: nomail is the member's own pause; "disabled" is the
        # bounce processor's, and only an explicit "resume" lifts it.
        if member.delivery in ("enabled", "nomail"):
            wanted = "nomail" if form.get("nomail") is not None else "enabled"
            if wanted != member.delivery:
                changes["delivery"] = wanted
        try:
            lst = await self.store.get_list(current.name)
            if changes:
                await self.store.set_member_options(current.name, address, changes, method="web",
                                                    detail="preferences page")
            if member.delivery == "disabled" and form.get("reenable") is not None:
                await self.store.reenable(lst.id, address)
        except StoreError:  # left meanwhile (another tab, a mail command), or the list was removed
            return self._message(lang, "bad_title", t["bad"], 404, back=f"/p/{token}")
        log.info("preferences saved list=%s address=%s changes=%s", current.name, address,
                 ",".join(sorted(changes)) or "-")
        # Post/redirect/get: reloading the result page does not send the form again.
        query = urllib.parse.urlencode({"saved": current.name, **({"lang": lang} if "lang" in request.query else {})})
        raise web.HTTPSeeOther(f"/p/{token}?{query}#list-{current.name}", headers=HEADERS)

    # -- /j/LIST ----------------------------------------------------------------------------

    async def _list(self, name: str) -> tuple[ListRecord, ListSettings] | None:
        try:
            lst = await self.store.get_list(name)
        except (UnknownList, StoreError):
            return None
        return lst, self._settings(lst)

    async def show_join(self, request: web.Request) -> web.Response:
        """GET: the list's join form. Changes nothing."""
        found = await self._list(request.match_info["list"])
        if found is None:
            lang = self._lang(request, "pl")
            return self._message(lang, "no_list_title", TEXTS[lang]["no_list"], 404)
        lst, settings = found
        lang = self._lang(request, settings.language)
        return self._join_page(request, lst, settings, lang)

    def _join_page(self, request: web.Request, lst: ListRecord, settings: ListSettings, lang: str,
                   error: str = "", address: str = "", status: int = 200) -> web.Response:
        t = TEXTS[lang]
        closed = settings.subscription_policy == "closed"
        owner = f"{lst.name}-owner@{self.config.server.domain}"
        return self._render(
            "join.html", lang, status, title=t["join_title"].format(title=settings.title or lst.name),
            description=settings.description, closed=t["join_closed"].format(owner=owner) if closed else "",
            form=self.form_field(f"join:{lst.name}"), error=error, address=address,
            action=self._join_url(lst.name) + (f"?lang={lang}" if "lang" in request.query else ""),
            self_url=self._join_url(lst.name))

    async def join(self, request: web.Request) -> web.Response:
        """POST: mail the address a join confirmation (or a member their settings link)."""
        found = await self._list(request.match_info["list"])
        lang = self._lang(request, found[1].language if found else "pl")
        t = TEXTS[lang]
        if found is None:
            return self._message(lang, "no_list_title", t["no_list"], 404)
        lst, settings = found
        if self._cross_site(request):
            log.info("join POST from another site refused list=%s origin=%s", lst.name,
                     request.headers.get("Origin", "-"))
            return self._message(lang, "refused_title", t["refused"], 403)
        try:
            form = await request.post()
        except (ValueError, web.HTTPException):
            return self._message(lang, "refused_title", t["refused"], 400)
        if not self._form_ok(f"join:{lst.name}", str(form.get("form", ""))):
            return self._message(lang, "refused_title", t["expired"], 403, back=self._join_url(lst.name))
        typed = str(form.get("address", ""))[:320]
        try:
            address = normalize_address(typed)
        except AddressError:
            return self._join_page(request, lst, settings, lang, error=t["bad_address"].format(address=typed),
                                   address=typed, status=400)
        _, text = await self.membership.request_by_web(lst.name, address, language=lang)
        return self._render("message.html", lang, title=t["join_sent_title"], text=text, back="")
