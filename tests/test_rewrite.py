"""Tests for listserv.rewrite: pure bytes in, bytes out, checked with the email package."""

from __future__ import annotations

import base64
import dataclasses
import datetime
import email
import email.message
import email.policy
import os
import random
import re
from pathlib import Path

import pytest

from listserv.rewrite import (
    ListContext,
    Rewritten,
    attachment_types,
    decode_header_text,
    list_headers,
    message_id_hash,
    render_footer,
    rewrite,
)
from listserv.settings import AttachmentPolicy, ListSettings

pytestmark = pytest.mark.one_backend  # runs once: see pyproject's markers

DATA = Path(__file__).parent / "data" / "rewrite"
SUBJ = "Zażółć gęślą jaźń — harmonogram SEAP"
SUBJ_NO_DASH = SUBJ.replace("—", "-")
NOW = datetime.datetime(2025, 3, 10, 12, 0, tzinfo=datetime.timezone.utc)
LEAVE = "seap-planning-leave@lists.example.org"


def make_ctx(archive: str = "https://archiwum.example.org/", **settings: object) -> ListContext:
    base: dict[str, object] = {"title": "Planowanie SEAP"}
    base.update(settings)
    return ListContext(
        name="seap-planning",
        domain="lists.example.org",
        settings=ListSettings(**base),  # type: ignore[arg-type]
        archive_base_url=archive,
    )


def load(name: str) -> bytes:
    return (DATA / name).read_bytes()


def run(raw: bytes, ctx: ListContext | None = None, *, munge: bool = False, mid: str = "<gen@lists.example.org>") -> Rewritten:
    return rewrite(raw, ctx or make_ctx(), message_id=mid, munge_from=munge, now=NOW)


def parse(data: bytes) -> email.message.EmailMessage:
    msg = email.message_from_bytes(data, policy=email.policy.default)
    assert isinstance(msg, email.message.EmailMessage)
    return msg


def header_block(data: bytes) -> bytes:
    return data.split(b"\r\n\r\n", 1)[0] + b"\r\n"


def raw_headers(data: bytes, name: str) -> list[bytes]:
    """Each field called ``name``, folding kept."""
    fields = re.findall(rb"(?m)^([^ \t\r\n][^:\r\n]*):(.*\r\n(?:[ \t].*\r\n)*)", header_block(data))
    return [value for key, value in fields if key.decode().lower() == name.lower()]


def content(part: email.message.Message) -> str:
    """Decoded text of a part, with "\\n" line ends (the parser keeps the CRLFs)."""
    assert isinstance(part, email.message.EmailMessage)
    text = part.get_content()
    assert isinstance(text, str)
    return text.replace("\r\n", "\n")


def text_parts(msg: email.message.EmailMessage) -> list[str]:
    """The decoded text/plain parts, skipping those in a charset Python does not know."""
    out = []
    for part in msg.walk():
        if part.get_content_type() == "text/plain":
            try:
                out.append(content(part))
            except LookupError:
                pass
    return out


def assert_crlf(data: bytes) -> None:
    assert b"\n" not in data.replace(b"\r\n", b""), "bare LF in output"
    assert b"\r" not in data.replace(b"\r\n", b""), "bare CR in output"
    assert data.endswith(b"\r\n")


# -- message_id_hash


def test_message_id_hash_matches_hyperkitty() -> None:
    # HyperKitty's own doctest (hyperkitty/lib/utils.py get_message_id_hash);
    # computed by hand as base32(sha1(b"87myycy5eh.fsf@uwakimon.sk.tsukuba.ac.jp")).
    # (Old Mailman docs show AGDWSNXX..., the hash *with* the angle brackets.)
    expected = "JJIGKPKB6CVDX6B2CUG4IHAJRIQIOUTP"
    assert message_id_hash("<87myycy5eh.fsf@uwakimon.sk.tsukuba.ac.jp>") == expected
    assert message_id_hash("87myycy5eh.fsf@uwakimon.sk.tsukuba.ac.jp") == expected
    assert message_id_hash("  <87myycy5eh.fsf@uwakimon.sk.tsukuba.ac.jp> ") == expected


def test_message_id_hash_shape() -> None:
    h = message_id_hash("<żółw@example.pl>")
    assert len(h) == 32 and "=" not in h and h.isupper()


# -- list headers


def test_list_headers_exact() -> None:
    mid = "<87myycy5eh.fsf@uwakimon.sk.tsukuba.ac.jp>"
    assert list_headers(make_ctx(), mid) == [
        ("List-Id", '"Planowanie SEAP" <seap-planning.lists.example.org>'),
        ("List-Post", "<mailto:seap-planning@lists.example.org>"),
        ("List-Help", "<mailto:seap-planning-request@lists.example.org?subject=help>"),
        ("List-Subscribe", "<mailto:seap-planning-join@lists.example.org>"),
        ("List-Unsubscribe", "<mailto:seap-planning-leave@lists.example.org>"),
        ("List-Archive", "<https://archiwum.example.org/seap-planning/>"),
        ("Archived-At", "<https://archiwum.example.org/seap-planning/m/JJIGKPKB6CVDX6B2CUG4IHAJRIQIOUTP.html>"),
        ("List-Owner", "<mailto:seap-planning-owner@lists.example.org>"),
        ("Precedence", "list"),
    ]


