"""The SQLite store's outbox, delivery and operators' queries (a part of `Store`)."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, TypeVar

import msgspec

from corral.protocol.types import ERROR, Reply, reply_id
from corral.supervisor.store_rows import (
    _DEAD_COLUMNS,
    _MESSAGE_COLUMNS,
    _REPLY_COLUMNS,
    FETCHED,
    PENDING,
    DeadLetter,
    HistoryItem,
    Message,
    SessionSummary,
    StoredReply,
    _by_cursor,
    _dead_letter,
    _message,
    _origin_encode,
    _stored_reply,
    _summary,
)

T = TypeVar("T")


class DeliveryOps:
    if TYPE_CHECKING:

        def _submit(self, fn: Callable[[sqlite3.Connection], T]) -> asyncio.Future[T]: ...

    # ---- outbox

    def add_reply(
        self,
        message: Message,
        index: int,
        text: str,
        kind: str,
        push: bool = False,
        markup: str = "",
    ) -> asyncio.Future[Reply | None]:
        """Store a reply keyed by (message, index); None if that reply exists already.

        Queued at once, in call order (what is queued after it commits with it or
        later), so a caller may go on without awaiting the returned future.

        `push` replies wait in the outbox for delivery to their channel; the others
        are fetched by the client (the HTTP channel's long-poll).
        """
        reply = Reply(
            id=reply_id(message.id, index),
            in_reply_to=message.id,
            session=message.session,
            index=index,
            text=text,
            kind=kind,
            origin=message.origin,
            markup=markup,
        )

        def insert(conn: sqlite3.Connection, r: Reply) -> bool:
            cur = conn.execute(
                "INSERT OR IGNORE INTO replies (id, message_id, session, idx, text, kind, channel, "
                "origin, created_at, delivery, markup) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    r.id,
                    message.id,
                    message.session,
                    r.index,
                    text,
                    kind,
                    message.origin.channel,
                    _origin_encode(message.origin),
                    time.time(),
                    PENDING if push else FETCHED,
                    r.markup,
                ),
            )
            return cur.rowcount > 0

        def op(conn: sqlite3.Connection) -> Reply | None:
            if insert(conn, reply):
                return reply
            if kind != ERROR:
                return None  # shown by an earlier run of the same turn
            # An error that ends a turn run again may land on an index an earlier run's
            # reply holds: unless it is the same error again, it goes after them all.
            row = conn.execute(
                "SELECT kind, text FROM replies WHERE id = ?", (reply.id,)
            ).fetchone()
            if row == (ERROR, text):
                return None
            (last,) = conn.execute(
                "SELECT max(idx) FROM replies WHERE message_id = ?", (message.id,)
            ).fetchone()
            moved = msgspec.structs.replace(
                reply, index=last + 1, id=reply_id(message.id, last + 1)
            )
            return moved if insert(conn, moved) else None

        return self._submit(op)

    async def replies_for_message(self, message_id: str) -> list[StoredReply]:
        def op(conn: sqlite3.Connection) -> list[StoredReply]:
            rows = conn.execute(
                f"SELECT {_REPLY_COLUMNS} FROM replies WHERE message_id = ? ORDER BY idx",
                (message_id,),
            ).fetchall()
            return [_stored_reply(r) for r in rows]

        return await self._submit(op)

    async def replies_after(
        self, session: str, channel: str, after: int, limit: int
    ) -> list[StoredReply]:
        def op(conn: sqlite3.Connection) -> list[StoredReply]:
            rows = conn.execute(
                f"SELECT {_REPLY_COLUMNS} FROM replies WHERE session = ? AND channel = ? "
                "AND cursor > ? ORDER BY cursor LIMIT ?",
                (session, channel, after, limit),
            ).fetchall()
            return [_stored_reply(r) for r in rows]

        return await self._submit(op)

    # ---- delivery

    async def due_deliveries(self, channel: str, now: float, limit: int) -> list[StoredReply]:
        """Replies to push to `channel` now, oldest first; a reply waits while an earlier
        one of the same session is still undelivered, so each chat sees them in order."""

        def op(conn: sqlite3.Connection) -> list[StoredReply]:
            rows = conn.execute(
                f"SELECT {_REPLY_COLUMNS} FROM replies r "
                "WHERE channel = ? AND delivery = 'pending' AND next_attempt_at <= ? "
                "AND NOT EXISTS (SELECT 1 FROM replies e "
                "WHERE e.session = r.session AND e.channel = r.channel "
                "AND e.delivery = 'pending' AND e.cursor < r.cursor) ORDER BY cursor LIMIT ?",
                (channel, now, limit),
            ).fetchall()
            return [_stored_reply(r) for r in rows]

        return await self._submit(op)

    async def next_due(self, channel: str) -> float | None:
        def op(conn: sqlite3.Connection) -> float | None:
            row = conn.execute(
                "SELECT min(next_attempt_at) FROM replies r "
                "WHERE channel = ? AND delivery = 'pending' "
                "AND NOT EXISTS (SELECT 1 FROM replies e "
                "WHERE e.session = r.session AND e.channel = r.channel "
                "AND e.delivery = 'pending' AND e.cursor < r.cursor)",
                (channel,),
            ).fetchone()
            return None if row[0] is None else float(row[0])

        return await self._submit(op)

    async def mark_delivery(
        self,
        reply_id: str,
        state: str,
        attempts: int,
        next_at: float = 0.0,
        error: str | None = None,
    ) -> None:
        def op(conn: sqlite3.Connection) -> None:
            conn.execute(
                "UPDATE replies SET delivery = ?, attempts = ?, next_attempt_at = ?, "
                "last_error = ? WHERE id = ?",
                (state, attempts, next_at, error, reply_id),
            )

        await self._submit(op)

    async def dead_letter_unrouted(self, channels: list[str]) -> int:
        """Dead-letter pending replies of channels no longer configured; how many."""

        def op(conn: sqlite3.Connection) -> int:
            marks = ",".join("?" * len(channels))
            cur = conn.execute(
                "UPDATE replies SET delivery = 'dead', last_error = 'channel not configured' "
                f"WHERE delivery = 'pending' AND channel NOT IN ({marks})",
                channels,
            )
            return cur.rowcount

        return await self._submit(op)

    # ---- operators' queries

    async def session_summaries(self, session: str | None = None) -> list[SessionSummary]:
        """Every session key the store knows (a message or a record), by key; or only
        `session` (empty if the store never saw it)."""
        where_m, where_s = "", ""
        args: tuple[str, ...] = ()
        if session is not None:
            where_m, where_s, args = "WHERE session = ?", "WHERE key = ?", (session,)

        def op(conn: sqlite3.Connection) -> list[SessionSummary]:
            rows = conn.execute(
                "SELECT k.key, coalesce(m.n, 0), m.last, coalesce(s.restarts, 0), s.last_exit, "
                "s.quarantined_until FROM "
                f"(SELECT session AS key FROM messages {where_m} "
                f"UNION SELECT key FROM sessions {where_s}) k "
                "LEFT JOIN (SELECT session, count(*) AS n, max(accepted_at) AS last "
                f"FROM messages {where_m} GROUP BY session) m ON m.session = k.key "
                "LEFT JOIN sessions s ON s.key = k.key ORDER BY k.key",
                args * 3,
            ).fetchall()
            return [_summary(r) for r in rows]

        return await self._submit(op)

    async def history(self, session: str, limit: int) -> list[HistoryItem]:
        """The session's last `limit` messages, oldest first, each with its replies."""

        def op(conn: sqlite3.Connection) -> list[HistoryItem]:
            rows = conn.execute(
                f"SELECT {_MESSAGE_COLUMNS}, accepted_at, finished_at FROM messages "
                "WHERE session = ? ORDER BY seq DESC LIMIT ?",
                (session, limit),
            ).fetchall()
            rows.reverse()
            ids = [r[1] for r in rows]
            by_message: dict[str, list[StoredReply]] = {i: [] for i in ids}
            if ids:
                marks = ",".join("?" * len(ids))
                for r in conn.execute(
                    f"SELECT {_REPLY_COLUMNS} FROM replies WHERE message_id IN ({marks}) "
                    "ORDER BY idx",
                    ids,
                ):
                    stored = _stored_reply(r)
                    by_message[stored.reply.in_reply_to].append(stored)
            return [
                HistoryItem(
                    message=_message(r[:7]),
                    accepted_at=r[7],
                    finished_at=r[8],
                    replies=by_message[r[1]],
                )
                for r in rows
            ]

        return await self._submit(op)

    async def dead_letters(self, limit: int) -> list[DeadLetter]:
        """Replies given up on, oldest first."""

        def op(conn: sqlite3.Connection) -> list[DeadLetter]:
            rows = conn.execute(
                f"SELECT {_DEAD_COLUMNS} FROM replies WHERE delivery = 'dead' "
                "ORDER BY cursor LIMIT ?",
                (limit,),
            ).fetchall()
            return [_dead_letter(r) for r in rows]

        return await self._submit(op)

    async def retry_dead_letters(
        self, ids: list[str] | None, channels: list[str]
    ) -> list[StoredReply]:
        """Put dead-lettered replies of `channels` (those in `ids`, or every one with
        None) back into delivery, due now with fresh attempts; the replies put back,
        oldest first. Replies that are not dead, or not of `channels`, are left alone."""

        def op(conn: sqlite3.Connection) -> list[StoredReply]:
            if not channels or ids == []:
                return []
            chosen = "" if ids is None else f"AND id IN ({','.join('?' * len(ids))})"
            rows = conn.execute(
                "UPDATE replies SET delivery = 'pending', attempts = 0, next_attempt_at = 0, "
                f"last_error = NULL, retried_at = ? WHERE delivery = 'dead' "
                f"AND channel IN ({','.join('?' * len(channels))}) {chosen} "
                f"RETURNING {_REPLY_COLUMNS}",
                [time.time(), *channels, *(ids or [])],
            ).fetchall()
            return sorted((_stored_reply(r) for r in rows), key=_by_cursor)

        return await self._submit(op)
