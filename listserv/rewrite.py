"""Rewrite an accepted post into the copy the list sends out: pure ``bytes -> bytes``.

The post has already been accepted by the posting rules.  ``rewrite`` runs once
per post, before DKIM signing (which must come last, because every change made
here would break a signature made earlier) and before fan-out.  It

1. strips attachments whose type the list's ``AttachmentPolicy`` says "strip",
   each replaced by a one-line note (the only place parts are removed; all
   other parts keep their bytes);
2. removes headers a list must own or that would lie after rewriting
   (``List-*``, ``Precedence``, ``Approved``, the author's ``DKIM-Signature``...);
3. makes sure ``Message-ID``, ``Date`` and ``MIME-Version`` are present;
4. puts the subject tag in front of the subject, once (Mailman's
   ``[list] Re: x`` form);
5. with ``munge_from``, replaces ``From`` by ``"Author via Title" <list>`` and
   adds the author to ``Reply-To`` (DMARC mitigation, as Mailman 3 does);
6. adds the footer without ever pasting text into HTML or into a signed part:
   appended to a ``text/plain`` body it can decode, inserted as a new part into
   ``multipart/mixed``, otherwise the message is wrapped in a new
   ``multipart/mixed`` whose first part is the untouched original;
7. appends the RFC 2369 / RFC 2919 / RFC 5064 list headers.

Input is arbitrary real-world mail (LF or CRLF, 8-bit headers, broken MIME, odd
charsets).  Nothing here raises on bad input: what cannot be decoded is left as
it came and the footer goes into its own part instead.  Output uses CRLF line
ends throughout.

The message is handled as bytes with a small tolerant header and boundary
scanner rather than parsed and re-serialised with the ``email`` package,
because re-serialising re-folds headers and re-encodes parts, which would change
the bytes of attachments and of PGP/MIME or S/MIME signed parts.  The ``email``
package is used only for what it is good at: RFC 2045/2231 parameter parsing and
RFC 2047 encoding.
"""

from __future__ import annotations

import base64
import binascii
import codecs
import datetime
import email.header
import email.message
import email.utils
import functools
import hashlib
import mimetypes
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from listserv.settings import ListSettings

__all__ = [
    "ListContext",
    "Rewritten",
    "attachment_types",
    "decode_header_text",
    "list_headers",
    "message_id_hash",
    "render_footer",
    "rewrite",
]


@dataclass(frozen=True, slots=True)
class ListContext:
    """What the rewriter needs to know about the list a post goes to."""

    name: str
    domain: str
    settings: ListSettings
    archive_base_url: str = ""
    # Personalized copies: the footer's unsubscribe line carries this marker,
    # which the fan-out replaces with each member's own link.
    unsubscribe_placeholder: str = ""
    # ... and this one each member's own preferences page (listserv.prefs).
    prefs_placeholder: str = ""

    @property
    def post_address(self) -> str:
        return f"{self.name}@{self.domain}"

    @property
    def request_address(self) -> str:
        return f"{self.name}-request@{self.domain}"

    @property
    def join_address(self) -> str:
        return f"{self.name}-join@{self.domain}"

    @property
    def leave_address(self) -> str:
        return f"{self.name}-leave@{self.domain}"

    @property
    def owner_address(self) -> str:
        return f"{self.name}-owner@{self.domain}"

    @property
    def title(self) -> str:
        """The human name of the list, falling back to its address name."""
        return self.settings.title.strip() or self.name

    @property
    def archive_url(self) -> str:
        """The list's archive root (``{base}{name}/``), or "" without an archive."""
        base = self.archive_base_url.strip()
        if not base:
            return ""
        if not base.endswith("/"):
            base += "/"
        return f"{base}{self.name}/"

    def permalink(self, message_id: str) -> str:
        """The archive URL of one message (RFC 5064 Archived-At), or ""."""
        if not self.archive_url or not _strip_angles(message_id):
            return ""
        return f"{self.archive_url}m/{message_id_hash(message_id)}.html"


@dataclass(frozen=True, slots=True)
class Rewritten:
    """The rewritten message and what the attachment policy took out of it."""

    data: bytes
    stripped: tuple[str, ...]


# -- constants

# Headers the list owns or that stop being true once the post is rewritten.
# DKIM-Signature (and its predecessor DomainKey-Signature): the author's
# signature no longer verifies after the subject and body change; we re-sign.
# Approved/Approve may carry a moderator password.  Content-Length is an mbox
# artefact that would be wrong after the footer is added.
REMOVED_HEADERS = frozenset(
    {
        "list-id",
        "list-post",
        "list-help",
        "list-subscribe",
        "list-unsubscribe",
        "list-unsubscribe-post",
        "list-archive",
        "list-owner",
        "archived-at",
        "precedence",
        "return-path",
        "approved",
        "approve",
        "x-beenthere",
        "errors-to",
        "dkim-signature",
        "domainkey-signature",
        "delivered-to",
        "content-length",
    }
)

# Reply markers collapsed into one "Re: " (Mailman's RE_PATTERN plus Polish
# Outlook/Onet "Odp:"/"ODP:" and German "Antw:"), with counters like "Re[2]:".
# Forward markers (Fwd:, FW:, PD:, WG:) are kept as they are: a forward is not
# a reply, and the tag simply goes in front of them.
_REPLY_MARKERS = re.compile(
    r"^\s*(?:(?:re|aw|antw|sv|vs|odp)\s*(?:\[\d+\]|\(\d+\))?\s*:\s*)+",
    re.IGNORECASE,
)

