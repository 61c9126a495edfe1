"""Durable state on PostgreSQL: the same interface and semantics as the SQLite `Store`.

Like the SQLite store it runs on one dedicated thread with one synchronous psycopg
connection and commits in groups: every operation queued while a commit is in flight
goes into the next transaction, each in a savepoint of its own, so one failing
operation fails alone and a burst of accepts costs one commit. The event loop only
awaits futures. With `synchronous_commit = on` (set on the connection) a commit has
reached the server's WAL on disk before an accept returns.

What differs from SQLite, and why:
- The connection can be lost. A group that finds it broken reconnects first; if that
  fails, the group's operations fail with `StoreUnavailable` and the thread goes on,
  so the store comes back by itself when the database does.
- Several nodes may share the database, so inserts rely on unique keys
  (`ON CONFLICT DO NOTHING`), never on a read before the write.
- Message and reply texts are `bytea` (UTF-8): PostgreSQL's `text` cannot hold NUL,
  which SQLite's can and a JSON client may send. Origins are JSON in `text`, not
  `jsonb`, for the same reason (`jsonb` refuses `\\u0000`).
- The tables live in their own schema, `corral`, created and migrated by `open()`
  (see MIGRATIONS): versioned, idempotent, and serialised across nodes by an advisory
  lock held for the migration transaction.

The password comes from libpq (`PGPASSWORD`, `~/.pgpass`, a service file), so the
configured URL needs none; every message that shows the URL shows it without one.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from typing import Any, Final, TypeVar

import msgspec
import psycopg
from psycopg.conninfo import conninfo_to_dict

from corral.protocol.types import ERROR, Origin, Reply, reply_id
from corral.supervisor.pg_schema import (
    LATEST,
    MIGRATIONS,
    SchemaMismatch,
    StoreError,
    StoreUnavailable,
    migrate,
    redact,
    schema_version,
)
from corral.supervisor.store import (
    FETCHED,
    PENDING,
    Accepted,
    DeadLetter,
    HistoryItem,
    Inbound,
    Message,
    SessionRecord,
    SessionSummary,
    StoreClosed,
    StoredReply,
)

log = logging.getLogger("corral.store")
T = TypeVar("T")

GROUP_MAX: Final = 512

# libpq parameters corral sets unless the URL sets them: a dead server or a half-open
# socket is noticed in seconds, not after the kernel's 2-hour keepalive default.
CONNECT_DEFAULTS: Final[dict[str, str | int]] = {
    "connect_timeout": 10,
    "keepalives": 1,
    "keepalives_idle": 10,
    "keepalives_interval": 5,
    "keepalives_count": 3,
    "tcp_user_timeout": 30_000,  # ms
    "application_name": "corral",
}


_origin_encode = msgspec.json.Encoder().encode
_origin_decode = msgspec.json.Decoder(Origin).decode


_STOP = object()


class PgStore:
    def __init__(self, url: str, durable: bool = True) -> None:
        self.url = url
        self.durable = durable
        self.display_url = redact(url)
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closed: asyncio.Future[None] | None = None

    # ---- lifecycle

    async def open(self) -> None:
        """Connect, create or migrate the schema; StoreError says what is wrong."""
        self._loop = asyncio.get_running_loop()
        self._closed = self._loop.create_future()
        ready: asyncio.Future[None] = self._loop.create_future()
        self._thread = threading.Thread(
            target=self._run, args=(ready,), name="corral-store", daemon=True
        )
        self._thread.start()
        try:
            await ready
        except BaseException:
            self._thread = None
            raise

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

    def _connect(self) -> psycopg.Connection[Any]:
        try:
            params = conninfo_to_dict(self.url)
        except psycopg.ProgrammingError as e:
            raise StoreError(f"store.url: not a PostgreSQL URL libpq understands: {e}") from None
        for key, value in CONNECT_DEFAULTS.items():
            params.setdefault(key, value)
        try:
            conn = psycopg.connect(**params, autocommit=True)  # type: ignore[arg-type]
        except psycopg.Error as e:
            raise StoreUnavailable(
                f"store.url: cannot connect to {self.display_url}: {_first_line(e)}"
            ) from None
        try:
            # durable: the commit is on the server's disk before an accept returns
            conn.execute(f"SET synchronous_commit = {'on' if self.durable else 'off'}")
            conn.execute("SET statement_timeout = '30s'")
            conn.execute("SET lock_timeout = '10s'")
            conn.execute("SET idle_in_transaction_session_timeout = '60s'")
        except psycopg.Error as e:
            conn.close()
            raise StoreUnavailable(
                f"store.url: {self.display_url} refused the session settings: {_first_line(e)}"
            ) from None
        return conn

    def _migrate(self, conn: psycopg.Connection[Any]) -> None:
        try:
            migrate(conn)
        except psycopg.Error as e:
            with contextlib.suppress(psycopg.Error):
                conn.execute("ROLLBACK")
            raise StoreError(
                f"store.url: cannot create or migrate corral's schema in {self.display_url}: "
                f"{_first_line(e)}"
            ) from None

    def _run(self, ready: asyncio.Future[None]) -> None:
        assert self._loop is not None
        conn: psycopg.Connection[Any] | None = None
        try:
            conn = self._connect()
            self._migrate(conn)
        except Exception as e:
            if conn is not None:
                conn.close()
            self._loop.call_soon_threadsafe(_settle, ready, None, e)
            return
        self._loop.call_soon_threadsafe(_settle, ready, None, None)
        stopping = False
        while not stopping:  # ends at the _STOP sentinel from close()
            batch = [self._queue.get()]
            while len(batch) < GROUP_MAX:
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            stopping = _STOP in batch
            ops = [item for item in batch if item is not _STOP]
            if not ops:
                continue
            results: list[tuple[asyncio.Future[Any], Any, BaseException | None]]
            try:
                if conn is None or conn.closed or conn.broken:
                    if conn is not None:
                        log.warning("store: the connection to the database was lost; reconnecting")
                        conn.close()
                        conn = None
                    conn = self._connect()
                    log.info("store: connected to %s again", self.display_url)
                results = self._commit_group(conn, ops)
            except Exception as e:
                # A failed group (database gone, disk full) fails its operations, not the
                # store: the thread goes on, the next group reconnects if it must.
                log.error("store: a group of %d operations failed: %s", len(ops), e)
                if isinstance(e, psycopg.OperationalError) or (conn is not None and conn.broken):
                    e = StoreUnavailable(
                        f"store.url: lost the database {self.display_url}: {_first_line(e)}"
                    )
                if conn is not None and not conn.closed:
                    with contextlib.suppress(psycopg.Error):
                        conn.execute("ROLLBACK")
                results = [(fut, None, e) for _, fut in ops]
            # one wake-up of the loop for the whole group, not one per operation
            self._loop.call_soon_threadsafe(_settle_all, results)
        if conn is not None:
            conn.close()
        if self._closed is not None:
            self._loop.call_soon_threadsafe(_settle, self._closed, None, None)

    @staticmethod
    def _commit_group(
        conn: psycopg.Connection[Any],
        ops: list[tuple[Callable[[psycopg.Connection[Any]], Any], Any]],
    ) -> list[tuple[asyncio.Future[Any], Any, BaseException | None]]:
        """Run `ops` in one transaction, each in a savepoint of its own; one commit."""
        results: list[tuple[asyncio.Future[Any], Any, BaseException | None]] = []
        conn.execute("BEGIN")
        for fn, fut in ops:
            conn.execute("SAVEPOINT op")
            try:
                results.append((fut, fn(conn), None))
                conn.execute("RELEASE SAVEPOINT op")
            except Exception as e:
                if conn.broken:
                    raise
                conn.execute("ROLLBACK TO SAVEPOINT op")
                conn.execute("RELEASE SAVEPOINT op")
                results.append((fut, None, e))
        conn.execute("COMMIT")
        return results

    def _submit(self, fn: Callable[[psycopg.Connection[Any]], T]) -> asyncio.Future[T]:
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

        def op(conn: psycopg.Connection[Any]) -> Accepted:
            # insert first: a concurrent insert of the same id on another node makes this
            # wait for that transaction, then do nothing, and the select below finds it
            row = conn.execute(
                "INSERT INTO corral.messages (id, session, text, origin, accepted_at) "
                "VALUES (%s, %s, %s, %s, %s) ON CONFLICT (id) DO NOTHING RETURNING seq",
                (message_id, session, text.encode(), _origin_encode(origin).decode(), time.time()),
            ).fetchone()
            if row is not None:
                return Accepted(
                    Message(id=message_id, session=session, text=text, origin=origin, seq=row[0]),
                    False,
                )
            first = conn.execute(
                f"SELECT {_MESSAGE_COLUMNS} FROM corral.messages WHERE id = %s", (message_id,)
            ).fetchone()
            assert first is not None
            return Accepted(_message(first), True)

        return await self._submit(op)

    async def pending(self) -> list[Message]:
        """Every message whose turn has not ended, in the order accepted."""

        def op(conn: psycopg.Connection[Any]) -> list[Message]:
            rows = conn.execute(
                f"SELECT {_MESSAGE_COLUMNS} FROM corral.messages "
                "WHERE state = 'pending' ORDER BY seq"
            ).fetchall()
            return [_message(r) for r in rows]

        return await self._submit(op)

    async def start_attempt(self, message_id: str) -> int:
        """Count a start of the message's turn, durably, before it runs; the new count."""

        def op(conn: psycopg.Connection[Any]) -> int:
            row = conn.execute(
                "UPDATE corral.messages SET attempts = attempts + 1 WHERE id = %s "
                "RETURNING attempts",
                (message_id,),
            ).fetchone()
            if row is None:
                raise KeyError(f"no message {message_id!r}")
            return int(row[0])

        return await self._submit(op)

    async def start_attempt_undone(self, message_id: str) -> None:
        """Take back a start the supervisor itself interrupted (drain): not the message's fault."""

        def op(conn: psycopg.Connection[Any]) -> None:
            conn.execute(
                "UPDATE corral.messages SET attempts = greatest(attempts - 1, 0) WHERE id = %s",
                (message_id,),
            )

        await self._submit(op)

    async def finish(self, message_id: str, state: str) -> None:
        def op(conn: psycopg.Connection[Any]) -> None:
            conn.execute(
                "UPDATE corral.messages SET state = %s, finished_at = %s WHERE id = %s",
                (str(state), time.time(), message_id),
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
        kind = str(kind)
        reply = Reply(
            id=reply_id(message.id, index),
            in_reply_to=message.id,
            session=message.session,
            index=index,
            text=text,
            kind=kind,
            origin=message.origin,
        )
        origin = _origin_encode(message.origin).decode()

        def insert(conn: psycopg.Connection[Any], r: Reply) -> bool:
            cur = conn.execute(
                "INSERT INTO corral.replies (id, message_id, session, idx, text, kind, channel, "
                "origin, created_at, delivery) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s) "
                "ON CONFLICT (id) DO NOTHING",
                (
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
                ),
            )
            return cur.rowcount > 0

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
                "AND e.delivery = 'pending' AND e.cursor < r.cursor) ORDER BY cursor LIMIT %s",
                (channel, now, limit),
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
                "AND e.delivery = 'pending' AND e.cursor < r.cursor)",
                (channel,),
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
                "UPDATE corral.replies SET delivery = 'dead', "
                "last_error = 'channel not configured' "
                "WHERE delivery = 'pending' AND channel <> ALL(%s::text[])",
                (list(channels),),
            )
            return cur.rowcount

        return await self._submit(op)

    # ---- polling channels

    async def accept_batch(
        self, cursor: str, next_offset: int, inbound: Sequence[Inbound]
    ) -> list[Accepted]:
        """Store `inbound` and set channel cursor `cursor` to `next_offset`, atomically
        (one operation, so one savepoint of its group): see Store.accept_batch."""

        def op(conn: psycopg.Connection[Any]) -> list[Accepted]:
            now = time.time()
            out = []
            for m in inbound:
                row = conn.execute(
                    "INSERT INTO corral.messages (id, session, text, origin, accepted_at) "
                    "VALUES (%s, %s, %s, %s, %s) ON CONFLICT (id) DO NOTHING RETURNING seq",
                    (m.id, m.session, m.text.encode(), _origin_encode(m.origin).decode(), now),
                ).fetchone()
                if row is not None:
                    message = Message(
                        id=m.id, session=m.session, text=m.text, origin=m.origin, seq=row[0]
                    )
                    out.append(Accepted(message, False))
                    continue
                first = conn.execute(
                    f"SELECT {_MESSAGE_COLUMNS} FROM corral.messages WHERE id = %s", (m.id,)
                ).fetchone()
                assert first is not None
                out.append(Accepted(_message(first), True))
            conn.execute(
                "INSERT INTO corral.channel_offsets (name, next_offset) VALUES (%s, %s) "
                "ON CONFLICT (name) DO UPDATE SET next_offset = excluded.next_offset",
                (cursor, next_offset),
            )
            return out

        return await self._submit(op)

    async def channel_offset(self, cursor: str) -> int | None:
        """The offset `accept_batch` last committed for `cursor`; None before the first."""

        def op(conn: psycopg.Connection[Any]) -> int | None:
            row = conn.execute(
                "SELECT next_offset FROM corral.channel_offsets WHERE name = %s", (cursor,)
            ).fetchone()
            return None if row is None else int(row[0])

        return await self._submit(op)

    async def reply_parts_sent(self, reply_id: str) -> int:
        """How many parts of a reply sent in parts are delivered already (0 if none)."""

        def op(conn: psycopg.Connection[Any]) -> int:
            row = conn.execute(
                "SELECT sent FROM corral.reply_parts WHERE reply_id = %s", (reply_id,)
            ).fetchone()
            return 0 if row is None else int(row[0])

        return await self._submit(op)

    async def set_reply_parts_sent(self, reply_id: str, sent: int) -> None:
        """Record that the first `sent` parts of a reply are delivered; 0 forgets it."""

        def op(conn: psycopg.Connection[Any]) -> None:
            if sent <= 0:
                conn.execute("DELETE FROM corral.reply_parts WHERE reply_id = %s", (reply_id,))
                return
            conn.execute(
                "INSERT INTO corral.reply_parts (reply_id, sent) VALUES (%s, %s) "
                "ON CONFLICT (reply_id) DO UPDATE SET sent = excluded.sent",
                (reply_id, sent),
            )

        await self._submit(op)

    # ---- sessions

    async def set_quarantine(self, session: str, until: float | None) -> None:
        def op(conn: psycopg.Connection[Any]) -> None:
            if until is None:
                conn.execute(
                    "UPDATE corral.sessions SET quarantined_until = NULL WHERE key = %s",
                    (session,),
                )
            else:
                conn.execute(
                    "INSERT INTO corral.sessions (key, quarantined_until) VALUES (%s, %s) "
                    "ON CONFLICT (key) DO UPDATE "
                    "SET quarantined_until = excluded.quarantined_until",
                    (session, until),
                )

        await self._submit(op)

    async def record_abnormal_exit(self, session: str, reason: str) -> None:
        def op(conn: psycopg.Connection[Any]) -> None:
            conn.execute(
                "INSERT INTO corral.sessions (key, restarts, last_exit) VALUES (%s, 1, %s) "
                "ON CONFLICT (key) DO UPDATE "
                "SET restarts = corral.sessions.restarts + 1, last_exit = excluded.last_exit",
                (session, _diagnostic(reason)),
            )

        await self._submit(op)

    async def session_records(self) -> dict[str, SessionRecord]:
        """Every session that ever had a worker end abnormally or was quarantined."""

        def op(conn: psycopg.Connection[Any]) -> dict[str, SessionRecord]:
            rows = conn.execute(
                "SELECT key, quarantined_until, restarts, last_exit FROM corral.sessions"
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
            params: list[Any] = [list(channels)] + ([] if ids is None else [list(ids)])
            rows = conn.execute(
                "UPDATE corral.replies SET delivery = 'pending', attempts = 0, "
                "next_attempt_at = 0, last_error = NULL WHERE delivery = 'dead' "
                f"AND channel = ANY(%s::text[]) {chosen} RETURNING {_REPLY_COLUMNS}",
                params,
            ).fetchall()
            return sorted((_stored_reply(r) for r in rows), key=_by_cursor)

        return await self._submit(op)


# ---- schema


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
    "LATEST",
    "MIGRATIONS",
    "PgStore",
    "SchemaMismatch",
    "StoreError",
    "StoreUnavailable",
    "migrate",
    "redact",
    "schema_version",
]
