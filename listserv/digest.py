"""Digests: when a list's digest is due, what it holds, and its copies.

Every post a list sends waits in the store for the next digest
(``Store.enqueue`` adds it in the transaction that queues the single copies).
This stage, run by the requests worker, looks at each list's waiting posts:
the digest is due at ``digest_time`` (a local hour, in the list's time zone)
each day or each Monday (``digest_period``), or early once the waiting posts
pass ``digest_size_threshold``.  Then it builds one message per delivery mode
and language (and per set of posts, for the rare member who already had some
of them singly) and queues them with the digest's number in one transaction
(``Store.queue_digest``): from there a digest is a durable item of the
delivery queue like any post, sent once across crashes and restarts.

Three forms, as the peers have them:

- ``digest_mime``: RFC 2046 §5.1.5 multipart/digest, each post a
  message/rfc822 part holding the bytes an ``each`` member got, minus that
  member's own header fields; a table of contents before, the footer after;
- ``digest_plain``: RFC 1153, the table of contents, then each post as text
  (HTML-only posts read as text), between the RFC's separator lines;
- ``index``: subjects, authors and archive links only (LISTSERV INDEX,
  Sympa summary).

Each copy is personalized like a post (kind ``post-personal``): the fan-out
gives it the member's one-click List-Unsubscribe (RFC 8058), the member's
own links in the footer, and its own DKIM signature (RFC 6376).
"""

from __future__ import annotations

import datetime as dt
import logging
import secrets
import time
import zoneinfo
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from email.header import Header
from email.policy import SMTP
from email.utils import formataddr, formatdate

from listserv import dkim
from listserv.archive_render import plain_text
from listserv.config import Config
from listserv.errors import StoreError
from listserv.fanout import PERSONAL_PLACEHOLDER, PREFS_PLACEHOLDER, bounces_address
from listserv.rewrite import ListContext, decode_header_text, header_values, list_headers, render_footer
from listserv.settings import ListSettings, effective_settings
from listserv.store import DigestCopy, DigestPost, DigestState, Store
from listserv.unsubscribe import Tokens
from listserv.wake import Wakeup

__all__ = ["DigestStage", "Preview", "build_digest", "due_reason", "next_send_at", "scheduled_before"]

log = logging.getLogger("listserv.digest")

# RFC 1153: the line after the preamble (table of contents) is 70 hyphens,
# the line between messages 30; a body line that is exactly such a line is
# changed so a digest burster does not split there.
PREAMBLE_SEPARATOR = "-" * 70
MESSAGE_SEPARATOR = "-" * 30
MAX_TEXT_PER_POST = 64 * 1024  # characters of one post in a plain digest

_LABELS = {
    "pl": {
        "digest": "{title}: przegląd, tom {volume}, nr {issue}",
        "index": "{title}: spis wiadomości, tom {volume}, nr {issue}",
        "topics": "Tematy w tym wydaniu:",
        "end": "Koniec przeglądu „{title}”, tom {volume}, nr {issue}",
        "no_subject": "(bez tematu)",
        "attachment": "[załącznik: {name}, {ctype}, {size}; w archiwum]",
        "intro": "Wiadomości z listy {post_address} od poprzedniego wydania ({count}).",
        "index_intro": "Nowe wiadomości na liście {post_address} ({count}); pełna treść w archiwum.",
        "archive": "archiwum",
    },
    "en": {
        "digest": "{title} Digest, Vol {volume}, Issue {issue}",
        "index": "{title} Index, Vol {volume}, Issue {issue}",
        "topics": "Today's Topics:",
        "end": "End of {title} Digest, Vol {volume}, Issue {issue}",
        "no_subject": "(no subject)",
        "attachment": "[attachment: {name}, {ctype}, {size}; in the archive]",
        "intro": "Posts to {post_address} since the last issue ({count}).",
        "index_intro": "New posts to {post_address} ({count}); read them in the archive.",
        "archive": "archive",
    },
}


# -- when -------------------------------------------------------------------


def _zone(settings: ListSettings) -> dt.tzinfo:
    try:
        return zoneinfo.ZoneInfo(settings.timezone)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError):
        return dt.UTC


