"""Messy real mail, written by others, through the real server as member posts over real SMTP.

Every message of three corpora in ``../shared/corpora`` (``cpython_test_email``,
``mail_gem_fixtures``, ``rspamd_messages``; all of them, no sampling) is posted
to one list by a member.  For each one the server must give a clear SMTP
reply, stay up, and account for every message it answered ``250``: a copy
reached the relay (found by an ``X-Corpus-Id`` header added on top), or the
store records it as held or discarded, with a reason.  Posts held by a posting
rule (mostly "no subject") are then approved, as a moderator would, and must go
out too, so that they also pass through the rewrite and the signing.  A post that
the server took with 250 and then could not prepare is a failure.  Every copy that reached
the relay must carry a DKIM signature that dkimpy verifies; a sample is checked
with the independent Perl verifier as well.

How the bytes are sent: the message file exactly as it is, except that an mbox
``From `` line at the top is dropped (it is not part of the message), the
``X-Corpus-Id`` header is put in front, and line ends are sent as CRLF, as
every MTA sends them (``smtplib`` does this for ``str`` messages but sends
``bytes`` unchanged, and a bare-LF message on the wire is one long "line" to
an SMTP server).  A few LF-only messages are also sent raw, unconverted, as a
separate probe: those only need a clear reply and a server that keeps going.

Run with ``-s`` for the summary (outcome counts and the reasons).
"""

from __future__ import annotations

import re
import smtplib
from collections import Counter
from dataclasses import dataclass
from email.parser import BytesHeaderParser
from email.policy import compat32
from pathlib import Path

import dkim as dkimpy
import pytest

from conftest import (DOMAIN, SinkHandler, committed, corpora_dir, dkim_dnsfunc, make_config, require,
                      verify_with_perl)
from listserv import message as msgmod


FOLDERS = ("cpython_test_email", "mail_gem_fixtures", "rspamd_messages")
LIST = "korpus"
POST_ADDR = f"{LIST}@{DOMAIN}"
OWNER = "wlasciciel@pnec.org.pl"
READERS = ("czytelnik1@gmina-a.example.pl", "czytelnik2@gmina-b.example.pl")
ENVELOPE_SENDER = "nadawca-korpusu@example.net"  # also a member: the fallback when From: has no address
PERL_SAMPLE = 20
RAW_LF_PROBES = 5

_HEADER_LINE = re.compile(rb"^[!-9;-~]+[ \t]*:")  # a field name, allowing the obsolete "Name  :" form
_EOL = re.compile(rb"\r\n|\n|\r")


@dataclass
class Item:
    ident: int
    path: str
    data: bytes  # exactly what goes into DATA (before dot-stuffing)
    author: str
    raw_lf: bool = False
    reply: tuple[int, str] = (0, "")
    outcome: str = ""  # from the SMTP reply
    final: str = "?"  # after the fan-out (and a moderator's approval of held posts)


def is_message(data: bytes) -> bool:
    lines = data.split(b"\n", 2)
    first = lines[1] if data.startswith(b"From ") and len(lines) > 1 else lines[0]
    return bool(_HEADER_LINE.match(first))


def corpus_files(root: Path) -> list[Path]:
    files = []
    for folder in FOLDERS:
        base = root / folder
        require(base.is_dir(), f"corpus folder {base} not found (set LISTSERV_CORPORA or LISTSERV_SHARED)")
        for path in sorted(base.rglob("*")):
            if path.is_file() and path.name != "SOURCE.txt" and is_message(path.read_bytes()):
                files.append(path)
    return files


def with_id(data: bytes, ident: int, convert: bool) -> bytes:
    if data.startswith(b"From "):  # an mbox envelope line, not part of the message
        data = data.split(b"\n", 1)[1] if b"\n" in data else b""
    eol = b"\r\n" if convert or b"\r\n" in data[:2000] else b"\n"
    data = b"X-Corpus-Id: " + str(ident).encode() + eol + data
    return _EOL.sub(b"\r\n", data) if convert else data


def top_header(data: bytes, name: str) -> str:
    value = BytesHeaderParser(policy=compat32).parsebytes(data).get(name)
    return str(value).strip() if value is not None else ""


