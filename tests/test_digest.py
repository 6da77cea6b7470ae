"""Digests and delivery options end to end: real SMTP in, the real server, an aiosmtpd sink as the relay.

The digest stage reads its own clock (``DigestStage.clock``): the tests move
it to the next ``digest_time`` to stand for the morning after a day of posts.
"""

from __future__ import annotations

import datetime as dt
import email
import email.policy
import re
import smtplib
import time
import zoneinfo
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import dkim as dkimpy
import pytest

from conftest import DOMAIN, SinkHandler, dkim_dnsfunc, make_config, verify_with_perl
from listserv.digest import MESSAGE_SEPARATOR, PREAMBLE_SEPARATOR, next_send_at, scheduled_before
from listserv.settings import ListSettings

LIST = "zarzadzanie-energia"
POST_ADDR = f"{LIST}@{DOMAIN}"
OWNER = "koordynator@pnec.org.pl"
AUTHOR = "anna.kowalska@gmina-wieliczka.pl"
EACH = "lukasz@um.krakow.pl"
MIME = "zofia@energia-agencja.pl"
PLAIN = "grzegorz.brzeczyszczykiewicz@starostwo.pl"
INDEX = "malgorzata@wfosigw.pl"
WARSAW = zoneinfo.ZoneInfo("Europe/Warsaw")


def send(port: int, mail_from: str, data: bytes, rcpts: list[str] | None = None) -> None:
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
        assert client.sendmail(mail_from, rcpts or [POST_ADDR], data) == {}


def post(author: str, subject: str, body: str, n: int, *, html: bool = False, to: str = POST_ADDR,
         cc: str = "", attach: bytes | None = None) -> bytes:
    msg = EmailMessage()
    msg["From"] = f"Anna Kowalska <{author}>" if author == AUTHOR else author
    msg["To"] = to
    if cc:
        msg["Cc"] = cc
    msg["Subject"] = subject
    msg["Message-ID"] = f"<digest-test-{n}@gmina-wieliczka.pl>"
    msg["Date"] = "Thu, 03 Dec 2026 10:00:00 +0100"
    if html:
        msg.set_content(body, subtype="html", charset="utf-8")
    else:
        msg.set_content(body, charset="utf-8")
    if attach is not None:
        msg.add_attachment(attach, maintype="application", subtype="pdf", filename="plan-gospodarki.pdf")
    return msg.as_bytes(policy=email.policy.SMTP)


def parse(data: bytes) -> Any:
    return email.message_from_bytes(data, policy=email.policy.default)


def next_morning(after: float, hour: int = 7) -> float:
    local = dt.datetime.fromtimestamp(after, WARSAW)
    moment = local.replace(hour=hour, minute=0, second=0, microsecond=0)
    if moment <= local:
        moment += dt.timedelta(days=1)
    return moment.timestamp() + 1


class Clock:
    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def digest_list(tmp_path: Path, sink: tuple[SinkHandler, int], start_server):  # type: ignore[no-untyped-def]
    handler, port = sink
    server = start_server(make_config(tmp_path, port, web={"listen": "127.0.0.1:0",
                                                             "base_url": "https://listy.example.org/"}))
    clock = Clock()
    server.app.digests.clock = clock
    store = server.store
    server.call(store.create_list(LIST, {"title": "Zarządzanie energią"}, [OWNER]))
    server.call(store.add_members(LIST, [(AUTHOR, "Anna Kowalska", "Urząd Gminy Wieliczka"), (EACH, "", ""),
                                         (MIME, "", ""), (PLAIN, "", ""), (INDEX, "", "")]))
    for address, mode in ((MIME, "digest_mime"), (PLAIN, "digest_plain"), (INDEX, "index")):
        server.call(store.set_member(LIST, address, "delivery_mode", mode))
    return server, handler, clock


def _posts_of_a_day(server: Any) -> list[bytes]:
    posts = [
        post(AUTHOR, "Zażółć gęślą jaźń: harmonogram audytów energetycznych",
             "Dzień dobry,\n\nprzesyłam harmonogram audytów w szkołach.\n" + MESSAGE_SEPARATOR
             + "\ntej linii nie wolno brać za separator.\n\nAnna", 1),
        post(AUTHOR, "Oświetlenie uliczne — oferta", "<p>Proszę o <b>uwagi</b> do oferty LED.</p>"
             "<p>Łączna moc: 120&nbsp;kW</p>", 2, html=True),
        post(AUTHOR, "Plan gospodarki niskoemisyjnej", "W załączniku plan.\n", 3, attach=b"%PDF-1.4 " + b"x" * 2000),
    ]
    for data in posts:
        send(server.port, AUTHOR, data)
    server.drain()
    return posts


