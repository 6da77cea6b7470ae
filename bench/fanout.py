"""Benchmark: fan-out of one ~5 KB Polish post to 1,000 and 10,000 members, against a bare SMTP client.

What it measures, for each list size N (default 1,000 and 10,000):

(a) listserv: a real ``listserv.app.App`` (config from ``listserv.config.from_mapping``,
    delivery mode "smtp", max_recipients=500, connections=4) runs in a worker process
    of its own.  A list with N members is created through the store, one post is sent
    to it over SMTP, and the clock runs from the moment the post is answered 250 until
    the fan-out has *recorded* every one of the N copies as sent in SQLite (the store's
    ``record_outcomes`` is wrapped to count; at the end the deliveries table is checked:
    N rows 'sent').  That span includes everything listserv does for the post:
    reading it back, rewriting it, DKIM signing, queueing N delivery rows in SQLite,
    the SMTP transactions to the relay, and recording the outcomes.  Printed:
    recipients/s, wall time, CPU seconds of the listserv process over that span
    (time.process_time, all threads, incl. SQLite's), peak RSS of the process
    (ru_maxrss), and when the sink saw its first and its N-th recipient.
(b) baseline: a bare aiosmtplib client (the library listserv itself uses), same batch
    size (500 RCPTs per transaction) and same number of parallel connections (4),
    sending the very bytes listserv sent (its signed copy) from the same envelope
    sender to the same N recipients, to the same sink.  Printed: wall time from the
    first connect to the last 250, and its CPU seconds.

The relay is the shared counting sink (``../shared/tools/smtp_sink.py``, aiosmtpd) in a
separate process; one sink per N serves both (a) and (b) (its counters are reset in
between), so both see the same relay.  The sink's own CPU per run is printed too:
when it is near the wall time, the sink is the limit.

Before measuring, the listserv worker sends one warm-up post to a one-member list
(so first-use costs -- imports done lazily, the relay connection -- are not counted,
as on a long-running server); ``--no-warmup`` measures a cold start instead.

Goal (from the issue, "the relay, not listserv, is the limit"): the fan-out's wall
time within 10 % of the baseline's, i.e. listserv_wall / baseline_wall <= 1.10.

Usage (from the repo root):  python bench/fanout.py [--sizes 1000,10000] [--repeat 1]
                                                    [--size-bytes 5000] [--profile DIR]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

LIST = "dyskusja"
WARM_LIST = "rozgrzewka"
AUTHOR = C.member_address(0)
AUTHOR_NAME = "Małgorzata Wiśniewska-Żółć"
GOAL = 1.10


# -- (a) the listserv worker ---------------------------------------------------------------


async def _listserv_run(args: argparse.Namespace) -> dict[str, Any]:
    import aiosmtplib

    from listserv.app import App
    from listserv.config import from_mapping

    state = Path(args.state)
    mapping = C.config_mapping(state, listen_port=0, relay_port=args.sink_port,
                               max_recipients=args.max_recipients, connections=args.connections)
    cfg = from_mapping(mapping, base=state)

    async def no_dns(name: str) -> list[str]:  # DMARC lookups (unused with dmarc_mitigation=always)
        return []

    app = App(cfg, resolve_txt=no_dns)
    await app.start()
    assert app.store is not None and app.fanout is not None
    store, fanout = app.store, app.fanout
    n = args.n

    await store.create_list(LIST, {"title": "Dyskusja o energii"}, [])
    rng = random.Random(1)
    members = [(C.member_address(i), f"{rng.choice(C.FIRST)} {rng.choice(C.LAST)}", rng.choice(C.ORGS))
               for i in range(n)]
    members[0] = (AUTHOR, AUTHOR_NAME, "Urząd Miasta Łodzi")
    await store.add_members(LIST, members)

    # Instrumentation: count recorded outcomes; note when the post is queued and batches go out.
    marks: dict[str, Any] = {"recorded": 0, "sent": 0, "batches": 0, "send_s": [], "first_send": None,
                             "queued": None, "record_s": 0.0}
    target = {"n": 1}
    done = asyncio.Event()
    orig_record = store.record_outcomes

    async def record_outcomes(outcomes: Any) -> None:
        t = time.perf_counter()
        await orig_record(outcomes)
        marks["record_s"] += time.perf_counter() - t
        marks["recorded"] += len(outcomes)
        marks["sent"] += sum(1 for o in outcomes if o.status == "sent")
        if marks["recorded"] >= target["n"]:
            marks["all_recorded"] = time.time()
            done.set()

    store.record_outcomes = record_outcomes  # type: ignore[method-assign]
    orig_enqueue = store.enqueue

    async def enqueue(**kw: Any) -> int:
        outbox_id = await orig_enqueue(**kw)
        marks["queued"] = time.time()
        marks["outbox_id"] = outbox_id
        return outbox_id

    store.enqueue = enqueue  # type: ignore[method-assign]
    transport = fanout.transport
    orig_send = transport.send

    async def send(sender: str, recipients: Any, data: bytes) -> Any:
        t = time.perf_counter()
        if marks["first_send"] is None:
            marks["first_send"] = time.time()
        try:
            return await orig_send(sender, recipients, data)
        finally:
            marks["send_s"].append(time.perf_counter() - t)
            marks["batches"] += 1

    transport.send = send  # type: ignore[method-assign]

    async def post(list_name: str, message_id: str) -> float:
        data = C.make_post(random.Random(7), author=AUTHOR, author_name=AUTHOR_NAME,
                           list_address=f"{list_name}@{C.DOMAIN}", size=args.size_bytes, message_id=message_id)
        client = aiosmtplib.SMTP(hostname="127.0.0.1", port=app.port, timeout=60)
        await client.connect()
        errors, reply = await client.sendmail(AUTHOR, [f"{list_name}@{C.DOMAIN}"], data)
        accepted = time.time()
        if errors or not reply.startswith("2.0.0 Accepted"):
            raise SystemExit(f"the post was not accepted: {errors} {reply}")
        asyncio.get_running_loop().create_task(client.quit())
        marks["post_bytes"] = len(data)
        return accepted

    if not args.no_warmup:
        await store.create_list(WARM_LIST, {}, [])
        await store.add_members(WARM_LIST, [(AUTHOR, AUTHOR_NAME, "")])
        await post(WARM_LIST, "rozgrzewka.1@example.pl")
        await asyncio.wait_for(done.wait(), 30)
        sink = C.Sink.__new__(C.Sink)  # attach to the running sink to reset its counters
        sink.counts_file = Path(args.sink_dir) / "sink.counts.json"
        sink.done_file = Path(args.sink_dir) / "sink.done.json"
        sink.proc = type("P", (), {"pid": args.sink_pid})()  # type: ignore[assignment]
        sink.reset()
        for key in ("recorded", "sent", "batches"):
            marks[key] = 0
        marks["send_s"], marks["first_send"], marks["queued"], marks["record_s"] = [], None, None, 0.0
        done.clear()
    target["n"] = n

    profiler = None
    if args.profile:
        import cProfile

        profiler = cProfile.Profile()
    ru0 = resource.getrusage(resource.RUSAGE_SELF)
    if profiler:
        profiler.enable()
    accepted = await post(LIST, "20231114221320.12345@example.pl")
    cpu0 = time.process_time()
    await asyncio.wait_for(done.wait(), args.timeout)
    cpu1 = time.process_time()
    if profiler:
        profiler.disable()
        profiler.dump_stats(args.profile)
    ru1 = resource.getrusage(resource.RUSAGE_SELF)

    outbox_id = marks["outbox_id"]
    counts = await store.delivery_counts(outbox_id)
    envelope_from, signed = await store.outbox_message(outbox_id)
    Path(args.data_out).write_bytes(signed)
    await app.stop(grace=5)
    return {
        "n": n, "accepted": accepted, "all_recorded": marks["all_recorded"], "queued": marks["queued"],
        "first_send": marks["first_send"], "wall": marks["all_recorded"] - accepted, "cpu": cpu1 - cpu0,
        "cpu_user": ru1.ru_utime - ru0.ru_utime, "cpu_sys": ru1.ru_stime - ru0.ru_stime,
        "maxrss_mb": ru1.ru_maxrss / 1024, "counts": counts, "batches": marks["batches"],
        "send_s": marks["send_s"], "record_s": marks["record_s"], "envelope_from": envelope_from,
        "signed_bytes": len(signed), "post_bytes": marks["post_bytes"],
    }


# -- (b) the baseline worker -----------------------------------------------------------------


async def _baseline_run(args: argparse.Namespace) -> dict[str, Any]:
    import aiosmtplib

    data = Path(args.data_in).read_bytes()
    recipients = [C.member_address(i) for i in range(args.n)]
    batches = [recipients[i:i + args.max_recipients] for i in range(0, len(recipients), args.max_recipients)]
    queue: asyncio.Queue[list[str]] = asyncio.Queue()
    for b in batches:
        queue.put_nowait(b)
    refused = 0

    async def worker() -> None:
        nonlocal refused
        client = aiosmtplib.SMTP(hostname="127.0.0.1", port=args.sink_port, timeout=60)
        await client.connect()
        while not queue.empty():
            batch = queue.get_nowait()
            errors, _ = await client.sendmail(args.envelope_from, batch, data)
            refused += len(errors)
        await client.quit()

    cpu0 = time.process_time()
    start = time.time()
    await asyncio.gather(*(worker() for _ in range(args.connections)))
    end = time.time()
    return {"n": args.n, "start": start, "end": end, "wall": end - start, "cpu": time.process_time() - cpu0,
            "refused": refused, "batches": len(batches), "maxrss_mb": C.peak_rss_mb()}


# -- the driver ----------------------------------------------------------------------------


def _worker(args: list[str], timeout: float) -> dict[str, Any]:
    proc = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, env=C.child_env(),
                          timeout=timeout)
    if proc.returncode != 0:
        raise SystemExit(f"worker {args[0]} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _fmt(seconds: float) -> str:
    return f"{seconds:8.3f} s"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", default="1000,10000", help="comma-separated member counts (default 1000,10000)")
    p.add_argument("--repeat", type=int, default=1, help="runs per size; the median is reported (default 1)")
    p.add_argument("--size-bytes", type=int, default=5000, help="size of the post (default 5000)")
    p.add_argument("--max-recipients", type=int, default=500)
    p.add_argument("--connections", type=int, default=4)
    p.add_argument("--no-warmup", action="store_true", help="measure the first post of a fresh server")
    p.add_argument("--timeout", type=float, default=300.0)
    p.add_argument("--profile", metavar="DIR", help="write a cProfile of each listserv run into DIR")
    p.add_argument("--keep", action="store_true", help="keep the temporary directory")
    # internal: worker modes
    p.add_argument("--_mode", choices=["listserv", "baseline"], help=argparse.SUPPRESS)
    p.add_argument("--n", type=int, help=argparse.SUPPRESS)
    p.add_argument("--sink-port", type=int, help=argparse.SUPPRESS)
    p.add_argument("--sink-pid", type=int, help=argparse.SUPPRESS)
    p.add_argument("--sink-dir", help=argparse.SUPPRESS)
    p.add_argument("--state", help=argparse.SUPPRESS)
    p.add_argument("--data-out", help=argparse.SUPPRESS)
    p.add_argument("--data-in", help=argparse.SUPPRESS)
    p.add_argument("--envelope-from", help=argparse.SUPPRESS)
    p.add_argument("--profile-out", dest="profile_file", help=argparse.SUPPRESS)
    args = p.parse_args()

    if args._mode == "listserv":
        args.profile = args.profile_file
        print(json.dumps(asyncio.run(_listserv_run(args))))
        return
    if args._mode == "baseline":
        print(json.dumps(asyncio.run(_baseline_run(args))))
        return

    sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
    tmp = Path(tempfile.mkdtemp(prefix="listserv-bench-fanout-"))
    print(C.machine_line())
    print(f"post: ~{args.size_bytes} B Polish text/plain UTF-8 8bit; batches of {args.max_recipients} RCPTs; "
          f"{args.connections} connections; sink: {C.SINK}")
    print(f"warm-up post before measuring: {'no' if args.no_warmup else 'yes'}; repeat: {args.repeat}")
    results: list[tuple[int, dict[str, Any], dict[str, Any], float, float]] = []
    try:
        for n in sizes:
            sink = C.Sink(tmp / f"sink-{n}", expect=n)
            runs_ls: list[dict[str, Any]] = []
            runs_bl: list[dict[str, Any]] = []
            sink_cpu_ls: list[float] = []
            sink_cpu_bl: list[float] = []
            try:
                for r in range(args.repeat):
                    state = tmp / f"ls-{n}-{r}"
                    data_file = state / "signed.eml"
                    state.mkdir(parents=True)
                    sink.reset()
                    cpu_before = sink.cpu_seconds()
                    wargs = ["--_mode", "listserv", "--n", str(n), "--sink-port", str(sink.port),
                             "--sink-pid", str(sink.proc.pid), "--sink-dir", str(sink.counts_file.parent),
                             "--state", str(state), "--data-out", str(data_file),
                             "--size-bytes", str(args.size_bytes), "--max-recipients", str(args.max_recipients),
                             "--connections", str(args.connections), "--timeout", str(args.timeout)]
                    if args.no_warmup:
                        wargs.append("--no-warmup")
                    if args.profile:
                        Path(args.profile).mkdir(parents=True, exist_ok=True)
                        wargs += ["--profile-out", str(Path(args.profile) / f"fanout-{n}-{r}.prof")]
                    ls = _worker(wargs, args.timeout + 60)
                    done = sink.wait_done(10)
                    ls["sink_first"] = done["first_data_ts"]
                    ls["sink_all"] = done["expect_reached_ts"]
                    sink_cpu_ls.append(sink.cpu_seconds() - cpu_before)
                    if ls["counts"] != {"sent": n}:
                        raise SystemExit(f"listserv did not record all {n} copies as sent: {ls['counts']}")

                    sink.reset()
                    cpu_before = sink.cpu_seconds()
                    bl = _worker(["--_mode", "baseline", "--n", str(n), "--sink-port", str(sink.port),
                                  "--data-in", str(data_file), "--envelope-from", ls["envelope_from"],
                                  "--max-recipients", str(args.max_recipients),
                                  "--connections", str(args.connections)], args.timeout + 60)
                    done = sink.wait_done(10)
                    sink_cpu_bl.append(sink.cpu_seconds() - cpu_before)
                    if bl["refused"]:
                        raise SystemExit(f"the sink refused {bl['refused']} baseline recipients")
                    runs_ls.append(ls)
                    runs_bl.append(bl)
            finally:
                sink.stop()
            ls = sorted(runs_ls, key=lambda x: x["wall"])[len(runs_ls) // 2]
            bl = sorted(runs_bl, key=lambda x: x["wall"])[len(runs_bl) // 2]
            results.append((n, ls, bl, statistics.median(sink_cpu_ls), statistics.median(sink_cpu_bl)))
            _report(n, ls, bl, results[-1][3], results[-1][4], runs_ls, runs_bl)
    finally:
        if args.keep:
            print(f"kept {tmp}")
        else:
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)

    print()
    print("summary (goal: listserv wall <= 1.10 x baseline wall; 'the relay, not listserv, is the limit')")
    print(f"{'members':>8} {'listserv':>10} {'baseline':>10} {'ratio':>6} {'rcpt/s ls':>10} {'rcpt/s bl':>10}  goal")
    for n, ls, bl, _, _ in results:
        ratio = ls["wall"] / bl["wall"]
        print(f"{n:>8} {ls['wall']:>9.3f}s {bl['wall']:>9.3f}s {ratio:>6.2f} {n / ls['wall']:>10.0f} "
              f"{n / bl['wall']:>10.0f}  {'MET' if ratio <= GOAL else 'NOT MET'}")


def _report(n: int, ls: dict[str, Any], bl: dict[str, Any], sink_cpu_ls: float, sink_cpu_bl: float,
            runs_ls: list[dict[str, Any]], runs_bl: list[dict[str, Any]]) -> None:
    ratio = ls["wall"] / bl["wall"]
    sends = ls["send_s"]
    print()
    print(f"== {n} members ==")
    print(f"post {ls['post_bytes']} B in, signed copy {ls['signed_bytes']} B out, {ls['batches']} batches")
    print("(a) listserv, from 250 for the post to all copies recorded 'sent' in SQLite:")
    print(f"    wall              {_fmt(ls['wall'])}   -> {n / ls['wall']:,.0f} recipients/s")
    print(f"    CPU (listserv)    {_fmt(ls['cpu'])}   (user {ls['cpu_user']:.3f} s, sys {ls['cpu_sys']:.3f} s)"
          f"  = {100 * ls['cpu'] / ls['wall']:.0f}% of one core")
    print(f"    peak RSS          {ls['maxrss_mb']:8.1f} MB")
    print(f"    post queued (rewritten, signed, {n} rows inserted) after {_fmt(ls['queued'] - ls['accepted'])}")
    print(f"    first batch on the wire after                       {_fmt(ls['first_send'] - ls['accepted'])}")
    print(f"    sink saw first copy after                           {_fmt(ls['sink_first'] - ls['accepted'])}")
    print(f"    sink saw all {n} recipients after{' ' * (18 - len(str(n)))}{_fmt(ls['sink_all'] - ls['accepted'])}")
    print(f"    per batch: SMTP transaction median {1000 * statistics.median(sends):.1f} ms, "
          f"record_outcomes total {1000 * ls['record_s']:.0f} ms")
    print(f"    sink CPU during the run {_fmt(sink_cpu_ls)}")
    print("(b) baseline: bare aiosmtplib client, same bytes, batches and connections:")
    print(f"    wall              {_fmt(bl['wall'])}   -> {n / bl['wall']:,.0f} recipients/s")
    print(f"    CPU (client)      {_fmt(bl['cpu'])};  sink CPU during the run {_fmt(sink_cpu_bl)}")
    if len(runs_ls) > 1:
        print(f"    runs: listserv {', '.join(format(r['wall'], '.3f') for r in runs_ls)} s; "
              f"baseline {', '.join(format(r['wall'], '.3f') for r in runs_bl)} s (median shown)")
    print(f"ratio listserv/baseline = {ratio:.2f}  -> goal (<= {GOAL:.2f}) "
          f"{'MET' if ratio <= GOAL else 'NOT MET'}")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
