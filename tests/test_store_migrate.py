"""`listserv store migrate --to postgresql://...`: a node's SQLite state moves to PostgreSQL whole.

A real server runs on SQLite and does a day's work over real SMTP (posts
delivered, a post held, a join confirmed, a digest member); it stops; the
CLI copies the state into a fresh database of the throwaway PostgreSQL
server; every table is compared row by row; then a server started on the
PostgreSQL config goes on where the SQLite one stopped.
"""

from __future__ import annotations

import pytest

import email
import email.policy
import smtplib
from email.message import EmailMessage
from pathlib import Path

from click.testing import CliRunner

from conftest import DOMAIN, SELECTOR, SinkHandler, committed, make_config, postgres_url
from listserv.cli import main

pytestmark = pytest.mark.one_backend  # runs once: see pyproject's markers

LIST = "finansowanie"
POST = f"{LIST}@{DOMAIN}"
OWNER = "koordynator@pnec.org.pl"
MEMBERS = ["anna.zolkiewska@gmina-wieliczka.pl", "jan.lozinski@nfosigw.example.pl", "ewa@wfosigw.example.pl"]
TABLES = ("lists", "members", "consent_events", "incoming", "outbox", "deliveries", "tokens", "archive",
          "digest_posts", "bounce_events", "bans", "accepted_senders", "seeded_lists")


def post(n: int, frm: str = MEMBERS[0]) -> bytes:
    m = EmailMessage()
    m["From"] = f"Anna Żółkiewska <{frm}>"
    m["To"] = POST
    m["Subject"] = f"Źródła finansowania, część {n}"
    m["Message-ID"] = f"<migracja-{n}@gmina-wieliczka.pl>"
    m.set_content(f"Dzień dobry,\nczęść {n}: ELENA, NFOŚiGW.\n")
    return m.as_bytes(policy=email.policy.SMTP)


def send(port: int, mail_from: str, data: bytes, rcpt: str = POST) -> None:
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
        client.sendmail(mail_from, [rcpt], data)


def config_file(tmp_path: Path, relay_port: int, url: str = "") -> Path:
    path = tmp_path / ("pg.toml" if url else "sqlite.toml")
    path.write_text(f"""
[server]
domain = "{DOMAIN}"
state_dir = "{tmp_path / 'state'}"
[delivery]
mode = "smtp"
relay = "127.0.0.1:{relay_port}"
[dkim]
selector = "{SELECTOR}"
private_key = "{tmp_path / 'dkim.key'}"
[archive]
dir = "{tmp_path / 'archive'}"
[store]
url = "{url}"
""", encoding="utf-8")
    return path


def test_a_sqlite_state_moves_to_postgresql_and_the_server_goes_on(
        tmp_path: Path, sink: tuple[SinkHandler, int], start_server) -> None:  # type: ignore[no-untyped-def]
    handler, port = sink
    server = start_server(make_config(tmp_path, port, store={"url": ""}))
    server.call(server.store.create_list(LIST, {"title": "Finansowanie"}, [OWNER]))
    server.call(server.store.add_members(LIST, [(m, "", "") for m in MEMBERS]))
    server.call(server.store.set_member(LIST, MEMBERS[2], "delivery_mode", "digest_plain"))
    server.call(server.store.add_ban("*@spam.example", LIST))
    for n in (1, 2):
        send(server.port, MEMBERS[0], post(n))
    send(server.port, "obcy@gmina-zewnetrzna.pl", post(3, "obcy@gmina-zewnetrzna.pl"))  # held: not a member
    server.drain()
    server.stop()
    sqlite_db = tmp_path / "state" / "listserv.sqlite3"
    before = {t: committed(sqlite_db, f"SELECT * FROM {t} ORDER BY 1") for t in TABLES}
    assert before["deliveries"] and before["archive"] and before["digest_posts"]

    url = postgres_url()
    result = CliRunner().invoke(main, ["store", "migrate", "--to", url, "--config", str(config_file(tmp_path, port))])
    assert result.exit_code == 0, (result.stdout, result.stderr, result.exception)
    assert "the counts match" in result.stdout
    for table in TABLES:
        after = committed(url, f"SELECT * FROM {table} ORDER BY 1")
        assert len(after) == len(before[table]), table
        for old, new in zip(before[table], after):
            assert tuple(bytes(v) if isinstance(v, memoryview) else v for v in new) == old, table
    # Into a database that has lists already: refused, nothing changed.
    again = CliRunner().invoke(main, ["store", "migrate", "--to", url, "--config", str(config_file(tmp_path, port))])
    assert again.exit_code != 0 and "has lists already" in again.stderr

    # The same node on PostgreSQL: the held post is still held, and new posts get new ids.
    from listserv import config as config_mod

    pg_config = config_mod.load(config_file(tmp_path, port, url))
    copies_before = len(handler.copies_for(MEMBERS[1]))
    pg = start_server(pg_config)
    held = pg.call(pg.store.incoming_with("post", "held", limit=5))
    assert [h.subject for h in held] == ["Źródła finansowania, część 3"]
    send(pg.port, MEMBERS[0], post(4))
    pg.drain()
    copies = handler.copies_for(MEMBERS[1])[copies_before:]
    assert [email.message_from_bytes(c.data)["Message-ID"] for c in copies] == ["<migracja-4@gmina-wieliczka.pl>"]
    history = pg.call(pg.store.consent_history(LIST, MEMBERS[0]))
    assert history and history[0].event == "joined"


def test_migrate_refuses_what_is_not_a_postgresql_url(tmp_path: Path) -> None:
    path = config_file(tmp_path, 25)
    result = CliRunner().invoke(main, ["store", "migrate", "--to", "mysql://x/y", "--config", str(path)])
    assert result.exit_code != 0 and "expected a postgresql:// URL" in result.stderr
