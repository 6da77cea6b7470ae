"""End to end over real SMTP: client -> listserv on 127.0.0.1 -> aiosmtpd sink as the relay."""

from __future__ import annotations

import email
import email.policy
import smtplib
import time
from pathlib import Path

import dkim as dkimpy
import pytest

from listserv.fanout import bounces_address
from conftest import DOMAIN, SinkHandler, committed, dkim_dnsfunc, make_config, verify_with_perl, store_toml

LIST = "seap-planning"
POST_ADDR = f"{LIST}@{DOMAIN}"
OWNER = "koordynator@pnec.org.pl"
MEMBERS = ["anna.kowalska@gmina-wieliczka.pl", "lukasz@um.krakow.pl", "zofia@energia-agencja.pl"]

POLISH_POST = (
    "From: =?utf-8?q?Anna_Kowalska?= <anna.kowalska@gmina-wieliczka.pl>\r\n"
    f"To: {POST_ADDR}\r\n"
    "Subject: =?utf-8?b?WmHFvMOzxYLEhyBnxJnFm2zEhSBqYcW6xYQg4oCUIGhhcm1vbm9ncmFtIFNFQVA=?=\r\n"
    "Message-ID: <seap-1@gmina-wieliczka.pl>\r\n"
    "Date: Thu, 26 Nov 2026 10:00:00 +0100\r\n"
    "MIME-Version: 1.0\r\n"
    "Content-Type: text/plain; charset=utf-8\r\n"
    "Content-Transfer-Encoding: 8bit\r\n"
    "\r\n"
    "Dzień dobry,\r\n\r\nprzesyłam harmonogram prac nad SEAP. Proszę o uwagi do piątku.\r\n\r\n"
    "Pozdrawiam,\r\nAnna Kowalska\r\nUrząd Gminy Wieliczka\r\n"
).encode()


def send(port: int, mail_from: str, rcpts: list[str], data: bytes, lmtp: bool = False) -> dict[str, tuple[int, bytes]]:
    cls = smtplib.LMTP if lmtp else smtplib.SMTP
    with cls("127.0.0.1", port, timeout=30) as client:
        return client.sendmail(mail_from, rcpts, data)


