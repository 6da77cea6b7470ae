"""How copies leave: the ``Transport`` seam, over SMTP to a relay or into Maildirs.

``Transport.send(sender, recipients, data)`` returns the recipients that were
*not* accepted, each with its reply; an empty dict means all were.  It never
raises for network or protocol trouble: ``refusals_for_error`` is the one place
where such exceptions become a temporary 4xx reply for every recipient of the
batch (as Mailman's ``mta/base.py`` does), and the fan-out schedules a retry.
"""

from __future__ import annotations

import asyncio
import base64
import os
import re
import socket
import ssl
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

from listserv.config import DeliveryConfig
from listserv.types import Reply

__all__ = ["MaildirTransport", "SmtpTransport", "Transport", "refusals_for_error"]


class Transport(Protocol):
    async def send(self, sender: str, recipients: Sequence[str], data: bytes) -> dict[str, Reply]: ...

    async def close(self) -> None: ...


class SmtpReplyError(Exception):
    """The relay answered a whole-transaction command (MAIL, DATA, end of data) with an error."""

    def __init__(self, reply: Reply) -> None:
        super().__init__(str(reply))
        self.reply = reply


def refusals_for_error(recipients: Sequence[str], error: BaseException) -> dict[str, Reply]:
    """Map any failure of a whole transaction to one reply per recipient."""
    if isinstance(error, SmtpReplyError):
        reply = error.reply
    elif isinstance(error, (asyncio.TimeoutError, TimeoutError)):
        reply = Reply(451, "4.4.2", f"relay timed out: {error or 'no answer'}")
    elif isinstance(error, ssl.SSLError):
        reply = Reply(454, "4.7.0", f"TLS failure with the relay: {error}")
    elif isinstance(error, (ConnectionError, OSError, asyncio.IncompleteReadError)):
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


_BARE_LF = re.compile(rb"(?<!\r)\n")


def wire_data(data: bytes) -> bytes:
    """The message as DATA sends it: CRLF line ends, dot-stuffed (RFC 5321 §4.5.2), ending CRLF.CRLF."""
    data = _BARE_LF.sub(b"\r\n", data)
    if not data.endswith(b"\r\n"):
        data += b"\r\n"
    data = data.replace(b"\r\n.", b"\r\n..")
    if data.startswith(b"."):
        data = b"." + data
    return data + b".\r\n"


