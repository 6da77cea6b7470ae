"""The administrator's command line (click).  Thin: parse, call the store, print.

Every command takes ``--config`` (or ``$LISTSERV_CONFIG``).  Bad input -- an
unknown list, a malformed address, a duplicate member, a wrong setting --
prints one line on stderr and exits 1, with nothing half-done (each change is
one transaction).
"""

from __future__ import annotations

import asyncio
import csv
import functools
import io
import json
import os
import re
import sys
import time
import unicodedata
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, TypeVar

import click

from listserv import __version__, config as config_mod
from listserv.errors import AddressError, ListservError, StoreError
from listserv.message import normalize_address
from listserv.settings import SETTINGS, effective_settings, parse_setting, storable
from listserv.store import DELIVERY_MODES, DELIVERY_STATES, ROLES, Store, open_store

T = TypeVar("T")

config_option = click.option(
    "--config", "config_path", type=click.Path(dir_okay=False, path_type=Path), envvar="LISTSERV_CONFIG",
    help="Config file (default: $LISTSERV_CONFIG, else the embedded config.example.toml).",
)


def _fail(message: str) -> None:
    click.echo(f"listserv: error: {message}", err=True)
    sys.exit(1)


def _load(config_path: Path | None) -> config_mod.Config:
    if config_path is None:
        # `listserv --config F COMMAND` works as well as `listserv COMMAND --config F`.
        ctx = click.get_current_context(silent=True)
        if ctx is not None:
            config_path = ctx.find_root().params.get("config_path")
    try:
        return config_mod.load(config_path)
    except ListservError as exc:
        _fail(str(exc))
        raise  # unreachable


def with_store(fn: Callable[..., Coroutine[Any, Any, T]]) -> Callable[..., T | None]:
    """Run an async command body with the config loaded and the store open."""

    @config_option
    @functools.wraps(fn)
    def wrapper(config_path: Path | None, **kwargs: Any) -> T | None:
        cfg = _load(config_path)

        async def main() -> T:
            from listserv.seeding import seed_lists

            store = await open_store(cfg.store_target)
            try:
                # The config's [[lists]] exist for the CLI too, even before the first `serve`.
                await seed_lists(store, cfg)
                return await fn(cfg, store, **kwargs)
            finally:
                await store.close()

        try:
            return asyncio.run(main())
        except ListservError as exc:
            _fail(str(exc))
        return None

    return wrapper


class _Cli(click.Group):
    """Usage errors, like every other error, are one line on stderr and exit code 2."""

    def main(self, *args: Any, **kwargs: Any) -> Any:
        kwargs["standalone_mode"] = False
        try:
            return super().main(*args, **kwargs)
        except click.exceptions.Abort:
            click.echo("listserv: aborted", err=True)
            sys.exit(1)
        except click.ClickException as exc:
            hint = ""
            if isinstance(exc, click.UsageError) and exc.ctx is not None:
                hint = f" (see: {exc.ctx.command_path} --help)"
            click.echo(f"listserv: error: {exc.format_message()}{hint}", err=True)
            sys.exit(exc.exit_code)


def run() -> None:
    """The ``listserv`` program (and ``python -m listserv``): the command line, then a quick exit.

    When a command is done, everything it did is on disk (the store is
    closed, the pages written).  What is left for the interpreter's own
    exit is tearing down its modules and objects: 50-90 ms after an
    ``archive import`` of 10,000 messages, for nothing anyone reads.  So
    the exit handlers run, the logs and the standard streams are flushed,
    and the process ends there.  If some thread other than the main one is
    still running (none should be), the normal exit waits for it instead.
    Tests call ``main`` (click's runner), never this.
    """
    import atexit
    import logging
    import threading

    try:
        main()
        code: int = 0
    except SystemExit as exc:
        if exc.code is None or isinstance(exc.code, int):
            code = exc.code or 0
        else:
            print(exc.code, file=sys.stderr)
            code = 1
    main_thread = threading.main_thread()
    if any(t.is_alive() and not t.daemon for t in threading.enumerate() if t is not main_thread):
        sys.exit(code)
    run_exit_handlers = getattr(atexit, "_run_exitfuncs", None)
    if run_exit_handlers is None:  # not CPython: its usual exit
        sys.exit(code)
    run_exit_handlers()
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError, AttributeError):  # a closed pipe (what Python itself exits with then), no stream
            code = code or 120
    os._exit(code)


@click.group(cls=_Cli, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="listserv")
@config_option
def main(config_path: Path | None) -> None:
    """listserv: mailing-list discussion server."""


# -- serve ------------------------------------------------------------------------


@main.command()
@config_option
@click.option("--web-listen", metavar="HOST:PORT", default=None,
              help="Where the one-click unsubscribe listener listens, instead of [web] listen ('' for none).")
@click.option("--only", type=click.Choice(["receive", "work"]), default=None,
              help="Run only the SMTP receiver, or only the workers ([server] workers), on this machine.")
def serve(config_path: Path | None, web_listen: str | None, only: str | None) -> None:
    """Receive, decide, deliver: run the server until SIGTERM.

    A failure to start (a port taken, a key or the state dir unusable) exits 1
    at once with one line naming the setting to change.
    """
    import dataclasses

    from listserv import app

    cfg = _load(config_path)
    if web_listen is not None:
        try:
            # The parser [web] listen goes through, so both accept the same forms.
            listen = config_mod._host_port(web_listen) if web_listen.strip() else None
        except ValueError as exc:
            raise click.BadParameter(str(exc), param_hint="--web-listen") from None
        cfg = dataclasses.replace(cfg, web=dataclasses.replace(cfg.web, listen=listen))
    try:
        app.run(cfg, only)
    except ListservError as exc:
        _fail(str(exc))
    except OSError as exc:
        _fail(f"cannot start: {exc}")


# -- lists ------------------------------------------------------------------------


@main.command("lists")
@with_store
async def lists_cmd(cfg: config_mod.Config, store: Store) -> None:
    """Show every list with its title and member count."""
    counts = await store.list_counts()
    for lst in await store.lists():
        settings = effective_settings(cfg.list_defaults, lst.settings_json)
        count = counts.get(lst.name, 0)
        click.echo(f"{lst.name}@{cfg.server.domain}\t{count} member{'' if count == 1 else 's'}\t{settings.title}")


