"""listserv.store against real SQLite files: schema, lists, members, bans, group commit, the queue.

What the tests read back they read through a fresh ``sqlite3`` connection
where it matters, so "committed" means committed on disk, not "visible to the
connection that wrote it".
"""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiosqlite
import pytest

from listserv.store import schema as store_mod
from listserv.errors import DuplicateError, StoreError, UnknownList
from conftest import committed, store_target
from listserv.store import IncomingRow, Outcome, Store, open_store

LIST = "seap-planning"
OTHER = "energy-management"
OWNER = "koordynator@pnec.org.pl"
FAR_FUTURE = 1e12  # a timestamp later than any row's


@pytest.fixture
def db_path(tmp_path: Path) -> Path | str:
    """The store's SQLite file, or with LISTSERV_TEST_STORE=postgresql its database's URL."""
    return store_target(tmp_path)


@pytest.fixture
def sqlite_db(tmp_path: Path) -> Path:
    """A SQLite file, whatever LISTSERV_TEST_STORE says: the tests of SQLite's own behaviour."""
    return tmp_path / "x.sqlite3"


@pytest.fixture
async def store(db_path: Path | str) -> AsyncIterator[Store]:
    s = await open_store(db_path)
    try:
        yield s
    finally:
        await s.close()


def sql(path: Path, query: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Read through a fresh connection: only committed data is visible."""
    return committed(path, query, params)


def count(path: Path | str, table: str, where: str = "1 = 1", params: tuple[Any, ...] = ()) -> int:
    return int(sql(path, f"SELECT count(*) FROM {table} WHERE {where}", params)[0][0])


def incoming(list_id: int, n: int = 0, status: str = "accepted", **changes: Any) -> IncomingRow:
    values: dict[str, Any] = dict(
        list_id=list_id, kind="post", detail="", mail_from=f"gmina{n}@example.pl",
        rcpt=f"{LIST}@lists.example.org", peer="192.0.2.1", message_id=f"wiad-{n}@gmina.example.pl",
        sender=f"gmina{n}@example.pl", subject=f"Zażółć gęślą jaźń nr {n}", status=status, reason="",
        data=f"Subject: Zażółć {n}\r\n\r\nTreść\r\n".encode(),
    )
    values.update(changes)
    return IncomingRow(**values)


POLISH_MEMBERS = [
    ("anna.kowalska@gmina-wieliczka.pl", "Anna Kowalska", "Urząd Gminy Wieliczka"),
    ("lukasz.swiatek@um.krakow.pl", "Łukasz Świątek", "Urząd Miasta Krakowa"),
    ("zofia.zolkiewska@energia-agencja.pl", "Zofia Żółkiewska", "Małopolska Agencja Energii"),
]


async def _close_leaked(exc: BaseException) -> None:
    """Close any aiosqlite connection left in the frames of a failed open (so the test process can exit)."""
    seen: set[int] = set()
    chain: BaseException | None = exc
    while chain is not None and id(chain) not in seen:
        seen.add(id(chain))
        tb = chain.__traceback__
        while tb is not None:
            for value in list(tb.tb_frame.f_locals.values()):
                if isinstance(value, Store):
                    for conn in (value._writer, value._reader):
                        await conn.close()
                elif isinstance(value, aiosqlite.Connection):
                    await value.close()
            tb = tb.tb_next
        chain = chain.__cause__ or chain.__context__


async def open_expecting_error(path: Path) -> tuple[StoreError, list[threading.Thread]]:
    """Store.open that must fail: the error, and the threads it left running."""
    before = set(threading.enumerate())
    try:
        s = await Store.open(path)
    except StoreError as exc:
        leaked = [t for t in threading.enumerate() if t not in before and t.is_alive()]
        await _close_leaked(exc)
        return exc, leaked
    await s.close()
    pytest.fail("Store.open succeeded")


# -- schema -----------------------------------------------------------------------------------------------


async def test_new_database_gets_the_current_schema_version(sqlite_db: Path) -> None:
    await (await Store.open(sqlite_db)).close()
    assert len(store_mod.MIGRATIONS) >= 1
    assert sql(sqlite_db, "PRAGMA user_version") == [(len(store_mod.MIGRATIONS),)]
    assert sql(sqlite_db, "PRAGMA journal_mode") == [("wal",)]
    tables = {r[0] for r in sql(sqlite_db, "SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert {"lists", "members", "bans", "incoming", "outbox", "deliveries"} <= tables


async def test_new_databases_get_16_kb_pages_and_older_ones_keep_theirs(tmp_path: Path) -> None:
    fresh = tmp_path / "nowa.sqlite3"
    await (await Store.open(fresh)).close()
    assert sql(fresh, "PRAGMA page_size") == [(16384,)]
    # A database made by an older listserv (4 KB pages, WAL) opens as it is and stays usable.
    old = tmp_path / "stara.sqlite3"
    conn = sqlite3.connect(old)
    conn.execute("PRAGMA page_size = 4096")
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("CREATE TABLE z_dawna (x)")
    conn.close()
    s = await Store.open(old)
    try:
        await s.create_list(LIST, {"title": "Planowanie SEAP"}, [])
    finally:
        await s.close()
    assert sql(old, "PRAGMA page_size") == [(4096,)]
    assert sql(old, "SELECT name FROM lists") == [(LIST,)]


async def test_a_lists_archive_index_is_read_from_its_covering_index_in_row_order(sqlite_db: Path) -> None:
    from listserv.store.archive import ARCHIVE_INDEX_SQL

    s = await Store.open(sqlite_db)
    try:
        seap = await s.create_list(LIST, {"title": "Planowanie SEAP"}, [])
        energia = await s.create_list("energia", {"title": "Zarządzanie energią"}, [])

        def entry(n: int) -> tuple[str, str, float, bytes]:
            mid = f"<{n}.źródło@gmina.example.pl>"
            return mid, f"HASH{n:04d}", 1_700_000_000.0 + n, f"Subject: Łódź {n}\r\n\r\nTreść\r\n".encode()

        await s.archive_import(seap, [entry(n) for n in (1, 2, 3)])
        await s.archive_import(energia, [entry(4)])
        await s.archive_import(seap, [entry(5)])
        await s.archive_remove("HASH0002")
        index = await s.archive_index(seap)
    finally:
        await s.close()
    assert [(mid, h) for _, mid, h, _ in index] == [
        ("<1.źródło@gmina.example.pl>", "HASH0001"), ("<3.źródło@gmina.example.pl>", "HASH0003"),
        ("<5.źródło@gmina.example.pl>", "HASH0005")]
    assert [row_id for row_id, *_ in index] == sorted(row_id for row_id, *_ in index)
    # Not a lookup of each row in the table (whose rows hold whole messages): the index alone.
    plan = " ".join(str(r[3]) for r in sql(sqlite_db, "EXPLAIN QUERY PLAN " + ARCHIVE_INDEX_SQL, (seap,)))
    assert "COVERING INDEX archive_by_list" in plan, plan
    assert "TEMP B-TREE" not in plan, plan


async def test_parent_directories_are_created(tmp_path: Path) -> None:
    s = await Store.open(tmp_path / "nowy" / "stan" / "listserv.sqlite3")
    await s.close()
    assert (tmp_path / "nowy" / "stan" / "listserv.sqlite3").is_file()


async def test_reopening_keeps_data_and_does_not_migrate_again(sqlite_db: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    s = await Store.open(sqlite_db)
    await s.create_list(LIST, {"title": "Planowanie SEAP"}, [])
    await s.add_members(LIST, POLISH_MEMBERS)
    await s.close()
    version = len(store_mod.MIGRATIONS)

    # Every migration already applied is replaced by something that would
    # fail if it ran; one new migration is added.  Only the new one may run.
    poisoned = tuple("THIS IS NOT SQL" for _ in store_mod.MIGRATIONS)
    monkeypatch.setattr(store_mod, "MIGRATIONS", (*poisoned, "CREATE TABLE nowa_tabela (x INTEGER)"))
    s = await Store.open(sqlite_db)
    try:
        assert [m.display_name for m in await s.members(LIST)] == [
            "Anna Kowalska", "Łukasz Świątek", "Zofia Żółkiewska"]
        assert (await s.get_list(LIST)).settings_json == '{"title": "Planowanie SEAP"}'
    finally:
        await s.close()
    assert sql(sqlite_db, "PRAGMA user_version") == [(version + 1,)]
    assert sql(sqlite_db, "SELECT name FROM sqlite_master WHERE name = 'nowa_tabela'") == [("nowa_tabela",)]

    # And opening once more runs nothing at all.
    monkeypatch.setattr(store_mod, "MIGRATIONS", (*poisoned, "THIS IS NOT SQL EITHER"))
    s = await Store.open(sqlite_db)
    await s.close()
    assert sql(sqlite_db, "PRAGMA user_version") == [(version + 1,)]


async def test_a_migration_that_fails_half_way_leaves_nothing_behind(sqlite_db: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    await (await Store.open(sqlite_db)).close()
    version = len(store_mod.MIGRATIONS)
    # The first statement would succeed; the second fails: the migration is one transaction.
    broken = "CREATE TABLE połowa (x INTEGER);\nINSERT INTO nie_ma_takiej_tabeli VALUES (1)"
    monkeypatch.setattr(store_mod, "MIGRATIONS", (*store_mod.MIGRATIONS, broken))
    exc, leaked = await open_expecting_error(sqlite_db)
    assert "nie_ma_takiej_tabeli" in str(exc)
    assert not leaked
    assert sql(sqlite_db, "PRAGMA user_version") == [(version,)]
    assert sql(sqlite_db, "SELECT name FROM sqlite_master WHERE name = 'połowa'") == []
    # Mended, it runs whole.
    monkeypatch.setattr(store_mod, "MIGRATIONS", (*store_mod.MIGRATIONS[:-1], "CREATE TABLE połowa (x INTEGER)"))
    await (await Store.open(sqlite_db)).close()
    assert sql(sqlite_db, "PRAGMA user_version") == [(version + 1,)]
    assert sql(sqlite_db, "SELECT name FROM sqlite_master WHERE name = 'połowa'") == [("połowa",)]


async def test_newer_schema_is_refused_with_a_clear_error(sqlite_db: Path) -> None:
    newer = len(store_mod.MIGRATIONS) + 5
    conn = sqlite3.connect(sqlite_db)
    conn.execute("CREATE TABLE z_przyszlosci (x)")
    conn.execute(f"PRAGMA user_version = {newer}")
    conn.commit()
    conn.close()
    exc, _ = await open_expecting_error(sqlite_db)
    message = str(exc)
    assert str(sqlite_db) in message
    assert f"schema version {newer}" in message
    assert "upgrade listserv" in message
    assert sql(sqlite_db, "PRAGMA user_version") == [(newer,)]  # untouched
    assert sql(sqlite_db, "SELECT name FROM sqlite_master WHERE name = 'lists'") == []


async def test_a_file_that_is_not_a_database_is_a_store_error(sqlite_db: Path) -> None:
    sqlite_db.write_bytes(b"To nie jest baza danych. " * 200)
    exc, _ = await open_expecting_error(sqlite_db)
    assert "cannot open the state database" in str(exc)
    assert str(sqlite_db) in str(exc)


def _newer_schema(path: Path) -> None:
    conn = sqlite3.connect(path)
    conn.execute(f"PRAGMA user_version = {len(store_mod.MIGRATIONS) + 1}")
    conn.commit()
    conn.close()


def _not_a_database(path: Path) -> None:
    path.write_bytes(b"To nie jest baza danych. " * 200)


@pytest.mark.parametrize("damage", [_newer_schema, _not_a_database], ids=["newer-schema", "not-a-database"])
async def test_failed_open_leaves_no_connection_threads(sqlite_db: Path, damage: Any) -> None:
    damage(sqlite_db)
    _, leaked = await open_expecting_error(sqlite_db)
    assert leaked == []


# -- lists -------------------------------------------------------------------------------------------------------


async def test_create_list_with_owners_and_polish_settings(store: Store, db_path: Path) -> None:
    list_id = await store.create_list(OTHER, {"title": "Zarządzanie energią", "language": "pl"},
                                      [OWNER, "zastepca@pnec.org.pl", OWNER])
    lst = await store.get_list(OTHER)
    assert lst.id == list_id and lst.name == OTHER
    # Stored readably (not as \u escapes), so sqlite3 on the server shows Polish.
    assert "Zarządzanie energią" in sql(db_path, "SELECT settings FROM lists")[0][0]
    assert await store.owners(list_id) == [OWNER, "zastepca@pnec.org.pl"]
    assert (await store.get_list_by_id(list_id)).name == OTHER
    assert await store.list_names() == {OTHER}
    assert await store.list_counts() == {OTHER: 2}


async def test_create_list_twice_is_a_duplicate_and_changes_nothing(store: Store, db_path: Path) -> None:
    await store.create_list(LIST, {"title": "Planowanie SEAP"}, [OWNER])
    with pytest.raises(DuplicateError, match=LIST):
        await store.create_list(LIST, {"title": "Inny tytuł"}, ["ktos@example.pl"])
    assert count(db_path, "lists") == 1
    assert (await store.get_list(LIST)).settings_json == '{"title": "Planowanie SEAP"}'
    assert [m.address for m in await store.members(LIST)] == [OWNER]


async def test_unknown_list(store: Store) -> None:
    with pytest.raises(UnknownList, match="no list named 'nie-ma'"):
        await store.get_list("nie-ma")
    with pytest.raises(UnknownList):
        await store.get_list_by_id(999)
    with pytest.raises(UnknownList):
        await store.members("nie-ma")
    with pytest.raises(UnknownList):
        await store.add_members("nie-ma", POLISH_MEMBERS)
    with pytest.raises(UnknownList):
        await store.set_list_settings("nie-ma", {})
    with pytest.raises(UnknownList):
        await store.remove_list("nie-ma")
    assert issubclass(UnknownList, StoreError)


async def test_set_list_settings_replaces_the_overrides(store: Store) -> None:
    await store.create_list(LIST, {"title": "Stary"}, [])
    await store.set_list_settings(LIST, {"posting_policy": "announce", "title": "Świeży"})
    assert (await store.get_list(LIST)).settings_json == '{"posting_policy": "announce", "title": "Świeży"}'


async def test_remove_list_takes_members_and_its_bans(store: Store, db_path: Path) -> None:
    list_id = await store.create_list(LIST, {}, [OWNER])
    await store.create_list(OTHER, {}, [OWNER])
    await store.add_members(LIST, POLISH_MEMBERS)
    await store.add_ban("*@spam.example", LIST)
    await store.add_ban("*@spam.example", None)
    await store.remove_list(LIST)
    assert await store.list_names() == {OTHER}
    assert count(db_path, "members", "list_id = ?", (list_id,)) == 0
    assert await store.bans(None) == ["*@spam.example"]
    assert count(db_path, "bans") == 1
    assert [m.address for m in await store.members(OTHER)] == [OWNER]


# -- members ---------------------------------------------------------------------------------------------------------


async def test_add_members_and_read_them_back(store: Store) -> None:
    list_id = await store.create_list(LIST, {}, [OWNER])
    assert await store.add_members(LIST, POLISH_MEMBERS) == 3
    assert await store.add_members(LIST, [("moderator@pnec.org.pl", "Bożena Moderator", "")], "moderator") == 1
    members = {m.address: m for m in await store.members(LIST)}
    assert members["lukasz.swiatek@um.krakow.pl"].display_name == "Łukasz Świątek"
    assert members["zofia.zolkiewska@energia-agencja.pl"].organisation == "Małopolska Agencja Energii"
    assert members["anna.kowalska@gmina-wieliczka.pl"].role == "member"
    assert members["anna.kowalska@gmina-wieliczka.pl"].moderated is False
    assert members["anna.kowalska@gmina-wieliczka.pl"].delivery == "enabled"
    assert members["moderator@pnec.org.pl"].role == "moderator"
    assert members[OWNER].role == "owner"
    assert await store.staff(list_id) == [OWNER, "moderator@pnec.org.pl"]
    assert await store.list_counts() == {LIST: 5}


async def test_add_members_is_all_or_nothing_on_an_existing_member(store: Store, db_path: Path) -> None:
    await store.create_list(LIST, {}, [])
    await store.add_members(LIST, [("czlonek42@gmina.example.pl", "Jan Czterdziesty-Drugi", "")])
    batch = [(f"czlonek{i}@gmina.example.pl", f"Członek {i}", "Gmina Łódź") for i in range(100)]
    with pytest.raises(DuplicateError, match="czlonek42@gmina.example.pl is already a member"):
        await store.add_members(LIST, batch)
    assert count(db_path, "members") == 1


async def test_add_members_names_the_count_of_further_duplicates(store: Store) -> None:
    await store.create_list(LIST, {}, [])
    await store.add_members(LIST, POLISH_MEMBERS)
    with pytest.raises(DuplicateError, match=r"\(and 2 more\)"):
        await store.add_members(LIST, [*POLISH_MEMBERS, ("nowy@example.pl", "", "")])
    assert len(await store.members(LIST)) == 3


async def test_add_members_refuses_an_address_given_twice(store: Store, db_path: Path) -> None:
    await store.create_list(LIST, {}, [])
    batch = [(f"czlonek{i}@gmina.example.pl", "", "") for i in range(50)]
    batch.append(("czlonek7@gmina.example.pl", "Drugi raz", ""))
    with pytest.raises(DuplicateError, match="czlonek7@gmina.example.pl is given twice"):
        await store.add_members(LIST, batch)
    assert count(db_path, "members") == 0


async def test_add_members_with_a_bad_role(store: Store, db_path: Path) -> None:
    await store.create_list(LIST, {}, [])
    with pytest.raises(StoreError, match="role must be one of member, moderator, owner"):
        await store.add_members(LIST, POLISH_MEMBERS, "admin")
    assert count(db_path, "members") == 0


async def test_same_address_on_two_lists(store: Store) -> None:
    await store.create_list(LIST, {}, [])
    await store.create_list(OTHER, {}, [])
    await store.add_members(LIST, POLISH_MEMBERS)
    await store.add_members(OTHER, POLISH_MEMBERS)
    assert len(await store.members(OTHER)) == 3


async def test_remove_members_all_or_nothing(store: Store, db_path: Path) -> None:
    await store.create_list(LIST, {}, [])
    await store.add_members(LIST, POLISH_MEMBERS)
    addresses = [POLISH_MEMBERS[0][0], "nieznany@example.pl", POLISH_MEMBERS[2][0]]
    with pytest.raises(StoreError, match=f"nieznany@example.pl is not a member of {LIST}"):
        await store.remove_members(LIST, addresses)
    assert count(db_path, "members") == 3
    await store.remove_members(LIST, [POLISH_MEMBERS[0][0], POLISH_MEMBERS[2][0]])
    assert [m.address for m in await store.members(LIST)] == [POLISH_MEMBERS[1][0]]


async def test_set_member(store: Store) -> None:
    list_id = await store.create_list(LIST, {}, [])
    await store.add_members(LIST, POLISH_MEMBERS)
    anna, lukasz, zofia = (m[0] for m in POLISH_MEMBERS)
    await store.set_member(LIST, anna, "moderated", 1)
    await store.set_member(LIST, lukasz, "delivery", "nomail")
    await store.set_member(LIST, zofia, "role", "moderator")
    await store.set_member(LIST, zofia, "display_name", "Zofia Żółkiewska-Nowak")
    members = {m.address: m for m in await store.members(LIST)}
    assert members[anna].moderated is True
    assert members[lukasz].delivery == "nomail"
    assert members[zofia].role == "moderator"
    assert members[zofia].display_name == "Zofia Żółkiewska-Nowak"
    # Who gets copies: delivery enabled only.
    assert await store.recipients(list_id) == [anna, zofia]
    assert await store.staff(list_id) == [zofia]
    with pytest.raises(StoreError, match="unknown member setting 'password'"):
        await store.set_member(LIST, anna, "password", "x")
    with pytest.raises(StoreError, match="nieznany@example.pl is not a member"):
        await store.set_member(LIST, "nieznany@example.pl", "moderated", 1)


# -- bans -------------------------------------------------------------------------------------------------------------------


async def test_bans_site_wide_and_per_list(store: Store) -> None:
    await store.create_list(LIST, {}, [])
    await store.create_list(OTHER, {}, [])
    await store.add_ban("*@spam.example", None)
    await store.add_ban("troll@gmina.example.pl", LIST)
    await store.add_ban("*@spam.example", LIST)  # the same pattern on a list is its own ban
    assert await store.bans(None) == ["*@spam.example"]
    assert await store.bans(LIST) == ["*@spam.example", "troll@gmina.example.pl"]
    assert await store.bans(OTHER) == []
    with pytest.raises(DuplicateError, match="banned already"):
        await store.add_ban("*@spam.example", None)
    with pytest.raises(DuplicateError):
        await store.add_ban("troll@gmina.example.pl", LIST)
    with pytest.raises(UnknownList):
        await store.add_ban("x@example.pl", "nie-ma")

    await store.remove_ban("*@spam.example", LIST)
    assert await store.bans(None) == ["*@spam.example"]  # the site-wide ban stays
    assert await store.bans(LIST) == ["troll@gmina.example.pl"]
    with pytest.raises(StoreError, match="troll@gmina.example.pl is not banned site-wide"):
        await store.remove_ban("troll@gmina.example.pl", None)
    with pytest.raises(StoreError, match=f"is not banned on {OTHER}"):
        await store.remove_ban("troll@gmina.example.pl", OTHER)


async def test_policy_snapshot(store: Store) -> None:
    list_id = await store.create_list(LIST, {"posting_policy": "announce"}, [OWNER])
    await store.create_list(OTHER, {}, [])
    await store.add_members(LIST, POLISH_MEMBERS)
    await store.set_member(LIST, POLISH_MEMBERS[1][0], "moderated", 1)
    await store.add_ban("*@spam.example", None)
    await store.add_ban("troll@gmina.example.pl", LIST)
    await store.add_ban("inny@example.pl", OTHER)

    owner = await store.policy_snapshot(LIST, OWNER)
    assert owner is not None
    assert owner.list_id == list_id
    assert owner.settings_json == '{"posting_policy": "announce"}'
    assert (owner.role, owner.moderated) == ("owner", False)
    assert sorted(owner.ban_patterns) == ["*@spam.example", "troll@gmina.example.pl"]

    moderated = await store.policy_snapshot(LIST, POLISH_MEMBERS[1][0])
    assert moderated is not None and (moderated.role, moderated.moderated) == ("member", True)

    stranger = await store.policy_snapshot(LIST, "obcy@example.pl")
    assert stranger is not None and (stranger.role, stranger.moderated) == (None, False)

    other = await store.policy_snapshot(OTHER, OWNER)
    assert other is not None and other.role is None
    assert sorted(other.ban_patterns) == ["*@spam.example", "inny@example.pl"]

    assert await store.policy_snapshot("nie-ma", OWNER) is None


async def test_policy_snapshot_without_bans(store: Store) -> None:
    await store.create_list(LIST, {}, [])
    snap = await store.policy_snapshot(LIST, OWNER)
    assert snap is not None and snap.ban_patterns == ()


# -- incoming mail: group commit ---------------------------------------------------------------------------------------------


async def test_submit_incoming_from_many_sessions_at_once(store: Store, db_path: Path) -> None:
    list_id = await store.create_list(LIST, {}, [])
    transactions = 0
    original = store.transaction

    def counting_transaction() -> Any:
        nonlocal transactions
        transactions += 1
        return original()

    store.transaction = counting_transaction  # type: ignore[method-assign]
    visible_on_return: list[int] = []

    async def session(n: int) -> None:
        await store.submit_incoming([incoming(list_id, n)])
        # Answered only after the commit: a fresh connection sees the row now.
        rows = sql(db_path, "SELECT count(*) FROM incoming WHERE message_id = ?", (f"wiad-{n}@gmina.example.pl",))
        visible_on_return.append(rows[0][0])

    await asyncio.gather(*(session(n) for n in range(200)))
    assert visible_on_return == [1] * 200
    assert count(db_path, "incoming") == 200
    assert 1 <= transactions < 200  # group commit: sessions shared transactions
    subjects = {r[0] for r in sql(db_path, "SELECT subject FROM incoming")}
    assert "Zażółć gęślą jaźń nr 199" in subjects


async def test_submit_incoming_with_several_rows_per_session(store: Store, db_path: Path) -> None:
    list_id = await store.create_list(LIST, {}, [])
    other_id = await store.create_list(OTHER, {}, [])
    await asyncio.gather(*(
        store.submit_incoming([incoming(list_id, n), incoming(other_id, n, status="held", reason="not a member")])
        for n in range(20)
    ))
    assert count(db_path, "incoming", "list_id = ?", (list_id,)) == 20
    assert count(db_path, "incoming", "list_id = ? AND status = 'held'", (other_id,)) == 20


async def test_submit_incoming_failure_reaches_every_waiting_session(store: Store, db_path: Path) -> None:
    list_id = await store.create_list(LIST, {}, [])
    bad = incoming(list_id, 1, status=None)  # NOT NULL constraint: the whole batch fails
    results = await asyncio.gather(
        store.submit_incoming([incoming(list_id, 0)]), store.submit_incoming([bad]), return_exceptions=True
    )
    assert all(isinstance(r, Exception) for r in results), results
    assert count(db_path, "incoming") == 0
    # The committer survives a failed batch.
    await store.submit_incoming([incoming(list_id, 2)])
    assert count(db_path, "incoming") == 1


async def test_submit_after_close_is_refused(db_path: Path | str) -> None:
    s = await open_store(db_path)
    await s.close()
    with pytest.raises(StoreError, match="store closed"):
        await s.submit_incoming([incoming(1)])
    await s.close()  # closing twice is harmless


async def test_close_answers_a_session_whose_commit_is_in_flight(db_path: Path | str) -> None:
    s = await open_store(db_path)
    list_id = await s.create_list(LIST, {}, [])
    task = asyncio.create_task(s.submit_incoming([incoming(list_id)]))
    await asyncio.sleep(0)  # the session queues its row and starts the committer
    await asyncio.sleep(0)  # the committer takes the batch and begins its transaction
    await s.close()
    for _ in range(5):
        await asyncio.sleep(0)
    try:
        assert task.done(), "submit_incoming is still waiting after close()"
        # Either committed or refused, but answered.
        if task.exception() is None:
            assert count(db_path, "incoming") == 1
        else:
            assert isinstance(task.exception(), StoreError)
    finally:
        if not task.done():
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task


# -- incoming mail: the worker's and the moderator's view ----------------------------------------------------------------------------


async def test_held_and_status_changes(store: Store) -> None:
    list_id = await store.create_list(LIST, {}, [])
    other_id = await store.create_list(OTHER, {}, [])
    await store.submit_incoming([
        incoming(list_id, 1, status="held", reason="not a member: gmina1@example.pl"),
        incoming(list_id, 2, status="accepted"),
        incoming(other_id, 3, status="held", reason="no subject"),
    ])
    held = await store.held()
    assert [(h.list_name, h.subject) for h in held] == [(LIST, "Zażółć gęślą jaźń nr 1"), (OTHER, "Zażółć gęślą jaźń nr 3")]
    assert [h.reason for h in await store.held(OTHER)] == ["no subject"]
    with pytest.raises(UnknownList):
        await store.held("nie-ma")

    first = held[0]
    assert (await store.get_incoming(first.id)).data == incoming(list_id, 1).data
    await store.set_incoming_status(first.id, "accepted", expect="held", reason="approved")
    assert (await store.get_incoming(first.id)).status == "accepted"
    with pytest.raises(StoreError, match=f"message {first.id} is not held"):
        await store.set_incoming_status(first.id, "discarded", expect="held")
    assert (await store.get_incoming(first.id)).status == "accepted"
    with pytest.raises(StoreError, match="no message with id 999"):
        await store.get_incoming(999)
    with pytest.raises(StoreError, match="no message with id 999"):
        await store.set_incoming_status(999, "accepted")
    accepted = await store.incoming_with("post", "accepted")
    assert [r.message_id for r in accepted] == ["wiad-1@gmina.example.pl", "wiad-2@gmina.example.pl"]


# -- the outbox and the delivery queue ------------------------------------------------------------------------------------------------------


async def test_enqueue_deliver_and_summarise(store: Store, db_path: Path) -> None:
    list_id = await store.create_list(LIST, {}, [])
    await store.submit_incoming([incoming(list_id, 1)])
    post_id = (await store.incoming_with("post", "accepted"))[0].id
    rcpts = ["anna@gmina.example.pl", "lukasz@um.example.pl", "zofia@agencja.example.pl", "anna@gmina.example.pl"]
    outbox_id = await store.enqueue(
        list_id=list_id, kind="post", envelope_from=f"{LIST}-bounces@lists.example.org", data=b"Subject: x\r\n\r\ny",
        recipients=rcpts, incoming_id=post_id, incoming_status="queued", incoming_expect="accepted",
    )
    assert (await store.get_incoming(post_id)).status == "queued"
    assert await store.outbox_message(outbox_id) == (f"{LIST}-bounces@lists.example.org", b"Subject: x\r\n\r\ny")
    with pytest.raises(StoreError):
        await store.outbox_message(outbox_id + 100)

    due = await store.due_deliveries(FAR_FUTURE, 10, set())
    assert [d.recipient for d in due] == rcpts[:3]  # each recipient once, in order
    assert all(d.outbox_id == outbox_id and d.attempts == 0 for d in due)
    assert await store.due_deliveries(0, 10, set()) == []  # nothing is due before it was queued
    assert [d.recipient for d in await store.due_deliveries(FAR_FUTURE, 1, set())] == [rcpts[0]]
    assert [d.recipient for d in await store.due_deliveries(FAR_FUTURE, 10, {due[0].id})] == rcpts[1:3]

    [summary] = await store.queue_summary()
    assert summary["outbox_id"] == outbox_id and summary["list"] == LIST and summary["kind"] == "post"
    assert (summary["pending"], summary["sent"], summary["failed"]) == (3, 0, 0)
    assert summary["last_reply"] == ""

    await store.record_outcomes([
        Outcome(due[0].id, "sent", "250 2.0.0 OK"),
        Outcome(due[1].id, "failed", "550 5.1.1 nie ma takiej skrzynki"),
        Outcome(due[2].id, "pending", "451 4.7.1 spróbuj później", next_attempt_at=FAR_FUTURE),
    ])
    assert await store.due_deliveries(FAR_FUTURE - 1, 10, set()) == []
    [retry] = await store.due_deliveries(FAR_FUTURE, 10, set())
    assert retry.recipient == rcpts[2] and retry.attempts == 1
    [summary] = await store.queue_summary()
    assert (summary["pending"], summary["sent"], summary["failed"]) == (1, 1, 1)
    assert summary["next_attempt_at"] == FAR_FUTURE
    assert summary["last_reply"] == "451 4.7.1 spróbuj później"
    assert await store.delivery_counts(outbox_id) == {"sent": 1, "failed": 1, "pending": 1}
    assert await store.deliveries_for(outbox_id) == [
        (rcpts[0], "sent", "250 2.0.0 OK"),
        (rcpts[1], "failed", "550 5.1.1 nie ma takiej skrzynki"),
        (rcpts[2], "pending", "451 4.7.1 spróbuj później"),
    ]
    assert await store.next_attempt_at() == FAR_FUTURE

    assert await store.retry_now() == 1
    assert [d.recipient for d in await store.due_deliveries(1.0, 10, set())] == [rcpts[2]]
    await store.record_outcomes([Outcome(retry.id, "sent", "250 OK")])
    assert await store.queue_summary() == []  # nothing pending: not in the queue any more
    assert await store.next_attempt_at() is None
    assert await store.delivery_counts() == {"sent": 2, "failed": 1}


async def test_enqueue_with_a_wrong_expectation_queues_nothing(store: Store, db_path: Path) -> None:
    list_id = await store.create_list(LIST, {}, [])
    await store.submit_incoming([incoming(list_id, 1, status="accepted")])
    post_id = (await store.incoming_with("post", "accepted"))[0].id
    with pytest.raises(StoreError, match=f"message {post_id} is not held"):
        await store.enqueue(
            list_id=list_id, kind="notice", envelope_from=f"{LIST}-bounces@lists.example.org", data=b"x",
            recipients=["gmina1@example.pl"], incoming_id=post_id, incoming_status="rejected", incoming_expect="held",
        )
    assert count(db_path, "outbox") == 0
    assert count(db_path, "deliveries") == 0
    assert (await store.get_incoming(post_id)).status == "accepted"
    assert await store.queue_summary() == []


async def test_enqueue_for_a_missing_incoming_row_queues_nothing(store: Store, db_path: Path) -> None:
    list_id = await store.create_list(LIST, {}, [])
    with pytest.raises(StoreError, match="no message with id 4242"):
        await store.enqueue(
            list_id=list_id, kind="post", envelope_from="b@lists.example.org", data=b"x",
            recipients=["a@example.pl"], incoming_id=4242, incoming_status="queued",
        )
    assert count(db_path, "outbox") == 0
    assert count(db_path, "deliveries") == 0


async def test_enqueue_mark_notified_keeps_the_status(store: Store, db_path: Path) -> None:
    list_id = await store.create_list(LIST, {}, [OWNER])
    await store.submit_incoming([incoming(list_id, 1, status="held", reason="no subject")])
    [held] = await store.incoming_with("post", "held", unnotified=True)
    await store.enqueue(
        list_id=list_id, kind="owner", envelope_from=f"{LIST}-bounces@lists.example.org", data=b"powiadomienie",
        recipients=[OWNER], incoming_id=held.id, mark_notified=True,
    )
    assert (await store.get_incoming(held.id)).status == "held"
    assert await store.incoming_with("post", "held", unnotified=True) == []
    assert count(db_path, "deliveries", "recipient = ?", (OWNER,)) == 1


async def test_transaction_rolls_back_on_error(store: Store, db_path: Path) -> None:
    await store.create_list(LIST, {}, [])
    with pytest.raises(RuntimeError):
        async with store.transaction() as db:
            await db.execute("DELETE FROM lists")
            raise RuntimeError("przerwane")
    assert count(db_path, "lists") == 1
