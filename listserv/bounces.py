"""Read a bounce: which addresses failed, whether for good, and whose fault it was.

The one entry point, :func:`read_bounce`, turns the raw bytes that arrived at
``LIST-bounces@`` into a :class:`BounceReport`.  It is pure (no I/O, no clock)
and never raises: a bounce reader that crashes on some provider's odd message
would silently stop members from ever being removed.

Reading, most trustworthy first:

1. RFC 3464 delivery status notifications (the ``message/delivery-status``
   part of an RFC 3462 / RFC 6522 ``multipart/report``; also the same fields
   pasted into a text part by MTAs that only half follow the RFC): per
   recipient ``Final-Recipient`` / ``Original-Recipient``, ``Action``,
   ``Status`` and ``Diagnostic-Code``.
2. flufl.bounce (GNU Mailman's detectors), for the non-standard formats of
   qmail, Exim, Postfix without DSN, old Sendmail, Exchange, Yahoo, AOL, ...
3. Our own line patterns over the human-readable text, for what (2) misses
   (Polish and Russian providers, Exchange variants, SMTP transcripts).
4. The VERP address (decoded from the envelope recipient by the caller),
   when the body names nobody.

The *cause* is ours, from the RFC 3463 status code and the diagnostic text.
It exists so that a policy rejection -- DMARC, SPF, spam, reputation, a
blocked sending host: the author's or the post's fault -- is never charged to
the member whose provider refused it.

Not bounces, recognised and reported with kind ``"none"``: RFC 3834
auto-replies (vacation, out of office, "nieobecność"), RFC 5965 ARF feedback
reports, RFC 3464 DSNs that only say "delivered" or "relayed", and anything
else without the marks of a delivery failure.
"""

from __future__ import annotations

import email
import email.header
import email.message
import html
import logging
import re
from collections.abc import Iterable
from dataclasses import dataclass, field

from flufl.bounce import all_failures

__all__ = ["BounceReport", "CAUSES", "KINDS", "read_bounce"]

# flufl.bounce logs (at ERROR) any exception of its detectors before re-raising
# it; we catch and fall back, so that log line is noise on an admin's terminal.
logging.getLogger("flufl.bounce").addHandler(logging.NullHandler())
logging.getLogger("flufl.bounce").propagate = False

KINDS = ("permanent", "temporary", "none")
CAUSES = (
    "mailbox_gone", "mailbox_full", "policy", "host_unknown", "temporary",
    "auto_reply", "feedback_report", "unknown", "not_a_bounce",
)

# Beyond this, a "bounce" is someone's attachment; the report is in the first part.
MAX_BYTES = 4 * 1024 * 1024
MAX_PARTS = 200
DIAGNOSTIC_CHARS = 300


@dataclass(frozen=True, slots=True)
class BounceReport:
    """What one bounce says.  ``kind`` is ``"none"`` for anything that must not be counted."""

    addresses: tuple[str, ...]
    kind: str
    cause: str
    status: str
    diagnostic: str


# -- small helpers --------------------------------------------------------------------

_ADDR = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~.-]+@[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?)+"
# Not preceded by characters that would make it part of a URL or a longer token.
ADDR_RE = re.compile(r"(?<![A-Za-z0-9!#$%&'*+/=?^_`{|}~.@-])(" + _ADDR + r")")
STATUS_RE = re.compile(r"(?<![\d.])([245])\.(\d{1,3})\.(\d{1,3})(?![\d]|\.\d)")
REPLY_RE = re.compile(r"(?<![\d.])([45][0-5]\d)(?=[ -]|$)", re.M)


def _norm_addr(addr: str) -> str:
    addr = addr.strip().strip("<>\"'()[],;:").strip()
    return addr.lower()


def _is_address(addr: str) -> bool:
    return ADDR_RE.fullmatch(addr) is not None and len(addr) <= 254


def _decode_bytes(data: bytes, charset: str | None) -> str:
    """Decode robustly: the declared charset, else UTF-8, else windows-1250.

    windows-1250 as the last resort because undeclared 8-bit text in our mail
    is mostly Polish, and it is a near superset of iso-8859-2's letters.
    """
    if charset:
        try:
            return data.decode(charset.strip().strip('"').lower(), errors="replace")
        except (LookupError, ValueError):
            pass
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return data.decode("windows-1250", errors="replace")


def _unescape(value: str) -> str:
    """Undo the parser's surrogate escapes: raw 8-bit header bytes, decoded as a body would be."""
    if not any("\udc80" <= ch <= "\udcff" for ch in value):
        return value
    return _decode_bytes(value.encode("utf-8", errors="surrogateescape"), None)


