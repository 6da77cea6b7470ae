"""Benchmark: one day's digest of a 10,000-member list, 2,000 of them on digests, 200 posts.

What it measures (issue 11):

1. The period: a real ``listserv.app.App`` in this process takes 200 Polish posts
   (about 3 KB each) over SMTP.  Each post waits for the digest in the store.
   The 8,000 ``each`` members are on ``nomail`` during the period, so that their
   1.6 million single copies do not make this a fan-out benchmark (bench/fanout.py
   is that); the digest stage's question "which of these posts did a digest member
   already have singly" then scans only the posts' own delivery rows.
2. Build: ``DigestStage.send_now`` (what ``listserv digest send`` runs): reads the
   200 waiting posts, builds one message per delivery mode (MIME, plain, index),
   numbers the digest and queues 2,000 personalized copies in one transaction.
   Wall and CPU seconds.
3. Delivery: from the digest queued until the fan-out has recorded all 2,000
   copies as sent (each one its own transaction, with the member's one-click
   List-Unsubscribe, footer links and DKIM signature, as every digest copy).
   Wall, copies/s, CPU seconds of this process over that span.
4. The reference, in the same run: CPU of one RSA-2048 signature (what a DKIM
   signature costs at least).  Goal: CPU per digest copy <= 2x one signature,
   as for personalized posts.  Also printed: the CPU of signing the whole MIME
   digest from scratch with ``dkim.sign_message`` (what per-copy signing would
   cost without the fan-out's precomputed body hash).
5. The floor, in the same run: a bare SMTP client (one blocking socket, the
   wire form made beforehand, no signing, no store) pushing the very same
   copies' bytes into the same sink.  What listserv spends beyond it is its
   own work per copy; user and system CPU are printed apart.

The relay is the shared counting sink (../shared/tools/smtp_sink.py) in its own
process.  Peak RSS of this process is printed.

Usage (from the repo root):  python bench/digest.py [--members 10000] [--digest-members 2000]
        [--posts 200] [--post-bytes 3000]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import smtplib
import sqlite3
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import _common as C  # noqa: E402


def rsa_signature_cpu(rounds: int = 1000) -> float:
    """CPU seconds of one RSA-2048 PKCS#1 v1.5 SHA-256 signature, as dkim.sign does it."""
    import hashlib

    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import padding, rsa, utils

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    digest = hashlib.sha256(b"header data").digest()
    for _ in range(50):
        key.sign(digest, padding.PKCS1v15(), utils.Prehashed(hashes.SHA256()))
    start = time.process_time()
    for _ in range(rounds):
        key.sign(digest, padding.PKCS1v15(), utils.Prehashed(hashes.SHA256()))
    return (time.process_time() - start) / rounds


def bare_client_cpu(port: int, copies: list[bytes]) -> tuple[float, float, float, float]:
    """The floor: CPU of a bare SMTP client pushing the same copies' bytes into the same sink.

    One socket, pipelined MAIL/RCPT/DATA, the wire form made before the clock
    starts, no signing, no store: only what moving the bytes costs this process
    (mostly the kernel's copy through loopback TCP).  Returns CPU, user,
    system and wall seconds for all copies.
    """
    import socket

    from listserv.transport import wire_data

    made: dict[int, bytes] = {}
    wires = [made.setdefault(id(c), wire_data(c)) for c in copies]  # one wire form per distinct message

    def reply() -> bytes:
        while True:
            line = sock_file.readline()
            if line[3:4] != b"-":
                return line

    sock = socket.create_connection(("127.0.0.1", port))
    sock_file = sock.makefile("rb")
    reply()
    sock.sendall(b"EHLO bench\r\n")
    reply()
    t0, cpu0, wall0 = os.times(), time.process_time(), time.perf_counter()
    for n, wire in enumerate(wires):
        sock.sendall(b"MAIL FROM:<bench@lists.example.org>\r\nRCPT TO:<m%d@example.net>\r\nDATA\r\n" % n)
        for _ in range(3):
            reply()
        sock.sendall(wire)
        reply()
    cpu1, wall1, t1 = time.process_time(), time.perf_counter(), os.times()
    sock.sendall(b"QUIT\r\n")
    sock.close()
    return cpu1 - cpu0, t1.user - t0.user, t1.system - t0.system, wall1 - wall0


