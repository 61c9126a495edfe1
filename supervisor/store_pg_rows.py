"""How PostgreSQL rows become the stores' values (text is bytea there: NUL survives)."""

from __future__ import annotations

from typing import Any

import msgspec

from corral.protocol.types import Origin, Reply
from corral.supervisor.store_rows import DeadLetter, Message, SessionSummary, StoredReply

_origin_encode = msgspec.json.Encoder().encode
_origin_decode = msgspec.json.Decoder(Origin).decode


_MESSAGE_COLUMNS = "seq, id, session, text, origin, attempts, state"
_REPLY_COLUMNS = (
    "cursor, id, message_id, session, idx, text, kind, origin, delivery, attempts, created_at"
)


_DEAD_COLUMNS = (
    "cursor, id, message_id, session, idx, text, kind, origin, attempts, last_error, created_at"
)


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


def _dead_letter(row: tuple[Any, ...]) -> DeadLetter:
    cursor, id_, message_id, session, idx, text, kind, origin, attempts, error, created = row
    reply = Reply(
        id=id_,
        in_reply_to=message_id,
        session=session,
        index=idx,
        text=bytes(text).decode(),
        kind=kind,
        origin=_origin_decode(origin),
    )
    return DeadLetter(
        reply=reply, cursor=cursor, attempts=attempts, last_error=error, created_at=created
    )


def _by_cursor(r: StoredReply) -> int:
    return r.cursor


def _message(row: tuple[Any, ...]) -> Message:
    seq, id_, session, text, origin, attempts, state = row
    return Message(
        id=id_,
        session=session,
        text=bytes(text).decode(),
        origin=_origin_decode(origin),
        seq=seq,
        attempts=attempts,
        state=state,
    )


def _stored_reply(row: tuple[Any, ...]) -> StoredReply:
    cursor, id_, message_id, session, idx, text, kind, origin, delivery, attempts, created = row
    reply = Reply(
        id=id_,
        in_reply_to=message_id,
        session=session,
        index=idx,
        text=bytes(text).decode(),
        kind=kind,
        origin=_origin_decode(origin),
    )
    return StoredReply(
        reply=reply, cursor=cursor, delivery=delivery, attempts=attempts, created_at=created
    )


def _diagnostic(text: str | None) -> str | None:
    """A corral-made diagnostic for a `text` column, which cannot hold NUL."""
    return None if text is None else str(text).replace("\x00", "\ufffd")


def _first_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return lines[0] if lines else type(e).__name__
