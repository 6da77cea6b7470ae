"""The one seam through which listserv asks DNS anything: TXT, A, AAAA, MX and PTR lookups.

``Resolver`` is a small Protocol.  ``DnspythonResolver`` is the real one
(config ``[dns] nameservers`` and a per-query timeout); ``DictResolver`` is the
in-memory one tests pass.  Both keep the same contract, which is what makes a
DNS failure an *unverified* post and never a forged one:

* a name that does not exist, or has no records of that type, gives ``[]``;
* a timeout, SERVFAIL, refused query or any other failure to get an answer
  raises ``DnsTemporaryError``.

``dmarc.TxtResolver`` (a bare ``async name -> list[str]``) is still accepted
where only TXT is needed: pass ``resolver.txt``.
"""

from __future__ import annotations

import asyncio
import ipaddress
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from typing import Any, Protocol, TypeVar

from listserv.errors import ListservError

__all__ = [
    "DictResolver", "DnsTemporaryError", "DnspythonResolver", "Lookups", "Resolver", "parse_nameserver", "reverse_name",
]

T = TypeVar("T")


class DnsTemporaryError(ListservError):
    """No answer could be had (timeout, SERVFAIL, refused): try again later; never proof of anything."""


class Resolver(Protocol):
    async def txt(self, name: str) -> list[str]:
        """Each TXT record's strings concatenated (RFC 7208 §3.3, RFC 6376 §3.6.2.2)."""
        ...

    async def a(self, name: str) -> list[str]:
        ...

    async def aaaa(self, name: str) -> list[str]:
        ...

    async def mx(self, name: str) -> list[tuple[int, str]]:
        """(preference, exchange) pairs; exchange without the trailing dot."""
        ...

    async def ptr(self, name: str) -> list[str]:
        """The names a reverse-lookup name (``4.3.2.1.in-addr.arpa``, ``….ip6.arpa``) points to, without
        the trailing dot (SPF ``ptr`` and ``%{p}``, RFC 7208 §5.5)."""
        ...


def reverse_name(address: str) -> str:
    """``192.0.2.1`` -> ``1.2.0.192.in-addr.arpa``; IPv6 nibble by nibble under ``ip6.arpa`` (RFC 3596 §2.5)."""
    return ipaddress.ip_address(address).reverse_pointer


class Lookups:
    """Memoized, time-bounded queries for one verification; failures become DnsTemporaryError.

    A ``Resolver`` itself, so SPF, DKIM, DMARC and ARC of one post share its answers (a
    municipality's domain is asked once, not four times).
    """

    def __init__(self, resolver: Resolver, timeout: float) -> None:
        self.resolver = resolver
        self.timeout = timeout
        self._cache: dict[tuple[str, str], asyncio.Future[Any]] = {}

    async def _get(self, kind: str, name: str, query: Callable[[str], Awaitable[T]]) -> T:
        key = (kind, name.lower().rstrip("."))
        fut = self._cache.get(key)
        if fut is None:
            fut = self._cache[key] = asyncio.ensure_future(self._run(query, key[1]))
        # shield: one caller timing out must not cancel the query for the others.
        answer: T = await asyncio.shield(fut)
        return answer

    async def _run(self, query: Callable[[str], Awaitable[T]], name: str) -> T:
        try:
            return await asyncio.wait_for(query(name), self.timeout)
        except DnsTemporaryError:
            raise
        except asyncio.TimeoutError:
            raise DnsTemporaryError(f"{name}: no answer in {self.timeout:g}s") from None
        except Exception as exc:  # noqa: BLE001 - a broken resolver is a DNS failure, not a verdict
            raise DnsTemporaryError(f"{name}: {exc!r}") from exc

    async def txt(self, name: str) -> list[str]:
        return await self._get("TXT", name, self.resolver.txt)

    async def a(self, name: str) -> list[str]:
        return await self._get("A", name, self.resolver.a)

    async def aaaa(self, name: str) -> list[str]:
        return await self._get("AAAA", name, self.resolver.aaaa)

    async def mx(self, name: str) -> list[tuple[int, str]]:
        return await self._get("MX", name, self.resolver.mx)

    async def ptr(self, name: str) -> list[str]:
        return await self._get("PTR", name, self.resolver.ptr)

    async def txt_map(self, names: set[str]) -> dict[str, list[str] | DnsTemporaryError]:
        """Fetch all ``names`` at once; a failed one maps to its error."""
        ordered = sorted(names)
        answers = await asyncio.gather(*(self.txt(n) for n in ordered), return_exceptions=True)
        out: dict[str, list[str] | DnsTemporaryError] = {}
        for name, answer in zip(ordered, answers, strict=True):
            if isinstance(answer, DnsTemporaryError):
                out[name] = answer
            elif isinstance(answer, BaseException):
                raise answer
            else:
                out[name] = answer
        return out

    def cancel(self) -> None:
        for fut in self._cache.values():
            fut.cancel()


def _key(name: str) -> str:
    return name.lower().rstrip(".")