PREPARE_FAILED = "could not be prepared"


def stored_posts(target: Path | str) -> dict[int, list[tuple[int, str, str]]]:
    """incoming rows of posts by X-Corpus-Id: (row id, status, reason); read-only."""
    rows = committed(target, "SELECT id, status, reason, data FROM incoming WHERE kind = 'post' ORDER BY id")
    out: dict[int, list[tuple[int, str, str]]] = {}
    for row_id, status, reason, data in rows:
        ident = top_header(bytes(data), "X-Corpus-Id")
        assert ident.isdigit(), f"a stored post without its X-Corpus-Id: {bytes(data)[:200]!r}"
        out.setdefault(int(ident), []).append((row_id, status, reason))
    return out


def send_one(port: int, item: Item) -> tuple[int, str]:
    """One SMTP session per message; any reply is returned, never raised."""
    with smtplib.SMTP("127.0.0.1", port, timeout=60) as client:
        client.ehlo("mta.example.net")
        code, text = client.mail(ENVELOPE_SENDER)
        if code != 250:
            return code, f"MAIL: {text.decode(errors='replace')}"
        code, text = client.rcpt(POST_ADDR)
        if code != 250:
            return code, f"RCPT: {text.decode(errors='replace')}"
        try:
            code, text = client.data(item.data)
        except smtplib.SMTPDataError as exc:  # refused at the DATA command itself
            return exc.smtp_code, f"DATA: {exc.smtp_error.decode(errors='replace')}"
        return code, text.decode(errors="replace")


def classify(code: int, text: str) -> str:
    if 200 <= code < 300:
        if text.startswith("2.0.0 Held for moderation"):
            return "held"
        if text.startswith("2.0.0 Accepted (not distributed"):
            return "discarded"
        if text.startswith("2.0.0 Accepted for"):
            return "accepted"
        return "250-other"
    if code == 451 and "4.3.0" in text:
        return "internal-error"  # handle_exception: something in listserv raised
    return f"{code}"


