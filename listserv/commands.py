"""Read e-mail commands (join, leave, confirm, help, who, set, end) from a message.  Pure.

Members write from ordinary mail programs, in Polish or English, often as a
reply with the quoted original and a signature below.  The Subject is read
first (after ``Re:``/``Odp:``/``AW:``/``Fwd:`` and a list tag), then the first
text part line by line: quoted ``>`` lines and blank lines are skipped, reading
stops at the signature separator ``-- ``, at the first line that is not a
command, at ``end``/``koniec``, and after ``MAX_LINES`` lines.  An HTML-only
message is read as text.  Command words are matched without case and without
diacritics, so ``Potwierdź``, ``potwierdz`` and ``POTWIERDZ`` are one command.
"""

from __future__ import annotations

import html
import re
import unicodedata
from dataclasses import dataclass
from email import policy
from email.message import Message
from email.parser import BytesParser
from html.parser import HTMLParser

__all__ = ["Command", "ParsedCommands", "first_text", "normalize_word", "parse_commands", "parse_message",
           "parse_setting"]

MAX_LINES = 10

ALIASES: dict[str, str] = {
    "join": "join", "subscribe": "join", "sub": "join", "dolacz": "join", "zapisz": "join",
    "zapis": "join",
    "leave": "leave", "unsubscribe": "leave", "unsub": "leave", "signoff": "leave", "wypisz": "leave",
    "confirm": "confirm", "potwierdz": "confirm", "potwierdzam": "confirm",
    "help": "help", "pomoc": "help", "info": "help",
    "who": "who", "kto": "who", "members": "who", "uczestnicy": "who",
    "set": "set", "ustaw": "set",
    "end": "end", "stop": "end", "koniec": "end", "thanks": "end", "dziekuje": "end",
}
# "zapisz się", "wypisz się": the reflexive pronoun is part of the command.
_FILLER = {"sie", "mnie", "me", "please", "prosze"}
_TOKEN = re.compile(r"^[A-Za-z0-9_-]{16,64}$")
_REPLY_PREFIX = re.compile(r"^\s*((re|odp|aw|sv|vs|antw|fwd?|fw|pd|wg)(\[\d+\])?\s*:\s*)+", re.IGNORECASE)
_LIST_TAG = re.compile(r"^\s*\[[^\]]{1,80}\]\s*")


@dataclass(frozen=True, slots=True)
class Command:
    name: str  # canonical: join | leave | confirm | help | who | set | end
    args: tuple[str, ...]
    line: str  # as the member wrote it, for the reply


@dataclass(frozen=True, slots=True)
class ParsedCommands:
    commands: tuple[Command, ...]
    not_understood: tuple[str, ...]


def normalize_word(word: str) -> str:
    """Lower case without diacritics ("Potwierdź" -> "potwierdz", "Dołącz" -> "dolacz")."""
    word = word.lower().replace("ł", "l")
    decomposed = unicodedata.normalize("NFKD", word)
    return "".join(ch for ch in decomposed if not unicodedata.combining(ch)).strip(".,;:!?\"'()")


def parse_line(line: str) -> Command | None:
    """One command from one line, or None if the line is not a command."""
    words = line.split()
    if not words:
        return None
    name = ALIASES.get(normalize_word(words[0]))
    if name is None:
        return None
    args = [w for w in words[1:] if normalize_word(w) not in _FILLER]
    if name == "confirm":
        tokens = [a.strip(".,;:<>()") for a in args if _TOKEN.match(a.strip(".,;:<>()"))]
        return Command(name, tuple(tokens[:1]), line.strip()) if tokens else None
    if name == "set":
        values = [normalize_word(a) for a in args]
        return Command(name, tuple(values), line.strip()) if 1 <= len(values) <= 2 else None
    if name == "join":
        kept = tuple(a for a in args if a.lower().startswith("address="))
        return Command(name, kept, line.strip()) if len(kept) == len(args) or len(args) <= 2 else None
    # help, who, leave, end: a few extra words ("help please") are fine,
    # a sentence is not a command.
    return Command(name, (), line.strip()) if len(args) <= 2 else None


# `set` / `ustaw`: the words (normalized: no case, no diacritics) for each
# member option, and what they set.  Modes as Mailman, Sympa and LISTSERV
# name them; Polish as a municipal officer would write them.
_MODES = {
    "each": "each", "pojedynczo": "each", "single": "each", "osobno": "each", "kazda": "each", "mail": "each",
    "digest": "digest_mime", "skrot": "digest_mime", "przeglad": "digest_mime", "mime": "digest_mime",
    "digestmime": "digest_mime", "digest_mime": "digest_mime",
    "plain": "digest_plain", "digestplain": "digest_plain", "digest_plain": "digest_plain", "tekst": "digest_plain",
    "index": "index", "indeks": "index", "summary": "index", "spis": "index",
}
_OPTIONS = {
    "ack": ("ack", True), "potwierdzenia": ("ack", True), "potwierdzenie": ("ack", True),
    "noack": ("ack", False), "bezpotwierdzen": ("ack", False),
    "notme": ("not_me", True), "not_me": ("not_me", True), "nieja": ("not_me", True),
    "bezmoich": ("not_me", True),
    "metoo": ("not_me", False), "repro": ("not_me", False), "moje": ("not_me", False),
    "nodupes": ("no_dupes", True), "no_dupes": ("no_dupes", True), "bezduplikatow": ("no_dupes", True),
    "dupes": ("no_dupes", False), "duplikaty": ("no_dupes", False),
}
_ON = {"on", "yes", "tak", "wl", "wlacz", "1", "true"}
_OFF = {"off", "no", "nie", "wyl", "wylacz", "0", "false"}


