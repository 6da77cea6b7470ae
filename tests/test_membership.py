"""Members by e-mail, end to end over real SMTP: join, confirm, post, leave; abuse; moderation by reply."""

from __future__ import annotations

import asyncio
import email
import email.policy
import re
import smtplib
import time
from email.message import EmailMessage
from pathlib import Path

import dkim as dkimpy
import pytest

from conftest import DOMAIN, SinkHandler, committed, dkim_dnsfunc, make_config

LIST = "energy-management"
OWNER = "wlasciciel@kape.gov.pl"
MODERATOR = "moderator@fewe.pl"
STRANGER = "malgorzata.zielinska@gmina-zabki.pl"


def mail(frm: str, to: str, subject: str, body: str, **headers: str) -> bytes:
    m = EmailMessage()
    m["From"] = frm
    m["To"] = to
    m["Subject"] = subject
    m["Message-ID"] = f"<{time.monotonic_ns()}@test.example>"
    for name, value in headers.items():
        m[name.replace("_", "-")] = value
    m.set_content(body)
    return m.as_bytes()


def send(port: int, mail_from: str, rcpt: str, data: bytes) -> None:
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
        client.sendmail(mail_from, [rcpt], data)


def parsed(data: bytes) -> email.message.EmailMessage:
    return email.message_from_bytes(data, policy=email.policy.default)  # type: ignore[return-value]


@pytest.fixture
def running(tmp_path: Path, sink: tuple[SinkHandler, int], start_server):  # type: ignore[no-untyped-def]
    handler, port = sink
    server = start_server(make_config(tmp_path, port, limits={"confirm_resend_interval": 3600,
                                                               "confirmations_per_address_per_day": 3}))
    server.call(server.store.create_list(LIST, {"title": "Zarządzanie energią"}, [OWNER]))
    server.call(server.store.add_members(LIST, [(MODERATOR, "", "")], role="moderator"))
    return server, handler


def confirm_address(data: bytes) -> str:
    msg = parsed(data)
    m = re.search(r"<([^>]+)>", str(msg["From"]))
    assert m and "-confirm+" in m.group(1)
    return m.group(1)