@main.group("list")
def list_group() -> None:
    """Create, show, change and remove lists."""


def _list_name(name: str) -> str:
    if not config_mod._LIST_NAME.match(name):
        raise click.BadParameter(f"{name!r} is not a valid list name (a-z, 0-9, '.', '_', '-')")
    return name


def _addresses(values: tuple[str, ...] | list[str]) -> list[str]:
    out = []
    for value in values:
        try:
            out.append(normalize_address(value))
        except AddressError as exc:
            raise click.BadParameter(str(exc)) from None
    return out


@list_group.command("create")
@click.argument("name")
@click.option("--title", default="", help="Human name, e.g. 'Planowanie SEAP'.")
@click.option("--description", default="", help="One paragraph about the list.")
@click.option("--owner", "owners", multiple=True, help="Owner address (repeatable).")
@click.option("--language", type=click.Choice(["pl", "en"]), default=None, help="Language of the list's texts.")
@with_store
async def list_create(cfg: config_mod.Config, store: Store, name: str, title: str, description: str,
                      owners: tuple[str, ...], language: str | None) -> None:
    """Create a list NAME."""
    _list_name(name)
    overrides: dict[str, Any] = {}
    if title:
        overrides["title"] = title
    if description:
        overrides["description"] = description
    if language:
        overrides["language"] = language
    await store.create_list(name, overrides, _addresses(owners))
    click.echo(f"created {name}@{cfg.server.domain}")


@list_group.command("show")
@click.argument("name")
@with_store
async def list_show(cfg: config_mod.Config, store: Store, name: str) -> None:
    """Print every setting of a list (* marks the list's own values)."""
    lst = await store.get_list(name)
    own = json.loads(lst.settings_json or "{}")
    settings = effective_settings(cfg.list_defaults, lst.settings_json)
    click.echo(f"name = {lst.name}")
    click.echo(f"address = {lst.name}@{cfg.server.domain}")
    for key, value in settings.to_display().items():
        click.echo(f"{key} = {value}{'  *' if key in own else ''}")


@list_group.command("set")
@click.argument("name")
@click.argument("key")
@click.argument("value")
@with_store
async def list_set(cfg: config_mod.Config, store: Store, name: str, key: str, value: str) -> None:
    """Change one setting of a list (see `list show` for the keys)."""
    parsed = parse_setting(key, value)
    await store.set_list_setting(name, key, storable(parsed))
    click.echo(f"{name}: {key} = {SETTINGS[key].render(parsed)}")


@list_group.command("remove")
@click.argument("name")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@with_store
async def list_remove(cfg: config_mod.Config, store: Store, name: str, yes: bool) -> None:
    """Remove a list with its members (mail already accepted is still delivered)."""
    await store.get_list(name)
    if not yes and sys.stdin.isatty():
        click.confirm(f"Remove {name} and all its members?", abort=True)
    await store.remove_list(name)
    click.echo(f"removed {name}")


# -- members ------------------------------------------------------------------------


@main.group("members")
def members_group() -> None:
    """List, add, remove and change members."""


@members_group.command("list")
@click.argument("name")
@with_store
async def members_list(cfg: config_mod.Config, store: Store, name: str) -> None:
    """One member per line: address, role, moderation flag, delivery status, delivery mode
    (then name, organisation)."""
    for m in await store.members(name):
        extra = "".join(f"\t{v}" for v in (m.display_name, m.organisation) if v) if (
            m.display_name or m.organisation) else ""
        if m.organisation and not m.display_name:
            extra = f"\t\t{m.organisation}"
        click.echo(f"{m.address}\t{m.role}\t{'moderated' if m.moderated else 'unmoderated'}\t{m.delivery}"
                   f"\t{m.delivery_mode}{extra}")


_CP1250_ONLY = re.compile(rb"[\x8c\x8f\x9c\x9f\xa5\xb9]")  # Ś Ź ś ź Ą ą in windows-1250
_LATIN2_ONLY = re.compile(rb"[\xa1\xa6\xac\xb1\xb6\xbc]")  # Ą Ś Ź ą ś ź in ISO-8859-2


def decode_member_file(path: Path, data: bytes) -> str:
    """UTF-8, else the Polish legacy charsets spreadsheets save: windows-1250 or ISO-8859-2.

    The two differ in just the letters Ą ą Ś ś Ź ź; which of their byte
    values occur tells them apart.
    """
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError:
        pass
    encoding = "iso-8859-2" if _LATIN2_ONLY.search(data) and not _CP1250_ONLY.search(data) else "cp1250"
    try:
        return data.decode(encoding)
    except UnicodeDecodeError:
        raise click.BadParameter(f"{path} is neither UTF-8 nor windows-1250/ISO-8859-2 text; save it as UTF-8")


def read_member_csv(path: Path) -> list[tuple[str, str, str]]:
    """Rows `address[,display name[,organisation]]`; '#' comments, blank lines and a header row skipped.

    A semicolon also separates fields: that is what Excel writes in Polish settings.
    Each line is one member: a line that does not parse (an unterminated quote,
    a quoted field running onto the next line, more than three fields, a control
    character in a name, an invalid address) is an error naming the file and
    line, and nothing of the file is imported.
    """
    try:
        text = decode_member_file(path, path.read_bytes())
    except OSError as exc:
        raise click.BadParameter(f"cannot read {path}: {exc.strerror}") from None
    # CRLF (Windows), LF, or CR alone (Excel for Mac): the only line ends.  Any
    # other separator str.splitlines() knows (VT, FF, U+2028...) stays inside
    # its line and is refused there as a control character.
    lines = re.split(r"\r\n|\r|\n", text)
    data_lines = [ln for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]
    delimiter = ";" if data_lines and ";" in data_lines[0] and "," not in data_lines[0] else ","
    rows: list[tuple[str, str, str]] = []
    show = sys.stderr.isatty() and len(lines) > 2000
    first = True
    with click.progressbar(list(enumerate(lines, 1)), label="reading members",
                           file=sys.stderr if show else io.StringIO()) as bar:
        for lineno, line in bar:
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            where = f"{path}:{lineno}"
            row = _csv_fields(where, line, delimiter)
            if first and row[0].strip().lower() in ("address", "email", "e-mail", "adres", "adres e-mail"):
                first = False
                continue
            first = False
            rows.append(_member_row(where, row))
    return rows


