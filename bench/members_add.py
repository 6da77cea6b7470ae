"""Benchmark: adding 10,000 members from a CSV file with the real CLI.

Generates ``members.csv`` with 10,000 rows ``address,display name,organisation``
(Polish names and organisations, UTF-8, with a header line) and times

  python -m listserv members add LIST --file members.csv --config tmp.toml

as a subprocess (the real CLI, a fresh interpreter each time) against a temporary
config and state dir, each run on a fresh, empty list.  Printed: wall seconds of
the whole command (what an administrator waits), and, to show where they go:

* interpreter + CLI start-up: ``python -m listserv --version`` (imports, no work);
* in-process, same steps the command takes, each timed on its own:
  reading and checking the CSV (``cli.read_member_csv``), ``Store.open``, and
  ``Store.add_members`` (one transaction, synchronous=FULL);

Goal: the CLI command under 1 s for 10,000 members (Mailman 3 needs about 125 s).

Usage (from the repo root):  python bench/members_add.py [--members 10000] [--repeat 3]
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

GOAL = 1.0


def write_csv(path: Path, count: int, seed: int = 1) -> None:
    rng = random.Random(seed)
    seen: set[str] = set()
    with open(path, "w", encoding="utf-8", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["address", "display name", "organisation"])
        i = 0
        while len(seen) < count:
            first, last = rng.choice(C.FIRST), rng.choice(C.LAST)
            if first.endswith("a") and last.endswith("ski"):
                last = last[:-1] + "a"  # Kowalski -> Kowalska
            org = rng.choice(C.ORGS)
            domain = rng.choice(["gmail.com", "wp.pl", "onet.pl", "interia.pl", "o2.pl",
                                 C.ascii_fold(org.split()[-1]) + ".gov.pl"])
            address = f"{C.ascii_fold(first)}.{C.ascii_fold(last)}{i}@{domain}"
            i += 1
            if address in seen:
                continue
            seen.add(address)
            w.writerow([address, f"{first} {last}", org])


def run_cli(cfg: Path, *argv: str) -> tuple[float, subprocess.CompletedProcess[str]]:
    t = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "listserv", *argv, "--config", str(cfg)], capture_output=True,
                          text=True, env=C.child_env())
    elapsed = time.perf_counter() - t
    if proc.returncode != 0:
        raise SystemExit(f"listserv {' '.join(argv)} failed ({proc.returncode}): {proc.stderr.strip()}")
    return elapsed, proc


def run_cli_plain(*argv: str) -> float:
    t = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "listserv", *argv], capture_output=True, text=True,
                          env=C.child_env())
    elapsed = time.perf_counter() - t
    if proc.returncode != 0:
        raise SystemExit(f"listserv {' '.join(argv)} failed ({proc.returncode}): {proc.stderr.strip()}")
    return elapsed


async def in_process(db_path: Path, list_name: str, csv_path: Path) -> dict[str, float]:
    from listserv.cli import read_member_csv
    from listserv.store import Store

    t0 = time.perf_counter()
    rows = read_member_csv(csv_path)
    t1 = time.perf_counter()
    store = await Store.open(db_path)
    t2 = time.perf_counter()
    try:
        await store.create_list(list_name, {}, [])
        t3 = time.perf_counter()
        count = await store.add_members(list_name, rows)
        t4 = time.perf_counter()
    finally:
        await store.close()
    t5 = time.perf_counter()
    assert count == len(rows)
    return {"csv": t1 - t0, "open": t2 - t1, "add": t4 - t3, "close": t5 - t4, "rows": len(rows)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--members", type=int, default=10_000)
    p.add_argument("--repeat", type=int, default=3, help="runs of each measurement; median and min shown")
    p.add_argument("--keep", action="store_true", help="keep the temporary directory")
    args = p.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="listserv-bench-members-"))
    try:
        state = tmp / "srv"
        state.mkdir()
        cfg = state / "listserv.toml"
        cfg.write_text(C.to_toml(C.config_mapping(state, listen_port=C.free_port(), relay_port=None)),
                       encoding="utf-8")
        csv_path = tmp / "members.csv"
        write_csv(csv_path, args.members)
        print(C.machine_line())
        print(C.load_line())
        print(f"{csv_path.name}: {args.members:,} rows, {csv_path.stat().st_size / 1024:.0f} KB, e.g. "
              f"{csv_path.read_text(encoding='utf-8').splitlines()[1]!r}")

        startup = [run_cli_plain("--version") for _ in range(args.repeat)]
        cli_runs = []
        outputs = []
        for r in range(args.repeat):
            name = f"rada-{r}"
            run_cli(cfg, "list", "create", name, "--title", "Rada ds. energii")
            elapsed, proc = run_cli(cfg, "members", "add", name, "--file", str(csv_path))
            cli_runs.append(elapsed)
            outputs.append(proc.stdout.strip())
            _, shown = run_cli(cfg, "lists")
            if f"{name}@{C.DOMAIN}\t{args.members} members" not in shown.stdout:
                raise SystemExit(f"the list does not show {args.members} members:\n{shown.stdout}")

        inproc = [asyncio.run(in_process(state / "state" / "listserv.sqlite3", f"rada-inproc-{r}", csv_path))
                  for r in range(args.repeat)]

        def stat(values: list[float]) -> str:
            return f"median {statistics.median(values):6.3f} s   (min {min(values):.3f}, max {max(values):.3f})"

        print()
        print(f"listserv members add LIST --file members.csv   ({args.members:,} members, {args.repeat} runs)")
        print(f"  CLI wall (fresh interpreter):     {stat(cli_runs)}")
        print(f"    the command's own report:       {outputs[-1]!r}")
        print(f"  CLI start-up only (--version):    {stat(startup)}")
        print("  in-process (same Store calls):")
        print(f"    read + check CSV:               {stat([x['csv'] for x in inproc])}")
        print(f"    Store.open:                     {stat([x['open'] for x in inproc])}")
        print(f"    Store.add_members:              {stat([x['add'] for x in inproc])}")
        total = [x["csv"] + x["open"] + x["add"] + x["close"] for x in inproc]
        print(f"    total in-process:               {stat(total)}")
        overhead = statistics.median(cli_runs) - statistics.median(total)
        print(f"  CLI overhead beyond the in-process work (start-up, imports, asyncio.run): {overhead:.3f} s")
        med = statistics.median(cli_runs)
        print()
        print(C.load_line())
        print(f"summary: {med:.3f} s for {args.members:,} members with the CLI "
              f"(~{args.members / med:,.0f} members/s) -> goal (< {GOAL:g} s) {'MET' if med < GOAL else 'NOT MET'}"
              f"; Mailman 3: ~125 s")
    finally:
        if args.keep:
            print(f"kept {tmp}")
        else:
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
