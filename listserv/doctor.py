"""Check, for the list domain, what a receiving MTA will check: ``listserv doctor``.

``run_checks(config, resolver)`` returns one ``Check`` per question, in this
order: the config (DKIM keys, state directory, file modes, delivery mode, the public
URLs), then DNS as a receiver sees it, through the same ``Resolver`` seam the
server uses: each DKIM key record (RFC 6376 §3.6.1, RFC 8463 §4), SPF for the
envelope sender ``LIST-bounces@domain`` from the address our copies leave
from (RFC 7208), DMARC at ``_dmarc.domain`` (RFC 7489), and MX (RFC 5321
§5.1); last, each stage's errors of the last day from the state database
(opened only if it exists).  A failing check carries the record to publish.
Nothing here prints, writes (beyond probing that the state directory is
writable, and the schema migration of an older database on opening it) or
exits; the CLI does that.

A DNS query that gets no answer (timeout, SERVFAIL) makes its check FAIL
with "could not check", without a record to publish: the doctor's exit
status must mean "verified", so a run that verified nothing cannot pass (a
deploy script gating on it would otherwise go ahead blind); and if our own
resolver cannot get the answer, receivers' resolvers may not either, which
for them is a temperror and a deferred or junked copy.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import os
import re
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Final, Literal

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from listserv import dkim, files
from listserv.auth import check_spf
from listserv.config import Config
from listserv import dmarc
from listserv.dns import DnspythonResolver, DnsTemporaryError, Resolver
from listserv.errors import ListservError
from listserv.store import Store, open_store

__all__ = ["Check", "Status", "make_resolver", "run_checks"]

Status = Literal["OK", "WARN", "FAIL"]

# Addresses a copy never reaches a receiver from: the relay there hands the
# mail on, and receivers see the public address of the MTA that does.
_INTERNAL_NETS: Final = tuple(
    ipaddress.ip_network(n)
    for n in ("127.0.0.0/8", "10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "169.254.0.0/16",
              "100.64.0.0/10", "::1/128", "fc00::/7", "fe80::/10")
)
_RECOMMENDED_RSA_BITS: Final = 2048  # RFC 8301 §3.2: signers SHOULD use at least this


@dataclass(frozen=True, slots=True)
class Check:
    """One finding: ``publish`` is the DNS record (zone-file form) that fixes it, or ""."""

    status: Status
    name: str
    detail: str
    publish: str = ""

    def line(self) -> str:
        return f"{self.status:<4}  {self.name}: {self.detail}"


def make_resolver(config: Config) -> Resolver:
    """The resolver the CLI checks through: the server's own ``[dns]`` (tests replace this)."""
    return DnspythonResolver(config.dns.nameservers, timeout=config.dns.timeout)


async def run_checks(config: Config, resolver: Resolver, *, public_ip: str | None = None) -> list[Check]:
    """Every check, in order.  ``public_ip``: the address our mail leaves from,
    when the relay is on this machine or a private network."""
    checks: list[Check] = []
    keys: list[tuple[str, dkim.SigningKey]] = []
    check, rsa_key = _rsa_key(config)
    checks.append(check)
    if rsa_key is not None:
        keys.append(("dkim rsa", rsa_key))
    if config.dkim.ed25519_private_key is not None:
        check, ed_key = _ed25519_key(config)
        checks.append(check)
        if ed_key is not None:
            keys.append(("dkim ed25519", ed_key))
    checks += [_state_dir(config), _file_modes(config), _delivery(config), *_urls(config)]
    for name, key in keys:
        checks.append(await _dkim_record(name, key, resolver))
    checks.append(await _spf(config, resolver, public_ip))
    checks.append(await _dmarc(config, resolver))
    checks.append(await _mx(config, resolver, public_ip))
    checks.append(await _stage_errors(config))
    return checks


def _could_not(name: str, exc: DnsTemporaryError) -> Check:
    return Check("FAIL", name, f"could not check: no answer from DNS ({exc}); is [dns] nameservers reachable?")


def _tags(record: str) -> dict[str, str]:
    """``k=v; k=v`` tag list (RFC 6376 §3.2, RFC 7489 §6.4), names lowercased."""
    tags = {}
    for part in record.split(";"):
        name, eq, value = part.partition("=")
        if eq:
            tags[name.strip().lower()] = value.strip()
    return tags


