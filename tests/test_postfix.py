"""listserv beside a real Postfix, configured as docs/deploy.md says.

One Postfix instance of its own (config directory and queue in a temporary
folder, ports on 127.0.0.1 only, no DNS) plays both sides:

    smtplib --SMTP--> Postfix :PUBLIC (the MX) --LMTP (transport_maps)--> listserv :LMTP
    listserv --SMTP--> Postfix :RELAY (the loopback smtpd without filters) --relayhost--> aiosmtpd sink

The sink stands in for the members' providers.  Every member must get exactly
one copy, and every copy must verify with the Perl DKIM verifier and with
dkimpy after passing through Postfix.  Postfix also checks the list addresses
with listserv before it takes mail for them (``reject_unverified_recipient``),
so an unknown address is refused at RCPT instead of bouncing later.

Postfix's master must be started by root; its daemons then run as the
``postfix`` user, so the instance's folder must be one that user can reach.
"""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import shutil
import signal
import smtplib
import sqlite3
import stat
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import dkim as dkimpy
import pytest

from conftest import DOMAIN, ROOT, SELECTOR, SinkHandler, dkim_dnsfunc, free_port, require, verify_with_perl
from listserv import dkim

pytestmark = [pytest.mark.slow, pytest.mark.one_backend]

LIST = "seap-planning"
POST_ADDR = f"{LIST}@{DOMAIN}"
OWNER = "koordynator@pnec.example.pl"
MEMBERS = ["anna.kowalska@gmina-wolow.example.pl", "jan.nowak@um.example.pl", "ewa@energia.example.org"]
POSTER = MEMBERS[0]
MESSAGE_ID = "harmonogram-2026@gmina-wolow.example.pl"


def postfix_command() -> str:
    found = shutil.which("postfix") or ("/usr/sbin/postfix" if Path("/usr/sbin/postfix").exists() else None)
    require(found is not None, "Postfix is not installed (Debian package postfix)")
    assert found is not None
    require(os.geteuid() == 0, "Postfix's master daemon must be started by root (run the tests as root)")
    try:
        pwd.getpwnam("postfix")
    except KeyError:
        require(False, "no 'postfix' user (the Debian package creates it)")
    return found


def reachable_by_everyone(path: Path) -> bool:
    return all(p.stat().st_mode & stat.S_IXOTH for p in (path, *path.parents) if p.exists())


# -- the Postfix instance ----------------------------------------------------------------


MASTER_CF = """\
# service   type  private unpriv  chroot  wakeup  maxproc command + args
# The MX: what the internet would reach on port 25.
127.0.0.1:{public} inet n - n - - smtpd
  -o mynetworks=192.0.2.1/32
# The relay listserv sends through: loopback only, no content filter, no
# address mappings, so a copy is neither filtered twice nor looped back.
127.0.0.1:{relay} inet n - n - - smtpd
  -o content_filter=
  -o receive_override_options=no_unknown_recipient_checks,no_header_body_checks,no_milters,no_address_mappings
  -o smtpd_milters=
  -o smtpd_client_restrictions=permit_mynetworks,reject
  -o smtpd_relay_restrictions=permit_mynetworks,reject
  -o smtpd_recipient_restrictions=permit_mynetworks,reject
pickup    unix  n - n 60   1 pickup
cleanup   unix  n - n -    0 cleanup
qmgr      unix  n - n 300  1 qmgr
rewrite   unix  - - n -    - trivial-rewrite
bounce    unix  - - n -    0 bounce
defer     unix  - - n -    0 bounce
trace     unix  - - n -    0 bounce
verify    unix  - - n -    1 verify
flush     unix  n - n 1000? 0 flush
proxymap  unix  - - n -    - proxymap
smtp      unix  - - n -    - smtp
relay     unix  - - n -    - smtp
showq     unix  n - n -    - showq
error     unix  - - n -    - error
retry     unix  - - n -    - error
discard   unix  - - n -    - discard
lmtp      unix  - - n -    - lmtp
anvil     unix  - - n -    1 anvil
scache    unix  - - n -    1 scache
postlog   unix-dgram n - n - 1 postlogd
"""


