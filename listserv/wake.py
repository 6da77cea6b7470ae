"""Wake-ups between the stages: "there is new work in the store", and nothing more.

The store is the queue; a wake-up only saves a worker the wait for its next
poll.  ``notify`` is called after a commit, never raises and never blocks; a
lost wake-up delays work by one poll interval, never loses it (the workers
poll the store too).  Channels: ``prepare`` (posts and owner mail arrived),
``deliver`` (copies queued), ``requests`` (commands, bounces, held posts),
``archive`` (posts to add to the archive).

``LocalWakeup`` is the implementation for one node (the SQLite default): each
listening process binds a Unix datagram socket in ``{state_dir}/wake/``, and
``notify`` sends the channel's name to every socket there (its own process
is told directly).  Sockets left by a process that died are removed by the
first notify that finds nobody behind them.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import socket
import tempfile
import time
from pathlib import Path
from typing import Any, Protocol

__all__ = ["CHANNELS", "LocalWakeup", "PgWakeup", "Wakeup", "make_wakeup", "wake_dir"]

log = logging.getLogger("listserv.wake")

CHANNELS = ("prepare", "deliver", "requests", "archive")
# sockaddr_un.sun_path is 108 bytes on Linux, including the final NUL.
_MAX_SOCKET_PATH = 100
_PEERS_TTL = 1.0  # seconds the list of listening sockets is reused by notify


class Wakeup(Protocol):
    async def start(self) -> None: ...

    def notify(self, channel: str) -> None: ...

    async def wait(self, channel: str, timeout: float) -> bool: ...

    async def close(self) -> None: ...


def wake_dir(state_dir: Path) -> Path:
    """``{state_dir}/wake``, or, when that path is too long for a socket name, a short
    directory under the temp dir named after the state dir (the same for every process)."""
    preferred = state_dir / "wake"
    if len(str(preferred)) + 24 <= _MAX_SOCKET_PATH:
        return preferred
    digest = hashlib.sha1(str(state_dir.resolve()).encode()).hexdigest()[:16]
    return Path(tempfile.gettempdir()) / f"listserv-wake-{digest}"


class LocalWakeup:
    """Unix datagram sockets under one directory: every process of one node, one socket each."""

    def __init__(self, directory: Path, *, listen: bool = True) -> None:
        self.directory = directory
        # A process that only notifies (the receiver alone) need not listen.
        self.listen = listen
        self._events = {channel: asyncio.Event() for channel in CHANNELS}
        self._sock: socket.socket | None = None
        self._sender: socket.socket | None = None
        self._path: Path | None = None
        self._peers: list[Path] = []
        self._peers_at = 0.0

    async def start(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        self._sender = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sender.setblocking(False)
        if not self.listen:
            return
        path = self.directory / f"{os.getpid()}-{os.urandom(3).hex()}.sock"
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        sock.setblocking(False)
        sock.bind(str(path))
        self._sock, self._path = sock, path
        asyncio.get_running_loop().add_reader(sock.fileno(), self._readable)
        self._peers_at = 0.0

    def _readable(self) -> None:
        assert self._sock is not None
        while True:
            try:
                data = self._sock.recv(64)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return
            event = self._events.get(data.decode("ascii", "replace"))
            if event is not None:
                event.set()

    def notify(self, channel: str) -> None:
        event = self._events.get(channel)
        if event is None:
            return
        if self.listen:
            event.set()  # this process is one of the listeners: no socket needed
        if self._sender is None:
            return
        payload = channel.encode("ascii")
        for peer in self._peer_list():
            try:
                self._sender.sendto(payload, str(peer))
            except BlockingIOError:
                pass  # its buffer is full: it has wake-ups waiting already
            except (ConnectionRefusedError, FileNotFoundError):
                # Nobody behind it any more (the process died): remove it.
                with contextlib.suppress(OSError):
                    peer.unlink()
                self._peers_at = 0.0
            except OSError:
                log.debug("wake-up to %s not sent", peer, exc_info=True)

    def _peer_list(self) -> list[Path]:
        now = time.monotonic()
        if now - self._peers_at > _PEERS_TTL:
            try:
                self._peers = [p for p in self.directory.iterdir()
                               if p.suffix == ".sock" and p != self._path]
            except OSError:
                self._peers = []
            self._peers_at = now
        return self._peers

    async def wait(self, channel: str, timeout: float) -> bool:
        event = self._events[channel]
        if not event.is_set():
            try:
                await asyncio.wait_for(event.wait(), max(timeout, 0.0))
            except TimeoutError:
                return False
        event.clear()
        return True

    async def close(self) -> None:
        if self._sock is not None:
            with contextlib.suppress(Exception):
                asyncio.get_running_loop().remove_reader(self._sock.fileno())
            self._sock.close()
            self._sock = None
        if self._path is not None:
            with contextlib.suppress(OSError):
                self._path.unlink()
            self._path = None
        if self._sender is not None:
            self._sender.close()
            self._sender = None


class PgWakeup(LocalWakeup):
    """Several nodes on one PostgreSQL: the local sockets, and ``NOTIFY`` for the other nodes.

    A notify is told to this node's processes at once (the sockets) and to
    every other node through ``NOTIFY listserv_wake, 'CHANNEL'`` on a
    connection of its own, sent by a task so ``notify`` still never blocks;
    channels notified while one is being sent are sent together after it.
    A listening process ``LISTEN``s on another connection.  A lost
    connection only costs wake-ups (the workers poll): it is opened again.
    """

    PG_CHANNEL = "listserv_wake"

    def __init__(self, directory: Path, url: str, *, listen: bool = True) -> None:
        super().__init__(directory, listen=listen)
        self.url = url
        self._outgoing: set[str] = set()
        self._send_wakeup = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        await super().start()
        self._tasks.append(asyncio.create_task(self._send_loop(), name="wake-notify"))
        if self.listen:
            self._tasks.append(asyncio.create_task(self._listen_loop(), name="wake-listen"))

    def notify(self, channel: str) -> None:
        super().notify(channel)
        if channel in self._events:
            self._outgoing.add(channel)
            self._send_wakeup.set()

    async def _connect(self) -> Any:
        import psycopg

        return await psycopg.AsyncConnection.connect(self.url, autocommit=True)

    async def _send_loop(self) -> None:
        conn = None
        try:
            while True:
                await self._send_wakeup.wait()
                self._send_wakeup.clear()
                channels, self._outgoing = self._outgoing, set()
                try:
                    if conn is None or conn.closed:
                        conn = await self._connect()
                    for channel in sorted(channels):
                        await conn.execute("SELECT pg_notify(%s, %s)", (self.PG_CHANNEL, channel))
                except asyncio.CancelledError:
                    raise
                except Exception:  # noqa: BLE001 - the poll delivers what the wake-up would have
                    log.debug("NOTIFY not sent", exc_info=True)
                    if conn is not None:
                        with contextlib.suppress(Exception):
                            await conn.close()
                    conn = None
                    await asyncio.sleep(1.0)
        finally:
            if conn is not None:
                with contextlib.suppress(BaseException):
                    await conn.close()

    async def _listen_loop(self) -> None:
        while True:
            try:
                conn = await self._connect()
                try:
                    await conn.execute(f"LISTEN {self.PG_CHANNEL}")
                    async for note in conn.notifies():
                        event = self._events.get(note.payload)
                        if event is not None:
                            event.set()
                finally:
                    await conn.close()
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001
                log.debug("LISTEN connection lost; again in a second", exc_info=True)
                await asyncio.sleep(1.0)

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(BaseException):
                await task
        self._tasks = []
        await super().close()


def make_wakeup(state_dir: Path, store_url: str = "", *, listen: bool = True) -> LocalWakeup:
    """The wake-ups for this node: local sockets, and NOTIFY/LISTEN when the store is PostgreSQL."""
    if store_url.startswith(("postgresql://", "postgres://")):
        return PgWakeup(wake_dir(state_dir), store_url, listen=listen)
    return LocalWakeup(wake_dir(state_dir), listen=listen)
