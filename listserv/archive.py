"""Archive: render the static HTML archive from the store, fully or one message at a time.

The store's ``archive`` table is the source of truth; everything here is
derived and can be rebuilt (``listserv archive build --full``).  Layout, under
``[archive] dir`` for public lists and ``<dir>-private`` for private ones::

    index.html                 all lists
    static/                    archive.css, search.js
    LIST/index.html            description, how to join, latest threads, months
    LIST/feed.atom             the latest messages
    LIST/search.html           static search over LIST/search/YYYY-MM.js
    LIST/YYYY-MM/index.html    the month by thread; date.html by date; YYYY-MM.mbox
    LIST/t/THREAD.html         one thread, messages in tree order
    LIST/m/HASH.html           one message (HASH = Message-ID-Hash: Archived-At)
    LIST/m/HASH/N/NAME         its attachments, as downloads

Every page carries a Content-Security-Policy that allows scripts and styles
only from the archive itself (no inline script, no remote resource), links are
relative so a plain folder works, and every file is written atomically (temp
file, then rename).

*Full build*: headers of all messages are read in worker processes (forked,
so they start at once; an import has them read and parse each stored batch
while it reads and stores the next, and keep the parsed messages within a
memory budget; for the last part of a large mbox the import reads the
headers itself, from the bytes at hand, so the list is threaded as soon as
the import ends), threaded in one pass (``archive_thread``), then batches of
threads are rendered in parallel, each thread in the worker that holds most
of its messages (each message parsed once, its body shown on its own page
and in its thread), and each month's pages as soon as its last message is
stored; files of the fresh tree are written in place and the tree is swapped
in for the old one.
*Incremental*: ``Archiver.on_archived`` (called by the fan-out after a post is
stored) starts a background task that loads the threads the message touches
(the ones it names, the replies that name it or its ancestors, a subject
match), re-threads them with the full build's own function (so two threads it
links merge and early replies are re-parented exactly as ``--full`` does) and
rewrites only the pages that changed: message pages, threads, months (pages,
mbox, search part), the list home and the feed.

*Never stops*: all text comes out of ``archive_render``'s decoding seam as
valid Unicode; a message whose pages still cannot be written is recorded
(``archive_failures``, shown by ``listserv archive status``) and skipped, in
the full build, in ``archive build`` and in the live stage alike.  Dates are
shown in the list's ``timezone`` (``archive_pages``).
"""

from __future__ import annotations

import asyncio
import atexit
import calendar
import collections
import concurrent.futures
import concurrent.futures.process
import contextlib
import email.utils
import gc
import html
import json
import logging
import multiprocessing
import os
import re
import shutil
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, TypeVar

import jinja2
from markupsafe import Markup

from listserv.archive_render import (
    HeaderScan,
    Labels,
    Mail,
    fallback_message_id,
    hide_addresses,
    mbox_entry,
    parse_mail,
    scan_and_parse,
    scan_headers,
    strip_angles,
)
from listserv.archive_pages import escape as page_escape
from listserv.archive_pages import fmt_date, iso_date, local_month, message_page, thread_page
from listserv.archive_thread import Node, is_reply_subject, normalize_subject, thread_messages, tree_order
from listserv.archive_types import ArchiveMeta, ArchiveRow
from listserv.config import Config
from listserv.errors import ListservError
from listserv.message import archiving_refused
from listserv.rewrite import message_id_hash
from listserv.settings import effective_settings
from listserv.store import ListRecord, Store

__all__ = ["Archiver", "ListInfo", "CSP", "build_list", "list_info", "templates_dir", "write_atomic"]

log = logging.getLogger("listserv.archive")

CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self';"
    " base-uri 'none'; form-action 'self'"
)
FEED_ENTRIES = 30
LATEST_THREADS = 20
PARALLEL_FROM = 400  # fewer messages than this are built in-process
THREAD_JOB = 400  # messages per worker job
META_BATCH = 2000  # derived rows stored per transaction during a full build

STRINGS: dict[str, dict[str, str]] = {
    "pl": {
        "site_title": "Archiwa list dyskusyjnych", "all_lists": "Wszystkie listy", "messages": "wiad.",
        "no_lists": "Brak publicznych archiwów.", "how_to_join": "Jak dołączyć",
        "join_text": "Wyślij pustą wiadomość na adres", "post_text": "Wiadomości do listy wysyła się na adres",
        "at": "małpa", "search": "Szukaj", "search_placeholder": "słowa w temacie, autorze lub treści",
        "latest_threads": "Najnowsze wątki", "months": "Miesiące", "by_date": "według daty",
        "by_thread": "według wątków", "feed": "Kanał Atom", "empty": "Archiwum jest jeszcze puste.",
        "no_subject": "(bez tematu)", "download_mbox": "pobierz mbox", "in_reply_to": "w odpowiedzi na",
        "whole_thread": "Cały wątek", "attachments": "Załączniki", "replies": "Odpowiedzi",
        "searching": "Szukam…", "found": "Znalezione wiadomości:", "not_found": "Nic nie znaleziono.",
        "needs_js": "Wyszukiwarka potrzebuje JavaScriptu; miesiące są dostępne na stronie listy.",
        "navigation": "Nawigacja", "moved": "Ten wątek jest teraz tutaj.",
        "footer": "Archiwum listy dyskusyjnej. Adresy e-mail są ukryte.",
        "quoted": "cytat: {n} wierszy", "truncated": "[wiadomość skrócona: zbyt długa]",
        "forwarded": "Przekazana wiadomość",
    },
    "en": {
        "site_title": "Mailing list archives", "all_lists": "All lists", "messages": "messages",
        "no_lists": "No public archives.", "how_to_join": "How to join",
        "join_text": "Send an empty message to", "post_text": "Messages to the list go to",
        "at": "at", "search": "Search", "search_placeholder": "words in subject, author or text",
        "latest_threads": "Latest threads", "months": "Months", "by_date": "by date",
        "by_thread": "by thread", "feed": "Atom feed", "empty": "The archive is empty so far.",
        "no_subject": "(no subject)", "download_mbox": "download mbox", "in_reply_to": "in reply to",
        "whole_thread": "Whole thread", "attachments": "Attachments", "replies": "Replies",
        "searching": "Searching…", "found": "Messages found:", "not_found": "Nothing found.",
        "needs_js": "Search needs JavaScript; the months are on the list's page.",
        "navigation": "Navigation", "moved": "This thread is now here.",
        "footer": "Mailing list archive. E-mail addresses are hidden.",
        "quoted": "{n} quoted lines", "truncated": "[message cut: too long]",
        "forwarded": "Forwarded message",
    },
}
MONTHS = {
    "pl": ["styczeń", "luty", "marzec", "kwiecień", "maj", "czerwiec", "lipiec", "sierpień", "wrzesień",
           "październik", "listopad", "grudzień"],
    "en": list(calendar.month_name)[1:],
}


# -- files ---------------------------------------------------------------------------


def templates_dir() -> Path:
    """The templates shipped inside the package, else the checkout's top-level folder."""
    packaged = Path(str(resources.files("listserv").joinpath("templates")))
    if (packaged / "base.html").exists():
        return packaged
    return Path(__file__).resolve().parent.parent / "templates"


_local = threading.local()


_WRITE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_CLOEXEC", 0)


def _write_file(name: str, payload: bytes) -> None:
    try:
        fd = os.open(name, _WRITE_FLAGS, 0o666)
    except FileNotFoundError:
        os.makedirs(os.path.dirname(name), exist_ok=True)
        fd = os.open(name, _WRITE_FLAGS, 0o666)
    try:
        view = memoryview(payload)
        while view:
            view = view[os.write(fd, view):]
    finally:
        os.close(fd)


def write_atomic(path: Path | str, data: bytes | str) -> None:
    """Write a file so that a reader sees the old or the new content, never a part.

    Inside a full build (a fresh tree nobody reads yet, swapped in at the
    end) files are written in place: the swap is the atomic step.
    """
    payload = data.encode("utf-8") if isinstance(data, str) else data
    name = os.fspath(path)
    if getattr(_local, "direct", False):
        _write_file(name, payload)
        return
    folder, base = os.path.split(name)
    tmp = os.path.join(folder, f".{base}.{os.getpid()}.tmp")
    _write_file(tmp, payload)
    os.replace(tmp, name)


def _remove_tree(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)


# -- the list as the archive sees it ----------------------------------------------------


@dataclass(frozen=True, slots=True)
class ListInfo:
    id: int
    name: str
    title: str
    description: str
    language: str
    policy: str  # public | private | none
    domain: str
    base_url: str
    public_root: Path
    private_root: Path
    timezone: str = "Europe/Warsaw"

    @property
    def root(self) -> Path:
        """The folder holding this list's archive (for "none", where it would be if public)."""
        return self.private_root if self.policy == "private" else self.public_root

    @property
    def dir(self) -> Path:
        return self.root / self.name

    @property
    def join_local(self) -> str:
        return f"{self.name}-join"

    @property
    def list_url(self) -> str:
        return f"{self.base_url}{self.name}/" if self.base_url and self.policy == "public" else ""

    @property
    def lang(self) -> str:
        return self.language if self.language in STRINGS else "pl"


