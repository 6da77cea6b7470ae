"""Tests for listserv.dkim: signatures must verify with dkimpy and with Mail::DKIM (Perl).

Pure tests: no network (DNS is a fake function / a key file for the Perl
verifier), one temporary key per module.
"""

from __future__ import annotations

import base64
import hashlib
import os
import random
import re
import shutil
import stat
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import dkim
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from listserv.dkim import (
    SIGNED_HEADERS,
    BodyHasher,
    DkimKey,
    DkimKeyError,
    DkimMessageError,
    Ed25519Key,
    HeaderTemplate,
    KeySet,
    body_hash,
    dns_txt_record,
    dns_txt_value,
    generate_ed25519_key,
    generate_key,
    sign,
    sign_message,
    split_message,
)

pytestmark = pytest.mark.one_backend  # runs once: see pyproject's markers

DOMAIN = "lists.example.org"
SELECTOR = "listserv"
DNS_NAME = f"{SELECTOR}._domainkey.{DOMAIN}"
T0 = 1_700_000_000

REPO = Path(__file__).resolve().parent.parent
SHARED = Path(os.environ.get("LISTSERV_SHARED", REPO.parent / "shared"))
VERIFY_PL = SHARED / "tools" / "verify_dkim.pl"
CORPORA = SHARED / "corpora"


# --- fixtures ----------------------------------------------------------------


@pytest.fixture(scope="module")
def key_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("dkim") / "dkim.key"
    generate_key(path)
    return path


@pytest.fixture(scope="module")
def key(key_path: Path) -> DkimKey:
    return DkimKey.load(key_path, domain=DOMAIN, selector=SELECTOR)


