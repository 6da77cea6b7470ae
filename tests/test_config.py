"""listserv.config: the shipped example, the default path, LISTSERV_CONFIG, paths, and every error.

Every error must be a ConfigError whose message names the section and the key
(``[delivery] relay: ...``), because that message is all an administrator sees
when ``listserv serve`` refuses to start.
"""

from __future__ import annotations

import ast
import dataclasses
import tomllib
from pathlib import Path
from typing import Any

import pytest

from listserv import config as config_mod
from listserv.config import Config, ConfigError, HostPort
from listserv.settings import SETTINGS, AttachmentPolicy, ListSettings

pytestmark = pytest.mark.one_backend  # runs once: see pyproject's markers

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "config.example.toml"
CONFIG_PY = ROOT / "listserv" / "config.py"


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


@pytest.fixture(autouse=True)
def _no_env_config(monkeypatch: pytest.MonkeyPatch) -> None:
    # A LISTSERV_CONFIG in the developer's shell must not leak into these tests.
    monkeypatch.delenv(config_mod.ENV_VAR, raising=False)


# -- the shipped example ---------------------------------------------------------------


def example_toml() -> dict[str, Any]:
    with EXAMPLE.open("rb") as fh:
        return tomllib.load(fh)


# The tables of plain keys ([server], [delivery], ...): all but [list_defaults] and [[lists]].
PLAIN_SECTIONS = sorted(k for k, v in example_toml().items() if isinstance(v, dict) and k != "list_defaults")


def test_example_loads_with_every_key_valid() -> None:
    cfg = config_mod.load(EXAMPLE)
    assert isinstance(cfg, Config)
    assert cfg.source == EXAMPLE
    assert cfg.server.domain == "lists.example.org"
    assert cfg.server.listen == HostPort("127.0.0.1", 8025)
    assert cfg.server.max_message_size == 10 * 1024 * 1024
    assert cfg.server.timeout == 5 * 60
    assert cfg.server.hostname == cfg.server.domain  # "" means: the domain
    assert cfg.delivery.mode == "maildir"
    assert cfg.delivery.retry_period == 5 * 86400
    assert cfg.delivery.password_file is None
    assert cfg.archive.base_url == "http://127.0.0.1:8080/"
    # Relative paths in a named file resolve against that file's directory.
    assert cfg.server.state_dir == ROOT / "state"
    assert cfg.dkim.private_key == ROOT / "state" / "dkim.key"
    assert cfg.db_path == ROOT / "state" / "listserv.sqlite3"


def test_example_seed_lists_are_the_three_platform_lists_in_polish() -> None:
    cfg = config_mod.load(EXAMPLE)
    assert [s.name for s in cfg.lists] == ["seap-planning", "energy-management", "financing"]
    titles = {s.name: s.title for s in cfg.lists}
    assert titles["energy-management"] == "Zarządzanie energią"
    assert all(s.language == "pl" and s.owners for s in cfg.lists)
    assert "zrównoważonej" in cfg.lists[0].description
    assert "Źródła" in cfg.lists[2].description


def test_example_list_defaults_equal_the_built_in_defaults() -> None:
    # The example documents the defaults; if one of them drifts, `list show`
    # prints something else than the example says.
    cfg = config_mod.load(EXAMPLE)
    assert cfg.list_defaults == ListSettings()


def _keys_read_by_config_py() -> dict[str, set[str]]:
    """Section name -> keys, from the `_Section("name", ...)` / `var.get("key", ...)` calls in config.py."""
    tree = ast.parse(CONFIG_PY.read_text(encoding="utf-8"))
    section_of: dict[str, str] = {}
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Assign)
            and len(node.targets) == 1
            and isinstance(node.targets[0], ast.Name)
            and isinstance(node.value, ast.Call)
            and isinstance(node.value.func, ast.Name)
            and node.value.func.id == "_Section"
        ):
            first = node.value.args[0]
            if isinstance(first, ast.Constant):
                name = str(first.value)
            else:  # f"lists #{i + 1}"
                assert isinstance(first, ast.JoinedStr)
                lead = first.values[0]
                assert isinstance(lead, ast.Constant)
                name = str(lead.value).split()[0]
            section_of[node.targets[0].id] = name
    keys: dict[str, set[str]] = {name: set() for name in section_of.values()}
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr == "get"
            and isinstance(node.func.value, ast.Name)
            and node.func.value.id in section_of
        ):
            key = node.args[0]
            assert isinstance(key, ast.Constant), ast.dump(node)
            keys[section_of[node.func.value.id]].add(str(key.value))
    return keys


