"""What the stores hand out, and how SQLite rows become it: the values both stores share
(message and reply states, Structs) and the SQLite store's row decoders."""

from __future__ import annotations

import os
import time
from typing import Any

import msgspec

from corral.protocol.types import Origin, Reply

PENDING = "pending"
DONE = "done"
FAILED = "error"
# delivery states of a reply
DELIVERED = "delivered"
DEAD = "dead"
FETCHED = "fetched"  # not pushed: the client fetches it (HTTP channel)


def new_message_id() -> str:
    """A new message's id: a UUIDv7 (RFC 9562) in 32 hex digits, the accept time in
    milliseconds and then 74 random bits. Time-ordered, so the indexes keyed by message
    id (and by the reply ids made from it) grow at their end, like the tables, instead
    of at a random page each: a commit writes fewer pages (uuid4 ids before)."""
    ms = time.time_ns() // 1_000_000 & (1 << 48) - 1
    rand = int.from_bytes(os.urandom(10))  # 80 bits: 12 and 62 used
    high = ms << 16 | 0x7000 | (rand >> 68)
    low = 0b10 << 62 | rand & (1 << 62) - 1
    return f"{high:016x}{low:016x}"


_origin_encode = msgspec.json.Encoder().encode
_origin_decode = msgspec.json.Decoder(Origin).decode


class Message(msgspec.Struct, frozen=True, kw_only=True):
    """An accepted inbound message."""

    id: str
    session: str
    text: str
    origin: Origin
    seq: int
    attempts: int = 0
    state: str = PENDING


class StoredReply(msgspec.Struct, frozen=True, kw_only=True):
    reply: Reply
    cursor: int
    delivery: str
    attempts: int
    created_at: float
    retried_at: float | None = None  # put back from the dead letters: max_age counts from here

    @property
    def age_from(self) -> float:
        """When delivery's max_age began: the reply's creation, or its last retry."""
        return self.created_at if self.retried_at is None else self.retried_at


class Accepted(msgspec.Struct, frozen=True):
    message: Message
    duplicate: bool


class Inbound(msgspec.Struct, frozen=True, kw_only=True):
    """A message a polling channel accepts: its id is derived from the platform's
    (e.g. "telegram:NAME:UPDATE_ID"), so fetching it again is the same message."""

    id: str
    session: str
    text: str
    origin: Origin


class SessionRecord(msgspec.Struct, frozen=True, kw_only=True):
    quarantined_until: float | None  # unix time
    restarts: int
    last_exit: str | None


class SessionSummary(msgspec.Struct, frozen=True, kw_only=True):
    """What the store knows of a session key, live worker or not (`corral ls --all`)."""

    session: str
    messages: int  # accepted, all time
    last_message_at: float | None  # unix time of the last accept
    restarts: int
    last_exit: str | None  # the last abnormal exit the store recorded
    quarantined_until: float | None


class HistoryItem(msgspec.Struct, frozen=True, kw_only=True):
    """One message of a session's history with its replies, in their order."""

    message: Message
    accepted_at: float
    finished_at: float | None
    replies: list[StoredReply]


class DeadLetter(msgspec.Struct, frozen=True, kw_only=True):
    """A reply given up on: its channel could not take it."""

    reply: Reply
    cursor: int
    attempts: int
    last_error: str | None
    created_at: float


_MESSAGE_COLUMNS = "seq, id, session, text, origin, attempts, state"
_REPLY_COLUMNS = (
    "cursor, id, message_id, session, idx, text, kind, origin, delivery, attempts, created_at, "
    "retried_at, markup"
)


_DEAD_COLUMNS = (
    "cursor, id, message_id, session, idx, text, kind, origin, attempts, last_error, created_at"
)


def _text(value: str | bytes | memoryview) -> str:
    """A text column: str in SQLite, UTF-8 bytea in PostgreSQL (where NUL must survive)."""
    return value if isinstance(value, str) else bytes(value).decode()


def _summary(row: tuple[Any, ...]) -> SessionSummary:
    key, n, last, restarts, last_exit, until = row
    return SessionSummary(
        session=key,
        messages=int(n),
        last_message_at=last,
        restarts=restarts,
        last_exit=last_exit,
        quarantined_until=until,
    )


def _reply(
    id_: str,
    message_id: str,
    session: str,
    idx: int,
    text: Any,
    kind: str,
    origin: Any,
    markup: str = "",
) -> Reply:
    return Reply(
        id=id_,
        in_reply_to=message_id,
        session=session,
        index=idx,
        text=_text(text),
        kind=kind,
        origin=_origin_decode(origin),
        markup=markup or "",
    )


def _dead_letter(row: tuple[Any, ...]) -> DeadLetter:
    cursor, *reply, attempts, error, created = row
    return DeadLetter(
        reply=_reply(*reply), cursor=cursor, attempts=attempts, last_error=error, created_at=created
    )


def _by_cursor(r: StoredReply) -> int:
    return r.cursor


def _message(row: tuple[Any, ...]) -> Message:
    seq, id_, session, text, origin, attempts, state = row
    return Message(
        id=id_,
        session=session,
        text=_text(text),
        origin=_origin_decode(origin),
        seq=seq,
        attempts=attempts,
        state=state,
    )


def _stored_reply(row: tuple[Any, ...]) -> StoredReply:
    cursor, id_, message_id, session, idx, text, kind, origin, *rest = row
    delivery, attempts, created, retried, markup = rest
    return StoredReply(
        reply=_reply(id_, message_id, session, idx, text, kind, origin, markup),
        cursor=cursor,
        delivery=delivery,
        attempts=attempts,
        created_at=created,
        retried_at=retried,
    )
