"""Turn one raw message into what the archive shows: pure, never raises on bad mail.

``parse_mail(raw, message_id, fallback_date)`` decodes the headers (RFC 2047,
unlabelled 8-bit as UTF-8 / windows-1250 / ISO-8859-2), picks the part to show
(text/plain preferred; HTML-only mail is cleaned by nh3, an allow-list
sanitizer), renders plain text as escaped HTML with clickable http(s) links and
folded quotes, and collects attachments under safe file names.

E-mail addresses never leave this module in plain form: every text it returns
(names, bodies, the mbox copy, the search text) has them shortened to
``ja…@example.org`` by ``hide_addresses``.  Message-IDs are identifiers, not
addresses, and are kept as they are in the mbox copy's threading headers.
"""

from __future__ import annotations

import base64
import codecs
import functools
import email.header
import email.utils
import html
import quopri
import re
import string
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any
from email._policybase import compat32  # email.policy.compat32, without email.policy's header registry (7 ms to import)
from email import message as _email_message
from email._encoded_words import decode_b as _decode_b  # type: ignore[import-not-found]  # what get_payload uses
from email.message import Message
from email.parser import BytesHeaderParser, BytesParser

import nh3

from listserv.archive_types import quick_pickle
from listserv.rewrite import decode_header_text, message_id_hash

__all__ = [
    "Attachment",
    "Headers",
    "Mail",
    "hide_addresses",
    "parse_headers",
    "parse_mail",
    "safe_filename",
    "strip_angles",
]

MAX_TEXT = 256 * 1024  # characters of one body shown; the rest is cut with a note
MAX_PARTS = 200
MAX_DEPTH = 20
SNIPPET = 240
SEARCH_TEXT = 600

# The lookbehind makes each run of address characters tried once (linear time).
_ADDRESS = re.compile(r"(?<![\w.!#$%&'*+/=?^`{|}~-])([\w.!#$%&'*+/=?^`{|}~-]+)@((?:[\w-]+\.)+[\w-]{2,})", re.UNICODE)
_MBOX_FROM_LINES = re.compile(r"^(?=>*From )", re.MULTILINE)
_URL = re.compile(r"\bhttps?://[^\s<>\"'\x00-\x1f]+", re.IGNORECASE)
_MSGID = re.compile(r"<([^<>\s]+)>")
_TRAILING = ".,;:!?)]}'\""
_C1_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f\ufffe\uffff]")

# Extensions a web server maps to a type that is safe to serve from the
# archive's origin.  Anything else (.html, .svg, .xml, .js, ...) gets ".bin"
# appended, so the server offers it as a download instead of running it.
SAFE_EXTENSIONS = frozenset(
    "pdf png jpg jpeg gif webp bmp tif tiff txt text csv tsv patch diff log odt ods odp odg doc docx xls xlsx"
    " ppt pptx rtf zip gz tgz bz2 xz 7z rar tar eml asc sig p7s ics vcf mp3 ogg oga wav mp4 webm mkv avi"
    " mov json md rst".split()
)

_HTML_TAGS = {
    "a", "abbr", "b", "blockquote", "br", "caption", "code", "dd", "del", "div", "dl", "dt", "em", "h1", "h2",
    "h3", "h4", "h5", "h6", "hr", "i", "ins", "kbd", "li", "ol", "p", "pre", "q", "s", "small", "span",
    "strong", "sub", "sup", "table", "tbody", "td", "tfoot", "th", "thead", "tr", "u", "ul",
}
_HTML_ATTRIBUTES = {"a": {"href", "title"}, "td": {"colspan", "rowspan"}, "th": {"colspan", "rowspan"}}


@quick_pickle
@dataclass(frozen=True, slots=True)
class Attachment:
    index: int
    filename: str  # safe: no path, no dangerous extension
    content_type: str
    data: bytes


@quick_pickle
@dataclass(frozen=True, slots=True)
class Headers:
    """What threading and the index pages need; cheap to get."""

    message_id: str
    references: tuple[str, ...]
    subject: str
    author: str  # display name, or the hidden address
    date: float


@quick_pickle
@dataclass(frozen=True, slots=True)
class Mail:
    headers: Headers
    body_html: str  # escaped / sanitized HTML fragment
    attachments: tuple[Attachment, ...]
    text: str  # the shown text, addresses hidden (mbox copy)
    snippet: str
    search: str
    date_header: str
    original_id: str = ""  # the Message-ID the message carries (the archive may know it by a derived one)


def strip_angles(message_id: str) -> str:
    mid = message_id.strip()
    if mid.startswith("<") and mid.endswith(">"):
        mid = mid[1:-1].strip()
    return mid


def hide_addresses(text: str) -> str:
    """``jan.kowalski@example.org`` -> ``ja…@example.org``: readable, not harvestable."""
    if "@" not in text:
        return text
    if len(text) < 400:
        return _ADDRESS.sub(_hide_one, text)
    # A long text: the expression runs only over the words around each "@"
    # (the run of address characters before it, the domain characters after
    # it); every match lies inside such a window, so the result is the same.
    out: list[str] = []
    done = 0
    win_start = win_end = -1
    at = text.find("@")
    while at >= 0:
        j = at
        while j > 0 and (text[j - 1] in _LOCAL_PUNCT or text[j - 1].isalnum()):
            j -= 1
        m = _DOMAIN_RUN.match(text, at + 1)
        k = m.end() if m else at + 1
        if win_start >= 0 and j <= win_end:
            win_end = max(win_end, k)
        else:
            if win_start >= 0:
                out.append(text[done:win_start])
                out.append(_ADDRESS.sub(_hide_one, text[win_start:win_end]))
                done = win_end
            win_start, win_end = j, k
        at = text.find("@", max(k, at + 1))
    if win_start >= 0:
        out.append(text[done:win_start])
        out.append(_ADDRESS.sub(_hide_one, text[win_start:win_end]))
        done = win_end
    out.append(text[done:])
    return "".join(out)


def _hide_one(m: re.Match[str]) -> str:
    return f"{m.group(1)[:2]}…@{m.group(2)}"


_LOCAL_PUNCT = frozenset("_.!#$%&'*+/=?^`{|}~-")
_DOMAIN_RUN = re.compile(r"[\w.-]*")