def _header(msg: email.message.Message, name: str) -> str:
    """One header, RFC 2047-decoded, never raising."""
    try:
        value = msg.get(name)
        if value is None:
            return ""
        chunks = []
        # compat32 hands back 8-bit raw headers as Header(unknown-8bit): decode those bytes ourselves.
        source = value if isinstance(value, email.header.Header) else _unescape(str(value))
        for text, charset in email.header.decode_header(source):
            chunks.append(_decode_bytes(text, charset) if isinstance(text, bytes) else text)
        return " ".join("".join(chunks).split())
    except Exception:  # malformed encoded-words: fall back to the raw value
        return " ".join(str(msg.get(name, "")).split())


def _header_addresses(msg: email.message.Message, *names: str) -> set[str]:
    found: set[str] = set()
    for name in names:
        for value in msg.get_all(name) or []:
            found.update(_norm_addr(m) for m in ADDR_RE.findall(str(value)))
    return found


def _strip_html(text: str) -> str:
    text = re.sub(r"(?is)<(script|style)\b.*?</\1>", " ", text)
    text = re.sub(r"(?i)<br\s*/?>|</p>|</div>|</tr>|</li>", "\n", text)
    text = re.sub(r"(?s)<[^>]*>", " ", text)
    return html.unescape(text)


# -- walking the MIME tree ------------------------------------------------------------


@dataclass
class _Parts:
    """What the tree walk collects: readable text, DSN field blocks, the returned headers."""

    texts: list[str] = field(default_factory=list)
    dsn_blocks: list[list[tuple[str, str]]] = field(default_factory=list)
    has_dsn_part: bool = False
    feedback_fields: list[tuple[str, str]] = field(default_factory=list)
    has_feedback_part: bool = False
    returned: list[email.message.Message] = field(default_factory=list)


_ORIGINAL_TYPES = {"message/rfc822", "text/rfc822-headers", "message/rfc822-headers",
                   "message/global", "message/global-headers", "message/partial"}


def _walk(msg: email.message.Message, parts: _Parts, depth: int = 0) -> None:
    if depth > 20 or len(parts.texts) > MAX_PARTS:
        return
    ctype = msg.get_content_type()
    if ctype in _ORIGINAL_TYPES:
        # The returned original: its headers may name the recipient (fallback only),
        # but its body must never be read as the report.
        payload = msg.get_payload()
        if isinstance(payload, list) and payload and isinstance(payload[0], email.message.Message):
            parts.returned.append(payload[0])
        elif isinstance(payload, str):
            try:
                parts.returned.append(email.message_from_string(payload.lstrip()))
            except Exception:
                pass
        return
    if ctype in ("message/delivery-status", "message/global-delivery-status"):
        parts.has_dsn_part = True
        parts.dsn_blocks.extend(_status_blocks(msg))
        return
    if ctype == "message/feedback-report":
        parts.has_feedback_part = True
        for block in _status_blocks(msg):
            parts.feedback_fields.extend(block)
        return
    if msg.is_multipart():
        payload = msg.get_payload()
        if isinstance(payload, list):
            for sub in payload:
                if isinstance(sub, email.message.Message):
                    _walk(sub, parts, depth + 1)
        return
    maintype = msg.get_content_maintype()
    if maintype == "text" or (depth == 0 and maintype not in ("image", "audio", "video")):
        text = _part_text(msg)
        if msg.get_content_subtype() == "html":
            text = _strip_html(text)
        parts.texts.append(text)


def _part_text(msg: email.message.Message) -> str:
    payload = msg.get_payload(decode=True)
    if isinstance(payload, bytes):
        text = _decode_bytes(payload, msg.get_content_charset())
    else:
        raw = msg.get_payload()
        text = _unescape(raw) if isinstance(raw, str) else ""
    return text.replace("\r\n", "\n").replace("\r", "\n")


def _status_blocks(msg: email.message.Message) -> list[list[tuple[str, str]]]:
    """The field blocks of a message/delivery-status part (RFC 3464 section 2)."""
    payload = msg.get_payload()
    if isinstance(payload, list):
        blocks = []
        for sub in payload:
            if isinstance(sub, email.message.Message):
                blocks.append([(k.lower(), " ".join(_unescape(str(v)).split())) for k, v in sub.raw_items()])
        return blocks
    text = payload if isinstance(payload, str) else ""
    return [_field_lines(chunk) for chunk in re.split(r"\n\s*\n", text.replace("\r", ""))]


_FIELD_RE = re.compile(r"^([A-Za-z][A-Za-z0-9-]*)[ \t]*:[ \t]*(.*)$")


