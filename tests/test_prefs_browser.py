"""The preferences and join pages in headless Chromium, at a phone's 375 px and a desktop's 1280 px.

A real browser, driven over its DevTools protocol (the fixture and client of
test_archive_browser), uses the pages of a running listserv as a member would:
change the delivery mode, leave a list, ask to join.  It is also the
attacker: a page on another origin with a form aimed at the member's page,
submitted by the browser with the browser's own headers, must change nothing.
Screenshots go to $LISTSERV_SCREENSHOTS (or tmp_path), to be looked at.
"""

from __future__ import annotations

import asyncio
import base64
import http.server
import json
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from conftest import free_port
from test_archive_browser import Browser, chromium  # noqa: F401 - the fixture
from test_prefs import ANNA, LIST, OTHER, member, web  # noqa: F401 - the fixture

WIDTHS = (375, 1280)


class Page:
    """One tab at one width."""

    def __init__(self, browser: Browser, session: str, target: str, width: int) -> None:
        self.b, self.session, self.target, self.width = browser, session, target, width

    @classmethod
    async def open(cls, browser: Browser, width: int) -> Page:
        target = (await browser.call("Target.createTarget", url="about:blank"))["targetId"]
        session = (await browser.call("Target.attachToTarget", targetId=target, flatten=True))["sessionId"]
        for domain in ("Page", "Runtime", "Log"):
            await browser.call(f"{domain}.enable", session)
        await browser.call("Emulation.setDeviceMetricsOverride", session, width=width, height=900,
                           deviceScaleFactor=1, mobile=width < 600)
        return cls(browser, session, target, width)

    async def _loaded(self, action: Any) -> None:
        self.b.events = [e for e in self.b.events if e.get("sessionId") != self.session]
        await action
        await self.b.wait_event("Page.loadEventFired", self.session)

    async def go(self, url: str) -> None:
        await self._loaded(self.b.call("Page.navigate", self.session, url=url))

    async def js(self, expression: str) -> Any:
        reply = await self.b.call("Runtime.evaluate", self.session, expression=expression, returnByValue=True)
        return reply["result"].get("value")

    async def click(self, selector: str) -> None:
        """Press a button as the member would; the page it leads to is loaded before this returns."""
        await self._loaded(self.js(f"document.querySelector({json.dumps(selector)}).click()"))

    async def probe(self) -> dict[str, Any]:
        return dict(await self.js("({scroll: document.documentElement.scrollWidth, inner: window.innerWidth,"
                                  " text: document.body.innerText, title: document.title})"))

    async def shot(self, folder: Path, name: str) -> None:
        data = (await self.b.call("Page.captureScreenshot", self.session, format="png",
                                  captureBeyondViewport=True))["data"]
        (folder / f"{name}-{self.width}.png").write_bytes(base64.b64decode(data))

    def errors(self) -> list[Any]:
        return [e["params"] for e in self.b.events if e.get("sessionId") == self.session and (
            e["method"] == "Runtime.exceptionThrown"
            or (e["method"] == "Log.entryAdded" and e["params"]["entry"]["level"] == "error"
                and "403" not in e["params"]["entry"].get("text", "")))]


