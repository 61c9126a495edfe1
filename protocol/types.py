"""Value types that cross the supervisor/worker boundary, and the rules for them."""

from __future__ import annotations

import re
from enum import StrEnum
from typing import Final

import msgspec

SESSION_KEY_RE: Final = re.compile(r"[A-Za-z0-9._:@-]{1,200}")


class ExitReason(StrEnum):
    """Why a worker ended: the metric label, the `corral ls` column, the token in error replies."""

    IDLE = "idle"
    TURN_TIMEOUT = "turn_timeout"
    NO_PROGRESS = "no_progress"
    RSS_LIMIT = "rss_limit"
    CPU_LIMIT = "cpu_limit"
    OUTPUT_LIMIT = "output_limit"
    PROTOCOL_ERROR = "protocol_error"
    CRASHED = "crashed"
    KILLED = "killed"
    DRAIN = "drain"
    EVICTED = "evicted"
    RELOAD = "reload"  # retired after a reload changed what workers start with
    TASKS_LIMIT = "tasks_limit"  # too many processes or threads in the worker's tree
    # the zygote that forked it died or was replaced: not the session's fault, the turn
    # runs again
    ZYGOTE_LOST = "zygote_lost"
    LEASE_LOST = "lease_lost"  # a cluster node lost the session's lease: another runs it


EXIT_REASONS: Final = tuple(ExitReason)
# Exits that count towards restart_intensity: the worker's fault, not ours or the operator's.
ABNORMAL_REASONS: Final = frozenset(
    {
        ExitReason.TURN_TIMEOUT,
        ExitReason.NO_PROGRESS,
        ExitReason.RSS_LIMIT,
        ExitReason.CPU_LIMIT,
        ExitReason.OUTPUT_LIMIT,
        ExitReason.PROTOCOL_ERROR,
        ExitReason.CRASHED,
        ExitReason.TASKS_LIMIT,
    }
)


class SessionState(StrEnum):
    """A listed session's state (`corral ls`, `corral_session_state`)."""

    STARTING = "starting"  # worker being spawned
    IDLE = "idle"  # worker alive, no turn
    BUSY = "busy"  # a turn is running
    STOPPING = "stopping"  # SIGTERM or a Shutdown frame sent
    QUARANTINED = "quarantined"


HTTP_CHANNEL: Final = "http"  # the built-in channel: its replies are fetched, not pushed


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
    reply_to: str = ""  # the platform's id of the message answered (Telegram: message_id)


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
    markup: str = ""  # "": plain text; "html" or "markdown", as the agent asked (MARKUPS)


# what an agent may ask a reply to be shown as: ctx.reply(text, markup=...); a channel
# that has no such formatting (HTTP, webhooks) passes the field on and the text as is
MARKUPS = ("", "html", "markdown")


def reply_id(message_id: str, index: int) -> str:
    return f"{message_id}:{index}"
