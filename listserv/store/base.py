"""Connections, transactions and migrations: what every part of the store stands on."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
import sys
from typing import Any, Self

import aiosqlite

from listserv import files
from listserv.errors import StoreError
from listserv.store import schema
from listserv.store.records import (
    IncomingRow,
)


def integrity_errors() -> tuple[type[Exception], ...]:
    """A unique or foreign-key violation, on either backend (the parts catch it
    in the few places where it means "exists already").

    psycopg is looked up, not imported: a PostgreSQL store has imported it
    (store/pg.py), and importing it for every CLI command cost 0.15 s.
    """
    psycopg = sys.modules.get("psycopg")
    if psycopg is None:
        return (aiosqlite.IntegrityError,)
    return (aiosqlite.IntegrityError, psycopg.IntegrityError)


def is_url(target: object) -> bool:
    """A ``postgresql://`` store address (anything else is a SQLite file)."""
    return isinstance(target, str) and target.startswith(("postgresql://", "postgres://"))


class StoreBase:
    """The connections every part uses.  Open a whole store with ``await Store.open(path)``."""

    # Appended to the sub-select of every claim (design note: leases).  SQLite
    # needs nothing: its write lock (BEGIN IMMEDIATE) serialises the claims.
    SKIP_LOCKED = ""

    def __init__(self, writer: aiosqlite.Connection, reader: aiosqlite.Connection, path: Path) -> None:
        self.path = path
        self._writer = writer
        self._reader = reader
        self._lock = asyncio.Lock()
        self._pending: list[tuple[Sequence[IncomingRow], asyncio.Future[None]]] = []
        self._commit_wakeup = asyncio.Event()
        self._committer: asyncio.Task[None] | None = None
        self._closed = False

    # -- lifecycle ---------------------------------------------------------

    @classmethod
    async def open(cls, path: Path) -> Self:
        files.create_database(path)  # 0600 in a 0700 dir, whatever the umask (listserv/files.py)
        opened: list[aiosqlite.Connection] = []
        try:
            opened.append(await _connect(path))
            opened.append(await _connect(path))
            store = cls(opened[0], opened[1], path)
            await store._migrate()
        except BaseException as exc:
            # aiosqlite's threads are not daemons: a connection left open
            # would keep a failed CLI command from ever exiting.
            for conn in opened:
                await _close_quietly(conn)
            if isinstance(exc, StoreError) or not isinstance(exc, Exception):
                raise
            raise StoreError(f"cannot open the state database {path}: {exc}") from exc
        return store

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._committer is not None:
            # Let the group commit finish what it holds first: those clients
            # are still owed an answer.  It exits once nothing is pending.
            self._commit_wakeup.set()
            try:
                await asyncio.wait_for(asyncio.shield(self._committer), 30)
            except (TimeoutError, asyncio.CancelledError):
                self._committer.cancel()
        for _, fut in self._pending:
            if not fut.done():
                fut.set_exception(StoreError("store closed"))
        await self._reader.close()
        await self._writer.close()

    async def _migrate(self) -> None:
        async with self._lock:
            async with self._writer.execute("PRAGMA user_version") as cur:
                row = await cur.fetchone()
            version = int(row[0]) if row else 0
            if version > len(schema.MIGRATIONS):
                raise StoreError(
                    f"{self.path} has schema version {version}, newer than this listserv "
                    f"knows ({len(schema.MIGRATIONS)}); upgrade listserv"
                )
            for target in range(version, len(schema.MIGRATIONS)):
                # Each migration in one transaction, sent as one script: one
                # trip to the connection's thread, not one per statement (a
                # fresh database took 40-55 ms to create, now 20-30).
                statements = ";\n".join(_split_sql(schema.MIGRATIONS[target]))
                try:
                    await self._writer.executescript(
                        f"BEGIN IMMEDIATE;\n{statements};\nPRAGMA user_version = {target + 1};\nCOMMIT;")
                except BaseException:
                    if self._writer.in_transaction:
                        await self._writer.rollback()
                    raise

    @contextlib.asynccontextmanager
    async def transaction(self) -> AsyncIterator[aiosqlite.Connection]:
        """One write transaction; commits on success, rolls back on error."""
        async with self._lock:
            await self._writer.execute("BEGIN IMMEDIATE")
            try:
                yield self._writer
            except BaseException:
                await self._writer.rollback()
                raise
            await self._writer.commit()

    async def _fetchall(self, sql: str, params: Sequence[Any] = ()) -> list[aiosqlite.Row]:
        # One hop to the reader's thread, the statement run to completion
        # there: a statement left open between hops would pin an old read
        # snapshot for every other query on this connection.
        return list(await self._reader.execute_fetchall(sql, params))

    async def _fetchone(self, sql: str, params: Sequence[Any] = ()) -> aiosqlite.Row | None:
        rows = await self._reader.execute_fetchall(sql, params)
        for row in rows:
            return row
        return None



async def _close_quietly(conn: aiosqlite.Connection) -> None:
    with contextlib.suppress(Exception):
        await conn.close()
    # Wait for the worker thread too, so a failing CLI command exits at once.
    thread = getattr(conn, "_thread", None)
    if thread is not None:
        thread.join(5)  # an error path only: blocking briefly is fine


async def _connect(path: Path) -> aiosqlite.Connection:
    conn = await aiosqlite.connect(path, isolation_level=None)
    try:
        await _pragmas(conn)
    except BaseException:
        await _close_quietly(conn)
        raise
    return conn


PAGE_SIZE = 16384


async def _pragmas(conn: aiosqlite.Connection) -> None:
    # Set before the first table exists (a no-op on an existing database):
    # archived messages are blobs of a few kilobytes, which with the default
    # 4 KB pages each spill into an overflow page; 16 KB pages halve the
    # CPU time of storing them.
    await conn.execute(f"PRAGMA page_size = {PAGE_SIZE}")
    await conn.execute("PRAGMA journal_mode = WAL")
    # FULL: in WAL mode each commit is fsynced, so a post answered 250 survives
    # a power cut, not only a crash of this process.
    await conn.execute("PRAGMA synchronous = FULL")
    await conn.execute("PRAGMA foreign_keys = ON")
    # The CLI writes while the server runs; wait for the lock instead of failing.
    await conn.execute("PRAGMA busy_timeout = 10000")


def _split_sql(script: str) -> list[str]:
    return [s.strip() for s in script.split(";") if s.strip()]
