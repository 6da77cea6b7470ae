"""One-click unsubscribe (RFC 8058): member tokens, the per-copy headers, the HTTP listener.

A member's token is an HMAC of the list name and the address under a server
secret (``unsubscribe.secret`` in the state dir, made on first start).
Nothing is stored per message or per member: the listener finds the member
by recomputing the HMAC over the list's members, and rotating the secret
revokes every token at once.

Each personalized copy carries::

    List-Unsubscribe: <https://BASE/u/LIST/TOKEN>, <mailto:LIST-leave+TOKEN@DOMAIN>
    List-Unsubscribe-Post: List-Unsubscribe=One-Click

(the https form and List-Unsubscribe-Post only when ``[web] base_url`` is set,
since RFC 8058 §3.1 requires HTTPS).  A POST to the URL whose body is
``List-Unsubscribe=One-Click`` unsubscribes at once, without cookies or a
confirmation page (§3.2); any other POST gets 400 and the member stays.  A GET
shows a page with a button that POSTs that same body, so link scanners that
fetch every URL unsubscribe nobody.

The same listener serves the confirmation link of a join or leave
(``/c/TOKEN``, in the confirmation mail when ``[web] base_url`` is set): the
other way to confirm besides a reply from the address concerned. GET shows a
button; only its POST confirms (``MembershipStage.confirm_by_link``).  It
also serves a member's preferences page (``/p/TOKEN``) and each list's join
page (``/j/LIST``): listserv.prefs.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import html
import logging
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from aiohttp import web

from listserv import files
from listserv.config import Config
from listserv.errors import ConfigError
from listserv.prefs import PrefsPages
from listserv.settings import effective_settings
from listserv.store import Store

if TYPE_CHECKING:  # membership imports this module for the tokens
    from listserv.membership import MembershipStage

__all__ = ["Tokens", "UnsubscribeListener", "load_secret", "unsubscribe_headers"]

log = logging.getLogger("listserv.unsubscribe")

SECRET_FILE = "unsubscribe.secret"

# RFC 8058 §3.1: List-Unsubscribe-Post carries this key/value pair, and the
# mail program POSTs exactly it as the body (§3.2): anything else is not a
# one-click request (a scanner, a stray form, a replayed URL) and keeps the member.
ONE_CLICK_KEY = "List-Unsubscribe"
ONE_CLICK_VALUE = "One-Click"


def load_secret(state_dir: Path) -> bytes:
    """The server secret; made (32 random bytes, mode 0600) when missing.

    A secret that cannot be read or made stops start-up with a ``ConfigError``
    naming ``[server] state_dir``.
    """
    path = state_dir / SECRET_FILE
    try:
        try:
            return bytes.fromhex(path.read_text().strip())
        except FileNotFoundError:
            pass
        files.private_dir(state_dir)
        try:
            files.write_private(path, secrets.token_bytes(32).hex().encode() + b"\n")
        except FileExistsError:
            pass  # never replace a secret another process just made
        return bytes.fromhex(path.read_text().strip())
    except OSError as exc:
        raise ConfigError(f"cannot read or make the unsubscribe secret {path} ([server] state_dir): "
                          f"{exc.strerror or exc}") from None
    except ValueError:
        raise ConfigError(f"the unsubscribe secret {path} is not hex; delete it to make a new one "
                          "(every unsubscribe link sent so far stops working)") from None


@dataclass(frozen=True, slots=True)
class Tokens:
    secret: bytes

    def token(self, list_name: str, address: str) -> str:
        """28 characters of lower-case base32 (136 bits): fits an address local part."""
        digest = hmac.new(self.secret, f"{list_name}\0{address.lower()}".encode(), hashlib.sha256).digest()
        return base64.b32encode(digest[:17]).decode().rstrip("=").lower()

    def valid(self, list_name: str, address: str, token: str) -> bool:
        return hmac.compare_digest(self.token(list_name, address), token.lower())

    def prefs_token(self, address: str) -> str:
        """The token of a member's preferences page (every list of the address):
        the same HMAC as one-click unsubscribe, under its own label, so neither
        token opens the other."""
        digest = hmac.new(self.secret, f"prefs\0{address.lower()}".encode(), hashlib.sha256).digest()
        return base64.b32encode(digest[:17]).decode().rstrip("=").lower()

    def prefs_valid(self, address: str, token: str) -> bool:
        return hmac.compare_digest(self.prefs_token(address), token.lower())


def unsubscribe_headers(config: Config, tokens: Tokens, list_name: str, address: str) -> list[tuple[str, str]]:
    """The RFC 2369 / RFC 8058 headers of one member's copy."""
    token = tokens.token(list_name, address)
    mailto = f"<mailto:{list_name}-leave+{token}@{config.server.domain}>"
    if not config.web.base_url:
        return [("List-Unsubscribe", mailto)]
    url = f"{config.web.base_url}u/{list_name}/{token}"
    return [("List-Unsubscribe", f"<{url}>, {mailto}"),
            ("List-Unsubscribe-Post", f"{ONE_CLICK_KEY}={ONE_CLICK_VALUE}")]


