"""The PostgreSQL store's cluster operations (a part of `PgStore`): leases with a fencing
epoch, the nodes' heartbeats, and operator commands addressed to a session's owner.

Every time is the database's (`now()`): nodes do not trust each other's clocks. The
statements follow design/cluster.md: a claim is one UPDATE over a CTE that picks free
or expired leases `FOR UPDATE SKIP LOCKED` (the CTE keeps `LIMIT` fenced from the
planner), a renewal is one statement for all of a node's leases, and a fenced write
takes the lease row `FOR SHARE`, so a claim by another node either waits for the
write's commit or makes the write find a new epoch and fail.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Final, TypeVar

import msgspec
import psycopg

from corral.supervisor.store_rows import SessionRecord
from corral.supervisor.storethread import LeaseLost

T = TypeVar("T")

NOTIFY_CHANNEL: Final = "corral"
# payload prefixes on NOTIFY_CHANNEL (one byte, a space, the rest)
MESSAGE_HINT: Final = "m"  # message <id> was accepted for session <session>\t<id>
DONE_HINT: Final = "d"  # the turn of message <rest> ended
REPLY_HINT: Final = "r"  # a reply to <channel>\t<session> was stored
FREED_HINT: Final = "f"  # leases were released: a backlog may be claimable
COMMAND_HINT: Final = "c"  # a command for node <rest>
ANSWER_HINT: Final = "a"  # command <rest> was answered


# a CTE `f` for the writes of a turn: the lease of message %s's session if node %s holds
# it, locked FOR SHARE, so a claim by another node waits for the write's commit (or the
# write sees the new epoch); compared with the epoch in memory by `_check_epoch`
LEASE_OF_MESSAGE: Final = (
    "f AS (SELECT l.epoch FROM corral.leases l JOIN corral.messages m "
    "ON m.session = l.session WHERE m.id = %s AND l.node = %s FOR SHARE OF l)"
)
LEASE_OF_SESSION: Final = (
    "f AS (SELECT epoch FROM corral.leases WHERE session = %s AND node = %s FOR SHARE)"
)


class Claimed(msgspec.Struct, frozen=True):
    session: str
    epoch: int
    last_node: str | None  # who held it before (None: nobody yet)


class NodeRow(msgspec.Struct, frozen=True, kw_only=True):
    name: str
    started_at: float  # unix time
    heartbeat_at: float  # unix time
    draining: bool
    pid: int | None
    alive: bool  # heartbeat within the lease TTL
    leases: int
    sessions: bytes | None  # the node's `corral ls` rows, msgpack


class Command(msgspec.Struct, frozen=True):
    id: int
    op: str
    session: str
    force: bool


def notify(conn: psycopg.Connection[Any], kind: str, rest: str) -> None:
    """A hint to every node, delivered when the transaction commits."""
    conn.execute("SELECT pg_notify(%s, %s)", (NOTIFY_CHANNEL, f"{kind} {rest}"))


class PgClusterOps:
    """Lease state the store's writes check: `node` is None until a Cluster attaches
    (a store used alone, as in the contract tests, fences nothing)."""

    node: str | None = None
    epochs: dict[str, int]  # session -> the epoch this node holds it with
    # called on the loop with the session when a write finds the lease gone, before the
    # write's caller hears of it: the node stops the session's worker first
    on_lease_lost: Callable[[str], None] | None = None

    if TYPE_CHECKING:
        _loop: asyncio.AbstractEventLoop | None

        def _submit(self, fn: Callable[[psycopg.Connection[Any]], T]) -> asyncio.Future[T]: ...

    def _check_epoch(self, session: str, found: int | None) -> None:
        """Raise LeaseLost unless `found` (the lease's epoch the write saw, None if this
        node does not hold it) is the epoch this node holds `session` with."""
        if self.node is None:
            return
        epoch = self.epochs.get(session)
        if epoch is not None and found == epoch:
            return
        self._lease_gone(session)

    def _lease_gone(self, session: str) -> None:
        if self.on_lease_lost is not None and self._loop is not None:
            self._loop.call_soon_threadsafe(self.on_lease_lost, session)
        raise LeaseLost(f"session {session}: this node no longer holds its lease")

    def _fence(self, conn: psycopg.Connection[Any], session: str) -> None:
        """Raise LeaseLost unless this node holds `session`'s lease with the epoch it knows."""
        if self.node is None:
            return
        epoch = self.epochs.get(session)
        if epoch is not None:
            row = conn.execute(
                "SELECT 1 FROM corral.leases WHERE session = %s AND node = %s AND epoch = %s "
                "FOR SHARE",
                (session, self.node, epoch),
            ).fetchone()
            if row is not None:
                return
        self._lease_gone(session)

    # ---- nodes

    async def heartbeat_age(self, node: str) -> float | None:
        """Seconds since `node` last renewed; None if it never ran."""

        def op(conn: psycopg.Connection[Any]) -> float | None:
            row = conn.execute(
                "SELECT extract(epoch FROM now() - heartbeat_at) FROM corral.nodes WHERE name = %s",
                (node,),
            ).fetchone()
            return None if row is None else float(row[0])

        return await self._submit(op)

    async def join(self, node: str, pid: int) -> int:
        """Register `node` as started now, and free what an earlier run of it held (that
        run is dead: its heartbeat went stale); how many leases that freed."""

        def op(conn: psycopg.Connection[Any]) -> int:
            conn.execute(
                "INSERT INTO corral.nodes (name, pid) VALUES (%s, %s) ON CONFLICT (name) DO "
                "UPDATE SET started_at = now(), heartbeat_at = now(), draining = false, "
                "pid = excluded.pid, sessions = NULL",
                (node, pid),
            )
            freed = conn.execute(
                "UPDATE corral.leases SET node = NULL, epoch = epoch + 1, last_node = node "
                "WHERE node = %s",
                (node,),
            ).rowcount
            if freed:
                notify(conn, FREED_HINT, node)
            return freed

        return await self._submit(op)

    async def renew(self, node: str, ttl: float, sessions: bytes, draining: bool) -> dict[str, int]:
        """Extend every lease of `node` by `ttl` and beat its heart, in one statement;
        the leases it holds (session -> epoch)."""

        def op(conn: psycopg.Connection[Any]) -> dict[str, int]:
            rows = conn.execute(
                "WITH beat AS (UPDATE corral.nodes SET heartbeat_at = now(), sessions = %s, "
                "draining = %s WHERE name = %s) "
                "UPDATE corral.leases SET expires_at = now() + %s * interval '1 second' "
                "WHERE node = %s RETURNING session, epoch",
                (sessions, draining, node, ttl, node),
            ).fetchall()
            return {str(s): int(e) for s, e in rows}

        return await self._submit(op)

    async def leave(self, node: str) -> None:
        """A node stopping cleanly: its leases are free at once, its row says so."""

        def op(conn: psycopg.Connection[Any]) -> None:
            conn.execute(
                "UPDATE corral.leases SET node = NULL, last_node = node WHERE node = %s", (node,)
            )
            conn.execute(
                "UPDATE corral.nodes SET heartbeat_at = '-infinity', sessions = NULL, "
                "draining = true WHERE name = %s",
                (node,),
            )
            notify(conn, FREED_HINT, node)

        await self._submit(op)

    async def nodes(self, ttl: float) -> list[NodeRow]:
        def op(conn: psycopg.Connection[Any]) -> list[NodeRow]:
            rows = conn.execute(
                "SELECT n.name, extract(epoch FROM n.started_at), "
                "extract(epoch FROM greatest(n.heartbeat_at, '1970-01-01'::timestamptz)), "
                "n.draining, n.pid, n.heartbeat_at > now() - %s * interval '1 second', "
                "(SELECT count(*) FROM corral.leases l WHERE l.node = n.name "
                "AND l.expires_at > now()), n.sessions FROM corral.nodes n ORDER BY n.name",
                (ttl,),
            ).fetchall()
            return [
                NodeRow(
                    name=r[0],
                    started_at=float(r[1]),
                    heartbeat_at=float(r[2]),
                    draining=bool(r[3]),
                    pid=r[4],
                    alive=bool(r[5]),
                    leases=int(r[6]),
                    sessions=None if r[7] is None else bytes(r[7]),
                )
                for r in rows
            ]

        return await self._submit(op)

    # ---- leases

    async def claim(self, node: str, ttl: float, limit: int) -> list[Claimed]:
        """Take up to `limit` free or expired leases of sessions with pending messages,
        oldest pending message first; each taken lease gets a new epoch."""

        def op(conn: psycopg.Connection[Any]) -> list[Claimed]:
            rows = conn.execute(
                "WITH c AS (SELECT l.session, l.last_node FROM corral.leases l "
                "WHERE (l.node IS NULL OR l.expires_at < now()) "
                "AND EXISTS (SELECT 1 FROM corral.messages m "
                "WHERE m.session = l.session AND m.state = 'pending') "
                "ORDER BY (SELECT min(m.seq) FROM corral.messages m "
                "WHERE m.session = l.session AND m.state = 'pending') "
                "LIMIT %s FOR UPDATE OF l SKIP LOCKED) "
                "UPDATE corral.leases l SET node = %s, epoch = l.epoch + 1, "
                "expires_at = now() + %s * interval '1 second', last_node = %s "
                "FROM c WHERE l.session = c.session RETURNING l.session, l.epoch, c.last_node",
                (limit, node, ttl, node),
            ).fetchall()
            return [Claimed(str(s), int(e), ln) for s, e, ln in rows]

        return await self._submit(op)

    async def release(self, node: str, leases: dict[str, int]) -> list[str]:
        """Give up these leases (session -> epoch) if still held with that epoch."""

        def op(conn: psycopg.Connection[Any]) -> list[str]:
            rows = conn.execute(
                "UPDATE corral.leases l SET node = NULL, last_node = %s "
                "FROM unnest(%s::text[], %s::bigint[]) AS r(session, epoch) "
                "WHERE l.session = r.session AND l.epoch = r.epoch AND l.node = %s "
                "RETURNING l.session",
                (node, list(leases), list(leases.values()), node),
            ).fetchall()
            if rows:
                notify(conn, FREED_HINT, node)
            return [str(r[0]) for r in rows]

        return await self._submit(op)

    async def lease_owner(self, session: str) -> str | None:
        """The live node that holds `session`'s lease, or None."""

        def op(conn: psycopg.Connection[Any]) -> str | None:
            row = conn.execute(
                "SELECT node FROM corral.leases WHERE session = %s AND node IS NOT NULL "
                "AND expires_at > now()",
                (session,),
            ).fetchone()
            return None if row is None else str(row[0])

        return await self._submit(op)

    async def message_states(self, ids: list[str]) -> dict[str, str]:
        def op(conn: psycopg.Connection[Any]) -> dict[str, str]:
            rows = conn.execute(
                "SELECT id, state FROM corral.messages WHERE id = ANY(%s::text[])", (ids,)
            ).fetchall()
            return {str(i): str(s) for i, s in rows}

        return await self._submit(op)

    async def session_record(self, session: str) -> SessionRecord | None:
        def op(conn: psycopg.Connection[Any]) -> SessionRecord | None:
            row = conn.execute(
                "SELECT quarantined_until, restarts, last_exit FROM corral.sessions WHERE key = %s",
                (session,),
            ).fetchone()
            if row is None:
                return None
            return SessionRecord(quarantined_until=row[0], restarts=row[1], last_exit=row[2])

        return await self._submit(op)

    # ---- commands for a session's owner

    async def put_command(self, node: str, op_name: str, session: str, force: bool) -> int:
        def op(conn: psycopg.Connection[Any]) -> int:
            row = conn.execute(
                "INSERT INTO corral.commands (node, op, session, force) VALUES (%s, %s, %s, %s) "
                "RETURNING id",
                (node, op_name, session, force),
            ).fetchone()
            assert row is not None
            notify(conn, COMMAND_HINT, node)
            return int(row[0])

        return await self._submit(op)

    async def take_commands(self, node: str) -> list[Command]:
        def op(conn: psycopg.Connection[Any]) -> list[Command]:
            # a command nobody answered within a minute is dropped: its asker gave up
            conn.execute("DELETE FROM corral.commands WHERE created_at < now() - interval '60s'")
            rows = conn.execute(
                "UPDATE corral.commands SET taken = true WHERE node = %s AND NOT taken "
                "RETURNING id, op, session, force",
                (node,),
            ).fetchall()
            return [Command(int(i), str(o), str(s), bool(f)) for i, o, s, f in rows]

        return await self._submit(op)

    async def command_done(self, command_id: int, result: bytes) -> None:
        def op(conn: psycopg.Connection[Any]) -> None:
            conn.execute(
                "UPDATE corral.commands SET result = %s WHERE id = %s", (result, command_id)
            )
            notify(conn, ANSWER_HINT, str(command_id))

        await self._submit(op)

    async def command_result(self, command_id: int) -> bytes | None:
        """The owner's answer, once there is one (the command is then forgotten)."""

        def op(conn: psycopg.Connection[Any]) -> bytes | None:
            row = conn.execute(
                "DELETE FROM corral.commands WHERE id = %s AND result IS NOT NULL RETURNING result",
                (command_id,),
            ).fetchone()
            return None if row is None else bytes(row[0])

        return await self._submit(op)

    async def drop_command(self, command_id: int) -> None:
        def op(conn: psycopg.Connection[Any]) -> None:
            conn.execute("DELETE FROM corral.commands WHERE id = %s", (command_id,))

        await self._submit(op)