def test_example_documents_every_key_config_py_reads() -> None:
    read = _keys_read_by_config_py()
    example = example_toml()
    assert set(read) | {"list_defaults"} == set(example), "sections read by config.py vs the example"
    for section in PLAIN_SECTIONS:
        assert set(example[section]) == read[section], f"[{section}] example vs config.py"
    seed_keys = set().union(*(set(item) for item in example["lists"]))
    assert seed_keys == read["lists"]
    # Every per-list setting has its default in [list_defaults].
    assert set(example["list_defaults"]) == set(SETTINGS)


def test_example_keys_match_the_dataclass_fields() -> None:
    example = example_toml()
    cfg = config_mod.load(EXAMPLE)
    tables = {f.name for f in dataclasses.fields(cfg) if dataclasses.is_dataclass(getattr(cfg, f.name))}
    assert tables == set(PLAIN_SECTIONS) | {"list_defaults"}
    for section in tables:
        fields = {f.name for f in dataclasses.fields(getattr(cfg, section))}
        assert set(example[section]) == fields, section
    assert set(example["lists"][0]) == {f.name for f in dataclasses.fields(cfg.lists[0])}


# -- which file is read -------------------------------------------------------------------


def test_embedded_default_path_resolves_to_the_example() -> None:
    path = config_mod.default_config_path()
    assert path.is_file()
    assert path.read_bytes() == EXAMPLE.read_bytes()


