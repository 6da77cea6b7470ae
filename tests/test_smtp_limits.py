"""The receiver's limits over real SMTP (issue 12): each limit and its RFC reply, bare LF, smuggling,
postmaster, timeouts with 421, and a loop that keeps answering while pathological mail arrives."""

from __future__ import annotations

import logging
import smtplib
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from conftest import DOMAIN, RunningServer, SinkHandler, committed, free_port, make_config
from listserv import config as config_mod
from listserv.errors import ConfigError

LIST = "energia"
POST_ADDR = f"{LIST}@{DOMAIN}"
OWNER = "koordynator@pnec.org.pl"
MEMBERS = ["anna.kowalska@gmina-wieliczka.pl", "lukasz@um.krakow.pl"]
ADMIN = "admin@pnec.org.pl"

POLISH_BODY = "Zażółć gęślą jaźń: ą ć ę ł ń ó ś ź ż. Sprawozdanie z audytu energetycznego szkoły."


def polish_post(body_lines: int = 3, *, eol: str = "\r\n", extra_headers: str = "") -> bytes:
    head = (
        f"From: Anna Kowalska <{MEMBERS[0]}>{eol}To: {POST_ADDR}{eol}Subject: Audyt energetyczny{eol}"
        f"Message-ID: <audyt-{time.monotonic_ns()}@gmina-wieliczka.pl>{eol}MIME-Version: 1.0{eol}"
        f"Content-Type: text/plain; charset=utf-8{eol}Content-Transfer-Encoding: 8bit{eol}{extra_headers}{eol}"
    )
    body = "".join(f"{i:06d} {POLISH_BODY}{eol}" for i in range(body_lines))
    return (head + body).encode()


def start(start_server: Any, tmp_path: Path, relay_port: int | None = None, **server: Any) -> RunningServer:
    srv: RunningServer = start_server(make_config(tmp_path, relay_port, server=server))
    srv.call(srv.store.create_list(LIST, {"title": "Zarządzanie energią"}, [OWNER]))
    srv.call(srv.store.add_members(LIST, [(m, "", "") for m in MEMBERS]))
    return srv


def stored(srv: RunningServer, kind: str = "post") -> list[dict[str, Any]]:
    """Every incoming row of ``kind``, whatever stage it reached, read from the store."""
    columns = ("list_id", "status", "data")
    rows = committed(srv.config.store_target,
                     f"SELECT {', '.join(columns)} FROM incoming WHERE kind = ? ORDER BY id", (kind,))
    return [dict(zip(columns, row)) for row in rows]


class Raw:
    """A hand-driven SMTP client, for bytes smtplib would not send."""

    def __init__(self, port: int, source: str = "127.0.0.1") -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=30, source_address=(source, 0))
        self.buf = b""

    def reply(self) -> bytes:
        while True:
            lines = self.buf.split(b"\r\n")
            for i, line in enumerate(lines[:-1]):
                if len(line) >= 4 and line[3:4] == b" ":
                    out = b"\r\n".join(lines[: i + 1])
                    self.buf = b"\r\n".join(lines[i + 1:])
                    return out
            chunk = self.sock.recv(65536)
            if not chunk:
                out, self.buf = self.buf, b""
                return out
            self.buf += chunk

    def cmd(self, line: bytes) -> bytes:
        self.sock.sendall(line + b"\r\n")
        return self.reply()

    def close(self) -> None:
        self.sock.close()


# -- bare LF, smuggling --------------------------------------------------------------


def test_bare_lf_post_of_100kb_is_delivered_intact_as_crlf(tmp_path: Path, sink: tuple[SinkHandler, int],
                                                            start_server: Any) -> None:
    handler, port = sink
    srv = start(start_server, tmp_path, port)
    post = polish_post(1100, eol="\n")  # a saved .eml, LF line ends
    assert len(post) > 100_000 and b"\r" not in post
    with smtplib.SMTP("127.0.0.1", srv.port, timeout=30) as client:
        # smtplib sends bytes as they are (bare LF), dot-stuffed, then CRLF "." CRLF.
        assert client.sendmail(MEMBERS[0], [POST_ADDR], post) == {}
    crlf = post.replace(b"\n", b"\r\n")
    [row] = stored(srv)
    # smtplib ends bytes that do not end in CRLF with one: an empty last line.
    assert row['data'].endswith(crlf + b"\r\n")
    srv.drain()
    copy = handler.copies_for(MEMBERS[1])[0].data
    body = crlf.split(b"\r\n\r\n", 1)[1]
    assert body in copy
    assert b"\n" not in copy.replace(b"\r\n", b"")