def _csv_fields(where: str, line: str, delimiter: str) -> list[str]:
    try:
        (row,) = list(csv.reader([line], delimiter=delimiter, strict=True))
    except csv.Error as exc:
        if "unexpected end of data" in str(exc):
            raise click.BadParameter(f'{where}: unterminated quote: a field opened with " must close on the '
                                     "same line (a member's fields cannot span lines)") from None
        raise click.BadParameter(f"{where}: not valid CSV: {exc}") from None
    if len(row) > 3:
        raise click.BadParameter(f"{where}: {len(row)} fields; expected address[,name[,organisation]] "
                                 "(put a name with a comma in double quotes)")
    return row


def _member_row(where: str, row: list[str]) -> tuple[str, str, str]:
    try:
        address = normalize_address(row[0])
    except AddressError as exc:
        raise click.BadParameter(f"{where}: {exc}") from None
    name = row[1].strip() if len(row) > 1 else ""
    org = row[2].strip() if len(row) > 2 else ""
    for label, value in (("display name", name), ("organisation", org)):
        bad = next((c for c in value if _is_control(c)), None)
        if bad is not None:
            raise click.BadParameter(f"{where}: the {label} {value!r} holds a control character "
                                     f"(U+{ord(bad):04X})")
    return address, name, org


def _is_control(char: str) -> bool:
    """C0/C1 controls, line and paragraph separators, and the bidi controls that
    can make a name display as another (Unicode TR 36 §2.2)."""
    return unicodedata.category(char) in ("Cc", "Zl", "Zp") or "\u202a" <= char <= "\u202e" \
        or "\u2066" <= char <= "\u2069"


@members_group.command("add")
@click.argument("name")
@click.argument("emails", nargs=-1)
@click.option("--file", "csv_file", type=click.Path(dir_okay=False, path_type=Path),
              help="CSV file: address[,display name[,organisation]] per line.")
@click.option("--role", type=click.Choice(ROLES), default="member", show_default=True)
@with_store
async def members_add(cfg: config_mod.Config, store: Store, name: str, emails: tuple[str, ...],
                      csv_file: Path | None, role: str) -> None:
    """Add members (all or none)."""
    rows = [(a, "", "") for a in _addresses(emails)]
    if csv_file is not None:
        rows.extend(read_member_csv(csv_file))
    if not rows:
        raise click.UsageError("give addresses or --file")
    started = time.perf_counter()
    method = "import" if csv_file is not None else "cli"
    detail = f"added by {admin_name()}" + (f" from {csv_file.name}" if csv_file is not None else "")
    count = await store.add_members(name, rows, role, method=method, detail=detail)
    click.echo(f"added {count} {role}{'s' if count != 1 else ''} to {name} in {time.perf_counter() - started:.2f} s")


@members_group.command("remove")
@click.argument("name")
@click.argument("emails", nargs=-1, required=True)
@with_store
async def members_remove(cfg: config_mod.Config, store: Store, name: str, emails: tuple[str, ...]) -> None:
    """Remove members (all or none)."""
    addresses = _addresses(emails)
    await store.remove_members(name, addresses, method="cli", detail=f"removed by {admin_name()}")
    click.echo(f"removed {len(addresses)} from {name}")


_MEMBER_KEYS = ["moderated", "role", "delivery", "display_name", "organisation", "delivery_mode", "not_me", "ack",
                "no_dupes", "language"]


@members_group.command("set")
@click.argument("name")
@click.argument("email")
@click.argument("key", type=click.Choice(_MEMBER_KEYS))
@click.argument("value")
@with_store
async def members_set(cfg: config_mod.Config, store: Store, name: str, email: str, key: str, value: str) -> None:
    """Change one member: moderated true|false, role, delivery enabled|disabled|nomail,
    delivery_mode each|digest_mime|digest_plain|index, not_me|ack|no_dupes true|false,
    language pl|en|list (the list's), display_name, organisation."""
    address = _addresses([email])[0]
    parsed: Any = value
    if key in ("moderated", "not_me", "ack", "no_dupes"):
        try:
            parsed = int(SETTINGS["emergency_moderation"].parse(value))
        except ValueError as exc:
            raise click.BadParameter(str(exc)) from None
    elif key == "role" and value not in ROLES:
        raise click.BadParameter(f"role must be one of {', '.join(ROLES)}")
    elif key == "delivery" and value not in DELIVERY_STATES:
        raise click.BadParameter(f"delivery must be one of {', '.join(DELIVERY_STATES)}")
    elif key == "delivery_mode" and value not in DELIVERY_MODES:
        raise click.BadParameter(f"delivery_mode must be one of {', '.join(DELIVERY_MODES)}")
    elif key == "language":
        if value not in ("pl", "en", "list"):
            raise click.BadParameter("language must be pl, en, or list (the list's own)")
        parsed = "" if value == "list" else value
    method = "admin" if key in ("delivery_mode", "not_me", "ack", "no_dupes", "language") else ""
    await store.set_member(name, address, key, parsed, method=method, detail=f"by {admin_name()}" if method else "")
    click.echo(f"{name}: {address} {key} = {value}")


def admin_name() -> str:
    """Who ran the command, for the consent record (sudo keeps the real user)."""
    import getpass

    for var in ("SUDO_USER", "LOGNAME", "USER"):
        value = os.environ.get(var)
        if value:
            return value
    try:
        return getpass.getuser()
    except Exception:  # noqa: BLE001 - no name to be had
        return "unknown"


@members_group.command("history")
@click.argument("name")
@click.argument("email")
@with_store
async def members_history(cfg: config_mod.Config, store: Store, name: str, email: str) -> None:
    """When and how EMAIL joined and left NAME: the proof of consent (GDPR Art. 7(1))."""
    address = _addresses([email])[0]
    events = await store.consent_history(name, address)
    if not events:
        raise StoreError(f"nothing recorded for {address} on {name}")
    for e in events:
        when = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(e.at))
        click.echo(f"{when}\t{e.event}\t{e.method}\t{e.detail}")


