"""The archive never stops on real mail; reused Message-IDs; local time; `archive status`.

Property-based tests (hypothesis) generate hostile headers and MIME trees
and assert that parsing, importing, a full build and an incremental add never
raise and that every page is valid UTF-8 HTML with no active content.  The
rest are builds against a real SQLite store, the CLI, and posts through the
real server (Maildir delivery) whose Archived-At must name their own page.
"""

from __future__ import annotations

import asyncio
import email
import email.policy
import re
import smtplib
import tempfile
import time
from collections.abc import Awaitable
from pathlib import Path

import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from conftest import DOMAIN, make_config, store_toml
from listserv import archive
from listserv.archive_render import decode_text, parse_mail, valid_text
from listserv.cli import main as cli_main
from listserv.config import Config
from listserv.rewrite import message_id_hash
from listserv.store import Store
from test_archive import LIST, Tags, open_store, put, write_config

# -- hostile mail ---------------------------------------------------------------------------------------------

CHARSETS = ["utf-8", "UTF-7", "unicode-1-1-utf-7", "iso-8859-2", "windows-1250", "us-ascii", "koi8-r", "utf-16",
            "x-unknown", "bogus-charset", "", "idna", "rot13", "base64", "unicode_escape", "punycode", "utf-32",
            "cp1252", "\"utf-8\"", "gb2312", "iso-2022-jp", "x-mac-ce"]
ENCODINGS = ["7bit", "8bit", "base64", "quoted-printable", "binary", "x-uuencode", "bogus", "base64 ", "Quoted-Printable"]
POLISH = "Zażółć gęślą jaźń. Łódź, Kraków, Gdańsk".encode("utf-8")

raw_bytes = st.binary(max_size=60)
polish_8bit = st.sampled_from([POLISH, "Spotkanie w Żyrardowie".encode("cp1250"),
                               "Termomodernizacja szkoły".encode("iso-8859-2"), b"+3Rk-+2D3dGQ- utf7", b"\x00\xff\xfe"])
header_piece = st.one_of(
    raw_bytes.map(lambda b: b.replace(b"\r", b"").replace(b"\n", b" ")),
    polish_8bit,
    st.builds(lambda cs, enc, body: b"=?" + cs.encode() + b"?" + enc + b"?" + body + b"?=",
              st.sampled_from(CHARSETS), st.sampled_from([b"Q", b"B", b"q", b"b", b"X", b""]),
              st.binary(max_size=30).map(lambda b: b.replace(b"?=", b"").replace(b"\n", b""))),
    st.sampled_from([b"=?utf-8?B?xb/Ds8WCdw==?=", b"=?utf-8?Q?=C5=BC?==?iso-8859-2?Q?=B1?=", b"=?UTF-7?Q?+3Rk-?=",
                     b"=?utf-8?B?broken", b"=?x-unknown?Q?abc?=", b"=??Q?x?=", b"\x00", b"x" * 3000]),
)
header_value = st.lists(header_piece, min_size=0, max_size=4).map(lambda parts: b" ".join(parts))


def param(name: bytes) -> st.SearchStrategy[bytes]:
    """RFC 2231 parameters, well-formed and broken (§3 continuations, §4 charset'lang'value)."""
    return st.one_of(
        st.builds(lambda v: b"; " + name + b"=\"" + v + b"\"", header_piece),
        st.builds(lambda cs, v: b"; " + name + b"*=" + cs.encode() + b"''" + v, st.sampled_from(CHARSETS),
                  st.sampled_from([b"%C5%BC%C3%B3%C5%82w.pdf", b"%ZZ%", b"%00%2e%2e%2fpasswd", b"..%2F..%2Fx.html"])),
        st.builds(lambda a, b: b"; " + name + b"*0*=utf-8''" + a + b"; " + name + b"*1=" + b, raw_bytes, raw_bytes),
        st.just(b"; " + name + b"*2=orphan"),
        st.just(b""),
    )


def leaf() -> st.SearchStrategy[bytes]:
    return st.builds(
        lambda ctype, cs, cte, fname, body, long_line: (
            b"Content-Type: " + ctype + (b"; charset=" + cs.encode() if cs else b"") + fname + b"\r\n"
            + b"Content-Transfer-Encoding: " + cte.encode() + b"\r\n\r\n" + body
            + (b"\r\n" + b"a" * 20000 if long_line else b"") + b"\r\n"
        ),
        st.sampled_from([b"text/plain", b"text/html", b"application/octet-stream", b"image/svg+xml", b"text/x-weird",
                         b"message/rfc822", b"", b"text"]),
        st.sampled_from(CHARSETS),
        st.sampled_from(ENCODINGS),
        param(b"name"),
        st.one_of(st.binary(max_size=200), polish_8bit,
                  st.just(b"<script>alert(1)</script><img src=x onerror=alert(1)><a href='javascript:x'>k</a>"),
                  st.just(b"PHNjcmlwdD5hbGVydCgxKTwvc2NyaXB0Pg=="), st.just(b"=C5=BC=\r\n=ZZ=")),
        st.booleans(),
    )