def test_no_path_and_no_env_loads_the_default_relative_to_cwd(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    cfg = config_mod.load()
    assert cfg.source == config_mod.default_config_path()
    # The embedded default keeps its state in ./state of wherever it is run.
    assert cfg.server.state_dir == tmp_path / "state"
    assert cfg.dkim.private_key == tmp_path / "state" / "dkim.key"
    assert cfg.archive.dir == tmp_path / "state" / "archive"


def test_env_var_names_the_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg_file = write(tmp_path / "etc" / "listserv.toml", '[server]\ndomain = "listy.gmina-lodz.example.pl"\n')
    monkeypatch.setenv(config_mod.ENV_VAR, str(cfg_file))
    cfg = config_mod.load()
    assert cfg.source == cfg_file
    assert cfg.server.domain == "listy.gmina-lodz.example.pl"
    assert cfg.server.state_dir == tmp_path / "etc" / "state"


def test_explicit_path_beats_env_var(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(config_mod.ENV_VAR, str(write(tmp_path / "env.toml", '[server]\ndomain = "env.example.org"\n')))
    explicit = write(tmp_path / "explicit.toml", '[server]\ndomain = "explicit.example.org"\n')
    assert config_mod.load(explicit).server.domain == "explicit.example.org"


def test_empty_env_var_means_the_default(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv(config_mod.ENV_VAR, "")
    assert config_mod.load().source == config_mod.default_config_path()


def test_env_var_naming_a_missing_file_is_a_config_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(config_mod.ENV_VAR, str(tmp_path / "nie-ma.toml"))
    with pytest.raises(ConfigError, match="nie-ma.toml does not exist"):
        config_mod.load()


# -- relative paths ----------------------------------------------------------------------


def test_relative_paths_resolve_against_the_config_files_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg_file = write(
        tmp_path / "etc" / "listserv" / "config.toml",
        '[server]\nstate_dir = "dane"\n'
        '[delivery]\nusername = "lista"\npassword_file = "sekrety/hasło.txt"\n'
        '[dkim]\nprivate_key = "klucze/dkim.key"\n'
        '[archive]\ndir = "../archiwum"\n',
    )
    elsewhere = tmp_path / "somewhere" / "else"
    elsewhere.mkdir(parents=True)
    monkeypatch.chdir(elsewhere)
    cfg = config_mod.load(Path("../../etc/listserv/config.toml"))  # a relative path to the file itself
    base = cfg_file.parent.resolve()
    assert cfg.server.state_dir == base / "dane"
    assert cfg.delivery.password_file == base / "sekrety" / "hasło.txt"
    assert cfg.dkim.private_key == base / "klucze" / "dkim.key"
    assert cfg.archive.dir == base / ".." / "archiwum"
    assert cfg.db_path == base / "dane" / "listserv.sqlite3"
    assert cfg.maildir_root == base / "dane" / "maildir"


def test_absolute_and_home_paths_are_kept(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path / "dom"))
    cfg_file = write(
        tmp_path / "c.toml",
        f'[server]\nstate_dir = "{tmp_path / "var" / "listserv"}"\n[dkim]\nprivate_key = "~/dkim.key"\n',
    )
    cfg = config_mod.load(cfg_file)
    assert cfg.server.state_dir == tmp_path / "var" / "listserv"
    assert cfg.dkim.private_key == tmp_path / "dom" / "dkim.key"


# -- wrong key / type / value, per section ----------------------------------------------------------

# (section, key, TOML value, a fragment the message must contain)
BAD_VALUES = [
    ("server", "domain", "5", "expected a string"),
    ("server", "domain", '"nie domena"', "not a domain name"),
    ("server", "listen", '"localhost"', "host:port"),
    ("server", "listen", '"127.0.0.1:70000"', "out of range"),
    ("server", "listen", "8025", "expected a string"),
    ("server", "protocol", '"http"', "'smtp', 'lmtp'"),
    ("server", "state_dir", "5", "expected a string"),
    ("server", "max_message_size", '"10 furlongs"', "size"),
    ("server", "max_message_size", "0", "size"),
    ("server", "max_message_size", "true", "size"),
    ("server", "hostname", "1", "expected a string"),
    ("server", "timeout", '"1w"', "duration"),
    ("server", "timeout", "0", "duration"),
    ("server", "timeout", "2.5", "duration"),
    ("server", "log_level", '"verbose"', "'debug'"),
    ("delivery", "mode", '"sendmail"', "'smtp', 'maildir'"),
    ("delivery", "relay", "25", "expected a string"),
    ("delivery", "relay", '"mx.example.org"', "host:port"),
    ("delivery", "starttls", '"tak"', "true or false"),
    ("delivery", "username", "1", "expected a string"),
    ("delivery", "password_file", "[]", "expected a string"),
    ("delivery", "max_recipients", "0", "at least 1"),
    ("delivery", "max_recipients", "1.5", "at least 1"),
    ("delivery", "connections", "true", "at least 1"),
    ("delivery", "retry_period", '"na zawsze"', "duration"),
    ("delivery", "timeout", "-1", "duration"),
    ("dkim", "selector", '"zły selektor"', "not a valid DKIM selector"),
    ("dkim", "selector", "5", "expected a string"),
    ("dkim", "private_key", "5", "expected a string"),
    ("archive", "dir", "false", "expected a string"),
    ("archive", "base_url", '"ftp://archiwum.example.org/"', "http(s) URL"),
    ("archive", "base_url", "5", "expected a string"),
    ("limits", "confirm_resend_interval", '"godzina"', "duration"),
    ("limits", "confirmations_per_address_per_day", "0", "at least 1"),
    ("limits", "confirmations_per_day", '"1000"', "at least 1"),
    ("limits", "replies_per_address_per_day", "-3", "at least 1"),
]


@pytest.mark.parametrize(("section", "key", "value", "fragment"), BAD_VALUES,
                         ids=[f"{s}.{k}={v}" for s, k, v, _ in BAD_VALUES])
def test_bad_value_names_section_and_key(tmp_path: Path, section: str, key: str, value: str, fragment: str) -> None:
    cfg_file = write(tmp_path / "c.toml", f"[{section}]\n{key} = {value}\n")
    with pytest.raises(ConfigError) as exc:
        config_mod.load(cfg_file)
    message = str(exc.value)
    assert message.startswith(f"[{section}] {key}: "), message
    assert fragment in message


@pytest.mark.parametrize("section", PLAIN_SECTIONS)
def test_unknown_key_names_section_and_key_and_lists_the_known_ones(tmp_path: Path, section: str) -> None:
    cfg_file = write(tmp_path / "c.toml", f'[{section}]\n"zażółć" = "gęślą"\n')
    with pytest.raises(ConfigError) as exc:
        config_mod.load(cfg_file)
    message = str(exc.value)
    assert message.startswith(f"[{section}] unknown key 'zażółć'"), message
    known = set(example_toml()[section])
    assert all(k in message for k in known)


def test_misplaced_key_in_another_section_is_unknown(tmp_path: Path) -> None:
    # `relay` belongs in [delivery]; in [server] it must not be silently ignored.
    cfg_file = write(tmp_path / "c.toml", '[server]\nrelay = "127.0.0.1:25"\n')
    with pytest.raises(ConfigError, match=r"^\[server\] unknown key 'relay'"):
        config_mod.load(cfg_file)


@pytest.mark.parametrize(("username", "password_file", "missing"), [
    ("lista", "", "password_file"),
    ("", "haslo.txt", "username"),
])
def test_username_and_password_file_go_together(tmp_path: Path, username: str, password_file: str,
                                               missing: str) -> None:
    cfg_file = write(tmp_path / "c.toml",
                     f'[delivery]\nusername = "{username}"\npassword_file = "{password_file}"\n')
    with pytest.raises(ConfigError, match=rf"^\[delivery\] {missing}: required"):
        config_mod.load(cfg_file)


@pytest.mark.parametrize("section", [*PLAIN_SECTIONS, "list_defaults"])
def test_section_that_is_not_a_table(tmp_path: Path, section: str) -> None:
    cfg_file = write(tmp_path / "c.toml", f'{section} = "tak"\n')
    with pytest.raises(ConfigError, match=rf"^\[{section}\] must be a table"):
        config_mod.load(cfg_file)


def test_unknown_section_is_named_with_the_known_ones(tmp_path: Path) -> None:
    cfg_file = write(tmp_path / "c.toml", '[serwer]\ndomain = "lists.example.org"\n')
    with pytest.raises(ConfigError) as exc:
        config_mod.load(cfg_file)
    message = str(exc.value)
    assert message.startswith("unknown section [serwer]")
    for known in example_toml():
        assert known in message


# -- [list_defaults] --------------------------------------------------------------------------------

BAD_DEFAULTS = [
    ("language", '"de"', "pl, en"),
    ("posting_policy", '"wszyscy"', "members, announce, open"),
    ("dmarc_mitigation", '"sometimes"', "always, when_strict, never"),
    ("emergency_moderation", '"może"', "true or false"),
    ("max_recipients_in_header", "0", "at least 1"),
    ("max_recipients_in_header", "true", "boolean"),
    ("subject_prefix", '"[{lista}]"', "{name}"),
    ("title", "5", "expected a string"),
    ("footer", "[]", "expected a string"),
    ("attachments", '{ strip = ["exe"] }', "'exe' is not a MIME type"),
    ("attachments", '{ strp = ["application/zip"] }', "unknown key(s) strp"),
    ("attachments", '"zip"', "expected JSON"),
    ("subscription_policy", '"open"', "confirm, moderate, closed"),
    ("who_policy", '"wszyscy"', "nobody, members, anyone"),
    ("confirm_expiry", '"na zawsze"', "duration"),
    ("held_expiry", "0", "duration"),
    ("notify_held_sender", "2", "true or false"),
    ("archive_policy", '"tajne"', "public, private, none"),
]


@pytest.mark.parametrize(("key", "value", "fragment"), BAD_DEFAULTS, ids=[f"{k}={v}" for k, v, _ in BAD_DEFAULTS])
def test_bad_list_default_names_the_setting(tmp_path: Path, key: str, value: str, fragment: str) -> None:
    cfg_file = write(tmp_path / "c.toml", f"[list_defaults]\n{key} = {value}\n")
    with pytest.raises(ConfigError) as exc:
        config_mod.load(cfg_file)
    message = str(exc.value)
    assert message.startswith(f"[list_defaults] list setting '{key}': "), message
    assert fragment in message


def test_unknown_list_default_is_named(tmp_path: Path) -> None:
    cfg_file = write(tmp_path / "c.toml", "[list_defaults]\nmoderacja = true\n")
    with pytest.raises(ConfigError, match=r"^\[list_defaults\] unknown list setting 'moderacja'; known: title"):
        config_mod.load(cfg_file)


def test_list_defaults_are_applied(tmp_path: Path) -> None:
    cfg_file = write(
        tmp_path / "c.toml",
        '[list_defaults]\ntitle = "Lista gminna"\nlanguage = "EN"\nposting_policy = "announce"\n'
        'emergency_moderation = true\nmax_recipients_in_header = 3\nsubject_prefix = "<{name}> "\n'
        '[list_defaults.attachments]\nhold = ["application/zip", "Application/X-RAR*"]\n'
        '[[lists]]\nname = "zarzad"\n',
    )
    cfg = config_mod.load(cfg_file)
    d = cfg.list_defaults
    assert (d.title, d.language, d.posting_policy) == ("Lista gminna", "en", "announce")
    assert d.emergency_moderation is True
    assert d.max_recipients_in_header == 3
    assert d.subject_prefix == "<{name}> "
    # A table given replaces the whole attachment policy (strip is now empty).
    assert d.attachments == AttachmentPolicy(strip=(), hold=("application/zip", "application/x-rar*"))
    # A seed list without a language takes the default one.
    assert cfg.lists[0].language == "en"


# -- [[lists]] ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("item", "key", "fragment"), [
    ('name = "Zła Lista"', "name", "not a valid list name"),
    ('name = ""', "name", "not a valid list name"),
    ('name = "ok"\nlanguage = "de"', "language", "'pl', 'en'"),
    ('name = "ok"\nowners = "koordynator@example.org"', "owners", "list of e-mail addresses"),
    ('name = "ok"\nowners = ["koordynator"]', "owners", "list of e-mail addresses"),
    ('name = "ok"\ntitle = 5', "title", "expected a string"),
    ('name = "ok"\n"właściciel" = "x@example.org"', "'właściciel'", "unknown key"),
])
def test_bad_seed_list_names_the_entry_and_key(tmp_path: Path, item: str, key: str, fragment: str) -> None:
    cfg_file = write(tmp_path / "c.toml", f'[[lists]]\nname = "pierwsza"\n\n[[lists]]\n{item}\n')
    with pytest.raises(ConfigError) as exc:
        config_mod.load(cfg_file)
    message = str(exc.value)
    assert "lists" in message and "#2" in message, message  # which entry
    assert key in message and fragment in message, message


