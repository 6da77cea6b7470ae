"""`listserv doctor`: what a receiver will check, offline.

The checks run against ``listserv.dns.DictResolver`` zones; the CLI is run
through CliRunner with ``doctor.make_resolver`` replaced by one, and once with
the real resolver (``[dns] nameservers``) against a tiny DNS server on
127.0.0.1, so the wiring from the config to the resolver is tested too.
"""

from __future__ import annotations

import copy
import os
import socketserver
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result

from listserv import config as config_mod
from listserv import dkim, doctor
from listserv.cli import main
from listserv.dns import DictResolver

pytestmark = pytest.mark.one_backend  # runs once: see pyproject's markers

DOMAIN = "lists.example.org"
SELECTOR = "test"
ED_SELECTOR = "ed"
RELAY_IP = "192.0.2.25"
MX_IP = "192.0.2.30"
DMARC_OK = f"v=DMARC1; p=quarantine; rua=mailto:postmaster@{DOMAIN}"


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("keys")
    dkim.generate_key(d / "dkim.key")
    dkim.generate_ed25519_key(d / "ed25519.key")
    return d / "dkim.key", d / "ed25519.key"


@pytest.fixture(scope="module")
def rsa_key(keys: tuple[Path, Path]) -> dkim.DkimKey:
    return dkim.DkimKey.load(keys[0], domain=DOMAIN, selector=SELECTOR)


@pytest.fixture(scope="module")
def ed_key(keys: tuple[Path, Path]) -> dkim.Ed25519Key:
    return dkim.Ed25519Key.load(keys[1], domain=DOMAIN, selector=ED_SELECTOR)


def settings(tmp_path: Path, keys: tuple[Path, Path]) -> dict[str, Any]:
    """A production-like config: smtp through a relay with a public address, both keys, https URLs."""
    return {
        "server": {"domain": DOMAIN, "hostname": f"mx.{DOMAIN}", "state_dir": str(tmp_path / "state")},
        "delivery": {"mode": "smtp", "relay": "relay.example.net:25"},
        "dkim": {"selector": SELECTOR, "private_key": str(keys[0]),
                 "ed25519_selector": ED_SELECTOR, "ed25519_private_key": str(keys[1])},
        "archive": {"dir": str(tmp_path / "archive"), "base_url": f"https://{DOMAIN}/archive/"},
        "web": {"listen": "127.0.0.1:8080", "base_url": f"https://{DOMAIN}/"},
        "lists": [{"name": "seap-planning", "owners": [f"owner@{DOMAIN}"]}],
    }


def make(tmp_path: Path, keys: tuple[Path, Path], **changes: dict[str, Any]) -> config_mod.Config:
    data = settings(tmp_path, keys)
    for section, values in changes.items():
        data[section].update(values)
    return config_mod.from_mapping(data, base=tmp_path)


def good_zone(rsa_key: dkim.DkimKey, ed_key: dkim.Ed25519Key) -> dict[str, Any]:
    return {
        "txt": {
            f"{SELECTOR}._domainkey.{DOMAIN}": [dkim.dns_txt_value(rsa_key)],
            f"{ED_SELECTOR}._domainkey.{DOMAIN}": [dkim.dns_txt_value(ed_key)],
            DOMAIN: [f"v=spf1 ip4:{RELAY_IP} -all", "google-site-verification=abc"],
            f"_dmarc.{DOMAIN}": [DMARC_OK],
        },
        "a": {"relay.example.net": [RELAY_IP], f"mx.{DOMAIN}": [MX_IP]},
        "mx": {DOMAIN: [(10, f"mx.{DOMAIN}")]},
    }


def resolver(zone: dict[str, Any], fail: tuple[str, ...] = ()) -> DictResolver:
    return DictResolver(zone["txt"], a=zone["a"], aaaa=zone.get("aaaa", {}), mx=zone["mx"], fail=fail)


