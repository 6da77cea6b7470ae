"""The archive's two most numerous pages, message and thread, written without Jinja; and local time.

A full build writes one message page per message and one thread page per
thread: profiling showed Jinja's per-page overhead (context, blocks,
attribute lookups, markupsafe objects) to be a fifth of the build.  These
functions write the same markup as ``base.html`` with every value escaped by
``escape`` (markupsafe's, as autoescape does) and take the body as the
already-safe HTML fragment ``archive_render`` made.

Dates: every page shows the list's local time (``timezone`` setting, IANA
name through zoneinfo) with its UTC offset, and feeds use RFC 3339 §5.6 with
the offset.  Month pages split by the local month.
"""

from __future__ import annotations

import datetime
import functools
import math
import re
import time
import zoneinfo
from collections.abc import Sequence
from typing import Any

from markupsafe import escape as _escape

from listserv.archive_types import ArchiveMeta

__all__ = ["fmt_date", "iso_date", "local_month", "message_page", "thread_page", "zone"]


@functools.lru_cache(maxsize=64)
def zone(name: str) -> datetime.tzinfo:
    """The zone by IANA name; UTC for a name zoneinfo does not know (the setting is validated)."""
    try:
        return zoneinfo.ZoneInfo(name)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError):
        return datetime.timezone.utc


def _local(ts: float, tz: str) -> datetime.datetime:
    try:
        return datetime.datetime.fromtimestamp(ts, zone(tz))
    except (OverflowError, OSError, ValueError):
        return datetime.datetime.fromtimestamp(0, zone(tz))


@functools.lru_cache(maxsize=65536)
def _span_offset(start: int, length: int, tz: str) -> int:
    """The zone's UTC offset in seconds throughout [start, start + length), or -1 if it changes inside."""
    first = _local(float(start), tz).utcoffset()
    last = _local(float(start + length - 1), tz).utcoffset()
    if first != last:
        return -1
    return int(first.total_seconds()) if first is not None else 0