def test_lists_as_a_table_instead_of_an_array(tmp_path: Path) -> None:
    cfg_file = write(tmp_path / "c.toml", '[lists]\nname = "finanse"\n')
    with pytest.raises(ConfigError, match=r"^\[\[lists\]\] must be an array of tables"):
        config_mod.load(cfg_file)


def test_seed_list_owners_are_lower_cased(tmp_path: Path) -> None:
    cfg_file = write(tmp_path / "c.toml",
                     '[[lists]]\nname = "finanse"\ntitle = "Źródła finansowania"\n'
                     'owners = [" Koordynator@PNEC.org.pl "]\n')
    seed = config_mod.load(cfg_file).lists[0]
    assert seed.owners == ("koordynator@pnec.org.pl",)
    assert seed.title == "Źródła finansowania"


# -- the file itself ----------------------------------------------------------------------------------------


def test_broken_toml_names_the_file_and_the_line(tmp_path: Path) -> None:
    cfg_file = write(tmp_path / "zepsuty.toml", '[server]\ndomain = "lists.example.org"\nlisten = 127.0.0.1:8025\n')
    with pytest.raises(ConfigError) as exc:
        config_mod.load(cfg_file)
    message = str(exc.value)
    assert str(cfg_file) in message
    assert "not valid TOML" in message
    assert "line 3" in message