async def checks(config: config_mod.Config, zone: dict[str, Any], **kwargs: Any) -> dict[str, doctor.Check]:
    fail = kwargs.pop("fail", ())
    result = await doctor.run_checks(config, resolver(zone, fail), **kwargs)
    names = [c.name for c in result]
    assert len(names) == len(set(names))
    return {c.name: c for c in result}


@pytest.fixture
def zone(rsa_key: dkim.DkimKey, ed_key: dkim.Ed25519Key) -> dict[str, Any]:
    return good_zone(rsa_key, ed_key)


# -- all good ---------------------------------------------------------------------------------------


async def test_all_good(tmp_path: Path, keys: tuple[Path, Path], zone: dict[str, Any]) -> None:
    result = await checks(make(tmp_path, keys), zone)
    assert {name: c.status for name, c in result.items()} == {
        "key rsa": "OK", "key ed25519": "OK", "state_dir": "OK", "file modes": "OK", "delivery": "OK", "archive base_url": "OK",
        "web base_url": "OK", "dkim rsa": "OK", "dkim ed25519": "OK", "spf": "OK", "dmarc": "OK", "mx": "OK",
        "stage errors": "OK",
    }
    assert all(not c.publish for c in result.values())
    assert RELAY_IP in result["spf"].detail and "p=quarantine" in result["dmarc"].detail
    assert result["mx"].detail == f"MX 10 mx.{DOMAIN} ({MX_IP})"


async def test_without_ed25519_there_is_no_ed25519_check(tmp_path: Path, keys: tuple[Path, Path],
                                                         zone: dict[str, Any]) -> None:
    result = await checks(make(tmp_path, keys, dkim={"ed25519_selector": "", "ed25519_private_key": ""}), zone)
    assert "key ed25519" not in result and "dkim ed25519" not in result
    assert all(c.status == "OK" for c in result.values())


# -- each record missing or wrong: FAIL with the record to publish ------------------------------------


async def test_missing_dkim_records(tmp_path: Path, keys: tuple[Path, Path], zone: dict[str, Any],
                                    rsa_key: dkim.DkimKey, ed_key: dkim.Ed25519Key) -> None:
    del zone["txt"][f"{SELECTOR}._domainkey.{DOMAIN}"], zone["txt"][f"{ED_SELECTOR}._domainkey.{DOMAIN}"]
    result = await checks(make(tmp_path, keys), zone)
    rsa_check, ed_check = result["dkim rsa"], result["dkim ed25519"]
    assert rsa_check.status == ed_check.status == "FAIL"
    assert f"no TXT record at {SELECTOR}._domainkey.{DOMAIN}" in rsa_check.detail
    assert rsa_check.publish == dkim.dns_txt_record(rsa_key, SELECTOR, DOMAIN)
    assert ed_check.publish == dkim.dns_txt_record(ed_key, ED_SELECTOR, DOMAIN)
    assert "k=ed25519; " in ed_check.publish


@pytest.mark.parametrize(("record", "why"), [
    ("OTHER", "a different key"),
    ("v=DKIM1; k=rsa; p=", "revoked"),
    ("v=DKIM1; k=ed25519; p=OURS", "k=ed25519 but our key is rsa"),
    ("v=DKIM2; k=rsa; p=OURS", "must be DKIM1"),
    ("v=DKIM1; h=sha1; k=rsa; p=OURS", "excludes sha256"),
])
async def test_wrong_rsa_record(tmp_path: Path, keys: tuple[Path, Path], zone: dict[str, Any],
                                rsa_key: dkim.DkimKey, record: str, why: str) -> None:
    ours = dkim.dns_txt_value(rsa_key).partition("p=")[2]
    if record == "OTHER":
        other = dkim.DkimKey(DOMAIN, SELECTOR, dkim.generate_key(tmp_path / "other.key"))
        record = dkim.dns_txt_value(other)
    zone["txt"][f"{SELECTOR}._domainkey.{DOMAIN}"] = [record.replace("OURS", ours)]
    check = (await checks(make(tmp_path, keys), zone))["dkim rsa"]
    assert check.status == "FAIL" and why in check.detail
    assert check.publish == dkim.dns_txt_record(rsa_key, SELECTOR, DOMAIN)