def test_list_headers_without_archive_or_title() -> None:
    names = [n for n, _ in list_headers(make_ctx(archive="", title=""), "<x@y>")]
    assert "List-Archive" not in names and "Archived-At" not in names
    assert dict(list_headers(make_ctx(archive="", title=""), "<x@y>"))["List-Id"] == "<seap-planning.lists.example.org>"


def test_list_headers_archive_base_without_slash() -> None:
    headers = dict(list_headers(make_ctx(archive="https://a.example.org/arch"), "<x@y>"))
    assert headers["List-Archive"] == "<https://a.example.org/arch/seap-planning/>"


def test_list_headers_announce_list_says_no() -> None:
    assert dict(list_headers(make_ctx(posting_policy="announce"), "<x@y>"))["List-Post"] == "NO"


def test_list_id_polish_title_is_encoded() -> None:
    ctx = make_ctx(title="Zamówienia publiczne — gmina Łódź")
    data = run(load("mixed_pdf.eml"), ctx).data
    (raw_id,) = raw_headers(data, "List-Id")
    assert raw_id.isascii() and b"=?utf-8?" in raw_id
    msg = parse(data)
    assert msg["List-Id"].strip() == "Zamówienia publiczne — gmina Łódź <seap-planning.lists.example.org>"


def test_list_headers_in_output_exact_and_once() -> None:
    data = run(load("utf8_8bit.eml"), mid="<20250303.1@gmina-przyklad.pl>").data
    msg = parse(data)
    for name, value in list_headers(make_ctx(), "<20250303.1@gmina-przyklad.pl>"):
        assert msg.get_all(name) == [value], name
    # they come last, in the documented order
    tail = header_block(data).split(b"\r\n")[-11:-1]
    assert [line.split(b":")[0] for line in tail][-9:] == [
        b"List-Id", b"List-Post", b"List-Help", b"List-Subscribe", b"List-Unsubscribe",
        b"List-Archive", b"Archived-At", b"List-Owner", b"Precedence",
    ]  # fmt: skip


# -- headers removed, kept, added


def test_headers_removed_and_kept() -> None:
    raw = load("utf8_8bit.eml")
    data = run(raw).data
    block = header_block(data).lower()
    for gone in (b"dkim-signature:", b"approved:", b"return-path:", b"delivered-to:", b"x-beenthere:"):
        assert gone not in block
    assert b"other.example.com" not in block and b"other-leave" not in block
    assert b"precedence: bulk" not in block and block.count(b"precedence:") == 1
    # Received kept with its folding, byte for byte, and before the rest
    received = raw_headers(raw, "Received")
    assert received and raw_headers(data, "Received") == received
    assert data.startswith(b"Received:")
    assert b"tajne-haslo" not in data


def test_obsolete_blank_before_colon_is_a_field() -> None:
    # RFC 5322 §4.5 "Subject :": a field, written back without the blank so
    # that the email package (which would start the body there) agrees.
    raw = b"From: a@example.org\r\nSubject : Odp: x\r\nX-Tag\t: 1\r\n\r\nbody\r\n"
    data = run(raw).data
    msg = parse(data)
    assert msg["Subject"] == "[seap-planning] Re: x"
    assert raw_headers(data, "X-Tag") == [b" 1\r\n"]
    assert msg["List-Id"] and content(msg).startswith("body\n")


def test_stray_envelope_line_in_headers_is_skipped() -> None:
    raw = b"From: a@example.org\r\nFrom b@example.org Mon Jan  1 00:00:00 2025\r\nSubject: x\r\n\r\nbody\r\n"
    data = run(raw).data
    assert b"From b@example.org" not in data
    assert parse(data)["Subject"] == "[seap-planning] x"


def test_message_id_and_date_kept_when_present() -> None:
    data = run(load("utf8_8bit.eml"), mid="<20250303.1@gmina-przyklad.pl>").data
    msg = parse(data)
    assert msg.get_all("Message-ID") == ["<20250303.1@gmina-przyklad.pl>"]
    assert msg.get_all("Date") == ["Mon, 03 Mar 2025 09:15:00 +0100"] or raw_headers(data, "Date") == [
        b" Mon, 3 Mar 2025 09:15:00 +0100\r\n"
    ]


def test_missing_message_id_date_subject_lf_input() -> None:
    raw = load("no_subject_lf.eml")
    assert b"\r" not in raw
    res = run(raw, mid="abc.123@lists.example.org")
    assert_crlf(res.data)
    msg = parse(res.data)
    assert msg["Message-ID"] == "<abc.123@lists.example.org>"
    assert msg["Date"].datetime == NOW
    assert msg["Subject"] == "[seap-planning] (bez tematu)"
    assert parse(run(raw, make_ctx(language="en")).data)["Subject"] == "[seap-planning] (no subject)"
    assert msg["Archived-At"] == f"<https://archiwum.example.org/seap-planning/m/{message_id_hash('abc.123@lists.example.org')}.html>"


def test_mime_version_added_when_content_type_present() -> None:
    raw = b"From: a@example.org\r\nSubject: x\r\nContent-Type: text/plain; charset=utf-8\r\n\r\nhej\r\n"
    msg = parse(run(raw).data)
    assert msg["MIME-Version"] == "1.0"


