"""The workers: wake-ups between processes, the archive catching up from the store, and a node split in two.

`listserv serve --only receive` and `listserv serve --only work` run as two real
processes on one state directory; the relay is an aiosmtpd sink in this process.
"""

from __future__ import annotations

import asyncio
import smtplib
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from aiosmtpd.controller import Controller

from conftest import DOMAIN, SinkHandler, free_port, make_config
from listserv import config as config_mod
from listserv.errors import ConfigError
from listserv.rewrite import message_id_hash
from listserv.store import ArchiveEntry, open_store
from listserv.wake import LocalWakeup, wake_dir
from listserv.worker import connections_for
from test_crash import child_env, cli, wait_until, write_config

LIST = "energia-gmin"
POSTER = "jadwiga.nowak@gmina17.example.pl"


# -- wake-ups ------------------------------------------------------------------------------------------


async def test_a_wakeup_reaches_every_listening_process_and_stale_sockets_go(tmp_path: Path) -> None:
    directory = wake_dir(tmp_path / "state")
    worker_a, worker_b = LocalWakeup(directory), LocalWakeup(directory)
    receiver = LocalWakeup(directory, listen=False)
    for w in (worker_a, worker_b, receiver):
        await w.start()
    # A process that died with its socket still there.
    dead = directory / "99999-dead.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(dead))
    sock.close()
    try:
        assert not await worker_a.wait("prepare", 0)
        receiver.notify("prepare")
        assert await worker_a.wait("prepare", 5)
        assert await worker_b.wait("prepare", 5)
        assert not await worker_b.wait("deliver", 0)  # other channels untouched
        assert not await worker_a.wait("prepare", 0)  # one wake-up, taken once
        worker_a.notify("deliver")  # its own process is told directly too
        assert await worker_a.wait("deliver", 5) and await worker_b.wait("deliver", 5)
        assert not dead.exists()
        receiver.notify("no-such-channel")  # ignored, never raises
    finally:
        for w in (worker_a, worker_b, receiver):
            await w.close()
    assert not any(directory.iterdir())


def test_long_state_dirs_get_a_short_wake_dir(tmp_path: Path) -> None:
    deep = tmp_path.joinpath(*["katalog-stanu-listserv"] * 6)
    short = wake_dir(deep)
    assert len(str(short)) < 80 and short == wake_dir(deep)
    assert wake_dir(Path("/var/lib/listserv")) == Path("/var/lib/listserv/wake")


# -- config ----------------------------------------------------------------------------------------------


def test_workers_and_lease_settings(tmp_path: Path) -> None:
    import os

    assert make_config(tmp_path).server.workers == (os.cpu_count() or 1)
    cfg = make_config(tmp_path, server={"workers": 0, "lease": "90s"})
    assert (cfg.server.workers, cfg.server.lease) == (0, 90)
    with pytest.raises(ConfigError, match="workers"):
        make_config(tmp_path, server={"workers": -1})
    with pytest.raises(ConfigError, match="lease"):
        make_config(tmp_path, server={"lease": 0})
    assert isinstance(cfg, config_mod.Config)


def test_delivery_connections_are_shared_by_the_workers() -> None:
    assert [connections_for(4, 2, s) for s in range(2)] == [2, 2]
    assert [connections_for(5, 2, s) for s in range(2)] == [3, 2]
    assert [connections_for(1, 3, s) for s in range(3)] == [1, 1, 1]  # each at least one
    assert connections_for(4, 1, 0) == 4 and connections_for(4, 0, 0) == 4


# -- the archive's queue is in the store ------------------------------------------------------------------