async def test_rsa_record_variants_that_verify(tmp_path: Path, keys: tuple[Path, Path], zone: dict[str, Any],
                                               rsa_key: dkim.DkimKey) -> None:
    # Split strings (p= with spaces, as some DNS panels join them), no v= or k=: still our key.
    ours = dkim.dns_txt_value(rsa_key).partition("p=")[2]
    zone["txt"][f"{SELECTOR}._domainkey.{DOMAIN}"] = [f"p={ours[:100]} {ours[100:]}"]
    assert (await checks(make(tmp_path, keys), zone))["dkim rsa"].status == "OK"
    zone["txt"][f"{SELECTOR}._domainkey.{DOMAIN}"] = [f"v=DKIM1; t=y; p={ours}"]
    check = (await checks(make(tmp_path, keys), zone))["dkim rsa"]
    assert check.status == "WARN" and "t=y" in check.detail


async def test_wrong_ed25519_record(tmp_path: Path, keys: tuple[Path, Path], zone: dict[str, Any],
                                    rsa_key: dkim.DkimKey, ed_key: dkim.Ed25519Key) -> None:
    # The RSA record published under the Ed25519 selector by mistake.
    zone["txt"][f"{ED_SELECTOR}._domainkey.{DOMAIN}"] = [dkim.dns_txt_value(rsa_key)]
    check = (await checks(make(tmp_path, keys), zone))["dkim ed25519"]
    assert check.status == "FAIL" and "k=rsa but our key is ed25519" in check.detail
    assert check.publish == dkim.dns_txt_record(ed_key, ED_SELECTOR, DOMAIN)


async def test_missing_spf(tmp_path: Path, keys: tuple[Path, Path], zone: dict[str, Any]) -> None:
    zone["txt"][DOMAIN] = ["google-site-verification=abc"]
    check = (await checks(make(tmp_path, keys), zone))["spf"]
    assert check.status == "FAIL" and check.detail == f"no SPF record for {DOMAIN}"
    assert check.publish == f'{DOMAIN}. IN TXT "v=spf1 ip4:{RELAY_IP} -all"'


@pytest.mark.parametrize("record", ["v=spf1 ip4:198.51.100.1 -all", "v=spf1 ip4:198.51.100.1 ~all",
                                    "v=spf1 mx -all"])
async def test_spf_not_covering_the_relay(tmp_path: Path, keys: tuple[Path, Path], zone: dict[str, Any],
                                          record: str) -> None:
    zone["txt"][DOMAIN] = [record]
    check = (await checks(make(tmp_path, keys), zone))["spf"]
    assert check.status == "FAIL" and f"does not cover {RELAY_IP}" in check.detail
    assert check.publish == f'{DOMAIN}. IN TXT "{record.replace("v=spf1", f"v=spf1 ip4:{RELAY_IP}")}"'


async def test_spf_through_mx_and_include(tmp_path: Path, keys: tuple[Path, Path], zone: dict[str, Any]) -> None:
    zone["txt"][DOMAIN] = ["v=spf1 mx include:_spf.example.net -all"]
    zone["txt"]["_spf.example.net"] = [f"v=spf1 ip4:{RELAY_IP}/32 -all"]
    assert (await checks(make(tmp_path, keys), zone))["spf"].status == "OK"


async def test_two_spf_records(tmp_path: Path, keys: tuple[Path, Path], zone: dict[str, Any]) -> None:
    zone["txt"][DOMAIN] = [f"v=spf1 ip4:{RELAY_IP} -all", "v=spf1 mx -all"]
    check = (await checks(make(tmp_path, keys), zone))["spf"]
    assert check.status == "FAIL" and "2 SPF records" in check.detail and check.publish


