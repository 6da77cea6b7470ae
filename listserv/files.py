"""File modes of the state: the state dir 0700, every database, WAL/SHM, key and secret file 0600.

The state holds personal data (members, pending confirmation tokens, the
copies in the Maildirs) and the secrets that sign our mail and make the
unsubscribe links, so nothing in it may be readable by other local users,
whatever the umask of the shell or unit that started us.  Each place that
makes such a file calls one function from here:

* ``private_dir(path)``: make a directory 0700 (the state dir);
* ``create_database(path)``: make an empty database file 0600 before SQLite
  opens it.  SQLite gives the ``-wal`` and ``-shm`` files it creates later the
  mode of the database file (``findCreateFileMode`` in ``os_unix.c``), so
  they are 0600 as well;
* ``write_private(path, data)``: write a key or secret atomically, 0600 from
  the first byte;
* ``tighten(config)``: at start-up, take back what an older version or a
  careless ``cp`` left readable (returns what it could not change);
* ``loose_modes(config)``: what ``listserv doctor`` warns about.

A start-up failure is one line naming the setting to change: ``private_dir``
and ``listen_error`` build those (``ConfigError``, which ``serve`` prints).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import stat
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from listserv.errors import ConfigError

if TYPE_CHECKING:  # the store calls this module and must not import the config
    from listserv.config import Config

__all__ = ["DIR_MODE", "FILE_MODE", "create_database", "listen_error", "loose_modes", "private_dir",
           "private_paths", "tighten", "write_private"]

DIR_MODE = 0o700
FILE_MODE = 0o600

_DB_SUFFIXES = ("", "-wal", "-shm")
_SECRET_FILE = "unsubscribe.secret"  # unsubscribe.SECRET_FILE; named here to keep the import graph flat


def private_dir(path: Path, setting: str = "[server] state_dir") -> None:
    """Make ``path`` (and missing parents) as a directory only we can enter.

    An existing directory is left as it is (``tighten`` is for that); one that
    cannot be made or written is a ``ConfigError`` naming ``setting``.
    """
    if not path.is_dir():
        try:
            path.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
            os.chmod(path, DIR_MODE)  # mkdir's mode is filtered through the umask
        except OSError as exc:
            raise ConfigError(f"cannot create the directory {path} ({setting}): {_reason(exc)}") from None
    try:
        # Really create a file: os.access answers "yes" for root.
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as exc:
        raise ConfigError(f"cannot write in {path} ({setting}): {_reason(exc)}") from None


def create_database(path: Path) -> None:
    """Make the database file 0600 if it does not exist yet (SQLite would make it 0666 & ~umask)."""
    private_dir(path.parent)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE)
    except FileExistsError:
        return
    try:
        os.fchmod(fd, FILE_MODE)
    finally:
        os.close(fd)


def write_private(path: Path, data: bytes, *, replace: bool = False) -> None:
    """Write ``path`` atomically (temporary file, fsync, link or rename), mode 0600 from the start.

    Without ``replace`` an existing file is kept and ``FileExistsError``
    raised: link() fails if the name exists, so a file another process made
    between a check and now is never clobbered (rename would).
    """
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE)
    try:
        with open(fd, "wb") as f:
            os.fchmod(f.fileno(), FILE_MODE)  # the umask could remove owner bits
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        if replace:
            os.replace(tmp, path)
        else:
            try:
                os.link(tmp, path)
            finally:
                os.unlink(tmp)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    # Make the new directory entry durable too.
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def private_paths(config: Config) -> list[tuple[Path, int]]:
    """Every path that must be private, with its mode; only those that exist."""
    state = config.server.state_dir
    wanted: list[tuple[Path, int]] = [(state, DIR_MODE)]
    wanted += [(Path(f"{config.db_path}{suffix}"), FILE_MODE) for suffix in _DB_SUFFIXES]
    wanted.append((state / _SECRET_FILE, FILE_MODE))
    wanted.append((config.dkim.private_key, FILE_MODE))
    if config.dkim.ed25519_private_key is not None:
        wanted.append((config.dkim.ed25519_private_key, FILE_MODE))
    return [(p, mode) for p, mode in wanted if p.exists()]


def loose_modes(config: Config) -> list[str]:
    """``path: mode 0644 (want 0600)`` for each private path others can read or enter."""
    out = []
    for path, want in private_paths(config):
        mode = stat.S_IMODE(path.stat().st_mode)
        if mode & 0o077:
            out.append(f"{path}: mode {mode:04o} (want {want:04o})")
    return out


def tighten(config: Config) -> list[str]:
    """Set the private modes where they are looser; what could not be changed, for a warning.

    Only group and other bits are removed, so a key kept read-only (0400)
    stays so.  A file we do not own (a key provided 0640 root:listserv) cannot
    be changed; ``doctor`` reports it.
    """
    failed = []
    for path, want in private_paths(config):
        mode = stat.S_IMODE(path.stat().st_mode)
        if mode & 0o077:
            try:
                os.chmod(path, mode & want)
            except OSError as exc:
                failed.append(f"{path}: mode {mode:04o}, cannot change it: {_reason(exc)}")
    return failed


def listen_error(where: object, setting: str, exc: OSError) -> ConfigError:
    """``cannot listen on 127.0.0.1:8026 ([web] listen): address already in use``."""
    return ConfigError(f"cannot listen on {where} ({setting}): {_reason(exc)}")


def _reason(exc: OSError) -> str:
    text = os.strerror(exc.errno) if exc.errno else str(exc)
    return text[:1].lower() + text[1:]