def valid_text(text: str) -> str:
    """The archive's one exit for decoded text: Unicode scalar values only.

    Codecs can return lone surrogates (UTF-7 ``+3Rk-``, ``surrogateescape``
    bytes, ``unicode_escape``); they cannot be written as UTF-8 (RFC 3629 §3),
    so each becomes U+FFFD, while a pair split across two runs is joined.
    """
    if text.isascii():
        return text
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return text.encode("utf-16-le", "surrogatepass").decode("utf-16-le", "replace")
    return text


def _clean(text: str) -> str:
    """Valid text without the control characters a page must not show."""
    if text.isprintable():  # no control character, no lone surrogate (most header values)
        return text
    return _C1_CONTROL.sub("", valid_text(text))


# The headers the archive reads; the others are never decoded.
_WANTED = frozenset({"subject", "from", "sender", "date", "message-id", "references", "in-reply-to"})


def _raw_headers(msg: Entity) -> dict[str, str]:
    """The wanted fields (the first of each name), decoded."""
    if isinstance(msg, _Part):
        # Its index already holds the first value of each lower-case name.
        found = [(key, value) for key, value in msg.index.items() if key in _WANTED]
    else:
        found = []
        for name, value in msg.raw_items():
            key = name.lower()
            if key in _WANTED and all(key != k for k, _ in found):
                found.append((key, value))
    return {key: _repeated_text(value) if key in _REPEATED and isinstance(value, str) else _decoded(value)
            for key, value in found}


# A list's From and Subject values repeat (an author's every post, a
# thread's replies): their decoding is cached.  The ids and dates are new in
# every message and are not.
_REPEATED = frozenset({"subject", "from", "sender"})


@functools.lru_cache(maxsize=4096)
def _repeated_text(value: str) -> str:
    return _decoded(value)


def _decoded(value: Any) -> str:
    try:
        raw: bytes | str = value if isinstance(value, str) else str(value)
        if isinstance(raw, str) and not raw.isascii() and _has_surrogates(raw):
            # compat32 keeps raw 8-bit header bytes as surrogate escapes:
            # back to bytes, then guessed as a body without a charset is.
            raw = _guess_text(raw.encode("utf-8", "surrogateescape"))
        return _clean(decode_header_text(raw))
    except Exception:  # noqa: BLE001 - a header we cannot decode is shown as best we can
        return _clean(str(value))


# compat32's feedparser: what may start a header line.
_HEADER_LINE = re.compile(r"From |[\041-\071\073-\176]*:|[\t ]")
_PLAIN_HEADERS = re.compile(r"(?:[\041-\071\073-\176]+:[^\n]*\n(?:[ \t][^\n]*\n)*)+")
_HEADER_FIELD = re.compile(r"^([\041-\071\073-\176]+):[ \t]*([^\n]*\n(?:[ \t][^\n]*\n)*)", re.MULTILINE)


# The headers whose values decide how a part is read (type, parameters, encoding).
_STRUCTURAL = ("content-type", "content-disposition", "content-transfer-encoding")
_UUENCODE = frozenset({"x-uuencode", "uuencode", "uue", "x-uue"})


class _Part:
    """One MIME entity as a compat32 ``Message`` reads it, without its bookkeeping.

    ``Message.get`` scans every field and lower-cases each name on every
    call, and a content type is asked for several times per part; parsing
    was two fifths of a full build.  A ``_Part`` indexes its fields once and
    answers the calls this module makes (``get``, ``raw_items``,
    ``get_content_type``, ``get_param``, ``get_filename``, ``get_payload``
    ...) with ``Message``'s own rules and helpers.  It is made only where
    those rules are plain: the type, disposition and transfer-encoding
    fields are ASCII (no ``Header`` objects) and the encoding is not
    uuencode; anything else is a ``Message`` (tests compare the two).
    """

    __slots__ = ("fields", "index", "ctype", "payload", "preamble", "epilogue", "defects", "_params")

    def __init__(self, fields: list[tuple[str, str]], index: dict[str, str], ctype: str) -> None:
        self.fields = fields
        self.index = index
        self.ctype = ctype
        self.payload: str | list[Any] | None = None
        self.preamble: str | None = None
        self.epilogue: str | None = None
        self.defects: list[Any] = []
        self._params: dict[str, list[tuple[str, Any]] | None] = {}

    @staticmethod
    def make(fields: list[tuple[str, str]]) -> _Part | None:
        index: dict[str, str] = {}
        for name, value in fields:
            key = name.lower()
            if key not in index:
                index[key] = value
        for key in _STRUCTURAL:
            found = index.get(key)
            if found is not None and not found.isascii():
                return None
        cte = index.get("content-transfer-encoding")
        if cte is not None and cte.lower() in _UUENCODE:
            return None
        content_type = index.get("content-type")
        if content_type is None:
            ctype = "text/plain"
        else:
            # Message.get_content_type: the part before ";", one "/" or text/plain.
            ctype = content_type.partition(";")[0].strip().lower()
            if ctype.count("/") != 1:
                ctype = "text/plain"
        return _Part(fields, index, ctype)

    # -- the Message calls this module makes
    def raw_items(self) -> Iterator[tuple[str, str]]:
        return iter(self.fields)

    def get(self, name: str, failobj: Any = None) -> Any:
        return self.index.get(name.lower(), failobj)

    def __contains__(self, name: str) -> bool:
        return name.lower() in self.index

    def get_content_type(self) -> str:
        return self.ctype

    def get_content_maintype(self) -> str:
        return self.ctype.split("/")[0]

    def is_multipart(self) -> bool:
        return isinstance(self.payload, list)

    def _params_of(self, header: str) -> list[tuple[str, Any]] | None:
        key = header.lower()
        if key not in self._params:
            value = self.index.get(key)
            if value is None:
                self._params[key] = None
            else:
                # Message._get_params_preserve, step for step.
                params: list[tuple[str, Any]] = []
                for p in _email_message._parseparam(value):  # type: ignore[attr-defined]
                    try:
                        name, val = p.split("=", 1)
                        name = name.strip()
                        val = val.strip()
                    except ValueError:
                        name = p.strip()
                        val = ""
                    params.append((name, val))
                self._params[key] = email.utils.decode_params(params)
        return self._params[key]

    def get_param(self, param: str, failobj: Any = None, header: str = "content-type") -> Any:
        params = self._params_of(header)
        if params is None:
            return failobj
        wanted = param.lower()
        for k, v in params:
            if k.lower() == wanted:
                return _email_message._unquotevalue(v)  # type: ignore[attr-defined]
        return failobj

    def get_boundary(self) -> str | None:
        boundary = self.get_param("boundary", _MISSING)
        if boundary is _MISSING:
            return None
        return email.utils.collapse_rfc2231_value(boundary).rstrip()

    def get_filename(self) -> str | None:
        filename = self.get_param("filename", _MISSING, "content-disposition")
        if filename is _MISSING:
            filename = self.get_param("name", _MISSING, "content-type")
        if filename is _MISSING:
            return None
        return email.utils.collapse_rfc2231_value(filename).strip()

    def get_content_charset(self) -> str | None:
        charset = self.get_param("charset", _MISSING)
        if charset is _MISSING:
            return None
        if isinstance(charset, tuple):
            pcharset = charset[0] or "us-ascii"
            try:
                charset = str(charset[2].encode("raw-unicode-escape"), pcharset)
            except (LookupError, UnicodeError):
                charset = charset[2]
        try:
            charset.encode("us-ascii")
        except UnicodeError:
            return None
        return str(charset).lower()

    def get_payload(self, decode: bool = False) -> Any:
        payload = self.payload
        if isinstance(payload, list):
            return None if decode else payload
        if not decode or payload is None:
            return payload
        # Message.get_payload(decode=True) for a payload read from bytes as
        # ASCII with surrogate escapes: back to those bytes, then the
        # transfer encoding (the value as written, lower-cased, not stripped).
        data = payload.encode("ascii", "surrogateescape")
        cte = self.index.get("content-transfer-encoding", "").lower()
        if cte == "quoted-printable":
            return quopri.decodestring(data)
        if cte == "base64":
            value, defects = _decode_b(b"".join(data.splitlines()))
            self.defects.extend(defects)
            return value
        return data

    def set_payload(self, payload: str) -> None:
        self.payload = payload

    def attach(self, part: Any) -> None:
        if not isinstance(self.payload, list):
            self.payload = []
        self.payload.append(part)


