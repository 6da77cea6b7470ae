"""The composition root: load the pieces, start receiving and delivering, stop cleanly.

``App`` wires config -> store -> transport -> fan-out -> SMTP listener.  It is
what ``listserv serve`` runs and what the tests start on 127.0.0.1:0.
SIGTERM (or SIGINT) stops accepting connections, lets SMTP transactions in
progress finish, lets batches on the wire finish, and closes the database;
everything not yet delivered stays queued for the next start.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import weakref
from typing import Any

from aiosmtpd.smtp import SMTP

from listserv import dkim, files
from listserv.config import Config
from listserv.dns import DnspythonResolver, Resolver
from listserv.errors import DuplicateError
from listserv.archive import Archiver
from listserv.bounce_scores import BounceStage
from listserv.fanout import Fanout
from listserv.membership import MembershipStage
from listserv.postmaster import PostmasterStage
from listserv.smtp_in import ListHandler, server_factory
from listserv.store import Store
from listserv.transport import Transport, make_transport
from listserv.unsubscribe import Tokens, UnsubscribeListener, load_secret

__all__ = ["App", "run", "setup_logging", "load_or_create_key", "seed_lists"]

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


async def seed_lists(store: Store, config: Config) -> None:
    """Create the lists named in the config that were never created before.

    A seeded list that the administrator removed stays removed.
    """
    existing = await store.list_names() | await store.seeded_names()
    for seed in config.lists:
        if seed.name in existing:
            continue
        settings: dict[str, Any] = {"language": seed.language}
        if seed.title:
            settings["title"] = seed.title
        if seed.description:
            settings["description"] = seed.description
        try:
            await store.create_list(seed.name, settings, seed.owners, seeded=True)
            log.info("created list %s from the config", seed.name)
        except DuplicateError:  # created by a CLI at the same moment
            pass


class App:
    def __init__(
        self,
        config: Config,
        *,
        transport: Transport | None = None,
        resolver: Resolver | None = None,
        retry_initial: float = 60.0,
    ) -> None:
        self.config = config
        self._transport = transport
        self._resolver = resolver
        self._retry_initial = retry_initial
        self.store: Store | None = None
        self.fanout: Fanout | None = None
        self.handler: ListHandler | None = None
        self.port = 0
        self.web: UnsubscribeListener | None = None
        self._server: asyncio.base_events.Server | None = None
        self._fanout_task: asyncio.Task[None] | None = None
        self._sessions: weakref.WeakSet[SMTP] = weakref.WeakSet()
        self._stopped = asyncio.Event()

    async def start(self) -> None:
        config = self.config
        files.private_dir(config.server.state_dir)  # 0700; a ConfigError naming [server] state_dir
        key = load_or_create_key(config)
        self.store = store = await Store.open(config.db_path)
        for problem in files.tighten(config):  # 0700/0600 whatever an older start or the umask left
            log.warning("file mode: %s (see `listserv doctor`)", problem)
        await seed_lists(store, config)
        transport = self._transport or make_transport(config.delivery, config.maildir_root, config.server.hostname)
        # One resolver for every DNS question (RFC 7489 policies, SPF, DKIM
        # keys); tests inject an in-memory one.
        resolver = self._resolver or DnspythonResolver(config.dns.nameservers, timeout=config.dns.timeout)
        resolve = resolver.txt
        self.tokens = Tokens(load_secret(config.server.state_dir))
        self.membership = MembershipStage(config, store, key, tokens=self.tokens)
        self.archiver = Archiver(config, store)
        self.bounce_stage = BounceStage(config, store, key)
        self.fanout = Fanout(config, store, transport, key, resolve, retry_initial=self._retry_initial,
                             stages=(self.membership.process, self.bounce_stage.process,
                                     PostmasterStage(config, store, key).process),
                             on_archived=self.archiver.on_archived, tokens=self.tokens,
                             on_failed=self.bounce_stage.on_delivery_failure)
        if config.web.listen is not None:
            self.web = UnsubscribeListener(config, store, self.tokens)
            await self.web.start()
            log.info("one-click unsubscribe listener on %s:%d", config.web.listen.host, self.web.port)
        self.handler = ListHandler(config, store, on_stored=self.fanout.wake, resolver=resolver)
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
        self._fanout_task = asyncio.create_task(self.fanout.run(), name="fanout")
        log.info("listening on %s:%d (%s) for %s; delivery: %s", config.server.listen.host, self.port,
                 config.server.protocol.upper(), config.server.domain,
                 config.delivery.mode if config.delivery.mode == "maildir" else f"smtp via {config.delivery.relay}")

    async def stop(self, grace: float = 30.0) -> None:
        if self._server is None:
            return
        server, self._server = self._server, None
        server.close()  # no new connections
        if self.web is not None:
            await self.web.stop()
        assert self.handler is not None and self.fanout is not None and self.store is not None
        try:  # transactions in DATA get their answer (and their commit)
            await asyncio.wait_for(self.handler.idle.wait(), grace)
        except TimeoutError:
            log.warning("stopping with SMTP transactions still open; their senders will retry")
        for session in list(self._sessions):
            if session.transport is not None:
                session.transport.close()
        self.handler.receiving.close()
        await self.fanout.stop(grace)
        if self._fanout_task is not None:
            self._fanout_task.cancel()
            await asyncio.gather(self._fanout_task, return_exceptions=True)
        await self.archiver.idle()  # pages of posts already queued get written
        await self.store.close()
        self._stopped.set()
        log.info("stopped")

    async def _abandon_start(self) -> None:
        """Release what a failed ``start`` opened, so ``serve`` exits at once."""
        if self.web is not None:
            await self.web.stop()
        if self.store is not None:
            await self.store.close()

    async def run_until_signalled(self) -> None:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        try:
            await self.start()
        except BaseException:
            await self._abandon_start()  # aiosqlite's threads would keep the process alive
            raise
        await stop.wait()
        log.info("signal received: stopping")
        await self.stop()


def run(config: Config) -> None:
    setup_logging(config.server.log_level)
    asyncio.run(App(config).run_until_signalled())