async def test_spf_permerror(tmp_path: Path, keys: tuple[Path, Path], zone: dict[str, Any]) -> None:
    zone["txt"][DOMAIN] = ["v=spf1 include:nowhere.example -all"]
    check = (await checks(make(tmp_path, keys), zone))["spf"]
    assert check.status == "FAIL" and "permerror" in check.detail


async def test_loopback_relay_needs_the_public_ip(tmp_path: Path, keys: tuple[Path, Path],
                                                  zone: dict[str, Any]) -> None:
    config = make(tmp_path, keys, delivery={"relay": "127.0.0.1:25"})
    check = (await checks(config, zone))["spf"]
    assert check.status == "WARN"
    assert "public IP of the MTA" in check.detail and "--public-ip" in check.detail
    assert (await checks(config, zone, public_ip=RELAY_IP))["spf"].status == "OK"
    check = (await checks(config, zone, public_ip="198.51.100.7"))["spf"]
    assert check.status == "FAIL" and "198.51.100.7" in check.publish
    check = (await checks(config, zone, public_ip="2001:db8::25"))["spf"]
    assert check.status == "FAIL" and "ip6:2001:db8::25" in check.publish


async def test_missing_dmarc(tmp_path: Path, keys: tuple[Path, Path], zone: dict[str, Any]) -> None:
    del zone["txt"][f"_dmarc.{DOMAIN}"]
    check = (await checks(make(tmp_path, keys), zone))["dmarc"]
    assert check.status == "FAIL" and f"no DMARC record at _dmarc.{DOMAIN}" in check.detail
    assert check.publish == f'_dmarc.{DOMAIN}. IN TXT "{DMARC_OK}"'


@pytest.mark.parametrize(("records", "status", "detail"), [
    (["v=DMARC1; p=none; rua=mailto:d@example.org"], "WARN", "p=none"),
    (["v=DMARC1; p=reject"], "OK", "p=reject"),
    (["v=DMARC1; rua=mailto:d@example.org"], "FAIL", "no valid p="),
    (["v=DMARC1; p=reject", "v=DMARC1; p=none"], "FAIL", "2 DMARC records"),
])
async def test_dmarc_policies(tmp_path: Path, keys: tuple[Path, Path], zone: dict[str, Any],
                              records: list[str], status: str, detail: str) -> None:
    zone["txt"][f"_dmarc.{DOMAIN}"] = records
    check = (await checks(make(tmp_path, keys), zone))["dmarc"]
    assert check.status == status and detail in check.detail
    assert bool(check.publish) == (status == "FAIL")


async def test_dmarc_inherited_from_the_organizational_domain(tmp_path: Path, keys: tuple[Path, Path],
                                                              zone: dict[str, Any]) -> None:
    del zone["txt"][f"_dmarc.{DOMAIN}"]
    zone["txt"]["_dmarc.example.org"] = ["v=DMARC1; p=reject; sp=quarantine"]
    check = (await checks(make(tmp_path, keys), zone))["dmarc"]
    assert (check.status, check.detail) == ("OK", "p=quarantine (inherited from _dmarc.example.org)")


async def test_missing_mx(tmp_path: Path, keys: tuple[Path, Path], zone: dict[str, Any]) -> None:
    zone["mx"] = {}
    check = (await checks(make(tmp_path, keys), zone))["mx"]
    assert check.status == "FAIL" and "posts cannot reach the lists" in check.detail
    assert check.publish == f"{DOMAIN}. IN MX 10 mx.{DOMAIN}."
    zone["a"][DOMAIN] = [MX_IP]  # implicit MX (RFC 5321 §5.1): works, but say so
    check = (await checks(make(tmp_path, keys), zone))["mx"]
    assert check.status == "WARN" and "RFC 5321" in check.detail and MX_IP in check.detail


