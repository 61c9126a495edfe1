"""Durable state: the inbox, the outbox, session records.

SQLite in WAL mode, used from one dedicated thread that commits in groups: every
operation queued while a commit is in flight goes into the next transaction, so
a burst of accepts costs one fsync. The event loop only awaits futures.

The interface is small on purpose (accept, start, finish, add_reply, queries) so a
store on another database can take its place.
"""

from __future__ import annotations

import contextlib
import logging
import sqlite3
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from corral.protocol.types import ERROR, Origin
from corral.supervisor.store_delivery import DeliveryOps
from corral.supervisor.store_rows import (
    DEAD,
    DELIVERED,
    DONE,
    FAILED,
    FETCHED,
    PENDING,
    Accepted,
    DeadLetter,
    HistoryItem,
    Inbound,
    Message,
    SessionRecord,
    SessionSummary,
    StoredReply,
    _message,
    _origin_encode,
)
from corral.supervisor.storethread import Result, StoreClosed, StoreThread

log = logging.getLogger("corral.store")
T = TypeVar("T")
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


class Store(StoreThread[sqlite3.Connection], DeliveryOps):
    def __init__(self, path: Path, durable: bool = True) -> None:
        super().__init__()
        self.path = path
        self.durable = durable

    # ---- the engine's connection

    def _connect(self) -> sqlite3.Connection:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute(f"PRAGMA synchronous={'FULL' if self.durable else 'OFF'}")
            conn.execute("PRAGMA busy_timeout=5000")
            conn.executescript(_SCHEMA)
        except BaseException:
            conn.close()
            raise
        return conn

    def _failed(self, conn: sqlite3.Connection, error: Exception) -> BaseException:
        if conn.in_transaction:
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
        return error

    def _commit_group(
        self, conn: sqlite3.Connection, ops: list[tuple[Callable[[sqlite3.Connection], Any], Any]]
    ) -> list[Result]:
        """Run `ops` in one transaction, each in a savepoint of its own; one commit.

        First without the savepoints, since operations rarely fail: three statements
        fewer per operation, each a release and a retake of the GIL the loop needs. If
        one fails, the group is rolled back and run again, each in its savepoint, so it
        fails alone (operations only read and write the database: running one twice
        in a transaction rolled back between is running it once)."""
        conn.execute("BEGIN IMMEDIATE")
        try:
            results: list[Result] = [(fut, fn(conn), None) for fn, fut in ops]
        except Exception:
            conn.execute("ROLLBACK")
        else:
            conn.execute("COMMIT")
            return results
        results = []
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

    # ---- inbox

    async def accept(
        self,
        session: str,
        text: str,
        origin: Origin,
        client_id: str | None,
        start: bool = False,
    ) -> Accepted:
        """Store a message durably; the same client id twice returns the first one.

        `start`: the message's turn is about to run, so its first start is counted in the
        same transaction (one commit instead of two; a duplicate is not counted)."""
        message_id = client_id or uuid.uuid4().hex

        def op(conn: sqlite3.Connection) -> Accepted:
            # insert first, one statement in the common case; a known id inserts nothing
            inserted = conn.execute(
                "INSERT INTO messages (id, session, text, origin, accepted_at, attempts) "
                "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (id) DO NOTHING RETURNING seq",
                (message_id, session, text, _origin_encode(origin), time.time(), int(start)),
            ).fetchone()
            if inserted is None:
                row = conn.execute(
                    "SELECT seq, id, session, text, origin, attempts, state FROM messages "
                    "WHERE id = ?",
                    (message_id,),
                ).fetchone()
                return Accepted(_message(row), True)
            (seq,) = inserted
            message = Message(
                id=message_id,
                session=session,
                text=text,
                origin=origin,
                seq=seq,
                attempts=int(start),
            )
            return Accepted(message, False)

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
    "SessionRecord",
    "SessionSummary",
    "Store",
    "StoreClosed",
    "StoredReply",
]
