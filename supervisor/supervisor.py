"""The supervisor: the policy that moves sessions along. Everything it directs owns its
own state (sessions.py, worker.py, turns.py, inbox.py, crashloop.py, watchdog.py).

A message's way through it:

    accept -> dispatch -> start_worker -> worker_life: spawn, serve, reap
                  \\-> Turns.start -> (frames) -> Turns.end -> dispatch

Everything here runs on one asyncio loop and never waits on a worker without a deadline.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Mapping

from corral.protocol import frames, procfs, spawn
from corral.protocol.control import KillResult
from corral.protocol.types import (
    HTTP_CHANNEL,
    ExitReason,
    Origin,
    SessionState,
    check_session_key,
)
from corral.supervisor import cgroups, sandbox
from corral.supervisor.channels.telegram_wiring import TelegramWiring
from corral.supervisor.cluster import Cluster, UnknownHere
from corral.supervisor.config import Config, LimitsConfig
from corral.supervisor.crashloop import CrashLoops
from corral.supervisor.delivery import Outbox
from corral.supervisor.fds import Descriptors
from corral.supervisor.inbox import Inbox
from corral.supervisor.metrics import Metrics
from corral.supervisor.procthread import ProcThread
from corral.supervisor.retention import Retention
from corral.supervisor.services import Changes, Services, Tasks, within
from corral.supervisor.sessions import Session, SessionTable
from corral.supervisor.spawner import Spawner
from corral.supervisor.store import Accepted, Message
from corral.supervisor.store_pg import PgStore
from corral.supervisor.stores import AnyStore, make_store
from corral.supervisor.turns import Turns
from corral.supervisor.watchdog import LoopLag, Watchdog
from corral.supervisor.worker import Exit, Worker, describe_exit, serve

log = logging.getLogger("corral.supervisor")

REAP_TIMEOUT = 1.0  # for the zygote's word on how a dead worker ended
KILL_ANSWER_GRACE = 3.0  # `corral kill` answers within kill_grace + this
DRAINED_GRACE = 0.5  # past kill_grace, for the last reaps of a drain


class Draining(Exception):
    """The supervisor is stopping and accepts nothing new."""


class QueueFull(Exception):
    """The session already has max_queue messages waiting."""


class TooManySessions(QueueFull):
    """No new session now: the supervisor is short of file descriptors (a 429 too)."""


class IdConflict(Exception):
    """A client id was used before for a message of another session."""


class UnknownSession(Exception):
    """The session has no live worker."""


class Supervisor:
    def __init__(
        self,
        config: Config,
        store: AnyStore | None = None,
        telegram_tokens: Mapping[str, str] | None = None,
    ) -> None:
        self.config = config
        self.config_path = ""  # the file it was read from ("": built-in defaults); by serve
        self.limits = config.limits
        self.store = store or make_store(config)
        self.metrics = Metrics()
        self.metrics.declare_channels([HTTP_CHANNEL, *config.channels.webhook])
        self.max_frame = self.frame_cap(self.limits)
        self.spawner = Spawner(worker_settings(config, self.max_frame))
        # workers of a zygote replaced by a reload, and that zygote: retired after their turn
        self.old_spawner_of: dict[Worker, Spawner] = {}
        self.metrics.registry.register(
            sandbox.LevelCollector(
                lambda: sandbox.with_peer_check(self.spawner.sandbox, self.config)
            )
        )
        self.fds = Descriptors()
        self.procs = ProcThread()
        self.tasks = Tasks()
        self.services = Services(on_fatal=self.give_up)
        self.sessions = SessionTable(config.supervisor.max_workers)
        self.crashloops = CrashLoops(self.store, self.limits, on_release=self.released)
        self.inbox = Inbox(self.store, self.metrics, push_channels=set(config.channels.webhook))
        self.outbox = Outbox(config.channels.webhook, config.delivery, self.store, self.metrics)
        self.inbox.listeners.append(self.outbox.on_reply)
        self.watchdog = Watchdog(
            self.limits, self.sessions.workers, self.spawner, self.procs, self.crashloops.forget_old
        )
        self.turns = Turns(
            self.limits,
            self.inbox,
            self.metrics,
            self.tasks,
            measure=self.watchdog.measure,
            requeue=self.requeue,
            on_ended=self.turn_ended,
        )
        self.lag = LoopLag(self.metrics, healthy=self.services.healthy)
        self.changes = Changes()  # a turn ended or a worker was reaped
        self.delegation: cgroups.Delegation | None = None
        self.draining = False
        self.fatal: str | None = None  # why the supervisor gave up, if it did
        self.drain_timeout = float(config.supervisor.drain_timeout)
        self.started_wall = time.time()
        self._stop_requested = asyncio.Event()
        self.hurried = False  # a second stop signal: the rest of drain_timeout is skipped
        # Telegram bots: pollers in, the outbox out (telegram_tokens: read from env if None)
        self.telegram = TelegramWiring(self, telegram_tokens) if config.channels.telegram else None
        # on PostgreSQL this is a node of a cluster: it runs the sessions it holds leases of
        self.cluster = Cluster(self, self.store) if isinstance(self.store, PgStore) else None

    # ---- lifecycle

    async def start(self) -> None:
        """Open the store, start the zygote, and re-queue what the last run left unfinished."""
        self.config.state_path.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.fds.raise_limit()  # before the store, the zygote and any worker open theirs
        await self.store.open()
        if self.cluster is not None:
            await self.cluster.join()
        procfs.become_subreaper()  # a dead zygote's orphans come to us (see Watchdog)
        await self.use_cgroups()
        await self.spawner.start()
        for key in await self.crashloops.restore():
            if self.cluster is None:  # in a cluster, the node that claims it lists it
                self.sessions.get_or_create(key)  # listed as quarantined
        pending = await self.inbox.restore()
        for message in pending:
            self.sessions.get_or_create(message.session).queue.append(message)
        if pending:
            log.info("re-queued %d unfinished messages from the last run", len(pending))
        await self.outbox.prepare()
        self.store.on_broken.append(self.give_up)  # the database is gone: exit non-zero
        self.services.start("inbox writes", self.inbox.run)  # what a full disk refused
        self.services.start("retention", Retention(self.store, self.config.retention.keep).run)
        for name, channel in self.outbox.channels.items():
            self.services.start(f"delivery to {name}", channel.run)
        self.services.start("watchdog", self.watchdog.run)
        self.services.start("zygote health", lambda: Spawner.watch(lambda: self.spawner))
        self.services.start("loop lag", self.lag.run)
        self.services.start("descriptors", self.fds.watch)
        if self.cluster is not None:
            self.cluster.start()  # and Telegram's pollers on the node that leads them
        elif self.telegram is not None:
            self.telegram.start()
        for s in self.sessions:
            self.dispatch(s)

    async def use_cgroups(self) -> None:
        """Give each worker a cgroup with kernel limits, if the service owns a subtree."""
        enabled = self.config.supervisor.cgroups
        self.delegation, why = await self.procs.run(lambda: cgroups.delegate(enabled))
        if self.delegation is None:
            log.info("per-worker cgroups: not used (%s); bounds rely on sampling", why)
            return
        pids_max = self.limits.max_tasks + cgroups.PIDS_HEADROOM
        limits = cgroups.worker_limits(int(self.limits.rss_max), pids_max=pids_max)
        self.spawner.settings = cgroups.with_cgroups(self.spawner.settings, self.delegation, limits)
        controllers = ", ".join(self.delegation.controllers) or "none"
        log.info(
            "per-worker cgroups under %s (controllers: %s)", self.delegation.workers, controllers
        )

    def request_stop(self, drain_timeout: float | None = None) -> None:
        """Begin a graceful stop (SIGTERM, SIGINT, `corral drain`); idempotent."""
        if drain_timeout is not None and not self._stop_requested.is_set():
            self.drain_timeout = drain_timeout
        self._stop_requested.set()

    def hurry(self) -> None:
        """A second SIGTERM/SIGINT: stop the workers now (SIGTERM, SIGKILL after kill_grace)
        instead of waiting out drain_timeout."""
        self.hurried = True
        self.request_stop()
        self.changes.notify()

    async def wait_stop_requested(self) -> None:
        await self._stop_requested.wait()

    def give_up(self, why: str) -> None:
        """A permanent service keeps failing: stop (bounded, as ever) and exit non-zero."""
        self.fatal = why
        self.request_stop()

    async def drain(self) -> None:
        """Stop intake, let running turns finish for drain_timeout, then stop every worker.

        Bounded by drain_timeout + kill_grace + about a second, whatever workers do.
        Unfinished messages stay in the inbox for the next start.
        """
        self.draining = True
        if self.telegram is not None:
            self.telegram.stop_polling()
        self.inbox.close_waits()  # every ?wait and long-poll answers now
        if self.cluster is not None:
            self.cluster.hand_over_idle()  # their queues move on to other nodes now
        await self.changes.wait_until(
            lambda: self.hurried or not self.busy_workers(), self.drain_timeout
        )
        for w in self.sessions.workers():
            if w.state is SessionState.BUSY:
                w.stop(ExitReason.DRAIN, "the supervisor is stopping")
            else:
                w.retire(ExitReason.DRAIN)
        grace = float(self.config.supervisor.kill_grace) + DRAINED_GRACE
        if not await self.changes.wait_until(lambda: not self.sessions.workers(), grace):
            log.error("%d workers not reaped after drain", len(self.sessions.workers()))
        if self.cluster is not None:
            await self.cluster.leave()

    @staticmethod
    def frame_cap(limits: LimitsConfig) -> int:
        return max(int(limits.output_per_turn), int(limits.max_text)) + frames.FRAME_OVERHEAD

    def busy_workers(self) -> list[Worker]:
        return [w for w in self.sessions.workers() if w.state is SessionState.BUSY]

    async def close(self) -> None:
        self.draining = True  # a task cancelled below must not start a worker on its way out
        await self.services.close()
        await self.tasks.close()
        if self.telegram is not None:
            await self.telegram.close()
        self.crashloops.close()
        for old in set(self.old_spawner_of.values()):
            await old.stop()
        await self.spawner.stop()
        # orphans of a zygote that died since the last sweep would outlive us
        await self.watchdog.sweep_strays()
        for w in self.sessions.workers():
            w.close()
        await self.store.close()
        self.procs.close()

    # ---- the policy

    async def accept(
        self, session: str, text: str, origin: Origin, client_id: str | None = None
    ) -> Accepted:
        """Store a message durably and queue its turn. Raises Draining, QueueFull, IdConflict."""
        check_session_key(session)
        if self.draining:
            raise Draining()
        s = self.sessions.get(session)
        if s is not None and len(s.queue) >= self.limits.max_queue:
            # a retry of an id already accepted is its duplicate, full queue or not
            first = await self.store.message(client_id) if client_id else None
            if first is None:
                raise QueueFull(f"session {session} has {len(s.queue)} messages waiting")
            accepted = Accepted(first, True)
        else:
            if s is None or (s.worker is None and not s.has_slot and not s.queue):
                # a new worker: refused while descriptors are short, before they run out
                if (why := self.fds.take_new_session()) is not None:
                    raise TooManySessions(why)
            # an idle worker with nothing queued runs this turn next: its start is counted
            # in the accept's commit, which saves a commit on the way to the worker (on one
            # node: a cluster's start is a fenced write of its own)
            start = (
                self.cluster is None
                and s is not None
                and s.worker is not None
                and s.worker.state is SessionState.IDLE
                and not s.queue
            )
            accepted = await self.inbox.accept(session, text, origin, client_id, start=start)
        if accepted.duplicate:
            first = accepted.message
            if first.session != session:
                raise IdConflict(f"id {first.id!r} was already used for another session")
            if first.origin.channel != origin.channel:
                # ids are one namespace: a webhook's id equal to an HTTP client's is not
                # the same message, and is refused rather than silently merged
                raise IdConflict(
                    f"id {first.id!r} was already used on channel {first.origin.channel!r}"
                )
            return accepted
        self.enqueue(accepted.message)
        return accepted

    def enqueue(self, message: Message) -> None:
        """Queue the turn of a message the inbox has just accepted."""
        if self.cluster is not None and not self.cluster.take(message):
            return  # the node that holds the session runs it
        s = self.sessions.get_or_create(message.session)
        s.queue.append(message)
        s.last_used = time.monotonic()
        self.dispatch(s)

    def dispatch(self, s: Session) -> None:
        """Move a session one step: refuse, start a worker, run the next turn, yield, or idle."""
        if self.cluster is not None and not self.cluster.holds(s.key):
            return self.cluster.let_go(s)
        if self.crashloops.quarantined(s.key) is not None:
            return self.refuse_queued(s)
        w = s.worker
        if w is None:
            if s.has_slot:
                return None  # its worker is being started
            if not s.queue or self.draining:
                if s.is_empty():
                    self.sessions.forget(s)
                    if self.cluster is not None:
                        self.cluster.forgotten(s.key)
                return None
            return self.start_worker(s)
        if w.state is not SessionState.IDLE:
            return None
        if self.draining:  # a worker that finished starting after the drain began
            return w.retire(ExitReason.DRAIN)
        if w in self.old_spawner_of:  # a reload changed what workers start with
            return w.retire(ExitReason.RELOAD)
        if s.queue:
            self.sessions.disarm_idle(s)
            return self.turns.start(s, w, s.queue.popleft())
        if self.sessions.waiting:  # another session waits for a slot: this idle one yields it
            return w.retire(ExitReason.EVICTED)
        idle_timeout = float(self.config.supervisor.idle_timeout)
        self.sessions.arm_idle(s, idle_timeout, lambda: w.retire(ExitReason.IDLE))
        return None

    def start_worker(self, s: Session) -> None:
        if self.sessions.take_slot(s):
            self.tasks.start(self.worker_life(s), f"worker {s.key}")
        elif (victim := self.sessions.lru_idle()) is not None and victim.worker is not None:
            victim.worker.retire(ExitReason.EVICTED)  # its slot goes to the next in line

    async def worker_life(self, s: Session) -> None:
        """One task owns one worker, from the spawn request to the reap."""
        w: Worker | None = None
        try:
            if delay := self.crashloops.backoff(s.key):
                await asyncio.sleep(delay)
                if self.draining or self.crashloops.quarantined(s.key) is not None:
                    return
            w = s.worker = await self.spawn(s)
            if w is None:
                return
            await serve(w, self.max_frame, self.ready_callback(s, w), self.frame_callback(w))
            exit = await self.reap(w)
            if self.cluster is not None and w.exit is None and w.turn is not None:
                if exit.reason is ExitReason.LEASE_LOST:  # it ended itself at its fence
                    self.cluster.fenced_out(s.key, w.turn.message.id)
            await self.crashloops.record(s.key, exit.reason)  # may quarantine the session
            # its turn: an error reply, or back in the queue on drain; nothing is awaited
            # from the turn's answer to the `finally`, so whoever sees the answer finds
            # the worker gone from `corral ls` and /metrics
            await self.turns.abandon(w, exit)
        except Exception:
            # the store failed: the message stays pending for the next start; the
            # bookkeeping below must happen regardless, or the session is wedged
            log.exception("session %s: the end of its worker could not be recorded", s.key)
        finally:  # on every path: the slot is freed and the session moves on
            if w is not None:
                w.close()
                w.reaped.set()
            s.worker = None
            self.sessions.disarm_idle(s)
            self.sessions.free_slot(s)
            self.changes.notify()
            self.admit_waiting()
            self.dispatch(s)

    async def spawn(self, s: Session) -> Worker | None:
        if delay := self.spawner.backoff():  # spawns keep failing: do not spin
            await asyncio.sleep(delay)
            if self.draining:
                return None
        recent = self.crashloops.recent(s.key)
        spawner = self.spawner
        try:
            # a session that broke a bound within restart_period starts at idle priority:
            # its worker gives way to every well-behaved one
            spawned = await spawner.spawn(s.key, idle=bool(recent))
        except Exception as e:  # SpawnError, a timeout, or descriptors running out
            # the supervisor's trouble, not the session's: no restart counted, no backoff or
            # SCHED_IDLE for it; its messages wait in its queue for the next try
            self.metrics.spawn_failures.inc()
            n = self.spawner.failures
            if n & (n - 1) == 0:  # 1, 2, 4, 8 ... failures in a row: logged, not each one
                log.error("cannot start workers (%d failures in a row): %s", n, e)
            log.debug("session %s: cannot start a worker: %s", s.key, e)
            return None
        grace = float(self.config.supervisor.kill_grace)
        cgroup_workers = self.delegation.workers if self.delegation else None
        w = Worker(s.key, spawned, self.procs, grace, cgroup_workers)
        w.demoted = bool(recent)
        if spawner is not self.spawner:  # a reload replaced the zygote during the spawn
            self.old_spawner_of[w] = spawner
        return w

    def ready_callback(self, s: Session, w: Worker) -> Callable[[], None]:
        def ready() -> None:  # the worker said hello
            loop_time = asyncio.get_running_loop().time()
            self.metrics.spawn_seconds.observe(w.spawn_seconds + loop_time - w.started)
            if self.cluster is not None:
                self.cluster.tell(w)  # before its first turn: the lease's deadline
            self.dispatch(s)

        return ready

    def frame_callback(self, w: Worker) -> Callable[[frames.WorkerFrame], Awaitable[None]]:
        return lambda frame: self.turns.on_frame(w, frame)

    async def reap(self, w: Worker) -> Exit:
        """The worker is dead: how it ended, counted."""
        spawner = self.old_spawner_of.get(w, self.spawner)
        exited = await spawner.exit_status(w.pid, timeout=REAP_TIMEOUT)
        if w.exit is None and exited is None and spawner.lost(w.zygote):
            # it died with its zygote (a parent-death signal): not the session's doing
            exit = Exit(ExitReason.ZYGOTE_LOST, "the zygote that forks workers was lost")
        else:
            exit = w.exit or describe_exit(exited, spawner.settings.memory_max)
        self.metrics.worker_exits.labels(exit.reason).inc()
        if self.old_spawner_of.pop(w, None) is not None:
            self.stop_if_unused(spawner)
        return exit

    def turn_ended(self, s: Session) -> None:
        self.changes.notify()
        self.dispatch(s)

    def requeue(self, message: Message) -> None:
        """Put a message back at the head of its session's queue (a new Session if the
        old one was forgotten meanwhile)."""
        s = self.sessions.get_or_create(message.session)
        s.queue.appendleft(message)
        self.dispatch(s)

    def admit_waiting(self) -> None:
        while (s := self.sessions.next_waiting()) is not None:  # ends when slots or line run out
            self.dispatch(s)

    def refuse_queued(self, s: Session) -> None:
        """Answer every queued message of a quarantined session with an error (one
        refuser per session, however often it is dispatched)."""
        if s.queue and not s.refusing:
            s.refusing = True
            self.tasks.start(self._refuse(s), f"refuse {s.key}")

    async def _refuse(self, s: Session) -> None:
        until = self.crashloops.quarantined(s.key) or 0.0
        when = time.strftime("%H:%M:%S UTC", time.gmtime(until))
        text = (
            f"session quarantined after repeated worker failures; messages are refused "
            f"until {when} or `corral release {s.key}` [quarantined]"
        )
        try:
            while s.queue and self.crashloops.quarantined(s.key) is not None:  # ends: queue empty
                await self.inbox.fail(s.queue.popleft(), 0, text)
        finally:
            s.refusing = False
            self.dispatch(s)

    # ---- reload (supervisor/reload.py decides what changes; these are its apply points)

    async def swap_spawner(self, spawner: Spawner, max_frame: int) -> None:
        """Start `spawner`'s zygote and spawn every new worker from it; the workers of
        the old one retire after their turn (`dispatch`), and it stops after them."""
        old = self.spawner
        self.watchdog.spawner = spawner  # its `starting` holds off the stray sweep
        try:
            await spawner.start_guarded()
        except BaseException:
            self.watchdog.spawner = old
            raise
        self.spawner, self.max_frame = spawner, max_frame
        for w in self.sessions.workers():
            self.old_spawner_of.setdefault(w, old)
        self.stop_if_unused(old)

    def stop_if_unused(self, spawner: Spawner) -> None:
        if spawner is not self.spawner and spawner not in self.old_spawner_of.values():
            self.tasks.start(spawner.retire(), "stop a replaced zygote")

    def retire_stale(self) -> None:
        """After a reload: idle workers of a replaced zygote retire now."""
        for s in self.sessions:
            self.dispatch(s)

    # ---- operator actions

    async def kill_session(self, key: str, force: bool, local: bool = False) -> KillResult:
        """Stop a session's worker for an operator; answers once it is reaped (bounded).
        In a cluster, a session another node runs is killed by that node."""
        s = self.sessions.get(key)
        if (s is None or s.worker is None) and self.cluster is not None and not local:
            timeout = float(self.config.supervisor.kill_grace) + KILL_ANSWER_GRACE + 2.0
            try:
                return await self.cluster.kill_elsewhere(key, force, timeout)
            except UnknownHere:
                raise UnknownSession(key) from None
        if s is None or s.worker is None:
            raise UnknownSession(key)
        w = s.worker
        w.stop(ExitReason.KILLED, "killed by an operator" if force else "stopped by an operator")
        if force:
            w.kill()
        await within(float(self.config.supervisor.kill_grace) + KILL_ANSWER_GRACE, w.reaped.wait())
        reason = w.exit.reason if w.exit else ExitReason.KILLED
        return KillResult(session=key, pid=w.pid, reason=reason, reaped=w.reaped.is_set())

    async def retry_dead_letters(self, ids: list[str] | None) -> list[str]:
        """Put dead-lettered replies back into delivery (all: None); the ids retried."""
        return await self.outbox.retry_dead_letters(ids)

    async def release(self, key: str, local: bool = False) -> bool:
        """Lift a session's quarantine now; False if it is not quarantined. In a cluster,
        the node that holds the session lifts it; with none, the store's record is."""
        if await self.crashloops.release(key):
            self.released(key)
            return True
        if self.cluster is None or local:
            return False
        try:
            return await self.cluster.release_elsewhere(key, KILL_ANSWER_GRACE + 2.0)
        except UnknownHere:
            return await self.cluster.release_stored(key)

    def released(self, key: str) -> None:
        if (s := self.sessions.get(key)) is not None:
            self.dispatch(s)  # its queue runs again, or it is forgotten: no ghost


def worker_settings(config: Config, max_frame: int) -> spawn.WorkerSettings:
    """What every worker is told at the zygote's start."""
    return spawn.WorkerSettings(
        entrypoint=config.agent.entrypoint,
        options=config.agent.options,
        state_dir=str(config.state_path),
        max_frame=max_frame,
        cpu_time_per_turn=float(config.limits.cpu_time_per_turn),
        sandbox=sandbox.worker_sandbox(config),
    )