async def test_mx_host_without_address(tmp_path: Path, keys: tuple[Path, Path], zone: dict[str, Any]) -> None:
    del zone["a"][f"mx.{DOMAIN}"]
    check = (await checks(make(tmp_path, keys), zone))["mx"]
    assert check.status == "FAIL" and "no host has an A/AAAA record" in check.detail
    assert check.publish.startswith(f"mx.{DOMAIN}. IN A ")
    zone["mx"][DOMAIN].append((20, "backup.example.net"))
    zone["aaaa"] = {"backup.example.net": ["2001:db8::30"]}
    check = (await checks(make(tmp_path, keys), zone))["mx"]
    assert check.status == "WARN" and f"mx.{DOMAIN} has no A/AAAA record" in check.detail


async def test_null_mx(tmp_path: Path, keys: tuple[Path, Path], zone: dict[str, Any]) -> None:
    zone["mx"] = {DOMAIN: [(0, ".")]}
    check = (await checks(make(tmp_path, keys), zone))["mx"]
    assert check.status == "FAIL" and "null MX" in check.detail and check.publish


async def test_mx_elsewhere_than_the_public_ip(tmp_path: Path, keys: tuple[Path, Path],
                                               zone: dict[str, Any]) -> None:
    check = (await checks(make(tmp_path, keys), zone, public_ip=RELAY_IP))["mx"]
    assert check.status == "WARN" and f"none is at {RELAY_IP}" in check.detail


# -- DNS without an answer ------------------------------------------------------------------------------


async def test_dns_timeout_is_a_failure_without_a_record_to_publish(
    tmp_path: Path, keys: tuple[Path, Path], zone: dict[str, Any]
) -> None:
    # "Could not check" FAILs: exit 0 must mean verified (see doctor's docstring).
    result = await checks(make(tmp_path, keys), zone,
                          fail=(DOMAIN, f"{SELECTOR}._domainkey.{DOMAIN}", f"_dmarc.{DOMAIN}"))
    for name in ("dkim rsa", "spf", "dmarc", "mx"):
        assert result[name].status == "FAIL", name
        assert result[name].detail.startswith("could not check"), name
        assert result[name].publish == "", name
    assert result["dkim ed25519"].status == "OK"


async def test_relay_name_timeout(tmp_path: Path, keys: tuple[Path, Path], zone: dict[str, Any]) -> None:
    check = (await checks(make(tmp_path, keys), zone, fail=("relay.example.net",)))["spf"]
    assert check.status == "WARN" and "could not be resolved" in check.detail


# -- the config ---------------------------------------------------------------------------------------


async def test_config_findings(tmp_path: Path, keys: tuple[Path, Path], zone: dict[str, Any]) -> None:
    config = make(tmp_path, keys, delivery={"mode": "maildir"},
                  archive={"base_url": "http://example.org/archive/"}, web={"base_url": "", "listen": ""})
    result = await checks(config, zone)
    assert result["delivery"].status == "WARN" and "try-out mode" in result["delivery"].detail
    assert result["archive base_url"].status == "WARN" and "not https" in result["archive base_url"].detail
    assert result["web base_url"].status == "WARN" and "List-Unsubscribe-Post" in result["web base_url"].detail
    assert result["spf"].status == "WARN" and "maildir" in result["spf"].detail
    assert (await checks(config, zone, public_ip=RELAY_IP))["spf"].status == "OK"


async def test_missing_or_unusable_keys(tmp_path: Path, keys: tuple[Path, Path], zone: dict[str, Any]) -> None:
    (tmp_path / "garbage.key").write_text("not a key\n")
    config = make(tmp_path, keys, dkim={"private_key": str(tmp_path / "nothing.key"),
                                        "ed25519_private_key": str(tmp_path / "garbage.key")})
    result = await checks(config, zone)
    assert result["key rsa"].status == "FAIL" and "listserv dkim keygen" in result["key rsa"].detail
    assert result["key ed25519"].status == "FAIL" and "garbage.key" in result["key ed25519"].detail
    assert "dkim rsa" not in result and "dkim ed25519" not in result  # nothing to compare the records with


