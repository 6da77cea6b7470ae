"""The server config: one TOML file, loaded once into frozen, validated dataclasses.

``load(path)`` is called at start-up and its result is passed explicitly to
whatever needs it; nothing reads a global.  A wrong key, type or value raises
``ConfigError`` with a message that names the key (``[delivery] relay: ...``),
so the server stops before it accepts any mail.  Relative paths are resolved
against the directory of the config file; for the embedded default
(``config.example.toml`` shipped inside the package) against the current
working directory, so ``listserv serve`` with no config keeps its state in
``./state``.
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from listserv.errors import ConfigError, SettingError
from listserv.settings import ListSettings, parse_duration, validate_overrides

__all__ = [
    "Config",
    "DeliveryConfig",
    "DkimConfig",
    "SeedList",
    "ServerConfig",
    "ArchiveConfig",
    "load",
    "default_config_path",
]

ENV_VAR = "LISTSERV_CONFIG"
_LIST_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,62}$")
_DOMAIN = re.compile(r"^(?=.{1,253}$)([a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?\.)*[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")


@dataclass(frozen=True, slots=True)
class HostPort:
    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True, slots=True)
class ServerConfig:
    domain: str
    listen: HostPort
    protocol: str  # "smtp" | "lmtp"
    state_dir: Path
    max_message_size: int
    hostname: str
    timeout: int  # seconds a client may stay silent while we wait for a command (RFC 5321 §4.5.3.2.7)
    log_level: str
    trusted_relays: tuple[str, ...] = ()  # IPs/networks of the MTA in front of us (SPF looks past them)
    # Limits an MTA has (issue 12).  Each answers with its RFC reply.
    data_timeout: int = 180  # seconds of silence inside DATA (RFC 5321 §4.5.3.2.5: 3 minutes)
    max_connections: int = 200  # all clients together; more -> 421 4.7.0
    max_connections_per_ip: int = 50  # one client address; more -> 421 4.7.0
    recipient_limit: int = 100  # RCPTs per transaction; more -> 452 4.5.3 (RFC 5321 §4.5.3.1.10)
    soft_error_limit: int = 10  # refused RCPTs in a session before each further error is delayed
    error_sleep_time: float = 1.0  # that delay, seconds (Postfix's smtpd_error_sleep_time)
    hard_error_limit: int = 20  # refused RCPTs in a session before 421 and disconnect
    max_header_size: int = 256 * 1024  # bytes of the header section; more -> 552 5.3.4
    max_header_fields: int = 1000  # header fields; more -> 552 5.3.4
    postmaster: str = ""  # where mail to postmaster@ and abuse@ goes; "" = kept, not forwarded
    offload_threshold: int = 64 * 1024  # messages at least this big are checked in worker processes
    receive_workers: int = 2  # those worker processes (0 = none: everything on the event loop)
    # Worker processes running the stages (prepare, deliver, commands and
    # bounces, archive); 0: all the work in the serving process.
    workers: int = 1
    lease: int = 300  # seconds a worker's claim on a row lasts unless it records the outcome first


@dataclass(frozen=True, slots=True)
class DeliveryConfig:
    mode: str  # "smtp" | "maildir"
    relay: HostPort
    starttls: bool
    username: str
    password_file: Path | None
    max_recipients: int
    connections: int
    retry_period: int  # seconds before a temporary failure becomes permanent
    timeout: int


@dataclass(frozen=True, slots=True)
class DkimConfig:
    selector: str
    private_key: Path
    # Optional second signature, Ed25519 (RFC 8463); None = off.
    ed25519_selector: str = ""
    ed25519_private_key: Path | None = None


@dataclass(frozen=True, slots=True)
class ArchiveConfig:
    dir: Path
    base_url: str


@dataclass(frozen=True, slots=True)
class DnsConfig:
    """The one resolver every DNS check goes through (DMARC, SPF, DKIM keys)."""

    nameservers: tuple[str, ...]  # "ip" or "ip:port"; empty: the system's
    timeout: float


@dataclass(frozen=True, slots=True)
class WebConfig:
    """The small HTTP listener for one-click unsubscribe (RFC 8058)."""

    listen: HostPort | None  # None: no listener
    base_url: str  # the public https:// URL the reverse proxy serves it at; "" = mailto only


@dataclass(frozen=True, slots=True)
class StoreConfig:
    """Where the state is: "" (SQLite in the state dir, the embedded default), a
    ``sqlite:///PATH`` file, or a ``postgresql://`` server shared by several nodes."""

    url: str = ""