def main_cf(base: Path, lmtp_port: int, sink_port: int) -> str:
    return f"""\
compatibility_level = 3.6
queue_directory = {base / 'queue'}
data_directory = {base / 'data'}
mail_owner = postfix
setgid_group = postdrop
maillog_file = {base / 'maillog'}
maillog_file_prefixes = {base}
myhostname = mx.{DOMAIN}
mydomain = {DOMAIN}
myorigin = $myhostname
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
mynetworks = 127.0.0.0/8
# No local delivery at all: this Postfix only relays.
mydestination =
local_transport = error:local delivery is disabled
local_recipient_maps =
alias_maps =
alias_database =
# The list domain goes to listserv over LMTP (docs/deploy.md, step 3).
relay_domains = {DOMAIN}
transport_maps = inline:{{ {DOMAIN}=lmtp:inet:127.0.0.1:{lmtp_port} }}
smtpd_relay_restrictions = permit_mynetworks, reject_unauth_destination
smtpd_recipient_restrictions = permit_mynetworks, reject_unauth_destination,
    check_recipient_access inline:{{ {DOMAIN}=reject_unverified_recipient }}
unverified_recipient_reject_code = 550
address_verify_poll_delay = 1s
# Everything else goes to the members' providers: here one aiosmtpd sink.
relayhost = [127.0.0.1]:{sink_port}
# No DNS anywhere, and quick retries so a test never waits minutes.
smtp_dns_support_level = disabled
lmtp_dns_support_level = disabled
smtpd_peername_lookup = no
queue_run_delay = 1s
minimal_backoff_time = 1s
maximal_backoff_time = 2s
biff = no
"""


class Postfix:
    def __init__(self, command: str, base: Path) -> None:
        self.command = command
        self.base = base
        self.etc = base / "etc"

    def run(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([self.command, "-c", str(self.etc), *args], capture_output=True, text=True,
                              timeout=60)

    def setup(self, public: int, relay: int, lmtp: int, sink: int) -> None:
        for sub in ("etc", "queue", "data"):
            (self.base / sub).mkdir(parents=True, exist_ok=True)
        self.base.chmod(0o755)
        # Postfix runs its daemons as mail_owner; they write the data directory.
        pw = pwd.getpwnam("postfix")
        os.chown(self.base / "data", pw.pw_uid, pw.pw_gid)
        (self.etc / "main.cf").write_text(main_cf(self.base, lmtp, sink))
        (self.etc / "master.cf").write_text(MASTER_CF.format(public=public, relay=relay))
        # `check` creates the queue folders with the owners Postfix wants.
        result = self.run("check")
        assert result.returncode == 0, f"postfix check failed:\n{result.stdout}{result.stderr}\n{self.log()}"

    def start(self) -> None:
        result = self.run("start")
        assert result.returncode == 0, f"postfix start failed:\n{result.stdout}{result.stderr}\n{self.log()}"

    def master_pid(self) -> int | None:
        try:
            return int((self.base / "queue" / "pid" / "master.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None

    def stop(self) -> None:
        pid = self.master_pid()
        self.run("stop")
        if pid is None:
            return
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.1)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)  # its children exit when they lose the master

    def queued(self) -> int:
        """Messages still in the Postfix queue (incoming, active, deferred)."""
        queue = self.base / "queue"
        return sum(1 for sub in ("incoming", "active", "deferred") for p in (queue / sub).rglob("*") if p.is_file())

    def log(self) -> str:
        path = self.base / "maillog"
        return path.read_text(errors="replace")[-6000:] if path.exists() else "(no Postfix log)"


@pytest.fixture
def postfix_instance(tmp_path: Path) -> Iterator[Postfix]:
    command = postfix_command()
    cleanup: Path | None = None
    if reachable_by_everyone(tmp_path):
        base = tmp_path / "postfix"
    else:
        # pytest's base folder is private to root (0700); the postfix user
        # could not reach a queue inside it.
        base = cleanup = Path(tempfile.mkdtemp(prefix="listserv-postfix-"))
        base.chmod(0o755)
    instance = Postfix(command, base)
    try:
        require(reachable_by_everyone(base), f"{base} is not reachable by the postfix user")
        yield instance
    finally:
        instance.stop()
        if cleanup is not None:
            shutil.rmtree(cleanup, ignore_errors=True)


# -- listserv as a real process -------------------------------------------------------------


def wait_until(predicate: Callable[[], bool], timeout: float, what: str, diagnose: Callable[[], str]) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"not reached within {timeout:.0f} s: {what}\n{diagnose()}")


def child_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    env.pop("LISTSERV_CONFIG", None)
    return env