_MISSING: Any = object()
# What the parsing functions below take: a parsed Message, or the same entity as a _Part.
Entity = Message | _Part


def _quick_message(raw: bytes, with_body: bool = True) -> Entity | None:
    """The message as ``BytesParser(policy=compat32)`` reads it, quicker.

    The header lines are split here and set on the ``Message`` as the
    feedparser would (same names, same raw values, same defects skipped);
    the rest becomes the payload, and a well-formed multipart body is split
    into its parts the same way.  None for input the feedparser reads by its
    own, rarer rules (lone CRs, envelope lines inside the headers, missing
    boundaries, embedded messages, digests): the caller then uses the parser.
    """
    if not raw:
        return None
    if not with_body:
        # Only the header block and the blank line after it are decoded
        # (the earlier of LF LF and LF CRLF, as _first_blank_line finds it).
        lf = raw.find(b"\n\n")
        crlf = raw.find(b"\n\r\n", 0, lf + 1 if lf >= 0 else len(raw))
        if crlf >= 0:
            raw = raw[: crlf + 3]
        elif lf >= 0:
            raw = raw[: lf + 2]
    text = raw.decode("ascii", "surrogateescape")
    if "\r" in text and _LONE_CR_TEXT.search(text):
        return None
    msg = _quick_part(text, with_body)
    if msg is None or not with_body or msg.get_content_maintype() != "multipart":
        return msg
    return msg if _split_multipart(msg, 0) else None


_LONE_CR_TEXT = re.compile(r"\r(?!\n)")


def _drop_last_eol(text: str) -> str:
    """Without one final CRLF or LF: the feedparser's trailing-newline rule, without a regular expression scanning the text."""
    if text.endswith("\r\n"):
        return text[:-2]
    if text.endswith("\n"):
        return text[:-1]
    return text


def _first_blank_line(text: str) -> int:
    """Where the first ``"\\n\\n"`` or ``"\\n\\r\\n"`` starts (the earlier of the two), or -1.

    The kind the first line ends with is looked for first, and the other
    only before it: a part's base64 body is not scanned for a blank line it
    does not have.
    """
    eol = text.find("\n")
    if eol > 0 and text[eol - 1] == "\r":
        crlf = text.find("\n\r\n")
        lf = text.find("\n\n", 0, crlf + 1 if crlf >= 0 else len(text))
    else:
        lf = text.find("\n\n")
        crlf = text.find("\n\r\n", 0, lf + 2 if lf >= 0 else len(text))
    if lf < 0:
        return crlf
    if crlf < 0:
        return lf
    return min(lf, crlf)


def _quick_part(text: str, with_body: bool) -> Entity | None:
    """One entity (headers, then its body as the payload); no lone CRs in ``text``."""
    if text.startswith("\n"):
        head_len, body_at = 0, 1
    elif text.startswith("\r\n"):
        head_len, body_at = 0, 2
    else:
        blank = _first_blank_line(text)
        if blank >= 0:
            head_len = blank + 1
            body_at = head_len + (1 if text[head_len : head_len + 1] == "\n" else 2)
        else:
            head_len = body_at = len(text)
    head = text[:head_len]
    if head.endswith("\n") and _PLAIN_HEADERS.fullmatch(head):
        # The usual header block (every line a field or its continuation):
        # split by one expression, values as the feedparser stores them.
        fields = [(name, value.rstrip("\r\n")) for name, value in _HEADER_FIELD.findall(head)]
        part = _Part.make(fields)
        if part is not None:
            if with_body:
                part.payload = text[body_at:]
            return part
        msg = Message()
        for name, value in fields:
            msg.set_raw(name, value)
        if with_body:
            msg.set_payload(text[body_at:])
        return msg
    lines = head.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
        last_open = False
    else:
        last_open = True  # no newline after the last header line
    header_lines: list[str] = []
    offset = 0
    n = len(lines)
    for lineno, line in enumerate(lines):
        full = line if (last_open and lineno == n - 1) else line + "\n"
        if not _HEADER_LINE.match(full):
            body_at = offset  # the feedparser puts the line back into the body
            break
        offset += len(full)
        header_lines.append(full)
    pairs: list[tuple[str, list[str]]] = []
    current: list[str] | None = None
    for lineno, full in enumerate(header_lines):
        if full[0] in " \t":
            if current is not None:
                current.append(full)
            continue
        current = None
        if full.startswith("From "):
            if lineno == 0:
                continue
            return None  # an envelope line inside the headers: the parser's rules
        i = full.find(":")
        if i <= 0:
            continue
        current = [full]
        pairs.append((full[:i], current))
    msg = Message()
    for name, source in pairs:
        value = source[0].split(":", 1)[1].lstrip(" \t") + "".join(source[1:])
        msg.set_raw(name, value.rstrip("\r\n"))
    if with_body:
        msg.set_payload(text[body_at:])
    return msg