def test_output_is_crlf_for_every_fixture() -> None:
    for path in sorted(DATA.glob("*.eml")):
        for munge in (False, True):
            assert_crlf(run(path.read_bytes(), munge=munge).data)


def test_added_header_lines_are_short() -> None:
    long_subject = ("Bardzo długi temat o harmonogramie SEAP i źródłach ciepła " * 4).strip()
    raw = f"From: =?utf-8?Q?Bo=C5=BCena?= <b@example.pl>\r\nSubject: {long_subject}\r\n\r\nx\r\n".encode()
    data = run(raw, munge=True).data
    for line in header_block(data).split(b"\r\n"):
        assert len(line) <= 998
    for line in b"".join(raw_headers(data, "Subject") + raw_headers(data, "From")).split(b"\r\n"):
        assert len(line) <= 78
    assert parse(data)["Subject"] == f"[seap-planning] {long_subject}"


# -- subject


@pytest.mark.parametrize(
    ("fixture", "expected"),
    [
        ("utf8_8bit.eml", f"[seap-planning] {SUBJ}"),
        ("qp_latin2.eml", f"[seap-planning] {SUBJ_NO_DASH}"),
        ("b64_cp1250.eml", f"[seap-planning] Re: {SUBJ_NO_DASH}"),
        ("raw8bit_latin2.eml", "[seap-planning] Re: Zażółć gęślą jaźń"),
        ("alternative.eml", "[seap-planning] Re: Spotkanie"),
    ],
)
def test_polish_subjects(fixture: str, expected: str) -> None:
    data = run(load(fixture)).data
    assert parse(data)["Subject"] == expected
    (raw_subject,) = raw_headers(data, "Subject")
    assert raw_subject.isascii()
    assert raw_subject.startswith(b" [seap-planning] "), "the tag stays readable in the raw header"


REPLY_FORMS = {
    "x": "[seap-planning] x",
    "Re: x": "[seap-planning] Re: x",
    "RE: x": "[seap-planning] Re: x",
    "re:x": "[seap-planning] Re: x",
    "Re[2]: x": "[seap-planning] Re: x",
    "Odp: x": "[seap-planning] Re: x",
    "ODP: x": "[seap-planning] Re: x",
    "AW: x": "[seap-planning] Re: x",
    "SV: x": "[seap-planning] Re: x",
    "Re: Re: Odp: x": "[seap-planning] Re: x",
    "Fwd: x": "[seap-planning] Fwd: x",
    "FW: x": "[seap-planning] FW: x",
    "PD: x": "[seap-planning] PD: x",
    "Re: [seap-planning] x": "Re: [seap-planning] x",
    "RE: [SEAP-PLANNING] x": "RE: [SEAP-PLANNING] x",
    "[seap-planning] Re: x": "[seap-planning] Re: x",
    "Odp: [seap-planning] Re: x": "Odp: [seap-planning] Re: x",
    "Fwd: [seap-planning] x": "Fwd: [seap-planning] x",
    "Re:": "[seap-planning] Re: (bez tematu)",
    "Odp: Zażółć": "[seap-planning] Re: Zażółć",
    "=?utf-8?Q?Odp=3A_=5Bseap-planning=5D_Za=C5=BC=C3=B3=C5=82=C4=87?=": "Odp: [seap-planning] Zażółć",
}


@pytest.mark.parametrize("subject", sorted(REPLY_FORMS))
def test_reply_forms_and_no_doubling(subject: str) -> None:
    raw = f"From: a@example.org\r\nSubject: {subject}\r\n\r\nx\r\n".encode()
    once = run(raw).data
    assert parse(once)["Subject"] == REPLY_FORMS[subject]
    # A reply to the list's copy, rewritten again, is still tagged once.
    twice = run(once).data
    assert parse(twice)["Subject"] == REPLY_FORMS[subject]
    reply = run(b"From: b@example.org\r\nSubject: Re: " + raw_headers(once, "Subject")[0].strip() + b"\r\n\r\ny\r\n").data
    assert parse(reply)["Subject"].lower().count("[seap-planning]") == 1


def test_tagged_subject_left_byte_identical() -> None:
    raw = b"From: a@example.org\r\nSubject: Re: [seap-planning]\r\n  =?utf-8?q?Za=C5=BC=C3=B3=C5=82=C4=87?=\r\n\r\nx\r\n"
    data = run(raw).data
    assert raw_headers(data, "Subject") == [b" Re: [seap-planning]\r\n  =?utf-8?q?Za=C5=BC=C3=B3=C5=82=C4=87?=\r\n"]


def test_empty_prefix_keeps_subject() -> None:
    raw = b"From: a@example.org\r\nSubject: Re: x\r\n\r\nx\r\n"
    assert raw_headers(run(raw, make_ctx(subject_prefix="")).data, "Subject") == [b" Re: x\r\n"]


def test_custom_prefix_template() -> None:
    raw = b"From: a@example.org\r\nSubject: Odp: x\r\n\r\nx\r\n"
    assert parse(run(raw, make_ctx(subject_prefix="<{name}>")).data)["Subject"] == "<seap-planning> Re: x"