@pytest.fixture
def attacker() -> Iterator[tuple[str, dict[str, str]]]:
    """Another origin (http://localhost:PORT), serving whatever page the test puts in its dict."""
    pages: dict[str, str] = {}

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = pages.get(self.path, "").encode()
            self.send_response(200 if body else 404)
            self.send_header("Content-Type", "text/html; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    port = free_port()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", port), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://localhost:{port}", pages
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize("width", WIDTHS)
def test_member_changes_mode_and_leaves_in_a_browser(chromium: str, web, attacker, width: int,  # noqa: F811
                                                     tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    import websockets

    server, sink, local = web
    evil, evil_pages = attacker
    shots = Path(os.environ.get("LISTSERV_SCREENSHOTS", tmp_path / "shots"))
    shots.mkdir(parents=True, exist_ok=True)
    url = f"{local}/p/{server.app.tokens.prefs_token(ANNA)}"
    # The attacker knows her link (a forwarded mail) and aims a form at it.
    evil_pages["/"] = (f'<!doctype html><form method="post" action="{url}">'
                       f'<input name="list" value="{LIST}"><input name="delivery_mode" value="index">'
                       '<input name="action" value="save"><button id="go">Wygraj nagrodę</button></form>')

    async def go() -> dict[str, Any]:
        seen: dict[str, Any] = {}
        async with websockets.connect(chromium, max_size=64 * 1024 * 1024) as ws:
            b = Browser(ws)
            page = await Page.open(b, width)
            await page.go(url)
            seen["page"] = await page.probe()
            await page.shot(shots, "prefs")
            # Digest (MIME) and "not my own posts" on the first list, then Save.
            await page.js(f"document.querySelector('#list-{LIST} input[value=digest_mime]').click();"
                          f"document.querySelector('#list-{LIST} input[name=not_me]').click()")
            await page.click(f"#list-{LIST} button[value=save]")
            seen["saved"] = await page.probe()
            await page.shot(shots, "prefs-saved")
            # Leave the second list: asked once more, then done.
            await page.click(f"#list-{OTHER} button[value=leave]")
            seen["ask"] = await page.probe()
            await page.shot(shots, "prefs-leave")
            await page.click("button[value=leave_confirmed]")
            seen["left"] = await page.probe()
            await page.shot(shots, "prefs-left")
            # The join page, in the browser: her colleague asks to join.
            await page.go(f"{local}/j/{LIST}")
            seen["join"] = await page.probe()
            await page.shot(shots, "join")
            await page.js("document.getElementById('address').value = 'zofia.wojcik@gmina-zabki.pl'")
            await page.click("form button[type=submit]")
            seen["joined"] = await page.probe()
            await page.shot(shots, "join-sent")
            seen["errors"] = page.errors()
            # The attacker's page: the browser submits the form with its own headers.
            await page.go(evil + "/")
            await page.click("#go")
            seen["evil"] = await page.probe()
            await b.call("Target.closeTarget", targetId=page.target)
            b.reader.cancel()
        return seen

    seen = asyncio.run(go())
    assert not seen["errors"], seen["errors"]
    for name in ("page", "saved", "ask", "left", "join", "joined"):
        assert seen[name]["scroll"] <= width, (name, seen[name])  # no sideways scrolling
    text = seen["page"]["text"]
    assert "Twoje ustawienia list dyskusyjnych" in text and "Finansowanie inwestycji w gminach" in text
    assert "Źródła finansowania: ELENA, NFOŚiGW" in text and "Przegląd (skrót)" in text
    assert "Zapisano ustawienia listy „Finansowanie inwestycji w gminach”." in seen["saved"]["text"]
    m = member(server, LIST, ANNA)
    assert (m.delivery_mode, m.not_me) == ("digest_mime", True)
    assert "Czy na pewno wypisać adres" in seen["ask"]["text"]
    assert "został wypisany z listy „Planowanie SEAP”" in seen["left"]["text"]
    assert member(server, OTHER, ANNA) is None
    assert "Zapis na listę" in seen["join"]["text"]
    assert "Jeśli adres zofia.wojcik@gmina-zabki.pl może zapisać się" in seen["joined"]["text"]
    assert member(server, LIST, "zofia.wojcik@gmina-zabki.pl") is None
    # The cross-site form was refused: her mode is what she chose, not the attacker's.
    assert "Odmowa" in seen["evil"]["text"]
    assert member(server, LIST, ANNA).delivery_mode == "digest_mime"
    server.drain()
    assert len(sink.copies_for("zofia.wojcik@gmina-zabki.pl")) == 1  # the confirmation, nothing more