def test_duplicate_key_is_a_toml_error(tmp_path: Path) -> None:
    cfg_file = write(tmp_path / "c.toml", '[server]\ndomain = "a.example.org"\ndomain = "b.example.org"\n')
    with pytest.raises(ConfigError, match="not valid TOML"):
        config_mod.load(cfg_file)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"config file .*brak\.toml does not exist"):
        config_mod.load(tmp_path / "brak.toml")


def test_directory_instead_of_a_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"^config file "):
        config_mod.load(tmp_path)


def test_config_saved_as_windows_1250_is_a_config_error(tmp_path: Path) -> None:
    # An administrator edits the title in Notepad on Polish Windows and saves as "ANSI".
    cfg_file = tmp_path / "c.toml"
    cfg_file.write_bytes('[[lists]]\nname = "energia"\ntitle = "Zarządzanie energią"\n'.encode("cp1250"))
    with pytest.raises(ConfigError, match="UTF-8"):
        config_mod.load(cfg_file)


def test_empty_file_gives_the_built_in_defaults(tmp_path: Path) -> None:
    cfg = config_mod.load(write(tmp_path / "c.toml", "# nic\n"))
    assert cfg.server.domain == "lists.example.org"
    assert cfg.server.state_dir == tmp_path / "state"
    assert cfg.delivery.max_recipients == 500
    assert cfg.archive.base_url == ""
    assert cfg.lists == ()
    assert cfg.list_defaults == ListSettings()


