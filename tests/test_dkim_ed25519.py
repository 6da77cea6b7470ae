"""The optional second DKIM signature with Ed25519 (RFC 8463), beside the RSA one.

dkimpy checks Ed25519 with PyNaCl (the ``test`` extra); the Perl verifier
(Mail::DKIM in Debian 12) may skip the Ed25519 signature as unsupported and
must still pass the RSA one.  End to end: a server with both keys sends every
copy (personalized, shared, notices) with both signatures.
"""

from __future__ import annotations

import base64
import re
import smtplib
import stat
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import dkim as dkimpy
import pytest
from click.testing import CliRunner
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from conftest import DOMAIN, SELECTOR, SinkHandler, free_port, make_config, perl_verifier
from listserv import config as config_mod
from listserv import dkim
from listserv.app import load_or_create_key
from listserv.auth import verify_inbound
from listserv.cli import main
from listserv.dns import DictResolver
from listserv.errors import ConfigError
from listserv.fanout import PersonalTemplate

pytest.importorskip("nacl", reason="dkimpy needs PyNaCl to verify Ed25519 (pip install pynacl)")

ED_SELECTOR = "ed"
T0 = 1_790_000_000
MESSAGE = (
    b"From: Anna Kowalska <anna@gmina-wieliczka.pl>\r\n"
    b"To: financing@lists.example.org\r\n"
    b"Subject: =?utf-8?q?Nab=C3=B3r_ELENA?=\r\n"
    b"Date: Thu, 26 Nov 2026 10:00:00 +0100\r\n"
    b"Message-ID: <p1@gmina-wieliczka.pl>\r\n"
    b"MIME-Version: 1.0\r\n"
    b"Content-Type: text/plain; charset=utf-8\r\n"
    b"\r\n"
    b"Dzie\xc5\x84 dobry,\r\nnab\xc3\xb3r rusza w styczniu.\r\n"
)


@pytest.fixture(scope="module")
def keyset(tmp_path_factory: pytest.TempPathFactory) -> dkim.KeySet:
    d = tmp_path_factory.mktemp("keys")
    dkim.generate_key(d / "dkim.key")
    dkim.generate_ed25519_key(d / "ed25519.key")
    return dkim.KeySet(dkim.DkimKey.load(d / "dkim.key", domain=DOMAIN, selector=SELECTOR),
                       dkim.Ed25519Key.load(d / "ed25519.key", domain=DOMAIN, selector=ED_SELECTOR))


def zone_of(keys: dkim.KeySet) -> dict[str, bytes]:
    return {f"{k.selector}._domainkey.{k.domain}": dkim.dns_txt_value(k).encode() for k in keys.keys}


def dnsfunc_of(keys: dkim.KeySet) -> Callable[..., bytes]:
    zone = zone_of(keys)

    def dnsfunc(name: bytes | str, timeout: int = 5) -> bytes:
        name = name.decode() if isinstance(name, bytes) else name
        return zone.get(name.rstrip("."), b"")

    return dnsfunc


def signatures(data: bytes) -> list[dict[str, str]]:
    """The tags of each DKIM-Signature, top to bottom."""
    head = dkim.split_message(data)[0].replace(b"\r\n", b"\n").decode()
    fields = re.findall(r"^DKIM-Signature:(.*(?:\n[ \t].*)*)", head, re.M | re.I)
    return [{k.strip(): v.strip() for k, _, v in (t.partition("=") for t in re.sub(r"\s+", "", f).split(";") if t)}
            for f in fields]


def dkimpy_verifies_all(data: bytes, keys: dkim.KeySet) -> list[bool]:
    results = []
    for i in range(len(signatures(data))):
        try:
            results.append(bool(dkimpy.DKIM(data).verify(idx=i, dnsfunc=dnsfunc_of(keys))))
        except dkimpy.DKIMException:  # e.g. a body hash mismatch raises rather than returning False
            results.append(False)
    return results


