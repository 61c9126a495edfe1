"""The PostgreSQL store's outbox, delivery and operators' queries (a part of `PgStore`)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

import msgspec
import psycopg

from corral.protocol.types import ERROR, Reply, reply_id
from corral.supervisor.store_pg_cluster import LEASE_OF_SESSION, NOTIFY_CHANNEL, REPLY_HINT
from corral.supervisor.store_pg_rows import (
    _diagnostic,
)
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

# In a cluster, a node delivers the replies of the sessions it holds and of those no
# live node holds (an orphaned reply of an idle session); never another owner's.
OURS = (
    "AND NOT EXISTS (SELECT 1 FROM corral.leases l WHERE l.session = r.session "
    "AND l.node IS NOT NULL AND l.node <> %s AND l.expires_at > now())"
)


class PgDeliveryOps:
    node: str | None
    if TYPE_CHECKING:

        def _check_epoch(self, session: str, found: int | None) -> None: ...

        def _submit(self, fn: Callable[[psycopg.Connection[Any]], T]) -> asyncio.Future[T]: ...

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
        kind = str(kind)
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
        origin = _origin_encode(message.origin).decode()

        # the replies long-poll on every node is woken by a hint; pushed replies need none
        hint = "pg_notify(%s, %s)" if not push else "NULL, NULL"
        hint_args = (NOTIFY_CHANNEL, f"{REPLY_HINT} {message.origin.channel}\t{message.session}")

        def insert(conn: psycopg.Connection[Any], r: Reply) -> bool:
            # one statement: the lease as it is (FOR SHARE), the reply, the hint
            row = conn.execute(
                f"WITH {LEASE_OF_SESSION}, ins AS (INSERT INTO corral.replies (id, message_id, "
                "session, idx, text, kind, channel, origin, created_at, delivery, markup) "
                "VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s) "
                "ON CONFLICT (id) DO NOTHING RETURNING 1) "
                f"SELECT (SELECT epoch FROM f), (SELECT count(*) FROM ins), {hint}",
                (
                    message.session,
                    self.node or "",
                    r.id,
                    message.id,
                    message.session,
                    r.index,
                    text.encode(),
                    kind,
                    message.origin.channel,
                    origin,
                    time.time(),
                    PENDING if push else FETCHED,
                    r.markup,
                    *hint_args[: 0 if push else 2],
                ),
            ).fetchone()
            assert row is not None
            self._check_epoch(message.session, row[0])  # fenced: the savepoint takes it back
            return int(row[1]) > 0

        def op(conn: psycopg.Connection[Any]) -> Reply | None:
            if insert(conn, reply):
                return reply
            if kind != ERROR:
                return None  # shown by an earlier run of the same turn
            # An error that ends a turn run again may land on an index an earlier run's
            # reply holds: unless it is the same error again, it goes after them all.
            row = conn.execute(
                "SELECT kind, text FROM corral.replies WHERE id = %s", (reply.id,)
            ).fetchone()
            if row is not None and (row[0], bytes(row[1]).decode()) == (ERROR, text):
                return None
            (last,) = conn.execute(
                "SELECT max(idx) FROM corral.replies WHERE message_id = %s", (message.id,)
            ).fetchone() or (index,)
            moved = msgspec.structs.replace(
                reply, index=last + 1, id=reply_id(message.id, last + 1)
            )
            return moved if insert(conn, moved) else None

        return self._submit(op)

    async def replies_for_message(self, message_id: str) -> list[StoredReply]:
        def op(conn: psycopg.Connection[Any]) -> list[StoredReply]:
            rows = conn.execute(
                f"SELECT {_REPLY_COLUMNS} FROM corral.replies WHERE message_id = %s ORDER BY idx",
                (message_id,),
            ).fetchall()
            return [_stored_reply(r) for r in rows]

        return await self._submit(op)

    async def replies_after(
        self, session: str, channel: str, after: int, limit: int
    ) -> list[StoredReply]:
        def op(conn: psycopg.Connection[Any]) -> list[StoredReply]:
            rows = conn.execute(
                f"SELECT {_REPLY_COLUMNS} FROM corral.replies WHERE session = %s "
                "AND channel = %s AND cursor > %s ORDER BY cursor LIMIT %s",
                (session, channel, after, limit),
            ).fetchall()
            return [_stored_reply(r) for r in rows]

        return await self._submit(op)

    # ---- delivery

    async def due_deliveries(self, channel: str, now: float, limit: int) -> list[StoredReply]:
        """Replies to push to `channel` now, oldest first; a reply waits while an earlier
        one of the same session is still undelivered, so each chat sees them in order."""

        def op(conn: psycopg.Connection[Any]) -> list[StoredReply]:
            rows = conn.execute(
                f"SELECT {_REPLY_COLUMNS} FROM corral.replies r "
                "WHERE channel = %s AND delivery = 'pending' AND next_attempt_at <= %s "
                "AND NOT EXISTS (SELECT 1 FROM corral.replies e "
                "WHERE e.session = r.session AND e.channel = r.channel "
                f"AND e.delivery = 'pending' AND e.cursor < r.cursor) {OURS} "
                "ORDER BY cursor LIMIT %s",
                (channel, now, self.node or "", limit),
            ).fetchall()
            return [_stored_reply(r) for r in rows]

        return await self._submit(op)

    async def next_due(self, channel: str) -> float | None:
        def op(conn: psycopg.Connection[Any]) -> float | None:
            row = conn.execute(
                "SELECT min(next_attempt_at) FROM corral.replies r "
                "WHERE channel = %s AND delivery = 'pending' "
                "AND NOT EXISTS (SELECT 1 FROM corral.replies e "
                "WHERE e.session = r.session AND e.channel = r.channel "
                f"AND e.delivery = 'pending' AND e.cursor < r.cursor) {OURS}",
                (channel, self.node or ""),
            ).fetchone()
            return None if row is None or row[0] is None else float(row[0])

        return await self._submit(op)

    async def mark_delivery(
        self,
        reply_id: str,
        state: str,
        attempts: int,
        next_at: float = 0.0,
        error: str | None = None,
    ) -> None:
        def op(conn: psycopg.Connection[Any]) -> None:
            conn.execute(
                "UPDATE corral.replies SET delivery = %s, attempts = %s, next_attempt_at = %s, "
                "last_error = %s WHERE id = %s",
                (str(state), attempts, next_at, _diagnostic(error), reply_id),
            )

        await self._submit(op)

    async def dead_letter_unrouted(self, channels: list[str]) -> int:
        """Dead-letter pending replies of channels no longer configured; how many."""

        def op(conn: psycopg.Connection[Any]) -> int:
            cur = conn.execute(
                "UPDATE corral.replies r SET delivery = 'dead', "
                "last_error = 'channel not configured' "
                f"WHERE delivery = 'pending' AND channel <> ALL(%s::text[]) {OURS}",
                (list(channels), self.node or ""),
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
            where_m, where_s, args = "WHERE session = %s", "WHERE key = %s", (session,)

        def op(conn: psycopg.Connection[Any]) -> list[SessionSummary]:
            rows = conn.execute(
                "SELECT k.key, coalesce(m.n, 0), m.last, coalesce(s.restarts, 0), s.last_exit, "
                "s.quarantined_until FROM "
                f"(SELECT session AS key FROM corral.messages {where_m} "
                f"UNION SELECT key FROM corral.sessions {where_s}) k "
                "LEFT JOIN (SELECT session, count(*) AS n, max(accepted_at) AS last "
                f"FROM corral.messages {where_m} GROUP BY session) m ON m.session = k.key "
                'LEFT JOIN corral.sessions s ON s.key = k.key ORDER BY k.key COLLATE "C"',
                args * 3,
            ).fetchall()
            return [_summary(r) for r in rows]

        return await self._submit(op)

    async def history(self, session: str, limit: int) -> list[HistoryItem]:
        """The session's last `limit` messages, oldest first, each with its replies."""

        def op(conn: psycopg.Connection[Any]) -> list[HistoryItem]:
            rows = conn.execute(
                f"SELECT {_MESSAGE_COLUMNS}, accepted_at, finished_at FROM corral.messages "
                "WHERE session = %s ORDER BY seq DESC LIMIT %s",
                (session, limit),
            ).fetchall()
            rows.reverse()
            ids = [r[1] for r in rows]
            by_message: dict[str, list[StoredReply]] = {i: [] for i in ids}
            if ids:
                for r in conn.execute(
                    f"SELECT {_REPLY_COLUMNS} FROM corral.replies "
                    "WHERE message_id = ANY(%s::text[]) ORDER BY idx",
                    (ids,),
                ).fetchall():
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

        def op(conn: psycopg.Connection[Any]) -> list[DeadLetter]:
            rows = conn.execute(
                f"SELECT {_DEAD_COLUMNS} FROM corral.replies WHERE delivery = 'dead' "
                "ORDER BY cursor LIMIT %s",
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

        def op(conn: psycopg.Connection[Any]) -> list[StoredReply]:
            if not channels or ids == []:
                return []
            chosen = "" if ids is None else "AND id = ANY(%s::text[])"
            params: list[Any] = [time.time(), list(channels)]
            params += [] if ids is None else [list(ids)]
            rows = conn.execute(
                "UPDATE corral.replies SET delivery = 'pending', attempts = 0, "
                "next_attempt_at = 0, last_error = NULL, retried_at = %s WHERE delivery = 'dead' "
                f"AND channel = ANY(%s::text[]) {chosen} RETURNING {_REPLY_COLUMNS}",
                params,
            ).fetchall()
            return sorted((_stored_reply(r) for r in rows), key=_by_cursor)

        return await self._submit(op)
