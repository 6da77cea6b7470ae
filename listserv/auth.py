"""Authenticate a post on arrival, record what we found, and seal what we send on.

On arrival (``verify_inbound``), with DNS only through the injected
``dns.Resolver``:

* **DKIM** (RFC 6376): *every* DKIM-Signature is checked, not only the first
  (a provider's signature often comes first).  dkimpy parses and canonicalizes,
  so our verdicts match its signer and verifier byte for byte; the keys are
  fetched with the async resolver *before* any checking, and the public-key
  step runs through ``cryptography``.  RFC 8301: rsa-sha1 and RSA keys under
  1024 bits do not pass (both are parameters, for the old test vectors).
* **SPF** (RFC 7208): ``listserv.spf``, which agrees with the whole openspf.org
  RFC 7208 test suite (``check_spf`` and ``evaluate_spf`` are re-exported here).
* **DMARC** (RFC 7489 §6.6): the policy from ``listserv.dmarc.discover``
  (§6.6.3, ``sp=`` for subdomains, organizational domains from the Public
  Suffix List); pass when an aligned DKIM or an aligned SPF passes; relaxed
  alignment unless ``adkim``/``aspf=s``.
* **ARC** (RFC 8617): the chain as received is validated with dkimpy's
  ``arc_verify`` over the pre-fetched keys; the result goes into our
  Authentication-Results and becomes the ``cv=`` of our seal.

A DNS failure never counts against the sender: it makes the part it touched
``temperror``, and ``AuthResult.forged`` is true only when DMARC *definitely*
fails for a domain asking for quarantine or reject.

On the way out, ``arc_seal`` adds our ARC set once per post (the RSA step
through OpenSSL, like ``listserv.dkim``).  ``strip_our_auth_results`` removes
incoming Authentication-Results that claim our authserv-id (RFC 8601 §5), and
``client_from_trusted_received`` finds the real client behind a trusted relay.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import ipaddress
import logging
import re
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from email.utils import getaddresses
from typing import Final, TypeVar

import dkim as dkimpy  # type: ignore[import-untyped]
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed
from dkim.canonicalization import (  # type: ignore[import-untyped]
    CanonicalizationPolicy,
    InvalidCanonicalizationPolicyError,
)
from dkim.util import InvalidTagValueList, parse_tag_value  # type: ignore[import-untyped]

from listserv.dkim import DkimKey, split_message
from listserv.dmarc import discover, organizational_domain
from listserv.dns import DnsTemporaryError, Lookups, Resolver
from listserv.spf import SpfOutcome, check_spf, evaluate_spf, spf_outcome

__all__ = [
    "ARC_SIGNED_HEADERS",
    "AuthResult",
    "DkimVerdict",
    "arc_seal",
    "check_spf",
    "evaluate_spf",
    "client_from_trusted_received",
    "our_auth_results",
    "strip_our_auth_results",
    "verify_arc",
    "verify_inbound",
]

log = logging.getLogger("listserv.auth")
# dkimpy logs every bad signature at ERROR; hostile input is routine here, and
# what matters is returned in the verdicts, so its chatter goes nowhere.
_DKIMPY_LOG = logging.getLogger("listserv.auth.dkimpy")
_DKIMPY_LOG.addHandler(logging.NullHandler())
_DKIMPY_LOG.propagate = False

T = TypeVar("T")

#: What our ARC-Message-Signature covers.  The per-recipient headers
#: (List-Unsubscribe, List-Unsubscribe-Post, and To if personalization rewrites
#: it) are left out: they are added after the seal, and a header listed in h=
#: but absent is signed as null, so adding it later would break the AMS.
ARC_SIGNED_HEADERS: Final[tuple[bytes, ...]] = (
    b"from",
    b"from",
    b"cc",
    b"subject",
    b"date",
    b"message-id",
    b"reply-to",
    b"in-reply-to",
    b"references",
    b"mime-version",
    b"content-type",
    b"content-transfer-encoding",
    b"list-id",
    b"list-post",
    b"list-archive",
    b"archived-at",
)

_ARC_MAX_INSTANCE: Final = 50  # RFC 8617 §4.2.1
_LINE_MAX: Final = 78
_HASHES: Final = {b"rsa-sha256": hashlib.sha256, b"rsa-sha1": hashlib.sha1, b"ed25519-sha256": hashlib.sha256}


# --- results -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class DkimVerdict:
    """The outcome for one DKIM-Signature (RFC 8601 §2.7.1 result names)."""

    domain: str  # d=
    selector: str  # s=
    result: str  # "pass" | "fail" | "neutral" | "temperror" | "permerror"
    reason: str = ""


@dataclass(frozen=True, slots=True)
class AuthResult:
    """What ``verify_inbound`` found about one arriving message."""

    dkim: tuple[DkimVerdict, ...]
    spf: str  # "pass" | "fail" | "softfail" | "neutral" | "none" | "temperror" | "permerror"
    spf_domain: str  # the MAIL FROM domain, or the HELO name for a null sender
    dmarc: str  # "pass" | "fail" | "none" | "temperror"
    dmarc_policy: str  # "none" | "quarantine" | "reject" | "" (no record, or not found)
    from_domain: str
    arc: str = "none"  # chain as received: "none" | "pass" | "fail" | "temperror"
    spf_scope: str = "mailfrom"  # "mailfrom" | "helo"

    @property
    def forged(self) -> bool:
        """DMARC definitely fails and the author's domain asks receivers to quarantine or reject.

        ``dmarc`` is "fail" only when nothing relevant hit a temporary DNS
        error, so an unreachable nameserver never makes a member's post forged.
        """
        return self.dmarc == "fail" and self.dmarc_policy in ("quarantine", "reject")

    def header(self, authserv_id: str) -> str:
        """The Authentication-Results value (RFC 8601 §2.2), on one line.

        E.g. ``lists.example.org; dkim=pass header.d=gmina.example.pl
        header.s=s1; spf=pass smtp.mailfrom=gmina.example.pl; dmarc=pass
        (p=reject) header.from=gmina.example.pl; arc=none``.
        """
        return "; ".join([authserv_id, *self._results()])

    def header_field(self, authserv_id: str, linesep: bytes = b"\r\n") -> bytes:
        """The whole ``Authentication-Results:`` field, one result a line, ready to prepend."""
        return _fold_results(f"Authentication-Results: {authserv_id};", self._results(), linesep)

    def _results(self) -> list[str]:
        out: list[str] = []
        if not self.dkim:
            out.append("dkim=none")
        for v in self.dkim:
            text = f"dkim={v.result}"
            if v.reason and v.result != "pass":
                text += f" reason={_pvalue(v.reason)}"
            if v.domain:
                text += f" header.d={_pvalue(v.domain)}"
            if v.selector:
                text += f" header.s={_pvalue(v.selector)}"
            out.append(text)
        ptype = "smtp.helo" if self.spf_scope == "helo" else "smtp.mailfrom"
        out.append(f"spf={self.spf} {ptype}={_pvalue(self.spf_domain)}" if self.spf_domain else f"spf={self.spf}")
        if self.from_domain:
            policy = f" (p={self.dmarc_policy})" if self.dmarc_policy else ""
            out.append(f"dmarc={self.dmarc}{policy} header.from={_pvalue(self.from_domain)}")
        else:
            out.append(f"dmarc={self.dmarc}")
        # RFC 8617 registers none/pass/fail for "arc"; a chain we could not
        # check "can not validate" (§4.1.3 cv=fail), so it is written as fail.
        out.append("arc=fail (temporary DNS error)" if self.arc == "temperror" else f"arc={self.arc}")
        return out


def _fold_results(first_line: str, results: list[str], linesep: bytes) -> bytes:
    """A header field with one result a line, long results folded at spaces (FWS, RFC 8601 §2.2)."""
    lines = [first_line]
    for n, result in enumerate(results):
        lines.append("\t")
        for word in (result + (";" if n < len(results) - 1 else "")).split(" "):
            if lines[-1] == "\t":
                lines[-1] += word
            elif len(lines[-1].expandtabs(8)) + 1 + len(word) > _LINE_MAX:
                lines.append("\t " + word)
            else:
                lines[-1] += " " + word
    return linesep.join(line.encode("ascii", "replace") for line in lines) + linesep


_TOKEN = re.compile(r"[A-Za-z0-9._@+-]+\Z")


def _pvalue(text: str) -> str:
    """A token as is, anything else as an RFC 2045 quoted-string (ASCII only)."""
    if _TOKEN.match(text):
        return text
    # ";" too: the value must not look like the end of a result when split.
    clean = "".join(c if " " <= c <= "~" and c != ";" else "?" for c in text)
    return '"' + clean.replace("\\", "\\\\").replace('"', '\\"') + '"'


# --- header block helpers -----------------------------------------------------------


def _header_fields(raw: bytes) -> tuple[list[tuple[bytes, bytes]], int]:
    """The raw header fields (name, whole field text with continuation lines) and where the body starts.

    Lenient: a line that is neither a field nor a continuation ends nothing
    and is kept as its own pseudo-field with an empty name.
    """
    fields: list[tuple[bytes, bytes]] = []
    pos = 0
    while pos < len(raw):
        end = raw.find(b"\n", pos)
        end = len(raw) if end < 0 else end + 1
        line = raw[pos:end]
        if line in (b"\r\n", b"\n"):
            return fields, end
        if line[:1] in (b" ", b"\t") and fields:
            name, text = fields[-1]
            fields[-1] = (name, text + line)
        else:
            name, colon, _ = line.partition(b":")
            fields.append((name.strip() if colon else b"", line))
        pos = end
    return fields, len(raw)


def _unfolded_value(field: bytes) -> str:
    value = field.partition(b":")[2]
    return re.sub(r"\r?\n[ \t]", " ", value.decode("utf-8", "replace")).strip()


def _strip_comments(text: str) -> str:
    out, depth, escaped = [], 0, False
    for c in text:
        if escaped:
            escaped = False
            if depth == 0:
                out.append(c)
        elif c == "\\":
            escaped = True
            if depth == 0:
                out.append(c)
        elif c == "(":
            depth += 1
        elif c == ")" and depth:
            depth -= 1
        elif depth == 0:
            out.append(c)
    return "".join(out)


def _authserv_id(value: str) -> str:
    text = _strip_comments(value).strip()
    if text.startswith('"'):
        m = re.match(r'"((?:[^"\\]|\\.)*)"', text)
        return re.sub(r"\\(.)", r"\1", m.group(1)).lower() if m else ""
    return re.split(r"[;\s]", text, maxsplit=1)[0].lower()


def strip_our_auth_results(raw: bytes, authserv_id: str) -> bytes:
    """``raw`` without the Authentication-Results fields that claim ``authserv_id`` (RFC 8601 §5).

    Anyone can write our name into a header; only the one we add after this
    is ours.  Everything else, other servers' results included, is kept byte
    for byte, so the author's DKIM signatures still verify.
    """
    ours = authserv_id.lower()
    fields, body_at = _header_fields(raw)
    kept = [
        text
        for name, text in fields
        if not (name.lower() == b"authentication-results" and _authserv_id(_unfolded_value(text)) == ours)
    ]
    if len(kept) == len(fields):
        return raw
    header_end = sum(len(t) for _, t in fields)
    return b"".join(kept) + raw[header_end:body_at] + raw[body_at:]


def our_auth_results(raw: bytes, authserv_id: str) -> str | None:
    """The value of the topmost Authentication-Results field with ``authserv_id`` (unfolded), if any.

    After ``strip_our_auth_results`` on arrival, the only such field is the
    one we prepended: this is what to pass to ``arc_seal`` as ``auth_results``.
    """
    ours = authserv_id.lower()
    fields, _ = _header_fields(raw)
    for name, text in fields:
        if name.lower() == b"authentication-results":
            value = _unfolded_value(text)
            if _authserv_id(value) == ours:
                return re.sub(r"\s+", " ", value)
    return None


_RECEIVED_FROM = re.compile(r"^\s*from\s+(\S+)(.*?)(?:\sby\s|;|$)", re.I | re.S)
_BRACKET_IP = re.compile(r"\[(?:IPv6:)?([0-9A-Fa-f:.]+)\]", re.I)
_EXIM_HELO = re.compile(r"\bhelo=([^\s)]+)", re.I)


def client_from_trusted_received(raw: bytes, trusted: Sequence[str]) -> tuple[str, str] | None:
    """The (ip, helo) of the client a trusted relay received the message from.

    Call it when the SMTP peer is one of ``[server] trusted_relays`` (IPs or
    networks, e.g. Postfix on 127.0.0.1): the topmost Received field is the
    one that relay wrote.  If that field names another trusted relay (a
    content filter re-injecting), the next one down is read, and so on; fields
    below the first untrusted client are never believed.  None when the field
    is missing or cannot be read: then check SPF for nobody (pass
    ``client_ip=""`` to ``verify_inbound``), never for the relay itself.
    Postfix, Sendmail and Exim forms are understood.
    """
    networks = [ipaddress.ip_network(t.strip(), strict=False) for t in trusted]
    fields, _ = _header_fields(raw)
    for name, text in fields:
        if name.lower() != b"received":
            continue
        value = _unfolded_value(text)
        m = _RECEIVED_FROM.match(value)
        if m is None:
            return None
        helo, rest = m.group(1), m.group(2)
        ip_match = _BRACKET_IP.search(rest) or _BRACKET_IP.fullmatch(helo)
        if ip_match is None:
            return None
        try:
            ip = ipaddress.ip_address(ip_match.group(1))
        except ValueError:
            return None
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        exim = _EXIM_HELO.search(rest)
        if exim is not None:
            helo = exim.group(1)
        if any(ip in net for net in networks):
            continue  # another trusted hop: the field below it is its client's
        return str(ip), helo
    return None


# --- DNS: pre-fetch with the async resolver -------------------------------------------


def _key_name(selector: str, domain: str) -> str:
    return f"{selector}._domainkey.{domain}".lower().rstrip(".")


def _dnsfunc(records: dict[str, list[str] | DnsTemporaryError]) -> Callable[..., bytes]:
    """A synchronous dkimpy ``dnsfunc`` over records fetched beforehand: no I/O inside dkimpy."""

    def dnsfunc(name: bytes | str, timeout: int = 5) -> bytes:
        key = (name.decode("ascii", "replace") if isinstance(name, bytes) else name).lower().rstrip(".")
        answer = records.get(key)
        if not isinstance(answer, list) or not answer:
            return b""
        return answer[0].encode("utf-8", "replace")

    return dnsfunc


# --- DKIM -------------------------------------------------------------------------------


def _tags(value: bytes) -> dict[bytes, bytes]:
    tags: dict[bytes, bytes] = parse_tag_value(re.sub(rb"\r?\n", b"", value))
    return tags


def _sig_names(headers: list[tuple[bytes, bytes]], names: tuple[bytes, ...]) -> set[str]:
    out = set()
    for name, value in headers:
        if name.lower() not in names:
            continue
        try:
            tags = _tags(value)
            out.add(_key_name(tags[b"s"].decode("ascii"), tags[b"d"].decode("ascii")))
        except (InvalidTagValueList, KeyError, UnicodeDecodeError):
            continue
    return out


class _KeyError(Exception):
    """The key record makes the signature a permerror."""


_PublicKey = rsa.RSAPublicKey | ed25519.Ed25519PublicKey


def _public_key(
    records: list[str], algorithm: bytes, min_rsa_bits: int, local_part: bytes
) -> tuple[_PublicKey, set[bytes]]:
    """The key and the t= flags from the first TXT record at the key name (RFC 6376 §3.6.1).

    ``local_part`` is the i= local-part, for an RFC 4871 ``g=`` granularity
    (gone from RFC 6376, but a key that still restricts it is obeyed).
    """
    if not records:
        raise _KeyError("no key for signature")
    try:
        tags = _tags(records[0].encode("utf-8"))
    except InvalidTagValueList as exc:
        raise _KeyError(f"bad key record: {exc}") from None
    if tags.get(b"v", b"DKIM1") != b"DKIM1":
        raise _KeyError("bad key record version")
    kind = tags.get(b"k", b"rsa").lower()
    family, _, digest = algorithm.partition(b"-")
    if kind != family:
        raise _KeyError(f"key type {kind.decode(errors='replace')} does not match a={algorithm.decode()}")
    if b"h" in tags and digest not in [h.strip().lower() for h in tags[b"h"].split(b":")]:
        raise _KeyError("key does not allow this hash algorithm")
    if b"s" in tags and not {s.strip() for s in tags[b"s"].split(b":")} & {b"*", b"email"}:
        raise _KeyError("key is not for e-mail")
    p = re.sub(rb"\s+", b"", tags.get(b"p", b""))
    if b"p" not in tags:
        raise _KeyError("key record has no p=")
    if not p:
        raise _KeyError("key revoked")
    try:
        der = base64.b64decode(p, validate=True)
    except (binascii.Error, ValueError):
        raise _KeyError("key p= is not base64") from None
    flags = {f.strip() for f in tags.get(b"t", b"").split(b":")}
    if b"g" in tags:
        pattern = b".*".join(re.escape(part) for part in tags[b"g"].split(b"*"))
        if not tags[b"g"] or re.fullmatch(pattern, local_part) is None:
            raise _KeyError("key g= does not match the i= local-part")
    if kind == b"ed25519":
        if len(der) != 32:
            raise _KeyError("Ed25519 key is not 32 bytes (RFC 8463 §4.2)")
        return ed25519.Ed25519PublicKey.from_public_bytes(der), flags
    try:
        key = serialization.load_der_public_key(der)
    except (ValueError, TypeError):
        raise _KeyError("key p= is not a public key") from None
    if not isinstance(key, rsa.RSAPublicKey):
        raise _KeyError("key p= is not an RSA key")
    if key.key_size < min_rsa_bits:
        raise _KeyError(f"{key.key_size}-bit key is too small (RFC 8301 §3.2)")
    return key, flags


def _check_signature(
    headers: list[tuple[bytes, bytes]],
    sig_header: tuple[bytes, bytes],
    body: bytes,
    keys: dict[str, list[str] | DnsTemporaryError],
    *,
    min_rsa_bits: int,
    allow_sha1: bool,
) -> DkimVerdict:
    try:
        sig = _tags(sig_header[1])
    except InvalidTagValueList as exc:
        return DkimVerdict("", "", "permerror", f"bad tag list: {exc}")
    domain = sig.get(b"d", b"").decode("utf-8", "replace").lower()
    selector = sig.get(b"s", b"").decode("utf-8", "replace")

    def verdict(result: str, reason: str = "") -> DkimVerdict:
        return DkimVerdict(domain, selector, result, reason)

    # i= is dkim-quoted-printable (§2.11) and q= a list of methods (§3.5);
    # dkimpy's field check takes both literally, so it gets them decoded.
    checked = dict(sig)
    if b"i" in sig:
        checked[b"i"] = re.sub(rb"=([0-9A-Fa-f]{2})", lambda m: bytes([int(m.group(1), 16)]), sig[b"i"])
    if b"q" in sig:
        if b"dns/txt" not in [q.strip().lower() for q in sig[b"q"].split(b":")]:
            return verdict("permerror", "no supported query method in q=")
        del checked[b"q"]
    try:
        dkimpy.validate_signature_fields(checked)
    except dkimpy.ValidationError as exc:
        return verdict("permerror", str(exc))
    algorithm = sig[b"a"]
    if algorithm == b"rsa-sha1" and not allow_sha1:
        return verdict("permerror", "rsa-sha1 is not accepted (RFC 8301 §3.1)")
    include = [h.lower() for h in re.split(rb"\s*:\s*", sig[b"h"].strip())]
    if b"from" not in include:
        return verdict("permerror", "From is not signed (RFC 6376 §5.4)")
    try:
        canon = CanonicalizationPolicy.from_c_value(sig.get(b"c", b"simple/simple"))
    except InvalidCanonicalizationPolicyError:
        return verdict("permerror", "unknown canonicalization")

    records = keys.get(_key_name(selector, domain))
    if isinstance(records, DnsTemporaryError) or records is None:
        return verdict("temperror", "key lookup failed")
    try:
        local_part, _, i_domain = checked.get(b"i", b"@" + sig[b"d"]).rpartition(b"@")
        key, flags = _public_key(records, algorithm, min_rsa_bits, local_part)
    except _KeyError as exc:
        return verdict("permerror", str(exc))
    if b"s" in flags:
        # t=s: the i= domain must be d= itself, not a subdomain (§3.6.1).
        if i_domain.lower() != sig[b"d"].lower():
            return verdict("permerror", "key t=s forbids a subdomain in i=")

    hash_fn = _HASHES[algorithm]
    canonical_body = canon.canonicalize_body(body)
    if b"l" in sig:
        canonical_body = canonical_body[: int(sig[b"l"])]
    try:
        bh = base64.b64decode(re.sub(rb"\s+", b"", sig[b"bh"]), validate=True)
    except (binascii.Error, ValueError):
        return verdict("permerror", "bh= is not base64")
    if hash_fn(canonical_body).digest() != bh:
        return verdict("fail", "body hash mismatch")

    hasher = hash_fn()
    # As dkimpy does (its bug 644046): sign-listed "from" once more, so a
    # second From added anywhere breaks the signature instead of riding on it.
    dkimpy.hash_headers(
        hasher, canon, canon.canonicalize_headers(headers), [*include, b"from"], sig_header, sig
    )
    try:
        signature = base64.b64decode(re.sub(rb"\s+", b"", sig[b"b"]), validate=True)
    except (binascii.Error, ValueError):
        return verdict("permerror", "b= is not base64")
    try:
        if isinstance(key, ed25519.Ed25519PublicKey):
            key.verify(signature, hasher.digest())  # RFC 8463 §3: Ed25519 over the SHA-256
        else:
            chosen = hashes.SHA256() if hash_fn is hashlib.sha256 else hashes.SHA1()
            key.verify(signature, hasher.digest(), padding.PKCS1v15(), Prehashed(chosen))
    except InvalidSignature:
        return verdict("fail", "signature did not verify")
    if b"l" in sig:
        return verdict("pass", "l= leaves part of the body unsigned")
    return verdict("pass")


async def _verify_dkim(
    headers: list[tuple[bytes, bytes]], body: bytes, lookups: Lookups, *, min_rsa_bits: int, allow_sha1: bool
) -> tuple[DkimVerdict, ...]:
    signatures = [(n, v) for n, v in headers if n.lower() == b"dkim-signature"]
    if not signatures:
        return ()
    keys = await lookups.txt_map(_sig_names(signatures, (b"dkim-signature",)))
    return tuple(
        _check_signature(headers, sig, body, keys, min_rsa_bits=min_rsa_bits, allow_sha1=allow_sha1)
        for sig in signatures
    )


# --- ARC ------------------------------------------------------------------------------------


_ARC_NAMES: Final = (b"arc-seal", b"arc-message-signature")


async def verify_arc(raw: bytes, resolver: Resolver, *, timeout: float = 5.0) -> str:
    """Validate the ARC chain as received (RFC 8617 §5.2): "none", "pass", "fail" or "temperror"."""
    return await _verify_arc(raw, Lookups(resolver, timeout))


async def _verify_arc(raw: bytes, lookups: Lookups) -> str:
    try:
        headers, _ = dkimpy.rfc822_parse(raw)
    except (dkimpy.MessageFormatError, IndexError):
        headers = []
    headers = [(bytes(n), bytes(v)) for n, v in headers]
    if not any(n.lower() in (*_ARC_NAMES, b"arc-authentication-results") for n, _ in headers):
        return "none"
    keys = await lookups.txt_map(_sig_names(headers, _ARC_NAMES))
    try:
        cv, _, reason = dkimpy.arc_verify(raw, logger=_DKIMPY_LOG, dnsfunc=_dnsfunc(keys))
    except Exception as exc:  # noqa: BLE001 - dkimpy on hostile input; a broken chain is a failed one
        cv, reason = dkimpy.CV_Fail, f"{exc!r}"
    if cv == dkimpy.CV_Pass:
        return "pass"
    if any(isinstance(v, DnsTemporaryError) for v in keys.values()):
        return "temperror"
    if cv == dkimpy.CV_None:
        return "none"
    log.debug("ARC chain fails: %s", reason)
    return "fail"  # CV_Fail, or None: a seal in the chain itself said cv=fail


def _arc_result(auth_results: str) -> str:
    m = re.search(r"(?:^|;)\s*arc\s*=\s*([A-Za-z]+)", _strip_comments(auth_results), re.I)
    return m.group(1).lower() if m else ""


def _fold(name: bytes, tags: list[bytes], signature: bytes | None) -> bytes:
    """``Name: tag; tag; ...`` folded at spaces to 78 columns, with b= last on its own lines."""
    lines = [name + b":"]
    for word in b" ".join(t + b";" for t in tags).split(b" "):
        if len(lines[-1]) + 1 + len(word) > _LINE_MAX:
            lines.append(b" " + word)
        else:
            lines[-1] += b" " + word
    text = b"\r\n".join(lines) + b"\r\n b="
    if signature is None:
        return text
    first = _LINE_MAX - len(b" b=")
    chunks = [signature[:first]] + [
        signature[i : i + _LINE_MAX - 1] for i in range(first, len(signature), _LINE_MAX - 1)
    ]
    return text + b"\r\n ".join(chunks)


def _relaxed(name: bytes, value: bytes) -> bytes:
    ((n, v),) = dkimpy.RelaxedCanonicalization.canonicalize_headers([(name, value)])
    return bytes(n) + b":" + bytes(v)


async def arc_seal(
    raw: bytes,
    key: DkimKey,
    *,
    authserv_id: str,
    auth_results: str,
    timestamp: int | None = None,
    signed_headers: Sequence[bytes] = ARC_SIGNED_HEADERS,
) -> bytes:
    """``arc_seal_message`` for callers on a loop (it does no I/O: a thread is the caller's choice)."""
    return arc_seal_message(raw, key, authserv_id=authserv_id, auth_results=auth_results, timestamp=timestamp,
                            signed_headers=signed_headers)


def arc_seal_message(
    raw: bytes,
    key: DkimKey,
    *,
    authserv_id: str,
    auth_results: str,
    timestamp: int | None = None,
    signed_headers: Sequence[bytes] = ARC_SIGNED_HEADERS,
) -> bytes:
    """``raw`` with our ARC set (ARC-Seal, ARC-Message-Signature, ARC-Authentication-Results) prepended.

    ``auth_results`` is what we verified on arrival: ``AuthResult.header()``
    (with or without the leading authserv-id).  Its ``arc=`` result is the
    chain as it arrived, which sets ``cv=``: none when there is no earlier
    set, pass when it said pass, fail otherwise (RFC 8617 §4.1.3: "does not
    or can not validate").  The chain cannot be re-checked here, because our
    own changes (subject tag, footer) broke the previous AMS on purpose.

    Seal once per post, after the last change to the shared part of the post
    and before anything per recipient (``ARC_SIGNED_HEADERS`` leaves those
    headers out).  A message that already has 50 sets, or whose newest seal
    says cv=fail, is returned unchanged.
    """
    header_block, _ = split_message(raw)
    try:
        arc = dkimpy.ARC(raw, logger=_DKIMPY_LOG)
    except dkimpy.MessageFormatError as exc:
        raise ValueError(f"cannot seal a malformed message: {exc}") from exc
    max_instance, existing = arc.sorted_arc_headers()
    instance = max_instance + 1
    if instance > _ARC_MAX_INSTANCE:
        log.warning("not sealing: the message already has %d ARC sets", max_instance)
        return raw
    if any(
        i == max_instance and name.lower() == b"arc-seal" and re.search(rb"(?:^|;)\s*cv\s*=\s*fail", value, re.I)
        for i, (name, value) in existing
    ):
        # A chain already marked failed stays failed; another set adds nothing
        # (ARC test suite "no_additional_sig"; RFC 8617 §5.2 step 2).
        return raw
    if max_instance == 0:
        cv = b"none"
    else:
        cv = b"pass" if _arc_result(auth_results) == "pass" else b"fail"
    if timestamp is None:
        timestamp = int(time.time())

    results = auth_results.strip()
    prefix = re.match(r"\s*" + re.escape(authserv_id) + r"\s*(?:;|\Z)", results, re.I)
    if prefix:
        results = results[prefix.end() :].strip()
    aar = _fold_results(
        f"ARC-Authentication-Results: i={instance}; {authserv_id};",
        [r.strip() for r in results.split(";") if r.strip()] or ["none"],  # RFC 8601 no-result
        b"\r\n",
    )

    # ARC-Message-Signature: like DKIM over the message as we send it (§4.1.2).
    sign_key = key.private_key
    body_hash = hashlib.sha256(dkimpy.RelaxedCanonicalization.canonicalize_body(arc.body)).digest()
    ams_tags = [
        b"i=%d" % instance,
        b"a=rsa-sha256",
        b"c=relaxed/relaxed",
        b"d=" + key.domain.encode("ascii"),
        b"s=" + key.selector.encode("ascii"),
        b"t=%d" % timestamp,
        b"h=" + b" : ".join(signed_headers),  # spaced, so _fold can break the list
        b"bh=" + base64.b64encode(body_hash),
    ]
    unsigned = _fold(b"ARC-Message-Signature", ams_tags, None)
    hasher = hashlib.sha256()
    dkimpy.hash_headers(
        hasher,
        dkimpy.RelaxedCanonicalization,
        dkimpy.RelaxedCanonicalization.canonicalize_headers(arc.headers),
        list(signed_headers),
        (b"ARC-Message-Signature", unsigned.partition(b":")[2]),
        None,
    )
    ams = _fold(b"ARC-Message-Signature", ams_tags, _rsa_sign(sign_key, hasher.digest())) + b"\r\n"

    # ARC-Seal over every set in instance order, ours last (§5.1.1); after a
    # failed chain over our own set only, as dkimpy and Mail::DKIM do.
    seal_tags = [
        b"i=%d" % instance,
        b"cv=" + cv,
        b"a=rsa-sha256",
        b"d=" + key.domain.encode("ascii"),
        b"s=" + key.selector.encode("ascii"),
        b"t=%d" % timestamp,
    ]
    unsigned = _fold(b"ARC-Seal", seal_tags, None)
    hasher = hashlib.sha256()
    if cv != b"fail":
        order = {b"arc-authentication-results": 0, b"arc-message-signature": 1, b"arc-seal": 2}
        for _, (name, value) in sorted(existing, key=lambda e: (e[0], order.get(e[1][0].lower(), 3))):
            hasher.update(_relaxed(name, value))
    for field in (aar, ams):
        name, _, value = field.partition(b":")
        hasher.update(_relaxed(name, value))
    name, _, value = unsigned.partition(b":")
    hasher.update(_relaxed(name, value).rstrip(b"\r\n"))
    seal = _fold(b"ARC-Seal", seal_tags, _rsa_sign(sign_key, hasher.digest())) + b"\r\n"

    new = seal + ams + aar
    if not _uses_crlf(header_block):
        new = new.replace(b"\r\n", b"\n")
    return new + raw


def _rsa_sign(key: rsa.RSAPrivateKey, digest: bytes) -> bytes:
    return base64.b64encode(key.sign(digest, padding.PKCS1v15(), Prehashed(hashes.SHA256())))


def _uses_crlf(data: bytes) -> bool:
    end = data.find(b"\n")
    return end < 0 or data[end - 1 : end] == b"\r"


# --- DMARC -------------------------------------------------------------------------------


def _from_domain(raw: bytes) -> str:
    """The domain of the first address in the first From field ("" if there is none)."""
    fields, _ = _header_fields(raw)
    for name, text in fields:
        if name.lower() == b"from":
            for _, address in getaddresses([_unfolded_value(text)]):
                if "@" in address:
                    domain = address.rpartition("@")[2].strip().strip(">").rstrip(".").lower()
                    try:
                        return domain.encode("idna").decode("ascii")
                    except UnicodeError:
                        return domain
            return ""
    return ""


def _aligned(domain: str, from_domain: str, mode: str) -> bool:
    domain, from_domain = domain.lower().rstrip("."), from_domain.lower().rstrip(".")
    if mode == "s":
        return domain == from_domain
    return organizational_domain(domain) == organizational_domain(from_domain)


def _dmarc(
    from_domain: str,
    tags: Mapping[str, str],
    dkim: tuple[DkimVerdict, ...],
    spf: str,
    spf_domain: str,
    spf_scope: str,
) -> str:
    adkim = tags.get("adkim", "r").lower()
    aspf = tags.get("aspf", "r").lower()
    aligned_dkim = [v for v in dkim if v.domain and _aligned(v.domain, from_domain, adkim)]
    # §3.1.2: with a null MAIL FROM the HELO identity is what SPF authenticated.
    spf_aligned = bool(spf_domain) and _aligned(spf_domain, from_domain, aspf)
    if any(v.result == "pass" for v in aligned_dkim) or (spf_aligned and spf == "pass"):
        return "pass"
    if any(v.result == "temperror" for v in aligned_dkim) or (spf_aligned and spf == "temperror"):
        return "temperror"
    return "fail"


# --- the whole check ------------------------------------------------------------------------


async def _bounded(coro: Awaitable[T], limit: float, fallback: T) -> T:
    try:
        return await asyncio.wait_for(coro, limit)
    except (asyncio.TimeoutError, DnsTemporaryError):
        return fallback


async def verify_inbound(
    raw: bytes,
    *,
    mail_from: str,
    client_ip: str,
    helo: str,
    resolver: Resolver,
    timeout: float = 5.0,
    min_rsa_bits: int = 1024,
    allow_sha1: bool = False,
) -> AuthResult:
    """DKIM (every signature), SPF, DMARC and ARC for one message as it arrived.

    ``raw`` is the message as received (before our Received and
    Authentication-Results).  ``mail_from`` is the envelope sender ("" for
    ``<>``), ``client_ip``/``helo`` the SMTP client's (see
    ``client_from_trusted_received``; ``client_ip=""`` skips SPF).  Each DNS
    query is limited to ``timeout`` seconds and the whole check to four times
    that; whatever does not finish is a temperror.  Never raises for DNS or
    for anything in the message.
    """
    lookups = Lookups(resolver, timeout)
    limit = 4 * timeout
    try:
        try:
            parsed, body = dkimpy.rfc822_parse(raw)
            headers = [(bytes(n), bytes(v)) for n, v in parsed]
        except (dkimpy.MessageFormatError, IndexError):
            headers, body = [], b""  # unparsable header block: no signature can be checked
        from_domain = _from_domain(raw)

        async def dkim_part() -> tuple[DkimVerdict, ...]:
            return await _verify_dkim(headers, body, lookups, min_rsa_bits=min_rsa_bits, allow_sha1=allow_sha1)

        async def dmarc_part() -> tuple[str, Mapping[str, str]] | None:
            if not from_domain:
                return "", {}
            found = await discover(from_domain, lookups.txt)
            return ("", {}) if found is None else (found.policy, found.tags)

        mail_from_domain = mail_from.strip().strip("<>").rpartition("@")[2].lower()
        spf_fallback = SpfOutcome("temperror", mail_from_domain or helo.lower(), "mailfrom" if mail_from_domain else "helo")
        dkim_sigs = [v for n, v in headers if n.lower() == b"dkim-signature"]
        dkim_fallback = tuple(_unchecked(v) for v in dkim_sigs)
        dkim, spf_parts, policy, arc = await asyncio.gather(
            _bounded(dkim_part(), limit, dkim_fallback),
            _bounded(spf_outcome(client_ip, mail_from, helo, lookups), limit, spf_fallback),
            _bounded(dmarc_part(), limit, None),
            _bounded(_verify_arc(raw, lookups), limit, "temperror"),
        )
    finally:
        lookups.cancel()
    spf, spf_domain, spf_scope = spf_parts.result, spf_parts.domain, spf_parts.scope
    if not from_domain:
        dmarc, dmarc_policy = "none", ""
    elif policy is None:
        dmarc, dmarc_policy = "temperror", ""
    elif not policy[0]:
        dmarc, dmarc_policy = "none", ""
    else:
        dmarc_policy = policy[0]
        dmarc = _dmarc(from_domain, policy[1], dkim, spf, spf_domain, spf_scope)
    return AuthResult(
        dkim=dkim, spf=spf, spf_domain=spf_domain, dmarc=dmarc, dmarc_policy=dmarc_policy,
        from_domain=from_domain, arc=arc, spf_scope=spf_scope,
    )


def _unchecked(sig_value: bytes) -> DkimVerdict:
    try:
        tags = _tags(sig_value)
    except InvalidTagValueList:
        return DkimVerdict("", "", "permerror", "bad tag list")
    return DkimVerdict(
        tags.get(b"d", b"").decode("utf-8", "replace").lower(),
        tags.get(b"s", b"").decode("utf-8", "replace"),
        "temperror",
        "verification timed out",
    )