def test_decode_header_text() -> None:
    assert decode_header_text(b" =?utf-8?b?xYF1a2Fzeg==?=  =?utf-8?q?_=C5=9Aliwi=C5=84ski?=") == "Łukasz Śliwiński"
    # a UTF-8 character split across two encoded words
    assert decode_header_text("=?utf-8?q?=C5?= =?utf-8?q?=81?=") == "Ł"
    assert decode_header_text("=?unknown-x?q?abc?= =?utf-8?b?!!?=") == "abc =?utf-8?b?!!?="
    assert decode_header_text("Zażółć".encode("cp1250")) == "Zażółć"
    assert decode_header_text("Zażółć".encode("iso-8859-2")) == "Zażółć"


# -- From munging


def test_munge_from_polish_name() -> None:
    raw = load("utf8_8bit.eml")
    data = run(raw, munge=True).data
    msg = parse(data)
    assert msg["From"].addresses[0].display_name == "Łukasz Śliwiński via Planowanie SEAP"
    assert msg["From"].addresses[0].addr_spec == "seap-planning@lists.example.org"
    assert [(a.display_name, a.addr_spec) for a in msg["Reply-To"].addresses] == [
        ("Łukasz Śliwiński", "lukasz@gmina-przyklad.pl")
    ]
    assert b"".join(raw_headers(data, "From")).isascii()
    # Reply-To goes right after From
    names = [line.split(b":")[0] for line in header_block(data).split(b"\r\n") if line and line[0] not in b" \t"]
    assert names[names.index(b"From") + 1] == b"Reply-To"


def test_munge_from_ascii_name_with_comma_is_quoted() -> None:
    data = run(load("qp_latin2.eml"), munge=True).data
    assert raw_headers(data, "From") == [b' "Kowalska, Anna via Planowanie SEAP" <seap-planning@lists.example.org>\r\n']
    assert parse(data)["Reply-To"] == '"Kowalska, Anna" <anna.kowalska@um.example.pl>'


def test_munge_from_keeps_existing_reply_to() -> None:
    msg = parse(run(load("b64_cp1250.eml"), munge=True).data)
    assert msg["From"].addresses[0].display_name == "Grażyna Świętochowska via Planowanie SEAP"
    assert [a.addr_spec for a in msg["Reply-To"].addresses] == ["sekretariat@wp.example.pl", "grazyna@wp.example.pl"]


def test_munge_from_author_already_in_reply_to() -> None:
    raw = b"From: Anna <anna@example.org>\r\nReply-To: Anna Nowak <ANNA@example.org>\r\nSubject: x\r\n\r\nx\r\n"
    data = run(raw, munge=True).data
    assert raw_headers(data, "Reply-To") == [b" Anna Nowak <ANNA@example.org>\r\n"]


def test_munge_from_without_display_name_uses_local_part() -> None:
    data = run(load("no_subject_lf.eml"), munge=True).data
    msg = parse(data)
    assert msg["From"].addresses[0].display_name == "anna via Planowanie SEAP"
    assert raw_headers(data, "From") == [b' "anna via Planowanie SEAP" <seap-planning@lists.example.org>\r\n']
    assert str(msg["Reply-To"]) == "anna@example.org"


def test_munge_from_raw_8bit_name() -> None:
    msg = parse(run(load("raw8bit_latin2.eml"), munge=True).data)
    assert msg["From"].addresses[0].display_name == "Paweł Żak via Planowanie SEAP"


def test_munge_from_title_fallback_and_address_like_name() -> None:
    raw = b"From: anna@example.org <anna@example.org>\r\nSubject: x\r\n\r\nx\r\n"
    msg = parse(run(raw, make_ctx(title=""), munge=True).data)
    assert msg["From"].addresses[0].display_name == "anna via seap-planning"


def test_no_munge_keeps_from_bytes() -> None:
    raw = load("utf8_8bit.eml")
    data = run(raw, munge=False).data
    assert raw_headers(data, "From") == raw_headers(raw, "From")
    assert not raw_headers(data, "Reply-To")


def test_munge_from_without_usable_from_leaves_it() -> None:
    raw = b"From: undisclosed\r\nSubject: x\r\n\r\nx\r\n"
    assert raw_headers(run(raw, munge=True).data, "From") == [b" undisclosed\r\n"]


# -- footer


def test_footer_texts() -> None:
    assert render_footer(make_ctx()) == (
        "-- \nPlanowanie SEAP\nLista: seap-planning@lists.example.org\n"
        f"Wypisanie: napisz na {LEAVE}\nArchiwum: https://archiwum.example.org/seap-planning/\n"
    )
    assert render_footer(make_ctx(archive="", language="en")) == (
        f"-- \nPlanowanie SEAP\nList: seap-planning@lists.example.org\nUnsubscribe: write to {LEAVE}\n"
    )


def test_custom_footer_placeholders_never_crash() -> None:
    ctx = make_ctx(footer="{title} | {post_address} | {nope} | {0} | { | } | {archive_url}")
    assert render_footer(ctx) == (
        "Planowanie SEAP | seap-planning@lists.example.org | {nope} | {0} | { | } | "
        "https://archiwum.example.org/seap-planning/\n"
    )


