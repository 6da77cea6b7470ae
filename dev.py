#!/usr/bin/env python3
"""Set up and run listserv from a checkout, with nothing installed but Python 3.11+.

    python3 dev.py serve   # make .venv if needed, install listserv, run it on config.example.toml
    python3 dev.py test    # make .venv if needed, install listserv with test extras, run every test

Anything after the command goes to `listserv serve` or to pytest.  `test` runs
pytest twice: the whole suite on SQLite, then every test that touches the
store again on a throwaway PostgreSQL server (LISTSERV_TEST_STORE=postgresql;
tests marked one_backend run once).  Where PostgreSQL is not installed the
second run is skipped with the reason (a failure with LISTSERV_STRICT_SKIPS=1).
Setting LISTSERV_TEST_STORE yourself runs only that backend.
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
        os.execv(args[0], args)
    # One pytest worker per core (pytest-xdist): most tests wait on sockets
    # and subprocesses, so two cores run the suite in about 60 % of the time.
    # `-n 0` (or any -n/-p given) runs it as asked.
    parallel = [] if any(a.startswith(("-n", "--numprocesses", "-p")) for a in rest) else ["-n", "auto"]
    pytest = [str(BIN / "python"), "-m", "pytest", *parallel]
    if os.environ.get("LISTSERV_TEST_STORE"):
        os.execv(pytest[0], [*pytest, *rest])
    first = subprocess.run([*pytest, *rest], env={**os.environ, "LISTSERV_TEST_STORE": "sqlite"}).returncode
    missing = subprocess.run(
        [str(BIN / "python"), "-c", "import sys; sys.path.insert(0, 'tests'); import pgserver; "
         "print(pgserver.missing_reason())"], capture_output=True, text=True).stdout.strip()
    if missing:
        print(f"\nthe PostgreSQL run is skipped: {missing}", file=sys.stderr)
        strict = os.environ.get("LISTSERV_STRICT_SKIPS") == "1"
        sys.exit(first or (1 if strict else 0))
    print("\n---- the same tests on PostgreSQL (LISTSERV_TEST_STORE=postgresql) ----", file=sys.stderr)
    second = subprocess.run([*pytest, "-m", "not one_backend", *rest],
                            env={**os.environ, "LISTSERV_TEST_STORE": "postgresql"}).returncode
    # pytest's 5 is "no tests collected": a selection (-k ...) that picked only one-backend tests.
    sys.exit(first or (0 if second == 5 else second))


if __name__ == "__main__":
    main()