def test_bare_lf_line_over_the_limit_is_500(tmp_path: Path, start_server: Any) -> None:
    srv = start(start_server, tmp_path)
    post = polish_post(2, eol="\n") + b"x" * 1200 + b"\n"
    with smtplib.SMTP("127.0.0.1", srv.port, timeout=30) as client:
        with pytest.raises(smtplib.SMTPDataError) as exc:
            client.sendmail(MEMBERS[0], [POST_ADDR], post)
        assert exc.value.smtp_code == 500 and b"Line too long" in exc.value.smtp_error
        assert client.noop()[0] == 250
    assert stored(srv) == []


# The fake ends of data of SMTP smuggling (smtpsmuggling.com, CVE-2023-51764..6): none may end DATA.
SMUGGLING = [b"\n.\n", b"\r.\r", b"\r\n.\n", b"\n.\r\n", b"\r.\r\n", b"\r\n.\r", b"\n.\r", b"\r\n\x00.\r\n"]


@pytest.mark.parametrize("fake_end", SMUGGLING, ids=[repr(s) for s in SMUGGLING])
def test_smuggled_end_of_data_stays_in_the_message(tmp_path: Path, start_server: Any, fake_end: bytes) -> None:
    srv = start(start_server, tmp_path)
    raw = Raw(srv.port)
    try:
        assert raw.reply().startswith(b"220")
        assert raw.cmd(b"EHLO klient.example").startswith(b"250")
        assert raw.cmd(f"MAIL FROM:<{MEMBERS[0]}>".encode()).startswith(b"250")
        assert raw.cmd(f"RCPT TO:<{POST_ADDR}>".encode()).startswith(b"250")
        assert raw.cmd(b"DATA").startswith(b"354")
        smuggled = (f"MAIL FROM:<{MEMBERS[1]}>\r\nRCPT TO:<{POST_ADDR}>\r\nDATA\r\n"
                    "From: lukasz@um.krakow.pl\r\nSubject: przemycona\r\n\r\nPRZEMYT\r\n").encode()
        raw.sock.sendall(polish_post(2) + b"koniec" + fake_end + smuggled + b"\r\n.\r\n")
        first = raw.reply()
        assert first.startswith(b"250"), first
        assert raw.cmd(b"NOOP").startswith(b"250")  # one reply for DATA, nothing else came back
    finally:
        raw.close()
    rows = stored(srv)
    assert len(rows) == 1
    assert b"PRZEMYT" in rows[0]['data'] and b"przemycona" in rows[0]['data']


def test_empty_message_and_dot_lines(tmp_path: Path, start_server: Any) -> None:
    # RFC 5321 §4.5.2: a stuffed ".." line arrives as "."; a message that is only headers works.
    srv = start(start_server, tmp_path)
    post = polish_post(1) + b"..\r\n...kropki\r\n"
    with smtplib.SMTP("127.0.0.1", srv.port, timeout=30) as client:
        client.ehlo("klient.example")
        client.mail(MEMBERS[0])
        client.rcpt(POST_ADDR)
        assert client.data(post)[0] == 250  # smtplib stuffs the dots again
    [row] = stored(srv)
    assert row['data'].endswith(b"\r\n..\r\n...kropki\r\n")


# -- the limits ----------------------------------------------------------------------


def test_header_section_size_and_field_count_are_552(tmp_path: Path, start_server: Any) -> None:
    srv = start(start_server, tmp_path, max_header_size="4KB", max_header_fields=50)
    big = polish_post(2, extra_headers="X-Long: " + "\r\n ".join(["słowo"] * 800) + "\r\n")
    many = polish_post(2, extra_headers="".join(f"X-Pole-{i}: ż\r\n" for i in range(60)))
    with smtplib.SMTP("127.0.0.1", srv.port, timeout=30) as client:
        with pytest.raises(smtplib.SMTPDataError) as exc:
            client.sendmail(MEMBERS[0], [POST_ADDR], big)
        assert exc.value.smtp_code == 552 and b"5.3.4 Header section too big" in exc.value.smtp_error
        client.rset()
        with pytest.raises(smtplib.SMTPDataError) as exc:
            client.sendmail(MEMBERS[0], [POST_ADDR], many)
        assert exc.value.smtp_code == 552 and b"5.3.4 Too many header fields" in exc.value.smtp_error
        client.rset()
        # The body may be as long as it likes; only the header section counts.
        assert client.sendmail(MEMBERS[0], [POST_ADDR], polish_post(400)) == {}
    assert len(stored(srv)) == 1


