"""SPF (RFC 7208): is this client allowed to send for the MAIL FROM (or HELO) domain?

``evaluate_spf`` runs ``check_host()`` (§4) over the injected ``dns.Resolver``: every mechanism
(``all include a mx ptr ip4 ip6 exists``), ``redirect=`` and ``exp=``, macros (§7), the limits of
§4.6.4 (10 DNS-querying terms, 10 MX / PTR names each, 2 void lookups).  The record is checked
against the ABNF of §4.6.1/§7.1 *before* anything is evaluated, so a syntax error anywhere is a
``permerror`` (§4.6) whatever comes first.  It agrees with every case of the openspf.org RFC 7208
test suite (tests/test_spf_suite.py).

A DNS failure is ``temperror`` only where the RFC says so: the record lookup (§4.4), an
``include`` whose record lookup failed, the address lookups of ``a``/``mx``/``exists``.  A name
the evaluation never reaches is never asked, so its nameserver being down changes nothing.
"""

from __future__ import annotations

import ipaddress
import re
import time
import urllib.parse
from dataclasses import dataclass
from typing import Final, TypeVar

from listserv.dns import DnsTemporaryError, Lookups, Resolver, reverse_name

__all__ = ["SpfOutcome", "check_spf", "evaluate_spf", "spf_outcome"]

T = TypeVar("T")
IP = ipaddress.IPv4Address | ipaddress.IPv6Address

_LOOKUP_LIMIT: Final = 10  # §4.6.4: DNS-querying terms per check_host(), and names per MX / PTR answer
_VOID_LIMIT: Final = 2  # §4.6.4: lookups answered NXDOMAIN or with no record
_MECHANISMS: Final = frozenset({"all", "include", "a", "mx", "ptr", "ip4", "ip6", "exists"})
_QUALIFIERS: Final = {"+": "pass", "-": "fail", "~": "softfail", "?": "neutral"}
# §7.1: "c", "r" and "t" are allowed only in exp= text.
_DOMAIN_LETTERS: Final = frozenset("slodiphv")
_EXP_LETTERS: Final = _DOMAIN_LETTERS | frozenset("crt")
_LABEL: Final = re.compile(r"[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?\Z")
# §4.6.1: toplabel = ( *alphanum ALPHA *alphanum ) / ( 1*alphanum "-" *( alphanum / "-" ) alphanum )
_TOPLABEL: Final = re.compile(r"(?:[A-Za-z0-9]*[A-Za-z][A-Za-z0-9]*|[A-Za-z0-9]+-[A-Za-z0-9-]*[A-Za-z0-9])\Z")
_MACRO: Final = re.compile(r"%(?:\{([A-Za-z])(\d*)([rR]?)([.\-+,/_=]*)\}|([%_-]))")
_MODIFIER: Final = re.compile(r"([A-Za-z][A-Za-z0-9._-]*)=(.*)\Z", re.S)
_MECHANISM: Final = re.compile(r"([+?~-]?)([A-Za-z][A-Za-z0-9._-]*)(.*)\Z", re.S)
# The optional dual-cidr-length at the end of an a/mx argument; the digits are checked apart.
_CIDR_TAIL: Final = re.compile(r"(?:/(\d+))?(?://(\d+))?\Z")


class _PermError(Exception):
    """The record (or one it leads to) is broken: check_host() says "permerror"."""


@dataclass(frozen=True, slots=True)
class SpfOutcome:
    """What check_host() said: ``result`` is one of §2.6 (none neutral pass fail softfail temperror
    permerror); ``explanation`` the expanded ``exp=`` text of a ``fail`` (§6.2), if there was one."""

    result: str
    domain: str
    scope: str  # "mailfrom" or "helo"
    explanation: str | None = None


