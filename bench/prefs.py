"""Benchmark: how long a member waits for their preferences page, at 10,000 and 50,000 members.

Set-up, per size: a fresh state dir with one list of N members (Polish names)
and a second list the measured member is also on; then the real server,
``python -m listserv serve --config tmp.toml`` with the ``[web]`` listener,
as a subprocess.  A blocking HTTP client on 127.0.0.1 then times, wall clock
from request to the last byte of the page:

* the **first** GET of a member's ``/p/TOKEN`` after start: the server finds
  the token's owner by hashing every member address once (no token is stored);
* **later** GETs of other members' pages (median of 50): a dict lookup and two
  queries;
* a **forged** token's GET after that (median of 5): one query over the
  addresses, no hashing (all seen already), then 404; such queries run at
  most once a second (``prefs.REFRESH_INTERVAL``), so a guesser waits up to
  that long for each 404 (reported apart from the server's work);
* a POST that saves the page's form (median of 20), redirect not followed.

The figure is what a member waits for after clicking the link in a footer.
There is no goal figure in the issue; for orientation, Mailman 3's
Postorius options page needs a login first.

Usage (from the repo root):  python bench/prefs.py [--members 10000,50000]
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

LIST = "energia"
SECOND = "seap"


def _member(i: int, rng: random.Random) -> tuple[str, str, str]:
    return C.member_address(i), f"{rng.choice(C.FIRST)} {rng.choice(C.LAST)}", rng.choice(C.ORGS)


async def _fill(cfg_path: Path, members: int) -> None:
    from listserv.config import load
    from listserv.store import Store

    cfg = load(cfg_path)
    rng = random.Random(7)
    store = await Store.open(cfg.db_path)
    try:
        await store.create_list(LIST, {"title": "Zarządzanie energią w gminie", "personal_footer": True},
                                ["koordynator@pnec.org.pl"])
        await store.create_list(SECOND, {"title": "Planowanie SEAP"}, ["koordynator@pnec.org.pl"])
        await store.add_members(LIST, [_member(i, rng) for i in range(members)])
        await store.add_members(SECOND, [_member(i, rng) for i in range(0, members, 10)])
    finally:
        await store.close()


def _timed_get(url: str) -> tuple[float, int, str]:
    start = time.perf_counter()
    try:
        with urllib.request.urlopen(url) as page:
            body = page.read().decode()
            status = int(page.status)
    except urllib.error.HTTPError as exc:
        body = exc.read().decode()
        status = int(exc.code)
        exc.close()
    return time.perf_counter() - start, status, body


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: object, **kwargs: object) -> None:
        return None


def _timed_post(url: str, fields: dict[str, str]) -> tuple[float, int]:
    request = urllib.request.Request(url, data=urllib.parse.urlencode(fields).encode(), method="POST",
                                     headers={"Content-Type": "application/x-www-form-urlencoded"})
    opener = urllib.request.build_opener(_NoRedirect)
    start = time.perf_counter()
    try:
        with opener.open(request) as response:
            response.read()
            status = int(response.status)
    except urllib.error.HTTPError as exc:
        exc.read()
        status = int(exc.code)
        exc.close()
    return time.perf_counter() - start, status


def _form_field(body: str) -> str:
    marker = 'name="form" value="'
    start = body.index(marker) + len(marker)
    return body[start:body.index('"', start)]


def run(members: int) -> dict[str, float]:
    from listserv.unsubscribe import Tokens, load_secret

    with tempfile.TemporaryDirectory(prefix="listserv-bench-prefs-") as tmp_name:
        tmp = Path(tmp_name)
        web_port = C.free_port()
        mapping = C.config_mapping(tmp, listen_port=C.free_port(), relay_port=None)
        mapping["web"] = {"listen": f"127.0.0.1:{web_port}", "base_url": "https://listy.example.org/"}
        cfg_path = tmp / "listserv.toml"
        cfg_path.write_text(C.to_toml(mapping), encoding="utf-8")
        asyncio.run(_fill(cfg_path, members))
        proc = subprocess.Popen([sys.executable, "-m", "listserv", "serve", "--config", str(cfg_path)],
                                env=C.child_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            C.wait_port(web_port, 60, proc)
            tokens = Tokens(load_secret(tmp / "state"))
            base = f"http://127.0.0.1:{web_port}/p/"
            rng = random.Random(11)
            picks = [C.member_address(rng.randrange(0, members, 10)) for _ in range(51)]
            first, status, body = _timed_get(base + tokens.prefs_token(picks[0]))
            assert status == 200 and "Planowanie SEAP" in body, status
            later = []
            for address in picks[1:]:
                seconds, status, _ = _timed_get(base + tokens.prefs_token(address))
                assert status == 200, status
                later.append(seconds)
            forged = []
            for i in range(5):
                time.sleep(1.05)  # past the once-a-second limit: this times the server's work alone
                seconds, status, _ = _timed_get(base + f"{i:02d}" + "a" * 26)
                assert status == 404, status
                forged.append(seconds)
            tarpit, status, _ = _timed_get(base + "zz" + "a" * 26)  # right after another miss
            assert status == 404, status
            saves = []
            url = base + tokens.prefs_token(picks[0])
            for i in range(20):
                _, _, page = _timed_get(url)
                fields = {"form": _form_field(page), "list": LIST, "action": "save",
                          "delivery_mode": ("each", "digest_mime")[i % 2], "no_dupes": "1"}
                seconds, status = _timed_post(url, fields)
                assert status == 303, status
                saves.append(seconds)
            rss = 0.0
            for line in Path(f"/proc/{proc.pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    rss = int(line.split()[1]) / 1024
            return {"first": first, "later": statistics.median(later), "later_max": max(later),
                    "forged": statistics.median(forged), "tarpit": tarpit, "save": statistics.median(saves), "rss": rss}
        finally:
            proc.terminate()
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--members", default="10000,50000", help="comma-separated list sizes")
    args = parser.parse_args()
    print(C.machine_line())
    print(C.load_line())
    for members in (int(n) for n in args.members.split(",")):
        r = run(members)
        print(f"{members} members: first GET after start {r['first'] * 1000:.1f} ms; "
              f"later GETs median {r['later'] * 1000:.1f} ms (max {r['later_max'] * 1000:.1f}); "
              f"forged token median {r['forged'] * 1000:.1f} ms (the next one within a second waits "
              f"{r['tarpit'] * 1000:.0f} ms); save (POST) median {r['save'] * 1000:.1f} ms; "
              f"server peak RSS {r['rss']:.0f} MB")


if __name__ == "__main__":
    main()