def multipart(children: st.SearchStrategy[list[bytes]]) -> st.SearchStrategy[bytes]:
    def make(kind: bytes, boundary: bytes, declared: bytes, parts: list[bytes], close: bool) -> bytes:
        body = b"".join(b"--" + boundary + b"\r\n" + p for p in parts)
        if close:
            body += b"--" + boundary + b"--\r\n"
        return b"Content-Type: multipart/" + kind + b"; boundary=\"" + declared + b"\"\r\n\r\npreamble\r\n" + body
    return st.builds(
        lambda kind, b, wrong, parts, close: make(kind, b, b"other" if wrong else b, parts, close),
        st.sampled_from([b"mixed", b"alternative", b"related", b"digest", b"signed", b"x-bogus"]),
        st.sampled_from([b"b1", b"=_b=", b"", b"a" * 200, b"--", b"b\x00"]),
        st.booleans(), children, st.booleans(),
    )


mime_tree = st.recursive(leaf(), lambda inner: multipart(st.lists(inner, min_size=0, max_size=3)), max_leaves=8)


@st.composite
def hostile_message(draw: st.DrawFn) -> bytes:
    headers = [
        b"From: " + draw(header_value) + b" <" + draw(st.sampled_from([b"anna@gmina.example.pl", b"", b"\xff@x"])) + b">",
        b"Subject: " + draw(header_value),
        b"Date: " + draw(st.sampled_from([b"Tue, 14 May 2024 10:15:00 +0200", b"garbage", b"", b"Mon, 99 Foo 99999 99:99"])),
        b"Message-ID: " + draw(st.sampled_from([b"<hostile@example.org>", b"<\xc5\xbc\xff@x>", b"", b"no-angles",
                                                b"<a@b> <c@d>", b"<+3Rk-@utf7>"])),
        b"References: " + draw(st.sampled_from([b"<hostile@example.org>", b"<x@y> <\xff@z>", b"", b"<" * 50])),
        b"In-Reply-To: " + draw(header_value),
        b"MIME-Version: 1.0",
    ]
    nul = draw(st.booleans())
    tree = draw(mime_tree)
    raw = b"\r\n".join(headers) + b"\r\n" + tree
    if nul:
        raw = raw.replace(b"\r\n\r\n", b"\r\n\x00\r\n", 1)
    return raw


def assert_valid_text(*texts: str) -> None:
    for text in texts:
        text.encode("utf-8")  # raises on a lone surrogate


@pytest.mark.one_backend  # touches no store
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(hostile_message())
def test_hostile_mail_parses_to_valid_text(raw: bytes) -> None:
    mail = parse_mail(raw, "", 1715674500.0)
    h = mail.headers
    assert_valid_text(mail.body_html, mail.text, mail.snippet, mail.search, mail.date_header, mail.original_id,
                      h.subject, h.author, h.message_id, *h.references, *(a.filename for a in mail.attachments))
    assert "<script" not in mail.body_html.lower()
    assert not re.search(r"<[^>]*\son\w+\s*=", mail.body_html, re.IGNORECASE)


def parse_both_ways(raw: bytes) -> tuple[object, object]:
    """(``parse_mail``, ``scan_headers``) as the build reads ``raw``, and the same with every entity a ``Message``.

    Also checks that ``scan_and_parse`` gives what the two steps give apart.
    """
    from listserv import archive_render

    fast = (archive_render.parse_mail(raw, "", 1715674500.0), archive_render.scan_headers(raw, "", 1715674500.0))
    make = archive_render._Part.make
    archive_render._Part.make = staticmethod(lambda fields: None)  # type: ignore[method-assign]
    try:
        slow = (archive_render.parse_mail(raw, "", 1715674500.0), archive_render.scan_headers(raw, "", 1715674500.0))
    finally:
        archive_render._Part.make = make  # type: ignore[method-assign]
    # Without the quick splitter at all (compat32's feedparser for everything): the same headers.
    quick = archive_render._quick_message
    archive_render._quick_message = lambda raw, with_body=True: None  # type: ignore[assignment]
    try:
        parser_scan = archive_render.scan_headers(raw, "", 1715674500.0)
    finally:
        archive_render._quick_message = quick  # type: ignore[assignment]
    assert fast[1] == parser_scan
    # The import's read-ahead splits the header block once for both steps: the same scan and Mail.
    scan = archive_render.scan_headers(raw, "", 1715674500.0)
    assert archive_render.scan_and_parse(raw, "", 1715674500.0) == (
        scan, archive_render.parse_mail(raw, "", 1715674500.0, known=scan))
    return fast, slow


@pytest.mark.one_backend  # touches no store
@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(hostile_message())
def test_quick_entities_read_mail_as_message_does(raw: bytes) -> None:
    """The lean ``_Part`` answers as compat32's ``Message`` does: same Mail, same headers, for hostile MIME too."""
    fast, slow = parse_both_ways(raw)
    assert fast == slow