def write_config(tmp_path: Path, lmtp_port: int, relay_port: int) -> Path:
    q = json.dumps  # a TOML basic string is written like a JSON string
    cfg = tmp_path / "listserv.toml"
    cfg.write_text(
        "[server]\n"
        f"domain = {q(DOMAIN)}\n"
        f"listen = {q(f'127.0.0.1:{lmtp_port}')}\n"
        'protocol = "lmtp"\n'
        f"state_dir = {q(str(tmp_path / 'state'))}\n"
        'log_level = "info"\n'
        "\n[delivery]\n"
        'mode = "smtp"\n'
        f"relay = {q(f'127.0.0.1:{relay_port}')}\n"
        "timeout = 30\n"
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


def cli(cfg: Path, *args: str) -> str:
    result = subprocess.run([sys.executable, "-m", "listserv", *args, "--config", str(cfg)],
                            capture_output=True, text=True, env=child_env(), timeout=120)
    assert result.returncode == 0, f"listserv {' '.join(args)} failed:\n{result.stdout}{result.stderr}"
    return result.stdout


@pytest.fixture
def listserv_process(tmp_path: Path) -> Iterator[Callable[[Path], subprocess.Popen[bytes]]]:
    procs: list[subprocess.Popen[bytes]] = []

    def start(cfg: Path) -> subprocess.Popen[bytes]:
        with open(tmp_path / "listserv.log", "ab") as log:
            proc = subprocess.Popen([sys.executable, "-m", "listserv", "serve", "--config", str(cfg)],
                                    stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                    env=child_env())
        procs.append(proc)
        return proc

    try:
        yield start
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(10)


def answers(port: int, lmtp: bool = False) -> bool:
    try:
        client = smtplib.LMTP("127.0.0.1", port, timeout=5) if lmtp else smtplib.SMTP("127.0.0.1", port, timeout=5)
        with client:
            return client.noop()[0] == 250
    except (OSError, smtplib.SMTPException):
        return False


def post_bytes() -> bytes:
    return (
        f"From: =?utf-8?q?Anna_Kowalska?= <{POSTER}>\r\n"
        f"To: {POST_ADDR}\r\n"
        "Subject: =?utf-8?q?Harmonogram_prac_nad_SEAP_=E2=80=94_pro=C5=9Bba_o_uwagi?=\r\n"
        f"Message-ID: <{MESSAGE_ID}>\r\n"
        "Date: Thu, 26 Nov 2026 09:30:00 +0100\r\n"
        "MIME-Version: 1.0\r\n"
        "Content-Type: text/plain; charset=utf-8\r\n"
        "Content-Transfer-Encoding: 8bit\r\n"
        "\r\n"
        "Dzień dobry,\r\n\r\nprzesyłam harmonogram prac nad SEAP. Proszę o uwagi do piątku.\r\n\r\n"
        "Anna Kowalska\r\nUrząd Gminy Wołów\r\n"
    ).encode()


def pending_copies(db_path: Path) -> int:
    with contextlib.closing(sqlite3.connect(f"file:{db_path}?mode=ro", uri=True, timeout=10)) as db:
        return int(db.execute("SELECT count(*) FROM deliveries WHERE status = 'pending'").fetchone()[0])


def test_post_through_postfix_to_listserv_and_back(
    tmp_path: Path, postfix_instance: Postfix, listserv_process: Callable[[Path], subprocess.Popen[bytes]],
    sink: tuple[SinkHandler, int],
) -> None:
    handler, sink_port = sink
    public, relay, lmtp = free_port(), free_port(), free_port()
    postfix_instance.setup(public=public, relay=relay, lmtp=lmtp, sink=sink_port)

    cfg = write_config(tmp_path, lmtp, relay)
    cli(cfg, "dkim", "keygen")
    cli(cfg, "list", "create", LIST, "--title", "Planowanie SEAP", "--owner", OWNER)
    cli(cfg, "members", "add", LIST, *MEMBERS)
    server = listserv_process(cfg)

    def diagnose() -> str:
        log = (tmp_path / "listserv.log").read_text(errors="replace")[-4000:]
        return f"-- listserv log --\n{log}\n-- Postfix log --\n{postfix_instance.log()}"

    wait_until(lambda: answers(lmtp, lmtp=True) or server.poll() is not None, 60, "listserv answering", diagnose)
    assert server.poll() is None, f"listserv exited with {server.returncode}\n{diagnose()}"
    postfix_instance.start()
    wait_until(lambda: answers(public), 30, "Postfix answering on its public port", diagnose)

    with smtplib.SMTP("127.0.0.1", public, timeout=60) as client:
        client.ehlo("mail.gmina-wolow.example.pl")
        # Postfix asks listserv (an LMTP probe) before it takes mail for the
        # list domain: an address that is not a list is refused now, not bounced later.
        code, reply = client.mail(POSTER)
        assert code == 250, reply
        code, reply = client.rcpt(f"no-such-list@{DOMAIN}")
        assert code == 550, f"unknown list address: {code} {reply!r}\n{diagnose()}"
        # Not an open relay: other domains are refused.
        code, reply = client.rcpt("someone@elsewhere.example.com")
        assert code == 554 and b"Relay access denied" in reply, (code, reply)
        code, reply = client.rcpt(POST_ADDR)
        assert code == 250, f"{code} {reply!r}\n{diagnose()}"
        code, reply = client.data(post_bytes())
        assert code == 250, f"{code} {reply!r}\n{diagnose()}"

    everyone = set(MEMBERS) | {OWNER}
    wait_until(lambda: everyone <= set(handler.recipients()), 120,
               f"every member's copy reached the sink through Postfix (got {handler.recipients()})", diagnose)
    # ... and nothing more is on its way: listserv and Postfix have both
    # finished, so a second copy would be in the sink by now.
    wait_until(lambda: pending_copies(tmp_path / "state" / "listserv.sqlite3") == 0
               and postfix_instance.queued() == 0, 60, "listserv's and Postfix's queues empty", diagnose)

    counts = Counter(handler.recipients())
    assert counts == Counter({r: 1 for r in everyone}), counts
    key = dkim.DkimKey.load(tmp_path / "dkim.key", domain=DOMAIN, selector=SELECTOR)
    for message in handler.messages:
        # The list's bounce address (VERP'd or not), so bounces come back to listserv.
        assert message.mail_from.startswith(f"{LIST}-bounces") and message.mail_from.endswith(f"@{DOMAIN}"), (
            message.mail_from)
        data = message.data
        assert f"Message-ID: <{MESSAGE_ID}>".encode() in data
        assert b"by mx.lists.example.org (Postfix)" in data, "the copy did not pass through Postfix"
        assert "przesyłam harmonogram".encode() in data, "the 8-bit body was changed on the way"
        assert dkimpy.verify(data, dnsfunc=dkim_dnsfunc(key)), f"dkimpy: copy to {message.rcpt_tos} fails"
        perl = verify_with_perl(data, key, tmp_path)
        assert perl.returncode == 0, f"Perl Mail::DKIM: copy to {message.rcpt_tos}: {perl.stdout}{perl.stderr}"

    # Postfix's own log shows both hops: into listserv by LMTP, out to the "providers".
    log = postfix_instance.log()
    assert f"relay=127.0.0.1[127.0.0.1]:{lmtp}" in log and "status=sent" in log, log
    assert f"relay=127.0.0.1[127.0.0.1]:{sink_port}" in log, log


# -- the guide's other steps, scripted ----------------------------------------------------------


def test_deploy_smoke_script(tmp_path: Path) -> None:
    """deploy/smoke.sh ends with a working list (listserv as installed for this test run)."""
    env = child_env()
    env["LISTSERV"] = f"{sys.executable} -m listserv"
    env["SMOKE_PYTHON"] = sys.executable
    work = tmp_path / "smoke"
    result = subprocess.run(["sh", str(ROOT / "deploy" / "smoke.sh"), str(work)], capture_output=True, text=True,
                            env=env, timeout=300)
    assert result.returncode == 0, f"{result.stdout}\n{result.stderr}"
    lines = result.stdout.splitlines()
    assert lines[-1] == "smoke: OK", result.stdout
    for rcpt in ("anna@gmina.example.pl", "jan@um.example.pl", "ewa@energia.example.org",
                 "koordynator@pnec.example.pl"):
        assert f"smoke: delivered to {rcpt}" in lines
    assert any(line.startswith("smoke: server is up: server: up, 127.0.0.1:") for line in lines), result.stdout
    (backup,) = (work / "backup").iterdir()
    with contextlib.closing(sqlite3.connect(f"file:{backup}?mode=ro", uri=True)) as db:
        assert [r[0] for r in db.execute("SELECT name FROM lists")] == ["seap-planning"]