def unsubscribe_url(config: Config, tokens: Tokens, list_name: str, address: str) -> str:
    token = tokens.token(list_name, address)
    if config.web.base_url:
        return f"{config.web.base_url}u/{list_name}/{token}"
    return f"mailto:{list_name}-leave+{token}@{config.server.domain}"


def prefs_url(config: Config, tokens: Tokens, address: str) -> str:
    """A member's own preferences page, or "" without a web listener."""
    if not config.web.base_url:
        return ""
    return f"{config.web.base_url}p/{tokens.prefs_token(address)}"


async def member_for_token(store: Store, tokens: Tokens, list_name: str, token: str) -> str | None:
    """The member whose token this is, or None (unknown list, old secret, already gone)."""
    try:
        members = await store.members(list_name)
    except Exception:  # noqa: BLE001 - unknown list
        return None
    for member in members:
        if tokens.valid(list_name, member.address, token):
            return member.address
    return None


_FORM_TYPES = ("application/x-www-form-urlencoded", "multipart/form-data")


async def _is_one_click(request: web.Request) -> bool:
    """Does the POST body hold ``List-Unsubscribe=One-Click`` (as a form, url-encoded or multipart)?"""
    if request.content_type not in _FORM_TYPES:
        return False
    try:
        form = await request.post()
    except (ValueError, web.HTTPException):  # a malformed or oversized body
        return False
    values = form.getall(ONE_CLICK_KEY, [])
    return any(isinstance(v, str) and v.strip() == ONE_CLICK_VALUE for v in values)


_PAGE = """<!doctype html>
<html lang="{lang}"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{title}</title>
<style>body{{font-family:system-ui,sans-serif;max-width:32rem;margin:3rem auto;padding:0 1rem;line-height:1.5}}
button{{font-size:1.1rem;padding:.6rem 1.2rem}}</style></head>
<body><h1>{title}</h1><p>{text}</p>{form}</body></html>
"""

_TEXTS = {
    "pl": {
        "ask_title": "Wypisanie z listy", "ask": "Czy wypisać adres {addr} z listy „{list}”?",
        "button": "Wypisz mnie", "done_title": "Wypisano",
        "done": "Adres {addr} został wypisany z listy „{list}”.",
        "bad_title": "Nieważny link", "bad": "Ten link jest nieważny albo adres nie jest już na liście.",
        "confirm_title": "Potwierdzenie", "confirm_join": "Potwierdzić zapis adresu {addr} na listę „{list}”?",
        "confirm_leave": "Potwierdzić wypisanie adresu {addr} z listy „{list}”?", "confirm_button": "Potwierdzam",
        "confirmed_title": "Potwierdzono",
        "bad_confirm": "Ten link jest nieważny: kod wygasł, został już użyty albo nie istnieje.",
        "no_body_title": "Nie wypisano",
        "no_body": "Nie wypisano: brak potwierdzenia „List-Unsubscribe=One-Click” (RFC 8058). "
                   "Otwórz link w przeglądarce i naciśnij przycisk „Wypisz mnie”.",
    },
    "en": {
        "ask_title": "Leave the list", "ask": "Remove {addr} from the list \u201c{list}\u201d?",
        "button": "Unsubscribe", "done_title": "Unsubscribed",
        "done": "{addr} has been removed from the list \u201c{list}\u201d.",
        "bad_title": "Invalid link", "bad": "This link is not valid, or the address is no longer on the list.",
        "confirm_title": "Confirmation", "confirm_join": "Confirm that {addr} joins the list \u201c{list}\u201d?",
        "confirm_leave": "Confirm that {addr} leaves the list \u201c{list}\u201d?", "confirm_button": "Confirm",
        "confirmed_title": "Confirmed",
        "bad_confirm": "This link is not valid: the code has expired, was used already, or does not exist.",
        "no_body_title": "Not unsubscribed",
        "no_body": "Not unsubscribed: the request lacks \u201cList-Unsubscribe=One-Click\u201d (RFC 8058). "
                   "Open the link in a browser and press the \u201cUnsubscribe\u201d button.",
    },
}