def _boundary_lines(body: str, marker: str) -> list[tuple[int, int, bool]]:
    """(start, end after its newline, is the close delimiter) of each boundary line in ``body``."""
    out: list[tuple[int, int, bool]] = []
    pos = 0
    size = len(marker)
    while True:
        at = body.find(marker, pos)
        if at < 0:
            return out
        pos = at + size
        if at and body[at - 1] != "\n":
            continue
        end = pos
        close = body.startswith("--", end)
        if close:
            end += 2
        while end < len(body) and body[end] in " \t":
            end += 1
        if body.startswith("\r\n", end):
            end += 2
        elif body.startswith("\n", end):
            end += 1
        elif end < len(body):
            continue  # "--bx", "--b--x": not a boundary line
        out.append((at, end, close))
        pos = end


def _raw_payload(msg: Entity) -> Any:
    return msg.payload if isinstance(msg, _Part) else getattr(msg, "_payload", None)


def _split_multipart(msg: Entity, depth: int) -> bool:
    """Split a multipart payload into parts as the feedparser does; False when it needs the parser."""
    boundary = msg.get_boundary()
    body = _raw_payload(msg)  # as parsed: get_payload() would decode 8-bit text
    if boundary is None or not isinstance(body, str) or depth > MAX_DEPTH:
        return False
    if msg.get_content_type() == "multipart/digest":
        return False
    marks = _boundary_lines(body, "--" + boundary)
    if not marks or marks[0][2] or not any(close for _, _, close in marks):
        return False
    parts: list[Entity] = []
    for here, nxt in zip(marks, marks[1:]):
        if here[2]:
            break
        if nxt[0] == here[1]:
            return False  # repeated boundary lines: the parser's rules
        chunk = body[here[1] : nxt[0]]
        part = _quick_part(chunk, True)
        if part is None:
            return False
        maintype = part.get_content_maintype()
        if maintype == "message":
            return False
        if maintype == "multipart":
            if not _split_multipart(part, depth + 1):
                return False
            epilogue = part.epilogue
            if epilogue == "":
                part.epilogue = None
            elif epilogue is not None:
                part.epilogue = _drop_last_eol(epilogue)
        else:
            payload = _raw_payload(part)
            if isinstance(payload, str):
                part.set_payload(_drop_last_eol(payload))
        parts.append(part)
    close = next(m for m in marks if m[2])
    preamble = body[: marks[0][0]]
    msg.preamble = _drop_last_eol(preamble) if preamble else None
    epilogue = body[close[1] :]
    msg.epilogue = epilogue
    if isinstance(msg, _Part):
        msg.payload = None
    else:
        setattr(msg, "_payload", None)
    for part in parts:
        msg.attach(part)  # type: ignore[arg-type]  # a Message holds _Parts as it holds Messages
    return True


def _has_surrogates(value: str) -> bool:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def _references(headers: dict[str, str]) -> tuple[str, ...]:
    refs = _MSGID.findall(headers.get("references", ""))
    irt = _MSGID.findall(headers.get("in-reply-to", ""))
    out = list(dict.fromkeys(refs))
    if irt and irt[0] not in out:
        out.append(irt[0])
    return tuple(out[-200:])


def _date(value: str, fallback: float) -> float:
    if value:
        try:
            parsed = email.utils.parsedate_tz(value)
            if parsed is not None:
                ts = float(email.utils.mktime_tz(parsed))
                # Dates before e-mail lists or far in the future are client bugs.
                if 315532800.0 <= ts <= time.time() + 7 * 86400:
                    return ts
        except (ValueError, OverflowError, TypeError, IndexError):
            pass
    return fallback


# "Name <addr>", "\"Name\" <addr>", "addr": the shapes most mail uses, read as parseaddr reads them.
_SIMPLE_ADDR = r"[A-Za-z0-9._%+=-]+@[A-Za-z0-9.-]+"
_NAME_ADDR = re.compile(r"[ \t]*(?:([^()<>@,:;\"\[\]\\\r\n]+?)|\"([^\"\\\r\n]*)\")[ \t]*<(" + _SIMPLE_ADDR + r")>[ \t]*")
_ADDR_ONLY = re.compile(r"[ \t]*(" + _SIMPLE_ADDR + r")[ \t]*")
_WSP = re.compile(r"[ \t]+")


def _parse_from(value: str) -> tuple[str, str]:
    m = _NAME_ADDR.fullmatch(value)
    if m is not None:
        addr = m.group(3)
        if ".." not in addr and not addr.startswith(".") and not addr.endswith("."):
            if m.group(2) is not None:
                return m.group(2), addr
            name = " ".join(w for w in _WSP.split(m.group(1)) if w)
            if name and "." not in name:
                return name, addr
    m = _ADDR_ONLY.fullmatch(value)
    if m is not None and ".." not in m.group(1) and not m.group(1).startswith(".") and not m.group(1).endswith("."):
        return "", m.group(1)
    return email.utils.parseaddr(value)


def _author(headers: dict[str, str]) -> str:
    return _author_of(headers.get("from", "") or headers.get("sender", ""))


@functools.lru_cache(maxsize=4096)  # an author's every post has the same From
def _author_of(value: str) -> str:
    try:
        name, addr = _parse_from(value)
    except Exception:  # noqa: BLE001
        name, addr = "", value
    name = _clean(name.strip().strip('"').strip())
    if name:
        return hide_addresses(name)[:200]
    if addr:
        return hide_addresses(addr)[:200]
    return hide_addresses(_clean(value))[:200] or "?"


