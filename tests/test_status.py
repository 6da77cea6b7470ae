"""The operator's view: `listserv status`, `listserv explain`, `listserv backup`, and the log's story.

The CLI runs through CliRunner against a real config file and database; the
server it reports on is a real one on 127.0.0.1 (in this process, or as
``python -m listserv serve`` when the log file itself is what is checked).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import smtplib
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from conftest import DOMAIN, ROOT, SELECTOR, RunningServer, SinkHandler, free_port
from listserv import config as config_mod
from listserv.cli import main

LIST = "seap-planning"
POST_ADDR = f"{LIST}@{DOMAIN}"
OWNER = "koordynator@pnec.example.pl"
ANNA = "anna.kowalska@gmina-wolow.example.pl"
JAN = "jan.nowak@um.example.pl"
EWA = "ewa@energia.example.org"
STRANGER = "zenon@obcy.example.com"
SPAMMER = "oferta@spam.example"


def write_config(tmp_path: Path, listen_port: int, relay_port: int | None = None, protocol: str = "smtp") -> Path:
    q = json.dumps  # a TOML basic string is written like a JSON string
    cfg = tmp_path / "listserv.toml"
    cfg.write_text(
        "[server]\n"
        f"domain = {q(DOMAIN)}\n"
        f"listen = {q(f'127.0.0.1:{listen_port}')}\n"
        f"protocol = {q(protocol)}\n"
        f"state_dir = {q(str(tmp_path / 'state'))}\n"
        'log_level = "info"\n'
        "\n[delivery]\n"
        f"mode = {q('smtp' if relay_port else 'maildir')}\n"
        f"relay = {q(f'127.0.0.1:{relay_port or 25}')}\n"
        "timeout = 10\n"
        "\n[dkim]\n"
        f"selector = {q(SELECTOR)}\n"
        f"private_key = {q(str(tmp_path / 'dkim.key'))}\n"
        "\n[archive]\n"
        f"dir = {q(str(tmp_path / 'archive'))}\n"
        'base_url = ""\n'
        "\n[dns]\n"  # no real DNS in tests: a closed local port answers nothing, at once
        'nameservers = ["127.0.0.1:9"]\n'
        "timeout = 0.5\n",
        encoding="utf-8",
    )
    return cfg


def run(cfg: Path, *args: str) -> Result:
    return CliRunner().invoke(main, ["--config", str(cfg), *args], catch_exceptions=False)


def ok(cfg: Path, *args: str) -> str:
    result = run(cfg, *args)
    assert result.exit_code == 0, f"listserv {' '.join(args)}: {result.output}"
    return result.output


def make_list(cfg: Path) -> None:
    ok(cfg, "dkim", "keygen")
    ok(cfg, "list", "create", LIST, "--title", "Planowanie SEAP", "--owner", OWNER)
    ok(cfg, "members", "add", LIST, ANNA, JAN, EWA)
    ok(cfg, "ban", "add", SPAMMER)


def eml(tmp_path: Path, sender: str, message_id: str, subject: str = "Harmonogram prac nad SEAP") -> Path:
    path = tmp_path / f"{message_id.partition('@')[0]}.eml"
    path.write_bytes(
        f"From: {sender}\r\nTo: {POST_ADDR}\r\nSubject: {subject}\r\nMessage-ID: <{message_id}>\r\n"
        "Date: Thu, 26 Nov 2026 09:30:00 +0100\r\n\r\nDzień dobry, proszę o uwagi.\r\n".encode()
    )
    return path


RULES = ("loop", "automatic", "banned", "emergency", "poster_allowed", "moderated_member",
         "too_many_recipients", "no_subject", "held_attachment", "accept")


def verdicts(output: str) -> dict[str, str]:
    lines = {}
    for line in output.splitlines():
        rule, _, verdict = line.partition(" ")
        if rule in RULES:
            lines[rule] = verdict.strip()
    assert list(lines) == list(RULES), output
    return lines


# -- explain ---------------------------------------------------------------------------


def test_explain_a_members_post_is_accepted(tmp_path: Path) -> None:
    cfg = write_config(tmp_path, free_port())
    make_list(cfg)
    out = ok(cfg, "explain", LIST, str(eml(tmp_path, f"Anna Kowalska <{ANNA}>", "a1@gmina-wolow.example.pl")))
    assert out.splitlines()[:4] == [
        "message-id: <a1@gmina-wolow.example.pl>",
        "subject: Harmonogram prac nad SEAP",
        f"envelope sender: <{ANNA}> (from From)",
        f"sender: {ANNA} (member of {LIST})",
    ]
    v = verdicts(out)
    assert all(v[rule] == "pass" for rule in RULES[:-1]), v
    assert v["accept"] == "accept: member post  <- decides"
    assert out.splitlines()[-1] == "decision: accept: member post"
    # Nothing was stored or sent.
    with contextlib.closing(sqlite3.connect(tmp_path / "state" / "listserv.sqlite3")) as db:
        assert db.execute("SELECT count(*) FROM incoming").fetchone()[0] == 0
        assert db.execute("SELECT count(*) FROM outbox").fetchone()[0] == 0


def test_explain_a_non_member_is_held_with_the_reason(tmp_path: Path) -> None:
    cfg = write_config(tmp_path, free_port())
    make_list(cfg)
    out = ok(cfg, "explain", LIST, str(eml(tmp_path, STRANGER, "z1@obcy.example.com")))
    assert f"sender: {STRANGER} (not a member of {LIST})" in out.splitlines()
    v = verdicts(out)
    assert v["poster_allowed"] == f"hold: not a member: {STRANGER}  <- decides"
    assert out.splitlines()[-1] == f"decision: hold: not a member: {STRANGER}"


def test_explain_a_banned_sender_is_rejected(tmp_path: Path) -> None:
    cfg = write_config(tmp_path, free_port())
    make_list(cfg)
    out = ok(cfg, "explain", LIST, str(eml(tmp_path, SPAMMER, "s1@spam.example")))
    v = verdicts(out)
    assert v["banned"] == f"reject: 550 5.7.1 <{SPAMMER}> may not post to {LIST}  <- decides"
    assert v["poster_allowed"] == f"hold: not a member: {SPAMMER}"  # shown, but the ban came first
    assert out.splitlines()[-1] == f"decision: reject: 550 5.7.1 <{SPAMMER}> may not post to {LIST}"


def test_explain_envelope_sender_options(tmp_path: Path) -> None:
    cfg = write_config(tmp_path, free_port())
    make_list(cfg)
    path = eml(tmp_path, ANNA, "a2@gmina-wolow.example.pl")
    out = ok(cfg, "explain", LIST, str(path), "--from", "")
    assert "envelope sender: <> (from --from)" in out
    assert out.splitlines()[-1] == "decision: discard: empty envelope sender (a bounce or notification)"
    path.write_bytes(b"Return-Path: <anna+srs@relay.example.pl>\r\n" + path.read_bytes())
    out = ok(cfg, "explain", LIST, str(path))
    assert "envelope sender: <anna+srs@relay.example.pl> (from Return-Path)" in out
    assert out.splitlines()[-1] == "decision: accept: member post"


def test_explain_unknown_list_is_an_error(tmp_path: Path) -> None:
    cfg = write_config(tmp_path, free_port())
    make_list(cfg)
    result = run(cfg, "explain", "no-such-list", str(eml(tmp_path, ANNA, "a3@x.example.pl")))
    assert result.exit_code == 1
    assert "no-such-list" in result.output


# -- backup ------------------------------------------------------------------------------


def test_backup_is_a_working_copy_and_never_overwrites(tmp_path: Path) -> None:
    cfg = write_config(tmp_path, free_port())
    make_list(cfg)
    target = tmp_path / "backup" / "listserv-2026-11-26.sqlite3"
    target.parent.mkdir()
    out = ok(cfg, "backup", str(target))
    assert out.startswith(f"wrote {target} (")
    assert f"also copy: {tmp_path / 'dkim.key'}, {cfg}, {tmp_path / 'archive'}" in out
    assert target.stat().st_mode & 0o077 == 0, "the backup holds personal data: owner only"
    with contextlib.closing(sqlite3.connect(f"file:{target}?mode=ro", uri=True)) as db:
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        assert [r[0] for r in db.execute("SELECT name FROM lists")] == [LIST]
        members = {r[0] for r in db.execute("SELECT address FROM members")}
        assert members == {ANNA, JAN, EWA, OWNER}
    # The copy is a state database listserv itself can use.
    (tmp_path / "restored" / "state").mkdir(parents=True)
    restored = write_config(tmp_path / "restored", free_port())
    os.link(target, tmp_path / "restored" / "state" / "listserv.sqlite3")
    assert f"{LIST}@{DOMAIN}\t4 members\tPlanowanie SEAP" in ok(restored, "lists")

    before = target.read_bytes()
    result = run(cfg, "backup", str(target))
    assert result.exit_code == 1
    assert result.output == f"listserv: error: {target} exists; backups never overwrite, give a new file name\n"
    assert target.read_bytes() == before
    assert sorted(p.name for p in target.parent.iterdir()) == [target.name], "no temporary file left behind"


def test_backup_while_the_server_takes_mail(tmp_path: Path, start_server: Callable[..., RunningServer],
                                            sink: tuple[SinkHandler, int]) -> None:
    _, sink_port = sink
    port = free_port()
    cfg = write_config(tmp_path, port, sink_port)
    make_list(cfg)
    server = start_server(config_mod.load(cfg))
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
        for i in range(5):
            client.sendmail(ANNA, [POST_ADDR], eml(tmp_path, ANNA, f"b{i}@gmina-wolow.example.pl").read_bytes())
        ok(cfg, "backup", str(tmp_path / "during.sqlite3"))
        client.sendmail(ANNA, [POST_ADDR], eml(tmp_path, ANNA, "b9@gmina-wolow.example.pl").read_bytes())
    server.drain()
    with contextlib.closing(sqlite3.connect(f"file:{tmp_path / 'during.sqlite3'}?mode=ro", uri=True)) as db:
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        ids = {r[0] for r in db.execute("SELECT message_id FROM incoming")}
    # The five posts answered 250 before the backup are in it; the one after is not.
    assert ids == {f"b{i}@gmina-wolow.example.pl" for i in range(5)}


# -- status ---------------------------------------------------------------------------------


def queue_line(key: str, count: int, what: str) -> str:
    return f"  {key:<10}{count:>7}  {what}"


def test_status_of_a_stopped_server(tmp_path: Path) -> None:
    port = free_port()
    cfg = write_config(tmp_path, port)
    make_list(cfg)
    result = run(cfg, "status")
    assert result.exit_code == 3, result.output
    assert result.output == "\n".join([
        f"server: DOWN, nothing answers on 127.0.0.1:{port}: connection refused",
        "queue:",
        queue_line("incoming", 0, "received, not yet processed"),
        queue_line("held", 0, "posts waiting for a moderator (listserv held list)"),
        queue_line("waiting", 0, "copies not yet tried"),
        queue_line("retrying", 0, "copies to be tried again after a temporary failure"),
        queue_line("failed", 0, "copies given up for good (messages of the last 12 days)"),
        "  oldest waiting: none",
        "traffic:             last hour   last day",
        "  posts received             0          0",
        "  copies sent                0          0",
        "  bounces                    0          0",
        "last errors: none",
        "",
    ])


def test_status_of_a_running_server_with_held_deferred_and_bounced_mail(
    tmp_path: Path, start_server: Callable[..., RunningServer], sink: tuple[SinkHandler, int],
) -> None:
    handler, sink_port = sink
    handler.reject[JAN] = "550 5.1.1 <jan.nowak@um.example.pl>: Recipient address rejected: User unknown"
    handler.reject[EWA] = "451 4.2.0 <ewa@energia.example.org>: Mailbox busy, try later"
    port = free_port()
    cfg = write_config(tmp_path, port, sink_port)
    make_list(cfg)
    server = start_server(config_mod.load(cfg))
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
        client.sendmail(ANNA, [POST_ADDR], eml(tmp_path, f"Anna <{ANNA}>", "st1@gmina-wolow.example.pl").read_bytes())
        client.sendmail(STRANGER, [POST_ADDR], eml(tmp_path, STRANGER, "st2@obcy.example.com").read_bytes())
    server.drain()
    # The post reached Anna and the owner; the held post's notices went to the owner and the stranger.
    assert sorted(handler.recipients()) == sorted([ANNA, OWNER, OWNER, STRANGER])

    result = run(cfg, "status")
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0].startswith(f"server: up, 127.0.0.1:{port} answers: 220 "), lines[0]
    assert "listserv" in lines[0]
    assert lines[1:7] == [
        "queue:",
        queue_line("incoming", 0, "received, not yet processed"),
        queue_line("held", 1, "posts waiting for a moderator (listserv held list)"),
        queue_line("waiting", 0, "copies not yet tried"),
        queue_line("retrying", 1, "copies to be tried again after a temporary failure"),
        queue_line("failed", 1, "copies given up for good (messages of the last 12 days)"),
    ]
    assert lines[7].startswith(f"  oldest waiting: outbox 1 ({LIST}, "), lines[7]
    assert "<st1@gmina-wolow.example.pl>), queued " in lines[7] and lines[7].endswith(" ago")
    sent = len(handler.recipients())
    assert lines[8:12] == [
        "traffic:             last hour   last day",
        "  posts received             2          2",
        f"  {'copies sent':<16}{sent:>12}{sent:>11}",
        "  bounces                    1          1",
    ]
    assert lines[12] == "last errors:"
    errors = lines[13:]
    assert len(errors) == 6, errors  # two under deliver, "none" for the four other stages
    assert errors[0].startswith("  prepare   none") and errors[1].startswith("  deliver   ")
    assert errors[2].startswith(" " * 12) and errors[3:] == ["  requests  none", "  bounces   none",
                                                             "  archive   none"]
    by_rcpt = {next(w for w in line.split() if "@" in w and not w.startswith("<")): line for line in errors[1:3]}
    assert f"  bounced  {LIST}  <st1@gmina-wolow.example.pl>  {JAN}  550 5.1.1 " in by_rcpt[JAN]
    assert "User unknown" in by_rcpt[JAN]
    assert f"  deferred  {LIST}  <st1@gmina-wolow.example.pl>  {EWA}  451 4.2.0 " in by_rcpt[EWA]
    assert "Mailbox busy" in by_rcpt[EWA]

    server.stop()
    result = run(cfg, "status")
    assert result.exit_code == 3
    assert result.output.splitlines()[0] == f"server: DOWN, nothing answers on 127.0.0.1:{port}: connection refused"
    # The queue is in the database, so it is shown with the server down too.
    assert queue_line("retrying", 1, "copies to be tried again after a temporary failure") in result.output


def test_status_and_doctor_show_a_failing_archive_stage(
    tmp_path: Path, start_server: Callable[..., RunningServer], sink: tuple[SinkHandler, int],
) -> None:
    from listserv import doctor
    from listserv.dns import DictResolver

    _, sink_port = sink
    port = free_port()
    cfg = write_config(tmp_path, port, sink_port)
    make_list(cfg)
    # The archive's folder is a file: every page write fails, even for root.
    (tmp_path / "archive").write_text("nie katalog\n")
    server = start_server(config_mod.load(cfg))
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
        for n in (1, 2):
            client.sendmail(ANNA, [POST_ADDR], eml(tmp_path, f"Anna <{ANNA}>", f"ar{n}@gmina-wolow.example.pl",
                                                   f"Ocena zużycia energii {n}").read_bytes())
    server.drain()
    server.call(server.app.archiver.idle())
    result = run(cfg, "status")
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    start = lines.index("last errors:")
    stages = lines[start + 1:]
    assert stages[:4] == ["  prepare   none", "  deliver   none", "  requests  none", "  bounces   none"]
    archive = stages[4:]
    assert archive and archive[0].startswith("  archive   ")
    assert any("archive" in line and f"list={LIST}" in line and "NotADirectoryError" in line for line in archive), archive
    # Delivery went on regardless: the archive is derived.
    assert "copies sent" in result.output and "  bounces                    0          0" in result.output

    checks = {c.name: c for c in asyncio.run(doctor.run_checks(config_mod.load(cfg), DictResolver({})))}
    assert checks["stage errors"].status == "WARN"
    assert "archive: " in checks["stage errors"].detail and "NotADirectoryError" in checks["stage errors"].detail
    assert "prepare: none" in checks["stage errors"].detail


def test_status_says_down_when_something_else_answers(tmp_path: Path, sink: tuple[SinkHandler, int]) -> None:
    _, sink_port = sink  # an aiosmtpd server that is not listserv
    cfg = write_config(tmp_path, sink_port)
    make_list(cfg)
    result = run(cfg, "status")
    assert result.exit_code == 3
    first = result.output.splitlines()[0]
    assert first.startswith(f"server: DOWN, 127.0.0.1:{sink_port} answers, but not as listserv: 220 "), first


# -- the log tells each message's story -------------------------------------------------------


def child_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    env.pop("LISTSERV_CONFIG", None)
    return env


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[Callable[[Path], subprocess.Popen[bytes]]]:
    procs: list[subprocess.Popen[bytes]] = []

    def start(cfg: Path) -> subprocess.Popen[bytes]:
        with open(tmp_path / "serve.log", "ab") as log:
            proc = subprocess.Popen([sys.executable, "-m", "listserv", "serve", "--config", str(cfg)],
                                    stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=child_env())
        procs.append(proc)
        return proc

    try:
        yield start
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait(30)


def wait_until(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"not reached within {timeout:.0f} s: {what}")


def grep(log: str, needle: str) -> list[str]:
    return [line for line in log.splitlines() if needle in line]


@pytest.mark.slow
def test_grep_message_id_tells_the_story(tmp_path: Path, sink: tuple[SinkHandler, int],
                                         serve: Callable[[Path], subprocess.Popen[bytes]]) -> None:
    handler, sink_port = sink
    handler.reject[JAN] = "550 5.1.1 User unknown"
    handler.reject[EWA] = "451 4.2.0 Mailbox busy"
    port = free_port()
    cfg = write_config(tmp_path, port, sink_port, protocol="lmtp")
    make_list(cfg)
    proc = serve(cfg)
    wait_until(lambda: run(cfg, "status").exit_code == 0 or proc.poll() is not None, 60, "the server is up")
    assert proc.poll() is None, (tmp_path / "serve.log").read_text()

    def send(sender: str, message_id: str) -> tuple[int, bytes]:
        with smtplib.LMTP("127.0.0.1", port, timeout=30) as client:
            client.ehlo("mail.example.pl")
            assert client.mail(sender)[0] == 250
            assert client.rcpt(POST_ADDR)[0] == 250
            return client.data(eml(tmp_path, sender, message_id).read_bytes())

    assert send(ANNA, "story-accepted@gmina-wolow.example.pl")[0] == 250
    assert send(STRANGER, "story-held@obcy.example.com")[0] == 250
    code, reply = send(SPAMMER, "story-rejected@spam.example")
    assert code == 550, reply
    wait_until(lambda: OWNER in handler.recipients() and ANNA in handler.recipients(), 60, "copies delivered")
    wait_until(lambda: "deferred list=" in (tmp_path / "serve.log").read_text(), 30, "the deferral logged")
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(60) == 0
    log = (tmp_path / "serve.log").read_text(encoding="utf-8")

    story = grep(log, "message_id=story-accepted@gmina-wolow.example.pl")
    events = [line.split(" listserv.")[1].split(" ")[1] for line in story]
    assert events[0] == "accepted", story
    assert events[1] == "queued", story
    assert set(events[2:]) == {"delivered", "bounced", "deferred"}, story
    assert all(f"list={LIST}" in line for line in story), story
    delivered = grep("\n".join(story), " delivered ")
    assert {line.rpartition("rcpt=")[2] for line in delivered} == {ANNA, OWNER}, delivered
    (bounced,) = grep("\n".join(story), " bounced ")
    assert f"rcpt={JAN}" in bounced and "550 5.1.1 User unknown" in bounced
    (deferred,) = grep("\n".join(story), " deferred ")
    assert "451 4.2.0 Mailbox busy" in deferred

    (held,) = grep(log, "message_id=story-held@obcy.example.com")
    assert " held list=seap-planning kind=post " in held and f"reason=not a member: {STRANGER}" in held
    (rejected,) = grep(log, "message_id=story-rejected@spam.example")
    assert f" rejected list={LIST} " in rejected and "550 5.7.1" in rejected


async def test_stage_errors_are_counted_kept_bounded_and_merged_with_failed_mail(tmp_path: Path) -> None:
    from listserv.store import IncomingRow, Store
    from listserv.store.status import STAGES

    store = await Store.open(tmp_path / "state" / "listserv.sqlite3")
    try:
        now = time.time()
        assert await store.stage_errors(now, 3600) == {stage: [] for stage in STAGES}
        for at in (now - 30, now - 20, now - 10):
            await store.record_stage_error("archive", "archive update failed: OSError(28, 'No space left')", at=at)
        for n in range(25):
            await store.record_stage_error("prepare", f"cannot prepare post {n}: ValueError('zażółć')", at=now - 100 + n)
        list_id = await store.create_list(LIST, {}, [OWNER])
        await store.submit_incoming([IncomingRow(
            list_id=list_id, kind="request", detail="", mail_from=ANNA, rcpt=f"{LIST}-request@{DOMAIN}",
            peer="192.0.2.7", message_id="r1@gmina", sender=ANNA, subject="pomoc", status="new", reason="",
            data=b"From: x\r\n\r\n",
        )])
        (request,) = await store.incoming_with("request", "new", limit=5)
        await store.set_incoming_status(request.id, "failed", expect="new", reason="failed: KeyError('x')")
        errors = await store.stage_errors(now + 1, 3600, limit=30)
        (archive,) = errors["archive"]
        assert archive["count"] == 3 and archive["first_at"] == now - 30 and archive["at"] == now - 10
        assert len(errors["prepare"]) == 20  # the latest 20 distinct errors of a stage are kept
        assert errors["prepare"][0]["detail"] == "cannot prepare post 24: ValueError('zażółć')"
        (failed,) = errors["requests"]
        assert failed["detail"] == f"request mail to {LIST} from {ANNA}: failed: KeyError('x')"
        assert errors["deliver"] == [] and errors["bounces"] == []
        # Older than the horizon: not shown.
        assert (await store.stage_errors(now + 7200, 3600))["archive"] == []
    finally:
        await store.close()
