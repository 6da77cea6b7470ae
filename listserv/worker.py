"""The workers: the stages after the 250, as loops over the store.

Each stage is one loop: claim work from the store (with a lease), process it,
record what it did (which clears the lease), then wait for a wake-up or the
next due time.  Nothing passes between the stages but rows and wake-ups:

- prepare (``listserv.prepare``): accepted posts and owner mail -> the outbox;
- deliver (``listserv.fanout``): due copies -> the relay;
- requests (``listserv.membership``, ``listserv.digest``,
  ``listserv.bounce_scores``): e-mail commands, digests that are due,
  bounces, held-post notices, and their housekeeping;
- archive (``listserv.archive``): archive rows not yet rendered -> pages.

Prepare and deliver run in every worker, each claiming rows of its own.  The
requests and archive stages run in one worker at a time across every node
(a stage lease, ``Store.claim_stage``): their handlers work on whole lists.

A worker is named (``owner``) by its host, its state directory and its slot,
so a worker restarted in the same slot takes its old leases back at once
(``Store.release_leases``); a worker that never comes back leaves them to run
out after ``[server] lease``.

``Worker`` runs in the serving process (``[server] workers = 0``, the tests'
App) or, with ``python -m listserv.worker``, in a process of its own that the
serving process supervises (``listserv.app.Supervisor``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import logging
import os
import pickle
import signal
import socket
import sys
import time
from collections.abc import Awaitable, Callable

from listserv import dkim
from listserv.archive import Archiver
from listserv.bounce_scores import BounceStage
from listserv.config import Config
from listserv.digest import DigestStage
from listserv.dmarc import TxtResolver
from listserv.fanout import POLL, Fanout
from listserv.membership import MembershipStage
from listserv.postmaster import PostmasterStage
from listserv.prepare import CLAIM, Preparer
from listserv.store import Store, open_store
from listserv.transport import Transport
from listserv.unsubscribe import Tokens
from listserv.wake import Wakeup

__all__ = ["Worker", "connections_for", "main", "worker_name"]

log = logging.getLogger("listserv.worker")

ARCHIVE_CLAIM = 200


def worker_name(config: Config, slot: int) -> str:
    """The name a worker's leases carry: the same for the same slot of the same node after a restart."""
    node = hashlib.sha1(str(config.server.state_dir.resolve()).encode()).hexdigest()[:8]
    return f"{socket.gethostname()}:{node}:w{slot}"


