"""PostgreSQL: the same store parts, the same SQL, over psycopg 3, for several nodes on one database.

Every part of the store (listserv.store.lists, .queue, ...) writes its SQL
once, in the SQLite dialect the embedded default runs.  This backend runs that
same SQL on PostgreSQL: ``translate`` rewrites the few SQLite forms the parts
use into PostgreSQL's (placeholders, ``INSERT OR IGNORE/REPLACE``, the JSON
and aggregate functions, ``CROSS JOIN ... ON``), once per distinct statement,
and ``translate_schema`` does the same for the migrations' DDL.  What the
engines do differently is decided here and nowhere else:

- **Claims.**  SQLite serialises writers (``BEGIN IMMEDIATE``); here several
  workers on several nodes claim at once, so every claim's sub-select ends in
  ``FOR UPDATE SKIP LOCKED`` (``SKIP_LOCKED``): two workers never take the same
  row, and neither waits for the other.
- **Errors inside a transaction.**  PostgreSQL aborts the whole transaction on
  a failed statement, where SQLite fails only the statement.  The parts catch a
  unique violation in three places and go on, so each INSERT runs inside a
  savepoint and a violation rolls back to it alone.
- **Types.**  The schema keeps SQLite's INTEGER for flags; Python's bools are
  sent as integers.  ``REAL`` becomes ``DOUBLE PRECISION`` (PostgreSQL's REAL
  is 4 bytes, too few for a timestamp); ``sum()`` of integers comes back as an
  int, not a Decimal.
- **The schema version** is a one-row table, ``schema_version``, instead of
  ``PRAGMA user_version``; a migration runs under an advisory lock, so two
  nodes starting together do not both run it.

Two connections per process, as on SQLite: a writer (transactions serialised
by the store's lock) and a reader in autocommit for the lookups made while an
SMTP client waits.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import re
from collections.abc import AsyncIterator, Iterable, Sequence
from decimal import Decimal
from typing import Any, Self, cast

import aiosqlite

from listserv.errors import StoreError
from listserv.store import schema
from listserv.store.base import is_url

try:  # the driver is an extra: the embedded default never needs it
    import psycopg
    from psycopg.adapt import Dumper, Loader
    from psycopg.pq import Format
    from psycopg.types.string import BytesBinaryDumper
except ImportError:  # pragma: no cover - reported by open()
    psycopg = None  # type: ignore[assignment]

__all__ = ["PgConnection", "copy_from_sqlite", "is_url", "translate", "translate_schema"]

MIGRATION_LOCK = 0x6C697374  # "list": the advisory lock held while migrating




# -- SQL: the SQLite dialect the parts write, as PostgreSQL reads it ---------------------

def _tables_with_id() -> frozenset[str]:
    found = re.findall(r"CREATE TABLE (\w+) \(\s*id\s+INTEGER PRIMARY KEY", "\n".join(schema.MIGRATIONS))
    return frozenset(found)


TABLES_WITH_ID = _tables_with_id()

# INSERT OR REPLACE needs the key it replaces on (SQLite replaces on any).
REPLACE_KEYS = {"archive_meta": ("archive_id",), "one_last_digest": ("list_id", "address")}

_REWRITES: tuple[tuple[re.Pattern[str], str], ...] = tuple((re.compile(p), r) for p, r in (
    (r"group_concat\((\w+), char\(10\)\)", r"string_agg(\1, chr(10))"),
    (r"json_set\((\w+), '\$\.' \|\| \?, json\(\?\)\)", r"jsonb_set(\1::jsonb, ARRAY[?::text], ?::jsonb)::text"),
    (r"json_extract\((\w+), '\$\.' \|\| \?\) = \?", r"(\1::jsonb ->> ?::text) = ?::text"),
    (r"\bCROSS JOIN\b", "JOIN"),
    # sum() of a comparison counts the rows where it holds (SQLite's 0/1 booleans).
    (r"\bsum\(([^()]*?(?:=|<|>)[^()]*)\)", r"sum(CASE WHEN \1 THEN 1 ELSE 0 END)"),
    (r"x''", r"'\\x'::bytea"),
    (r"VACUUM INTO \?", "SELECT ?"),
))


def _placeholders(sql: str) -> str:
    """``?`` -> ``%s`` outside string literals; a literal ``%`` doubled (psycopg's format)."""
    out = []
    quoted = False
    for ch in sql:
        if ch == "'":
            quoted = not quoted
            out.append(ch)
        elif ch == "%":
            out.append("%%")
        elif ch == "?" and not quoted:
            out.append("%s")
        else:
            out.append(ch)
    return "".join(out)


@functools.lru_cache(maxsize=1024)
def translate(sql: str) -> str:
    """One statement of the parts' SQL as PostgreSQL runs it."""
    text = sql
    for pattern, replacement in _REWRITES:
        text = pattern.sub(replacement, text)
    head = re.match(r"\s*INSERT OR (IGNORE|REPLACE) INTO (\w+)\s*\(([^)]*)\)", text)
    if head:
        kind, table, cols = head.group(1), head.group(2), [c.strip() for c in head.group(3).split(",")]
        text = f"INSERT INTO {table} ({', '.join(cols)})" + text[head.end():]
        returning = ""
        found = re.search(r"\sRETURNING\s.*$", text, re.S)
        if found:
            text, returning = text[:found.start()], text[found.start():]
        if kind == "IGNORE":
            text += " ON CONFLICT DO NOTHING"
        else:
            keys = REPLACE_KEYS[table]
            sets = ", ".join(f"{c} = EXCLUDED.{c}" for c in cols if c not in keys)
            text += f" ON CONFLICT ({', '.join(keys)}) DO UPDATE SET {sets}"
        text += returning
    table_match = re.match(r"\s*INSERT INTO (\w+)", text)
    if table_match and table_match.group(1) in TABLES_WITH_ID and " RETURNING " not in text:
        text += " RETURNING id"  # the cursor's lastrowid
    return _placeholders(text)


def translate_schema(script: str) -> list[str]:
    """One migration's DDL for PostgreSQL, statement by statement."""
    text = re.sub(r"--[^\n]*", "", script)
    text = re.sub(r"\bINTEGER PRIMARY KEY\b", "BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY", text)
    text = re.sub(r"\bINTEGER\b", "BIGINT", text)
    text = re.sub(r"\bREAL\b", "DOUBLE PRECISION", text)
    text = re.sub(r"\bBLOB\b", "BYTEA", text)
    text = re.sub(r"\)\s*WITHOUT ROWID", ")", text)
    text = text.replace("x''", "'\\x'::bytea")
    return [s.strip() for s in text.split(";") if s.strip()]


# -- the connection, shaped as the parts use aiosqlite's -----------------------------

class Cursor:
    """What a statement left: rowcount, lastrowid (an INSERT's ``RETURNING id``) and its rows."""

    def __init__(self, rowcount: int, rows: list[tuple[Any, ...]], lastrowid: int | None) -> None:
        self.rowcount = rowcount
        self.lastrowid = lastrowid
        self._rows = rows

    async def fetchone(self) -> tuple[Any, ...] | None:
        return self._rows[0] if self._rows else None

    async def fetchall(self) -> list[tuple[Any, ...]]:
        return list(self._rows)

    def __aiter__(self) -> AsyncIterator[tuple[Any, ...]]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[tuple[Any, ...]]:
        for row in self._rows:
            yield row

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        return None


class _Statement:
    """``await db.execute(...)`` and ``async with db.execute(...) as cur`` both work, as with aiosqlite."""

    def __init__(self, run: Any) -> None:
        self._run = run
        self._cursor: Cursor | None = None

    def __await__(self) -> Any:
        return self._run.__await__()

    async def __aenter__(self) -> Cursor:
        self._cursor = await self._run
        return self._cursor

    async def __aexit__(self, *exc: object) -> None:
        return None


class PgConnection:
    def __init__(self, conn: Any) -> None:
        self.conn = conn
        self.in_transaction = False
        # Rows changed by this connection so far (sqlite3's total_changes, which a part reads
        # to count what an INSERT ... ON CONFLICT DO NOTHING really added).
        self.total_changes = 0

    @classmethod
    async def connect(cls, url: str) -> PgConnection:
        if psycopg is None:
            raise StoreError("a postgresql:// store needs the psycopg package: pip install 'listserv[postgresql]'")
        conn = await psycopg.AsyncConnection.connect(url, autocommit=True)
        _adapt(conn)
        await conn.execute("SET TIME ZONE 'UTC'")
        return cls(conn)

    def execute(self, sql: str, params: Sequence[Any] = ()) -> _Statement:
        return _Statement(self._execute(sql, params))

    async def _execute(self, sql: str, params: Sequence[Any]) -> Cursor:
        text = translate(sql)
        guarded = self.in_transaction and text.lstrip().startswith("INSERT")
        async with self.conn.cursor() as cur:
            if guarded:
                await cur.execute("SAVEPOINT listserv_stmt")
            try:
                await cur.execute(text, tuple(params))
            except psycopg.errors.IntegrityError:
                if guarded:
                    await cur.execute("ROLLBACK TO SAVEPOINT listserv_stmt")
                raise
            rows = list(await cur.fetchall()) if cur.description is not None else []
            rowcount = cur.rowcount  # this statement's, before the RELEASE below has its own
            if guarded:
                await cur.execute("RELEASE SAVEPOINT listserv_stmt")
            lastrowid = int(rows[0][0]) if rows and text.endswith(" RETURNING id") else None
            if rowcount > 0 and not text.lstrip().upper().startswith("SELECT"):
                self.total_changes += rowcount
            return Cursor(rowcount, rows, lastrowid)

    async def executemany(self, sql: str, seq: Iterable[Sequence[Any]]) -> Cursor:
        text = translate(sql)
        if text.endswith(" RETURNING id"):
            text = text[: -len(" RETURNING id")]
        params = [tuple(p) for p in seq]
        if not params:
            return Cursor(0, [], None)
        async with self.conn.cursor() as cur:
            await cur.executemany(text, params)
            if cur.rowcount > 0:
                self.total_changes += cur.rowcount
            return Cursor(cur.rowcount, [], None)

    async def execute_fetchall(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        return await (await self._execute(sql, params)).fetchall()

    async def begin(self) -> None:
        await self.conn.execute("BEGIN")
        self.in_transaction = True

    async def commit(self) -> None:
        self.in_transaction = False
        await self.conn.execute("COMMIT")

    async def rollback(self) -> None:
        self.in_transaction = False
        with contextlib.suppress(Exception):
            await self.conn.execute("ROLLBACK")

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await self.conn.close()


def _adapt(conn: Any) -> None:
    class BoolAsInt(Dumper):
        """The schema's flags are INTEGER 0/1, as on SQLite."""

        oid = psycopg.adapters.types["int8"].oid

        def dump(self, obj: Any) -> bytes:
            return b"1" if obj else b"0"

    class NumericAsNumber(Loader):
        """sum() and avg() of integers are numeric: an int or a float, as SQLite gives."""

        format = Format.TEXT

        def load(self, data: Any) -> Any:
            value = Decimal(bytes(data).decode())
            return int(value) if value == value.to_integral_value() else float(value)

    conn.adapters.register_dumper(bool, BoolAsInt)
    # A post's bytes go as they are (binary), not hex-escaped to twice their size in
    # this process: a 3 MB post would otherwise hold the event loop for tens of ms.
    conn.adapters.register_dumper(bytes, BytesBinaryDumper)
    conn.adapters.register_loader("numeric", NumericAsNumber)


# -- the store's base, on PostgreSQL -----------------------------------------------------

class PgBase:
    """Mixed in before StoreBase by ``open_store``: the PostgreSQL connections and transactions."""

    SKIP_LOCKED = " FOR UPDATE SKIP LOCKED"
    path: Any  # the URL (StoreBase keeps what it was opened with)
    _writer: Any
    _reader: Any
    _lock: asyncio.Lock

    @classmethod
    async def open_url(cls, url: str) -> Any:
        opened: list[PgConnection] = []
        try:
            opened.append(await PgConnection.connect(url))  # the writer: BEGIN ... COMMIT of its own
            opened.append(await PgConnection.connect(url))  # the reader: each lookup its own snapshot
            store = cls(opened[0], opened[1], url)  # type: ignore[call-arg]
            await store._migrate()
        except BaseException as exc:
            for conn in opened:
                await conn.close()
            if isinstance(exc, StoreError) or not isinstance(exc, Exception):
                raise
            raise StoreError(f"cannot open the state database {_safe_url(url)}: {exc}") from exc
        return store

    async def _migrate(self) -> None:
        async with self._lock:
            conn = self._writer.conn
            async with conn.transaction():
                await conn.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK,))
                await conn.execute("CREATE TABLE IF NOT EXISTS schema_version (version BIGINT NOT NULL)")
                cur = await conn.execute("SELECT version FROM schema_version")
                row = await cur.fetchone()
                if row is None:
                    await conn.execute("INSERT INTO schema_version (version) VALUES (0)")
                version = int(row[0]) if row else 0
                if version > len(schema.MIGRATIONS):
                    raise StoreError(f"{_safe_url(str(self.path))} has schema version {version}, newer than this "
                                     f"listserv knows ({len(schema.MIGRATIONS)}); upgrade listserv")
                for target in range(version, len(schema.MIGRATIONS)):
                    for statement in translate_schema(schema.MIGRATIONS[target]):
                        await conn.execute(statement)
                    await conn.execute("UPDATE schema_version SET version = %s", (target + 1,))

    # The parts are typed against aiosqlite's connection and rows; PgConnection
    # and psycopg's tuples answer the same calls (the casts say so to mypy).

    @contextlib.asynccontextmanager
    async def transaction(self) -> AsyncIterator[aiosqlite.Connection]:
        async with self._lock:
            await self._writer.begin()
            try:
                yield cast(aiosqlite.Connection, self._writer)
            except BaseException:
                await self._writer.rollback()
                raise
            await self._writer.commit()

    async def backup(self, target: Any) -> None:
        await _pg_dump(str(self.path), target)

    async def _fetchall(self, sql: str, params: Sequence[Any] = ()) -> list[aiosqlite.Row]:
        return cast(list[aiosqlite.Row], await self._reader.execute_fetchall(sql, params))

    async def _fetchone(self, sql: str, params: Sequence[Any] = ()) -> aiosqlite.Row | None:
        rows = await self._fetchall(sql, params)
        return rows[0] if rows else None