def _headers_of(msg: Entity, message_id: str, fallback_date: float) -> tuple[Headers, dict[str, str]]:
    raw = _raw_headers(msg)
    mid = strip_angles(message_id) or strip_angles(raw.get("message-id", ""))
    headers = Headers(
        message_id=mid,
        references=tuple(r for r in _references(raw) if r != mid),
        subject=_shown_subject(raw.get("subject", "")),
        author=_author(raw),
        date=_date(raw.get("date", ""), fallback_date),
    )
    return headers, raw


@functools.lru_cache(maxsize=4096)  # a thread's replies repeat its subject
def _shown_subject(value: str) -> str:
    return hide_addresses(_clean(value).strip()[:500])


@quick_pickle
@dataclass(frozen=True, slots=True)
class HeaderScan:
    """What ``parse_mail`` takes from the headers; a full build reads it once (for threading) and passes it on."""

    headers: Headers
    date_header: str
    original_id: str


def _original_id(raw_headers: dict[str, str]) -> str:
    value = raw_headers.get("message-id", "")
    ids = _MSGID.findall(value)
    return strip_angles(ids[0] if ids else value)[:500]


def scan_headers(raw: bytes, message_id: str, fallback_date: float) -> HeaderScan:
    """Only the headers (no body parsed); never raises."""
    try:
        msg = _quick_message(raw, with_body=False) or BytesHeaderParser(policy=compat32).parsebytes(raw)
        headers, raw_headers = _headers_of(msg, message_id, fallback_date)
        return HeaderScan(headers, _clean(raw_headers.get("date", ""))[:100], _original_id(raw_headers))
    except Exception:  # noqa: BLE001 - never crash on a message
        return HeaderScan(Headers(strip_angles(message_id), (), "", "?", fallback_date), "", "")


def parse_headers(raw: bytes, message_id: str, fallback_date: float) -> Headers:
    """Only the headers: for threading a whole list quickly."""
    return scan_headers(raw, message_id, fallback_date).headers


# -- bodies


def _codec(charset: str | None) -> str:
    if charset:
        try:
            info = codecs.lookup(charset.strip().strip('"').lower())
            if getattr(info, "_is_text_encoding", True) is not False:
                return info.name
        except (LookupError, ValueError):
            pass
    return ""


# Labels that say nothing about 8-bit bytes: such bytes are guessed instead.
_VAGUE_CHARSETS = frozenset({"", "ascii", "utf-8"})


def _guess_text(data: bytes) -> str:
    """Unlabelled 8-bit text: UTF-8 if it is that, else windows-1250 or ISO-8859-2.

    The two Polish sets differ in where they put ą ś ź (and capitals):
    whichever set's Polish letters the bytes use more often wins; bytes
    0x80-0x9F (control codes in ISO-8859-2) count for windows-1250.
    """
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        pass
    cp1250 = len(_CP1250_ONLY.findall(data))
    latin2 = len(_LATIN2_ONLY.findall(data))
    if cp1250 > latin2:
        return data.decode("cp1250", "replace")
    return data.decode("iso-8859-2", "replace")


# ą Ą ś Ś ź Ź in each set, where the other has something else (š ¥ ... / ± ˇ ¶ ...).
_CP1250_ONLY = re.compile(rb"[\x80-\x9f\xb9\xa5]")
_LATIN2_ONLY = re.compile(rb"[\xb1\xa1\xb6\xa6\xbc\xac]")


def decode_text(data: bytes, charset: str | None) -> str:
    """A body's bytes as valid text; never raises.

    The declared charset is used when it reads the bytes cleanly.  An
    unknown or unusable label (HyperKitty and MHonArc also fall back when
    the codec lookup fails), or us-ascii / utf-8 that the bytes contradict,
    is treated as no label: UTF-8, else windows-1250 / ISO-8859-2, so Polish
    mail from misconfigured clients is readable instead of a run of U+FFFD.
    Any other label that does not fit is decoded with U+FFFD for the bad bytes.
    """
    codec = _codec(charset)
    # UTF-8 and the single-byte sets never decode to a lone surrogate (the
    # UTF-8 decoder refuses encoded ones): their text is not checked again.
    checked = valid_text if codec not in _SURROGATE_FREE else _as_is
    if codec not in _VAGUE_CHARSETS:
        # A Warning too: unicode_escape warns of an invalid escape (an error
        # where warnings are errors), and the bytes are then guessed.
        try:
            return checked(data.decode(codec))
        except (LookupError, UnicodeError, ValueError, TypeError, Warning):
            pass
        try:
            return checked(data.decode(codec, "replace"))
        except (LookupError, UnicodeError, ValueError, TypeError, Warning):
            pass  # codecs such as idna raise even with "replace"
    elif data.isascii():
        return data.decode("ascii")
    return _guess_text(data)  # UTF-8, windows-1250 or ISO-8859-2: no surrogates


def _as_is(text: str) -> str:
    return text


# Codec names (codecs.lookup(...).name) whose decoding never yields a lone surrogate.
_SURROGATE_FREE = frozenset({"utf-8", "ascii", "cp1250", "cp1251", "cp1252", "cp1257", "koi8-r", "koi8-u",
                             *(f"iso8859-{n}" for n in range(1, 17) if n != 12)})  # there is no ISO-8859-12


_decode_text = decode_text


# "type/sub; name=value; ..." with plain names and values (no RFC 2231 "*", no
# escapes, no comments): Message.get_content_charset's answer is read directly.
_PLAIN_PARAMS = re.compile(r'[ \t]*[\w.+-]+/[\w.+-]+[ \t]*((?:;[ \t]*[\w.+-]+[ \t]*=[ \t]*(?:"[\w.:+/=-]*"|[\w.:+/=-]*)[ \t]*)*);?[ \t]*',
                           re.ASCII)
_PLAIN_PARAM = re.compile(r';[ \t]*([\w.+-]+)[ \t]*=[ \t]*("?)([\w.:+/=-]*)\2', re.ASCII)