class UnsubscribeListener:
    """The aiohttp application of the ``[web]`` listener: ``/u/LIST/TOKEN``, ``/c/TOKEN``, ``/p/TOKEN``, ``/j/LIST``."""

    def __init__(self, config: Config, store: Store, tokens: Tokens,
                 membership: MembershipStage | None = None) -> None:
        self.config = config
        self.store = store
        self.tokens = tokens
        self.membership = membership
        self.app = web.Application()
        self.app.router.add_get("/u/{list}/{token}", self.show)
        self.app.router.add_post("/u/{list}/{token}", self.unsubscribe)
        if membership is not None:
            self.app.router.add_get("/c/{token}", self.show_confirmation)
            self.app.router.add_post("/c/{token}", self.confirm)
            # A member's preferences page and each list's join page (listserv.prefs).
            self.prefs = PrefsPages(config, store, tokens, membership)
            self.prefs.add_routes(self.app)
        self._runner: web.AppRunner | None = None
        self.port = 0

    async def start(self) -> None:
        assert self.config.web.listen is not None
        self._runner = web.AppRunner(self.app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.config.web.listen.host, self.config.web.listen.port)
        try:
            await site.start()
        except OSError as exc:
            await self._runner.cleanup()
            self._runner = None
            raise files.listen_error(self.config.web.listen, "[web] listen", exc) from None
        server = getattr(site, "_server", None)
        sockets = getattr(server, "sockets", None) or []
        self.port = sockets[0].getsockname()[1] if sockets else self.config.web.listen.port

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def _language(self, list_name: str) -> str:
        try:
            lst = await self.store.get_list(list_name)
        except Exception:  # noqa: BLE001
            return "pl"
        return effective_settings(self.config.list_defaults, lst.settings_json).language

    def _page(self, lang: str, title: str, text: str, form: str = "", status: int = 200) -> web.Response:
        body = _PAGE.format(lang=lang, title=html.escape(title), text=html.escape(text), form=form)
        return web.Response(
            text=body, status=status, content_type="text/html", charset="utf-8",
            headers={"Cache-Control": "no-store", "Referrer-Policy": "no-referrer",
                     "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'; form-action 'self'"},
        )

    async def show(self, request: web.Request) -> web.Response:
        """GET: a page with a button; never unsubscribes (link scanners fetch every URL)."""
        list_name, token = request.match_info["list"], request.match_info["token"]
        lang = await self._language(list_name)
        t = _TEXTS.get(lang, _TEXTS["en"])
        address = await member_for_token(self.store, self.tokens, list_name, token)
        if address is None:
            return self._page(lang, t["bad_title"], t["bad"], status=404)
        # The button sends the very body a mail program sends (RFC 8058 §3.1),
        # so one POST handler serves both and nothing else unsubscribes.
        form = (f'<form method="post"><input type="hidden" name="{ONE_CLICK_KEY}" value="{ONE_CLICK_VALUE}">'
                f'<button type="submit">{html.escape(t["button"])}</button></form>')
        return self._page(lang, t["ask_title"], t["ask"].format(addr=address, list=list_name), form)

    async def unsubscribe(self, request: web.Request) -> web.Response:
        """POST (RFC 8058 §3.2, body List-Unsubscribe=One-Click): unsubscribe at once."""
        list_name, token = request.match_info["list"], request.match_info["token"]
        lang = await self._language(list_name)
        t = _TEXTS.get(lang, _TEXTS["en"])
        address = await member_for_token(self.store, self.tokens, list_name, token)
        if address is None:
            return self._page(lang, t["bad_title"], t["bad"], status=404)
        if not await _is_one_click(request):
            log.info("one-click POST without List-Unsubscribe=One-Click refused list=%s address=%s",
                     list_name, address)
            return self._page(lang, t["no_body_title"], t["no_body"], status=400)
        lst = await self.store.get_list(list_name)
        await self.store.leave(lst.id, address, method="web", detail="one-click unsubscribe (RFC 8058)")
        log.info("unsubscribed list=%s address=%s via one-click", list_name, address)
        return self._page(lang, t["done_title"], t["done"].format(addr=address, list=list_name))

    async def show_confirmation(self, request: web.Request) -> web.Response:
        """GET /c/TOKEN, the link in a join or leave confirmation: a page with a button, nothing more."""
        assert self.membership is not None
        found = await self.membership.confirmation_for_link(request.match_info["token"])
        if found is None:
            t = _TEXTS["pl"]
            return self._page("pl", t["bad_title"], t["bad_confirm"], status=404)
        view, tok = found
        lang = view.settings.language
        t = _TEXTS.get(lang, _TEXTS["en"])
        form = f'<form method="post"><button type="submit">{html.escape(t["confirm_button"])}</button></form>'
        text = t[f"confirm_{tok.action}"].format(addr=tok.address, list=view.title)
        return self._page(lang, t["confirm_title"], text, form)

    async def confirm(self, request: web.Request) -> web.Response:
        """POST /c/TOKEN: the join or leave is confirmed (once; the code is then used)."""
        assert self.membership is not None
        token = request.match_info["token"]
        found = await self.membership.confirmation_for_link(token)
        lang = found[0].settings.language if found is not None else "pl"
        t = _TEXTS.get(lang, _TEXTS["en"])
        if request.headers.get("Sec-Fetch-Site", "same-origin") == "cross-site":
            # Only the page's own button confirms; another site cannot make a
            # browser press it for the mailbox's owner.
            return self._page(lang, t["bad_title"], t["bad_confirm"], status=403)
        done, text = await self.membership.confirm_by_link(token)
        if not done:
            return self._page(lang, t["bad_title"], t["bad_confirm"], status=404)
        log.info("confirmed by link list=%s address=%s action=%s", found[0].name if found else "-",
                 found[1].address if found else "-", found[1].action if found else "-")
        return self._page(lang, t["confirmed_title"], text)
