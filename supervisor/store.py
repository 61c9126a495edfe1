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
import os
import sqlite3
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from corral.protocol.types import ERROR, Origin, reply_id
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
    new_message_id,
)
from corral.supervisor.storethread import (
    ExpectedReply,
    RepliesNotStored,
    Result,
    StoreBroken,
    StoreClosed,
    StoreError,
    StoreThread,
    StoreUnavailable,
)

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
-- Partial indexes hold only the rows their queries look for (pending messages, ended
-- ones, replies waiting for delivery or dead): an HTTP reply, never delivered, enters
-- none, and a message's accept writes no entry its finish must move. Their full
-- predecessors are dropped (a database an older corral wrote).
DROP INDEX IF EXISTS messages_pending;
DROP INDEX IF EXISTS messages_finished;
DROP INDEX IF EXISTS replies_undelivered;
CREATE INDEX IF NOT EXISTS messages_waiting ON messages (seq) WHERE state = 'pending';
CREATE INDEX IF NOT EXISTS messages_by_session ON messages (session, seq);
CREATE INDEX IF NOT EXISTS messages_ended ON messages (finished_at) WHERE finished_at IS NOT NULL;
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
    last_error TEXT,
    retried_at REAL,  -- the last `corral dead-letters retry`: max_age counts from it
    markup TEXT NOT NULL DEFAULT ''  -- "", "html", "markdown": as the agent asked it shown
);
CREATE INDEX IF NOT EXISTS replies_by_session ON replies (session, channel, cursor);
CREATE INDEX IF NOT EXISTS replies_by_message ON replies (message_id, idx);
CREATE INDEX IF NOT EXISTS replies_to_deliver ON replies (channel, next_attempt_at)
    WHERE delivery = 'pending';
CREATE INDEX IF NOT EXISTS replies_dead ON replies (cursor) WHERE delivery = 'dead';
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
# SQLite's primary result codes (the low byte of an extended code)
_IOERR, _CORRUPT, _FULL, _NOTADB = 10, 11, 13, 26
_READONLY_DBMOVED = 8 | (4 << 8)  # the database file was renamed or deleted since opened
WAL_LIMIT = 4 * 1024 * 1024  # bytes
PRIVATE = 0o600  # the database and its -wal and -shm: every message ever accepted


# columns added since the first schema: (table, column, declaration), for older files
_ADDED_COLUMNS = [
    ("replies", "retried_at", "REAL"),
    ("replies", "markup", "TEXT NOT NULL DEFAULT ''"),  # how the agent asked it shown
]


def _add_missing_columns(conn: sqlite3.Connection) -> None:
    for table, column, declaration in _ADDED_COLUMNS:
        have = {row[1] for row in conn.execute(f"PRAGMA table_info({table})")}
        if column not in have:
            conn.execute(f"ALTER TABLE {table} ADD COLUMN {column} {declaration}")