def perl(data: bytes, keys: dkim.KeySet, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    script = perl_verifier()
    msg = tmp_path / f"msg-{time.monotonic_ns()}.eml"
    msg.write_bytes(data)
    args = []
    for name, value in zone_of(keys).items():
        path = tmp_path / f"{name}.txt"
        path.write_bytes(value)
        args.append(f"{name}={path}")
    return subprocess.run(["perl", str(script), str(msg), *args], capture_output=True, text=True)


# -- signing ---------------------------------------------------------------------------------------------


def test_both_signatures_rsa_on_top_same_tags(keyset: dkim.KeySet) -> None:
    signed = keyset.sign_message(MESSAGE, timestamp=T0)
    rsa_sig, ed_sig = signatures(signed)
    assert (rsa_sig["a"], rsa_sig["s"]) == ("rsa-sha256", SELECTOR)
    assert (ed_sig["a"], ed_sig["s"]) == ("ed25519-sha256", ED_SELECTOR)
    for tag in ("v", "c", "d", "t", "h", "bh"):
        assert rsa_sig[tag] == ed_sig[tag], tag
    assert ed_sig["c"] == "relaxed/simple" and ed_sig["t"] == str(T0)
    assert len(base64.b64decode(ed_sig["b"])) == 64
    assert all(len(line) <= 78 for line in signed.split(b"\r\n")[:20])
    assert dkimpy_verifies_all(signed, keyset) == [True, True]
    # The module-level functions take a KeySet as well, and give the same bytes.
    assert dkim.sign_message(MESSAGE, keyset, timestamp=T0) == signed


def test_ed25519_signature_is_eddsa_over_the_header_hash(keyset: dkim.KeySet) -> None:
    # RFC 8463 §3, checked independently of dkimpy: the signature verifies
    # against the SHA-256 of the header data, not the data itself.
    assert keyset.ed25519 is not None
    header = dkim.sign(MESSAGE, keyset.ed25519, timestamp=T0)
    signed = header + MESSAGE
    d = dkimpy.DKIM(signed)
    assert d.verify(dnsfunc=dnsfunc_of(keyset))
    value = header.split(b":", 1)[1]
    import hashlib

    hasher = hashlib.sha256()
    headers, _ = dkimpy.rfc822_parse(signed)
    dkimpy.hash_headers(hasher, dkimpy.RelaxedCanonicalization, dkimpy.RelaxedCanonicalization.canonicalize_headers(
        headers[1:]), list(dkim.SIGNED_HEADERS), (b"DKIM-Signature", value), None)
    b = base64.b64decode(re.sub(rb"\s+", b"", value.split(b"b=")[-1]))
    keyset.ed25519.private_key.public_key().verify(b, hasher.digest())


def test_without_ed25519_the_bytes_are_those_of_the_rsa_key_alone(keyset: dkim.KeySet) -> None:
    alone = dkim.KeySet(keyset.rsa)
    assert alone.keys == (keyset.rsa,)
    assert dkim.sign(MESSAGE, alone, timestamp=T0) == dkim.sign(MESSAGE, keyset.rsa, timestamp=T0)
    assert dkim.KeySet.of(keyset.rsa) == alone and dkim.KeySet.of(keyset) is keyset


def test_lf_message_and_altered_body(keyset: dkim.KeySet) -> None:
    lf = MESSAGE.replace(b"\r\n", b"\n")
    signed = keyset.sign_message(lf)
    assert b"\r" not in signed
    assert dkimpy_verifies_all(signed, keyset) == [True, True]
    assert dkimpy_verifies_all(signed.replace(b"styczniu", b"lutym"), keyset) == [False, False]


def test_personalized_copy_carries_both(keyset: dkim.KeySet) -> None:
    body = b"Tre\xc5\x9b\xc4\x87.\r\n-- \r\nWypisz si\xc4\x99: @@LISTSERV_UNSUBSCRIBE_URL@@\r\n"
    head = MESSAGE.split(b"\r\n\r\n")[0] + b"\r\nList-Unsubscribe: <mailto:financing-leave@lists.example.org>\r\n"
    template = PersonalTemplate.build("financing", head + b"\r\n" + body,
                                      b"List-Unsubscribe: <mailto:financing-leave@lists.example.org>\r\n")
    copy = template.copy_for([("List-Unsubscribe", "<https://listy.example.org/u/financing/TOKEN>"),
                              ("List-Unsubscribe-Post", "List-Unsubscribe=One-Click")],
                             "https://listy.example.org/u/financing/TOKEN", keyset)
    assert [s["a"] for s in signatures(copy)] == ["rsa-sha256", "ed25519-sha256"]
    assert dkimpy_verifies_all(copy, keyset) == [True, True]
    assert dkimpy_verifies_all(copy.replace(b"TOKEN", b"OTHER"), keyset) == [False, False]


async def test_our_inbound_verifier_passes_both(keyset: dkim.KeySet) -> None:
    signed = keyset.sign_message(MESSAGE)
    zone = {name: [value.decode()] for name, value in zone_of(keyset).items()}
    result = await verify_inbound(signed, mail_from="", client_ip="", helo="", resolver=DictResolver(zone))
    assert [v.result for v in result.dkim] == ["pass", "pass"]


def test_perl_verifier_passes_rsa_and_skips_or_passes_ed25519(keyset: dkim.KeySet, tmp_path: Path) -> None:
    result = perl(keyset.sign_message(MESSAGE), keyset, tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert any("a=rsa-sha256 -> pass" in line for line in lines), lines
    assert any("a=ed25519-sha256 -> pass" in line or ("ed25519" in line and "(skipped)" in line)
               for line in lines), lines


# -- keys -----------------------------------------------------------------------------------------------------


def test_key_formats_and_the_dns_record(tmp_path: Path) -> None:
    made = dkim.generate_ed25519_key(tmp_path / "ed.key")
    assert stat.S_IMODE((tmp_path / "ed.key").stat().st_mode) == 0o600
    assert (tmp_path / "ed.key").read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")
    raw = made.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    value = dkim.dns_txt_value(made)
    assert value == "v=DKIM1; k=ed25519; p=" + base64.b64encode(raw).decode()
    assert dkim.dns_txt_value(made.public_key()) == value
    assert dkim.dns_txt_record(made, "ed", DOMAIN) == (
        f'ed._domainkey.{DOMAIN}. IN TXT ( "v=DKIM1; k=ed25519; "\n    "p={base64.b64encode(raw).decode()}" )')
    # dkimpy's dknewkey writes the base64 seed: read that too.
    seed = made.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                              serialization.NoEncryption())
    (tmp_path / "seed.key").write_text(base64.b64encode(seed).decode() + "\n")
    loaded = dkim.Ed25519Key.load(tmp_path / "seed.key", domain=DOMAIN, selector="ed")
    assert dkim.dns_txt_value(loaded) == value
    with pytest.raises(FileExistsError):
        dkim.generate_ed25519_key(tmp_path / "ed.key")


def test_wrong_key_types_are_refused(tmp_path: Path) -> None:
    dkim.generate_key(tmp_path / "rsa.key")
    dkim.generate_ed25519_key(tmp_path / "ed.key")
    with pytest.raises(dkim.DkimKeyError, match="not an Ed25519"):
        dkim.Ed25519Key.load(tmp_path / "rsa.key", domain=DOMAIN, selector="ed")
    with pytest.raises(dkim.DkimKeyError, match="not an RSA"):
        dkim.DkimKey.load(tmp_path / "ed.key", domain=DOMAIN, selector="ed")
    (tmp_path / "junk.key").write_text("c2hvcnQ=\n")
    with pytest.raises(dkim.DkimKeyError, match="neither a PEM"):
        dkim.Ed25519Key.load(tmp_path / "junk.key", domain=DOMAIN, selector="ed")
    with pytest.raises(dkim.DkimKeyError, match="cannot read"):
        dkim.Ed25519Key.load(tmp_path / "none.key", domain=DOMAIN, selector="ed")
    with pytest.raises(dkim.DkimKeyError, match="not a valid DNS name"):
        dkim.Ed25519Key(DOMAIN, "bad selector", ed25519.Ed25519PrivateKey.generate())


def test_keyset_needs_one_domain_and_two_selectors(keyset: dkim.KeySet) -> None:
    assert keyset.ed25519 is not None
    with pytest.raises(dkim.DkimKeyError, match="different selectors"):
        dkim.KeySet(keyset.rsa, dkim.Ed25519Key(DOMAIN, SELECTOR, keyset.ed25519.private_key))
    with pytest.raises(dkim.DkimKeyError, match="same domain"):
        dkim.KeySet(keyset.rsa, dkim.Ed25519Key("example.net", "ed", keyset.ed25519.private_key))


# -- config and start-up ----------------------------------------------------------------------------------


def both_keys_config(tmp_path: Path, relay_port: int | None = None, **sections: Any) -> config_mod.Config:
    return make_config(tmp_path, relay_port, dkim={"ed25519_selector": ED_SELECTOR,
                                                   "ed25519_private_key": str(tmp_path / "ed25519.key")},
                       **sections)


@pytest.mark.parametrize(("dkim_table", "message"), [
    ({"ed25519_selector": "ed"}, "set both"),
    ({"ed25519_private_key": "ed.key"}, "set both"),
    ({"ed25519_selector": SELECTOR, "ed25519_private_key": "ed.key"}, "must differ"),
    ({"ed25519_selector": "b@d", "ed25519_private_key": "ed.key"}, "not a valid DKIM selector"),
])
def test_config_validation(tmp_path: Path, dkim_table: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        make_config(tmp_path, dkim=dkim_table)


def test_config_defaults_off(tmp_path: Path) -> None:
    config = make_config(tmp_path)
    assert (config.dkim.ed25519_selector, config.dkim.ed25519_private_key) == ("", None)
    example = config_mod.load(config_mod.default_config_path())
    assert example.dkim.ed25519_private_key is None


def test_startup_loads_both_and_never_invents_the_ed25519_key(tmp_path: Path) -> None:
    config = both_keys_config(tmp_path)
    with pytest.raises(dkim.DkimKeyError, match="ed25519.key"):
        load_or_create_key(config)
    assert config.dkim.private_key.exists()  # the RSA key is still made on first start, as before
    dkim.generate_ed25519_key(tmp_path / "ed25519.key")
    keys = load_or_create_key(config)
    assert keys.ed25519 is not None and keys.ed25519.selector == ED_SELECTOR
    assert load_or_create_key(make_config(tmp_path)).ed25519 is None


def test_cli_keygen_ed25519(tmp_path: Path) -> None:
    cfg = tmp_path / "listserv.toml"
    cfg.write_text(f'[server]\ndomain = "{DOMAIN}"\nstate_dir = "state"\n'
                   f'[dkim]\nselector = "{SELECTOR}"\nprivate_key = "dkim.key"\n')
    result = CliRunner().invoke(main, ["dkim", "keygen", "--ed25519", "--config", str(cfg)])
    assert result.exit_code == 1 and "ed25519_selector and ed25519_private_key" in result.stderr
    cfg.write_text(cfg.read_text() + f'ed25519_selector = "{ED_SELECTOR}"\ned25519_private_key = "keys/ed.key"\n')
    result = CliRunner().invoke(main, ["dkim", "keygen", "--ed25519", "--config", str(cfg)])
    assert result.exit_code == 0, result.stderr
    path = tmp_path / "keys" / "ed.key"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and str(path) in result.stderr
    key = dkim.Ed25519Key.load(path, domain=DOMAIN, selector=ED_SELECTOR)
    assert result.stdout.startswith(f"{ED_SELECTOR}._domainkey.{DOMAIN}. IN TXT ( ")
    assert "".join(result.stdout.split('"')[1::2]) == dkim.dns_txt_value(key)
    assert not (tmp_path / "dkim.key").exists()  # the RSA key is left alone
    result = CliRunner().invoke(main, ["dkim", "keygen", "--ed25519", "--config", str(cfg)])
    assert result.exit_code == 1 and "--force" in result.stderr
    CliRunner().invoke(main, ["dkim", "keygen", "--ed25519", "--force", "--config", str(cfg)])
    assert dkim.dns_txt_value(dkim.Ed25519Key.load(path, domain=DOMAIN, selector=ED_SELECTOR)) != \
        dkim.dns_txt_value(key)


# -- end to end ----------------------------------------------------------------------------------------


LIST, SHARED = "financing", "energy"
ANNA, JAN = "anna@gmina-wieliczka.pl", "jan@nfosigw.example.pl"


def test_every_copy_carries_both_signatures(tmp_path: Path, sink: tuple[SinkHandler, int],
                                            start_server: Any) -> None:
    handler, port = sink
    dkim.generate_ed25519_key(tmp_path / "ed25519.key")
    config = both_keys_config(tmp_path, port, web={"listen": f"127.0.0.1:{free_port()}",
                                                   "base_url": "https://listy.example.org/"})
    server = start_server(config)
    keys = server.app.fanout.keys
    assert keys.ed25519 is not None
    server.call(server.store.create_list(LIST, {"title": "Finansowanie"}, ["owner@pnec.org.pl"]))
    server.call(server.store.create_list(SHARED, {"personalize": False}, ["owner@pnec.org.pl"]))
    for name in (LIST, SHARED):
        server.call(server.store.add_members(name, [(ANNA, "", ""), (JAN, "", "")]))
    with smtplib.SMTP("127.0.0.1", server.port, timeout=30) as client:
        for name in (LIST, SHARED):
            client.sendmail(ANNA, [f"{name}@{DOMAIN}"], MESSAGE.replace(b"financing@", f"{name}@".encode())
                            .replace(b"<p1@", f"<{name}@".encode()))
        # A mailto unsubscribe with a made-up token: the refusal notice is signed too.
        client.sendmail(JAN, [f"{LIST}-leave+{'b' * 26}@{DOMAIN}"],
                        f"From: {JAN}\r\nSubject: unsubscribe\r\n\r\n".encode())
    server.drain()

    copies = handler.messages
    posts = [m for m in copies if re.search(rb"(?im)^Message-ID: <(financing|energy)@", m.data)]
    personal = [m for m in posts if b"List-Unsubscribe-Post" in m.data]
    shared = [m for m in posts if m not in personal]
    assert {ANNA, JAN} <= {r for m in personal for r in m.rcpt_tos}, [m.rcpt_tos for m in copies]
    assert all(len(m.rcpt_tos) == 1 for m in personal)
    assert {ANNA, JAN} <= {r for m in shared for r in m.rcpt_tos}
    assert all(b"ARC-Seal:" in m.data for m in shared)  # sealed with the RSA key, signed with both
    notices = [m for m in copies if m not in posts]
    assert notices
    for m in copies:
        sigs = signatures(m.data)
        assert [s["a"] for s in sigs] == ["rsa-sha256", "ed25519-sha256"], m.rcpt_tos
        assert sigs[0]["h"] == sigs[1]["h"] and sigs[0]["bh"] == sigs[1]["bh"]
        assert dkimpy_verifies_all(m.data, keys) == [True, True], m.rcpt_tos
    for m in personal + notices[:1]:
        result = perl(m.data, keys, tmp_path)
        assert result.returncode == 0, result.stdout + result.stderr