def scheduled_before(settings: ListSettings, now: float) -> float | None:
    """The latest scheduled digest moment at or before ``now``, or None (``digest_period = off``)."""
    if settings.digest_period == "off":
        return None
    zone = _zone(settings)
    local = dt.datetime.fromtimestamp(now, zone)
    moment = local.replace(hour=settings.digest_time, minute=0, second=0, microsecond=0)
    if moment > local:
        moment -= dt.timedelta(days=1)
    if settings.digest_period == "weekly":
        moment -= dt.timedelta(days=moment.weekday())  # Monday
    return moment.timestamp()  # wall-clock arithmetic: the offset is the moment's own


def next_send_at(settings: ListSettings, oldest_at: float | None) -> float | None:
    """When the waiting posts go out by the schedule (the first moment after the oldest), or None."""
    if oldest_at is None or settings.digest_period == "off":
        return None
    before = scheduled_before(settings, oldest_at)
    assert before is not None
    zone = _zone(settings)
    step = dt.timedelta(days=7 if settings.digest_period == "weekly" else 1)
    # Wall-clock arithmetic (a zoneinfo datetime): 07:00 stays 07:00 across a DST change.
    return (dt.datetime.fromtimestamp(before, zone) + step).timestamp()


def due_reason(settings: ListSettings, state: DigestState, now: float) -> str | None:
    """Why the list's digest goes out now ("size", "daily", "weekly"), or None (pure)."""
    if not state.waiting:
        return None
    if state.waiting_bytes >= settings.digest_size_threshold:
        return "size"
    moment = scheduled_before(settings, now)
    if moment is not None and state.oldest_at is not None and state.oldest_at < moment:
        return settings.digest_period
    return None


# -- what -------------------------------------------------------------------


def _header(name: str, value: str) -> bytes:
    # RFC 5322 §2.2.3 folding and RFC 2047 words where the value is not ASCII.
    if value.isascii():
        return str(SMTP.fold(name, value)).encode("ascii")
    encoded = str(Header(value, "utf-8", header_name=name).encode(linesep="\r\n"))
    return f"{name}: {encoded}\r\n".encode("ascii")


def _plain_header(name: str, value: str) -> bytes:
    return f"{name}: {value}\r\n".encode()


def _size_text(size: int) -> str:
    if size >= 1024 * 1024:
        return f"{size / 1024 / 1024:.1f} MB"
    return f"{max(1, round(size / 1024))} KB"


def _escape_separators(text: str) -> str:
    """RFC 1153: a body line that looks like a separator gets a leading space."""
    lines = text.split("\n")
    return "\n".join(" " + line if line in (MESSAGE_SEPARATOR, PREAMBLE_SEPARATOR) else line for line in lines)


def _crlf(text: str) -> bytes:
    # RFC 5322 §2.1.1: no line over 998 octets; a rare longer text line is cut.
    out = []
    for line in text.replace("\r\n", "\n").replace("\r", "\n").split("\n"):
        data = line.encode()
        while len(data) > 990:
            cut = 990
            while cut > 0 and (data[cut] & 0xC0) == 0x80:
                cut -= 1  # never inside a UTF-8 sequence
            out.append(data[:cut])
            data = data[cut:]
        out.append(data)
    return b"\r\n".join(out)


def _labels(language: str) -> dict[str, str]:
    return _LABELS.get(language, _LABELS["pl"])


def _subject(post: DigestPost, labels: dict[str, str]) -> str:
    return " ".join(post.subject.split()) or labels["no_subject"]


def _who(post: DigestPost) -> str:
    return ", ".join(x for x in (post.author, post.organisation.strip()) if x)


def table_of_contents(posts: Sequence[DigestPost], language: str) -> str:
    """The numbered contents: subject, author (organisation), and the post's archive link."""
    labels = _labels(language)
    lines = [labels["topics"], ""]
    for n, post in enumerate(posts, 1):
        lines.append(f"{n:4}. {_subject(post, labels)} ({_who(post)})")
        if post.archived_at:
            lines.append(f"      {post.archived_at}")
    return "\n".join(lines) + "\n"


@dataclass(frozen=True, slots=True)
class DigestIssue:
    """One digest message to build: which posts, in which form and language."""

    ctx: ListContext
    volume: int
    issue: int
    mode: str
    language: str
    posts: tuple[DigestPost, ...]
    message_id: str
    date: float
    personal: bool  # footer and List-Unsubscribe filled per member by the fan-out
    prefs: bool  # ... and the footer links each member's preferences page