@pytest.fixture(scope="module")
def txt_file(key: DkimKey, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("dns") / "txt"
    path.write_text(dns_txt_value(key))
    return path


DnsFunc = Callable[..., "bytes | None"]


@pytest.fixture(scope="module")
def dnsfunc(key: DkimKey) -> DnsFunc:
    record = dns_txt_value(key).encode("ascii")

    def fake(name: bytes, timeout: int = 5) -> bytes | None:
        # dkimpy asks for b"<s>._domainkey.<d>." (bytes, trailing dot).
        return record if name == f"{DNS_NAME}.".encode() else None

    return fake


def _perl_missing() -> str | None:
    if not VERIFY_PL.is_file():
        return f"{VERIFY_PL} is absent (set LISTSERV_SHARED)"
    if shutil.which("perl") is None:
        return "perl is not installed"
    for module in ("Mail::DKIM", "Net::DNS"):
        if subprocess.run(["perl", f"-M{module}", "-e1"], capture_output=True).returncode:
            return f"perl module {module} is missing (apt install libmail-dkim-perl)"
    return None


PERL_MISSING = _perl_missing()
needs_perl = pytest.mark.skipif(PERL_MISSING is not None, reason=str(PERL_MISSING))


@pytest.fixture
def perl_verify(tmp_path: Path, txt_file: Path) -> Iterator[Callable[[bytes], bool]]:
    counter = iter(range(1_000_000))

    def run(message: bytes) -> bool:
        if not message.endswith(b"\n"):
            # On the wire DATA always ends in CRLF (RFC 5321 §4.1.1.4), which
            # leaves a simple body hash unchanged (§3.4.3 adds that CRLF); the
            # verifier script does not add it for a file lacking it.
            message += b"\r\n"
        eml = tmp_path / f"m{next(counter)}.eml"
        eml.write_bytes(message)
        proc = subprocess.run(
            ["perl", str(VERIFY_PL), str(eml), f"{DNS_NAME}={txt_file}"],
            capture_output=True,
            text=True,
        )
        assert proc.returncode in (0, 1), proc.stderr
        return proc.returncode == 0

    yield run


# --- messages ----------------------------------------------------------------

POLISH_SUBJECT = "=?UTF-8?B?" + base64.b64encode("Zażółć gęślą jaźń".encode()).decode() + "?="

MESSAGES: dict[str, bytes] = {
    "ascii": (
        b"From: Alice <alice@example.com>\r\n"
        b"To: test@lists.example.org\r\n"
        b"Subject: [test] Hello\r\n"
        b"Date: Tue, 14 Nov 2023 22:13:20 +0000\r\n"
        b"Message-ID: <abc@example.com>\r\n"
        b"List-Id: <test.lists.example.org>\r\n"
        b"\r\n"
        b"Hello, list.\r\n"
    ),
    "polish_8bit": (
        b"From: =?UTF-8?Q?Pawe=C5=82?= <pawel@example.pl>\r\n"
        b"To: test@lists.example.org\r\n"
        b"Subject: " + POLISH_SUBJECT.encode() + b"\r\n"
        b"MIME-Version: 1.0\r\n"
        b"Content-Type: text/plain; charset=UTF-8\r\n"
        b"Content-Transfer-Encoding: 8bit\r\n"
        b"\r\n" + "Zażółć gęślą jaźń\r\nŹdźbło\r\n".encode()
    ),
    "lf_only": (
        b"From: bob@example.com\n"
        b"To: test@lists.example.org\n"
        b"Subject: LF line endings\n"
        b"\n"
        b"line one\n"
        b"line two\n"
    ),
    "trailing_blank_lines": (
        b"From: bob@example.com\r\n"
        b"Subject: blanks\r\n"
        b"\r\n"
        b"text\r\n"
        b"\r\n"
        b"\r\n"
        b"\r\n"
    ),
    "folded_headers": (
        b"From: Carol\r\n"
        b"\t<carol@example.com>\r\n"
        b"To: a@example.com,\r\n"
        b"    b@example.com,\r\n"
        b"\tc@example.com\r\n"
        b"Subject:   a subject that is\r\n"
        b"   folded    over lines  \r\n"
        b"Content-Type: text/plain;\r\n"
        b" charset=us-ascii\r\n"
        b"\r\n"
        b"  body with   odd spacing  \r\n"
        b"\ttabs\t\r\n"
    ),
    "repeated_headers": (
        b"Received: from a by b; Tue, 14 Nov 2023 22:13:20 +0000\r\n"
        b"Cc: first@example.com\r\n"
        b"From: dave@example.com\r\n"
        b"Received: from c by d; Tue, 14 Nov 2023 22:13:21 +0000\r\n"
        b"Cc: second@example.com\r\n"
        b"Subject: two Cc\r\n"
        b"\r\n"
        b"body\r\n"
    ),
    "no_final_newline": b"From: e@example.com\r\nSubject: x\r\n\r\nno newline at the end",
    "empty_body": b"From: e@example.com\r\nSubject: empty\r\n\r\n",
    "no_body_at_all": b"From: e@example.com\r\nSubject: headers only\r\n",
    "only_blank_lines": b"From: e@example.com\n\n\n\n\n",
    "bare_cr_in_body": b"From: e@example.com\r\n\r\na\rb\r\r\nc\r",
}


@pytest.mark.parametrize("name", MESSAGES)
def test_signature_verifies_with_dkimpy(name: str, key: DkimKey, dnsfunc: DnsFunc) -> None:
    signed = sign_message(MESSAGES[name], key)
    assert dkim.verify(signed, dnsfunc=dnsfunc)


@needs_perl
@pytest.mark.parametrize("name", MESSAGES)
def test_signature_verifies_with_mail_dkim(
    name: str, key: DkimKey, perl_verify: Callable[[bytes], bool]
) -> None:
    assert perl_verify(sign_message(MESSAGES[name], key))


def test_header_shape(key: DkimKey) -> None:
    header = sign(MESSAGES["ascii"], key, timestamp=T0)
    assert header.startswith(b"DKIM-Signature: ")
    assert header.endswith(b"\r\n")
    lines = header.split(b"\r\n")[:-1]
    assert all(len(line) <= 78 for line in lines)
    assert all(line.startswith(b" ") for line in lines[1:])
    tags = dkim.util.parse_tag_value(header.split(b":", 1)[1])
    assert tags[b"v"] == b"1"
    assert tags[b"a"] == b"rsa-sha256"
    assert tags[b"c"] == b"relaxed/simple"
    assert tags[b"d"] == DOMAIN.encode()
    assert tags[b"s"] == SELECTOR.encode()
    assert tags[b"t"] == str(T0).encode()
    assert b"l" not in tags and b"i" not in tags
    h = [x.strip() for x in tags[b"h"].split(b":")]
    assert tuple(h) == SIGNED_HEADERS
    assert h.count(b"from") == 2  # oversigned
    assert len(base64.b64decode(re.sub(rb"\s+", b"", tags[b"b"]))) == 256  # RSA-2048


def test_header_follows_message_line_ending(key: DkimKey) -> None:
    lf = sign(MESSAGES["lf_only"], key)
    assert b"\r" not in lf and lf.endswith(b"\n")
    crlf = sign(MESSAGES["ascii"], key)
    assert crlf.count(b"\n") == crlf.count(b"\r\n")


def test_signature_is_deterministic(key: DkimKey) -> None:
    # RSASSA-PKCS1-v1_5 is deterministic: same input, same bytes.
    msg = MESSAGES["polish_8bit"]
    assert sign(msg, key, timestamp=T0) == sign(msg, key, timestamp=T0)


def test_lf_and_crlf_copies_sign_alike(key: DkimKey, dnsfunc: DnsFunc) -> None:
    crlf = MESSAGES["folded_headers"]
    lf = crlf.replace(b"\r\n", b"\n")
    assert sign(lf, key, timestamp=T0) == sign(crlf, key, timestamp=T0).replace(b"\r\n", b"\n")
    # The SMTP sender converts to CRLF; the signature still holds.
    assert dkim.verify(sign_message(lf, key).replace(b"\n", b"\r\n"), dnsfunc=dnsfunc)


# --- tampering must fail -----------------------------------------------------

TAMPERINGS: dict[str, Callable[[bytes], bytes]] = {
    "subject": lambda m: m.replace(b"Subject: [test] Hello", b"Subject: [test] Hellp"),
    "body": lambda m: m.replace(b"Hello, list.", b"Hello, lisT."),
    "body_appended": lambda m: m + b"-- \r\nspam\r\n",
    "from_added_on_top": lambda m: _after_signature(m, b"From: mallory@evil.example\r\n"),
    "cc_added": lambda m: _after_signature(m, b"Cc: someone@evil.example\r\n"),
    "reply_to_added": lambda m: _after_signature(m, b"Reply-To: mallory@evil.example\r\n"),
    "signed_header_removed": lambda m: m.replace(b"List-Id: <test.lists.example.org>\r\n", b""),
}


def _after_signature(signed: bytes, header: bytes) -> bytes:
    # Insert right below our DKIM-Signature (where an attacker or MTA would add it).
    end = re.search(rb"\r\n(?! )", signed)
    assert end is not None
    return signed[: end.end()] + header + signed[end.end() :]


@pytest.mark.parametrize("how", TAMPERINGS)
def test_tampered_message_fails_dkimpy(how: str, key: DkimKey, dnsfunc: DnsFunc) -> None:
    signed = sign_message(MESSAGES["ascii"], key)
    assert dkim.verify(signed, dnsfunc=dnsfunc)
    tampered = TAMPERINGS[how](signed)
    assert tampered != signed
    assert not dkim.verify(tampered, dnsfunc=dnsfunc)


@needs_perl
@pytest.mark.parametrize("how", TAMPERINGS)
def test_tampered_message_fails_mail_dkim(
    how: str, key: DkimKey, perl_verify: Callable[[bytes], bool]
) -> None:
    signed = sign_message(MESSAGES["ascii"], key)
    assert perl_verify(signed)
    assert not perl_verify(TAMPERINGS[how](signed))


@pytest.mark.parametrize(
    "change",
    [
        pytest.param(lambda m: m + b"\r\n\r\n", id="trailing_blank_lines_added"),
        pytest.param(lambda m: _after_signature(m, b"X-Spam-Score: 0\r\n"), id="unsigned_header"),
        pytest.param(
            lambda m: m.replace(b"Subject: [test] Hello", b"Subject:  [test]\r\n\t Hello "),
            id="subject_refolded",
        ),
    ],
)
def test_harmless_changes_still_verify(
    change: Callable[[bytes], bytes], key: DkimKey, dnsfunc: DnsFunc
) -> None:
    signed = sign_message(MESSAGES["ascii"], key)
    assert dkim.verify(change(signed), dnsfunc=dnsfunc)


def test_wrong_key_fails(key: DkimKey, tmp_path: Path) -> None:
    other = generate_key(tmp_path / "other.key")
    record = dns_txt_value(other).encode()
    signed = sign_message(MESSAGES["ascii"], key)
    assert not dkim.verify(signed, dnsfunc=lambda name, timeout=5: record)


# --- body hash reuse ---------------------------------------------------------


def _reference_bh(body: bytes) -> str:
    """bh= as dkimpy computes it when it signs or verifies a message with this body."""
    _, parsed = dkim.rfc822_parse(b"From: x\r\n\r\n" + body)
    canon = dkim.canonicalization.Simple.canonicalize_body(parsed)
    return base64.b64encode(hashlib.sha256(canon).digest()).decode()


TRICKY_BODIES = [
    b"",
    b"\r\n",
    b"\n",
    b"\r\n\r\n\r\n",
    b"\n\n\r\n\n",
    b"abc",
    b"abc\r\n",
    b"abc\n\n\n",
    b"abc\r\n\r\n\r\ndef\r\n\r\n",
    b"a\rb",
    b"a\r",
    b"a\r\r",
    b"a\r\r\n\r\n",
    b"\r",
    b"\r\r\n",
    b"\n\r",
    b"x\n\ry\n\n",
    "Zażółć gęślą jaźń\n\n".encode(),
    b"  spaced  \t\r\n\r\n",
]


@pytest.mark.parametrize("body", TRICKY_BODIES, ids=repr)
def test_body_hash_matches_dkimpy(body: bytes) -> None:
    assert body_hash(body) == _reference_bh(body)


@pytest.mark.parametrize("body", TRICKY_BODIES, ids=repr)
def test_body_hasher_any_two_way_split(body: bytes) -> None:
    expected = _reference_bh(body)
    for i in range(len(body) + 1):
        h = BodyHasher(body[:i])
        h.update(body[i:])
        assert h.b64digest() == expected, i


def test_body_hasher_byte_by_byte_and_random_chunks() -> None:
    rng = random.Random(6376)
    alphabet = [b"a", b" ", b"\r", b"\n", b"\r\n", b"\r\n\r\n", "ż".encode()]
    for _ in range(2000):
        body = b"".join(rng.choice(alphabet) for _ in range(rng.randrange(0, 30)))
        expected = _reference_bh(body)
        one = BodyHasher()
        for b in body:
            one.update(bytes([b]))
        assert one.b64digest() == expected, body
        chunked = BodyHasher()
        i = 0
        while i < len(body):
            n = rng.randrange(0, 6)  # empty chunks included
            chunked.update(body[i : i + n])
            i += n
        assert chunked.b64digest() == expected, body


def test_prefix_copy_plus_suffix_equals_one_shot() -> None:
    # The per-recipient footer case: shared prefix hashed once, forked per member.
    # The prefix ends inside a trailing CRLF run and with a dangling CR on purpose.
    prefix = "Treść wiadomości.\r\n\r\n\r".encode()
    footers = [b"", b"\n", b"\n-- \r\nUnsubscribe: <mailto:u1@x>\r\n", b"\nfooter\n\n\n"]
    shared = BodyHasher()
    shared.update(prefix[:5])
    shared.update(prefix[5:])
    digests = []
    for footer in footers:
        h = shared.copy()
        h.update(footer)
        digests.append(h.b64digest())
        assert h.b64digest() == body_hash(prefix + footer) == _reference_bh(prefix + footer)
    # All differ: with b"" the dangling CR stays content, with b"\n" it ends a line.
    assert len(set(digests)) == 4
    # Forking left the shared state untouched.
    assert shared.b64digest() == body_hash(prefix)


def test_digest_does_not_consume_state() -> None:
    h = BodyHasher(b"abc\r\n\r\n")
    first = h.digest()
    assert h.digest() == first
    h.update(b"def\r\n")
    assert h.b64digest() == body_hash(b"abc\r\n\r\ndef\r\n")


def test_sign_with_precomputed_body_hash(key: DkimKey, dnsfunc: DnsFunc) -> None:
    msg = MESSAGES["polish_8bit"]
    _, body = split_message(msg)
    bh = body_hash(body)
    assert sign(msg, key, body_hash=bh, timestamp=T0) == sign(msg, key, timestamp=T0)
    # Copies that differ only in headers reuse the hash of the one body.
    for rcpt in (b"one@example.net", b"two@example.net"):
        copy = msg.replace(b"To: test@lists.example.org", b"To: " + rcpt)
        assert dkim.verify(sign_message(copy, key, body_hash=bh), dnsfunc=dnsfunc)


def test_wrong_precomputed_body_hash_fails(key: DkimKey, dnsfunc: DnsFunc) -> None:
    msg = MESSAGES["ascii"]
    signed = sign_message(msg, key, body_hash=body_hash(b"another body\r\n"))
    assert not dkim.verify(signed, dnsfunc=dnsfunc)


def test_personalized_footer_copies_verify(key: DkimKey, dnsfunc: DnsFunc) -> None:
    msg = MESSAGES["polish_8bit"]
    head, body = split_message(msg)
    shared = BodyHasher(body)
    for member in ("ania@example.pl", "bartek@example.pl"):
        footer = f"-- \r\nWypisz się: mailto:leave+{member}\r\n".encode()
        h = shared.copy()
        h.update(footer)
        copy = head + b"\r\n" + body + footer
        assert dkim.verify(sign_message(copy, key, body_hash=h.b64digest()), dnsfunc=dnsfunc)


def test_split_message() -> None:
    assert split_message(b"A: 1\r\nB: 2\r\n\r\nbody\r\n") == (b"A: 1\r\nB: 2\r\n", b"body\r\n")
    assert split_message(b"A: 1\n\n\nbody") == (b"A: 1\n", b"\nbody")
    assert split_message(b"A: 1\r\n") == (b"A: 1\r\n", b"")
    assert split_message(b"\r\nbody") == (b"", b"body")
    assert split_message(b"A: 1\r\r\n\r\nx") == (b"A: 1\r\r\n", b"x")


# --- bad messages ------------------------------------------------------------


def test_message_without_from_is_refused(key: DkimKey) -> None:
    with pytest.raises(DkimMessageError, match="From"):
        sign(b"Subject: x\r\n\r\nbody\r\n", key)


@pytest.mark.parametrize(
    "msg", [b" continued: x\r\nFrom: a@b\r\n\r\n", b"From: a@b\r\nnot a header\r\n\r\n"]
)
def test_malformed_header_block_is_refused(msg: bytes, key: DkimKey) -> None:
    with pytest.raises(DkimMessageError, match="malformed"):
        sign(msg, key)


# --- keys --------------------------------------------------------------------


def test_generate_key_mode_and_format(tmp_path: Path) -> None:
    path = tmp_path / "k.pem"
    made = generate_key(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert made.key_size == 2048
    assert path.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")  # PKCS#8
    assert [p.name for p in tmp_path.iterdir()] == ["k.pem"]  # no temporary left behind
    loaded = DkimKey.load(path, domain=DOMAIN, selector=SELECTOR)
    assert loaded.private_key.private_numbers() == made.private_numbers()


def test_generate_key_refuses_to_overwrite(tmp_path: Path) -> None:
    path = tmp_path / "k.pem"
    generate_key(path)
    before = path.read_bytes()
    with pytest.raises(FileExistsError, match="already exists"):
        generate_key(path)
    assert path.read_bytes() == before
    generate_key(path, force=True)
    assert path.read_bytes() != before
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert [p.name for p in tmp_path.iterdir()] == ["k.pem"]


def test_generate_key_mode_ignores_umask(tmp_path: Path) -> None:
    old = os.umask(0o377)  # would strip the owner's write bit
    try:
        generate_key(tmp_path / "k.pem")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "k.pem").stat().st_mode) == 0o600


