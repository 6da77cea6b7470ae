"""Bounces and relay outages end to end: a real listserv on 127.0.0.1, aiosmtpd as the relay.

Issue 6's checks that need the whole server:

* the relay refuses some members with ``550 5.1.1`` (their fault) and others with
  ``550 5.7.26`` (the author's domain's DMARC policy: not their fault); only the first
  kind accumulate score and are paused at ``bounce_score_threshold``; the owners get a
  policy report;
* a DSN mailed to the VERP address counts for the member it names, even when its text
  cannot be parsed; an out-of-office reply to the same address does not count; the
  paused member gets a notice from ``LIST-confirm+TOKEN@`` and replying to it resumes
  delivery; after ``bounce_warnings`` reminders the member is removed and the owners told;
* ``listserv bounces`` and ``listserv members list`` show scores and delivery status;
* a relay refusing connections: posts are still accepted, wait in the queue with the
  reason, and all go out, oldest first, once it is back; a relay answering 421 to every
  attempt is retried with growing gaps, and ``listserv queue retry`` forces an attempt.

Scores grow at most once a day, so the bounce stage's clock is a fake the tests move
forward; everything else (SMTP in, delivery, the worker's passes) runs for real.
"""

from __future__ import annotations

import asyncio
import email
import email.policy
import json
import re
import smtplib
import threading
import time
from collections.abc import Callable, Iterator
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, Envelope, Session
from click.testing import CliRunner

from conftest import DOMAIN, SELECTOR, RunningServer, SinkHandler, committed, free_port, make_config, store_toml
from listserv.cli import main

LIST = "energia-gmin"
POST_ADDR = f"{LIST}@{DOMAIN}"
OWNER = "koordynator@pnec.org.pl"
POSTER = "sekretariat@gmina.example.pl"
DAY = 86400.0

USER_UNKNOWN = "550 5.1.1 <{rcpt}>: Recipient address rejected: User unknown"
DMARC_REFUSAL = ("550 5.7.26 Unauthenticated email from gmina.example.pl is not accepted due to domain's "
                 "DMARC policy")


class FakeClock:
    """The bounce stage's clock: real time at first, moved forward by the test."""

    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> float:
        self.now += seconds
        return self.now


def post_bytes(n: int, sender: str = POSTER, subject: str = "Audyt energetyczny") -> bytes:
    return (
        f"From: Sekretariat Gminy <{sender}>\r\n"
        f"To: {POST_ADDR}\r\n"
        f"Subject: {subject} {n}\r\n"
        f"Message-ID: <post-{n}@gmina.example.pl>\r\n"
        "Date: Thu, 26 Nov 2026 09:30:00 +0100\r\n"
        "MIME-Version: 1.0\r\n"
        "Content-Type: text/plain; charset=utf-8\r\n"
        "Content-Transfer-Encoding: 8bit\r\n"
        "\r\n"
        f"Dzień dobry,\r\n\r\nwiadomość numer {n} w sprawie audytu energetycznego szkół.\r\n"
    ).encode()


def send(port: int, mail_from: str, rcpt: str, data: bytes) -> None:
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
        refused = client.sendmail(mail_from, [rcpt], data)
    assert refused == {}


def post(server: RunningServer, n: int, sender: str = POSTER) -> None:
    """A member's post, accepted with a 250 (sendmail raises on anything else)."""
    send(server.port, sender, POST_ADDR, post_bytes(n, sender))


def verp(rcpt: str) -> str:
    local, _, domain = rcpt.rpartition("@")
    return f"{LIST}-bounces+{local}={domain}@{DOMAIN}"