def test_each_mode_gets_what_it_chose_over_a_day(digest_list, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    server, sink, clock = digest_list
    _posts_of_a_day(server)
    # During the day: single copies to the `each` members only.
    assert len(sink.copies_for(EACH)) == 3
    assert len(sink.copies_for(AUTHOR)) == 3  # not_me is off by default
    for address in (MIME, PLAIN, INDEX):
        assert sink.copies_for(address) == []
    assert server.call(server.app.digests.process()) == 0  # not due before the morning
    # The morning after: one digest per digest member, then nothing more.
    # (The worker's own pass may queue it first: either way, once.)
    clock.now = next_morning(time.time())
    server.call(server.app.digests.process())
    server.drain()
    assert server.call(server.app.digests.process()) == 0
    server.drain()
    assert len(sink.copies_for(EACH)) == 3
    (mime,) = sink.copies_for(MIME)
    (plain,) = sink.copies_for(PLAIN)
    (index,) = sink.copies_for(INDEX)

    # MIME digest (RFC 2046 §5.1.5): the same posts, in order, as the `each` member got them.
    msg = parse(mime.data)
    assert msg["Subject"] == "Zarządzanie energią: przegląd, tom 1, nr 1"
    assert msg.get_content_type() == "multipart/mixed"
    toc, digest, footer = msg.iter_parts()
    assert digest.get_content_type() == "multipart/digest"
    parts = list(digest.iter_parts())
    assert [p.get_content_type() for p in parts] == ["message/rfc822"] * 3
    inner = [p.get_content() for p in parts]
    assert [m["Message-ID"] for m in inner] == [f"<digest-test-{n}@gmina-wieliczka.pl>" for n in (1, 2, 3)]
    toc_text = toc.get_content()
    assert "Tematy w tym wydaniu:" in toc_text
    assert "Zażółć gęślą jaźń: harmonogram audytów energetycznych (Anna Kowalska, Urząd Gminy Wieliczka)" in toc_text
    assert toc_text.count("https://archiwum.example.org/zarzadzanie-energia/m/") == 3
    # Byte for byte what the `each` member got, minus that member's own header fields.
    single = [c.data for c in sink.copies_for(EACH)]
    raw_parts = _raw_digest_parts(mime.data)
    per_copy = re.compile(rb"^(DKIM-Signature|List-Unsubscribe|List-Unsubscribe-Post):.*?\r\n(?![ \t])",
                          re.M | re.S | re.I)
    for got, theirs in zip(raw_parts, sorted(single, key=lambda d: parse(d)["Message-ID"])):
        assert per_copy.sub(b"", got) == per_copy.sub(b"", theirs)
    # The footer once, with this member's own one-click and preferences links.
    token = server.app.tokens.token(LIST, MIME)
    prefs = server.app.tokens.prefs_token(MIME)
    footer_text = footer.get_content()
    assert f"https://listy.example.org/u/{LIST}/{token}" in footer_text
    assert f"https://listy.example.org/p/{prefs}" in footer_text
    assert msg["List-Unsubscribe"] == (f"<https://listy.example.org/u/{LIST}/{token}>, "
                                       f"<mailto:{LIST}-leave+{token}@{DOMAIN}>")
    assert msg["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
    assert msg["List-Id"].endswith(f"<{LIST}.{DOMAIN}>")

    # Plain digest (RFC 1153): contents, 70 hyphens, posts between 30 hyphens, the trailer.
    pmsg = parse(plain.data)
    assert pmsg.get_content_type() == "text/plain"
    text = pmsg.get_content().replace("\r\n", "\n")
    lines = text.split("\n")
    assert lines.count(PREAMBLE_SEPARATOR) == 1
    assert lines.count(MESSAGE_SEPARATOR) == 4  # after each of 3 posts, and after the footer
    assert " " + MESSAGE_SEPARATOR in lines  # the author's own separator line, escaped
    first_sep = lines.index(PREAMBLE_SEPARATOR)
    assert "Tematy w tym wydaniu:" in "\n".join(lines[:first_sep])
    blocks = "\n".join(lines[first_sep + 1:]).split("\n" + MESSAGE_SEPARATOR + "\n")
    assert blocks[0].strip().startswith("Date: ")
    assert "Subject: Zażółć gęślą jaźń" in blocks[0]
    assert "Proszę o uwagi do oferty LED." in blocks[1] and "<b>" not in blocks[1]  # HTML read as text
    assert "Łączna moc: 120" in blocks[1]
    assert "[załącznik: plan-gospodarki.pdf, application/pdf" in blocks[2]
    assert lines[-3] == "Koniec przeglądu „Zarządzanie energią”, tom 1, nr 1"
    assert lines[-2] == "*" * len(lines[-3])

    # Index: subjects, authors and archive links only.
    itext = parse(index.data).get_content()
    assert parse(index.data)["Subject"] == "Zarządzanie energią: spis wiadomości, tom 1, nr 1"
    assert "Oświetlenie uliczne — oferta" in itext and "Anna Kowalska, Urząd Gminy Wieliczka" in itext
    assert "przesyłam harmonogram" not in itext
    assert itext.count("https://archiwum.example.org/zarzadzanie-energia/m/") == 3

    # Every digest is signed for its member: dkimpy and the Perl verifier agree.
    for copy in (mime, plain, index):
        assert dkimpy.verify(copy.data, dnsfunc=dkim_dnsfunc(server.key))
        result = verify_with_perl(copy.data, server.key, tmp_path)
        assert result.returncode == 0, result.stdout + result.stderr
    assert not dkimpy.verify(mime.data.replace(b"Tematy", b"TEMATY", 1), dnsfunc=dkim_dnsfunc(server.key))

    # The next day: one more post is issue 2, alone.
    send(server.port, AUTHOR, post(AUTHOR, "Dzień drugi", "Nowa wiadomość.\n", 4))
    server.drain()
    clock.now = next_morning(clock.now + 3600)
    server.call(server.app.digests.process())
    server.drain()
    second = sink.copies_for(MIME)[1]
    assert parse(second.data)["Subject"] == "Zarządzanie energią: przegląd, tom 1, nr 2"
    assert len(list(list(parse(second.data).iter_parts())[1].iter_parts())) == 1


def _raw_digest_parts(data: bytes) -> list[bytes]:
    """The message/rfc822 parts' bytes as they are on the wire (CRLF before a delimiter excluded)."""
    boundary = re.search(rb'multipart/digest; boundary="([^"]+)"', data)
    assert boundary
    delim = b"\r\n--" + boundary.group(1)
    body = data.split(b"--" + boundary.group(1) + b"\r\n", 1)[1]
    chunks = (b"\r\n" + b"--" + boundary.group(1) + b"\r\n" + body).split(delim + b"\r\n")[1:]
    chunks[-1] = chunks[-1].split(delim + b"--")[0]
    return [c.split(b"\r\n\r\n", 1)[1] for c in chunks]


def test_size_threshold_sends_early_and_english_member(digest_list) -> None:  # type: ignore[no-untyped-def]
    server, sink, clock = digest_list
    server.call(server.store.set_list_setting(LIST, "digest_size_threshold", 4000))
    server.call(server.store.set_member(LIST, PLAIN, "language", "en"))
    send(server.port, AUTHOR, post(AUTHOR, "Krótko", "Jedno zdanie.\n", 10))
    server.drain()
    assert server.call(server.app.digests.process()) == 0  # 1 small post: under the threshold
    send(server.port, AUTHOR, post(AUTHOR, "Długi raport", "Raport o zużyciu energii. " * 200 + "\n", 11))
    server.drain()
    # Past the threshold: out now, hours before digest_time (the worker's own pass or this one).
    server.call(server.app.digests.process())
    server.drain()
    (plain,) = sink.copies_for(PLAIN)
    msg = parse(plain.data)
    assert msg["Subject"] == "Zarządzanie energią Digest, Vol 1, Issue 1"  # the member's language
    assert "Today's Topics:" in msg.get_content()
    assert "End of Zarządzanie energią Digest, Vol 1, Issue 1" in msg.get_content()
    history = server.call(server.store.digest_history(server.call(server.store.get_list(LIST)).id))
    assert [(h[1], h[2], h[4], h[5]) for h in history] == [(1, 1, 2, "size")]


def test_no_repeat_of_a_post_already_had_and_held_post_in_next_digest(digest_list) -> None:  # type: ignore[no-untyped-def]
    server, sink, clock = digest_list
    # EACH got post 20 singly, then switched to digests: the digest leaves it out.
    send(server.port, AUTHOR, post(AUTHOR, "Przed zmianą", "Pierwsza.\n", 20))
    server.drain()
    assert len(sink.copies_for(EACH)) == 1
    server.call(server.store.set_member(LIST, EACH, "delivery_mode", "digest_mime"))
    send(server.port, AUTHOR, post(AUTHOR, "Po zmianie", "Druga.\n", 21))
    # A non-member's post is held; approved, it goes in the next digest.
    send(server.port, "gosc@gmina-zewnetrzna.pl", post("gosc@gmina-zewnetrzna.pl", "Pytanie z zewnątrz", "Pytanie.\n", 22))
    server.drain()
    held = server.call(server.store.incoming_with("post", "held", limit=5))
    assert len(held) == 1
    server.call(server.store.set_incoming_status(held[0].id, "accepted", expect="held"))
    server.app.wakeup.notify("prepare")
    server.drain()
    clock.now = next_morning(time.time())
    server.call(server.app.digests.process())
    server.drain()
    (each_digest,) = sink.copies_for(EACH)[1:]
    ids = [p.get_content()["Message-ID"] for p in list(parse(each_digest.data).iter_parts())[1].iter_parts()]
    assert ids == ["<digest-test-21@gmina-wieliczka.pl>", "<digest-test-22@gmina-wieliczka.pl>"]
    (mime,) = sink.copies_for(MIME)
    ids = [p.get_content()["Message-ID"] for p in list(parse(mime.data).iter_parts())[1].iter_parts()]
    assert ids == [f"<digest-test-{n}@gmina-wieliczka.pl>" for n in (20, 21, 22)]



def test_leaving_digests_mid_period_brings_one_last_digest(digest_list) -> None:  # type: ignore[no-untyped-def]
    server, sink, clock = digest_list
    # PLAIN had posts 30 and 31 waiting for his digest, then switched to single copies.
    for n in (30, 31):
        send(server.port, AUTHOR, post(AUTHOR, f"Przed zmianą {n}", "Treść.\n", n))
    server.drain()
    assert sink.copies_for(PLAIN) == []
    server.call(server.store.set_member(LIST, PLAIN, "delivery_mode", "each"))
    send(server.port, AUTHOR, post(AUTHOR, "Po zmianie na pojedyncze", "Treść.\n", 32))
    server.drain()
    (single,) = sink.copies_for(PLAIN)
    assert parse(single.data)["Message-ID"] == "<digest-test-32@gmina-wieliczka.pl>"
    clock.now = next_morning(time.time())
    server.call(server.app.digests.process())
    server.drain()
    # One last digest, in the form he had (RFC 1153 plain), with the two posts he would
    # otherwise never get, and not the one he had singly.
    (last,) = sink.copies_for(PLAIN)[1:]
    text = parse(last.data).get_content()
    assert "Przed zmianą 30" in text and "Przed zmianą 31" in text and "Po zmianie na pojedyncze" not in text
    # ... and only one: the next period brings him single copies and no digest.
    send(server.port, AUTHOR, post(AUTHOR, "Następny dzień", "Treść.\n", 33))
    server.drain()
    clock.now = next_morning(clock.now)
    server.call(server.app.digests.process())
    server.drain()
    assert [parse(c.data)["Message-ID"] for c in sink.copies_for(PLAIN)[2:]] == [
        "<digest-test-33@gmina-wieliczka.pl>"]
    assert len(sink.copies_for(MIME)) == 2  # the digest members got both days' digests

def test_not_me_no_dupes_and_ack(digest_list) -> None:  # type: ignore[no-untyped-def]
    server, sink, clock = digest_list
    store = server.store
    server.call(store.set_member(LIST, AUTHOR, "not_me", 1))
    server.call(store.set_member(LIST, AUTHOR, "ack", 1))
    # EACH is in Cc (no_dupes is on by default): the list sends them no second copy.
    # OWNER turned no_dupes off and is in To: gets the list copy anyway.
    server.call(store.set_member(LIST, OWNER, "no_dupes", 0))
    send(server.port, AUTHOR, post(AUTHOR, "Spotkanie w Łodzi", "Zapraszam.\n", 30, to=f"{POST_ADDR}, {OWNER}",
                                   cc=EACH))
    server.drain()
    assert sink.copies_for(EACH) == []
    assert len(sink.copies_for(OWNER)) == 1
    # not_me: no copy of my own post; ack: a receipt instead, in Polish.
    mine = sink.copies_for(AUTHOR)
    assert len(mine) == 1
    receipt = parse(mine[0].data)
    assert receipt["Subject"] == "Wiadomość rozesłana: Spotkanie w Łodzi"
    assert receipt["Auto-Submitted"] == "auto-replied"
    assert receipt["In-Reply-To"] == "<digest-test-30@gmina-wieliczka.pl>"
    assert "1 kopia" in receipt.get_content()
    # The post still waits for the digest members.
    clock.now = next_morning(time.time())
    server.call(server.app.digests.process())
    server.drain()
    assert len(sink.copies_for(MIME)) == 1


def test_ack_member_told_when_held_even_without_notify_held_sender(digest_list) -> None:  # type: ignore[no-untyped-def]
    server, sink, clock = digest_list
    server.call(server.store.set_list_setting(LIST, "notify_held_sender", False))
    server.call(server.store.set_list_setting(LIST, "emergency_moderation", True))
    server.call(server.store.set_member(LIST, AUTHOR, "ack", 1))
    server.call(server.store.set_member(LIST, AUTHOR, "language", "en"))
    send(server.port, EACH, post(EACH, "Bez potwierdzenia", "x\n", 40))
    send(server.port, AUTHOR, post(AUTHOR, "Wstrzymana", "x\n", 41))
    server.drain()
    assert sink.copies_for(EACH) == []  # no ack: not told (the list does not tell senders)
    (notice,) = sink.copies_for(AUTHOR)
    assert parse(notice.data)["Subject"] == "Your post awaits a moderator: Wstrzymana"


@pytest.mark.parametrize("line,column,value,words", [
    ("ustaw skrót", "delivery_mode", "digest_mime", "tryb: przegląd"),
    ("Ustaw skrot tekst", "delivery_mode", "digest_plain", "tryb: przegląd tekstowy"),
    ("ustaw indeks", "delivery_mode", "index", "tryb: spis"),
    ("set digest", "delivery_mode", "digest_mime", "tryb: przegląd"),
    ("ustaw nieja wł", "not_me", True, "(notme): wył."),
    ("set ack on", "ack", True, "potwierdzenia (ack): wł."),
    ("ustaw bezduplikatow wył", "no_dupes", False, "bez duplikatów (nodupes): wył."),
    ("set language en", "language", "en", "language: en"),
])
def test_set_commands_in_both_languages(digest_list, line: str, column: str, value: Any,  # type: ignore[no-untyped-def]
                                        words: str) -> None:
    server, sink, clock = digest_list
    msg = EmailMessage()
    msg["From"] = EACH
    msg["To"] = f"{LIST}-request@{DOMAIN}"
    msg["Subject"] = "polecenie"
    msg["Message-ID"] = "<cmd-1@um.krakow.pl>"
    msg.set_content(f"{line}\n", charset="utf-8")
    send(server.port, EACH, msg.as_bytes(policy=email.policy.SMTP), [f"{LIST}-request@{DOMAIN}"])
    server.drain()
    member = server.call(server.store.member(server.call(server.store.get_list(LIST)).id, EACH))
    assert getattr(member, column) == value
    (reply,) = sink.copies_for(EACH)
    text = parse(reply.data).get_content()
    assert words in text, text
    if column == "language":
        assert "Done. Your settings:" in text
    else:
        assert "Zmieniono. Twoje ustawienia:" in text


def test_help_lists_the_delivery_options(digest_list) -> None:  # type: ignore[no-untyped-def]
    server, sink, clock = digest_list
    send(server.port, EACH, b"From: " + EACH.encode() + b"\r\nTo: x\r\nSubject: pomoc\r\nMessage-ID: <h@x>\r\n\r\n\r\n",
         [f"{LIST}-request@{DOMAIN}"])
    server.drain()
    text = parse(sink.copies_for(EACH)[0].data).get_content()
    for word in ("ustaw skrót", "ustaw indeks", "ustaw pojedynczo", "ustaw nieja", "ustaw potwierdzenia",
                 "ustaw język"):
        assert word in text


def test_schedule_daily_weekly_and_across_dst() -> None:
    daily = ListSettings(digest_time=7)
    # 2026-10-25 is the autumn DST change in Poland: 07:00 stays 07:00 local.
    before = dt.datetime(2026, 10, 24, 12, 0, tzinfo=WARSAW).timestamp()
    at = next_send_at(daily, before)
    assert at is not None
    assert dt.datetime.fromtimestamp(at, WARSAW) == dt.datetime(2026, 10, 25, 7, 0, tzinfo=WARSAW)
    weekly = ListSettings(digest_period="weekly", digest_time=9)
    thursday = dt.datetime(2026, 12, 3, 12, 0, tzinfo=WARSAW).timestamp()
    at = next_send_at(weekly, thursday)
    assert at is not None
    assert dt.datetime.fromtimestamp(at, WARSAW) == dt.datetime(2026, 12, 7, 9, 0, tzinfo=WARSAW)  # Monday
    assert scheduled_before(ListSettings(digest_period="off"), thursday) is None
    assert next_send_at(ListSettings(digest_period="off"), thursday) is None


def test_cli_members_set_digest_show_send_and_status(tmp_path: Path, sink: tuple[SinkHandler, int],  # type: ignore[no-untyped-def]
                                                     start_server) -> None:
    from conftest import free_port
    from listserv import config as config_mod
    from test_status import ANNA, EWA, JAN, eml, make_list, ok, run, write_config
    from test_status import LIST as SLIST

    handler, sink_port = sink
    port = free_port()
    cfg = write_config(tmp_path, port, sink_port)
    make_list(cfg)
    # Bad input: a clear error, nothing changed.
    bad = run(cfg, "members", "set", SLIST, EWA, "delivery_mode", "weekly")
    assert bad.exit_code != 0 and "delivery_mode must be one of each, digest_mime, digest_plain, index" in bad.output
    assert "ustaw" not in bad.output
    ok(cfg, "members", "set", SLIST, EWA, "delivery_mode", "digest_plain")
    ok(cfg, "members", "set", SLIST, JAN, "delivery_mode", "index")
    ok(cfg, "members", "set", SLIST, JAN, "language", "en")
    lines = ok(cfg, "members", "list", SLIST).splitlines()
    assert f"{EWA}\tmember\tunmoderated\tenabled\tdigest_plain" in lines
    assert f"{ANNA}\tmember\tunmoderated\tenabled\teach" in lines
    history = ok(cfg, "members", "history", SLIST, EWA)
    assert "delivery_mode=digest_plain" in history

    server = start_server(config_mod.load(cfg))
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
        for n in range(2):
            client.sendmail(ANNA, [f"{SLIST}@{DOMAIN}"],
                            eml(tmp_path, f"Anna Kowalska <{ANNA}>", f"cli{n}@gmina-wolow.example.pl",
                                subject=f"Źródła finansowania {n}").read_bytes())
    server.drain()
    assert handler.copies_for(EWA) == []
    shown = ok(cfg, "digest", "show", SLIST)
    assert f"{SLIST}: next digest volume 1, issue 1" in shown
    assert "members on digests: 1 digest_plain, 1 index" in shown
    assert "waiting: 2 posts" in shown and "Źródła finansowania 1  (Anna Kowalska)" in shown
    assert "goes out: " in shown
    status = ok(cfg, "status")
    assert f"  {SLIST:<20}    2 posts" in status and "2 members; goes out " in status
    sent = ok(cfg, "digest", "send", SLIST)
    assert sent.strip() == f"{SLIST}: digest volume 1, issue 1 queued (2 posts, 2 members)"
    server.drain()
    (plain,) = handler.copies_for(EWA)
    assert parse(plain.data)["Subject"] == "Planowanie SEAP: przegląd, tom 1, nr 1"
    (index,) = handler.copies_for(JAN)
    assert parse(index.data)["Subject"] == "Planowanie SEAP Index, Vol 1, Issue 1"
    assert "nothing waiting" in ok(cfg, "status")
    assert ok(cfg, "digest", "send", SLIST).strip() == f"{SLIST}: no digest sent: no posts are waiting"
    assert run(cfg, "digest", "show", "no-such-list").exit_code != 0


def test_personal_footer_links_each_members_own_preferences_page(digest_list, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    server, sink, clock = digest_list
    server.call(server.store.set_list_setting(LIST, "personal_footer", True))
    send(server.port, AUTHOR, post(AUTHOR, "Stopka z linkiem", "Treść.\n", 50))
    server.drain()
    (copy,) = sink.copies_for(EACH)
    text = parse(copy.data).get_body(("plain",)).get_content()
    assert f"https://listy.example.org/p/{server.app.tokens.prefs_token(EACH)}" in text
    assert "Twoje ustawienia (przegląd zamiast pojedynczych wiadomości, wypisanie):" in text
    assert server.app.tokens.prefs_token(AUTHOR) not in text
    assert dkimpy.verify(copy.data, dnsfunc=dkim_dnsfunc(server.key))
    # The digest part of the same post carries the list's page instead of anyone's own link.
    clock.now = next_morning(time.time())
    server.call(server.app.digests.process())
    server.drain()
    (mime,) = sink.copies_for(MIME)
    (part,) = _raw_digest_parts(mime.data)
    assert b"https://listy.example.org/j/" + LIST.encode() in part
    assert b"@@LISTSERV_" not in mime.data


# -- the builders, for any post (hypothesis) -------------------------------------------------

from hypothesis import HealthCheck, given, settings as hsettings, strategies as st  # noqa: E402

from listserv.digest import DigestIssue, build_digest  # noqa: E402
from listserv.rewrite import ListContext  # noqa: E402
from listserv.store import DigestPost  # noqa: E402

_TEXT = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\r\x00"), max_size=300)
_LINES = st.lists(st.one_of(_TEXT, st.sampled_from([MESSAGE_SEPARATOR, PREAMBLE_SEPARATOR, "-- ", ".", "--"])),
                  max_size=12)


def _raw_post(n: int, subject: str, lines: list[str]) -> bytes:
    msg = EmailMessage()
    msg["From"] = "Zażółć Gęślą <autor@gmina.example.pl>"
    msg["Subject"] = " ".join(subject.split())  # str.split also splits at \x1c-\x1f, which email refuses
    msg["Message-ID"] = f"<prop-{n}@gmina.example.pl>"
    msg.set_content("\n".join(lines) + "\n", charset="utf-8")
    return msg.as_bytes(policy=email.policy.SMTP)


@hsettings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(_TEXT, _LINES), min_size=1, max_size=4), st.sampled_from(["pl", "en"]),
       st.sampled_from(["digest_mime", "digest_plain", "index"]))
def test_any_posts_make_a_digest_that_parses_back(posts: list[tuple[str, list[str]]], language: str,
                                                  mode: str) -> None:
    records = []
    for n, (subject, lines) in enumerate(posts):
        raw = _raw_post(n, subject, lines)
        records.append(DigestPost(n, n, f"prop-{n}@gmina.example.pl", " ".join(subject.split()), "Zażółć Gęślą",
                                  "autor@gmina.example.pl", f"https://archiwum.example.org/l/m/{n}/", len(raw),
                                  1_700_000_000.0 + n, raw, "Gmina Łódź"))
    ctx = ListContext("lista", DOMAIN, ListSettings(title="Łódzka lista"), "https://archiwum.example.org/")
    data = build_digest(DigestIssue(ctx, 2, 17, mode, language, tuple(records), "<d@x>", 1_700_000_000.0,
                                    False, False))
    assert all(len(line) <= 998 for line in data.split(b"\r\n"))
    assert b"\n" not in data.replace(b"\r\n", b"")  # CRLF only
    msg = email.message_from_bytes(data, policy=email.policy.default)
    assert not msg.defects
    if mode == "digest_mime":
        toc, digest, footer = msg.iter_parts()
        raw_parts = _raw_digest_parts(data)
        assert raw_parts == [r.data for r in records]  # each post byte for byte, in order
        assert [p.get_content()["Message-ID"] for p in digest.iter_parts()] == \
            [f"<prop-{n}@gmina.example.pl>" for n in range(len(records))]
        return
    text = msg.get_content().replace("\r\n", "\n")
    assert (str(msg["Subject"]).endswith("tom 2, nr 17") if language == "pl"
            else str(msg["Subject"]).endswith("Vol 2, Issue 17"))
    if mode == "digest_plain":
        lines = text.split("\n")
        # The separators are ours alone: the authors' own lines that look like them were escaped.
        assert lines.count(PREAMBLE_SEPARATOR) == 1
        assert lines.count(MESSAGE_SEPARATOR) == len(records) + 1
        assert lines[-2] == "*" * len(lines[-3])
    else:
        assert text.count("https://archiwum.example.org/l/m/") == len(records)
