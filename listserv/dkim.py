"""DKIM-sign every copy the list sends (RFC 6376), with the list domain's key.

Signing is the last step of delivery, after every transform, on the final bytes
of each copy.  The format and the header canonicalization come from dkimpy
(its ``rfc822_parse``, relaxed canonicalization and ``hash_headers``, the same
code its verifier runs), so our signatures are byte-compatible with it; only
the RSA step goes through ``cryptography`` (OpenSSL), because dkimpy does
RSA in pure Python at about 7 ms a signature.

What a signature covers, and why:

* ``a=rsa-sha256``, RSA-2048 (RFC 8301 §3.1, §3.2).
* ``c=relaxed/simple``: relaxed headers survive MTAs that refold or respace
  them (§3.4.2); the simple body is cheap to hash once per post and to extend
  per recipient (§3.4.3, see ``BodyHasher``).
* ``h=`` is ``SIGNED_HEADERS``, always the same list.  A listed header that the
  copy lacks is signed as null (§5.4), which is intended: nobody can add it
  later without breaking the signature.  ``from`` is listed twice
  ("oversigned", §5.4.2), so a second From added above ours also breaks it.
* ``t=`` is the signing time; no ``l=`` (body length limits let anyone append
  content, §8.2), no ``i=`` (it defaults to ``@d``, §3.5), no ``x=``.

The body hash (``bh=``) can be computed once per post with ``body_hash`` or a
``BodyHasher`` and passed to ``sign``, which then reads only the header block
of each copy.  For personalized copies hash the shared body prefix once, then
``copy()`` the hasher per member and ``update()`` it with that member's
footer.  For the headers of such copies, a ``HeaderTemplate`` parses and
canonicalizes the shared header block once; each copy's signature then
canonicalizes only that copy's own few fields (byte for byte what ``sign``
gives for the whole copy).

A second signature with Ed25519 (RFC 8463) is optional: an ``Ed25519Key``
signs like a ``DkimKey`` (``a=ed25519-sha256``, the same ``c=``, ``h=``, ``t=``
and ``bh=``), and a ``KeySet`` holds the RSA key and, when configured, the
Ed25519 one.  ``sign``/``sign_message`` take either a single key or a
``KeySet`` and then add one DKIM-Signature per key.  RFC 8463 §3: Ed25519
(PureEdDSA) signs the 32-byte SHA-256 hash of the header data, not the data
itself, which is what dkimpy and Mail::DKIM verify.  The RSA signature goes
topmost: verifiers that look only at the first signature (dkimpy's
``verify()`` by default, some filters) get the one every verifier supports;
the signatures do not cover each other (``dkim-signature`` is not in ``h=``),
so their order changes nothing else.

Line endings: messages may use LF or CRLF.  The header ``sign`` returns uses
the message's own line ending (that of its first line), so ``sign_message``
never mixes the two; the SMTP sender converts to CRLF on the wire, and both
forms verify the same (canonicalization works on CRLF lines, §3.4).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Final, TypeAlias

import dkim  # type: ignore[import-untyped]
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed

from listserv import files
from listserv.errors import ListservError

if TYPE_CHECKING:
    from hashlib import _Hash

    from listserv.config import DkimConfig

__all__ = [
    "KEY_BITS",
    "SIGNED_HEADERS",
    "BodyHasher",
    "DkimError",
    "DkimKey",
    "DkimKeyError",
    "DkimMessageError",
    "Ed25519Key",
    "HeaderTemplate",
    "KeySet",
    "PublishableKey",
    "Signer",
    "SigningKey",
    "body_hash",
    "dns_txt_record",
    "dns_txt_value",
    "generate_ed25519_key",
    "generate_key",
    "load_keys",
    "sign",
    "sign_message",
    "split_message",
]

#: Size of the keys ``generate_key`` makes (RFC 8301 §3.2: signers SHOULD use 2048).
KEY_BITS: Final = 2048
# RFC 8301 §3.2: signers MUST use at least 1024 bits; refuse to load less.
_MIN_KEY_BITS: Final = 1024

#: The h= list, lowercase, in this order; ``from`` twice to oversign it (§5.4.2).
SIGNED_HEADERS: Final[tuple[bytes, ...]] = (
    b"from",
    b"from",
    b"to",
    b"cc",
    b"subject",
    b"date",
    b"message-id",
    b"reply-to",
    b"mime-version",
    b"content-type",
    b"list-id",
    b"list-post",
    b"list-unsubscribe",
    b"list-unsubscribe-post",
    b"list-archive",
    b"archived-at",
)

_HEADER_NAME: Final = b"DKIM-Signature"
# RFC 5322 §2.1.1: lines SHOULD be at most 78 characters, CRLF excluded.
_LINE_MAX: Final = 78
# Selector and domain labels (§3.1 sub-domain; "_" is allowed because DNS TXT
# owner names accept it and config.py's selector check does too).  Anything
# else (";", "=", spaces, non-ASCII) would corrupt the tag list or the lookup.
_LABEL: Final = r"[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?"
_DNS_NAME: Final = re.compile(rf"{_LABEL}(?:\.{_LABEL})*\Z")
# The blank line that ends the header block (either line ending).
_HEADER_END: Final = re.compile(rb"\n\r?\n")
# A DNS TXT character-string holds at most 255 octets (RFC 1035 §3.3.14).
_TXT_CHUNK: Final = 255


class DkimError(ListservError):
    """Base class for DKIM signing failures."""


class DkimKeyError(DkimError):
    """The private key file is missing, unreadable or not a usable RSA (or
    Ed25519) key, or the selector/domain it is meant for is malformed."""


class DkimMessageError(DkimError):
    """The message cannot be signed: its header block is malformed or it has no From."""


# --- keys --------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class DkimKey:
    """A private key and the DNS name (``selector._domainkey.domain``) of its public half."""

    domain: str
    selector: str
    private_key: rsa.RSAPrivateKey = field(repr=False)

    def __post_init__(self) -> None:
        _check_names(self.domain, self.selector)
        if not isinstance(self.private_key, rsa.RSAPrivateKey):
            raise DkimKeyError("DKIM key must be an RSA private key")
        if self.private_key.key_size < _MIN_KEY_BITS:
            raise DkimKeyError(
                f"DKIM key has {self.private_key.key_size} bits; "
                f"RFC 8301 requires at least {_MIN_KEY_BITS}"
            )

    @classmethod
    def load(cls, path: Path | str, *, domain: str, selector: str) -> DkimKey:
        """Read an unencrypted PEM private key (PKCS#8 or PKCS#1) from ``path``."""
        path = Path(path)
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise DkimKeyError(f"cannot read DKIM key {path}: {exc.strerror or exc}") from exc
        try:
            key = serialization.load_pem_private_key(data, password=None)
        except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
            # TypeError: the key is encrypted; ValueError: not PEM or corrupt.
            raise DkimKeyError(
                f"DKIM key {path} is not an unencrypted PEM private key: {exc}"
            ) from exc
        if not isinstance(key, rsa.RSAPrivateKey):
            raise DkimKeyError(
                f"DKIM key {path} is a {type(key).__name__}, not an RSA private key"
            )
        try:
            return cls(domain=domain, selector=selector, private_key=key)
        except DkimKeyError as exc:
            raise DkimKeyError(f"DKIM key {path}: {exc}") from exc


def _check_names(domain: str, selector: str) -> None:
    for what, value in (("domain", domain), ("selector", selector)):
        if not _DNS_NAME.match(value) or len(value) > 253:
            raise DkimKeyError(f"DKIM {what} {value!r} is not a valid DNS name")


@dataclass(frozen=True, slots=True)
class Ed25519Key:
    """An Ed25519 private key for a second signature (RFC 8463), and the DNS name of its public half.

    A class of its own rather than a wider ``DkimKey.private_key``, so code
    that needs RSA (ARC sealing, the key-size checks) keeps its exact type.
    """

    domain: str
    selector: str
    private_key: ed25519.Ed25519PrivateKey = field(repr=False)

    def __post_init__(self) -> None:
        _check_names(self.domain, self.selector)
        if not isinstance(self.private_key, ed25519.Ed25519PrivateKey):
            raise DkimKeyError("DKIM Ed25519 key must be an Ed25519 private key")

    @classmethod
    def load(cls, path: Path | str, *, domain: str, selector: str) -> Ed25519Key:
        """Read an Ed25519 key: unencrypted PEM (PKCS#8, what ``generate_ed25519_key``
        and ``openssl genpkey -algorithm ed25519`` write), or the base64 32-byte
        seed that dkimpy's ``dknewkey --ktype ed25519`` writes."""
        path = Path(path)
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise DkimKeyError(f"cannot read DKIM key {path}: {exc.strerror or exc}") from exc
        key: object
        if b"-----BEGIN" in data:
            try:
                key = serialization.load_pem_private_key(data, password=None)
            except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
                raise DkimKeyError(
                    f"DKIM key {path} is not an unencrypted PEM private key: {exc}"
                ) from exc
        else:
            try:
                seed = base64.b64decode(data.strip(), validate=True)
            except binascii.Error:
                seed = b""
            if len(seed) != 32:
                raise DkimKeyError(
                    f"DKIM key {path} is neither a PEM private key nor a base64 Ed25519 seed"
                )
            key = ed25519.Ed25519PrivateKey.from_private_bytes(seed)
        if not isinstance(key, ed25519.Ed25519PrivateKey):
            raise DkimKeyError(
                f"DKIM key {path} is a {type(key).__name__}, not an Ed25519 private key"
            )
        try:
            return cls(domain=domain, selector=selector, private_key=key)
        except DkimKeyError as exc:
            raise DkimKeyError(f"DKIM key {path}: {exc}") from exc


#: One key that signs: one DKIM-Signature.
SigningKey: TypeAlias = DkimKey | Ed25519Key


@dataclass(frozen=True, slots=True)
class KeySet:
    """The keys every copy is signed with: the RSA key, and optionally an Ed25519 key.

    ``sign_message`` adds one DKIM-Signature per key, RSA topmost (see the
    module docstring).  Without ``ed25519`` it signs exactly as the RSA key
    alone does.
    """

    rsa: DkimKey
    ed25519: Ed25519Key | None = None

    def __post_init__(self) -> None:
        if self.ed25519 is not None:
            if self.ed25519.domain != self.rsa.domain:
                raise DkimKeyError("the RSA and Ed25519 keys must sign for the same domain")
            if self.ed25519.selector.lower() == self.rsa.selector.lower():
                # One DNS name cannot usefully hold both records: verifiers
                # read one TXT record per selector (RFC 6376 §3.6.2.2).
                raise DkimKeyError("the RSA and Ed25519 keys need different selectors")

    @classmethod
    def of(cls, key: DkimKey | KeySet) -> KeySet:
        """``key`` as a KeySet (a lone RSA key signs alone)."""
        return key if isinstance(key, KeySet) else cls(key)

    @property
    def keys(self) -> tuple[SigningKey, ...]:
        """The keys in the order their signatures appear, top to bottom."""
        return (self.rsa,) if self.ed25519 is None else (self.rsa, self.ed25519)

    def sign(self, message: bytes, *, body_hash: str | None = None,
             timestamp: int | None = None) -> bytes:
        """The DKIM-Signature header fields for ``message`` (see the module ``sign``)."""
        return sign(message, self, body_hash=body_hash, timestamp=timestamp)

    def sign_message(self, message: bytes, *, body_hash: str | None = None,
                     timestamp: int | None = None) -> bytes:
        """``message`` with its DKIM-Signature header fields prepended."""
        return sign_message(message, self, body_hash=body_hash, timestamp=timestamp)


#: Whatever ``sign`` accepts: one key, or a KeySet (one signature per key).
Signer: TypeAlias = DkimKey | Ed25519Key | KeySet


def load_keys(settings: DkimConfig, domain: str) -> KeySet:
    """The configured keys (``[dkim]``): the RSA key, and the Ed25519 one when
    ``ed25519_private_key`` is set.  Raises ``DkimKeyError``; creates nothing."""
    rsa_key = DkimKey.load(settings.private_key, domain=domain, selector=settings.selector)
    ed_key = None
    if settings.ed25519_private_key is not None:
        ed_key = Ed25519Key.load(settings.ed25519_private_key, domain=domain,
                                 selector=settings.ed25519_selector)
    return KeySet(rsa_key, ed_key)


def generate_key(path: Path | str, *, force: bool = False) -> rsa.RSAPrivateKey:
    """Make a new RSA-2048 key and write it to ``path`` as PKCS#8 PEM, mode 0600.

    The file appears atomically (temporary file, fsync, then link or rename),
    so a crash never leaves a half-written key.  An existing file is kept and
    ``FileExistsError`` raised unless ``force``: replacing a published key
    breaks every signature until DNS is updated.
    """
    path = Path(path)
    if not force and path.exists():
        raise FileExistsError(
            f"DKIM key {path} already exists; refusing to overwrite it (use force to replace it)"
        )
    key = rsa.generate_private_key(public_exponent=65537, key_size=KEY_BITS)
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    _write_secret(path, pem, replace=force)
    return key


def generate_ed25519_key(path: Path | str, *, force: bool = False) -> ed25519.Ed25519PrivateKey:
    """Make a new Ed25519 key and write it to ``path`` as PKCS#8 PEM, mode 0600.

    Written like ``generate_key`` (atomically; an existing file is kept and
    ``FileExistsError`` raised unless ``force``).
    """
    path = Path(path)
    if not force and path.exists():
        raise FileExistsError(
            f"DKIM key {path} already exists; refusing to overwrite it (use force to replace it)"
        )
    key = ed25519.Ed25519PrivateKey.generate()
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    _write_secret(path, pem, replace=force)
    return key


def _write_secret(path: Path, data: bytes, *, replace: bool) -> None:
    try:
        files.write_private(path, data, replace=replace)  # atomic, 0600 from the first byte
    except FileExistsError:
        raise FileExistsError(
            f"DKIM key {path} already exists; refusing to overwrite it (use force to replace it)"
        ) from None


#: What ``dns_txt_value`` and ``dns_txt_record`` accept.
PublishableKey: TypeAlias = (
    rsa.RSAPrivateKey | rsa.RSAPublicKey | ed25519.Ed25519PrivateKey
    | ed25519.Ed25519PublicKey | DkimKey | Ed25519Key
)


def dns_txt_value(key: PublishableKey) -> str:
    """The TXT record value publishing ``key``: ``v=DKIM1; k=rsa; p=...`` (RFC 6376 §3.6.1).

    For RSA ``p=`` is the base64 DER SubjectPublicKeyInfo, the form dkimpy,
    Mail::DKIM and OpenDKIM all read; for Ed25519 (``k=ed25519``) it is the
    base64 of the raw 32-byte public key (RFC 8463 §4.2).
    """
    if isinstance(key, (DkimKey, Ed25519Key)):
        key = key.private_key
    if isinstance(key, (ed25519.Ed25519PrivateKey, ed25519.Ed25519PublicKey)):
        ed_public = key.public_key() if isinstance(key, ed25519.Ed25519PrivateKey) else key
        raw = ed_public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        return "v=DKIM1; k=ed25519; p=" + base64.b64encode(raw).decode("ascii")
    public = key.public_key() if isinstance(key, rsa.RSAPrivateKey) else key
    der = public.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return "v=DKIM1; k=rsa; p=" + base64.b64encode(der).decode("ascii")


def dns_txt_record(key: PublishableKey, selector: str, domain: str) -> str:
    """The zone-file record to publish, e.g.::

        listserv._domainkey.example.org. IN TXT ( "v=DKIM1; k=rsa; "
            "p=MIIBIjANBgkqh...(at most 255 characters)"
            "...rest of p=" )

    A 2048-bit ``p=`` is longer than one TXT string may be (255 octets), so it
    is split; resolvers concatenate the strings (RFC 6376 §3.6.2.2).
    """
    value = dns_txt_value(key)
    head, p = value.split("p=", 1)
    p = "p=" + p
    strings = [head] + [p[i : i + _TXT_CHUNK] for i in range(0, len(p), _TXT_CHUNK)]
    name = f"{selector}._domainkey.{domain.rstrip('.')}."
    body = "\n    ".join(f'"{s}"' for s in strings)
    return f"{name} IN TXT ( {body} )"


# --- body hash ---------------------------------------------------------------


class BodyHasher:
    """Incremental SHA-256 of a body in "simple" canonical form (RFC 6376 §3.4.3).

    Simple canonicalization turns every line ending into CRLF (bare LF is
    accepted, as dkimpy and Mail::DKIM accept it), drops the empty lines at the
    end of the body, and makes the body end in exactly one CRLF (an empty body
    becomes a single CRLF).  Whether a CRLF is "trailing" is only known when
    the body ends, so a run of CRLFs at the end of the data so far is held back
    and hashed only once more content follows; a CR at the very end of a chunk
    is held too, since the next chunk may start with its LF.

    ``copy()`` forks the state, so a shared prefix is hashed once and each
    copy extended with a different suffix.  ``digest()`` does not consume the
    state; ``update()`` may follow it.
    """

    __slots__ = ("_hash", "_crlfs", "_cr")

    def __init__(self, data: bytes = b"") -> None:
        self._hash = hashlib.sha256()
        self._crlfs = 0  # CRLF pairs held back at the end of the data so far
        self._cr = False  # the raw data so far ends with a CR not yet known to be a line end
        if data:
            self.update(data)

    def update(self, data: bytes) -> None:
        """Append the next ``data`` of the body (any split, LF or CRLF line endings)."""
        if self._cr:
            data = b"\r" + data
            self._cr = False
        if data.endswith(b"\r"):
            self._cr = True
            data = data[:-1]
        if not data:
            return
        # CRLF -> LF -> CRLF leaves CRLF alone, turns bare LF into CRLF and
        # leaves bare CR alone, exactly as dkimpy's re.split(b"\r?\n") does.
        data = data.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
        # Now every LF has its CR.  The held-back CRLF run is what follows the
        # last content byte; a bare CR is content.  Data ending in CR (the CR
        # before the held one) has no such run; otherwise the line-ending
        # characters at the end are bare CRs followed by CRLF pairs, and the
        # pairs start after the last "\r\r".
        if data.endswith(b"\r"):
            start = len(data)
        else:
            start = len(data.rstrip(b"\r\n"))
            lone_cr = data.rfind(b"\r\r", start)
            if lone_cr >= 0:
                start = lone_cr + 1
        if start == 0:
            self._crlfs += len(data) // 2
            return
        if self._crlfs:
            # They were empty lines inside the body after all.
            self._hash.update(b"\r\n" * self._crlfs)
        self._hash.update(data[:start])
        self._crlfs = (len(data) - start) // 2

    def copy(self) -> BodyHasher:
        """An independent hasher in the same state."""
        other = BodyHasher.__new__(BodyHasher)
        other._hash = self._hash.copy()
        other._crlfs = self._crlfs
        other._cr = self._cr
        return other

    def digest(self) -> bytes:
        """The SHA-256 of the canonical body seen so far."""
        h = self._hash.copy()
        if self._cr:
            # A CR still held ends the body: it is content, not a line end,
            # so the CRLFs before it were not trailing either.
            h.update(b"\r\n" * self._crlfs + b"\r")
        # The trailing empty lines are dropped and one CRLF ends the body,
        # whether the body ended in CRLFs, in content, or was empty.
        h.update(b"\r\n")
        return h.digest()

    def b64digest(self) -> str:
        """The ``bh=`` value: base64 of ``digest()`` (RFC 6376 §3.5)."""
        return base64.b64encode(self.digest()).decode("ascii")


def body_hash(body: bytes) -> str:
    """The ``bh=`` value of ``body`` (the bytes after the header block).

    Pass it as ``sign(body_hash=...)`` for every copy with this body.
    """
    return BodyHasher(body).b64digest()


# --- signing -----------------------------------------------------------------


def split_message(message: bytes) -> tuple[bytes, bytes]:
    """Split at the first empty line: ``(header block with its last line ending, body)``.

    The empty line itself belongs to neither.  A message without an empty
    line is all header and has an empty body.
    """
    if message.startswith((b"\n", b"\r\n")):
        return b"", message[message.index(b"\n") + 1 :]
    m = _HEADER_END.search(message)
    if m is None:
        return message, b""
    return message[: m.start() + 1], message[m.end() :]


def sign(
    message: bytes,
    key: Signer,
    *,
    body_hash: str | None = None,
    timestamp: int | None = None,
) -> bytes:
    """The ``DKIM-Signature`` header field for ``message``, folded and line-ending-terminated.

    With a ``KeySet`` it is one header field per key (RSA first), all with the
    same ``t=`` and ``bh=``; the headers are parsed and the body hashed once.
    Prepend it to the message (``sign_message`` does).  With ``body_hash``
    (the value ``body_hash()`` or ``BodyHasher.b64digest()`` gave for this
    message's body) the body is not read at all; the caller vouches that the
    hash matches, or the signature will not verify.  ``timestamp`` is ``t=``
    (default: now).  Raises ``DkimMessageError`` for a malformed header block
    or a message without From.
    """
    header_block, body = split_message(message)
    headers = _parse_headers(header_block)
    if not any(name.lower().rstrip() == b"from" for name, _ in headers):
        # RFC 6376 §5.4: the From header field MUST be signed.
        raise DkimMessageError("message has no From header field; it cannot be DKIM-signed")
    if body_hash is None:
        body_hash = BodyHasher(body).b64digest()
    if timestamp is None:
        timestamp = int(time.time())
    canonical = dkim.RelaxedCanonicalization.canonicalize_headers(headers)
    keys = key.keys if isinstance(key, KeySet) else (key,)
    header = b"".join(_signature(canonical, k, body_hash, timestamp) for k in keys)
    if not _uses_crlf(message):
        header = header.replace(b"\r\n", b"\n")
    return header


def _signature(
    canonical_headers: list[tuple[bytes, bytes]], key: SigningKey, body_hash: str, timestamp: int
) -> bytes:
    """One DKIM-Signature header field (CRLF line endings) over already canonicalized headers."""
    unsigned = _unsigned_header(key, body_hash.encode("ascii"), timestamp)
    value = unsigned[len(_HEADER_NAME) + 1 :]

    hasher = hashlib.sha256()
    # §3.7: the signed header fields (bottom-up for repeats, absent ones as
    # null, §5.4.2), then the DKIM-Signature itself without its final CRLF.
    # dkimpy's own routine, so that what we hash is what dkimpy verifies.
    dkim.hash_headers(
        hasher,
        dkim.RelaxedCanonicalization,
        canonical_headers,
        SIGNED_HEADERS,
        (_HEADER_NAME, value),
        None,
    )
    return unsigned + _fold_b(_raw_signature(key, hasher.digest())) + b"\r\n"


def _unsigned_header(key: SigningKey, body_hash: bytes, timestamp: int) -> bytes:
    """The folded DKIM-Signature field (CRLF line endings) up to and including its empty ``b=``."""
    algorithm = b"a=ed25519-sha256" if isinstance(key, Ed25519Key) else b"a=rsa-sha256"
    tags = [
        b"v=1",
        algorithm,
        b"c=relaxed/simple",
        b"d=" + key.domain.encode("ascii"),
        b"s=" + key.selector.encode("ascii"),
        b"t=%d" % timestamp,
        # " : " as dkimpy writes it: FWS around ":" is allowed (§3.5) and
        # gives the folding below places to break.
        b"h=" + b" : ".join(SIGNED_HEADERS),
        b"bh=" + body_hash,
    ]
    lines = _fold_words(b" ".join(tag + b";" for tag in tags).split(b" "))
    # b= starts its own line and is signed empty (§3.5 "b=", §3.7): the hashed
    # form is the header exactly as written, minus the b= value, so the
    # verifier's relaxed canonicalization gives the same bytes.
    return b"\r\n".join(lines) + b"\r\n b="


def _raw_signature(key: SigningKey, header_digest: bytes) -> bytes:
    """The b= value, base64, from the SHA-256 of the header hash input."""
    if isinstance(key, Ed25519Key):
        # RFC 8463 §3: PureEdDSA over the SHA-256 hash of the header data.
        signature = key.private_key.sign(header_digest)
    else:
        signature = key.private_key.sign(
            header_digest, padding.PKCS1v15(), Prehashed(hashes.SHA256())
        )
    return base64.b64encode(signature)


def _fold_b(b64: bytes) -> bytes:
    """The b= value folded after the `` b=`` that ends a line (FWS is allowed
    inside it, §3.5; verifiers strip it with the value)."""
    first = _LINE_MAX - len(b" b=")
    step = _LINE_MAX - 1
    return b"\r\n ".join([b64[:first]] + [b64[i : i + step] for i in range(first, len(b64), step)])


def sign_message(
    message: bytes,
    key: Signer,
    *,
    body_hash: str | None = None,
    timestamp: int | None = None,
) -> bytes:
    """``message`` with its ``DKIM-Signature`` (one per key of a ``KeySet``) prepended (see ``sign``)."""
    return sign(message, key, body_hash=body_hash, timestamp=timestamp) + message


#: The names a per-copy header may have for ``HeaderTemplate``'s fast path:
#: what dkimpy's parser takes as a whole field name (printable ASCII, no ":").
_PLAIN_NAME: Final = re.compile(r"[\x21-\x39\x3b-\x7e]+\Z")
_SIGNED_SET: Final = frozenset(SIGNED_HEADERS)
# A stand-in for the bh= value while the DKIM-Signature layout is cached: no
# canonicalization step touches NUL bytes, and no other tag can contain them.
_BH_MARK: Final = b"\x00"


class HeaderTemplate:
    """Sign many copies that share a header block, parsing and canonicalizing it once.

    ``head`` is the shared header block (as ``split_message`` returns it);
    each copy is ``head`` followed by its own few header fields, rendered as
    ``Name: value`` lines ending in CRLF (``render``), then the empty line
    and its body.  ``sign(per_copy_headers, body_hash)`` returns what
    ``sign(head + render(per_copy_headers) + b"\\r\\n" + body, key,
    body_hash=body_hash, timestamp=...)`` returns, byte for byte: the
    DKIM-Signature field(s) to put on top of the copy.

    RFC 6376 §5.4.2: the header hash input is, for each name of ``h=`` in
    order, the relaxed canonical form (§3.4.2) of that name's bottom-most
    instance not yet used (a name with no instance left adds nothing: the
    oversigned From, absent headers signed as null), then the DKIM-Signature
    field with an empty b= and without its final CRLF.  The per-copy fields
    come after ``head``, so they are the bottom-most instances.  Per post the
    shared fields are parsed and canonicalized (by dkimpy, as ``sign`` does)
    and, per set of per-copy names, the hash input is laid out with the
    SHA-256 state over its shared beginning kept; per copy only its own
    fields are canonicalized and the rest hashed.  The DKIM-Signature's
    layout is made once per ``t=`` value.

    Unusual input (a per-copy name that is not a plain field name, a value
    with a line break, a head without a final line ending) takes the general
    path, ``sign`` on the assembled header block, so the result is always
    the same.
    """

    __slots__ = ("head", "key", "keys", "_general", "_error", "_crlf", "_has_from",
                 "_shared", "_plans", "_sig_layouts")

    def __init__(self, head: bytes, key: Signer) -> None:
        self.head = head
        self.key = key
        self.keys: tuple[SigningKey, ...] = key.keys if isinstance(key, KeySet) else (key,)
        self._crlf = _uses_crlf(head)
        # A head that does not end in a line ending runs into the copy's own
        # fields: nothing to precompute, every copy takes the general path.
        self._general = bool(head) and not head.endswith(b"\n")
        self._error: DkimMessageError | None = None
        # Bottom-up canonical instances ("name:value\r\n") of each signed name.
        self._shared: dict[bytes, list[bytes]] = {}
        self._has_from = False
        # Per tuple of per-copy names: (their encoded lowercase names, the
        # SHA-256 state over the shared beginning of the hash input, the rest:
        # shared bytes, or the index of a per-copy field).
        self._plans: dict[tuple[str, ...], tuple[tuple[bytes, ...], _Hash, tuple[bytes | int, ...]]] = {}
        # (t=, len(bh=)) -> per key: unsigned field before/after bh=, and its
        # canonical hash input before/after bh=.
        self._sig_layouts: tuple[tuple[int, int], tuple[tuple[bytes, bytes, bytes, bytes], ...]] | None = None
        if self._general:
            return
        try:
            headers = _parse_headers(head) if head else []
        except DkimMessageError as exc:
            self._error = exc  # raised per copy, as sign() would
            return
        self._has_from = any(name.lower().rstrip() == b"from" for name, _ in headers)
        for name, value in reversed(dkim.RelaxedCanonicalization.canonicalize_headers(headers)):
            if name in _SIGNED_SET:
                self._shared.setdefault(name, []).append(name + b":" + value)

    @staticmethod
    def render(per_copy_headers: list[tuple[str, str]]) -> bytes:
        """The per-copy header fields as they follow ``head`` in the copy."""
        return b"".join(f"{name}: {value}\r\n".encode() for name, value in per_copy_headers)

    def sign(self, per_copy_headers: list[tuple[str, str]], body_hash: str,
             timestamp: int | None = None) -> bytes:
        """The DKIM-Signature field(s) of the copy with these header fields and this ``bh=``."""
        if self._error is not None:
            raise self._error
        if timestamp is None:
            timestamp = int(time.time())
        if self._general:
            return self._slow(per_copy_headers, body_hash, timestamp)
        names = tuple(name for name, _ in per_copy_headers)
        plan = self._plans.get(names)
        if plan is None:
            plan = self._plan(names)
        lowered, prefix, rest = plan
        if len(lowered) != len(names):  # a name that is not a plain field name
            return self._slow(per_copy_headers, body_hash, timestamp)
        canonical: list[bytes] = []
        for lname, (_, value) in zip(lowered, per_copy_headers):
            v = value.encode()
            if b"\r" in v or b"\n" in v:
                return self._slow(per_copy_headers, body_hash, timestamp)
            if b"\t" in v or b"  " in v:
                v = dkim.RelaxedCanonicalization.canonicalize_headers([(lname, b" " + v)])[0][1]
            else:
                v = v.strip() + b"\r\n"
            canonical.append(lname + b":" + v)
        if not self._has_from and b"from" not in lowered:
            raise DkimMessageError("message has no From header field; it cannot be DKIM-signed")
        hasher = prefix.copy()
        hasher.update(b"".join([canonical[part] if isinstance(part, int) else part for part in rest]))
        bh = body_hash.encode("ascii")
        layouts = self._layouts(timestamp, len(bh))
        out = []
        last = len(self.keys) - 1
        for n, (key, (u_pre, u_post, c_pre, c_post)) in enumerate(zip(self.keys, layouts)):
            h = hasher if n == last else hasher.copy()
            h.update(c_pre + bh + c_post)
            out.append(u_pre + bh + u_post + _fold_b(_raw_signature(key, h.digest())) + b"\r\n")
        header = b"".join(out)
        return header if self._crlf else header.replace(b"\r\n", b"\n")

    def _slow(self, per_copy_headers: list[tuple[str, str]], body_hash: str, timestamp: int) -> bytes:
        message = self.head + self.render(per_copy_headers) + b"\r\n"
        return sign(message, self.key, body_hash=body_hash, timestamp=timestamp)

    def _plan(self, names: tuple[str, ...]) -> tuple[tuple[bytes, ...], _Hash, tuple[bytes | int, ...]]:
        empty = hashlib.sha256()
        if not all(_PLAIN_NAME.match(name) for name in names):
            plan: tuple[tuple[bytes, ...], _Hash, tuple[bytes | int, ...]] = ((), empty, ())
        else:
            lowered = tuple(name.encode("ascii").lower() for name in names)
            # Bottom-up: the per-copy fields (bottom-most first), then the shared ones.
            instances: dict[bytes, list[bytes | int]] = {}
            for index in reversed(range(len(lowered))):
                instances.setdefault(lowered[index], []).append(index)
            for name, shared in self._shared.items():
                instances.setdefault(name, []).extend(shared)
            used: dict[bytes, int] = {}
            parts: list[bytes | int] = []
            for name in SIGNED_HEADERS:
                k = used.get(name, 0)
                used[name] = k + 1
                available = instances.get(name, [])
                if k < len(available):
                    part = available[k]
                    if parts and isinstance(part, bytes) and isinstance(parts[-1], bytes):
                        parts[-1] += part
                    else:
                        parts.append(part)
            prefix = empty
            first = parts[0] if parts else 0
            if isinstance(first, bytes):
                prefix.update(first)
                del parts[0]
            plan = (lowered, prefix, tuple(parts))
        if len(self._plans) < 16:
            self._plans[names] = plan
        return plan

    def _layouts(self, timestamp: int, bh_len: int) -> tuple[tuple[bytes, bytes, bytes, bytes], ...]:
        cached = self._sig_layouts
        if cached is not None and cached[0] == (timestamp, bh_len):
            return cached[1]
        layouts = []
        mark = _BH_MARK * bh_len
        for key in self.keys:
            unsigned = _unsigned_header(key, mark, timestamp)
            # What dkim.hash_headers feeds the hash for the signature field.
            value = dkim.RE_BTAG.sub(b"\\1", unsigned[len(_HEADER_NAME) + 1 :])
            ((cname, cvalue),) = dkim.RelaxedCanonicalization.canonicalize_headers(
                [(_HEADER_NAME, value)])
            hashed = cname + b":" + cvalue.rstrip()
            u_pre, u_post = unsigned.split(mark)
            c_pre, c_post = hashed.split(mark)
            layouts.append((u_pre, u_post, c_pre, c_post))
        self._sig_layouts = ((timestamp, bh_len), tuple(layouts))
        return self._sig_layouts[1]


def _parse_headers(header_block: bytes) -> list[tuple[bytes, bytes]]:
    # dkimpy's parser, so that headers are split and unfolded exactly as its
    # verifier will split them.
    try:
        headers, _ = dkim.rfc822_parse(header_block)
    except dkim.MessageFormatError as exc:
        raise DkimMessageError(f"malformed header block: {exc}") from exc
    except IndexError:
        # A continuation line before any header field.
        raise DkimMessageError(
            "malformed header block: it starts with a continuation line"
        ) from None
    return [(bytes(name), bytes(value)) for name, value in headers]


def _fold_words(words: list[bytes]) -> list[bytes]:
    """Pack words into ``DKIM-Signature:`` lines of at most 78 characters.

    Breaks only where there was a space (replaced by CRLF + space), so
    unfolding restores the text exactly (RFC 5322 §2.2.3).
    """
    lines = [_HEADER_NAME + b":"]
    for word in words:
        if len(lines[-1]) + 1 + len(word) > _LINE_MAX:
            lines.append(b" " + word)
        else:
            lines[-1] += b" " + word
    return lines


def _uses_crlf(message: bytes) -> bool:
    end = message.find(b"\n")
    return end < 0 or message[end - 1 : end] == b"\r"
