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
import time
from collections.abc import Callable, Sequence
from typing import Any, Final, TypeVar

import psycopg
from psycopg.conninfo import conninfo_to_dict

from corral.protocol.types import ERROR, Origin, reply_id
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
    Accepted,
    Inbound,
    Message,
    SessionRecord,
)
from corral.supervisor.store_pg_cluster import (
    DONE_HINT,
    LEASE_OF_MESSAGE,
    MESSAGE_HINT,
    NOTIFY_CHANNEL,
    LeaseLost,
    PgClusterOps,
)
from corral.supervisor.store_pg_delivery import PgDeliveryOps
from corral.supervisor.store_pg_rows import (
    _diagnostic,
    _first_line,
)
from corral.supervisor.store_rows import (
    _MESSAGE_COLUMNS,
    _message,
    _origin_encode,
    new_message_id,
)
from corral.supervisor.storethread import ExpectedReply, RepliesNotStored, Result, StoreThread

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


def connect_params(url: str) -> dict[str, Any]:
    """libpq parameters for `url`, with CONNECT_DEFAULTS where the URL sets none."""
    try:
        params: dict[str, Any] = conninfo_to_dict(url)
    except psycopg.ProgrammingError as e:
        raise StoreError(f"store.url: not a PostgreSQL URL libpq understands: {e}") from None
    for key, value in CONNECT_DEFAULTS.items():
        params.setdefault(key, value)
    return params


