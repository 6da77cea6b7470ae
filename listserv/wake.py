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
from typing import Protocol

__all__ = ["CHANNELS", "LocalWakeup", "Wakeup", "wake_dir"]

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
