"""Benchmark: how many member posts per second listserv accepts durably over SMTP.

Set-up: a real server, ``python -m listserv serve --config tmp.toml``, alone in its own
process, with a temporary state dir and DKIM key.  One list, ``dyskusja``, whose only
member is its owner, the author of every post; delivery mode "smtp" to the shared
counting sink (``../shared/tools/smtp_sink.py``) in another process, so each accepted
post is also rewritten, signed, archived and delivered to that one member while
ingest runs (as on a real server).  ``--hold`` measures receiving alone: emergency
moderation on, no owners, senders not notified, so every post is stored as held and
the fan-out has nothing to do.  DNS (listserv checks SPF/DKIM/DMARC of arriving posts)
goes to a stub server on 127.0.0.1 that knows the author's domain (an SPF record
listing 127.0.0.1, DMARC p=none) and answers NXDOMAIN to anything else.  The server
logs at ``--log-level`` (default info, as in production) into a file.

Clients: 16 concurrent SMTP clients (threads with smtplib, spread over 2 client
processes so the client side is not held back by one GIL) post member posts of
2-5 KB (Polish text, UTF-8 8bit, each with its own Message-ID) for ``--seconds``:

(a) each client keeps its connection and sends post after post (as an MTA does);
(b) each post on a new connection (connect, EHLO, MAIL, RCPT, DATA, QUIT).

A post counts once it is answered 250: the server answers only after the post is
committed to SQLite (group commit, synchronous=FULL).  Printed for each mode: posts/s
(count / time from the start signal to the last answer), latency percentiles, CPU
seconds of the server and of the clients, server CPU per post, DNS questions per
post, and a check that the database holds exactly as many received posts as were
answered 250.

For reference the same clients run against a do-nothing aiosmtpd server (a handler that
answers 250 to everything, in its own process): the ceiling of this machine with this
client set-up.

Goal: at least 1,000 durable posts/s with reused connections (mode a).

Issue 10, ``--delivered``: the same 16 clients with reused connections send 2,000 posts
(``--posts``) to a list of 4 (``--members``) with default settings; printed: posts/s
accepted, posts/s fully delivered (from the first post until the sink has every copy),
and the do-nothing aiosmtpd server's posts/s for the same clients in the same run, once
per ``[server] workers`` value in ``--workers`` (default 1,2).  ``--store-url`` sets
``[store] url`` (PostgreSQL).  Goals as ratios to the reference: accepted >= 0.6, fully
delivered >= 0.5; 2 workers >= 1.6x one worker.

Usage (from the repo root):  python bench/ingest.py [--seconds 8] [--clients 16]
                             [--client-procs 2] [--hold] [--log-level info] [--modes reuse,new]
                             [--list-default archive_policy=none ...] [--profile FILE]
                             python bench/ingest.py --delivered [--posts 2000] [--members 4] [--workers 1,2]
                             [--store-url postgresql://...]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import signal
import smtplib
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

LIST = "dyskusja"
LIST_ADDRESS = f"{LIST}@{C.DOMAIN}"
AUTHOR = "pawel.nowak@gmina-zabia-wola.example.pl"
AUTHOR_NAME = "Paweł Nowak"
GOAL = 1000.0
SUBJECTS = ["Termomodernizacja szkół — pytanie o audyt", "Re: Nabór wniosków NFOŚiGW na fotowoltaikę",
            "Oświetlenie uliczne LED: doświadczenia gmin", "Re: Re: Inwentaryzacja emisji bazowej za 2022 r.",
            "Spotkanie zespołu roboczego w Żyrardowie", "Źródła finansowania działań SECAP"]


# -- clients ---------------------------------------------------------------------------------


def _templates(seed: int, count: int = 32) -> list[bytes]:
    rng = random.Random(seed)
    return [C.make_post(rng, author=AUTHOR, author_name=AUTHOR_NAME, list_address=LIST_ADDRESS,
                        size=rng.randint(2000, 5000), message_id="MSGID-PLACEHOLDER",
                        subject=rng.choice(SUBJECTS)) for _ in range(count)]


def _client_thread(args: argparse.Namespace, number: int, start_at: float, deadline: float,
                   out: dict[str, Any]) -> None:
    posts = _templates(args.seed * 1000 + number)
    latencies: list[float] = []
    errors: list[str] = []
    ok = 0
    i = 0
    last = start_at
    conn: smtplib.SMTP | None = None
    while time.time() < start_at:
        time.sleep(0.001)
    try:
        while time.time() < deadline and (not args.quota or i < args.quota):
            data = posts[i % len(posts)].replace(b"MSGID-PLACEHOLDER",
                                                  f"{args.seed}.{number}.{i}.{os.getpid()}@example.pl".encode())
            i += 1
            t = time.perf_counter()
            try:
                if conn is None:
                    conn = smtplib.SMTP("127.0.0.1", args.port, local_hostname="client.example.pl", timeout=60)
                    conn.ehlo()
                refused = conn.sendmail(AUTHOR, [LIST_ADDRESS], data)
                if refused:
                    errors.append(str(refused))
                else:
                    ok += 1
                    latencies.append(time.perf_counter() - t)
                    last = time.time()
                if args.mode == "new":
                    conn.quit()
                    conn = None
            except (smtplib.SMTPException, OSError) as exc:
                errors.append(f"{type(exc).__name__}: {exc}"[:200])
                if conn is not None:
                    try:
                        conn.close()
                    except Exception:  # noqa: BLE001
                        pass
                conn = None
        if conn is not None:
            conn.quit()
    finally:
        out[str(number)] = {"ok": ok, "errors": errors, "latencies": latencies, "last": last}


def _client_proc(args: argparse.Namespace) -> None:
    out: dict[str, Any] = {}
    threads = [threading.Thread(target=_client_thread, args=(args, args.first + k, args.start_at,
                                                              args.start_at + args.seconds, out))
               for k in range(args.threads)]
    cpu0 = time.process_time()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    ok = sum(v["ok"] for v in out.values())
    errors = [e for v in out.values() for e in v["errors"]]
    lat = sorted(x for v in out.values() for x in v["latencies"])
    print(json.dumps({"ok": ok, "errors": errors[:20], "n_errors": len(errors), "latencies": lat,
                      "last": max(v["last"] for v in out.values()), "cpu": time.process_time() - cpu0}))


def run_clients(args: argparse.Namespace, port: int, mode: str, server_pid: int) -> dict[str, Any]:
    per = [args.clients // args.client_procs + (1 if k < args.clients % args.client_procs else 0)
           for k in range(args.client_procs)]
    start_at = time.time() + 1.5  # every client process imported and ready
    procs = []
    first = 0
    total = getattr(args, "posts", 0) or 0
    per_client = [total // args.clients + (1 if k < total % args.clients else 0) for k in range(args.clients)]
    seconds = 600.0 if total else args.seconds  # with a number of posts: until they are all sent
    for n_threads in per:
        # Every client of one process sends the same number (the remainder goes to the first clients).
        quota = max(per_client[first:first + n_threads], default=0) if total else 0
        procs.append(subprocess.Popen(
            [sys.executable, __file__, "--_mode", "client", "--port", str(port), "--mode", mode,
             "--threads", str(n_threads), "--first", str(first), "--start-at", repr(start_at),
             "--seconds", str(seconds), "--seed", str(args.seed), "--quota", str(quota)],
            stdout=subprocess.PIPE, text=True, env=C.child_env()))
        first += n_threads
    while time.time() < start_at:
        time.sleep(0.001)
    srv_cpu0 = C.proc_cpu_seconds(server_pid)
    results = []
    for p in procs:
        stdout, _ = p.communicate(timeout=seconds + 120)
        if p.returncode != 0:
            raise SystemExit(f"a client process failed ({p.returncode})")
        results.append(json.loads(stdout.strip().splitlines()[-1]))
    srv_cpu1 = C.proc_cpu_seconds(server_pid)
    ok = sum(r["ok"] for r in results)
    last = max(r["last"] for r in results)
    lat = sorted(x for r in results for x in r["latencies"])
    errors = [e for r in results for e in r["errors"]]
    wall = last - start_at
    return {
        "ok": ok, "wall": wall, "rate": ok / wall if wall > 0 else 0.0, "start_at": start_at,
        "p50": _pct(lat, 50), "p90": _pct(lat, 90), "p99": _pct(lat, 99), "max": lat[-1] if lat else 0.0,
        "n_errors": sum(r["n_errors"] for r in results), "errors": errors[:5],
        "client_cpu": sum(r["cpu"] for r in results), "server_cpu": srv_cpu1 - srv_cpu0,
    }


def _pct(values: list[float], p: float) -> float:
    if not values:
        return 0.0
    return values[min(len(values) - 1, int(len(values) * p / 100))]


# -- the do-nothing server ---------------------------------------------------------------------


def _null_server(args: argparse.Namespace) -> None:
    import asyncio

    from aiosmtpd.smtp import SMTP

    class Nothing:
        async def handle_RCPT(self, server: Any, session: Any, envelope: Any, address: str,
                              options: list[str]) -> str:
            envelope.rcpt_tos.append(address)
            return "250 OK"

        async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
            return "250 2.0.0 OK"

    async def main() -> None:
        loop = asyncio.get_running_loop()
        handler = Nothing()
        server = await loop.create_server(lambda: SMTP(handler, hostname="null.localhost", decode_data=False),
                                          host="127.0.0.1", port=args.port)
        stop = asyncio.Event()
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        try:
            await asyncio.wait_for(stop.wait(), 600)
        except TimeoutError:
            pass
        server.close()

    asyncio.run(main())


# -- the driver ------------------------------------------------------------------------------


def _stop(proc: subprocess.Popen[Any]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _toml_value(text: str) -> str:
    if text in ("true", "false") or re.fullmatch(r"-?\d+", text):
        return text
    return json.dumps(text, ensure_ascii=False)


def _write_config(state: Path, port: int, relay_port: int, log_level: str, hold: bool,
                  list_defaults: list[str], dns_port: int) -> Path:
    mapping = C.config_mapping(state, listen_port=port, relay_port=relay_port, log_level=log_level)
    text = C.to_toml(mapping)
    if dns_port:
        text += f'[dns]\nnameservers = ["127.0.0.1:{dns_port}"]\n\n'
    owners = f'"{AUTHOR}"'
    defaults: dict[str, str] = {}
    if hold:
        # Every post waits for a moderator; nobody to notify (no owners, sender not told):
        # the fan-out has nothing to do, and receiving is measured alone.
        defaults.update(emergency_moderation="true", notify_held_sender="false")
        owners = ""
    for item in list_defaults:
        key, _, value = item.partition("=")
        defaults[key.strip()] = _toml_value(value.strip())
    if defaults:
        text += "[list_defaults]\n" + "".join(f"{k} = {v}\n" for k, v in defaults.items()) + "\n"
    text += (f'[[lists]]\nname = "{LIST}"\ntitle = "Dyskusja o energii"\nowners = [{owners}]\n'
             'language = "pl"\n')
    path = state / "listserv.toml"
    path.write_text(text, encoding="utf-8")
    return path


def _server_has_dns_section() -> bool:
    """Whether this listserv's config knows [dns] (it checks arriving mail through DNS)."""
    try:
        from listserv.config import DnsConfig  # noqa: F401
    except ImportError:
        return False
    return True