def _footer(issue: DigestIssue) -> str:
    ctx = replace(issue.ctx, settings=replace(issue.ctx.settings, language=issue.language))
    if issue.personal:
        ctx = replace(ctx, unsubscribe_placeholder=PERSONAL_PLACEHOLDER,
                      prefs_placeholder=PREFS_PLACEHOLDER if issue.prefs else "")
    return render_footer(ctx)


def _head(issue: DigestIssue, content_type: str, eight_bit: bool) -> bytes:
    labels = _labels(issue.language)
    ctx = issue.ctx
    title = ctx.title
    subject = labels["index" if issue.mode == "index" else "digest"].format(
        title=title, volume=issue.volume, issue=issue.issue)
    out = [
        _header("From", formataddr((title, ctx.post_address), charset="utf-8")),
        _plain_header("To", ctx.post_address),
        _header("Subject", subject),
        _plain_header("Date", formatdate(issue.date, usegmt=True)),
        _plain_header("Message-ID", issue.message_id),
        _plain_header("MIME-Version", "1.0"),
        _plain_header("Content-Type", content_type),
        _plain_header("Content-Transfer-Encoding", "8bit" if eight_bit else "7bit"),
    ]
    # RFC 2369 / RFC 2919, the same fields as a post (no Archived-At: a
    # digest has no page of its own).  The fan-out replaces the shared
    # List-Unsubscribe line with the member's one-click one (RFC 8058).
    out.extend(_plain_header(name, value) for name, value in list_headers(ctx, ""))
    return b"".join(out)


def _boundary(parts: Sequence[bytes]) -> str:
    while True:
        candidate = f"=_listserv_digest_{secrets.token_hex(12)}"
        if not any(candidate.encode() in p for p in parts):
            return candidate


def _is_8bit(*parts: bytes) -> bool:
    return any(max(p, default=0) > 0x7F for p in parts)


def _text_part(text: bytes, description: str = "") -> bytes:
    head = b'Content-Type: text/plain; charset="utf-8"\r\n'
    head += b"Content-Transfer-Encoding: 8bit\r\n" if _is_8bit(text) else b"Content-Transfer-Encoding: 7bit\r\n"
    head += b"Content-Disposition: inline\r\n"
    if description:
        head += _header("Content-Description", description)
    return head + b"\r\n" + text


def _intro(issue: DigestIssue, key: str) -> str:
    labels = _labels(issue.language)
    return labels[key].format(post_address=issue.ctx.post_address, count=len(issue.posts))


def build_mime(issue: DigestIssue) -> bytes:
    """RFC 2046 §5.1.5: multipart/mixed of contents, a multipart/digest of the posts, and the footer."""
    labels = _labels(issue.language)
    toc = _crlf(_intro(issue, "intro") + "\n\n" + table_of_contents(issue.posts, issue.language))
    footer = _crlf(_footer(issue))
    posts = [p.data for p in issue.posts]
    inner = _boundary([*posts])
    # Each part's default type in multipart/digest is message/rfc822 (RFC
    # 2046 §5.1.5); it is stated anyway, for the mail programs that need it.
    # The CRLF before each delimiter belongs to the delimiter (§5.1.1), so
    # a part's content is exactly the post's bytes.
    digest = b"".join(b"--" + inner.encode() + b"\r\nContent-Type: message/rfc822\r\n\r\n" + data + b"\r\n"
                      for data in posts) + b"--" + inner.encode() + b"--"
    eight_bit = _is_8bit(toc, footer, *posts)
    subject_line = labels["topics"].rstrip(":")
    parts = [
        _text_part(toc, subject_line),
        f'Content-Type: multipart/digest; boundary="{inner}"\r\n'.encode()
        + (b"Content-Transfer-Encoding: 8bit\r\n" if _is_8bit(*posts) else b"")
        + b"\r\n" + digest,
        _text_part(footer),
    ]
    outer = _boundary([*parts])
    body = b"".join(b"--" + outer.encode() + b"\r\n" + part + b"\r\n" for part in parts) + \
        b"--" + outer.encode() + b"--\r\n"
    return _head(issue, f'multipart/mixed; boundary="{outer}"', eight_bit) + b"\r\n" + body