@members_group.command("change")
@click.argument("name")
@click.argument("old")
@click.argument("new")
@with_store
async def members_change(cfg: config_mod.Config, store: Store, name: str, old: str, new: str) -> None:
    """Move a member to a new address, keeping role, settings and history."""
    old_address, new_address = _addresses([old, new])
    await store.change_address(name, old_address, new_address, by=admin_name())
    click.echo(f"{name}: {old_address} is now {new_address}")


@main.group("person")
def person_group() -> None:
    """Everything about one address, across lists (GDPR requests)."""


@person_group.command("export")
@click.argument("email")
@with_store
async def person_export(cfg: config_mod.Config, store: Store, email: str) -> None:
    """Print everything stored about EMAIL as JSON (GDPR Art. 15)."""
    data = await store.person_export(_addresses([email])[0])
    click.echo(json.dumps(data, ensure_ascii=False, indent=2))


@person_group.command("forget")
@click.argument("email")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@with_store
async def person_forget(cfg: config_mod.Config, store: Store, email: str, yes: bool) -> None:
    """Remove EMAIL from every list and erase what is stored about it (GDPR Art. 17).

    Kept: the record that consent was given and withdrawn, with dates.
    """
    address = _addresses([email])[0]
    if not yes and sys.stdin.isatty():
        click.confirm(f"Erase everything about {address}?", abort=True)
    counts = await store.person_forget(address, by=admin_name())
    click.echo(f"erased {address}: " + ", ".join(f"{v} {k}" for k, v in counts.items()))


# -- bans -----------------------------------------------------------------------------


@main.group("ban")
def ban_group() -> None:
    """Addresses (or globs like *@spam.example) that may not post; refused with 550."""


def _pattern(pattern: str) -> str:
    pattern = pattern.strip().lower()
    if "@" not in pattern or any(c.isspace() for c in pattern):
        raise click.BadParameter(f"{pattern!r} is not an address or a pattern like *@example.com")
    return pattern


@ban_group.command("add")
@click.argument("pattern")
@click.option("--list", "list_name", help="Only on this list (default: site-wide).")
@with_store
async def ban_add(cfg: config_mod.Config, store: Store, pattern: str, list_name: str | None) -> None:
    await store.add_ban(_pattern(pattern), list_name)
    click.echo(f"banned {pattern} {'on ' + list_name if list_name else 'site-wide'}")


@ban_group.command("remove")
@click.argument("pattern")
@click.option("--list", "list_name", help="The list (default: site-wide).")
@with_store
async def ban_remove(cfg: config_mod.Config, store: Store, pattern: str, list_name: str | None) -> None:
    await store.remove_ban(_pattern(pattern), list_name)
    click.echo(f"unbanned {pattern}")


@ban_group.command("list")
@click.option("--list", "list_name", help="The list (default: site-wide).")
@with_store
async def ban_list(cfg: config_mod.Config, store: Store, list_name: str | None) -> None:
    for pattern in await store.bans(list_name):
        click.echo(pattern)


# -- held posts ---------------------------------------------------------------------------


@main.group("held")
def held_group() -> None:
    """Posts waiting for a moderator."""


@held_group.command("list")
@click.argument("name", required=False)
@with_store
async def held_list(cfg: config_mod.Config, store: Store, name: str | None) -> None:
    """One line each: id, list, sender, subject, reason."""
    for r in await store.held(name):
        click.echo(f"{r.id}\t{r.list_name}\t{r.sender or '<>'}\t{r.subject or '(no subject)'}\t{r.reason}")


@held_group.command("approve")
@click.argument("held_id", type=int)
@with_store
async def held_approve(cfg: config_mod.Config, store: Store, held_id: int) -> None:
    """Send a held post to the list."""
    await store.set_incoming_status(held_id, "accepted", expect="held", reason="approved by a moderator")
    click.echo(f"approved {held_id}: it goes out with the server's next pass")


@held_group.command("discard")
@click.argument("held_id", type=int)
@with_store
async def held_discard(cfg: config_mod.Config, store: Store, held_id: int) -> None:
    """Drop a held post without telling the sender."""
    await store.set_incoming_status(held_id, "discarded", expect="held", reason="discarded by a moderator")
    click.echo(f"discarded {held_id}")


@held_group.command("reject")
@click.argument("held_id", type=int)
@click.option("--reason", default="", help="Told to the sender.")
@with_store
async def held_reject(cfg: config_mod.Config, store: Store, held_id: int, reason: str) -> None:
    """Refuse a held post and tell the sender why."""
    # Imported here: the CLI starts fast when it does not need these.
    from listserv import dkim
    from listserv.fanout import bounces_address
    from listserv.membership import ListView
    from listserv.texts import compose

    record = await store.get_incoming(held_id)
    if record.status != "held":
        raise StoreError(f"message {held_id} is not held (it is {record.status})")
    lst = await store.get_list_by_id(record.list_id)
    settings = effective_settings(cfg.list_defaults, lst.settings_json)
    key = dkim.load_keys(cfg.dkim, cfg.server.domain)
    to = record.sender or record.mail_from
    if not to:
        raise StoreError(f"message {held_id} has no sender address to tell")
    view = ListView(lst.id, lst.name, settings, cfg.server.domain)
    notice = compose(
        "rejection", settings.language, view.context(subject=record.subject, reason=reason),
        from_name=view.title, from_addr=view.addr("owner"), to=to, list_id=view.list_id,
        domain=cfg.server.domain, auto="auto-replied", in_reply_to=record.message_id,
    )
    await store.enqueue(
        list_id=record.list_id, kind="notice", envelope_from=bounces_address(lst.name, cfg.server.domain),
        data=dkim.sign_message(notice, key), recipients=[to], incoming_id=held_id, incoming_status="rejected",
        incoming_expect="held",
    )
    click.echo(f"rejected {held_id}; {to} will be told")


# -- queue --------------------------------------------------------------------------------