# -- config ------------------------------------------------------------------------------


def _rsa_key(config: Config) -> tuple[Check, dkim.DkimKey | None]:
    name, path = "key rsa", config.dkim.private_key
    if not path.exists():
        return Check("FAIL", name, f"no key at {path} (`serve` would generate one): run `listserv dkim keygen` "
                                   "and publish the record it prints"), None
    try:
        key = dkim.DkimKey.load(path, domain=config.server.domain, selector=config.dkim.selector)
    except dkim.DkimKeyError as exc:
        return Check("FAIL", name, str(exc)), None
    bits = key.private_key.key_size
    if bits < _RECOMMENDED_RSA_BITS:
        return Check("WARN", name, f"{path}: RSA-{bits}; RFC 8301 asks for at least {_RECOMMENDED_RSA_BITS} bits "
                                   "(`listserv dkim keygen --force`, then publish the new record)"), key
    return _key_mode(name, path, f"{path}: RSA-{bits}"), key


def _ed25519_key(config: Config) -> tuple[Check, dkim.Ed25519Key | None]:
    name, path = "key ed25519", config.dkim.ed25519_private_key
    assert path is not None
    if not path.exists():
        return Check("FAIL", name, f"no key at {path}: run `listserv dkim keygen --ed25519` and publish the "
                                   "record it prints (`serve` does not start without it)"), None
    try:
        key = dkim.Ed25519Key.load(path, domain=config.server.domain, selector=config.dkim.ed25519_selector)
    except dkim.DkimKeyError as exc:
        return Check("FAIL", name, str(exc)), None
    return _key_mode(name, path, f"{path}: Ed25519"), key


def _key_mode(name: str, path: Path, ok: str) -> Check:
    if path.stat().st_mode & 0o077:
        return Check("WARN", name, f"{ok}, but readable by other users: chmod 600 {path}")
    return Check("OK", name, ok)


def _state_dir(config: Config) -> Check:
    path = config.server.state_dir
    if path.is_dir():
        try:
            # Really create a file: os.access answers "yes" for root, and not
            # for read-only mounts.
            with tempfile.TemporaryFile(dir=path):
                pass
        except OSError as exc:
            return Check("FAIL", "state_dir", f"{path} is not writable: {exc.strerror or exc}")
        return Check("OK", "state_dir", f"{path} is writable")
    if path.exists():
        return Check("FAIL", "state_dir", f"{path} is not a directory")
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if os.access(parent, os.W_OK | os.X_OK):
        return Check("OK", "state_dir", f"{path} does not exist yet; `serve` creates it")
    return Check("FAIL", "state_dir", f"{path} does not exist and cannot be created in {parent}")


def _file_modes(config: Config) -> Check:
    """The state dir 0700 and the database, WAL/SHM, key and secret files 0600 (``listserv.files``)."""
    loose = files.loose_modes(config)
    if not loose:
        return Check("OK", "file modes", "the state dir and the database, key and secret files are private")
    paths = [line.partition(": mode ")[0] for line in loose]
    fix = "; ".join(f"chmod {'700' if Path(p).is_dir() else '600'} {p}" for p in paths)
    return Check("WARN", "file modes", f"{'; '.join(loose)}: other local users can read members, tokens or "
                                       f"keys ({fix}; `serve` does it at start when it owns them)")


STAGE_ERRORS_HORIZON: Final = 86400  # the doctor warns about errors of the last day


async def _stage_errors(config: Config) -> Check:
    """Each stage's last errors (prepare, deliver, requests, bounces, archive), as `status` shows them."""
    name = "stage errors"
    if not config.uses_postgresql and not config.db_path.exists():
        return Check("OK", name, f"no state database yet ({config.db_path})")
    try:
        store = await open_store(config.store_target)
    except ListservError as exc:
        return Check("FAIL", name, f"cannot read the state database: {exc}")
    try:
        errors = await store.stage_errors(time.time(), STAGE_ERRORS_HORIZON, limit=1)
    finally:
        await store.close()
    if not any(errors.values()):
        return Check("OK", name, f"none in the last day ({', '.join(errors)})")
    parts = []
    for stage, entries in errors.items():
        if not entries:
            parts.append(f"{stage}: none")
            continue
        e = entries[0]
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(e["at"]))
        times = f" ({e['count']} times)" if e["count"] > 1 else ""
        parts.append(f"{stage}: {when} {e['detail']}{times}")
    return Check("WARN", name, "in the last day: " + "; ".join(parts) + " (`listserv status` shows more)")


