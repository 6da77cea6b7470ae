"""The preferences page (/p/TOKEN) and the join page (/j/LIST), over real HTTP to the real server.

Every request goes to the ``[web]`` listener of a running listserv; the
forms are read out of the served HTML and submitted as a browser would
(application/x-www-form-urlencoded), and the results are read back from the
store and the relay sink.
"""

from __future__ import annotations

import email
import email.policy
import re
import smtplib
import urllib.error
import urllib.parse
import urllib.request
from email.message import EmailMessage
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest

from conftest import DOMAIN, SinkHandler, free_port, make_config

LIST = "finansowanie"
OTHER = "seap"
OWNER = "koordynator@pnec.org.pl"
ANNA = "anna.zolkiewska@gmina-wieliczka.pl"
JAN = "jan.lozinski@nfosigw.example.pl"
BASE = "https://listy.example.org/"


class Forms(HTMLParser):
    """Every <form> of a page: its action and the fields a browser would submit as the page stands."""

    def __init__(self) -> None:
        super().__init__()
        self.forms: list[dict[str, Any]] = []
        self._select: str | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: v or "" for k, v in attrs}
        if tag == "form":
            self.forms.append({"action": a.get("action", ""), "fields": {}, "buttons": [], "checks": [],
                               "radios": {}})
            return
        if not self.forms:
            return
        form = self.forms[-1]
        if tag == "input":
            kind, name = a.get("type", "text"), a.get("name", "")
            if kind == "checkbox":
                form["checks"].append(name)
                if "checked" in a:
                    form["fields"][name] = a.get("value", "on")
            elif kind == "radio":
                form["radios"].setdefault(name, []).append(a.get("value", ""))
                if "checked" in a:
                    form["fields"][name] = a.get("value", "")
            elif name:
                form["fields"][name] = a.get("value", "")
        elif tag == "button" and a.get("name"):
            form["buttons"].append((a["name"], a.get("value", "")))
        elif tag == "select":
            self._select = a.get("name", "")
        elif tag == "option" and self._select and "selected" in a:
            form["fields"][self._select] = a.get("value", "")

    def handle_endtag(self, tag: str) -> None:
        if tag == "select":
            self._select = None


def forms_of(body: str) -> list[dict[str, Any]]:
    parser = Forms()
    parser.feed(body)
    return parser.forms


def get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url) as page:
            return int(page.status), page.read().decode()
    except urllib.error.HTTPError as exc:
        body = exc.read().decode()
        exc.close()
        return int(exc.code), body


class NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


def post(url: str, fields: dict[str, str] | list[tuple[str, str]], **headers: str) -> tuple[int, str, str]:
    """(status, body, Location) of a form POST; redirects are not followed."""
    data = urllib.parse.urlencode(fields).encode()
    request = urllib.request.Request(url, data=data, method="POST",
                                     headers={"Content-Type": "application/x-www-form-urlencoded", **headers})
    opener = urllib.request.build_opener(NoRedirect)
    try:
        with opener.open(request) as response:
            return int(response.status), response.read().decode(), response.headers.get("Location", "")
    except urllib.error.HTTPError as exc:
        body = exc.read().decode()
        location = exc.headers.get("Location", "")
        exc.close()
        return int(exc.code), body, location


@pytest.fixture
def web(tmp_path: Path, sink: tuple[SinkHandler, int], start_server):  # type: ignore[no-untyped-def]
    handler, port = sink
    web_port = free_port()
    config = make_config(tmp_path, port, web={"listen": f"127.0.0.1:{web_port}", "base_url": BASE})
    server = start_server(config)
    server.app.web.prefs.refresh_interval = 0.2  # the tarpit for guessed tokens, shorter for tests
    server.call(server.store.create_list(LIST, {"title": "Finansowanie inwestycji w gminach",
                                                "description": "Źródła finansowania: ELENA, NFOŚiGW, "
                                                               "fundusze europejskie.",
                                                "personal_footer": True}, [OWNER]))
    server.call(server.store.create_list(OTHER, {"title": "Planowanie SEAP"}, [OWNER]))
    server.call(server.store.add_members(LIST, [(ANNA, "Anna Żółkiewska", "Gmina Wieliczka"),
                                                (JAN, "Jan Łoziński", "NFOŚiGW")]))
    server.call(server.store.add_members(OTHER, [(ANNA, "Anna Żółkiewska", "Gmina Wieliczka")]))
    return server, handler, f"http://127.0.0.1:{web_port}"