@main.group("queue", invoke_without_command=True)
@config_option
@click.pass_context
def queue_group(ctx: click.Context, config_path: Path | None) -> None:
    """What is waiting to be delivered (`queue` alone is `queue show`)."""
    if ctx.invoked_subcommand is None:
        ctx.invoke(queue_show, config_path=config_path)


def _when(ts: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts)) if ts else "-"


@queue_group.command("show")
@with_store
async def queue_show(cfg: config_mod.Config, store: Store) -> None:
    """One line per message with copies still pending."""
    rows = await store.queue_summary()
    if not rows:
        click.echo("queue is empty")
    for r in rows:
        click.echo(
            f"{r['outbox_id']}\t{r['list']}\t{r['kind']}\tqueued {_when(r['queued_at'])}\tpending {r['pending']}"
            f"\tsent {r['sent']}\tfailed {r['failed']}\tnext {_when(r['next_attempt_at'])}"
            f"{chr(9) + r['last_reply'] if r['last_reply'] else ''}"
        )


@queue_group.command("retry")
@with_store
async def queue_retry(cfg: config_mod.Config, store: Store) -> None:
    """Make every pending copy due now."""
    count = await store.retry_now()
    click.echo(f"{count} pending copies will be tried at once")


# -- dkim -----------------------------------------------------------------------------------


@main.group("dkim")
def dkim_group() -> None:
    """The list domain's DKIM key."""


@dkim_group.command("keygen")
@config_option
@click.option("--force", is_flag=True, help="Replace an existing key (mail signed with it stops verifying).")
@click.option("--ed25519", "ed25519_key", is_flag=True,
              help="Write the Ed25519 key (RFC 8463) to [dkim] ed25519_private_key instead.")
def dkim_keygen(config_path: Path | None, force: bool, ed25519_key: bool) -> None:
    """Write an RSA-2048 key to [dkim] private_key (or with --ed25519 an Ed25519 key
    to [dkim] ed25519_private_key) and print the DNS record to publish."""
    from listserv import dkim

    cfg = _load(config_path)
    path, selector = cfg.dkim.private_key, cfg.dkim.selector
    if ed25519_key:
        if cfg.dkim.ed25519_private_key is None:
            _fail("set [dkim] ed25519_selector and ed25519_private_key in the config first")
            return
        path, selector = cfg.dkim.ed25519_private_key, cfg.dkim.ed25519_selector
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        key: dkim.PublishableKey = (dkim.generate_ed25519_key(path, force=force) if ed25519_key
                                    else dkim.generate_key(path, force=force))
    except FileExistsError:
        _fail(f"{path} exists; use --force to replace it")
        return
    except OSError as exc:
        _fail(f"cannot write {path}: {exc.strerror}")
        return
    click.echo(f"wrote {path}; publish this record:", err=True)
    click.echo(dkim.dns_txt_record(key, selector, cfg.server.domain))


# -- archive ------------------------------------------------------------------------------------


@main.group("archive")
def archive_group() -> None:
    """The static web archive: build, import an mbox, status, take a message down."""


def _progress_reporter() -> tuple[Callable[[str, int, int], None], Callable[[], None]]:
    """A progress bar on a terminal (stderr), silence otherwise."""
    state: dict[str, Any] = {"bar": None, "label": "", "pos": 0}
    show = sys.stderr.isatty()

    def report(label: str, done: int, total: int) -> None:
        if not show:
            return
        if state["label"] != label:
            close()
            state["bar"] = click.progressbar(length=max(total, 1), label=label, file=sys.stderr)
            state["bar"].__enter__()
            state["label"], state["pos"] = label, 0
        state["bar"].update(done - state["pos"])
        state["pos"] = done

    def close() -> None:
        if state["bar"] is not None:
            state["bar"].__exit__(None, None, None)
            state["bar"] = None

    return report, close


@archive_group.command("build")
@click.argument("name", required=False)
@click.option("--full", is_flag=True, help="Rebuild every page from the store (default: add what is missing).")
@click.option("--workers", type=click.IntRange(1, 64), default=None, help="Processes for rendering (default: cores).")
@with_store
async def archive_build(cfg: config_mod.Config, store: Store, name: str | None, full: bool,
                        workers: int | None) -> None:
    """Build the archive of list NAME (default: every list)."""
    from listserv import archive

    lists = [await store.get_list(name)] if name else await store.lists()
    report, close = _progress_reporter()
    archiver = archive.Archiver(cfg, store)
    try:
        for lst in lists:
            info = archive.list_info(cfg, lst)
            started = time.perf_counter()
            missing = await store.archive_unbuilt(info.id)
            if (full or not (info.dir / "index.html").exists() or len(missing) > 200 or info.policy == "none"
                    or archive.has_old_layout(info)):
                with archive.bulk_work():
                    count = await archive.build_list(cfg, store, info, workers=workers, progress=report)
                close()
                click.echo(f"{lst.name}: {info.policy}, {count} messages, built in "
                           f"{time.perf_counter() - started:.1f} s -> {info.dir if info.policy != 'none' else '-'}")
            else:
                for msgid_hash in missing:
                    await archiver.add(lst.name, msgid_hash)
                click.echo(f"{lst.name}: added {len(missing)} messages in {time.perf_counter() - started:.1f} s")
        await archive.write_site_indexes(cfg, store)
    finally:
        close()