class DictResolver:
    """An in-memory resolver for tests: names are matched without case or trailing dot.

    ``fail`` names raise ``DnsTemporaryError`` for every type (a dead
    nameserver); a ``(type, name)`` pair in ``fail`` only for that type (a
    server that answers TXT but times out on A).  ``queries`` records
    ``(type, name)`` in order, so a test can assert what was (not) asked.
    """

    def __init__(
        self,
        txt: Mapping[str, Sequence[str]] | None = None,
        *,
        a: Mapping[str, Sequence[str]] | None = None,
        aaaa: Mapping[str, Sequence[str]] | None = None,
        mx: Mapping[str, Sequence[tuple[int, str]]] | None = None,
        ptr: Mapping[str, Sequence[str]] | None = None,
        fail: Iterable[str | tuple[str, str]] = (),
    ) -> None:
        self._txt = {_key(k): list(v) for k, v in (txt or {}).items()}
        self._a = {_key(k): list(v) for k, v in (a or {}).items()}
        self._aaaa = {_key(k): list(v) for k, v in (aaaa or {}).items()}
        self._mx = {_key(k): [(p, _key(h)) for p, h in v] for k, v in (mx or {}).items()}
        self._ptr = {_key(k): [_key(n) for n in v] for k, v in (ptr or {}).items()}
        self.fail = {_key(n) for n in fail if isinstance(n, str)}
        self.fail_types = {(t.upper(), _key(n)) for t, n in (f for f in fail if not isinstance(f, str))}
        self.queries: list[tuple[str, str]] = []

    def _check(self, kind: str, name: str) -> str:
        key = _key(name)
        self.queries.append((kind, key))
        if key in self.fail or (kind, key) in self.fail_types:
            raise DnsTemporaryError(f"{kind} {key}: timed out (test)")
        return key

    async def txt(self, name: str) -> list[str]:
        return list(self._txt.get(self._check("TXT", name), []))

    async def a(self, name: str) -> list[str]:
        return list(self._a.get(self._check("A", name), []))

    async def aaaa(self, name: str) -> list[str]:
        return list(self._aaaa.get(self._check("AAAA", name), []))

    async def mx(self, name: str) -> list[tuple[int, str]]:
        return list(self._mx.get(self._check("MX", name), []))

    async def ptr(self, name: str) -> list[str]:
        return list(self._ptr.get(self._check("PTR", name), []))


def parse_nameserver(text: str) -> tuple[str, int]:
    """``"127.0.0.1"``, ``"127.0.0.1:5353"``, ``"::1"`` or ``"[::1]:5353"`` -> (address, port)."""
    text = text.strip()
    host, port = text, 53
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        if rest:
            if not rest.startswith(":"):
                raise ValueError(f"bad nameserver {text!r}")
            port = int(rest[1:])
    elif text.count(":") == 1:
        host, _, p = text.partition(":")
        port = int(p)
    ipaddress.ip_address(host)  # ValueError for a name: resolvers are given by address
    if not 0 < port < 65536:
        raise ValueError(f"bad nameserver port in {text!r}")
    return host, port


class DnspythonResolver:
    """The real resolver, on dnspython's asyncio resolver.

    Without ``nameservers`` the system's (``/etc/resolv.conf``) are used.
    ``timeout`` bounds each query as a whole, retries included.
    """

    def __init__(self, nameservers: Sequence[str] = (), *, timeout: float = 5.0) -> None:
        import dns.asyncresolver

        self.timeout = timeout
        self._resolver = dns.asyncresolver.Resolver(configure=not nameservers)
        if nameservers:
            servers = [parse_nameserver(n) for n in nameservers]
            self._resolver.nameservers = [h for h, _ in servers]
            # dnspython keeps one port for all servers unless told per server.
            self._resolver.nameserver_ports = {h: p for h, p in servers}
            self._resolver.port = servers[0][1]
        self._resolver.lifetime = timeout
        # Posts from one municipality ask the same questions again and again;
        # answers are kept for their TTL (NXDOMAIN included).
        import dns.resolver

        self._resolver.cache = dns.resolver.LRUCache(10000)
        self._resolver.timeout = min(timeout, 2.0)

    async def _query(self, name: str, rdtype: str) -> list[object]:
        import dns.exception
        import dns.resolver

        try:
            answer = await self._resolver.resolve(name, rdtype, search=False)
        except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer, dns.resolver.YXDOMAIN):
            return []
        except (dns.exception.DNSException, OSError, asyncio.TimeoutError) as exc:
            # Timeout, NoNameservers (SERVFAIL/REFUSED everywhere), network errors.
            raise DnsTemporaryError(f"{rdtype} {name}: {exc.__class__.__name__}: {exc}") from exc
        return list(answer)

    async def txt(self, name: str) -> list[str]:
        records = await self._query(name, "TXT")
        return [b"".join(r.strings).decode("utf-8", "replace") for r in records]  # type: ignore[attr-defined]

    async def a(self, name: str) -> list[str]:
        return [r.address for r in await self._query(name, "A")]  # type: ignore[attr-defined]

    async def aaaa(self, name: str) -> list[str]:
        return [r.address for r in await self._query(name, "AAAA")]  # type: ignore[attr-defined]

    async def mx(self, name: str) -> list[tuple[int, str]]:
        records = await self._query(name, "MX")
        return [
            (int(r.preference), r.exchange.to_text(omit_final_dot=True).lower())  # type: ignore[attr-defined]
            for r in records
        ]

    async def ptr(self, name: str) -> list[str]:
        return [r.target.to_text(omit_final_dot=True) for r in await self._query(name, "PTR")]  # type: ignore[attr-defined]
