"""The store's half of Telegram durability: messages and the channel offset in one transaction."""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from corral.protocol.types import Origin
from corral.supervisor.store import Inbound, Store

ORIGIN = Origin(channel="telegram", account="main", chat="42", user="42")


def inbound(update_id: int, session: str = "telegram:main:42") -> Inbound:
    return Inbound(
        id=f"telegram:main:{update_id}", session=session, text=f"u{update_id}", origin=ORIGIN
    )


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 60))


def test_batch_and_offset_are_stored_together_and_a_refetch_is_one_message(tmp_path):
    async def main() -> None:
        store = Store(tmp_path / "db")
        await store.open()
        try:
            assert await store.channel_offset("telegram:main") is None
            first = await store.accept_batch("telegram:main", 13, [inbound(11), inbound(12)])
            assert [a.duplicate for a in first] == [False, False]
            assert await store.channel_offset("telegram:main") == 13
            # fetched again after a crash before the offset reached Telegram
            again = await store.accept_batch("telegram:main", 14, [inbound(12), inbound(13)])
            assert [a.duplicate for a in again] == [True, False]
            assert again[0].message.id == first[1].message.id
            assert await store.channel_offset("telegram:main") == 14
            assert await store.channel_offset("telegram:other") is None
            pending = await store.pending()
            assert [m.id for m in pending] == [f"telegram:main:{i}" for i in (11, 12, 13)]
            assert pending[0].origin == ORIGIN
        finally:
            await store.close()

    run(main())


def test_a_batch_that_fails_writes_neither_messages_nor_offset(tmp_path):
    async def main() -> None:
        store = Store(tmp_path / "db")
        await store.open()
        try:
            await store.accept_batch("telegram:main", 11, [inbound(10)])
            bad = Inbound(id="telegram:main:12", session="s", text=None, origin=ORIGIN)  # type: ignore[arg-type]
            with pytest.raises(sqlite3.IntegrityError):
                await store.accept_batch("telegram:main", 13, [inbound(11), bad])
            assert await store.channel_offset("telegram:main") == 11
            assert [m.id for m in await store.pending()] == ["telegram:main:10"]
        finally:
            await store.close()

    run(main())


def test_reply_parts_sent_are_remembered_and_forgotten(tmp_path):
    async def main() -> None:
        store = Store(tmp_path / "db")
        await store.open()
        try:
            assert await store.reply_parts_sent("m:0") == 0
            await store.set_reply_parts_sent("m:0", 2)
            assert await store.reply_parts_sent("m:0") == 2
            await store.set_reply_parts_sent("m:0", 0)
            assert await store.reply_parts_sent("m:0") == 0
        finally:
            await store.close()

    run(main())


WRITER = """
import asyncio, sys
from pathlib import Path
from corral.protocol.types import Origin
from corral.supervisor.store import Inbound, Store

async def main():
    store = Store(Path(sys.argv[1]))
    await store.open()
    offset = await store.channel_offset("telegram:main") or 1
    origin = Origin(channel="telegram", account="main", chat="42")
    while True:  # ends when the test kills this process
        batch = [Inbound(id=f"telegram:main:{offset + i}", session="telegram:main:42",
                         text="x" * 200, origin=origin) for i in range(7)]
        # a few accepts in flight at once, as the poller and the store's group commits see them
        await store.accept_batch("telegram:main", offset + 7, batch)
        offset += 7
        print(offset, flush=True)

asyncio.run(main())
"""


def test_kill_9_never_leaves_the_offset_ahead_of_the_messages(tmp_path: Path):
    db = tmp_path / "corral.db"
    script = tmp_path / "writer.py"
    script.write_text(WRITER)
    for round_ in range(6):
        proc = subprocess.Popen(
            [sys.executable, str(script), str(db)], stdout=subprocess.PIPE, text=True
        )
        try:
            assert proc.stdout is not None
            for _ in range(3 + round_ * 5):  # kill at a different point each round
                line = proc.stdout.readline()
                assert line, "writer ended early"
            time.sleep(0.003 * round_)
        finally:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(10)
            if proc.stdout is not None:
                proc.stdout.close()
        conn = sqlite3.connect(db)
        try:
            (offset,) = conn.execute(
                "SELECT next_offset FROM channel_offsets WHERE name = 'telegram:main'"
            ).fetchone()
            ids = sorted(
                int(i.rsplit(":", 1)[1]) for (i,) in conn.execute("SELECT id FROM messages")
            )
        finally:
            conn.close()
        # every update below the offset is stored, and none at or above it
        assert ids == list(range(1, offset)), f"round {round_}: offset {offset}, ids {ids[-10:]}"


def test_a_batch_whose_accept_was_cut_off_after_its_commit_is_queued_when_fetched_again(tmp_path):
    """The poller's accept can be cancelled (its timeout, a restart) after the store
    committed: the refetch finds the messages stored but never queued, and queues them,
    once."""
    from corral.supervisor.inbox import Inbox
    from corral.supervisor.metrics import Metrics
    from corral.supervisor.store import DONE

    async def main() -> None:
        store = Store(tmp_path / "db")
        await store.open()
        try:
            inbox = Inbox(store, Metrics(), push_channels={"telegram"})
            await inbox.restore()
            cut = asyncio.create_task(inbox.accept_batch("telegram:main", 12, [inbound(11)]))
            await asyncio.sleep(0)  # submitted to the store thread
            cut.cancel()
            assert await store.channel_offset("telegram:main") == 12  # committed anyway
            assert cut.cancelled() and inbox.pending == 0
            again = await inbox.accept_batch("telegram:main", 12, [inbound(11)])
            assert [m.id for m in again] == ["telegram:main:11"] and inbox.pending == 1
            assert await inbox.accept_batch("telegram:main", 12, [inbound(11)]) == []  # known
            await inbox.finish(again[0], DONE)
            assert await inbox.accept_batch("telegram:main", 12, [inbound(11)]) == []  # answered
        finally:
            await store.close()

    run(main())