def member(server, list_name: str, address: str):  # type: ignore[no-untyped-def]
    lst = server.call(server.store.get_list(list_name))
    return server.call(server.store.member(lst.id, address))


def prefs_page(server, local: str, address: str) -> tuple[str, str]:  # type: ignore[no-untyped-def]
    url = f"{local}/p/{server.app.tokens.prefs_token(address)}"
    status, body = get(url)
    assert status == 200, body
    return url, body


def list_form(body: str, list_name: str) -> dict[str, Any]:
    (form,) = [f for f in forms_of(body) if f["fields"].get("list") == list_name]
    return form


def test_the_footer_link_opens_the_members_page_and_get_changes_nothing(web) -> None:  # type: ignore[no-untyped-def]
    server, sink, local = web
    m = EmailMessage()
    m["From"] = f"Jan Łoziński <{JAN}>"
    m["To"] = f"{LIST}@{DOMAIN}"
    m["Subject"] = "Nabór ELENA: termin składania wniosków"
    m["Message-ID"] = "<elena.1@nfosigw.example.pl>"
    m.set_content("Dzień dobry,\nwnioski przyjmujemy do końca stycznia.\n")
    with smtplib.SMTP("127.0.0.1", server.port, timeout=30) as client:
        client.sendmail(JAN, [f"{LIST}@{DOMAIN}"], m.as_bytes(policy=email.policy.SMTP))
    server.drain()
    (copy,) = sink.copies_for(ANNA)
    text = email.message_from_bytes(copy.data, policy=email.policy.default).get_body(("plain",)).get_content()  # type: ignore[attr-defined,union-attr]
    found = re.search(re.escape(BASE) + r"(p/[a-z0-9]{28})", text)
    assert found, text
    before = (member(server, LIST, ANNA), member(server, OTHER, ANNA),
              server.call(server.store.consent_history(LIST, ANNA)))
    for _ in range(2):  # a link scanner, then the member
        status, body = get(f"{local}/{found.group(1)}")
        assert status == 200
        assert "Twoje ustawienia list dyskusyjnych" in body and ANNA in body
        assert "Finansowanie inwestycji w gminach" in body and "Planowanie SEAP" in body
        assert "Źródła finansowania: ELENA, NFOŚiGW" in body
        assert len([f for f in forms_of(body) if f["fields"].get("list")]) == 2
    assert (member(server, LIST, ANNA), member(server, OTHER, ANNA),
            server.call(server.store.consent_history(LIST, ANNA))) == before
    # The page may not be framed or leak its token in a Referer.
    with urllib.request.urlopen(f"{local}/{found.group(1)}") as page:
        assert "frame-ancestors 'none'" in page.headers["Content-Security-Policy"]
        assert page.headers["Referrer-Policy"] == "no-referrer"
        assert page.headers["Cache-Control"] == "no-store"