def test_footer_utf8_8bit_keeps_author_bytes() -> None:
    raw = load("utf8_8bit.eml")
    data = run(raw).data
    original_body = raw.split(b"\r\n\r\n", 1)[1]
    body = data.split(b"\r\n\r\n", 1)[1]
    assert body.startswith(original_body)
    msg = parse(data)
    assert msg.get_content_type() == "text/plain"
    assert msg["Content-Transfer-Encoding"] == "8bit"
    assert msg.get_param("format") == "flowed"
    text = content(msg)
    assert "Źródła, ciepło, łączność" in text
    assert text.endswith("\n\n" + render_footer(make_ctx()))


def test_footer_latin2_qp_stays_latin2() -> None:
    ctx = make_ctx(title="Zamówienia publiczne")
    msg = parse(run(load("qp_latin2.eml"), ctx).data)
    assert msg.get_content_charset() == "iso-8859-2"
    assert msg["Content-Transfer-Encoding"] == "quoted-printable"
    text = content(msg)
    assert text.startswith("Dzień dobry,\n\nprzesyłam harmonogram prac nad SEAP (Źródła, ciepło, łączność).")
    assert "-- \nZamówienia publiczne\n" in text


def test_footer_latin2_switches_to_utf8_when_needed() -> None:
    ctx = make_ctx(title="SEAP — Łódź €")  # em dash and euro sign are not in ISO-8859-2
    msg = parse(run(load("qp_latin2.eml"), ctx).data)
    assert msg.get_content_charset() == "utf-8"
    assert msg["Content-Transfer-Encoding"] == "quoted-printable"
    text = content(msg)
    assert "(Źródła, ciepło, łączność)" in text and "SEAP — Łódź €" in text


def test_footer_cp1250_base64() -> None:
    ctx = make_ctx(footer="-- \nŚwiętokrzyskie: {post_address}\n")
    data = run(load("b64_cp1250.eml"), ctx).data
    msg = parse(data)
    assert msg.get_content_charset() == "windows-1250"
    assert msg["Content-Transfer-Encoding"] == "base64"
    text = content(msg)
    assert text.startswith("Dzień dobry,")
    assert text.endswith("\n\n-- \nŚwiętokrzyskie: seap-planning@lists.example.org\n")
    raw_body = base64.b64decode(data.split(b"\r\n\r\n", 1)[1])
    assert b"\r\n" in raw_body and b"\n" not in raw_body.replace(b"\r\n", b""), "canonical CRLF text"


def test_footer_ascii_7bit_becomes_utf8_qp_for_polish_footer() -> None:
    raw = b"From: a@example.org\r\nSubject: x\r\n\r\nHello = world\r\n"
    ctx = make_ctx(footer="-- \nGmina Łódź\n")
    data = run(raw, ctx).data
    msg = parse(data)
    assert msg.get_content_type() == "text/plain" and msg.get_content_charset() == "utf-8"
    assert msg["Content-Transfer-Encoding"] == "quoted-printable"
    assert content(msg) == "Hello = world\n\n-- \nGmina Łódź\n"
    assert data.split(b"\r\n\r\n", 1)[1].isascii()


def test_footer_ascii_stays_7bit_when_footer_is_ascii() -> None:
    raw = b"From: a@example.org\r\nSubject: x\r\n\r\nHello\r\n"
    data = run(raw).data
    assert data.endswith(b"\r\n\r\nHello\r\n\r\n-- \r\nPlanowanie SEAP\r\nLista: seap-planning@lists.example.org\r\n"
                         b"Wypisanie: napisz na seap-planning-leave@lists.example.org\r\n"
                         b"Archiwum: https://archiwum.example.org/seap-planning/\r\n")  # fmt: skip
    assert not raw_headers(data, "Content-Type") and not raw_headers(data, "Content-Transfer-Encoding")


def test_footer_body_without_final_newline() -> None:
    raw = b"From: a@example.org\r\nSubject: x\r\nContent-Type: text/plain\r\n\r\nno newline"
    assert content(parse(run(raw).data)).startswith("no newline\n\n-- \n")


def test_footer_flowed_is_not_flowed_into() -> None:
    raw = b"From: a@example.org\r\nContent-Type: text/plain; format=flowed\r\n\r\nflowed \r\ntext\r\n"
    ctx = make_ctx(footer="-- \n>quoted line   \nFrom here\n")
    body = run(raw, ctx).data.split(b"\r\n\r\n", 1)[1]
    assert body.endswith(b"\r\n-- \r\n >quoted line\r\n From here\r\n")


def test_unlabelled_8bit_utf8_is_labelled() -> None:
    raw = "From: a@example.org\r\nSubject: x\r\n\r\nZażółć\r\n".encode()
    msg = parse(run(raw, make_ctx(title="Łódź")).data)
    assert msg.get_content_charset() == "utf-8"
    assert content(msg).startswith("Zażółć\n\n-- \nŁódź\n")


def footer_part(msg: email.message.EmailMessage) -> email.message.EmailMessage:
    parts = list(msg.iter_parts())
    last = parts[-1]
    assert isinstance(last, email.message.EmailMessage)
    assert last.get_content_type() == "text/plain"
    assert last.get_content_disposition() == "inline"
    assert content(last) == render_footer(make_ctx())
    return last


