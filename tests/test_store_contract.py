"""The store contract: every store operation, run against the SQLite store AND the
PostgreSQL store, so "SQLite keeps passing" and "PostgreSQL behaves the same" are the
same tests. A store is made the way `corral serve` makes it: from a config."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from enum import StrEnum
from pathlib import Path
from typing import Any

import msgspec
import pytest

from corral.protocol.types import ERROR, Origin
from corral.supervisor.config import Config, StoreConfig, SupervisorConfig
from corral.supervisor.store import (
    DEAD,
    DELIVERED,
    DONE,
    FAILED,
    FETCHED,
    PENDING,
    Inbound,
    StoreClosed,
)
from corral.supervisor.stores import AnyStore, make_store
from corral.supervisor.storethread import RepliesNotStored
from tests.harness import REPO

HTTP = Origin(channel="http")
HOOK = Origin(channel="hooks", account="acct", chat="room-7", thread="t\x003", user="ann ✓")


class Backend:
    """Stores of one kind on one test's database: `new()` is another store (another
    process's, another node's) on the same data."""

    def __init__(self, kind: str, config: Config) -> None:
        self.kind = kind
        self.config = config

    def new(self) -> AnyStore:
        return make_store(self.config)

    def run(self, body: Callable[[], Awaitable[None]], timeout: float = 60.0) -> None:
        async def bounded() -> None:
            async with asyncio.timeout(timeout):
                await body()

        asyncio.run(bounded())


@pytest.fixture(params=["sqlite", "postgresql"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    url = request.getfixturevalue("pg_url") if request.param == "postgresql" else ""
    config = Config(
        supervisor=SupervisorConfig(state_dir=str(tmp_path / "state")), store=StoreConfig(url=url)
    )
    (tmp_path / "state").mkdir()
    yield Backend(request.param, config)


async def opened(store: AnyStore) -> AnyStore:
    await store.open()
    return store


# ---- inbox


def test_an_accepted_message_reads_back_exactly_as_it_was_sent(backend: Backend) -> None:
    text = "héllo\nwörld \x00 nul, 🙂, 'quotes' \"and\" \\backslashes\\"

    async def body() -> None:
        store = await opened(backend.new())
        acc = await store.accept("alice", text, HOOK, "m-1")
        assert not acc.duplicate
        m = acc.message
        assert (m.id, m.session, m.text, m.origin, m.attempts, m.state) == (
            "m-1",
            "alice",
            text,
            HOOK,
            0,
            PENDING,
        )
        assert await store.pending() == [m]
        await store.close()
        again = await opened(backend.new())  # what a restart finds
        assert await again.pending() == [m]
        await again.close()

    backend.run(body)


def test_an_accept_that_returned_survives_a_kill_9_of_its_process(backend: Backend) -> None:
    """Durable before the accept returns: the process is SIGKILLed right after a batch
    of accepts returned, and a fresh store finds every one of them."""
    child = subprocess.Popen(
        [
            sys.executable,
            "-c",
            _ACCEPTOR,
            backend.config.supervisor.state_dir,
            backend.config.store.url,
        ],
        stdout=subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        text=True,
    )
    returned: list[str] = []
    try:
        assert child.stdout is not None
        while len(returned) < 60:  # ends after 60 accepts returned, or when the child dies
            line = child.stdout.readline()
            if not line:
                break
            returned.append(line.strip())
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(30)
    assert len(returned) == 60, f"the child stopped after {len(returned)} accepts"

    async def body() -> None:
        store = await opened(backend.new())
        found = {m.id for m in await store.pending()}
        assert set(returned) <= found
        await store.close()

    backend.run(body)


# a process that accepts messages in groups of 4 and prints each id once its accept returned
_ACCEPTOR = """
import asyncio, sys
from corral.protocol.types import Origin
from corral.supervisor.config import Config, StoreConfig, SupervisorConfig
from corral.supervisor.stores import make_store