_NO_SUBJECT = {"pl": "(bez tematu)", "en": "(no subject)"}

_BUILTIN_FOOTER = {
    "pl": "-- \n{title}\nLista: {post_address}\nWypisanie: napisz na {leave_address}\n",
    "en": "-- \n{title}\nList: {post_address}\nUnsubscribe: write to {leave_address}\n",
}
_PERSONAL_UNSUBSCRIBE_LINE = {
    "pl": ("Wypisanie: napisz na {leave_address}\n", "Wypisanie jednym kliknięciem:\n{unsubscribe_url}\n"),
    "en": ("Unsubscribe: write to {leave_address}\n", "Unsubscribe with one click:\n{unsubscribe_url}\n"),
}
_PERSONAL_PREFS_LINE = {
    "pl": "Twoje ustawienia (przegląd zamiast pojedynczych wiadomości, wypisanie):\n{prefs_url}\n",
    "en": "Your settings (a digest instead of single posts, leaving):\n{prefs_url}\n",
}
_BUILTIN_ARCHIVE_LINE = {"pl": "Archiwum: {archive_url}\n", "en": "Archive: {archive_url}\n"}

_STRIPPED_NOTE = {
    "pl": "[załącznik usunięty: {what}]\n",
    "en": "[attachment removed: {what}]\n",
}

# Declared types that say nothing about the content; for these the file name
# extension is used to guess what the attachment really is.
_GENERIC_TYPES = frozenset(
    {
        "application/octet-stream",
        "application/x-download",
        "application/force-download",
        "application/download",
        "application/unknown",
        "application/binary",
        "binary/octet-stream",
    }
)

# Extensions whose guess must not depend on the host's /etc/mime.types (Python's
# own table maps .exe to application/octet-stream, Debian's to
# application/x-msdos-program): pinned to the names the default policy strips.
_PINNED_EXTENSIONS = {
    "exe": "application/x-msdownload",
    "dll": "application/x-msdownload",
    "com": "application/x-msdownload",
    "scr": "application/x-msdownload",
    "pif": "application/x-msdownload",
    "cpl": "application/x-msdownload",
    "msi": "application/x-ms-installer",
    "bat": "application/x-bat",
    "cmd": "application/x-bat",
    "sh": "application/x-sh",
    "hta": "application/hta",
    "js": "application/javascript",
    "jse": "application/javascript",
    "mjs": "application/javascript",
}

_MAX_DEPTH = 30  # deeper MIME nesting is treated as one opaque leaf
_MAX_LINE = 78  # RFC 5322 §2.1.1 "SHOULD" limit for the header lines we write

# RFC 5322 §3.6.8 field name; §4.5 obsolete syntax allows blanks before the colon.
_HEADER_NAME = re.compile(rb"([\x21-\x39\x3b-\x7e]+)[ \t]*:")
_ENCODED_WORD = re.compile(r"=\?([^?\s]+)\?([bBqQ])\?([^?\s]*)\?=")
_EOL = re.compile(rb"\r\n|\r|\n")
_C1_BYTES = re.compile(rb"[\x80-\x9f]")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_PLACEHOLDER = re.compile(r"\{([a-z_]+)\}")


# -- public helpers


@functools.lru_cache(maxsize=65536)
def message_id_hash(message_id: str) -> str:
    """The Mailman 3 / HyperKitty hash of a Message-ID, used in archive URLs.

    base32 (RFC 4648 §6) of the SHA-1 of the id without its angle brackets:
    20 bytes give exactly 32 characters, so there is never padding.
    """
    digest = hashlib.sha1(_strip_angles(message_id).encode("utf-8")).digest()
    return base64.b32encode(digest).decode("ascii")


def list_headers(ctx: ListContext, message_id: str) -> list[tuple[str, str]]:
    """The list headers added to every post, as unfolded (name, value) pairs.

    RFC 2919 §2: the List-Id label is ``name.domain`` and the phrase is the
    list's title (RFC 2047-encoded when it is not ASCII).  RFC 2369 §3 for the
    rest; List-Post is ``NO`` on an announce-only list (RFC 2369 §3.4).
    RFC 5064 Archived-At and RFC 2369 List-Archive only with an archive.
    """
    label = f"{ctx.name}.{ctx.domain}"
    title = ctx.settings.title.strip()
    list_id = f"{_phrase(title, 'List-Id')} <{label}>" if title else f"<{label}>"
    post = "NO" if ctx.settings.posting_policy == "announce" else f"<mailto:{ctx.post_address}>"
    headers = [
        ("List-Id", list_id),
        ("List-Post", post),
        ("List-Help", f"<mailto:{ctx.request_address}?subject=help>"),
        ("List-Subscribe", f"<mailto:{ctx.join_address}>"),
        ("List-Unsubscribe", f"<mailto:{ctx.leave_address}>"),
    ]
    if ctx.archive_url:
        headers.append(("List-Archive", f"<{ctx.archive_url}>"))
        permalink = ctx.permalink(message_id)
        if permalink:
            headers.append(("Archived-At", f"<{permalink}>"))
    headers.append(("List-Owner", f"<mailto:{ctx.owner_address}>"))
    # Not standardised, but vacation programs and out-of-office replies honour
    # it and stay quiet, and Mailman sends it too.
    headers.append(("Precedence", "list"))
    return headers