async def test_small_or_exposed_rsa_key(tmp_path: Path, keys: tuple[Path, Path], zone: dict[str, Any]) -> None:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    small = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    path = tmp_path / "small.key"
    path.write_bytes(small.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                         serialization.NoEncryption()))
    path.chmod(0o644)
    zone["txt"][f"{SELECTOR}._domainkey.{DOMAIN}"] = [dkim.dns_txt_value(small)]
    result = await checks(make(tmp_path, keys, dkim={"private_key": str(path)}), zone)
    assert result["key rsa"].status == "WARN" and "RSA-1024" in result["key rsa"].detail
    assert result["dkim rsa"].status == "OK"
    path.write_bytes(keys[0].read_bytes())
    result = await checks(make(tmp_path, keys, dkim={"private_key": str(path)}), zone)
    assert result["key rsa"].status == "WARN" and "chmod 600" in result["key rsa"].detail


async def test_state_dir(tmp_path: Path, keys: tuple[Path, Path], zone: dict[str, Any]) -> None:
    check = (await checks(make(tmp_path, keys), zone))["state_dir"]
    assert check.status == "OK" and "creates it" in check.detail
    (tmp_path / "state").write_text("a file\n")
    check = (await checks(make(tmp_path, keys), zone))["state_dir"]
    assert check.status == "FAIL" and "not a directory" in check.detail
    if os.geteuid() != 0:  # root writes anywhere
        (tmp_path / "state").unlink()
        (tmp_path / "state").mkdir(mode=0o500)
        check = (await checks(make(tmp_path, keys), zone))["state_dir"]
        assert check.status == "FAIL" and "not writable" in check.detail


# -- the CLI ---------------------------------------------------------------------------------------------


def write_config(tmp_path: Path, keys: tuple[Path, Path], extra: str = "") -> Path:
    path = tmp_path / "listserv.toml"
    path.write_text(f"""\
[server]
domain = "{DOMAIN}"
hostname = "mx.{DOMAIN}"
state_dir = "state"

[delivery]
mode = "smtp"
relay = "relay.example.net:25"

[dkim]
selector = "{SELECTOR}"
private_key = "{keys[0]}"
ed25519_selector = "{ED_SELECTOR}"
ed25519_private_key = "{keys[1]}"

[archive]
dir = "archive"
base_url = "https://{DOMAIN}/archive/"

[web]
listen = "127.0.0.1:8080"
base_url = "https://{DOMAIN}/"
{extra}""", encoding="utf-8")
    return path


def run_cli(path: Path, *args: str) -> Result:
    return CliRunner().invoke(main, ["doctor", "--config", str(path), *args])