def wrapped_first_part(raw: bytes, data: bytes) -> bytes:
    """The raw bytes of the first part of a wrapped message."""
    msg = parse(data)
    boundary = msg.get_boundary()
    assert boundary
    body = data.split(b"\r\n\r\n", 1)[1]
    return body.split(b"--" + boundary.encode() + b"\r\n")[1].rsplit(b"\r\n", 1)[0]


def original_entity(raw: bytes) -> bytes:
    """The original Content-* fields plus body, as the wrapper's first part must hold them."""
    head, body = raw.split(b"\r\n\r\n", 1)
    fields = re.findall(rb"(?m)^[^ \t\r\n][^\r\n]*\r\n(?:[ \t][^\r\n]*\r\n)*", head + b"\r\n")
    content = b"".join(f for f in fields if f.lower().startswith(b"content-"))
    return content + b"\r\n" + body


@pytest.mark.parametrize("fixture", ["html_only.eml", "alternative.eml", "signed.eml"])
def test_wrapped_original_is_byte_identical(fixture: str) -> None:
    raw = load(fixture)
    data = run(raw).data
    msg = parse(data)
    assert msg.get_content_type() == "multipart/mixed"
    assert not msg.defects
    first, second = list(msg.iter_parts())
    footer_part(msg)
    assert wrapped_first_part(raw, data) == original_entity(raw)
    original = parse(raw)
    assert first.get_content_type() == original.get_content_type()
    if fixture == "html_only.eml":
        # the HTML never gets the footer pasted in
        assert content(first) == content(original)
        assert "Planowanie" not in content(first)


def test_signed_signature_part_untouched() -> None:
    raw = load("signed.eml")
    data = run(raw).data
    signed_body = raw.split(b"\r\n\r\n", 1)[1]
    assert signed_body in data
    inner = list(parse(data).iter_parts())[0]
    assert inner.get_content_type() == "multipart/signed"
    assert [p.get_content_type() for p in inner.iter_parts()] == ["text/plain", "application/pgp-signature"]


def test_mixed_gets_footer_part_and_keeps_other_parts() -> None:
    raw = load("mixed_pdf.eml")
    data = run(raw).data
    msg = parse(data)
    assert msg.get_content_type() == "multipart/mixed" and not msg.defects
    parts = list(msg.iter_parts())
    assert [p.get_content_type() for p in parts] == ["text/plain", "application/pdf", "text/plain"]
    footer_part(msg)
    # everything of the original body up to the close delimiter is still there, byte for byte
    original_body = raw.split(b"\r\n\r\n", 1)[1]
    before_close = original_body.rsplit(b"\r\n------=_Part_1_2.3--", 1)[0]
    assert before_close in data
    assert data.endswith(b"\r\n------=_Part_1_2.3--\r\n")
    assert parts[1].get_content() == list(parse(raw).iter_parts())[1].get_content()
    assert raw_headers(data, "Content-Type") == raw_headers(raw, "Content-Type")


def test_broken_mime_without_close_delimiter_is_wrapped() -> None:
    raw = load("broken_no_close.eml")
    data = run(raw).data
    msg = parse(data)
    assert msg.get_content_type() == "multipart/mixed"
    footer_part(msg)
    assert wrapped_first_part(raw, data) == original_entity(raw)
    assert any("Treść bez końcowego ogranicznika." in t for t in text_parts(msg))


def test_garbage_transfer_encoding_is_wrapped() -> None:
    raw = load("garbage_cte.eml")
    data = run(raw).data
    footer_part(parse(data))
    assert wrapped_first_part(raw, data) == original_entity(raw)


@pytest.mark.parametrize("cte", ["x-uuencode", "7-bit", "base64; junk"])
def test_unknown_transfer_encodings(cte: str) -> None:
    raw = f"From: a@example.org\r\nContent-Type: text/plain\r\nContent-Transfer-Encoding: {cte}\r\n\r\nabc\r\n".encode()
    msg = parse(run(raw).data)
    assert any(LEAVE in t for t in text_parts(msg))


def test_unknown_charset_is_wrapped() -> None:
    raw = b"From: a@example.org\r\nContent-Type: text/plain; charset=x-klingon\r\n\r\nabc\xff\r\n"
    data = run(raw).data
    footer_part(parse(data))
    assert wrapped_first_part(raw, data) == original_entity(raw)


def test_raw_8bit_latin2_body_is_wrapped_not_mangled() -> None:
    raw = load("raw8bit_latin2.eml")
    data = run(raw).data
    assert "Treść bez etykiety.".encode("iso-8859-2") in data
    msg = parse(data)
    assert msg["Content-Transfer-Encoding"] == "8bit"
    footer_part(msg)


def test_text_attachment_is_not_appended_to() -> None:
    raw = b"From: a@example.org\r\nContent-Type: text/plain\r\nContent-Disposition: attachment; filename=a.txt\r\n\r\nabc\r\n"
    msg = parse(run(raw).data)
    assert msg.get_content_type() == "multipart/mixed"
    assert content(list(msg.iter_parts())[0]) == "abc\n"


# -- attachments