def dsn(rcpt: str, status: str, diagnostic: str, original: int) -> bytes:
    """An RFC 3464 report as Postfix writes it (Auto-Submitted included, as Postfix does)."""
    return (
        "From: Mail Delivery System <MAILER-DAEMON@mx.poczta.example.pl>\r\n"
        f"To: {verp(rcpt)}\r\n"
        "Subject: Undelivered Mail Returned to Sender\r\n"
        "Auto-Submitted: auto-replied\r\n"
        "MIME-Version: 1.0\r\n"
        'Content-Type: multipart/report; report-type=delivery-status; boundary="B1"\r\n'
        f"Message-ID: <dsn-{time.monotonic_ns()}@mx.poczta.example.pl>\r\n"
        "\r\n"
        "--B1\r\nContent-Type: text/plain; charset=us-ascii\r\n\r\n"
        "This is the mail system at host mx.poczta.example.pl.\r\n\r\n"
        "I'm sorry to have to inform you that your message could not\r\nbe delivered to one or more recipients.\r\n"
        "\r\n--B1\r\nContent-Type: message/delivery-status\r\n\r\n"
        "Reporting-MTA: dns; mx.poczta.example.pl\r\n\r\n"
        f"Final-Recipient: rfc822; {rcpt}\r\nOriginal-Recipient: rfc822; {rcpt}\r\n"
        f"Action: failed\r\nStatus: {status}\r\nDiagnostic-Code: smtp; {diagnostic}\r\n"
        "\r\n--B1\r\nContent-Type: text/rfc822-headers\r\n\r\n"
        f"From: Sekretariat Gminy <{POSTER}>\r\nTo: {POST_ADDR}\r\n"
        f"Subject: Audyt energetyczny {original}\r\nMessage-ID: <post-{original}@gmina.example.pl>\r\n"
        "\r\n--B1--\r\n"
    ).encode()


def unparseable_bounce(rcpt: str, original: int) -> bytes:
    """A bounce no parser understands: it names no failed address, only the returned post."""
    return (
        "From: MAILER-DAEMON@bramka.urzad.example.pl\r\n"
        f"To: {verp(rcpt)}\r\n"
        "Subject: Returned mail\r\n"
        "\r\n"
        "Sorry, your message could not be delivered. Error 17.\r\n"
        "\r\n------ original message ------\r\n"
        f"From: Sekretariat Gminy <{POSTER}>\r\nTo: {POST_ADDR}\r\n"
        f"Subject: Audyt energetyczny {original}\r\nMessage-ID: <post-{original}@gmina.example.pl>\r\n"
        "\r\nDzień dobry,\r\n"
    ).encode("utf-8")


def out_of_office(member: str) -> bytes:
    m = EmailMessage()
    m["From"] = f"Katarzyna Wójcik <{member}>"
    m["To"] = verp(member)
    m["Subject"] = "Nieobecność w biurze: Audyt energetyczny 1"
    m["Auto-Submitted"] = "auto-replied"
    m["Message-ID"] = f"<ooo-{time.monotonic_ns()}@urzad.example.pl>"
    m.set_content("Dzień dobry,\n\njestem na urlopie do 7 grudnia. W pilnych sprawach proszę dzwonić do "
                  "sekretariatu.\n\nKatarzyna Wójcik\n")
    return m.as_bytes()


def parsed(data: bytes) -> email.message.EmailMessage:
    return email.message_from_bytes(data, policy=email.policy.default)  # type: ignore[return-value]


def wait_for(predicate: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"not reached within {timeout:.0f} s: {what}")


