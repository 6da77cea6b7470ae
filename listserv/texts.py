"""Every mail listserv writes itself, from jinja2 templates in Polish and English.

A template lives at ``templates/mail/<language>/<name>.txt``; its first line is
``Subject: ...`` and the rest, after a blank line, is the body.  ``compose``
renders one and wraps it in correct headers: RFC 2047 subject, UTF-8 body,
``Auto-Submitted`` (RFC 3834 §5: ``auto-replied`` for answers to a request,
``auto-generated`` for notices), ``In-Reply-To``/``References`` to the mail
being answered, and our List-Id so that our own loop rule recognises it.
Signing is the caller's job (every mail is DKIM-signed before it is queued).
"""

from __future__ import annotations

import email.policy
import secrets
from collections.abc import Mapping
from email.message import EmailMessage
from email.utils import formataddr, formatdate, make_msgid
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any

import jinja2

__all__ = ["LANGUAGES", "compose", "render", "templates_dir"]

LANGUAGES = ("pl", "en")


def templates_dir() -> Path:
    """The templates shipped in the wheel, or the top-level folder in a checkout."""
    packaged = Path(str(resources.files("listserv").joinpath("templates")))
    if (packaged / "mail").is_dir():
        return packaged
    return Path(__file__).resolve().parent.parent / "templates"


@lru_cache(maxsize=1)
def _environment() -> jinja2.Environment:
    return jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(templates_dir() / "mail")),
        autoescape=False,  # plain-text mail: nothing is interpreted as markup
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
        undefined=jinja2.StrictUndefined,
    )


def render(name: str, language: str, context: Mapping[str, Any]) -> tuple[str, str]:
    """Render one template; returns (subject, body)."""
    lang = language if language in LANGUAGES else "en"
    text = _environment().get_template(f"{lang}/{name}.txt").render(**context)
    first, _, body = text.partition("\n")
    if not first.startswith("Subject:"):
        raise ValueError(f"template {lang}/{name}.txt must start with a Subject: line")
    return " ".join(first[len("Subject:"):].split())[:200], body.lstrip("\n")


def compose(
    name: str,
    language: str,
    context: Mapping[str, Any],
    *,
    from_name: str,
    from_addr: str,
    to: str | list[str],
    list_id: str,
    domain: str,
    auto: str = "auto-replied",
    in_reply_to: str = "",
    references: str = "",
    attach: bytes | None = None,
    reply_to: str = "",
) -> bytes:
    """One complete message (CRLF line ends), ready to sign and queue."""
    subject, body = render(name, language, context)
    msg = EmailMessage(policy=email.policy.SMTP)
    msg["From"] = formataddr((from_name, from_addr))
    msg["To"] = ", ".join(to) if isinstance(to, list) else to
    if reply_to:
        msg["Reply-To"] = reply_to
    msg["Subject"] = subject
    msg["Date"] = formatdate(localtime=False, usegmt=True)
    msg["Message-ID"] = make_msgid("listserv", domain=domain)
    if in_reply_to:
        msg["In-Reply-To"] = f"<{in_reply_to.strip('<>')}>"
        refs = " ".join(r for r in (references, f"<{in_reply_to.strip('<>')}>") if r)
        msg["References"] = refs[-900:]
    msg["List-Id"] = list_id
    msg["Auto-Submitted"] = auto
    # Tells Microsoft's responders not to answer either (they ignore RFC 3834).
    msg["X-Auto-Response-Suppress"] = "All"
    msg["Precedence"] = "list"
    text = EmailMessage(policy=email.policy.SMTP)
    text.set_content(body, charset="utf-8", cte="quoted-printable")
    if attach is None:
        msg.set_content(body, charset="utf-8", cte="quoted-printable")
        return msg.as_bytes()
    boundary = f"==listserv-{secrets.token_hex(12)}"
    msg["MIME-Version"] = "1.0"
    msg["Content-Type"] = f'multipart/mixed; boundary="{boundary}"'
    head = msg.as_bytes().split(b"\r\n\r\n", 1)[0] + b"\r\n\r\n"
    # The attached post goes along untouched as message/rfc822 (RFC 2046
    # §5.2.1: never base64), spliced in as bytes: re-serialising broken mail
    # could change it.
    original = attach.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
    if not original.endswith(b"\r\n"):
        original += b"\r\n"
    return b"".join((
        head,
        f"--{boundary}\r\n".encode(),
        text.as_bytes(),
        f"\r\n--{boundary}\r\nContent-Type: message/rfc822\r\nContent-Disposition: inline\r\n\r\n".encode(),
        original,
        f"--{boundary}--\r\n".encode(),
    ))
