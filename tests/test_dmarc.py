"""The one DMARC implementation (listserv.dmarc): RFC 7489 §6.6.3 discovery and PSL organizational
domains, on its own and as verify_inbound uses it.  The when_strict rewrite over real SMTP is in
test_smtp_e2e.py (test_dmarc_when_strict_reads_sp_the_public_suffix_list_and_one_record)."""

from __future__ import annotations

import pytest

from listserv.auth import verify_inbound
from listserv.dmarc import discover, is_strict, organizational_domain
from listserv.dns import DictResolver

pytestmark = pytest.mark.one_backend  # runs once: see pyproject's markers

POST = (
    "From: Łukasz Żółć <lukasz@um.krakow.pl>\r\n"
    "To: seap-planning@lists.example.org\r\n"
    "Subject: Wspólna ścieżka dla dwóch miast\r\n"
    "Message-ID: <krakow-1@um.krakow.pl>\r\n"
    "MIME-Version: 1.0\r\n"
    "Content-Type: text/plain; charset=utf-8\r\n"
    "Content-Transfer-Encoding: 8bit\r\n"
    "\r\n"
    "Dzień dobry, przesyłam uwagi do planu gospodarki niskoemisyjnej.\r\n"
).encode()


@pytest.mark.parametrize(("domain", "org"), [
    # krakow.pl is a public suffix in the PSL's private section (".pl domains (grandfathered)"):
    # two offices under it are two organizations.
    ("um.krakow.pl", "um.krakow.pl"),
    ("bip.um.krakow.pl", "um.krakow.pl"),
    ("mopr.krakow.pl", "mopr.krakow.pl"),
    ("krakow.pl", "krakow.pl"),  # a public suffix is its own
    # warszawa.pl and com.pl are in the ICANN section.
    ("um.warszawa.pl", "um.warszawa.pl"),
    ("poczta.gmina.com.pl", "gmina.com.pl"),
    ("bip.gmina-wieliczka.pl", "gmina-wieliczka.pl"),
    ("Gmina-Wieliczka.PL.", "gmina-wieliczka.pl"),
    ("lists.example.org", "example.org"),
    ("xn--d-jfa.pl", "xn--d-jfa.pl"),  # IDNA A-labels ("łódź"-style names) as they come from the From
])
def test_organizational_domain_from_the_public_suffix_list(domain: str, org: str) -> None:
    assert organizational_domain(domain) == org


async def test_sp_applies_to_subdomains_p_to_the_domain_itself() -> None:
    resolver = DictResolver({"_dmarc.gmina-wieliczka.pl": ["v=DMARC1; p=none; sp=reject"]})
    sub = await discover("bip.gmina-wieliczka.pl", resolver.txt)
    assert sub is not None and (sub.policy, sub.record_domain, sub.inherited) == ("reject", "gmina-wieliczka.pl", True)
    own = await discover("gmina-wieliczka.pl", resolver.txt)
    assert own is not None and (own.policy, own.inherited) == ("none", False)
    assert await is_strict("bip.gmina-wieliczka.pl", resolver.txt)
    assert not await is_strict("gmina-wieliczka.pl", resolver.txt)


async def test_a_subdomain_with_its_own_record_uses_its_p() -> None:
    resolver = DictResolver({
        "_dmarc.bip.gmina-wieliczka.pl": ["v=DMARC1; p=quarantine; sp=none"],
        "_dmarc.gmina-wieliczka.pl": ["v=DMARC1; p=none; sp=reject"],
    })
    found = await discover("bip.gmina-wieliczka.pl", resolver.txt)
    assert found is not None and (found.policy, found.record_domain) == ("quarantine", "bip.gmina-wieliczka.pl")
    assert ("TXT", "_dmarc.gmina-wieliczka.pl") not in resolver.queries


async def test_two_towns_under_krakow_pl_do_not_inherit_its_record() -> None:
    resolver = DictResolver({"_dmarc.krakow.pl": ["v=DMARC1; p=reject"],
                             "_dmarc.um.krakow.pl": ["v=DMARC1; p=none"]})
    assert await discover("mopr.krakow.pl", resolver.txt) is None
    assert ("TXT", "_dmarc.krakow.pl") not in resolver.queries  # mopr.krakow.pl is its own org domain
    found = await discover("bip.um.krakow.pl", resolver.txt)
    assert found is not None and (found.policy, found.record_domain) == ("none", "um.krakow.pl")