def test_load_missing_file_names_path(tmp_path: Path) -> None:
    path = tmp_path / "nope.pem"
    with pytest.raises(DkimKeyError, match=re.escape(str(path))):
        DkimKey.load(path, domain=DOMAIN, selector=SELECTOR)


def test_load_garbage_names_path(tmp_path: Path) -> None:
    path = tmp_path / "bad.pem"
    path.write_text("not a key\n")
    with pytest.raises(DkimKeyError, match=re.escape(str(path))):
        DkimKey.load(path, domain=DOMAIN, selector=SELECTOR)


def test_load_non_rsa_key_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "ec.pem"
    path.write_bytes(
        ec.generate_private_key(ec.SECP256R1()).private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    with pytest.raises(DkimKeyError, match="not an RSA"):
        DkimKey.load(path, domain=DOMAIN, selector=SELECTOR)


def test_load_encrypted_key_is_refused(tmp_path: Path, key: DkimKey) -> None:
    path = tmp_path / "enc.pem"
    path.write_bytes(
        key.private_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"secret"),
        )
    )
    with pytest.raises(DkimKeyError, match="unencrypted"):
        DkimKey.load(path, domain=DOMAIN, selector=SELECTOR)


def test_load_pkcs1_key(tmp_path: Path, key: DkimKey, dnsfunc: DnsFunc) -> None:
    # Keys made by `openssl genrsa` / opendkim-genkey are PKCS#1.
    path = tmp_path / "pkcs1.pem"
    path.write_bytes(
        key.private_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption(),
        )
    )
    again = DkimKey.load(path, domain=DOMAIN, selector=SELECTOR)
    assert dkim.verify(sign_message(MESSAGES["ascii"], again), dnsfunc=dnsfunc)