class SmtpConnection:
    """One client connection to the relay: EHLO, optional STARTTLS and AUTH, many transactions.

    Written for the fan-out's hot path: with PIPELINING (RFC 2920) a whole
    transaction costs two round trips (MAIL+RCPTs+DATA, then the body) and
    a handful of writes, whatever the number of recipients.
    """

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, timeout: float) -> None:
        self.reader = reader
        self.writer = writer
        self.timeout = timeout
        self.extensions: set[str] = set()

    @classmethod
    async def open(cls, config: DeliveryConfig, local_hostname: str, password: str | None) -> SmtpConnection:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(config.relay.host, config.relay.port, limit=1 << 20), config.timeout
        )
        conn = cls(reader, writer, config.timeout)
        try:
            greeting = await conn._reply()
            if greeting.code != 220:
                raise SmtpReplyError(greeting)
            await conn._ehlo(local_hostname)
            if config.starttls:
                if "STARTTLS" not in conn.extensions:
                    raise SmtpReplyError(Reply(454, "4.7.0", "the relay does not offer STARTTLS"))
                reply = await conn.command(b"STARTTLS")
                if reply.code != 220:
                    raise SmtpReplyError(reply)
                context = ssl.create_default_context()
                await asyncio.wait_for(
                    writer.start_tls(context, server_hostname=config.relay.host), config.timeout
                )
                await conn._ehlo(local_hostname)  # RFC 3207 §4.2: forget what was learnt before TLS
            if config.username and password is not None:
                token = base64.b64encode(f"\0{config.username}\0{password}".encode()).decode()
                reply = await conn.command(f"AUTH PLAIN {token}".encode())
                if reply.code != 235:
                    raise SmtpReplyError(reply)
        except BaseException:
            conn.abort()
            raise
        return conn

    async def _ehlo(self, local_hostname: str) -> None:
        reply, lines = await self._command_lines(f"EHLO {local_hostname}".encode())
        if reply.code != 250:
            raise SmtpReplyError(reply)
        self.extensions = {line[4:].split(" ", 1)[0].upper() for line in lines[1:]}

    async def _read_reply(self) -> tuple[Reply, list[str]]:
        lines: list[str] = []
        while True:
            # asyncio.timeout, not wait_for: no task is made per reply line.
            async with asyncio.timeout(self.timeout):
                raw = await self.reader.readline()
            if not raw:
                raise ConnectionResetError("the relay closed the connection")
            line = raw.decode("utf-8", "replace").rstrip("\r\n")
            lines.append(line)
            if len(line) < 4 or line[3] != "-":
                break
        try:
            code = int(lines[-1][:3])
        except ValueError:
            raise ConnectionResetError(f"not an SMTP reply: {lines[-1][:80]!r}") from None
        text = " ".join(line[4:] for line in lines)
        return Reply(code, *_split_enhanced(text)), lines

    async def _reply(self) -> Reply:
        return (await self._read_reply())[0]

    async def _command_lines(self, line: bytes) -> tuple[Reply, list[str]]:
        self.writer.write(line + b"\r\n")
        await self.writer.drain()
        return await self._read_reply()

    async def command(self, line: bytes) -> Reply:
        return (await self._command_lines(line))[0]

    async def transaction(self, sender: str, recipients: Sequence[str], wire: bytes) -> dict[str, Reply]:
        """One mail transaction; returns refused recipients.  ``wire`` comes from ``wire_data``."""
        commands = [f"MAIL FROM:<{sender}>".encode()]
        commands += [f"RCPT TO:<{r}>".encode() for r in recipients]
        refused: dict[str, Reply] = {}
        if "PIPELINING" in self.extensions:
            self.writer.write(b"\r\n".join(commands + [b"DATA"]) + b"\r\n")
            await self.writer.drain()
            mail = await self._reply()
            rcpt_replies = [await self._reply() for _ in recipients]
            data_reply = await self._reply()
        else:
            mail = await self.command(commands[0])
            if mail.code != 250:
                raise SmtpReplyError(mail)
            rcpt_replies = [await self.command(c) for c in commands[1:]]
            data_reply = Reply(503, "5.5.1", "no valid recipients")
            if any(r.code in (250, 251) for r in rcpt_replies):
                data_reply = await self.command(b"DATA")
        if mail.code != 250:
            if data_reply.code == 354:  # RFC 2920 §3.1: the server may still have said 354
                self.writer.write(b".\r\n")
                await self._reply()
            await self.rset()
            raise SmtpReplyError(mail)
        for rcpt, reply in zip(recipients, rcpt_replies):
            if reply.code not in (250, 251):
                refused[rcpt] = reply
        if data_reply.code != 354:
            if len(refused) == len(recipients):
                await self.rset()
                return refused
            await self.rset()
            raise SmtpReplyError(data_reply)
        if len(refused) == len(recipients):
            # Pipelined DATA was accepted with no recipient: send an empty
            # body to close it (RFC 2920 §3.1); nothing is delivered.
            self.writer.write(b".\r\n")
            await self.writer.drain()
            await self._reply()
            return refused
        self.writer.write(wire)
        await self.writer.drain()
        final = await self._reply()
        if final.code != 250:
            for rcpt in recipients:
                refused.setdefault(rcpt, final)
        return refused

    async def rset(self) -> None:
        reply = await self.command(b"RSET")
        if reply.code != 250:
            raise SmtpReplyError(reply)

    async def quit(self) -> None:
        try:
            await asyncio.wait_for(self.command(b"QUIT"), 5)
        finally:
            self.abort()

    def abort(self) -> None:
        self.writer.close()


class SmtpTransport:
    """Hands copies to the relay over a small pool of reused connections."""

    def __init__(self, config: DeliveryConfig, local_hostname: str) -> None:
        self.config = config
        self.local_hostname = local_hostname
        self._idle: list[SmtpConnection] = []
        self._slots = asyncio.Semaphore(config.connections)
        self._password: str | None = None
        if config.password_file is not None:
            self._password = config.password_file.read_text(encoding="utf-8").strip()

    async def send(self, sender: str, recipients: Sequence[str], data: bytes) -> dict[str, Reply]:
        return await self.send_wire(sender, recipients, wire_data(data))

    async def send_wire(self, sender: str, recipients: Sequence[str], wire: bytes) -> dict[str, Reply]:
        """As send, with the data already prepared by ``wire_data`` (done once per message)."""
        async with self._slots:
            conn = self._idle.pop() if self._idle else None
            try:
                if conn is None:
                    conn = await SmtpConnection.open(self.config, self.local_hostname, self._password)
                refused = await conn.transaction(sender, recipients, wire)
            except SmtpReplyError as exc:
                # The connection is still in step with the relay (we read
                # every reply); keep it unless the relay is going away.
                if conn is not None and exc.reply.code != 421 and not conn.writer.is_closing():
                    self._idle.append(conn)
                elif conn is not None:
                    conn.abort()
                return refusals_for_error(recipients, exc)
            except Exception as exc:  # noqa: BLE001 - converted to per-recipient replies
                if conn is not None:
                    conn.abort()
                return refusals_for_error(recipients, exc)
            self._idle.append(conn)
            return refused

    async def close(self) -> None:
        idle, self._idle = self._idle, []
        for conn in idle:
            try:
                await conn.quit()
            except Exception:  # noqa: BLE001 - closing anyway
                conn.abort()


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