def _old_text_to_html(text: str, quoted_label: str = "") -> str:
    """text_to_html as it was before quoted lines were found once per line (the reference)."""
    import html as html_mod

    from listserv.archive_render import _ANY_QUOTE, _QUOTE, _URL, _TRAILING

    def linkify(t: str) -> str:
        out, pos = [], 0
        for m in _URL.finditer(t):
            url = m.group(0)
            while url and url[-1] in _TRAILING:
                if url[-1] == ")" and url.count("(") >= url.count(")"):
                    break
                url = url[:-1]
            out.append(html_mod.escape(t[pos : m.start()]))
            if "@" in url:
                out.append(html_mod.escape(url))
            else:
                href = html_mod.escape(url, quote=True)
                out.append(f'<a href="{href}" rel="nofollow noopener noreferrer">{href}</a>')
            pos = m.start() + len(url)
        out.append(html_mod.escape(t[pos:]))
        return "".join(out)

    if not _ANY_QUOTE.search(text):
        body = text.rstrip("\n")
        return f'<pre class="text">{linkify(body)}</pre>' if body.strip() else ""
    lines = text.split("\n")
    chunks: list[str] = []
    plain: list[str] = []
    i, n = 0, len(lines)
    while i < n:
        if _QUOTE.match(lines[i]):
            j = i
            while j < n and (_QUOTE.match(lines[j]) or (not lines[j].strip() and j + 1 < n and _QUOTE.match(lines[j + 1]))):
                j += 1
            if plain:
                chunks.append(f'<pre class="text">{linkify(chr(10).join(plain))}</pre>')
                plain = []
            quoted = linkify("\n".join(lines[i:j]))
            if j - i >= 4:
                chunks.append(f'<details class="quote"><summary>{html_mod.escape(quoted_label.format(n=j - i))}</summary>'
                              f'<pre class="text quoted">{quoted}</pre></details>')
            else:
                chunks.append(f'<pre class="text quoted">{quoted}</pre>')
            i = j
        else:
            plain.append(lines[i])
            i += 1
    if plain:
        body = "\n".join(plain).rstrip("\n")
        if body.strip():
            chunks.append(f'<pre class="text">{linkify(body)}</pre>')
    return "".join(chunks)


quoting_text = st.lists(st.one_of(
    st.sampled_from(["> cytat", " >> głębiej", "   > trzy spacje", "    > cztery (nie cytat)", "", " ", "\u2003",
                     "\u00a0> twarda spacja", "Zażółć gęślą jaźń", "http://example.org/a_(b)", "HTTPS://x.pl/?q=1&r=<2>.",
                     "mail jan@example.org", "http://jan@example.org/", "\u2028> separator", "\t>tab"]),
    st.text(max_size=30)), max_size=25).map("\n".join)


@pytest.mark.one_backend  # touches no store
@settings(max_examples=500, deadline=None)
@given(quoting_text)
def test_text_to_html_and_search_text_agree_with_their_reference(text: str) -> None:
    from listserv.archive_render import _QUOTE, own_words, text_to_html

    assert text_to_html(text, "{n} quoted lines") == _old_text_to_html(text, "{n} quoted lines")
    own = "\n".join(line for line in text.split("\n") if not _QUOTE.match(line))
    for limit in (0, 1, 7, 40, 240, 600):
        assert own_words(text, limit) == " ".join(own.split())[:limit]


def _old_import_entry(raw: bytes, from_date: float) -> tuple[str, str, float, bytes] | None:
    """``import_entry`` as it was, with three case-insensitive regular expressions searched over the
    header block: the reference its find-then-match version must agree with."""
    import email.utils

    from listserv.archive_render import fallback_message_id, strip_angles
    from listserv.message import archiving_refused

    head_end = raw.find(b"\n\n")
    crlf_end = raw.find(b"\r\n\r\n")
    if head_end < 0 or (0 <= crlf_end < head_end):
        head_end = crlf_end
    head = raw if head_end < 0 else raw[:head_end]
    if archive._NO_ARCHIVE.search(head) and archiving_refused(raw):
        return None
    m = archive._MSGID_HEADER.search(head)
    mid = strip_angles(m.group(1).decode("utf-8", "replace")) if m else ""
    if not mid:
        mid = fallback_message_id(raw)
    received = from_date
    d = archive._DATE_HEADER.search(head)
    if d:
        parsed = email.utils.parsedate_tz(d.group(1).decode("ascii", "replace"))
        if parsed is not None:
            received = float(email.utils.mktime_tz(parsed))
    return mid, message_id_hash(mid), received, raw


_header_names = st.sampled_from(["Message-ID", "message-id", "MESSAGE-ID", "Message-Id", "Date", "DATE", "date",
                                 "X-No-Archive", "x-no-archive", "Archive", "ARCHIVE", "List-Archive", "Archived-At",
                                 "Message-IDs", "X-Message-ID", "Subject", "Dates"])
_header_values = st.sampled_from(["", " ", " <a@b>", "<a@b>", " \n <folded@b>", " \r\n\t<c@d>", " yes", " no",
                                  " Mon, 1 Jan 2024 10:00:00 +0100", " zażółć", "\n", " <x", " a b"])


@pytest.mark.one_backend  # touches no store
@settings(max_examples=1500, deadline=None)
@given(st.lists(st.tuples(_header_names, st.sampled_from([":", " :", "\t:", ""]), _header_values,
                          st.sampled_from(["\n", "\r\n", "\r"])), max_size=8),
       st.sampled_from(["\n", "\r\n", ""]), st.sampled_from(["", "body\n", "\nafter\n", "Message-ID: <in@body>\n"]))
