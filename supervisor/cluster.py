"""A node of a corral cluster: several `corral serve` on one PostgreSQL.

A session is run by the node that holds its lease (store_pg_cluster.py). This module
is that node's side of it:

- `join` registers the node (waiting out an earlier run of the same name whose
  heartbeat has not gone stale yet) and frees what that run held;
- `keep_leases` (a service) renews every lease in one statement each `renew_every`;
  when no renewal has succeeded for `fence_after`, the node stops every worker it
  runs (SIGKILL within `fence_grace`) before any lease can expire, so no two nodes
  ever run one session; when the database answers again it lets go of every lease
  and starts over;
- `claim_loop` (a service) claims free or expired leases of sessions with pending
  messages, queues the pending messages of the sessions it holds, answers ?wait for
  messages another node ran, and carries out operators' commands; it runs on a
  LISTEN/NOTIFY hint and at least every `poll` seconds, since a NOTIFY is lost
  across a reconnect;
- `hints` (a service) is the LISTEN connection;
- a session whose lease this node lost (a fenced write, a renewal that no longer
  lists it) loses its queue and its worker at once (`let_go`).

What moves with a session: its messages, replies, quarantine record, and its
transcript (rebuilt from the store's messages and replies when a node takes a session
over). What does not: `ctx.state_dir`, which is node-local.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import msgspec
import psycopg
from prometheus_client import Counter, Gauge, Histogram

from corral.protocol import frames
from corral.protocol.control import KillResult, NodeInfo, SessionInfo
from corral.protocol.types import ERROR, ExitReason, HistoryEntry
from corral.supervisor.pg_schema import StoreError, redact
from corral.supervisor.store import Message
from corral.supervisor.store_pg import PgStore, connect_params
from corral.supervisor.store_pg_cluster import (
    ANSWER_HINT,
    COMMAND_HINT,
    DONE_HINT,
    MESSAGE_HINT,
    NOTIFY_CHANNEL,
    REPLY_HINT,
    Claimed,
    Command,
    NodeRow,
)
from corral.supervisor.storethread import StoreClosed

if TYPE_CHECKING:
    from corral.supervisor.sessions import Session
    from corral.supervisor.supervisor import Supervisor
    from corral.supervisor.worker import Worker

log = logging.getLogger("corral.cluster")

HINT_HEARTBEAT: Final = 5.0  # seconds between checks that the LISTEN connection is alive
CONNECT_TIMEOUT: Final = 10.0
COMMAND_POLL: Final = 0.5
# pg_try_advisory_lock key of the node that polls Telegram for the cluster ("corral" + 2)
POLL_LOCK: Final = 0x636F7272616C02
GONE_SHOWN: Final = 3600.0  # seconds a dead node stays in `corral status`
TRANSCRIPT_LIMIT: Final = 100_000  # messages of a session's history written on takeover

_session_rows = msgspec.msgpack.Encoder()
_decode_rows = msgspec.msgpack.Decoder(list[SessionInfo])
_entry = msgspec.json.Encoder()
_kill_result = msgspec.json.Decoder(KillResult)


class UnknownHere(Exception):
    """No live node runs the session."""


class Cluster:
    def __init__(self, sup: Supervisor, store: PgStore) -> None:
        config = sup.config
        self.sup = sup
        self.store = store
        self.node = config.cluster.node_name
        self.ttl = float(config.cluster.lease_ttl)
        kill_grace = float(config.supervisor.kill_grace)
        self.poll = min(1.0, self.ttl / 5)
        # how often the Telegram leader speaks on its lock's connection: well within
        # the idle_session_timeout (one lease) that frees the lock of a silent leader
        self.lead_check = min(HINT_HEARTBEAT, self.ttl / 3)
        self.renew_every = self.ttl / 5
        # workers are SIGKILLed this long after the fence's SIGTERM, and dead before
        # the last renewed lease can expire (a margin for the reap and for clock rates)
        self.fence_grace = min(kill_grace, self.ttl / 4)
        self.fence_after = self.ttl - self.fence_grace - max(0.5, self.ttl / 10)
        self.held = store.epochs  # session -> epoch; the store fences writes with it
        self.known: dict[str, set[str]] = {}  # session -> ids of messages queued here
        self.fenced = False  # every worker stopped; leases to be let go once renewed
        self.left = False  # the node has left the cluster (the end of a drain)
        self.last_renewed = 0.0  # loop time of the start of the last successful renewal
        # CLOCK_MONOTONIC (what workers compare with) at the start of that renewal
        self.renewed_monotonic = time.monotonic()
        self.node_rows: list[NodeRow] = []  # as of the last renewal
        self._wake = asyncio.Event()
        self._needs: set[str] = set()  # what the claim loop is asked to do before its poll
        self._claiming = False
        self.others: dict[str, SessionInfo] = {}  # other live nodes' sessions, as last renewed
        self.elsewhere: set[str] = set()  # of those, the ones not held here
        self._answered = asyncio.Event()  # set on a hint that a command was answered
        self._lock = asyncio.Lock()  # claims, renewals and releases, one at a time
        self._releasing: set[asyncio.Task[None]] = set()
        r = sup.metrics.registry
        self.m_leases = Gauge("corral_cluster_leases", "Session leases this node holds", registry=r)
        self.m_takeovers = Counter(
            "corral_cluster_takeovers",
            "Sessions claimed that another node ran last (a dead or a drained node's)",
            registry=r,
        )
        self.m_claim = Histogram(
            "corral_cluster_claim_seconds",
            "Time a claim of free leases takes in the database",
            buckets=(0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5),
            registry=r,
        )
        self.m_fences = Counter(
            "corral_cluster_fences",
            "Times this node stopped its workers because it could not renew its leases",
            registry=r,
        )
        self.m_nodes = Gauge("corral_cluster_nodes", "Live nodes of the cluster", registry=r)

    # ---- joining and leaving

    async def join(self) -> None:
        """Register this node; raises StoreError if a live node already has its name."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 2 * self.ttl + 1
        last_age: float | None = None
        while (age := await self.store.heartbeat_age(self.node)) is not None and age < self.ttl:
            # a heartbeat that moved on while we waited is a live node's, not a dead run's
            if loop.time() > deadline or (last_age is not None and age < last_age):
                raise StoreError(
                    f"cluster.node: another node named {self.node!r} is running on "
                    f"{redact(self.store.url)}: give each node its own cluster.node"
                )
            log.info(
                "node %s: waiting %.1fs for the lease of an earlier run to go stale",
                self.node,
                self.ttl - age,
            )
            last_age = age
            await asyncio.sleep(min(self.ttl - age + 0.1, 1.0))
        freed = await self.store.join(self.node, os.getpid())
        if freed:
            log.info("node %s: freed %d leases an earlier run held", self.node, freed)
        self.store.node = self.node
        self.store.on_lease_lost = lambda key: self.lose(key, "a write of its turn was fenced")
        self.last_renewed = loop.time()
        self.renewed_monotonic = time.monotonic()
        log.info(
            "node %s joined the cluster (lease_ttl %gs, renewed every %gs, fenced after %gs)",
            self.node,
            self.ttl,
            self.renew_every,
            self.fence_after,
        )

    def start(self) -> None:
        services = self.sup.services
        services.start("cluster leases", self.keep_leases)
        services.start("cluster claims", self.claim_loop)
        services.start("cluster hints", self.hints)
        if self.sup.telegram is not None:
            services.start("cluster telegram leader", self.lead_polling)

    async def leave(self) -> None:
        """The node stops: its leases are free for the others at once."""
        self.left = True
        # no renewal and no claim after this: the node's row stays stale
        self.sup.services.stop("cluster leases")
        self.sup.services.stop("cluster claims")
        self.held.clear()
        try:
            async with asyncio.timeout(5.0):
                await self.store.leave(self.node)
        except (StoreError, StoreClosed, TimeoutError) as e:
            log.warning("node %s: could not release its leases (they expire): %s", self.node, e)

    # ---- the lease of one session

    def holds(self, key: str) -> bool:
        return key in self.held

    def take(self, message: Message) -> bool:
        """A message accepted here: True if this node runs its session (queue it now);
        else the owner, or whoever claims the session, runs it."""
        if message.session in self.held:
            known = self.known.setdefault(message.session, set())
            if message.id in known:
                return False  # a refresh on its hint queued it already
            known.add(message.id)
            return True
        self._claim_for(message.session)
        return False

    def _claim_for(self, session: str) -> None:
        """A message for a session this node does not hold: claim it, unless another live
        node runs it (the claim would find nothing; if that node dies, the poll claims)."""
        if session in self.elsewhere:
            return
        self._need("claim")
        if self._claiming:  # it may be this very claim's: read its queue after it
            self._need("refresh")

    def let_go(self, s: Session) -> None:
        """A session this node does not hold (any more): nothing of it runs here."""
        self.known.pop(s.key, None)
        s.queue.clear()
        w = s.worker
        if w is not None:
            if w.exit is None:
                w.stop(ExitReason.LEASE_LOST, "another node holds the session's lease now")
            w.kill()  # it may be running a turn the new owner runs too: no grace
        elif s.is_empty():
            self.sup.sessions.forget(s)

    def lose(self, key: str, why: str) -> None:
        if self.held.pop(key, None) is None:
            return
        log.warning("session %s: lease lost (%s): its worker is stopped", key, why)
        self.m_leases.set(len(self.held))
        if (s := self.sup.sessions.get(key)) is not None:
            self.let_go(s)

    def forgotten(self, key: str) -> None:
        """The session has no worker and nothing queued: its lease goes back, unless its
        workers failed lately (the restart window is this node's: a crash loop must not
        escape it by moving on); `sweep` lets go of those later."""
        if self.sup.crashloops.recent(key):
            return
        epoch = self.held.pop(key, None)
        self.known.pop(key, None)
        if epoch is None:
            return
        self.m_leases.set(len(self.held))
        task = asyncio.get_running_loop().create_task(self._release({key: epoch}))
        self._releasing.add(task)
        task.add_done_callback(self._releasing.discard)

    async def sweep(self) -> None:
        """Let go of held leases of sessions that have nothing here any more."""
        recent = self.sup.crashloops.recent
        idle = [k for k in self.held if self.sup.sessions.get(k) is None and not recent(k)]
        if not idle:
            return
        leases = {k: self.held.pop(k) for k in idle}
        for k in idle:
            self.known.pop(k, None)
        self.m_leases.set(len(self.held))
        await self._release(leases)

    async def _release(self, leases: dict[str, int]) -> None:
        try:
            async with self._lock, asyncio.timeout(self.ttl):
                await self.store.release(self.node, leases)
        except (StoreError, StoreClosed, TimeoutError) as e:
            log.info("leases %s not released (they expire): %s", ", ".join(leases), e)

    def hand_over_idle(self) -> None:
        """Draining: sessions not running a turn go to other nodes (each lease once its
        worker is reaped, so there is never a second live worker)."""
        for s in self.sup.sessions:
            if s.worker is not None and s.worker.turn is not None:
                continue
            self.known.pop(s.key, None)
            s.queue.clear()
            if s.worker is not None:
                s.worker.retire(ExitReason.DRAIN)
            else:
                self.sup.dispatch(s)

    async def release_stored(self, key: str) -> bool:
        """Lift a quarantine no live node holds in memory: the store's record."""
        record = await self.store.session_record(key)
        if record is None or (record.quarantined_until or 0) <= time.time():
            return False
        await self.store.set_quarantine(key, None)
        return True

    # ---- renewal and the self-fence

    async def keep_leases(self) -> None:
        """A service: renew, or fence this node before its leases can expire."""
        loop = asyncio.get_running_loop()
        while True:  # ends when cancelled at close, or when the node leaves
            started = loop.time()
            started_monotonic = time.monotonic()
            left = self.last_renewed + self.fence_after - started
            try:
                async with self._lock, asyncio.timeout(max(0.05, min(left, self.ttl))):
                    renewed = await self.store.renew(
                        self.node, self.ttl, self._snapshot(), self.sup.draining
                    )
                    if self.fenced:
                        await self.store.release(self.node, renewed)
                    else:
                        self._reconcile(renewed)
                    self.node_rows = await self.store.nodes(self.ttl)
                    self._read_others()
            except (StoreError, StoreClosed, psycopg.Error, TimeoutError) as e:
                if not self.fenced and loop.time() >= self.last_renewed + self.fence_after:
                    self.fence(f"no lease renewal for {loop.time() - self.last_renewed:.1f}s: {e}")
                elif not self.fenced:
                    log.warning("node %s: lease renewal failed: %s", self.node, e)
                await asyncio.sleep(min(self.poll, self.renew_every))
                continue
            self.last_renewed = started
            self.renewed_monotonic = started_monotonic
            if not self.fenced:
                for w in self.sup.sessions.workers():
                    self.tell(w)
            if self.fenced:
                self.fenced = False
                log.warning("node %s: the database answers again: taking work again", self.node)
                self._need("claim")
            self.m_nodes.set(sum(1 for n in self.node_rows if n.alive))
            await asyncio.sleep(self.renew_every)

    def tell(self, w: Worker) -> None:
        """Tell a worker how long this node's lease is good for: until the point the
        node's own fence would begin, measured from the start of the last successful
        renewal. A worker not told again in time ends itself (worker/runtime.py Fence),
        so a stopped supervisor leaves no worker running what another node took over."""
        if self.fenced or w.exit is not None:
            return
        w.send(frames.Fence(until=self.renewed_monotonic + self.fence_after))

    def fenced_out(self, key: str, message_id: str) -> None:
        """A worker ended itself at its fence mid-turn (this supervisor was stalled past
        it): the turn is not answered here, but if the lease is still this node's, its
        message is queued again by the next refresh (which reads the database's leases,
        so a session another node took over meanwhile is not run here)."""
        log.warning("session %s: its worker ended itself at its lease's fence", key)
        if (known := self.known.get(key)) is not None:
            known.discard(message_id)
        self._need("refresh")

    def _reconcile(self, renewed: dict[str, int]) -> None:
        """Sessions held in memory that the renewal did not find are lost."""
        for key, epoch in list(self.held.items()):
            if renewed.get(key) != epoch:
                self.lose(key, "not renewed")

    def fence(self, why: str) -> None:
        """Stop every worker of this node now: its leases may lapse before it can renew."""
        self.fenced = True
        self.m_fences.inc()
        log.error(
            "node %s: %s; stopping its %d sessions before their leases expire",
            self.node,
            why,
            len(self.held),
        )
        loop = asyncio.get_running_loop()
        for key in list(self.held):
            self.lose(key, "fenced")
        for s in self.sup.sessions:
            if s.worker is not None:
                self.let_go(s)
        for w in self.sup.sessions.workers():
            loop.call_later(self.fence_grace, w.kill)

    def _snapshot(self) -> bytes:
        from corral.supervisor import views  # views reads the supervisor; no cycle at import

        return _session_rows.encode(views.local_session_infos(self.sup))

    # ---- claims, queues, ?wait, commands

    async def claim_loop(self) -> None:
        """A service: what a hint asks for at once, everything at least every `poll`
        seconds (the guarantee: a hint can be lost)."""
        loop = asyncio.get_running_loop()
        next_poll = loop.time()
        while True:  # ends when cancelled at close
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(max(0.0, next_poll - loop.time())):
                    await self._wake.wait()
            self._wake.clear()
            polling = loop.time() >= next_poll
            if polling:
                next_poll = loop.time() + self.poll
            needs, self._needs = self._needs, set()
            if self.fenced:
                continue
            try:
                claimed = False
                if not self.sup.draining and (polling or "claim" in needs):
                    claimed = await self.claim()
                if not self.sup.draining and (polling or claimed or "refresh" in needs):
                    await self.refresh()
                if polling:
                    await self.sweep()
                    await self.answer_remote_waits()
                if polling or "commands" in needs:
                    await self.run_commands()
            except (StoreError, StoreClosed, psycopg.Error, TimeoutError) as e:
                log.warning("node %s: cluster poll failed: %s", self.node, e)
                await asyncio.sleep(self.poll)

    def _need(self, what: str) -> None:
        self._needs.add(what)
        self._wake.set()

    async def claim(self) -> bool:
        """Claim what is free, as far as this node has room; whether it claimed any."""
        spare = self.sup.config.supervisor.max_workers - len(self.held)
        if spare <= 0:
            return False
        loop = asyncio.get_running_loop()
        self._claiming = True
        try:
            async with self._lock, asyncio.timeout(self.ttl):
                t0 = loop.time()
                claimed = await self.store.claim(self.node, self.ttl, spare)
                self.m_claim.observe(loop.time() - t0)
                for c in claimed:
                    self.held[c.session] = c.epoch
                    self.elsewhere.discard(c.session)
        finally:
            self._claiming = False
        self.m_leases.set(len(self.held))
        for c in claimed:
            await self.adopt(c)
        return bool(claimed)

    async def adopt(self, c: Claimed) -> None:
        """A session claimed: its record, and its transcript if it ran elsewhere last."""
        if c.last_node is not None and c.last_node != self.node:
            self.m_takeovers.inc()
            log.info("session %s: taken over from node %s", c.session, c.last_node)
        self.sup.crashloops.adopt(c.session, await self.store.session_record(c.session))
        if c.last_node != self.node:
            items = await self.store.history(c.session, TRANSCRIPT_LIMIT)
            path = self.sup.config.state_path / "sessions" / f"{c.session}.jsonl"
            lines = [_entry.encode(e) + b"\n" for e in transcript_entries(items)]
            await self.sup.procs.run(lambda: write_transcript(path, lines))

    async def refresh(self) -> None:
        """Queue the pending messages of held sessions that are not queued here yet."""
        before = {k: set(v) for k, v in self.known.items()}
        pending = await self.store.pending()
        by_session: dict[str, list[Message]] = {}
        for m in pending:
            by_session.setdefault(m.session, []).append(m)
        for key in list(self.held):
            messages = by_session.get(key, [])
            ids = {m.id for m in messages}
            known = self.known.setdefault(key, set())
            known -= before.get(key, set()) - ids  # ended since; not those queued meanwhile
            new = [m for m in messages if m.id not in known]
            if not new:
                continue
            known.update(m.id for m in new)
            self.sup.inbox.adopt(new)
            s = self.sup.sessions.get_or_create(key)
            s.queue.extend(new)
            s.last_used = time.monotonic()
            self.sup.dispatch(s)

    async def answer_remote_waits(self) -> None:
        """?wait here for messages run on another node: the guarantee behind DONE hints."""
        local = {i for ids in self.known.values() for i in ids}
        ids = [i for i in self.sup.inbox.unfinished() if i not in local]
        if not ids:
            return
        for message_id, state in (await self.store.message_states(ids)).items():
            if state != "pending":
                self.sup.inbox.ended_elsewhere(message_id)

    async def run_commands(self) -> None:
        for cmd in await self.store.take_commands(self.node):
            self.sup.tasks.start(self._command(cmd), f"command {cmd.op} {cmd.session}")

    async def _command(self, cmd: Command) -> None:
        from corral.supervisor.supervisor import UnknownSession

        result: bytes
        try:
            if cmd.op == "kill":
                killed = await self.sup.kill_session(cmd.session, cmd.force, local=True)
                result = msgspec.json.encode(killed)
            else:
                result = msgspec.json.encode(await self.sup.release(cmd.session, local=True))
        except UnknownSession:
            result = b'"unknown"'
        await self.store.command_done(cmd.id, result)

    async def ask_owner(self, op: str, key: str, force: bool, timeout: float) -> bytes:
        """Have the node that holds `key` carry out `op`; its answer. UnknownHere if no
        live node holds it, TimeoutError if its owner does not answer in time."""
        owner = await self.store.lease_owner(key)
        if owner is None or owner == self.node:
            raise UnknownHere(key)
        command_id = await self.store.put_command(owner, op, key, force)
        try:
            async with asyncio.timeout(timeout):
                while (answer := await self.store.command_result(command_id)) is None:
                    # ends with an answer or at the timeout; the hint is only a hint
                    answered = self._answered
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(COMMAND_POLL):
                            await answered.wait()
        except BaseException:
            with contextlib.suppress(Exception):
                await self.store.drop_command(command_id)
            raise
        if answer == b'"unknown"':
            raise UnknownHere(key)
        return answer

    async def kill_elsewhere(self, key: str, force: bool, timeout: float) -> KillResult:
        return _kill_result.decode(await self.ask_owner("kill", key, force, timeout))

    async def release_elsewhere(self, key: str, timeout: float) -> bool:
        return bool(msgspec.json.decode(await self.ask_owner("release", key, False, timeout)))

    # ---- singletons

    async def lead_polling(self) -> None:
        """A service: Telegram allows one poller per bot, so in a cluster only the node
        holding an advisory lock (on a connection of its own: the lock dies with it)
        polls; the others wait to take over. A new leader resumes from the offset
        committed with the last batch; a batch fetched twice is one batch (update ids)."""
        telegram = self.sup.telegram
        assert telegram is not None
        params = connect_params(self.store.url)
        while True:  # ends when cancelled at close
            conn: psycopg.AsyncConnection[Any] | None = None
            polling = False
            try:
                async with asyncio.timeout(CONNECT_TIMEOUT):
                    conn = await psycopg.AsyncConnection.connect(**params, autocommit=True)
                    await self._end_when_silent(conn)
                while True:  # ends when the connection fails (or cancelled at close)
                    if self.sup.draining:  # the drain stopped the pollers: hand over
                        if polling:
                            polling = False
                            await conn.execute("SELECT pg_advisory_unlock_all()")
                        await asyncio.sleep(1.0)
                        continue
                    async with asyncio.timeout(CONNECT_TIMEOUT):
                        cur = await conn.execute("SELECT pg_try_advisory_lock(%s)", (POLL_LOCK,))
                        row = await cur.fetchone()
                    if row and row[0] and not polling:
                        log.info("node %s: polling Telegram for the cluster", self.node)
                        telegram.start()
                        polling = True
                    elif not polling:
                        telegram.stop_polling()  # shown as standby: another node polls
                    await asyncio.sleep(self.lead_check if polling else 1.0)
            except (psycopg.Error, OSError, TimeoutError) as e:
                log.warning("node %s: Telegram leadership lost (%s)", self.node, e)
            finally:
                if polling:
                    telegram.stop_polling()
                if conn is not None:
                    with contextlib.suppress(Exception):
                        await conn.close()
            await asyncio.sleep(1.0)

    async def _end_when_silent(self, conn: psycopg.AsyncConnection[Any]) -> None:
        """Have the server end this connection (and so free its advisory lock) when it
        stays silent for a lease: a stopped node (SIGSTOP, a frozen VM) keeps its TCP
        connection alive, and would keep Telegram's polling from every other node."""
        try:
            await conn.execute(f"SET idle_session_timeout = '{round(self.ttl * 1000)}ms'")
        except psycopg.errors.UndefinedObject:  # before PostgreSQL 14
            log.warning(
                "node %s: this PostgreSQL has no idle_session_timeout (14 and later do): a "
                "stopped node keeps Telegram's polling until its connection drops",
                self.node,
            )

    # ---- hints

    async def hints(self) -> None:
        """A service: LISTEN on a connection of its own, reconnecting when it drops."""
        params = connect_params(self.store.url)
        while True:  # ends when cancelled at close
            conn: psycopg.AsyncConnection[Any] | None = None
            try:
                async with asyncio.timeout(CONNECT_TIMEOUT):
                    conn = await psycopg.AsyncConnection.connect(**params, autocommit=True)
                    await conn.execute(f"LISTEN {NOTIFY_CHANNEL}")
                self._need("claim")  # hints sent while it was down are lost: look now
                self._need("refresh")
                while True:  # ends when the connection fails
                    async for n in conn.notifies(timeout=HINT_HEARTBEAT):
                        self.on_hint(n.payload)
                    async with asyncio.timeout(CONNECT_TIMEOUT):
                        await conn.execute("SELECT 1")  # a silent drop shows here
            except (psycopg.Error, OSError, TimeoutError) as e:
                log.warning("node %s: hint connection lost (%s); polling meanwhile", self.node, e)
                await asyncio.sleep(1.0)
            finally:
                if conn is not None:
                    with contextlib.suppress(Exception):
                        await conn.close()

    def on_hint(self, payload: str) -> None:
        kind, _, rest = payload.partition(" ")
        if kind == REPLY_HINT:
            channel, _, session = rest.partition("\t")
            self.sup.inbox.wakeups.notify(channel, session)
        elif kind == DONE_HINT:
            if not any(rest in ids for ids in self.known.values()):
                self.sup.inbox.ended_elsewhere(rest)  # a no-op if it ended here
        elif kind == COMMAND_HINT:
            if rest == self.node:
                self._need("commands")
        elif kind == ANSWER_HINT:
            self._answered.set()
            self._answered = asyncio.Event()
        elif kind == MESSAGE_HINT:
            session, _, message_id = rest.partition("\t")
            if session not in self.held:
                self._claim_for(session)
            elif message_id not in self.known.get(session, ()):
                self._need("refresh")  # accepted on another node: queue it here
        else:  # leases freed: a backlog may be claimable, and who runs what has changed
            self.elsewhere.clear()
            self._need("claim")

    # ---- views

    def other_sessions(self) -> list[SessionInfo]:
        """The sessions other live nodes run, as of their last renewal."""
        return list(self.others.values())

    def _read_others(self) -> None:
        others: dict[str, SessionInfo] = {}
        for n in self.node_rows:
            if n.name != self.node and n.alive and n.sessions:
                with contextlib.suppress(msgspec.DecodeError):
                    others.update((r.session, r) for r in _decode_rows.decode(n.sessions))
        self.others = others
        self.elsewhere = set(others) - set(self.held)

    def nodes(self) -> list[NodeInfo]:
        """The live nodes, and those that died within the last hour (not those that left)."""
        recent = time.time() - GONE_SHOWN
        return [
            NodeInfo(
                name=n.name,
                heartbeat_at=n.heartbeat_at,
                started_at=n.started_at,
                sessions=len(self.held) if n.name == self.node else n.leases,
                draining=self.sup.draining if n.name == self.node else n.draining,
                alive=True if n.name == self.node else n.alive,
                pid=n.pid,
            )
            for n in self.node_rows
            if n.alive or n.name == self.node or (n.heartbeat_at > recent and not n.draining)
        ]


def transcript_entries(items: list[Any]) -> list[HistoryEntry]:
    """A session's transcript from the store: each ended message and its replies."""
    out: list[HistoryEntry] = []
    for item in items:
        m = item.message
        if m.state == "pending":
            continue  # its turn runs again and writes its own lines
        out.append(HistoryEntry(role="user", text=m.text, turn_id=m.id, ts=item.accepted_at))
        for r in item.replies:
            role = "error" if r.reply.kind == ERROR else "assistant"
            out.append(HistoryEntry(role=role, text=r.reply.text, turn_id=m.id, ts=r.created_at))
    return out


def write_transcript(path: Path, lines: list[bytes], lock_timeout: float = 5.0) -> None:
    """Replace the node-local transcript file under its flock (blocking: the proc thread)."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        deadline = time.monotonic() + lock_timeout
        while True:  # ends with the lock or at the deadline
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    log.warning("transcript %s locked: not rebuilt from the store", path)
                    return
                time.sleep(0.05)
        os.ftruncate(fd, 0)
        with os.fdopen(fd, "wb", closefd=False) as f:
            f.write(b"".join(lines))
    finally:
        os.close(fd)


__all__ = ["Cluster", "UnknownHere", "transcript_entries", "write_transcript"]
