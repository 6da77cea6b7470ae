"""Benchmark the static archive: import + full build, peak RSS, one incremental add; MHonArc beside it.

    python bench/archive.py                     # linux-mips (3,072) and generated 10,000 and 100,000
    python bench/archive.py --sizes 10000       # only the generated sizes given (0: none)
    python bench/archive.py --no-mhonarc --adds 5
    python bench/archive.py --sizes 10000 --no-mips --rounds 5

Each build runs ``listserv archive import`` in a fresh process on a fresh state
folder, so the time is import + full build (wall clock: on a shared machine,
note the load average printed beside each figure), and the peak RSS is that of the
largest process (main or render worker; from wait4).  The incremental figure
is the median time of ``Archiver.add`` for new replies (each in an existing
thread) put into the built archive, measured in a fresh process; the *live*
figure is what a reader sees: ``listserv serve`` runs on the built archive, a
reply is mailed to it with smtplib, and the clock runs from the 250 until its
message page is on disk (median of --posts), as a share of the full build.  MHonArc
(Debian ``mhonarc``, with its UTF-8 resource file) converts the same mbox when
installed; each corpus is run --rounds times (3), the two programs
alternating, and the medians are compared (the per-round ratios are
printed too).  Output folders go under --workdir (default: a temporary folder
beside the checkout, on the same disk as a real archive would be).

listserv is byte-compiled first, as an installed package is.  Both programs
write into folders made fresh for them, and nothing is deleted
before a measured run: on ext4 without a journal (this project's test
machines) the kernel skips inodes freed in the last minutes when it hands
out new ones, so a run right after a large ``rm -rf`` creates files several
times slower.  Run the script again only a few minutes after the last run's
folders were removed (it removes them at the end unless --keep).
"""

from __future__ import annotations

import argparse
import json
import smtplib
import socket
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SHARED = Path(os.environ.get("LISTSERV_SHARED", ROOT.parent / "shared"))
MIPS = SHARED / "corpora" / "mbox_linux_mips" / "linux-mips-2012.mbox"
GEN = SHARED / "tools" / "gen_mbox.py"
MHONARC_RC = Path("/usr/share/doc/mhonarc/examples/utf-8.mrc")

ADD_SCRIPT = r"""
import asyncio, json, statistics, sys, time
from listserv import archive, config
from listserv.store import Store

async def main(cfg_path, name, count):
    cfg = config.load(cfg_path)
    store = await Store.open(cfg.db_path)
    try:
        lst = await store.get_list(name)
        months = await store.archive_months(lst.id)
        latest = await store.archive_month_meta(lst.id, months[len(months) // 2][0])
        archiver = archive.Archiver(cfg, store)
        times = []
        for i in range(count):
            parent = latest[(i * 7) % len(latest)]
            raw = (f"From: Bench <bench@example.org>\r\nSubject: Re: {parent.subject}\r\n"
                   f"Date: Mon, 1 Jan 2024 10:00:00 +0000\r\nMessage-ID: <bench.{i}.{time.time()}@example.org>\r\n"
                   f"In-Reply-To: <{parent.message_id}>\r\nReferences: {' '.join('<%s>' % r for r in parent.refs)} <{parent.message_id}>\r\n"
                   "Content-Type: text/plain; charset=utf-8\r\n\r\nOdpowiedź z benchmarku: zażółć gęślą jaźń.\r\n").encode()
            entry = archive.import_entry(raw, None)
            await store.archive_import(lst.id, [entry])
            started = time.perf_counter()
            await archiver.add(name, entry[1])
            times.append(time.perf_counter() - started)
        print(json.dumps({"median": statistics.median(times), "max": max(times), "all": times}))
    finally:
        await store.close()

asyncio.run(main(sys.argv[1], sys.argv[2], int(sys.argv[3])))
"""


