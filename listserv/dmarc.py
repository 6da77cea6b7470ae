"""Look up an author domain's DMARC policy (RFC 7489 §6.6.3), through an injectable resolver.

Used by ``dmarc_mitigation = when_strict``: the From is rewritten only for
authors whose domain publishes ``p=quarantine`` or ``p=reject``.  The resolver
is a plain async function ``name -> list of TXT strings`` so tests pass a dict
and nothing here touches the network unless the server is given the real one.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

__all__ = ["TxtResolver", "is_strict", "organizational_domain"]

log = logging.getLogger("listserv.dmarc")

TxtResolver = Callable[[str], Awaitable[list[str]]]

# Second-level labels under which registrations happen in the country our
# members write from; without the full Public Suffix List this keeps
# "um.warszawa.pl" -> "warszawa.pl" and "gmina.com.pl" -> "gmina.com.pl".
_TWO_LEVEL_SUFFIXES = {
    "com.pl", "net.pl", "org.pl", "gov.pl", "edu.pl", "info.pl", "biz.pl", "waw.pl", "co.uk", "org.uk",
    "ac.uk", "gov.uk", "com.de",
}


def organizational_domain(domain: str) -> str:
    labels = domain.lower().rstrip(".").split(".")
    if len(labels) >= 3 and ".".join(labels[-2:]) in _TWO_LEVEL_SUFFIXES:
        return ".".join(labels[-3:])
    return ".".join(labels[-2:])


def _policy(records: list[str]) -> str | None:
    for record in records:
        tags = {}
        for part in record.split(";"):
            key, _, value = part.strip().partition("=")
            tags[key.strip().lower()] = value.strip().lower()
        if tags.get("v") == "dmarc1":
            return tags.get("p", "none")
    return None


async def is_strict(domain: str, resolve: TxtResolver) -> bool:
    """True if the domain (or its organizational domain) asks receivers to quarantine or reject.

    A lookup failure counts as strict: rewriting From for one post costs
    little, while a rejected copy costs the member the post.
    """
    try:
        policy = _policy(await resolve(f"_dmarc.{domain}"))
        if policy is None:
            org = organizational_domain(domain)
            if org != domain:
                policy = _policy(await resolve(f"_dmarc.{org}"))
    except Exception as exc:  # noqa: BLE001 - any resolver failure
        log.warning("DMARC lookup for %s failed (%r); treating it as strict", domain, exc)
        return True
    return policy in ("quarantine", "reject")