@pytest.mark.parametrize(
    ("domain", "selector"),
    [("example.org", "bad selector"), ("exa;mple.org", "s"), ("", "s"), ("example.org", "")],
)
def test_bad_domain_or_selector(domain: str, selector: str, key: DkimKey) -> None:
    with pytest.raises(DkimKeyError, match="not a valid DNS name"):
        DkimKey(domain=domain, selector=selector, private_key=key.private_key)


def test_key_repr_hides_private_key(key: DkimKey) -> None:
    assert "private_key" not in repr(key)


# --- DNS record --------------------------------------------------------------


def test_dns_txt_value_is_what_dkimpy_reads(key: DkimKey) -> None:
    value = dns_txt_value(key)
    assert value.startswith("v=DKIM1; k=rsa; p=")
    pk, keysize, ktag, _ = dkim.evaluate_pk(b"x", value.encode())
    assert (keysize, ktag) == (2048, b"rsa")
    numbers = key.private_key.public_key().public_numbers()
    assert pk["modulus"] == numbers.n and pk["publicExponent"] == numbers.e
    assert dns_txt_value(key.private_key) == dns_txt_value(key.private_key.public_key()) == value


def test_dns_txt_record(key: DkimKey) -> None:
    record = dns_txt_record(key.private_key, SELECTOR, DOMAIN)
    assert record.startswith(f"{DNS_NAME}. IN TXT ( ")
    assert record.endswith(" )")
    strings = re.findall(r'"([^"]*)"', record)
    assert len(strings) >= 3
    assert all(len(s) <= 255 for s in strings)
    assert "".join(strings) == dns_txt_value(key)


