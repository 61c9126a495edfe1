"""The SQLite store finds its rows by an index, never by reading a whole table: what
runs per message, on each delivery and retention pass and for an operator's listing
stays cheap as the database grows. Each statement the store runs is captured as it ran
(values bound) and SQLite is asked for its query plan."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from pathlib import Path

from corral.protocol.types import ERROR, Origin
from corral.supervisor.store import DEAD, DELIVERED, DONE, FAILED, Store

HTTP = Origin(channel="http")
HOOK = Origin(channel="hooks", account="acct", chat="room-7")
STATEMENTS = ("SELECT", "UPDATE", "DELETE", "INSERT")


class Traced(Store):
    """A store that remembers every statement its connection ran."""

    def __init__(self, path: Path) -> None:
        super().__init__(path, durable=False)
        self.ran: list[str] = []

    def _connect(self) -> sqlite3.Connection:
        conn = super()._connect()
        conn.set_trace_callback(self.ran.append)  # on the store thread; append is atomic
        return conn


def full_scans(db: Path, statements: list[str]) -> dict[str, list[str]]:
    """statement -> the plan's lines that read a whole table (a SCAN using no index)."""
    found: dict[str, list[str]] = {}
    with sqlite3.connect(db) as conn:
        for sql in statements:
            if not sql.lstrip().upper().startswith(STATEMENTS):
                continue
            plan = [row[3] for row in conn.execute(f"EXPLAIN QUERY PLAN {sql}")]
            if scans := [line for line in plan if line.startswith("SCAN") and "USING" not in line]:
                found[sql] = scans
    return found


def test_the_stores_queries_use_an_index_as_the_database_grows(tmp_path: Path) -> None:
    db = tmp_path / "corral.db"

    async def body() -> Traced:
        store = Traced(db)
        await store.open()
        for n in range(300):  # enough rows that SQLite's planner sees tables, not scraps
            origin = HOOK if n % 3 == 0 else HTTP
            m = (await store.accept(f"s{n % 20}", "q", origin, f"m{n}", start=True)).message
            await store.add_reply(m, 0, "r", "reply", push=origin is HOOK)
            if n % 7 == 0:
                await store.add_reply(m, 1, "failed", ERROR, push=origin is HOOK)
            if n < 250:
                await store.finish(m.id, FAILED if n % 7 == 0 else DONE)
            if origin is HOOK and n < 200:
                await store.mark_delivery(m.id + ":0", DEAD if n % 2 else DELIVERED, 1)
        store.ran.clear()  # what follows is what is checked
        cutoff = time.time()
        m = (await store.accept("s1", "q", HTTP, None)).message
        await store.start_attempt(m.id)
        await store.add_reply(m, 0, "r", "reply")
        await store.finish(m.id, DONE, [(0, "reply", "r")])
        await store.pending()
        await store.message("m1")
        await store.replies_after("s1", "http", 10, 100)
        await store.replies_for_message("m3")
        await store.due_deliveries("hooks", time.time(), 10)
        await store.next_due("hooks")
        await store.mark_delivery("m201:0", DELIVERED, 1)
        await store.dead_letter_unrouted(["hooks"])
        await store.dead_letters(100)
        await store.retry_dead_letters(["m1:0"], ["hooks"])
        await store.retry_dead_letters(None, ["hooks"])
        await store.history("s1", 20)
        assert await store.prune(cutoff, 100) > 0
        await store.close()
        return store

    store = asyncio.run(body())
    checked = [s for s in store.ran if s.lstrip().upper().startswith(STATEMENTS)]
    assert len(checked) >= 15, store.ran
    assert full_scans(db, store.ran) == {}


def test_an_older_databases_full_indexes_give_way_to_the_partial_ones(tmp_path: Path) -> None:
    db = tmp_path / "corral.db"

    async def first() -> None:
        store = Store(db, durable=False)
        await store.open()
        await store.accept("s", "kept", HTTP, "m1")
        await store.close()

    asyncio.run(first())
    with sqlite3.connect(db) as conn:  # what the store created before partial indexes
        conn.execute("CREATE INDEX messages_pending ON messages (state, seq)")
        conn.execute("CREATE INDEX messages_finished ON messages (finished_at)")
        conn.execute("CREATE INDEX replies_undelivered ON replies (delivery, next_attempt_at)")

    async def again() -> list[str]:
        store = Store(db, durable=False)
        await store.open()
        pending = [m.text for m in await store.pending()]
        await store.close()
        return pending

    assert asyncio.run(again()) == ["kept"]
    with sqlite3.connect(db) as conn:
        names = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='index'")}
    assert not names & {"messages_pending", "messages_finished", "replies_undelivered"}, names
    assert {"messages_waiting", "messages_ended", "replies_to_deliver", "replies_dead"} <= names
