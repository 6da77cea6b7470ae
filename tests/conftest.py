"""Shared fixtures: a real listserv on 127.0.0.1:0, an aiosmtpd sink as the relay, real SQLite files.

With ``LISTSERV_TEST_STORE=postgresql`` every config made here (and the store
fixtures) use a fresh database on a throwaway PostgreSQL server instead
(tests/pgserver.py): the same tests, the other backend.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import threading
import time
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, Envelope, Session

from listserv import config as config_mod
from listserv import dkim
from listserv.app import App
from listserv.dns import DictResolver

import pgserver

T = TypeVar("T")
ROOT = Path(__file__).resolve().parent.parent
DOMAIN = "lists.example.org"
SELECTOR = "test"


def shared_dir() -> Path:
    return Path(os.environ.get("LISTSERV_SHARED", ROOT.parent / "shared"))


def corpora_dir() -> Path:
    return Path(os.environ.get("LISTSERV_CORPORA", shared_dir() / "corpora"))


def require(condition: bool, reason: str) -> None:
    """Skip with a visible reason; in CI (LISTSERV_STRICT_SKIPS=1) fail instead."""
    if condition:
        return
    if os.environ.get("LISTSERV_STRICT_SKIPS") == "1":
        pytest.fail(f"required in CI: {reason}")
    pytest.skip(reason)


def store_target(tmp_path: Path, name: str = "x.sqlite3") -> Path | str:
    """Where a test's store lives: a SQLite file in tmp_path, or a fresh PostgreSQL database."""
    if pgserver.BACKEND != "postgresql":
        return tmp_path / name
    return postgres_url()


def postgres_url() -> str:
    """A fresh database on the throwaway server; skips (fails in CI) where there is none."""
    try:
        return pgserver.fresh_url()
    except RuntimeError as exc:
        require(False, str(exc))
        raise