def _delivery(config: Config) -> Check:
    if config.delivery.mode == "maildir":
        return Check("WARN", "delivery", f'mode = "maildir": try-out mode, copies are written under '
                                         f"{config.maildir_root} and nothing leaves this machine")
    tls = ", STARTTLS" if config.delivery.starttls else ""
    return Check("OK", "delivery", f"smtp via {config.delivery.relay}{tls}")


def _urls(config: Config) -> list[Check]:
    checks = []
    archive = config.archive.base_url
    if not archive:
        checks.append(Check("OK", "archive base_url", "not set: copies carry no List-Archive/Archived-At"))
    elif not archive.startswith("https://"):
        checks.append(Check("WARN", "archive base_url", f"{archive} is not https: browsers mark it insecure and "
                                                        "links in the headers can be altered on the way"))
    else:
        checks.append(Check("OK", "archive base_url", archive))
    web = config.web.base_url
    if not web:
        checks.append(Check("WARN", "web base_url", "not set: copies carry only a mailto List-Unsubscribe and no "
                                                    "List-Unsubscribe-Post; Gmail and Yahoo want one-click "
                                                    "unsubscribe (RFC 8058, https) from bulk senders"))
    elif not web.startswith("https://"):
        checks.append(Check("WARN", "web base_url", f"{web} is not https, which RFC 8058 one-click requires"))
    elif config.web.listen is None:
        checks.append(Check("WARN", "web base_url", f"{web} is set but [web] listen is empty: the one-click "
                                                    "links work only if something else serves them"))
    else:
        checks.append(Check("OK", "web base_url", f"{web} (served from {config.web.listen})"))
    return checks


# -- DKIM ----------------------------------------------------------------------------------


def _public_bytes(p: str) -> bytes | None:
    try:
        return base64.b64decode(re.sub(r"\s+", "", p), validate=True)
    except (binascii.Error, ValueError):
        return None


def _same_key(published: bytes, key: dkim.SigningKey) -> bool:
    ours = _public_bytes(dkim.dns_txt_value(key).partition("p=")[2])
    if published == ours:
        return True
    if isinstance(key, dkim.Ed25519Key):
        return False
    # The same RSA key in the other DER form some tools publish (PKCS#1
    # RSAPublicKey, which cryptography reads only from PEM).
    pem = b"-----BEGIN RSA PUBLIC KEY-----\n" + base64.encodebytes(published) + b"-----END RSA PUBLIC KEY-----\n"
    try:
        other = serialization.load_pem_public_key(pem)
    except (ValueError, TypeError):
        return False
    return isinstance(other, rsa.RSAPublicKey) and (
        other.public_numbers() == key.private_key.public_key().public_numbers()
    )


async def _dkim_record(name: str, key: dkim.SigningKey, resolver: Resolver) -> Check:
    owner = f"{key.selector}._domainkey.{key.domain}"
    record = dkim.dns_txt_record(key, key.selector, key.domain)
    kind = "ed25519" if isinstance(key, dkim.Ed25519Key) else "rsa"
    try:
        records = await resolver.txt(owner)
    except DnsTemporaryError as exc:
        return _could_not(name, exc)
    if not records:
        return Check("FAIL", name, f"no TXT record at {owner}: receivers cannot verify our signatures", record)
    problems = []
    for text in records:
        tags = _tags(text)
        if tags.get("v", "DKIM1") != "DKIM1":
            problems.append(f"v={tags['v']} (must be DKIM1)")
        elif tags.get("k", "rsa").lower() != kind:
            problems.append(f"k={tags.get('k', 'rsa')} but our key is {kind}")
        elif not tags.get("p"):
            problems.append("p= is empty: the key is revoked (RFC 6376 §3.6.1)")
        elif (published := _public_bytes(tags["p"])) is None or not _same_key(published, key):
            problems.append("p= is a different key than ours")
        elif "h" in tags and "sha256" not in [h.strip().lower() for h in tags["h"].split(":")]:
            problems.append(f"h={tags['h']} excludes sha256")
        else:
            testing = "y" in [f.strip().lower() for f in tags.get("t", "").split(":")]
            if len(records) > 1:
                return Check("WARN", name, f"{owner} has {len(records)} TXT records and one is our key; "
                                           "verifiers may read any one (RFC 6376 §3.6.2.2): remove the others")
            if testing:
                return Check("WARN", name, f"{owner} publishes our key in testing mode (t=y): receivers may "
                                           "ignore failures; remove t=y once mail verifies")
            return Check("OK", name, f"{owner} publishes our key")
    return Check("FAIL", name, f"{owner}: {'; '.join(problems)}", record)