def _parents_first(src: Any) -> list[str]:
    """The SQLite state's tables, each after the tables its foreign keys point at."""
    tables = [r[0] for r in src.execute(
        "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%' ORDER BY name")]
    parents = {t: {r[2] for r in src.execute(f"PRAGMA foreign_key_list({t})")} - {t} for t in tables}
    ordered: list[str] = []
    while len(ordered) < len(tables):
        ready = [t for t in tables if t not in ordered and parents[t] <= set(ordered)]
        if not ready:  # a cycle: cannot happen with this schema, but never loop forever
            ready = [t for t in tables if t not in ordered]
        ordered.extend(ready)
    return ordered


async def _pg_dump(url: str, target: Any) -> None:
    """``listserv backup`` on PostgreSQL: pg_dump's custom format (restore with pg_restore), 0600,
    written beside the target and linked into place, so no half file and no overwrite."""
    import os
    import shutil

    pg_dump = shutil.which("pg_dump")
    if pg_dump is None:
        raise StoreError("backup of a PostgreSQL store needs pg_dump (Debian package postgresql-client)")
    target = target.absolute()
    if target.exists():
        raise StoreError(f"{target} exists; backups never overwrite, give a new file name")
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    try:
        proc = await asyncio.create_subprocess_exec(
            pg_dump, "--format=custom", "--no-owner", f"--file={tmp}", url,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        _, err = await proc.communicate()
        if proc.returncode != 0:
            raise StoreError(f"pg_dump failed: {err.decode(errors='replace').strip()[:500]}")
        os.chmod(tmp, 0o600)  # member addresses: personal data
        os.link(tmp, target)
    except FileExistsError:
        raise StoreError(f"{target} exists; backups never overwrite, give a new file name") from None
    except OSError as exc:
        raise StoreError(f"cannot write the backup {target}: {exc}") from exc
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def _safe_url(url: str) -> str:
    """The URL without its password, for messages."""
    return re.sub(r"://([^:@/]*):[^@/]*@", r"://\1:***@", url)


# -- moving an existing SQLite state to PostgreSQL --------------------------------------

async def copy_from_sqlite(sqlite_path: Any, url: str) -> dict[str, tuple[int, int]]:
    """Copy every table of a SQLite state into an empty PostgreSQL database, then count both sides.

    Both are first brought to the current schema (by opening them as stores),
    so the tables and columns are the same.  The target must hold no lists
    yet: the copy keeps every row's id (the queue's rows point at each other).
    Returns {table: (rows in SQLite, rows in PostgreSQL)}; raises StoreError
    when a count differs (then the target is left as it is, for inspection).
    """
    import sqlite3

    from listserv.store import Store, pg_store_class

    source_store = await Store.open(sqlite_path)  # migrate the source to the current schema
    await source_store.close()
    target = await pg_store_class().open_url(url)
    await target.close()
    src = sqlite3.connect(f"file:{sqlite_path}?mode=ro", uri=True)
    counts: dict[str, tuple[int, int]] = {}
    try:
        tables = _parents_first(src)
        conn = await psycopg.AsyncConnection.connect(url, autocommit=False)
        try:
            _adapt(conn)
            cur = await conn.execute("SELECT count(*) FROM lists")
            row = await cur.fetchone()
            if row and row[0]:
                raise StoreError(f"{_safe_url(url)} has lists already; copy only into a new, empty database")
            try:
                for table in tables:
                    columns = [r[1] for r in src.execute(f"PRAGMA table_info({table})")]
                    names = ", ".join(columns)
                    async with conn.cursor() as pg_cur:
                        async with pg_cur.copy(f"COPY {table} ({names}) FROM STDIN") as copy:
                            for values in src.execute(f"SELECT {names} FROM {table}"):
                                await copy.write_row(values)
                    if "id" in columns:  # new rows continue after the copied ones
                        await conn.execute(
                            f"SELECT setval(pg_get_serial_sequence('{table}', 'id'),"
                            f" coalesce((SELECT max(id) FROM {table}), 0) + 1, false)")
                await conn.commit()
            except psycopg.Error as exc:
                raise StoreError(f"the copy into {_safe_url(url)} failed, nothing was kept: {exc}") from None
            for table in tables:
                (n_src,) = src.execute(f"SELECT count(*) FROM {table}").fetchone()
                cur = await conn.execute(f"SELECT count(*) FROM {table}")
                row = await cur.fetchone()
                counts[table] = (int(n_src), int(row[0]) if row else -1)
        finally:
            await conn.close()
    finally:
        src.close()
    wrong = {t: c for t, c in counts.items() if c[0] != c[1]}
    if wrong:
        raise StoreError("the copy's counts differ: " + ", ".join(f"{t} {a} -> {b}" for t, (a, b) in wrong.items()))
    return counts
