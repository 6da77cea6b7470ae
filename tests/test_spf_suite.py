"""The openspf.org RFC 7208 test suite (release 2014.04), every case, through the injected resolver.

The YAML is read in place from ``../shared/corpora/spf_rfc7208`` (``LISTSERV_CORPORA``).  Each
scenario's ``zonedata`` becomes a ``DictResolver``, with the suite's conventions as its own
driver (pyspf's ``test/testspf.py``) reads them:

* a bare ``TIMEOUT`` entry makes every type of which no record came before it time out for that
  name (``spftimeout.example.net`` answers TXT but times out on A);
* ``SPF`` records stand for TXT where the name has no TXT entry of its own (RFC 7208 §3.1 dropped
  type 99; only TXT is asked), ``TXT: NONE`` means no TXT at all;
* a CNAME is followed for every type; a CNAME loop is a DNS error (RFC 1034 §3.6.2).

A case agrees when our result is the expected one (or one of the acceptable ones) and, when the
case names an ``explanation``, our ``exp=`` text is that one (``DEFAULT`` = none computed, as the
suite's driver sets the default explanation to that word).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from conftest import corpora_dir, require
from listserv.auth import evaluate_spf
from listserv.dns import DictResolver

pytestmark = pytest.mark.one_backend  # runs once: see pyproject's markers

SUITE = corpora_dir() / "spf_rfc7208" / "rfc7208-tests.yml"
TYPES = ("TXT", "A", "AAAA", "MX", "PTR")


def _scenarios() -> list[dict[str, Any]]:
    if not SUITE.exists():
        return []
    import yaml

    with SUITE.open(encoding="utf-8") as fh:
        return list(yaml.safe_load_all(fh))


def _entries(records: list[Any]) -> list[Any]:
    """One name's records in serving order; generated TXT (from SPF) go last, as in the suite's driver."""
    out: list[Any] = []
    has_txt = any(isinstance(r, dict) and "TXT" in r for r in records)
    generated: list[tuple[str, Any]] = []
    for record in records:
        if record == "TIMEOUT":
            out.append("TIMEOUT")
            continue
        ((kind, value),) = record.items()
        if kind == "SPF" and not has_txt:
            generated.append(("TXT", value))
        if value != "NONE":
            out.append((kind, value))
    return out + generated


def _text(value: Any) -> str:
    return "".join(value) if isinstance(value, list) else str(value)


def zone_resolver(zonedata: dict[str, list[Any]]) -> DictResolver:
    zone = {name.lower().rstrip("."): _entries(records) for name, records in zonedata.items()}

    def answer(name: str, kind: str, chain: tuple[str, ...] = ()) -> list[Any] | None:
        """The records of ``kind`` at ``name``; None for a timeout or a CNAME loop."""
        if name in chain:
            return None
        found: list[Any] = []
        for entry in zone.get(name, []):
            if entry == "TIMEOUT":
                return found or None
            t, value = entry
            if t == "CNAME":
                return answer(str(value).lower().rstrip("."), kind, (*chain, name))
            if t == kind:
                if value == "TIMEOUT":
                    return None
                found.append(value)
        return found

    tables: dict[str, dict[str, list[Any]]] = {kind: {} for kind in TYPES}
    fail: list[tuple[str, str]] = []
    for name in zone:
        for kind in TYPES:
            values = answer(name, kind)
            if values is None:
                fail.append((kind, name))
            elif values:
                tables[kind][name] = values
    return DictResolver(
        {n: [_text(v) for v in vs] for n, vs in tables["TXT"].items()},
        a={n: [str(v) for v in vs] for n, vs in tables["A"].items()},
        aaaa={n: [str(v) for v in vs] for n, vs in tables["AAAA"].items()},
        mx={n: [(int(p), str(h)) for p, h in vs] for n, vs in tables["MX"].items()},
        ptr={n: [str(v) for v in vs] for n, vs in tables["PTR"].items()},
        fail=fail,
    )


def _cases() -> Iterator[Any]:
    for scenario in _scenarios():
        for name, case in scenario["tests"].items():
            yield pytest.param(scenario["zonedata"], case, id=name)


CASES = list(_cases())


async def agrees(zonedata: dict[str, list[Any]], case: dict[str, Any]) -> tuple[bool, str]:
    """(agrees, what we said) for one case of the suite."""
    resolver = zone_resolver(zonedata)
    outcome = await evaluate_spf(str(case["host"]), str(case["mailfrom"]), str(case["helo"]), resolver)
    expected = case["result"] if isinstance(case["result"], list) else [case["result"]]
    said = outcome.result
    ok = said in expected
    if "explanation" in case:
        explanation = outcome.explanation if outcome.explanation is not None else "DEFAULT"
        said += f" / explanation {explanation!r}"
        ok = ok and explanation == case["explanation"]
    return ok, said


def test_the_suite_is_there() -> None:
    require(SUITE.exists(), f"RFC 7208 suite not found at {SUITE} (set LISTSERV_CORPORA)")
    assert len(CASES) == 203  # release 2014.04: 16 scenarios, 203 cases


@pytest.mark.corpus
@pytest.mark.parametrize(("zonedata", "case"), CASES)
async def test_rfc7208_case(zonedata: dict[str, list[Any]], case: dict[str, Any]) -> None:
    ok, said = await agrees(zonedata, case)
    assert ok, f"spec {case['spec']}: expected {case['result']!r}" + (
        f" / explanation {case['explanation']!r}" if "explanation" in case else "") + f", we said {said}"


def test_zone_conventions() -> None:
    """The driver's reading of the YAML, on a small zone of our own (the suite relies on it)."""
    resolver = zone_resolver({
        "gmina.example.pl": [{"SPF": "v=spf1 -all"}, "TIMEOUT"],
        "both.example.pl": [{"SPF": "v=spf1 ?all"}, {"TXT": "v=spf1 -all"}],
        "none.example.pl": [{"SPF": "v=spf1 -all"}, {"TXT": "NONE"}],
        "alias.example.pl": [{"CNAME": "both.example.pl."}],
        "loop.example.pl": [{"CNAME": "loop.example.pl"}],
        "mx.example.pl": [{"MX": [10, "poczta.example.pl"]}, {"A": "192.0.2.7"}],
    })
    assert resolver.fail_types >= {("TXT", "gmina.example.pl"), ("A", "gmina.example.pl"), ("A", "loop.example.pl")}
    assert resolver._txt["both.example.pl"] == ["v=spf1 -all"]
    assert "none.example.pl" not in resolver._txt
    assert resolver._txt["alias.example.pl"] == ["v=spf1 -all"]
    assert resolver._mx["mx.example.pl"] == [(10, "poczta.example.pl")]


