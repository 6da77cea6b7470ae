"""How copies leave: the ``Transport`` seam, over SMTP to a relay or into Maildirs.

``Transport.send(sender, recipients, data)`` returns the recipients that were
*not* accepted, each with its reply; an empty dict means all were.  It never
raises for network or protocol trouble: ``refusals_for_error`` is the one place
where such exceptions become a temporary 4xx reply for every recipient of the
batch (as Mailman's ``mta/base.py`` does), and the fan-out schedules a retry.
"""

from __future__ import annotations

import asyncio
import os
import re
import socket
import ssl
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

import aiosmtplib

from listserv.config import DeliveryConfig
from listserv.types import Reply

__all__ = ["MaildirTransport", "SmtpTransport", "Transport", "refusals_for_error"]


class Transport(Protocol):
    async def send(self, sender: str, recipients: Sequence[str], data: bytes) -> dict[str, Reply]: ...

    async def close(self) -> None: ...


def refusals_for_error(recipients: Sequence[str], error: BaseException) -> dict[str, Reply]:
    """Map any failure of a whole transaction to one reply per recipient."""
    if isinstance(error, aiosmtplib.SMTPResponseException) and error.code >= 400:
        code = error.code
        enhanced, text = _split_enhanced(error.message)
        if isinstance(error, aiosmtplib.SMTPSenderRefused):
            text = f"sender refused: {text}"
        return {r: Reply(code, enhanced, text) for r in recipients}
    if isinstance(error, (aiosmtplib.SMTPTimeoutError, asyncio.TimeoutError, TimeoutError)):
        reply = Reply(451, "4.4.2", f"relay timed out: {error}")
    elif isinstance(error, ssl.SSLError):
        reply = Reply(454, "4.7.0", f"TLS failure with the relay: {error}")
    elif isinstance(error, (aiosmtplib.SMTPConnectError, aiosmtplib.SMTPServerDisconnected, OSError)):
        reply = Reply(451, "4.4.1", f"relay unreachable: {error}")
    else:
        reply = Reply(451, "4.3.0", f"delivery error: {type(error).__name__}: {error}")
    return {r: reply for r in recipients}


_ENHANCED = re.compile(r"^([245]\.\d{1,3}\.\d{1,3})\s+")


def _split_enhanced(message: str) -> tuple[str, str]:
    m = _ENHANCED.match(message)
    if m:
        return m.group(1), message[m.end():]
    return "", message


class SmtpTransport:
    """Hands copies to the relay over a small pool of reused SMTP connections."""

    def __init__(self, config: DeliveryConfig, local_hostname: str) -> None:
        self.config = config
        self.local_hostname = local_hostname
        self._idle: list[aiosmtplib.SMTP] = []
        self._slots = asyncio.Semaphore(config.connections)
        self._password: str | None = None
        if config.password_file is not None:
            self._password = config.password_file.read_text(encoding="utf-8").strip()

    async def _connect(self) -> aiosmtplib.SMTP:
        client = aiosmtplib.SMTP(
            hostname=self.config.relay.host,
            port=self.config.relay.port,
            local_hostname=self.local_hostname,
            timeout=self.config.timeout,
            start_tls=self.config.starttls,
            use_tls=False,
        )
        await client.connect()
        if self.config.username and self._password is not None:
            await client.login(self.config.username, self._password)
        return client

    async def send(self, sender: str, recipients: Sequence[str], data: bytes) -> dict[str, Reply]:
        async with self._slots:
            client: aiosmtplib.SMTP | None = self._idle.pop() if self._idle else None
            try:
                if client is None or not client.is_connected:
                    client = await self._connect()
                errors, _ = await client.sendmail(sender, list(recipients), data)
            except aiosmtplib.SMTPRecipientsRefused as exc:
                # Every recipient refused: the connection itself is still fine.
                refused = {
                    e.recipient: Reply(e.code, *_split_enhanced(e.message)) for e in exc.recipients
                }
                await _reset(client)
                if client is not None and client.is_connected:
                    self._idle.append(client)
                return refused
            except Exception as exc:  # noqa: BLE001 - converted to per-recipient replies
                await _close(client)
                return refusals_for_error(recipients, exc)
            self._idle.append(client)
            return {rcpt: Reply(resp.code, *_split_enhanced(resp.message)) for rcpt, resp in errors.items()}

    async def close(self) -> None:
        idle, self._idle = self._idle, []
        for client in idle:
            try:
                await asyncio.wait_for(client.quit(), 5)
            except Exception:  # noqa: BLE001 - closing anyway
                client.close()


async def _reset(client: aiosmtplib.SMTP | None) -> None:
    if client is not None and client.is_connected:
        try:
            await client.rset()
        except Exception:  # noqa: BLE001
            client.close()


async def _close(client: aiosmtplib.SMTP | None) -> None:
    if client is not None:
        try:
            client.close()
        except Exception:  # noqa: BLE001  pragma: no cover
            pass


_UNSAFE = re.compile(r"[^a-z0-9@._+=-]")


class MaildirTransport:
    """Writes each copy into <root>/<recipient>/new, the Maildir way (tmp, fsync, rename)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._counter = 0

    def _deliver(self, recipient: str, data: bytes, sender: str) -> None:
        folder = self.root / (_UNSAFE.sub("_", recipient.lower()).lstrip(".") or "_")
        for sub in ("tmp", "new", "cur"):
            (folder / sub).mkdir(parents=True, exist_ok=True)
        self._counter += 1
        name = f"{time.time_ns()}.P{os.getpid()}Q{self._counter}.{socket.gethostname()}"
        tmp = folder / "tmp" / name
        # What a local delivery agent adds (RFC 5321 §4.4 Return-Path), so the
        # Maildir copy shows the envelope as a mailbox would.
        trace = f"Return-Path: <{sender}>\nDelivered-To: {recipient}\n".encode("utf-8", "replace")
        with open(tmp, "wb") as fh:
            fh.write(trace + data.replace(b"\r\n", b"\n"))
            fh.flush()
            os.fsync(fh.fileno())
        os.rename(tmp, folder / "new" / name)

    def _deliver_all(self, sender: str, recipients: Sequence[str], data: bytes) -> dict[str, Reply]:
        refused = {}
        for rcpt in recipients:
            try:
                self._deliver(rcpt, data, sender)
            except OSError as exc:
                refused[rcpt] = Reply(451, "4.3.0", f"cannot write Maildir: {exc.strerror}")
        return refused

    async def send(self, sender: str, recipients: Sequence[str], data: bytes) -> dict[str, Reply]:
        return await asyncio.to_thread(self._deliver_all, sender, recipients, data)

    async def close(self) -> None:
        return None


def make_transport(config: DeliveryConfig, maildir_root: Path, local_hostname: str) -> Transport:
    if config.mode == "maildir":
        return MaildirTransport(maildir_root)
    return SmtpTransport(config, local_hostname)