def test_import_entry_reads_headers_as_the_regular_expressions_did(lines: list[tuple[str, str, str, str]],
                                                                   blank: str, body: str) -> None:
    raw = ("".join(name + colon + value + eol for name, colon, value, eol in lines) + blank + body).encode("utf-8")
    assert archive.import_entry(raw, 1.0e9) == _old_import_entry(raw, 1.0e9)


@pytest.mark.one_backend  # touches no store
@settings(max_examples=1000, deadline=None)
@given(st.lists(st.sampled_from(["\n", "\r\n", "\r", "a", ":", " ", "\n\n", "\n\r\n"]), max_size=30).map("".join))
def test_first_blank_line_is_the_earlier_of_lf_and_crlf(text: str) -> None:
    from listserv.archive_render import _first_blank_line

    found = [x for x in (text.find("\n\n"), text.find("\n\r\n")) if x >= 0]
    assert _first_blank_line(text) == (min(found) if found else -1)


@pytest.mark.one_backend  # touches no store
@settings(max_examples=1000, deadline=None)
@given(st.one_of(st.text(), st.text(alphabet="&<>\"' aż").map(str), st.integers(), st.none()))
def test_page_escape_is_markupsafes(value: object) -> None:
    from markupsafe import Markup, escape

    from listserv.archive_pages import escape as page_escape

    assert page_escape(value) == str(escape(value))
    if isinstance(value, str):
        assert page_escape(Markup(value)) == value  # already safe: left alone, as markupsafe does


content_type_value = st.builds(
    lambda ctype, params, tail: ctype + "".join(params) + tail,
    st.sampled_from(["text/plain", "TEXT/HTML", " text/plain ", "text", ""]),
    st.lists(st.builds(lambda sep, param: sep + param, st.sampled_from([";", "; ", " ;\t", ""]), st.sampled_from(
        ["charset=utf-8", "CHARSET=\"ISO-8859-2\"", "charset = x-mac-ce", "Charset=UTF-8", "format=flowed", "delsp=yes",
         "charset=", "charset=\"\"", "charset*=utf-8''x", "name=\"a b.pdf\"", "boundary=\"=_a/b\"", "charset=\"utf-8",
         "charset=utf-8 (comment)", "x=\"\\\"\"", "charset=windows-1250", "="])), max_size=4),
    st.sampled_from(["", ";", " ", "; "]),
)


@pytest.mark.one_backend  # touches no store
@settings(max_examples=1000, deadline=None)
@given(content_type_value)
def test_charset_is_read_as_message_reads_it(value: str) -> None:
    from email.message import Message

    from listserv.archive_render import _charset

    msg = Message()
    msg["Content-Type"] = value
    assert _charset(msg) == msg.get_content_charset()


def check_tree(root: Path) -> int:
    """Every page valid UTF-8 with no active content; returns how many message pages there are."""
    pages = 0
    for path in root.rglob("*"):
        if not path.is_file():
            continue
        data = path.read_bytes()
        if path.suffix in (".html", ".js", ".atom", ".mbox"):
            text = data.decode("utf-8")  # strict: raises on anything not UTF-8
            assert "\ufffe" not in text
        if path.suffix == ".html":
            tags = Tags()
            tags.feed(text)
            allowed_scripts = ["../static/search.js"] if path.name == "search.html" else []
            assert tags.scripts == allowed_scripts and not tags.handlers and not tags.bad_urls, path
            assert all(t == "meta" for t in tags.embeds), (path, tags.embeds)
            if path.parent.name == "m":
                pages += 1
        if path.suffix.lower() in (".html", ".htm", ".svg", ".js", ".xml", ".xhtml") and "/m/" in path.as_posix():
            assert path.parent.name == "m" and path.suffix == ".html", path  # an attachment that a browser would run
    return pages


