"""The lease statements on a real PostgreSQL, two stores standing for two nodes: one
claim wins, an expired lease moves with a new epoch, and the old owner's writes are
fenced (they fail and write nothing)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import psycopg
import pytest

from corral.protocol.types import Origin
from corral.supervisor.store_pg import LeaseLost, PgStore

HTTP = Origin(channel="http")


def run(body: Callable[[], Awaitable[None]], timeout: float = 60.0) -> None:
    async def bounded() -> None:
        async with asyncio.timeout(timeout):
            await body()

    asyncio.run(bounded())


def as_node(store: PgStore, name: str) -> PgStore:
    store.node = name
    return store


def test_one_claim_wins_and_an_expired_lease_moves_with_a_new_epoch(pg_url):
    async def body() -> None:
        a, b = as_node(PgStore(pg_url), "a"), as_node(PgStore(pg_url), "b")
        await a.open()
        await b.open()
        try:
            for i in range(10):
                await a.accept(f"s{i}", "hi", HTTP, None)
            got_a, got_b = await asyncio.gather(a.claim("a", 30, 100), b.claim("b", 30, 100))
            keys_a, keys_b = {c.session for c in got_a}, {c.session for c in got_b}
            assert not keys_a & keys_b and len(keys_a | keys_b) == 10
            # nothing is claimable while the leases are live
            assert await b.claim("b", 30, 100) == []
            # a short lease that is not renewed is claimed by the other, epoch + 1
            await b.release("b", {c.session: c.epoch for c in got_b})
            short = await a.claim("a", 0.2, 100)
            assert {c.session for c in short} == keys_b
            await asyncio.sleep(0.5)
            moved = await b.claim("b", 30, 100)
            before = {c.session: c.epoch for c in short}
            assert {c.session: c.epoch for c in moved} == {k: e + 1 for k, e in before.items()}
            assert all(c.last_node == "a" for c in moved)
            renewed = await a.renew("a", 30, b"", False)
            assert set(renewed) == keys_a  # the moved ones are not a's any more
        finally:
            await a.close()
            await b.close()

    run(body)


def test_a_write_by_a_node_that_lost_the_lease_is_fenced_and_writes_nothing(pg_url):
    async def body() -> None:
        a, b = as_node(PgStore(pg_url), "a"), as_node(PgStore(pg_url), "b")
        await a.open()
        await b.open()
        lost: list[str] = []
        a.on_lease_lost = lost.append
        try:
            message = (await a.accept("z", "hi", HTTP, None)).message
            (claimed,) = await a.claim("a", 0.2, 10)
            a.epochs["z"] = claimed.epoch
            assert await a.start_attempt(message.id) == 1  # held: the write lands
            await asyncio.sleep(0.5)
            (taken,) = await b.claim("b", 30, 10)  # a did not renew in time
            b.epochs["z"] = taken.epoch
            with pytest.raises(LeaseLost):
                await a.start_attempt(message.id)
            with pytest.raises(LeaseLost):
                await a.add_reply(message, 0, "from the zombie", "reply")
            with pytest.raises(LeaseLost):
                await a.finish(message.id, "done")
            await asyncio.sleep(0.1)
            assert lost == ["z", "z", "z"]
            with psycopg.connect(pg_url) as conn:
                state, attempts = conn.execute(
                    "SELECT state, attempts FROM corral.messages WHERE id = %s", (message.id,)
                ).fetchone()  # type: ignore[misc]
                replies = conn.execute("SELECT count(*) FROM corral.replies").fetchone()
            assert (state, attempts) == ("pending", 1) and replies == (0,)
            # the new owner's writes land
            assert await b.start_attempt(message.id) == 2
            assert (await b.add_reply(message, 0, "from the owner", "reply")) is not None
            await b.finish(message.id, "done")
        finally:
            await a.close()
            await b.close()

    run(body)


def test_migrating_a_single_node_database_gives_its_pending_sessions_claimable_leases(
    pg_empty_url,
):
    from corral.supervisor.pg_schema import MIGRATIONS, migrate

    with psycopg.connect(pg_empty_url, autocommit=True) as conn:
        conn.execute("CREATE SCHEMA corral")
        conn.execute(
            "CREATE TABLE corral.schema_version (version integer PRIMARY KEY, "
            "applied_at timestamptz NOT NULL DEFAULT now())"
        )
        for version, sql in MIGRATIONS[:3]:  # what a node before the cluster made
            conn.execute(sql)
            conn.execute("INSERT INTO corral.schema_version (version) VALUES (%s)", (version,))
        conn.execute(
            "INSERT INTO corral.messages (id, session, text, origin, accepted_at) "
            "VALUES ('m1', 'old', 'hi', '{\"channel\": \"http\"}', 0)"
        )
        assert migrate(conn) == 3

    async def body() -> None:
        store = as_node(PgStore(pg_empty_url), "a")
        await store.open()
        try:
            (claimed,) = await store.claim("a", 30, 10)
            assert claimed.session == "old" and claimed.last_node is None
            store.epochs["old"] = claimed.epoch
            assert [m.id for m in await store.pending()] == ["m1"]
        finally:
            await store.close()

    run(body)