async def run(args: argparse.Namespace, tmp: Path, sink: C.Sink) -> dict[str, float]:
    from listserv import dkim
    from listserv.app import App
    from listserv.config import from_mapping
    from listserv.dns import DictResolver

    mapping = C.config_mapping(tmp, listen_port=0, relay_port=sink.port, connections=4)
    mapping["web"] = {"listen": "127.0.0.1:0", "base_url": "https://listy.example.org/"}
    cfg = from_mapping(mapping, base=tmp)

    app = App(cfg, resolver=DictResolver())
    await app.start()
    try:
        store = app.store
        assert store is not None
        name = "zarzadzanie-energia"
        await store.create_list(name, {"title": "Zarządzanie energią", "digest_period": "off",
                                       "digest_size_threshold": 1 << 30}, ["koordynator@pnec.org.pl"])
        rng = random.Random(11)
        members = [(C.member_address(i), f"{rng.choice(C.FIRST)} {rng.choice(C.LAST)}", rng.choice(C.ORGS))
                   for i in range(args.members)]
        await store.add_members(name, members)
        modes = ["digest_mime", "digest_plain", "index"]
        digest_members = [m[0] for m in members[: args.digest_members]]
        for i, address in enumerate(digest_members):
            await store.set_member_options(name, address, {"delivery_mode": modes[i % 5 % 3]})
        for address, _, _ in members[args.digest_members:]:
            await store.set_member_options(name, address, {"delivery": "nomail"})
        author = members[-1]
        post_addr = f"{name}@{C.DOMAIN}"
        posts = [C.make_post(rng, author=author[0], author_name=author[1], list_address=post_addr,
                             size=args.post_bytes, message_id=f"bench-digest-{n}@gmina.example.pl",
                             subject=f"Termomodernizacja szkół, część {n}") for n in range(args.posts)]

        def send_all() -> None:
            with smtplib.SMTP("127.0.0.1", app.port, timeout=60) as client:
                for data in posts:
                    assert client.sendmail(author[0], [post_addr], data) == {}

        await asyncio.to_thread(send_all)
        await app.fanout.drain(300)
        # The archive renders the posts' pages meanwhile: let it finish, so the
        # CPU measured below is the digest's alone.
        db_file = cfg.server.state_dir / "listserv.sqlite3"
        while True:
            with sqlite3.connect(db_file) as db:
                (unrendered,) = db.execute("SELECT count(*) FROM archive WHERE render_pending = 1").fetchone()
            if not unrendered:
                break
            await asyncio.sleep(0.1)
        await app.archiver.idle()
        lst = await store.get_list(name)
        waiting = await store.waiting_digest_posts(lst.id)
        assert len(waiting) == args.posts, len(waiting)
        sink.reset()

        cpu0, wall0 = time.process_time(), time.perf_counter()
        digest_id = await app.digests.send_now(name)
        cpu1, wall1 = time.process_time(), time.perf_counter()
        assert digest_id is not None
        t1 = os.times()
        app.fanout.wake()
        db_path = cfg.server.state_dir / "listserv.sqlite3"
        # Wait on the sink's counts file first (a small read), then on the
        # store: a count over the deliveries every 50 ms would cost this very
        # process a fifth of the CPU being measured.
        while sink.counts().get("recipients", 0) < args.digest_members:
            await asyncio.sleep(0.05)
        while True:
            with sqlite3.connect(db_path) as db:
                (pending,) = db.execute(
                    "SELECT count(*) FROM deliveries d JOIN outbox o ON o.id = d.outbox_id"
                    " WHERE o.digest_id = ? AND d.status != 'sent'", (digest_id,)).fetchone()
            if pending == 0:
                break
            await asyncio.sleep(0.05)
        cpu2, wall2 = time.process_time(), time.perf_counter()
        t2 = os.times()
        deadline = time.monotonic() + 15  # the sink writes its counts file now and then
        while (got := sink.counts().get("recipients", 0)) < args.digest_members and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert got == args.digest_members, (got, args.digest_members)
        with sqlite3.connect(db_path) as db:
            sizes = db.execute("SELECT kind, length(data) FROM outbox WHERE digest_id = ?", (digest_id,)).fetchall()
        with sqlite3.connect(db_path) as db:
            biggest = db.execute("SELECT data FROM outbox WHERE digest_id = ? ORDER BY length(data) DESC LIMIT 1",
                                 (digest_id,)).fetchone()[0]
        with sqlite3.connect(db_path) as db:
            datas = {oid: bytes(data) for oid, data in db.execute(
                "SELECT id, data FROM outbox WHERE digest_id = ?", (digest_id,))}
            copies = [datas[oid] for (oid,) in db.execute(
                "SELECT d.outbox_id FROM deliveries d JOIN outbox o ON o.id = d.outbox_id WHERE o.digest_id = ?"
                " ORDER BY d.id", (digest_id,))]
        bare = bare_client_cpu(sink.port, copies)
        key = dkim.load_keys(cfg.dkim, cfg.server.domain)
        c0 = time.process_time()
        for _ in range(5):
            dkim.sign_message(bytes(biggest), key)
        whole_sign = (time.process_time() - c0) / 5
        return {"build_wall": wall1 - wall0, "build_cpu": cpu1 - cpu0, "deliver_wall": wall2 - wall1,
                "deliver_cpu": cpu2 - cpu1,
                "deliver_user": t2.user - t1.user, "deliver_sys": t2.system - t1.system, "copies": got, "messages": len(sizes),
                "digest_bytes": max(s[1] for s in sizes), "whole_sign": whole_sign,
                "bare_cpu": bare[0], "bare_user": bare[1], "bare_sys": bare[2], "bare_wall": bare[3]}
    finally:
        await app.stop(grace=5)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--members", type=int, default=10_000)
    parser.add_argument("--digest-members", type=int, default=2_000)
    parser.add_argument("--posts", type=int, default=200)
    parser.add_argument("--post-bytes", type=int, default=3_000)
    args = parser.parse_args()
    print(C.machine_line())
    print(C.load_line())
    with tempfile.TemporaryDirectory(prefix="listserv-bench-digest-") as tmpdir:
        tmp = Path(tmpdir)
        sink = C.Sink(tmp / "sink")
        try:
            result = asyncio.run(run(args, tmp, sink))
        finally:
            sink.stop()
    rsa = rsa_signature_cpu()
    per_copy = result["deliver_cpu"] / result["copies"]
    print(f"list: {args.members} members, {args.digest_members} on digests (MIME, plain, index), "
          f"{args.posts} posts of ~{args.post_bytes} B in the period")
    print(f"digest: {result['messages']} messages (one per mode), the biggest {result['digest_bytes'] / 1024:.0f} KB")
    print(f"build + queue (listserv digest send): {result['build_wall']:.3f} s wall, {result['build_cpu']:.3f} s CPU")
    print(f"delivery of {result['copies']} personalized copies: {result['deliver_wall']:.2f} s wall "
          f"({result['copies'] / result['deliver_wall']:.0f} copies/s), {result['deliver_cpu']:.2f} s CPU "
          f"({result['deliver_user']:.2f} user, {result['deliver_sys']:.2f} system)")
    print(f"CPU per digest copy: {per_copy * 1000:.3f} ms; one RSA-2048 signature: {rsa * 1000:.3f} ms; "
          f"ratio {per_copy / rsa:.2f} (goal <= 2.00)")
    bare = result["bare_cpu"] / result["copies"]
    print(f"bare SMTP client pushing the same {result['copies']} copies' bytes into the same sink: "
          f"{bare * 1000:.3f} ms CPU per copy ({result['bare_user']:.2f} s user, {result['bare_sys']:.2f} s system, "
          f"{result['bare_wall']:.2f} s wall); listserv's own work per copy beyond moving the bytes: "
          f"{(per_copy - bare) * 1000:.3f} ms ({(per_copy - bare) / rsa:.2f} signatures' worth)")
    print(f"signing the biggest digest from scratch (dkim.sign_message): {result['whole_sign'] * 1000:.2f} ms "
          f"({result['whole_sign'] / rsa:.1f} signatures' worth)")
    print(f"peak RSS: {C.peak_rss_mb():.0f} MB")


if __name__ == "__main__":
    main()