# Each example is a whole build: few of them, and no shrinking (minutes per failure); the failing
# example is printed as generated.
@settings(max_examples=25, deadline=None, phases=[Phase.explicit, Phase.reuse, Phase.generate],
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(st.lists(hostile_message(), min_size=1, max_size=4), hostile_message())
def test_hostile_mail_imports_builds_and_adds(messages: list[bytes], late: bytes) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        cfg = make_config(Path(tmp))

        async def go() -> tuple[int, int, list[tuple[str, str, float]]]:
            store = await open_store(cfg)
            try:
                mbox = Path(tmp) / "hostile.mbox"
                mbox.write_bytes(b"".join(b"From x Tue May 14 10:15:00 2024\n" + m.replace(b"\nFrom ", b"\n>From ")
                                          + b"\n\n" for m in messages))
                info = archive.list_info(cfg, await store.get_list(LIST))
                await archive.import_mbox(store, info, mbox)
                await archive.build_list(cfg, store, info, workers=1)
                await put(store, late.replace(b"hostile@example.org", b"late@example.org"))
                archiver = archive.Archiver(cfg, store)
                for h in await store.archive_unbuilt(info.id):  # what `archive build` adds (a derived id too)
                    await archiver.add(LIST, h)
                return (len(await store.archive_index(info.id)), len(await store.archive_unbuilt(info.id)),
                        await store.archive_failures(info.id))
            finally:
                await store.close()

        stored, unbuilt, failures = asyncio.run(go())
        assert failures == []  # nothing generated here is beyond the decoding seam
        assert unbuilt == 0
        assert check_tree(cfg.archive.dir / LIST) == stored


# -- the seam, one case each ----------------------------------------------------------------------------------


@pytest.mark.one_backend  # touches no store
def test_utf7_lone_surrogates_become_replacement_characters() -> None:
    text = decode_text(b"Za+AXw-+APM-+AUI-+AQc- g+ARk-+AVs-l+AQU- +3Rk- ja+AXo-+AUQ-", "UTF-7")
    assert text == "Zażółć gęślą \ufffd jaźń"
    assert valid_text("\ud83d\udd19 \udd19") == "🔙 \ufffd"  # a pair is joined, a lone half replaced


@pytest.mark.one_backend  # touches no store
@pytest.mark.parametrize(("charset", "data"), [
    ("x-unknown", "Zażółć gęślą jaźń".encode("utf-8")),
    ("us-ascii", "Zażółć gęślą jaźń".encode("cp1250")),       # a label the bytes contradict
    ("utf-8", "Zażółć gęślą jaźń".encode("iso-8859-2")),
    ("", "Zażółć gęślą jaźń".encode("iso-8859-2")),
    ("rot13", "Zażółć gęślą jaźń".encode("utf-8")),            # not a text codec
])
def test_unknown_or_contradicted_charsets_are_guessed(charset: str, data: bytes) -> None:
    assert decode_text(data, charset) == "Zażółć gęślą jaźń"


@pytest.mark.one_backend  # touches no store
@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300), st.sampled_from(
    ["utf-8", "UTF-8", "us-ascii", "iso-8859-1", "ISO-8859-2", "latin2", "windows-1250", "cp1252", "koi8-r",
     "iso-8859-16", "utf-7", "UTF-16", "utf-16-le", "utf-32", "unicode_escape", "raw_unicode_escape", "", "x-nic"]))
def test_decoded_text_is_always_valid(data: bytes, charset: str) -> None:
    # Codecs that cannot yield a lone surrogate skip the check; the rest are checked: either way, valid text.
    text = decode_text(data, charset)
    text.encode("utf-8")  # raises on a lone surrogate
    assert valid_text(text) == text


def test_the_codecs_spared_the_surrogate_check_cannot_yield_one() -> None:
    import codecs

    from listserv.archive_render import _SURROGATE_FREE

    for name in _SURROGATE_FREE:
        assert codecs.lookup(name).name == name  # as _codec names them, so the set is ever consulted
        if name != "utf-8":  # a single-byte set: each byte, strict or replaced
            decoded = bytes(range(256)).decode(name, "replace")
            assert not any("\ud800" <= c <= "\udfff" for c in decoded), name
    # UTF-8 refuses encoded surrogates (CESU-8, "\xed\xa0\x80") rather than decoding them.
    assert "\ud800" not in b"\xed\xa0\x80 \xed\xb0\x80".decode("utf-8", "replace")


RAW_8BIT = ("From: Józef Dąbrowski <jozef@gmina-z.example.pl>\r\nSubject: Spotkanie w Żyrardowie — ważne\r\n"
            "Date: Tue, 14 May 2024 10:15:00 +0200\r\nMessage-ID: <raw8bit.cp1250@gmina-z.example.pl>\r\n"
            "Content-Type: text/plain\r\n\r\nZebranie zespołu w Żyrardowie, sala nr 5. Proszę o potwierdzenie.\r\n")


@pytest.mark.one_backend  # touches no store
@pytest.mark.parametrize("codec", ["cp1250", "iso-8859-2", "utf-8"])
def test_raw_8bit_headers_are_read_without_replacement_characters(codec: str) -> None:
    raw = RAW_8BIT.replace("—", "-").encode(codec)
    mail = parse_mail(raw, "", 0.0)
    assert mail.headers.subject == "Spotkanie w Żyrardowie - ważne"
    assert mail.headers.author == "Józef Dąbrowski"
    assert "Zebranie zespołu w Żyrardowie" in mail.text and "\ufffd" not in mail.body_html


# -- a message that still cannot be rendered ----------------------------------------------------------------------


def plain(mid: str, subject: str, body: str = "Treść wiadomości: zażółć gęślą jaźń.", refs: str = "",
          date: str = "Tue, 14 May 2024 10:15:00 +0200", sender: str = "Anna Kowalska <anna@gmina.example.pl>") -> bytes:
    extra = f"In-Reply-To: <{refs.split()[-1]}>\r\nReferences: {' '.join(f'<{r}>' for r in refs.split())}\r\n" if refs else ""
    return (f"From: {sender}\r\nTo: {LIST}@{DOMAIN}\r\nSubject: {subject}\r\nDate: {date}\r\nMessage-ID: <{mid}>\r\n"
            f"{extra}MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n"
            f"Content-Transfer-Encoding: 8bit\r\n\r\n{body}\r\n").encode()