def _stored(db_path: Path) -> dict[str, int]:
    with sqlite3.connect(db_path) as db:
        return dict(db.execute("SELECT status, count(*) FROM incoming WHERE kind = 'post' GROUP BY status"))


def _print_mode(name: str, r: dict[str, Any], extra: str = "") -> None:
    print(f"  {name:<34} {r['rate']:>8,.0f} posts/s  ({r['ok']} in {r['wall']:.2f} s; latency p50 "
          f"{1000 * r['p50']:.1f} ms, p90 {1000 * r['p90']:.1f}, p99 {1000 * r['p99']:.1f}, max "
          f"{1000 * r['max']:.0f}; CPU server {r['server_cpu']:.2f} s, clients {r['client_cpu']:.2f} s)"
          f"{extra}")
    if r["n_errors"]:
        print(f"    {r['n_errors']} errors, e.g. {r['errors'][:3]}")
    sys.stdout.flush()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seconds", type=float, default=8.0, help="length of each run (default 8)")
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--client-procs", type=int, default=2, help="processes the client threads are spread over")
    p.add_argument("--modes", default="reuse,new", help="reuse, new, or both (default)")
    p.add_argument("--hold", action="store_true", help="emergency moderation: every post is held, no fan-out")
    p.add_argument("--list-default", action="append", default=[], metavar="KEY=VALUE",
                   help="a [list_defaults] setting for the server, e.g. archive_policy=none (repeatable)")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    p.add_argument("--no-baseline", action="store_true", help="skip the do-nothing aiosmtpd reference")
    p.add_argument("--profile", metavar="FILE", help="run the server under py-spy, raw output into FILE")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--keep", action="store_true", help="keep the temporary directory")
    # internal
    p.add_argument("--_mode", choices=["client", "null"], help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, help=argparse.SUPPRESS)
    p.add_argument("--mode", help=argparse.SUPPRESS)
    p.add_argument("--threads", type=int, help=argparse.SUPPRESS)
    p.add_argument("--first", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--start-at", type=float, help=argparse.SUPPRESS)
    p.add_argument("--quota", type=int, default=0, help=argparse.SUPPRESS)
    # issue 10: sustained delivery
    p.add_argument("--delivered", action="store_true",
                   help="send --posts posts (reused connections) to a list of --members and measure until the "
                        "sink has every copy, once per --workers value")
    p.add_argument("--posts", type=int, default=2000, help="with --delivered: posts in all (default 2000)")
    p.add_argument("--members", type=int, default=4, help="with --delivered: members of the list (default 4)")
    p.add_argument("--workers", default="1,2", help="with --delivered: [server] workers values to run (default 1,2)")
    p.add_argument("--store-url", default="",
                   help="with --delivered: [store] url for the server (PostgreSQL; empty: the SQLite default)")
    args = p.parse_args()
    if args._mode == "client":
        _client_proc(args)
        return
    if args._mode == "null":
        _null_server(args)
        return

    if args.delivered:
        delivered_main(args)
        return
    args.posts = 0  # the time-limited runs below

    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    label = {"reuse": "(a) reused connections", "new": "(b) new connection per post"}
    tmp = Path(tempfile.mkdtemp(prefix="listserv-bench-ingest-"))
    print(C.machine_line())
    print(C.load_line())
    print(f"{args.clients} clients (smtplib threads in {args.client_procs} processes), posts of 2-5 KB, "
          f"{args.seconds:g} s per run; server log level {args.log_level}; "
          f"{'every post held (no fan-out)' if args.hold else 'posts accepted and fanned out to 1 member'}"
          + (f"; list defaults: {', '.join(args.list_default)}" if args.list_default else ""))
    results: dict[str, dict[str, Any]] = {}
    try:
        if not args.no_baseline:
            print("reference: do-nothing aiosmtpd server (answers 250 to everything, stores nothing)")
            for mode in modes:
                port = C.free_port()
                srv = subprocess.Popen([sys.executable, __file__, "--_mode", "null", "--port", str(port)],
                                       env=C.child_env())
                try:
                    C.wait_port(port, proc=srv)
                    r = run_clients(args, port, mode, srv.pid)
                finally:
                    _stop(srv)
                results[f"null-{mode}"] = r
                _print_mode(label[mode], r)

        print("listserv serve (durable: committed to SQLite before 250)")
        sink = C.Sink(tmp / "sink")
        dns = None
        if _server_has_dns_section():
            # The author's domain publishes SPF (this machine) and DMARC p=none, as a real one would.
            domain = AUTHOR.rpartition("@")[2]
            dns = C.DnsStub({(domain, "TXT"): ["v=spf1 ip4:127.0.0.1 -all"],
                             (f"_dmarc.{domain}", "TXT"): ["v=DMARC1; p=none"]})
        try:
            for mode in modes:
                state = tmp / f"state-{mode}"
                state.mkdir()
                port = C.free_port()
                cfg = _write_config(state, port, sink.port, args.log_level, args.hold, args.list_default,
                                    dns.port if dns else 0)
                dns_before = dns.queries if dns else 0
                log_path = state / "server.log"
                with open(log_path, "wb") as log:
                    cmd = [sys.executable, "-m", "listserv", "serve", "--config", str(cfg)]
                    if args.profile:
                        cmd = [str(Path(sys.executable).parent / "py-spy"), "record", "-r", "250", "--format", "raw",
                               "-o", f"{args.profile}.{mode}", "--", *cmd]
                    srv = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=C.child_env(),
                                           cwd=state)
                    try:
                        C.wait_port(port, timeout=30, proc=srv)
                        server_pid = srv.pid
                        if args.profile:  # py-spy's child is the server
                            kids = Path(f"/proc/{srv.pid}/task/{srv.pid}/children").read_text().split()
                            server_pid = int(kids[0]) if kids else srv.pid
                        r = run_clients(args, port, mode, server_pid)
                        time.sleep(0.2)
                        at_end = _stored(state / "state" / "listserv.sqlite3")
                    finally:
                        if args.profile:
                            os.kill(server_pid, signal.SIGTERM)
                            srv.wait(60)
                        else:
                            _stop(srv)
                stored = sum(at_end.values())
                check = "OK" if stored == r["ok"] else f"MISMATCH: {stored} stored"
                r["stored"] = at_end
                results[f"listserv-{mode}"] = r
                _print_mode(label[mode], r)
                if dns:
                    print(f"    DNS questions to the local stub: {(dns.queries - dns_before) / max(r['ok'], 1):.1f} per post")
                print(f"    stored posts == answered 250: {check}; by status at the end of the run: "
                      + ", ".join(f"{k} {v}" for k, v in sorted(at_end.items()))
                      + f"; server CPU per post {1e6 * r['server_cpu'] / max(r['ok'], 1):.0f} µs")
                errors = [ln for ln in log_path.read_text(errors="replace").splitlines()
                          if " ERROR " in ln or "Traceback" in ln]
                if errors:
                    print(f"    server log has {len(errors)} error lines, e.g. {errors[0][:200]}")
        finally:
            sink.stop()
            if dns:
                dns.stop()
    finally:
        if args.keep:
            print(f"kept {tmp}")
        else:
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)

    print()
    print(C.load_line())
    print(f"summary (goal: >= {GOAL:,.0f} durable posts/s with reused connections)")
    for mode in modes:
        ls = results.get(f"listserv-{mode}")
        null = results.get(f"null-{mode}")
        if ls is None:
            continue
        ref = f"; do-nothing aiosmtpd {null['rate']:,.0f} posts/s ({ls['rate'] / null['rate']:.0%})" if null else ""
        goal = ""
        if mode == "reuse":
            goal = f"  -> goal {'MET' if ls['rate'] >= GOAL else 'NOT MET'}"
        print(f"  {label[mode]:<30} listserv {ls['rate']:>7,.0f} posts/s{ref}{goal}")