def _field_lines(text: str) -> list[tuple[str, str]]:
    """``Name: value`` lines with RFC 5322 continuation lines folded in."""
    fields: list[tuple[str, str]] = []
    for line in text.replace("\r", "").split("\n"):
        if line[:1] in (" ", "\t") and fields:
            name, value = fields[-1]
            fields[-1] = (name, value + " " + line.strip())
            continue
        m = _FIELD_RE.match(line.strip())
        if m:
            fields.append((m.group(1).lower(), m.group(2).strip()))
    return fields


# -- RFC 3464 ---------------------------------------------------------------------------


@dataclass
class _Failure:
    address: str
    action: str = ""
    status: str = ""
    diagnostic: str = ""


_DSN_RECIPIENT_FIELDS = ("final-recipient", "original-recipient", "x-actual-recipient")


def _dsn_failures(blocks: Iterable[list[tuple[str, str]]]) -> tuple[list[_Failure], bool]:
    """Per-recipient failures, and whether every recipient reported was a success.

    A recipient block may start with Original-Recipient or Final-Recipient; both
    name the same recipient, so a new block starts only when a name repeats.
    """
    recipients: list[dict[str, str]] = []
    for block in blocks:
        current: dict[str, str] | None = None
        for name, value in block:
            if name in ("final-recipient", "original-recipient") and (
                current is None or name in current
            ):
                current = {}
                recipients.append(current)
            if current is not None and name not in current:
                current[name] = value
    failures = []
    successes = 0
    for fields in recipients:
        action = fields.get("action", "").strip().lower().split(" ")[0] if fields.get("action") else ""
        status_match = STATUS_RE.search(fields.get("status", ""))
        status = ".".join(status_match.groups()) if status_match else ""
        if action in ("delivered", "relayed", "expanded") or status.startswith("2"):
            successes += 1
            continue
        address = ""
        for name in ("final-recipient", "original-recipient", "x-actual-recipient"):
            value = fields.get(name, "")
            # "rfc822; user@example.org"; some MTAs omit the address-type.
            value = value.split(";", 1)[1] if ";" in value else value
            found = ADDR_RE.search(value)
            if found:
                address = _norm_addr(found.group(1))
                break
        if not address:
            continue
        diagnostic = fields.get("diagnostic-code", "")
        diagnostic = diagnostic.split(";", 1)[1].strip() if re.match(r"^\s*[\w-]+\s*;", diagnostic) else diagnostic
        failures.append(_Failure(address, action, status, diagnostic))
    return failures, bool(recipients) and successes == len(recipients)


def _text_dsn_blocks(texts: Iterable[str]) -> list[list[tuple[str, str]]]:
    """DSN fields pasted into a text part ("Final-Recipient: rfc822; ..." in text/plain)."""
    blocks = []
    for text in texts:
        if re.search(r"(?im)^\s*(final|original)-recipient\s*:", text):
            blocks.append(_field_lines(text))
    return blocks


# -- heuristics for everything else -------------------------------------------------------

# Where the text stops describing the failure and starts quoting the original message.
_ORIGINAL_MARKERS = re.compile(
    r"(?im)^[ \t>]*(?:"
    r"-+ ?This is a copy of the message|"
    r"-+ ?Below this line is a copy of the message|"
    r"-+ ?Original message|"
    r"-+ ?Original message follows|"
    r"-+ ?Unsent message follows|"
    r"-+ ?Returned message|"
    r"-+ ?The header of the original message|"
    r"-+ ?Message header follows|"
    r"-+ ?Start of returned message|"
    r"-+ ?Forwarded message|"
    r"Original message headers:|"
    r"\s*The original message was:|"
    r"-+ ?Oryginalna wiadomo|"
    r"Received:[ \t]*from \S+|"
    r"Return-Path: <"
    r")"
)


def _report_text(texts: list[str]) -> str:
    out = []
    for text in texts:
        cut = _ORIGINAL_MARKERS.search(text)
        out.append(text[: cut.start()] if cut else text)
    return "\n\n".join(out)


_FAIL_WORDS = (
    r"user unknown|unknown user|no such user|unknown recipient|recipient unknown|"
    r"does not exist|doesn't exist|not exist|no mailbox|mailbox unavailable|mailbox not found|"
    r"invalid (?:recipient|mailbox|address)|address rejected|recipient rejected|undeliverable|"
    r"could not be delivered|couldn't be delivered|delivery failed|failed|not found|unknown|"
    r"rejected|refused|denied|quota|full|disabled|inactive|suspended|blocked|"
    r"nie istnieje|nieznany|niepoprawny|pełna|przepełniona|nie może|"
    r"не существует|не найден|переполнен"
)
_FAIL_LINE_RE = re.compile(r"(?i)(?:\b[45]\d\d\b|\b[45]\.\d{1,3}\.\d{1,3}\b|" + _FAIL_WORDS + ")")