def wait_for(predicate, timeout: float = 20.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError("condition not reached in time")


@pytest.fixture
def running(tmp_path: Path, sink: tuple[SinkHandler, int], start_server):  # type: ignore[no-untyped-def]
    handler, port = sink
    server = start_server(make_config(tmp_path, port))
    server.call(server.store.create_list(LIST, {"title": "Planowanie SEAP"}, [OWNER]))
    server.call(server.store.add_members(LIST, [(m, "", "") for m in MEMBERS]))
    return server, handler


def test_member_post_reaches_every_member_signed(running, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    server, sink = running
    # Each member's own one-click link in the footer too (personal_footer).
    server.call(server.store.set_list_setting(LIST, "personal_footer", True))
    assert send(server.port, MEMBERS[0], [POST_ADDR], POLISH_POST) == {}
    server.drain()
    got = sorted(sink.recipients())
    assert got == sorted(MEMBERS + [OWNER])  # the owner is a member too
    # Personalized (the default): one transaction per member, VERP envelope.
    assert all(len(m.rcpt_tos) == 1 for m in sink.messages)
    copy = sink.copies_for(MEMBERS[1])[0]
    assert copy.mail_from == f"{LIST}-bounces+lukasz=um.krakow.pl@{DOMAIN}"
    msg = email.message_from_bytes(copy.data, policy=email.policy.default)
    assert msg["Subject"] == "[seap-planning] Zażółć gęślą jaźń — harmonogram SEAP"
    assert msg["List-Id"].endswith(f"<{LIST}.{DOMAIN}>")
    assert msg["List-Post"] == f"<mailto:{POST_ADDR}>"
    token = server.app.tokens.token(LIST, MEMBERS[1])
    assert msg["List-Unsubscribe"] == f"<mailto:{LIST}-leave+{token}@{DOMAIN}>"
    assert msg["List-Unsubscribe-Post"] is None  # no https base_url configured: mailto only (RFC 8058 §3.1)
    assert msg["Precedence"] == "list"
    assert msg["Archived-At"].startswith(f"<https://archiwum.example.org/{LIST}/m/")
    assert POST_ADDR in msg["From"] and "Anna Kowalska" in str(msg["From"])
    assert "anna.kowalska@gmina-wieliczka.pl" in str(msg["Reply-To"])
    body = msg.get_body(("plain",)).get_content()  # type: ignore[union-attr]
    assert "przesyłam harmonogram prac nad SEAP" in body
    assert f"mailto:{LIST}-leave+{token}@{DOMAIN}" in body  # the footer's own link
    # Signed by the list domain: dkimpy and the independent Perl verifier agree.
    assert dkimpy.verify(copy.data, dnsfunc=dkim_dnsfunc(server.key))
    result = verify_with_perl(copy.data, server.key, tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    # ... and a tampered copy fails both.
    tampered = copy.data.replace(b"harmonogram", b"HARMONOGRAM", 1)
    assert not dkimpy.verify(tampered, dnsfunc=dkim_dnsfunc(server.key))
    assert verify_with_perl(tampered, server.key, tmp_path).returncode != 0
    # Every member's copy verifies on its own, and fails once its token is swapped for another's.
    other = server.app.tokens.token(LIST, MEMBERS[2])
    for rcpt in MEMBERS + [OWNER]:
        (mine,) = sink.copies_for(rcpt)
        assert dkimpy.verify(mine.data, dnsfunc=dkim_dnsfunc(server.key)), rcpt
        result = verify_with_perl(mine.data, server.key, tmp_path)
        assert result.returncode == 0, result.stdout + result.stderr
    swapped = copy.data.replace(token.encode(), other.encode())
    assert swapped != copy.data
    assert not dkimpy.verify(swapped, dnsfunc=dkim_dnsfunc(server.key))
    assert verify_with_perl(swapped, server.key, tmp_path).returncode != 0


def test_batches_respect_max_recipients(tmp_path: Path, sink, start_server) -> None:  # type: ignore[no-untyped-def]
    handler, port = sink
    server = start_server(make_config(tmp_path, port, delivery={"max_recipients": 7}))
    server.call(server.store.create_list(LIST, {"personalize": False, "verp": "never"}, [OWNER]))
    members = [f"czlonek{i}@gmina{i % 5}.pl" for i in range(40)]
    server.call(server.store.add_members(LIST, [(m, "", "") for m in members]))
    send(server.port, members[3], [POST_ADDR], POLISH_POST.replace(b"anna.kowalska@gmina-wieliczka.pl", members[3].encode()))
    server.drain()
    assert sorted(handler.recipients()) == sorted(members + [OWNER])
    assert max(len(m.rcpt_tos) for m in handler.messages) <= 7
    assert len({m.data for m in handler.messages}) == 1  # identical copies, signed once


def test_non_member_is_held_and_owner_told_once(running) -> None:  # type: ignore[no-untyped-def]
    server, sink = running
    post = POLISH_POST.replace(b"anna.kowalska@gmina-wieliczka.pl", b"obcy@example.com")
    send(server.port, "obcy@example.com", [POST_ADDR], post)
    server.drain()
    held = server.call(server.store.held(LIST))
    assert len(held) == 1 and held[0].sender == "obcy@example.com" and "not a member" in held[0].reason
    # One notice to the owner, one "your post waits" to the sender; nothing to members.
    assert sorted(sink.recipients()) == sorted([OWNER, "obcy@example.com"])
    notice = email.message_from_bytes(sink.copies_for(OWNER)[0].data, policy=email.policy.default)
    assert notice["Auto-Submitted"] == "auto-generated"
    assert "Zażółć" in notice["Subject"]
    assert dkimpy.verify(sink.copies_for(OWNER)[0].data, dnsfunc=dkim_dnsfunc(server.key))
    told = email.message_from_bytes(sink.copies_for("obcy@example.com")[0].data, policy=email.policy.default)
    assert told["Auto-Submitted"] == "auto-replied" and told["In-Reply-To"] == "<seap-1@gmina-wieliczka.pl>"
    server.drain()
    time.sleep(1.2)  # another worker pass must not notify again
    server.drain()
    assert len(sink.messages) == 2


def test_banned_sender_gets_5xx_and_nothing_is_stored(running) -> None:  # type: ignore[no-untyped-def]
    server, sink = running
    server.call(server.store.add_ban("*@gmina-wieliczka.pl", None))
    with pytest.raises(smtplib.SMTPDataError) as exc:
        send(server.port, MEMBERS[0], [POST_ADDR], POLISH_POST)
    assert exc.value.smtp_code == 550 and b"5.7.1" in exc.value.smtp_error
    server.drain()
    assert sink.messages == []


def test_unknown_and_foreign_recipients_refused_at_rcpt(running) -> None:  # type: ignore[no-untyped-def]
    server, _ = running
    with smtplib.SMTP("127.0.0.1", server.port) as client:
        client.ehlo("test.example")
        client.mail(MEMBERS[0])
        code, text = client.rcpt(f"no-such-list@{DOMAIN}")
        assert (code, text[:5]) == (550, b"5.1.1")
        code, text = client.rcpt("someone@gmail.com")
        assert (code, text[:5]) == (550, b"5.7.1")
        code, text = client.rcpt(f"{LIST}-bogus@{DOMAIN}")
        assert code == 550
        code, _ = client.rcpt(f"{LIST}-confirm@{DOMAIN}")  # a token is required
        assert code == 550
        for ok in (POST_ADDR, f"{LIST}-request@{DOMAIN}", f"{LIST}-join@{DOMAIN}", f"{LIST}-leave@{DOMAIN}",
                   f"{LIST}-confirm+abc123@{DOMAIN}", f"{LIST}-owner@{DOMAIN}", f"{LIST}-bounces@{DOMAIN}",
                   f"{LIST}-bounces+jan=example.org@{DOMAIN}", f"SEAP-Planning@{DOMAIN.upper()}"):
            code, _ = client.rcpt(ok)
            assert code == 250, ok


def test_oversized_post_gets_552(tmp_path: Path, sink, start_server) -> None:  # type: ignore[no-untyped-def]
    handler, port = sink
    server = start_server(make_config(tmp_path, port, server={"max_message_size": 20000}))
    server.call(server.store.create_list(LIST, {}, [OWNER]))
    with smtplib.SMTP("127.0.0.1", server.port) as client:
        client.ehlo("test.example")
        assert client.has_extn("size") and client.esmtp_features["size"] == "20000"
        big = POLISH_POST + b"Dane dane dane.\r\n" * 2000
        # Declared with SIZE= (RFC 1870): refused at MAIL, before the body.
        with pytest.raises(smtplib.SMTPSenderRefused) as refused:
            client.sendmail(OWNER, [POST_ADDR], big)
        assert refused.value.smtp_code == 552 and b"5.3.4" in refused.value.smtp_error
        # Not declared: counted while it arrives, refused at the end of DATA.
        client.rset()
        client.mail(OWNER)
        client.rcpt(POST_ADDR)
        code, text = client.data(big)
        assert code == 552 and b"5.3.4" in text
    server.drain()
    assert handler.messages == []
    assert server.call(server.store.held()) == []


def test_broken_mime_is_still_delivered(running) -> None:  # type: ignore[no-untyped-def]
    server, sink = running
    broken = (
        f"From: {MEMBERS[1]}\r\nTo: {POST_ADDR}\r\nSubject: =?x-unknown?Q?zepsuty_=ZZ?= \xff\xfe\r\n"
        "Content-Type: multipart/mixed; boundary=\"nigdy-nie-zamknieta\"\r\n"
        "Content-Transfer-Encoding: base64\r\n\r\n"
        "--nigdy-nie-zamknieta\r\nContent-Type: text/plain; charset=nonexistent-charset\r\n"
        "Content-Transfer-Encoding: quoted-printable\r\n\r\n=C5=BC=G0 =\r\n"
    ).encode("latin-1")
    assert send(server.port, MEMBERS[1], [POST_ADDR], broken) == {}
    server.drain()
    assert sorted(sink.recipients()) == sorted(MEMBERS + [OWNER])
    assert dkimpy.verify(sink.messages[0].data, dnsfunc=dkim_dnsfunc(server.key))


def test_two_lists_in_one_transaction_each_once(running) -> None:  # type: ignore[no-untyped-def]
    server, sink = running
    server.call(server.store.create_list("financing", {}, [OWNER]))
    server.call(server.store.add_members("financing", [(MEMBERS[0], "", ""), ("jan@nfosigw.gov.pl", "", "")]))
    rcpts = [POST_ADDR, f"financing@{DOMAIN}", POST_ADDR.upper()]
    assert send(server.port, MEMBERS[0], rcpts, POLISH_POST) == {}
    server.drain()
    per_rcpt: dict[str, int] = {}
    for rcpt in sink.recipients():
        per_rcpt[rcpt] = per_rcpt.get(rcpt, 0) + 1
    # Anna is on both lists: one copy from each list, and no list twice.
    assert per_rcpt[MEMBERS[0]] == 2
    assert per_rcpt["jan@nfosigw.gov.pl"] == 1
    assert per_rcpt[MEMBERS[1]] == 1
    assert len(sink.messages) == len(MEMBERS) + 1 + 3  # personalized: one transaction per copy


def test_owner_mail_forwarded_and_commands_stored(running) -> None:  # type: ignore[no-untyped-def]
    server, sink = running
    msg = b"From: ktos@example.com\r\nSubject: pytanie\r\n\r\nCzy mog\xc4\x99 do\xc5\x82\xc4\x85czy\xc4\x87?\r\n"
    send(server.port, "ktos@example.com", [f"{LIST}-owner@{DOMAIN}"], msg)
    send(server.port, "ktos@example.com", [f"{LIST}-request@{DOMAIN}"], b"Subject: help\r\n\r\nhelp\r\n")
    send(server.port, "", [f"{LIST}-bounces+ktos=example.com@{DOMAIN}"], b"Subject: bounce\r\n\r\nx\r\n")
    server.drain()
    assert b"Czy mog\xc4\x99" in sink.copies_for(OWNER)[0].data
    help_reply = email.message_from_bytes(sink.copies_for("ktos@example.com")[0].data, policy=email.policy.default)
    assert help_reply["Auto-Submitted"] == "auto-replied" and f"{LIST}-join@{DOMAIN}" in help_reply.get_content()
    assert server.call(server.store.incoming_with("request", "done"))[0].sender == "ktos@example.com"
    # Bounces are never answered; the VERP address names the recipient even
    # though the text says nothing useful.
    bounce = server.call(server.store.incoming_with("bounces", "done"))[0]
    assert bounce.detail == "ktos=example.com" and bounce.mail_from == ""
    assert "ktos@example.com" in bounce.reason
    assert [m for m in sink.messages if "ktos@example.com" in m.rcpt_tos and b"bounce" in m.data.lower()] == []


def test_loops_and_automatic_mail_are_not_distributed(running) -> None:  # type: ignore[no-untyped-def]
    server, sink = running
    looped = b"List-Id: <seap-planning.lists.example.org>\r\n" + POLISH_POST
    auto = b"Auto-Submitted: auto-replied\r\n" + POLISH_POST
    send(server.port, MEMBERS[0], [POST_ADDR], looped)
    send(server.port, MEMBERS[0], [POST_ADDR], auto)
    send(server.port, "", [POST_ADDR], POLISH_POST)
    server.drain()
    assert sink.messages == []
    rows = committed(server.config.store_target, "SELECT status, reason FROM incoming ORDER BY id")
    assert [r[0] for r in rows] == ["discarded"] * 3
    assert "loop" in rows[0][1] and "Auto-Submitted" in rows[1][1] and "envelope" in rows[2][1]


def test_lmtp_replies_per_recipient(tmp_path: Path, sink, start_server) -> None:  # type: ignore[no-untyped-def]
    handler, port = sink
    server = start_server(make_config(tmp_path, port, server={"protocol": "lmtp"}))
    server.call(server.store.create_list(LIST, {}, [OWNER]))
    server.call(server.store.create_list("financing", {}, [OWNER]))
    server.call(server.store.add_ban(MEMBERS[0], "financing"))
    server.call(server.store.add_members(LIST, [(MEMBERS[0], "", "")]))
    with smtplib.LMTP("127.0.0.1", server.port) as client:
        client.ehlo_or_helo_if_needed()
        client.mail(MEMBERS[0])
        assert client.rcpt(POST_ADDR)[0] == 250
        assert client.rcpt(f"financing@{DOMAIN}")[0] == 250
        client.putcmd("data")
        assert client.getreply()[0] == 354
        client.send(POLISH_POST + b".\r\n")
        first, second = client.getreply(), client.getreply()
    assert first[0] == 250 and second[0] == 550  # RFC 2033: one reply per recipient
    server.drain()
    assert sorted(handler.recipients()) == sorted([MEMBERS[0], OWNER])


def test_internal_error_is_451_and_server_keeps_serving(running) -> None:  # type: ignore[no-untyped-def]
    server, sink = running
    committed(server.config.store_target, "ALTER TABLE incoming RENAME TO incoming_away")
    try:
        with pytest.raises(smtplib.SMTPDataError) as exc:
            send(server.port, MEMBERS[0], [POST_ADDR], POLISH_POST)
        assert exc.value.smtp_code == 451 and b"4.3.0" in exc.value.smtp_error
    finally:
        committed(server.config.store_target, "ALTER TABLE incoming_away RENAME TO incoming")
    assert send(server.port, MEMBERS[0], [POST_ADDR], POLISH_POST) == {}
    server.drain()
    assert len(sink.recipients()) == len(MEMBERS) + 1


def test_temporary_failures_retry_and_permanent_ones_are_recorded(tmp_path: Path, sink, start_server) -> None:  # type: ignore[no-untyped-def]
    handler, port = sink
    handler.reject = {MEMBERS[1]: "451 4.2.1 try later", MEMBERS[2]: "550 5.1.1 no such user"}
    server = start_server(make_config(tmp_path, port), retry_initial=0.2)
    server.call(server.store.create_list(LIST, {}, [OWNER]))
    server.call(server.store.add_members(LIST, [(m, "", "") for m in MEMBERS]))
    send(server.port, MEMBERS[0], [POST_ADDR], POLISH_POST)
    wait_for(lambda: len(handler.recipients()) == 2)
    time.sleep(0.5)
    handler.reject.pop(MEMBERS[1])  # the provider recovers
    wait_for(lambda: MEMBERS[1] in handler.recipients())
    server.drain()
    status = {r: (s, reply) for r, s, reply in server.call(server.store.deliveries_for(1))}
    assert status[MEMBERS[1]][0] == "sent"
    assert status[MEMBERS[2]] == ("failed", "550 5.1.1 no such user")
    assert MEMBERS[2] not in handler.recipients()


def test_relay_down_then_back(tmp_path: Path, start_server) -> None:  # type: ignore[no-untyped-def]
    from aiosmtpd.controller import Controller
    import socket

    with socket.socket() as s:  # a port with nobody listening
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = start_server(make_config(tmp_path, port), retry_initial=0.2)
    server.call(server.store.create_list(LIST, {}, [OWNER]))
    server.call(server.store.add_members(LIST, [(m, "", "") for m in MEMBERS]))
    assert send(server.port, MEMBERS[0], [POST_ADDR], POLISH_POST) == {}  # still accepted
    wait_for(lambda: any(r["last_reply"] for r in server.call(server.store.queue_summary())))
    summary = server.call(server.store.queue_summary())
    assert summary[0]["pending"] == len(MEMBERS) + 1 and "4.4.1" in summary[0]["last_reply"]
    handler = SinkHandler()
    controller = Controller(handler, hostname="127.0.0.1", port=port)
    controller.start()
    try:
        wait_for(lambda: len(handler.recipients()) == len(MEMBERS) + 1, timeout=30)
    finally:
        controller.stop()


def test_maildir_mode_writes_a_signed_copy_per_member(tmp_path: Path, start_server) -> None:  # type: ignore[no-untyped-def]
    server = start_server(make_config(tmp_path))  # no relay: the newcomer's mode
    server.call(server.store.create_list(LIST, {}, [OWNER]))
    server.call(server.store.add_members(LIST, [(m, "", "") for m in MEMBERS]))
    send(server.port, MEMBERS[0], [POST_ADDR], POLISH_POST)
    server.drain()
    for rcpt in MEMBERS + [OWNER]:
        files = list((server.config.maildir_root / rcpt / "new").iterdir())
        assert len(files) == 1, rcpt
        data = files[0].read_bytes()
        verp = bounces_address(LIST, DOMAIN, rcpt)
        assert data.startswith(f"Return-Path: <{verp}>\nDelivered-To: {rcpt}\n".encode())
        assert dkimpy.verify(data.split(b"\n", 2)[2], dnsfunc=dkim_dnsfunc(server.key))


def _txt_resolver(records: dict[str, list[str]]):  # type: ignore[no-untyped-def]
    from listserv.dns import DictResolver

    return DictResolver(records)


def test_dmarc_when_strict_rewrites_only_strict_domains(tmp_path: Path, sink, start_server) -> None:  # type: ignore[no-untyped-def]
    handler, port = sink
    resolver = _txt_resolver({
        "_dmarc.gmina-wieliczka.pl": ["v=DMARC1; p=reject; rua=mailto:d@gmina-wieliczka.pl"],
        "_dmarc.um.krakow.pl": ["v=DMARC1; p=none"],
    })
    server = start_server(make_config(tmp_path, port), resolver=resolver)
    # (Unsigned posts from a p=reject domain would be held as possibly forged: that has its own tests.)
    server.call(server.store.create_list(LIST, {"dmarc_mitigation": "when_strict", "sender_authentication": "off"},
                                         [OWNER]))
    server.call(server.store.add_members(LIST, [(m, "", "") for m in MEMBERS]))
    send(server.port, MEMBERS[0], [POST_ADDR], POLISH_POST)
    lukasz = POLISH_POST.replace(b"anna.kowalska@gmina-wieliczka.pl", MEMBERS[1].encode()).replace(
        b"<seap-1@", b"<seap-2@")
    send(server.port, MEMBERS[1], [POST_ADDR], lukasz)
    server.drain()
    froms = {}
    for m in handler.messages:
        msg = email.message_from_bytes(m.data, policy=email.policy.default)
        froms[msg["Message-ID"]] = (str(msg["From"]), msg["Reply-To"])
    assert POST_ADDR in froms["<seap-1@gmina-wieliczka.pl>"][0]  # p=reject: rewritten
    assert froms["<seap-2@gmina-wieliczka.pl>"][0].endswith(f"<{MEMBERS[1]}>")  # p=none: left alone
    assert froms["<seap-2@gmina-wieliczka.pl>"][1] is None


def test_dmarc_when_strict_reads_sp_the_public_suffix_list_and_one_record(tmp_path: Path, sink, start_server) -> None:  # type: ignore[no-untyped-def]
    """RFC 7489 §6.6.3 through the shared listserv.dmarc, over real SMTP: who gets a list From."""
    handler, port = sink
    subdomain = "sekretariat@bip.gmina-wieliczka.pl"
    resolver = _txt_resolver({
        # The town asks nothing for itself and "reject" for every subdomain (sp=).
        "_dmarc.gmina-wieliczka.pl": ["v=DMARC1; p=none; sp=reject; rua=mailto:d@gmina-wieliczka.pl"],
        # krakow.pl is a public suffix (PSL, ".pl domains (grandfathered)"): um.krakow.pl is an
        # organization of its own, and this record is not its policy.
        "_dmarc.krakow.pl": ["v=DMARC1; p=reject"],
        # Two DMARC records: no policy applies (§6.6.3 step 5), nobody would reject on DMARC.
        "_dmarc.energia-agencja.pl": ["v=DMARC1; p=reject", "v=DMARC1; p=quarantine"],
    })
    server = start_server(make_config(tmp_path, port), resolver=resolver)
    server.call(server.store.create_list(LIST, {"dmarc_mitigation": "when_strict", "sender_authentication": "off"},
                                         [OWNER]))
    server.call(server.store.add_members(LIST, [(m, "", "") for m in [*MEMBERS, subdomain]]))
    authors = [subdomain, *MEMBERS]
    for n, author in enumerate(authors):
        post = POLISH_POST.replace(b"anna.kowalska@gmina-wieliczka.pl", author.encode()).replace(
            b"<seap-1@", f"<dmarc-{n}@".encode())
        send(server.port, author, [POST_ADDR], post)
    server.drain()
    wait_for(lambda: len(handler.messages) >= len(authors))
    froms = {}
    for m in handler.messages:
        msg = email.message_from_bytes(m.data, policy=email.policy.default)
        froms[msg["Message-ID"].split("@")[0].strip("<")] = (str(msg["From"]), msg["Reply-To"])
    assert POST_ADDR in froms["dmarc-0"][0] and subdomain in str(froms["dmarc-0"][1])  # sp=reject: rewritten
    for n, author in enumerate(MEMBERS, start=1):  # p=none, someone else's record, two records: left alone
        assert froms[f"dmarc-{n}"][0].endswith(f"<{author}>"), (author, froms[f"dmarc-{n}"])
        assert froms[f"dmarc-{n}"][1] is None


def test_held_post_approved_then_delivered_and_rejected_one_told(running) -> None:  # type: ignore[no-untyped-def]
    server, sink = running
    stranger = "radny@powiat-example.pl"
    post = POLISH_POST.replace(b"anna.kowalska@gmina-wieliczka.pl", stranger.encode())
    send(server.port, stranger, [POST_ADDR], post)
    send(server.port, stranger, [POST_ADDR], post.replace(b"<seap-1@", b"<seap-9@"))
    server.drain()
    first, second = server.call(server.store.held(LIST))
    server.call(server.store.set_incoming_status(first.id, "accepted", expect="held"))  # what `held approve` does
    server.drain()
    wait_for(lambda: all(sink.copies_for(m) for m in MEMBERS))
    # Rejecting goes through the CLI, which tells the sender (the one mail we send for a held post).
    from click.testing import CliRunner

    from listserv.cli import main

    cfg = server.config  # the CLI reads a config file: one naming the same state and key
    tmp_cfg = cfg.server.state_dir.parent / "cli.toml"
    tmp_cfg.write_text(
        f'[server]\ndomain = "{DOMAIN}"\nstate_dir = "{cfg.server.state_dir}"\n'
        f'[dkim]\nselector = "{cfg.dkim.selector}"\nprivate_key = "{cfg.dkim.private_key}"\n'
        + store_toml(cfg)
    )
    result = CliRunner().invoke(main, ["held", "reject", str(second.id), "--reason", "Proszę o krótszy wpis",
                                       "--config", str(tmp_cfg)])
    assert result.exit_code == 0, result.output
    # The stranger was told twice "your post waits" (once per post), then the rejection.
    wait_for(lambda: len(sink.copies_for(stranger)) == 3)
    data = sink.copies_for(stranger)[-1].data
    notice = email.message_from_bytes(data, policy=email.policy.default)
    assert notice["Auto-Submitted"] == "auto-replied"
    assert notice["Subject"].startswith("Wiadomość nie została opublikowana")
    assert notice["In-Reply-To"] == "<seap-9@gmina-wieliczka.pl>"
    assert "Proszę o krótszy wpis" in notice.get_content()
    assert dkimpy.verify(data, dnsfunc=dkim_dnsfunc(server.key))
    assert server.call(server.store.held(LIST)) == []


def test_idle_client_is_disconnected(tmp_path: Path, start_server) -> None:  # type: ignore[no-untyped-def]
    server = start_server(make_config(tmp_path, server={"timeout": 1}))
    with smtplib.SMTP("127.0.0.1", server.port) as client:
        client.ehlo("idle.example")
        time.sleep(1.5)
        with pytest.raises(smtplib.SMTPServerDisconnected):
            client.noop()
            client.noop()


def test_attachment_type_the_list_holds_holds_the_post(running) -> None:  # type: ignore[no-untyped-def]
    from email.message import EmailMessage

    server, sink = running
    server.call(server.store.set_list_setting(LIST, "attachments", {"strip": [], "hold": ["application/zip"]}))
    m = EmailMessage()
    m["From"] = MEMBERS[0]
    m["To"] = POST_ADDR
    m["Subject"] = "Dokumenty SEAP"
    m["Message-ID"] = "<zip-1@gmina-wieliczka.pl>"
    m.set_content("W załączniku paczka dokumentów.")
    m.add_attachment(b"PK\x03\x04 nie-prawdziwy-zip", maintype="application", subtype="zip", filename="seap.zip")
    send(server.port, MEMBERS[0], [POST_ADDR], m.as_bytes(policy=email.policy.SMTP))
    server.drain()
    (held,) = server.call(server.store.held(LIST))
    assert "application/zip" in held.reason
    assert not any("Dokumenty SEAP" in str(email.message_from_bytes(c.data)["Subject"])
                   and MEMBERS[1] in c.rcpt_tos for c in sink.messages)


def test_owner_mail_that_cannot_be_forwarded_is_recorded_and_does_not_block_the_rest(running) -> None:  # type: ignore[no-untyped-def]
    server, sink = running
    server.call(server.store.create_list("bez-wlasciciela", {}, []))
    send(server.port, "ktos@example.com", [f"bez-wlasciciela-owner@{DOMAIN}"],
         b"From: ktos@example.com\r\nSubject: halo\r\n\r\nczy ktos tu jest?\r\n")
    send(server.port, "ktos@example.com", [f"{LIST}-owner@{DOMAIN}"],  # no From: cannot be signed
         b"Subject: bez nadawcy\r\n\r\ntresc\r\n")
    send(server.port, "ktos@example.com", [f"{LIST}-owner@{DOMAIN}"],
         b"From: ktos@example.com\r\nSubject: pytanie\r\n\r\nCzy mog\xc4\x99 do\xc5\x82\xc4\x85czy\xc4\x87?\r\n")
    server.drain()
    rows = committed(server.config.store_target,
                     "SELECT subject, status, reason FROM incoming WHERE kind = 'owner' ORDER BY id")
    assert rows[0][1] == "failed" and "no owner" in rows[0][2]
    assert rows[1][1] == "failed" and "cannot be forwarded" in rows[1][2]
    assert rows[2][1] == "done"
    assert b"Czy mog\xc4\x99" in sink.copies_for(OWNER)[0].data
