"""Value types that cross the supervisor/worker boundary, and the rules for them."""

from __future__ import annotations

import re
from typing import Final

import msgspec

SESSION_KEY_RE: Final = re.compile(r"[A-Za-z0-9._:@-]{1,200}")

# Exit reasons: the metric label, the `corral ls` column and the token in error replies.
IDLE: Final = "idle"
TURN_TIMEOUT: Final = "turn_timeout"
NO_PROGRESS: Final = "no_progress"
RSS_LIMIT: Final = "rss_limit"
CPU_LIMIT: Final = "cpu_limit"
OUTPUT_LIMIT: Final = "output_limit"
PROTOCOL_ERROR: Final = "protocol_error"
CRASHED: Final = "crashed"
KILLED: Final = "killed"
DRAIN: Final = "drain"
EVICTED: Final = "evicted"
EXIT_REASONS: Final = (
    IDLE,
    TURN_TIMEOUT,
    NO_PROGRESS,
    RSS_LIMIT,
    CPU_LIMIT,
    OUTPUT_LIMIT,
    PROTOCOL_ERROR,
    CRASHED,
    KILLED,
    DRAIN,
    EVICTED,
)
# Exits that count towards restart_intensity: the worker's fault, not ours or the operator's.
ABNORMAL_REASONS: Final = frozenset(
    {TURN_TIMEOUT, NO_PROGRESS, RSS_LIMIT, CPU_LIMIT, OUTPUT_LIMIT, PROTOCOL_ERROR, CRASHED}
)


class InvalidSessionKey(ValueError):
    pass


def check_session_key(key: object) -> str:
    """Return `key` if it is a valid session key, else raise InvalidSessionKey.

    Keys become file names (transcripts, agent state directories), so beyond the
    character set a key made only of dots is refused.
    """
    if not isinstance(key, str) or not SESSION_KEY_RE.fullmatch(key):
        raise InvalidSessionKey("session key must be 1-200 characters of A-Z a-z 0-9 . _ : @ -")
    if key.strip(".") == "":
        raise InvalidSessionKey("session key must not consist of dots only")
    return key


class Origin(msgspec.Struct, frozen=True, kw_only=True):
    """Where a message came from; every reply to it goes back exactly here."""

    channel: str
    account: str = ""
    chat: str = ""
    thread: str = ""
    user: str = ""


class Turn(msgspec.Struct, frozen=True, kw_only=True):
    """One inbound message handed to an agent."""

    id: str
    session: str
    text: str
    origin: Origin
    attempt: int = 1


class HistoryEntry(msgspec.Struct, frozen=True, kw_only=True):
    """One line of a session transcript."""

    role: str  # "user" | "assistant" | "error"
    text: str
    turn_id: str
    ts: float


REPLY: Final = "reply"
ERROR: Final = "error"


class Reply(msgspec.Struct, frozen=True, kw_only=True):
    """A reply as stored in the outbox and delivered by origin."""

    id: str  # "<message id>:<index>", stable across re-runs of the turn
    in_reply_to: str
    session: str
    index: int
    text: str
    kind: str  # REPLY or ERROR
    origin: Origin


def reply_id(message_id: str, index: int) -> str:
    return f"{message_id}:{index}"