# "<user@example.org>:" on its own line or before a reason (qmail, Postfix, Yahoo,
# OpenSMTPD without the brackets).
_COLON_ADDR_RE = re.compile(r"(?m)^[ \t]*<?(" + _ADDR + r")>?(?:[ \t]*\([^)\n]*\))?[ \t]*:(?:[ \t]|$)")
# "550 5.1.1 <user@example.org>... User unknown" (Sendmail).
_SENDMAIL_RE = re.compile(r"(?m)^[ \t]*(?:[45]\d\d[ -](?:[45]\.\d+\.\d+[ \t]+)?)?<?(" + _ADDR + r")>?\.\.\.[ \t]")
# "RCPT TO:<user@example.org>" in a transcript (Exim, Sendmail, Exchange).
_RCPT_RE = re.compile(r"(?i)RCPT[ \t]+TO:[ \t]*<?(" + _ADDR + r")")
# "could not be delivered to: <user@example.org>" on one line.
_SAME_LINE_RE = re.compile(
    r"(?i)(?:could not|couldn't|cannot|can't|unable to|failed to|not)[ \t]+(?:be[ \t]+)?deliver(?:ed)?"
    r"[^\n]{0,40}?\bto:?[ \t]+<?(" + _ADDR + r")"
)
# A phrase that announces the list of failed recipients; the next block lists them.
_INTRO_RE = re.compile(
    r"(?im)^.*(?:"
    r"(?:recipients?|addresses?|adresat\w*|adres\w*|destinatari\w*|empfänger)\b[^\n]*"
    r"(?:failed|could not|cannot|can't|couldn't|were not|was not|undeliverable|permanent|fatal|"
    r"unable|not be reached|rejected|nie\b|niemożliw|не)|"
    r"(?:delivery|delivered|deliver)[^\n]*(?:failed|could not|to the following|to these)|"
    r"unable to deliver[^\n]*(?:to|following)|"
    r"following (?:address|recipient)|"
    r"permanent fatal errors|"
    r"nie (?:można|mogła|udało)[^\n]*(?:dostarcz|doręcz)|"
    r"не может быть доставлено|не удалось доставить"
    r")[^\n]*\n"
)


def _intro_block_addresses(text: str) -> list[str]:
    """Addresses in the lines right after an announcing phrase, up to the end of that block."""
    found: list[str] = []
    for intro in _INTRO_RE.finditer(text):
        # The announcing line itself often ends with the address ("... to: x@y").
        tail = intro.group(0)
        lines = text[intro.end():].split("\n")
        block: list[str] = [tail.rsplit(":", 1)[-1]] if ":" in tail else []
        started = False
        for line in lines[:15]:
            if not line.strip():
                if started:
                    break
                continue
            started = True
            block.append(line)
        for line in block:
            if re.search(r"(?i)^\s*(?:from|to|subject|date|message-id|reply-to|sender)\s*:", line):
                continue
            found.extend(_norm_addr(a) for a in ADDR_RE.findall(line))
    return found


def _heuristic_addresses(text: str) -> list[str]:
    for pattern in (_COLON_ADDR_RE, _SENDMAIL_RE, _RCPT_RE, _SAME_LINE_RE):
        hits = [_norm_addr(m) for m in pattern.findall(text)]
        if hits:
            return hits
    hits = _intro_block_addresses(text)
    if hits:
        return hits
    # Last resort: an address on a line that also gives a reply code or a failure word.
    lines = [line for line in text.split("\n") if _FAIL_LINE_RE.search(line)]
    return [_norm_addr(a) for line in lines for a in ADDR_RE.findall(line)]


def _flufl_addresses(msg: email.message.Message) -> tuple[set[str], set[str]]:
    try:
        temporary, permanent = all_failures(msg)
    except Exception:  # a detector tripped over odd MIME: ours still run
        return set(), set()

    def clean(found: Iterable[bytes | str]) -> set[str]:
        out = set()
        for item in found:
            text = item.decode("utf-8", errors="replace") if isinstance(item, bytes) else str(item)
            addr = _norm_addr(text)
            if _is_address(addr):
                out.add(addr)
        return out

    return clean(temporary), clean(permanent)


# -- classification -----------------------------------------------------------------------