def test_changing_the_mode_and_options_is_saved_and_recorded(web) -> None:  # type: ignore[no-untyped-def]
    server, _, local = web
    url, body = prefs_page(server, local, ANNA)
    form = list_form(body, LIST)
    assert form["fields"]["delivery_mode"] == "each" and set(form["radios"]["delivery_mode"]) == {
        "each", "digest_mime", "digest_plain", "index"}
    assert "no_dupes" in form["fields"] and "not_me" not in form["fields"]  # the defaults, as shown
    fields = dict(form["fields"], delivery_mode="digest_plain", not_me="1", ack="1", language="en",
                  action="save")
    del fields["no_dupes"]  # unticked: a browser sends nothing
    status, _, location = post(urllib.parse.urljoin(url, form["action"]), fields)
    assert status == 303 and location.startswith(url.removeprefix(local) + "?saved=" + LIST), location
    m = member(server, LIST, ANNA)
    assert (m.delivery_mode, m.not_me, m.ack, m.no_dupes, m.language, m.delivery) == (
        "digest_plain", True, True, False, "en", "enabled")
    assert member(server, OTHER, ANNA).delivery_mode == "each"  # the other list's form was not sent
    event = server.call(server.store.consent_history(LIST, ANNA))[-1]
    assert event.event == "changed" and event.method == "web"
    assert "delivery_mode=digest_plain" in event.detail and "preferences page" in event.detail
    # The page after the redirect says so, in the member's language now (English).
    status, after = get(local + location)
    assert status == 200 and "Settings of the list \u201cFinansowanie inwestycji w gminach\u201d saved." in after
    again = list_form(after, LIST)
    assert again["fields"]["delivery_mode"] == "digest_plain" and again["fields"]["language"] == "en"
    # Pausing delivery (nomail), and back.
    post(urllib.parse.urljoin(url, form["action"]), dict(again["fields"], nomail="1", action="save"))
    assert member(server, LIST, ANNA).delivery == "nomail"
    _, paused = get(url)
    fields = dict(list_form(paused, LIST)["fields"], action="save")
    assert fields.pop("nomail") == "1"
    post(url, fields)
    assert member(server, LIST, ANNA).delivery == "enabled"


def test_a_member_disabled_by_bounces_resumes_only_when_asked(web) -> None:  # type: ignore[no-untyped-def]
    server, _, local = web
    lst = server.call(server.store.get_list(LIST))
    server.call(server.store.set_delivery(lst.id, JAN, "disabled"))
    url, body = prefs_page(server, local, JAN)
    assert "wracały jako niedoręczone" in body
    form = list_form(body, LIST)
    assert "reenable" in form["checks"] and "nomail" not in form["checks"]
    post(url, dict(form["fields"], action="save"))  # saving other options leaves it disabled
    assert member(server, LIST, JAN).delivery == "disabled"
    post(url, dict(form["fields"], reenable="1", action="save"))
    assert member(server, LIST, JAN).delivery == "enabled"


def test_leaving_asks_once_more_then_leaves(web) -> None:  # type: ignore[no-untyped-def]
    server, _, local = web
    url, body = prefs_page(server, local, ANNA)
    form = list_form(body, OTHER)
    assert ("action", "leave") in form["buttons"]
    status, ask, _ = post(url, dict(form["fields"], action="leave"))
    assert status == 200 and "Czy na pewno wypisać adres" in ask and "„Planowanie SEAP”" in ask
    assert member(server, OTHER, ANNA) is not None  # asking is not leaving
    (confirm,) = forms_of(ask)
    assert ("action", "leave_confirmed") in confirm["buttons"]
    status, done, _ = post(url, dict(confirm["fields"], action="leave_confirmed"))
    assert status == 200 and "został wypisany z listy „Planowanie SEAP”" in done
    assert member(server, OTHER, ANNA) is None and member(server, LIST, ANNA) is not None
    history = server.call(server.store.consent_history(OTHER, ANNA))
    assert (history[-1].event, history[-1].method) == ("left", "web")
    assert "/j/seap" in done  # the way back
    # Her page now shows the one list she is still on.
    _, now = get(url)
    assert "Planowanie SEAP" not in now and "Finansowanie inwestycji w gminach" in now