@dataclass(frozen=True, slots=True)
class LimitsConfig:
    """Abuse resistance for the mail listserv sends in answer to mail (RFC 3834 §2)."""

    confirm_resend_interval: int  # no new confirmation for the same address and list sooner
    confirmations_per_address_per_day: int
    confirmations_per_day: int  # all addresses together
    replies_per_address_per_day: int  # every automatic reply to one address


@dataclass(frozen=True, slots=True)
class SeedList:
    """A list the server creates on start-up if it does not exist yet."""

    name: str
    title: str
    description: str
    owners: tuple[str, ...]
    language: str


@dataclass(frozen=True, slots=True)
class Config:
    server: ServerConfig
    delivery: DeliveryConfig
    dkim: DkimConfig
    archive: ArchiveConfig
    list_defaults: ListSettings
    lists: tuple[SeedList, ...] = field(default=())
    limits: LimitsConfig = field(default_factory=lambda: LimitsConfig(3600, 3, 1000, 10))
    web: WebConfig = field(default_factory=lambda: WebConfig(None, ""))
    dns: DnsConfig = field(default_factory=lambda: DnsConfig((), 5.0))
    source: Path | None = None
    store: StoreConfig = field(default_factory=StoreConfig)

    @property
    def db_path(self) -> Path:
        """The SQLite file (also where a PostgreSQL node keeps nothing: see ``store_target``)."""
        if self.store.url.startswith("sqlite:///"):
            return sqlite_path(self.store.url)
        return self.server.state_dir / "listserv.sqlite3"

    @property
    def uses_postgresql(self) -> bool:
        return self.store.url.startswith(("postgresql://", "postgres://"))

    @property
    def store_target(self) -> Path | str:
        """What ``listserv.store.open_store`` opens: the SQLite file, or the PostgreSQL URL."""
        return self.store.url if self.uses_postgresql else self.db_path

    @property
    def maildir_root(self) -> Path:
        return self.server.state_dir / "maildir"


# -- helpers --------------------------------------------------------------

T = TypeVar("T")


class _Section:
    """Reads one TOML table, remembering which keys were used."""

    def __init__(self, name: str, table: Any) -> None:
        if not isinstance(table, dict):
            raise ConfigError(f"[{name}] must be a table")
        self.name = name
        self.table: dict[str, Any] = table
        self.used: set[str] = set()

    def get(self, key: str, parse: Callable[[Any], T], default: Any) -> T:
        self.used.add(key)
        value = self.table.get(key, default)
        try:
            return parse(value)
        except ValueError as exc:
            raise ConfigError(f"[{self.name}] {key}: {exc}") from None

    def finish(self) -> None:
        unknown = sorted(set(self.table) - self.used)
        if unknown:
            raise ConfigError(
                f"[{self.name}] unknown key {unknown[0]!r}; known keys: {', '.join(sorted(self.used))}"
            )