@archive_group.command("import")
@click.argument("name")
@click.argument("mbox", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--workers", type=click.IntRange(1, 64), default=None, help="Processes for rendering (default: cores).")
@with_store
async def archive_import(cfg: config_mod.Config, store: Store, name: str, mbox: Path, workers: int | None) -> None:
    """Bring an existing archive (mbox: Mailman, Google Groups ...; or one .eml message) into list NAME, then rebuild its pages."""
    from listserv import archive

    info = archive.list_info(cfg, await store.get_list(name))
    report, close = _progress_reporter()
    started = time.perf_counter()
    try:
        with archive.bulk_work():
            read, new = await archive.import_mbox(store, info, mbox, report)
            close()
            click.echo(f"{name}: read {read} messages, {new} new, in {time.perf_counter() - started:.1f} s")
            count = await archive.build_list(cfg, store, info, workers=workers, progress=report)
        close()
        await archive.write_site_indexes(cfg, store)
    finally:
        close()
    click.echo(f"{name}: {count} messages in the archive, {time.perf_counter() - started:.1f} s in all")


@archive_group.command("status")
@click.argument("name", required=False)
@with_store
async def archive_status(cfg: config_mod.Config, store: Store, name: str | None) -> None:
    """Messages, pages and last build of list NAME's archive (default: every list), and what could not be rendered."""
    from listserv import archive

    lists = [await store.get_list(name)] if name else await store.lists()

    def when(ts: float | None) -> str:
        return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts)) if ts else "never"

    for lst in lists:
        info = archive.list_info(cfg, lst)
        st = await store.archive_status(info.id)
        failures = await store.archive_failures(info.id)
        click.echo(f"{lst.name}: {info.policy}, {st['messages']} messages"
                   + (f" ({st['removed']} removed)" if st["removed"] else "")
                   + f", {st['message_pages']} message pages, {st['threads']} threads, {st['months']} months"
                   + (f" -> {info.dir}" if info.policy != "none" else ""))
        full = (f"{when(st['full_at'])} ({st['full_messages']} messages, {st['full_seconds']:.1f} s)"
                if st["full_at"] else "never")
        click.echo(f"  last full build: {full}; last update: {when(st['updated_at'])}")
        unbuilt = len(await store.archive_unbuilt(info.id)) - len(failures)
        if unbuilt > 0 and info.policy != "none":
            click.echo(f"  not built yet: {unbuilt} (`listserv archive build {lst.name}`)")
        click.echo(f"  could not be rendered: {len(failures) or 'none'}")
        for message_id, reason, at in failures:
            click.echo(f"    <{message_id}> {when(at)}: {reason}")


@archive_group.command("remove")
@click.argument("message_id")
@with_store
async def archive_remove(cfg: config_mod.Config, store: Store, message_id: str) -> None:
    """Take MESSAGE-ID (or its hash) down from the archive and rewrite the pages it was on."""
    from listserv import archive

    count = await archive.Archiver(cfg, store).remove(message_id)
    click.echo(f"removed {message_id} from {count} archive{'s' if count != 1 else ''}")


# -- operator's view: status, explain, backup ---------------------------------------------------

STATUS_HORIZON = 7 * 86400  # `status` counts copies of messages queued this long (plus the retry period) ago


async def probe_server(host: str, port: int, timeout: float = 3.0) -> tuple[bool, str]:
    """Is listserv answering on host:port?  Reads the greeting (RFC 5321 §4.2: 220) and says QUIT."""
    import contextlib

    if port == 0:
        return False, f"{host}:0 in the config (a port chosen at start): cannot check"
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout)
    except (OSError, TimeoutError) as exc:
        reason = ("connection refused" if isinstance(exc, ConnectionRefusedError)
                  else "timed out" if isinstance(exc, TimeoutError) else exc.strerror or str(exc))
        return False, f"nothing answers on {host}:{port}: {reason}"
    greeting = ""
    try:
        greeting = (await asyncio.wait_for(reader.readline(), timeout)).decode("ascii", "replace").strip()
        writer.write(b"QUIT\r\n")
        await writer.drain()
        await asyncio.wait_for(reader.readline(), timeout)
    except (OSError, TimeoutError):
        pass
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
    if greeting.startswith("220") and "listserv" in greeting:
        return True, f"{host}:{port} answers: {greeting}"
    return False, f"{host}:{port} answers, but not as listserv: {greeting or '(no greeting)'}"


def _ago(seconds: float) -> str:
    seconds = max(0, int(seconds))
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60} s"
    if seconds < 86400:
        return f"{seconds // 3600} h {seconds % 3600 // 60} min"
    return f"{seconds // 86400} d {seconds % 86400 // 3600} h"


@main.group("digest")
def digest_group() -> None:
    """The digests of a list: what the next one holds, and sending it now."""


def _digest_stage(cfg: config_mod.Config, store: Store) -> Any:
    from listserv import dkim
    from listserv.digest import DigestStage
    from listserv.unsubscribe import Tokens, load_secret

    key = dkim.load_keys(cfg.dkim, cfg.server.domain)
    return DigestStage(cfg, store, key, tokens=Tokens(load_secret(cfg.server.state_dir)))


@digest_group.command("show")
@click.argument("name")
@with_store
async def digest_show(cfg: config_mod.Config, store: Store, name: str) -> None:
    """What the list's next digest would hold, who gets it, and when it goes out."""
    preview = await _digest_stage(cfg, store).preview(name)
    members = ", ".join(f"{n} {mode}" for mode, n in sorted(preview.members.items())) or "nobody"
    click.echo(f"{name}: next digest volume {preview.volume}, issue {preview.issue}")
    click.echo(f"  members on digests: {members}")
    click.echo(f"  waiting: {len(preview.posts)} posts, {preview.waiting_bytes} bytes"
               f" (sent early at {preview.threshold} bytes)")
    if preview.posts:
        when = _when(preview.next_at) if preview.next_at else "at the size threshold or by `listserv digest send`"
        click.echo(f"  goes out: {when}")
    for n, post in enumerate(preview.posts, 1):
        who = ", ".join(x for x in (post.author, post.organisation) if x)
        click.echo(f"  {n:3}. {_when(post.added_at)}  {post.subject or '(no subject)'}  ({who})")


@digest_group.command("send")
@click.argument("name")
@with_store
async def digest_send(cfg: config_mod.Config, store: Store, name: str) -> None:
    """Queue the list's pending digest now (the server delivers it)."""
    stage = _digest_stage(cfg, store)
    preview = await stage.preview(name)
    digest_id = await stage.send_now(name)
    if digest_id is None:
        what = "no posts are waiting" if not preview.posts else "nobody on the list takes digests"
        click.echo(f"{name}: no digest sent: {what}")
        return
    click.echo(f"{name}: digest volume {preview.volume}, issue {preview.issue} queued"
               f" ({len(preview.posts)} posts, {sum(preview.members.values())} members)")