# --- real-world mail ---------------------------------------------------------


def _corpus() -> list[Path]:
    files: list[Path] = []
    for folder, pattern in (("cpython_test_email", "msg_*.txt"), ("polish_nonascii_real", "*.eml")):
        files += sorted((CORPORA / folder).glob(pattern))
    return files


def test_corpus_signs_and_verifies(
    key: DkimKey, dnsfunc: DnsFunc, perl_verify: Callable[[bytes], bool]
) -> None:
    files = _corpus()
    if not files:
        pytest.skip(f"no corpora under {CORPORA} (set LISTSERV_SHARED)")
    signed_count = 0
    failures: list[str] = []
    for i, path in enumerate(files):
        msg = path.read_bytes()
        try:
            signed = sign_message(msg, key)
        except DkimMessageError:
            continue  # no From, or not a message at all: refused, which is fine
        signed_count += 1
        if not dkim.verify(signed, dnsfunc=dnsfunc):
            failures.append(f"dkimpy: {path.name}")
        # Mail::DKIM also checks signatures the message already carries (their
        # keys are not in our fake DNS), so only unsigned messages; a sample, for time.
        head, _ = split_message(msg)
        if PERL_MISSING is None and i % 4 == 0 and b"dkim-signature" not in head.lower():
            if not perl_verify(signed):
                failures.append(f"Mail::DKIM: {path.name}")
    assert not failures
    assert signed_count > len(files) * 0.9