def test_a_message_that_cannot_be_rendered_is_recorded_and_the_rest_go_on(tmp_path: Path) -> None:
    cfg = make_config(tmp_path, archive={"dir": str(tmp_path / "www")})
    config = write_config(tmp_path, cfg)
    runner = CliRunner()
    mbox = tmp_path / "two.mbox"
    mbox.write_bytes(b"".join(b"From x Tue May 14 10:15:00 2024\n" + plain(f"ok.{i}@example.pl", f"Temat {i}")
                              + b"\n" for i in range(2)))
    result = runner.invoke(cli_main, ["--config", str(config), "archive", "import", LIST, str(mbox)])
    assert result.exit_code == 0, result.output
    bad, good = "blocked@example.pl", "after@example.pl"

    async def go() -> None:
        store = await open_store(cfg)
        try:
            hashes = await put(store, plain(bad, "Zablokowana"), plain(good, "Re: Temat 1", refs="ok.1@example.pl"))
            # A real obstacle: a folder where the message page must go.
            (tmp_path / "www" / LIST / "m" / f"{hashes[0]}.html").mkdir(parents=True)
            archiver = archive.Archiver(cfg, store)
            for h in hashes:
                await archiver.on_archived(LIST, h)
            await archiver.idle()
        finally:
            await store.close()

    asyncio.run(go())
    assert (tmp_path / "www" / LIST / "m" / f"{message_id_hash(good)}.html").exists()
    result = runner.invoke(cli_main, ["--config", str(config), "archive", "status", LIST])
    assert result.exit_code == 0, result.output
    assert f"{LIST}: public, 4 messages, 3 message pages" in result.output
    assert "could not be rendered: 1" in result.output
    assert f"<{bad}>" in result.output and "IsADirectoryError" in result.output
    assert "last full build: never" not in result.output
    # A full build starts from a fresh tree: the obstacle is gone, so is the failure.
    result = runner.invoke(cli_main, ["--config", str(config), "archive", "build", "--full"])
    assert result.exit_code == 0, result.output
    result = runner.invoke(cli_main, ["--config", str(config), "archive", "status"])
    assert "4 messages, 4 message pages" in result.output and "could not be rendered: none" in result.output


# -- local time ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("tz", "month", "shown", "iso"), [
    ("Europe/Warsaw", "2024-05", "2024-05-01 00:30 +02:00", "2024-05-01T00:30:00+02:00"),
    ("UTC", "2024-04", "2024-04-30 22:30 +00:00", "2024-04-30T22:30:00+00:00"),
])
def test_dates_in_the_lists_time_zone(tmp_path: Path, tz: str, month: str, shown: str, iso: str) -> None:
    cfg = make_config(tmp_path)

    async def go() -> archive.ListInfo:
        store = await open_store(cfg)
        try:
            lst = await store.get_list(LIST)
            if tz != "Europe/Warsaw":
                await store.set_list_setting(LIST, "timezone", tz)
            await put(store, plain("majowka@example.pl", "Majówka", date="Tue, 30 Apr 2024 22:30:00 +0000"))
            info = archive.list_info(cfg, await store.get_list(LIST))
            await archive.build_list(cfg, store, info, workers=1)
            assert lst.id == info.id
            return info
        finally:
            await store.close()

    info = asyncio.run(go())
    ldir = info.dir
    assert (ldir / month / "index.html").exists() and len(list(ldir.glob("2024-*"))) == 1
    page = (ldir / "m" / f"{message_id_hash('majowka@example.pl')}.html").read_text()
    assert f'<time datetime="{iso}">{shown}</time>' in page
    assert shown in (ldir / month / "date.html").read_text()
    assert f"<updated>{iso}</updated>" in (ldir / "feed.atom").read_text()


ZONES = ["Europe/Warsaw", "UTC", "America/New_York", "Asia/Kolkata", "Australia/Lord_Howe", "America/St_Johns",
         "Asia/Kathmandu", "Pacific/Chatham", "Europe/Atlantis"]


@pytest.mark.one_backend  # touches no store
@settings(max_examples=1000, deadline=None)
@given(st.one_of(st.floats(min_value=0, max_value=4e9),
                 # near the hour, where zone rules change offsets (DST starts and ends)
                 st.integers(0, 1_100_000).map(lambda h: h * 3600.0 + (h % 7 - 3))),
       st.sampled_from(ZONES))
def test_local_dates_agree_with_datetime(ts: float, tz: str) -> None:
    """The per-hour offset cache gives what ``datetime.fromtimestamp`` with zoneinfo gives, DST changes included."""
    from listserv import archive_pages

    d = archive_pages._local(ts, tz)
    offset = d.strftime("%z")
    archive_pages.fmt_date.cache_clear()
    archive_pages.iso_date.cache_clear()
    assert archive_pages.fmt_date(ts, tz) == f"{d:%Y-%m-%d %H:%M} {offset[:3]}:{offset[3:5]}"
    assert archive_pages.iso_date(ts, tz) == d.replace(microsecond=0).isoformat()
    assert archive_pages.local_month(ts, tz) == f"{d:%Y-%m}"


@pytest.mark.one_backend  # touches no store
def test_archive_records_survive_pickling() -> None:
    """Build workers send these between processes with a quicker pickle than dataclasses' own."""
    import pickle

    from listserv.archive_render import scan_headers
    from listserv.archive_types import ArchiveMeta

    raw = plain("pickle@example.pl", "Zażółć gęślą jaźń", date="Tue, 30 Apr 2024 22:30:00 +0000")
    scan = scan_headers(raw, "pickle@example.pl", 0.0)
    mail = parse_mail(raw, "pickle@example.pl", 0.0)
    meta = ArchiveMeta(1, 2, "H", "m@x", "T", "", ("a@x", "b@x"), 1.5, "2024-04", "Zażółć", "zażółć", "Jan",
                       "snip", "search", 0, b"From x")
    for record in (scan, mail, meta, mail.headers):
        assert pickle.loads(pickle.dumps(record)) == record


