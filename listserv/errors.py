"""The exceptions listserv raises, and where each one ends.

    ListservError            base: everything below is a clear, user-facing message
    ├── ConfigError          the config file is missing, unparsable or names a bad key/value;
    │                        start-up stops with the message (it names the key)
    ├── SettingError         a per-list setting is unknown or its value is invalid
    ├── StoreError           a state-database operation cannot be done as asked
    │   ├── UnknownList      no list by that name
    │   └── DuplicateError   the list, member or ban exists already
    ├── AddressError         a malformed e-mail address or list name
    ├── DkimError            (dkim.py) signing: DkimKeyError (the key file), DkimMessageError
    │                        (a message that cannot be signed, e.g. no From)
    └── DnsTemporaryError    (dns.py) a lookup timed out or failed: the sender stays
                             "unverified", never "forged"

Defined next to the code that raises them, so each stage reads alone.

Exceptions at the SMTP boundary never leave a hook: ``smtp_in`` turns them into
``451 4.3.0`` replies.  The CLI turns these into one line on stderr and exit 1.
"""

from __future__ import annotations

__all__ = [
    "AddressError",
    "ConfigError",
    "DuplicateError",
    "ListservError",
    "SettingError",
    "StoreError",
    "UnknownList",
]


class ListservError(Exception):
    """Base class: the message is meant for a person."""


class ConfigError(ListservError):
    pass


class SettingError(ListservError):
    pass


class StoreError(ListservError):
    pass


class UnknownList(StoreError):
    pass


class DuplicateError(StoreError):
    pass


class ArchiveIdTaken(StoreError):
    """Another post took this Message-ID in the archive between choosing the id and queueing."""


class AddressError(ListservError):
    pass