# -- SPF -----------------------------------------------------------------------------------


def _mail_from(config: Config) -> str:
    # The envelope sender of every copy (fanout.bounces_address); only its
    # domain matters to SPF unless the record uses the %{l} macro.
    list_name = config.lists[0].name if config.lists else "listserv"
    return f"{list_name}-bounces@{config.server.domain}"


def _is_internal(ip: str) -> bool:
    address = ipaddress.ip_address(ip)
    return any(address in net for net in _INTERNAL_NETS if net.version == address.version)


async def _relay_addresses(config: Config, resolver: Resolver) -> tuple[list[str], str]:
    """The public addresses copies leave from, as far as we can tell, and a note when we cannot."""
    host = config.delivery.relay.host
    try:
        ipaddress.ip_address(host)
        addresses = [host]
    except ValueError:
        if host.lower() == "localhost":
            addresses = ["127.0.0.1"]
        else:
            try:
                addresses = await resolver.a(host) + await resolver.aaaa(host)
            except DnsTemporaryError as exc:
                return [], f"the relay {host} could not be resolved ({exc})"
            if not addresses:
                return [], f"the relay {host} has no A/AAAA record"
    if all(_is_internal(a) for a in addresses):
        return [], (f"the relay {config.delivery.relay} is on this machine or a private network, so SPF must "
                    "cover the public IP of the MTA that sends the copies on")
    return [a for a in addresses if not _is_internal(a)], ""


def _spf_with(record: str, ip: str) -> str:
    mechanism = f"ip6:{ip}" if ":" in ip else f"ip4:{ip}"
    words = record.split()
    return " ".join([words[0], mechanism, *words[1:]]) if words and words[0].lower() == "v=spf1" else \
        f"v=spf1 {mechanism} -all"


async def _spf(config: Config, resolver: Resolver, public_ip: str | None) -> Check:
    name, domain = "spf", config.server.domain
    addresses: list[str]
    if config.delivery.mode == "maildir":
        addresses, note = [], "delivery is maildir (try-out), so no copy is sent yet"
    else:
        addresses, note = await _relay_addresses(config, resolver)
    if not addresses and public_ip:
        addresses, note = [public_ip], ""
    try:
        records = await resolver.txt(domain)
    except DnsTemporaryError as exc:
        return _could_not(name, exc)
    spf = [r for r in records if r.strip().lower() == "v=spf1" or r.strip().lower().startswith("v=spf1 ")]
    suggestion_ip = addresses[0] if addresses else "PUBLIC-IP-OF-YOUR-MTA"
    if not spf:
        publish = f'{domain}. IN TXT "{_spf_with("", suggestion_ip)}"'
        return Check("FAIL", name, f"no SPF record for {domain}", publish)
    if len(spf) > 1:
        return Check("FAIL", name, f"{domain} has {len(spf)} SPF records; receivers treat that as a permanent "
                                   "error (RFC 7208 §4.5): merge them into one",
                     f'{domain}. IN TXT "{_spf_with(spf[0], suggestion_ip)}"')
    if not addresses:
        return Check("WARN", name, f"{domain} has {spf[0]!r}, but {note}: run `listserv doctor --public-ip IP` "
                                   "to check that it covers it")
    for address in addresses:
        result, _, _ = await check_spf(address, _mail_from(config), config.server.hostname, resolver,
                                       timeout=config.dns.timeout)
        if result == "temperror":
            return Check("FAIL", name, f"could not check: DNS gave no answer while evaluating {spf[0]!r} "
                                       f"for {address}")
        if result == "permerror":
            return Check("FAIL", name, f"{spf[0]!r} is broken (permerror: a syntax error, a missing include, or "
                                       "more than 10 DNS lookups, RFC 7208 §4.6.4)")
        if result != "pass":
            return Check("FAIL", name, f"{spf[0]!r} does not cover {address} (result: {result})",
                         f'{domain}. IN TXT "{_spf_with(spf[0], address)}"')
    return Check("OK", name, f"{spf[0]!r} covers {', '.join(addresses)}")


