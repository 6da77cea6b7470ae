"""Per-list settings: their names, types, defaults and validation, in one place.

Every list setting is declared once in ``SETTINGS``.  The server config's
``[list_defaults]`` table overrides the built-in defaults for all lists; the
store keeps each list's own overrides as JSON; ``ListSettings`` is the frozen,
validated result that the posting rules and the rewriter read.  ``listserv list
set NAME KEY VALUE`` parses VALUE with the same parser that reads TOML, so the
CLI and the config file can never disagree about what is valid.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import functools
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from listserv.errors import SettingError

__all__ = [
    "SETTINGS",
    "AttachmentPolicy",
    "ListSettings",
    "Setting",
    "effective_settings",
    "parse_setting",
]


@dataclass(frozen=True, slots=True)
class AttachmentPolicy:
    """Which MIME types are stripped from a post and which put it on hold.

    Patterns are MIME types with optional wildcards (``application/*``).
    Everything that matches neither list passes unchanged.
    """

    strip: tuple[str, ...] = ()
    hold: tuple[str, ...] = ()

    def action_for(self, content_type: str) -> str:
        """Return "hold", "strip" or "pass" for one part's content type."""
        ctype = content_type.lower()
        if any(fnmatch.fnmatchcase(ctype, p) for p in self.hold):
            return "hold"
        if any(fnmatch.fnmatchcase(ctype, p) for p in self.strip):
            return "strip"
        return "pass"

    def to_json(self) -> dict[str, list[str]]:
        return {"strip": list(self.strip), "hold": list(self.hold)}


# Executables and scripts that a municipal clerk's mail program would run on a
# double click: stripped by default, as Mailman's content filter suggests.
DEFAULT_ATTACHMENTS = AttachmentPolicy(
    strip=(
        "application/x-msdownload",
        "application/x-dosexec",
        "application/x-msdos-program",
        "application/x-ms-installer",
        "application/x-sh",
        "application/x-bat",
        "application/hta",
        "application/x-javascript",
        "application/javascript",
        "text/javascript",
        "application/vnd.microsoft.portable-executable",
    ),
    hold=(),
)


@dataclass(frozen=True, slots=True)
class ListSettings:
    """The effective settings of one list (defaults merged with its overrides)."""

    title: str = ""
    description: str = ""
    language: str = "pl"
    subject_prefix: str = "[{name}]"
    posting_policy: str = "members"
    dmarc_mitigation: str = "always"
    emergency_moderation: bool = False
    max_recipients_in_header: int = 10
    attachments: AttachmentPolicy = field(default_factory=lambda: DEFAULT_ATTACHMENTS)
    footer: str = ""
    subscription_policy: str = "confirm"
    who_policy: str = "nobody"
    confirm_expiry: int = 3 * 86400
    notify_held_sender: bool = True
    held_expiry: int = 14 * 86400
    personalize: bool = True
    personal_footer: bool = False
    sender_authentication: str = "hold"
    verp: str = "always"
    bounce_score_threshold: float = 5.0
    bounce_warnings: int = 3
    bounce_warning_interval: int = 7 * 86400
    archive_policy: str = "public"
    timezone: str = "Europe/Warsaw"
    digest_period: str = "daily"
    digest_time: int = 7  # local hour, in the list's time zone
    digest_size_threshold: int = 30 * 1024  # bytes, as Mailman's 30 KB

    def to_display(self) -> dict[str, str]:
        """Every setting rendered as the string ``list set`` accepts."""
        out: dict[str, str] = {}
        for f in dataclasses.fields(self):
            out[f.name] = SETTINGS[f.name].render(getattr(self, f.name))
        return out


# -- parsers: each takes a TOML value or a CLI string and returns the typed value


def _parse_str(value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError(f"expected a string, got {type(value).__name__}")
    return value


def _parse_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str):
        low = value.strip().lower()
        if low in ("true", "yes", "on", "1", "tak"):
            return True
        if low in ("false", "no", "off", "0", "nie"):
            return False
    raise ValueError(f"expected true or false, got {value!r}")


def _parse_count(value: Any) -> int:
    if isinstance(value, bool):
        raise ValueError("expected a whole number, got a boolean")
    if isinstance(value, str):
        try:
            value = int(value.strip())
        except ValueError:
            raise ValueError(f"expected a whole number, got {value!r}") from None
    if not isinstance(value, int) or value < 1:
        raise ValueError(f"expected a whole number of at least 1, got {value!r}")
    return value


def _parse_score(value: Any) -> float:
    if isinstance(value, bool):
        raise ValueError("expected a number, got a boolean")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"expected a number like 5 or 2.5, got {value!r}") from None
    if not 0 < number <= 1000:
        raise ValueError(f"expected a number above 0, got {value!r}")
    return number


def _parse_hour(value: Any) -> int:
    if isinstance(value, bool):
        raise ValueError("expected an hour 0-23, got a boolean")
    try:
        hour = int(str(value).strip().split(":")[0])
    except ValueError:
        raise ValueError(f"expected an hour 0-23 like 7 or 07:00, got {value!r}") from None
    if not 0 <= hour <= 23:
        raise ValueError(f"expected an hour 0-23, got {value!r}")
    return hour


def _parse_size(value: Any) -> int:
    """A size in bytes: 30000, "30KB", "30k", "1MB"."""
    if isinstance(value, bool):
        raise ValueError("expected a size like 30KB, got a boolean")
    text = str(value).strip().lower().replace(" ", "")
    units = {"kb": 1024, "k": 1024, "mb": 1024 * 1024, "m": 1024 * 1024, "b": 1, "": 1}
    for unit in ("kb", "mb", "k", "m", "b", ""):
        if text.endswith(unit) and text[: len(text) - len(unit)].isdigit():
            size = int(text[: len(text) - len(unit)]) * units[unit]
            if size < 1:
                break
            return size
    raise ValueError(f"expected a size like 30KB or 100000, got {value!r}")


def _choice(*choices: str) -> Callable[[Any], str]:
    def parse(value: Any) -> str:
        if not isinstance(value, str) or value.strip().lower() not in choices:
            raise ValueError(f"expected one of {', '.join(choices)}; got {value!r}")
        return value.strip().lower()

    return parse


def _parse_prefix(value: Any) -> str:
    text = _parse_str(value)
    try:
        text.format(name="x")
    except (KeyError, IndexError, ValueError):
        raise ValueError("may use only the placeholder {name}") from None
    return text


def _parse_mime_patterns(value: Any, key: str) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ValueError(f"{key!r} must be a list of MIME types")
    for pattern in value:
        if "/" not in pattern:
            raise ValueError(f"{pattern!r} is not a MIME type (like application/zip or image/*)")
    return tuple(p.strip().lower() for p in value)


def _parse_attachments(value: Any) -> AttachmentPolicy:
    if isinstance(value, AttachmentPolicy):
        return value
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            raise ValueError(
                'expected JSON like {"strip": ["application/x-msdownload"], "hold": ["application/zip"]}'
            ) from None
    if not isinstance(value, dict):
        raise ValueError("expected a table with the keys strip and hold")
    unknown = set(value) - {"strip", "hold"}
    if unknown:
        raise ValueError(f"unknown key(s) {', '.join(sorted(unknown))}; allowed: strip, hold")
    return AttachmentPolicy(
        strip=_parse_mime_patterns(value.get("strip", []), "strip"),
        hold=_parse_mime_patterns(value.get("hold", []), "hold"),
    )


def _parse_timezone(value: Any) -> str:
    """An IANA time zone name that zoneinfo knows (the archive shows local time in it)."""
    import zoneinfo

    if not isinstance(value, str) or not value.strip():
        raise ValueError("expected a time zone name like Europe/Warsaw or UTC")
    name = value.strip()
    try:
        zoneinfo.ZoneInfo(name)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError):
        raise ValueError(f"unknown time zone {name!r} (an IANA name like Europe/Warsaw or UTC)") from None
    return name


_DURATION_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(value: Any) -> int:
    """Seconds, as a number or a string like "30m", "12h", "3d"."""
    import re

    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    if isinstance(value, str):
        m = re.match(r"^\s*(\d+)\s*([smhd]?)\s*$", value)
        if m and int(m.group(1)) > 0:
            return int(m.group(1)) * _DURATION_UNITS[m.group(2)]
    raise ValueError(f'expected a duration like 3600, "12h" or "3d"; got {value!r}')


def render_duration(seconds: int) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds % size == 0:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def _render(value: Any, name: str = "") -> str:
    if name in ("confirm_expiry", "held_expiry", "bounce_warning_interval") and isinstance(value, int):
        return render_duration(value)
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, AttachmentPolicy):
        return json.dumps(value.to_json())
    return str(value)


def _stored(value: Any) -> Any:
    """The JSON-storable form of a parsed value."""
    if isinstance(value, AttachmentPolicy):
        return value.to_json()
    return value


@dataclass(frozen=True, slots=True)
class Setting:
    name: str
    parse: Callable[[Any], Any]
    help: str

    def render(self, value: Any) -> str:
        return _render(value, self.name)


SETTINGS: Mapping[str, Setting] = {
    s.name: s
    for s in (
        Setting("title", _parse_str, "Human name of the list, shown in From: 'Name via TITLE' and the archive"),
        Setting("description", _parse_str, "One paragraph about the list"),
        Setting("language", _choice("pl", "en"), "Language of texts the list sends: pl or en"),
        Setting("subject_prefix", _parse_prefix, "Tag put before the subject; {name} is the list name; empty for none"),
        Setting("posting_policy", _choice("members", "announce", "open"), "Who may post: members, announce (owners and moderators only), open"),
        Setting("dmarc_mitigation", _choice("always", "when_strict", "never"), "Rewrite From to the list address: always, when_strict (author's DMARC p=quarantine|reject), never"),
        Setting("emergency_moderation", _parse_bool, "Hold every post for a moderator"),
        Setting("max_recipients_in_header", _parse_count, "Hold a post with more addresses than this in To and Cc"),
        Setting("attachments", _parse_attachments, "MIME types stripped or held, JSON: {\"strip\": [...], \"hold\": [...]}"),
        Setting("footer", _parse_str, "Text appended to each post; empty for the built-in text in the list's language"),
        Setting("subscription_policy", _choice("confirm", "moderate", "closed"), "Joining by e-mail: confirm (double opt-in), moderate (then an owner approves), closed (owners add members with the CLI)"),
        Setting("who_policy", _choice("nobody", "members", "anyone"), "Who may get the member list with the `who` command"),
        Setting("confirm_expiry", parse_duration, "How long a join/leave confirmation stays valid, e.g. 3d"),
        Setting("notify_held_sender", _parse_bool, "Tell the sender (once) that their post waits for a moderator"),
        Setting("held_expiry", parse_duration, "A held post nobody decides on expires after this long (sender told), e.g. 14d"),
        Setting("personalize", _parse_bool, "Each member's copy carries its own one-click unsubscribe (RFC 8058); sent one transaction per member"),
        Setting("personal_footer", _parse_bool, "With personalize, the footer carries the member's own one-click link too (then the body differs per member and is not ARC-sealed)"),
        Setting("sender_authentication", _choice("off", "hold", "reject"), "On arrival check DKIM/SPF/DMARC: off, hold (members' posts that definitely fail a strict DMARC policy), reject (550)"),
        Setting("verp", _choice("always", "never", "probe"), "Envelope sender per recipient (LIST-bounces+user=domain): always, never, or probe (one post in 10); personalized copies are always VERP'd"),
        Setting("bounce_score_threshold", _parse_score, "Bounce score at which delivery to a member is paused (a dead mailbox adds 1 a day at most; scores halve every 7 days)"),
        Setting("bounce_warnings", _parse_count, "Reminders a paused member gets before removal"),
        Setting("bounce_warning_interval", parse_duration, "Time between those reminders, e.g. 7d"),
        Setting("archive_policy", _choice("public", "private", "none"), "Web archive: public, private (a separate folder served behind a login), none"),
        Setting("timezone", _parse_timezone, "Time zone of the archive's dates and month pages, and of digest_time (IANA name, e.g. Europe/Warsaw, UTC)"),
        Setting("digest_period", _choice("daily", "weekly", "off"), "How often digest and index members get their digest: daily, weekly (Mondays), off (only when the size threshold is passed or `listserv digest send`)"),
        Setting("digest_time", _parse_hour, "Local hour (in the list's time zone) the periodic digest goes out, 0-23"),
        Setting("digest_size_threshold", _parse_size, "Send the digest early once its waiting posts pass this size, e.g. 30KB"),
    )
}


def parse_setting(key: str, value: Any) -> Any:
    """Validate one setting; raise SettingError naming the key on bad input."""
    setting = SETTINGS.get(key)
    if setting is None:
        raise SettingError(f"unknown list setting {key!r}; known: {', '.join(SETTINGS)}")
    try:
        return setting.parse(value)
    except ValueError as exc:
        raise SettingError(f"list setting {key!r}: {exc}") from None


def validate_overrides(raw: Mapping[str, Any]) -> dict[str, Any]:
    """Parse a mapping of settings (TOML table or stored JSON) into typed values."""
    return {key: parse_setting(key, value) for key, value in raw.items()}


def storable(value: Any) -> Any:
    return _stored(value)


@functools.lru_cache(maxsize=512)
def effective_settings(defaults: ListSettings, overrides_json: str | None) -> ListSettings:
    """Merge a list's stored overrides (JSON text) over the defaults.

    Cached: every post asks for its list's settings, and they change rarely
    (the key is the stored JSON itself, so a change is a new key).
    """
    if not overrides_json:
        return defaults
    overrides = validate_overrides(json.loads(overrides_json))
    return dataclasses.replace(defaults, **overrides)
