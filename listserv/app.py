"""The composition root: load the pieces, start receiving and the workers, stop cleanly.

``App`` is one serving process: config -> store -> SMTP listener (the receive
stage), and, with ``work=True``, a ``Worker`` running every later stage in the
same process (``[server] workers = 0``; what the tests start on 127.0.0.1:0).
``Supervisor`` runs ``[server] workers`` worker processes
(``python -m listserv.worker``) and starts again one that dies.  ``run`` is
``listserv serve``: the receiver here and the workers beside it, or one half
with ``--only receive|work``.

SIGTERM (or SIGINT) stops accepting connections, lets SMTP transactions in
progress finish, lets batches on the wire finish, and closes the database;
everything not yet delivered stays queued for the next start.
"""

from __future__ import annotations

import asyncio
import logging
import os
import pickle
import signal
import subprocess
import sys
import time
import weakref

from aiosmtpd.smtp import SMTP

from listserv import dkim, files
from listserv.config import Config
from listserv.dns import DnspythonResolver, Resolver
from listserv.archive import Archiver
from listserv.bounce_scores import BounceStage
from listserv.fanout import Fanout
from listserv.membership import MembershipStage
from listserv.smtp_in import ListHandler, server_factory
from listserv.seeding import seed_lists
from listserv.store import Store, open_store
from listserv.transport import Transport, make_transport
from listserv.digest import DigestStage
from listserv.unsubscribe import Tokens, UnsubscribeListener, load_secret
from listserv.wake import LocalWakeup, make_wakeup
from listserv.worker import Worker, connections_for

__all__ = ["App", "Supervisor", "run", "setup_logging", "load_or_create_key", "seed_lists"]

log = logging.getLogger("listserv.app")


def setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper()),
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
    )
    # aiosmtpd logs every command at INFO; our own lines tell each message's story.
    logging.getLogger("mail.log").setLevel(logging.WARNING)


def load_or_create_key(config: Config) -> dkim.KeySet:
    """The signing keys: the RSA key (generated, with a warning, if missing) and the
    Ed25519 one when configured (never generated: a configured path that does not
    exist is a mistake to report, not to paper over).  A key that cannot be read or
    made is a ``DkimKeyError`` naming its setting."""
    path = config.dkim.private_key
    try:
        if not path.exists():
            dkim.generate_key(path)
            key = dkim.DkimKey.load(path, domain=config.server.domain, selector=config.dkim.selector)
            log.warning(
                "no DKIM key at %s: generated one; publish this DNS record:\n%s",
                path, dkim.dns_txt_record(key.private_key, config.dkim.selector, config.server.domain),
            )
        return dkim.load_keys(config.dkim, config.server.domain)
    except (dkim.DkimKeyError, OSError) as exc:
        ed = config.dkim.ed25519_private_key
        setting = "[dkim] ed25519_private_key" if ed is not None and str(ed) in str(exc) else "[dkim] private_key"
        text = str(exc) if isinstance(exc, dkim.DkimKeyError) else f"cannot make the DKIM key {path}: {exc.strerror}"
        raise dkim.DkimKeyError(f"{text} ({setting})") from None