async def test_several_records_mean_no_policy_and_no_fallback() -> None:
    two = ["v=DMARC1; p=none", "v=DMARC1; p=reject"]
    # At the From domain: step 5 ends discovery; the organizational domain is not asked (step 3
    # is only for an empty set).
    resolver = DictResolver({"_dmarc.bip.gmina-wieliczka.pl": two,
                             "_dmarc.gmina-wieliczka.pl": ["v=DMARC1; p=reject"]})
    assert await discover("bip.gmina-wieliczka.pl", resolver.txt) is None
    assert ("TXT", "_dmarc.gmina-wieliczka.pl") not in resolver.queries
    assert not await is_strict("bip.gmina-wieliczka.pl", resolver.txt)
    # At the organizational domain: none either.
    resolver = DictResolver({"_dmarc.gmina-wieliczka.pl": two})
    assert await discover("bip.gmina-wieliczka.pl", resolver.txt) is None
    # Other TXT records beside one DMARC record do not count (steps 2 and 4).
    resolver = DictResolver({"_dmarc.gmina-wieliczka.pl": ["google-site-verification=abc", "v=DMARC1; p=reject"]})
    found = await discover("gmina-wieliczka.pl", resolver.txt)
    assert found is not None and found.policy == "reject"


@pytest.mark.parametrize(("records", "policy"), [
    (["v=DMARC1; p=reject"], "reject"),
    (["v=DMARC1;p=quarantine;pct=50"], "quarantine"),
    (["v=DMARC1; p=Reject"], "reject"),  # policy values compare without case
    (["p=reject; v=DMARC1"], None),  # §6.4: v= must come first
    (["v=dmarc1; p=reject"], None),  # §6.4: "MUST match precisely"
    (["v=DMARC1; p=bogus"], None),  # §6.6.3 step 6: bad p= and no rua: no DMARC processing
    (["v=DMARC1; p=bogus; rua=mailto:dmarc@gmina-wieliczka.pl"], "none"),  # ... with rua: as p=none
    (["v=DMARC1; p=reject; sp=bogus"], None),
    (["v=DMARC1"], None),
])
async def test_record_validity(records: list[str], policy: str | None) -> None:
    found = await discover("gmina-wieliczka.pl", DictResolver({"_dmarc.gmina-wieliczka.pl": records}).txt)
    assert (found.policy if found else None) == policy


async def test_lookup_failure_is_strict_for_the_mitigation_and_temperror_inbound() -> None:
    resolver = DictResolver({}, fail=["_dmarc.um.krakow.pl"])
    assert await is_strict("um.krakow.pl", resolver.txt)
    result = await verify_inbound(POST, mail_from="", client_ip="", helo="", resolver=resolver)
    assert (result.dmarc, result.forged) == ("temperror", False)


async def test_inbound_uses_the_same_discovery() -> None:
    # sp=reject of the organizational domain reaches a subdomain author on arrival too.
    sub = POST.replace(b"lukasz@um.krakow.pl", b"lukasz@bip.um.krakow.pl")
    result = await verify_inbound(sub, mail_from="", client_ip="", helo="",
                                  resolver=DictResolver({"_dmarc.um.krakow.pl": ["v=DMARC1; p=none; sp=reject"]}))
    assert (result.from_domain, result.dmarc, result.dmarc_policy, result.forged) == (
        "bip.um.krakow.pl", "fail", "reject", True)
    # krakow.pl's own record is not um.krakow.pl's policy.
    result = await verify_inbound(POST, mail_from="", client_ip="", helo="",
                                  resolver=DictResolver({"_dmarc.krakow.pl": ["v=DMARC1; p=reject"]}))
    assert (result.dmarc, result.dmarc_policy, result.forged) == ("none", "", False)
    # Two records at the author's domain: no policy, whatever the organizational domain says.
    two = DictResolver({"_dmarc.bip.um.krakow.pl": ["v=DMARC1; p=none", "v=DMARC1; p=reject"],
                        "_dmarc.um.krakow.pl": ["v=DMARC1; p=reject"]})
    result = await verify_inbound(sub, mail_from="", client_ip="", helo="", resolver=two)
    assert (result.dmarc, result.forged) == ("none", False)


async def test_alignment_keeps_two_krakow_offices_apart() -> None:
    # SPF passes for mopr.krakow.pl, the From is um.krakow.pl: relaxed alignment compares
    # organizational domains (§3.1.2), and those differ under the PSL.
    resolver = DictResolver({"mopr.krakow.pl": ["v=spf1 ip4:192.0.2.0/24 -all"],
                             "bip.um.krakow.pl": ["v=spf1 ip4:192.0.2.0/24 -all"],
                             "_dmarc.um.krakow.pl": ["v=DMARC1; p=reject"]})
    other = await verify_inbound(POST, mail_from="biuro@mopr.krakow.pl", client_ip="192.0.2.8", helo="mx.mopr.krakow.pl",
                                 resolver=resolver)
    assert (other.spf, other.dmarc, other.forged) == ("pass", "fail", True)
    same = await verify_inbound(POST, mail_from="biuro@bip.um.krakow.pl", client_ip="192.0.2.8",
                                helo="mx.bip.um.krakow.pl", resolver=resolver)
    assert (same.spf, same.dmarc, same.forged) == ("pass", "pass", False)