# -- DMARC ---------------------------------------------------------------------------------


async def _dmarc(config: Config, resolver: Resolver) -> Check:
    name, domain = "dmarc", config.server.domain
    owner = f"_dmarc.{domain}"
    publish = f'{owner}. IN TXT "v=DMARC1; p=quarantine; rua=mailto:postmaster@{domain}"'
    try:
        # The same discovery the list applies to authors (RFC 7489 §6.6.3), on the list domain.
        record_domain, found = await dmarc.find_records(domain, resolver.txt)
    except DnsTemporaryError as exc:
        return _could_not(name, exc)
    where = f"_dmarc.{record_domain}"
    if not found:
        return Check("FAIL", name, f"no DMARC record at {owner}: Gmail, Yahoo and Outlook require one "
                                   "from bulk senders", publish)
    if len(found) > 1:
        return Check("FAIL", name, f"{where} has {len(found)} DMARC records, so receivers apply none "
                                   "(RFC 7489 §6.6.3): keep one", publish)
    tags = dmarc.parse_record(found[0])
    policy = tags.get("p", "").lower()
    if where != owner:
        policy = tags.get("sp", policy).lower()  # the policy for subdomains
    if policy not in ("none", "quarantine", "reject"):
        return Check("FAIL", name, f"{where}: {found[0]!r} has no valid p= (none, quarantine or reject)", publish)
    inherited = f" (inherited from {where})" if where != owner else ""
    if policy == "none":
        return Check("WARN", name, f"p=none{inherited}: receivers only report, nobody is stopped from forging "
                                   "the list domain; enough for Gmail and Yahoo, but move to p=quarantine once "
                                   "the reports show only our own mail")
    return Check("OK", name, f"p={policy}{inherited}")


# -- MX ------------------------------------------------------------------------------------


async def _mx(config: Config, resolver: Resolver, public_ip: str | None) -> Check:
    name, domain = "mx", config.server.domain
    publish = f"{domain}. IN MX 10 {config.server.hostname}."
    if config.server.hostname == domain:
        publish += f"  ; and {domain}. IN A <public IP of the MTA that receives for the lists>"
    try:
        records = sorted(await resolver.mx(domain))
        if not records:
            implicit = await resolver.a(domain) + await resolver.aaaa(domain)
            if implicit:
                return Check("WARN", name, f"no MX for {domain}: senders fall back to its own address "
                                           f"{', '.join(implicit)} (RFC 5321 §5.1); publish an MX", publish)
            return Check("FAIL", name, f"no MX (and no address) for {domain}: posts cannot reach the lists",
                         publish)
        if any(host in ("", ".", "@") for _, host in records):
            return Check("FAIL", name, f"{domain} publishes a null MX (RFC 7505): it accepts no mail, so posts "
                                       "cannot reach the lists", publish)
        resolved: dict[str, list[str]] = {}
        for _, host in records:
            resolved[host] = await resolver.a(host) + await resolver.aaaa(host)
    except DnsTemporaryError as exc:
        return _could_not(name, exc)
    listing = ", ".join(f"{pref} {host}" for pref, host in records)
    dead = [host for host, addresses in resolved.items() if not addresses]
    if len(dead) == len(resolved):
        return Check("FAIL", name, f"MX {listing}: no host has an A/AAAA record, so posts cannot reach the "
                                   "lists", f"{dead[0]}. IN A <public IP of the MTA that receives for the lists>")
    if dead:
        return Check("WARN", name, f"MX {listing}: {', '.join(dead)} has no A/AAAA record")
    if public_ip and not any(public_ip in addresses for addresses in resolved.values()):
        return Check("WARN", name, f"MX {listing}: none is at {public_ip}; fine if that MTA hands posts on "
                                   "to this server")
    return Check("OK", name, f"MX {listing} ({'; '.join(', '.join(a) for a in resolved.values())})")
