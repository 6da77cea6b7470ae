"""Mail that arrives and can be trusted, end to end: one-click unsubscribe, ARC, forged senders."""

from __future__ import annotations

import asyncio
import email
import email.policy
import re
import smtplib
import urllib.error
import urllib.request
from email.message import EmailMessage
from pathlib import Path

import dkim as dkimpy
import pytest

from conftest import DOMAIN, SinkHandler, committed, dkim_dnsfunc, free_port, make_config, verify_with_perl
from listserv import dkim
from listserv.dns import DictResolver

LIST = "financing"
OWNER = "koordynator@pnec.org.pl"
ANNA = "anna@gmina-wieliczka.pl"
JAN = "jan@nfosigw.example.pl"


def post(frm: str = ANNA, subject: str = "Nabór ELENA 2027", msgid: str = "p1@gmina-wieliczka.pl") -> bytes:
    m = EmailMessage()
    m["From"] = f"Anna Kowalska <{frm}>"
    m["To"] = f"{LIST}@{DOMAIN}"
    m["Subject"] = subject
    m["Message-ID"] = f"<{msgid}>"
    m["Date"] = "Thu, 26 Nov 2026 10:00:00 +0100"
    m.set_content("Dzień dobry,\nnabór ELENA rusza w styczniu. Szczegóły w załączniku.\n")
    return m.as_bytes(policy=email.policy.SMTP)


def send(port: int, mail_from: str, rcpt: str, data: bytes) -> None:
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
        client.sendmail(mail_from, [rcpt], data)


def parsed(data: bytes) -> email.message.EmailMessage:
    return email.message_from_bytes(data, policy=email.policy.default)  # type: ignore[return-value]


def dkim_tags(data: bytes) -> dict[str, str]:
    header = parsed(data)["DKIM-Signature"]
    return {k.strip(): v.strip() for k, _, v in (t.partition("=") for t in re.sub(r"\s+", "", str(header)).split(";"))}


@pytest.fixture
def web_server(tmp_path: Path, sink: tuple[SinkHandler, int], start_server):  # type: ignore[no-untyped-def]
    handler, port = sink
    web_port = free_port()
    config = make_config(tmp_path, port, web={"listen": f"127.0.0.1:{web_port}",
                                              "base_url": "https://listy.example.org/"})
    server = start_server(config)
    server.call(server.store.create_list(LIST, {"title": "Finansowanie", "personal_footer": True}, [OWNER]))
    server.call(server.store.add_members(LIST, [(ANNA, "", ""), (JAN, "", "")]))
    return server, handler, web_port