# -- durations, sizes and the small parsers ------------------------------------------------------------------


@pytest.mark.parametrize(("value", "seconds"), [
    ("300", 300), ('"300"', 300), ('"30s"', 30), ('"15m"', 900), ('"12h"', 43200), ('"5d"', 432000),
    ('" 5 d "', 432000), ('"1"', 1),
])
def test_durations(tmp_path: Path, value: str, seconds: int) -> None:
    cfg = config_mod.load(write(tmp_path / "c.toml", f"[delivery]\nretry_period = {value}\n"))
    assert cfg.delivery.retry_period == seconds


@pytest.mark.parametrize("value", ['"5 dni"', '"1.5h"', '"-5m"', '"0s"', '""', '"1w"', "1.5", "-1", "false"])
def test_bad_durations(tmp_path: Path, value: str) -> None:
    with pytest.raises(ConfigError, match=r"^\[delivery\] retry_period: expected a duration"):
        config_mod.load(write(tmp_path / "c.toml", f"[delivery]\nretry_period = {value}\n"))


@pytest.mark.parametrize(("value", "size"), [
    ("2048", 2048), ('"10MB"', 10 * 1024**2), ('"10mb"', 10 * 1024**2), ('"512KB"', 512 * 1024),
    ('"1GB"', 1024**3), ('"100"', 100), ('"100B"', 100), ('" 25 MB "', 25 * 1024**2),
])
def test_sizes(tmp_path: Path, value: str, size: int) -> None:
    cfg = config_mod.load(write(tmp_path / "c.toml", f"[server]\nmax_message_size = {value}\n"))
    assert cfg.server.max_message_size == size


@pytest.mark.parametrize("value", ['"10 MiB"', '"1.5MB"', '"10TB"', '"0MB"', '"-1"', '""', "0", "1e6"])
def test_bad_sizes(tmp_path: Path, value: str) -> None:
    with pytest.raises(ConfigError, match=r"^\[server\] max_message_size: expected a size"):
        config_mod.load(write(tmp_path / "c.toml", f"[server]\nmax_message_size = {value}\n"))


@pytest.mark.parametrize(("value", "expected", "text"), [
    ("127.0.0.1:8025", HostPort("127.0.0.1", 8025), "127.0.0.1:8025"),
    ("[::1]:24", HostPort("::1", 24), "[::1]:24"),
    ("mail.example.org:0", HostPort("mail.example.org", 0), "mail.example.org:0"),
])
def test_host_port(tmp_path: Path, value: str, expected: HostPort, text: str) -> None:
    cfg = config_mod.load(write(tmp_path / "c.toml", f'[server]\nlisten = "{value}"\n'))
    assert cfg.server.listen == expected
    assert str(cfg.server.listen) == text


def test_domain_is_normalised_and_hostname_defaults_to_it(tmp_path: Path) -> None:
    cfg = config_mod.load(write(tmp_path / "c.toml", '[server]\ndomain = "Listy.PNEC.org.pl."\n'))
    assert cfg.server.domain == "listy.pnec.org.pl"
    assert cfg.server.hostname == "listy.pnec.org.pl"
    cfg = config_mod.load(write(tmp_path / "d.toml",
                                '[server]\ndomain = "listy.pnec.org.pl"\nhostname = "mx1.pnec.org.pl"\n'))
    assert cfg.server.hostname == "mx1.pnec.org.pl"


def test_base_url_gets_a_trailing_slash(tmp_path: Path) -> None:
    cfg = config_mod.load(write(tmp_path / "c.toml", '[archive]\nbase_url = "https://archiwum.example.org/listy"\n'))
    assert cfg.archive.base_url == "https://archiwum.example.org/listy/"


def test_from_mapping_is_validated_the_same_way(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"^\[delivery\] relay: "):
        config_mod.from_mapping({"delivery": {"relay": 25}}, base=tmp_path)
    cfg = config_mod.from_mapping({"server": {"state_dir": "s"}}, base=tmp_path)
    assert cfg.server.state_dir == tmp_path / "s"
    assert cfg.source is None


def test_config_is_frozen(tmp_path: Path) -> None:
    cfg = config_mod.load(write(tmp_path / "c.toml", ""))
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.server.domain = "inna.example.org"  # type: ignore[misc]