def _charset(part: Entity) -> str | None:
    """``part.get_content_charset()``, read directly from the usual "type/sub; charset=x; format=flowed"."""
    value = part.get("content-type")
    if isinstance(value, str):
        m = _PLAIN_PARAMS.fullmatch(value)
        if m is not None:
            params: list[tuple[str, str, str]] = _PLAIN_PARAM.findall(m.group(1))
            for name, _, param in params:
                if name.lower() == "charset":
                    if param:
                        return param.lower()
                    break  # an empty charset: the full rules
            else:
                return None  # no charset parameter
    return part.get_content_charset()


def _payload(part: Entity) -> bytes:
    try:
        data = part.get_payload(decode=True)
    except Exception:  # noqa: BLE001
        data = None
    if isinstance(data, bytes):
        return data
    raw = part.get_payload()
    if isinstance(raw, str):
        return raw.encode("utf-8", "surrogateescape")
    return b""


def _filename(part: Entity) -> str:
    try:
        name = part.get_filename() or part.get_param("name") or ""
    except Exception:  # noqa: BLE001
        name = ""
    if isinstance(name, tuple):  # an RFC 2231 value compat32 did not collapse
        name = email.utils.collapse_rfc2231_value(name)
    text = str(name)
    try:
        if _has_surrogates(text):
            return _clean(decode_header_text(text.encode("ascii", "surrogateescape")))
        return _clean(decode_header_text(text))
    except Exception:  # noqa: BLE001 - a name we cannot read becomes attachment-N
        return ""


def safe_filename(name: str, index: int, content_type: str) -> str:
    """A name that is one path segment, readable, and not runnable when served."""
    base = re.split(r"[/\\]", name.replace("\x00", ""))[-1]
    base = re.sub(r"[^\w.\- ()]+", "_", _clean(base), flags=re.UNICODE).strip(" .")
    base = re.sub(r"\s+", "_", base)
    if not base or set(base) <= {".", "_"}:
        base = f"attachment-{index}"
        ext = {"text/plain": "txt", "application/pdf": "pdf", "image/png": "png", "image/jpeg": "jpg",
               "image/gif": "gif", "message/rfc822": "eml"}.get(content_type, "bin")
        base += f".{ext}"
    if len(base) > 100:
        stem, dot, ext = base.rpartition(".")
        base = (stem[:90] + "." + ext[:8]) if dot and len(ext) <= 8 else base[:100]
    if len(base.encode("utf-8")) > MAX_NAME_BYTES:
        # A file name is at most 255 bytes (ext4, XFS, tmpfs), and 100
        # characters of CJK text are 300; an atomic write adds ".NAME.PID.tmp".
        stem, dot, ext = base.rpartition(".")
        if dot and len(ext) <= 8:
            base = _utf8_prefix(stem, MAX_NAME_BYTES - 1 - len(ext.encode("utf-8"))) + "." + ext
        else:
            base = _utf8_prefix(base, MAX_NAME_BYTES)
    ext = base.rpartition(".")[2].lower() if "." in base else ""
    if ext not in SAFE_EXTENSIONS:
        base += ".bin"
    return base


MAX_NAME_BYTES = 120  # an attachment's file name, in UTF-8 bytes


def _utf8_prefix(text: str, limit: int) -> str:
    """The longest start of ``text`` whose UTF-8 form fits in ``limit`` bytes (no character cut in two)."""
    return text.encode("utf-8")[:limit].decode("utf-8", "ignore")


def _linkify(text: str) -> str:
    """Escape plain text for HTML, making http(s) URLs clickable."""
    if "://" not in text:  # no URL can match: one escape
        return html.escape(text)
    out: list[str] = []
    pos = 0
    for m in _URL.finditer(text):
        url = m.group(0)
        while url and url[-1] in _TRAILING:
            if url[-1] == ")" and url.count("(") >= url.count(")"):
                break
            url = url[:-1]
        end = m.start() + len(url)
        out.append(html.escape(text[pos : m.start()]))
        if "@" in url:  # http://user@host: shown as text, address hidden
            out.append(html.escape(url))
        else:
            href = html.escape(url, quote=True)
            out.append(f'<a href="{href}" rel="nofollow noopener noreferrer">{href}</a>')
        pos = end
    out.append(html.escape(text[pos:]))
    return "".join(out)


_QUOTE = re.compile(r"^\s{0,3}>")
# A whole line that _QUOTE matches, with the line break before it.
_QUOTED_AFTER_BREAK = re.compile(r"\n[^\S\n]{0,3}>[^\n]*")
_ANY_QUOTE = re.compile(r"^\s{0,3}>", re.MULTILINE)  # a match spanning lines implies a quoted line too


def text_to_html(text: str, quoted_label: str = "") -> str:
    """Plain text as HTML: escaped, links clickable, runs of quoted lines folded."""
    if not _ANY_QUOTE.search(text):  # no quoted line: one block
        body = text.rstrip("\n")
        return f'<pre class="text">{_linkify(body)}</pre>' if body.strip() else ""
    lines = text.split("\n")
    quoted_at = [_QUOTE.match(line) is not None for line in lines]
    chunks: list[str] = []
    plain: list[str] = []
    i = 0
    n = len(lines)
    while i < n:
        if quoted_at[i]:
            j = i
            while j < n and (quoted_at[j] or (j + 1 < n and quoted_at[j + 1] and not lines[j].strip())):
                j += 1
            if plain:
                chunks.append(f'<pre class="text">{_linkify(chr(10).join(plain))}</pre>')
                plain = []
            quoted = _linkify("\n".join(lines[i:j]))
            count = j - i
            if count >= 4:
                chunks.append(
                    f'<details class="quote"><summary>{html.escape(quoted_label.format(n=count))}</summary>'
                    f'<pre class="text quoted">{quoted}</pre></details>'
                )
            else:
                chunks.append(f'<pre class="text quoted">{quoted}</pre>')
            i = j
        else:
            plain.append(lines[i])
            i += 1
    if plain:
        body = "\n".join(plain).rstrip("\n")
        if body.strip():
            chunks.append(f'<pre class="text">{_linkify(body)}</pre>')
    return "".join(chunks)