def render_footer(ctx: ListContext) -> str:
    """The footer text for the list, with "\\n" line ends and a final newline.

    A custom footer may use {name} {title} {domain} {description}
    {post_address} {leave_address} {join_address} {request_address}
    {owner_address} {archive_url}; anything else in braces stays literal.
    """
    language = ctx.settings.language if ctx.settings.language in _BUILTIN_FOOTER else "pl"
    template = ctx.settings.footer
    if not template.strip():
        template = _BUILTIN_FOOTER[language]
        if ctx.unsubscribe_placeholder:
            # On a line of its own, so the link never makes a quoted-printable
            # line longer than RFC 2045 §6.7 allows.
            template = template.replace(*_PERSONAL_UNSUBSCRIBE_LINE[language])
        if ctx.prefs_placeholder:
            template += _PERSONAL_PREFS_LINE[language]
        if ctx.archive_url:
            template += _BUILTIN_ARCHIVE_LINE[language]
    values = {
        "name": ctx.name,
        "title": ctx.title,
        "domain": ctx.domain,
        "description": ctx.settings.description,
        "post_address": ctx.post_address,
        "leave_address": ctx.leave_address,
        "join_address": ctx.join_address,
        "request_address": ctx.request_address,
        "owner_address": ctx.owner_address,
        "archive_url": ctx.archive_url,
        "unsubscribe_url": ctx.unsubscribe_placeholder or f"mailto:{ctx.leave_address}",
        "prefs_url": ctx.prefs_placeholder,
    }
    # Not str.format: a stray brace or unknown name in an admin's text must not
    # crash delivery.
    text = _PLACEHOLDER.sub(lambda m: values.get(m.group(1), m.group(0)), template)
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    if not text.endswith("\n"):
        text += "\n"
    return text


def decode_header_text(raw: bytes | str) -> str:
    """A header value as text: unfolded, 8-bit bytes and RFC 2047 words decoded.

    Raw 8-bit bytes are read as UTF-8, else as windows-1250 when they use its
    C1 range, else as ISO-8859-2: the encodings Polish mail programs send.
    """
    text = _unfold(_bytes_to_text(raw) if isinstance(raw, bytes) else raw)
    return _decode_rfc2047(text) if "=?" in text else text  # most fields hold no encoded word


def header_values(raw: bytes) -> dict[str, list[str]]:
    """Every header field of a message, by lower-case name, in order.

    Values are unfolded and their bytes decoded (UTF-8, else windows-1250 or
    ISO-8859-2, as Polish mail programs send them); RFC 2047 words are left
    for ``decode_header_text``.  Never raises.
    """
    fields, _ = _parse_headers(_normalize(raw))
    out: dict[str, list[str]] = {}
    for f in fields:
        out.setdefault(f.key, []).append(f.text)
    return out


def attachment_types(raw: bytes) -> tuple[str, ...]:
    """The content types of all leaf parts, in order, for the posting rules.

    Leaves inside message/rfc822 parts count too.  For a part declared with a
    generic type (application/octet-stream and friends) that has a file name,
    the type guessed from its extension follows the declared one, so an .exe
    sent as octet-stream also shows up as application/x-msdownload.
    """
    data = _normalize(raw)
    types: list[str] = []
    for leaf in _walk(data, 0, len(data), default="text/plain", replace_from=0, top=True, depth=0):
        types.extend(_leaf_types(leaf))
    return tuple(types)


# -- the rewrite


def rewrite(
    raw: bytes,
    ctx: ListContext,
    *,
    message_id: str,
    munge_from: bool,
    now: datetime.datetime | None = None,
    author: str = "",
) -> Rewritten:
    """Rewrite an accepted post for the list; see the module docstring.

    ``message_id`` is the id the post is known by (its own, or the one the
    caller generated when it had none); it is inserted when the post has no
    Message-ID and is hashed for Archived-At.  ``now`` is the time for a missing
    Date header (defaults to the current time).  ``author`` is the address
    the posting rules took as the sender; a post without a From field gets
    ``From: author`` (RFC 5322 §3.6 requires one, and DKIM signs it), else the
    list address.
    """
    data = _normalize(raw)
    data, stripped, top_note = _strip_attachments(data, ctx)

    fields, body_offset = _parse_headers(data)
    body = data[body_offset:]
    if top_note is not None:
        fields = [f for f in fields if not f.key.startswith("content-")]
        fields += [
            _field("Content-Type", 'text/plain; charset="utf-8"'),
            _field("Content-Transfer-Encoding", "quoted-printable"),
        ]
        body = _encode_text(top_note, "utf-8", "quoted-printable")

    # An empty Message-ID or Date is as good as none: ours replace them.
    fields = [
        f
        for f in fields
        if f.key not in REMOVED_HEADERS and not (f.key in ("message-id", "date") and not f.text)
    ]
    fields = _set_subject(fields, ctx)
    if not any(f.key == "from" for f in fields):
        fields.append(_field("From", author or ctx.post_address))
    if munge_from:
        fields = _munge_from(fields, ctx)

    added: list[_Field] = []
    keys = {f.key for f in fields}
    if "message-id" not in keys and _strip_angles(message_id):
        added.append(_field("Message-ID", f"<{_strip_angles(message_id)}>"))
    if "date" not in keys:
        # RFC 5322 §3.6: Date is one of the two required fields.
        when = now or datetime.datetime.now(datetime.timezone.utc)
        added.append(_field("Date", email.utils.format_datetime(when)))

    fields, body = _add_footer(fields, body, ctx)

    keys = {f.key for f in fields}
    if "content-type" in keys and "mime-version" not in keys:
        # RFC 2045 §4: without it, Content-Type is not MIME.
        added.append(_field("MIME-Version", "1.0"))
    added += [_field(name, value) for name, value in list_headers(ctx, message_id)]

    out = b"".join(f.raw for f in fields + added) + b"\r\n" + body
    if not out.endswith(b"\r\n"):
        out += b"\r\n"
    return Rewritten(data=out, stripped=stripped)