@main.command("status")
@with_store
async def status_cmd(cfg: config_mod.Config, store: Store) -> None:
    """Up or down, queue depths, traffic in the last hour and day, each stage's last errors.

    Exits 3 when the server does not answer (as LSB init scripts do for "not running").
    """
    now = time.time()
    up, detail = await probe_server(cfg.server.listen.host, cfg.server.listen.port)
    horizon = STATUS_HORIZON + cfg.delivery.retry_period
    s = await store.operator_status(now, horizon)
    errors = await store.stage_errors(now, horizon)
    click.echo(f"server: {'up' if up else 'DOWN'}, {detail}")
    click.echo("queue:")
    for key, what in (
        ("incoming", "received, not yet processed"),
        ("held", "posts waiting for a moderator (listserv held list)"),
        ("waiting", "copies not yet tried"),
        ("retrying", "copies to be tried again after a temporary failure"),
        ("failed", f"copies given up for good (messages of the last {horizon // 86400} days)"),
    ):
        click.echo(f"  {key:<10}{s[key]:>7}  {what}")
    oldest = s["oldest_waiting"]
    if oldest is None:
        click.echo("  oldest waiting: none")
    else:
        click.echo(
            f"  oldest waiting: outbox {oldest['outbox_id']} ({oldest['list'] or '-'}, {oldest['kind']}"
            f"{', <' + oldest['message_id'] + '>' if oldest['message_id'] else ''}), queued"
            f" {_when(oldest['queued_at'])}, {_ago(now - oldest['queued_at'])} ago"
        )
    if s["oldest_incoming_at"] is not None and s["incoming"]:
        click.echo(f"  oldest incoming: received {_when(s['oldest_incoming_at'])}, "
                   f"{_ago(now - s['oldest_incoming_at'])} ago")
    click.echo(f"traffic:{'last hour':>22}{'last day':>11}")
    for label, hour, day in (
        ("posts received", s["posts_hour"], s["posts_day"]),
        ("copies sent", s["sent_hour"], s["sent_day"]),
        ("bounces", s["bounced_hour"], s["bounced_day"]),
    ):
        click.echo(f"  {label:<16}{hour:>12}{day:>11}")
    digests = [d for d in await store.digest_states() if d.members]
    if digests:
        from listserv.digest import next_send_at

        click.echo("digests:")
        for d in digests:
            lst = await store.get_list_by_id(d.list_id)
            settings = effective_settings(cfg.list_defaults, lst.settings_json)
            last = f"last vol {d.last_volume} no {d.last_issue} {_when(d.last_at)}" if d.last_at else "none sent yet"
            if not d.waiting:
                when = "nothing waiting"
            else:
                at = next_send_at(settings, d.oldest_at)
                when = (f"goes out {_when(at)}" if at else "goes out at the size threshold or by hand")
            click.echo(f"  {d.list_name:<20}{d.waiting:>5} posts {d.waiting_bytes:>9} bytes, {d.members} members;"
                       f" {when}; {last}")
    if not any(errors.values()):
        click.echo("last errors: none")
    else:
        click.echo("last errors:")
        for stage, entries in errors.items():
            if not entries:
                click.echo(f"  {stage:<10}none")
            for i, e in enumerate(entries):
                again = f"  ({e['count']} times since {_when(e['first_at'])})" if e["count"] > 1 else ""
                click.echo(f"  {stage if i == 0 else '':<10}{_when(e['at'])}  {e['detail']}{again}")
    if not up:
        sys.exit(3)


def _verdict_text(verdict: Any) -> str:
    from listserv.types import Accept, Discard, Hold, Reject

    if verdict is None:
        return "pass"
    if isinstance(verdict, Reject):
        return f"reject: {verdict.reply}"
    kind = {Accept: "accept", Hold: "hold", Discard: "discard"}[type(verdict)]
    return f"{kind}: {verdict.reason}"


@main.command("explain")
@click.argument("name")
@click.argument("eml", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--from", "envelope_from", default=None, metavar="ADDRESS",
              help="Envelope sender (MAIL FROM). Default: the message's Return-Path, else its From; "
                   "--from '' for a null sender.")
@with_store
async def explain_cmd(cfg: config_mod.Config, store: Store, name: str, eml: Path,
                      envelope_from: str | None) -> None:
    """Run list NAME's posting policy on a saved message EML and print each rule's verdict.

    Nothing is stored or sent; the rules see the list, the member and the bans as they are now.
    """
    from listserv import message as msg
    from listserv.pipeline import decide, explain
    from listserv.rewrite import header_values
    from listserv.smtp_in import _banned

    raw = eml.read_bytes()
    parsed = msg.parse(raw)
    source = "--from"
    if envelope_from is None:
        return_path = header_values(raw).get("return-path", [""])[0].strip()
        if return_path:
            envelope_from, source = return_path, "Return-Path"
        else:
            envelope_from = parsed.from_addresses[0] if parsed.from_addresses else ""
            source = "From"
    mail_from = envelope_from.strip().strip("<>").strip()
    sender = msg.sender_of(mail_from, parsed)
    await store.get_list(name)  # an unknown list is an error with the list's name in it
    snap = await store.policy_snapshot(name, sender)
    assert snap is not None
    settings = effective_settings(cfg.list_defaults, snap.settings_json)
    post = msg.Post(
        list_name=name,
        list_label=f"{name}.{cfg.server.domain}",
        mail_from=mail_from,
        sender=sender,
        message=parsed,
        membership=msg.Membership(snap.role, snap.moderated) if snap.role else None,
        banned=bool(sender) and _banned(sender, snap.ban_patterns),
        always_accept=snap.always_accept,
    )
    standing = (f"{snap.role}{', moderated' if snap.moderated else ''}" if snap.role else "not a member")
    click.echo(f"message-id: <{parsed.message_id}>" if parsed.message_id else "message-id: (none)")
    click.echo(f"subject: {parsed.subject or '(none)'}")
    click.echo(f"envelope sender: <{mail_from}> (from {source})")
    click.echo(f"sender: {sender or '(none)'} ({standing} of {name}{', banned' if post.banned else ''})")
    verdicts = explain(post, settings)
    width = max(len(rule) for rule, _ in verdicts)
    decided = False
    for rule, verdict in verdicts:
        # The first verdict decides (pipeline.decide); later ones are shown for the curious.
        mark = "  <- decides" if verdict is not None and not decided else ""
        decided = decided or verdict is not None
        click.echo(f"{rule:<{width}}  {_verdict_text(verdict)}{mark}")
    click.echo(f"decision: {_verdict_text(decide(post, settings))}")