def test_attachment_types() -> None:
    assert attachment_types(load("mixed_pdf.eml")) == ("text/plain", "application/pdf")
    assert attachment_types(load("exe_octet.eml")) == (
        "text/plain",
        "application/octet-stream",
        "application/x-msdownload",
        "application/pdf",
    )
    assert attachment_types(load("html_only.eml")) == ("text/html",)
    assert attachment_types(load("no_subject_lf.eml")) == ("text/plain",)
    assert attachment_types(load("alternative.eml")) == ("text/plain", "text/html")


def test_strip_exe_sent_as_octet_stream() -> None:
    raw = load("exe_octet.eml")
    res = run(raw)
    assert res.stripped == ("application/x-msdownload",)
    msg = parse(res.data)
    types = [p.get_content_type() for p in msg.iter_parts()]
    assert types == ["text/plain", "text/plain", "application/pdf", "text/plain"]
    note = content(list(msg.iter_parts())[1])
    assert note == "[załącznik usunięty: faktura.pdf.exe (application/x-msdownload)]\n"
    assert b"TVqQ" not in res.data
    # the PDF part keeps its bytes
    pdf_part = raw.split(b"--exe-b\r\n")[3].rsplit(b"\r\n--exe-b--", 1)[0]
    assert pdf_part in res.data
    footer_part(msg)


def test_strip_inside_forwarded_message() -> None:
    inner = load("exe_octet.eml")
    raw = (
        b"From: a@example.org\r\nSubject: Fwd\r\nMIME-Version: 1.0\r\n"
        b'Content-Type: multipart/mixed; boundary="outer"\r\n\r\n'
        b"--outer\r\nContent-Type: text/plain\r\n\r\nsee below\r\n"
        b"--outer\r\nContent-Type: message/rfc822\r\n\r\n" + inner + b"\r\n--outer--\r\n"
    )
    assert "application/x-msdownload" in attachment_types(raw)
    res = run(raw)
    assert res.stripped == ("application/x-msdownload",)
    msg = parse(res.data)
    assert "application/octet-stream" not in [p.get_content_type() for p in msg.walk()]
    assert "message/rfc822" in [p.get_content_type() for p in msg.walk()]


def test_strip_whole_message_body() -> None:
    raw = (
        b"From: a@example.org\r\nSubject: x\r\nMIME-Version: 1.0\r\n"
        b'Content-Type: application/x-msdownload; name="a.exe"\r\nContent-Transfer-Encoding: base64\r\n\r\nTVqQAAAA\r\n'
    )
    res = run(raw, make_ctx(language="en"))
    assert res.stripped == ("application/x-msdownload",)
    msg = parse(res.data)
    assert msg.get_content_type() == "text/plain"
    assert content(msg).startswith("[attachment removed: a.exe (application/x-msdownload)]\n\n-- \n")


def test_strip_respects_policy() -> None:
    ctx = make_ctx(attachments=AttachmentPolicy(strip=("application/pdf",)))
    res = run(load("mixed_pdf.eml"), ctx)
    assert res.stripped == ("application/pdf",)
    assert run(load("exe_octet.eml"), make_ctx(attachments=AttachmentPolicy())).stripped == ()


# -- robustness


def test_deterministic() -> None:
    for path in sorted(DATA.glob("*.eml")):
        raw = path.read_bytes()
        assert run(raw, munge=True).data == run(raw, munge=True).data


def test_rewrite_is_stable_on_its_own_output() -> None:
    """Rewriting the list's copy again (a loop) adds one more footer, never a second tag."""
    for path in sorted(DATA.glob("*.eml")):
        once = run(path.read_bytes()).data
        twice = run(once).data
        assert parse(twice)["Subject"] == parse(once)["Subject"]
        assert len(parse(twice).get_all("List-Id") or []) == 1


EDGE_CASES = [
    b"",
    b"\r\n",
    b"\r\n\r\n",
    b"just a body without headers\n",
    b"Subject: only headers",
    b"From nobody Mon Jan  1 00:00:00 2025\nFrom: a@b\n\nmbox\n",
    b" leading continuation\r\nSubject: x\r\n\r\nbody\r\n",
    b"Subject: x\r\nThis is not a header\r\nFrom: a@b\r\n\r\nbody\r\n",
    b"Subject: \xff\xfe\x00\x01\r\nFrom: \x80\x81 <a@b>\r\n\r\nbody\r\n",
    b"Content-Type: multipart/mixed\r\n\r\nno boundary\r\n",
    b'Content-Type: multipart/mixed; boundary=""\r\n\r\n--\r\n',
    b'Content-Type: multipart/mixed; boundary="b"\r\n\r\n--b--\r\n',
    b'Content-Type: multipart/mixed; boundary="b"\r\n\r\n--b\r\n--b\r\n--b--\r\n',
    b'Content-Type: multipart/alternative; boundary="b"\r\n\r\n--b\r\nContent-Type: multipart/mixed; boundary="b"\r\n\r\n--b--\r\n',
    b"Content-Type: text/plain; charset=base64\r\n\r\nabc\r\n",
    b"Content-Type: text/plain; charset=utf-16\r\nContent-Transfer-Encoding: base64\r\n\r\n//5hAA==\r\n",
    b"Content-Type: text/plain; charset*=utf-8''%ZZ\r\n\r\nabc\r\n",
    b"Content-Type: message/rfc822\r\n\r\nContent-Type: message/rfc822\r\n\r\n" * 50,
    b"Content-Type: ;;;\r\nContent-Disposition: ;filename*=x''\r\n\r\nabc\r\n",
    b"Subject: =?utf-8?b?=?= =?x?q?=ZZ?= =?utf-8*pl?Q?=C5=81?=\r\n\r\nx\r\n",
    b"From: =?utf-8?q?a=2C_b?= <a@b>, c@d\r\nReply-To: ,,,\r\n\r\nx\r\n",
    b"Message-ID:\r\nDate:\r\n\r\nx\r\n",
    "Subject: " + "ż" * 2000 + "\r\n\r\nx\r\n",
]


