"""DMARC policy discovery (RFC 7489 §6.6.3) and organizational domains (§3.2): the one implementation.

Both users ask through here: ``auth.verify_inbound`` (DMARC of a post as it arrives) and the
``dmarc_mitigation = when_strict`` rewrite of From in ``fanout`` (``is_strict``).  DNS is a plain
``async name -> list of TXT strings`` (``Resolver.txt``), so tests pass an in-memory resolver.

* ``organizational_domain`` comes from the Public Suffix List as bundled by the
  ``publicsuffixlist`` package (nothing is downloaded at run time).  The whole list is used,
  private section included, as DMARC receivers do: ``krakow.pl`` is listed there (".pl domains
  (grandfathered)"), so ``um.krakow.pl`` and ``mopr.krakow.pl`` are two organizations, not one.
* ``discover`` follows §6.6.3 step by step: the records at ``_dmarc.<From domain>`` that start
  with ``v=DMARC1``; only if there are none, those at ``_dmarc.<organizational domain>``; exactly
  one must remain, or no policy applies (two records are as good as none).  A record found at
  the organizational domain gives its ``sp=`` (else ``p=``) to the subdomain.
"""

from __future__ import annotations

import functools
import logging
import re
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Final

if TYPE_CHECKING:
    from publicsuffixlist import PublicSuffixList

__all__ = ["DmarcPolicy", "TxtResolver", "discover", "is_strict", "organizational_domain", "parse_record"]

log = logging.getLogger("listserv.dmarc")

TxtResolver = Callable[[str], Awaitable[list[str]]]

POLICIES: Final = ("none", "quarantine", "reject")
# §6.4: "v" is the first tag and its value is exactly "DMARC1".
_VERSION: Final = re.compile(r"v[ \t]*=[ \t]*DMARC1[ \t]*(?:;|\Z)")
_URI: Final = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*:[^\s,!]+")


@functools.cache
def _psl() -> PublicSuffixList:
    # Parsing the bundled list takes a few hundred milliseconds: once per process, when first needed.
    from publicsuffixlist import PublicSuffixList

    return PublicSuffixList()


def organizational_domain(domain: str) -> str:
    """§3.2: the registered domain (public suffix plus one label); a public suffix is its own."""
    domain = domain.lower().rstrip(".")
    return _psl().privatesuffix(domain) or domain


@dataclass(frozen=True, slots=True)
class DmarcPolicy:
    """The policy that applies to ``domain`` and the record it came from."""

    domain: str  # the RFC5322.From domain asked about
    policy: str  # none | quarantine | reject
    record_domain: str  # where the record was: ``domain`` or its organizational domain
    tags: Mapping[str, str] = field(default_factory=dict)

    @property
    def inherited(self) -> bool:
        return self.record_domain != self.domain


def _records(answer: list[str]) -> list[str]:
    """§6.6.3 steps 2 and 4: keep only the records that start with the DMARC1 version tag."""
    return [r.strip() for r in answer if _VERSION.match(r.strip())]


def parse_record(record: str) -> dict[str, str]:
    """A record's tags (names in lower case; the first of a repeated tag wins)."""
    tags: dict[str, str] = {}
    for part in record.split(";"):
        key, eq, value = part.partition("=")
        if eq:
            tags.setdefault(key.strip().lower(), value.strip())
    return tags


async def find_records(domain: str, resolve: TxtResolver) -> tuple[str, list[str]]:
    """§6.6.3 steps 1-4: the domain whose records apply, and its DMARC1 records (any number).

    ``discover`` takes the policy from exactly one of them; ``doctor`` tells the
    operator why there is none (no record, or several).
    """
    domain = domain.lower().rstrip(".")
    found = _records(await resolve(f"_dmarc.{domain}"))
    if not found:  # step 3: only an *empty* set sends us to the organizational domain
        org = organizational_domain(domain)
        if org != domain:
            return org, _records(await resolve(f"_dmarc.{org}"))
    return domain, found


async def discover(domain: str, resolve: TxtResolver) -> DmarcPolicy | None:
    """§6.6.3 policy discovery for an RFC5322.From domain; None when no DMARC policy applies.

    DNS failures are raised (``DnsTemporaryError`` from a ``Resolver``): the caller decides what
    a temporary failure means for it.
    """
    domain = domain.lower().rstrip(".")
    where, found = await find_records(domain, resolve)
    if len(found) != 1:  # step 5: "multiple records or no records": no DMARC processing
        return None
    tags = parse_record(found[0])
    policy = tags.get("p", "").lower()
    sub_policy = tags.get("sp", "").lower() if "sp" in tags else policy
    if policy not in POLICIES or sub_policy not in POLICIES:
        # Step 6: a bad p= or sp= counts as p=none if the record asks for reports, else as no record.
        if not any(_URI.fullmatch(u.strip()) for u in tags.get("rua", "").split(",")):
            return None
        policy = sub_policy = "none"
    # §6.3 sp=: "all subdomains of the queried domain"; absent, p= applies to them too.
    applied = sub_policy if where != domain else policy
    return DmarcPolicy(domain, applied, where, tags)


async def is_strict(domain: str, resolve: TxtResolver) -> bool:
    """True if the author's domain asks receivers to quarantine or reject what fails DMARC.

    A lookup failure counts as strict: rewriting From for one post costs little, while a
    rejected copy costs the member the post.
    """
    try:
        found = await discover(domain, resolve)
    except Exception as exc:  # noqa: BLE001 - any resolver failure
        log.warning("DMARC lookup for %s failed (%r); treating it as strict", domain, exc)
        return True
    return found is not None and found.policy in ("quarantine", "reject")