# --- HeaderTemplate: the shared headers canonicalized once per post ------------


ED_SELECTOR = "listserv-ed"


@pytest.fixture(scope="module")
def keyset(key: DkimKey, tmp_path_factory: pytest.TempPathFactory) -> KeySet:
    path = tmp_path_factory.mktemp("ed") / "ed25519.key"
    generate_ed25519_key(path)
    return KeySet(key, Ed25519Key.load(path, domain=DOMAIN, selector=ED_SELECTOR))


def _keyset_dnsfunc(keys: KeySet) -> DnsFunc:
    zone = {f"{k.selector}._domainkey.{k.domain}.".encode(): dns_txt_value(k).encode() for k in keys.keys}

    def fake(name: bytes, timeout: int = 5) -> bytes | None:
        return zone.get(name)

    return fake


TEMPLATE_HEADS: dict[str, bytes] = {
    **{name: split_message(msg)[0] for name, msg in MESSAGES.items() if b"\n\n" not in split_message(msg)[0]},
    "list_post": (
        b"Received: from mx.gmina.pl by lists.example.org; Tue, 14 Nov 2023 22:13:20 +0000\r\n"
        b"From: =?UTF-8?Q?Ma=C5=82gorzata_Wi=C5=9Bniewska?= <m@gmina.pl>\r\n"
        b"Cc: rada@gmina.pl,\r\n"
        b"\tsoltys@gmina.pl\r\n"
        b"Received: from [10.0.0.2] by mx.gmina.pl; Tue, 14 Nov 2023 22:13:19 +0000\r\n"
        b"To: dyskusja@lists.example.org\r\n"
        b"Cc:   second   cc@gmina.pl  \r\n"
        b"Subject: [dyskusja] " + POLISH_SUBJECT.encode() + b"\r\n"
        b" =?UTF-8?Q?=C5=BB=C3=B3=C5=82w?=\r\n"
        b"Date: Tue, 14 Nov 2023 22:13:20 +0000\r\n"
        b"Message-ID: <abc@gmina.pl>\r\n"
        b"Reply-To: dyskusja@lists.example.org\r\n"
        b"MIME-Version: 1.0\r\n"
        b"Content-Type: text/plain;\r\n"
        b"    charset=\"utf-8\"\r\n"
        b"List-Id: Dyskusja <dyskusja.lists.example.org>\r\n"
        b"List-Post: <mailto:dyskusja@lists.example.org>\r\n"
        b"List-Archive: <https://lists.example.org/dyskusja/>\r\n"
        b"Archived-At: <https://lists.example.org/dyskusja/abc>\r\n"
        b"X-Unsigned:\tkept  as is\r\n"
    ),
    "shared_unsubscribe_too": (
        b"From: a@example.com\r\n"
        b"List-Unsubscribe: <mailto:shared-leave@lists.example.org>\r\n"
        b"Subject: the copy adds a second one below\r\n"
    ),
    "two_froms": b"From: first@example.com\r\nSubject: s\r\nFrom: second@example.com\r\n",
    "lf_polish": b"From: pawel@example.pl\nSubject: " + POLISH_SUBJECT.encode() + b"\n\tfolded\n",
    "mbox_from_line": b"From nobody Tue Nov 14 22:13:20 2023\r\nFrom: e@example.com\r\n",
    "empty": b"",
    "no_from": b"Subject: only the copy adds From\r\n",
}

