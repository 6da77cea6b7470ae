"""A throwaway PostgreSQL server for the tests: ``initdb`` in a temp dir, on a free port of 127.0.0.1.

Started once per test process, on first use, and stopped when the process
exits; each test gets a database of its own (``fresh_url``).  Run as the
``postgres`` user when the tests run as root (``initdb`` refuses root).
Nothing is mocked: this is the server an operator runs, with ``fsync`` off
because the data dir is thrown away.

``LISTSERV_TEST_STORE=postgresql`` runs every store-level and end-to-end test
on it (conftest.make_config and the store fixtures read it); without, the
PostgreSQL tests that name it still run here when the server is installed.
"""

from __future__ import annotations

import atexit
import glob
import itertools
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

BACKEND = os.environ.get("LISTSERV_TEST_STORE", "sqlite")

_server: "PgServer | None" = None
_failed = ""
_names = itertools.count(1)


def pg_bin(name: str) -> str:
    """initdb / pg_ctl: on PATH, else Debian's versioned folder."""
    found = shutil.which(name)
    if found:
        return found
    for folder in sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True):
        if os.access(os.path.join(folder, name), os.X_OK):
            return os.path.join(folder, name)
    return ""


def missing_reason() -> str:
    """Why the tests cannot have a server here, or "" when they can."""
    if not pg_bin("initdb") or not pg_bin("pg_ctl"):
        return "PostgreSQL is not installed (Debian package postgresql)"
    try:
        import psycopg  # noqa: F401
    except ImportError:
        return "the psycopg package is not installed (pip install -e .[test])"
    if os.geteuid() == 0:
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            return "running as root and there is no postgres user to run initdb as"
    return ""


class PgServer:
    def __init__(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="listserv-pg-"))
        self.data = self.root / "data"
        self.port = _free_port()
        self.as_root = os.geteuid() == 0
        self._template = ""
        if self.as_root:
            user = pwd.getpwnam("postgres")
            os.chown(self.root, user.pw_uid, user.pw_gid)
        self._run([pg_bin("initdb"), "-D", str(self.data), "-U", "postgres", "-A", "trust", "-E", "UTF8",
                   "--no-locale", "--no-sync"])
        options = (f"-c listen_addresses=127.0.0.1 -c port={self.port} -c unix_socket_directories={self.root}"
                   " -c fsync=off -c synchronous_commit=off -c full_page_writes=off -c max_connections=300")
        self._run([pg_bin("pg_ctl"), "-D", str(self.data), "-l", str(self.root / "log"), "-o", options,
                   "-w", "-t", "60", "start"])
        atexit.register(self.stop)

    def _run(self, argv: list[str]) -> None:
        if self.as_root:
            argv = ["runuser", "-u", "postgres", "--", *argv]
        done = subprocess.run(argv, capture_output=True, text=True, timeout=120)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)}: {done.stdout}{done.stderr}")

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def create_database(self) -> str:
        """A new database, already at the current schema (a copy of a migrated template:
        a test's store opens without running the migrations each time)."""
        import psycopg

        if not self._template:
            self._make_template()
        name = f"t{os.getpid()}_{next(_names)}"
        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {name} TEMPLATE {self._template}")
        return self.url(name)

    def _make_template(self) -> None:
        import asyncio

        import psycopg

        from listserv.store import open_store

        name = f"tmpl{os.getpid()}"
        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {name}")

        async def migrate() -> None:
            await (await open_store(self.url(name))).close()

        asyncio.run(migrate()) if not _loop_running() else _in_thread(migrate)
        self._template = name

    def stop(self) -> None:
        if self.data.exists():
            try:
                self._run([pg_bin("pg_ctl"), "-D", str(self.data), "-m", "immediate", "-w", "stop"])
            except (RuntimeError, subprocess.TimeoutExpired):
                pass
        shutil.rmtree(self.root, ignore_errors=True)


def server() -> PgServer:
    """The process's server, started on first use; raises RuntimeError with the reason when it cannot be."""
    global _server, _failed
    if _server is None:
        if _failed:
            raise RuntimeError(_failed)
        reason = missing_reason()
        if reason:
            _failed = reason
            raise RuntimeError(reason)
        deadline = time.monotonic() + 5
        while True:
            try:
                _server = PgServer()
                break
            except RuntimeError as exc:  # a port taken between choosing and binding: once more
                if time.monotonic() > deadline:
                    _failed = f"could not start a throwaway PostgreSQL server: {exc}"
                    raise RuntimeError(_failed) from None
    return _server


def fresh_url() -> str:
    """A new, empty database on the process's server."""
    return server().create_database()


def _loop_running() -> bool:
    import asyncio

    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


def _in_thread(coro_fn) -> None:  # type: ignore[no-untyped-def]
    """Run a coroutine to completion on a loop of its own (called from inside a running loop)."""
    import asyncio
    import threading

    errors: list[BaseException] = []

    def run() -> None:
        try:
            asyncio.run(coro_fn())
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    if errors:
        raise errors[0]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