def own_words(text: str, limit: int) -> str:
    """The words of the lines ``_QUOTE`` does not match, one space apart, cut at ``limit`` characters.

    Quoted lines (whole lines that ``_QUOTE`` matches) are emptied in one
    pass, then the words joined: cheaper than a line at a time for list
    mail, whose texts are a few kilobytes.  A long text is taken in pieces
    cut at line starts, stopping once the words gathered fill ``limit``:
    the first ``limit`` characters of the joined words cannot change after
    that (the snippet and search text need 600 characters of a long text).
    """
    if len(text) <= 4 * limit:
        return _own_words_of(text)[:limit]
    words: list[str] = []
    joined = -1  # length of " ".join(words)
    start = 0
    while start < len(text) and joined < limit:
        end = text.find("\n", start + 2 * limit)
        end = len(text) if end < 0 else end + 1  # the piece ends after a line break: the next starts a line
        piece = _own_words_of(text[start:end])
        if piece:
            words.append(piece)
            joined += len(piece) + 1
        start = end
    return " ".join(words)[:limit]


def _own_words_of(text: str) -> str:
    if ">" not in text:  # no quoted line at all
        return " ".join(text.split())
    # Each quoted line found after its line break (a literal the expression
    # engine finds quickly), rather than "^" tried at every character.
    return " ".join(_QUOTED_AFTER_BREAK.sub("\n", "\n" + text).split())


def sanitize_html(source: str) -> str:
    cleaned = nh3.clean(
        source,
        tags=_HTML_TAGS,
        clean_content_tags={"script", "style", "title", "head", "noscript", "template", "iframe", "object",
                            "svg", "math"},
        attributes=_HTML_ATTRIBUTES,
        url_schemes={"http", "https"},
        link_rel="nofollow noopener noreferrer",
        strip_comments=True,
    )
    return hide_addresses(cleaned)


def html_to_text(source: str) -> str:
    text = re.sub(r"(?is)<(script|style|head)\b.*?</\1\s*>", " ", source)
    text = re.sub(r"(?i)<br\s*/?>|</p\s*>|</div\s*>|</tr\s*>|</li\s*>", "\n", text)
    text = re.sub(r"<[^>]*>", "", text)
    text = html.unescape(text)
    return re.sub(r"\n{3,}", "\n\n", re.sub(r"[ \t\r\f\v]+", " ", text)).strip()


def _iter_parts(msg: Entity, depth: int = 0) -> Iterator[tuple[str, Entity]]:
    """("text"|"html"|"attachment"|"message", part) in display order."""
    if depth > MAX_DEPTH:
        return
    ctype = msg.get_content_type()
    disposition = (msg.get("Content-Disposition") or "").split(";")[0].strip().lower()
    if ctype == "message/rfc822" or ctype == "message/global":
        inner = msg.get_payload()
        if isinstance(inner, list) and inner and isinstance(inner[0], (Message, _Part)):
            yield "message", inner[0]
            yield from _iter_parts(inner[0], depth + 1)
        return
    if msg.is_multipart():
        parts = [p for p in msg.get_payload() if isinstance(p, (Message, _Part))]
        if ctype == "multipart/alternative" and parts:
            chosen = _choose_alternative(parts)
            yield from _iter_parts(chosen, depth + 1)
            return
        for part in parts[:MAX_PARTS]:
            yield from _iter_parts(part, depth + 1)
        return
    if ctype == "text/plain" and disposition != "attachment":
        yield "text", msg
    elif ctype == "text/html" and disposition != "attachment":
        yield "html", msg
    else:
        yield "attachment", msg


def _choose_alternative(parts: list[Entity]) -> Entity:
    for wanted in ("text/plain", "multipart/related", "multipart/mixed", "text/html"):
        for part in parts:
            if part.get_content_type() == wanted:
                if wanted == "text/plain" and not _payload(part).strip():
                    continue
                return part
    return parts[0]


@dataclass(frozen=True, slots=True)
class Labels:
    quoted: str = "{n} quoted lines"
    truncated: str = "[message cut: too long]"
    forwarded: str = "Forwarded message"


def parse_mail(raw: bytes, message_id: str, fallback_date: float, labels: Labels = Labels(),
               known: HeaderScan | None = None) -> Mail:
    """Decode one message for display.  Never raises.

    ``known`` is this message's ``scan_headers`` result when the caller has
    it (a full build): the headers are then not decoded a second time.
    """
    try:
        return _parse_mail(raw, message_id, fallback_date, labels, known)[1]
    except Exception:  # noqa: BLE001 - show the bytes as text rather than fail the build
        text = hide_addresses(_clean(raw[:MAX_TEXT].decode("utf-8", "replace")))
        headers = parse_headers(raw, message_id, fallback_date)
        return Mail(headers, text_to_html(text, labels.quoted), (), text, text[:SNIPPET], text[:SEARCH_TEXT], "")


def scan_and_parse(raw: bytes, message_id: str, fallback_date: float,
                   labels: Labels = Labels()) -> tuple[HeaderScan, Mail]:
    """``scan_headers`` and ``parse_mail(..., known=scan)`` of one message, its header block split once.

    What a build worker reads ahead during an import: the scan is for
    threading, the parsed message for the render.  Never raises.
    """
    try:
        return _parse_mail(raw, message_id, fallback_date, labels, None)
    except Exception:  # noqa: BLE001 - the two steps apart, each as robust as alone
        scan = scan_headers(raw, message_id, fallback_date)
        return scan, parse_mail(raw, message_id, fallback_date, labels, scan)


