"""Reading e-mail commands: Polish and English, quoted text, signatures, HTML-only, real client replies."""

from __future__ import annotations

from email.message import EmailMessage
from pathlib import Path

import pytest

from conftest import corpora_dir, require
from listserv.commands import first_text, html_to_text, normalize_word, parse_commands, parse_message

pytestmark = pytest.mark.one_backend  # runs once: see pyproject's markers


def names(subject: str, body: str) -> list[tuple[str, tuple[str, ...]]]:
    return [(c.name, c.args) for c in parse_commands(subject, body).commands]


@pytest.mark.parametrize("word, canonical", [
    ("dołącz", "join"), ("DOŁĄCZ", "join"), ("dolacz", "join"), ("Zapisz", "join"), ("subscribe", "join"),
    ("wypisz", "leave"), ("Unsubscribe", "leave"), ("pomoc", "help"), ("HELP", "help"), ("koniec", "end"),
    ("kto", "who"),
])
def test_command_words_in_both_languages_without_case_or_diacritics(word: str, canonical: str) -> None:
    parsed = parse_commands("", f"{word}\n")
    expected = [] if canonical == "end" else [canonical]
    assert [c.name for c in parsed.commands] == expected


def test_potwierdz_with_a_token_in_the_subject_after_odp() -> None:
    token = "abcdefghijklmnopqrstuvwxyz"
    assert names(f"Odp: Potwierdź {token}", "") == [("confirm", (token,))]
    assert names(f"RE: [seap-planning] potwierdz {token}", "") == [("confirm", (token,))]
    assert normalize_word("Potwierdź") == "potwierdz"


def test_body_reading_skips_quotes_and_stops_at_signature_and_prose() -> None:
    body = (
        "\n"
        "> join\n"          # quoted: ignored
        "zapisz się\n"
        "set nomail\n"
        "-- \n"
        "pomoc\n"           # below the signature: not read
    )
    assert names("", body) == [("join", ()), ("set", ("nomail",))]
    prose = "wypisz\nDzień dobry, proszę o wypisanie mnie z listy.\npomoc\n"
    assert names("", prose) == [("leave", ())]  # stops at the first line that is not a command


def test_at_most_ten_lines_are_read() -> None:
    body = "\n".join(["set mail"] * 10 + ["pomoc"])
    assert "help" not in [c.name for c in parse_commands("", body).commands]


def test_join_address_argument_and_not_understood() -> None:
    assert names("", "join address=wojt@gmina.example.pl\n") == [("join", ("address=wojt@gmina.example.pl",))]
    parsed = parse_commands("pytanie", "Czy lista działa?\n")
    assert parsed.commands == () and parsed.not_understood == ("Czy lista działa?",)


def test_end_stops_reading() -> None:
    assert names("", "pomoc\nkoniec\nwypisz\n") == [("help", ())]


def test_html_only_message_is_read_as_text() -> None:
    m = EmailMessage()
    m["Subject"] = "polecenie"
    m.set_content("<html><body><p>wypisz</p><blockquote><p>join</p></blockquote>"
                  "<script>join</script></body></html>", subtype="html")
    assert [c.name for c in parse_message(m.as_bytes(), "polecenie").commands] == ["leave"]


def test_first_text_decodes_polish_charsets() -> None:
    m = EmailMessage()
    m.set_content("dołącz\n", charset="iso-8859-2")
    assert first_text(m.as_bytes()).strip() == "dołącz"
    assert first_text(b"\xff\xfe not mime at all") is not None


def _talon() -> Path:
    folder = corpora_dir() / "talon_replies"
    require(folder.is_dir(), f"{folder} not found (set LISTSERV_CORPORA)")
    return folder


# What each client's reply says above its quote; we put a command there instead.
REPLIES = {
    "standard_replies/gmail.eml": b"Hello",
    "standard_replies/outlook.eml": b"Hello",
    "standard_replies/thunderbird.eml": None,
    "standard_replies/apple_mail.eml": None,
    "standard_replies/yahoo.eml": None,
    "standard_replies/hotmail.eml": None,
    "standard_replies/android.eml": None,
    "standard_replies/iphone.eml": None,
    "standard_replies/aol.eml": None,
    "standard_replies/comcast.eml": None,
    "standard_replies/sparrow.eml": None,
}


def _replace_in_text_parts(raw: bytes, old: str, new: str) -> bytes:
    """Change the reply's words in every text part, whatever its transfer encoding."""
    import email
    import email.policy

    msg = email.message_from_bytes(raw, policy=email.policy.default)
    for part in msg.walk():
        if part.get_content_maintype() == "text" and not part.is_multipart():
            content = part.get_content()
            if old in content:
                part.set_content(content.replace(old, new, 1), subtype=part.get_content_subtype())
    return msg.as_bytes()


@pytest.mark.corpus
def test_real_client_replies_parse_without_error() -> None:
    folder = _talon()
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name != "SOURCE.txt")
    assert len(files) > 20
    for path in files:
        raw = path.read_bytes()
        if path.suffix == ".html":
            text = html_to_text(raw.decode("utf-8", "replace"))
            parse_commands("Re: Test", text)
        else:
            parse_message(raw, "Re: Test")


@pytest.mark.corpus
@pytest.mark.parametrize("relative", sorted(REPLIES))
def test_command_written_above_a_real_clients_quote(relative: str) -> None:
    path = _talon() / relative
    raw = path.read_bytes()
    text = first_text(raw)
    # The reply's own first line (above the quote) becomes "wypisz".
    first = next((line.strip() for line in text.splitlines() if line.strip()), "")
    assert first, relative
    replaced = _replace_in_text_parts(raw, first, "wypisz")
    parsed = parse_message(replaced, "Re: Test")
    assert [c.name for c in parsed.commands] == ["leave"], (relative, first_text(replaced)[:300])


@pytest.mark.corpus
@pytest.mark.parametrize("name", ["gmail.html", "hotmail.html", "ms_outlook_2003.html", "ms_outlook_2007.html",
                                  "ms_outlook_2010.html", "thunderbird.html", "windows_mail.html"])
def test_command_in_a_real_html_reply(name: str) -> None:
    markup = (_talon() / "html_replies" / name).read_text("utf-8", "replace")
    text = html_to_text(markup)
    first = next((line.strip() for line in text.splitlines() if line.strip()), "")
    assert first
    replaced = markup.replace(first, "pomoc", 1)
    assert [c.name for c in parse_commands("Re: Test", html_to_text(replaced)).commands] == ["help"], name