def _post_block(post: DigestPost, labels: dict[str, str]) -> str:
    headers = header_values(post.data)

    def first(name: str) -> str:
        values = headers.get(name, [])
        return " ".join(decode_header_text(values[0]).split()) if values else ""

    lines = []
    # RFC 1153: Date, From, Subject first, then the other useful fields.
    for name, value in (("Date", first("date")), ("From", first("from")), ("Subject", _subject(post, labels)),
                        ("Message-ID", f"<{post.message_id.strip('<>')}>" if post.message_id else ""),
                        ("Archived-At", f"<{post.archived_at}>" if post.archived_at else "")):
        if value:
            lines.append(f"{name}: {value}")
    text, files = plain_text(post.data, MAX_TEXT_PER_POST)
    lines.append("")
    lines.append(_escape_separators(text.strip("\n")))
    for name, ctype, size in files:
        lines.append(labels["attachment"].format(name=name, ctype=ctype, size=_size_text(size)))
    return "\n".join(lines)


def build_plain(issue: DigestIssue) -> bytes:
    """RFC 1153: preamble with the contents, 70 hyphens, the posts between 30 hyphens, the trailer."""
    labels = _labels(issue.language)
    title_line = labels["digest"].format(title=issue.ctx.title, volume=issue.volume, issue=issue.issue)
    end_line = labels["end"].format(title=issue.ctx.title, volume=issue.volume, issue=issue.issue)
    out = [title_line, "", _intro(issue, "intro"), "", table_of_contents(issue.posts, issue.language).rstrip("\n"),
           "", PREAMBLE_SEPARATOR, ""]
    for post in issue.posts:
        out.extend([_post_block(post, labels), "", MESSAGE_SEPARATOR, ""])
    out.append(_footer(issue).rstrip("\n"))
    out.extend(["", MESSAGE_SEPARATOR, "", end_line, "*" * len(end_line), ""])
    body = _crlf("\n".join(out))
    return _head(issue, 'text/plain; charset="utf-8"', _is_8bit(body)) + b"\r\n" + body


def build_index(issue: DigestIssue) -> bytes:
    """Subjects, authors and archive links only."""
    labels = _labels(issue.language)
    zone = _zone(issue.ctx.settings)
    title_line = labels["index"].format(title=issue.ctx.title, volume=issue.volume, issue=issue.issue)
    out = [title_line, "", _intro(issue, "index_intro"), ""]
    for n, post in enumerate(issue.posts, 1):
        when = dt.datetime.fromtimestamp(post.added_at, zone).strftime("%Y-%m-%d %H:%M")
        out.append(f"{n:4}. {_subject(post, labels)}")
        out.append(f"      {_who(post)}, {when}")
        if post.archived_at:
            out.append(f"      {post.archived_at}")
        out.append("")
    out.append(_footer(issue).rstrip("\n"))
    body = _crlf("\n".join(out) + "\n")
    return _head(issue, 'text/plain; charset="utf-8"', _is_8bit(body)) + b"\r\n" + body


def build_digest(issue: DigestIssue) -> bytes:
    """The digest message for one mode (unsigned; the fan-out signs each copy)."""
    if issue.mode == "digest_mime":
        return build_mime(issue)
    if issue.mode == "digest_plain":
        return build_plain(issue)
    return build_index(issue)


# -- the stage ----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Preview:
    """What the list's next digest would hold (``listserv digest show``)."""

    list_name: str
    volume: int
    issue: int
    posts: tuple[DigestPost, ...]
    members: dict[str, int]  # by delivery mode
    next_at: float | None  # by the schedule; None: only early or by hand
    threshold: int
    waiting_bytes: int