def _parse_mail(raw: bytes, message_id: str, fallback_date: float, labels: Labels,
                known: HeaderScan | None) -> tuple[HeaderScan, Mail]:
    # Most list mail is one text part: read only the headers and decode the
    # body directly; parse the MIME tree only when there is one.
    msg = _quick_message(raw) or BytesParser(policy=compat32).parsebytes(raw, headersonly=True)
    if msg.get_content_maintype() in ("multipart", "message") and not msg.is_multipart():
        msg = BytesParser(policy=compat32).parsebytes(raw)
    if known is None:
        headers, raw_headers = _headers_of(msg, message_id, fallback_date)
        known = HeaderScan(headers, _clean(raw_headers.get("date", ""))[:100], _original_id(raw_headers))
    headers = known.headers
    blocks: list[str] = []
    texts: list[str] = []
    attachments: list[Attachment] = []
    budget = MAX_TEXT
    for kind, part in _iter_parts(msg):
        if len(attachments) + len(blocks) > MAX_PARTS:
            break
        if kind == "message":
            inner = _raw_headers(part)
            line = f"{labels.forwarded}: {inner.get('subject', '')} ({_author(inner)})"
            blocks.append(f'<p class="forwarded">{html.escape(hide_addresses(_clean(line)))}</p>')
            texts.append(f"--- {hide_addresses(_clean(line))} ---")
            continue
        if kind == "attachment":
            ctype = part.get_content_type()
            index = len(attachments) + 1
            attachments.append(Attachment(index, safe_filename(_filename(part), index, ctype), ctype, _payload(part)))
            continue
        # decode_text's text is valid already: only the control characters go (what _clean does then).
        text = _C1_CONTROL.sub("", _decode_text(_payload(part), _charset(part)))
        text = text.replace("\r\n", "\n").replace("\r", "\n")
        if budget <= 0:
            continue
        cut = len(text) > budget
        text = text[:budget]
        budget -= len(text)
        if kind == "html":
            blocks.append(f'<div class="html">{sanitize_html(text)}</div>')
            shown = hide_addresses(html_to_text(text))
        else:
            shown = hide_addresses(text)
            blocks.append(text_to_html(shown, labels.quoted))
        if cut:
            blocks.append(f'<p class="note">{html.escape(labels.truncated)}</p>')
        texts.append(shown)
    full = "\n\n".join(t.strip("\n") for t in texts if t.strip())
    flat = own_words(full, SEARCH_TEXT)  # the author's own words, for the snippet and search text
    return known, Mail(
        headers=headers,
        body_html="".join(blocks),
        attachments=tuple(attachments),
        text=full,
        snippet=flat[:SNIPPET],
        search=flat[:SEARCH_TEXT],
        date_header=known.date_header,
        original_id=known.original_id,
    )


def plain_text(raw: bytes, limit: int = MAX_TEXT) -> tuple[str, tuple[tuple[str, str, int], ...]]:
    """A message's readable text and its attachments as (name, type, size), for a plain digest.

    As ``parse_mail`` reads it (charsets guessed, HTML-only mail turned into
    text), but addresses are not hidden: it goes to the list's members, who
    had the post itself.  Never raises.
    """
    try:
        msg = _quick_message(raw) or BytesParser(policy=compat32).parsebytes(raw, headersonly=True)
        if msg.get_content_maintype() in ("multipart", "message") and not msg.is_multipart():
            msg = BytesParser(policy=compat32).parsebytes(raw)
        texts: list[str] = []
        files: list[tuple[str, str, int]] = []
        for kind, part in _iter_parts(msg):
            if kind == "message":
                inner = _raw_headers(part)
                texts.append(f"--- {_clean(inner.get('subject', ''))} ({_author(inner)}) ---")
            elif kind == "attachment":
                ctype = part.get_content_type()
                files.append((safe_filename(_filename(part), len(files) + 1, ctype), ctype, len(_payload(part))))
            else:
                text = _clean(_decode_text(_payload(part), _charset(part))).replace("\r\n", "\n").replace("\r", "\n")
                texts.append(html_to_text(text) if kind == "html" else text)
        full = "\n\n".join(t.strip("\n") for t in texts if t.strip())
        return full[:limit], tuple(files)
    except Exception:  # noqa: BLE001 - show the bytes as text rather than fail the digest
        return _clean(raw[:limit].decode("utf-8", "replace")), ()


def fallback_message_id(raw: bytes) -> str:
    """An id for a message that has none: stable for the same bytes."""
    import hashlib

    return f"no-message-id.{hashlib.sha1(raw).hexdigest()}@archive.invalid"


def mbox_entry(mail: Mail, attachment_names: list[str]) -> bytes:
    """One mboxrd entry: the shown text with hidden addresses, threading headers kept."""
    h = mail.headers
    when = time.strftime("%a %b %d %H:%M:%S %Y", time.gmtime(h.date))
    lines = [
        f"From archive {when}",
        f"From: {_encoded(h.author)}",
        f"Date: {_one_line(mail.date_header) or email.utils.formatdate(h.date)}",
        f"Subject: {_encoded(h.subject)}",
        f"Message-ID: <{_one_line(h.message_id)}>",
    ]
    if h.references:
        lines.append(f"In-Reply-To: <{_one_line(h.references[-1])}>")
        lines.append("References: " + " ".join(f"<{_one_line(r)}>" for r in h.references))
    lines += ["MIME-Version: 1.0", "Content-Type: text/plain; charset=utf-8", "Content-Transfer-Encoding: 8bit", ""]
    body = mail.text
    if attachment_names:
        body += "\n\n" + "\n".join(f"[{name}]" for name in attachment_names)
    if "From " in body:
        body = _MBOX_FROM_LINES.sub(">", body)  # mboxrd: ">" before every line that is >*"From "
    lines.append(body)
    return ("\n".join(lines) + "\n\n").encode("utf-8", "replace")


def _one_line(text: str) -> str:
    if "\n" not in text and "\r" not in text:  # nearly always: nothing to join
        return text
    return _LINE_BREAKS.sub(" ", text)


_LINE_BREAKS = re.compile(r"[\r\n]+")


@functools.lru_cache(maxsize=4096)  # authors and subjects repeat
def _encoded(text: str) -> str:
    """An unstructured header value; RFC 2047 encoded when it is not ASCII.

    One UTF-8 encoded word, Q or B, whichever is shorter: what
    ``email.header.Header(line, "utf-8", maxlinelen=10_000).encode()`` writes
    for these short values, without its per-character bookkeeping.
    """
    line = _one_line(text)
    if line.isascii():
        return line
    data = line.encode("utf-8", "replace")
    q = data.decode("latin-1").translate(_Q_MAP)
    b64_len = (len(data) + 2) // 3 * 4
    if b64_len < len(q):
        return f"=?utf-8?b?{base64.b64encode(data).decode('ascii')}?="
    return f"=?utf-8?q?{q}?="


_Q_SAFE = set(b"-!*+/" + string.ascii_letters.encode() + string.digits.encode())
_Q_MAP = {c: (chr(c) if c in _Q_SAFE else "_" if c == 32 else f"={c:02X}") for c in range(256)}


def message_hash(message_id: str) -> str:
    return message_id_hash(message_id)