@dataclass(frozen=True, slots=True)
class _Term:
    qualifier: str
    mechanism: str
    domain_spec: str | None = None  # a, mx, ptr, include, exists
    network: ipaddress.IPv4Network | ipaddress.IPv6Network | None = None  # ip4, ip6
    v4: int = 32
    v6: int = 128


@dataclass(frozen=True, slots=True)
class _Record:
    terms: tuple[_Term, ...]
    redirect: str | None
    exp: str | None


def _valid_domain(domain: str) -> bool:
    """§4.3: a multi-label name, labels of 1-63 characters (a trailing dot is fine)."""
    labels = domain[:-1].split(".") if domain.endswith(".") else domain.split(".")
    return len(labels) >= 2 and len(domain) <= 253 and all(_LABEL.match(label) for label in labels)


def _check_macro_string(text: str, letters: frozenset[str]) -> None:
    """§7.1 macro-string: printable ASCII; every "%" starts a known macro-expand."""
    pos = 0
    while pos < len(text):
        char = text[pos]
        if not "\x21" <= char <= "\x7e":
            raise _PermError(f"character {char!r} in {text!r}")
        if char != "%":
            pos += 1
            continue
        m = _MACRO.match(text, pos)
        if m is None:
            raise _PermError(f"bad macro in {text!r}")
        if m.group(1) is not None and m.group(1).lower() not in letters:
            raise _PermError(f"macro %{{{m.group(1)}}} is not allowed here")
        pos = m.end()


def _check_domain_spec(spec: str) -> None:
    """§7.1: domain-spec = macro-string domain-end; domain-end = ( "." toplabel [ "." ] ) / macro-expand."""
    if not spec:
        raise _PermError("empty domain-spec")
    _check_macro_string(spec, _DOMAIN_LETTERS)
    if any(m.end() == len(spec) for m in _MACRO.finditer(spec)):
        return  # ends in a macro-expand
    body = spec[:-1] if spec.endswith(".") else spec
    head, dot, top = body.rpartition(".")
    if not dot or not _TOPLABEL.match(top):
        raise _PermError(f"{spec!r} does not end in a valid top label")


def _cidr(digits: str | None, maximum: int, default: int) -> int:
    """ip4-cidr-length / ip6-cidr-length: "0" or no leading zero, within range (§5.6)."""
    if digits is None:
        return default
    if (len(digits) > 1 and digits.startswith("0")) or int(digits) > maximum:
        raise _PermError(f"bad prefix length /{digits}")
    return int(digits)


def _parse_term(term: str) -> _Term:
    m = _MECHANISM.match(term)
    if m is None or m.group(2).lower() not in _MECHANISMS:
        raise _PermError(f"unknown term {term!r}")
    qualifier, name, rest = m.group(1) or "+", m.group(2).lower(), m.group(3)
    if name == "all":
        if rest:
            raise _PermError("all takes no argument")
        return _Term(qualifier, name)
    if name in ("ip4", "ip6"):
        if not rest.startswith(":"):
            raise _PermError(f"{name} needs a network")
        address, slash, digits = rest[1:].partition("/")
        if slash and not digits.isdigit():
            raise _PermError(f"bad {name} prefix in {term!r}")
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            raise _PermError(f"bad {name} address in {term!r}") from None
        if ip.version != (4 if name == "ip4" else 6):
            raise _PermError(f"{term!r} is not an {name} network")
        length = _cidr(digits if slash else None, 32 if name == "ip4" else 128, 32 if name == "ip4" else 128)
        return _Term(qualifier, name, network=ipaddress.ip_network(f"{ip}/{length}", strict=False))
    if name in ("include", "exists"):
        if not rest.startswith(":"):
            raise _PermError(f"{name} needs a domain")
        _check_domain_spec(rest[1:])
        return _Term(qualifier, name, domain_spec=rest[1:])
    # a, mx, ptr: [":" domain-spec], then for a and mx [dual-cidr-length]
    v4 = v6 = None
    if name != "ptr":
        tail = _CIDR_TAIL.search(rest)
        assert tail is not None  # every string ends in a (possibly empty) match
        v4, v6 = tail.group(1), tail.group(2)
        rest = rest[: tail.start()]
    if rest and not rest.startswith(":"):
        raise _PermError(f"bad argument in {term!r}")
    spec = rest[1:] if rest else None
    if spec is not None:
        _check_domain_spec(spec)
    return _Term(qualifier, name, domain_spec=spec, v4=_cidr(v4, 32, 32), v6=_cidr(v6, 128, 128))


