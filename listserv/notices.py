"""The few mails listserv writes itself: held-post notices and rejection notices.

Texts exist in Polish and English (the list's ``language``).  Each notice is
marked as automatic (RFC 3834 §5: ``Auto-Submitted: auto-replied`` or
``auto-generated``) so that well-behaved responders do not answer it, and
carries the list's List-Id so our own loop rule recognises it.
"""

from __future__ import annotations

import email.policy
import secrets
from email.message import EmailMessage
from email.utils import formataddr, formatdate, make_msgid

__all__ = ["held_notice", "rejection_notice"]

TEXTS = {
    "pl": {
        "held_subject": "[{name}] Wiadomość czeka na moderację: {subject}",
        "held_body": (
            "Wiadomość wysłana na listę {name} czeka na decyzję moderatora.\n\n"
            "  Nadawca: {sender}\n  Temat:   {subject}\n  Powód:   {reason}\n  Numer:   {id}\n\n"
            "Aby ją zatwierdzić, odrzucić lub usunąć, administrator wydaje polecenie:\n"
            "  listserv held approve {id}\n  listserv held reject {id} --reason \"...\"\n"
            "  listserv held discard {id}\n\nWiadomość jest dołączona poniżej.\n"
        ),
        "reject_subject": "Wiadomość nie została opublikowana na liście {name}: {subject}",
        "reject_body": (
            "Dzień dobry,\n\nTwoja wiadomość do listy {name} ({title}) nie została opublikowana "
            "przez moderatora.\n\n  Temat: {subject}\n  Powód: {reason}\n\n"
            "W razie pytań napisz do właścicieli listy: {owner}\n"
        ),
        "no_reason": "(moderator nie podał powodu)",
    },
    "en": {
        "held_subject": "[{name}] Post awaits moderation: {subject}",
        "held_body": (
            "A post to the list {name} is waiting for a moderator.\n\n"
            "  From:    {sender}\n  Subject: {subject}\n  Reason:  {reason}\n  Id:      {id}\n\n"
            "To approve, reject or discard it, the administrator runs:\n"
            "  listserv held approve {id}\n  listserv held reject {id} --reason \"...\"\n"
            "  listserv held discard {id}\n\nThe post is attached below.\n"
        ),
        "reject_subject": "Your post to {name} was not published: {subject}",
        "reject_body": (
            "Hello,\n\nyour post to the list {name} ({title}) was not published by the moderator.\n\n"
            "  Subject: {subject}\n  Reason:  {reason}\n\n"
            "If you have questions, write to the list owners: {owner}\n"
        ),
        "no_reason": "(no reason given)",
    },
}


def _base(list_name: str, domain: str, title: str, to: list[str] | str, subject: str, auto: str) -> EmailMessage:
    msg = EmailMessage(policy=email.policy.SMTP)
    msg["From"] = formataddr((title or list_name, f"{list_name}-owner@{domain}"))
    msg["To"] = ", ".join(to) if isinstance(to, list) else to
    msg["Subject"] = subject
    msg["Date"] = formatdate(localtime=False, usegmt=True)
    msg["Message-ID"] = make_msgid("listserv", domain=domain)
    msg["List-Id"] = f"<{list_name}.{domain}>"
    msg["Auto-Submitted"] = auto
    msg["Precedence"] = "list"
    return msg


def held_notice(
    *, list_name: str, domain: str, title: str, language: str, staff: list[str], held_id: int,
    sender: str, subject: str, reason: str, original: bytes,
) -> bytes:
    t = TEXTS.get(language, TEXTS["en"])
    fields = {"name": list_name, "sender": sender or "(none)", "subject": subject or "-", "reason": reason,
              "id": held_id}
    msg = _base(list_name, domain, title, staff, t["held_subject"].format(**fields)[:200], "auto-generated")
    text = EmailMessage(policy=email.policy.SMTP)
    text.set_content(t["held_body"].format(**fields))
    boundary = f"==listserv-held-{secrets.token_hex(12)}"
    msg["MIME-Version"] = "1.0"
    msg["Content-Type"] = f'multipart/mixed; boundary="{boundary}"'
    # The post goes along untouched as message/rfc822 (RFC 2046 §5.2.1: no
    # base64 for it), so a phone's mail program shows it as it was sent.  It
    # is spliced in as bytes: re-serialising broken mail could change it.
    original = original.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
    if not original.endswith(b"\r\n"):
        original += b"\r\n"
    head = msg.as_bytes().split(b"\r\n\r\n", 1)[0] + b"\r\n\r\n"
    return b"".join((
        head,
        f"--{boundary}\r\n".encode(),
        text.as_bytes(),
        f"\r\n--{boundary}\r\nContent-Type: message/rfc822\r\nContent-Disposition: inline\r\n\r\n".encode(),
        original,
        f"--{boundary}--\r\n".encode(),
    ))


def rejection_notice(
    *, list_name: str, domain: str, title: str, language: str, to: str, subject: str, reason: str,
    in_reply_to: str,
) -> bytes:
    t = TEXTS.get(language, TEXTS["en"])
    fields = {"name": list_name, "title": title or list_name, "subject": subject or "-",
              "reason": reason or t["no_reason"], "owner": f"{list_name}-owner@{domain}"}
    msg = _base(list_name, domain, title, to, t["reject_subject"].format(**fields)[:200], "auto-replied")
    if in_reply_to:
        msg["In-Reply-To"] = f"<{in_reply_to}>"
        msg["References"] = f"<{in_reply_to}>"
    msg.set_content(t["reject_body"].format(**fields))
    return msg.as_bytes()
