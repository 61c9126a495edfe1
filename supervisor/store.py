"""Durable state: the inbox, the outbox, session records.

SQLite in WAL mode, used from one dedicated thread that commits in groups: every
operation queued while a commit is in flight goes into the next transaction, so
a burst of accepts costs one fsync. The event loop only awaits futures.

The interface is small on purpose (accept, start, finish, add_reply, queries) so a
store on another database can take its place.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import msgspec

from corral.protocol.types import ERROR, Origin, Reply, reply_id

log = logging.getLogger("corral.store")
T = TypeVar("T")

PENDING = "pending"
DONE = "done"
FAILED = "error"
# delivery states of a reply
DELIVERED = "delivered"
DEAD = "dead"
FETCHED = "fetched"  # not pushed: the client fetches it (HTTP channel)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS messages (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    session TEXT NOT NULL,
    text TEXT NOT NULL,
    origin BLOB NOT NULL,
    accepted_at REAL NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    state TEXT NOT NULL DEFAULT 'pending',
    finished_at REAL
);
CREATE INDEX IF NOT EXISTS messages_pending ON messages (state, seq);
CREATE INDEX IF NOT EXISTS messages_by_session ON messages (session, seq);
CREATE TABLE IF NOT EXISTS replies (
    cursor INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    message_id TEXT NOT NULL,
    session TEXT NOT NULL,
    idx INTEGER NOT NULL,
    text TEXT NOT NULL,
    kind TEXT NOT NULL,
    channel TEXT NOT NULL,
    origin BLOB NOT NULL,
    created_at REAL NOT NULL,
    delivery TEXT NOT NULL DEFAULT 'pending',
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt_at REAL NOT NULL DEFAULT 0,
    last_error TEXT
);
CREATE INDEX IF NOT EXISTS replies_by_session ON replies (session, channel, cursor);
CREATE INDEX IF NOT EXISTS replies_by_message ON replies (message_id, idx);
CREATE INDEX IF NOT EXISTS replies_undelivered ON replies (delivery, next_attempt_at);
CREATE TABLE IF NOT EXISTS sessions (
    key TEXT PRIMARY KEY,
    quarantined_until REAL,
    restarts INTEGER NOT NULL DEFAULT 0,  -- workers that ended abnormally, all time
    last_exit TEXT
);
-- polling channels (Telegram): where to resume, committed with the messages it covers
CREATE TABLE IF NOT EXISTS channel_offsets (
    name TEXT PRIMARY KEY,
    next_offset INTEGER NOT NULL
);
-- a reply sent in parts (Telegram's 4096 limit): how many parts went out already
CREATE TABLE IF NOT EXISTS reply_parts (
    reply_id TEXT PRIMARY KEY,
    sent INTEGER NOT NULL
);
"""

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


class StoreClosed(Exception):
    pass


_STOP = object()