def parse_setting(args: tuple[str, ...]) -> dict[str, object] | None:
    """What ``set ARGS`` changes, as member columns (pure), or None when it is not understood.

    ``set nomail`` / ``set mail`` change the delivery status; ``set digest``,
    ``set digest plain``, ``set index``, ``set each`` the delivery mode;
    ``set ack [on|off]``, ``set notme``, ``set nodupes`` the options;
    ``set language pl|en`` the language of the mail listserv writes.
    """
    if not args:
        return None
    word, rest = args[0], args[1:]
    if word in ("nomail", "nomai", "bezpoczty", "wstrzymaj"):
        return {"delivery": "nomail"} if not rest else None
    if word in ("mail", "poczta", "wznow"):
        return {"delivery": "enabled"} if not rest else None
    if word in ("nie", "no", "not") and rest and rest[0] in ("ja", "me"):
        return {"not_me": True}  # "nie ja", "not me"
    if word in ("language", "jezyk", "lang"):
        return {"language": rest[0]} if len(rest) == 1 and rest[0] in ("pl", "en") else None
    if word in ("digest", "skrot", "przeglad") and rest:
        mode = {"plain": "digest_plain", "tekst": "digest_plain", "tekstowy": "digest_plain",
                "mime": "digest_mime"}.get(rest[0])
        return {"delivery_mode": mode} if mode else None
    if word in _MODES:
        return {"delivery_mode": _MODES[word]} if not rest else None
    if word in _OPTIONS:
        column, value = _OPTIONS[word]
        if rest:
            if rest[0] in _ON:
                return {column: value}
            if rest[0] in _OFF:
                return {column: not value}
            return None
        return {column: value}
    return None


def strip_subject(subject: str) -> str:
    text = subject
    for _ in range(5):
        before = text
        text = _REPLY_PREFIX.sub("", text)
        text = _LIST_TAG.sub("", text)
        if text == before:
            break
    return text.strip()


def parse_commands(subject: str, body: str) -> ParsedCommands:
    commands: list[Command] = []
    not_understood: list[str] = []
    subject_text = strip_subject(subject)
    if subject_text:
        cmd = parse_line(subject_text)
        if cmd is not None:
            if cmd.name == "end":
                return ParsedCommands((), ())
            commands.append(cmd)
    seen = 0
    for raw in body.splitlines():
        if raw.rstrip() == "--" or raw.startswith("-- "):
            break  # RFC 3676 §4.3 signature separator
        line = raw.strip()
        if not line or line.startswith(">"):
            continue
        seen += 1
        if seen > MAX_LINES:
            break
        cmd = parse_line(line)
        if cmd is None:
            if not commands:
                not_understood.append(line[:200])
            break
        if cmd.name == "end":
            break
        if cmd not in commands:
            commands.append(cmd)
    return ParsedCommands(tuple(commands), tuple(not_understood[:1]))


class _TextFromHtml(HTMLParser):
    _BLOCK = {"p", "div", "br", "li", "tr", "h1", "h2", "h3", "h4", "blockquote", "table"}

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self._skip = 0
        self._quote = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in ("script", "style", "head"):
            self._skip += 1
        if tag == "blockquote":
            self._quote += 1
        if tag in self._BLOCK:
            self.parts.append("\n")

    def handle_endtag(self, tag: str) -> None:
        if tag in ("script", "style", "head") and self._skip:
            self._skip -= 1
        if tag == "blockquote" and self._quote:
            self._quote -= 1
        if tag in self._BLOCK:
            self.parts.append("\n")

    def handle_data(self, data: str) -> None:
        if self._skip:
            return
        # Quoted replies in HTML are blockquotes: mark them like "> " text.
        self.parts.append(("> " + data) if self._quote else data)


def html_to_text(markup: str) -> str:
    parser = _TextFromHtml()
    try:
        parser.feed(markup)
        parser.close()
    except Exception:  # noqa: BLE001 - broken HTML: fall back to dropping tags
        return html.unescape(re.sub(r"<[^>]*>", " ", markup))
    return "".join(parser.parts)


def _decode_part(part: Message) -> str:
    payload = part.get_payload(decode=True)
    if not isinstance(payload, bytes):
        return ""
    charset = part.get_content_charset() or "utf-8"
    try:
        return payload.decode(charset, "replace")
    except LookupError:
        return payload.decode("utf-8", "replace")


def first_text(raw: bytes) -> str:
    """The first text/plain part (not an attachment), else the first HTML part as text."""
    try:
        msg = BytesParser(policy=policy.compat32).parsebytes(raw)
        html_part: Message | None = None
        for part in msg.walk():
            if part.is_multipart():
                continue
            disposition = str(part.get("Content-Disposition", "")).lower()
            if disposition.startswith("attachment"):
                continue
            ctype = part.get_content_type()
            if ctype == "text/plain":
                return _decode_part(part)
            if ctype == "text/html" and html_part is None:
                html_part = part
        if html_part is not None:
            return html_to_text(_decode_part(html_part))
    except Exception:  # noqa: BLE001 - broken MIME: read nothing rather than crash
        return ""
    return ""


def parse_message(raw: bytes, subject: str) -> ParsedCommands:
    return parse_commands(subject, first_text(raw))