def connections_for(total: int, workers: int, slot: int) -> int:
    """This worker's share of ``[delivery] connections`` (at least one)."""
    if workers <= 1:
        return total
    return max(1, total // workers + (1 if slot < total % workers else 0))


class Worker:
    def __init__(self, config: Config, store: Store, transport: Transport, key: dkim.KeySet, *,
                 tokens: Tokens, wakeup: Wakeup, resolve_txt: TxtResolver | None = None, slot: int = 0,
                 connections: int | None = None) -> None:
        self.config = config
        self.store = store
        self.wakeup = wakeup
        self.owner = worker_name(config, slot)
        self.lease = float(config.server.lease)
        self.clock: Callable[[], float] = time.time
        self.preparer = Preparer(config, store, key, resolve_txt=resolve_txt, tokens=tokens, wakeup=wakeup)
        self.membership = MembershipStage(config, store, key, tokens=tokens)
        self.digests = DigestStage(config, store, key, tokens=tokens, wakeup=wakeup)
        self.bounce_stage = BounceStage(config, store, key)
        self.postmaster = PostmasterStage(config, store, key)
        self.archiver = Archiver(config, store)
        self.fanout = Fanout(config, store, transport, key, tokens=tokens, wakeup=wakeup, owner=self.owner,
                             connections=connections, on_failed=self.bounce_stage.on_delivery_failure)
        self._stopping = False
        self._tasks: list[asyncio.Task[None]] = []
        self._fanout_task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        # Whatever this slot held before a crash is ours again, now, not after the lease.
        released = await self.store.release_leases(self.owner)
        if released:
            log.info("worker %s took back %d leases of its previous run", self.owner, released)
        self._fanout_task = asyncio.create_task(self.fanout.run(), name="deliver")
        self._tasks = [
            asyncio.create_task(self._loop("prepare", self._prepare), name="prepare"),
            asyncio.create_task(self._loop("requests", self._requests), name="requests"),
            asyncio.create_task(self._loop("archive", self._archive), name="archive"),
        ]

    async def _loop(self, channel: str, step: Callable[[], Awaitable[bool]]) -> None:
        """claim -> process -> record, again at once while there is more; else wait."""
        while not self._stopping:
            more = False
            try:
                more = await step()
            except Exception as exc:  # noqa: BLE001 - a stage must survive anything; its leases run out
                log.exception("the %s stage failed; retrying shortly", channel)
                await self.store.record_stage_error(channel, f"the {channel} stage failed: {exc!r}")
            if self._stopping:
                break
            if not more:
                await self.wakeup.wait(channel, POLL)

    async def _prepare(self) -> bool:
        now = self.clock()
        return await self.preparer.run_once(self.owner, now, now + self.lease) >= CLAIM

    async def _requests(self) -> bool:
        now = self.clock()
        if not await self.store.claim_stage("requests", self.owner, now, now + self.lease):
            return False  # another worker runs it
        await self.membership.process()
        await self.digests.process()
        await self.bounce_stage.process()
        await self.postmaster.process()
        return False

    async def _archive(self) -> bool:
        now = self.clock()
        if not await self.store.claim_stage("archive", self.owner, now, now + self.lease):
            return False
        return await self.archiver.catch_up(self.owner, now, now + self.lease, ARCHIVE_CLAIM) >= ARCHIVE_CLAIM

    async def stop(self, grace: float = 30.0) -> None:
        """Finish what is in hand (batches on the wire, the post being prepared), record it, give leases back."""
        self._stopping = True
        for channel in ("prepare", "requests", "archive"):
            self.wakeup.notify(channel)
        await self.fanout.stop(grace)
        if self._fanout_task is not None:
            self._fanout_task.cancel()
            await asyncio.gather(self._fanout_task, return_exceptions=True)
        done, pending = await asyncio.wait(self._tasks, timeout=grace) if self._tasks else (set(), set())
        for task in pending:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.archiver.idle()
        try:
            await self.store.release_leases(self.owner)
        except Exception:  # noqa: BLE001 - they run out by themselves
            log.exception("could not give the leases of %s back", self.owner)


# -- a worker process ------------------------------------------------------------------------------


def _die_with_parent(parent: int) -> None:
    """A worker must not outlive its node's serving process (a SIGKILL of it included)."""
    if sys.platform.startswith("linux"):
        import ctypes

        with contextlib.suppress(Exception):
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    if os.getppid() != parent:  # it died before the prctl
        os._exit(1)


async def _serve(config: Config, slot: int, connections: int) -> None:
    from listserv.dns import DnspythonResolver
    from listserv.transport import make_transport
    from listserv.unsubscribe import load_secret
    from listserv.wake import make_wakeup

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    key = dkim.load_keys(config.dkim, config.server.domain)
    store = await open_store(config.store_target)
    wakeup = make_wakeup(config.server.state_dir, config.store.url)
    await wakeup.start()
    resolver = DnspythonResolver(config.dns.nameservers, timeout=config.dns.timeout)
    transport = make_transport(config.delivery, config.maildir_root, config.server.hostname)
    worker = Worker(config, store, transport, key, tokens=Tokens(load_secret(config.server.state_dir)),
                    wakeup=wakeup, resolve_txt=resolver.txt, slot=slot, connections=connections)
    try:
        await worker.start()
        log.info("worker %s running (pid %d, %d connections)", worker.owner, os.getpid(), worker.fanout.connections)
        await stop.wait()
        await worker.stop()
    finally:
        await wakeup.close()
        await store.close()
    log.info("worker %s stopped", worker.owner)


def main(argv: list[str] | None = None) -> None:
    """``python -m listserv.worker --slot N --connections C --parent PID``, the config pickled on stdin."""
    parser = argparse.ArgumentParser(prog="listserv.worker")
    parser.add_argument("--slot", type=int, required=True)
    parser.add_argument("--connections", type=int, required=True)
    parser.add_argument("--parent", type=int, required=True)
    args = parser.parse_args(argv)
    _die_with_parent(args.parent)
    config: Config = pickle.load(sys.stdin.buffer)  # written by our own supervisor
    from listserv.app import setup_logging

    setup_logging(config.server.log_level)
    asyncio.run(_serve(config, args.slot, args.connections))


if __name__ == "__main__":
    main()