def test_forged_and_other_members_tokens_are_refused(web) -> None:  # type: ignore[no-untyped-def]
    server, _, local = web
    url, body = prefs_page(server, local, ANNA)
    anna_form = list_form(body, OTHER)
    before = member(server, OTHER, ANNA)
    for bad in ("a" * 28, server.app.tokens.prefs_token(ANNA)[:-1] + "x", "short",
                server.app.tokens.token(LIST, ANNA)):  # her one-click token does not open the page
        assert get(f"{local}/p/{bad}")[0] == 404, bad
        assert post(f"{local}/p/{bad}", dict(anna_form["fields"], delivery_mode="index"))[0] == 404, bad
    # Jan's own page and form field cannot change Anna's list (he is not on it).
    jan_url, jan_body = prefs_page(server, local, JAN)
    jan_form = list_form(jan_body, LIST)
    status, _, _ = post(jan_url, dict(jan_form["fields"], list=OTHER, delivery_mode="index", action="save"))
    assert status == 404
    # ... nor does Anna's form field work under Jan's token, or Jan's under hers.
    assert post(jan_url, dict(anna_form["fields"], list=LIST, action="save"))[0] == 403
    assert post(url, dict(jan_form["fields"], list=OTHER, delivery_mode="index", action="save"))[0] == 403
    assert member(server, OTHER, ANNA) == before
    # A member who has left everything: the link is dead.
    for name in (LIST, OTHER):
        lst = server.call(server.store.get_list(name))
        server.call(server.store.leave(lst.id, ANNA, method="cli", detail="test"))
    assert get(url)[0] == 404


def test_a_member_who_joined_a_moment_ago_is_found_at_once_after_a_miss(web) -> None:  # type: ignore[no-untyped-def]
    server, _, local = web
    prefs_page(server, local, ANNA)  # every address so far is known
    assert get(f"{local}/p/{'b' * 28}")[0] == 404  # a guess: the addresses were read again just now
    newcomer = "ewa.dabrowska@gmina-zabki.pl"
    server.call(server.store.add_members(LIST, [(newcomer, "Ewa Dąbrowska", "")]))
    status, body = get(f"{local}/p/{server.app.tokens.prefs_token(newcomer)}")  # waits out the interval
    assert status == 200 and newcomer in body


def test_a_post_from_another_site_or_without_the_pages_field_changes_nothing(web) -> None:  # type: ignore[no-untyped-def]
    server, _, local = web
    url, body = prefs_page(server, local, ANNA)
    form = list_form(body, LIST)
    change = dict(form["fields"], delivery_mode="index", action="save")
    before = (member(server, LIST, ANNA), len(server.call(server.store.consent_history(LIST, ANNA))))
    refused = [
        ({"Sec-Fetch-Site": "cross-site"}, change),
        ({"Sec-Fetch-Site": "same-site", "Origin": "https://inna.listy.example.org"}, change),
        ({"Origin": "https://evil.example"}, change),
        ({"Origin": "null"}, change),  # a sandboxed frame elsewhere
        ({"Origin": "null", "Sec-Fetch-Site": "cross-site"}, change),
        ({}, {k: v for k, v in change.items() if k != "form"}),  # the token alone is not enough
        ({}, dict(change, form="1700000000." + "0" * 32)),  # a made-up field
        ({}, dict(change, form=change["form"].split(".")[0] + "." + "f" * 32)),
        ({}, dict(change, action="leave_confirmed", form="")),
    ]
    for headers, fields in refused:
        status, page, _ = post(url, fields, **headers)
        assert status == 403, (headers, status)
        assert "Odmowa" in page
    assert (member(server, LIST, ANNA), len(server.call(server.store.consent_history(LIST, ANNA)))) == before
    # The page's own origin (as the browser sends it behind the proxy, or on the listener) is fine.
    for headers in ({"Origin": "https://listy.example.org", "Sec-Fetch-Site": "same-origin"},
                    {"Origin": local}, {"Origin": "null", "Sec-Fetch-Site": "same-origin"}):
        status, _, _ = post(url, change, **headers)
        assert status == 303, headers
    assert member(server, LIST, ANNA).delivery_mode == "index"


def test_an_old_form_is_refused_with_a_way_back(web) -> None:  # type: ignore[no-untyped-def]
    server, _, local = web
    url, body = prefs_page(server, local, ANNA)
    prefs = server.app.web.prefs
    token = server.app.tokens.prefs_token(ANNA)
    old = prefs.form_field(token, now=prefs.clock() - 3 * 86400)
    status, page, _ = post(url, dict(list_form(body, LIST)["fields"], form=old, delivery_mode="index"))
    assert status == 403 and "Odśwież stronę" in page
    assert member(server, LIST, ANNA).delivery_mode == "each"