def test_stranger_joins_confirms_posts_and_leaves(running, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    server, sink = running
    send(server.port, STRANGER, f"{LIST}-join@{DOMAIN}",
         mail(f"Małgorzata Zielińska <{STRANGER}>", f"{LIST}-join@{DOMAIN}", "zapisz", ""))
    server.drain()
    (confirmation,) = sink.copies_for(STRANGER)
    msg = parsed(confirmation.data)
    assert msg["Subject"] == "Potwierdź zapis na listę Zarządzanie energią (energy-management)"
    assert msg["Auto-Submitted"] == "auto-replied"
    assert "potwierdź" in msg.get_content()
    assert dkimpy.verify(confirmation.data, dnsfunc=dkim_dnsfunc(server.key))
    assert server.call(server.store.member(1, STRANGER)) is None  # nothing before the confirmation

    # She presses "reply" in her mail program: the reply goes to LIST-confirm+TOKEN.
    reply_to = confirm_address(confirmation.data)
    send(server.port, STRANGER, reply_to,
         mail(STRANGER, reply_to, f"Re: {msg['Subject']}", "Potwierdzam.\n\n> cytat", In_Reply_To=msg["Message-ID"]))
    server.drain()
    assert server.call(server.store.member(1, STRANGER)) is not None
    welcome = parsed(sink.copies_for(STRANGER)[-1].data)
    assert welcome["Subject"] == "Witamy na liście Zarządzanie energią"
    history = server.call(server.store.consent_history(LIST, STRANGER))
    assert [e.event for e in history] == ["joined"] and history[0].method == "email"
    assert "Message-ID" in history[0].detail

    # Now a member, she posts and the post goes out.
    send(server.port, STRANGER, f"{LIST}@{DOMAIN}",
         mail(STRANGER, f"{LIST}@{DOMAIN}", "Audyt energetyczny szkół", "Czy ktoś robił audyt w 2025?"))
    server.drain()
    assert any(b"Audyt energetyczny" in c.data for c in sink.copies_for(MODERATOR))

    # Leaving works the same way, with a confirmation.
    send(server.port, STRANGER, f"{LIST}-leave@{DOMAIN}", mail(STRANGER, f"{LIST}-leave@{DOMAIN}", "wypisz", ""))
    server.drain()
    leave_confirmation = sink.copies_for(STRANGER)[-1]
    assert "wypisanie" in parsed(leave_confirmation.data)["Subject"]
    assert server.call(server.store.member(1, STRANGER)) is not None
    addr = confirm_address(leave_confirmation.data)
    send(server.port, STRANGER, addr, mail(STRANGER, addr, "Re: potwierdzenie", "ok"))
    server.drain()
    assert server.call(server.store.member(1, STRANGER)) is None
    assert parsed(sink.copies_for(STRANGER)[-1].data)["Subject"] == "Wypisano z listy Zarządzanie energią"
    assert [e.event for e in server.call(server.store.consent_history(LIST, STRANGER))] == ["joined", "left"]


def test_forged_join_reaches_only_the_victim_and_reused_token_is_refused(running) -> None:  # type: ignore[no-untyped-def]
    server, sink = running
    victim = "burmistrz@miasto-example.pl"
    attacker = "atak@zlosliwy.example"
    send(server.port, attacker, f"{LIST}-request@{DOMAIN}",
         mail(attacker, f"{LIST}-request@{DOMAIN}", "cokolwiek", f"join address={victim}\n"))
    server.drain()
    assert len(sink.copies_for(victim)) == 1  # the confirmation, to the victim
    to_attacker = [parsed(c.data) for c in sink.copies_for(attacker)]
    assert len(to_attacker) == 1 and "token" not in to_attacker[0].get_content().lower()
    token_addr = confirm_address(sink.copies_for(victim)[0].data)
    token = token_addr.split("+", 1)[1].split("@")[0]
    assert token not in to_attacker[0].get_content()
    assert server.call(server.store.member(1, victim)) is None

    # The victim confirms (say, by mistake); a second use of the token is refused.
    send(server.port, victim, token_addr, mail(victim, token_addr, "Re: x", "tak"))
    server.drain()
    assert server.call(server.store.member(1, victim)) is not None
    send(server.port, attacker, f"{LIST}-request@{DOMAIN}",
         mail(attacker, f"{LIST}-request@{DOMAIN}", f"potwierdź {token}", ""))
    server.drain()
    answer = parsed(sink.copies_for(attacker)[-1].data).get_content()
    assert "już użyty" in answer


def test_confirmation_counts_only_from_the_address_concerned(running) -> None:  # type: ignore[no-untyped-def]
    server, sink = running
    other = "sekretariat@gmina-zabki.pl"
    send(server.port, STRANGER, f"{LIST}-join@{DOMAIN}", mail(STRANGER, f"{LIST}-join@{DOMAIN}", "zapisz", ""))
    server.drain()
    (request,) = sink.copies_for(STRANGER)
    text = parsed(request.data).get_content()
    assert f"tylko wtedy, gdy przyjdzie z adresu {STRANGER}" in text and "nie ma do tego strony WWW" in text
    addr = confirm_address(request.data)
    token = addr.split("+", 1)[1].split("@")[0]

    # Another mailbox replies with the code (a forwarded confirmation): refused, and told why, once.
    for _ in range(2):
        send(server.port, other, addr, mail(f"Sekretariat <{other}>", addr, "Re: Potwierdź", "Potwierdzam."))
        server.drain()
    assert server.call(server.store.member(1, STRANGER)) is None
    (answer,) = sink.copies_for(other)
    body = parsed(answer.data).get_content()
    assert f"Nie potwierdzono: potwierdzenie dla {STRANGER} przyjmujemy tylko z tego adresu" in body
    assert f"From: {other}, envelope sender: {other}" in body and token not in body
    assert parsed(answer.data)["Auto-Submitted"] == "auto-replied"

    # A forged From with another envelope sender, and the other way round: refused too. The answer
    # goes to the envelope sender, never to the address whose From was forged.
    send(server.port, other, addr, mail(STRANGER, addr, "Re: Potwierdź", "tak"))
    send(server.port, STRANGER, addr, mail(other, addr, "Re: Potwierdź", "tak"))
    server.drain()
    assert server.call(server.store.member(1, STRANGER)) is None
    assert len(sink.copies_for(other)) == 1  # already answered for this code
    (refusal,) = [c for c in sink.copies_for(STRANGER) if c is not request]
    assert f"From: {other}, envelope sender: {STRANGER}" in parsed(refusal.data).get_content()
    # The command form, from the other mailbox: the command reply says why.
    send(server.port, other, f"{LIST}-request@{DOMAIN}",
         mail(other, f"{LIST}-request@{DOMAIN}", "polecenie", f"potwierdź {token}\n"))
    server.drain()
    assert server.call(server.store.member(1, STRANGER)) is None
    assert "Nie potwierdzono" in parsed(sink.copies_for(other)[-1].data).get_content()

    # The code is still good for the address itself.
    send(server.port, STRANGER, addr, mail(f"Małgorzata Zielińska <{STRANGER}>", addr, "Re: Potwierdź", "Tak."))
    server.drain()
    assert server.call(server.store.member(1, STRANGER)) is not None
    (joined,) = server.call(server.store.consent_history(LIST, STRANGER))
    assert joined.detail.startswith(f"confirmed by mail from {STRANGER}")


def test_expired_token_is_refused_clearly(running) -> None:  # type: ignore[no-untyped-def]
    server, sink = running
    server.call(server.store.create_token("Wygasly-Token-1234567890", 1, STRANGER, "join", {}, time.time() - 1))
    send(server.port, STRANGER, f"{LIST}-request@{DOMAIN}",
         mail(STRANGER, f"{LIST}-request@{DOMAIN}", "Re: Potwierdź", "confirm Wygasly-Token-1234567890\n"))
    server.drain()
    assert "wygasł" in parsed(sink.copies_for(STRANGER)[-1].data).get_content()
    assert server.call(server.store.member(1, STRANGER)) is None


def test_flooding_join_requests_sends_at_most_one_confirmation(running) -> None:  # type: ignore[no-untyped-def]
    server, sink = running
    victim = "sekretariat@powiat-example.pl"
    for i in range(12):
        attacker = f"bot{i}@flood.example"
        send(server.port, attacker, f"{LIST}-request@{DOMAIN}",
             mail(attacker, f"{LIST}-request@{DOMAIN}", "join", f"join address={victim}"))
    server.drain()
    assert len(sink.copies_for(victim)) == 1  # one pending confirmation, no resend within the hour
    [(tokens,)] = committed(server.config.store_target, "SELECT count(*) FROM tokens WHERE address = ?", (victim,))
    assert tokens == 1


def test_daily_caps_limit_replies_to_one_address(running) -> None:  # type: ignore[no-untyped-def]
    server, sink = running
    pest = "natret@example.com"
    for _ in range(15):
        send(server.port, pest, f"{LIST}-request@{DOMAIN}", mail(pest, f"{LIST}-request@{DOMAIN}", "pomoc", ""))
    server.drain()
    assert len(sink.copies_for(pest)) == 10  # [limits] replies_per_address_per_day


@pytest.mark.parametrize("headers, mail_from", [
    ({"Auto_Submitted": "auto-replied"}, "bot@example.com"),
    ({"Precedence": "bulk"}, "bot@example.com"),
    ({}, ""),
])
def test_automatic_mail_is_never_answered(running, headers, mail_from) -> None:  # type: ignore[no-untyped-def]
    server, sink = running
    send(server.port, mail_from, f"{LIST}-request@{DOMAIN}",
         mail("bot@example.com", f"{LIST}-request@{DOMAIN}", "help", "help", **headers))
    send(server.port, mail_from, f"{LIST}-join@{DOMAIN}", mail("bot@example.com", f"{LIST}-join@{DOMAIN}", "x", "",
                                                                 **headers))
    server.drain()
    assert sink.messages == []
    reasons = [r[0] for r in committed(server.config.store_target, "SELECT reason FROM incoming")]
    assert all(r.startswith("ignored") for r in reasons) and len(reasons) == 2


def test_closed_list_refuses_join_by_mail(running) -> None:  # type: ignore[no-untyped-def]
    server, sink = running
    server.call(server.store.set_list_settings(LIST, {"subscription_policy": "closed"}))
    send(server.port, STRANGER, f"{LIST}-request@{DOMAIN}", mail(STRANGER, f"{LIST}-request@{DOMAIN}", "join", ""))
    server.drain()
    (answer,) = sink.copies_for(STRANGER)
    assert "tylko jej właściciele" in parsed(answer.data).get_content()


def test_moderated_subscription_needs_an_owner(running) -> None:  # type: ignore[no-untyped-def]
    server, sink = running
    server.call(server.store.set_list_settings(LIST, {"subscription_policy": "moderate"}))
    send(server.port, STRANGER, f"{LIST}-join@{DOMAIN}", mail(STRANGER, f"{LIST}-join@{DOMAIN}", "", ""))
    server.drain()
    addr = confirm_address(sink.copies_for(STRANGER)[0].data)
    send(server.port, STRANGER, addr, mail(STRANGER, addr, "Re: x", "tak"))
    server.drain()
    assert server.call(server.store.member(1, STRANGER)) is None
    request = parsed(sink.copies_for(OWNER)[-1].data)
    approve = re.search(r"Zatwierdź: mailto:(\S+)", request.get_content())
    assert approve
    send(server.port, OWNER, approve.group(1), mail(OWNER, approve.group(1), "Re: prośba", ""))
    server.drain()
    assert server.call(server.store.member(1, STRANGER)) is not None


def _actions(notice: email.message.EmailMessage) -> dict[str, str]:
    text = notice.get_body(("plain",)).get_content()  # type: ignore[union-attr]
    found = dict(re.findall(r"^\s*(Zatwierdź|Zatwierdź i zawsze przyjmuj nadawcę|Odrzuć[^:]*|Usuń[^:]*):\s+mailto:(\S+)",
                            text, re.MULTILINE))
    return {"approve": found["Zatwierdź"], "always": found["Zatwierdź i zawsze przyjmuj nadawcę"],
            "reject": next(v for k, v in found.items() if k.startswith("Odrzuć")),
            "discard": next(v for k, v in found.items() if k.startswith("Usuń"))}


def test_moderation_by_reply_first_moderator_wins(running) -> None:  # type: ignore[no-untyped-def]
    server, sink = running
    send(server.port, STRANGER, f"{LIST}@{DOMAIN}",
         mail(f"Małgorzata Zielińska <{STRANGER}>", f"{LIST}@{DOMAIN}", "Pytanie o ELENA", "Czy są nabory?"))
    server.drain()
    owner_notice = parsed(sink.copies_for(OWNER)[0].data)
    mod_notice = parsed(sink.copies_for(MODERATOR)[0].data)
    assert owner_notice["Message-ID"] == mod_notice["Message-ID"]  # one notice to the staff
    assert [p.get_content_type() for p in owner_notice.walk()][-2] == "message/rfc822"
    actions = _actions(owner_notice)
    # Both act on their phones: the moderator rejects with a reason, the owner approves a moment later.
    reject = actions["reject"]
    send(server.port, MODERATOR, reject, mail(MODERATOR, reject, "Re: Do moderacji",
                                              "Proszę najpierw dołączyć do listy.\n\nW dniu x napisał:\n> ..."))
    server.drain()
    approve = actions["approve"]
    send(server.port, OWNER, approve, mail(OWNER, approve, "Re: Do moderacji", ""))
    server.drain()
    held = committed(server.config.store_target, "SELECT status, reason FROM incoming WHERE kind = 'post'")[0]
    assert held[0] == "rejected" and MODERATOR in held[1]
    rejection = [parsed(c.data) for c in sink.copies_for(STRANGER)][-1]
    assert "Proszę najpierw dołączyć do listy." in rejection.get_content()
    assert "W dniu" not in rejection.get_content()
    already = parsed(sink.copies_for(OWNER)[-1].data)
    assert already["Subject"].startswith("Już rozpatrzone") and MODERATOR in already.get_content()
    # The post never reached the list.
    assert "[energy-management] Pytanie o ELENA" not in [str(parsed(c.data)["Subject"]) for c in sink.messages]


def test_approve_and_always_accept_the_sender(running) -> None:  # type: ignore[no-untyped-def]
    server, sink = running
    send(server.port, STRANGER, f"{LIST}@{DOMAIN}", mail(STRANGER, f"{LIST}@{DOMAIN}", "Pierwszy wpis", "treść"))
    server.drain()
    always = _actions(parsed(sink.copies_for(MODERATOR)[0].data))["always"]
    send(server.port, MODERATOR, always, mail(MODERATOR, always, "Re: x", ""))
    server.drain()
    send(server.port, STRANGER, f"{LIST}@{DOMAIN}", mail(STRANGER, f"{LIST}@{DOMAIN}", "Drugi wpis", "treść"))
    server.drain()
    subjects = [str(parsed(c.data)["Subject"]) for c in sink.copies_for(OWNER)]
    assert "[energy-management] Pierwszy wpis" in subjects and "[energy-management] Drugi wpis" in subjects


# -- the consent record and personal data, through the CLI ------------------------------------------


@pytest.fixture
def cli(tmp_path: Path):  # type: ignore[no-untyped-def]
    import json as _json

    from click.testing import CliRunner

    from listserv.cli import main

    cfg = tmp_path / "listserv.toml"
    cfg.write_text(f'[server]\ndomain = "{DOMAIN}"\nstate_dir = "state"\n[dkim]\nprivate_key = "state/dkim.key"\n')
    runner = CliRunner()

    def run(*args: str, ok: bool = True) -> str:
        result = runner.invoke(main, [*args, "--config", str(cfg)])
        if ok:
            assert result.exit_code == 0, (args, result.output, result.stderr)
        else:
            assert result.exit_code != 0, (args, result.output)
            return result.stderr
        return result.stdout

    run.json = _json  # type: ignore[attr-defined]
    return run


def test_history_export_change_and_forget(cli, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setenv("SUDO_USER", "admin-kasia")
    cli("list", "create", "financing", "--title", "Finansowanie", "--owner", OWNER)
    cli("list", "create", LIST, "--owner", OWNER)
    cli("members", "add", "financing", "jan.nowak@gmina-lomianki.pl")
    cli("members", "add", LIST, "jan.nowak@gmina-lomianki.pl")
    history = cli("members", "history", "financing", "jan.nowak@gmina-lomianki.pl")
    assert "\tjoined\tcli\tadded by admin-kasia" in history

    cli("members", "change", "financing", "jan.nowak@gmina-lomianki.pl", "j.nowak@lomianki.pl")
    lines = cli("members", "history", "financing", "j.nowak@lomianki.pl").splitlines()
    assert [line.split("\t")[1] for line in lines] == ["joined", "changed"]
    assert "jan.nowak@gmina-lomianki.pl" in lines[1]
    assert "j.nowak@lomianki.pl" in cli("members", "list", "financing")
    cli("members", "change", "financing", "nikt@example.pl", "ktos@example.pl", ok=False)

    exported = cli.json.loads(cli("person", "export", "jan.nowak@gmina-lomianki.pl"))  # type: ignore[attr-defined]
    assert [m["list"] for m in exported["memberships"]] == [LIST]
    assert exported["consent"][0]["event"] == "joined"

    out = cli("person", "forget", "jan.nowak@gmina-lomianki.pl", "--yes")
    assert "1 memberships" in out
    assert "jan.nowak" not in cli("members", "list", LIST)
    after = cli.json.loads(cli("person", "export", "jan.nowak@gmina-lomianki.pl"))  # type: ignore[attr-defined]
    assert after["memberships"] == [] and after["messages"] == []
    # What stays: that consent was given and withdrawn, and when; no other detail.
    assert [e["event"] for e in after["consent"]] == ["joined", "left"]
    assert after["consent"][0]["detail"] == "" and "forget" in after["consent"][1]["detail"]
    assert cli("members", "history", LIST, "nie-adres", ok=False).startswith("listserv: error: ")


def test_daily_reminder_and_expiry_of_held_posts(running) -> None:  # type: ignore[no-untyped-def]
    server, sink = running
    send(server.port, STRANGER, f"{LIST}@{DOMAIN}", mail(STRANGER, f"{LIST}@{DOMAIN}", "Wpis czekający", "treść"))
    server.drain()
    stage = server.app.membership
    real = time.time()
    # A day and a bit later: the owner gets one reminder of what still waits, and only one,
    # even from two passes at once (the stage's loop runs one of its own when the clock moves).
    stage.clock = lambda: real + 86400 + 7200

    async def two_at_once() -> None:
        await asyncio.gather(stage._expire_and_remind(real + 86400 + 7200),
                             stage._expire_and_remind(real + 86400 + 7250))

    server.call(two_at_once())
    server.call(stage._expire_and_remind(real + 86400 + 7300))
    server.drain()
    reminders = [parsed(c.data) for c in sink.copies_for(OWNER) if "czeka na moderację" in str(parsed(c.data)["Subject"])]
    assert len(reminders) == 1 and "Wpis czekający" in reminders[0].get_content()
    # Past held_expiry (14 days by default): expired, and the sender is told.
    later = real + 15 * 86400
    stage.clock = lambda: later
    server.call(stage._expire_and_remind(later))
    server.drain()
    status = committed(server.config.store_target, "SELECT status FROM incoming WHERE kind = 'post'")[0][0]
    assert status == "expired"
    told = parsed(sink.copies_for(STRANGER)[-1].data)
    assert told["Subject"].startswith("Wiadomość wygasła bez decyzji")