_POLICY_STRONG = re.compile(
    r"(?i)\bdmarc\b|\bspf\b|\bdkim\b|\bspam|junk mail|reputation|black ?list|block ?list|"
    r"deny ?list|\bdnsbl\b|\brbl\b|spamhaus|spamcop|barracuda|sorbs|\buribl\b|surbl|"
    r"unauthenticated|not authenticated|authentication (?:failed|required)|"
    r"content (?:rejected|filter)|message content|virus|malware|phishing|"
    r"\bptr\b|reverse dns|rdns|reverse (?:lookup|hostname)|"
    r"5\.7\.\d+|4\.7\.\d+"
)
_POLICY_WEAK = re.compile(
    r"(?i)\bblocked\b|\bpolicy\b|policies|not allowed|prohibited|administratively|"
    r"relay(?:ing)? (?:denied|not permitted|access denied)|not a relay|not permitted to relay|"
    r"rejected for|too many|rate limit|throttl|message (?:too large|size exceeds)|"
    r"exceeds (?:the )?(?:maximum|size)|too big|size limit|filtered|filter|"
    r"odrzucon\w* (?:jako|przez filtr)|uznan\w* za spam|white ?list|requires confirmation|challenge"
)
_FULL = re.compile(
    r"(?i)quota|mailbox (?:is )?full|disc quota|disk quota|mailbox exceeds|exceeds allowed size|mailbox size|over ?quota|storage|insufficient (?:disk )?space|"
    r"mail ?box (?:has )?exceeded|exceeded (?:the )?(?:storage|mailbox)|too much mail|"
    r"skrzynka (?:odbiorcza |pocztowa )?(?:jest )?(?:pełna|przepełniona|zapełniona)|"
    r"przekroczon\w* (?:limit|pojemno)|brak miejsca|переполнен"
)
_HOST = re.compile(
    r"(?i)host (?:or domain name )?not found|host unknown|unknown host|domain (?:name )?not found|"
    r"no such domain|domain (?:does not|doesn't) exist|unrouteable|unroutable|name service error|"
    r"name or service not known|nxdomain|no mx|mx (?:record )?(?:not found|lookup)|"
    r"dns (?:lookup|error)|no route to host|domain (?:is )?not (?:valid|resolv)|"
    r"unknown domain|nieznan\w* domen|domena nie istnieje|"
    r"domain (?:is )?not reachable|no such host|host not found"
)
_GONE = re.compile(
    r"(?i)user unknown|unknown user|no such (?:user|mailbox|recipient|account|address|person)|"
    r"unknown (?:recipient|mailbox|account|local ?part|address)|recipient unknown|"
    r"(?:user|mailbox|account|address|recipient|addressee)[^\n.]{0,40}"
    r"(?:does not|doesn't|did not|no longer) (?:exist|valid)|"
    r"does not exist|doesn't exist|not exist|no longer (?:active|valid|in use|exists)|"
    r"invalid (?:final delivery )?(?:recipient|mailbox|user|userid|address|account)|mailbox (?:unavailable|not found|"
    r"disabled|inactive|is inactive|not available|has been disabled)|"
    r"account (?:is )?(?:disabled|inactive|closed|expired|deactivated|has been disabled|suspended)|"
    r"(?:user|address|recipient) (?:not found|not listed|rejected|invalid|disabled)|"
    r"not a valid (?:user|mailbox|recipient)|no mailbox|bad (?:destination )?mailbox|"
    r"has moved|not our customer|unknown or illegal alias|recipient address rejected|"
    r"(?:doesn't|does not) have an? [\w.-]+ account|not listed in|no valid recipients|"
    r"nie istnieje|nieistniej|nieznany (?:u[żz]ytkownik|adresat|odbiorca)|konto (?:zosta\w+ )?"
    r"(?:zablokowan|usuni|wy[łl][aą]czon)|brak (?:takiego )?(?:u[żz]ytkownika|konta|adresata)|"
    r"не существует|нет такого|пользователь не найден"
)
_SENDER = re.compile(
    r"(?i)sender (?:address )?(?:rejected|refused|denied|verify failed|unknown)|"
    r"(?:domain of )?sender (?:address |domain )?(?:does not|doesn't|must) (?:exist|resolve)|"
    r"unroutable sender|sender (?:domain|address) (?:not found|invalid)|"
    r"\bsender\b[^\n]{0,30}\brejected|mail from[^\n]{0,30}(?:rejected|refused)|"
    r"not have permission|not authori[sz]ed to send"
)
_DELAY = re.compile(
    r"(?i)delayed|delay\b|will (?:be )?retr|still (?:be )?(?:trying|retrying)|not yet been delivered|"
    r"has not been delivered yet|temporar|deferred|try again later|greylist|graylist|"
    r"warning: message|message still undelivered|opóźnion|ponowi|delivery status notification: warning"
)