def _str(value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError(f"expected a string, got {type(value).__name__} {value!r}")
    return value


def _bool(value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"expected true or false, got {value!r}")
    return value


def _positive(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"expected a whole number of at least 1, got {value!r}")
    return value


def _non_negative(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"expected a whole number of at least 0, got {value!r}")
    return value


def _positive_duration(value: Any) -> int:
    seconds = parse_duration(value)
    if seconds < 1:
        raise ValueError(f"expected at least 1 second, got {value!r}")
    return seconds


def _choice(*choices: str) -> Callable[[Any], str]:
    def parse(value: Any) -> str:
        if value not in choices:
            raise ValueError(f"expected one of {', '.join(repr(c) for c in choices)}, got {value!r}")
        return str(value)

    return parse


def _duration(value: Any) -> int:
    """Seconds, as a number or a string like "30s", "15m", "12h", "5d" (the list settings' parser)."""
    return parse_duration(value)


def _size(value: Any) -> int:
    """Bytes, as a number or a string like "10MB", "512KB"."""
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    if isinstance(value, str):
        m = re.match(r"^\s*(\d+)\s*(B|KB|MB|GB)?\s*$", value, re.IGNORECASE)
        if m and int(m.group(1)) > 0:
            mult = {"": 1, "B": 1, "KB": 1024, "MB": 1024**2, "GB": 1024**3}[(m.group(2) or "").upper()]
            return int(m.group(1)) * mult
    raise ValueError(f'expected a size in bytes, or like "10MB"; got {value!r}')


def _size_or_zero(value: Any) -> int:
    """A size, or 0."""
    if value == 0 and not isinstance(value, bool):
        return 0
    return _size(value)


def _count(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"expected a whole number (0 or more), got {value!r}")
    return value


def _delay(value: Any) -> float:
    """Seconds as a number (fractions allowed), or a duration string like "1s"."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if not 0 <= value <= 60:
            raise ValueError(f"expected seconds between 0 and 60, got {value!r}")
        return float(value)
    return float(parse_duration(value))


def _optional_address(value: Any) -> str:
    text = _str(value).strip()
    if text and not re.match(r"^[^@\s<>]+@[^@\s<>]+\.[^@\s<>]+$", text):
        raise ValueError(f"expected an e-mail address (or \"\"), got {text!r}")
    return text.lower()


def _host_port(value: Any) -> HostPort:
    text = _str(value).strip()
    m = re.match(r"^\[([0-9a-fA-F:.]+)\]:(\d+)$", text) or re.match(r"^([^:\[\]]+):(\d+)$", text)
    if not m:
        raise ValueError(f'expected "host:port" (IPv6 as "[::1]:port"), got {text!r}')
    port = int(m.group(2))
    if not 0 <= port <= 65535:
        raise ValueError(f"port {port} is out of range")
    return HostPort(m.group(1), port)


def _domain(value: Any) -> str:
    text = _str(value).strip().lower().rstrip(".")
    if not _DOMAIN.match(text):
        raise ValueError(f"{text!r} is not a domain name")
    return text


def _base_url(value: Any) -> str:
    text = _str(value).strip()
    if text and not re.match(r"^https?://[^\s/]+(/\S*)?$", text):
        raise ValueError(f"expected an http(s) URL, got {text!r}")
    if text and not text.endswith("/"):
        text += "/"
    return text


def default_config_path() -> Path:
    """The embedded default config, shipped inside the package.

    In a checkout (or an editable install) it is the file at the top level.
    """
    from importlib import resources  # here: 9 ms to import, for the default config only

    packaged = Path(str(resources.files("listserv").joinpath("config.example.toml")))
    if packaged.exists():
        return packaged
    return Path(__file__).resolve().parent.parent / "config.example.toml"


def _read(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except OSError as exc:
        raise ConfigError(f"config file {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None
    except UnicodeDecodeError:
        # TOML is UTF-8 (TOML 1.0 §Spec); Notepad on Polish Windows saves "ANSI".
        raise ConfigError(f"config file {path} is not UTF-8 text; save it as UTF-8") from None


def resolve_path(path: str | os.PathLike[str] | None) -> tuple[Path, bool]:
    """Which config file to read: the argument, then $LISTSERV_CONFIG, then the default.

    Returns the path and whether it is the embedded default.
    """
    if path:
        return Path(path), False
    env = os.environ.get(ENV_VAR)
    if env:
        return Path(env), False
    return default_config_path(), True


def load(path: str | os.PathLike[str] | None = None) -> Config:
    """Load and validate the config; raise ConfigError naming the key on any problem."""
    cfg_path, embedded = resolve_path(path)
    data = _read(cfg_path)
    base = Path.cwd() if embedded else cfg_path.resolve().parent
    return from_mapping(data, base=base, source=cfg_path)


def from_mapping(data: Mapping[str, Any], *, base: Path, source: Path | None = None) -> Config:
    """Validate an already-parsed TOML document (tests build configs this way)."""
    known = {"server", "delivery", "dkim", "archive", "list_defaults", "lists", "limits", "web", "dns", "store"}
    for key in data:
        if key not in known:
            raise ConfigError(f"unknown section [{key}]; known sections: {', '.join(sorted(known))}")

    def path_of(value: Any) -> Path:
        p = Path(_str(value)).expanduser()
        return p if p.is_absolute() else (base / p)

    s = _Section("server", data.get("server", {}))
    server = ServerConfig(
        domain=s.get("domain", _domain, "lists.example.org"),
        listen=s.get("listen", _host_port, "127.0.0.1:8025"),
        protocol=s.get("protocol", _choice("smtp", "lmtp"), "smtp"),
        state_dir=s.get("state_dir", path_of, "state"),
        max_message_size=s.get("max_message_size", _size, 10 * 1024 * 1024),
        hostname=s.get("hostname", _str, ""),
        timeout=s.get("timeout", _duration, 300),
        log_level=s.get("log_level", _choice("debug", "info", "warning", "error"), "info"),
        trusted_relays=tuple(s.get("trusted_relays", _networks, [])),
        data_timeout=s.get("data_timeout", _duration, 180),
        max_connections=s.get("max_connections", _positive, 200),
        max_connections_per_ip=s.get("max_connections_per_ip", _positive, 50),
        recipient_limit=s.get("recipient_limit", _positive, 100),
        soft_error_limit=s.get("soft_error_limit", _positive, 10),
        error_sleep_time=s.get("error_sleep_time", _delay, 1.0),
        hard_error_limit=s.get("hard_error_limit", _positive, 20),
        max_header_size=s.get("max_header_size", _size, 256 * 1024),
        max_header_fields=s.get("max_header_fields", _positive, 1000),
        postmaster=s.get("postmaster", _optional_address, ""),
        offload_threshold=s.get("offload_threshold", _size_or_zero, 64 * 1024),
        receive_workers=s.get("receive_workers", _count, 2),
        workers=s.get("workers", _non_negative, os.cpu_count() or 1),
        lease=s.get("lease", _positive_duration, 300),
    )
    s.finish()
    if server.recipient_limit < 100:
        # RFC 5321 §4.5.3.1.8: a server must accept at least 100 recipients.
        raise ConfigError("[server] recipient_limit: RFC 5321 §4.5.3.1.8 requires at least 100")
    if server.hard_error_limit < server.soft_error_limit:
        raise ConfigError("[server] hard_error_limit: must be at least soft_error_limit")
    if server.max_connections_per_ip > server.max_connections:
        raise ConfigError("[server] max_connections_per_ip: must not exceed max_connections")
    if not server.hostname:
        server = _replace(server, hostname=server.domain)

    d = _Section("delivery", data.get("delivery", {}))
    password_file = d.get("password_file", _str, "")
    delivery = DeliveryConfig(
        mode=d.get("mode", _choice("smtp", "maildir"), "maildir"),
        relay=d.get("relay", _host_port, "127.0.0.1:25"),
        starttls=d.get("starttls", _bool, False),
        username=d.get("username", _str, ""),
        password_file=path_of(password_file) if password_file else None,
        # Postfix accepts 1,000 RCPTs per transaction by default
        # (smtpd_recipient_limit); RFC 5321 §4.5.3.1.8 asks servers for >= 100.
        max_recipients=d.get("max_recipients", _positive, 500),
        connections=d.get("connections", _positive, 4),
        retry_period=d.get("retry_period", _duration, 5 * 86400),
        timeout=d.get("timeout", _duration, 60),
    )
    d.finish()
    if delivery.username and delivery.password_file is None:
        raise ConfigError("[delivery] password_file: required when username is set")
    if delivery.password_file is not None and not delivery.username:
        raise ConfigError("[delivery] username: required when password_file is set")

    k = _Section("dkim", data.get("dkim", {}))
    ed25519_key = k.get("ed25519_private_key", _str, "")
    dkim = DkimConfig(
        selector=k.get("selector", _str, "listserv"),
        private_key=k.get("private_key", path_of, "state/dkim.key"),
        ed25519_selector=k.get("ed25519_selector", _str, ""),
        ed25519_private_key=path_of(ed25519_key) if ed25519_key else None,
    )
    k.finish()
    if not re.match(r"^[A-Za-z0-9]([A-Za-z0-9._-]*[A-Za-z0-9])?$", dkim.selector):
        raise ConfigError(f"[dkim] selector: {dkim.selector!r} is not a valid DKIM selector")
    if bool(dkim.ed25519_selector) != (dkim.ed25519_private_key is not None):
        raise ConfigError("[dkim] ed25519_selector and ed25519_private_key: set both (or neither)")
    if dkim.ed25519_selector:
        if not re.match(r"^[A-Za-z0-9]([A-Za-z0-9._-]*[A-Za-z0-9])?$", dkim.ed25519_selector):
            raise ConfigError(f"[dkim] ed25519_selector: {dkim.ed25519_selector!r} is not a valid DKIM selector")
        if dkim.ed25519_selector.lower() == dkim.selector.lower():
            raise ConfigError("[dkim] ed25519_selector: must differ from selector (one key per DNS name)")

    a = _Section("archive", data.get("archive", {}))
    archive = ArchiveConfig(
        dir=a.get("dir", path_of, "state/archive"),
        base_url=a.get("base_url", _base_url, ""),
    )
    a.finish()

    li = _Section("limits", data.get("limits", {}))
    limits = LimitsConfig(
        confirm_resend_interval=li.get("confirm_resend_interval", _duration, 3600),
        confirmations_per_address_per_day=li.get("confirmations_per_address_per_day", _positive, 3),
        confirmations_per_day=li.get("confirmations_per_day", _positive, 1000),
        replies_per_address_per_day=li.get("replies_per_address_per_day", _positive, 10),
    )
    li.finish()

    n = _Section("dns", data.get("dns", {}))
    dns = DnsConfig(
        nameservers=tuple(n.get("nameservers", _nameservers, [])),
        timeout=float(n.get("timeout", _seconds, 5.0)),
    )
    n.finish()

    w = _Section("web", data.get("web", {}))
    web_listen = w.get("listen", _str, "")
    web = WebConfig(
        listen=_host_port(web_listen) if web_listen else None,
        base_url=w.get("base_url", _base_url, ""),
    )
    w.finish()
    if web.base_url and not web.base_url.startswith("https://"):
        # RFC 8058 §3.1: the one-click URI must be HTTPS.
        raise ConfigError("[web] base_url: must be an https:// URL (RFC 8058 one-click needs HTTPS)")

    st = _Section("store", data.get("store", {}))
    store = StoreConfig(url=st.get("url", _store_url(server.state_dir), ""))
    st.finish()

    raw_defaults = data.get("list_defaults", {})
    if not isinstance(raw_defaults, dict):
        raise ConfigError("[list_defaults] must be a table")
    try:
        list_defaults = ListSettings(**validate_overrides(raw_defaults))
    except SettingError as exc:
        raise ConfigError(f"[list_defaults] {exc}") from None

    seeds = []
    raw_lists = data.get("lists", [])
    if not isinstance(raw_lists, list):
        raise ConfigError("[[lists]] must be an array of tables")
    for i, item in enumerate(raw_lists):
        t = _Section(f"lists #{i + 1}", item)
        name = t.get("name", _str, "")
        if not _LIST_NAME.match(name):
            raise ConfigError(f"[[lists]] #{i + 1} name: {name!r} is not a valid list name (a-z, 0-9, . _ -)")
        owners = t.get("owners", _str_list, [])
        seeds.append(
            SeedList(
                name=name,
                title=t.get("title", _str, ""),
                description=t.get("description", _str, ""),
                owners=tuple(owners),
                language=t.get("language", _choice("pl", "en"), list_defaults.language),
            )
        )
        t.finish()
    return Config(server, delivery, dkim, archive, list_defaults, lists=tuple(seeds), limits=limits, web=web, dns=dns, source=source,
                  store=store)


def sqlite_path(url: str) -> Path:
    """``sqlite:///var/lib/x.db`` (and ``sqlite:////var/...``) -> /var/lib/x.db: always absolute."""
    return Path("/" + url.removeprefix("sqlite:///").lstrip("/"))


def _store_url(state_dir: Path) -> Callable[[Any], str]:
    """``[store] url``: "" or sqlite:///PATH ({state_dir} allowed) or postgresql://..."""
    def parse(value: Any) -> str:
        url = _str(value).replace("{state_dir}", str(state_dir))
        if url == "" or url.startswith(("postgresql://", "postgres://")):
            return url
        if url.startswith("sqlite:///") and len(url) > len("sqlite:///"):
            return url
        raise ValueError(f"{value!r} is not a store URL; use sqlite:///{{state_dir}}/listserv.sqlite3 (the default)"
                         " or postgresql://USER@HOST/DATABASE")
    return parse


def _networks(value: Any) -> list[str]:
    import ipaddress

    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ValueError('expected a list of addresses or networks, like ["127.0.0.1", "10.0.0.0/8"]')
    for item in value:
        try:
            ipaddress.ip_network(item, strict=False)
        except ValueError:
            raise ValueError(f"{item!r} is not an IP address or network") from None
    return list(value)


def _nameservers(value: Any) -> list[str]:
    import ipaddress

    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ValueError('expected a list like ["127.0.0.1", "192.0.2.53:5353"]')
    for item in value:
        host = item.rsplit(":", 1)[0] if item.count(":") == 1 else item.strip("[]").split("]:")[0]
        try:
            ipaddress.ip_address(host.strip("[]"))
        except ValueError:
            raise ValueError(f"{item!r} is not an IP address (with an optional :port)") from None
    return list(value)


def _seconds(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 60:
        raise ValueError(f"expected seconds between 0 and 60, got {value!r}")
    return float(value)


def _str_list(value: Any) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) and "@" in v for v in value):
        raise ValueError("expected a list of e-mail addresses")
    return [v.strip().lower() for v in value]


def _replace(obj: T, **changes: Any) -> T:
    import dataclasses

    return dataclasses.replace(obj, **changes)  # type: ignore[type-var]