async def main():
    state_dir, url = sys.argv[1:3]
    config = Config(supervisor=SupervisorConfig(state_dir=state_dir), store=StoreConfig(url=url))
    store = make_store(config)
    await store.open()
    n = 0
    while True:
        ids = [f"k{n + i}" for i in range(4)]
        n += 4
        await asyncio.gather(*(store.accept("s", "x", Origin(channel="http"), i) for i in ids))
        print("\\n".join(ids), flush=True)

asyncio.run(main())
"""


def test_the_same_id_twice_is_one_message_and_the_first_one_wins(backend: Backend) -> None:
    async def body() -> None:
        store = await opened(backend.new())
        first = await store.accept("alice", "one", HTTP, "dup")
        second = await store.accept("bob", "two", HOOK, "dup")  # the caller decides on a 409
        assert second.duplicate and second.message == first.message
        assert second.message.session == "alice" and second.message.text == "one"
        assert [m.id for m in await store.pending()] == ["dup"]
        await store.close()

    backend.run(body)


def test_a_message_is_found_by_its_id_without_accepting_anything(backend: Backend) -> None:
    async def body() -> None:
        store = await opened(backend.new())
        first = await store.accept("alice", "one", HOOK, "known")
        assert await store.message("known") == first.message
        assert await store.message("unknown") is None
        assert [m.id for m in await store.pending()] == ["known"]  # the lookup stored nothing
        await store.close()

    backend.run(body)


def test_the_same_ids_from_two_stores_at_once_are_one_message_each(backend: Backend) -> None:
    """Two nodes (or a retry racing its original) accepting the same ids concurrently."""

    async def body() -> None:
        a, b = await opened(backend.new()), await opened(backend.new())
        ids = [f"race-{i}" for i in range(40)]
        results = await asyncio.gather(
            *(s.accept("s", f"from {n}", HTTP, i) for i in ids for n, s in (("a", a), ("b", b)))
        )
        by_id: dict[str, list[Any]] = {}
        for r in results:
            by_id.setdefault(r.message.id, []).append(r)
        for i in ids:
            pair = by_id[i]
            assert sorted(r.duplicate for r in pair) == [False, True]
            assert pair[0].message == pair[1].message
        assert sorted(m.id for m in await a.pending()) == sorted(ids)
        await a.close()
        await b.close()

    backend.run(body)


def test_without_a_client_id_every_accept_is_a_new_message(backend: Backend) -> None:
    async def body() -> None:
        store = await opened(backend.new())
        got = [await store.accept("s", "same text", HTTP, None) for _ in range(3)]
        assert not any(g.duplicate for g in got)
        assert len({g.message.id for g in got}) == 3
        await store.close()

    backend.run(body)


def test_a_new_messages_id_is_a_uuid7_ordered_by_accept_time(backend: Backend) -> None:
    """Time-ordered ids keep the indexes keyed by message id growing at their end."""

    async def body() -> None:
        store = await opened(backend.new())
        ids = []
        for _ in range(5):
            ids.append((await store.accept("s", "t", HTTP, None)).message.id)
            await asyncio.sleep(0.002)  # the order is by millisecond
        await store.close()
        assert ids == sorted(ids) and len(set(ids)) == 5, ids
        for value in ids:
            u = uuid.UUID(value)
            assert value == u.hex and u.version == 7 and u.variant == uuid.RFC_4122, value
            assert abs(int(value[:12], 16) / 1000 - time.time()) < 60, value

    backend.run(body)


def test_pending_keeps_accept_order_and_an_ended_turn_leaves_it(backend: Backend) -> None:
    async def body() -> None:
        store = await opened(backend.new())
        msgs = [(await store.accept(f"s{i % 2}", f"t{i}", HTTP, f"o{i}")).message for i in range(6)]
        assert [m.seq for m in msgs] == sorted({m.seq for m in msgs})  # strictly increasing
        assert await store.pending() == msgs
        await store.finish("o1", DONE)
        await store.finish("o4", FAILED)
        assert [m.id for m in await store.pending()] == ["o0", "o2", "o3", "o5"]
        await store.close()
        again = await opened(backend.new())
        assert [m.id for m in await again.pending()] == ["o0", "o2", "o3", "o5"]
        await again.close()

    backend.run(body)


def test_a_finish_whose_replies_are_not_stored_stores_nothing(backend: Backend) -> None:
    """A finish names the replies submitted before it; it commits only with all of them
    stored, so a reply refused (by a full disk) is never followed by a stored end."""

    async def body() -> None:
        store = await opened(backend.new())
        m = (await store.accept("s", "q", HTTP, "fr-1")).message
        with pytest.raises(RepliesNotStored):
            await store.finish(m.id, DONE, [(0, "reply", "a")])
        with pytest.raises(RepliesNotStored):
            await store.finish(m.id, FAILED, [(0, ERROR, "boom")])
        assert [p.id for p in await store.pending()] == ["fr-1"]  # not finished
        # the reply and the finish queued together: one transaction, and it holds
        reply = store.add_reply(m, 0, "a", "reply")
        await asyncio.gather(reply, store.finish(m.id, DONE, [(0, "reply", "a")]))
        assert await store.pending() == []
        # an error moved past an earlier run's replies is found by its text
        n = (await store.accept("s", "q2", HTTP, "fr-2")).message
        assert await store.add_reply(n, 0, "part", "reply") is not None
        moved = store.add_reply(n, 0, "interrupted", ERROR)
        await asyncio.gather(moved, store.finish(n.id, FAILED, [(0, ERROR, "interrupted")]))
        assert await store.pending() == []
        await store.close()

    backend.run(body)


def test_starts_are_counted_durably_and_an_undone_start_is_taken_back(backend: Backend) -> None:
    async def body() -> None:
        store = await opened(backend.new())
        await store.accept("s", "t", HTTP, "a1")
        assert await store.start_attempt("a1") == 1
        assert await store.start_attempt("a1") == 2
        await store.start_attempt_undone("a1")
        await store.close()
        again = await opened(backend.new())
        assert [m.attempts for m in await again.pending()] == [1]
        await again.start_attempt_undone("a1")
        await again.start_attempt_undone("a1")  # never below zero
        assert [m.attempts for m in await again.pending()] == [0]
        assert await again.start_attempt("a1") == 1
        await again.close()

    backend.run(body)


def test_an_accept_that_starts_counts_the_first_start_and_a_duplicate_counts_none(
    backend: Backend,
) -> None:
    async def body() -> None:
        store = await opened(backend.new())
        first = await store.accept("s", "t", HTTP, "st1", start=True)
        assert first.message.attempts == 1
        again = await store.accept("s", "t", HTTP, "st1", start=True)
        assert again.duplicate and again.message.attempts == 1
        plain = await store.accept("s", "u", HTTP, "st2")
        assert plain.message.attempts == 0
        await store.close()
        reopened = await opened(backend.new())
        assert [m.attempts for m in await reopened.pending()] == [1, 0]  # committed
        assert await reopened.start_attempt("st1") == 2
        await reopened.close()

    backend.run(body)


def test_an_operation_that_fails_fails_alone_in_its_group(backend: Backend) -> None:
    """Operations queued together commit together; one that fails takes nothing else down."""

    async def body() -> None:
        store = await opened(backend.new())
        results = await asyncio.gather(
            store.accept("s", "before", HTTP, "g1"),
            store.start_attempt("no-such-message"),
            store.accept("s", "after", HTTP, "g2"),
            return_exceptions=True,
        )
        assert isinstance(results[1], Exception)
        assert not isinstance(results[0], BaseException) and not results[0].duplicate
        assert not isinstance(results[2], BaseException) and not results[2].duplicate
        await store.close()
        again = await opened(backend.new())
        assert [m.id for m in await again.pending()] == ["g1", "g2"]
        await again.close()

    backend.run(body)


def test_a_burst_of_concurrent_accepts_is_stored_whole(backend: Backend) -> None:
    async def body() -> None:
        store = await opened(backend.new())
        got = await asyncio.gather(
            *(store.accept(f"b{i % 7}", "x", HTTP, f"b-{i}") for i in range(300))
        )
        assert len({g.message.seq for g in got}) == 300
        assert len(await store.pending()) == 300
        await store.close()

    backend.run(body)


def test_a_closed_store_refuses_operations(backend: Backend) -> None:
    async def body() -> None:
        store = await opened(backend.new())
        await store.close()
        with pytest.raises(StoreClosed):
            await store.accept("s", "late", HTTP, "late")

    backend.run(body)


# ---- outbox


def test_a_reply_is_keyed_by_message_and_index_and_carries_the_origin(backend: Backend) -> None:
    async def body() -> None:
        store = await opened(backend.new())
        m = (await store.accept("alice", "q", HOOK, "r-1")).message
        before = time.time()
        r = await store.add_reply(m, 0, "answer \x00 ✓", "reply", push=True)
        assert r is not None
        assert (r.id, r.in_reply_to, r.session, r.index, r.text, r.origin) == (
            "r-1:0",
            "r-1",
            "alice",
            0,
            "answer \x00 ✓",
            HOOK,
        )
        assert await store.add_reply(m, 0, "a rerun's other text", "reply", push=True) is None
        stored = await store.replies_for_message("r-1")
        assert [s.reply for s in stored] == [r]
        assert stored[0].delivery == PENDING and stored[0].attempts == 0
        assert before - 5 <= stored[0].created_at <= time.time() + 5
        await store.close()

    backend.run(body)


def test_an_error_on_an_index_an_earlier_run_holds_goes_after_the_others(backend: Backend) -> None:
    async def body() -> None:
        store = await opened(backend.new())
        m = (await store.accept("s", "q", HTTP, "e-1")).message
        assert await store.add_reply(m, 0, "part", "reply") is not None
        first = await store.add_reply(m, 1, "boom", ERROR)
        assert first is not None and first.id == "e-1:1"
        assert await store.add_reply(m, 1, "boom", ERROR) is None  # the same error again
        moved = await store.add_reply(m, 0, "interrupted", ERROR)  # index 0 holds "part"
        assert moved is not None and (moved.id, moved.index) == ("e-1:2", 2)
        texts = [
            (s.reply.index, s.reply.text, s.reply.kind)
            for s in await store.replies_for_message("e-1")
        ]
        assert texts == [(0, "part", "reply"), (1, "boom", ERROR), (2, "interrupted", ERROR)]
        await store.close()

    backend.run(body)


def test_replies_queued_without_awaiting_commit_in_call_order(backend: Backend) -> None:
    async def body() -> None:
        store = await opened(backend.new())
        m = (await store.accept("s", "q", HTTP, "c-1")).message
        futures = [store.add_reply(m, i, f"r{i}", "reply") for i in range(25)]
        assert all(r is not None for r in await asyncio.gather(*futures))
        stored = await store.replies_after("s", "http", 0, 100)
        assert [s.reply.text for s in stored] == [f"r{i}" for i in range(25)]
        assert [s.cursor for s in stored] == sorted({s.cursor for s in stored})
        await store.close()

    backend.run(body)


def test_replies_after_pages_one_sessions_channel_by_cursor(backend: Backend) -> None:
    async def body() -> None:
        store = await opened(backend.new())
        a = (await store.accept("a", "q", HTTP, "pa")).message
        b = (await store.accept("b", "q", HTTP, "pb")).message
        hook = (await store.accept("a", "q", HOOK, "ph")).message
        for i in range(5):
            await store.add_reply(a, i, f"a{i}", "reply")
            await store.add_reply(b, i, f"b{i}", "reply")
            await store.add_reply(hook, i, f"h{i}", "reply", push=True)
        page = await store.replies_after("a", "http", 0, 2)
        assert [s.reply.text for s in page] == ["a0", "a1"]
        assert all(s.delivery == FETCHED for s in page)
        rest = await store.replies_after("a", "http", page[-1].cursor, 100)
        assert [s.reply.text for s in rest] == ["a2", "a3", "a4"]
        assert await store.replies_after("a", "http", rest[-1].cursor, 100) == []
        assert [s.reply.text for s in await store.replies_after("a", "hooks", 0, 100)] == [
            f"h{i}" for i in range(5)
        ]
        await store.close()

    backend.run(body)


def test_a_sessions_later_replies_wait_behind_its_undelivered_one(backend: Backend) -> None:
    async def body() -> None:
        store = await opened(backend.new())
        s1 = (await store.accept("s1", "q", HOOK, "d1")).message
        s2 = (await store.accept("s2", "q", HOOK, "d2")).message
        other = (await store.accept("s3", "q", Origin(channel="ops"), "d3")).message
        for i in range(2):
            await store.add_reply(s1, i, f"s1-{i}", "reply", push=True)
        await store.add_reply(s2, 0, "s2-0", "reply", push=True)
        await store.add_reply(other, 0, "ops-0", "reply", push=True)
        now = time.time()

        async def due() -> list[str]:
            return [r.reply.id for r in await store.due_deliveries("hooks", now, 100)]

        assert await due() == ["d1:0", "d2:0"]
        retry_at = now + 60
        await store.mark_delivery("d1:0", PENDING, 1, retry_at, "HTTP 503")
        assert await due() == ["d2:0"]  # d1:1 waits behind d1:0
        assert await store.next_due("hooks") == 0.0  # d2:0 is due now
        await store.mark_delivery("d2:0", DELIVERED, 1)
        assert await store.next_due("hooks") == pytest.approx(retry_at)
        assert [r.reply.id for r in await store.due_deliveries("hooks", retry_at, 100)] == ["d1:0"]
        await store.mark_delivery("d1:0", DELIVERED, 2)
        assert await due() == ["d1:1"]
        await store.mark_delivery("d1:1", DEAD, 1, error="HTTP 400: not retried")
        assert await due() == [] and await store.next_due("hooks") is None
        states = {
            r.reply.id: (r.delivery, r.attempts) for r in await store.replies_for_message("d1")
        }
        assert states == {"d1:0": (DELIVERED, 2), "d1:1": (DEAD, 1)}
        assert [r.reply.id for r in await store.due_deliveries("ops", now, 100)] == ["d3:0"]
        assert len(await store.due_deliveries("hooks", now, 1)) <= 1
        await store.close()

    backend.run(body)


def test_replies_for_channels_no_longer_configured_are_dead_lettered(backend: Backend) -> None:
    async def body() -> None:
        store = await opened(backend.new())
        for n, origin in enumerate([HOOK, Origin(channel="ops"), Origin(channel="ops"), HTTP]):
            m = (await store.accept("s", "q", origin, f"u{n}")).message
            await store.add_reply(m, 0, "r", "reply", push=origin.channel != "http")
        assert await store.dead_letter_unrouted(["hooks"]) == 2
        states = {}
        for n in range(4):
            states.update(
                {r.reply.id: r.delivery for r in await store.replies_for_message(f"u{n}")}
            )
        assert states == {"u0:0": PENDING, "u1:0": DEAD, "u2:0": DEAD, "u3:0": FETCHED}
        assert await store.dead_letter_unrouted([]) == 1  # no channel left: hooks too
        assert await store.due_deliveries("hooks", time.time(), 10) == []
        await store.close()

    backend.run(body)


# ---- sessions


class Reason(StrEnum):
    CRASHED = "crashed"
    RSS_LIMIT = "rss_limit"


def test_abnormal_exits_and_quarantine_are_remembered_across_restarts(backend: Backend) -> None:
    async def body() -> None:
        store = await opened(backend.new())
        assert await store.session_records() == {}
        await store.record_abnormal_exit("flaky", Reason.CRASHED)
        await store.record_abnormal_exit("flaky", Reason.RSS_LIMIT)
        until = time.time() + 600
        await store.set_quarantine("flaky", until)
        await store.set_quarantine("calm", None)  # lifting what is not there adds nothing
        await store.close()
        again = await opened(backend.new())
        records = await again.session_records()
        assert set(records) == {"flaky"}
        r = records["flaky"]
        assert (r.restarts, r.last_exit) == (2, "rss_limit")
        assert r.quarantined_until == pytest.approx(until)
        await again.set_quarantine("flaky", None)
        await again.set_quarantine("new", until)
        records = await again.session_records()
        assert records["flaky"].quarantined_until is None and records["flaky"].restarts == 2
        assert (records["new"].restarts, records["new"].last_exit) == (0, None)
        await again.close()

    backend.run(body)


# ---- operators' queries


def test_session_summaries_know_every_session_with_messages_or_a_record(backend: Backend) -> None:
    async def body() -> None:
        store = await opened(backend.new())
        assert await store.session_summaries() == []
        before = time.time()
        for i in range(3):
            await store.accept("talky", f"t{i}", HTTP, f"st{i}")
        await store.accept("once", "t", HOOK, "so")
        await store.record_abnormal_exit("talky", Reason.CRASHED)
        await store.set_quarantine("ghost", time.time() + 60)  # a record, no message
        await store.close()
        again = await opened(backend.new())
        rows = {r.session: r for r in await again.session_summaries()}
        assert list(rows) == ["ghost", "once", "talky"]  # by key
        talky = rows["talky"]
        assert (talky.messages, talky.restarts, talky.last_exit) == (3, 1, "crashed")
        assert talky.last_message_at is not None
        assert before - 5 <= talky.last_message_at <= time.time() + 5
        assert talky.quarantined_until is None
        assert (rows["once"].messages, rows["once"].restarts, rows["once"].last_exit) == (
            1,
            0,
            None,
        )
        ghost = rows["ghost"]
        assert (ghost.messages, ghost.last_message_at) == (0, None)
        assert ghost.quarantined_until is not None
        assert await again.session_summaries("talky") == [talky]
        assert await again.session_summaries("nobody") == []
        await again.close()

    backend.run(body)


def test_history_is_a_sessions_last_messages_oldest_first_with_their_replies(
    backend: Backend,
) -> None:
    async def body() -> None:
        store = await opened(backend.new())
        for i in range(4):
            m = (await store.accept("h", f"q{i}", HOOK, f"h{i}")).message
            await store.add_reply(m, 0, f"a{i}", "reply", push=True)
            if i == 1:
                await store.add_reply(m, 1, "boom \x00", ERROR, push=True)
            await store.finish(m.id, FAILED if i == 1 else DONE)
        await store.accept("other", "not mine", HTTP, "x0")
        await store.accept("h", "still running", HTTP, "h4")
        items = await store.history("h", 3)
        assert [i.message.id for i in items] == ["h2", "h3", "h4"]
        assert [i.message.state for i in items] == [DONE, DONE, PENDING]
        assert [[r.reply.text for r in i.replies] for i in items] == [["a2"], ["a3"], []]
        assert items[0].accepted_at <= items[2].accepted_at
        assert items[0].finished_at is not None and items[2].finished_at is None
        whole = await store.history("h", 100)
        assert [i.message.text for i in whole] == ["q0", "q1", "q2", "q3", "still running"]
        assert [(r.reply.text, r.reply.kind) for r in whole[1].replies] == [
            ("a1", "reply"),
            ("boom \x00", ERROR),
        ]
        assert await store.history("nobody", 10) == []
        await store.close()

    backend.run(body)


def test_dead_letters_are_listed_and_a_retry_puts_them_back_due_now(backend: Backend) -> None:
    async def body() -> None:
        store = await opened(backend.new())
        for n, origin in enumerate([HOOK, HOOK, Origin(channel="gone"), HOOK]):
            m = (await store.accept(f"s{n}", "q", origin, f"dl{n}")).message
            await store.add_reply(m, 0, f"r{n} \x00", "reply", push=True)
        await store.mark_delivery("dl0:0", DEAD, 5, error="HTTP 503: gave up after 5 attempts")
        await store.mark_delivery("dl1:0", DEAD, 1, error="HTTP 400: not retried")
        await store.mark_delivery("dl2:0", DEAD, 2, error="channel not configured")
        await store.mark_delivery("dl3:0", DELIVERED, 1)
        dead = await store.dead_letters(100)
        assert [(d.reply.id, d.reply.origin.channel, d.attempts) for d in dead] == [
            ("dl0:0", "hooks", 5),
            ("dl1:0", "hooks", 1),
            ("dl2:0", "gone", 2),
        ]
        assert dead[0].last_error == "HTTP 503: gave up after 5 attempts"
        assert dead[0].reply.text == "r0 \x00" and dead[0].reply.origin == HOOK
        assert [d.reply.id for d in await store.dead_letters(1)] == ["dl0:0"]

        now = time.time()
        # only dead replies of configured channels; unknown and delivered ids are left alone
        back = await store.retry_dead_letters(["dl1:0", "dl2:0", "dl3:0", "nope"], ["hooks"])
        assert [r.reply.id for r in back] == ["dl1:0"]
        assert back[0].attempts == 0 and back[0].delivery == PENDING
        assert [r.reply.id for r in await store.due_deliveries("hooks", now, 10)] == ["dl1:0"]
        assert await store.retry_dead_letters([], ["hooks"]) == []
        assert [r.reply.id for r in await store.retry_dead_letters(None, ["hooks"])] == ["dl0:0"]
        assert [d.reply.id for d in await store.dead_letters(100)] == ["dl2:0"]
        assert sorted(r.reply.id for r in await store.due_deliveries("hooks", now, 10)) == [
            "dl0:0",
            "dl1:0",
        ]
        assert await store.retry_dead_letters(None, []) == []
        await store.close()

    backend.run(body)


# ---- polling channels (Telegram)

TG = Origin(channel="telegram", account="main", chat="-1001", thread="9", user="42")


def polled(update_id: int, text: str = "") -> Inbound:
    return Inbound(
        id=f"telegram:main:{update_id}",
        session="telegram:main:-1001",
        text=text or f"u{update_id}",
        origin=TG,
    )


def test_a_polled_batch_and_its_offset_commit_together_and_a_refetch_is_one_message(
    backend: Backend,
) -> None:
    async def body() -> None:
        store = await opened(backend.new())
        assert await store.channel_offset("telegram:main") is None
        first = await store.accept_batch("telegram:main", 13, [polled(11, "a \x00 🙂"), polled(12)])
        assert [a.duplicate for a in first] == [False, False]
        # fetched again (the offset had not reached Telegram): the same messages, once
        again = await store.accept_batch("telegram:main", 14, [polled(12, "other"), polled(13)])
        assert [a.duplicate for a in again] == [True, False]
        assert again[0].message == first[1].message
        await store.close()
        reopened = await opened(backend.new())
        assert await reopened.channel_offset("telegram:main") == 14
        assert await reopened.channel_offset("telegram:other") is None
        pending = await reopened.pending()
        assert [m.id for m in pending] == [f"telegram:main:{i}" for i in (11, 12, 13)]
        assert (pending[0].text, pending[0].origin) == ("a \x00 🙂", TG)
        await reopened.close()

    backend.run(body)


def test_a_polled_batch_that_fails_writes_neither_messages_nor_offset(backend: Backend) -> None:
    async def body() -> None:
        store = await opened(backend.new())
        await store.accept_batch("telegram:main", 11, [polled(10)])
        bad = Inbound(id="telegram:main:11", session="s", text="x", origin=TG)
        bad = msgspec.structs.replace(bad, text=None)  # type: ignore[arg-type]
        with pytest.raises(Exception):  # noqa: B017 (the driver's own error type)
            await store.accept_batch("telegram:main", 99, [polled(12), bad])
        assert await store.channel_offset("telegram:main") == 11
        assert [m.id for m in await store.pending()] == ["telegram:main:10"]
        await store.close()

    backend.run(body)


def test_parts_of_a_reply_sent_are_remembered_until_forgotten(backend: Backend) -> None:
    async def body() -> None:
        store = await opened(backend.new())
        assert await store.reply_parts_sent("r-1") == 0
        await store.set_reply_parts_sent("r-1", 1)
        await store.set_reply_parts_sent("r-1", 2)
        await store.close()
        reopened = await opened(backend.new())
        assert await reopened.reply_parts_sent("r-1") == 2
        await reopened.set_reply_parts_sent("r-1", 0)
        assert await reopened.reply_parts_sent("r-1") == 0
        await reopened.close()

    backend.run(body)


# ---- retention


def test_prune_deletes_finished_settled_messages_with_their_replies_only(backend: Backend) -> None:
    async def body() -> None:
        store = await opened(backend.new())
        done = (await store.accept("a", "q", HTTP, "old-done")).message
        failed = (await store.accept("a", "q", HTTP, "old-failed")).message
        waiting = (await store.accept("b", "q", HOOK, "old-undelivered")).message
        dead = (await store.accept("b", "q", HOOK, "old-dead")).message
        await store.accept("a", "q", HTTP, "still-pending")
        await store.add_reply(done, 0, "r", "reply")
        await store.add_reply(failed, 0, "e", ERROR)
        await store.add_reply(waiting, 0, "w", "reply", push=True)
        await store.add_reply(dead, 0, "d", "reply", push=True)
        await store.set_reply_parts_sent("old-dead:0", 1)
        await store.mark_delivery("old-dead:0", DEAD, 3, error="HTTP 400")
        for m, state in ((done, DONE), (failed, FAILED), (waiting, DONE), (dead, DONE)):
            await store.finish(m.id, state)
        recent = (await store.accept("a", "q", HTTP, "recent")).message
        await store.add_reply(recent, 0, "new", "reply")
        cutoff = time.time()
        await asyncio.sleep(0.05)
        await store.finish(recent.id, DONE)

        assert await store.prune(cutoff, 1) == 1  # in batches of the size asked for
        assert await store.prune(cutoff, 100) == 2
        assert await store.prune(cutoff, 100) == 0
        assert await store.replies_for_message("old-done") == []
        assert await store.replies_for_message("old-dead") == []
        assert await store.reply_parts_sent("old-dead:0") == 0
        assert [r.reply.text for r in await store.replies_for_message("old-undelivered")] == ["w"]
        assert [m.id for m in await store.pending()] == ["still-pending"]
        assert [r.reply.id for r in await store.replies_after("a", "http", 0, 100)] == ["recent:0"]
        # delivered at last: pruned on the next pass; a pruned id is free again
        await store.mark_delivery("old-undelivered:0", DELIVERED, 1)
        assert await store.prune(cutoff, 100) == 1
        again = await store.accept("a", "q", HTTP, "old-done")
        assert not again.duplicate
        await store.close()

    backend.run(body)


def test_a_retried_dead_letter_remembers_when_it_was_retried(backend: Backend) -> None:
    async def body() -> None:
        store = await opened(backend.new())
        m = (await store.accept("s", "q", HOOK, "rt")).message
        await store.add_reply(m, 0, "r", "reply", push=True)
        await store.mark_delivery("rt:0", DEAD, 3, error="HTTP 503")
        due = await store.due_deliveries("hooks", time.time(), 10)
        assert due == []
        before = time.time()
        (back,) = await store.retry_dead_letters(None, ["hooks"])
        assert back.retried_at is not None and back.retried_at >= before - 1
        assert back.created_at <= back.retried_at and back.age_from == back.retried_at
        (due_now,) = await store.due_deliveries("hooks", time.time(), 10)
        assert due_now.retried_at == back.retried_at
        await store.close()

    backend.run(body)


def test_a_reply_keeps_the_markup_the_agent_asked_for(backend: Backend) -> None:
    async def body() -> None:
        store = await opened(backend.new())
        m = (await store.accept("s", "q", HOOK, "mk")).message
        await store.add_reply(m, 0, "<b>x</b>", "reply", push=True, markup="html")
        await store.add_reply(m, 1, "plain", "reply", push=True)
        got = [(r.reply.text, r.reply.markup) for r in await store.replies_for_message("mk")]
        assert got == [("<b>x</b>", "html"), ("plain", "")]
        (due, *_) = await store.due_deliveries("hooks", time.time(), 10)  # in order
        assert (due.reply.text, due.reply.markup) == ("<b>x</b>", "html")
        await store.close()

    backend.run(body)