# -- issue 10: posts/s fully delivered, with 1 and 2 worker processes ------------------------------------

ACCEPT_GOAL, DELIVERED_GOAL, SCALE_GOAL = 0.6, 0.5, 1.6


def _members(n: int) -> list[str]:
    return [AUTHOR] + [f"czlonek{i}@gmina{i % 7}.example.pl" for i in range(1, n)]


def _delivered_config(state: Path, port: int, relay_port: int, args: argparse.Namespace, workers: int,
                      dns_port: int) -> Path:
    # Default settings: the list's own defaults, [delivery] as _common sets it for every benchmark.
    mapping = C.config_mapping(state, listen_port=port, relay_port=relay_port, log_level=args.log_level)
    mapping["server"]["workers"] = workers
    text = C.to_toml(mapping)
    if dns_port:
        text += f'[dns]\nnameservers = ["127.0.0.1:{dns_port}"]\n\n'
    if args.store_url:
        text += f'[store]\nurl = {json.dumps(args.store_url)}\n\n'
    text += (f'[[lists]]\nname = "{LIST}"\ntitle = "Dyskusja o energii"\nowners = ["{AUTHOR}"]\n'
             'language = "pl"\n')
    path = state / "listserv.toml"
    path.write_text(text, encoding="utf-8")
    return path


