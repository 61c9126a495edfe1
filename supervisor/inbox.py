"""The inbox side of the supervisor: messages accepted and finished, replies stored and
announced, and everything that waits on them (?wait, the replies long-poll).

The store holds the truth. In memory there is only what a waiter needs: a future per
unfinished message, the replies of turns whose every reply passed through here, and
wake-ups for long-polls. Replies are submitted to the store in the order the worker
sent them and before the turn's finish, so a finished turn's replies are committed.

When the store cannot write (a full disk), a reply or finish it refused is kept here and
replayed in order by `run` until it is taken, so every accepted message is answered once
space returns, without a restart; a turn's start waits for the store the same way.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter, deque
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from typing import Any

from corral.protocol.types import ERROR, Origin, Reply
from corral.supervisor.metrics import Metrics
from corral.supervisor.store import FAILED, PENDING, Accepted, Inbound, Message, StoredReply
from corral.supervisor.stores import AnyStore
from corral.supervisor.storethread import (
    LeaseLost,
    RepliesNotStored,
    StoreBroken,
    StoreError,
    StoreUnavailable,
)

log = logging.getLogger("corral.supervisor")

RETRY_FIRST = 0.5  # seconds before a write the store refused is tried again; doubles
RETRY_MAX = 5.0


@dataclass
class Unsaved:
    """A write the store refused (disk full), to replay: a reply, or (index None) a finish."""

    message: Message
    index: int | None = None
    text: str = ""
    kind: str = ""
    state: str = ""
    markup: str = ""


class ReplyWakeups:
    """Per (channel, session) wake-ups for long-polls: `watch` gives a future that the
    next `notify` completes; the entry goes away when its last watcher leaves."""

    def __init__(self) -> None:
        self._futures: dict[tuple[str, str], asyncio.Future[None]] = {}
        self._watchers: dict[tuple[str, str], int] = {}

    @contextmanager
    def watch(self, channel: str, session: str) -> Iterator[asyncio.Future[None]]:
        key = (channel, session)
        fut = self._futures.get(key)
        if fut is None:
            fut = self._futures[key] = asyncio.get_running_loop().create_future()
        self._watchers[key] = self._watchers.get(key, 0) + 1
        try:
            yield fut
        finally:
            self._watchers[key] -= 1
            if not self._watchers[key]:
                del self._watchers[key]
                self._futures.pop(key, None)  # whichever future is current: nobody waits

    def notify(self, channel: str, session: str) -> None:
        fut = self._futures.pop((channel, session), None)
        if fut is not None and not fut.done():
            fut.set_result(None)


class Inbox:
    def __init__(self, store: AnyStore, metrics: Metrics, push_channels: set[str]) -> None:
        self.store = store
        self.metrics = metrics
        # replies to these channels are pushed by the outbox; every other channel's
        # replies are fetched, so for them stored is delivered
        self.push_channels = push_channels
        self.wakeups = ReplyWakeups()
        self.listeners: list[Callable[[Reply], None]] = []  # told of every new reply
        # told when a message's turn starts, and when it stops running (ended, or put
        # back): Telegram's "typing…"
        self.on_start: list[Callable[[Message], None]] = []
        self.on_stop: list[Callable[[Message], None]] = []
        self._ended: dict[str, asyncio.Future[list[Reply] | None]] = {}  # unfinished turns
        # replies of turns first run in this process: every one of their replies passes
        # through here (a re-run's earlier replies are only in the store)
        self._replies: dict[str, list[Reply]] = {}
        self._closing: asyncio.Future[None] | None = None
        # replies submitted and not settled yet, per message
        self._inflight: dict[str, dict[asyncio.Future[Reply | None], Unsaved]] = {}
        self._unsaved: deque[Unsaved] = deque()  # refused writes, in the order made
        self._unsaved_by: Counter[str] = Counter()  # message id -> refused writes of it
        self._retry = asyncio.Event()  # something to replay
        # messages whose first start the store counted with their accept, not yet used
        self._counted: set[str] = set()

    @property
    def pending(self) -> int:
        """Accepted messages whose turn has not ended."""
        return len(self._ended)

    async def restore(self) -> list[Message]:
        """The messages the last run left unfinished, in accept order."""
        loop = asyncio.get_running_loop()
        self._closing = loop.create_future()
        pending = await self.store.pending()
        for message in pending:
            self._ended[message.id] = loop.create_future()
        self.metrics.inbox_depth.set(len(pending))
        return pending

    def adopt(self, messages: Sequence[Message]) -> None:
        """Unfinished messages this node took over (a cluster's claim): known here now."""
        loop = asyncio.get_running_loop()
        for m in messages:
            if m.id not in self._ended:
                self._ended[m.id] = loop.create_future()
                self.metrics.inbox_depth.inc()

    def ended_elsewhere(self, message_id: str) -> None:
        """Another node ended the message's turn: a ?wait here answers from the store."""
        fut = self._ended.pop(message_id, None)
        self._replies.pop(message_id, None)
        if fut is not None:
            self.metrics.inbox_depth.dec()
            if not fut.done():
                fut.set_result(None)

    def unfinished(self) -> list[str]:
        """The ids of messages known here whose turn has not ended."""
        return list(self._ended)

    async def accept(
        self, session: str, text: str, origin: Origin, client_id: str | None, start: bool = False
    ) -> Accepted:
        """Store a message durably; a duplicate client id gives back the first one.

        `start`: its turn will most likely run at once (the session's worker is idle), so
        the store counts that start with the accept, in one commit; the first
        `start_attempt` of the message then uses that count instead of committing again.
        """
        accepted = await self.store.accept(session, text, origin, client_id, start=start)
        m = accepted.message
        if accepted.duplicate and m.state == PENDING and m.id not in self._ended:
            # accepted by another node (of a cluster) that may be gone: ?wait here too
            self._ended[m.id] = asyncio.get_running_loop().create_future()
            self.metrics.inbox_depth.inc()
        if not accepted.duplicate:
            self.metrics.accepted.labels(origin.channel).inc()
            self.metrics.inbox_depth.inc()
            self._ended[accepted.message.id] = asyncio.get_running_loop().create_future()
            self._replies[accepted.message.id] = []
            if start:
                self._counted.add(accepted.message.id)
        return accepted

    async def accept_batch(
        self, cursor: str, next_offset: int, inbound: Sequence[Inbound]
    ) -> list[Message]:
        """Store a polled batch and its channel cursor in one transaction; the messages
        whose turns are to be queued: the new ones, and those an earlier accept of the
        same batch stored but was cut off (cancelled) before it could say so."""
        loop = asyncio.get_running_loop()
        out = []
        for accepted in await self.store.accept_batch(cursor, next_offset, inbound):
            m = accepted.message
            if accepted.duplicate and (m.state != PENDING or m.id in self._ended):
                continue  # answered, or known here (queued or running)
            self.metrics.accepted.labels(m.origin.channel).inc()
            self.metrics.inbox_depth.inc()
            self._ended[m.id] = loop.create_future()
            if not accepted.duplicate:
                self._replies[m.id] = []
            out.append(m)
        return out

    def counted_start(self, message: Message) -> int | None:
        """The message's first start if it was counted, and committed, with its accept
        (then used up: the attempt); else None, and `start_attempt` counts it."""
        if message.id not in self._counted:
            return None
        self._counted.discard(message.id)
        for listener in self.on_start:
            listener(message)
        return message.attempts

    async def start_attempt(self, message: Message) -> int:
        """Count a start of the message's turn. While the store cannot write this waits for
        it (the message must not run uncounted); at drain it raises StoreUnavailable."""
        if (attempt := self.counted_start(message)) is not None:
            return attempt
        delay = RETRY_FIRST
        while True:  # ends when the store takes the write, or when the supervisor stops
            try:
                attempt = await self.store.start_attempt(message.id)
                break
            except StoreUnavailable:
                if self._closing is None or self._closing.done():
                    raise
                closing = asyncio.ensure_future(asyncio.shield(self._closing))
                try:
                    await asyncio.wait([closing], timeout=delay)
                finally:
                    closing.cancel()
                delay = min(delay * 2, RETRY_MAX)
        for listener in self.on_start:
            listener(message)
        return attempt

    async def undo_start(self, message: Message) -> None:
        """The attempt did not run (stopped before it began, or a drain): not counted."""
        self._stopped(message)
        try:
            await self.store.start_attempt_undone(message.id)
        except (StoreUnavailable, StoreBroken) as e:  # one start too many counted: harmless
            log.warning("session %s: a start not run stays counted: %s", message.session, e)

    def _stopped(self, message: Message) -> None:
        for listener in self.on_stop:
            listener(message)

    def reply(self, message: Message, index: int, text: str, kind: str, markup: str = "") -> None:
        """Submit a reply to the origin of `message`, and nowhere else. Not awaited: it is
        announced once committed, and the turn's finish, submitted later, commits no
        earlier (and not at all without it)."""
        if self._unsaved_by[message.id]:  # after its earlier refused writes, in order
            self._keep(Unsaved(message, index, text, kind, markup=markup))
            return
        push = message.origin.channel in self.push_channels
        fut = self.store.add_reply(message, index, text, kind, push=push, markup=markup)
        write = Unsaved(message, index, text, kind, markup=markup)
        self._inflight.setdefault(message.id, {})[fut] = write
        fut.add_done_callback(partial(self._stored, write))

    async def fail(self, message: Message, index: int, text: str) -> None:
        """Answer `message` with an error reply and close it."""
        self.reply(message, index, text, ERROR)
        await self.finish(message, FAILED)

    async def finish(self, message: Message, state: str) -> None:
        """The message leaves the inbox: its turn has ended with `state`. If the store
        refuses (disk full), the finish is kept and replayed by `run`; this never raises
        for that, so the session moves on."""
        self._stopped(message)
        self._counted.discard(message.id)  # answered without running (a quarantine)
        # Submitted right behind its replies, not after their commit: the finish checks,
        # in its own transaction, that they are stored, so a reply and the turn's end
        # share one commit, and a refused reply is never followed by a stored finish.
        # Their outcome is handled (a refused one kept) before this await returns: the
        # store settles futures in submission order.
        inflight = self._inflight.pop(message.id, {})
        expected = [(w.index or 0, w.kind, w.text) for w in inflight.values()]
        if not self._unsaved_by[message.id]:
            try:
                await self.store.finish(message.id, state, expected)
            except RepliesNotStored:
                if not self._unsaved_by[message.id]:
                    # not refused by the disk but failed otherwise (logged): as before
                    # the check, the turn still ends
                    return await self.finish_unchecked(message, state)
            except (StoreUnavailable, StoreBroken, LeaseLost) as e:
                return self._refused(message, state, e)
            else:
                return self._finished(message)
        self._keep(Unsaved(message, state=state))

    async def finish_unchecked(self, message: Message, state: str) -> None:
        """Finish `message` whatever became of its replies (they failed and were logged)."""
        try:
            await self.store.finish(message.id, state)
        except (StoreUnavailable, StoreBroken, LeaseLost) as e:
            self._refused(message, state, e)
        else:
            self._finished(message)

    def _refused(self, message: Message, state: str, error: StoreError) -> None:
        """A finish the store refused: kept for the replay when the disk is full; let go
        when another node holds the session now; logged when the supervisor is stopping
        (a broken store: nothing survives now)."""
        if isinstance(error, StoreUnavailable):
            self._keep(Unsaved(message, state=state))
        elif isinstance(error, LeaseLost):
            self._taken_over(message)
        else:
            log.error("session %s: message %s not finished: %s", message.session, message.id, error)

    def _taken_over(self, message: Message) -> None:
        """A turn's end refused here because another node holds its session now: that
        node runs the turn again, and a ?wait here is answered when it ends there (the
        cluster's remote waits). Not a failure of the session or of its worker."""
        log.warning(
            "session %s: held by another node now; the end of message %s is not written "
            "here (that node runs its turn again)",
            message.session,
            message.id,
        )

    def _finished(self, message: Message) -> None:
        self.metrics.inbox_depth.dec()
        fut = self._ended.pop(message.id, None)
        replies = self._replies.pop(message.id, None)
        if fut is not None and not fut.done():
            fut.set_result(replies)

    def _keep(self, write: Unsaved) -> None:
        self._unsaved.append(write)
        self._unsaved_by[write.message.id] += 1
        self._retry.set()

    def _stored(self, write: Unsaved, fut: asyncio.Future[Reply | None]) -> None:
        message = write.message
        if (inflight := self._inflight.get(message.id)) is not None:
            inflight.pop(fut, None)
            if not inflight:
                del self._inflight[message.id]
        if fut.cancelled():
            return
        if (error := fut.exception()) is not None:
            if isinstance(error, StoreUnavailable):
                self._keep(write)
                return
            if isinstance(error, LeaseLost):  # the turn's end says so, once
                return
            log.error("session %s: a reply could not be stored: %s", message.session, error)
            return
        self._announce(message, write.kind, fut.result())

    def _announce(self, message: Message, kind: str, reply: Reply | None) -> None:
        if reply is None:
            return  # shown already, by an earlier run of the same turn
        if kind == ERROR:
            log.warning("session %s: %s", message.session, reply.text)
        channel = message.origin.channel
        if channel not in self.push_channels:
            self.metrics.delivered.labels(channel).inc()  # the client fetches it
        self.wakeups.notify(channel, message.session)
        if (replies := self._replies.get(message.id)) is not None:
            replies.append(reply)
        for listener in self.listeners:
            listener(reply)

    @property
    def unsaved(self) -> int:
        """Replies and finishes the store refused, waiting to be written."""
        return len(self._unsaved)

    async def run(self) -> None:
        """A service: write what the store refused, in order, once it takes writes again."""
        delay = RETRY_FIRST
        while True:  # ends when cancelled at close
            await self._retry.wait()
            while self._unsaved:  # ends when every refused write is written
                write = self._unsaved[0]
                try:
                    await self._replay(write)
                except (StoreUnavailable, StoreBroken):
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, RETRY_MAX)
                    continue
                except LeaseLost:
                    # another node holds the session now and runs its turn again: none
                    # of this session's refused writes can be written here any more
                    self._drop_session(write.message.session)
                    continue
                except StoreError as e:  # this write can never be written: the others can
                    log.error(
                        "session %s: a refused write of message %s is dropped: %s",
                        write.message.session,
                        write.message.id,
                        e,
                    )
                delay = RETRY_FIRST
                self._unsaved.popleft()
                self._forget_unsaved(write)
            self._retry.clear()
            log.info("store: every reply and finish it refused is written now")

    def _forget_unsaved(self, write: Unsaved) -> None:
        self._unsaved_by[write.message.id] -= 1
        if not self._unsaved_by[write.message.id]:
            del self._unsaved_by[write.message.id]

    def _drop_session(self, session: str) -> None:
        dropped = [w for w in self._unsaved if w.message.session == session]
        for write in dropped:
            self._unsaved.remove(write)
            self._forget_unsaved(write)
        log.warning(
            "session %s: held by another node now; %d refused write(s) of it dropped "
            "(that node runs its turn again)",
            session,
            len(dropped),
        )

    async def _replay(self, write: Unsaved) -> None:
        message = write.message
        if write.index is None:
            await self.store.finish(message.id, write.state)
            self._finished(message)
            return
        push = message.origin.channel in self.push_channels
        reply = await self.store.add_reply(
            message, write.index, write.text, write.kind, push, markup=write.markup
        )
        self._announce(message, write.kind, reply)

    # ---- for channels: waiting on turns and replies

    async def wait_turn(self, message_id: str, timeout: float) -> tuple[bool, list[Reply]]:
        """Wait until the message's turn has ended (or `timeout`, or the supervisor
        stops): (ended, the replies so far)."""
        fut = self._ended.get(message_id)
        if fut is not None:
            await self.wait_or_closing(fut, timeout)
        ended = fut is None or fut.done()
        known = fut.result() if fut is not None and fut.done() else None
        if known is None:
            known = [r.reply for r in await self.store.replies_for_message(message_id)]
        return ended, known

    async def replies_after(
        self, session: str, channel: str, after: int, limit: int, wait: float
    ) -> list[StoredReply]:
        """Replies of a session to messages from `channel` past the cursor `after`; if there
        are none, wait up to `wait` seconds for one."""
        # watch before the first query, so a reply stored in between still wakes us
        with self.wakeups.watch(channel, session) as new_reply:
            rows = await self.store.replies_after(session, channel, after, limit)
            if not rows and wait > 0:
                await self.wait_or_closing(new_reply, wait)
                rows = await self.store.replies_after(session, channel, after, limit)
        return rows

    async def wait_or_closing(self, fut: asyncio.Future[Any], timeout: float) -> None:
        """Wait for `fut` (never cancelling it) until `timeout` or until the supervisor stops."""
        if fut.done():
            return
        # one future and one timer, woken by whichever comes first: every ?wait passes
        # here, and shield() + wait() cost four tasks and futures per request
        loop = asyncio.get_running_loop()
        woken: asyncio.Future[None] = loop.create_future()

        def wake(_: object = None) -> None:
            if not woken.done():
                woken.set_result(None)

        watched = [f for f in (fut, self._closing) if f is not None]
        for f in watched:
            f.add_done_callback(wake)
        timer = loop.call_later(timeout, wake)
        try:
            await woken
        finally:
            timer.cancel()
            for f in watched:
                f.remove_done_callback(wake)

    def close_waits(self) -> None:
        """Every waiting ?wait and long-poll answers now (the supervisor is draining)."""
        if self._closing is not None and not self._closing.done():
            self._closing.set_result(None)