def parse_record(record: str) -> _Record:
    """A "v=spf1" record -> its terms and modifiers; _PermError for anything off the ABNF (§4.6.1)."""
    if any(not " " <= c <= "~" for c in record):
        raise _PermError("the record holds characters outside 7-bit printable ASCII (§3.1)")
    terms: list[_Term] = []
    modifiers: dict[str, str] = {}
    for text in record.split(" ")[1:]:
        if not text:
            continue  # 1*SP between terms
        modifier = _MODIFIER.match(text)
        if modifier is None:
            terms.append(_parse_term(text))
            continue
        name, value = modifier.group(1).lower(), modifier.group(2)
        if name in ("redirect", "exp"):
            if name in modifiers:
                raise _PermError(f"two {name}= modifiers (§6)")
            _check_domain_spec(value)
            modifiers[name] = value
        else:
            _check_macro_string(value, _EXP_LETTERS)  # unknown modifiers are ignored, once they parse (§6)
    return _Record(tuple(terms), modifiers.get("redirect"), modifiers.get("exp"))


@dataclass
class _CheckHost:
    """One check_host() evaluation with its shared counters (§4.6.4 counts across include/redirect)."""

    lookups: Resolver
    ip: IP
    sender: str
    helo: str
    # %{i} of an IPv6 client is its nibbles; §7.3 leaves their case open.  We keep the case the
    # address was written in (the RFC's own example is lower case, the suite's CAFE:BABE::1 upper).
    upper_nibbles: bool = False
    dns_terms: int = 0
    void: int = 0

    async def check_host(self, domain: str) -> tuple[str, str | None]:
        """§4: (result, explanation) for ``domain``."""
        if not _valid_domain(domain):
            return "none", None
        try:
            records = await self.lookups.txt(domain)
        except DnsTemporaryError:
            return "temperror", None
        spf = [r for r in records if re.match(r"v=spf1(?: |\Z)", r, re.I)]  # §4.5
        if not spf:
            return "none", None
        if len(spf) > 1:
            return "permerror", None
        try:
            record = parse_record(spf[0])
            return await self._evaluate(record, domain)
        except _PermError:
            return "permerror", None
        except DnsTemporaryError:
            return "temperror", None

    async def _evaluate(self, record: _Record, domain: str) -> tuple[str, str | None]:
        for term in record.terms:
            if await self._matches(term, domain):
                result = _QUALIFIERS[term.qualifier]
                explanation = await self._explain(record.exp, domain) if result == "fail" else None
                return result, explanation
        if record.redirect is not None:
            # §6.1: the redirect target's result (and its exp=, not ours) stands; no record there is permerror.
            self._count()
            target = await self._expand(record.redirect, domain)
            result, explanation = await self.check_host(target)
            return ("permerror", None) if result == "none" else (result, explanation)
        return "neutral", None

    def _count(self) -> None:
        self.dns_terms += 1
        if self.dns_terms > _LOOKUP_LIMIT:
            raise _PermError("more than 10 DNS-querying terms")

    def _voided(self, answer: list[T]) -> list[T]:
        if not answer:
            self.void += 1
            if self.void > _VOID_LIMIT:
                raise _PermError("more than 2 void lookups")
        return answer

    async def _addresses(self, name: str) -> list[str]:
        return await (self.lookups.a(name) if self.ip.version == 4 else self.lookups.aaaa(name))

    def _in(self, addresses: list[str], v4: int, v6: int) -> bool:
        for text in addresses:
            try:
                net = ipaddress.ip_network(f"{text}/{v4 if self.ip.version == 4 else v6}", strict=False)
            except ValueError:
                continue
            if net.version == self.ip.version and self.ip in net:
                return True
        return False

    async def _matches(self, term: _Term, domain: str) -> bool:
        mechanism = term.mechanism
        if mechanism == "all":
            return True
        if term.network is not None:
            return term.network.version == self.ip.version and self.ip in term.network
        self._count()
        target = await self._expand(term.domain_spec, domain) if term.domain_spec is not None else domain
        if mechanism == "include":
            # §5.2: pass matches; fail, softfail, neutral do not; an error or no record is an error.
            result, _ = await self.check_host(target)
            if result == "temperror":
                raise DnsTemporaryError(f"include:{target}: temperror")
            if result in ("permerror", "none"):
                raise _PermError(f"include:{target}: {result}")
            return result == "pass"
        if mechanism == "exists":
            return bool(self._voided(await self.lookups.a(target)))  # §5.7: A, whatever the client's family
        if mechanism == "ptr":
            target = target.lower().rstrip(".")
            return any(n == target or n.endswith("." + target) for n in await self._validated_names())
        if mechanism == "a":
            return self._in(self._voided(await self._addresses(target)), term.v4, term.v6)
        exchanges = [h for _, h in sorted(self._voided(await self.lookups.mx(target))) if h and h != "."]
        if len(exchanges) > _LOOKUP_LIMIT:
            raise _PermError("more than 10 MX names (§4.6.4)")
        for exchange in exchanges:
            if self._in(await self._addresses(exchange), term.v4, term.v6):
                return True
        return False

    async def _validated_names(self) -> list[str]:
        """§5.5: the client's PTR names whose own A/AAAA include the client (lower case, no dot)."""
        try:
            names = await self.lookups.ptr(reverse_name(str(self.ip)))
        except DnsTemporaryError:
            return []  # "If a DNS error occurs while doing the PTR RR lookup, then this mechanism fails to match."
        validated: list[str] = []
        for name in names[:_LOOKUP_LIMIT]:  # §4.6.4: "all records other than the first 10 MUST be ignored"
            try:
                addresses = await self._addresses(name)
            except DnsTemporaryError:
                continue  # §5.5: "that domain name is skipped and the search continues"
            if self._in(addresses, 32, 128):
                validated.append(name.lower().rstrip("."))
        return validated

    async def _explain(self, spec: str | None, domain: str) -> str | None:
        """§6.2: the exp= text, or None whenever anything about it is wrong (then no exp= was given)."""
        if spec is None:
            return None
        try:
            records = await self.lookups.txt(await self._expand(spec, domain))
            if len(records) != 1:
                return None
            _check_macro_string(records[0].replace(" ", "!"), _EXP_LETTERS)  # spaces are literal here
            text = await self._expand(records[0], domain, explanation=True)
        except (DnsTemporaryError, _PermError):
            return None
        return text if text.isascii() else None

    async def _p_value(self, domain: str) -> str:
        """§7.3 %{p}: the validated name that is <domain>, else one under it, else any, else "unknown"."""
        names = await self._validated_names()
        domain = domain.lower().rstrip(".")
        for pick in (lambda n: n == domain, lambda n: n.endswith("." + domain), lambda n: True):
            for name in names:
                if pick(name):
                    return name
        return "unknown"

    async def _expand(self, spec: str, domain: str, *, explanation: bool = False) -> str:
        """A checked macro-string expanded (§7.3); a domain for a query is truncated to 253 characters."""
        p_value = await self._p_value(domain) if re.search(r"%\{[pP]", spec) else "unknown"
        text = self._macros(spec, domain, p_value)
        return text if explanation else _truncate(text)

    def _macros(self, spec: str, domain: str, p_value: str) -> str:
        """§7.3 macro expansion of an already checked macro-string."""
        local, _, sender_domain = self.sender.rpartition("@")
        if self.ip.version == 4:
            ip_text, version, readable = str(self.ip), "in-addr", str(self.ip)
        else:
            nibbles = self.ip.exploded.replace(":", "")
            ip_text, version, readable = ".".join(nibbles.upper() if self.upper_nibbles else nibbles), "ip6", str(self.ip)
        values = {
            "s": self.sender, "l": local, "o": sender_domain, "d": domain, "i": ip_text, "p": p_value,
            "v": version, "h": self.helo, "c": readable, "r": "unknown", "t": str(int(time.time())),
        }

        def one(m: re.Match[str]) -> str:
            if m.group(5) is not None:
                return {"%": "%", "_": " ", "-": "%20"}[m.group(5)]
            letter = m.group(1)
            parts = re.split("[" + re.escape(m.group(4) or ".") + "]", values[letter.lower()])
            if m.group(3):
                parts.reverse()
            if m.group(2):
                keep = int(m.group(2))
                if keep == 0:
                    raise _PermError("a macro that keeps zero labels (§7.3)")
                parts = parts[-keep:]
            text = ".".join(parts)
            # §7.3: an upper-case macro letter is URL-escaped (everything outside "unreserved").
            return urllib.parse.quote(text, safe="-._~") if letter.isupper() else text

        return _MACRO.sub(one, spec)


