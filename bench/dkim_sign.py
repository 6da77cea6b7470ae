"""Benchmark: DKIM signatures per second, listserv.dkim.sign against dkimpy's dkim.sign.

Signs one ~5 KB message with a fresh RSA-2048 key, ``c=relaxed/simple``, the
same h= list both ways, and prints signatures/s and ms per signature:

* ``listserv sign()`` hashes the body and the headers, RSA through OpenSSL;
* ``listserv sign(body_hash=...)`` is the per-copy cost once the post's body
  hash is known (what fan-out pays per recipient);
* ``dkimpy dkim.sign()`` is the same signature with dkimpy's pure-Python RSA.

Usage: ``PYTHONPATH=. python bench/dkim_sign.py [-n ITERATIONS]``
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout

import dkim  # type: ignore[import-untyped]
from cryptography.hazmat.primitives import serialization

from listserv.dkim import SIGNED_HEADERS, DkimKey, body_hash, generate_key, sign, split_message

DOMAIN = "lists.example.org"
SELECTOR = "listserv"


def make_message(size: int = 5000) -> bytes:
    head = (
        b"From: =?UTF-8?Q?Pawe=C5=82_Nowak?= <pawel@example.pl>\r\n"
        b"To: dyskusja@lists.example.org\r\n"
        b"Subject: =?UTF-8?Q?[dyskusja]_Za=C5=BC=C3=B3=C5=82=C4=87_g=C4=99=C5=9Bl=C4=85?=\r\n"
        b"Date: Tue, 14 Nov 2023 22:13:20 +0100\r\n"
        b"Message-ID: <20231114221320.12345@example.pl>\r\n"
        b"MIME-Version: 1.0\r\n"
        b"Content-Type: text/plain; charset=UTF-8\r\n"
        b"Content-Transfer-Encoding: 8bit\r\n"
        b"List-Id: Dyskusja <dyskusja.lists.example.org>\r\n"
        b"List-Post: <mailto:dyskusja@lists.example.org>\r\n"
        b"List-Unsubscribe: <mailto:dyskusja+unsubscribe@lists.example.org>\r\n"
        b"\r\n"
    )
    line = "Zażółć gęślą jaźń, pchnąć w tę łódź jeża lub ośm skrzyń fig.\r\n".encode()
    body = line * ((size - len(head)) // len(line) + 1)
    return head + body


def rate(label: str, fn: Callable[[], object], n: int) -> float:
    fn()  # warm up
    start = time.perf_counter()
    for _ in range(n):
        fn()
    elapsed = time.perf_counter() - start
    per = elapsed / n
    print(f"{label:<36} {n:>6} sigs  {1 / per:>9.0f} sigs/s  {per * 1000:>8.3f} ms/sig")
    return per


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", "--iterations", type=int, default=500)
    args = parser.parse_args()
    n: int = args.iterations

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "dkim.key"
        private = generate_key(path)
        key = DkimKey.load(path, domain=DOMAIN, selector=SELECTOR)
    # dkimpy reads PKCS#1 PEM only.
    pkcs1 = private.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )
    msg = make_message()
    bh = body_hash(split_message(msg)[1])
    print(f"message: {len(msg)} bytes, RSA-{private.key_size}, c=relaxed/simple, "
          f"{len(SIGNED_HEADERS)} h= entries")

    ours = rate("listserv sign()", lambda: sign(msg, key), n)
    reuse = rate("listserv sign(body_hash=...)", lambda: sign(msg, key, body_hash=bh), n)
    theirs = rate(
        "dkimpy dkim.sign()",
        lambda: dkim.sign(
            msg,
            SELECTOR.encode(),
            DOMAIN.encode(),
            pkcs1,
            canonicalize=(b"relaxed", b"simple"),
            include_headers=list(SIGNED_HEADERS),
        ),
        max(n // 5, 20),
    )
    print(f"speed-up: {theirs / ours:.1f}x (sign), {theirs / reuse:.1f}x (with body hash reused)")


if __name__ == "__main__":
    main()
