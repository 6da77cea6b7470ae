"""The archive in a real browser: headless Chromium driven over its DevTools protocol.

The archive (Polish thread, hostile messages) is built into tmp_path and
served on 127.0.0.1 by ``http.server``.  Each page is opened at a 375 px wide
phone viewport; the test fails on any console error, uncaught exception or
JavaScript dialog (every hostile fixture tries ``alert``), and on a page wider
than the viewport.  The static search is run for a Polish word.  Screenshots
go to tmp_path, or to $LISTSERV_SCREENSHOTS when set, to be looked at.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import http.server
import itertools
import json
import os
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from conftest import make_config, require
from listserv import archive
from listserv.rewrite import message_id_hash
from listserv.store import Store
from test_archive import LIST, open_store, put

# Headers in raw windows-1250 bytes, no charset anywhere (an old Outlook): the
# page must read as Polish, without U+FFFD where the charset can be guessed.
RAW_8BIT_HEADERS = (
    "From: Józef Dąbrowski <jozef@gmina-z.example.pl>\r\nTo: seap-planning@lists.example.org\r\n"
    "Subject: Spotkanie w Żyrardowie - ważne, proszę o odpowiedź\r\n"
    "Date: Wed, 15 May 2024 09:00:00 +0200\r\nMessage-ID: <raw8bit.headers@gmina-z.example.pl>\r\n"
    "Content-Type: text/plain\r\n\r\n"
    "Zebranie zespołu ds. SEAP w Żyrardowie, sala nr 5, środa 10:00.\r\n"
    "Proszę o potwierdzenie obecności. Pozdrawiam, Józef Dąbrowski\r\n"
).encode("cp1250")

CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--disable-default-apps", "--disable-extensions", "--hide-scrollbars", "--mute-audio",
    "--remote-debugging-port=0",
]
WIDTH = 375


def chromium_path() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    return ""


class Browser:
    """The few CDP calls the test needs, over one websocket (flat sessions)."""

    def __init__(self, ws: Any) -> None:
        self.ws = ws
        self.ids = itertools.count(1)
        self.pending: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self.events: list[dict[str, Any]] = []
        self.reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        async for raw in self.ws:
            msg = json.loads(raw)
            if "id" in msg and msg["id"] in self.pending:
                self.pending.pop(msg["id"]).set_result(msg)
            else:
                self.events.append(msg)
                if msg.get("method") == "Page.javascriptDialogOpening":  # never leave a dialog blocking the page
                    await self.ws.send(json.dumps({"id": next(self.ids), "sessionId": msg.get("sessionId"),
                                                   "method": "Page.handleJavaScriptDialog",
                                                   "params": {"accept": True}}))

    async def call(self, method: str, session: str | None = None, **params: Any) -> dict[str, Any]:
        ident = next(self.ids)
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self.pending[ident] = fut
        msg: dict[str, Any] = {"id": ident, "method": method, "params": params}
        if session:
            msg["sessionId"] = session
        await self.ws.send(json.dumps(msg))
        reply = await asyncio.wait_for(fut, 30)
        if "error" in reply:
            raise RuntimeError(f"{method}: {reply['error']}")
        return dict(reply.get("result", {}))

    async def wait_event(self, method: str, session: str, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if any(e.get("method") == method and e.get("sessionId") == session for e in self.events):
                return
            await asyncio.sleep(0.05)
        raise TimeoutError(method)


@pytest.fixture
def chromium() -> Iterator[str]:
    path = chromium_path()
    require(bool(path), "chromium is not installed (Debian package chromium)")
    try:
        import websockets  # noqa: F401
    except ImportError:
        require(False, "the websockets package is not installed (pip install websockets)")
    profile = tempfile.mkdtemp(prefix="listserv-chromium-")
    proc = subprocess.Popen([path, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "about:blank"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        port_file = Path(profile) / "DevToolsActivePort"
        deadline = time.monotonic() + 30

        def endpoint() -> list[str]:
            # Chromium writes the port, then the path: the file can be seen half-written.
            try:
                lines = [line.strip() for line in port_file.read_text().split("\n")]
            except FileNotFoundError:
                return []
            return lines[:2] if len(lines) >= 2 and lines[0] and lines[1] else []

        while not endpoint() and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.05)
        lines = endpoint()
        require(bool(lines), "chromium did not start its DevTools endpoint")
        yield f"ws://127.0.0.1:{lines[0]}{lines[1]}"
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
        shutil.rmtree(profile, ignore_errors=True)


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    cfg = make_config(tmp_path)

    async def build() -> None:
        store: Store = await open_store(cfg)
        try:
            await put(store, "pl_iso8859_2.eml", "pl_cp1250.eml", "pl_utf8.eml", "pl_raw8bit.eml",
                      "hostile_subject.eml", "hostile_html.eml", "hostile_attachments.eml", "koi8r.eml",
                      RAW_8BIT_HEADERS)
            info = archive.list_info(cfg, await store.get_list(LIST))
            await archive.build_list(cfg, store, info, workers=1)
            await archive.write_site_indexes(cfg, store)
        finally:
            await store.close()

    asyncio.run(build())
    handler = functools.partial(_QuietHandler, directory=str(cfg.archive.dir))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/", cfg.archive.dir
    finally:
        server.shutdown()
        server.server_close()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


PAGES = {
    "site": "index.html",
    "list": f"{LIST}/index.html",
    "month": f"{LIST}/2024-05/index.html",
    "thread": f"{LIST}/t/{message_id_hash('latin2.1@gmina-a.example.pl')}.html",
    "message": f"{LIST}/m/{message_id_hash('latin2.1@gmina-a.example.pl')}.html",
    "hostile_subject": f"{LIST}/m/{message_id_hash('hostile.7@attacker.example')}.html",
    "hostile_html": f"{LIST}/m/{message_id_hash('hostile.8@attacker.example')}.html",
    "hostile_attachments": f"{LIST}/m/{message_id_hash('hostile.9@attacker.example')}.html",
    "raw8bit_headers": f"{LIST}/m/{message_id_hash('raw8bit.headers@gmina-z.example.pl')}.html",
    "search": f"{LIST}/search.html?q=%C5%81%C3%B3d%C5%BA",  # "Łódź"
}


def test_pages_render_safely_on_a_phone(chromium: str, served: tuple[str, Path], tmp_path: Path) -> None:
    import websockets

    base, _ = served
    shots = Path(os.environ.get("LISTSERV_SCREENSHOTS", tmp_path / "shots"))
    shots.mkdir(parents=True, exist_ok=True)

    async def go() -> dict[str, dict[str, Any]]:
        results: dict[str, dict[str, Any]] = {}
        async with websockets.connect(chromium, max_size=64 * 1024 * 1024) as ws:
            b = Browser(ws)
            for name, path in PAGES.items():
                target = (await b.call("Target.createTarget", url="about:blank"))["targetId"]
                session = (await b.call("Target.attachToTarget", targetId=target, flatten=True))["sessionId"]
                for domain in ("Page", "Runtime", "Log"):
                    await b.call(f"{domain}.enable", session)
                await b.call("Emulation.setDeviceMetricsOverride", session, width=WIDTH, height=800,
                             deviceScaleFactor=1, mobile=True)
                await b.call("Page.navigate", session, url=base + path)
                await b.wait_event("Page.loadEventFired", session)
                if name == "search":  # the script loads the month parts one by one
                    deadline = time.monotonic() + 20
                    while time.monotonic() < deadline:
                        done = await b.call("Runtime.evaluate", session, returnByValue=True,
                                            expression="document.getElementById('status').textContent")
                        if done["result"]["value"].startswith(("Znalezione", "Nic")):
                            break
                        await asyncio.sleep(0.1)
                await asyncio.sleep(0.3)  # let late errors arrive
                probe = await b.call(
                    "Runtime.evaluate", session, returnByValue=True,
                    expression="({scroll: document.documentElement.scrollWidth, inner: window.innerWidth,"
                               " results: document.querySelectorAll('#results li').length,"
                               " status: (document.getElementById('status')||{}).textContent || '',"
                               " title: document.title,"
                               " replacement: (document.body.innerText.match(/\\uFFFD/g) || []).length,"
                               " text: document.body.innerText})",
                )
                shot = await b.call("Page.captureScreenshot", session, format="png")
                (shots / f"{name}.png").write_bytes(base64.b64decode(shot["data"]))
                events = [e for e in b.events if e.get("sessionId") == session]
                results[name] = {
                    "probe": probe["result"]["value"],
                    "errors": [e["params"] for e in events if e["method"] == "Runtime.exceptionThrown"
                               or (e["method"] == "Runtime.consoleAPICalled" and e["params"]["type"] == "error")
                               or (e["method"] == "Log.entryAdded" and e["params"]["entry"]["level"] == "error")],
                    "dialogs": [e["params"] for e in events if e["method"] == "Page.javascriptDialogOpening"],
                }
                await b.call("Target.closeTarget", targetId=target)
            b.reader.cancel()
        return results

    results = asyncio.run(go())
    for name, r in results.items():
        assert not r["dialogs"], (name, r["dialogs"])  # no script from a message ran
        assert not r["errors"], (name, r["errors"])
        assert r["probe"]["scroll"] <= WIDTH, (name, r["probe"])  # no sideways scrolling on a phone
    assert results["search"]["probe"]["results"] >= 1, results["search"]["probe"]
    assert "Termomodernizacja szkoły w Łodzi" in results["thread"]["probe"]["title"]
    raw8 = results["raw8bit_headers"]["probe"]
    assert raw8["title"].startswith("Spotkanie w Żyrardowie - ważne, proszę o odpowiedź"), raw8["title"]
    assert "Józef Dąbrowski" in raw8["text"] and "Zebranie zespołu ds. SEAP w Żyrardowie" in raw8["text"], raw8
    assert raw8["replacement"] == 0, raw8["text"]
