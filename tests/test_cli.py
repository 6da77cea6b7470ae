"""The administrator's command line, through click's CliRunner against a real config file and SQLite state.

Every error must be a non-zero exit with exactly one line on stderr starting
``listserv: error:`` (or click's own usage error), never a traceback, and
must leave the state as it was.
"""

from __future__ import annotations

import asyncio
import email
import email.policy
import json
import os
import sqlite3
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click
import dkim as dkimpy
import pytest
from click.testing import CliRunner, Result

from conftest import dkim_dnsfunc
from listserv import __version__, dkim
from listserv.cli import main
from listserv.settings import SETTINGS
from listserv.store import IncomingRow, Store

pytestmark = pytest.mark.one_backend  # runs once: see pyproject's markers

ROOT = Path(__file__).resolve().parent.parent
DATA = Path(__file__).resolve().parent / "data" / "cli"
DOMAIN = "lists.example.org"
SELECTOR = "test"
LIST = "seap-planning"
OWNER = "koordynator@pnec.org.pl"

CONFIG = f"""\
[server]
domain = "{DOMAIN}"
state_dir = "state"

[dkim]
selector = "{SELECTOR}"
private_key = "dkim.key"

[archive]
dir = "archiwum"
"""

SEEDS = """
[[lists]]
name = "seap-planning"
title = "Planowanie SEAP"
description = "Dyskusja o przygotowaniu Planów działań na rzecz zrównoważonej energii."
owners = ["koordynator@pnec.org.pl"]

[[lists]]
name = "energy-management"
title = "Zarządzanie energią"
owners = ["koordynator@pnec.org.pl"]
"""