def _fields(ts: float, tz: str) -> tuple[time.struct_time, int]:
    """Local time fields and the UTC offset (seconds) of ``ts``: one C call.

    The offset is cached per UTC day, or per hour on a day it changes (zone
    rules change it at most once a day).
    """
    try:
        off = _span_offset(int(ts // 86400) * 86400, 86400, tz)
        if off == -1:  # the day the offset changes: the hour, else the moment itself
            off = _span_offset(int(ts // 3600) * 3600, 3600, tz)
        if off == -1:
            delta = _local(ts, tz).utcoffset()
            off = int(delta.total_seconds()) if delta is not None else 0
        # Whole seconds as datetime counts them: the fraction rounded to microseconds first.
        seconds = math.floor(ts)
        if round((ts - seconds) * 1e6) >= 1_000_000:
            seconds += 1
        return time.gmtime(seconds + off), off
    except (OverflowError, OSError, ValueError):
        return time.gmtime(0), 0


def _offset_text(off: int, seconds: bool = False) -> str:
    sign = "-" if off < 0 else "+"
    minutes, secs = divmod(abs(off), 60)
    hours, minutes = divmod(minutes, 60)
    # Offsets with seconds (local mean times before 1900) keep them in the ISO form, as isoformat() does.
    return f"{sign}{hours:02d}:{minutes:02d}" + (f":{secs:02d}" if seconds and secs else "")


@functools.lru_cache(maxsize=16384)  # each date is shown on several pages (message, thread, month twice, search)
def fmt_date(ts: float, tz: str) -> str:
    """``2024-03-05 14:30 +01:00``: local time as readers see it, with the offset."""
    d, off = _fields(ts, tz)
    return f"{d.tm_year:04d}-{d.tm_mon:02d}-{d.tm_mday:02d} {d.tm_hour:02d}:{d.tm_min:02d} {_offset_text(off)}"


@functools.lru_cache(maxsize=16384)
def iso_date(ts: float, tz: str) -> str:
    """RFC 3339 §5.6 date-time with the local offset, e.g. ``2024-03-05T14:30:00+01:00``."""
    d, off = _fields(ts, tz)
    return (f"{d.tm_year:04d}-{d.tm_mon:02d}-{d.tm_mday:02d}T{d.tm_hour:02d}:{d.tm_min:02d}:{d.tm_sec:02d}"
            f"{_offset_text(off, seconds=True)}")


def local_month(ts: float, tz: str) -> str:
    d, _ = _fields(ts, tz)
    return f"{d.tm_year:04d}-{d.tm_mon:02d}"


_SPECIAL = re.compile(r"[&<>\"']")


def escape(value: Any) -> str:
    """What ``str(markupsafe.escape(value))`` gives; a plain string without ``&<>"'`` is returned as it is.

    Half a million calls per 10,000 messages: the Markup object markupsafe
    makes (and str() unmakes) was a fifth of writing the pages.
    """
    if type(value) is not str:
        return str(_escape(value))
    done = _ESCAPED.get(value)
    if done is not None:
        return done
    if _SPECIAL.search(value) is None:
        done = value
    else:
        done = (value.replace("&", "&amp;").replace(">", "&gt;").replace("<", "&lt;")
                .replace("'", "&#39;").replace('"', "&#34;"))
    if len(value) < 200 and len(_ESCAPED) < 50_000:
        _ESCAPED[value] = done
    return done


# Short values come back page after page (labels, names, subjects, the list's title).
_ESCAPED: dict[str, str] = {}


def base_page(*, lang: str, t: dict[str, str], csp: str, depth: int, title: str, canonical: str, crumbs: str,
              main: str) -> str:
    """What ``base.html`` renders, for the pages written here."""
    static = "../" * depth + "static/"
    canon = f'<link rel="canonical" href="{escape(canonical)}">\n' if canonical else ""
    return (
        f'<!doctype html>\n<html lang="{escape(lang)}">\n<head>\n<meta charset="utf-8">\n'
        f'<meta http-equiv="Content-Security-Policy" content="{escape(csp)}">\n'
        '<meta name="referrer" content="no-referrer">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>{escape(title)}</title>\n"
        f'<link rel="stylesheet" href="{static}archive.css">\n'
        f'<link rel="icon" href="{static}favicon.svg" type="image/svg+xml">\n'
        f"{canon}</head>\n<body>\n<header class=\"top\">\n<nav aria-label=\"{escape(t['navigation'])}\">\n"
        f"{crumbs}\n</nav>\n</header>\n<main>\n{main}</main>\n"
        f"<footer class=\"bottom\"><p>{escape(t['footer'])}</p></footer>\n</body>\n</html>\n"
    )


@functools.lru_cache(maxsize=16384)  # a message's page and its thread's page show the same time
def _time(ts: float, tz: str) -> str:
    return f'<time datetime="{iso_date(ts, tz)}">{fmt_date(ts, tz)}</time>'


def message_page(*, lang: str, t: dict[str, str], csp: str, list_title: str, tz: str, title: str, canonical: str,
                 meta: ArchiveMeta, month_name: str, body: str, attachments: Sequence[dict[str, str]],
                 parent: ArchiveMeta | None, replies: Sequence[ArchiveMeta], original_id: str = "") -> str:
    """One message's page (``m/HASH.html``; its attachments under ``m/HASH/``)."""
    subject = escape(meta.subject or t["no_subject"])
    crumbs = (f'<a href="../../index.html">{escape(t["all_lists"])}</a> › '
              f'<a href="../index.html">{escape(list_title)}</a> › '
              f'<a href="../{meta.month}/index.html">{escape(month_name)}</a>')
    out = [f'<article class="message">\n<header>\n<h1>{subject}</h1>\n',
           f'<p class="meta"><span class="author">{escape(meta.author)}</span> · {_time(meta.date, tz)}</p>\n']
    if parent is not None:
        out.append(f'<p class="meta">{escape(t["in_reply_to"])} <a href="{parent.msgid_hash}.html">'
                   f'{escape(parent.subject or t["no_subject"])}</a> ({escape(parent.author)})</p>\n')
    if original_id:
        # A post that reused another post's Message-ID: archived under a
        # derived id, its own Message-ID shown here.
        out.append(f'<p class="meta">Message-ID: <code>{escape(original_id)}</code></p>\n')
    out.append(f'<p class="meta"><a href="../t/{meta.thread}.html#m-{meta.msgid_hash}">'
               f'{escape(t["whole_thread"])}</a></p>\n</header>\n<div class="body">{body}</div>\n')
    if attachments:
        out.append(f'<section class="attachments"><h2>{escape(t["attachments"])}</h2><ul>\n')
        out.extend(f'<li><a href="{meta.msgid_hash}/{escape(a["path"])}" download>{escape(a["name"])}</a> '
                   f'<span class="meta">{escape(a["type"])}, {escape(a["size"])}</span></li>' for a in attachments)
        out.append("\n</ul></section>\n")
    if replies:
        out.append(f'<section class="replies"><h2>{escape(t["replies"])}</h2><ul>\n')
        out.extend(f'<li><a href="{r.msgid_hash}.html">{escape(r.subject or t["no_subject"])}</a> '
                   f'<span class="meta">{escape(r.author)} · {fmt_date(r.date, tz)}</span></li>' for r in replies)
        out.append("\n</ul></section>\n")
    out.append("</article>\n")
    return base_page(lang=lang, t=t, csp=csp, depth=2, title=title, canonical=canonical, crumbs=crumbs,
                     main="".join(out))


def thread_page(*, lang: str, t: dict[str, str], csp: str, list_title: str, tz: str, title: str, canonical: str,
                subject: str, month: str, month_name: str, items: Sequence[dict[str, Any]]) -> str:
    """One thread's page (``t/THREAD.html``): every message in tree order, bodies shown."""
    crumbs = (f'<a href="../../index.html">{escape(t["all_lists"])}</a> › '
              f'<a href="../index.html">{escape(list_title)}</a> › '
              f'<a href="../{month}/index.html">{escape(month_name)}</a>')
    out = [f"<h1>{escape(subject or t['no_subject'])}</h1>\n",
           f'<p class="meta">{len(items)} {escape(t["messages"])}</p>\n<ol class="thread">\n']
    no_subject = t["no_subject"]
    in_reply_to = escape(t["in_reply_to"])
    for it in items:
        m: ArchiveMeta = it["meta"]
        parent: ArchiveMeta | None = it["parent"]
        reply = f' · {in_reply_to} <a href="#m-{parent.msgid_hash}">{escape(parent.author)}</a>' if parent else ""
        out.append(
            f'<li class="post d{min(it["depth"], 8)}" id="m-{m.msgid_hash}">\n<article>\n<header>\n'
            f'<h2><a href="../m/{m.msgid_hash}.html">{escape(m.subject or no_subject)}</a></h2>\n'
            f'<p class="meta"><span class="author">{escape(m.author)}</span> · {_time(m.date, tz)}{reply}</p>\n'
            f'</header>\n<div class="body">{it["body"]}</div>\n'
        )
        if it["attachments"]:
            out.append('<ul class="attachments">')
            out.extend(f'<li><a href="../m/{m.msgid_hash}/{escape(a["path"])}" download>{escape(a["name"])}</a> '
                       f'<span class="meta">{escape(a["size"])}</span></li>' for a in it["attachments"])
            out.append("</ul>")
        out.append("</article>\n</li>\n")
    out.append("</ol>\n")
    return base_page(lang=lang, t=t, csp=csp, depth=2, title=title, canonical=canonical, crumbs=crumbs,
                     main="".join(out))