PER_COPY: dict[str, list[tuple[str, str]]] = {
    "none": [],
    "mailto": [("List-Unsubscribe", "<mailto:dyskusja-leave+abcdefghijklmnopqrstuvwxyz@lists.example.org>")],
    "one_click": [
        ("List-Unsubscribe", "<https://listy.example.org/u/dyskusja/abcdefghijklmnopqrstuvwxyz>, "
                             "<mailto:dyskusja-leave+abcdefghijklmnopqrstuvwxyz@lists.example.org>"),
        ("List-Unsubscribe-Post", "List-Unsubscribe=One-Click"),
    ],
    "odd_spacing": [("list-unsubscribe", "  <mailto:x@y>,\t\t<https://z/>  "), ("LIST-UNSUBSCRIBE-POST", "")],
    "cc_and_from": [("Cc", "third@example.com"), ("From", "copy@example.com"), ("Cc", "fourth@example.com")],
    "polish_value": [("Subject", "Zażółć gęślą jaźń"), ("X-Other", "ignored")],
    "edge_spaces": [("List-Unsubscribe", " <mailto:lead@x>"), ("List-Unsubscribe-Post", "trail \x0b")],
    # These take the general path: not a plain field name, a line break in a value.
    "name_with_space": [("Bad Name", "x")],
    "folded_value": [("List-Unsubscribe", "<mailto:a@b>,\r\n <https://c/>")],
}


def _bh(body: bytes) -> str:
    return body_hash(body)


@pytest.mark.parametrize("signer_kind", ["rsa", "keyset"])
def test_header_template_is_byte_identical_to_sign(signer_kind: str, key: DkimKey, keyset: KeySet) -> None:
    signer: DkimKey | KeySet = key if signer_kind == "rsa" else keyset
    body = "Treść.\r\n-- \r\nWypisz się: https://listy.example.org/u/x\r\n".encode()
    bh = _bh(body)
    compared = 0
    for head_name, head in TEMPLATE_HEADS.items():
        template = HeaderTemplate(head, signer)
        for pc_name, per_copy in PER_COPY.items():
            for t in (T0, T0 + 1, 9_999_999_999):  # t= of another length refolds the field
                message = head + HeaderTemplate.render(per_copy) + b"\r\n" + body
                try:
                    expected = sign(message, signer, body_hash=bh, timestamp=t)
                except DkimMessageError as exc:
                    with pytest.raises(DkimMessageError, match=re.escape(str(exc)[:20])):
                        template.sign(per_copy, bh, t)
                    continue
                got = template.sign(per_copy, bh, t)
                assert got == expected, (head_name, pc_name, t)
                compared += 1
    assert compared > 100
    # Both signatures with a KeySet, each a field of its own, RSA on top.
    if signer_kind == "keyset":
        got = HeaderTemplate(TEMPLATE_HEADS["list_post"], keyset).sign(PER_COPY["one_click"], bh, T0)
        assert got.count(b"DKIM-Signature:") == 2
        assert got.index(b"a=rsa-sha256") < got.index(b"a=ed25519-sha256")


def test_header_template_random_messages(key: DkimKey, keyset: KeySet) -> None:
    rng = random.Random(5)
    names = ["From", "To", "Cc", "Subject", "Date", "Message-ID", "Reply-To", "Received", "List-Id",
             "List-Unsubscribe", "List-Unsubscribe-Post", "List-Post", "Archived-At", "X-Mailer", "content-type"]
    values = ["a@example.com", " spaced  out ", "\tTabbed\tvalue", POLISH_SUBJECT, "Zażółć".encode().decode(),
              "x", "", "<https://example.org/u/l/t>, <mailto:l-leave+t@example.org>",
              " lead", "trail ", "\x0bvt\x0c", " "]
    for _ in range(150):
        lines = []
        for _ in range(rng.randint(0, 12)):
            line = f"{rng.choice(names)}:{rng.choice(['', ' ', '  '])}{rng.choice(values)}".encode()
            if rng.random() < 0.3:
                line += b"\r\n" + rng.choice([b" ", b"\t", b"   "]) + rng.choice(values).encode()
            lines.append(line + b"\r\n")
        head = b"".join(lines)
        per_copy = [(rng.choice(names), rng.choice(values)) for _ in range(rng.randint(0, 3))]
        signer: DkimKey | KeySet = key if rng.random() < 0.5 else keyset
        bh = _bh(b"body %d\r\n" % rng.randint(0, 10**6))
        t = T0 + rng.randint(0, 10**6)
        message = head + HeaderTemplate.render(per_copy) + b"\r\n"
        try:
            expected = sign(message, signer, body_hash=bh, timestamp=t)
        except DkimMessageError:
            with pytest.raises(DkimMessageError):
                HeaderTemplate(head, signer).sign(per_copy, bh, t)
            continue
        assert HeaderTemplate(head, signer).sign(per_copy, bh, t) == expected, (head, per_copy)