def _best_status(*candidates: str) -> str:
    """The most specific RFC 3463 code among the candidates: X.1.1 beats X.0.0."""
    best = ""
    for text in candidates:
        for m in STATUS_RE.finditer(text or ""):
            code = ".".join(m.groups())
            if not best or (best.endswith(".0.0") and not code.endswith(".0.0") and code[0] == best[0]):
                best = code
            if best and not best.endswith(".0.0"):
                return best
    return best


def _kind(status: str, action: str, text: str, reply: str) -> str:
    if status[:1] == "5":
        return "permanent"
    if status[:1] == "4":
        # "Action: failed" with a 4.x.x code means the MTA gave up retrying: the
        # condition was transient but the message is lost; the code decides, as RFC 3463
        # classifies failures by the code class.
        return "temporary"
    if action == "delayed":
        return "temporary"
    if action == "failed":
        return "permanent"
    if reply[:1] == "5":
        return "permanent"
    if reply[:1] == "4":
        return "temporary"
    return "temporary" if _DELAY.search(text) else "permanent"


_AFTER_DATA_RE = re.compile(
    r"(?i)in reply to end of data|after end of data|after data\b|after end of message|"
    r"\(data\)|for text command|>>> data\s*\n<<< [45]"
)
_NOISE_RE = re.compile(r"(?i)\b(?:https?|ftp)://\S+|" + _ADDR)


def _cause(kind: str, status: str, diagnostic: str, text: str) -> str:
    """Whose fault, from the RFC 3463 code first and the words second.

    Policy wins every tie: charging a member for a refusal caused by the author or
    the post (the Yahoo-author-at-Gmail DMARC case) is the failure this exists to avoid.
    ``diagnostic`` is the server's own sentence; ``text`` the whole report, read only
    when the diagnostic says nothing we recognise.
    """
    subject, detail = (status.split(".")[1:3] + ["", ""])[:2] if status else ("", "")
    # Words inside addresses and URLs ("filtered@...", ".../reason/#spam") say nothing.
    diagnostic, text = (_NOISE_RE.sub(" ", diagnostic), _NOISE_RE.sub(" ", text))
    # RFC 7505 null MX (5.1.10, and 5.7.27 for the sender side): the domain takes no
    # mail.  Exchange Online reuses 5.1.10 for "RecipientNotFound"; both are dead addresses.
    if (subject, detail) in (("1", "10"), ("7", "27")):
        return "mailbox_gone" if _GONE.search(diagnostic) else "host_unknown"
    # X.1.7 / X.1.8: the *sender's* address was refused (RFC 3463 3.2).
    if subject == "7" or (subject, detail) in (("1", "7"), ("1", "8")):
        return "policy"
    if _POLICY_STRONG.search(diagnostic) or _SENDER.search(diagnostic):
        return "policy"
    if (subject, detail) == ("2", "2"):
        return "mailbox_full"
    if kind == "temporary":
        return "mailbox_full" if _FULL.search(diagnostic) else "temporary"
    if (subject, detail) in (("1", "2"), ("4", "4")):
        return "host_unknown"
    if subject == "1" and detail in ("1", "3", "6"):
        return "mailbox_gone"
    if (_AFTER_DATA_RE.search(diagnostic) or _AFTER_DATA_RE.search(text)) and not _HOST.search(diagnostic):
        # The server took RCPT TO and refused only the content: whatever words it
        # chose ("user unknown" is a favourite of content filters), the mailbox exists.
        return "policy"
    for words in (diagnostic, text):
        if _POLICY_STRONG.search(words) or _SENDER.search(words):
            return "policy"
        if _FULL.search(words):
            return "mailbox_full"
        if _HOST.search(words):
            return "host_unknown"
        if _POLICY_WEAK.search(words):
            return "policy"
        if _GONE.search(words):
            return "mailbox_gone"
    if (subject, detail) in (("1", "0"), ("2", "1")):
        return "mailbox_gone"
    return "unknown"


# -- auto-replies and feedback reports ---------------------------------------------------

_AUTO_SUBJECT = re.compile(
    r"(?i)^[\s\[(]*(?:re:\s*)?(?:auto(?:matic)?[ -]?(?:reply|response|antwort|matische antwort)|autoreply|"
    r"auto:|out of (?:the )?office|vacation|on vacation|away from|abwesenheit|"
    r"nieobecno|autoodpowied|automatyczna odpowied|urlop|absence|réponse automatique|"
    r"отсутств|автоответ)|"
    r"out of (?:the )?office|automatic reply|autoreply|auto-reply|nieobecno|automatyczna odpowied|"
    r"autoodpowied"
)
_BOUNCE_SUBJECT = re.compile(
    r"(?i)undeliver|undelivered|delivery (?:status|failure|failed|has failed|notification|report|problem)|"
    r"returned mail|mail delivery|failure notice|could not (?:be )?deliver|non[- ]?delivery|"
    r"delivery (?:delayed|incomplete)|rejected|bounce|mail system error|not delivered|"
    r"warning: could not|warning: message|delayed|nie dostarczon|niedostarcz|zwrot|не доставлено|недоставлен"
)
_DAEMON_FROM = re.compile(r"(?i)mailer-daemon|postmaster|mail delivery|maildelivery|mail administrator|"
                          r"mail-daemon|daemon@|bounce|mailerdaemon|mdaemon|system administrator")