def sql(server: RunningServer, query: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    return committed(server.config.store_target, query, params)


def score_of(server: RunningServer, address: str) -> tuple[float, str]:
    rows = sql(server, "SELECT bounce_score, delivery FROM members WHERE address = ?", (address,))
    assert rows, f"{address} is not a member"
    return float(rows[0][0]), str(rows[0][1])


def bounces_done(server: RunningServer) -> list[tuple[str, str]]:
    """(status, reason) of every mail received at LIST-bounces@, oldest first."""
    return [(r[0], r[1]) for r in sql(server, "SELECT status, reason FROM incoming WHERE kind = 'bounces'"
                                              " ORDER BY id")]


def mail_bounce(server: RunningServer, data: bytes, rcpt: str) -> tuple[str, str]:
    """Send one message to a bounce address (null sender) and wait until the bounce stage has read it."""
    before = len(bounces_done(server))
    send(server.port, "", rcpt, data)
    wait_for(lambda: len(bounces_done(server)) > before and bounces_done(server)[before][0] != "new",
             "the bounce stage read the message")
    return bounces_done(server)[before]


def events(server: RunningServer, address: str) -> list[tuple[str, str, str, int]]:
    """(source, cause, status, counted) of the bounce events recorded for an address."""
    return [(r[0], r[1], r[2], int(r[3])) for r in sql(
        server, "SELECT source, cause, status, counted FROM bounce_events WHERE address = ? ORDER BY id", (address,))]


def write_cli_config(tmp_path: Path, server: RunningServer | None = None) -> Path:
    """A config file for `listserv` commands pointing at the running server's state (and store)."""
    q = json.dumps
    cfg = tmp_path / "listserv.toml"
    cfg.write_text(
        f"[server]\ndomain = {q(DOMAIN)}\nstate_dir = {q(str(tmp_path / 'state'))}\n"
        f"\n[dkim]\nselector = {q(SELECTOR)}\nprivate_key = {q(str(tmp_path / 'dkim.key'))}\n"
        f"\n[archive]\ndir = {q(str(tmp_path / 'archive'))}\n"
        '\n[dns]\nnameservers = ["127.0.0.1:9"]\ntimeout = 0.5\n'
        + store_toml(server.config if server is not None else None),
        encoding="utf-8",
    )
    return cfg


def listserv(cfg: Path, *args: str) -> str:
    result = CliRunner().invoke(main, [*args, "--config", str(cfg)])
    assert result.exit_code == 0, (result.exit_code, result.output, result.exception)
    return result.stdout


def start_list(start_server: Callable[..., RunningServer], tmp_path: Path, relay_port: int,
               members: list[str], settings: dict[str, Any] | None = None, **app: Any) -> RunningServer:
    server = start_server(make_config(tmp_path, relay_port), **app)
    server.call(server.store.create_list(LIST, {"title": "Energia w gminach", **(settings or {})}, [OWNER]))
    server.call(server.store.add_members(LIST, [(m, "", "") for m in [POSTER, *members]]))
    return server


# -- the member's fault, and not ------------------------------------------------------------------


GONE = ["jan.kowalski@stara-gmina.example.pl", "biuro@zlikwidowana.example.pl"]
DMARC = ["anna.nowak@gmail.example", "piotr@poczta.example.com"]
FINE = ["zofia@energia-agencja.example.pl"]


def test_only_user_unknown_counts_and_pauses_dmarc_refusals_go_to_the_owners(
        tmp_path: Path, sink: tuple[SinkHandler, int], start_server) -> None:  # type: ignore[no-untyped-def]
    handler, port = sink
    for rcpt in GONE:
        handler.reject[rcpt] = USER_UNKNOWN.format(rcpt=rcpt)
    for rcpt in DMARC:
        handler.reject[rcpt] = DMARC_REFUSAL
    server = start_list(start_server, tmp_path, port, GONE + DMARC + FINE, {"bounce_score_threshold": 2})
    clock = FakeClock()
    server.app.bounce_stage.clock = clock

    # Day 0: two posts.  Both bounce for GONE, but a score grows at most once a day.
    post(server, 1)
    post(server, 2)
    server.drain()
    for rcpt in GONE:
        assert score_of(server, rcpt) == (1.0, "enabled")
        assert [e[1:] for e in events(server, rcpt)] == [("mailbox_gone", "5.1.1", 1), ("mailbox_gone", "5.1.1", 0)]
    # Day 1: 1 halved over a day of a 7-day half-life, plus 1: still under 2.
    clock.advance(DAY)
    post(server, 3)
    server.drain()
    for rcpt in GONE:
        score, delivery = score_of(server, rcpt)
        assert delivery == "enabled" and 1.85 < score < 2.0
    # Day 2: over the threshold: paused.
    clock.advance(DAY)
    post(server, 4)
    server.drain()
    for rcpt in GONE:
        score, delivery = score_of(server, rcpt)
        assert delivery == "disabled" and score >= 2.0, (rcpt, score)
        # The "delivery paused" notice was tried (and refused by the dead mailbox: a notice never scores).
        assert sql(server, "SELECT d.status FROM deliveries d JOIN outbox o ON o.id = d.outbox_id"
                           " WHERE o.kind = 'notice' AND d.recipient = ?", (rcpt,)) == [("failed",)]
    # The DMARC refusals were the author's domain's doing: recorded, never counted.
    for rcpt in DMARC:
        assert score_of(server, rcpt) == (0.0, "enabled")
        recorded = events(server, rcpt)
        assert len(recorded) == 4 and all(e == ("relay", "policy", "5.7.26", 0) for e in recorded), recorded
    for rcpt in FINE:
        assert score_of(server, rcpt) == (0.0, "enabled")
        assert len(handler.copies_for(rcpt)) == 4

    # A paused member is no longer sent posts; the DMARC-refused ones still are.
    refused_before = {r: len(events(server, r)) for r in GONE + DMARC}
    post(server, 5)
    server.drain()
    assert all(len(events(server, r)) == refused_before[r] for r in GONE)
    assert all(len(events(server, r)) == refused_before[r] + 1 for r in DMARC)
    assert not sql(server, "SELECT recipient FROM deliveries d JOIN outbox o ON o.id = d.outbox_id"
                           " WHERE o.kind LIKE 'post%' AND d.recipient IN (?, ?) AND o.id = (SELECT max(id) FROM"
                           " outbox WHERE kind LIKE 'post%')", tuple(GONE))

    # The worker's housekeeping (due again once the clock has moved on) reports the policy refusals.
    clock.advance(700)

    def reports() -> list[email.message.EmailMessage]:
        return [parsed(m.data) for m in handler.copies_for(OWNER)
                if "Odmowy doręczenia" in str(parsed(m.data)["Subject"])]

    wait_for(lambda: bool(reports()), "the owners' policy report")
    report = reports()[-1]
    assert report["Auto-Submitted"] == "auto-generated"
    text = report.get_content()
    assert "5.7.26" in text and "DMARC" in text
    assert "5.1.1" not in text  # the members' own failures are not the post's fault
    assert all(OWNER in m.rcpt_tos and len(m.rcpt_tos) == 1 for m in handler.copies_for(OWNER))

    # What an administrator sees.
    cfg = write_cli_config(tmp_path, server)
    shown = listserv(cfg, "bounces").splitlines()
    assert listserv(cfg, "bounces", "show", LIST).splitlines() == shown
    assert [line.split("\t")[1] for line in shown] == sorted(GONE)  # DMARC-refused members: not listed
    for line in shown:
        name, address, score, delivery, reason = line.split("\t")
        assert name == LIST and delivery == "disabled"
        assert re.fullmatch(r"2\.\d\d", score) and float(score) == pytest.approx(score_of(server, address)[0], abs=0.005)
        assert "5.1.1" in reason and "User unknown" in reason
    members = {line.split("\t")[0]: line.split("\t")[3] for line in listserv(cfg, "members", "list", LIST).splitlines()}
    assert all(members[r] == "disabled" for r in GONE)
    assert all(members[r] == "enabled" for r in DMARC + FINE + [OWNER, POSTER])


def test_bounces_show_on_an_unknown_list_is_one_error_line(tmp_path: Path) -> None:
    cfg = write_cli_config(tmp_path)
    assert listserv(cfg, "bounces") == "no bounces\n"
    result = CliRunner().invoke(main, ["bounces", "show", "nie-ma-takiej", "--config", str(cfg)])
    assert result.exit_code == 1
    assert result.stderr.startswith("listserv: error: ") and "nie-ma-takiej" in result.stderr


# -- bounces by mail: VERP, auto-replies, the notice and its reply -------------------------------------


KASIA = "katarzyna.wojcik@urzad.example.pl"


def test_verp_dsn_counts_for_its_member_auto_reply_does_not_and_reply_resumes(
        tmp_path: Path, sink: tuple[SinkHandler, int], start_server) -> None:  # type: ignore[no-untyped-def]
    handler, port = sink
    server = start_list(start_server, tmp_path, port, [KASIA, *FINE], {"bounce_score_threshold": 1.3})
    clock = FakeClock()
    server.app.bounce_stage.clock = clock
    post(server, 1)
    server.drain()
    assert len(handler.copies_for(KASIA)) == 1

    # Day 0: her mailbox server sends a proper RFC 3464 report to her VERP address.
    status, reason = mail_bounce(server, dsn(KASIA, "5.1.1", "550 5.1.1 <katarzyna.wojcik@urzad.example.pl>: "
                                             "Recipient address rejected: User unknown", 1), verp(KASIA))
    assert status == "done" and "mailbox_gone" in reason, reason
    assert score_of(server, KASIA) == (1.0, "enabled")

    # Day 1: her out-of-office answer comes to the same address: not a bounce, not counted.
    clock.advance(DAY)
    status, reason = mail_bounce(server, out_of_office(KASIA), verp(KASIA))
    assert (status, reason) == ("done", "not counted: auto_reply")
    assert score_of(server, KASIA) == (1.0, "enabled")
    assert len(events(server, KASIA)) == 1

    # Still day 1: a bounce nobody can parse, naming only the returned post (and its author,
    # who is a member too): the envelope says whose copy it was.
    status, reason = mail_bounce(server, unparseable_bounce(KASIA, 1), verp(KASIA))
    assert status == "done" and KASIA in reason and POSTER not in reason, reason
    assert events(server, KASIA)[-1] == ("dsn", "unknown", "", 1)
    assert events(server, POSTER) == []
    assert score_of(server, POSTER) == (0.0, "enabled")
    score, delivery = score_of(server, KASIA)
    assert score == pytest.approx(0.5 ** (1 / 7) + 0.5) and delivery == "disabled"

    # Paused: she is told, from a reply address that carries a token ...
    server.drain()
    notices = [parsed(m.data) for m in handler.copies_for(KASIA)[1:]]
    assert len(notices) == 1
    notice = notices[0]
    assert str(notice["Subject"]).startswith("Wstrzymano wysyłanie")
    assert notice["Auto-Submitted"] == "auto-generated"
    m = re.search(r"<([^>]+)>", str(notice["From"]))
    assert m and re.fullmatch(rf"{LIST}-confirm\+[A-Za-z0-9_-]+@{re.escape(DOMAIN)}", m.group(1)), notice["From"]
    confirm = m.group(1)
    assert handler.copies_for(KASIA)[-1].mail_from == verp(KASIA)  # the notice is a probe: it may bounce too
    # ... and posts no longer go to her.
    post(server, 2)
    server.drain()
    assert len(handler.copies_for(KASIA)) == 2 and len(handler.copies_for(FINE[0])) == 2

    # She answers the notice: delivery resumes, the score starts again from zero.
    answer = EmailMessage()
    answer["From"] = KASIA
    answer["To"] = confirm
    answer["Subject"] = f"Re: {notice['Subject']}"
    answer["In-Reply-To"] = notice["Message-ID"]
    answer["Message-ID"] = f"<odp-{time.monotonic_ns()}@urzad.example.pl>"
    answer.set_content("Skrzynka już działa.\n")
    send(server.port, KASIA, confirm, answer.as_bytes())
    wait_for(lambda: score_of(server, KASIA) == (0.0, "enabled"), "delivery to her resumed")
    post(server, 3)
    server.drain()
    assert any(b"wiadomo\xc5\x9b\xc4\x87 numer 3" in c.data for c in handler.copies_for(KASIA))
    assert [e.event for e in server.call(server.store.consent_history(LIST, KASIA))] == ["joined"]


def test_the_pause_notice_is_in_the_members_own_language(
        tmp_path: Path, sink: tuple[SinkHandler, int], start_server) -> None:  # type: ignore[no-untyped-def]
    handler, port = sink
    server = start_list(start_server, tmp_path, port, [KASIA, *FINE], {"bounce_score_threshold": 1.3})
    server.call(server.store.set_member(LIST, KASIA, "language", "en"))
    clock = FakeClock()
    server.app.bounce_stage.clock = clock
    post(server, 1)
    server.drain()
    for n in (1, 2):  # one bounce a day counts
        clock.advance(DAY)
        status, _ = mail_bounce(server, dsn(KASIA, "5.1.1", "550 5.1.1 User unknown", n), verp(KASIA))
        assert status == "done"
    assert score_of(server, KASIA)[1] == "disabled"
    server.drain()
    (notice,) = [parsed(m.data) for m in handler.copies_for(KASIA)[1:]]
    assert str(notice["Subject"]).strip().startswith("Delivery of ") and "is paused" in str(notice["Subject"])


def test_paused_member_is_removed_after_the_reminders_and_the_owners_told(
        tmp_path: Path, sink: tuple[SinkHandler, int], start_server) -> None:  # type: ignore[no-untyped-def]
    handler, port = sink
    server = start_list(start_server, tmp_path, port, [KASIA],
                        {"bounce_score_threshold": 1, "bounce_warnings": 2, "bounce_warning_interval": "2d"})
    clock = FakeClock()
    server.app.bounce_stage.clock = clock
    mail_bounce(server, dsn(KASIA, "5.1.1", "550 5.1.1 User unknown", 1), verp(KASIA))
    assert score_of(server, KASIA)[1] == "disabled"
    server.drain()

    def paused_notices() -> int:
        return sum("Wstrzymano" in str(parsed(c.data)["Subject"]) for c in handler.copies_for(KASIA))

    def warnings_sent() -> int:
        return int(sql(server, "SELECT warnings_sent FROM members WHERE address = ?", (KASIA,))[0][0])

    assert (paused_notices(), warnings_sent()) == (1, 1)

    # Not yet time for a reminder: the worker's housekeeping leaves her alone.
    clock.advance(DAY)
    time.sleep(1.5)  # the worker passes at least once a second
    server.drain()
    assert (paused_notices(), warnings_sent()) == (1, 1)

    # Two days after the first notice: the second (and last) reminder.
    clock.advance(DAY + 60)
    wait_for(lambda: warnings_sent() == 2, "the second reminder")
    server.drain()
    assert paused_notices() == 2
    assert server.call(server.store.member(1, KASIA)) is not None

    # Two more days without an answer: removed, with the reason in her consent history, and the owners told.
    clock.advance(2 * DAY + 60)
    wait_for(lambda: server.call(server.store.member(1, KASIA)) is None, "her removal")
    history = server.call(server.store.consent_history(LIST, KASIA))
    assert [e.event for e in history] == ["joined", "left"], history
    assert history[-1].method == "bounce"
    assert "5.1.1" in history[-1].detail

    def owners_told() -> list[EmailMessage]:
        # The owners' notice is queued just after the removal commits (its own transaction).
        server.drain()
        return [parsed(c.data) for c in handler.copies_for(OWNER) if KASIA in str(parsed(c.data)["Subject"])]

    wait_for(lambda: len(owners_told()) > 0, "the owners' notice")
    told = owners_told()
    assert len(told) == 1, [str(parsed(c.data)["Subject"]) for c in handler.copies_for(OWNER)]
    assert str(told[0]["Subject"]).startswith(f"[{LIST}] Wypisano")
    assert f"listserv members add {LIST} {KASIA}" in told[0].get_content()
    assert paused_notices() == 2  # no third notice
    cfg = write_cli_config(tmp_path, server)
    assert KASIA not in listserv(cfg, "bounces")


# -- relay outages ----------------------------------------------------------------------------------


def test_posts_accepted_during_an_outage_all_go_out_oldest_first(
        tmp_path: Path, start_server) -> None:  # type: ignore[no-untyped-def]
    relay_port = free_port()  # nothing listens there yet: connection refused
    config = make_config(tmp_path, relay_port, delivery={"connections": 1})
    server = start_server(config, retry_initial=0.2)
    server.call(server.store.create_list(LIST, {"title": "Energia w gminach"}, [OWNER]))
    server.call(server.store.add_members(LIST, [(m, "", "") for m in [POSTER, KASIA, *FINE]]))
    everyone = {OWNER, POSTER, KASIA, *FINE}

    posts = list(range(1, 6))
    for n in posts:
        post(server, n)  # 250 each, relay or not
        time.sleep(0.3)  # the older posts have been retried more often (longer back-off) than the newer
    assert sql(server, "SELECT count(*) FROM incoming WHERE kind = 'post'") == [(len(posts),)]
    wait_for(lambda: sum(r["pending"] for r in server.call(server.store.queue_summary()))
             == len(posts) * len(everyone), "every copy queued")
    wait_for(lambda: all(r["last_reply"] for r in server.call(server.store.queue_summary())),
             "every post tried at least once")

    cfg = write_cli_config(tmp_path, server)
    shown = listserv(cfg, "queue", "show").splitlines()
    assert len(shown) == len(posts)
    for line in shown:
        assert f"\t{LIST}\t" in line and f"pending {len(everyone)}" in line and "sent 0" in line
        assert "4.4.1 relay unreachable" in line, line
    assert sql(server, "SELECT count(*) FROM deliveries WHERE status != 'pending'") == [(0,)]

    # The relay comes back between two rounds of attempts: every copy waits for the same next
    # round (a relay that is down is everyone's problem), which is then tried in queue order.
    # (Back in the middle of a round, the copies already refused in it would wait for the next.)
    def between_rounds() -> bool:
        due = sql(server, "SELECT DISTINCT next_attempt_at FROM deliveries WHERE status = 'pending'")
        return len(due) == 1 and due[0][0] > time.time() + 0.5

    wait_for(between_rounds, "all copies waiting for the same round, not too soon")

    handler = SinkHandler()
    controller = Controller(handler, hostname="127.0.0.1", port=relay_port, data_size_limit=None)
    controller.start()
    try:
        wait_for(lambda: len(handler.recipients()) >= len(posts) * len(everyone), "everything delivered")
        server.drain()
    finally:
        controller.stop()

    arrived = [parsed(m.data)["Message-ID"] for m in handler.messages]
    expected = [f"<post-{n}@gmina.example.pl>" for n in posts]
    assert sorted(set(arrived)) == sorted(expected)
    for n, mid in zip(posts, expected):
        got = sorted(r for m in handler.messages if parsed(m.data)["Message-ID"] == mid for r in m.rcpt_tos)
        assert got == sorted(everyone), (n, got)
    first_seen = list(dict.fromkeys(arrived))
    assert first_seen == expected, f"not oldest first: {arrived}"
    assert arrived == sorted(arrived, key=expected.index), f"a newer post overtook an older one: {arrived}"
    assert listserv(cfg, "queue") == "queue is empty\n"
    assert sql(server, "SELECT DISTINCT status FROM deliveries") == [("sent",)]


class Refusing421:
    """A relay that greets every connection with 421 and hangs up; it notes when each one came."""

    def __init__(self) -> None:
        self.attempts: list[float] = []
        self.lock = threading.Lock()
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.server: asyncio.base_events.Server | None = None

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with self.lock:
            self.attempts.append(time.monotonic())
        writer.write(b"421 4.3.2 Service not available, closing transmission channel\r\n")
        await writer.drain()
        writer.close()

    def start(self, port: int) -> None:
        self.thread.start()
        self.server = asyncio.run_coroutine_threadsafe(
            asyncio.start_server(self._client, "127.0.0.1", port), self.loop).result(10)

    def times(self) -> list[float]:
        with self.lock:
            return list(self.attempts)

    def stop(self) -> None:
        async def close() -> None:
            assert self.server is not None
            self.server.close()
            await self.server.wait_closed()

        asyncio.run_coroutine_threadsafe(close(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


@pytest.fixture
def relay_421() -> Iterator[tuple[Refusing421, int]]:
    relay, port = Refusing421(), free_port()
    relay.start(port)
    try:
        yield relay, port
    finally:
        relay.stop()


def test_relay_answering_421_is_retried_with_growing_gaps_and_queue_retry_forces_one(
        tmp_path: Path, relay_421: tuple[Refusing421, int], start_server) -> None:  # type: ignore[no-untyped-def]
    relay, port = relay_421
    server = start_server(make_config(tmp_path, port), retry_initial=0.3)
    server.call(server.store.create_list(LIST, {"title": "Energia w gminach"}, [OWNER]))
    post(server, 1, sender=OWNER)  # the owner is the only member: one copy, one connection per attempt
    wait_for(lambda: sql(server, "SELECT status FROM incoming") == [("queued",)], "the post queued")
    wait_for(lambda: sql(server, "SELECT attempts FROM deliveries") == [(5,)], "five attempts recorded", timeout=60)
    assert len(relay.times()) == 5
    times = relay.times()[:5]
    gaps = [b - a for a, b in zip(times, times[1:])]
    print("\ngaps between attempts at a relay answering 421:", ", ".join(f"{g:.3f} s" for g in gaps))
    # Exponential back-off with ±20 % jitter: each gap about twice the last, never less than 1.3 times.
    for shorter, longer in zip(gaps, gaps[1:]):
        assert longer > 1.3 * shorter, gaps
    (row,) = server.call(server.store.queue_summary())
    assert row["pending"] == 1 and "421 4.3.2 Service not available" in row["last_reply"]

    # `listserv queue retry`: the copy is tried at once, not when its back-off would have let it.
    due = server.call(server.store.next_attempt_at())
    assert due is not None and due - time.time() > 2.0  # the sixth attempt is seconds away
    tried = len(relay.times())
    assert listserv(write_cli_config(tmp_path, server), "queue", "retry") == "1 pending copies will be tried at once\n"
    wait_for(lambda: len(relay.times()) > tried, "an attempt after `queue retry`")
    assert time.time() < due, "the attempt came only when the back-off was over anyway"
    assert server.call(server.store.delivery_counts()) == {"pending": 1}