def test_header_template_errors_match_sign(key: DkimKey) -> None:
    for head in (b" continued: x\r\nFrom: a@b\r\n", b"From: a@b\r\nnot a header\r\n"):
        with pytest.raises(DkimMessageError, match="malformed"):
            HeaderTemplate(head, key).sign([], _bh(b""), T0)
    with pytest.raises(DkimMessageError, match="From"):
        HeaderTemplate(b"Subject: x\r\n", key).sign([("List-Unsubscribe", "<mailto:a@b>")], _bh(b""), T0)
    # The copy's own From is enough, as for sign().
    assert HeaderTemplate(b"Subject: x\r\n", key).sign([("From", "a@b")], _bh(b""), T0) == sign(
        b"Subject: x\r\nFrom: a@b\r\n\r\n", key, body_hash=_bh(b""), timestamp=T0)


def _personal_copies(signer: DkimKey | KeySet, wire: bool) -> list[bytes]:
    from listserv.fanout import PERSONAL_PLACEHOLDER, PersonalTemplate

    shared = b"List-Unsubscribe: <mailto:dyskusja-leave@lists.example.org>\r\n"
    head = TEMPLATE_HEADS["list_post"] + shared
    body = ("Dzień dobry,\r\n.kropka na początku wiersza\r\n-- \r\nWypisz się: "
            + PERSONAL_PLACEHOLDER + "\r\n").encode()
    template = PersonalTemplate.build("dyskusja", head + b"\r\n" + body, shared)
    copies = []
    for n, member in enumerate(("ania@example.pl", "bartek@example.pl", "celina@example.pl")):
        token = f"token{n}"
        link = f"https://listy.example.org/u/dyskusja/{token}"
        headers = [("List-Unsubscribe", f"<{link}>, <mailto:dyskusja-leave+{token}@lists.example.org>"),
                   ("List-Unsubscribe-Post", "List-Unsubscribe=One-Click")]
        if n == 2:
            headers = headers[:1]  # no base_url: List-Unsubscribe only
        if wire:
            data = template.wire_copy_for(headers, link, signer)
            assert data.endswith(b"\r\n.\r\n")
            # Undo the dot-stuffing (RFC 5321 §4.5.2) to get the message.
            data = data[: -len(b".\r\n")].replace(b"\r\n..", b"\r\n.")
        else:
            data = template.copy_for(headers, link, signer)
        message = head.replace(shared, b"") + HeaderTemplate.render(headers) + b"\r\n" + body.replace(
            PERSONAL_PLACEHOLDER.encode(), link.encode())
        # Byte for byte what dkim.sign() over the whole copy gives (up to t=).
        t = int(re.search(rb"t=(\d+);", data).group(1))  # type: ignore[union-attr]
        assert data == sign(message, signer, timestamp=t) + message
        assert member  # one copy per member
        copies.append(data)
    return copies


@pytest.mark.parametrize("wire", [False, True])
def test_personalized_copies_verify_dkimpy(wire: bool, key: DkimKey, keyset: KeySet, dnsfunc: DnsFunc) -> None:
    for data in _personal_copies(key, wire):
        assert dkim.verify(data, dnsfunc=dnsfunc)
    for data in _personal_copies(keyset, wire):
        for idx in (0, 1):
            assert dkim.DKIM(data).verify(idx=idx, dnsfunc=_keyset_dnsfunc(keyset)), idx
        for idx in (0, 1):
            with pytest.raises(dkim.ValidationError, match="body hash mismatch"):
                dkim.DKIM(data.replace(b"token", b"nekot")).verify(idx=idx, dnsfunc=_keyset_dnsfunc(keyset))


@needs_perl
def test_personalized_copies_verify_mail_dkim(key: DkimKey, perl_verify: Callable[[bytes], bool]) -> None:
    for data in _personal_copies(key, wire=False) + _personal_copies(key, wire=True):
        assert perl_verify(data)
        assert not perl_verify(data.replace(b"token", b"nekot"))