class Store(StoreThread[sqlite3.Connection], DeliveryOps):
    def __init__(self, path: Path, durable: bool = True) -> None:
        super().__init__()
        self.path = path
        self.durable = durable
        self._identity: tuple[int, int] | None = None  # (st_dev, st_ino) of the file opened
        self._changes = 0  # the connection's total_changes when the last group began

    # ---- the engine's connection

    def _connect(self) -> sqlite3.Connection:
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        # created private, and made private if an older corral left it wider; SQLite
        # gives the -wal and -shm files the database file's mode
        os.close(os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, PRIVATE))
        try:
            conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        except sqlite3.Error as e:
            raise StoreError(f"cannot open the database {self.path}: {e}") from None
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute(f"PRAGMA synchronous={'FULL' if self.durable else 'OFF'}")
            conn.execute("PRAGMA busy_timeout=5000")
            # a large group (a burst, a retention batch) grows the WAL; after the next
            # checkpoint it is cut back to this, so the files level off under steady load
            conn.execute(f"PRAGMA journal_size_limit={WAL_LIMIT}")
            (check,) = conn.execute("PRAGMA quick_check(1)").fetchone()
            if check != "ok":
                raise sqlite3.DatabaseError(check)
            conn.executescript(_SCHEMA)
            _add_missing_columns(conn)
            for suffix in ("", "-wal", "-shm"):
                with contextlib.suppress(FileNotFoundError):
                    os.chmod(f"{self.path}{suffix}", PRIVATE)
            st = os.stat(self.path)
        except sqlite3.DatabaseError as e:
            conn.close()
            raise StoreError(self._unusable(e)) from None
        except BaseException:
            conn.close()
            raise
        self._identity = (st.st_dev, st.st_ino)
        return conn

    def _unusable(self, e: sqlite3.Error) -> str:
        code = getattr(e, "sqlite_errorcode", None)
        if code is not None and code & 0xFF not in (_CORRUPT, _NOTADB):
            return f"cannot open the database {self.path}: {e}"
        return (
            f"the database {self.path} is corrupted ({e}): with corral stopped, move it and "
            f"its -wal and -shm files aside (mv {self.path} {self.path}.broken) to start with "
            "an empty inbox, or restore it from a backup; `sqlite3 FILE .recover` may save "
            "the messages in it"
        )

    def _lost(self) -> str | None:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return f"the database {self.path} was deleted while serving"
        except OSError as e:
            return f"the database {self.path} cannot be checked: {e}"
        if self._identity is not None and (st.st_dev, st.st_ino) != self._identity:
            return f"the database {self.path} was replaced by another file while serving"
        return None

    def _classify(self, error: BaseException) -> BaseException:
        if not isinstance(error, sqlite3.Error):
            return error
        code = getattr(error, "sqlite_errorcode", None) or 0
        if code == _READONLY_DBMOVED:
            return StoreBroken(f"the database {self.path} was moved or deleted while serving")
        if code & 0xFF in (_CORRUPT, _NOTADB):
            return StoreBroken(f"the database {self.path} is corrupted: {error}")
        if code & 0xFF in (_FULL, _IOERR):
            return StoreUnavailable(f"the database {self.path} cannot be written: {error}")
        return error

    def _wrote(self, conn: sqlite3.Connection) -> bool:
        return conn.total_changes > self._changes

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
        self._changes = conn.total_changes
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
        message_id = client_id or new_message_id()

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

    async def message(self, message_id: str) -> Message | None:
        """The message stored under this id, if any (a retried id's first)."""

        def op(conn: sqlite3.Connection) -> Message | None:
            row = conn.execute(
                "SELECT seq, id, session, text, origin, attempts, state FROM messages WHERE id = ?",
                (message_id,),
            ).fetchone()
            return None if row is None else _message(row)

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

    async def finish(
        self, message_id: str, state: str, replies: Sequence[ExpectedReply] = ()
    ) -> None:
        """The message's turn ended with `state`. `replies`: those submitted before this
        finish, not known to be stored yet; unless every one is stored when the finish
        runs (committed earlier, or in the same transaction), it raises RepliesNotStored
        and stores nothing, so a turn's replies and its end can commit together."""
        plain = [reply_id(message_id, i) for i, kind, _ in replies if kind != ERROR]
        errors = [text for _, kind, text in replies if kind == ERROR]

        def op(conn: sqlite3.Connection) -> None:
            if not plain:
                conn.execute(
                    "UPDATE messages SET state = ?, finished_at = ? WHERE id = ?",
                    (state, time.time(), message_id),
                )
            else:  # one statement: the finish and the count of its replies stored
                row = conn.execute(
                    "UPDATE messages SET state = ?, finished_at = ? WHERE id = ? RETURNING "
                    f"(SELECT count(*) FROM replies WHERE id IN ({','.join('?' * len(plain))}))",
                    (state, time.time(), message_id, *plain),
                ).fetchone()
                if row is not None and row[0] != len(plain):
                    raise RepliesNotStored(f"message {message_id}: a reply is not stored")
            for text in errors:
                if not conn.execute(
                    "SELECT 1 FROM replies WHERE message_id = ? AND kind = ? AND text = ?",
                    (message_id, ERROR, text),
                ).fetchone():
                    raise RepliesNotStored(f"message {message_id}: its error is not stored")

        await self._submit(op)

    async def prune(self, before: float, limit: int) -> int:
        """Delete up to `limit` finished messages that finished before `before` and whose
        replies are all settled (delivered, fetched or dead), with those replies; how many."""

        def op(conn: sqlite3.Connection) -> int:
            ids = [
                r[0]
                for r in conn.execute(
                    "SELECT id FROM messages m WHERE finished_at < ? AND state <> 'pending' "
                    "AND NOT EXISTS (SELECT 1 FROM replies r WHERE r.message_id = m.id "
                    "AND r.delivery = 'pending') ORDER BY finished_at LIMIT ?",
                    (before, limit),
                )
            ]
            if ids:
                marks = ",".join("?" * len(ids))
                conn.execute(
                    "DELETE FROM reply_parts WHERE reply_id IN "
                    f"(SELECT id FROM replies WHERE message_id IN ({marks}))",
                    ids,
                )
                conn.execute(f"DELETE FROM replies WHERE message_id IN ({marks})", ids)
                conn.execute(f"DELETE FROM messages WHERE id IN ({marks})", ids)
            return len(ids)

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
    "StoreBroken",
    "StoreClosed",
    "StoreError",
    "StoreUnavailable",
    "StoredReply",
]
