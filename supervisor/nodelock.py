"""One node per PostgreSQL database, until sessions are leased to nodes.

Two corral nodes on one database would both run every pending turn. Until leases
exist, the node that starts first holds a session-level advisory lock on a connection
of its own for as long as it runs; a second node refuses to start, naming the key. If
that connection is lost, the lock is gone with it, so the holder gives up (through
its services' intensity limit) rather than run on unguarded.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import psycopg

from corral.supervisor.pg_schema import StoreError, redact

log = logging.getLogger("corral.supervisor")

ONE_NODE_LOCK = 0x636F7272616C01  # not MIGRATION_LOCK: a node holds this one while it runs
CHECK_EVERY = 5.0  # seconds between checks that the lock's connection is alive
CHECK_TIMEOUT = 10.0


class NodeLock:
    def __init__(self, url: str) -> None:
        self.url = url
        self._conn: psycopg.AsyncConnection[Any] | None = None

    async def acquire(self) -> None:
        try:
            async with asyncio.timeout(CHECK_TIMEOUT):
                self._conn = await psycopg.AsyncConnection.connect(self.url, autocommit=True)
                cur = await self._conn.execute("SELECT pg_try_advisory_lock(%s)", (ONE_NODE_LOCK,))
                row = await cur.fetchone()
        except (psycopg.Error, TimeoutError) as e:
            await self.release()
            raise StoreError(f"store.url: cannot connect to {redact(self.url)}: {e}") from None
        if not row or not row[0]:
            await self.release()
            raise StoreError(
                f"store.url: another corral node is using {redact(self.url)}; "
                "this version runs one node per database"
            )

    async def watch(self) -> None:
        """A service: raises once the lock's connection is gone."""
        while True:  # ends when cancelled at close, or by raising
            await asyncio.sleep(CHECK_EVERY)
            if self._conn is None or self._conn.closed or self._conn.broken:
                self._conn = None
                await self.acquire()  # taken again, or StoreError
                continue
            async with asyncio.timeout(CHECK_TIMEOUT):
                await self._conn.execute("SELECT 1")

    async def release(self) -> None:
        if self._conn is not None:
            conn, self._conn = self._conn, None
            await conn.close()
