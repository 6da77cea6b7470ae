"""Decide what happens to a post: the posting policy as a table of pure rules.

Each rule looks at the frozen ``Post`` and the list's settings and returns a
verdict or ``None`` (no opinion).  ``decide`` walks ``RULES`` top to bottom and
the first verdict wins; the last rule always accepts.  Rules do no I/O, so the
policy runs at the end of DATA, before the SMTP reply: a rejection is a 5xx to
the client, never a mail sent afterwards (no backscatter to forged senders).
``explain`` runs every rule and reports each one's verdict, for people.
"""

from __future__ import annotations

from collections.abc import Callable

from listserv.message import Post
from listserv.settings import ListSettings
from listserv.types import Accept, Discard, Hold, Reject, Reply, Verdict

__all__ = ["RULES", "Rule", "decide", "explain"]

Rule = Callable[[Post, ListSettings], Verdict | None]


def loop(post: Post, settings: ListSettings) -> Verdict | None:
    # RFC 2919 §6: a list must not re-distribute its own traffic.
    if post.list_label in post.message.list_ids:
        return Discard("loop: the post already carries this list's List-Id")
    return None


def automatic(post: Post, settings: ListSettings) -> Verdict | None:
    # A null reverse-path marks a bounce or other notification (RFC 5321
    # §4.5.5); Auto-Submitted other than "no" marks machine mail (RFC 3834 §5).
    if not post.mail_from:
        return Discard("empty envelope sender (a bounce or notification)")
    if post.message.auto_submitted and post.message.auto_submitted.split(";")[0].strip() != "no":
        return Discard(f"automatic mail (Auto-Submitted: {post.message.auto_submitted})")
    return None


def banned(post: Post, settings: ListSettings) -> Verdict | None:
    if post.banned:
        return Reject(Reply(550, "5.7.1", f"<{post.sender}> may not post to {post.list_name}"))
    return None


def forged_sender(post: Post, settings: ListSettings) -> Verdict | None:
    # RFC 7489 §6.6: the From domain asks receivers to quarantine or reject
    # mail that fails DMARC, and this post definitely fails.  A DNS failure
    # leaves it unverified (auth.forged is False): never held for that alone.
    if settings.sender_authentication == "off" or post.auth is None or not post.auth.forged:
        return None
    why = f"possibly forged: DMARC fails for {post.auth.from_domain} (p={post.auth.dmarc_policy})"
    if settings.sender_authentication == "reject":
        return Reject(Reply(550, "5.7.1", f"Message rejected: {why}"))
    if post.membership is not None or post.always_accept:
        return Hold(why)
    return None  # a non-member is held anyway, for being one


def emergency(post: Post, settings: ListSettings) -> Verdict | None:
    if settings.emergency_moderation:
        return Hold("emergency moderation is on for this list")
    return None


def poster_allowed(post: Post, settings: ListSettings) -> Verdict | None:
    if post.always_accept and post.membership is None and settings.posting_policy != "announce":
        return None  # a non-member a moderator chose to always accept
    if settings.posting_policy == "announce":
        if post.membership is None or post.membership.role not in ("owner", "moderator"):
            return Hold("announce-only list: only owners and moderators post")
    elif settings.posting_policy == "members" and post.membership is None:
        return Hold(f"not a member: {post.sender or '(no sender address)'}")
    return None


def moderated_member(post: Post, settings: ListSettings) -> Verdict | None:
    if post.membership is not None and post.membership.moderated:
        return Hold("the member is moderated")
    return None


def too_many_recipients(post: Post, settings: ListSettings) -> Verdict | None:
    count = post.message.header_recipient_count
    if count > settings.max_recipients_in_header:
        return Hold(f"too many recipients in To/Cc ({count} > {settings.max_recipients_in_header})")
    return None


def no_subject(post: Post, settings: ListSettings) -> Verdict | None:
    if not post.message.subject.strip():
        return Hold("no subject")
    return None


def held_attachment(post: Post, settings: ListSettings) -> Verdict | None:
    for ctype in post.message.attachment_types:
        if settings.attachments.action_for(ctype) == "hold":
            return Hold(f"attachment type {ctype} needs a moderator")
    return None


def accept(post: Post, settings: ListSettings) -> Verdict | None:
    if post.membership is not None:
        return Accept(f"{post.membership.role} post")
    return Accept(f"{settings.posting_policy} list")


RULES: tuple[Rule, ...] = (
    loop,
    automatic,
    banned,
    forged_sender,
    emergency,
    poster_allowed,
    moderated_member,
    too_many_recipients,
    no_subject,
    held_attachment,
    accept,
)


def decide(post: Post, settings: ListSettings, rules: tuple[Rule, ...] = RULES) -> Verdict:
    """Run the rules in order; the first verdict wins."""
    for rule in rules:
        verdict = rule(post, settings)
        if verdict is not None:
            return verdict
    raise AssertionError("the last rule always decides")  # pragma: no cover


def explain(post: Post, settings: ListSettings) -> list[tuple[str, Verdict | None]]:
    """Every rule's verdict, in order (for ``listserv explain``)."""
    return [(rule.__name__, rule(post, settings)) for rule in RULES]