@main.command("backup")
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
@with_store
async def backup_cmd(cfg: config_mod.Config, store: Store, file: Path) -> None:
    """Write a consistent copy of the state database to FILE, safely while the server runs.

    FILE must not exist.  The database is not everything: copy the DKIM key,
    the config and the archive folder too (see docs/deploy.md).
    """
    started = time.perf_counter()
    await store.backup(file)
    click.echo(f"wrote {file} ({file.stat().st_size} bytes) in {time.perf_counter() - started:.1f} s")
    click.echo(f"also copy: {cfg.dkim.private_key}, {cfg.source or 'the config'}, {cfg.archive.dir}")


@main.group("store")
def store_group() -> None:
    """The state database: moving it to PostgreSQL."""


@store_group.command("migrate")
@click.option("--to", "url", required=True, help="postgresql://USER@HOST/DATABASE: an empty database.")
@config_option
def store_migrate(config_path: Path | None, url: str) -> None:
    """Copy this node's SQLite state into PostgreSQL and check the counts.

    Stop the server first.  Every table is copied with its ids (lists,
    members, consent history, held posts, the queue, bounces, the archive
    index); then set ``[store] url`` to the same URL and start the nodes.
    """
    from listserv.store.pg import copy_from_sqlite, is_url

    cfg = _load(config_path)
    if not is_url(url):
        _fail(f"--to {url!r}: expected a postgresql:// URL")
    if cfg.uses_postgresql:
        _fail("[store] url is PostgreSQL already: there is no SQLite state to copy")
    if not cfg.db_path.exists():
        _fail(f"no SQLite state at {cfg.db_path}")
    try:
        counts = asyncio.run(copy_from_sqlite(cfg.db_path, url))
    except ListservError as exc:
        _fail(str(exc))
    width = max(len(t) for t in counts)
    for table, (source, copied) in sorted(counts.items()):
        click.echo(f"{table:<{width}}  {source:>8}  ->  {copied:>8}")
    click.echo(f"copied {sum(c for _, c in counts.values())} rows in {len(counts)} tables; the counts match.")
    click.echo(f'now set [store] url = "{url}" in the config of every node')


# -- bounces: reading saved bounce messages (issue 6) -----------------------------------


@main.group("bounces", invoke_without_command=True)
@config_option
@click.pass_context
def bounces_group(ctx: click.Context, config_path: Path | None) -> None:
    """Bounce scores per member (`bounces` alone is `bounces show`); read saved bounce messages."""
    if ctx.invoked_subcommand is None:
        ctx.invoke(bounces_show, config_path=config_path, name=None)


@bounces_group.command("show")
@click.argument("name", required=False)
@with_store
async def bounces_show(cfg: config_mod.Config, store: Store, name: str | None) -> None:
    """One line per member with a bounce score or paused delivery: list, address, score, delivery, last reason."""
    list_id = (await store.get_list(name)).id if name else None
    rows = await store.bounce_states(list_id)
    if not rows:
        click.echo(f"no bounces on {name}" if name else "no bounces")
    for list_name, state in rows:
        reason = " ".join(state.reason.split()) or "-"  # one line, whatever the remote server wrote
        click.echo(f"{list_name}\t{state.address}\t{state.score:.2f}\t{state.delivery}\t{reason}")


@bounces_group.command("parse")
@click.argument("files", nargs=-1, required=True, type=click.Path(dir_okay=False, path_type=Path))
def bounces_parse(files: tuple[Path, ...]) -> None:
    """Run the bounce reader on saved messages: one JSON object per FILE per line.

    Keys, in this order: file, addresses, kind (permanent | temporary | none),
    cause, status (RFC 3463), diagnostic.  Every file is read before anything is
    printed, so an unreadable one stops the command with nothing half-printed.
    """
    # Imported here: the reader (and flufl.bounce) is needed by this command only.
    from listserv.bounces import read_bounce

    raws: list[tuple[Path, bytes]] = []
    for file in files:
        try:
            raws.append((file, file.read_bytes()))
        except OSError as exc:
            _fail(f"cannot read {file}: {exc.strerror or exc}")
    for file, raw in raws:
        report = read_bounce(raw)
        click.echo(json.dumps({
            "file": str(file),
            "addresses": list(report.addresses),
            "kind": report.kind,
            "cause": report.cause,
            "status": report.status,
            "diagnostic": report.diagnostic,
        }, ensure_ascii=False))


# -- doctor -------------------------------------------------------------------------------------


@main.command("doctor")
@config_option
@click.option("--public-ip", default=None, metavar="IP",
              help="The public address the MTA sends our copies from (when [delivery] relay is local).")
def doctor_cmd(config_path: Path | None, public_ip: str | None) -> None:
    """Check what receivers check: DKIM keys in DNS, SPF, DMARC, MX, and the config.

    One line per check (OK, WARN or FAIL), with the DNS record to publish under
    each failure; exits 1 if any check fails.
    """
    import ipaddress

    from listserv import doctor

    cfg = _load(config_path)
    if public_ip is not None:
        try:
            public_ip = str(ipaddress.ip_address(public_ip.strip()))
        except ValueError:
            raise click.BadParameter(f"{public_ip!r} is not an IP address", param_hint="--public-ip") from None
    checks = asyncio.run(doctor.run_checks(cfg, doctor.make_resolver(cfg), public_ip=public_ip))
    for check in checks:
        click.echo(check.line())
        for i, line in enumerate(check.publish.splitlines()):
            click.echo(f"      {'publish: ' if i == 0 else '         '}{line}")
    failed = sum(c.status == "FAIL" for c in checks)
    if failed:
        click.echo(f"listserv: error: {failed} check(s) failed", err=True)
        sys.exit(1)


if __name__ == "__main__":  # pragma: no cover
    main()