class DigestStage:
    def __init__(self, config: Config, store: Store, key: dkim.Signer, *, tokens: Tokens | None = None,
                 clock: Callable[[], float] = time.time, wakeup: Wakeup | None = None) -> None:
        self.config = config
        self.store = store
        self.key = key
        self.tokens = tokens
        self.clock = clock
        self.wakeup = wakeup

    def _settings(self, settings_json: str | None) -> ListSettings:
        return effective_settings(self.config.list_defaults, settings_json)

    async def process(self, now: float | None = None) -> int:
        """Queue every list's digest that is due; the number queued."""
        now = self.clock() if now is None else now
        queued = 0
        for state in await self.store.digest_states():
            if not state.waiting:
                continue
            lst = await self.store.get_list_by_id(state.list_id)
            settings = self._settings(lst.settings_json)
            reason = due_reason(settings, state, now)
            if reason is None:
                continue
            try:
                if await self._send(lst.id, lst.name, settings, reason, now) is not None:
                    queued += 1
            except Exception:  # noqa: BLE001 - one list's digest must not stop the others'
                log.exception("cannot build the digest of list %s", lst.name)
        return queued

    async def send_now(self, list_name: str) -> int | None:
        """``listserv digest send``: the list's waiting posts go out now; the digest id, or None (none waiting)."""
        lst = await self.store.get_list(list_name)
        return await self._send(lst.id, lst.name, self._settings(lst.settings_json), "manual", self.clock())

    async def preview(self, list_name: str) -> Preview:
        lst = await self.store.get_list(list_name)
        settings = self._settings(lst.settings_json)
        posts = await self.store.waiting_digest_posts(lst.id)
        volume, issue = await self._number(lst.id, settings, self.clock())
        members: dict[str, int] = {}
        for _, mode, _ in await self.store.digest_members(lst.id):
            members[mode] = members.get(mode, 0) + 1
        oldest = min((p.added_at for p in posts), default=None)
        return Preview(lst.name, volume, issue, tuple(posts), members, next_send_at(settings, oldest),
                       settings.digest_size_threshold, sum(p.size for p in posts))

    async def _number(self, list_id: int, settings: ListSettings, now: float) -> tuple[int, int]:
        from listserv.store import next_number

        last = await self.store.last_digest(list_id)
        zone = _zone(settings)
        last_year = dt.datetime.fromtimestamp(last[2], zone).year if last else None
        return next_number(last, dt.datetime.fromtimestamp(now, zone).year, last_year)

    async def _send(self, list_id: int, list_name: str, settings: ListSettings, reason: str,
                    now: float) -> int | None:
        posts = await self.store.waiting_digest_posts(list_id)
        if not posts:
            return None
        members = await self.store.digest_members(list_id)
        if not members:
            # Nobody takes digests: every member had these posts singly.
            await self.store.drop_digest_posts(list_id, [p.id for p in posts])
            return None
        volume, issue = await self._number(list_id, settings, now)
        copies = await self._copies(list_id, list_name, settings, volume, issue, posts, members, now)
        try:
            digest_id = await self.store.queue_digest(list_id, volume, issue, [p.id for p in posts], reason, copies,
                                                      [address for address, _, _ in members])
        except StoreError as exc:
            # Another worker numbered or took them meanwhile: its digest stands.
            log.warning("digest of list %s not queued: %s", list_name, exc)
            return None
        log.info("digest list=%s volume=%d issue=%d posts=%d copies=%d messages=%d reason=%s", list_name, volume,
                 issue, len(posts), sum(len(c.recipients) for c in copies), len(copies), reason)
        if self.wakeup is not None:
            self.wakeup.notify("deliver")
        return digest_id

    async def _copies(self, list_id: int, list_name: str, settings: ListSettings, volume: int, issue: int,
                      posts: Sequence[DigestPost], members: Sequence[tuple[str, str, str]],
                      now: float) -> list[DigestCopy]:
        domain = self.config.server.domain
        ctx = ListContext(name=list_name, domain=domain, settings=settings,
                          archive_base_url=self.config.archive.base_url)
        # A post a member already got as a single copy (they changed mode
        # while it waited) is not repeated in their digest.
        had = await self.store.single_copies(list_id, [p.incoming_id for p in posts])
        groups: dict[tuple[str, str, frozenset[int]], list[str]] = {}
        for address, mode, language in members:
            seen = frozenset(p.incoming_id for p in posts if (address, p.incoming_id) in had)
            if len(seen) == len(posts):
                continue
            groups.setdefault((mode, language or settings.language, seen), []).append(address)
        personal = settings.personalize and self.tokens is not None
        prefs = personal and bool(self.config.web.base_url)
        envelope_from = bounces_address(list_name, domain)
        copies = []
        for n, ((mode, language, seen), recipients) in enumerate(sorted(groups.items())):
            issue_ = DigestIssue(ctx, volume, issue, mode, language,
                                 tuple(p for p in posts if p.incoming_id not in seen),
                                 f"<listserv.digest.{list_id}.{volume}.{issue}.{n}.{secrets.token_hex(4)}@{domain}>",
                                 now, personal, prefs)
            data = build_digest(issue_)
            if personal:
                copies.append(DigestCopy("post-personal", envelope_from, data, tuple(recipients)))
            else:
                # No per-member copies on this list: the shared links, signed once.
                data = data.replace(PERSONAL_PLACEHOLDER.encode(), f"mailto:{ctx.leave_address}".encode())
                copies.append(DigestCopy("post", envelope_from, dkim.sign_message(data, self.key),
                                         tuple(recipients)))
        return copies