@pytest.mark.parametrize("raw", EDGE_CASES, ids=range(len(EDGE_CASES)))
def test_edge_cases_never_raise(raw: bytes | str) -> None:
    data = raw.encode() if isinstance(raw, str) else raw
    for munge in (False, True):
        res = run(data, munge=munge)
        check_output(res.data)
    attachment_types(data)


def check_output(data: bytes) -> None:
    assert_crlf(data)
    msg = parse(data)
    assert len(msg.get_all("List-Id") or []) == 1
    assert "seap-planning" in str(msg["Subject"]).lower()
    # compat32 for these: policy.default raises IndexError on a truncated
    # Message-ID such as "<abc@" (a CPython bug), and we keep the author's id.
    legacy = email.message_from_bytes(data)
    assert str(legacy["Message-ID"]).strip() and str(legacy["Date"]).strip()
    for part in msg.walk():
        part.get_content_type()
        if not part.is_multipart():
            try:
                part.get_content()
            except (LookupError, KeyError):
                pass  # an unknown charset or type the email package cannot render


def test_mutated_fixtures_never_raise() -> None:
    """Cut and damage the fixtures at random (seeded) places: never raise, always parse."""
    rng = random.Random(2025)
    sources = [p.read_bytes() for p in sorted(DATA.glob("*.eml"))]
    for _ in range(400):
        raw = bytearray(rng.choice(sources))
        action = rng.randrange(4)
        if action == 0:
            raw = raw[: rng.randrange(len(raw) + 1)]
        elif action == 1:
            lines = bytes(raw).split(b"\n")
            del lines[rng.randrange(len(lines))]
            raw = bytearray(b"\n".join(lines))
        elif action == 2:
            for _ in range(rng.randrange(1, 20)):
                raw[rng.randrange(len(raw))] = rng.randrange(256)
        else:
            pos = rng.randrange(len(raw) + 1)
            raw[pos:pos] = rng.choice([b"\r", b"\n", b"--", b"=?", b"?=", b":", b"\r\n\r\n", b"=\r\n"])
        res = run(bytes(raw), munge=bool(rng.randrange(2)))
        check_output(res.data)


# -- real-world corpora

CORPORA = ("cpython_test_email", "mail_gem_fixtures", "rspamd_messages", "polish_nonascii_real")


def corpora_root() -> Path:
    """Same lookup as conftest.corpora_dir: LISTSERV_CORPORA, LISTSERV_SHARED/corpora, <repo>/../shared/corpora."""
    shared = Path(os.environ.get("LISTSERV_SHARED", Path(__file__).resolve().parent.parent.parent / "shared"))
    return Path(os.environ.get("LISTSERV_CORPORA", shared / "corpora"))


def corpus_files(directory: Path) -> list[Path]:
    skip = {"SOURCE.txt", "MIT-LICENSE", "LICENSE", "README", "README.md"}
    return sorted(p for p in directory.rglob("*") if p.is_file() and p.name not in skip)


@pytest.mark.corpus
@pytest.mark.slow
@pytest.mark.parametrize("corpus", CORPORA)
def test_corpus(corpus: str) -> None:
    """Real messy mail: rewrite never raises, the output parses and carries the footer."""
    directory = corpora_root() / corpus
    if not directory.is_dir():
        reason = f"corpus {directory} is absent (set LISTSERV_CORPORA to its parent)"
        if os.environ.get("LISTSERV_STRICT_SKIPS") == "1":
            pytest.fail(f"required in CI: {reason}")
        pytest.skip(reason)
    files = corpus_files(directory)
    failures: list[str] = []
    footer_missing: list[str] = []
    for path in files:
        raw = path.read_bytes()
        try:
            res = run(raw, munge=True)
            check_output(res.data)
            attachment_types(raw)
        except Exception as exc:  # noqa: BLE001 - collect every failure, report them all
            failures.append(f"{path.relative_to(directory)}: {type(exc).__name__}: {exc}")
            continue
        try:
            if not any(LEAVE in t for t in text_parts(parse(res.data))):
                footer_missing.append(str(path.relative_to(directory)))
        except Exception as exc:  # noqa: BLE001
            footer_missing.append(f"{path.relative_to(directory)} ({type(exc).__name__}: {exc})")
    print(f"\n{corpus}: {len(files)} files, {len(failures)} failures, footer not found in {len(footer_missing)}")
    for line in footer_missing:
        print("  footer not found:", line)
    assert not failures, "\n".join(failures)
    assert not footer_missing, footer_missing