def list_info(config: Config, lst: ListRecord) -> ListInfo:
    settings = effective_settings(config.list_defaults, lst.settings_json)
    root = config.archive.dir
    return ListInfo(
        id=lst.id, name=lst.name, title=settings.title.strip() or lst.name, description=settings.description,
        language=settings.language, policy=settings.archive_policy, domain=config.server.domain,
        base_url=config.archive.base_url, public_root=root, private_root=root.with_name(root.name + "-private"),
        timezone=settings.timezone,
    )


# -- rendering -------------------------------------------------------------------------------


def escape_html(text: str) -> str:
    """HTML-escaped as the templates' autoescape does it (markupsafe's rules)."""
    return page_escape(text)


def month_of(ts: float, tz: str = "UTC") -> str:
    """YYYY-MM of a time in the zone ``tz`` (the list's: month pages split by local month)."""
    return local_month(ts, tz)


def _size(n: int) -> str:
    if n < 1024:
        return f"{n} B"
    if n < 1024 * 1024:
        return f"{n / 1024:.0f} KB"
    return f"{n / 1024 / 1024:.1f} MB"


def _bytecode_cache() -> jinja2.BytecodeCache | None:
    """Jinja's cache of compiled templates (as __pycache__ is for modules), or None where it cannot be used.

    Compiling the templates took 0.05-0.1 s of every command that writes
    pages.  The cache is Jinja's own: a folder of the system's
    temporary directory private to this user, keyed by each template's
    source checksum, so an edited template is compiled again.
    """
    try:
        return jinja2.FileSystemBytecodeCache()
    except (OSError, RuntimeError):  # no usable temporary folder: compile every time
        return None


class Renderer:
    """Jinja2 (autoescape on) over the templates folder; one per process."""

    def __init__(self) -> None:
        self.env = jinja2.Environment(
            loader=jinja2.FileSystemLoader(str(templates_dir())),
            autoescape=True,
            trim_blocks=True,
            lstrip_blocks=True,
            undefined=jinja2.StrictUndefined,
            auto_reload=False,  # templates are read once per process (no stat per page)
            bytecode_cache=_bytecode_cache(),
        )
        self._templates: dict[str, jinja2.Template] = {}

    def prepare(self) -> None:
        """Compile every template now (before worker processes are forked from this one)."""
        for name in ("month.html", "list_index.html", "search.html",
                     "site_index.html", "redirect.html", "feed.atom"):
            self.template(name)

    def template(self, name: str) -> jinja2.Template:
        tpl = self._templates.get(name)
        if tpl is None:
            tpl = self._templates[name] = self.env.get_template(name)
        return tpl

    def page(self, name: str, info: ListInfo | None, depth: int, **ctx: Any) -> str:
        lang = info.lang if info else ctx.pop("lang", "pl")
        up = "../" * depth
        tz = info.timezone if info else "UTC"
        values: dict[str, Any] = {
            "lang": lang, "t": STRINGS[lang], "csp": CSP, "static": f"{up}static/", "canonical": "", "feed": "",
            "title": "", "info": info, "fmt": lambda ts: fmt_date(ts, tz), "iso": lambda ts: iso_date(ts, tz),
        }
        values.update(ctx)
        return self.template(name).render(values)

    def month_name(self, info: ListInfo, month: str) -> str:
        year, _, mm = month.partition("-")
        try:
            return f"{MONTHS[info.lang][int(mm) - 1]} {year}"
        except (ValueError, IndexError):
            return month


_RENDERER: Renderer | None = None


def renderer() -> Renderer:
    global _RENDERER
    if _RENDERER is None:
        _RENDERER = Renderer()
    return _RENDERER


def labels_for(info: ListInfo) -> Labels:
    t = STRINGS[info.lang]
    return Labels(quoted=t["quoted"], truncated=t["truncated"], forwarded=t["forwarded"])


def make_meta(row_id: int, info: ListInfo, msgid_hash: str, mail: Mail, thread: str, parent: str) -> ArchiveMeta:
    h = mail.headers
    names = [f"{a.filename} ({_size(len(a.data))})" for a in mail.attachments]
    return ArchiveMeta(
        archive_id=row_id, list_id=info.id, msgid_hash=msgid_hash, message_id=h.message_id, thread=thread,
        parent=parent, refs=h.references, date=h.date, month=month_of(h.date, info.timezone), subject=h.subject,
        nsubject=normalize_subject(h.subject), author=h.author, snippet=mail.snippet, search=mail.search,
        attachments=len(mail.attachments), mbox=mbox_entry(mail, names),
    )


def _node(meta: ArchiveMeta) -> Node:
    return Node(key=meta.archive_id, message_id=meta.message_id, references=meta.refs, subject=meta.subject,
                date=meta.date)


def _attachment_links(mail: Mail) -> list[dict[str, str]]:
    return [
        {"path": f"{a.index}/{a.filename}", "name": a.filename, "size": _size(len(a.data)), "type": a.content_type}
        for a in mail.attachments
    ]


def write_message_dir(info: ListInfo, root: Path, meta: ArchiveMeta, mail: Mail, parent: ArchiveMeta | None,
                      replies: Sequence[ArchiveMeta], thread_count: int) -> None:
    r = renderer()
    # One file per message, beside the others (a folder each cost 10,000
    # mkdirs per 10,000 messages, all serialised on m/'s lock); only a
    # message with attachments has a folder, for them.  Strings, not Paths:
    # this runs once per message.
    page_path = f"{root}/{info.name}/m/{meta.msgid_hash}"
    for a in mail.attachments:
        write_atomic(f"{page_path}/{a.index}/{a.filename}", a.data)
    t = STRINGS[info.lang]
    canonical = f"{info.list_url}m/{meta.msgid_hash}.html" if info.list_url else ""
    header_id = mail.headers.message_id
    page = message_page(
        lang=info.lang, t=t, csp=CSP, list_title=info.title, tz=info.timezone,
        title=f"{meta.subject or t['no_subject']} – {info.title}", canonical=canonical, meta=meta,
        month_name=r.month_name(info, meta.month), body=mail.body_html, attachments=_attachment_links(mail),
        parent=parent, replies=sorted(replies, key=lambda m: (m.date, m.archive_id)),
        original_id=mail.original_id if mail.original_id and mail.original_id != header_id else "",
    )
    write_atomic(f"{page_path}.html", page)


def render_thread(info: ListInfo, root: Path, thread: str, metas: Sequence[ArchiveMeta], mails: dict[int, Mail],
                  message_pages: Iterable[int] | None = None) -> dict[int, str]:
    """Write a thread page and the message pages asked for (all when None).

    Returns each message's parent Message-ID within the thread.
    """
    r = renderer()
    order = tree_order([_node(m) for m in metas])
    by_key = {m.archive_id: m for m in metas}
    by_mid: dict[str, ArchiveMeta] = {}
    for m in sorted(metas, key=lambda m: (m.date, m.archive_id)):
        by_mid.setdefault(m.message_id, m)
    replies: dict[str, list[ArchiveMeta]] = {}
    parents: dict[int, str] = {}
    items: list[dict[str, Any]] = []
    for node, depth, parent in order:
        meta = by_key[node.key]
        parents[meta.archive_id] = parent
        if parent:
            replies.setdefault(parent, []).append(meta)
        mail = mails[meta.archive_id]
        items.append({"meta": meta, "depth": depth, "parent": by_mid.get(parent) if parent else None,
                      "body": mail.body_html, "attachments": _attachment_links(mail)})
    if not items:
        _remove_file(root / info.name / "t" / f"{thread}.html")
        return parents
    first: ArchiveMeta = items[0]["meta"]
    t = STRINGS[info.lang]
    page = thread_page(
        lang=info.lang, t=t, csp=CSP, list_title=info.title, tz=info.timezone,
        title=f"{first.subject or t['no_subject']} – {info.title}", subject=first.subject, items=items,
        month=first.month, month_name=r.month_name(info, first.month),
        canonical=f"{info.list_url}t/{thread}.html" if info.list_url else "",
    )
    write_atomic(root / info.name / "t" / f"{thread}.html", page)
    wanted = set(by_key) if message_pages is None else set(message_pages)
    for meta in metas:
        if meta.archive_id not in wanted:
            continue
        parent_meta = by_mid.get(parents.get(meta.archive_id, "")) if parents.get(meta.archive_id) else None
        own = replies.get(meta.message_id, []) if by_mid.get(meta.message_id) is meta else []
        write_message_dir(info, root, meta, mails[meta.archive_id], parent_meta, own, len(metas))
    return parents