def test_the_join_page_mails_a_confirmation_and_subscribes_nobody(web) -> None:  # type: ignore[no-untyped-def]
    server, sink, local = web
    stranger = "zofia.wojcik@gmina-zabki.pl"
    status, page = get(f"{local}/j/{LIST}")
    assert status == 200 and "Zapis na listę „Finansowanie inwestycji w gminach”" in page
    (form,) = forms_of(page)
    status, answer, _ = post(f"{local}{form['action']}", dict(form["fields"], address=f"  {stranger.upper()} "))
    assert status == 200 and f"Jeśli adres {stranger} może zapisać się na listę" in answer
    assert member(server, LIST, stranger) is None
    server.drain()
    (confirmation,) = sink.copies_for(stranger)
    msg = email.message_from_bytes(confirmation.data, policy=email.policy.default)
    assert re.search(r"/c/[a-z0-9]+", msg.get_content())  # type: ignore[attr-defined]
    assert member(server, LIST, stranger) is None  # only her confirmation subscribes her
    # A member's address gets the same answer on the page, and their settings link by mail.
    status, same, _ = post(f"{local}{form['action']}", dict(form["fields"], address=JAN))
    assert status == 200 and f"Jeśli adres {JAN} może zapisać się na listę" in same
    server.drain()
    (link_mail,) = sink.copies_for(JAN)
    assert f"{BASE}p/{server.app.tokens.prefs_token(JAN)}" in email.message_from_bytes(
        link_mail.data, policy=email.policy.default).get_content()  # type: ignore[attr-defined]
    # Not an address: the form again, with the reason, and nothing mailed.
    status, bad, _ = post(f"{local}{form['action']}", dict(form["fields"], address="zofia(at)gmina"))
    assert status == 400 and "To nie jest poprawny adres e-mail" in bad and forms_of(bad)
    # From another site, or without the page's field: refused.
    assert post(f"{local}{form['action']}", dict(form["fields"], address="x@evil.example"),
                **{"Sec-Fetch-Site": "cross-site"})[0] == 403
    assert post(f"{local}{form['action']}", {"address": "x@evil.example"})[0] == 403
    server.drain()
    assert sink.copies_for("x@evil.example") == []
    assert get(f"{local}/j/nie-ma-takiej")[0] == 404
    # The English page.
    status, english = get(f"{local}/j/{LIST}?lang=en")
    assert status == 200 and "Join the list \u201cFinansowanie inwestycji w gminach\u201d" in english


def test_the_join_page_keeps_to_the_mail_limits(web) -> None:  # type: ignore[no-untyped-def]
    server, sink, local = web
    stranger = "piotr.nowak@gmina-zabki.pl"
    _, page = get(f"{local}/j/{LIST}")
    (form,) = forms_of(page)
    for _ in range(6):  # someone pressing the button again and again
        assert post(f"{local}{form['action']}", dict(form["fields"], address=stranger))[0] == 200
    server.drain()
    # The same caps as LIST-join by mail: one open confirmation per address and list.
    print("copies", len(sink.copies_for(stranger)))
    assert len(sink.copies_for(stranger)) < 6


def test_a_closed_list_shows_no_form(web) -> None:  # type: ignore[no-untyped-def]
    server, _, local = web
    server.call(server.store.set_list_setting(OTHER, "subscription_policy", "closed"))
    status, page = get(f"{local}/j/{OTHER}")
    assert status == 200 and "zapisują tylko jej właściciele" in page and f"{OTHER}-owner@{DOMAIN}" in page
    assert forms_of(page) == []


def test_a_list_removed_while_the_page_was_open_is_a_clear_404(web) -> None:  # type: ignore[no-untyped-def]
    server, _, local = web
    url, body = prefs_page(server, local, ANNA)
    form = list_form(body, OTHER)
    server.call(server.store.remove_list(OTHER))
    for action in ("save", "leave_confirmed"):
        status, page, _ = post(url, dict(form["fields"], action=action))
        assert status == 404 and "Nieważny link" in page, (action, status)
    assert member(server, LIST, ANNA) is not None  # her other list is untouched
