"""Small records shared by the stages: SMTP replies and posting verdicts."""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

__all__ = ["Accept", "Discard", "Hold", "Reject", "Reply", "Verdict"]


class Reply(NamedTuple):
    """One SMTP reply: basic code, enhanced status code (RFC 3463), text."""

    code: int
    enhanced: str
    text: str

    def __str__(self) -> str:
        return f"{self.code} {self.enhanced} {self.text}" if self.enhanced else f"{self.code} {self.text}"

    @property
    def temporary(self) -> bool:
        return 400 <= self.code < 500

    @property
    def permanent(self) -> bool:
        return self.code >= 500


@dataclass(frozen=True, slots=True)
class Accept:
    reason: str


@dataclass(frozen=True, slots=True)
class Hold:
    reason: str


@dataclass(frozen=True, slots=True)
class Reject:
    reply: Reply

    @property
    def reason(self) -> str:
        return self.reply.text


@dataclass(frozen=True, slots=True)
class Discard:
    reason: str


Verdict = Accept | Hold | Reject | Discard