def _is_auto_reply(msg: email.message.Message, subject: str) -> bool:
    auto = _header(msg, "Auto-Submitted").lower()
    # RFC 3834 section 5: auto-replied marks a reply; DSNs mark themselves the same way,
    # so the caller only asks once no failure was found.
    if auto.startswith("auto-replied") or auto.startswith("auto-notified"):
        return True
    if msg.get("X-Autoreply") or msg.get("X-Autorespond") or msg.get("X-Autoresponse"):
        return True
    if _header(msg, "Precedence").lower() == "auto_reply":
        return True
    if msg.get("X-Mailer") and "vacation" in _header(msg, "X-Mailer").lower():
        return True
    return _AUTO_SUBJECT.search(subject) is not None


def _feedback_report(msg: email.message.Message, parts: _Parts, verp: str | None) -> BounceReport:
    """RFC 5965: the complainant's provider telling us someone pressed "spam"."""
    addresses: list[str] = []
    for name, value in parts.feedback_fields:
        if name in ("original-rcpt-to", "removal-recipient"):
            addresses.extend(_norm_addr(a) for a in ADDR_RE.findall(value))
    if not addresses:
        for returned in parts.returned:
            addresses.extend(sorted(_header_addresses(returned, "To")))
    if not addresses and verp:
        addresses = [verp]
    feedback_type = next((v for n, v in parts.feedback_fields if n == "feedback-type"), "")
    return BounceReport(tuple(dict.fromkeys(addresses)), "none", "feedback_report", "",
                        _clip(f"feedback-type: {feedback_type}" if feedback_type else ""))