@pytest.mark.corpus
@pytest.mark.slow
def test_messy_corpora_through_the_real_server(tmp_path: Path, sink: tuple[SinkHandler, int], start_server) -> None:  # type: ignore[no-untyped-def]
    root = corpora_dir()
    require(root.is_dir(), f"corpora not found at {root} (set LISTSERV_CORPORA or LISTSERV_SHARED)")
    files = corpus_files(root)
    assert len(files) > 100, f"only {len(files)} messages found under {root}"

    handler, relay_port = sink
    server = start_server(make_config(tmp_path, relay_port, server={"log_level": "info"}), retry_initial=0.2)

    items: list[Item] = []
    for path in files:
        ident = len(items) + 1
        data = with_id(path.read_bytes(), ident, convert=True)
        parsed = msgmod.parse(data)
        items.append(Item(ident, str(path.relative_to(root)), data, msgmod.sender_of(ENVELOPE_SENDER, parsed)))
    # A few LF-only messages as they are on disk, bare LF on the wire.
    lf_only = [p for p in files if b"\r" not in p.read_bytes()][:RAW_LF_PROBES]
    for path in lf_only:
        ident = len(items) + 1
        data = with_id(path.read_bytes(), ident, convert=False)
        items.append(Item(ident, str(path.relative_to(root)), data,
                          msgmod.sender_of(ENVELOPE_SENDER, msgmod.parse(data)), raw_lf=True))

    # The list: three readers get the copies; every author is a member with delivery off,
    # so each post is a member post and goes out once, to three recipients.
    authors = sorted(({i.author for i in items if i.author} | {ENVELOPE_SENDER}) - {OWNER, *READERS})

    async def setup() -> None:
        await server.store.create_list(LIST, {"title": "Korpus"}, [OWNER])
        await server.store.add_members(LIST, [(r, "", "") for r in READERS])
        await server.store.add_members(LIST, [(a, "", "") for a in authors])
        for address in authors:
            await server.store.set_member(LIST, address, "delivery", "nomail")

    server.call(setup())
    readers = {OWNER, *READERS}

    for item in items:
        try:
            item.reply = send_one(server.port, item)
        except (OSError, smtplib.SMTPException) as exc:
            item.reply = (-1, f"no clear reply: {type(exc).__name__}: {exc}")
        item.outcome = classify(*item.reply)
        # The server keeps answering after every message.
        with smtplib.SMTP("127.0.0.1", server.port, timeout=30) as probe:
            assert probe.noop()[0] == 250, f"server stopped answering after {item.path}"

    server.drain(timeout=120)

    # The store's view after the first pass: each post found by its X-Corpus-Id.
    first = stored_posts(server.config.store_target)
    # A moderator then approves every post held by a posting rule (mostly "no subject"),
    # so that those messages go through the rewrite and the signing too.
    approved: dict[int, str] = {}
    for ident, rows_for in first.items():
        if len(rows_for) == 1 and rows_for[0][1] == "held" and not rows_for[0][2].startswith(PREPARE_FAILED):
            row_id, _, reason = rows_for[0]
            server.call(server.store.set_incoming_status(row_id, "accepted", expect="held",
                                                         reason="approved by a moderator"))
            approved[ident] = reason
    server.drain(timeout=120)
    stored = stored_posts(server.config.store_target)

    # What reached the relay: copies (with X-Corpus-Id on top) and held notices (without).
    copies: dict[int, list[tuple[list[str], bytes]]] = {}
    for m in handler.messages:
        ident = top_header(m.data, "X-Corpus-Id")
        if ident.isdigit():
            copies.setdefault(int(ident), []).append((m.rcpt_tos, m.data))

    problems: list[str] = []
    final: Counter[str] = Counter()
    reasons: Counter[str] = Counter()
    for item in items:
        code, text = item.reply
        label = f"#{item.ident} {item.path}{' (raw LF)' if item.raw_lf else ''}"
        if item.outcome in ("internal-error", "250-other") or code < 0 or not text.strip():
            problems.append(f"{label}: unclear or internal-error reply {code} {text!r}")
        if not 200 <= code < 300:
            item.final = f"refused {code}"
            reasons[f"refused {code}: {text[:90]}"] += 1
            if item.ident in stored:
                problems.append(f"{label}: refused with {code} but stored as {stored[item.ident]}")
            if item.ident in copies:
                problems.append(f"{label}: refused with {code} but delivered")
            final[item.final] += 1
            continue
        rows_for = stored.get(item.ident, [])
        if len(rows_for) != 1:
            problems.append(f"{label}: answered {code} but stored {len(rows_for)} times: {rows_for}")
            continue
        _, status, reason = rows_for[0]
        got = copies.get(item.ident, [])
        if status == "queued":
            item.final = "delivered" if item.ident not in approved else "held, approved, delivered"
            if item.ident in approved:
                reasons[f"held (then approved): {approved[item.ident][:90]}"] += 1
            recipients = sorted(r for rcpts, _ in got for r in rcpts)
            if recipients != sorted(readers):
                problems.append(f"{label}: queued, but the relay got it for {recipients}")
            if item.outcome != "accepted" and item.ident not in approved:
                problems.append(f"{label}: delivered although the reply said {text!r}")
        elif status in ("held", "discarded"):
            item.final = status
            reasons[f"{status}: {reason[:90]}"] += 1
            if not reason.strip():
                problems.append(f"{label}: {status} without a reason")
            if got:
                problems.append(f"{label}: {status} but copies reached the relay")
            if reason.startswith(PREPARE_FAILED):
                item.final = "held: could not be prepared"
                problems.append(f"{label}: answered {text!r}, then failed in the server: {reason}")
        else:
            item.final = f"left {status}"
            problems.append(f"{label}: answered {code}, left in the store as {status!r} ({reason})")
        final[item.final] += 1

    # Every copy that reached the relay verifies (posts and held notices alike).
    dnsfunc = dkim_dnsfunc(server.key)
    unsigned = [i for i, m in enumerate(handler.messages) if not dkimpy.verify(m.data, dnsfunc=dnsfunc)]
    for i in unsigned:
        m = handler.messages[i]
        problems.append(f"relay copy {i} (X-Corpus-Id {top_header(m.data, 'X-Corpus-Id') or '-'}, "
                        f"to {m.rcpt_tos}) fails dkimpy verification")

    # A deterministic sample through the independent Perl verifier.
    delivered_ids = sorted(copies)
    step = max(1, len(delivered_ids) // PERL_SAMPLE)
    sample = delivered_ids[::step][:PERL_SAMPLE]
    perl_failures = []
    for ident in sample:
        result = verify_with_perl(copies[ident][0][1], server.key, tmp_path)
        if result.returncode != 0:
            perl_failures.append(ident)
            problems.append(f"#{ident}: Perl Mail::DKIM says {(result.stdout + result.stderr).strip()[:300]}")

    by_folder = Counter(("(raw LF)" if i.raw_lf else i.path.split("/", 1)[0], i.final) for i in items)
    print(f"\ncorpus run: {len(items)} posts ({len(items) - len(lf_only)} from {len(files)} files in "
          f"{', '.join(FOLDERS)}, all of them, CRLF on the wire; plus {len(lf_only)} sent raw with bare LF)")
    print("outcomes:", dict(sorted(final.items())))
    for folder in FOLDERS + ("(raw LF)",):
        row = {k[1]: n for k, n in by_folder.items() if k[0] == folder}
        if row:
            print(f"  {folder}: {dict(sorted(row.items()))}")
    print("reasons:")
    for text, n in reasons.most_common():
        print(f"  {n:4d}  {text}")
    print(f"relay copies: {len(handler.messages)} (dkimpy failures: {len(unsigned)}); "
          f"Perl Mail::DKIM sample: {len(sample) - len(perl_failures)}/{len(sample)} verified")
    if problems:
        print("problems:")
        for p in problems:
            print("  " + p)

    assert not problems, f"{len(problems)} problems, first: {problems[:5]}"
    assert final["delivered"] + final["held, approved, delivered"] > len(items) // 2, final  # most of this mail is ordinary member posts
    with smtplib.SMTP("127.0.0.1", server.port, timeout=30) as probe:
        assert probe.noop()[0] == 250



def test_member_post_without_from_header_is_delivered_or_refused(
    tmp_path: Path, sink: tuple[SinkHandler, int], start_server  # type: ignore[no-untyped-def]
) -> None:
    """Found by the corpus run: 61 of its messages have no From: header.

    The membership check falls back to the envelope sender, so such a post is
    accepted (250) -- and then it can never be sent: the copy has no From, DKIM
    signing refuses it, and the post is parked as held.  A moderator's approval
    only repeats that.  Either outcome below is fine; "250, then stuck" is not.
    """
    handler, relay_port = sink
    server = start_server(make_config(tmp_path, relay_port), retry_initial=0.2)
    member = "sekretariat@gmina-c.example.pl"
    server.call(server.store.create_list(LIST, {"title": "Korpus"}, [OWNER]))
    server.call(server.store.add_members(LIST, [(member, "", "")] + [(r, "", "") for r in READERS]))
    post = (b"Subject: Spotkanie w czwartek\r\nMessage-ID: <bez-from-1@gmina-c.example.pl>\r\n"
            b"Date: Thu, 26 Nov 2026 10:00:00 +0100\r\n\r\nSpotkanie o 10:00 w sali 12.\r\n")
    with smtplib.SMTP("127.0.0.1", server.port, timeout=30) as client:
        client.ehlo("mta.example.net")
        client.mail(member)
        client.rcpt(POST_ADDR)
        code, text = client.data(post)
    server.drain()
    rows = committed(server.config.store_target, "SELECT status, reason FROM incoming WHERE kind = 'post'")
    if 500 <= code < 600:  # refused clearly at SMTP: fine, as long as nothing was kept
        assert rows == []
        return
    assert code == 250, text
    copies = [m for m in handler.messages if top_header(m.data, "Message-ID") == "<bez-from-1@gmina-c.example.pl>"]
    got = sorted(r for m in copies for r in m.rcpt_tos)
    assert rows == [("queued", rows[0][1])] and got == sorted({OWNER, member, *READERS}), (
        f"answered {code} {text!r}, but the post was not sent: store says {rows}, relay got it for {got}"
    )
    for m in handler.messages:
        assert dkimpy.verify(m.data, dnsfunc=dkim_dnsfunc(server.key))
