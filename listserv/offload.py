"""The CPU work of receiving, kept off the event loop that serves the SMTP connections.

Parsing the header section, the MIME walk for attachment types, and sender
authentication (DKIM hashing and RSA, ARC, SPF and DMARC) all need the whole
message and cost CPU in proportion to it.  On the event loop a 2 MB folded
header stalled every other connection for seconds (issue 12).  ``Receiving``
runs that work in worker processes (threads would not help: the GIL), and on
the loop only for messages below ``[server] offload_threshold``, where the
round trip to a worker costs more than the work itself (the README has the
figures).  The header limits of the DATA reader (``max_header_size``,
``max_header_fields``) bound what the inline path can be given.

The workers are started lazily, with ``forkserver`` (never ``fork`` from a
process that runs threads).  Each gets its own copy of the resolver: the real
one is rebuilt there from ``[dns]``; an injected one (tests) is pickled.  A
worker that dies fails the message in progress, which the receiver answers
``451`` (the sender retries); the next message gets a fresh pool.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import multiprocessing
import os
import pickle
import time
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from typing import Any

from listserv import message as msg
from listserv.auth import AuthResult, client_from_trusted_received, strip_our_auth_results, verify_inbound
from listserv.dns import DnspythonResolver, Resolver
from listserv.rewrite import attachment_types

__all__ = ["AuthRequest", "Checked", "Receiving", "authenticate", "check"]

log = logging.getLogger("listserv.offload")


@dataclass(frozen=True, slots=True)
class AuthRequest:
    """What sender authentication needs besides the message (all of it picklable)."""

    mail_from: str
    client_ip: str
    helo: str
    trusted: bool  # the client is one of [server] trusted_relays: look past it
    trusted_relays: tuple[str, ...]
    authserv_id: str
    timeout: float


@dataclass(frozen=True, slots=True)
class Checked:
    """The result of the second step: attachment types and auth, and the bytes to store."""

    attachment_types: tuple[str, ...] | None  # None: not asked for
    auth: AuthResult | None
    body: bytes  # the message with our Authentication-Results in front (or as it came)


async def authenticate(raw: bytes, req: AuthRequest, resolver: Resolver) -> tuple[AuthResult, bytes]:
    client_ip, helo = req.client_ip, req.helo
    if req.trusted:
        # Postfix in front of us: SPF is about the client it talked to.
        found = client_from_trusted_received(raw, req.trusted_relays)
        client_ip, helo = found if found is not None else ("", "")
    result = await verify_inbound(raw, mail_from=req.mail_from, client_ip=client_ip, helo=helo,
                                  resolver=resolver, timeout=req.timeout)
    # RFC 8601 §5: results claiming our authserv-id are ours to write; any
    # that arrive with the message are forged.
    body = result.header_field(req.authserv_id) + strip_our_auth_results(raw, req.authserv_id)
    return result, body


async def check(raw: bytes, *, attachments: bool, auth: AuthRequest | None, resolver: Resolver | None) -> Checked:
    types = attachment_types(raw) if attachments else None
    if auth is None or resolver is None:
        return Checked(types, None, raw)
    result, body = await authenticate(raw, auth, resolver)
    return Checked(types, result, body)


# -- inside a worker process -----------------------------------------------------------

_worker_resolver: Resolver | None = None


def _init_worker(resolver_spec: Any, owner: int | None = None) -> None:
    global _worker_resolver
    if owner is not None:
        _exit_with(owner)
    if isinstance(resolver_spec, tuple) and resolver_spec and resolver_spec[0] == "dnspython":
        _worker_resolver = DnspythonResolver(resolver_spec[1], timeout=resolver_spec[2])
    else:
        _worker_resolver = resolver_spec


def _exit_with(owner: int) -> None:
    """End this worker when the serving process that owns the pool ends, a SIGKILL included.

    A pool worker's parent is the forkserver, not the serving process, so
    PR_SET_PDEATHSIG cannot tell it; and it holds the forkserver's "alive"
    pipe, so while it lives the forkserver (and the resource tracker) live
    on too: orphans that pile up with every kill.  A pidfd becomes readable
    when the owner ends, zombie or not.
    """
    import select
    import threading

    try:
        pidfd = os.pidfd_open(owner)
    except (AttributeError, OSError):  # not Linux >= 5.3, or the owner is gone already
        pidfd = -1
        try:
            os.kill(owner, 0)
        except ProcessLookupError:
            os._exit(0)

    def watch() -> None:
        while True:
            if pidfd >= 0:
                select.select([pidfd], [], [])
                os._exit(0)
            time.sleep(1)
            try:
                os.kill(owner, 0)
            except ProcessLookupError:
                os._exit(0)

    threading.Thread(target=watch, name="exit-with-owner", daemon=True).start()


def _parse_in_worker(raw: bytes) -> msg.ParsedMessage:
    return msg.parse(raw, attachments=False)


def _check_in_worker(raw: bytes, attachments: bool, auth: AuthRequest | None) -> Checked:
    return asyncio.run(check(raw, attachments=attachments, auth=auth, resolver=_worker_resolver))


# -- in the server -----------------------------------------------------------------------


class Receiving:
    """Parse and check messages: small ones here, the rest in ``workers`` processes."""

    def __init__(self, resolver: Resolver | None, *, workers: int, threshold: int,
                 nameservers: tuple[str, ...] = (), job_timeout: float = 120.0) -> None:
        self.resolver = resolver
        self.threshold = threshold
        self.job_timeout = job_timeout
        self.workers = workers
        self._spec: Any = None
        if isinstance(resolver, DnspythonResolver):
            # Its cache holds locks: rebuilt in the worker from the same settings.
            self._spec = ("dnspython", nameservers, resolver.timeout)
        elif resolver is not None:
            try:
                pickle.dumps(resolver)
                self._spec = resolver
            except Exception as exc:  # noqa: BLE001 - any object can be injected
                log.warning("the resolver cannot be copied to worker processes (%r): every message is"
                            " checked on the event loop", exc)
                self.workers = 0
        self._pool: concurrent.futures.ProcessPoolExecutor | None = None

    def offloaded(self, size: int) -> bool:
        return self.workers > 0 and size >= self.threshold

    def _executor(self) -> concurrent.futures.ProcessPoolExecutor:
        if self._pool is None:
            ctx = multiprocessing.get_context("forkserver")
            ctx.set_forkserver_preload(["listserv.offload"])
            self._pool = concurrent.futures.ProcessPoolExecutor(
                max_workers=self.workers, mp_context=ctx, initializer=_init_worker, initargs=(self._spec, os.getpid()))
        return self._pool

    async def _run(self, fn: Any, *args: Any) -> Any:
        pool = self._executor()
        try:
            return await asyncio.wait_for(asyncio.wrap_future(pool.submit(fn, *args)), self.job_timeout)
        except (BrokenProcessPool, TimeoutError):
            # A worker died (or hangs): this message gets its 451; the next a new pool.
            if self._pool is pool:
                self._pool = None
                pool.shutdown(wait=False, cancel_futures=True)
                _kill(pool)
            raise

    async def parse(self, raw: bytes) -> msg.ParsedMessage:
        if not self.offloaded(len(raw)):
            return msg.parse(raw, attachments=False)
        result: msg.ParsedMessage = await self._run(_parse_in_worker, raw)
        return result

    async def check(self, raw: bytes, *, attachments: bool, auth: AuthRequest | None) -> Checked:
        if not attachments and (auth is None or self.resolver is None):
            return Checked(None, None, raw)
        if not self.offloaded(len(raw)):
            return await check(raw, attachments=attachments, auth=auth, resolver=self.resolver)
        result: Checked = await self._run(_check_in_worker, raw, attachments, auth)
        return result

    def close(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)


def _kill(pool: concurrent.futures.ProcessPoolExecutor) -> None:
    for proc in list(getattr(pool, "_processes", {}).values()):
        try:
            proc.kill()
        except Exception:  # noqa: BLE001 - already gone
            pass