class Cli:
    """Runs `listserv ... --config FILE` in-process and reads the state database directly."""

    def __init__(self, root: Path, config_text: str = CONFIG) -> None:
        self.root = root
        self.config = root / "listserv.toml"
        self.config.write_text(config_text, encoding="utf-8")
        self.db = root / "state" / "listserv.sqlite3"
        self.key = root / "dkim.key"

    def __call__(self, *args: str, input: str | None = None, config: bool = True,
                 env: dict[str, str] | None = None) -> Result:
        argv = [*args, "--config", str(self.config)] if config else list(args)
        return CliRunner().invoke(main, argv, input=input, env=env)

    def ok(self, *args: str, **kwargs: Any) -> str:
        result = self(*args, **kwargs)
        assert result.exit_code == 0, (result.exit_code, result.stdout, result.stderr, result.exception)
        return result.stdout

    def sql(self, query: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        conn = sqlite3.connect(self.db)
        try:
            return list(conn.execute(query, params).fetchall())
        finally:
            conn.close()

    def snapshot(self) -> dict[str, list[tuple[Any, ...]]]:
        """Everything an administrator's command can change."""
        return {
            table: self.sql(f"SELECT * FROM {table} ORDER BY 1")
            for table in ("lists", "members", "bans", "incoming", "outbox", "deliveries")
        }

    def members(self, name: str = LIST) -> list[str]:
        return self.ok("members", "list", name).splitlines()

    def submit(self, list_name: str, *, sender: str, subject: str, status: str = "held",
               reason: str = "not a member", message_id: str = "") -> int:
        """Put a post into `incoming` the way the SMTP receiver does (submit_incoming)."""
        data = (
            f"From: {sender}\r\nTo: {list_name}@{DOMAIN}\r\nSubject: {subject}\r\n"
            f"Message-ID: <{message_id}>\r\n\r\nDzień dobry,\r\nproszę o uwagi.\r\n"
        ).encode()

        async def go() -> int:
            store = await Store.open(self.db)
            try:
                lst = await store.get_list(list_name)
                await store.submit_incoming([IncomingRow(
                    list_id=lst.id, kind="post", detail="", mail_from=sender, rcpt=f"{list_name}@{DOMAIN}",
                    peer="192.0.2.7", message_id=message_id, sender=sender, subject=subject, status=status,
                    reason=reason, data=data,
                )])
            finally:
                await store.close()
            return int(self.sql("SELECT max(id) FROM incoming")[0][0])

        return asyncio.run(go())


@pytest.fixture
def cli(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Cli:
    monkeypatch.delenv("LISTSERV_CONFIG", raising=False)
    monkeypatch.chdir(tmp_path)  # a command that forgot --config must not write into the checkout
    return Cli(tmp_path)


@pytest.fixture
def with_list(cli: Cli) -> Cli:
    cli.ok("list", "create", LIST, "--title", "Planowanie SEAP", "--owner", OWNER)
    return cli


def assert_error(result: Result, *fragments: str) -> str:
    """A failed command: non-zero exit, no traceback, one error line on stderr. Returns that line."""
    assert result.exit_code != 0, (result.stdout, result.stderr)
    assert isinstance(result.exception, SystemExit), repr(result.exception)  # not an escaped exception
    err = result.stderr
    assert "Traceback" not in err
    lines = err.strip("\n").splitlines()
    assert lines, "nothing on stderr"
    if lines[0].startswith("listserv: error: "):
        assert len(lines) == 1, err
        message = lines[0]
        assert result.exit_code in (1, 2)  # 2: a usage error (bad argument), as click has it
    else:  # click's usage error: "Usage: ...", "Try ... for help.", "", "Error: ..."
        assert lines[0].startswith("Usage: "), err
        assert lines[-1].startswith("Error: "), err
        assert sum(line.startswith("Error: ") for line in lines) == 1, err
        assert any(line.startswith("Try '") and line.endswith(" for help.") for line in lines), err
        message = lines[-1]
        assert result.exit_code == 2
    for fragment in fragments:
        assert fragment in message, (fragment, message)
    return message


# -- the program itself ----------------------------------------------------------------------------------


def test_version(cli: Cli) -> None:
    result = cli("--version", config=False)
    assert result.exit_code == 0
    assert result.stdout == f"listserv, version {__version__}\n"


def test_python_dash_m_listserv_help(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    env.pop("LISTSERV_CONFIG", None)
    proc = subprocess.run([sys.executable, "-m", "listserv", "--help"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("Usage: ")
    for command in ("serve", "lists", "list", "members", "ban", "held", "queue", "dkim"):
        assert f"  {command} " in proc.stdout or f"  {command}\n" in proc.stdout, command
    assert proc.stderr == ""
    assert not (tmp_path / "state").exists()  # --help touches nothing


# -- the program's quick exit (listserv.cli.run) ---------------------------------------------------------------------

_RUN_PROGRAM = """
import atexit, sys, threading, time
from pathlib import Path
from listserv.cli import run
out = Path(sys.argv[1])
atexit.register(lambda: ((out / "atexit").write_text("zakończone"), sys.stdout.write("koniec\\n")))
if sys.argv[2] == "thread":
    def late() -> None:
        time.sleep(0.5)
        (out / "thread").write_text("wątek skończył")
    threading.Thread(target=late).start()
sys.argv = ["listserv", *sys.argv[3:]]
run()
"""


def _program(tmp_path: Path, mode: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    env.pop("LISTSERV_CONFIG", None)
    env.pop("PYTHONUNBUFFERED", None)  # stdout buffered, as a pipe's is: only a flush gets it out
    return subprocess.run([sys.executable, "-c", _RUN_PROGRAM, str(tmp_path), mode, *args], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)


def test_the_program_exits_with_its_output_flushed_and_exit_handlers_run(tmp_path: Path) -> None:
    proc = _program(tmp_path, "plain", "--help")
    assert proc.returncode == 0, proc.stderr
    # All of it, through a pipe, down to what an exit handler wrote last (unflushed till the end).
    assert proc.stdout.startswith("Usage: ") and proc.stdout.endswith("\nkoniec\n"), proc.stdout[-200:]
    assert (tmp_path / "atexit").read_text() == "zakończone"


def test_the_program_keeps_its_exit_code_and_error_line(tmp_path: Path) -> None:
    (tmp_path / "zły.toml").write_text("[server\n")
    proc = _program(tmp_path, "plain", "--config", str(tmp_path / "zły.toml"), "lists")
    assert proc.returncode == 1
    assert proc.stderr.startswith("listserv: error: ") and proc.stderr.count("\n") == 1, proc.stderr
    assert (tmp_path / "atexit").read_text() == "zakończone"
    proc = _program(tmp_path, "plain", "no-such-command")
    assert proc.returncode == 2
    assert "listserv: error:" in proc.stderr


def test_the_program_waits_for_a_thread_still_running(tmp_path: Path) -> None:
    proc = _program(tmp_path, "thread", "--version")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == f"listserv, version {__version__}\nkoniec\n"
    assert (tmp_path / "thread").read_text() == "wątek skończył"  # not cut short by the quick exit


def _command_paths(group: click.Group, prefix: tuple[str, ...] = ()) -> Iterator[tuple[str, ...]]:
    for name, command in sorted(group.commands.items()):
        yield (*prefix, name)
        if isinstance(command, click.Group):
            yield from _command_paths(command, (*prefix, name))


@pytest.mark.parametrize("path", list(_command_paths(main)), ids=" ".join)
def test_every_command_has_help(cli: Cli, path: tuple[str, ...]) -> None:
    result = cli(*path, "--help", config=False)
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("Usage: ")
    assert not (cli.root / "state").exists()


# -- which config ------------------------------------------------------------------------------------------


def test_config_from_the_environment(cli: Cli) -> None:
    cli.ok("list", "create", LIST)
    out = cli.ok("lists", config=False, env={"LISTSERV_CONFIG": str(cli.config)})
    assert out.startswith(f"{LIST}@{DOMAIN}\t")


def test_config_before_the_command(cli: Cli) -> None:
    cli.ok("list", "create", LIST)
    out = cli.ok("--config", str(cli.config), "lists", config=False)
    assert out.startswith(f"{LIST}@{DOMAIN}\t")


@pytest.mark.parametrize(("text", "fragment"), [
    ('[server]\ndomain = "lists.example.org\n', "is not valid TOML"),
    ('[delivery]\nrelay = 25\n', "[delivery] relay: expected a string"),
    ('[server]\nrelay = "127.0.0.1:25"\n', "[server] unknown key 'relay'"),
    ('[list_defaults]\nlanguage = "de"\n', "[list_defaults] list setting 'language'"),
    ('[serwer]\n', "unknown section [serwer]"),
])
def test_bad_config_is_one_line(cli: Cli, text: str, fragment: str) -> None:
    cli.config.write_text(text, encoding="utf-8")
    for command in (["lists"], ["dkim", "keygen"], ["serve"], ["queue", "show"]):
        assert_error(cli(*command), fragment)
    assert not (cli.root / "state").exists()


def test_missing_config_file_is_one_line(cli: Cli) -> None:
    cli.config.unlink()
    assert_error(cli("lists"), "listserv.toml does not exist")


# -- lists -----------------------------------------------------------------------------------------------------


def test_lists_is_empty_at_first(cli: Cli) -> None:
    assert cli.ok("lists") == ""


def test_seed_lists_show_before_the_first_serve(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    cli = Cli(tmp_path, CONFIG + SEEDS)
    assert cli.ok("lists").splitlines() == [
        f"energy-management@{DOMAIN}\t1 member\tZarządzanie energią",
        f"seap-planning@{DOMAIN}\t1 member\tPlanowanie SEAP",
    ]
    assert cli.members("seap-planning") == [f"{OWNER}\towner\tunmoderated\tenabled\teach"]
    # A seeded list the administrator removes stays removed.
    cli.ok("list", "remove", "energy-management", "--yes")
    assert [line.split("\t")[0] for line in cli.ok("lists").splitlines()] == [f"seap-planning@{DOMAIN}"]


def test_list_create_show_and_lists(cli: Cli) -> None:
    out = cli.ok("list", "create", "energy-management", "--title", "Zarządzanie energią",
                 "--description", "Audyty, termomodernizacja, oświetlenie uliczne.", "--owner", "Koordynator@PNEC.org.pl",
                 "--owner", "zastepca@pnec.org.pl", "--language", "en")
    assert out == f"created energy-management@{DOMAIN}\n"
    assert cli.ok("lists") == f"energy-management@{DOMAIN}\t2 members\tZarządzanie energią\n"
    assert cli.members("energy-management") == [
        f"{OWNER}\towner\tunmoderated\tenabled\teach",
        "zastepca@pnec.org.pl\towner\tunmoderated\tenabled\teach",
    ]

    lines = cli.ok("list", "show", "energy-management").splitlines()
    assert lines[0] == "name = energy-management"
    assert lines[1] == f"address = energy-management@{DOMAIN}"
    shown = {}
    for line in lines[2:]:
        key, sep, value = line.partition(" = ")
        assert sep, line
        assert key not in shown, f"{key} shown twice"
        shown[key] = value
    assert set(shown) == set(SETTINGS)  # every setting, nothing else
    assert shown["title"] == "Zarządzanie energią  *"
    assert shown["description"] == "Audyty, termomodernizacja, oświetlenie uliczne.  *"
    assert shown["language"] == "en  *"
    assert shown["posting_policy"] == "members"  # the default, not marked
    assert shown["emergency_moderation"] == "false"
    assert json.loads(shown["attachments"])["hold"] == []


def test_list_show_values_are_what_list_set_accepts(with_list: Cli) -> None:
    # Feeding every shown value back to `list set` is accepted and changes nothing visible.
    before = with_list.ok("list", "show", LIST).splitlines()[2:]
    for line in before:
        key, _, value = line.partition(" = ")
        with_list.ok("list", "set", LIST, key, value.removesuffix("  *"))
    after = with_list.ok("list", "show", LIST).splitlines()[2:]
    assert [a.removesuffix("  *") for a in after] == [b.removesuffix("  *") for b in before]


def test_list_create_duplicate(with_list: Cli) -> None:
    before = with_list.snapshot()
    assert_error(with_list("list", "create", LIST, "--title", "Inny"), f"'{LIST}' exists already")
    assert with_list.snapshot() == before


@pytest.mark.parametrize("name", ["Planowanie", "zła-lista", "_x", "a b", "x" * 64])
def test_list_create_bad_name(cli: Cli, name: str) -> None:
    assert_error(cli("list", "create", name), "is not a valid list name")
    assert cli.ok("lists") == ""


def test_list_create_bad_owner_creates_nothing(cli: Cli) -> None:
    assert_error(cli("list", "create", LIST, "--owner", OWNER, "--owner", "koordynator.pnec.org.pl"),
                 "'koordynator.pnec.org.pl' is not a valid e-mail address")
    assert cli.ok("lists") == ""


def test_list_create_bad_language(cli: Cli) -> None:
    assert_error(cli("list", "create", LIST, "--language", "de"), "--language")


@pytest.mark.parametrize(("key", "value", "shown"), [
    ("title", "Planowanie SEAP i SECAP — gminy", "Planowanie SEAP i SECAP — gminy"),
    ("description", "", ""),
    ("language", "EN", "en"),
    ("subject_prefix", "[SEAP/{name}]", "[SEAP/{name}]"),
    ("posting_policy", "announce", "announce"),
    ("dmarc_mitigation", "when_strict", "when_strict"),
    ("emergency_moderation", "tak", "true"),
    ("emergency_moderation", "off", "false"),
    ("max_recipients_in_header", " 25 ", "25"),
    ("attachments", '{"strip": ["application/x-msdownload"], "hold": ["application/zip", "video/*"]}',
     '{"strip": ["application/x-msdownload"], "hold": ["application/zip", "video/*"]}'),
    ("confirm_expiry", "2d", "2d"),
    ("held_expiry", "36h", "36h"),
    ("subscription_policy", "closed", "closed"),
    ("archive_policy", "private", "private"),
    ("footer", "Lista Porozumienia Burmistrzów — wypisz się: seap-planning-leave@lists.example.org",
     "Lista Porozumienia Burmistrzów — wypisz się: seap-planning-leave@lists.example.org"),
])
def test_list_set_valid(with_list: Cli, key: str, value: str, shown: str) -> None:
    out = with_list.ok("list", "set", LIST, key, value)
    assert out == f"{LIST}: {key} = {shown}\n"
    lines = with_list.ok("list", "show", LIST).splitlines()
    assert f"{key} = {shown}  *" in lines


@pytest.mark.parametrize(("key", "value", "fragment"), [
    ("moderacja", "tak", "unknown list setting 'moderacja'"),
    ("Title", "x", "unknown list setting 'Title'"),
    ("language", "de", "list setting 'language'"),
    ("posting_policy", "wszyscy", "list setting 'posting_policy'"),
    ("dmarc_mitigation", "czasem", "list setting 'dmarc_mitigation'"),
    ("emergency_moderation", "może", "list setting 'emergency_moderation'"),
    ("max_recipients_in_header", "0", "list setting 'max_recipients_in_header'"),
    ("max_recipients_in_header", "dziesięć", "list setting 'max_recipients_in_header'"),
    ("subject_prefix", "[{lista}]", "list setting 'subject_prefix'"),
    ("attachments", "application/zip", "list setting 'attachments'"),
    ("attachments", '{"hold": ["zip"]}', "list setting 'attachments'"),
    ("held_expiry", "tydzień", "list setting 'held_expiry'"),
    ("who_policy", "wszyscy", "list setting 'who_policy'"),
])
def test_list_set_invalid_names_the_key_and_changes_nothing(with_list: Cli, key: str, value: str,
                                                            fragment: str) -> None:
    before = with_list.snapshot()
    assert_error(with_list("list", "set", LIST, key, value), fragment)
    assert with_list.snapshot() == before


def test_list_set_on_an_unknown_list(cli: Cli) -> None:
    assert_error(cli("list", "set", "nie-ma", "title", "x"), "no list named 'nie-ma'")


def test_list_show_unknown(cli: Cli) -> None:
    assert_error(cli("list", "show", "nie-ma"), "no list named 'nie-ma'")


def test_list_remove(with_list: Cli) -> None:
    with_list.ok("members", "add", LIST, "anna@gmina.example.pl")
    with_list.ok("ban", "add", "*@spam.example", "--list", LIST)
    assert with_list.ok("list", "remove", LIST, "--yes") == f"removed {LIST}\n"
    assert with_list.ok("lists") == ""
    assert with_list.sql("SELECT count(*) FROM members") == [(0,)]
    assert with_list.sql("SELECT count(*) FROM bans") == [(0,)]
    assert_error(with_list("list", "remove", LIST, "--yes"), f"no list named '{LIST}'")


# -- members ---------------------------------------------------------------------------------------------------------


def test_members_add_addresses_and_list_format(with_list: Cli) -> None:
    out = with_list.ok("members", "add", LIST, "Anna.Kowalska@Gmina-Wieliczka.PL", "<lukasz@um.krakow.pl>")
    assert out.startswith(f"added 2 members to {LIST}")
    out = with_list.ok("members", "add", LIST, "moderator@pnec.org.pl", "--role", "moderator")
    assert out.startswith(f"added 1 moderator to {LIST}")
    assert with_list.members() == [
        "anna.kowalska@gmina-wieliczka.pl\tmember\tunmoderated\tenabled\teach",
        f"{OWNER}\towner\tunmoderated\tenabled\teach",
        "lukasz@um.krakow.pl\tmember\tunmoderated\tenabled\teach",
        "moderator@pnec.org.pl\tmoderator\tunmoderated\tenabled\teach",
    ]
    assert with_list.ok("lists") == f"{LIST}@{DOMAIN}\t4 members\tPlanowanie SEAP\n"


CSV_UTF8 = """\
address,name,organisation
# Urzędy gmin z Małopolski
anna.kowalska@gmina-wieliczka.pl,Anna Kowalska,Urząd Gminy Wieliczka

Lukasz.Swiatek@UM.Krakow.pl , Łukasz Świątek ,"Urząd Miasta Krakowa, Wydział Kształtowania Środowiska"
zofia@energia-agencja.pl,Zofia Żółkiewska
grzegorz@example.pl
"""


def test_members_add_from_a_utf8_csv(with_list: Cli) -> None:
    path = with_list.root / "czlonkowie.csv"
    path.write_text(CSV_UTF8, encoding="utf-8")
    out = with_list.ok("members", "add", LIST, "--file", str(path))
    assert out.startswith(f"added 4 members to {LIST}")
    rows = with_list.sql("SELECT address, display_name, organisation FROM members WHERE role = 'member' ORDER BY address")
    assert rows == [
        ("anna.kowalska@gmina-wieliczka.pl", "Anna Kowalska", "Urząd Gminy Wieliczka"),
        ("grzegorz@example.pl", "", ""),
        ("lukasz.swiatek@um.krakow.pl", "Łukasz Świątek", "Urząd Miasta Krakowa, Wydział Kształtowania Środowiska"),
        ("zofia@energia-agencja.pl", "Zofia Żółkiewska", ""),
    ]


def test_members_add_from_a_csv_with_a_bom(with_list: Cli) -> None:
    path = with_list.root / "excel.csv"
    path.write_bytes(b"\xef\xbb\xbf" + "E-mail,Imię i nazwisko\r\nmalgorzata@example.pl,Małgorzata\r\n".encode())
    with_list.ok("members", "add", LIST, "--file", str(path))
    assert with_list.sql("SELECT display_name FROM members WHERE address = 'malgorzata@example.pl'") == [("Małgorzata",)]


def test_members_add_from_a_windows_1250_csv(with_list: Cli) -> None:
    path = with_list.root / "z-excela.csv"
    path.write_bytes(
        "adres,imię i nazwisko,instytucja\r\n"
        "swietoslaw@gmina-zabki.pl,Świętosław Źdźbło,Urząd Gminy Ząbki\r\n"
        "zaneta@ngo.example.pl,Żaneta Łęcka,Fundacja Ekologiczna „Zielona Łódź”\r\n".encode("cp1250")
    )
    out = with_list.ok("members", "add", LIST, "--file", str(path))
    assert out.startswith(f"added 2 members to {LIST}")
    rows = dict((r[0], (r[1], r[2])) for r in with_list.sql("SELECT address, display_name, organisation FROM members"))
    assert rows["swietoslaw@gmina-zabki.pl"] == ("Świętosław Źdźbło", "Urząd Gminy Ząbki")
    assert rows["zaneta@ngo.example.pl"] == ("Żaneta Łęcka", "Fundacja Ekologiczna „Zielona Łódź”")


def test_members_add_fixture_files(with_list: Cli) -> None:
    # The same members in the two encodings a Polish office produces; each file adds them to its own list.
    with_list.ok("list", "create", "financing", "--title", "Finansowanie")
    with_list.ok("members", "add", LIST, "--file", str(DATA / "members-utf8.csv"))
    with_list.ok("members", "add", "financing", "--file", str(DATA / "members-cp1250.csv"))
    q = "SELECT m.address, m.display_name, m.organisation FROM members m JOIN lists l ON l.id = m.list_id" \
        " WHERE l.name = ? AND m.role = 'member' ORDER BY m.address"
    utf8 = with_list.sql(q, (LIST,))
    assert utf8 == with_list.sql(q, ("financing",))
    assert ("jolanta.zebrowska@powiat-lodzki.example.pl", "Jolanta Żebrowska",
            "Starostwo Powiatowe w Łodzi") in utf8
    assert len(utf8) == 5


def test_members_add_csv_header_after_a_comment(with_list: Cli) -> None:
    path = with_list.root / "z-komentarzem.csv"
    path.write_text("# eksport z CRM, 2025-03-01\naddress,name\nanna@gmina.example.pl,Anna\n", encoding="utf-8")
    with_list.ok("members", "add", LIST, "--file", str(path))


def test_members_add_csv_in_neither_utf8_nor_cp1250(with_list: Cli) -> None:
    path = with_list.root / "dos.csv"
    path.write_bytes("adres,imię\r\n".encode("cp852") + "malgorzata@gmina.example.pl,Małgorzata Łukaszewska\r\n".encode("cp852"))
    assert "\x88".encode("latin-1") in path.read_bytes()
    before = with_list.snapshot()
    assert_error(with_list("members", "add", LIST, "--file", str(path)), "dos.csv")
    assert with_list.snapshot() == before


def test_members_add_semicolon_csv_from_polish_excel(with_list: Cli) -> None:
    # Polish Excel saves "CSV" with semicolons.
    path = with_list.root / "srednik.csv"
    path.write_text("adres;imię;organizacja\nanna@gmina.example.pl;Anna Kowalska;Urząd Gminy\n", encoding="utf-8")
    with_list.ok("members", "add", LIST, "--file", str(path))
    assert "anna@gmina.example.pl" in with_list.ok("members", "list", LIST)


def test_members_add_iso_8859_2_csv_keeps_polish_letters(with_list: Cli) -> None:
    path = with_list.root / "latin2.csv"
    path.write_bytes("zofia@gmina.example.pl,Zofia Ślązak,Urząd Gminy Łąka\n".encode("iso-8859-2"))
    with_list.ok("members", "add", LIST, "--file", str(path))
    assert "Zofia Ślązak" in with_list.ok("members", "list", LIST)


def test_members_add_csv_bad_address_names_file_and_line(with_list: Cli) -> None:
    path = with_list.root / "zle.csv"
    path.write_text("anna@gmina.example.pl,Anna\n# komentarz\nbeata(at)gmina.example.pl,Beata\n", encoding="utf-8")
    before = with_list.snapshot()
    assert_error(with_list("members", "add", LIST, "--file", str(path)),
                 "zle.csv:3:", "'beata(at)gmina.example.pl' is not a valid e-mail address")
    assert with_list.snapshot() == before


def test_members_add_csv_too_many_columns(with_list: Cli) -> None:
    path = with_list.root / "kolumny.csv"
    path.write_text("anna@gmina.example.pl,Anna,Urząd,Kraków\n", encoding="utf-8")
    assert_error(with_list("members", "add", LIST, "--file", str(path)), "kolumny.csv:1:")


@pytest.mark.parametrize(("content", "line", "why"), [
    # The case: b's line must not vanish into a's display name.
    ('a@x.test,"unterminated\nb@x.test\n', 1, "unterminated quote"),
    ('anna@gmina.example.pl,Anna\nbeata@gmina.example.pl,"Beata\nNowak"\n', 2, "unterminated quote"),
    ('anna@gmina.example.pl,"Anna" Kowalska\n', 1, "not valid CSV"),
    ("anna@gmina.example.pl,Anna,Urząd,Kraków,Polska\n", 1, "5 fields"),
    ("anna@gmina.example.pl,Anna\x07 Kowalska\n", 1, "control character (U+0007)"),
    ("anna@gmina.example.pl,Anna\tKowalska\n", 1, "control character (U+0009)"),
    ("anna@gmina.example.pl,Anna\x0bKowalska\n", 1, "control character (U+000B)"),
    ("anna@gmina.example.pl,Anna\u202eakswolwoK\n", 1, "control character (U+202E)"),
    ("anna@gmina.example.pl,Anna,Urząd\u2028Gminy\n", 1, "the organisation"),
    ("anna@gmina.example.pl,Anna\r\nzofia@,Zofia\r\n", 2, "is not a valid e-mail address"),
], ids=["unterminated", "newline-in-field", "text-after-quote", "too-many-fields", "bell", "tab", "vt",
        "bidi-override", "line-separator", "bad-address"])
def test_members_add_csv_line_that_does_not_parse_imports_nothing(with_list: Cli, content: str, line: int,
                                                                   why: str) -> None:
    path = with_list.root / "zapisy.csv"
    path.write_text(content, encoding="utf-8")
    before = with_list.snapshot()
    message = assert_error(with_list("members", "add", LIST, "--file", str(path)), f"zapisy.csv:{line}:", why)
    assert str(path) in message
    assert with_list.snapshot() == before


def test_members_add_csv_quoted_fields_and_mac_line_ends(with_list: Cli) -> None:
    path = with_list.root / "mac.csv"
    path.write_bytes('adres,imię,instytucja\rłucja@gmina.example.pl,"Łucja ""Lu"" Żak","Urząd, Gmina Łódź"\r'
                     'piotr@gmina.example.pl\r'.encode())
    assert with_list.ok("members", "add", LIST, "--file", str(path)).startswith(f"added 2 members to {LIST}")
    assert with_list.sql("SELECT display_name, organisation FROM members WHERE address = ?",
                         ("łucja@gmina.example.pl",)) == [('Łucja "Lu" Żak', "Urząd, Gmina Łódź")]


def test_members_add_missing_csv(with_list: Cli) -> None:
    assert_error(with_list("members", "add", LIST, "--file", str(with_list.root / "brak.csv")), "brak.csv")


def test_members_add_duplicate_adds_nothing(with_list: Cli) -> None:
    with_list.ok("members", "add", LIST, "anna@gmina.example.pl")
    before = with_list.snapshot()
    batch = [f"czlonek{i}@gmina.example.pl" for i in range(20)] + ["ANNA@gmina.example.pl"]
    assert_error(with_list("members", "add", LIST, *batch), "anna@gmina.example.pl is already a member of")
    assert with_list.snapshot() == before


def test_members_add_same_address_twice_in_one_command(with_list: Cli) -> None:
    path = with_list.root / "dwa.csv"
    path.write_text("beata@gmina.example.pl,Beata\n", encoding="utf-8")
    before = with_list.snapshot()
    assert_error(with_list("members", "add", LIST, "Beata@gmina.example.pl", "--file", str(path)),
                 "beata@gmina.example.pl is given twice")
    assert with_list.snapshot() == before


def test_members_add_malformed_address_adds_nothing(with_list: Cli) -> None:
    before = with_list.snapshot()
    assert_error(with_list("members", "add", LIST, "anna@gmina.example.pl", "jan.kowalski.gmina.pl"),
                 "'jan.kowalski.gmina.pl' is not a valid e-mail address")
    assert with_list.snapshot() == before


def test_members_add_to_an_unknown_list(cli: Cli) -> None:
    assert_error(cli("members", "add", "nie-ma", "anna@gmina.example.pl"), "no list named 'nie-ma'")


def test_members_add_without_addresses(with_list: Cli) -> None:
    assert_error(with_list("members", "add", LIST), "give addresses or --file")


def test_members_add_bad_role(with_list: Cli) -> None:
    assert_error(with_list("members", "add", LIST, "anna@gmina.example.pl", "--role", "admin"), "--role")


def test_members_list_unknown(cli: Cli) -> None:
    assert_error(cli("members", "list", "nie-ma"), "no list named 'nie-ma'")


def test_members_remove(with_list: Cli) -> None:
    with_list.ok("members", "add", LIST, "anna@gmina.example.pl", "beata@gmina.example.pl", "celina@gmina.example.pl")
    assert with_list.ok("members", "remove", LIST, "Anna@gmina.example.pl", "celina@gmina.example.pl") \
        == f"removed 2 from {LIST}\n"
    assert [m.split("\t")[0] for m in with_list.members()] == ["beata@gmina.example.pl", OWNER]


def test_members_remove_unknown_member_removes_nothing(with_list: Cli) -> None:
    with_list.ok("members", "add", LIST, "anna@gmina.example.pl", "beata@gmina.example.pl")
    before = with_list.snapshot()
    assert_error(with_list("members", "remove", LIST, "anna@gmina.example.pl", "obcy@example.pl"),
                 f"obcy@example.pl is not a member of {LIST}")
    assert with_list.snapshot() == before
    assert_error(with_list("members", "remove", LIST, "nie-adres"), "'nie-adres' is not a valid e-mail address")
    assert_error(with_list("members", "remove", LIST), "EMAILS")


def test_members_set(with_list: Cli) -> None:
    with_list.ok("members", "add", LIST, "anna@gmina.example.pl", "beata@gmina.example.pl")
    assert with_list.ok("members", "set", LIST, "Anna@gmina.example.pl", "moderated", "true") \
        == f"{LIST}: anna@gmina.example.pl moderated = true\n"
    with_list.ok("members", "set", LIST, "beata@gmina.example.pl", "delivery", "nomail")
    with_list.ok("members", "set", LIST, "beata@gmina.example.pl", "role", "moderator")
    with_list.ok("members", "set", LIST, "beata@gmina.example.pl", "display_name", "Beata Żak")
    assert with_list.members() == [
        "anna@gmina.example.pl\tmember\tmoderated\tenabled\teach",
        "beata@gmina.example.pl\tmoderator\tunmoderated\tnomail\teach\tBeata Żak",
        f"{OWNER}\towner\tunmoderated\tenabled\teach",
    ]
    assert with_list.sql("SELECT display_name FROM members WHERE address = 'beata@gmina.example.pl'") == [("Beata Żak",)]
    with_list.ok("members", "set", LIST, "anna@gmina.example.pl", "moderated", "nie")
    assert with_list.members()[0] == "anna@gmina.example.pl\tmember\tunmoderated\tenabled\teach"


@pytest.mark.parametrize(("args", "fragment"), [
    (("anna@gmina.example.pl", "moderated", "może"), "true or false"),
    (("anna@gmina.example.pl", "role", "admin"), "role must be one of"),
    (("anna@gmina.example.pl", "delivery", "off"), "delivery must be one of"),
    (("anna@gmina.example.pl", "password", "x"), "'password' is not one of"),
    (("obcy@example.pl", "moderated", "true"), "obcy@example.pl is not a member"),
    (("nie-adres", "moderated", "true"), "'nie-adres' is not a valid e-mail address"),
])
def test_members_set_errors_change_nothing(with_list: Cli, args: tuple[str, ...], fragment: str) -> None:
    with_list.ok("members", "add", LIST, "anna@gmina.example.pl")
    before = with_list.snapshot()
    assert_error(with_list("members", "set", LIST, *args), fragment)
    assert with_list.snapshot() == before


# -- bans ---------------------------------------------------------------------------------------------------------------------


def test_bans_site_wide_and_per_list(with_list: Cli) -> None:
    with_list.ok("list", "create", "financing")
    assert with_list.ok("ban", "add", "*@SPAM.example") == "banned *@SPAM.example site-wide\n"
    assert with_list.ok("ban", "add", "troll@gmina.example.pl", "--list", LIST) \
        == f"banned troll@gmina.example.pl on {LIST}\n"
    assert with_list.ok("ban", "list") == "*@spam.example\n"
    assert with_list.ok("ban", "list", "--list", LIST) == "troll@gmina.example.pl\n"
    assert with_list.ok("ban", "list", "--list", "financing") == ""

    before = with_list.snapshot()
    assert_error(with_list("ban", "add", "*@spam.example"), "banned already")
    assert_error(with_list("ban", "add", "spam.example"), "is not an address or a pattern")
    assert_error(with_list("ban", "add", "x@example.pl", "--list", "nie-ma"), "no list named 'nie-ma'")
    assert_error(with_list("ban", "remove", "troll@gmina.example.pl"), "is not banned site-wide")
    assert_error(with_list("ban", "remove", "*@spam.example", "--list", "financing"), "is not banned on financing")
    assert with_list.snapshot() == before

    with_list.ok("ban", "remove", "troll@gmina.example.pl", "--list", LIST)
    with_list.ok("ban", "remove", "*@spam.example")
    assert with_list.ok("ban", "list") == ""
    assert with_list.ok("ban", "list", "--list", LIST) == ""


# -- held posts ----------------------------------------------------------------------------------------------------------------


@pytest.fixture
def held(with_list: Cli) -> tuple[Cli, list[int]]:
    with_list.ok("dkim", "keygen")
    ids = [
        with_list.submit(LIST, sender="radny@powiat-example.pl", subject="Zaproszenie na sesję rady",
                         message_id="sesja-1@powiat-example.pl"),
        with_list.submit(LIST, sender="sklep@reklama.example", subject="Promocja: panele fotowoltaiczne -50%",
                         message_id="promo@reklama.example"),
        with_list.submit(LIST, sender="jan.nowak@um.example.pl", subject="Gdzie wysłać sprawozdanie z BEI?",
                         message_id="bei-7@um.example.pl", reason="no subject"),
    ]
    return with_list, ids


def test_held_list(held: tuple[Cli, list[int]]) -> None:
    cli, ids = held
    cli.submit(LIST, sender="anna@gmina.example.pl", subject="Już przyjęta", status="accepted")
    lines = cli.ok("held", "list").splitlines()
    assert lines == [
        f"{ids[0]}\t{LIST}\tradny@powiat-example.pl\tZaproszenie na sesję rady\tnot a member",
        f"{ids[1]}\t{LIST}\tsklep@reklama.example\tPromocja: panele fotowoltaiczne -50%\tnot a member",
        f"{ids[2]}\t{LIST}\tjan.nowak@um.example.pl\tGdzie wysłać sprawozdanie z BEI?\tno subject",
    ]
    assert cli.ok("held", "list", LIST).splitlines() == lines
    cli.ok("list", "create", "financing")
    assert cli.ok("held", "list", "financing") == ""
    assert_error(cli("held", "list", "nie-ma"), "no list named 'nie-ma'")


def test_held_approve_and_discard(held: tuple[Cli, list[int]]) -> None:
    cli, ids = held
    out = cli.ok("held", "approve", str(ids[0]))
    assert out.startswith(f"approved {ids[0]}")
    assert cli.ok("held", "discard", str(ids[1])) == f"discarded {ids[1]}\n"
    assert cli.sql("SELECT id, status FROM incoming ORDER BY id") == [
        (ids[0], "accepted"), (ids[1], "discarded"), (ids[2], "held")]
    assert [line.split("\t")[0] for line in cli.ok("held", "list").splitlines()] == [str(ids[2])]

    before = cli.snapshot()
    assert_error(cli("held", "approve", str(ids[0])), f"message {ids[0]} is not held")
    assert_error(cli("held", "discard", str(ids[0])), f"message {ids[0]} is not held")
    assert_error(cli("held", "approve", "999"), "999")
    assert_error(cli("held", "approve", "pierwszy"), "'pierwszy' is not a valid integer")
    assert cli.snapshot() == before


def test_held_reject_queues_a_signed_notice_to_the_sender(held: tuple[Cli, list[int]]) -> None:
    cli, ids = held
    out = cli.ok("held", "reject", str(ids[1]), "--reason", "Reklamy nie są tu mile widziane — proszę o zaprzestanie.")
    assert out == f"rejected {ids[1]}; sklep@reklama.example will be told\n"
    assert cli.sql("SELECT status FROM incoming WHERE id = ?", (ids[1],)) == [("rejected",)]

    [(outbox_id, kind, envelope_from, incoming_id, data)] = cli.sql(
        "SELECT id, kind, envelope_from, incoming_id, data FROM outbox")
    assert (kind, envelope_from, incoming_id) == ("notice", f"{LIST}-bounces@{DOMAIN}", ids[1])
    assert cli.sql("SELECT recipient, status FROM deliveries WHERE outbox_id = ?", (outbox_id,)) == [
        ("sklep@reklama.example", "pending")]

    data = bytes(data)
    assert data.startswith(b"DKIM-Signature:")
    key = dkim.DkimKey.load(cli.key, domain=DOMAIN, selector=SELECTOR)
    assert dkimpy.verify(data, dnsfunc=dkim_dnsfunc(key))
    notice = email.message_from_bytes(data, policy=email.policy.default)
    assert notice["To"] == "sklep@reklama.example"
    assert notice["Auto-Submitted"] == "auto-replied"
    assert notice["In-Reply-To"] == "<promo@reklama.example>"
    assert notice["List-Id"] == f"<{LIST}.{DOMAIN}>"
    assert "Promocja: panele fotowoltaiczne -50%" in str(notice["Subject"])
    body = notice.get_content()
    assert "Reklamy nie są tu mile widziane" in body
    assert "Dzień dobry" in body  # the list's language is Polish

    # `queue show` lists the notice; rejecting again is refused and queues nothing.
    [line] = cli.ok("queue", "show").splitlines()
    fields = line.split("\t")
    assert fields[:3] == [str(outbox_id), LIST, "notice"]
    assert "pending 1" in fields and "sent 0" in fields and "failed 0" in fields
    before = cli.snapshot()
    assert_error(cli("held", "reject", str(ids[1])), f"message {ids[1]} is not held")
    assert cli.snapshot() == before


def test_held_reject_without_a_reason_uses_the_default_text(held: tuple[Cli, list[int]]) -> None:
    cli, ids = held
    cli.ok("held", "reject", str(ids[0]))
    [(data,)] = cli.sql("SELECT data FROM outbox")
    notice = email.message_from_bytes(bytes(data), policy=email.policy.default)
    assert "moderator nie podał powodu" in notice.get_content()


def test_held_reject_without_a_dkim_key_changes_nothing(with_list: Cli) -> None:
    post_id = with_list.submit(LIST, sender="radny@powiat-example.pl", subject="Sesja")
    before = with_list.snapshot()
    assert_error(with_list("held", "reject", str(post_id), "--reason", "nie"), str(with_list.key))
    assert with_list.snapshot() == before


# -- the queue ----------------------------------------------------------------------------------------------------------------------


def test_queue_show_and_retry(held: tuple[Cli, list[int]]) -> None:
    cli, ids = held
    assert cli.ok("queue", "show") == "queue is empty\n"
    assert cli.ok("queue", "retry") == "0 pending copies will be tried at once\n"
    cli.ok("held", "reject", str(ids[0]))
    cli.ok("held", "reject", str(ids[2]), "--reason", "Proszę pisać do sekretariatu.")
    assert len(cli.ok("queue", "show").splitlines()) == 2
    # `queue` alone shows the queue too.
    assert cli.ok("--config", str(cli.config), "queue", config=False) == cli.ok("queue", "show")
    assert cli.ok("queue", "retry") == "2 pending copies will be tried at once\n"
    assert cli.sql("SELECT DISTINCT next_attempt_at FROM deliveries") == [(0,)]


def test_queue_alone_takes_config_like_every_command(cli: Cli) -> None:
    assert cli.ok("queue") == "queue is empty\n"


# -- DKIM key ---------------------------------------------------------------------------------------------------------------------------


def test_dkim_keygen_writes_a_private_key_and_prints_the_record(cli: Cli) -> None:
    result = cli("dkim", "keygen")
    assert result.exit_code == 0, result.stderr
    assert stat.S_IMODE(cli.key.stat().st_mode) == 0o600
    key = dkim.DkimKey.load(cli.key, domain=DOMAIN, selector=SELECTOR)
    record = result.stdout
    assert record.startswith(f"{SELECTOR}._domainkey.{DOMAIN}. IN TXT ( ")
    strings = [s for s in record.split('"')[1::2]]
    assert "".join(strings) == dkim.dns_txt_value(key)
    assert all(len(s) <= 255 for s in strings)
    assert str(cli.key) in result.stderr  # what was written goes to stderr, the record alone to stdout


def test_dkim_keygen_refuses_to_overwrite_without_force(cli: Cli) -> None:
    cli.ok("dkim", "keygen")
    original = cli.key.read_bytes()
    assert_error(cli("dkim", "keygen"), str(cli.key), "--force")
    assert cli.key.read_bytes() == original
    cli.ok("dkim", "keygen", "--force")
    assert cli.key.read_bytes() != original
    assert stat.S_IMODE(cli.key.stat().st_mode) == 0o600
    assert [p.name for p in cli.root.iterdir() if p.name.startswith(".dkim.key")] == []  # no temporary left


def test_dkim_keygen_before_the_state_directory_exists(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    cli = Cli(tmp_path, CONFIG.replace('private_key = "dkim.key"', 'private_key = "state/dkim.key"'))
    cli.ok("dkim", "keygen")
    assert (tmp_path / "state" / "dkim.key").is_file()


def test_dkim_keygen_into_an_unwritable_place(cli: Cli) -> None:
    cli.config.write_text(CONFIG.replace('private_key = "dkim.key"', 'private_key = "/proc/nie/dkim.key"'))
    assert_error(cli("dkim", "keygen"), "cannot write /proc/nie/dkim.key")


# -- a state database this listserv cannot use ----------------------------------------------------------------------------------------

_RUN_CLI = """
import os, sys, threading
from listserv.cli import main
code = None
try:
    main(sys.argv[1:])
except SystemExit as exc:
    code = exc.code
left = [t.name for t in threading.enumerate() if t is not threading.main_thread() and t.is_alive() and not t.daemon]
sys.stdout.write(repr((code, left)))
sys.stdout.flush()
sys.stderr.flush()
os._exit(0)  # do not wait for leftover threads: report them
"""


def _run_in_subprocess(cli: Cli, *args: str) -> tuple[Any, list[str], str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run([sys.executable, "-c", _RUN_CLI, *args, "--config", str(cli.config)],
                          cwd=cli.root, env=env, capture_output=True, text=True, timeout=120)
    code, left = eval(proc.stdout)  # noqa: S307 - our own repr
    return code, left, proc.stderr


def _newer_schema(cli: Cli) -> None:
    cli.ok("lists")
    conn = sqlite3.connect(cli.db)
    conn.execute("PRAGMA user_version = 999")
    conn.commit()
    conn.close()


def _garbage(cli: Cli) -> None:
    cli.db.parent.mkdir(parents=True, exist_ok=True)
    cli.db.write_bytes(b"To nie jest baza danych SQLite. " * 100)


@pytest.mark.parametrize(("damage", "fragment"), [(_newer_schema, "schema version 999"),
                                                  (_garbage, "cannot open the state database")],
                         ids=["newer-schema", "not-a-database"])
def test_unusable_state_database_is_one_error_line(cli: Cli, damage: Any, fragment: str) -> None:
    damage(cli)
    code, _, stderr = _run_in_subprocess(cli, "lists")
    assert code == 1
    [line] = stderr.strip().splitlines()
    assert line.startswith("listserv: error: ") and fragment in line and str(cli.db) in line


@pytest.mark.parametrize("damage", [_newer_schema, _garbage], ids=["newer-schema", "not-a-database"])
def test_unusable_state_database_lets_the_process_exit(cli: Cli, damage: Any) -> None:
    damage(cli)
    code, left, _ = _run_in_subprocess(cli, "lists")
    assert code == 1
    assert left == []