def _clip(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= DIAGNOSTIC_CHARS else text[: DIAGNOSTIC_CHARS - 1] + "…"


# -- the reader ---------------------------------------------------------------------------


def _clean_verp(verp_address: str | None) -> str | None:
    if not verp_address:
        return None
    addr = _norm_addr(str(verp_address))
    return addr if _is_address(addr) else None


def classify_reply(code: int, enhanced: str, text: str) -> tuple[str, str]:
    """(kind, cause) of a reply the relay gave at delivery time, by the same rules as DSNs."""
    kind = "permanent" if code >= 500 else "temporary"
    status = enhanced or ("5.0.0" if code >= 500 else "4.0.0")
    return kind, _cause(kind, status, text, text)


def read_bounce(raw: bytes, verp_address: str | None = None) -> BounceReport:
    """Read one message that arrived at a bounce address.  Pure; never raises.

    ``verp_address`` is the recipient decoded from a VERP envelope
    (``LIST-bounces+user=example.org@domain`` -> ``user@example.org``); it is
    reported when the body names no failed address.
    """
    try:
        verp = _clean_verp(verp_address)
    except Exception:
        verp = None
    try:
        return _read(bytes(raw[:MAX_BYTES]), verp)
    except Exception:
        # Unreachable by design; if a message still finds a hole, the envelope
        # (VERP) still says who bounced, and an unknown cause is never charged as "gone".
        if verp:
            return BounceReport((verp,), "permanent", "unknown", "", "")
        return BounceReport((), "none", "not_a_bounce", "", "")


_MSGID_RE = re.compile(r"(?im)^[ \t>]*(?:message-id|in-reply-to|references|x-message-id)[ \t]*:[ \t]*<?(" + _ADDR + r")")


def _read(raw: bytes, verp: str | None) -> BounceReport:
    # Old Mac MTAs end lines with a bare CR; one line end for all keeps every pattern simple.
    raw = raw.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
    msg = email.message_from_bytes(raw)
    subject = _header(msg, "Subject")
    parts = _Parts()
    _walk(msg, parts)

    report_type = str(msg.get_param("report-type", "") or "").lower()
    if parts.has_feedback_part or report_type == "feedback-report":
        return _feedback_report(msg, parts, verp)

    text = _report_text(parts.texts)

    # 1. RFC 3464, as a part or pasted into text.
    failures, only_successes = _dsn_failures(parts.dsn_blocks + _text_dsn_blocks(parts.texts))
    if failures:
        return _from_failures(failures, text)
    if only_successes:
        # A DSN that reports only "delivered"/"relayed"/"expanded" (RFC 3464 2.3.3).
        return BounceReport((), "none", "not_a_bounce", "", "")

    from_header = _header(msg, "From")
    daemon = bool(_DAEMON_FROM.search(from_header) or _BOUNCE_SUBJECT.search(subject))
    if _is_auto_reply(msg, subject) and not daemon and not parts.has_dsn_part:
        return BounceReport((), "none", "auto_reply", "", _clip(subject))
    if not (daemon or parts.has_dsn_part or report_type == "delivery-status"):
        return BounceReport((), "none", "not_a_bounce", "", "")

    # 2. and 3. Non-standard formats.  Never report the reporter itself, nor a
    # Message-ID that happens to look like an address.
    exclude = _header_addresses(msg, "From", "Sender", "Reply-To")
    for returned in [msg, *parts.returned]:
        exclude |= _header_addresses(returned, "Message-ID", "In-Reply-To", "References")
    exclude.update(_norm_addr(m) for m in _MSGID_RE.findall(raw.decode("latin-1")))
    temporary, permanent = _flufl_addresses(msg)
    # flufl.bounce also reads the returned original; keep what the report itself names
    visible = (text + " " + " ".join(str(v) for v in msg.get_all("X-Failed-Recipients") or [])).lower()
    # (AOL names only the local part; flufl adds the domain.)
    found = [a for a in sorted(permanent | temporary) if a not in exclude and a.split("@")[0] in visible]
    if not found:
        heuristic = _heuristic_addresses(text)
        found = [a for a in dict.fromkeys(heuristic) if a not in exclude and _is_address(a)]
    if not found and verp:
        found = [verp]

    diagnostic = _diagnostic(text, found)
    status = _best_status(diagnostic) or _best_status(text)
    reply_match = REPLY_RE.search(diagnostic) or REPLY_RE.search(text)
    reply = reply_match.group(1) if reply_match else ""
    if not found:
        # Bounce-shaped but names nobody: nothing to charge, shown to people as is.
        return BounceReport((), "none", "not_a_bounce", status, _clip(diagnostic))
    action = "delayed" if temporary and not permanent else ""
    kind = _kind(status, action, text + " " + subject, reply)
    cause = _cause(kind, status, diagnostic, text[:4000])
    return BounceReport(tuple(found), kind, cause, status, _clip(diagnostic))


def _from_failures(failures: list[_Failure], text: str) -> BounceReport:
    addresses = tuple(dict.fromkeys(f.address for f in failures))
    # Permanent failures decide the report; a mixed DSN is mostly "failed" + "delayed".
    ordered = sorted(failures, key=lambda f: 0 if f.action == "failed" or f.status[:1] == "5" else 1)
    first = ordered[0]
    diagnostic = first.diagnostic or _diagnostic(text, list(addresses))
    status = _best_status(first.status, first.diagnostic) or _best_status(text)
    if first.status and status[:1] != first.status[:1]:
        status = first.status  # the Status field's class is authoritative (RFC 3464 2.3.4)
    reply_match = REPLY_RE.search(diagnostic)
    kind = _kind(status, first.action, diagnostic + " " + text, reply_match.group(1) if reply_match else "")
    cause = _cause(kind, status, diagnostic, text[:4000])
    return BounceReport(addresses, kind, cause, status, _clip(diagnostic))


def _diagnostic(text: str, addresses: list[str]) -> str:
    """The sentence that says why: a reply code near the failed address, else failure words."""
    lines = [line.strip() for line in text.split("\n") if line.strip()]
    lowered = [line.lower() for line in lines]
    # Exim and qmail put the reason on the lines after the address.
    for index, line in enumerate(lowered):
        if any(addr in line for addr in addresses):
            for nearby in range(index, min(index + 4, len(lines))):
                if STATUS_RE.search(lines[nearby]) or REPLY_RE.search(lines[nearby]) or (
                    nearby > index and _FAIL_LINE_RE.search(lines[nearby])
                ):
                    return _joined(lines, nearby)
    for index, line in enumerate(lines):
        if STATUS_RE.search(line) or REPLY_RE.search(line):
            return _joined(lines, index)
    for index, line in enumerate(lines):
        if _FAIL_LINE_RE.search(line):
            return _joined(lines, index)
    return " ".join(lines[:3])


def _joined(lines: list[str], index: int) -> str:
    # A reason wrapped over two lines ("550-5.1.1 The email account ... / 550 5.1.1 ...")
    # reads whole only when joined.
    return " ".join(lines[index:index + 2]) if len(lines[index]) < 80 else lines[index]