def test_cli_all_good(tmp_path: Path, keys: tuple[Path, Path], zone: dict[str, Any],
                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(doctor, "make_resolver", lambda config: resolver(zone))
    result = run_cli(write_config(tmp_path, keys))
    assert result.exit_code == 0, (result.stdout, result.stderr)
    lines = result.stdout.splitlines()
    assert len(lines) == 13 and all(line.startswith("OK    ") for line in lines), lines
    assert f"OK    spf: 'v=spf1 ip4:{RELAY_IP} -all' covers {RELAY_IP}" in lines
    assert result.stderr == ""


def test_cli_prints_what_to_publish_and_fails(tmp_path: Path, keys: tuple[Path, Path], zone: dict[str, Any],
                                              rsa_key: dkim.DkimKey, monkeypatch: pytest.MonkeyPatch) -> None:
    del zone["txt"][f"{SELECTOR}._domainkey.{DOMAIN}"]
    zone["txt"][f"_dmarc.{DOMAIN}"] = ["v=DMARC1; p=none"]
    monkeypatch.setattr(doctor, "make_resolver", lambda config: resolver(zone))
    result = run_cli(write_config(tmp_path, keys))
    assert result.exit_code == 1
    out = result.stdout
    record = dkim.dns_txt_record(rsa_key, SELECTOR, DOMAIN).splitlines()
    assert f"FAIL  dkim rsa: no TXT record at {SELECTOR}._domainkey.{DOMAIN}" in out
    assert f"\n      publish: {record[0]}\n" in out
    assert all(f"\n               {line}\n" in out for line in record[1:])
    assert "\nWARN  dmarc: p=none" in out
    assert result.stderr == "listserv: error: 1 check(s) failed\n"


def test_cli_public_ip(tmp_path: Path, keys: tuple[Path, Path], zone: dict[str, Any],
                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(doctor, "make_resolver", lambda config: resolver(zone))
    path = write_config(tmp_path, keys)
    path.write_text(path.read_text().replace("relay.example.net:25", "127.0.0.1:25"))
    result = run_cli(path)
    assert result.exit_code == 0 and "WARN  spf: " in result.stdout
    result = run_cli(path, "--public-ip", "198.51.100.7")
    assert result.exit_code == 1
    assert f'      publish: {DOMAIN}. IN TXT "v=spf1 ip4:198.51.100.7 ip4:{RELAY_IP} -all"' in result.stdout
    result = run_cli(path, "--public-ip", "mx.example.org")
    assert result.exit_code == 2 and "is not an IP address" in result.stderr and result.stdout == ""


# -- the CLI with the real resolver, against a DNS server on 127.0.0.1 -------------------------------------


class _DnsHandler(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        import dns.message
        import dns.rcode
        import dns.rdatatype
        import dns.rrset

        data, sock = self.request
        zone: dict[str, Any] = self.server.zone  # type: ignore[attr-defined]
        query = dns.message.from_wire(data)
        question = query.question[0]
        name = question.name.to_text(omit_final_dot=True).lower()
        rdtype = dns.rdatatype.to_text(question.rdtype)
        reply = dns.message.make_response(query)
        values = zone.get(rdtype.lower(), {}).get(name)
        if values:
            if rdtype == "TXT":
                # Split long values into 255-octet strings, as a real zone must.
                texts = [" ".join(f'"{v[i:i + 255]}"' for i in range(0, len(v), 255)) for v in values]
            elif rdtype == "MX":
                texts = [f"{p} {h}." for p, h in values]
            else:
                texts = list(values)
            reply.answer.append(dns.rrset.from_text(question.name, 60, "IN", rdtype, *texts))
        elif not any(name in table for table in zone.values()):
            reply.set_rcode(dns.rcode.NXDOMAIN)
        sock.sendto(reply.to_wire(), self.client_address)


@pytest.fixture
def dns_server(zone: dict[str, Any]) -> Iterator[tuple[int, dict[str, Any]]]:
    pytest.importorskip("dns.asyncresolver")
    server = socketserver.UDPServer(("127.0.0.1", 0), _DnsHandler)
    server.zone = copy.deepcopy(zone)  # type: ignore[attr-defined]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1], server.zone  # type: ignore[attr-defined]
    finally:
        server.shutdown()
        server.server_close()


def test_cli_through_the_configured_nameservers(tmp_path: Path, keys: tuple[Path, Path],
                                                dns_server: tuple[int, dict[str, Any]]) -> None:
    port, served = dns_server
    path = write_config(tmp_path, keys, f'\n[dns]\nnameservers = ["127.0.0.1:{port}"]\ntimeout = 2\n')
    result = run_cli(path)
    assert result.exit_code == 0, (result.stdout, result.stderr)
    assert all(line.startswith("OK    ") for line in result.stdout.splitlines()), result.stdout
    del served["txt"][f"_dmarc.{DOMAIN}"]
    result = run_cli(path)
    assert result.exit_code == 1 and f"FAIL  dmarc: no DMARC record at _dmarc.{DOMAIN}" in result.stdout
