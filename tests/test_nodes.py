"""Several nodes, one list server: two ``listserv serve`` processes on one PostgreSQL database.

Each node has its own state dir (its wake-up sockets) and SMTP port; they
share the database, the DKIM key and the unsubscribe secret, as docs/scale.md
tells an operator to.  The relay is the gated sink of test_crash.

1. Posts mailed to both nodes reach every member exactly once.
2. A SIGKILL of one node in the middle of a 5,000-member batched fan-out:
   the other node takes over the dead node's claims when their leases run
   out and finishes it; duplicates are at most one batch per delivery
   connection of the dead node (what was on the wire).
"""

from __future__ import annotations

import shutil
import signal
import time
from collections import Counter
from pathlib import Path

import pytest

from conftest import committed, free_port, postgres_url
from listserv.unsubscribe import load_secret
from test_crash import (
    BIG_EVERYONE,
    CONNECTIONS,
    MAX_RECIPIENTS,
    POST_MESSAGE_ID,
    SlowReplySink,
    cli,
    post,
    post_bytes,
    prepare_big_list,
    relay,
    server_process,  # noqa: F401 - the fixture
    wait_until,
    write_config,
)

pytestmark = [pytest.mark.slow, pytest.mark.one_backend]

LEASE = 4  # seconds: how long a dead node's claims stand before the other node takes them


def node_config(base: Path, listen_port: int, relay_port: int, url: str) -> Path:
    base.mkdir(parents=True, exist_ok=True)
    cfg = write_config(base, listen_port, relay_port)
    text = cfg.read_text(encoding="utf-8").replace('log_level = "info"\n', f'log_level = "info"\nlease = {LEASE}\n')
    cfg.write_text(text + f'\n[store]\nurl = "{url}"\n', encoding="utf-8")
    return cfg


def two_nodes(tmp_path: Path, relay_port: int) -> tuple[tuple[Path, int], tuple[Path, int], str]:
    url = postgres_url()
    a, b = (tmp_path / "a", free_port()), (tmp_path / "b", free_port())
    cfg_a = node_config(a[0], a[1], relay_port, url)
    cfg_b = node_config(b[0], b[1], relay_port, url)
    prepare_big_list(a[0], cfg_a, personalize=False)  # the key, the list and 5,000 members, through node a's CLI
    # What the nodes share besides the database: the signing key and the token secret.
    (b[0] / "state").mkdir(mode=0o700, parents=True, exist_ok=True)
    shutil.copy2(a[0] / "dkim.key", b[0] / "dkim.key")
    load_secret(a[0] / "state")  # made as a's first start would make it, then given to b
    shutil.copy2(a[0] / "state" / "unsubscribe.secret", b[0] / "state" / "unsubscribe.secret")
    return (cfg_a, a[1]), (cfg_b, b[1]), url


def post_copies(url: str) -> dict[str, int]:
    return {str(k): int(v) for k, v in committed(
        url, "SELECT status, count(*) FROM deliveries d JOIN outbox o ON o.id = d.outbox_id"
             " WHERE o.kind LIKE 'post%' GROUP BY status")}


def test_posts_to_both_nodes_reach_every_member_once(tmp_path: Path, server_process) -> None:  # type: ignore[no-untyped-def]
    relay_port = free_port()
    sink = SlowReplySink(delay=0.001)
    (cfg_a, port_a), (cfg_b, port_b), url = two_nodes(tmp_path, relay_port)
    with relay(sink, relay_port):
        nodes = [server_process(cfg_a, port_a), server_process(cfg_b, port_b)]
        for node in nodes:
            node.start()
        ids = []
        for n in range(3):
            for i, port in enumerate((port_a, port_b)):
                message_id = f"dwa-wezly-{n}-{i}@gmina17.example.pl"
                code, reply = post(port, post_bytes(message_id))
                assert code == 250, reply
                ids.append(message_id)

        def done() -> bool:
            return post_copies(url).get("sent", 0) == len(ids) * len(BIG_EVERYONE)

        wait_until(done, 240, "every copy of the 6 posts sent", lambda: [n.check_alive() for n in nodes])
        for node in nodes:
            node.signal(signal.SIGTERM)
            assert node.wait(30) == 0, node.log()[-3000:]
    per_post: Counter[str] = Counter()
    for tx in sink.snapshot():
        per_post[tx.message_id] += len(tx.rcpts)
    assert per_post == {i: len(BIG_EVERYONE) for i in ids}  # every member, every post ...
    pairs = Counter((tx.message_id, r) for tx in sink.snapshot() for r in tx.rcpts)
    assert max(pairs.values()) == 1  # ... exactly once


def test_sigkill_of_one_node_mid_fanout_the_other_finishes_it(tmp_path: Path, server_process) -> None:  # type: ignore[no-untyped-def]
    relay_port = free_port()
    sink = SlowReplySink(delay=0.05)  # a fan-out of 50 batches lasts seconds: the kill lands inside it
    (cfg_a, port_a), (cfg_b, port_b), url = two_nodes(tmp_path, relay_port)
    with relay(sink, relay_port):
        a, b = server_process(cfg_a, port_a), server_process(cfg_b, port_b)
        a.start()
        code, reply = post(port_a, post_bytes())
        assert code == 250, reply
        # Node a alone has claimed and is sending; b starts once a is well into it.
        wait_until(lambda: len(sink.counts()) >= 1000, 120, "1,000 members have the post", a.check_alive)
        b.start()
        wait_until(lambda: len(sink.counts()) >= 1500, 120, "1,500 members have the post", a.check_alive)
        a.signal(signal.SIGKILL)
        assert a.wait(30) == -signal.SIGKILL
        killed_at = time.monotonic()
        at_kill = sink.counts()
        assert len(at_kill) < len(BIG_EVERYONE), "the kill must land before the fan-out is over"
        wait_until(lambda: BIG_EVERYONE <= set(sink.counts()), 240,
                   f"all {len(BIG_EVERYONE)} members received the post", b.check_alive)
        wait_until(lambda: post_copies(url).get("pending", 0) == 0, 60, "no copy left pending", b.check_alive)
        finished_after = time.monotonic() - killed_at
        b.signal(signal.SIGTERM)
        assert b.wait(30) == 0, b.log()[-3000:]
    counts = sink.counts()
    assert set(counts) == BIG_EVERYONE
    dups = sum(counts[r] - at_kill[r] for r in at_kill)
    extra = sum(n - 1 for n in counts.values())
    # The dead node's connections (CONNECTIONS in all, shared by its workers) each had
    # at most one batch on the wire: those may go out twice, nothing else.
    bound = CONNECTIONS * MAX_RECIPIENTS
    print(f"\nSIGKILL of node a: {len(at_kill)} of {len(BIG_EVERYONE)} had the post; node b finished "
          f"{finished_after:.1f} s later; {extra} duplicate copies (bound {bound})")
    assert dups == extra and extra <= bound, (extra, bound)
    assert {tx.message_id for tx in sink.snapshot()} == {POST_MESSAGE_ID}
    assert post_copies(url) == {"sent": len(BIG_EVERYONE)}
