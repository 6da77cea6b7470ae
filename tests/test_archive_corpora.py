"""The archive on the shared corpora: every message of every folder imported, and live threading = full threading.

Read in place from ``LISTSERV_CORPORA`` (default ../shared/corpora); each
test skips with the reason when the corpora are absent.
"""

from __future__ import annotations

import asyncio
import random
import re
from pathlib import Path

import pytest

from conftest import corpora_dir, make_config, require
from listserv import archive
from listserv.store import Store
from test_archive import LIST, open_store
from test_archive_robust import check_tree, parse_both_ways

# Files in the corpora that are documentation, code or keys, not mail.
NOT_MAIL = {".txt", ".json", ".md", ".py", ".rb", ".js", ".pl", ".c", ".h", ".pem", ".key", ".yml", ".yaml", ".html",
            ".patch", ".gitignore", ".mh_sequences", ".pub", ".sh", ".t", ".pm", ".len"}
HEADER_LINE = re.compile(rb"^[!-9;-~]+:", re.MULTILINE)


def mail_files(root: Path) -> list[Path]:
    """mbox files (first line "From "), .eml/.msg files, and extension-less files that start with a header (MH, Maildir)."""
    out = []
    for path in sorted(root.rglob("*")):
        if not path.is_file() or path.name.startswith(".") or path.suffix.lower() in NOT_MAIL:
            continue
        if path.name in ("LICENSE", "CHANGES", "README", "Makefile"):
            continue
        head = path.read_bytes()[:400]
        if head.startswith(b"From ") or path.suffix.lower() in (".eml", ".msg", ".mbox") or HEADER_LINE.match(head):
            out.append(path)
    return out


@pytest.mark.slow
@pytest.mark.corpus
def test_every_message_of_every_corpus_folder_imports_and_renders(tmp_path: Path) -> None:
    root = corpora_dir()
    require(root.is_dir(), f"{root} not found (set LISTSERV_CORPORA)")
    files = mail_files(root)
    require(len(files) > 100, f"too few mail files under {root}")
    folders = {p.relative_to(root).parts[0] for p in files}
    cfg = make_config(tmp_path)

    async def go() -> tuple[int, int, int, list[tuple[str, str, float]], int]:
        store = await open_store(cfg, language="en")
        try:
            info = archive.list_info(cfg, await store.get_list(LIST))
            read = expected = 0
            pending: list[tuple[str, str, float, bytes]] = []
            for path in files:
                expected += sum(1 for _ in archive.read_messages(path))
                if path.stat().st_size > 1_000_000:  # the big mboxes: `listserv archive import LIST FILE` itself
                    n, _ = await archive.import_mbox(store, info, path)
                    read += n
                    continue
                # The rest (two thousand small files) through the same steps
                # import_mbox takes, stored in batches rather than a
                # transaction per file.
                for raw, when in archive.read_messages(path):
                    read += 1
                    entry = archive.import_entry(raw, when)
                    if entry is not None:
                        pending.append(entry)
                if len(pending) >= 500:
                    await store.archive_import(info.id, pending)
                    pending = []
            await store.archive_import(info.id, pending)
            count = await archive.build_list(cfg, store, info)
            return (read, expected, count, await store.archive_failures(info.id),
                    len(await store.archive_unbuilt(info.id)))
        finally:
            await store.close()

    read, expected, count, failures, unbuilt = asyncio.run(go())
    assert len(folders) >= 15, folders
    assert read == expected > 5000
    assert failures == [] and unbuilt == 0
    assert check_tree(cfg.archive.dir / LIST) == count


THREAD_ITEM = re.compile(r'<li class="post d\d+" id="m-([A-Z2-7]{32})">')


def thread_pages(ldir: Path) -> dict[str, list[str]]:
    """Each thread page's messages, in page order (redirect pages of merged threads left out)."""
    out = {}
    for page in (ldir / "t").glob("*.html"):
        ids = THREAD_ITEM.findall(page.read_text())
        if ids:
            out[page.stem] = ids
    return out


@pytest.mark.slow
@pytest.mark.corpus
def test_live_updates_in_shuffled_order_build_the_same_threads_as_full(tmp_path: Path) -> None:
    mbox = corpora_dir() / "mbox_linux_mips" / "linux-mips-2012.mbox"
    require(mbox.exists(), f"{mbox} not found (set LISTSERV_CORPORA)")
    # The first 600 posts (a few weeks of threads), arriving in random order:
    # replies before their parents, messages that join two threads.
    read = [archive.import_entry(raw, when) for (raw, when), _ in zip(archive.read_mbox(mbox), range(600))]
    entries = [e for e in read if e is not None]
    random.Random(2012).shuffle(entries)
    cfg = make_config(tmp_path)

    async def threads(store: Store, list_id: int) -> dict[str, tuple[str, str]]:
        return {m.msgid_hash: (m.thread, m.parent) for month, _ in await store.archive_months(list_id)
                for m in await store.archive_month_meta(list_id, month)}

    async def go() -> tuple[dict[str, tuple[str, str]], dict[str, tuple[str, str]], dict[str, list[str]]]:
        store = await open_store(cfg, language="en")
        try:
            info = archive.list_info(cfg, await store.get_list(LIST))
            archiver = archive.Archiver(cfg, store)
            for entry in entries:  # as the fan-out does: stored, then on_archived
                await store.archive_import(info.id, [entry])
                await archiver.on_archived(LIST, entry[1])
            await archiver.idle()
            live, live_pages = await threads(store, info.id), thread_pages(info.dir)
            await archive.build_list(cfg, store, info)
            return live, await threads(store, info.id), live_pages
        finally:
            await store.close()

    live, full, live_pages = asyncio.run(go())
    assert len(full) == len(entries) and len(set(t for t, _ in full.values())) > 100
    assert live == full  # same thread and same parent for every message
    full_pages = thread_pages(cfg.archive.dir / LIST)
    assert {k: live_pages.get(k) for k in full_pages} == full_pages  # same pages, messages in the same order


@pytest.mark.corpus
@pytest.mark.one_backend  # touches no store
def test_quick_entities_read_every_corpus_message_as_message_does() -> None:
    """The lean ``_Part`` reads each real message (every corpus folder) exactly as compat32's ``Message``."""
    root = corpora_dir()
    require(root.is_dir(), f"{root} not found (set LISTSERV_CORPORA)")
    checked = 0
    for path in mail_files(root):
        for raw, _ in archive.read_messages(path):
            fast, slow = parse_both_ways(raw)
            assert fast == slow, path
            checked += 1
    assert checked > 1000
