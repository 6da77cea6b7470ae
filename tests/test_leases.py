"""Claims with leases on a real SQLite file: what two workers (two stores, two connections) may take.

Times are passed in explicitly (the lease's "now"), so a lease running out is a
value in the test, not a sleep.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from listserv.store import ArchiveEntry, IncomingRow, Outcome, Store

LIST = "klimat-gmin"
T0 = 1_900_000_000.0
LEASE = 300.0
MEMBERS = [f"radny{i:02d}@gmina-łódź{i % 3}.example.pl".replace("ł", "l").replace("ó", "o").replace("ź", "z")
           for i in range(10)]


@pytest.fixture
async def stores(tmp_path: Path) -> AsyncIterator[tuple[Store, Store]]:
    """Two stores on one file: two workers of one node, each with its own connections."""
    path = tmp_path / "listserv.sqlite3"
    first = await Store.open(path)
    second = await Store.open(path)
    try:
        yield first, second
    finally:
        await first.close()
        await second.close()


def post_row(list_id: int, n: int, kind: str = "post", status: str = "accepted") -> IncomingRow:
    return IncomingRow(
        list_id=list_id, kind=kind, detail="", mail_from=f"wojt{n}@gmina.example.pl", rcpt=f"{LIST}@lists.example.org",
        peer="192.0.2.7", message_id=f"uchwala-{n}@gmina.example.pl", sender=f"wojt{n}@gmina.example.pl",
        subject=f"Uchwała nr {n} w sprawie źródeł ciepła", status=status, reason="",
        data=f"Subject: Uchwała {n}\r\n\r\nZażółć gęślą jaźń\r\n".encode(),
    )


async def queued_post(store: Store, list_id: int, recipients: list[str], archive: bool = False) -> int:
    return await store.enqueue(
        list_id=list_id, kind="post", envelope_from=f"{LIST}-bounces@lists.example.org",
        data=b"Subject: Termomodernizacja\r\n\r\nTre\xc5\x9b\xc4\x87\r\n", recipients=recipients,
        archive=ArchiveEntry("termo-1@gmina.example.pl", "HASH1", b"Subject: x\r\n\r\ny") if archive else None,
    )


async def test_two_workers_claim_disjoint_copies_and_a_lease_runs_out(stores: tuple[Store, Store]) -> None:
    a, b = stores
    list_id = await a.create_list(LIST, {}, [])
    await queued_post(a, list_id, MEMBERS)

    first = await a.claim_deliveries("node:w1", T0 + 1, T0 + 1 + LEASE, 4)
    second = await b.claim_deliveries("node:w2", T0 + 1, T0 + 1 + LEASE, 100)
    assert [d.recipient for d in first] == MEMBERS[:4]  # oldest first, in order
    assert [d.recipient for d in second] == MEMBERS[4:]
    assert await a.claim_deliveries("node:w3", T0 + 2, T0 + 2 + LEASE, 100) == []  # all leased

    # w2 records its batch: the outcomes clear its leases, in the same statement.
    await b.record_outcomes([Outcome(d.id, "sent", "250 ok", T0 + 3) for d in second])
    # w1 dies.  Its copies stay pending and leased until the lease runs out...
    assert await b.claim_deliveries("node:w2", T0 + LEASE, T0 + 2 * LEASE, 100) == []
    assert await b.next_claimable_at(T0 + 10) == pytest.approx(T0 + 1 + LEASE)
    # ... and then another worker takes them over.
    taken = await b.claim_deliveries("node:w2", T0 + 2 + LEASE, T0 + 2 + 2 * LEASE, 100)
    assert [d.recipient for d in taken] == MEMBERS[:4]
    await b.record_outcomes([Outcome(d.id, "sent", "250 ok", T0 + 400) for d in taken])
    assert await a.delivery_counts() == {"sent": len(MEMBERS)}
    assert await a.next_claimable_at(T0 + 500) is None


async def test_a_retry_is_claimable_only_when_due(stores: tuple[Store, Store]) -> None:
    a, _ = stores
    list_id = await a.create_list(LIST, {}, [])
    await queued_post(a, list_id, MEMBERS[:2])
    claimed = await a.claim_deliveries("node:w1", T0, T0 + LEASE, 10)
    await a.record_outcomes([Outcome(claimed[0].id, "pending", "451 4.7.1 później", T0 + 3600),
                             Outcome(claimed[1].id, "sent", "250 ok", T0)])
    assert await a.claim_deliveries("node:w1", T0 + 10, T0 + 10 + LEASE, 10) == []
    assert await a.next_claimable_at(T0 + 10) == pytest.approx(T0 + 3600)
    [retry] = await a.claim_deliveries("node:w2", T0 + 3600, T0 + 3600 + LEASE, 10)
    assert retry.recipient == MEMBERS[0] and retry.attempts == 1


async def test_claims_racing_from_two_stores_never_overlap(stores: tuple[Store, Store]) -> None:
    a, b = stores
    list_id = await a.create_list(LIST, {}, [])
    recipients = [f"czlonek{i:04d}@gmina.example.pl" for i in range(600)]
    await queued_post(a, list_id, recipients)

    async def worker(store: Store, name: str) -> list[int]:
        got: list[int] = []
        while True:
            claimed = await store.claim_deliveries(name, T0, T0 + LEASE, 7)
            if not claimed:
                return got
            got.extend(d.id for d in claimed)

    one, two = await asyncio.gather(worker(a, "node:w1"), worker(b, "node:w2"))
    assert not set(one) & set(two)
    assert len(one) + len(two) == len(recipients)


async def test_posts_are_claimed_once_and_a_status_clears_the_lease(stores: tuple[Store, Store],
                                                                    tmp_path: Path) -> None:
    a, b = stores
    list_id = await a.create_list(LIST, {}, [])
    await a.submit_incoming([post_row(list_id, n) for n in range(3)] + [post_row(list_id, 9, kind="owner",
                                                                                 status="new")])
    [p1, p2] = await a.claim_incoming("post", "accepted", "node:w1", T0, T0 + LEASE, 2)
    [p3] = await b.claim_incoming("post", "accepted", "node:w2", T0, T0 + LEASE, 10)
    assert [p1.subject, p2.subject, p3.subject] == [f"Uchwała nr {n} w sprawie źródeł ciepła" for n in range(3)]
    assert p1.list_name == LIST
    [owner_mail] = await b.claim_incoming("owner", "new", "node:w2", T0, T0 + LEASE, 10)
    assert owner_mail.kind == "owner"

    await a.set_incoming_status(p1.id, "queued", expect="accepted")
    await a.set_incoming_status(p2.id, "held", expect="accepted", reason="could not be prepared")
    rows = sqlite3.connect(tmp_path / "listserv.sqlite3").execute(
        "SELECT id, status, lease_owner FROM incoming ORDER BY id").fetchall()
    assert rows[:3] == [(p1.id, "queued", None), (p2.id, "held", None), (p3.id, "accepted", "node:w2")]
    # w2 dies with p3 leased; after the lease another worker prepares it.
    assert await a.claim_incoming("post", "accepted", "node:w1", T0 + 1, T0 + LEASE, 10) == []
    assert await a.next_incoming_lease_end("post", "accepted", T0 + 1) == pytest.approx(T0 + LEASE)
    [again] = await a.claim_incoming("post", "accepted", "node:w1", T0 + LEASE + 1, T0 + 2 * LEASE, 10)
    assert again.id == p3.id


async def test_a_restarted_worker_takes_its_leases_back_at_once(stores: tuple[Store, Store]) -> None:
    a, b = stores
    list_id = await a.create_list(LIST, {}, [])
    await queued_post(a, list_id, MEMBERS[:3], archive=True)
    await a.submit_incoming([post_row(list_id, 1)])
    assert len(await a.claim_deliveries("node:w1", T0, T0 + LEASE, 10)) == 3
    assert len(await a.claim_incoming("post", "accepted", "node:w1", T0, T0 + LEASE, 10)) == 1
    assert len(await a.claim_archive_work("node:w1", T0, T0 + LEASE, 10)) == 1
    assert await a.claim_stage("archive", "node:w1", T0, T0 + LEASE)
    assert await b.release_leases("node:w9") == 0  # somebody else's: untouched
    assert await b.claim_deliveries("node:w2", T0 + 1, T0 + LEASE, 10) == []
    # The same slot starting again (same name) gives back what its previous run held.
    assert await b.release_leases("node:w1") == 5
    assert len(await b.claim_deliveries("node:w1", T0 + 1, T0 + LEASE, 10)) == 3
    assert await b.stage_holder("archive") is None


async def test_one_worker_at_a_time_holds_a_stage(stores: tuple[Store, Store]) -> None:
    a, b = stores
    assert await a.claim_stage("requests", "node:w1", T0, T0 + 30)
    assert not await b.claim_stage("requests", "node:w2", T0 + 1, T0 + 31)
    assert await a.claim_stage("requests", "node:w1", T0 + 10, T0 + 40)  # renewed by its holder
    assert not await b.claim_stage("requests", "node:w2", T0 + 35, T0 + 65)
    assert await b.stage_holder("requests") == ("node:w1", pytest.approx(T0 + 40))
    assert await b.claim_stage("requests", "node:w2", T0 + 41, T0 + 71)  # w1 stopped renewing: taken over
    assert not await a.claim_stage("requests", "node:w1", T0 + 42, T0 + 72)
    assert await a.claim_stage("archive", "node:w1", T0 + 42, T0 + 72)  # stages are independent


async def test_archive_rows_are_queued_work_until_rendered(stores: tuple[Store, Store]) -> None:
    a, b = stores
    list_id = await a.create_list(LIST, {}, [])
    await queued_post(a, list_id, MEMBERS[:1], archive=True)
    await a.archive_import(list_id, [("stare-1@gmina.example.pl", "OLD1", T0, b"Subject: stare\r\n\r\n")])
    assert await a.archive_pending() == 1  # imported rows are built by `archive build`, not queued
    [(row_id, name, msgid_hash)] = await a.claim_archive_work("node:w1", T0, T0 + LEASE, 10)
    assert (name, msgid_hash) == (LIST, "HASH1")
    assert await b.claim_archive_work("node:w2", T0 + 1, T0 + LEASE, 10) == []
    await a.archive_rendered([row_id])
    assert await a.archive_pending() == 0
    assert await b.claim_archive_work("node:w2", T0 + LEASE + 1, T0 + 2 * LEASE, 10) == []


async def test_a_message_given_back_after_a_failure_waits_its_retry_time(stores: tuple[Store, Store]) -> None:
    a, b = stores
    list_id = await a.create_list(LIST, {}, [])
    await a.submit_incoming([post_row(list_id, 1)])
    [post] = await a.claim_incoming("post", "accepted", "node:w1", T0, T0 + LEASE, 10)
    await b.release_incoming(post.id, "node:w9", T0 + 30)  # not its claim: nothing changes
    assert await b.claim_incoming("post", "accepted", "node:w2", T0 + 31, T0 + LEASE, 10) == []
    await a.release_incoming(post.id, "node:w1", T0 + 30)
    assert await b.claim_incoming("post", "accepted", "node:w2", T0 + 29, T0 + LEASE, 10) == []
    [again] = await b.claim_incoming("post", "accepted", "node:w2", T0 + 31, T0 + LEASE, 10)
    assert again.id == post.id