def committed(target: Path | str, query: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Rows read through a fresh connection (only committed data is visible), on either backend."""
    if isinstance(target, str):
        import psycopg

        from listserv.store.pg import translate

        with psycopg.connect(target, autocommit=True) as conn:
            cur = conn.execute(translate(query).removesuffix(" RETURNING id"), params)
            return [tuple(r) for r in cur.fetchall()] if cur.description else []
    import sqlite3

    conn = sqlite3.connect(target)
    try:
        return [tuple(r) for r in conn.execute(query, params).fetchall()]
    finally:
        conn.close()


def store_toml(config: config_mod.Config | None) -> str:
    """The ``[store]`` table of a config file written for the CLI beside ``config`` (the same database)."""
    if config is None or not config.store.url:
        return ""
    return f'[store]\nurl = "{config.store.url}"\n'


def perl_verifier() -> Path:
    script = shared_dir() / "tools" / "verify_dkim.pl"
    require(script.exists(), f"{script} not found (set LISTSERV_SHARED)")
    require(shutil.which("perl") is not None, "perl is not installed")
    ok = subprocess.run(["perl", "-MMail::DKIM", "-e1"], capture_output=True).returncode == 0
    require(ok, "Perl Mail::DKIM missing (Debian package libmail-dkim-perl)")
    return script


def verify_with_perl(data: bytes, key: dkim.DkimKey, tmp_path: Path,
                     arc: bool = False) -> subprocess.CompletedProcess[str]:
    script = perl_verifier()
    msg = tmp_path / f"msg-{time.monotonic_ns()}.eml"
    msg.write_bytes(data if data.endswith(b"\n") else data + b"\r\n")
    txt = tmp_path / "dns.txt"
    txt.write_text(dkim.dns_txt_value(key))
    return subprocess.run(
        ["perl", str(script), *(["--arc"] if arc else []), str(msg), f"{key.selector}._domainkey.{key.domain}={txt}"],
        capture_output=True, text=True,
    )


def dkim_dnsfunc(key: dkim.DkimKey) -> Callable[..., bytes]:
    value = dkim.dns_txt_value(key).encode()

    def dnsfunc(name: bytes | str, timeout: int = 5) -> bytes:
        name = name.decode() if isinstance(name, bytes) else name
        return value if name.rstrip(".") == f"{key.selector}._domainkey.{key.domain}" else b""

    return dnsfunc


# -- the relay: an aiosmtpd sink ----------------------------------------------------


@dataclass
class Delivered:
    mail_from: str
    rcpt_tos: list[str]
    data: bytes


@dataclass
class SinkHandler:
    messages: list[Delivered] = field(default_factory=list)
    reject: dict[str, str] = field(default_factory=dict)  # rcpt -> reply
    lock: threading.Lock = field(default_factory=threading.Lock)

    async def handle_RCPT(self, server: SMTP, session: Session, envelope: Envelope, address: str,
                          options: list[str]) -> str:
        if address in self.reject:
            return self.reject[address]
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        with self.lock:
            self.messages.append(Delivered(envelope.mail_from, list(envelope.rcpt_tos),
                                           bytes(envelope.original_content or b"")))
        return "250 2.0.0 OK"

    def copies_for(self, rcpt: str) -> list[Delivered]:
        with self.lock:
            return [m for m in self.messages if rcpt in m.rcpt_tos]

    def recipients(self) -> list[str]:
        with self.lock:
            return [r for m in self.messages for r in m.rcpt_tos]


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def sink() -> Iterator[tuple[SinkHandler, int]]:
    handler = SinkHandler()
    port = free_port()
    controller = Controller(handler, hostname="127.0.0.1", port=port, data_size_limit=None)
    controller.start()
    try:
        yield handler, port
    finally:
        controller.stop()


# -- config and the server ---------------------------------------------------------------


def make_config(tmp_path: Path, relay_port: int | None = None, **sections: dict[str, Any]) -> config_mod.Config:
    data: dict[str, Any] = {
        "server": {"domain": DOMAIN, "listen": "127.0.0.1:0", "state_dir": str(tmp_path / "state"),
                   "log_level": "debug"},
        "delivery": {"mode": "smtp" if relay_port else "maildir",
                     "relay": f"127.0.0.1:{relay_port or 25}", "max_recipients": 50, "connections": 2,
                     "timeout": 10},
        "dkim": {"selector": SELECTOR, "private_key": str(tmp_path / "dkim.key")},
        "archive": {"dir": str(tmp_path / "archive"), "base_url": "https://archiwum.example.org/"},
    }
    if pgserver.BACKEND == "postgresql" and "store" not in sections:
        data["store"] = {"url": postgres_url()}
    for name, values in sections.items():
        data.setdefault(name, {}).update(values) if isinstance(values, dict) else data.__setitem__(name, values)
    return config_mod.from_mapping(data, base=tmp_path)


class RunningServer:
    """A real App on its own event loop in a thread, so tests can use blocking smtplib."""

    def __init__(self, config: config_mod.Config, **app_kwargs: Any) -> None:
        self.config = config
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        # No real DNS in tests: an in-memory resolver unless the test brings one.
        app_kwargs.setdefault("resolver", DictResolver({}))
        self.app = App(config, **app_kwargs)
        self.call(self.app.start())
        self.port = self.app.port
        assert self.app.store is not None
        self.store = self.app.store
        self.key = dkim.DkimKey.load(config.dkim.private_key, domain=config.server.domain,
                                     selector=config.dkim.selector)

    def call(self, coro: Coroutine[Any, Any, T], timeout: float = 60) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def drain(self, timeout: float = 60) -> None:
        assert self.app.fanout is not None
        self.call(self.app.fanout.drain(timeout), timeout + 5)

    def stop(self) -> None:
        try:
            self.call(self.app.stop(grace=5))
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(10)
            self.loop.close()


@pytest.fixture
def start_server(tmp_path: Path) -> Iterator[Callable[..., RunningServer]]:
    servers: list[RunningServer] = []

    def start(config: config_mod.Config | None = None, **kwargs: Any) -> RunningServer:
        server = RunningServer(config or make_config(tmp_path), **kwargs)
        servers.append(server)
        return server

    yield start
    for server in servers:
        if server.app.store is not None and server.loop.is_running():
            server.stop()
