"""Start-up: private file modes whatever the umask, and failures that exit at once naming the setting.

The start-up failures run the real ``listserv serve`` in a subprocess (a port
is held by a plain socket of the test); the file modes are checked on the real
files of a real server started in-process under umask 022.
"""

from __future__ import annotations

import os
import smtplib
import socket
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import DOMAIN, free_port, make_config
from listserv import dkim, doctor, files
from listserv.dns import DictResolver

LIST = "seap-planning"
ANNA = "anna.kowalska@gmina-wieliczka.pl"


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def umask_022() -> Iterator[None]:
    old = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(old)


def write_config(tmp_path: Path, smtp_port: int, web_port: int | None = None, **extra: str) -> Path:
    web = f'\n[web]\nlisten = "127.0.0.1:{web_port}"\n' if web_port else ""
    text = f"""\
[server]
domain = "{DOMAIN}"
listen = "127.0.0.1:{smtp_port}"
state_dir = "{extra.get('state_dir', 'state')}"

[dkim]
selector = "test"
private_key = "{extra.get('private_key', 'dkim.key')}"

[archive]
dir = "archiwum"
{web}"""
    path = tmp_path / "listserv.toml"
    path.write_text(text, encoding="utf-8")
    return path


def serve(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """`listserv serve`, which must exit by itself; the 5 s are the issue's bound for a failed start."""
    return subprocess.run([sys.executable, "-m", "listserv", "serve", "--config", str(config), *args],
                          cwd=config.parent, capture_output=True, text=True, timeout=5)


@pytest.fixture
def key(tmp_path: Path) -> Path:
    # Made beforehand: generating an RSA key is not what these tests measure.
    dkim.generate_key(tmp_path / "dkim.key")
    return tmp_path / "dkim.key"


def taken_port() -> tuple[socket.socket, int]:
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    return holder, holder.getsockname()[1]


def last_line(result: subprocess.CompletedProcess[str]) -> str:
    return result.stderr.strip().splitlines()[-1]


def test_taken_smtp_port_exits_at_once_naming_the_setting(tmp_path: Path, key: Path) -> None:
    holder, port = taken_port()
    with holder:
        result = serve(write_config(tmp_path, port))
    assert result.returncode == 1, result.stderr
    assert last_line(result) == (f"listserv: error: cannot listen on 127.0.0.1:{port} ([server] listen): "
                                 "address already in use")


def test_taken_web_port_exits_at_once_naming_the_setting(tmp_path: Path, key: Path) -> None:
    holder, web_port = taken_port()
    with holder:
        result = serve(write_config(tmp_path, free_port(), web_port))
    assert result.returncode == 1, result.stderr
    assert last_line(result) == (f"listserv: error: cannot listen on 127.0.0.1:{web_port} ([web] listen): "
                                 "address already in use")


def test_web_listen_option_overrides_the_config(tmp_path: Path, key: Path) -> None:
    holder, web_port = taken_port()
    with holder:
        # The config has no web listener; the option adds one, on the taken port.
        result = serve(write_config(tmp_path, free_port()), "--web-listen", f"127.0.0.1:{web_port}")
    assert result.returncode == 1, result.stderr
    assert f"cannot listen on 127.0.0.1:{web_port} ([web] listen)" in last_line(result)
    bad = serve(write_config(tmp_path, free_port()), "--web-listen", "localhost")
    assert bad.returncode == 2 and "--web-listen" in last_line(bad), bad.stderr


def test_unreadable_key_exits_naming_the_setting(tmp_path: Path) -> None:
    (tmp_path / "klucz").mkdir()  # a directory: unreadable as a key even for root
    result = serve(write_config(tmp_path, free_port(), private_key="klucz"))
    assert result.returncode == 1, result.stderr
    line = last_line(result)
    assert line.startswith("listserv: error: cannot read DKIM key ") and line.endswith("([dkim] private_key)")


def test_state_dir_that_cannot_be_made_exits_naming_the_setting(tmp_path: Path, key: Path) -> None:
    (tmp_path / "plik").write_text("nie katalog\n")
    result = serve(write_config(tmp_path, free_port(), state_dir="plik/state"))
    assert result.returncode == 1, result.stderr
    line = last_line(result)
    assert line.startswith("listserv: error: cannot create the directory ") and "([server] state_dir)" in line


def test_state_files_are_private_under_umask_022(tmp_path: Path, umask_022: None, start_server) -> None:  # type: ignore[no-untyped-def]
    config = make_config(tmp_path, store={"url": ""})  # the SQLite file's own modes: SQLite on either run
    server = start_server(config)
    server.call(server.store.create_list(LIST, {}, [f"owner@{DOMAIN}"]))
    server.call(server.store.add_members(LIST, [(ANNA, "Anna Kowalska", "Urząd Gminy Wieliczka")]))
    with smtplib.SMTP("127.0.0.1", server.port, timeout=30) as client:
        client.sendmail(ANNA, [f"{LIST}@{DOMAIN}"],
                        f"From: {ANNA}\r\nTo: {LIST}@{DOMAIN}\r\nSubject: Zażółć gęślą jaźń\r\n\r\nTreść.\r\n".encode())
    server.drain()
    state = config.server.state_dir
    db = config.db_path
    # While the server runs, the WAL and the shared-memory index exist too.
    assert Path(f"{db}-wal").exists() and Path(f"{db}-shm").exists()
    assert mode(state) == 0o700
    for path in (db, Path(f"{db}-wal"), Path(f"{db}-shm"), state / "unsubscribe.secret", config.dkim.private_key):
        assert mode(path) == 0o600, (path, oct(mode(path)))
    assert files.loose_modes(config) == []


def test_start_tightens_what_an_older_version_left_open(tmp_path: Path, umask_022: None, start_server) -> None:  # type: ignore[no-untyped-def]
    config = make_config(tmp_path, store={"url": ""})  # the SQLite file's own modes
    state = config.server.state_dir
    state.mkdir(mode=0o755)
    os.chmod(state, 0o755)
    dkim.generate_key(config.dkim.private_key)
    os.chmod(config.dkim.private_key, 0o644)
    (state / "unsubscribe.secret").write_text("ab" * 32 + "\n")
    os.chmod(state / "unsubscribe.secret", 0o644)
    assert len(files.loose_modes(config)) == 3
    start_server(config)
    assert mode(state) == 0o700
    assert mode(config.dkim.private_key) == 0o600 and mode(state / "unsubscribe.secret") == 0o600
    assert mode(config.db_path) == 0o600


async def test_doctor_warns_about_loose_modes(tmp_path: Path, umask_022: None) -> None:
    config = make_config(tmp_path)
    files.private_dir(config.server.state_dir)
    dkim.generate_key(config.dkim.private_key)
    files.create_database(config.db_path)
    checks = {c.name: c for c in await doctor.run_checks(config, DictResolver({}))}
    assert checks["file modes"].status == "OK", checks["file modes"]
    os.chmod(config.server.state_dir, 0o755)
    os.chmod(config.db_path, 0o644)
    check = {c.name: c for c in await doctor.run_checks(config, DictResolver({}))}["file modes"]
    assert check.status == "WARN"
    assert f"{config.server.state_dir}: mode 0755 (want 0700)" in check.detail
    assert f"{config.db_path}: mode 0644 (want 0600)" in check.detail
    assert "chmod" in check.detail