def _tree_cpu(pid: int) -> float:
    """CPU seconds of a process and its children (the worker processes)."""
    total = C.proc_cpu_seconds(pid)
    try:
        kids = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        kids = []
    return total + sum(C.proc_cpu_seconds(int(k)) for k in kids)


def delivered_main(args: argparse.Namespace) -> None:
    worker_counts = [int(w) for w in args.workers.split(",") if w.strip()]
    members = _members(args.members)
    copies = args.posts * len(members)
    tmp = Path(tempfile.mkdtemp(prefix="listserv-bench-delivered-"))
    print(C.machine_line())
    print(C.load_line())
    print(f"{args.clients} clients with reused connections (smtplib threads in {args.client_procs} processes), "
          f"{args.posts} member posts of 2-5 KB to a list of {len(members)}, default settings "
          f"({copies} copies); store {args.store_url or 'SQLite (default)'}. The machine is shared: figures are noisy.")
    null = None
    if not args.no_baseline:
        port = C.free_port()
        srv = subprocess.Popen([sys.executable, __file__, "--_mode", "null", "--port", str(port)], env=C.child_env())
        try:
            C.wait_port(port, proc=srv)
            null = run_clients(args, port, "reuse", srv.pid)
        finally:
            _stop(srv)
        _print_mode("reference: do-nothing aiosmtpd", null)
    domain = AUTHOR.rpartition("@")[2]
    dns = C.DnsStub({(domain, "TXT"): ["v=spf1 ip4:127.0.0.1 -all"],
                     (f"_dmarc.{domain}", "TXT"): ["v=DMARC1; p=none"]}) if _server_has_dns_section() else None
    runs: dict[int, dict[str, Any]] = {}
    try:
        for workers in worker_counts:
            state = tmp / f"state-w{workers}"
            state.mkdir()
            sink = C.Sink(state / "sink", expect=copies)
            port = C.free_port()
            cfg = _write_members(_delivered_config(state, port, sink.port, args, workers, dns.port if dns else 0),
                                 members)
            log_path = state / "server.log"
            with open(log_path, "wb") as log:
                srv = subprocess.Popen([sys.executable, "-m", "listserv", "serve", "--config", str(cfg)],
                                       stdout=log, stderr=subprocess.STDOUT, env=C.child_env(), cwd=state)
                try:
                    C.wait_port(port, timeout=60, proc=srv)
                    time.sleep(1.0 if workers else 0.0)  # the worker processes imported and listening
                    cpu0 = _tree_cpu(srv.pid)
                    r = run_clients(args, port, "reuse", srv.pid)
                    done = sink.wait_done(timeout=600)
                    r["delivered_wall"] = float(done["now_ts"]) - r["start_at"]
                    r["delivered_rate"] = r["ok"] / r["delivered_wall"]
                    r["tree_cpu"] = _tree_cpu(srv.pid) - cpu0
                    r["copies"] = done.get("recipients", 0)
                finally:
                    _stop(srv)
                    sink.stop()
            runs[workers] = r
            _print_mode(f"listserv, workers = {workers}: accepted", r)
            print(f"    fully delivered: {r['delivered_rate']:,.0f} posts/s ({r['copies']} copies in "
                  f"{r['delivered_wall']:.2f} s from the first post, {r['copies'] / r['delivered_wall']:,.0f} "
                  f"copies/s); CPU of the server and its workers {r['tree_cpu']:.1f} s")
            errors = [ln for ln in log_path.read_text(errors="replace").splitlines()
                      if " ERROR " in ln or "Traceback" in ln]
            if errors:
                print(f"    server log has {len(errors)} error lines, e.g. {errors[0][:200]}")
            sys.stdout.flush()
    finally:
        if dns:
            dns.stop()
        if args.keep:
            print(f"kept {tmp}")
        else:
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)
    print()
    print(C.load_line())
    print(f"summary (goals as ratios to the do-nothing server: accepted >= {ACCEPT_GOAL}, fully delivered >= "
          f"{DELIVERED_GOAL}; 2 workers >= {SCALE_GOAL}x 1 worker in delivery)")
    for workers, r in runs.items():
        if null is None:
            print(f"  workers = {workers}: accepted {r['rate']:,.0f}/s, delivered {r['delivered_rate']:,.0f}/s")
            continue
        acc, dlv = r["rate"] / null["rate"], r["delivered_rate"] / null["rate"]
        print(f"  workers = {workers}: accepted {r['rate']:,.0f} posts/s = {acc:.2f} "
              f"({'MET' if acc >= ACCEPT_GOAL else 'NOT MET'}), fully delivered {r['delivered_rate']:,.0f} posts/s "
              f"= {dlv:.2f} ({'MET' if dlv >= DELIVERED_GOAL else 'NOT MET'}) of {null['rate']:,.0f}")
    if 1 in runs and 2 in runs:
        scale = runs[2]["delivered_rate"] / runs[1]["delivered_rate"]
        print(f"  2 workers / 1 worker, fully delivered: {scale:.2f}x ({'MET' if scale >= SCALE_GOAL else 'NOT MET'})")


def _write_members(cfg: Path, members: list[str]) -> Path:
    """The list's members, added with the CLI before the server starts (as an operator would)."""
    csv = cfg.parent / "members.csv"
    # The author is the list's owner (seeded from [[lists]]), a member already.
    csv.write_text("".join(f"{m}\n" for m in members if m != AUTHOR), encoding="utf-8")
    for cmd in (["dkim", "keygen"], ["members", "add", LIST, "--file", str(csv)]):
        subprocess.run([sys.executable, "-m", "listserv", *cmd, "--config", str(cfg)], check=True,
                       capture_output=True, env=C.child_env(), cwd=cfg.parent)
    return cfg


if __name__ == "__main__":
    main()
