"""The PostgreSQL backend's own behaviour, on a real throwaway server (tests/pgserver.py).

The parts' behaviour is tested by the whole suite on either backend
(``LISTSERV_TEST_STORE=postgresql``); these are what only PostgreSQL has:
its schema version row, several processes claiming the same queue at once
(``FOR UPDATE SKIP LOCKED``), a unique violation inside a transaction that
must not abort it, and the SQL translation itself.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import committed, postgres_url
from listserv.errors import DuplicateError, StoreError
from listserv.store import PgStore, open_store
from listserv.store import schema as store_schema
from listserv.store.pg import translate, translate_schema

pytestmark = pytest.mark.one_backend  # runs once: see pyproject's markers

LIST = "zarzadzanie-energia"
OWNER = "koordynator@pnec.org.pl"


async def test_new_database_gets_the_schema_and_a_newer_one_is_refused() -> None:
    url = postgres_url()
    store = await open_store(url)
    assert isinstance(store, PgStore)
    await store.close()
    assert committed(url, "SELECT version FROM schema_version") == [(len(store_schema.MIGRATIONS),)]
    tables = {r[0] for r in committed(url, "SELECT tablename FROM pg_tables WHERE schemaname = 'public'")}
    assert {"lists", "members", "incoming", "outbox", "deliveries", "digests", "one_last_digest"} <= tables
    # Reopening migrates nothing; a database from a newer listserv is refused, untouched.
    await (await open_store(url)).close()
    import psycopg

    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("UPDATE schema_version SET version = 999")
    with pytest.raises(StoreError, match="schema version 999, newer than this listserv knows"):
        await open_store(url)
    assert committed(url, "SELECT version FROM schema_version") == [(999,)]


async def test_timestamps_keep_their_precision_and_polish_text_its_letters() -> None:
    store = await open_store(postgres_url())
    try:
        await store.create_list(LIST, {"title": "Zarządzanie energią w gminach"}, [OWNER])
        await store.add_members(LIST, [("jozef@gmina-zolkiewka.pl", "Józef Żółkiewski", "Gmina Żółkiewka")])
        (member,) = [m for m in await store.members(LIST) if m.role == "member"]
        assert member.display_name == "Józef Żółkiewski" and member.organisation == "Gmina Żółkiewka"
        lst = await store.get_list(LIST)
        # DOUBLE PRECISION, not PostgreSQL's 4-byte REAL (about 2 minutes apart at today's
        # timestamps): a time a microsecond later is still later.
        at = 1796418201.123456
        await store.log_autoreply(member.address, lst.id, "confirm", at=at)
        assert await store.count_autoreplies(at - 1e-6, address=member.address) == 1
        assert await store.count_autoreplies(at + 1e-6, address=member.address) == 0
        assert isinstance(member.created_at, float) and member.created_at > 1.7e9
        await store.set_member_options(LIST, member.address, {"not_me": True, "ack": True})
        again = await store.member(lst.id, member.address)
        assert again is not None and (again.not_me, again.ack, again.no_dupes) == (True, True, True)
    finally:
        await store.close()


async def test_a_duplicate_inside_a_transaction_does_not_abort_it() -> None:
    store = await open_store(postgres_url())
    try:
        await store.create_list(LIST, {}, [OWNER])
        await store.add_ban("*@spam.example", LIST)
        with pytest.raises(DuplicateError):
            await store.add_ban("*@spam.example", LIST)
        # The store goes on: the failed INSERT was rolled back to its savepoint alone.
        await store.add_ban("*@inny-spam.example", LIST)
        assert await store.bans(LIST) == ["*@inny-spam.example", "*@spam.example"]
        lst = await store.get_list(LIST)
        await store.accept_sender(lst.id, "anna@gmina.example.pl")
        await store.accept_sender(lst.id, "anna@gmina.example.pl")  # INSERT OR IGNORE: once
        assert (await store.policy_snapshot(LIST, "anna@gmina.example.pl")).always_accept  # type: ignore[union-attr]
    finally:
        await store.close()


async def test_two_stores_claiming_one_queue_never_take_the_same_copy() -> None:
    url = postgres_url()
    first, second = await open_store(url), await open_store(url)
    try:
        await first.create_list(LIST, {}, [OWNER])
        lst = await first.get_list(LIST)
        recipients = [f"czlonek{i}@gmina{i % 7}.example.pl" for i in range(600)]
        await first.enqueue(list_id=lst.id, kind="post", envelope_from="b@x", data=b"Subject: x\r\n\r\nx\r\n",
                            recipients=recipients)
        taken: list[list[str]] = [[], []]

        async def claim(store: PgStore, n: int) -> None:
            while True:
                batch = await store.claim_deliveries(f"wezel-{n}", now=1e10, until=1e10 + 60, limit=25)
                if not batch:
                    return
                taken[n].extend(d.recipient for d in batch)

        await asyncio.gather(claim(first, 0), claim(second, 1))  # type: ignore[arg-type]
        assert sorted(taken[0] + taken[1]) == sorted(recipients)  # every copy, each once
        assert taken[0] and taken[1]  # and both took some: neither waited for the other
    finally:
        await first.close()
        await second.close()


def test_translation_of_the_parts_sqlite_forms() -> None:
    assert translate("SELECT a FROM t WHERE b = ? AND c LIKE 'post%'") == \
        "SELECT a FROM t WHERE b = %s AND c LIKE 'post%%'"
    assert translate("INSERT OR IGNORE INTO seeded_lists (name, created_at) VALUES (?, ?)") == \
        "INSERT INTO seeded_lists (name, created_at) VALUES (%s, %s) ON CONFLICT DO NOTHING"
    replaced = translate("INSERT OR REPLACE INTO one_last_digest (list_id, address, delivery_mode) VALUES (?, ?, ?)")
    assert replaced.endswith("ON CONFLICT (list_id, address) DO UPDATE SET delivery_mode = EXCLUDED.delivery_mode")
    assert translate("INSERT INTO outbox (list_id) VALUES (?)").endswith(" RETURNING id")
    assert "JOIN deliveries d ON" in translate("SELECT 1 FROM outbox o CROSS JOIN deliveries d ON d.outbox_id = o.id")
    assert "sum(CASE WHEN d.status = 'sent' THEN 1 ELSE 0 END)" in translate("SELECT sum(d.status = 'sent') FROM d")
    assert "'?'" in translate("SELECT '?' FROM t WHERE a = ?")  # a ? inside a literal is text
    ddl = " ".join(translate_schema(store_schema.MIGRATIONS[0]))
    assert " REAL" not in ddl and "DOUBLE PRECISION" in ddl and "BYTEA" in ddl


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet=st.sampled_from("ab?%' =,()"), max_size=40))
def test_placeholders_outside_literals_become_psycopg_ones(sql: str) -> None:
    out = translate("SELECT " + sql)
    outside = [ch for i, ch in enumerate("SELECT " + sql)]
    # Every %-sign is doubled and no bare ? is left outside a quoted literal.
    quoted = False
    rest = out
    i = 0
    while i < len(rest):
        ch = rest[i]
        if ch == "'":
            quoted = not quoted
        elif ch == "%":
            assert rest[i + 1] in "%s", (sql, out)
            i += 1
        elif ch == "?":
            assert quoted, (sql, out)
        i += 1
    assert outside  # the input was read


def test_a_url_without_a_server_is_a_clear_error(tmp_path: Path) -> None:
    async def go() -> None:
        with pytest.raises(StoreError, match="cannot open the state database postgresql://listserv:\\*\\*\\*@"):
            await open_store("postgresql://listserv:tajne@127.0.0.1:1/listserv?connect_timeout=2")

    asyncio.run(go())