class App:
    """One serving process: the receiver, and (``work=True``) every other stage in-process."""

    def __init__(
        self,
        config: Config,
        *,
        transport: Transport | None = None,
        resolver: Resolver | None = None,
        retry_initial: float = 60.0,
        work: bool = True,
        receive: bool = True,
    ) -> None:
        self.config = config
        self._transport = transport
        self._resolver = resolver
        self._retry_initial = retry_initial
        self.work = work
        self.receive = receive
        self.store: Store | None = None
        self.worker: Worker | None = None
        self.handler: ListHandler | None = None
        self.port = 0
        self.web: UnsubscribeListener | None = None
        self.wakeup: LocalWakeup | None = None
        self._server: asyncio.base_events.Server | None = None
        self._sessions: weakref.WeakSet[SMTP] = weakref.WeakSet()
        self._stopped = asyncio.Event()
        self._started = False

    # The stages of the in-process worker, as the tests reach them.
    @property
    def fanout(self) -> Fanout:
        assert self.worker is not None, "no worker in this process"
        return self.worker.fanout

    @property
    def membership(self) -> MembershipStage:
        assert self.worker is not None, "no worker in this process"
        return self.worker.membership

    @property
    def digests(self) -> DigestStage:
        assert self.worker is not None, "no worker in this process"
        return self.worker.digests

    @property
    def bounce_stage(self) -> BounceStage:
        assert self.worker is not None, "no worker in this process"
        return self.worker.bounce_stage

    @property
    def archiver(self) -> Archiver:
        assert self.worker is not None, "no worker in this process"
        return self.worker.archiver

    async def start(self) -> None:
        config = self.config
        files.private_dir(config.server.state_dir)  # 0700; a ConfigError naming [server] state_dir
        key = load_or_create_key(config)
        self.store = store = await open_store(config.store_target)
        for problem in files.tighten(config):  # 0700/0600 whatever an older start or the umask left
            log.warning("file mode: %s (see `listserv doctor`)", problem)
        await seed_lists(store, config)
        # One resolver for every DNS question (RFC 7489 policies, SPF, DKIM
        # keys); tests inject an in-memory one.
        resolver = self._resolver or DnspythonResolver(config.dns.nameservers, timeout=config.dns.timeout)
        self.tokens = Tokens(load_secret(config.server.state_dir))
        # A receiver alone only tells the workers; a process with a worker listens too.
        self.wakeup = wakeup = make_wakeup(config.server.state_dir, config.store.url, listen=self.work)
        await wakeup.start()
        self._started = True
        if self.work:
            transport = self._transport or make_transport(config.delivery, config.maildir_root,
                                                          config.server.hostname)
            self.worker = Worker(config, store, transport, key, tokens=self.tokens, wakeup=wakeup,
                                 resolve_txt=resolver.txt)
            self.worker.fanout.retry_initial = self._retry_initial
            await self.worker.start()
        if not self.receive:
            return
        if config.web.listen is not None:
            # The confirmation links' page confirms through the same code as a reply by mail.
            self.web = UnsubscribeListener(config, store, self.tokens,
                                           MembershipStage(config, store, key, tokens=self.tokens))
            await self.web.start()
            log.info("one-click unsubscribe listener on %s:%d", config.web.listen.host, self.web.port)

        def stored() -> None:
            # Committed: the stages find it in the store; this only saves them a poll.
            wakeup.notify("prepare")
            wakeup.notify("requests")

        self.handler = ListHandler(config, store, on_stored=stored, resolver=resolver)
        make = server_factory(config, self.handler)

        def factory() -> SMTP:
            session = make()
            self._sessions.add(session)
            return session

        loop = asyncio.get_running_loop()
        try:
            self._server = await loop.create_server(factory, host=config.server.listen.host,
                                                    port=config.server.listen.port)
        except OSError as exc:
            raise files.listen_error(config.server.listen, "[server] listen", exc) from None
        self.port = self._server.sockets[0].getsockname()[1]
        log.info("listening on %s:%d (%s) for %s; delivery: %s", config.server.listen.host, self.port,
                 config.server.protocol.upper(), config.server.domain,
                 config.delivery.mode if config.delivery.mode == "maildir" else f"smtp via {config.delivery.relay}")

    async def stop(self, grace: float = 30.0) -> None:
        if not self._started:
            return
        self._started = False
        assert self.store is not None
        if self._server is not None:
            server, self._server = self._server, None
            server.close()  # no new connections
            if self.web is not None:
                await self.web.stop()
            assert self.handler is not None
            try:  # transactions in DATA get their answer (and their commit)
                await asyncio.wait_for(self.handler.idle.wait(), grace)
            except TimeoutError:
                log.warning("stopping with SMTP transactions still open; their senders will retry")
            for session in list(self._sessions):
                if session.transport is not None:
                    session.transport.close()
            self.handler.receiving.close()  # the process pool for big messages
        if self.worker is not None:
            await self.worker.stop(grace)
        if self.wakeup is not None:
            await self.wakeup.close()
        await self.store.close()
        self._stopped.set()
        log.info("stopped")

    async def _abandon_start(self) -> None:
        """Release what a failed ``start`` opened, so ``serve`` exits at once."""
        if self.web is not None:
            await self.web.stop()
        if self.worker is not None:
            await self.worker.stop(1.0)
        if self.wakeup is not None:
            await self.wakeup.close()
        if self.handler is not None:
            self.handler.receiving.close()
        if self.store is not None:
            await self.store.close()

    async def run_until_signalled(self, supervisor: Supervisor | None = None) -> None:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        try:
            await self.start()
        except BaseException:
            await self._abandon_start()  # aiosqlite's threads would keep the process alive
            raise
        if supervisor is not None:
            supervisor.start()
        watch = asyncio.create_task(supervisor.watch(stop)) if supervisor is not None else None
        await stop.wait()
        log.info("signal received: stopping")
        if watch is not None:
            watch.cancel()
            await asyncio.gather(watch, return_exceptions=True)
        stopping = [self.stop()]
        if supervisor is not None:
            stopping.append(supervisor.stop())
        await asyncio.gather(*stopping)