def _truncate(name: str) -> str:
    """§4.8 / §7.3: a name over 253 characters loses labels from the left until it fits."""
    name = name.rstrip(".")
    while len(name) > 253 and "." in name:
        name = name.partition(".")[2]
    return name


async def spf_outcome(client_ip: str, mail_from: str, helo: str, lookups: Resolver) -> SpfOutcome:
    """``evaluate_spf`` over lookups the caller owns (verify_inbound shares them with DKIM and DMARC)."""
    mail_from = mail_from.strip().strip("<>")
    helo = helo.strip()
    if mail_from and "@" in mail_from:
        local, _, domain = mail_from.rpartition("@")
        # §4.3: an empty local-part is "postmaster".
        sender, scope = f"{local or 'postmaster'}@{domain}", "mailfrom"
    else:
        domain, scope = helo, "helo"
        sender = f"postmaster@{helo}"
    domain = domain.rstrip(".").lower()
    if not client_ip:
        return SpfOutcome("none", domain, scope)
    try:
        ip: IP = ipaddress.ip_address(client_ip.strip().strip("[]"))
    except ValueError:
        return SpfOutcome("none", domain, scope)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped  # ::ffff:192.0.2.1 is an IPv4 client (§5: "ip4" and "a" match it)
    check = _CheckHost(lookups, ip, sender, helo, upper_nibbles=any(c in "ABCDEF" for c in client_ip))
    result, explanation = await check.check_host(domain)
    return SpfOutcome(result, domain, scope, explanation)


async def evaluate_spf(
    client_ip: str, mail_from: str, helo: str, resolver: Resolver, *, timeout: float = 5.0
) -> SpfOutcome:
    """SPF for the MAIL FROM identity, or for HELO when the sender is null (RFC 7208 §2.4).

    Without a usable client address (none given, or a trusted relay's Received field could not
    be read) the result is "none".  Each DNS query is bounded by ``timeout``.
    """
    return await spf_outcome(client_ip, mail_from, helo, Lookups(resolver, timeout))


async def check_spf(
    client_ip: str, mail_from: str, helo: str, resolver: Resolver, *, timeout: float = 5.0
) -> tuple[str, str, str]:
    """``evaluate_spf`` as ``(result, domain checked, "mailfrom" | "helo")``."""
    outcome = await evaluate_spf(client_ip, mail_from, helo, resolver, timeout=timeout)
    return outcome.result, outcome.domain, outcome.scope
