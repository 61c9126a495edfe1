"""A turn's replies and its finish: submitted together and committed together, and a reply
the store refuses is never followed by a stored finish (it is replayed first)."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

from corral.protocol.types import Origin, Reply
from corral.supervisor.inbox import Inbox
from corral.supervisor.metrics import Metrics
from corral.supervisor.store import DONE, PENDING, Message, Store
from corral.supervisor.storethread import StoreUnavailable

HTTP = Origin(channel="http")


class RefusingStore(Store):
    """A store whose disk refuses replies (only replies) while `full` is set."""

    full = False

    def add_reply(
        self,
        message: Message,
        index: int,
        text: str,
        kind: str,
        push: bool = False,
        markup: str = "",
    ) -> asyncio.Future[Reply | None]:
        if not self.full:
            return super().add_reply(message, index, text, kind, push, markup)

        def op(conn: sqlite3.Connection) -> Reply | None:
            raise StoreUnavailable("the disk is full (a test)")

        return self._submit(op)


def run(body: object) -> None:
    async def bounded() -> None:
        async with asyncio.timeout(30):
            await body()  # type: ignore[operator]

    asyncio.run(bounded())


def test_a_turns_reply_and_finish_share_one_transaction(tmp_path: Path) -> None:
    async def body() -> None:
        store = Store(tmp_path / "corral.db")
        await store.open()
        inbox = Inbox(store, Metrics(), push_channels=set())
        await inbox.restore()
        m = (await inbox.accept("s", "q", HTTP, "one")).message
        groups = store.groups
        inbox.reply(m, 0, "answer", "reply")
        await inbox.finish(m, DONE)
        assert store.groups == groups + 1
        assert await inbox.wait_turn(m.id, 1.0) == (True, [(await replies(store, m))[0]])
        assert await store.pending() == []
        await store.close()

    run(body)


def test_a_refused_reply_is_replayed_before_its_finish_is_stored(tmp_path: Path) -> None:
    async def body() -> None:
        store = RefusingStore(tmp_path / "corral.db")
        await store.open()
        inbox = Inbox(store, Metrics(), push_channels=set())
        await inbox.restore()
        replay = asyncio.create_task(inbox.run())
        m = (await inbox.accept("s", "q", HTTP, "two")).message
        store.full = True
        inbox.reply(m, 0, "answer", "reply")
        await inbox.finish(m, DONE)  # does not raise: kept, behind its reply
        assert inbox.unsaved == 2
        assert [p.id for p in await store.pending()] == ["two"]  # no end without the reply
        assert (await store.message(m.id)).state == PENDING  # type: ignore[union-attr]
        assert await replies(store, m) == []
        await asyncio.sleep(0.7)  # a replay tried on the full disk: still refused
        assert await store.pending() != []
        store.full = False
        ended, got = await inbox.wait_turn(m.id, 20.0)
        assert ended and [r.text for r in got] == ["answer"]
        assert [r.text for r in await replies(store, m)] == ["answer"]
        assert await store.pending() == []
        assert inbox.unsaved == 0
        replay.cancel()
        await store.close()

    run(body)


async def replies(store: Store, m: Message) -> list[Reply]:
    return [s.reply for s in await store.replies_for_message(m.id)]