def render_month(info: ListInfo, root: Path, month: str, metas: Sequence[ArchiveMeta]) -> None:
    """The month's two pages, its mbox download and its search-index part."""
    r = renderer()
    mdir = root / info.name / month
    if not metas:
        _remove_tree(mdir)
        _remove_file(root / info.name / "search" / f"{month}.js")
        return
    tz = info.timezone
    by_date = sorted(metas, key=lambda m: (m.date, m.archive_id))
    groups: OrderedDict[str, list[ArchiveMeta]] = OrderedDict()
    for m in by_date:
        groups.setdefault(m.thread, []).append(m)
    # The two long lists are written here rather than in the template: the
    # same markup and escaping (markupsafe), a tenth of the time.
    no_subject = STRINGS[info.lang]["no_subject"]
    tree: list[str] = []
    for thread, ms in groups.items():
        by_key = {x.archive_id: x for x in ms}
        entries = [(by_key[node.key], depth) for node, depth, _ in tree_order([_node(m) for m in ms])]
        tree.append(f'<section class="mthread">\n<h2><a href="../t/{thread}.html">'
                    f'{escape_html(entries[0][0].subject or no_subject)}</a></h2>\n<ul class="tree">\n')
        tree.extend(f'<li class="d{min(depth, 8)}"><a href="../m/{m.msgid_hash}.html">'
                    f'{escape_html(m.subject or no_subject)}</a>\n'
                    f'<span class="meta">{escape_html(m.author)} · {fmt_date(m.date, tz)}</span></li>\n'
                    for m, depth in entries)
        tree.append("</ul>\n</section>\n")
    dates = ['<ul class="bydate">\n']
    dates.extend(f'<li><span class="meta">{fmt_date(m.date, tz)}</span> <a href="../m/{m.msgid_hash}.html">'
                 f'{escape_html(m.subject or no_subject)}</a>\n<span class="meta">{escape_html(m.author)}</span></li>\n'
                 for m in by_date)
    dates.append("</ul>\n")
    common = {"month": month, "month_name": r.month_name(info, month), "count": len(metas),
              "title": f"{info.title}: {r.month_name(info, month)}"}
    write_atomic(mdir / "index.html", r.page("month.html", info, 2, view="threads", listing=Markup("".join(tree)),
                                             **common))
    write_atomic(mdir / "date.html", r.page("month.html", info, 2, view="dates", listing=Markup("".join(dates)),
                                            **common))
    write_atomic(mdir / f"{month}.mbox", b"".join(m.mbox for m in by_date))
    records = [[m.msgid_hash, m.subject, m.author, fmt_date(m.date, tz)[:10], m.search] for m in by_date]
    # JSON inside a script file: "</" and U+2028/9 escaped so no text can end or break the script.
    payload = json.dumps(records, ensure_ascii=False, separators=(",", ":"))
    payload = payload.replace("</", "<\\/").replace("\u2028", "\\u2028").replace("\u2029", "\\u2029")
    write_atomic(root / info.name / "search" / f"{month}.js",
                 f"window.listservSearchPart&&window.listservSearchPart({json.dumps(month)},{payload});\n")