# -- header fields


@dataclass(frozen=True, slots=True)
class _Field:
    """One header field exactly as written, folding kept, ending in CRLF."""

    name: str
    raw: bytes

    @property
    def key(self) -> str:
        return self.name.lower()

    @property
    def text(self) -> str:
        """The unfolded value, bytes decoded but RFC 2047 words left alone."""
        return _unfold(_bytes_to_text(self.raw.split(b":", 1)[1]))


def _normalize(raw: bytes) -> bytes:
    """CRLF line ends throughout, without an mbox "From " envelope line.

    Bare CR and bare LF become CRLF as the email package reads them; RFC 2045
    §2.7/§2.8 does not allow them outside CRLF in 7bit or 8bit data anyway.
    """
    crlf = raw.count(b"\r\n")
    if raw.count(b"\n") == crlf and raw.count(b"\r") == crlf:
        data = raw  # already CRLF throughout (what arrives over SMTP): skip the regex
    else:
        data = _EOL.sub(b"\r\n", raw)
    if data.startswith(b"From ") and not _HEADER_NAME.match(data):  # but "From : x" is a field
        eol = data.find(b"\r\n")
        data = b"" if eol < 0 else data[eol + 2 :]
    return data


def _parse_headers(data: bytes) -> tuple[list[_Field], int]:
    """Split the header block (RFC 5322 §2.2) into fields; return them and the body offset.

    Like ``email.feedparser``: the block ends at the first empty line or at the
    first line that is neither a field nor a continuation, which then starts
    the body.  A continuation line with nothing to continue is dropped.  Unlike
    it, "Name :" is a field (RFC 5322 §4.5), written back as "Name:".
    """
    fields: list[_Field] = []
    pos = 0
    end = len(data)
    while pos < end:
        eol = data.find(b"\r\n", pos)
        line_end = end if eol < 0 else eol + 2
        line = data[pos:line_end]
        if line == b"\r\n":
            return fields, line_end
        if line[:1] in (b" ", b"\t"):
            if fields:
                last = fields[-1]
                fields[-1] = _Field(last.name, last.raw + line)
        else:
            match = _HEADER_NAME.match(line)
            if match is None:
                if line.startswith(b"From "):
                    # A stray mbox envelope line: skipped, as email.feedparser does.
                    pos = line_end
                    continue
                return fields, pos
            name = match.group(1)
            if match.end() != len(name) + 1:
                # "Subject :" is read as a field here (RFC 5322 §4.5) but as
                # the start of the body by the email package; written without
                # the blank, every reader agrees.  RFC 5322 §4: never generate
                # the obsolete form.
                line = name + line[match.end() - 1 :]
            fields.append(_Field(name.decode("ascii"), line))
        pos = line_end
    if fields and not fields[-1].raw.endswith(b"\r\n"):
        fields[-1] = _Field(fields[-1].name, fields[-1].raw + b"\r\n")
    return fields, end


def _first(fields: Sequence[_Field], key: str) -> _Field | None:
    for f in fields:
        if f.key == key:
            return f
    return None


def _field(name: str, value: str) -> _Field:
    return _Field(name, _fold(name, value))


def _fold(name: str, value: str) -> bytes:
    """``Name: value`` CRLF, folded before existing spaces to keep lines short.

    Folding only inserts CRLF before whitespace that is already there, which
    unfolding (RFC 5322 §2.2.3) removes again, so the value never changes.
    """
    words = value.split(" ")
    lines: list[str] = []
    current = f"{name}: {words[0]}"
    for word in words[1:]:
        if len(current) + 1 + len(word) > _MAX_LINE and current.strip():
            lines.append(current)
            current = " " + word
        else:
            current += " " + word
    lines.append(current)
    return ("\r\n".join(lines) + "\r\n").encode("utf-8")


