#!/usr/bin/env python3
"""Set up and run listserv from a checkout, with nothing installed but Python 3.11+.

    python3 dev.py serve   # make .venv if needed, install listserv, run it on config.example.toml
    python3 dev.py test    # make .venv if needed, install listserv with test extras, run every test

Anything after the command goes to `listserv serve` or to pytest.
"""

from __future__ import annotations

import os
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"
BIN = VENV / ("Scripts" if os.name == "nt" else "bin")


def ensure_env() -> None:
    if sys.version_info < (3, 11):
        sys.exit(f"listserv needs Python 3.11 or newer; this is {sys.version.split()[0]}")
    python = BIN / "python"
    if not python.exists():
        print(f"creating {VENV}", file=sys.stderr)
        venv.create(VENV, with_pip=True)
    stamp = VENV / ".listserv-installed"
    inputs = [ROOT / "pyproject.toml"]
    if not stamp.exists() or any(p.stat().st_mtime > stamp.stat().st_mtime for p in inputs):
        print("installing listserv and its dependencies into .venv", file=sys.stderr)
        subprocess.run([str(python), "-m", "pip", "install", "--quiet", "--upgrade", "pip"], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "--quiet", "-e", f"{ROOT}[test]"], check=True)
        stamp.touch()


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1] not in ("serve", "test"):
        sys.exit(__doc__)
    command, rest = sys.argv[1], sys.argv[2:]
    ensure_env()
    os.chdir(ROOT)
    if command == "serve":
        args = [str(BIN / "listserv"), "serve", "--config", str(ROOT / "config.example.toml"), *rest]
    else:
        # One pytest worker per core (pytest-xdist): most tests wait on sockets
        # and subprocesses, so two cores run the suite in about 60 % of the time.
        # `-n 0` (or any -n/-p given) runs it as asked.
        parallel = [] if any(a.startswith(("-n", "--numprocesses", "-p")) for a in rest) else ["-n", "auto"]
        args = [str(BIN / "python"), "-m", "pytest", *parallel, *rest]
    os.execv(args[0], args)


if __name__ == "__main__":
    main()
