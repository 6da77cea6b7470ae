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
since RFC 8058 §3.1 requires HTTPS).  A POST to the URL unsubscribes at once,
without cookies or a confirmation page (§3.2); a GET shows a page with a
button, so link scanners that fetch every URL unsubscribe nobody.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import html
import logging
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

from aiohttp import web

from listserv.config import Config
from listserv.settings import effective_settings
from listserv.store import Store

__all__ = ["Tokens", "UnsubscribeListener", "load_secret", "unsubscribe_headers"]

log = logging.getLogger("listserv.unsubscribe")

SECRET_FILE = "unsubscribe.secret"


def load_secret(state_dir: Path) -> bytes:
    """The server secret; made (32 random bytes, mode 0600) when missing."""
    path = state_dir / SECRET_FILE
    try:
        return bytes.fromhex(path.read_text().strip())
    except FileNotFoundError:
        pass
    state_dir.mkdir(parents=True, exist_ok=True)
    secret = secrets.token_bytes(32)
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(secret.hex() + "\n")
    try:
        os.link(tmp, path)  # never replace a secret another process just made
    except FileExistsError:
        pass
    os.unlink(tmp)
    return bytes.fromhex(path.read_text().strip())


@dataclass(frozen=True, slots=True)
class Tokens:
    secret: bytes

    def token(self, list_name: str, address: str) -> str:
        """26 characters of lower-case base32 (130 bits): fits an address local part."""
        digest = hmac.new(self.secret, f"{list_name}\0{address.lower()}".encode(), hashlib.sha256).digest()
        return base64.b32encode(digest[:17]).decode().rstrip("=").lower()

    def valid(self, list_name: str, address: str, token: str) -> bool:
        return hmac.compare_digest(self.token(list_name, address), token.lower())


def unsubscribe_headers(config: Config, tokens: Tokens, list_name: str, address: str) -> list[tuple[str, str]]:
    """The RFC 2369 / RFC 8058 headers of one member's copy."""
    token = tokens.token(list_name, address)
    mailto = f"<mailto:{list_name}-leave+{token}@{config.server.domain}>"
    if not config.web.base_url:
        return [("List-Unsubscribe", mailto)]
    url = f"{config.web.base_url}u/{list_name}/{token}"
    return [("List-Unsubscribe", f"<{url}>, {mailto}"),
            ("List-Unsubscribe-Post", "List-Unsubscribe=One-Click")]


def unsubscribe_url(config: Config, tokens: Tokens, list_name: str, address: str) -> str:
    token = tokens.token(list_name, address)
    if config.web.base_url:
        return f"{config.web.base_url}u/{list_name}/{token}"
    return f"mailto:{list_name}-leave+{token}@{config.server.domain}"


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
    },
    "en": {
        "ask_title": "Leave the list", "ask": "Remove {addr} from the list \u201c{list}\u201d?",
        "button": "Unsubscribe", "done_title": "Unsubscribed",
        "done": "{addr} has been removed from the list \u201c{list}\u201d.",
        "bad_title": "Invalid link", "bad": "This link is not valid, or the address is no longer on the list.",
    },
}


class UnsubscribeListener:
    """The aiohttp application for ``/u/LIST/TOKEN``."""

    def __init__(self, config: Config, store: Store, tokens: Tokens) -> None:
        self.config = config
        self.store = store
        self.tokens = tokens
        self.app = web.Application()
        self.app.router.add_get("/u/{list}/{token}", self.show)
        self.app.router.add_post("/u/{list}/{token}", self.unsubscribe)
        self._runner: web.AppRunner | None = None
        self.port = 0

    async def start(self) -> None:
        assert self.config.web.listen is not None
        self._runner = web.AppRunner(self.app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.config.web.listen.host, self.config.web.listen.port)
        await site.start()
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
        form = (f'<form method="post"><input type="hidden" name="List-Unsubscribe" value="One-Click">'
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
        lst = await self.store.get_list(list_name)
        await self.store.leave(lst.id, address, method="web", detail="one-click unsubscribe (RFC 8058)")
        log.info("unsubscribed list=%s address=%s via one-click", list_name, address)
        return self._page(lang, t["done_title"], t["done"].format(addr=address, list=list_name))