async def test_a_dead_name_the_evaluation_never_reaches_changes_nothing() -> None:
    """Our own zone: ip4 matches first, so the timing-out name after it is never asked (§4.6.2)."""
    resolver = DictResolver({"gmina-wieliczka.pl": ["v=spf1 ip4:192.0.2.0/24 a:martwy.gmina-wieliczka.pl -all"]},
                            fail=["martwy.gmina-wieliczka.pl"])
    outcome = await evaluate_spf("192.0.2.10", "sołtys@gmina-wieliczka.pl", "poczta.gmina-wieliczka.pl", resolver)
    assert outcome.result == "pass"
    assert [q for q in resolver.queries if q[1] == "martwy.gmina-wieliczka.pl"] == []
    # From another address the a: term is reached, and its timeout is a temperror (§5.3 via §4.4).
    outcome = await evaluate_spf("203.0.113.5", "sołtys@gmina-wieliczka.pl", "poczta.gmina-wieliczka.pl", resolver)
    assert outcome.result == "temperror"


async def test_ptr_through_the_resolver_seam() -> None:
    """§5.5: the PTR name counts only when its own A record leads back to the client."""
    resolver = DictResolver(
        {"um.krakow.pl": ["v=spf1 ptr:um.krakow.pl -all exp=why.um.krakow.pl"],
         "why.um.krakow.pl": ["%{i} nie jest serwerem %{d}"]},
        a={"poczta.um.krakow.pl": ["192.0.2.25"], "obcy.um.krakow.pl": ["198.51.100.1"]},
        ptr={"25.2.0.192.in-addr.arpa": ["poczta.um.krakow.pl"], "7.2.0.192.in-addr.arpa": ["obcy.um.krakow.pl"]},
    )
    assert (await evaluate_spf("192.0.2.25", "lukasz@um.krakow.pl", "x", resolver)).result == "pass"
    failed = await evaluate_spf("192.0.2.7", "lukasz@um.krakow.pl", "x", resolver)
    assert (failed.result, failed.explanation) == ("fail", "192.0.2.7 nie jest serwerem um.krakow.pl")
    assert ("PTR", "7.2.0.192.in-addr.arpa") in resolver.queries


def count_agreeing() -> tuple[int, int]:
    """(agreeing, total): run as ``python tests/test_spf_suite.py`` for the figure."""
    import asyncio

    results = [asyncio.run(agrees(*p.values)) for p in CASES]
    for p, (ok, said) in zip(CASES, results, strict=True):
        if not ok:
            print(f"DISAGREE {p.id}: expected {p.values[1]['result']!r}, said {said}")
    return sum(ok for ok, _ in results), len(results)


if __name__ == "__main__":
    import sys

    sys.path.insert(0, str(Path(__file__).parent))
    print("%d of %d cases agree" % count_agreeing())