def run_measured(cmd: list[str], **kwargs: object) -> tuple[float, int, str]:
    """Wall seconds, peak RSS (KiB) of the largest process in the tree, stdout.

    Dirty pages of what ran before (the generated mbox, the other tool's
    output) are flushed first, so neither program pays for the other's
    writeback; the CPU time of the command and its children is printed.
    """
    os.sync()
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kwargs)  # type: ignore[call-overload]
    out = proc.stdout.read() if proc.stdout else b""
    err = proc.stderr.read() if proc.stderr else b""
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    elapsed = time.perf_counter() - started
    print(f"    ({os.path.basename(cmd[0])}: {usage.ru_utime:.1f} s user + {usage.ru_stime:.1f} s system CPU)", flush=True)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{err.decode(errors='replace')[-3000:]}")
    return elapsed, usage.ru_maxrss, out.decode(errors="replace")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def bench_live_posts(name: str, folder: Path, cfg: Path, env: dict[str, str], posts: int) -> list[float]:
    """Seconds from the 250 of a post mailed to the running server until its message page exists."""
    member = "bench.member@gmina.example.pl"
    subprocess.run([sys.executable, "-m", "listserv", "--config", str(cfg), "members", "add", name, member],
                   env=env, check=True, stdout=subprocess.DEVNULL)
    port = free_port()
    cfg.write_text(cfg.read_text().replace('state_dir = "state"', f'state_dir = "state"\nlisten = "127.0.0.1:{port}"'))
    server = subprocess.Popen([sys.executable, "-m", "listserv", "--config", str(cfg), "serve"], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    times: list[float] = []
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline or server.poll() is not None:
                    raise SystemExit("listserv serve did not start")
                time.sleep(0.1)
        time.sleep(1.0)  # let start-up work (catch-up, key) settle
        from listserv.rewrite import message_id_hash

        for i in range(posts):
            mid = f"bench.live.{i}.{time.time()}@gmina.example.pl"
            raw = (f"From: Anna Bench <{member}>\r\nTo: {name}@lists.example.org\r\n"
                   f"Subject: Re: pomiar archiwum {i}\r\nDate: Mon, 1 Jan 2024 10:00:00 +0100\r\n"
                   f"Message-ID: <{mid}>\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n"
                   "Odpowiedź z benchmarku: zażółć gęślą jaźń.\r\n").encode()
            page = folder / "www" / name / "m" / f"{message_id_hash(mid)}.html"
            with smtplib.SMTP("127.0.0.1", port) as client:
                client.sendmail(member, [f"{name}@lists.example.org"], raw)
                answered = time.perf_counter()  # sendmail returns after the 250
            while not page.exists():
                if time.perf_counter() - answered > 30:
                    raise SystemExit(f"no page for the live post after 30 s: {page}")
                time.sleep(0.002)
            times.append(time.perf_counter() - answered)
            time.sleep(0.5)
    finally:
        server.terminate()
        server.wait(30)
    return times


def count_messages(mbox: Path) -> int:
    n = 0
    prev_blank = True
    with open(mbox, "rb") as fh:
        for line in fh:
            if prev_blank and line.startswith(b"From "):
                n += 1
            prev_blank = line in (b"\n", b"\r\n")
    return n


def bench_listserv(name: str, mbox: Path, work: Path, adds: int, posts: int, round_no: int = 1) -> dict[str, float]:
    folder = work / (name if round_no == 1 else f"{name}-r{round_no}")
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    cfg = folder / "listserv.toml"
    cfg.write_text(
        '[server]\ndomain = "lists.example.org"\nstate_dir = "state"\n[dkim]\nprivate_key = "state/dkim.key"\n'
        '[delivery]\nmode = "maildir"\n'
        '[archive]\ndir = "www"\nbase_url = "https://archiwum.example.org/"\n'
        # No DNS from a benchmark: no sender checks, no DMARC lookups for From.
        '[list_defaults]\nsender_authentication = "off"\ndmarc_mitigation = "never"\n'
        f'[[lists]]\nname = "{name}"\ntitle = "{name}"\nowners = ["owner@lists.example.org"]\n'
    )
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    messages = count_messages(mbox)
    load = os.getloadavg()[0]
    elapsed, rss, out = run_measured(
        [sys.executable, "-m", "listserv", "--config", str(cfg), "archive", "import", name, str(mbox)], env=env)
    result = {"messages": messages, "seconds": elapsed, "per_second": messages / elapsed, "peak_rss_mib": rss / 1024,
              "load_before": load}
    print(f"  listserv import + full build: {elapsed:.1f} s, {messages / elapsed:,.0f} messages/s, "
          f"peak RSS {rss / 1024:.0f} MiB (load average before: {load:.2f})", flush=True)
    for line in out.strip().split("\n"):
        print(f"    {line}")
    if adds:
        _, _, out = run_measured([sys.executable, "-c", ADD_SCRIPT, str(cfg), name, str(adds)], env=env)
        add = json.loads(out.strip().split("\n")[-1])
        result["add_median_s"] = add["median"]
        result["add_share_of_build"] = add["median"] / elapsed
        print(f"  incremental add (median of {adds}): {add['median'] * 1000:.0f} ms "
              f"(max {add['max'] * 1000:.0f} ms) = {100 * add['median'] / elapsed:.2f} % of the full build", flush=True)
    if posts:
        live = bench_live_posts(name, folder, cfg, env, posts)
        result["live_post_median_s"] = statistics.median(live)
        result["live_post_share_of_build"] = statistics.median(live) / elapsed
        print(f"  a post mailed to the running server, 250 -> page on disk (median of {posts}): "
              f"{statistics.median(live) * 1000:.0f} ms (max {max(live) * 1000:.0f} ms) = "
              f"{100 * statistics.median(live) / elapsed:.2f} % of the full build (goal <= 2 %)", flush=True)
    return result


def bench_mhonarc(name: str, mbox: Path, work: Path, round_no: int = 1) -> dict[str, float] | None:
    exe = shutil.which("mhonarc")
    if exe is None:
        print("  MHonArc: not installed (apt-get install mhonarc)")
        return None
    out = work / f"{name}-mhonarc" if round_no == 1 else work / f"{name}-mhonarc-r{round_no}"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    cmd = [exe, "-quiet", "-outdir", str(out)]
    if MHONARC_RC.exists():
        cmd += ["-rcfile", str(MHONARC_RC)]
    messages = count_messages(mbox)
    load = os.getloadavg()[0]
    elapsed, rss, _ = run_measured([*cmd, str(mbox)])
    print(f"  MHonArc: {elapsed:.1f} s, {messages / elapsed:,.0f} messages/s, peak RSS {rss / 1024:.0f} MiB "
          f"(load average before: {load:.2f})", flush=True)
    return {"seconds": elapsed, "per_second": messages / elapsed, "peak_rss_mib": rss / 1024, "load_before": load}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="10000,100000", help="generated mbox sizes, comma-separated (0: none)")
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--adds", type=int, default=5, help="incremental adds to time per archive")
    parser.add_argument("--posts", type=int, default=5, help="posts mailed to the running server per archive")
    parser.add_argument("--no-mips", action="store_true", help="skip the linux-mips corpus")
    parser.add_argument("--no-mhonarc", action="store_true")
    parser.add_argument("--mhonarc-max", type=int, default=10000, help="skip MHonArc above this many messages")
    parser.add_argument("--keep", action="store_true", help="keep the output folders")
    parser.add_argument("--rounds", type=int, default=3,
                        help="rounds per corpus, listserv and MHonArc alternating; medians are compared")
    args = parser.parse_args()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="listserv-bench-archive-", dir=ROOT.parent))
    work.mkdir(parents=True, exist_ok=True)
    print(f"cores: {os.cpu_count()}, output under {work}")
    # Byte-compiled, as `pip install` leaves an installed package: where
    # PYTHONDONTWRITEBYTECODE is set (these test machines) every run would
    # compile the package's sources again first (0.1 s a run).
    subprocess.run([sys.executable, "-m", "compileall", "-q", str(ROOT / "listserv")], check=True)
    corpora: list[tuple[str, Path]] = []
    if args.no_mips:
        pass
    elif MIPS.exists():
        corpora.append(("linux-mips", MIPS))
    else:
        print(f"{MIPS} not found; skipping it")
    for size in [int(s) for s in args.sizes.split(",") if s.strip() and int(s) > 0]:
        path = work / f"gen-{size}-seed4242.mbox"
        if not path.exists():
            print(f"generating {size:,} messages with gen_mbox.py ...", flush=True)
            subprocess.run([sys.executable, str(GEN), str(size), "--seed", "4242", "-o", str(path)], check=True,
                           stdout=subprocess.DEVNULL)
        corpora.append((f"gen-{size}", path))
    summary = {}
    try:
        for name, mbox in corpora:
            print(f"\n{name}: {mbox} ({mbox.stat().st_size / 1e6:.0f} MB)", flush=True)
            # Rounds alternate the two programs, each into a fresh folder: on a
            # shared machine the speed drifts by 10-20 % within minutes, and
            # the medians of alternating runs compare like with like.
            count = count_messages(mbox)
            with_mhonarc = not args.no_mhonarc and count <= args.mhonarc_max
            ours: list[dict[str, float]] = []
            theirs: list[dict[str, float]] = []
            rounds = max(1, args.rounds) if with_mhonarc or count < 100_000 else 1  # 100,000: once, for the RSS
            for round_no in range(1, rounds + 1):
                if rounds > 1:
                    print(f" round {round_no} of {rounds}", flush=True)
                first = round_no == 1
                ours.append(bench_listserv(name, mbox, work, args.adds if first else 0, args.posts if first else 0,
                                           round_no))
                if with_mhonarc:
                    mh_round = bench_mhonarc(name, mbox, work, round_no)
                    if mh_round is not None:
                        theirs.append(mh_round)
                        ratio = mh_round["seconds"] / ours[-1]["seconds"]
                        print(f"  this round: {ratio:.1f}x", flush=True)
            row: dict[str, object] = {"listserv": dict(ours[0], seconds=statistics.median(r["seconds"] for r in ours),
                                                       rounds=[r["seconds"] for r in ours])}
            ls = row["listserv"]
            assert isinstance(ls, dict)
            ls["per_second"] = ls["messages"] / ls["seconds"]
            ls["peak_rss_mib"] = max(r["peak_rss_mib"] for r in ours)
            if theirs:
                mh = dict(theirs[0], seconds=statistics.median(r["seconds"] for r in theirs),
                          rounds=[r["seconds"] for r in theirs])
                mh["per_second"] = ls["messages"] / mh["seconds"]
                row["mhonarc"] = mh
                print(f"  listserv {ls['seconds']:.1f} s, MHonArc {mh['seconds']:.1f} s (medians of {len(ours)}): "
                      f"speed-up over MHonArc {mh['seconds'] / ls['seconds']:.1f}x (goal >= 5x); "
                      f"per round {', '.join(f'{m / o:.1f}x' for m, o in zip(mh['rounds'], ls['rounds']))}")
            if isinstance(ls, dict) and ls["messages"] >= 100_000:
                print(f"  peak RSS at {ls['messages']:,} messages: {ls['peak_rss_mib']:.0f} MiB (goal < 500 MB)")
            summary[name] = row
        print("\n" + json.dumps(summary, indent=1))
    finally:
        if not args.keep and args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