class Store:
    def __init__(self, path: Path, durable: bool = True) -> None:
        self.path = path
        self.durable = durable
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closed: asyncio.Future[None] | None = None

    # ---- lifecycle

    async def open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._loop = asyncio.get_running_loop()
        self._closed = self._loop.create_future()
        ready: asyncio.Future[None] = self._loop.create_future()
        self._thread = threading.Thread(
            target=self._run, args=(ready,), name="corral-store", daemon=True
        )
        self._thread.start()
        await ready

    async def close(self, timeout: float = 10.0) -> None:
        if self._thread is None or self._closed is None:
            return
        self._queue.put(_STOP)
        try:
            async with asyncio.timeout(timeout):
                await self._closed
        except TimeoutError:
            log.error("store thread did not finish within %.0fs", timeout)
        self._thread = None

    def _run(self, ready: asyncio.Future[None]) -> None:
        assert self._loop is not None
        try:
            conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute(f"PRAGMA synchronous={'FULL' if self.durable else 'OFF'}")
            conn.execute("PRAGMA busy_timeout=5000")
            conn.executescript(_SCHEMA)
        except Exception as e:
            self._loop.call_soon_threadsafe(_settle, ready, None, e)
            return
        self._loop.call_soon_threadsafe(_settle, ready, None, None)
        stopping = False
        while not stopping:  # ends at the _STOP sentinel from close()
            batch = [self._queue.get()]
            while len(batch) < 512:
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            stopping = _STOP in batch
            ops = [item for item in batch if item is not _STOP]
            try:
                results = self._commit_group(conn, ops)
            except Exception as e:
                # A failed group (disk full, I/O error) fails its operations, not the
                # store: the thread goes on, and callers see the error.
                log.error("store: a group of %d operations failed: %s", len(ops), e)
                if conn.in_transaction:
                    with contextlib.suppress(sqlite3.Error):
                        conn.execute("ROLLBACK")
                results = [(fut, None, e) for _, fut in ops]
            # one wake-up of the loop for the whole group, not one per operation
            self._loop.call_soon_threadsafe(_settle_all, results)
        conn.close()
        if self._closed is not None:
            self._loop.call_soon_threadsafe(_settle, self._closed, None, None)

    @staticmethod
    def _commit_group(
        conn: sqlite3.Connection, ops: list[tuple[Callable[[sqlite3.Connection], Any], Any]]
    ) -> list[tuple[asyncio.Future[Any], Any, BaseException | None]]:
        """Run `ops` in one transaction, each in a savepoint of its own; one commit."""
        results: list[tuple[asyncio.Future[Any], Any, BaseException | None]] = []
        conn.execute("BEGIN IMMEDIATE")
        for fn, fut in ops:
            conn.execute("SAVEPOINT op")
            try:
                results.append((fut, fn(conn), None))
                conn.execute("RELEASE op")
            except Exception as e:
                conn.execute("ROLLBACK TO op")
                conn.execute("RELEASE op")
                results.append((fut, None, e))
        conn.execute("COMMIT")
        return results

    def _submit(self, fn: Callable[[sqlite3.Connection], T]) -> asyncio.Future[T]:
        if self._thread is None or self._loop is None or not self._thread.is_alive():
            raise StoreClosed("the store is closed")
        fut: asyncio.Future[T] = self._loop.create_future()
        self._queue.put((fn, fut))
        return fut

    # ---- inbox

    async def accept(
        self, session: str, text: str, origin: Origin, client_id: str | None
    ) -> Accepted:
        """Store a message durably; the same client id twice returns the first one."""
        message_id = client_id or uuid.uuid4().hex

        def op(conn: sqlite3.Connection) -> Accepted:
            row = conn.execute(
                "SELECT seq, id, session, text, origin, attempts, state FROM messages WHERE id = ?",
                (message_id,),
            ).fetchone()
            if row is not None:
                return Accepted(_message(row), True)
            cur = conn.execute(
                "INSERT INTO messages (id, session, text, origin, accepted_at) "
                "VALUES (?, ?, ?, ?, ?)",
                (message_id, session, text, _origin_encode(origin), time.time()),
            )
            seq = cur.lastrowid
            assert seq is not None
            return Accepted(
                Message(id=message_id, session=session, text=text, origin=origin, seq=seq), False
            )

        return await self._submit(op)

    async def pending(self) -> list[Message]:
        """Every message whose turn has not ended, in the order accepted."""

        def op(conn: sqlite3.Connection) -> list[Message]:
            rows = conn.execute(
                "SELECT seq, id, session, text, origin, attempts, state FROM messages "
                "WHERE state = 'pending' ORDER BY seq"
            ).fetchall()
            return [_message(r) for r in rows]

        return await self._submit(op)

    async def start_attempt(self, message_id: str) -> int:
        """Count a start of the message's turn, durably, before it runs; the new count."""

        def op(conn: sqlite3.Connection) -> int:
            row = conn.execute(
                "UPDATE messages SET attempts = attempts + 1 WHERE id = ? RETURNING attempts",
                (message_id,),
            ).fetchone()
            return int(row[0])

        return await self._submit(op)

    async def start_attempt_undone(self, message_id: str) -> None:
        """Take back a start the supervisor itself interrupted (drain): not the message's fault."""

        def op(conn: sqlite3.Connection) -> None:
            conn.execute(
                "UPDATE messages SET attempts = max(attempts - 1, 0) WHERE id = ?", (message_id,)
            )

        await self._submit(op)

    async def finish(self, message_id: str, state: str) -> None:
        def op(conn: sqlite3.Connection) -> None:
            conn.execute(
                "UPDATE messages SET state = ?, finished_at = ? WHERE id = ?",
                (state, time.time(), message_id),
            )

        await self._submit(op)

    # ---- outbox

    def add_reply(
        self, message: Message, index: int, text: str, kind: str, push: bool = False
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
        )

        def insert(conn: sqlite3.Connection, r: Reply) -> bool:
            cur = conn.execute(
                "INSERT OR IGNORE INTO replies (id, message_id, session, idx, text, kind, channel, "
                "origin, created_at, delivery) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
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

    # ---- polling channels

    async def accept_batch(
        self, cursor: str, next_offset: int, inbound: Sequence[Inbound]
    ) -> list[Accepted]:
        """Store `inbound` and set channel cursor `cursor` to `next_offset`, atomically.

        Both are written in one transaction, so after a crash at any moment the stored
        offset never runs ahead of the stored messages: what the platform is asked
        for next is exactly what was not yet accepted. A message whose id exists is
        not stored again (Accepted.duplicate), in the order given.
        """

        def op(conn: sqlite3.Connection) -> list[Accepted]:
            now = time.time()
            out = []
            for m in inbound:
                row = conn.execute(
                    "SELECT seq, id, session, text, origin, attempts, state FROM messages "
                    "WHERE id = ?",
                    (m.id,),
                ).fetchone()
                if row is not None:
                    out.append(Accepted(_message(row), True))
                    continue
                cur = conn.execute(
                    "INSERT INTO messages (id, session, text, origin, accepted_at) "
                    "VALUES (?, ?, ?, ?, ?)",
                    (m.id, m.session, m.text, _origin_encode(m.origin), now),
                )
                assert cur.lastrowid is not None
                message = Message(
                    id=m.id, session=m.session, text=m.text, origin=m.origin, seq=cur.lastrowid
                )
                out.append(Accepted(message, False))
            conn.execute(
                "INSERT INTO channel_offsets (name, next_offset) VALUES (?, ?) "
                "ON CONFLICT (name) DO UPDATE SET next_offset = excluded.next_offset",
                (cursor, next_offset),
            )
            return out

        return await self._submit(op)

    async def channel_offset(self, cursor: str) -> int | None:
        """The offset `accept_batch` last committed for `cursor`; None before the first."""

        def op(conn: sqlite3.Connection) -> int | None:
            row = conn.execute(
                "SELECT next_offset FROM channel_offsets WHERE name = ?", (cursor,)
            ).fetchone()
            return None if row is None else int(row[0])

        return await self._submit(op)

    async def reply_parts_sent(self, reply_id: str) -> int:
        """How many parts of a reply sent in parts are delivered already (0 if none)."""

        def op(conn: sqlite3.Connection) -> int:
            row = conn.execute(
                "SELECT sent FROM reply_parts WHERE reply_id = ?", (reply_id,)
            ).fetchone()
            return 0 if row is None else int(row[0])

        return await self._submit(op)

    async def set_reply_parts_sent(self, reply_id: str, sent: int) -> None:
        """Record that the first `sent` parts of a reply are delivered; 0 forgets it."""

        def op(conn: sqlite3.Connection) -> None:
            if sent <= 0:
                conn.execute("DELETE FROM reply_parts WHERE reply_id = ?", (reply_id,))
                return
            conn.execute(
                "INSERT INTO reply_parts (reply_id, sent) VALUES (?, ?) "
                "ON CONFLICT (reply_id) DO UPDATE SET sent = excluded.sent",
                (reply_id, sent),
            )

        await self._submit(op)

    # ---- sessions

    async def set_quarantine(self, session: str, until: float | None) -> None:
        def op(conn: sqlite3.Connection) -> None:
            if until is None:
                conn.execute(
                    "UPDATE sessions SET quarantined_until = NULL WHERE key = ?", (session,)
                )
            else:
                conn.execute(
                    "INSERT INTO sessions (key, quarantined_until) VALUES (?, ?) "
                    "ON CONFLICT (key) DO UPDATE "
                    "SET quarantined_until = excluded.quarantined_until",
                    (session, until),
                )

        await self._submit(op)

    async def record_abnormal_exit(self, session: str, reason: str) -> None:
        def op(conn: sqlite3.Connection) -> None:
            conn.execute(
                "INSERT INTO sessions (key, restarts, last_exit) VALUES (?, 1, ?) "
                "ON CONFLICT (key) DO UPDATE "
                "SET restarts = restarts + 1, last_exit = excluded.last_exit",
                (session, reason),
            )

        await self._submit(op)

    async def session_records(self) -> dict[str, SessionRecord]:
        """Every session that ever had a worker end abnormally or was quarantined."""

        def op(conn: sqlite3.Connection) -> dict[str, SessionRecord]:
            rows = conn.execute(
                "SELECT key, quarantined_until, restarts, last_exit FROM sessions"
            ).fetchall()
            return {
                k: SessionRecord(quarantined_until=q, restarts=r, last_exit=e)
                for k, q, r, e in rows
            }

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
                f"last_error = NULL WHERE delivery = 'dead' "
                f"AND channel IN ({','.join('?' * len(channels))}) {chosen} "
                f"RETURNING {_REPLY_COLUMNS}",
                [*channels, *(ids or [])],
            ).fetchall()
            return sorted((_stored_reply(r) for r in rows), key=_by_cursor)

        return await self._submit(op)


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
        messages=n,
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
        text=text,
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
        text=text,
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
        text=text,
        kind=kind,
        origin=_origin_decode(origin),
    )
    return StoredReply(
        reply=reply, cursor=cursor, delivery=delivery, attempts=attempts, created_at=created
    )


def _settle_all(results: list[tuple[asyncio.Future[Any], Any, BaseException | None]]) -> None:
    for fut, value, error in results:
        _settle(fut, value, error)


def _settle(fut: asyncio.Future[Any], value: Any, error: BaseException | None) -> None:
    if fut.done():
        return
    if error is not None:
        fut.set_exception(error)
    else:
        fut.set_result(value)


__all__ = [
    "DEAD",
    "DELIVERED",
    "DONE",
    "ERROR",
    "FAILED",
    "FETCHED",
    "PENDING",
    "Accepted",
    "DeadLetter",
    "HistoryItem",
    "Inbound",
    "Message",
    "SessionSummary",
    "Store",
    "StoredReply",
]