class PgStore(StoreThread["psycopg.Connection[Any]"], PgDeliveryOps, PgClusterOps):
    def __init__(self, url: str, durable: bool = True, lease_ttl: float = 10.0) -> None:
        super().__init__()
        self.url = url
        self.durable = durable
        # a transaction left open longer than this is ended by the server: a node stopped
        # (SIGSTOP, a frozen VM) between a fenced write and its commit would otherwise
        # hold that session's lease row FOR SHARE, and keep every other node from
        # claiming it, far past the lease
        self.stall_timeout = max(1.0, lease_ttl / 2)
        self.display_url = redact(url)
        # set by a Cluster: this node's name, and the epoch of each lease it holds,
        # read by the store thread to fence the writes of a session's turns
        self.node: str | None = None
        self.epochs: dict[str, int] = {}

    # ---- the engine's connection

    def _connect(self) -> psycopg.Connection[Any]:
        """Connect, create or migrate the schema; StoreError says what is wrong."""
        conn = self._open_connection()
        try:
            self._migrate(conn)
        except BaseException:
            conn.close()
            raise
        return conn

    def _usable(self, conn: psycopg.Connection[Any]) -> psycopg.Connection[Any]:
        if not (conn.closed or conn.broken):
            return conn
        log.warning("store: the connection to the database was lost; reconnecting")
        conn.close()
        conn = self._open_connection()
        log.info("store: connected to %s again", self.display_url)
        return conn

    def _failed(self, conn: psycopg.Connection[Any], error: Exception) -> BaseException:
        # the next group reconnects if it must
        if not conn.closed:
            with contextlib.suppress(psycopg.Error):
                conn.execute("ROLLBACK")
        if isinstance(error, psycopg.OperationalError) or conn.broken:
            return StoreUnavailable(
                f"store.url: lost the database {self.display_url}: {_first_line(error)}"
            )
        return error

    def _classify(self, error: BaseException) -> BaseException:
        # class 53: insufficient resources (disk full, out of memory); 58030: I/O error
        sqlstate = getattr(error, "sqlstate", None) or ""
        if sqlstate.startswith("53") or sqlstate == "58030":
            return StoreUnavailable(
                f"store.url: {self.display_url} cannot write now: {_first_line(error)}"
            )
        return error

    def _open_connection(self) -> psycopg.Connection[Any]:
        params = connect_params(self.url)
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
            conn.execute(
                f"SET idle_in_transaction_session_timeout = '{round(self.stall_timeout * 1000)}ms'"
            )
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

    def _commit_group(
        self,
        conn: psycopg.Connection[Any],
        ops: list[tuple[Callable[[psycopg.Connection[Any]], Any], Any]],
    ) -> list[Result]:
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
        `start`: count its first start in the same transaction (see Store.accept)."""
        message_id = client_id or new_message_id()

        def op(conn: psycopg.Connection[Any]) -> Accepted:
            # insert first: a concurrent insert of the same id on another node makes this
            # wait for that transaction, then do nothing, and the select below finds it
            row = _insert_message(
                conn,
                message_id,
                session,
                text,
                _origin_encode(origin).decode(),
                time.time(),
                attempts=int(start),
            )
            if row is not None:
                message = Message(
                    id=message_id,
                    session=session,
                    text=text,
                    origin=origin,
                    seq=row[0],
                    attempts=int(start),
                )
                return Accepted(message, False)
            first = conn.execute(
                f"SELECT {_MESSAGE_COLUMNS} FROM corral.messages WHERE id = %s", (message_id,)
            ).fetchone()
            assert first is not None
            return Accepted(_message(first), True)

        return await self._submit(op)

    async def message(self, message_id: str) -> Message | None:
        """The message stored under this id, if any (a retried id's first)."""

        def op(conn: psycopg.Connection[Any]) -> Message | None:
            row = conn.execute(
                f"SELECT {_MESSAGE_COLUMNS} FROM corral.messages WHERE id = %s", (message_id,)
            ).fetchone()
            return None if row is None else _message(row)

        return await self._submit(op)

    async def pending(self) -> list[Message]:
        """Every message whose turn has not ended, in the order accepted; in a cluster,
        only those of the sessions this node holds the lease of."""
        node = self.node

        def op(conn: psycopg.Connection[Any]) -> list[Message]:
            if node is None:
                rows = conn.execute(
                    f"SELECT {_MESSAGE_COLUMNS} FROM corral.messages "
                    "WHERE state = 'pending' ORDER BY seq"
                ).fetchall()
            else:
                rows = conn.execute(
                    f"SELECT {_MESSAGE_COLUMNS} FROM corral.messages "
                    "WHERE state = 'pending' AND session IN "
                    "(SELECT session FROM corral.leases WHERE node = %s) ORDER BY seq",
                    (node,),
                ).fetchall()
            return [_message(r) for r in rows]

        return await self._submit(op)

    async def start_attempt(self, message_id: str) -> int:
        """Count a start of the message's turn, durably, before it runs; the new count."""

        def op(conn: psycopg.Connection[Any]) -> int:
            # one statement: the count, and the lease as it is (FOR SHARE) to check
            row = conn.execute(
                f"WITH {LEASE_OF_MESSAGE} UPDATE corral.messages SET attempts = attempts + 1 "
                "WHERE id = %s RETURNING attempts, session, (SELECT epoch FROM f)",
                (message_id, self.node or "", message_id),
            ).fetchone()
            if row is None:
                raise KeyError(f"no message {message_id!r}")
            self._check_epoch(row[1], row[2])  # the savepoint rolls the count back if fenced
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

    async def finish(
        self, message_id: str, state: str, replies: Sequence[ExpectedReply] = ()
    ) -> None:
        """The message's turn ended with `state`; `replies` as for Store.finish: unless all
        are stored, RepliesNotStored and nothing stored (the savepoint takes it back)."""
        plain = [reply_id(message_id, i) for i, kind, _ in replies if kind != ERROR]
        errors = [text.encode() for _, kind, text in replies if kind == ERROR]

        def op(conn: psycopg.Connection[Any]) -> None:
            # one statement: the state, the lease to check, the hint (which a fenced
            # finish's savepoint takes back with the rest) and the count of its replies
            row = conn.execute(
                f"WITH {LEASE_OF_MESSAGE} UPDATE corral.messages SET state = %s, "
                "finished_at = %s WHERE id = %s "
                "RETURNING session, (SELECT epoch FROM f), pg_notify(%s, %s), "
                "(SELECT count(*) FROM corral.replies WHERE id = ANY(%s))",
                (
                    message_id,
                    self.node or "",
                    str(state),
                    time.time(),
                    message_id,
                    NOTIFY_CHANNEL,
                    f"{DONE_HINT} {message_id}",
                    plain,
                ),
            ).fetchone()
            if row is None:
                return
            self._check_epoch(row[0], row[1])
            if row[3] != len(plain):
                raise RepliesNotStored(f"message {message_id}: a reply is not stored")
            for text in errors:
                if not conn.execute(
                    "SELECT 1 FROM corral.replies WHERE message_id = %s AND kind = %s "
                    "AND text = %s",
                    (message_id, ERROR, text),
                ).fetchone():
                    raise RepliesNotStored(f"message {message_id}: its error is not stored")

        await self._submit(op)

    async def prune(self, before: float, limit: int) -> int:
        """Delete up to `limit` finished messages that finished before `before` and whose
        replies are all settled (delivered, fetched or dead), with those replies; how many."""

        def op(conn: psycopg.Connection[Any]) -> int:
            ids = [
                r[0]
                for r in conn.execute(
                    "SELECT id FROM corral.messages m WHERE finished_at < %s "
                    "AND state <> 'pending' AND NOT EXISTS (SELECT 1 FROM corral.replies r "
                    "WHERE r.message_id = m.id AND r.delivery = 'pending') "
                    "ORDER BY finished_at LIMIT %s",
                    (before, limit),
                )
            ]
            if ids:
                conn.execute(
                    "DELETE FROM corral.reply_parts WHERE reply_id IN "
                    "(SELECT id FROM corral.replies WHERE message_id = ANY(%s))",
                    (ids,),
                )
                conn.execute("DELETE FROM corral.replies WHERE message_id = ANY(%s)", (ids,))
                conn.execute("DELETE FROM corral.messages WHERE id = ANY(%s)", (ids,))
            return len(ids)

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
                row = _insert_message(
                    conn, m.id, m.session, m.text, _origin_encode(m.origin).decode(), now
                )
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


def _insert_message(
    conn: psycopg.Connection[Any],
    message_id: str,
    session: str,
    text: str,
    origin: str,
    now: float,
    attempts: int = 0,
) -> tuple[Any, ...] | None:
    """Insert a message unless its id exists: (seq,), or None. A new message's session
    gets a lease row (free) to claim, and every node a hint; one statement. `attempts`: 1
    when its first start is counted with it."""
    return conn.execute(
        "WITH m AS (INSERT INTO corral.messages (id, session, text, origin, accepted_at, "
        "attempts) VALUES (%s, %s, %s, %s, %s, %s) ON CONFLICT (id) DO NOTHING "
        "RETURNING seq, session), "
        "l AS (INSERT INTO corral.leases (session) SELECT session FROM m "
        "ON CONFLICT DO NOTHING) SELECT seq, pg_notify(%s, %s) FROM m",
        (
            message_id,
            session,
            text.encode(),
            origin,
            now,
            attempts,
            NOTIFY_CHANNEL,
            f"{MESSAGE_HINT} {session}\t{message_id}",
        ),
    ).fetchone()


__all__ = [
    "LATEST",
    "MIGRATIONS",
    "LeaseLost",
    "PgStore",
    "SchemaMismatch",
    "StoreError",
    "StoreUnavailable",
    "migrate",
    "redact",
    "schema_version",
]