def test_timezone_setting_is_validated(tmp_path: Path) -> None:
    config = write_config(tmp_path)
    runner = CliRunner()
    result = runner.invoke(cli_main, ["--config", str(config), "list", "set", LIST, "timezone", "Europe/Atlantis"])
    assert result.exit_code != 0 and "unknown time zone" in result.output
    result = runner.invoke(cli_main, ["--config", str(config), "list", "set", LIST, "timezone", "America/New_York"])
    assert result.exit_code == 0, result.output


# -- through the server: UTF-7, reused Message-IDs, true duplicates ----------------------------------------------------


def wait_for(path: Path, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert path.exists(), path


def copies(config: Config, rcpt: str) -> list[email.message.Message]:
    folder = config.maildir_root / rcpt / "new"
    return [email.message_from_bytes(p.read_bytes(), policy=email.policy.compat32) for p in sorted(folder.iterdir())]


UTF7_POST = (b"From: Pawe\xc5\x82 <pawel@gmina-a.example.pl>\r\nTo: seap-planning@lists.example.org\r\n"
             b"Subject: =?UTF-7?Q?Zaproszenie_+AUI-+APM-d+AXo-?=\r\nDate: Tue, 14 May 2024 10:15:00 +0200\r\n"
             b"Message-ID: <utf7.lone@gmina-a.example.pl>\r\nMIME-Version: 1.0\r\n"
             b"Content-Type: text/plain; charset=\"UTF-7\"\r\n\r\nZa+AXw-+APM-+AUI-+AQc- +3Rk- ja+AXo-+AUQ-\r\n")


def test_utf7_post_is_archived_live_and_builds_stay_green(tmp_path: Path, start_server) -> None:  # type: ignore[no-untyped-def]
    config = make_config(tmp_path)
    server = start_server(config)
    member = "pawel@gmina-a.example.pl"
    server.call(server.store.create_list(LIST, {"title": "Planowanie SEAP"}, [f"owner@{DOMAIN}"]))
    server.call(server.store.add_members(LIST, [(member, "", "")]))
    with smtplib.SMTP("127.0.0.1", server.port) as client:
        client.sendmail(member, [f"{LIST}@{DOMAIN}"], UTF7_POST)
    page = config.archive.dir / LIST / "m" / f"{message_id_hash('utf7.lone@gmina-a.example.pl')}.html"
    wait_for(page)
    text = page.read_bytes().decode("utf-8")
    assert "Zaproszenie łódź" in text and "Zażółć \ufffd jaźń" in text
    server.stop()
    cfg_file = tmp_path / "listserv.toml"
    cfg_file.write_text(f'[server]\ndomain = "{DOMAIN}"\nstate_dir = "{tmp_path / "state"}"\n'
                        f'[dkim]\nprivate_key = "{tmp_path / "dkim.key"}"\n[archive]\ndir = "{config.archive.dir}"\n'
                        + store_toml(config))
    for args in (["archive", "build"], ["archive", "build", "--full"]):
        result = CliRunner().invoke(cli_main, ["--config", str(cfg_file), *args])
        assert result.exit_code == 0, result.output
    result = CliRunner().invoke(cli_main, ["--config", str(cfg_file), "archive", "status", LIST])
    assert "could not be rendered: none" in result.output, result.output


def test_reused_message_ids_get_their_own_pages_and_duplicates_are_one(tmp_path: Path, start_server) -> None:  # type: ignore[no-untyped-def]
    config = make_config(tmp_path)
    server = start_server(config)
    member, reader = "anna@gmina.example.pl", "jan@um.example.pl"
    server.call(server.store.create_list(LIST, {"title": "Planowanie SEAP"}, [f"owner@{DOMAIN}"]))
    server.call(server.store.add_members(LIST, [(member, "", ""), (reader, "", "")]))
    mid = "reused@broken-client.example.pl"
    posts = [plain(mid, f"Ogłoszenie nr {i}", body=f"Treść ogłoszenia nr {i}: żółw {i}.") for i in range(6)]
    resent = b"Received: from mta2.example.net by mx.example.org; Tue, 14 May 2024 10:20:00 +0200\r\n" + posts[0]
    with smtplib.SMTP("127.0.0.1", server.port) as client:
        for raw in posts + [posts[3], resent]:
            client.sendmail(member, [f"{LIST}@{DOMAIN}"], raw)
    deadline = time.monotonic() + 30
    while len(list((config.maildir_root / reader / "new").glob("*")) if (config.maildir_root / reader / "new").exists()
               else []) < 8 and time.monotonic() < deadline:
        time.sleep(0.05)
    got = copies(config, reader)
    assert len(got) == 8  # every post is delivered
    server.call(server.app.archiver.idle())
    links: dict[str, str] = {}
    for msg in got:
        link = msg["Archived-At"].strip("<>")
        subject = str(email.header.make_header(email.header.decode_header(msg["Subject"])))
        assert msg["Message-ID"].strip() == f"<{mid}>"  # the post keeps its own Message-ID
        links.setdefault(subject, link)
        assert links[subject] == link, subject  # the same post: the same page
    assert len(set(links.values())) == 6
    for subject, link in links.items():
        h = link.rsplit("/", 1)[1].removesuffix(".html")
        page = config.archive.dir / LIST / "m" / f"{h}.html"
        wait_for(page)
        text = page.read_text()
        n = subject.rsplit(" ", 1)[1]
        assert f"Treść ogłoszenia nr {n}: żółw {n}." in text
        if h != message_id_hash(mid):
            assert f"Message-ID: <code>{mid}</code>" in text  # the original id is kept on the page
    assert len(list((config.archive.dir / LIST / "m").glob("*.html"))) == 6
    server.stop()
    result = CliRunner().invoke(cli_main, ["--config", str(write_config_for(tmp_path, config)), "archive", "build",
                                           "--full"])
    assert result.exit_code == 0, result.output
    assert len(list((config.archive.dir / LIST / "m").glob("*.html"))) == 6  # and so after a full rebuild


async def test_twins_prepared_at_once_are_not_archived_as_one(tmp_path: Path) -> None:
    """Two workers choose an archive id for twins (one Message-ID, other content) before either
    is queued: the second enqueue is refused whole, and choosing again gives it a derived id."""
    from listserv.errors import ArchiveIdTaken
    from listserv.store import ArchiveEntry

    store = await open_store(make_config(tmp_path))
    try:
        lst = await store.get_list(LIST)
        mid = "twin@gmina.example.pl"
        first, second = (plain(mid, f"Bliźniak {n}", body=f"Treść {n}: źdźbło.") for n in (1, 2))
        ids = [await store.archive_identity(lst.id, mid, raw) for raw in (first, second)]
        assert ids == [(mid, False), (mid, False)]  # neither archived yet: both choose the same id

        def queue(raw: bytes, message_id: str) -> Awaitable[int]:
            return store.enqueue(list_id=lst.id, kind="post", envelope_from="", data=raw, recipients=["a@x.pl"],
                                 archive=ArchiveEntry(message_id, message_id_hash(message_id), raw))

        await queue(first, mid)
        with pytest.raises(ArchiveIdTaken):
            await queue(second, mid)
        assert (await store.delivery_counts()).get("pending") == 1  # nothing of the refused twin was queued
        again, known = await store.archive_identity(lst.id, mid, second)
        assert again != mid and not known
        await queue(second, again)
        await queue(first, mid)  # a true duplicate is still taken as the one entry it is
        assert len(await store.archive_index(lst.id)) == 2
    finally:
        await store.close()


def write_config_for(tmp_path: Path, config: Config) -> Path:
    path = tmp_path / "listserv.toml"
    path.write_text(f'[server]\ndomain = "{DOMAIN}"\nstate_dir = "{tmp_path / "state"}"\n'
                    f'[dkim]\nprivate_key = "{tmp_path / "dkim.key"}"\n'
                    f'[archive]\ndir = "{config.archive.dir}"\nbase_url = "https://archiwum.example.org/"\n'
                    + store_toml(config))
    return path


def test_import_keeps_distinct_posts_with_one_message_id(tmp_path: Path) -> None:
    cfg = make_config(tmp_path)
    a = plain("same@example.pl", "Pierwsza", body="Pierwsza treść")
    b = plain("same@example.pl", "Druga", body="Druga treść")
    a_resent = b"Received: from relay.example.net; Tue, 14 May 2024 10:20:00 +0200\r\n" + a.replace(b"\r\n", b"\n")

    async def go() -> list[tuple[int, str, str, float]]:
        store = await open_store(cfg)
        try:
            lst = await store.get_list(LIST)
            entries = [e for e in (archive.import_entry(r, None) for r in (a, b, a, a_resent)) if e]
            assert await store.archive_import(lst.id, entries) == 2
            assert await store.archive_import(lst.id, entries) == 0  # importing again adds nothing
            return await store.archive_index(lst.id)
        finally:
            await store.close()

    index = asyncio.run(go())
    assert [mid for _, mid, _, _ in index][0] == "same@example.pl"
    assert index[1][1].startswith("same.dup-") and index[1][1].endswith("@example.pl")


def test_new_config_keys_are_documented() -> None:
    example = (Path(__file__).parent.parent / "config.example.toml").read_text()
    assert re.search(r'^timezone = "Europe/Warsaw"$', example, re.MULTILINE)


@pytest.mark.one_backend  # touches no store
@settings(max_examples=1000, deadline=None)
@given(st.text(max_size=400), st.sampled_from(["application/pdf", "text/plain", "image/png", "application/x-unknown"]))
def test_an_attachment_name_is_always_one_short_safe_file_name(name: str, content_type: str) -> None:
    from listserv.archive_render import MAX_NAME_BYTES, safe_filename

    safe = safe_filename(name, 4, content_type)
    # One path segment that fits a file name (255 bytes) with room for an atomic write's ".NAME.PID.tmp".
    assert 0 < len(safe.encode("utf-8")) <= MAX_NAME_BYTES + len(".bin")
    assert "/" not in safe and "\\" not in safe and "\x00" not in safe
    assert not safe.startswith(".")