def test_one_click_headers_are_signed_and_post_unsubscribes_get_does_not(web_server, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    server, sink, web_port = web_server
    send(server.port, ANNA, f"{LIST}@{DOMAIN}", post())
    server.drain()
    (copy,) = sink.copies_for(JAN)
    msg = parsed(copy.data)
    token = server.app.tokens.token(LIST, JAN)
    url = f"https://listy.example.org/u/{LIST}/{token}"
    assert msg["List-Unsubscribe"] == f"<{url}>, <mailto:{LIST}-leave+{token}@{DOMAIN}>"
    assert msg["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
    signed = dkim_tags(copy.data)["h"].split(":")
    assert "list-unsubscribe" in signed and "list-unsubscribe-post" in signed  # RFC 8058 §4
    assert url in msg.get_body(("plain",)).get_content()  # type: ignore[union-attr]
    assert dkimpy.verify(copy.data, dnsfunc=dkim_dnsfunc(server.key))
    assert verify_with_perl(copy.data, server.key, tmp_path).returncode == 0

    local = f"http://127.0.0.1:{web_port}/u/{LIST}/{token}"
    # A link scanner's GET shows a page with a button and unsubscribes nobody.
    with urllib.request.urlopen(local) as page:
        body = page.read().decode()
    assert "<form method=\"post\">" in body and JAN in body
    assert server.call(server.store.member(1, JAN)) is not None
    # The mail program's POST (RFC 8058 §3.2) unsubscribes at once.
    request = urllib.request.Request(local, data=b"List-Unsubscribe=One-Click", method="POST",
                                     headers={"Content-Type": "application/x-www-form-urlencoded"})
    with urllib.request.urlopen(request) as done:
        assert done.status == 200
    assert server.call(server.store.member(1, JAN)) is None
    history = server.call(server.store.consent_history(LIST, JAN))
    assert history[-1].event == "left" and history[-1].method == "web"
    # The same token again, or a made-up one: refused.
    for bad in (local, f"http://127.0.0.1:{web_port}/u/{LIST}/{'a' * 26}"):
        with pytest.raises(urllib.error.HTTPError) as exc:
            urllib.request.urlopen(urllib.request.Request(bad, data=b"List-Unsubscribe=One-Click", method="POST"))
        assert exc.value.code == 404
        exc.value.close()


def _post(url: str, body: bytes | None, content_type: str = "application/x-www-form-urlencoded") -> int:
    request = urllib.request.Request(url, data=body if body is not None else b"", method="POST",
                                     headers={"Content-Type": content_type})
    try:
        with urllib.request.urlopen(request) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        exc.close()
        return int(exc.code)


def test_one_click_post_without_the_rfc_8058_body_keeps_the_member(web_server) -> None:  # type: ignore[no-untyped-def]
    server, _, web_port = web_server
    local = f"http://127.0.0.1:{web_port}/u/{LIST}/{server.app.tokens.token(LIST, JAN)}"
    # RFC 8058 §3.1/§3.2: only the body List-Unsubscribe=One-Click is a one-click request.
    for body, ctype in ((None, "application/x-www-form-urlencoded"),
                        (b"List-Unsubscribe=Yes", "application/x-www-form-urlencoded"),
                        (b"unsubscribe=One-Click", "application/x-www-form-urlencoded"),
                        (b"List-Unsubscribe=One-Click", "text/plain")):
        assert _post(local, body, ctype) == 400, body
        assert server.call(server.store.member(1, JAN)) is not None, body
    assert server.call(server.store.consent_history(LIST, JAN))[-1].event != "left"
    # multipart/form-data, as some mail programs send it, is the same request.
    boundary = "granica-zażółć".encode().hex()
    multipart = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"List-Unsubscribe\"\r\n\r\n"
                 f"One-Click\r\n--{boundary}--\r\n").encode()
    assert _post(local, multipart, f"multipart/form-data; boundary={boundary}") == 200
    assert server.call(server.store.member(1, JAN)) is None


def test_the_pages_button_sends_the_one_click_body(web_server) -> None:  # type: ignore[no-untyped-def]
    import urllib.parse
    from html.parser import HTMLParser

    server, _, web_port = web_server
    local = f"http://127.0.0.1:{web_port}/u/{LIST}/{server.app.tokens.token(LIST, ANNA)}"
    with urllib.request.urlopen(local) as page:
        body = page.read().decode()

    class Form(HTMLParser):
        fields: list[tuple[str, str]] = []

        def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
            a = dict(attrs)
            if tag == "input" and a.get("name"):
                self.fields.append((str(a["name"]), str(a.get("value") or "")))

    form = Form()
    form.feed(body)
    # What a browser submits for that form (application/x-www-form-urlencoded).
    assert _post(local, urllib.parse.urlencode(form.fields).encode()) == 200
    assert server.call(server.store.member(1, ANNA)) is None


def test_mailto_token_unsubscribes_without_a_round_trip_and_a_bad_one_is_refused(web_server) -> None:  # type: ignore[no-untyped-def]
    server, sink, _ = web_server
    token = server.app.tokens.token(LIST, JAN)
    bad = f"{LIST}-leave+{'b' * 26}@{DOMAIN}"
    send(server.port, JAN, bad, b"From: jan@nfosigw.example.pl\r\nSubject: unsubscribe\r\n\r\n")
    server.drain()
    assert server.call(server.store.member(1, JAN)) is not None
    assert "nieważny" in parsed(sink.copies_for(JAN)[-1].data).get_content()
    good = f"{LIST}-leave+{token}@{DOMAIN}"
    send(server.port, JAN, good, b"From: jan@nfosigw.example.pl\r\nSubject: unsubscribe\r\n\r\n")
    server.drain()
    assert server.call(server.store.member(1, JAN)) is None
    assert parsed(sink.copies_for(JAN)[-1].data)["Subject"].startswith("Wypisano")


def test_a_rotated_secret_revokes_every_token(tmp_path: Path) -> None:
    from listserv.unsubscribe import Tokens, load_secret

    first = Tokens(load_secret(tmp_path))
    assert Tokens(load_secret(tmp_path)).token(LIST, JAN) == first.token(LIST, JAN)  # kept across restarts
    (tmp_path / "unsubscribe.secret").unlink()
    assert not Tokens(load_secret(tmp_path)).valid(LIST, JAN, first.token(LIST, JAN))
    assert (tmp_path / "unsubscribe.secret").stat().st_mode & 0o777 == 0o600


@pytest.mark.parametrize("settings", [{"personalize": False}, {}], ids=["batched", "defaults-personal-headers"])
def test_posts_are_arc_sealed_once_and_verify(tmp_path: Path, sink, start_server, settings) -> None:  # type: ignore[no-untyped-def]
    handler, port = sink
    server = start_server(make_config(tmp_path, port))
    server.call(server.store.create_list(LIST, settings, [OWNER]))
    server.call(server.store.add_members(LIST, [(ANNA, "", ""), (JAN, "", "")]))
    send(server.port, ANNA, f"{LIST}@{DOMAIN}", post())
    server.drain()
    seals = set()
    for rcpt in (ANNA, JAN, OWNER):
        (copy,) = handler.copies_for(rcpt)
        msg = parsed(copy.data)
        assert msg["ARC-Seal"] and "i=1" in str(msg["ARC-Seal"]) and "cv=none" in str(msg["ARC-Seal"])
        seals.add(str(msg["ARC-Seal"]))
        assert dkimpy.verify(copy.data, dnsfunc=dkim_dnsfunc(server.key))
        result, _, reason = dkimpy.arc_verify(copy.data, dnsfunc=dkim_dnsfunc(server.key))
        assert result == b"pass", reason
        perl = verify_with_perl(copy.data, server.key, tmp_path, arc=True)
        assert perl.returncode == 0, perl.stdout + perl.stderr
    assert len(seals) == 1  # sealed once per post, before the per-recipient headers


# -- forged and genuine member posts ------------------------------------------------------------------


@pytest.fixture
def member_domain_key(tmp_path: Path) -> dkim.DkimKey:
    path = tmp_path / "gmina.key"
    dkim.generate_key(path)
    return dkim.DkimKey.load(path, domain="gmina-wieliczka.pl", selector="s1")


@pytest.fixture
def provider_key(tmp_path: Path) -> dkim.DkimKey:
    path = tmp_path / "provider.key"
    dkim.generate_key(path)
    return dkim.DkimKey.load(path, domain="mailgun.example", selector="mg")


def _auth_server(tmp_path: Path, port: int, start_server, member_key, provider_key, mode: str = "hold",
                 fail: tuple[str, ...] = ()):  # type: ignore[no-untyped-def]
    resolver = DictResolver(
        {
            "_dmarc.gmina-wieliczka.pl": ["v=DMARC1; p=reject"],
            "s1._domainkey.gmina-wieliczka.pl": [dkim.dns_txt_value(member_key)],
            "mg._domainkey.mailgun.example": [dkim.dns_txt_value(provider_key)],
        },
        fail=fail,
    )
    server = start_server(make_config(tmp_path, port), resolver=resolver)
    server.call(server.store.create_list(LIST, {"sender_authentication": mode, "personalize": False}, [OWNER]))
    server.call(server.store.add_members(LIST, [(ANNA, "", ""), (JAN, "", "")]))
    return server


def _outcome(server, msgid: str) -> tuple[str, str]:  # type: ignore[no-untyped-def]
    [row] = committed(server.config.store_target, "SELECT status, reason FROM incoming WHERE message_id = ?",
                      (msgid,))
    return row[0], row[1]


def test_spoofed_member_posts_are_held_and_genuine_ones_pass(tmp_path: Path, sink, start_server,  # type: ignore[no-untyped-def]
                                                             member_domain_key, provider_key) -> None:
    handler, port = sink
    server = _auth_server(tmp_path, port, start_server, member_domain_key, provider_key)
    genuine = dkim.sign_message(post(msgid="ok1@x"), member_domain_key)
    provider_first = dkim.sign_message(dkim.sign_message(post(msgid="ok2@x"), member_domain_key), provider_key)
    cases = {
        "ok1@x": genuine,
        "ok2@x": provider_first,  # the aligned signature is the second one
        "no-sig@x": post(msgid="no-sig@x"),
        "altered@x": dkim.sign_message(post(msgid="altered@x"), member_domain_key).replace(b"styczniu", b"lutym"),
        "unaligned@x": dkim.sign_message(post(msgid="unaligned@x"), provider_key),
    }
    for data in cases.values():
        send(server.port, ANNA, f"{LIST}@{DOMAIN}", data)
    server.drain()
    assert _outcome(server, "ok1@x")[0] == "queued"
    assert _outcome(server, "ok2@x")[0] == "queued"
    for msgid in ("no-sig@x", "altered@x", "unaligned@x"):
        status, reason = _outcome(server, msgid)
        assert status == "held" and "possibly forged" in reason, (msgid, status, reason)
    # Our Authentication-Results is on the stored post, and a forged one claiming our id is gone.
    delivered = parsed(handler.copies_for(JAN)[0].data)
    assert "dmarc=pass" in " ".join(str(v) for v in delivered.get_all("Authentication-Results", []))


def test_forged_authentication_results_are_removed(tmp_path: Path, sink, start_server,  # type: ignore[no-untyped-def]
                                                    member_domain_key, provider_key) -> None:
    handler, port = sink
    server = _auth_server(tmp_path, port, start_server, member_domain_key, provider_key)
    fake = f"Authentication-Results: {DOMAIN}; dkim=pass header.d=gmina-wieliczka.pl; dmarc=pass\r\n".encode()
    send(server.port, ANNA, f"{LIST}@{DOMAIN}", fake + post(msgid="fake-ar@x"))
    server.drain()
    assert _outcome(server, "fake-ar@x")[0] == "held"


def test_reject_mode_refuses_at_data_and_dns_failure_never_holds(tmp_path: Path, sink, start_server,  # type: ignore[no-untyped-def]
                                                                 member_domain_key, provider_key) -> None:
    handler, port = sink
    server = _auth_server(tmp_path, port, start_server, member_domain_key, provider_key, mode="reject")
    with pytest.raises(smtplib.SMTPDataError) as exc:
        send(server.port, ANNA, f"{LIST}@{DOMAIN}", post(msgid="forged@x"))
    assert exc.value.smtp_code == 550 and b"forged" in exc.value.smtp_error


def test_dns_failure_makes_a_post_unverified_not_forged(tmp_path: Path, sink, start_server,  # type: ignore[no-untyped-def]
                                                        member_domain_key, provider_key) -> None:
    handler, port = sink
    server = _auth_server(tmp_path, port, start_server, member_domain_key, provider_key,
                          fail=("_dmarc.gmina-wieliczka.pl", "s1._domainkey.gmina-wieliczka.pl"))
    send(server.port, ANNA, f"{LIST}@{DOMAIN}", dkim.sign_message(post(msgid="dnsfail@x"), member_domain_key))
    server.drain()
    assert _outcome(server, "dnsfail@x")[0] == "queued"


# -- the confirmation link: the other way to confirm ---------------------------------------


def test_confirmation_link_confirms_on_post_only_and_once(web_server) -> None:  # type: ignore[no-untyped-def]
    server, handler, web_port = web_server
    stranger = "zofia.wojcik@gmina-zabki.pl"
    join = f"{LIST}-join@{DOMAIN}"
    send(server.port, stranger, join, b"From: Zofia W\xc3\xb3jcik <" + stranger.encode()
         + b">\r\nTo: " + join.encode() + b"\r\nSubject: zapisz\r\nMessage-ID: <zj1@gmina-zabki.pl>\r\n\r\n\r\n")
    server.drain()
    (confirmation,) = handler.copies_for(stranger)
    text = parsed(confirmation.data).get_content()
    found = re.search(r"https://listy\.example\.org/(c/[a-z0-9]+)", text)
    assert found, text
    assert "nacisnąć przycisk „Potwierdzam”" in text and "nie ma do tego strony WWW" not in text
    local = f"http://127.0.0.1:{web_port}/{found.group(1)}"
    # A link scanner's GET, twice: a page with a button, and nobody joins.
    for _ in range(2):
        with urllib.request.urlopen(local) as page:
            body = page.read().decode()
        assert "Potwierdzić zapis adresu zofia.wojcik@gmina-zabki.pl" in body and '<form method="post">' in body
    assert server.call(server.store.member(1, stranger)) is None
    # Another site cannot make her browser press the button.
    cross = urllib.request.Request(local, data=b"", method="POST", headers={"Sec-Fetch-Site": "cross-site"})
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(cross)
    assert refused.value.code == 403
    refused.value.close()
    assert server.call(server.store.member(1, stranger)) is None
    # Her button: she joins, once, and is welcomed.
    with urllib.request.urlopen(urllib.request.Request(local, data=b"", method="POST")) as done:
        assert "zapisano na listę" in done.read().decode()
    assert server.call(server.store.member(1, stranger)) is not None
    history = server.call(server.store.consent_history(LIST, stranger))
    assert [(e.event, e.method) for e in history] == [("joined", "web")]
    assert "link in the confirmation mail" in history[0].detail
    with pytest.raises(urllib.error.HTTPError) as again:
        urllib.request.urlopen(urllib.request.Request(local, data=b"", method="POST"))
    assert again.value.code == 404
    again.value.close()
    server.drain()
    assert parsed(handler.copies_for(stranger)[-1].data)["Subject"].startswith("Witamy na liście")
    # A made-up code is refused on both verbs.
    for req in (f"http://127.0.0.1:{web_port}/c/zmyslony", urllib.request.Request(
            f"http://127.0.0.1:{web_port}/c/zmyslony", data=b"", method="POST")):
        with pytest.raises(urllib.error.HTTPError) as bad:
            urllib.request.urlopen(req)
        assert bad.value.code == 404
        bad.value.close()