def _bytes_to_text(raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        pass
    # Bytes 0x80-0x9F are control codes in ISO-8859-2 but letters in
    # windows-1250, which Polish Outlook sends unlabelled.
    if _C1_BYTES.search(raw):
        return raw.decode("cp1250", "replace")
    return raw.decode("iso-8859-2")


def _unfold(text: str) -> str:
    return text.replace("\r", "").replace("\n", "").strip()


def _strip_angles(message_id: str) -> str:
    mid = message_id.strip()
    if mid.startswith("<") and mid.endswith(">"):
        mid = mid[1:-1].strip()
    return mid


def _decode_rfc2047(text: str) -> str:
    """Decode RFC 2047 encoded words leniently.

    Whitespace between adjacent encoded words is dropped (RFC 2047 §6.2), and
    adjacent words in the same charset are decoded together, because some
    mailers split a multi-byte character across two words.  A word that does
    not decode stays as written.
    """
    out: list[str] = []
    run: list[tuple[str, bytes]] = []
    pos = 0

    def flush() -> None:
        merged: list[tuple[str, bytes]] = []
        for charset, chunk in run:
            if merged and merged[-1][0] == charset:
                merged[-1] = (charset, merged[-1][1] + chunk)
            else:
                merged.append((charset, chunk))
        out.extend(_decode_bytes(chunk, charset) for charset, chunk in merged)
        run.clear()

    for match in _ENCODED_WORD.finditer(text):
        gap = text[pos : match.start()]
        decoded = _decode_word(match.group(2), match.group(3))
        if decoded is None:
            flush()
            out.append(gap + match.group(0))
        else:
            if not (run and gap.strip() == ""):
                flush()
                out.append(gap)
            # RFC 2231 §5 allows a language suffix: "utf-8*pl".
            run.append((match.group(1).split("*", 1)[0].lower(), decoded))
        pos = match.end()
    flush()
    out.append(text[pos:])
    return "".join(out)


def _decode_word(encoding: str, payload: str) -> bytes | None:
    try:
        if encoding in "bB":
            if re.search(r"[^A-Za-z0-9+/=]", payload):
                return None
            cleaned = payload.rstrip("=")  # padding is often wrong: redo it
            if len(cleaned) % 4 == 1 or "=" in cleaned:
                return None
            return base64.b64decode(cleaned + "=" * (-len(cleaned) % 4))
        return binascii.a2b_qp(payload.encode("ascii", "replace"), header=True)
    except (binascii.Error, ValueError):
        return None


def _codec(charset: str | None) -> str | None:
    """The Python codec for a MIME charset, if it is a text codec we can use."""
    if not charset:
        return None
    try:
        info = codecs.lookup(charset.strip().strip('"').lower())
    except (LookupError, ValueError):
        return None
    # Python also registers bytes-to-bytes codecs (base64, zlib...) by name.
    if getattr(info, "_is_text_encoding", True) is False:
        return None
    return info.name


def _decode_bytes(data: bytes, charset: str) -> str:
    codec = _codec(charset)
    if codec is None:
        return _bytes_to_text(data)
    try:
        return data.decode(codec, "replace")
    except (LookupError, UnicodeError, ValueError):
        return _bytes_to_text(data)


def _phrase(text: str, header_name: str) -> str:
    """An RFC 5322 §3.2.5 display-name phrase for ``text``, unfolded.

    ASCII goes into a quoted string; anything else becomes RFC 2047 encoded
    words in UTF-8 (each at most 75 characters, RFC 2047 §2), which must not be
    quoted (RFC 2047 §5).
    """
    text = " ".join(_CONTROL.sub(" ", text).split())
    if not text:
        return '""'
    if text.isascii():
        return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'
    encoded = email.header.Header(text, "utf-8", header_name=header_name).encode(linesep="\n")
    return " ".join(encoded.split())


def _address(name: str, addr: str, header_name: str) -> str:
    return f"{_phrase(name, header_name)} <{addr}>" if name.strip() else addr


# -- subject


def _set_subject(fields: list[_Field], ctx: ListContext) -> list[_Field]:
    """Put the subject tag in front, once, as Mailman does: ``[list] Re: x``."""
    subjects = [f for f in fields if f.key == "subject"]
    try:
        prefix = ctx.settings.subject_prefix.format(name=ctx.name).strip()
    except (KeyError, IndexError, ValueError):
        prefix = ctx.settings.subject_prefix.replace("{name}", ctx.name).strip()
    language = ctx.settings.language if ctx.settings.language in _NO_SUBJECT else "pl"

    text = decode_header_text(subjects[0].raw.split(b":", 1)[1]) if subjects else ""
    text = text.replace("\t", " ").strip()
    raw_8bit = bool(subjects) and not subjects[0].raw.isascii()

    new: str | None
    if not text:
        new = f"{prefix} {_NO_SUBJECT[language]}".strip()
    elif not prefix or prefix.lower() in text.lower():
        # Already tagged (also "Re: [list] x"): leave it, unless it came as raw
        # 8-bit, which readers would show in whatever charset they guess.
        new = text if raw_8bit else None
    else:
        rest = text
        reply = _REPLY_MARKERS.match(rest)
        marker = ""
        if reply:
            rest = rest[reply.end() :]
            marker = "Re: "
        new = f"{prefix} {marker}{rest or _NO_SUBJECT[language]}"
    if new is None:
        return fields

    field = _Field("Subject", _fold_unstructured("Subject", new))
    out: list[_Field] = []
    for f in fields:
        if f.key != "subject":
            out.append(f)
        elif f is subjects[0]:
            out.append(field)
    if not subjects:
        out.append(field)
    return out


def _fold_unstructured(name: str, text: str) -> bytes:
    """Encode an unstructured value (RFC 2047 §5(1)) and fold it (RFC 5322 §2.2.3).

    Only runs of words that need it are encoded, so the tag and "Re:" stay
    readable in the raw message.  The spaces inside a run go into the encoded
    text, because whitespace between two encoded words is dropped when
    decoding (RFC 2047 §6.2).
    """
    chunks: list[str] = []
    run: list[str] = []

    def flush() -> None:
        if run:
            encoded = email.header.Header(" ".join(run), "utf-8", header_name=name).encode(linesep="\n")
            chunks.append(" ".join(encoded.split()))
            run.clear()

    for word in _CONTROL.sub(" ", text).split(" "):
        # A literal "=?" could be mistaken for an encoded word by readers.
        if word.isascii() and "=?" not in word:
            flush()
            chunks.append(word)
        else:
            run.append(word)
    flush()
    return _fold(name, " ".join(chunks))


# -- From munging


def _munge_from(fields: list[_Field], ctx: ListContext) -> list[_Field]:
    """DMARC mitigation: From becomes the list, the author moves to Reply-To.

    As Mailman 3 ``handlers/dmarc.py`` (``reply_goes_to_list`` = no munging):
    ``From: "Author via Title" <list>``, and the author's address is added to
    the addresses already in Reply-To unless it is there.  An author without a
    display name is shown by the local part of the address only, so that no
    second domain appears in From (Mailman's reason: it looks like spam).
    """
    from_fields = [f for f in fields if f.key == "from"]
    if not from_fields:
        return fields
    pairs = email.utils.getaddresses([f.text for f in from_fields])
    authors = [(name, addr) for name, addr in pairs if "@" in addr]
    if not authors:
        # Nobody to credit or to reply to: leave the broken From as it came.
        return fields
    name, addr = authors[0]
    if addr.lower() == ctx.post_address.lower():
        return fields
    original_name = " ".join(_CONTROL.sub(" ", _decode_rfc2047(name)).split())
    shown = re.sub(r"@[^\s@>)\]]+", "", original_name).strip() or addr.split("@", 1)[0]
    new_from = _field("From", _address(f"{shown} via {ctx.title}", ctx.post_address, "From"))

    reply_fields = [f for f in fields if f.key == "reply-to"]
    existing = [
        (" ".join(_decode_rfc2047(n).split()), a)
        for n, a in email.utils.getaddresses([f.text for f in reply_fields])
        if a
    ]
    new_reply: _Field | None = None
    if addr.lower() not in {a.lower() for _, a in existing}:
        items = [_address(n, a, "Reply-To") for n, a in existing + [(original_name, addr)]]
        new_reply = _field("Reply-To", ", ".join(items))

    out: list[_Field] = []
    for f in fields:
        if f.key == "from":
            if f is from_fields[0]:
                out.append(new_from)
                if new_reply is not None and not reply_fields:
                    out.append(new_reply)
        elif f.key == "reply-to" and new_reply is not None:
            if f is reply_fields[0]:
                out.append(new_reply)
        else:
            out.append(f)
    return out


# -- MIME structure


@dataclass(frozen=True, slots=True)
class _Content:
    ctype: str
    charset: str | None
    boundary: str | None
    cte: str
    disposition: str
    filename: str
    flowed: bool


def _content(fields: Sequence[_Field], default: str) -> _Content:
    """The MIME facts of one entity, using the email package's RFC 2045/2231 parser."""
    scratch = email.message.Message()
    scratch.set_default_type(default)
    ctype_field = _first(fields, "content-type")
    disp_field = _first(fields, "content-disposition")
    cte_field = _first(fields, "content-transfer-encoding")
    try:
        if ctype_field is not None:
            scratch["Content-Type"] = ctype_field.text
        if disp_field is not None:
            scratch["Content-Disposition"] = disp_field.text
        ctype = scratch.get_content_type()
        charset = scratch.get_content_charset()
        boundary = scratch.get_boundary()
        fmt = scratch.get_param("format")
        flowed = isinstance(fmt, str) and fmt.strip().lower() == "flowed"
        filename = decode_header_text(scratch.get_filename() or "")
        disposition = scratch.get_content_disposition() or ""
    except Exception:  # noqa: BLE001 - a header the parser chokes on means "unknown"
        ctype, charset, boundary, flowed, filename, disposition = default, None, None, False, "", ""
    cte = cte_field.text.split(";", 1)[0].strip().lower() if cte_field is not None else ""
    return _Content(ctype, charset, boundary, cte, disposition, filename, flowed)


@dataclass(frozen=True, slots=True)
class _Split:
    parts: list[tuple[int, int]]  # each body part's bytes, without the CRLF before the next delimiter
    close: int | None  # offset of the CRLF that starts the close delimiter, if there is one


def _split_multipart(body: bytes, boundary: str) -> _Split:
    """Find the body parts of a multipart body (RFC 2046 §5.1.1).

    A delimiter is ``--boundary`` at the start of a line, optionally followed
    by ``--`` (the close delimiter) and whitespace; the CRLF before it belongs
    to the delimiter, not to the part.
    """
    delimiter = re.compile(
        rb"(?:\A|(?<=\n))--" + re.escape(boundary.encode("utf-8", "replace")) + rb"(--)?[ \t]*(?:\r\n|\Z)"
    )
    parts: list[tuple[int, int]] = []
    start: int | None = None
    for match in delimiter.finditer(body):
        before = match.start()
        if before >= 2 and body[before - 2 : before] == b"\r\n":
            before -= 2
        if start is not None:
            parts.append((start, max(before, start)))
        if match.group(1):
            return _Split(parts, before)
        start = match.end()
    if start is not None:
        parts.append((start, len(body)))
    return _Split(parts, None)


@dataclass(frozen=True, slots=True)
class _Leaf:
    start: int  # where the bytes standing for this leaf begin (its part, or the enclosing message/rfc822 part)
    end: int
    ctype: str
    filename: str
    top: bool  # the leaf is the whole message body


def _walk(
    data: bytes, start: int, end: int, *, default: str, replace_from: int, top: bool, depth: int
) -> Iterator[_Leaf]:
    """Yield the leaf parts of the entity in ``data[start:end]``, depth first."""
    fields, offset = _parse_headers(data[start:end])
    body_start = start + offset
    info = _content(fields, default)
    if depth < _MAX_DEPTH:
        if info.ctype.startswith("multipart/") and info.boundary:
            split = _split_multipart(data[body_start:end], info.boundary)
            if split.parts:
                child_default = "message/rfc822" if info.ctype == "multipart/digest" else "text/plain"
                for s, e in split.parts:
                    yield from _walk(
                        data,
                        body_start + s,
                        body_start + e,
                        default=child_default,
                        replace_from=body_start + s,
                        top=False,
                        depth=depth + 1,
                    )
                return
        elif info.ctype == "message/rfc822" and info.cte in ("", "7bit", "8bit", "binary"):
            # A forwarded message: its own leaves count.  If it is a single
            # part, removing it removes the whole message/rfc822 part.  Some
            # mailers (Apple Mail) keep the mbox "From " line in front of it.
            inner = body_start
            if data.startswith(b"From ", inner):
                eol = data.find(b"\r\n", inner, end)
                inner = end if eol < 0 else eol + 2
            yield from _walk(
                data, inner, end, default="text/plain", replace_from=replace_from, top=top, depth=depth + 1
            )
            return
    yield _Leaf(replace_from, end, info.ctype, info.filename, top)


def _guess_type(filename: str) -> str | None:
    # Windows ignores trailing dots and spaces: "faktura.pdf.exe. " runs.
    name = filename.strip().rstrip(". ")
    if "." not in name:
        return None
    ext = name.rsplit(".", 1)[1].lower()
    if ext in _PINNED_EXTENSIONS:
        return _PINNED_EXTENSIONS[ext]
    return mimetypes.guess_type("x." + ext, strict=False)[0]


def _leaf_types(leaf: _Leaf) -> list[str]:
    types = [leaf.ctype]
    if leaf.ctype in _GENERIC_TYPES and leaf.filename:
        guess = _guess_type(leaf.filename)
        if guess and guess != leaf.ctype:
            types.append(guess)
    return types


def _strip_attachments(data: bytes, ctx: ListContext) -> tuple[bytes, tuple[str, ...], str | None]:
    """Replace parts the policy strips by a short note.

    Returns the new bytes, the removed types, and the note text when the whole
    message body was removed (its Content-* headers are then rewritten by the
    caller).  Other parts keep their bytes.
    """
    policy = ctx.settings.attachments
    language = ctx.settings.language if ctx.settings.language in _STRIPPED_NOTE else "pl"
    removals: list[tuple[_Leaf, str]] = []
    for leaf in _walk(data, 0, len(data), default="text/plain", replace_from=0, top=True, depth=0):
        for ctype in _leaf_types(leaf):
            if policy.action_for(ctype) == "strip":
                removals.append((leaf, ctype))
                break
    if not removals:
        return data, (), None
    top_note: str | None = None
    for leaf, ctype in reversed(removals):
        what = f"{leaf.filename} ({ctype})" if leaf.filename else ctype
        note = _STRIPPED_NOTE[language].format(what=" ".join(_CONTROL.sub(" ", what).split()))
        if leaf.top:
            top_note = note
        else:
            data = data[: leaf.start] + _text_part(note) + data[leaf.end :]
    return data, tuple(ctype for _, ctype in removals), top_note


# -- footer


def _text_part(text: str) -> bytes:
    """A complete inline text/plain UTF-8 body part (headers and body, no final CRLF).

    7bit when the text is ASCII, quoted-printable otherwise: readable in the
    raw message and safe through any relay, unlike base64 or 8bit.
    """
    cte = "7bit" if text.isascii() else "quoted-printable"
    body = _encode_text(text, "utf-8", cte)
    head = (
        'Content-Type: text/plain; charset="utf-8"\r\n'
        "Content-Disposition: inline\r\n"
        f"Content-Transfer-Encoding: {cte}\r\n\r\n"
    )
    return head.encode("ascii") + body


def _encode_text(text: str, codec: str, cte: str) -> bytes:
    """Encode "\\n"-terminated text as a body with CRLF line ends (RFC 2045 §6.8, RFC 2046 §4.1.1)."""
    data = text.replace("\n", "\r\n").encode(codec)
    if cte == "quoted-printable":
        return binascii.b2a_qp(data, istext=True)
    if cte == "base64":
        return base64.encodebytes(data).replace(b"\n", b"\r\n")
    return data


def _decode_cte(body: bytes, cte: str) -> bytes | None:
    if cte in ("", "7bit", "8bit", "binary"):
        return body
    if cte == "quoted-printable":
        return binascii.a2b_qp(body)
    if cte == "base64":
        try:
            return base64.b64decode(re.sub(rb"[^A-Za-z0-9+/=]", b"", body), validate=True)
        except (binascii.Error, ValueError):
            return None
    return None


def _flowed(footer: str) -> str:
    """Make the footer safe inside a format=flowed body (RFC 3676 §4.2, §4.5)."""
    lines = []
    for line in footer.split("\n"):
        if line != "-- ":
            line = line.rstrip(" ")
            if line.startswith((" ", ">", "From ")):
                line = " " + line
        lines.append(line)
    return "\n".join(lines)


def _add_footer(fields: list[_Field], body: bytes, ctx: ListContext) -> tuple[list[_Field], bytes]:
    footer = render_footer(ctx)
    info = _content(fields, "text/plain")
    try:
        if info.ctype == "text/plain" and info.disposition != "attachment":
            appended = _append_to_text(fields, body, info, footer)
            if appended is not None:
                return appended
        elif info.ctype == "multipart/mixed" and info.boundary:
            split = _split_multipart(body, info.boundary)
            if split.parts and split.close is not None:
                delimiter = b"\r\n--" + info.boundary.encode("utf-8", "replace") + b"\r\n"
                new_body = body[: split.close] + delimiter + _text_part(footer) + body[split.close :]
                return fields, new_body
    except Exception:  # noqa: BLE001 - whatever went wrong, wrapping still works
        pass
    return _wrap(fields, body, footer)


def _append_to_text(
    fields: list[_Field], body: bytes, info: _Content, footer: str
) -> tuple[list[_Field], bytes] | None:
    """Append the footer to a text/plain body, or None if it cannot be decoded."""
    cte = info.cte or "7bit"
    decoded = _decode_cte(body, cte)
    if decoded is None:
        return None
    charset = info.charset or "us-ascii"  # RFC 2045 §5.2 default
    codec = _codec(charset)
    # Only ASCII-compatible charsets: line ends are handled byte-wise below.
    if codec is None or "a\n".encode(codec) != b"a\n":
        return None
    try:
        text = decoded.decode(codec)
    except UnicodeDecodeError:
        if info.charset is not None:
            return None
        # Unlabelled 8-bit text: strict UTF-8 success is a reliable signal.
        try:
            text = decoded.decode("utf-8")
        except UnicodeDecodeError:
            return None
        charset, codec = "utf-8", "utf-8"

    if info.flowed:
        footer = _flowed(footer)
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    addition = footer if not text else ("" if text.endswith("\n") else "\n") + "\n" + footer
    try:
        addition.encode(codec)
    except UnicodeEncodeError:
        charset, codec = "utf-8", "utf-8"

    new_cte = cte
    if cte in ("7bit", "8bit", "binary") and _codec(info.charset or "us-ascii") == codec:
        tail = addition.replace("\n", "\r\n").encode(codec)
        if cte != "7bit" or tail.isascii():
            # Same charset, no transfer encoding: keep the author's bytes.
            new_body = body + tail
        else:
            new_cte = "quoted-printable"
            new_body = _encode_text(text + addition, codec, new_cte)
    else:
        if cte == "7bit" and not (text + addition).isascii():
            new_cte = "quoted-printable"
        new_body = _encode_text(text + addition, codec, new_cte)

    out = list(fields)
    if charset != (info.charset or "us-ascii"):
        out = _replace_content_type(out, charset)
    if new_cte != cte:
        cte_field = _field("Content-Transfer-Encoding", new_cte)
        if _first(out, "content-transfer-encoding") is None:
            out.append(cte_field)
        else:
            out = [cte_field if f.key == "content-transfer-encoding" else f for f in out]
    return out, new_body


def _replace_content_type(fields: list[_Field], charset: str) -> list[_Field]:
    """Set the charset parameter of a text/plain Content-Type, keeping the others."""
    scratch = email.message.Message()
    current = _first(fields, "content-type")
    if current is not None:
        scratch["Content-Type"] = current.text
        if scratch.get_content_type() != (current.text.split(";", 1)[0].strip().lower()):
            scratch.set_type("text/plain")  # the declared type was not valid
    else:
        scratch["Content-Type"] = "text/plain"
    scratch.set_param("charset", charset)
    new = _field("Content-Type", str(scratch["Content-Type"]))
    if current is None:
        return fields + [new]
    out: list[_Field] = []
    for f in fields:
        if f.key != "content-type":
            out.append(f)
        elif f is current:
            out.append(new)
    return out


def _wrap(fields: list[_Field], body: bytes, footer: str) -> tuple[list[_Field], bytes]:
    """Make the message multipart/mixed: the original entity, then the footer.

    The original Content-* fields and body move into the first part byte for
    byte, so HTML is never touched and PGP/MIME or S/MIME signatures stay valid
    (what Mailman does for such posts).
    """
    content = [f for f in fields if f.key.startswith("content-")]
    boundary = _fresh_boundary(body)
    b = boundary.encode("ascii")
    new_body = (
        b"--" + b + b"\r\n"
        + b"".join(f.raw for f in content) + b"\r\n"
        + body
        + b"\r\n--" + b + b"\r\n"
        + _text_part(footer)
        + b"\r\n--" + b + b"--\r\n"
    )  # fmt: skip
    new_fields = [_field("Content-Type", f'multipart/mixed; boundary="{boundary}"')]
    if not new_body.isascii():
        # RFC 2045 §6.4: a multipart's encoding is that of its widest part.
        new_fields.append(_field("Content-Transfer-Encoding", "8bit"))
    out: list[_Field] = []
    for f in fields:
        if not f.key.startswith("content-"):
            out.append(f)
        elif f is content[0]:
            out.extend(new_fields)
    if not content:
        out.extend(new_fields)
    return out, new_body


def _fresh_boundary(body: bytes) -> str:
    """A boundary that does not occur in the body (RFC 2046 §5.1.1).

    Derived from the body, not random, so the same post always gives the same
    bytes (and the tests can compare them).
    """
    seed = hashlib.sha1(body).hexdigest()
    for n in range(1000):
        boundary = f"=_listserv_{hashlib.sha1(f'{seed}{n}'.encode()).hexdigest()[:24]}"
        if boundary.encode("ascii") not in body:
            return boundary
    raise AssertionError("unreachable: 1000 hash collisions with the body")