def _remove_file(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass


def render_list_home(info: ListInfo, root: Path, months: Sequence[tuple[str, int]],
                     latest: Sequence[ArchiveMeta]) -> None:
    r = renderer()
    threads: OrderedDict[str, dict[str, Any]] = OrderedDict()
    counts: dict[str, int] = {}
    for m in latest:
        counts[m.thread] = counts.get(m.thread, 0) + 1
        if m.thread not in threads:
            threads[m.thread] = {"thread": m.thread, "subject": m.subject, "author": m.author, "date": fmt_date(m.date, info.timezone)}
    latest_threads = [dict(v, count=counts[k]) for k, v in list(threads.items())[:LATEST_THREADS]]
    ldir = root / info.name
    write_atomic(ldir / "index.html", r.page(
        "list_index.html", info, 1, title=info.title, months=months, latest=latest_threads,
        month_names={m: r.month_name(info, m) for m, _ in months}, feed="feed.atom",
        canonical=info.list_url,
    ))
    write_atomic(ldir / "search.html", r.page(
        "search.html", info, 1, title=f"{STRINGS[info.lang]['search']} – {info.title}", months=[m for m, _ in months],
    ))
    entries = list(latest[:FEED_ENTRIES])
    base = info.list_url

    def entry_url(m: ArchiveMeta) -> str:
        return f"{base}m/{m.msgid_hash}.html" if base else f"m/{m.msgid_hash}.html"

    def entry_id(m: ArchiveMeta) -> str:
        # An identifier, not a link: kept in the form older archives used
        # (m/HASH/), so feed readers do not see every entry anew.
        return f"{base}m/{m.msgid_hash}/" if base else f"urn:listserv:{info.name}:{m.msgid_hash}"

    feed = r.page("feed.atom", info, 1, entries=entries, entry_url=entry_url, entry_id=entry_id,
                  feed_id=base or f"urn:listserv:{info.name}", updated=iso_date(entries[0].date if entries else 0, info.timezone))
    write_atomic(ldir / "feed.atom", feed)


def write_static(root: Path) -> None:
    src = templates_dir() / "static"
    for f in sorted(src.iterdir()):
        if f.is_file():
            target = root / "static" / f.name
            data = f.read_bytes()
            if not target.exists() or target.read_bytes() != data:
                write_atomic(target, data)
    # For Apache; other servers: send the same headers (see the README).
    write_atomic(root / ".htaccess", (
        f'Header always set Content-Security-Policy "{CSP}"\n'
        "Header always set X-Content-Type-Options nosniff\n"
        "Header always set Referrer-Policy no-referrer\n"
        '<FilesMatch "\\.(bin|mbox)$">\n  Header set Content-Disposition attachment\n</FilesMatch>\n'
        "AddType application/mbox .mbox\nAddType text/javascript .js\nAddType application/atom+xml .atom\n"
    ))


def render_site_index(root: Path, lists: Sequence[tuple[ListInfo, int]], lang: str) -> None:
    r = renderer()
    rows = [{"name": i.name, "title": i.title, "description": i.description, "count": n} for i, n in lists]
    write_static(root)
    write_atomic(root / "index.html", r.page("site_index.html", None, 0, lang=lang,
                                             title=STRINGS[lang]["site_title"], lists=rows))


# -- full build: the jobs run in worker processes ------------------------------------------


@dataclass(frozen=True, slots=True)
class _ScanJob:
    db: Path
    ids: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class _ThreadJob:
    db: Path
    info: ListInfo
    root: Path
    threads: tuple[tuple[str, tuple[int, ...]], ...]
    hashes: dict[int, str]
    scans: dict[int, HeaderScan]  # read once while threading: the render does not decode headers again


@dataclass(frozen=True, slots=True)
class _MonthJob:
    db: Path
    info: ListInfo
    root: Path
    months: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class _PrescanJob:
    db: Path
    list_id: int
    hashes: tuple[str, ...]
    labels: Labels
    scans: dict[str, HeaderScan]  # by Message-ID: headers the import read already (then only the rest is parsed)


# row id, Message-ID, References, Subject, date; and the headers as parse_mail reads them
Scan = tuple[int, str, tuple[str, ...], str, float, HeaderScan]


def _scan_of(row_id: int, mid: str, scan: HeaderScan) -> Scan:
    h = scan.headers
    return row_id, h.message_id or strip_angles(mid), h.references, h.subject, h.date, scan


def _scan_rows(rows: dict[int, tuple[str, float, bytes]]) -> list[Scan]:
    return [_scan_of(row_id, mid, scan_headers(data, mid, received)) for row_id, (mid, received, data) in rows.items()]


def _scan(job: _ScanJob) -> list[Scan]:
    return _scan_rows(Store.read_archive_data(job.db, job.ids))


# What a build worker has read ahead during an import, kept for the render:
# row id -> the parsed message.  Each worker is its own process (an executor
# of one), so the build sends a thread to the worker that holds most of its
# messages and they are not parsed twice.
_PARSED: dict[int, Mail] = {}
_PARSED_BYTES = 0
PARSED_BUDGET = 96 << 20  # bytes kept per worker; later messages are parsed when rendered (RSS stays bounded)


def _mail_size(mail: Mail) -> int:
    texts = len(mail.body_html) + len(mail.text) + len(mail.search) + len(mail.snippet)
    return 2 * texts + sum(len(a.data) for a in mail.attachments) + 600


def _prescan(job: _PrescanJob) -> tuple[list[Scan], list[int]]:
    """The headers of a stored batch, and its messages parsed and kept here while the budget lasts.

    Returns the scans and the row ids kept.  Both depend only on the stored
    row, which never changes.
    """
    global _PARSED_BYTES
    rows = Store.read_archive_data_by_hash(job.db, job.list_id, job.hashes)
    scans: list[Scan] = []
    kept: list[int] = []
    for row_id, (mid, received, raw) in rows.items():
        known = job.scans.get(mid)
        if _PARSED_BYTES >= PARSED_BUDGET:
            scans.append(_scan_of(row_id, mid, known or scan_headers(raw, mid, received)))
            continue
        if known is not None:
            scan, mail = known, parse_mail(raw, mid, received, job.labels, known)
        else:
            scan, mail = scan_and_parse(raw, mid, received, job.labels)  # the header block split once for both
        scans.append(_scan_of(row_id, mid, scan))
        _PARSED[row_id] = mail
        _PARSED_BYTES += _mail_size(mail)
        kept.append(row_id)
    return scans, kept


# One batch an import gave a worker to read ahead: the worker, its result,
# the batch's hashes, and the headers the import read itself (by Message-ID).
_Prescan = tuple[int, concurrent.futures.Future[tuple[list[Scan], list[int]]], tuple[str, ...], dict[str, HeaderScan]]


# The worker processes of a full build.  An import starts them early and
# has them read each batch it stores (headers, then the whole message) while
# it reads the next one; the build that follows collects the headers,
# threads, and renders each thread where its messages were read.
_WORKERS: list[concurrent.futures.ProcessPoolExecutor] = []
_PRESCANS: dict[tuple[str, int], list[_Prescan]] = {}


def _get_workers(nprocs: int) -> list[concurrent.futures.ProcessPoolExecutor]:
    # A worker that died (killed for memory, say) leaves its executor broken
    # for good: every later job would fail at once.  Its read-ahead is lost
    # (the build reads those messages again); new workers are started.
    broken = any(getattr(w, "_broken", False) for w in _WORKERS)
    if _WORKERS and (len(_WORKERS) != nprocs or broken):
        if broken:
            log.warning("archive: a worker process died; starting new ones")
        _release_pool()
    if not _WORKERS:
        renderer().prepare()  # compiled once here, inherited by every worker
        # Workers forked from this process start at once with everything
        # imported and the templates compiled ("spawn" costs a second of
        # interpreter start-up per worker); elsewhere, spawn.
        method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
        context = multiprocessing.get_context(method)
        _WORKERS.extend(concurrent.futures.ProcessPoolExecutor(1, mp_context=context, initializer=_own_pipes_only,
                                                               initargs=(k,)) for k in range(nprocs))
        for pool in _WORKERS:
            pool.submit(int)  # its worker starts now, with the pipe ends it needs
            # The worker alone writes its results.  A worker killed in the
            # middle of sending one leaves half a result in the pipe; while
            # any other process holds a writing end, the pool's reading
            # thread waits for the rest for ever and the build hangs, where
            # it should see the end of the pipe and call the pool broken.
            _close(getattr(getattr(pool, "_result_queue", None), "_writer", None))
    return _WORKERS


def _pipe_ends(pool: concurrent.futures.ProcessPoolExecutor) -> list[Any]:
    """Both ends of the pipes of one pool (private to the executor; no public handle)."""
    queues = [getattr(pool, name, None) for name in ("_call_queue", "_result_queue", "_executor_manager_thread_wakeup")]
    return [getattr(q, end, None) for q in queues for end in ("_reader", "_writer")]


def _close(end: Any) -> None:
    if end is not None:
        with contextlib.suppress(OSError):
            end.close()


def _own_pipes_only(own: int) -> None:
    """In a worker just forked: close the pipe ends it inherited and does not use.

    Otherwise a worker that dies leaves its pipes open in its sibling: the
    pool's reading thread never sees the end of a half-sent result, and a
    job still queued for it blocks a writer for ever (CPython gh-94777).
    Of its own pool's pipes the worker keeps the end it reads jobs from and
    the end it writes results to: when the parent process dies, the worker
    sees the end of its job pipe and exits instead of waiting for ever.
    Under "spawn" nothing is inherited and the list is empty.
    """
    for k, pool in enumerate(_WORKERS):
        ends = _pipe_ends(pool)
        if k == own:
            call_reader, _, _, result_writer, _, _ = ends
            ends = [e for e in ends if e is not call_reader and e is not result_writer]
        for end in ends:
            _close(end)


def _release_pool() -> None:
    workers = list(_WORKERS)
    _WORKERS.clear()
    _PRESCANS.clear()
    if any(getattr(w, "_broken", False) for w in workers):
        _stop_broken(workers)
    for worker in workers:
        worker.shutdown(wait=True, cancel_futures=True)


def _stop_broken(workers: list[concurrent.futures.ProcessPoolExecutor]) -> None:
    """Stop every worker when one has died, so that the pools shut down at once.

    The healthy workers are killed too rather than left to finish their
    jobs: the build starts again (or stops) anyway.  Each pool's own thread
    then sees its worker dead, fails its jobs and closes its pipes.  In
    Pythons released before the fix of CPython gh-94777 (July 2023) that
    thread did not close the parent's reading end of the job queue, and a
    job still queued blocked the queue's writer, and the shutdown, for
    ever: there it is closed here.  The executors' processes and threads
    have no public handle.
    """
    for worker in workers:
        for process in list((getattr(worker, "_processes", None) or {}).values()):
            with contextlib.suppress(OSError, ValueError):
                process.kill()
    for worker in workers:
        # The pool's thread now sees its worker dead and closes the reading
        # end itself; closing it here at the same moment could close the
        # same descriptor number twice (by then, perhaps, another file's).
        # Only where the thread is still stuck (a Python without the fix)
        # is it closed here.
        thread = getattr(worker, "_executor_manager_thread", None)
        if thread is not None:
            thread.join(timeout=5)
        if thread is None or thread.is_alive():
            _close(getattr(getattr(worker, "_call_queue", None), "_reader", None))


atexit.register(_release_pool)


Failure = tuple[int, str]  # archive row id, why it could not be rendered


class BuildWorkerDied(ListservError):
    """A full build's worker process ended mid-job; the build stopped (the stored messages are kept)."""


def failure_reason(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"[:500]


def _render_threads(job: _ThreadJob) -> tuple[list[ArchiveMeta], list[Failure]]:
    _local.direct = True
    try:
        return _render_threads_direct(job)
    finally:
        _local.direct = False


def _render_threads_direct(job: _ThreadJob) -> tuple[list[ArchiveMeta], list[Failure]]:
    ids = [i for _, ids in job.threads for i in ids]
    data = Store.read_archive_data(job.db, [i for i in ids if i not in _PARSED])
    labels = labels_for(job.info)
    out: list[ArchiveMeta] = []
    failed: list[Failure] = []
    for thread, tids in job.threads:
        mails: dict[int, Mail] = {}
        metas: list[ArchiveMeta] = []
        for i in tids:
            try:
                parsed = _PARSED.pop(i, None)  # read ahead during the import
                if parsed is None:
                    if i not in data:  # planned for this worker's cache, yet not in it: read it now
                        data.update(Store.read_archive_data(job.db, [i]))
                    mid, received, raw = data[i]
                    parsed = parse_mail(raw, mid, received, labels, job.scans.get(i))
                mail = mails[i] = parsed
                metas.append(make_meta(i, job.info, job.hashes[i], mail, thread, ""))
            except Exception as exc:  # noqa: BLE001 - recorded; the other messages go on
                failed.append((i, failure_reason(exc)))
        metas, parents, bad = render_thread_safely(job.info, job.root, thread, metas, mails)
        failed.extend(bad)
        out.extend(_with_parent(m, parents.get(m.archive_id, "")) for m in metas)
    return out, failed


def _with_parent(meta: ArchiveMeta, parent: str) -> ArchiveMeta:
    return meta if meta.parent == parent else meta._replace(parent=parent)


def render_thread_safely(info: ListInfo, root: Path, thread: str, metas: list[ArchiveMeta], mails: dict[int, Mail],
                         message_pages: Iterable[int] | None = None
                         ) -> tuple[list[ArchiveMeta], dict[int, str], list[Failure]]:
    """``render_thread``; if it fails, the messages that fail alone are left out (and returned) and the rest written."""
    try:
        return metas, render_thread(info, root, thread, metas, mails, message_pages), []
    except Exception:  # noqa: BLE001 - find the message(s) at fault
        pass
    good: list[ArchiveMeta] = []
    failed: list[Failure] = []
    scratch = root / info.name / "t" / f".{thread}.probe"
    wanted = None if message_pages is None else set(message_pages)
    for m in metas:
        try:
            # Alone, as a one-message thread in a scratch name, with its own
            # page if that is to be written (the page, or an attachment, may
            # be what fails); the render below writes that page again as the
            # thread shows it.  No other real file is overwritten.
            own_page = (m.archive_id,) if wanted is None or m.archive_id in wanted else ()
            render_thread(info, root, scratch.name, [m], {m.archive_id: mails[m.archive_id]}, own_page)
            good.append(m)
        except Exception as exc:  # noqa: BLE001
            failed.append((m.archive_id, failure_reason(exc)))
    _remove_file(root / info.name / "t" / f"{scratch.name}.html")
    try:
        parents = render_thread(info, root, thread, good, mails, message_pages)
    except Exception as exc:  # noqa: BLE001 - together they still fail: none of this thread is shown
        failed.extend((m.archive_id, failure_reason(exc)) for m in good)
        return [], {}, failed
    return good, parents, failed


def _render_months(job: _MonthJob) -> int:
    _local.direct = True
    try:
        for month in job.months:
            render_month(job.info, job.root, month, Store.read_month_meta(job.db, job.info.id, month))
    finally:
        _local.direct = False
    return len(job.months)


@contextlib.contextmanager
def bulk_work() -> Iterator[None]:
    """For an import or a full build (the CLI's): the cyclic garbage collector runs less often.

    Such a build makes millions of short-lived objects and holds tens of
    thousands of long-lived ones (the headers of every message, their
    derived rows); with the default thresholds the collector ran every 700
    allocations and kept walking the long-lived ones: 3 % of the main
    process's instructions (callgrind).  What the program had imported is
    set aside (``gc.freeze``), and a young collection waits for 20,000
    allocations.  Worker processes forked meanwhile inherit both.
    """
    old = gc.get_threshold()
    gc.freeze()
    gc.set_threshold(max(old[0], 20_000), old[1], old[2])
    try:
        yield
    finally:
        gc.set_threshold(*old)
        gc.unfreeze()


_T = TypeVar("_T")


def _settled(fut: asyncio.Future[_T]) -> asyncio.Future[_T]:
    """``fut``, whose error is taken as seen once it ends.

    When a worker dies, every job still running fails with it; the build
    stops at the first and reports the death once.  The others' errors
    would otherwise each print a "Future exception was never retrieved"
    traceback under the clear error line.
    """
    fut.add_done_callback(lambda f: f.cancelled() or f.exception())
    return fut


def _chunks(items: Sequence[Any], size: int) -> list[list[Any]]:
    return [list(items[i : i + size]) for i in range(0, len(items), size)]


Progress = Callable[[str, int, int], None]


async def build_list(config: Config, store: Store, info: ListInfo, *, workers: int | None = None,
                     progress: Progress | None = None) -> int:
    """Rebuild one list's archive from the store; returns the number of messages.

    The new tree is built beside the old one and swapped in at the end, so
    readers never see a half-built archive and no stale page survives.
    """
    started = time.perf_counter()
    # A list that became private or "none" must disappear from the public folder.
    for root in (info.public_root, info.private_root):
        if root != info.root or info.policy == "none":
            _remove_tree(root / info.name)
    await store.archive_clear_meta(info.id)
    if info.policy == "none":
        return 0
    index = await store.archive_index(info.id)
    hashes = {row_id: msgid_hash for row_id, _, msgid_hash, _ in index}
    # The new tree is rendered into a scratch root (its <name> folder is
    # then renamed into place).
    scratch = info.root / f".{info.name}.scratch"
    _remove_tree(scratch)
    scratch.mkdir(parents=True)
    nprocs = workers or os.cpu_count() or 1
    parallel = nprocs > 1 and len(index) >= PARALLEL_FROM
    renderer().prepare()
    for sub in ("m", "t", "search"):
        (scratch / info.name / sub).mkdir(parents=True, exist_ok=True)
    # Headers an import already read (in the workers, while it stored the
    # mbox), and which worker holds which message parsed.
    known: dict[int, Scan] = {}
    parsed_in: dict[int, int] = {}
    prescans = _PRESCANS.pop((str(store.path), info.id), [])
    by_hash = {msgid_hash: (row_id, mid) for row_id, mid, msgid_hash, _ in index}
    unread: list[_Prescan] = []
    for batch in prescans:
        worker_index, early, batch_hashes, early_scans = batch
        found = [by_hash.get(h) for h in batch_hashes]
        if early.done() or not early_scans or any(f is None or f[1] not in early_scans for f in found):
            unread.append(batch)
            continue
        # A batch the worker is still reading, whose headers the import
        # read itself (the last part of a large mbox): known already.
        for row_id, mid in (f for f in found if f is not None):
            known[row_id] = _scan_of(row_id, mid, early_scans[mid])
            parsed_in[row_id] = worker_index
    prescans = unread
    while prescans:
        finished = [p for p in prescans if p[1].done()]
        prescans = [p for p in prescans if p not in finished]
        for worker_index, early, _, _ in finished:
            try:
                scans, kept = early.result()
            except Exception:  # noqa: BLE001 - read again below
                log.warning("archive: an early header scan failed; reading those headers again", exc_info=True)
                continue
            known.update((scan[0], scan) for scan in scans)
            parsed_in.update((row_id, worker_index) for row_id in kept)
        if not prescans:
            break
        # The import's last batches, still being read by the workers: the
        # last one's headers are read here too (``scan_headers`` gives what
        # the worker's ``scan_and_parse`` gives), while the workers work
        # through the earlier ones; the two meet in the middle, and the
        # list is threaded while the workers finish, not after.  The
        # messages stay with their worker, which renders them once parsed.
        worker_index, _, batch_hashes, _ = prescans.pop()
        rows = await asyncio.to_thread(Store.read_archive_data_by_hash, store.path, info.id, batch_hashes)
        known.update((scan[0], scan) for scan in await asyncio.to_thread(_scan_rows, rows))
        parsed_in.update((row_id, worker_index) for row_id in rows)
    pool = _get_workers(nprocs) if parallel else []
    if not pool:
        _release_pool()
        parsed_in.clear()
    loop = asyncio.get_running_loop()

    async def run(fn: Callable[[Any], Any], jobs: Sequence[Any]) -> list[Any]:
        if not pool:
            return [await asyncio.to_thread(fn, j) for j in jobs]
        return list(await asyncio.gather(*(loop.run_in_executor(pool[k % len(pool)], fn, j)
                                           for k, j in enumerate(jobs))))

    try:
        total = len(index)
        if progress:
            progress("threading", 0, total)
        missing = [row[0] for row in index if row[0] not in known]
        scan_size = max(250, -(-len(missing) // (nprocs * 3)))
        for part in await run(_scan, [_ScanJob(store.path, tuple(c)) for c in _chunks(missing, scan_size)]):
            known.update((scan[0], scan) for scan in part)
        nodes = [Node(key=row_id, message_id=mid, references=refs, subject=subject, date=date)
                 for row_id, mid, refs, subject, date, _ in (known[row[0]] for row in index)]
        placed = thread_messages(nodes)
        by_thread: dict[str, list[int]] = {}
        for node in sorted(nodes, key=lambda n: (n.date, n.key)):
            by_thread.setdefault(message_id_hash(placed[node.key].thread), []).append(node.key)
        # Each thread goes to the worker that read most of its messages
        # ahead; ties and threads read by none go to the least loaded one
        # (a message parsed here costs about three it only renders).
        lanes = max(1, len(pool))
        planned: list[list[tuple[str, tuple[int, ...]]]] = [[] for _ in range(lanes)]
        loads = [0] * lanes
        for thread, ids in by_thread.items():
            held = [0] * lanes
            for i in ids:
                w = parsed_in.get(i)
                if w is not None and w < lanes:
                    held[w] += 1
            lane = max(range(lanes), key=lambda w: (held[w], -loads[w]))
            planned[lane].append((thread, tuple(ids)))
            loads[lane] += held[lane] + 3 * (len(ids) - held[lane])

        def jobs_of(lane: int) -> Iterator[_ThreadJob]:
            batch: list[tuple[str, tuple[int, ...]]] = []
            size = 0
            for thread, ids in [*planned[lane], ("", ())]:
                if ids:
                    batch.append((thread, ids))
                    size += len(ids)
                if batch and (size >= THREAD_JOB or not ids):
                    wanted = [i for _, t in batch for i in t]
                    yield _ThreadJob(store.path, info, scratch, tuple(batch), {i: hashes[i] for i in wanted},
                                     {i: known[i][5] for i in wanted if parsed_in.get(i) != lane})
                    batch, size = [], 0

        done = 0
        failures: list[Failure] = []
        early_months: dict[str, asyncio.Future[int]] = {}
        month_of_row: dict[int, str] = {}
        expected: dict[str, int] = {}
        if not pool:
            for job in jobs_of(0):
                metas, bad = await asyncio.to_thread(_render_threads, job)
                failures += bad
                await store.archive_put_meta(metas, count_months=False)
                done += len(metas)
                if progress:
                    progress("pages", done, total)
        else:
            # A month's pages are written as soon as its last message is
            # stored, while the workers go on with later threads.  Its
            # messages are counted from the headers; a month whose count
            # turns out different is written again at the end.
            month_of_row.update((row[0], month_of(known[row[0]][4], info.timezone)) for row in index)
            left = collections.Counter(month_of_row.values())
            expected.update(left)
            month_lane: dict[str, int] = {}

            def account(row_ids: Iterable[int]) -> None:
                for row_id in row_ids:
                    month = month_of_row.get(row_id)
                    if month is None:
                        continue
                    left[month] -= 1
                    if left[month] == 0:
                        # To the worker with the least queued (thread jobs and months not yet written).
                        queued = collections.Counter(running.values())
                        queued.update(month_lane[m] for m, f in early_months.items() if not f.done())
                        lane = min(range(lanes), key=lambda w: (queued[w], w))
                        month_lane[month] = lane
                        early_months[month] = _settled(loop.run_in_executor(
                            pool[lane], _render_months, _MonthJob(store.path, info, scratch, (month,))))

            # Two jobs per worker at a time, not all.  Finished rows are
            # stored META_BATCH at a time, in the background while the
            # workers go on: every commit writes again the index pages it
            # touched (10,000 rows cost 0.77 CPU-seconds stored 400 a
            # commit, 0.54 stored 2,500 a commit).
            queues = [jobs_of(lane) for lane in range(lanes)]
            running: dict[asyncio.Future[tuple[list[ArchiveMeta], list[Failure]]], int] = {}
            waiting: list[ArchiveMeta] = []
            waiting_ids: list[int] = []
            storing: asyncio.Task[None] | None = None

            dry: set[int] = set()

            def submit(lane: int) -> None:
                job = next(queues[lane], None)
                if job is None:
                    dry.add(lane)
                else:
                    running[_settled(loop.run_in_executor(pool[lane], _render_threads, job))] = lane

            async def store_rows(metas: list[ArchiveMeta], row_ids: list[int], before: asyncio.Task[None] | None) -> None:
                if before is not None:
                    await before
                await store.archive_put_meta(metas, count_months=False)
                account(row_ids)

            for lane in range(lanes):
                submit(lane)
                submit(lane)
            while running:
                ready, _ = await asyncio.wait(running, return_when=asyncio.FIRST_COMPLETED)
                for fut in ready:
                    metas, bad = fut.result()
                    waiting += metas
                    waiting_ids += [m.archive_id for m in metas] + [aid for aid, _ in bad]
                    failures += bad
                    done += len(metas)
                    submit(running.pop(fut))
                # Once a worker has no job left to start, each job's rows are stored
                # as it comes back: the last batch, stored after the
                # workers are done (and the months wait for), stays small.
                if len(waiting) >= META_BATCH or not running or dry:
                    storing = asyncio.create_task(store_rows(waiting, waiting_ids, storing))
                    waiting, waiting_ids = [], []
                if progress:
                    progress("pages", done, total)
            if storing is not None:
                await storing
        if failures:
            await store.archive_record_failures(info.id, failures)
            for aid, reason in failures:
                log.error("archive: message %s of %s cannot be rendered (%s); see `listserv archive status`",
                          aid, info.name, reason)
        if progress:
            progress("months", 0, 1)
        await store.archive_recount_months(info.id)
        months = await store.archive_months(info.id)
        # Every month not written early, and any whose final count is not the one expected.
        failed_in = collections.Counter(month_of_row.get(aid) for aid, _ in failures)
        month_names = [m for m, n in months if m not in early_months or expected.get(m) != n + failed_in[m]]
        # A month written again waits for its early writing (same files).
        await asyncio.gather(*(early_months.pop(m) for m in month_names if m in early_months))
        late_months = asyncio.ensure_future(run(_render_months, [
            _MonthJob(store.path, info, scratch, tuple(c))
            for c in _chunks(month_names, max(1, len(month_names) // (nprocs * 2) + 1))]))
        try:
            # The list home needs the month counts, not the month pages:
            # written here while the workers write the last months.
            if progress:
                progress("home", 0, 1)
            latest = await store.archive_latest(info.id, 400)
            await asyncio.to_thread(render_list_home, info, scratch, months, latest)
        finally:
            await asyncio.gather(late_months, *early_months.values())
    except concurrent.futures.process.BrokenProcessPool as exc:
        # The scratch tree is left half-built; the archive in place is untouched.
        raise BuildWorkerDied(
            f"a worker process building the archive of {info.name} died (killed, perhaps for memory); "
            f"the messages are stored: `listserv archive build {info.name}` writes the pages") from exc
    finally:
        _release_pool()
    if progress:
        progress("swap", 0, 1)
    built = scratch / info.name
    built.mkdir(parents=True, exist_ok=True)
    old = info.root / f".{info.name}.old"
    _remove_tree(old)
    final = info.dir
    if final.exists():
        os.replace(final, old)
    os.replace(built, final)
    _remove_tree(old)
    _remove_tree(scratch)
    await store.archive_note_build(info.id, full_seconds=time.perf_counter() - started, messages=len(index))
    return len(index)


def has_old_layout(info: ListInfo) -> bool:
    """Whether the list's pages were built with a folder per message (``m/HASH/index.html``: older listserv).

    Such an archive is rebuilt whole (``build_list``) before anything is
    added to it: the pages written now link to ``m/HASH.html``.  A message
    folder now holds only attachments (numbered subfolders), never an index.
    """
    messages = info.dir / "m"
    try:
        with os.scandir(messages) as entries:
            for entry in entries:
                if entry.is_dir(follow_symlinks=False) and os.path.exists(os.path.join(entry.path, "index.html")):
                    return True
    except OSError:
        return False
    return False


async def write_site_indexes(config: Config, store: Store) -> None:
    """The "all lists" page of the public folder and of the private one."""
    public: list[tuple[ListInfo, int]] = []
    private: list[tuple[ListInfo, int]] = []
    lang = config.list_defaults.language if config.list_defaults.language in STRINGS else "pl"
    for lst in await store.lists():
        info = list_info(config, lst)
        if info.policy == "none":
            continue
        count = sum(n for _, n in await store.archive_months(info.id))
        (public if info.policy == "public" else private).append((info, count))
    root = config.archive.dir
    render_site_index(root, public, lang)
    if private or root.with_name(root.name + "-private").exists():
        render_site_index(root.with_name(root.name + "-private"), private, lang)


# -- incremental ------------------------------------------------------------------------------


COALESCE_DELAY = 0.0  # seconds a first post waits for others (posts arriving meanwhile are batched anyway)


class Archiver:
    """Keeps the archive up to date while the server runs; one update at a time.

    ``on_archived`` is the fan-out's hook: it returns at once and the work runs
    in a background task (CPU work in a thread), so delivery never waits for
    the archive.  Failures are logged; ``listserv archive build`` repairs.
    """

    def __init__(self, config: Config, store: Store, cache_size: int = 2000) -> None:
        self.config = config
        self.store = store
        self._lock = asyncio.Lock()
        self._tasks: set[asyncio.Task[None]] = set()
        self._pending: list[tuple[str, str]] = []
        self._mails: OrderedDict[int, Mail] = OrderedDict()
        self._cache_size = cache_size
        # Months whose pages an update changed besides its own (threads merged across months).
        self._months: dict[str, set[str]] = {}
        self._layout_checked: set[str] = set()

    async def on_archived(self, list_name: str, msgid_hash: str) -> None:
        # Posts that arrive close together are added as one batch: each gets
        # its message and thread pages, and the month pages, the list home
        # and the feed (which grow with the month) are written once per batch.
        self._pending.append((list_name, msgid_hash))
        if not self._tasks:
            task = asyncio.create_task(self._drain(), name="archive-updates")
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _drain(self) -> None:
        while self._pending:
            await asyncio.sleep(COALESCE_DELAY)
            batch, self._pending = self._pending, []
            touched: dict[str, set[str]] = {}
            for list_name, msgid_hash in batch:
                try:
                    month = await self.add(list_name, msgid_hash, pages=False)
                except Exception as exc:  # noqa: BLE001 - the archive is derived; a rebuild repairs it
                    log.exception("archive update failed list=%s hash=%s; `listserv archive build` repairs it",
                                  list_name, msgid_hash)
                    await self.store.record_stage_error("archive", f"archive update failed list={list_name}: {exc!r}")
                    continue
                if month is not None:
                    touched.setdefault(list_name, set()).add(month)
                touched.setdefault(list_name, set()).update(self._months.pop(list_name, set()))
            for list_name, months in touched.items():
                try:
                    async with self._lock:
                        await self._render_pages(await self._info(list_name), months)
                except Exception as exc:  # noqa: BLE001
                    log.exception("archive pages of %s failed; `listserv archive build` repairs them", list_name)
                    await self.store.record_stage_error("archive", f"archive pages of {list_name} failed: {exc!r}")

    async def catch_up(self, owner: str, now: float, until: float, limit: int = 200) -> int:
        """The archive stage's step: claim archive rows not yet rendered, add them, record it.

        The queue is in the store (``render_pending``), so posts stored while
        no archive stage ran (a crash, a stop) are added when one runs again.
        Returns how many rows were claimed.
        """
        work = await self.store.claim_archive_work(owner, now, until, limit)
        touched: dict[str, set[str]] = {}
        for _, list_name, msgid_hash in work:
            try:
                month = await self.add(list_name, msgid_hash, pages=False)
            except Exception as exc:  # noqa: BLE001 - the archive is derived; a rebuild repairs it
                log.exception("archive update failed list=%s hash=%s; `listserv archive build` repairs it",
                              list_name, msgid_hash)
                await self.store.record_stage_error("archive", f"archive update failed list={list_name}: {exc!r}")
                continue
            if month is not None:
                touched.setdefault(list_name, set()).add(month)
        for list_name, months in touched.items():
            try:
                async with self._lock:
                    await self._render_pages(await self._info(list_name), months)
            except Exception as exc:  # noqa: BLE001
                log.exception("archive pages of %s failed; `listserv archive build` repairs them", list_name)
                await self.store.record_stage_error("archive", f"archive pages of {list_name} failed: {exc!r}")
        # Done with, rendered or not: a failure is logged and left to `archive build`,
        # never retried in a loop.
        await self.store.archive_rendered([row_id for row_id, _, _ in work])
        return len(work)

    async def idle(self) -> None:
        """Wait until every update started so far has finished (tests, shutdown)."""
        while self._tasks or self._pending:
            if not self._tasks:  # pending without a drainer: start one
                task = asyncio.create_task(self._drain(), name="archive-updates")
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    async def _info(self, list_name: str) -> ListInfo:
        return list_info(self.config, await self.store.get_list(list_name))

    async def _mails_for(self, info: ListInfo, metas: Sequence[ArchiveMeta]) -> dict[int, Mail]:
        out: dict[int, Mail] = {}
        missing = []
        for m in metas:
            mail = self._mails.get(m.archive_id)
            if mail is None:
                missing.append(m.archive_id)
            else:
                self._mails.move_to_end(m.archive_id)
                out[m.archive_id] = mail
        if missing:
            data = await self.store.archive_data(missing)
            labels = labels_for(info)

            def parse_all() -> dict[int, Mail]:
                return {i: parse_mail(raw, mid, at, labels) for i, (mid, at, raw) in data.items()}

            parsed = await asyncio.to_thread(parse_all)
            for i, mail in parsed.items():
                self._remember(i, mail)
            out.update(parsed)
        return out

    def _remember(self, archive_id: int, mail: Mail) -> None:
        self._mails[archive_id] = mail
        self._mails.move_to_end(archive_id)
        while len(self._mails) > self._cache_size:
            self._mails.popitem(last=False)

    async def add(self, list_name: str, msgid_hash: str, *, pages: bool = True) -> str | None:
        """Put one stored message into the built archive, rewriting only what it changes.

        With ``pages=False`` the month pages, list home and feed are left to
        the caller (``_render_pages``, once for a batch).  Returns the month,
        or None when nothing was added.  A message that cannot be rendered is
        recorded (``listserv archive status``) and logged; this never raises
        for the message's sake.
        """
        async with self._lock:
            info = await self._info(list_name)
            if info.policy == "none":
                return None
            if info.name not in self._layout_checked:
                self._layout_checked.add(info.name)
                if await asyncio.to_thread(has_old_layout, info):
                    # Built by an older listserv (a folder per message): the
                    # new pages would link to files that are not there yet.
                    log.warning("archive of %s has the old m/HASH/index.html layout: rebuilding it", info.name)
                    await build_list(self.config, self.store, info, workers=1)
                    return None
            row = await self.store.archive_row(info.id, msgid_hash)
            if row is None or row.removed:
                return None
            try:
                month = await self._add_row(info, row, pages=pages)
            except Exception as exc:  # noqa: BLE001 - recorded; every other message goes on
                log.exception("archive: message %s of %s cannot be rendered; see `listserv archive status`",
                              row.message_id, list_name)
                await self.store.archive_drop_meta([row.id])
                await self.store.archive_record_failures(info.id, [(row.id, failure_reason(exc))])
                return None
            await self.store.archive_note_build(info.id)
            return month

    async def _add_row(self, info: ListInfo, row: ArchiveRow, *, pages: bool) -> str | None:
        mail = await asyncio.to_thread(parse_mail, row.data, row.message_id, row.received_at, labels_for(info))
        self._remember(row.id, mail)
        h = mail.headers
        if mail.original_id and mail.original_id != h.message_id:
            log.info("archive: %s reuses the Message-ID <%s> of another post; archived as <%s>",
                     info.name, mail.original_id, h.message_id)
        meta = make_meta(row.id, info, row.msgid_hash, mail, "", "")
        # The threads this message touches: those of the messages it names,
        # of the replies that name it (they may have come first), and the one
        # the subject fallback picks.  Re-threading them together, with the
        # same function the full build runs, merges two threads it links and
        # re-parents early replies exactly as `archive build --full` would.
        known = await self.store.archive_meta_by_message_ids(info.id, h.references)
        # Replies to it, and messages naming the same (perhaps missing) ancestors.
        early = await self.store.archive_meta_referring_any(info.id, [*h.references, h.message_id])
        threads = {m.thread for m in known} | {m.thread for m in early}
        if not h.references and is_reply_subject(h.subject):
            same = await self.store.archive_meta_by_subject(info.id, normalize_subject(h.subject), h.date)
            if same is not None:
                threads.add(same.thread)
        group: dict[int, ArchiveMeta] = {}
        for thread in sorted(threads):
            for m in await self.store.archive_thread_meta(info.id, thread):
                group[m.archive_id] = m
        group.pop(row.id, None)
        group[row.id] = meta
        placed = thread_messages(_node(m) for m in sorted(group.values(), key=lambda m: (m.date, m.archive_id)))
        changed: list[ArchiveMeta] = []
        for aid, m in group.items():
            where = placed[aid]
            new = m._replace(thread=message_id_hash(where.thread), parent=where.parent)
            if aid == row.id or (new.thread, new.parent) != (m.thread, m.parent):
                changed.append(new)
            group[aid] = new
        meta = group[row.id]
        await self.store.archive_put_meta(changed)
        await self.store.archive_clear_failures(info.id, [row.id])
        new_threads = {m.thread for m in group.values()}
        gone = threads - new_threads
        others = [m for m in changed if m.archive_id != row.id]
        for thread in sorted(new_threads):
            touched = [m for m in changed if m.thread == thread]
            if not touched:
                continue
            moved = any(m.archive_id != row.id for m in touched)
            await self._rerender(info, thread, set(), around=meta if thread == meta.thread else None,
                                 merged=sorted(gone) if thread == meta.thread else (),
                                 all_messages=moved, pages=False)
        months = {meta.month} | {m.month for m in others}
        if pages:
            await self._render_pages(info, months)
        else:
            self._months.setdefault(info.name, set()).update(months - {meta.month})
        return meta.month

    async def _rerender(self, info: ListInfo, thread: str, months: set[str], *, around: ArchiveMeta | None,
                        merged: Iterable[str] = (), all_messages: bool = False, pages: bool = True) -> None:
        root = info.root
        metas = await self.store.archive_thread_meta(info.id, thread)
        mails = await self._mails_for(info, metas)
        wanted: set[int] | None = None
        if around is not None and not merged and not all_messages:
            related = {around.parent, around.message_id}
            wanted = {m.archive_id for m in metas
                      if m.message_id in related or around.message_id in m.refs[-1:]}

        def render() -> None:
            render_thread(info, root, thread, metas, mails, wanted)
            for old in merged:
                write_atomic(root / info.name / "t" / f"{old}.html",
                             renderer().page("redirect.html", info, 2, target=f"{thread}.html", title=info.title))

        await asyncio.to_thread(render)
        if pages:
            await self._render_pages(info, months)

    async def _render_pages(self, info: ListInfo, months: set[str]) -> None:
        """The pages that list a month's or the list's messages: month views, list home, feed, site index."""
        root = info.root
        months_list = await self.store.archive_months(info.id)
        month_rows = {m: await self.store.archive_month_meta(info.id, m, with_mbox=True) for m in months}
        latest = await self.store.archive_latest(info.id, 400)

        def render() -> None:
            for month, rows in month_rows.items():
                render_month(info, root, month, rows)
            render_list_home(info, root, months_list, latest)
            if not (root / "static" / "archive.css").exists():
                write_static(root)

        await asyncio.to_thread(render)
        if len(months_list) <= len(months) or not (root / "index.html").exists():
            await write_site_indexes(self.config, self.store)

    async def remove(self, message_id: str) -> int:
        """Take a message down (GDPR request): mark it removed and rewrite its pages."""
        async with self._lock:
            metas = await self.store.archive_remove(message_id)
            for meta in metas:
                lst = await self.store.get_list_by_id(meta.list_id)
                info = list_info(self.config, lst)
                self._mails.pop(meta.archive_id, None)
                if info.policy == "none":
                    continue
                await asyncio.to_thread(_remove_tree, info.dir / "m" / meta.msgid_hash)  # attachments
                await asyncio.to_thread(_remove_file, info.dir / "m" / f"{meta.msgid_hash}.html")
                await self._rerender(info, meta.thread, {meta.month}, around=None, all_messages=True)
            return len(metas)


# -- import ---------------------------------------------------------------------------------------

_MSGID_HEADER = re.compile(rb"(?im)^message-id:[ \t]*(?:\r?\n[ \t]+)?(<[^>\r\n]+>|[^\s]+)")
_NO_ARCHIVE = re.compile(rb"(?im)^(?:x-no-archive|archive)[ \t]*:")  # not List-Archive:
_DATE_HEADER = re.compile(rb"(?im)^date:[ \t]*([^\r\n]+)")
_FROM_LINE = re.compile(rb"^From \S*\s+(.+?)\s*$")


def read_mbox(path: Path, block: int = 8 << 20) -> Iterator[tuple[bytes, float | None]]:
    """The messages of an mbox file (mboxrd/mboxo), with the date of each "From " line.

    A "From " line after a blank line (or first in the file) starts a
    message; ">From " lines lose one ">"; trailing blank lines are dropped.
    The file is read in large blocks and split with one regular expression.
    """
    with open(path, "rb") as fh:
        first = fh.read(block)
        if first.startswith(_BOM):  # a byte-order mark an editor put before the first "From " line
            first = first[len(_BOM):]
        buf = b"\n\n" + first  # as if a blank line came before the file
        start = -1  # where the current message's "From " line starts
        eof = False
        while True:
            for p in _separators(buf, start + 1 if start >= 0 else 0):
                if start >= 0:
                    yield _message_at(buf, start, p)
                elif p > 2 and buf[2:p].strip():  # text before the first "From " line (blank lines are not a message)
                    yield _unescape(_finish_bytes(buf[2:p])), None
                start = p
            if eof:
                break
            if start > 0:
                buf, start = buf[start:], 0
            more = fh.read(block)
            if not more:
                eof = True
                if start < 0:
                    rest = buf[2:]
                    if rest.strip():
                        yield _unescape(_finish_bytes(rest)), None
                    return
                yield _message_at(buf, start, len(buf))
                return
            buf += more




_BOM = b"\xef\xbb\xbf"


def read_messages(path: Path) -> Iterator[tuple[bytes, float | None]]:
    """An mbox's messages; a file that does not start with a "From " line is one message (.eml).

    A byte-order mark and blank lines before the first "From " line do
    not make an mbox one message.
    """
    with open(path, "rb") as fh:
        start = fh.read(64 * 1024)
    if start.removeprefix(_BOM).lstrip(b"\r\n").startswith(b"From "):
        yield from read_mbox(path)
        return
    data = path.read_bytes()
    if data.strip():
        yield data, None


def _separators(buf: bytes, pos: int) -> Iterator[int]:
    """Offsets of the "From " lines that follow a blank line."""
    while True:
        at = buf.find(b"\nFrom ", pos)
        if at < 0:
            return
        pos = at + 1
        if at >= 1 and (buf[at - 1] == 10 or (buf[at - 1] == 13 and at >= 2 and buf[at - 2] == 10)):
            yield at + 1
_UNESCAPE = re.compile(rb"(?m)^>(>*From )")


def _message_at(buf: bytes, start: int, end: int) -> tuple[bytes, float | None]:
    eol = buf.find(b"\n", start, end)
    line_end = end if eol < 0 else eol + 1
    m = _FROM_LINE.match(buf[start:line_end])
    when = _mbox_date(m.group(1)) if m else None
    return _unescape(_finish_bytes(buf[line_end:end])), when


def _finish_bytes(body: bytes) -> bytes:
    """Without its trailing blank lines."""
    while body:
        if body.endswith(b"\n\n"):
            body = body[:-1]
        elif body.endswith(b"\n\r\n"):
            body = body[:-2]
        elif body in (b"\n", b"\r\n"):
            return b""
        else:
            break
    return body


def _unescape(body: bytes) -> bytes:
    return _UNESCAPE.sub(rb"\1", body) if b">From " in body else body


_MONTH_NUMBERS = {m.encode(): i for i, m in enumerate(calendar.month_abbr) if m}
_FROM_DATE = re.compile(rb"[A-Z][a-z]{2} +([A-Z][a-z]{2}) +(\d{1,2}) (\d\d):(\d\d):(\d\d) (\d{4})")


def _mbox_date(text: bytes) -> float | None:
    # The usual ctime() shape read directly (time.strptime was a tenth of an import).
    m = _FROM_DATE.match(text)
    if m is not None and m.group(1) in _MONTH_NUMBERS:
        try:
            return float(calendar.timegm((int(m.group(6)), _MONTH_NUMBERS[m.group(1)], int(m.group(2)),
                                          int(m.group(3)), int(m.group(4)), int(m.group(5)), 0, 0, 0)))
        except (ValueError, OverflowError):
            pass
    try:
        return calendar.timegm(time.strptime(text.decode("ascii", "replace")[:24], "%a %b %d %H:%M:%S %Y"))
    except ValueError:
        return None


def _find_header(pattern: re.Pattern[bytes], head: bytes, lower: bytes, name: bytes) -> re.Match[bytes] | None:
    """``pattern.search(head)`` for a ``(?im)^name:`` pattern, tried only where a line starts with ``name``.

    ``lower`` is ``head.lower()`` and ``name`` lower case: two C-speed
    finds instead of a case-insensitive regular expression tried at every
    byte of every header (a third of ``import_entry``'s time).
    """
    line = b"\n" + name
    at = 0 if lower.startswith(name) else lower.find(line)
    while at >= 0:
        at += lower[at] == 10  # past the line break: match at the line's start
        m = pattern.match(head, at)
        if m is not None:
            return m
        at = lower.find(line, at)
    return None


def import_entry(raw: bytes, from_date: float | None) -> tuple[str, str, float, bytes] | None:
    """(Message-ID, hash, received_at, data) for one imported message; None if it asks not to be archived."""
    head_end = raw.find(b"\n\n")
    # A CRLF blank line before the first LF one (searched only up to it).
    crlf_end = raw.find(b"\r\n\r\n", 0, head_end + 1 if head_end >= 0 else len(raw))
    if head_end < 0 or crlf_end >= 0:
        head_end = crlf_end
    head = raw if head_end < 0 else raw[:head_end]
    lower = head.lower()
    if (_find_header(_NO_ARCHIVE, head, lower, b"x-no-archive") or _find_header(_NO_ARCHIVE, head, lower, b"archive")) \
            and archiving_refused(raw):
        return None
    m = _find_header(_MSGID_HEADER, head, lower, b"message-id:")
    mid = strip_angles(m.group(1).decode("utf-8", "replace")) if m else ""
    if not mid:
        mid = fallback_message_id(raw)
    received = from_date if from_date is not None else time.time()
    d = _find_header(_DATE_HEADER, head, lower, b"date:")
    if d:
        try:
            parsed = email.utils.parsedate_tz(d.group(1).decode("ascii", "replace"))
            if parsed is not None:
                received = float(email.utils.mktime_tz(parsed))
        except (ValueError, OverflowError, TypeError, IndexError):
            pass
    return mid, message_id_hash(mid), received, raw


PRESCAN_FROM = 2_000_000  # bytes of mbox from which an import reads headers in worker processes
PRESCAN_JOB = 500
# The first batch is small so that a worker starts on it early (500 took
# 0.1 s to read and store while the other core waited); batches then double.
FIRST_BATCH = 125
# From this share of the mbox on, an import reads each batch's headers itself
# (the workers, which also parse every message, fall behind by about a
# third of the file).
MAIN_SCAN_FROM = 0.6


async def import_mbox(store: Store, info: ListInfo, path: Path, progress: Progress | None = None,
                      batch: int = 1000) -> tuple[int, int]:
    """Store every message of an mbox in the list's archive; returns (read, new).

    Batches grow from 125 messages to ``batch`` (1,000: the build workers
    get each batch to read while the next is read and stored; larger
    batches left them a backlog at the end of the import).  For a large mbox on more
    than one core, each stored batch is read (headers, then the whole
    message) in the build's worker processes while the next batch is read,
    and ``build_list`` picks the results up.
    """
    read = new = 0
    pending: list[tuple[str, str, float, bytes]] = []
    size = max(path.stat().st_size, 1)
    done_bytes = 0
    nprocs = os.cpu_count() or 1
    prescan = nprocs > 1 and size >= PRESCAN_FROM and info.policy != "none"
    workers = _get_workers(nprocs) if prescan else []
    key = (str(store.path), info.id)
    step = min(FIRST_BATCH, batch)
    labels = labels_for(info)
    jobs = 0

    async def store_batch(pending: list[tuple[str, str, float, bytes]], done_bytes: int) -> int:
        nonlocal jobs
        stored: list[tuple[str, str, float, bytes]] = []
        count = await store.archive_import(info.id, pending, stored)
        # The last part of a large mbox: its headers are read here, from
        # the bytes at hand, rather than by the workers, which are behind
        # by then.  When the import ends, the list is threaded at once; the
        # workers only parse the rest of those messages.
        own_scans = ({mid: scan_headers(data, mid, at) for mid, _, at, data in stored}
                     if workers and done_bytes >= MAIN_SCAN_FROM * size else {})
        for chunk in _chunks([h for _, h, _, _ in pending], PRESCAN_JOB):
            in_chunk = set(chunk)
            if workers:
                # To the worker with the fewest batches still to read (the
                # first on a tie: consecutive chunks then alternate, and a
                # thread's messages are usually close together in an mbox).
                # Workers do not go at the same pace (the main process
                # takes a core's share too); a fixed rotation left one
                # behind by several batches at the end of the import.
                waiting = [0] * len(workers)
                for w, f, _, _ in _PRESCANS.get(key, []):
                    waiting[w] += not f.done()
                lane = min(range(len(workers)), key=lambda w: (waiting[w], (w - jobs) % len(workers)))
                chunk_scans = {mid: own_scans[mid] for mid, h, _, _ in stored if h in in_chunk and mid in own_scans}
                future = workers[lane].submit(_prescan, _PrescanJob(store.path, info.id, tuple(chunk), labels,
                                                                    chunk_scans))
                _PRESCANS.setdefault(key, []).append((lane, future, tuple(chunk), chunk_scans))
                jobs += 1
        return count

    # A batch is stored (its commit waits for the disk) while the next one
    # is read: one store at a time, in order; the reading lets the store go
    # on every 50 messages.
    storing: asyncio.Future[int] | None = None
    try:
        for raw, when in read_messages(path):
            read += 1
            done_bytes += len(raw)
            entry = import_entry(raw, when)
            if entry is not None:
                pending.append(entry)
            if len(pending) >= step:
                if storing is not None:
                    new += await storing
                storing = asyncio.ensure_future(store_batch(pending, done_bytes))
                pending = []
                step = min(step * 2, batch)
                if progress:
                    progress("import", min(done_bytes, size), size)
            elif storing is not None and read % 50 == 0:
                await asyncio.sleep(0)
    except BaseException:
        if storing is not None:  # the batch being stored is finished (or fails) before the error goes up
            await asyncio.gather(storing, return_exceptions=True)
        raise
    if storing is not None:
        new += await storing
    if pending:
        new += await store_batch(pending, done_bytes)
    if progress:
        progress("import", size, size)
    return read, new


def escape(text: str) -> str:
    """HTML-escape and hide addresses (for callers outside the templates)."""
    return html.escape(hide_addresses(text))