def test_the_archive_catches_up_on_start_with_posts_stored_while_it_was_down(tmp_path: Path,  # type: ignore[no-untyped-def]
                                                                             start_server) -> None:
    cfg = make_config(tmp_path)
    message_id = "zaleglosc-1@gmina17.example.pl"
    post = (f"From: Jadwiga Nowak <{POSTER}>\r\nTo: {LIST}@{DOMAIN}\r\nSubject: Zaległy wpis o źródłach ciepła\r\n"
            f"Message-ID: <{message_id}>\r\nDate: Thu, 26 Nov 2026 09:30:00 +0100\r\n\r\nTreść: zażółć gęślą jaźń.\r\n"
            ).encode()

    async def stored_before_a_crash() -> None:
        # What a worker that died right after queueing a post left: the post queued, its
        # archive row stored, no page written.
        store = await open_store(cfg.store_target)
        try:
            list_id = await store.create_list(LIST, {"title": "Energia w gminach"}, [])
            await store.enqueue(list_id=list_id, kind="post", envelope_from=f"{LIST}-bounces@{DOMAIN}",
                                data=post, recipients=[],
                                archive=ArchiveEntry(message_id, message_id_hash(message_id), post))
        finally:
            await store.close()

    asyncio.run(stored_before_a_crash())
    page = cfg.archive.dir / LIST / "m" / f"{message_id_hash(message_id)}.html"
    assert not page.exists()
    server = start_server(cfg)
    wait_until(lambda: server.call(server.store.archive_pending()) == 0, 60, "the archive stage caught up")
    assert page.is_file()
    assert "Zaległy wpis" in (cfg.archive.dir / LIST / "index.html").read_text(encoding="utf-8")


# -- one node split in two processes: receive here, work there --------------------------------------------


def test_receive_and_work_as_separate_processes(tmp_path: Path) -> None:
    listen_port, relay_port = free_port(), free_port()
    cfg = write_config(tmp_path, listen_port, relay_port)
    cli(cfg, "dkim", "keygen")
    cli(cfg, "list", "create", LIST, "--title", "Energia w gminach")
    members = [f"czlonek{i}@gmina{i}.example.pl" for i in range(5)]
    cli(cfg, "members", "add", LIST, POSTER, *members)
    sink = SinkHandler()
    controller = Controller(sink, hostname="127.0.0.1", port=relay_port)
    controller.start()
    logs = {name: open(tmp_path / f"{name}.log", "wb") for name in ("receive", "work")}
    procs = {name: subprocess.Popen([sys.executable, "-m", "listserv", "serve", "--only", name, "--config", str(cfg)],
                                    stdin=subprocess.DEVNULL, stdout=logs[name], stderr=subprocess.STDOUT,
                                    env=child_env(), cwd=tmp_path)
             for name in ("receive", "work")}

    def alive() -> None:
        for name, proc in procs.items():
            assert proc.poll() is None, (tmp_path / f"{name}.log").read_text(errors="replace")[-3000:]

    def answers() -> bool:
        try:
            with smtplib.SMTP("127.0.0.1", listen_port, timeout=5) as client:
                return client.noop()[0] == 250
        except (OSError, smtplib.SMTPException):
            return False

    try:
        wait_until(answers, 60, "the receiver answering", alive)
        with smtplib.SMTP("127.0.0.1", listen_port, timeout=30) as client:
            client.sendmail(POSTER, [f"{LIST}@{DOMAIN}"],
                            f"From: {POSTER}\r\nTo: {LIST}@{DOMAIN}\r\nSubject: Podział ról\r\n"
                            "Message-ID: <podzial-1@gmina17.example.pl>\r\n\r\nŻółć.\r\n".encode())
        everyone = {POSTER, *members}
        wait_until(lambda: everyone <= {r.lower() for r in sink.recipients()}, 120,
                   "every member got the post from the work process", alive)
        log_receive = (tmp_path / "receive.log").read_text(errors="replace")
        log_work = (tmp_path / "work.log").read_text(errors="replace")
        assert "listening on" in log_receive and "worker 1 started" not in log_receive
        assert "listening on" not in log_work and "worker 1 started" in log_work
        assert "delivered" not in log_receive and "delivered" in log_work
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.terminate()
        codes = {name: proc.wait(60) for name, proc in procs.items()}
        controller.stop()
        for f in logs.values():
            f.close()
    assert codes == {"receive": 0, "work": 0}
    assert sorted(r.lower() for r in sink.recipients()) == sorted({POSTER, *members})