RESTART_BACKOFF_MAX = 30.0


class Supervisor:
    """``[server] workers`` worker processes, each started again when it dies.

    Each child is ``python -m listserv.worker`` with the config on its stdin;
    it dies with this process (PR_SET_PDEATHSIG), so a SIGKILL of the server
    takes its workers along instead of leaving them running unsupervised.
    """

    def __init__(self, config: Config, count: int) -> None:
        self.config = config
        self.count = count
        self.procs: list[subprocess.Popen[bytes] | None] = [None] * count
        self._started_at = [0.0] * count
        self._failures = [0] * count
        self._next_start = [0.0] * count
        self._stopping = False

    def start(self) -> None:
        for slot in range(self.count):
            self._spawn(slot)

    def _spawn(self, slot: int) -> None:
        connections = connections_for(self.config.delivery.connections, self.count, slot)
        proc = subprocess.Popen(
            [sys.executable, "-m", "listserv.worker", "--slot", str(slot + 1), "--connections", str(connections),
             "--parent", str(os.getpid())],
            stdin=subprocess.PIPE,
        )
        assert proc.stdin is not None
        proc.stdin.write(pickle.dumps(self.config))
        proc.stdin.close()
        self.procs[slot] = proc
        self._started_at[slot] = time.monotonic()
        log.info("worker %d started (pid %d)", slot + 1, proc.pid)

    async def watch(self, stop: asyncio.Event) -> None:
        """Start again each worker that died; one that keeps dying at once waits longer each time."""
        while not self._stopping:
            now = time.monotonic()
            for slot, proc in enumerate(self.procs):
                if proc is None or proc.poll() is None:
                    continue
                if self._next_start[slot] == 0.0:
                    quick = now - self._started_at[slot] < 10
                    self._failures[slot] = self._failures[slot] + 1 if quick else 0
                    delay = min(RESTART_BACKOFF_MAX, 0.5 * 2 ** self._failures[slot]) if quick else 0.0
                    self._next_start[slot] = now + delay
                    log.warning("worker %d (pid %d) exited with %s; starting it again in %.1f s",
                                slot + 1, proc.pid, proc.returncode, delay)
                if now >= self._next_start[slot]:
                    self._next_start[slot] = 0.0
                    self._spawn(slot)
            await asyncio.sleep(0.2)

    async def stop(self, grace: float = 30.0) -> None:
        """SIGTERM to every worker; each finishes what is on the wire and exits; SIGKILL after grace."""
        self._stopping = True
        alive = [p for p in self.procs if p is not None and p.poll() is None]
        for proc in alive:
            proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + grace + 5
        while any(p.poll() is None for p in alive) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        for proc in alive:
            if proc.poll() is None:
                log.warning("worker pid %d did not stop in time: killed", proc.pid)
                proc.kill()
                proc.wait()


async def _work_only(config: Config) -> None:
    app = App(config, receive=False, work=config.server.workers == 0)
    supervisor = Supervisor(config, config.server.workers) if config.server.workers else None
    await app.run_until_signalled(supervisor)


def run(config: Config, only: str | None = None) -> None:
    """``listserv serve``: everything on this node, or only the receiver or only the workers."""
    setup_logging(config.server.log_level)
    workers = config.server.workers
    if only == "work":
        asyncio.run(_work_only(config))
        return
    in_process = only is None and workers == 0
    supervisor = Supervisor(config, workers) if only is None and workers else None
    asyncio.run(App(config, work=in_process).run_until_signalled(supervisor))