def test_too_many_recipients_is_452(tmp_path: Path, start_server: Any) -> None:
    srv = start(start_server, tmp_path)
    with smtplib.SMTP("127.0.0.1", srv.port, timeout=30) as client:
        client.ehlo("klient.example")
        client.mail(MEMBERS[0])
        for i in range(100):  # RFC 5321 §4.5.3.1.8: at least 100 must be taken
            assert client.rcpt(f"{LIST}-bounces+{i}@{DOMAIN}")[0] == 250
        code, text = client.rcpt(f"{LIST}@{DOMAIN}")
        assert (code, text[:5]) == (452, b"4.5.3")  # RFC 5321 §4.5.3.1.10
        assert client.noop()[0] == 250


def test_unknown_recipients_slow_down_then_disconnect(tmp_path: Path, start_server: Any,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    srv = start(start_server, tmp_path, soft_error_limit=2, error_sleep_time=0.01, hard_error_limit=4)
    caplog.set_level(logging.INFO, logger="listserv.smtp_in")
    with smtplib.SMTP("127.0.0.1", srv.port, timeout=30) as client:
        client.ehlo("zbieracz.example")
        client.mail("zbieracz@spam.example")
        replies = [client.rcpt(f"kowalski{i}@{DOMAIN}") for i in range(5)]
        assert [r[0] for r in replies] == [550, 550, 550, 550, 421]
        assert replies[4][1].startswith(b"4.7.0 Too many refused recipients")
        with pytest.raises(smtplib.SMTPServerDisconnected):
            client.noop()
    slowed = [r for r in caplog.records if "slowing down" in r.getMessage()]
    assert len(slowed) == 2  # the 3rd and 4th errors


def test_connection_limits_total_and_per_ip(tmp_path: Path, start_server: Any) -> None:
    srv = start(start_server, tmp_path, max_connections=4, max_connections_per_ip=2)
    a1, a2 = Raw(srv.port), Raw(srv.port)
    b1, b2 = Raw(srv.port, source="127.0.0.2"), Raw(srv.port, source="127.0.0.2")
    try:
        for c in (a1, a2, b1, b2):
            assert c.reply().startswith(b"220")
        a3 = Raw(srv.port)
        assert a3.reply().startswith(b"421 4.7.0 Too many connections from your address")
        assert a3.sock.recv(10) == b""  # and closed
        c1 = Raw(srv.port, source="127.0.0.3")
        assert c1.reply().startswith(b"421 4.7.0 Too many connections to this list server")
        a3.close()
        c1.close()
        assert a1.cmd(b"QUIT").startswith(b"221")
        a1.close()
        time.sleep(0.2)  # the server sees the close
        again = Raw(srv.port, source="127.0.0.3")
        assert again.reply().startswith(b"220")  # a freed slot is taken again
        again.close()
    finally:
        for c in (a1, a2, b1, b2):
            c.close()


def test_idle_command_timeout_sends_421_before_closing(tmp_path: Path, start_server: Any) -> None:
    srv = start(start_server, tmp_path, timeout=1)
    raw = Raw(srv.port)
    try:
        assert raw.reply().startswith(b"220")
        assert raw.cmd(b"EHLO klient.example").startswith(b"250")
        assert raw.reply().startswith(b"421 4.4.2")  # RFC 5321 §4.5.3.2
        assert raw.sock.recv(10) == b""
    finally:
        raw.close()


def test_data_timeout_is_per_read_and_says_421(tmp_path: Path, start_server: Any) -> None:
    srv = start(start_server, tmp_path, timeout=5, data_timeout=1)
    raw = Raw(srv.port)
    try:
        raw.reply()
        raw.cmd(b"EHLO klient.example")
        raw.cmd(f"MAIL FROM:<{MEMBERS[0]}>".encode())
        raw.cmd(f"RCPT TO:<{POST_ADDR}>".encode())
        assert raw.cmd(b"DATA").startswith(b"354")
        # A slow but active client: 2.4 s of DATA, a line every 0.4 s, longer than data_timeout.
        lines = polish_post(6).split(b"\r\n")
        for line in lines:
            raw.sock.sendall(line + b"\r\n")
            time.sleep(0.4)
        assert raw.cmd(b".").startswith(b"250")
        assert raw.cmd(f"MAIL FROM:<{MEMBERS[0]}>".encode()).startswith(b"250")
        raw.cmd(f"RCPT TO:<{POST_ADDR}>".encode())
        raw.cmd(b"DATA")
        raw.sock.sendall(b"Subject: urwane\r\n")  # then silence
        assert raw.reply().startswith(b"421 4.4.2")
    finally:
        raw.close()
    assert len(stored(srv)) == 1


# -- postmaster ----------------------------------------------------------------------


def test_postmaster_and_abuse_are_stored_before_250_and_forwarded(tmp_path: Path, sink: tuple[SinkHandler, int],
                                                                 start_server: Any) -> None:
    handler, port = sink
    srv = start(start_server, tmp_path, port, postmaster=ADMIN)
    note = ("From: Operator <noc@isp.example>\r\nTo: postmaster@lists.example.org\r\n"
            "Subject: Skarga: zażółć\r\nMessage-ID: <skarga-1@isp.example>\r\n\r\nTreść skargi.\r\n").encode()
    with smtplib.SMTP("127.0.0.1", srv.port, timeout=30) as client:
        client.ehlo("isp.example")
        client.mail("noc@isp.example")
        assert client.rcpt("postmaster")[0] == 250  # RFC 5321 §4.5.1: no domain
        assert client.rcpt(f"Abuse@{DOMAIN}")[0] == 250
        code, text = client.data(note)
        assert code == 250 and b"postmaster" in text
        # Durable at the 250: the row is there (once, for both addresses).
        rows = stored(srv, "postmaster")
        assert len(rows) == 1 and rows[0]['list_id'] == 0 and rows[0]['data'].endswith(note)
        assert client.sendmail("noc@isp.example", [f"postmaster@{DOMAIN}"], note) == {}
    deadline = time.monotonic() + 20
    while len(handler.copies_for(ADMIN)) < 2 and time.monotonic() < deadline:
        srv.app.fanout.wake()  # type: ignore[union-attr]
        time.sleep(0.1)
    copies = handler.copies_for(ADMIN)
    assert len(copies) == 2
    assert copies[0].mail_from == "<>"  # a bounce of it does not come back here
    assert b"DKIM-Signature:" in copies[0].data and b"Tre\xc5\x9b\xc4\x87 skargi" in copies[0].data
    assert {r['status'] for r in stored(srv, "postmaster")} == {"done"}


def test_postmaster_mail_without_a_postmaster_is_kept(tmp_path: Path, sink: tuple[SinkHandler, int],
                                                      start_server: Any, caplog: pytest.LogCaptureFixture) -> None:
    handler, port = sink
    srv = start(start_server, tmp_path, port)
    caplog.set_level(logging.WARNING, logger="listserv.postmaster")
    note = b"From: noc@isp.example\r\nSubject: hello\r\n\r\nbody\r\n"
    with smtplib.SMTP("127.0.0.1", srv.port, timeout=30) as client:
        assert client.sendmail("noc@isp.example", [f"postmaster@{DOMAIN}"], note) == {}
    srv.drain()
    [row] = stored(srv, "postmaster")
    assert row['status'] == "new" and row['data'].endswith(note)
    assert handler.messages == []
    # The warning comes from the worker's requests pass, which drain() (the
    # deliveries) does not wait for: wait for the pass, not for a clock.
    deadline = time.monotonic() + 20
    while not any("set [server] postmaster" in r.getMessage() for r in caplog.records):
        assert time.monotonic() < deadline, "no warning that [server] postmaster is unset"
        time.sleep(0.05)
    [row] = stored(srv, "postmaster")
    assert row['status'] == "new"


def test_other_role_addresses_are_still_refused(tmp_path: Path, start_server: Any) -> None:
    srv = start(start_server, tmp_path)
    with smtplib.SMTP("127.0.0.1", srv.port, timeout=30) as client:
        client.ehlo("klient.example")
        client.mail("x@example.net")
        assert client.rcpt(f"webmaster@{DOMAIN}")[0] == 550
        assert client.rcpt("postmaster@other.example")[0] == 550


# -- the config ----------------------------------------------------------------------


def test_limit_settings_defaults_and_validation(tmp_path: Path) -> None:
    server = make_config(tmp_path).server
    assert (server.recipient_limit, server.data_timeout, server.timeout) == (100, 180, 300)
    assert (server.max_header_size, server.max_header_fields, server.postmaster) == (256 * 1024, 1000, "")
    for bad, key in [({"recipient_limit": 99}, "recipient_limit"), ({"postmaster": "nobody"}, "postmaster"),
                     ({"hard_error_limit": 2, "soft_error_limit": 5}, "hard_error_limit"),
                     ({"max_connections": 5, "max_connections_per_ip": 10}, "max_connections_per_ip"),
                     ({"error_sleep_time": -1}, "error_sleep_time")]:
        with pytest.raises(ConfigError, match=key):
            make_config(tmp_path, server=bad)
    example = config_mod.load(Path(__file__).resolve().parent.parent / "config.example.toml")
    assert example.server.recipient_limit == 100 and example.server.max_connections_per_ip == 50


# -- the event loop keeps answering ----------------------------------------------------


def folded_header_post(size: int) -> bytes:
    """One header field folded over ``size`` bytes of 72-character lines."""
    fold = "\r\n\t" + "ż" * 34  # 72 bytes a line
    count = size // len(fold.encode())
    return (f"From: {MEMBERS[0]}\r\nTo: {POST_ADDR}\r\nSubject: naglowek 2 MB\r\nAuto-Submitted: auto-generated\r\n"
            f"X-Folded: start{fold * count}\r\n\r\nTreść.\r\n").encode()


def many_fields_post(fields: int) -> bytes:
    return (f"From: {MEMBERS[0]}\r\nTo: {POST_ADDR}\r\nSubject: 150000 pol\r\nAuto-Submitted: auto-generated\r\n"
            + "".join(f"X-P: {i}\r\n" for i in range(fields)) + "\r\nTreść.\r\n").encode()


# The prober runs in its own process, so what it measures is the server's
# loop, not this test process's threads (the sink, the sender) or its garbage.
PROBER = r"""
import smtplib, sys, time, pathlib
port, stop, out = int(sys.argv[1]), pathlib.Path(sys.argv[2]), pathlib.Path(sys.argv[3])
times = []
with smtplib.SMTP("127.0.0.1", port, timeout=60) as probe:
    probe.ehlo("probe.example")
    print("ready", flush=True)
    while not stop.exists():
        t0 = time.perf_counter()
        assert probe.noop()[0] == 250
        times.append(time.perf_counter() - t0)
        time.sleep(0.002)
out.write_text("\n".join(f"{t:.6f}" for t in times))
"""


@pytest.mark.slow
def test_noop_answers_within_100ms_while_pathological_headers_are_received_and_fanned_out(
        tmp_path: Path, sink: tuple[SinkHandler, int], capsys: pytest.CaptureFixture[str]) -> None:
    """Issue 12: a second connection's NOOP stays under 100 ms while a 2 MB-header post and a
    150,000-field post are received and delivered to every member, by `listserv serve` as an
    operator runs it (a receiver process and a worker process)."""
    from test_crash import ServerProcess, child_env, cli, wait_until, write_config

    handler, relay_port = sink
    port = free_port()
    cfg = write_config(tmp_path, port, relay_port)
    # The header limits raised, so both posts are taken whole and go through
    # parsing, authentication, rewriting and signing like any member's post.
    text = cfg.read_text(encoding="utf-8").replace(
        "[server]\n", "[server]\nmax_header_size = \"4MB\"\nmax_header_fields = 200000\n", 1)
    cfg.write_text(text.replace("workers = 2\n", "workers = 1\n"), encoding="utf-8")
    cli(cfg, "dkim", "keygen")
    cli(cfg, "list", "create", LIST, "--title", "Zarządzanie energią", "--owner", OWNER)
    cli(cfg, "members", "add", LIST, *MEMBERS)
    srv = ServerProcess(cfg, port, tmp_path / "serve.log")
    srv.start()
    try:
        def member_post(data: bytes) -> bytes:  # the same posts, not automatic: distributed
            return data.replace(b"Auto-Submitted: auto-generated\r\n", b"")

        posts = [member_post(folded_header_post(2 * 1024 * 1024)), member_post(many_fields_post(150_000))]
        # Warm-up: the receiver's parsing processes start on the first big message.
        with smtplib.SMTP("127.0.0.1", port, timeout=120) as client:
            assert client.sendmail(MEMBERS[0], [POST_ADDR], member_post(folded_header_post(100 * 1024))) == {}
        wait_until(lambda: all(len(handler.copies_for(m)) == 1 for m in MEMBERS), 120,
                   "the warm-up post delivered", srv.check_alive)

        stop, out = tmp_path / "stop-probe", tmp_path / "probe-times"
        prober = subprocess.Popen([sys.executable, "-c", PROBER, str(port), str(stop), str(out)],
                                  stdout=subprocess.PIPE, text=True)
        try:
            assert prober.stdout is not None and prober.stdout.readline().strip() == "ready"
            with smtplib.SMTP("127.0.0.1", port, timeout=120) as client:
                replies = [client.sendmail(MEMBERS[0], [POST_ADDR], p) for p in posts]
            assert replies == [{}, {}]
            # Received is not enough: both are fanned out (rewritten, signed, sent) meanwhile.
            wait_until(lambda: all(len(handler.copies_for(m)) == 3 for m in MEMBERS), 300,
                       "both posts delivered to every member", srv.check_alive)
        finally:
            stop.touch()
            assert prober.wait(60) == 0
            prober.stdout.close()
        times = [float(t) for t in out.read_text().split()]
    finally:
        srv.close()
    copies = handler.copies_for(MEMBERS[1])
    assert any(b"X-Folded: start" in c.data and len(c.data) > 2 * 1024 * 1024 for c in copies)
    assert any(c.data.count(b"\r\nX-P: ") >= 150_000 - 1 for c in copies)
    assert all(b"DKIM-Signature:" in c.data for c in copies)
    assert len(times) > 10
    worst = max(times)
    with capsys.disabled():
        print(f"\nNOOP round trips while receiving and fanning out: n={len(times)} max={worst * 1000:.1f} ms")
    assert worst < 0.1, f"NOOP took {worst * 1000:.0f} ms"


def _pool_processes(folder: Path) -> list[int]:
    """The receive pool's processes (forkserver, its workers, resource tracker) of a server run in ``folder``."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().decode(errors="replace")
        except OSError:
            continue
        if "multiprocessing" in cmdline and str(folder) in cmdline:
            found.append(int(proc.name))
    return found


@pytest.mark.skipif(not Path("/proc/self/cmdline").exists(), reason="needs /proc to find the pool's processes")
def test_sigkill_of_the_server_leaves_no_receive_pool_behind(tmp_path: Path, sink: tuple[SinkHandler, int]) -> None:
    """Pool workers are children of the forkserver, not of the server: they watch the server themselves."""
    import signal

    from test_crash import ServerProcess, cli, wait_until, write_config

    _, relay_port = sink
    port = free_port()
    cfg = write_config(tmp_path, port, relay_port)
    cli(cfg, "dkim", "keygen")
    cli(cfg, "list", "create", LIST, "--title", "Zarządzanie energią", "--owner", OWNER)
    cli(cfg, "members", "add", LIST, *MEMBERS)
    srv = ServerProcess(cfg, port, tmp_path / "serve.log")
    srv.start()
    try:
        big = (f"From: {MEMBERS[0]}\r\nTo: {POST_ADDR}\r\nSubject: Duży załącznik\r\n\r\n").encode() \
            + b"Tre\xc5\x9b\xc4\x87 za\xc5\x82\xc4\x85cznika.\r\n" * 4000  # > 64 KB: parsed in the pool
        with smtplib.SMTP("127.0.0.1", port, timeout=60) as client:
            assert client.sendmail(MEMBERS[0], [POST_ADDR], big) == {}
        assert _pool_processes(tmp_path), "the post was not parsed in the receive pool"
        srv.signal(signal.SIGKILL)
        srv.wait(30)
        wait_until(lambda: not _pool_processes(tmp_path), 20, "the receive pool gone with the server")
    finally:
        srv.close()
