"""The supervisor: sessions, their workers, and the bounds on both.

Everything here runs on one asyncio loop and never waits on a worker without a
deadline. The verbs, in the order a message meets them:

    accept -> dispatch -> spawn -> start_turn -> (frames) -> end_turn
                                     \\-> stop -> kill -> reap -> (quarantine)
"""

from __future__ import annotations

import asyncio
import importlib.metadata
import logging
import math
import os
import signal
import time
from collections import deque
from collections.abc import Callable, Coroutine, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import msgspec

from corral.protocol import frames, procfs, spawn
from corral.protocol.control import KillResult, SessionInfo, Status
from corral.protocol.types import (
    ABNORMAL_REASONS,
    CPU_LIMIT,
    CRASHED,
    DRAIN,
    ERROR,
    EVICTED,
    KILLED,
    NO_PROGRESS,
    OUTPUT_LIMIT,
    PROTOCOL_ERROR,
    REPLY,
    RSS_LIMIT,
    TURN_TIMEOUT,
    Origin,
    Reply,
    Turn,
    check_session_key,
)
from corral.protocol.types import (
    IDLE as IDLE_EXIT,
)
from corral.supervisor import cgroups, proctree
from corral.supervisor.config import Config
from corral.supervisor.delivery import Outbox
from corral.supervisor.metrics import Metrics, SessionRow
from corral.supervisor.spawner import Spawner
from corral.supervisor.store import DONE, FAILED, Accepted, Message, SessionRecord, Store
from corral.supervisor.workers import (
    BUSY,
    IDLE,
    QUARANTINED,
    STARTING,
    STATES,
    STOPPING,
    ActiveTurn,
    Worker,
)

log = logging.getLogger("corral.supervisor")
try:
    VERSION = importlib.metadata.version("corral")
except importlib.metadata.PackageNotFoundError:
    VERSION = "unknown"
worker_log = logging.getLogger("corral.worker")

HELLO_TIMEOUT = 30.0
SAMPLE_INTERVAL = 0.1  # seconds between watchdog ticks
SAMPLE_BUDGET = 64  # worker trees sampled per tick, at most: a tick's cost is bounded
STRAY_SWEEP_TICKS = 10  # ticks between sweeps for what a dead zygote left
FRAME_COST = 16  # bytes charged per log or progress frame, so empty ones are not free
NEAR_BOUND = 0.8  # a turn whose own figures pass this share of a bound is measured at its end
DEMOTE_CPU = 0.5  # CPU seconds in one turn after which a worker's tree runs SCHED_IDLE
LAG_INTERVAL = 0.1
MAX_STARTS = 2  # a message whose turn was started this often without ending is not run again
RESTART_BACKOFF = 0.1  # seconds before the next worker after one abnormal exit; doubles
RESTART_BACKOFF_MAX = 5.0
PIDS_MAX = 1024  # processes per worker, when cgroups are delegated: stops a fork bomb
CPU_PERIOD = 100_000  # microseconds


class Draining(Exception):
    """The supervisor is stopping and accepts nothing new."""


class QueueFull(Exception):
    pass


class IdConflict(Exception):
    pass


class UnknownSession(Exception):
    pass


def _mib(n: float, up: bool = False) -> str:
    """Bytes in MiB (KiB below one MiB); rounded up for a figure compared with a limit."""
    unit, size = ("MiB", 1024**2) if n >= 1024**2 else ("KiB", 1024)
    value = n / size
    return f"{math.ceil(value) if up else round(value)} {unit}"


def _secs(s: float) -> str:
    return f"{s * 1000:.0f}ms" if s < 1 else f"{s:g}s"


def describe_exit(exited: spawn.Exited | None, memory_max: int) -> tuple[str, str]:
    """(reason, plain words) for a worker that died on its own."""
    if exited is None:
        return CRASHED, "the worker died"
    if exited.oom_killed:
        return RSS_LIMIT, f"memory limit exceeded (the kernel stopped it at {_mib(memory_max)})"
    status = exited.status
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        if sig == signal.SIGXCPU:
            return CPU_LIMIT, "CPU time limit exceeded (kernel backstop)"
        return CRASHED, f"the worker was killed by {signal.Signals(sig).name}"
    code = os.WEXITSTATUS(status) if os.WIFEXITED(status) else status
    if code == 0:
        return CRASHED, "the worker exited in the middle of the turn"
    return CRASHED, f"the worker crashed (exit code {code})"


def reply_key(session: str, channel: str) -> str:
    return f"{channel}\n{session}"


class Signals:
    """Per-key wake-ups for long-polls: watch(key) gives a future that the next notify(key)
    completes; the entry goes away when its last watcher leaves."""

    def __init__(self) -> None:
        self._futures: dict[str, asyncio.Future[None]] = {}
        self._watchers: dict[str, int] = {}

    @contextmanager
    def watch(self, key: str) -> Iterator[asyncio.Future[None]]:
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

    def notify(self, key: str) -> None:
        fut = self._futures.pop(key, None)
        if fut is not None and not fut.done():
            fut.set_result(None)


@dataclass
class Session:
    key: str
    queue: deque[Message] = field(default_factory=deque)
    worker: Worker | None = None
    spawning: bool = False
    waiting_for_slot: bool = False
    quarantined_until: float | None = None  # wall clock
    quarantine_timer: asyncio.TimerHandle | None = None
    last_exit: str | None = None
    restarts: int = 0
    last_used: float = field(default_factory=time.monotonic)

    @property
    def state(self) -> str:
        if self.quarantined_until is not None:
            return QUARANTINED
        if self.worker is not None:
            return self.worker.state
        return STARTING

    @property
    def queue_depth(self) -> int:
        return len(self.queue)

    def is_empty(self) -> bool:
        return (
            self.worker is None
            and not self.spawning
            and not self.queue
            and self.quarantined_until is None
        )


class Supervisor:
    def __init__(self, config: Config, store: Store | None = None) -> None:
        self.config = config
        self.limits = config.limits
        state_dir = config.state_path
        # for the durability benchmark only: the same run without fsync at commit
        no_fsync = os.environ.get("CORRAL_BENCH_NO_FSYNC") == "1"
        if no_fsync:
            log.warning("CORRAL_BENCH_NO_FSYNC=1: commits are not synced; accepted is not durable")
        self.store = store or Store(state_dir / "corral.db", durable=not no_fsync)
        self.max_frame = (
            max(int(self.limits.output_per_turn), int(self.limits.max_text)) + frames.FRAME_OVERHEAD
        )
        self.spawner = Spawner(
            spawn.WorkerSettings(
                entrypoint=config.agent.entrypoint,
                options=config.agent.options,
                state_dir=str(state_dir),
                max_frame=self.max_frame,
                cpu_time_per_turn=float(self.limits.cpu_time_per_turn),
            )
        )
        self.metrics = Metrics()
        self.metrics.declare_channels(["http", *config.channels.webhook])
        self.delegation: cgroups.Delegation | None = None
        self.sessions: dict[str, Session] = {}
        self.history: dict[str, SessionRecord] = {}  # sessions that ever failed
        self.workers: dict[int, Worker] = {}
        self.waiting: deque[Session] = deque()  # sessions waiting for a worker slot
        self.exit_history: dict[str, deque[float]] = {}
        self.draining = False
        self.started_wall = time.time()
        self.lag = 0.0
        # message id -> its turn's end, with the replies when they are all known here
        self._turn_done: dict[str, asyncio.Future[list[Reply] | None]] = {}
        self._turn_replies: dict[str, list[Reply]] = {}
        self.reply_signals = Signals()
        self._turn_ended = asyncio.Event()
        self._stop_requested = asyncio.Event()
        self.drain_timeout = float(config.supervisor.drain_timeout)
        self._closing: asyncio.Future[None] | None = None
        self.lag_history: deque[float] = deque(maxlen=int(60 / LAG_INTERVAL))
        self._tasks: set[asyncio.Task[Any]] = set()
        self._sampler = ThreadPoolExecutor(max_workers=1, thread_name_prefix="corral-sampler")
        self._loop: asyncio.AbstractEventLoop | None = None
        self.on_reply: list[Callable[[Reply], None]] = []  # called for every new reply
        self.on_tick: list[Callable[[], None]] = []  # called from the healthy loop every 100 ms
        self.outbox = Outbox(config.channels.webhook, config.delivery, self.store, self.metrics)
        self.on_reply.append(self.outbox.on_reply)

    # ---- lifecycle

    async def start(self) -> None:
        """Open the store, start the zygote, and re-queue what the last run left unfinished."""
        self._loop = asyncio.get_running_loop()
        self._closing = self._loop.create_future()
        self.config.state_path.mkdir(parents=True, exist_ok=True, mode=0o700)
        await self.store.open()
        procfs.become_subreaper()  # a dead zygote's orphans come to us (see watch)
        await self.use_cgroups()
        await self.spawner.start()
        self.history = await self.store.session_records()
        for key, record in self.history.items():
            if record.quarantined_until is not None and record.quarantined_until > time.time():
                self.quarantine_until(self.session(key), record.quarantined_until)
        pending = await self.store.pending()
        for message in pending:
            s = self.session(message.session)
            self._turn_done[message.id] = self._loop.create_future()
            s.queue.append(message)
        self.metrics.inbox_depth.set(len(pending))
        if pending:
            log.info("re-queued %d unfinished messages from the last run", len(pending))
        for s in list(self.sessions.values()):
            self.dispatch(s)
        await self.outbox.prepare()
        for name, channel in self.outbox.channels.items():
            self.background(channel.run(), f"delivery to {name}")
        self.background(self.watch(), "watchdog")
        self.background(self.measure_lag(), "loop lag")

    async def use_cgroups(self) -> None:
        """Give each worker a cgroup with kernel limits, if the service owns a subtree."""
        self.delegation, why = await self.in_sampler(
            partial(cgroups.delegate, self.config.supervisor.cgroups)
        )
        if self.delegation is not None:
            rss_max = int(self.limits.rss_max)
            self.spawner.settings = msgspec.structs.replace(
                self.spawner.settings,
                cgroup_workers=str(self.delegation.workers),
                # above rss_max: the sampler names the figure first; the kernel stops
                # what grows faster than it samples
                memory_max=rss_max + max(16 * 2**20, rss_max // 8),
                pids_max=PIDS_MAX,
                cpu_max=f"{CPU_PERIOD} {CPU_PERIOD}",  # one CPU per worker
            )
            log.info(
                "per-worker cgroups under %s (controllers: %s)",
                self.delegation.workers,
                ", ".join(self.delegation.controllers) or "none",
            )
        else:
            log.info("per-worker cgroups: not used (%s); bounds rely on sampling", why)

    def request_stop(self, drain_timeout: float | None = None) -> None:
        """Begin a graceful stop (SIGTERM, SIGINT, `corral drain`); idempotent."""
        if drain_timeout is not None and not self._stop_requested.is_set():
            self.drain_timeout = drain_timeout
        self._stop_requested.set()

    async def wait_stop_requested(self) -> None:
        await self._stop_requested.wait()

    def background(self, coro: Coroutine[Any, Any, Any], what: str) -> asyncio.Task[Any]:
        """Run `coro` as an owned task: kept, logged if it fails, cancelled at close."""

        async def guarded() -> None:
            try:
                await coro
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("%s failed", what)

        task = asyncio.get_running_loop().create_task(guarded(), name=what)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def drain(self) -> None:
        """Stop intake, let running turns finish for drain_timeout, then stop every worker.

        Bounded by drain_timeout + kill_grace + about a second, whatever workers do.
        Unfinished messages stay in the inbox for the next start.
        """
        loop = asyncio.get_running_loop()
        self.draining = True
        if self._closing is not None and not self._closing.done():
            self._closing.set_result(None)  # wakes every ?wait and long-poll: they answer now
        grace = float(self.config.supervisor.kill_grace)
        deadline = loop.time() + self.drain_timeout
        while any(w.state == BUSY for w in self.workers.values()):  # ends at the deadline
            remaining = deadline - loop.time()
            if remaining <= 0:
                break
            self._turn_ended.clear()
            try:
                async with asyncio.timeout(remaining):
                    await self._turn_ended.wait()
            except TimeoutError:
                break
        for w in list(self.workers.values()):
            self.stop(w, DRAIN, "the supervisor is stopping", polite=w.state != BUSY)
        try:
            async with asyncio.timeout(grace + 0.5):
                while self.workers:  # ends when every worker is reaped (SIGKILL at kill_grace)
                    self._turn_ended.clear()
                    await self._turn_ended.wait()
        except TimeoutError:
            log.error("%d workers not reaped after drain", len(self.workers))

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=2.0)
        await self.spawner.stop()
        # orphans of a zygote that died since the last sweep would outlive us
        proctree.kill_strays(self.spawner.zygote_pids)
        for w in list(self.workers.values()):
            w.close()
        await self.store.close()
        self._sampler.shutdown(wait=False, cancel_futures=True)

    # ---- intake

    def session(self, key: str) -> Session:
        s = self.sessions.get(key)
        if s is None:
            s = self.sessions[key] = Session(key)
            if (record := self.history.get(key)) is not None:
                s.restarts, s.last_exit = record.restarts, record.last_exit
        return s

    async def accept(
        self, session: str, text: str, origin: Origin, client_id: str | None = None
    ) -> Accepted:
        """Store a message durably and queue its turn. Raises Draining or QueueFull."""
        check_session_key(session)
        if self.draining:
            raise Draining()
        s = self.sessions.get(session)
        if s is not None and s.queue_depth >= self.limits.max_queue:
            raise QueueFull(f"session {session} has {s.queue_depth} messages waiting")
        accepted = await self.store.accept(session, text, origin, client_id)
        message = accepted.message
        if accepted.duplicate:
            if message.session != session:
                raise IdConflict(f"id {message.id!r} was already used for another session")
            return accepted
        self.metrics.accepted.labels(origin.channel).inc()
        self.metrics.inbox_depth.inc()
        self._turn_done[message.id] = asyncio.get_running_loop().create_future()
        self._turn_replies[message.id] = []  # a first run: every reply passes through here
        s = self.session(session)
        s.queue.append(message)
        s.last_used = time.monotonic()
        self.dispatch(s)
        return accepted

    async def wait_turn(self, message_id: str, timeout: float) -> tuple[bool, list[Reply] | None]:
        """Wait until the message's turn has ended: (ended, its replies if known here).

        The replies are None when only the store has them all (a turn run again after
        a restart, or one that ended before this call).
        """
        fut = self._turn_done.get(message_id)
        if fut is None:
            return True, None
        await self.wait_or_closing(fut, timeout)
        return fut.done(), fut.result() if fut.done() else None

    async def wait_or_closing(self, fut: asyncio.Future[Any], timeout: float) -> None:
        """Wait for `fut` (never cancelling it) until `timeout` or until the supervisor stops."""
        waiters: list[asyncio.Future[Any]] = [asyncio.ensure_future(asyncio.shield(fut))]
        if self._closing is not None:
            waiters.append(asyncio.ensure_future(asyncio.shield(self._closing)))
        try:
            await asyncio.wait(waiters, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in waiters:
                w.cancel()

    # ---- dispatch

    def dispatch(self, s: Session) -> None:
        """Move a session forward: spawn a worker, start the next turn, or go idle."""
        if s.quarantined_until is not None:
            if s.queue:
                self.background(self.refuse_queued(s), f"refuse {s.key}")
            return
        w = s.worker
        if w is None:
            if s.queue and not self.draining and not s.spawning and not s.waiting_for_slot:
                self.request_worker(s)
            elif s.is_empty():
                self.sessions.pop(s.key, None)
            return
        if w.state != IDLE:
            return
        if self.draining:  # a worker that finished starting after the drain began
            self.stop(w, DRAIN, "the supervisor is stopping", polite=True)
            return
        if s.queue:
            if w.idle_timer is not None:
                w.idle_timer.cancel()
                w.idle_timer = None
            message = s.queue.popleft()
            w.state = BUSY
            self.background(self.start_turn(s, w, message), f"turn {message.id}")
        elif self.waiting:  # another session waits for a slot: this idle one yields it
            self.stop(w, EVICTED, "evicted to make room", polite=True)
        elif w.idle_timer is None:
            w.idle_timer = asyncio.get_running_loop().call_later(
                float(self.config.supervisor.idle_timeout),
                lambda: self.stop(w, IDLE_EXIT, "idle", polite=True),
            )

    def live_workers(self) -> int:
        return len(self.workers) + sum(1 for s in self.sessions.values() if s.spawning)

    def request_worker(self, s: Session) -> None:
        if self.live_workers() >= self.config.supervisor.max_workers:
            self.evict_one()
            s.waiting_for_slot = True
            self.waiting.append(s)
            return
        s.spawning = True
        self.background(self.spawn(s), f"spawn {s.key}")

    def evict_one(self) -> None:
        """Stop the least recently used idle worker to make room."""
        candidates = [
            s
            for s in self.sessions.values()
            if s.worker is not None and s.worker.state == IDLE and not s.queue
        ]
        if candidates:
            victim = min(candidates, key=lambda s: s.last_used)
            assert victim.worker is not None
            self.stop(victim.worker, EVICTED, "evicted to make room", polite=True)

    def admit_waiting(self) -> None:
        while self.waiting and self.live_workers() < self.config.supervisor.max_workers:
            s = self.waiting.popleft()
            s.waiting_for_slot = False
            self.dispatch(s)

    async def spawn(self, s: Session) -> None:
        recent = len(self.exit_history.get(s.key, ()))
        if recent:
            # a session whose workers keep failing is restarted ever more slowly, so a
            # crash loop below restart_intensity does not keep the machine busy
            await asyncio.sleep(min(RESTART_BACKOFF_MAX, RESTART_BACKOFF * 2 ** (recent - 1)))
            if self.draining or s.quarantined_until is not None:
                s.spawning = False
                self.dispatch(s)
                return
        try:
            # a session that broke a bound within restart_period also starts at idle
            # priority: its worker gives way to every well-behaved one
            spawned = await self.spawner.spawn(s.key, idle=bool(recent))
        except Exception as e:  # SpawnError, a timeout, or fds running out
            s.spawning = False
            log.error("session %s: cannot start a worker: %s", s.key, e)
            await self.record_abnormal_exit(s)
            self.admit_waiting()
            self.dispatch(s)  # tries again, after the backoff
            return
        s.spawning = False
        w = Worker(s.key, spawned, self.on_worker_exit)
        w.demoted = bool(recent)
        s.worker = w
        self.workers[w.pid] = w
        self.background(self.serve_worker(s, w), f"worker {s.key}")

    # ---- a worker's life

    async def serve_worker(self, s: Session, w: Worker) -> None:
        """Read the worker's frames until it ends, then reap it. Owns the worker."""
        loop = asyncio.get_running_loop()
        decoder = frames.decoder_for_worker_frames()
        try:
            reader, w.writer = await asyncio.open_unix_connection(sock=w.sock)
            async with asyncio.timeout(HELLO_TIMEOUT) as scope:
                w.read_scope = scope
                hello = await frames.read_frame_async(reader, decoder, self.max_frame)
            w.read_scope = None
            if not isinstance(hello, frames.Hello) or hello.version != frames.PROTOCOL_VERSION:
                raise frames.FrameError(
                    f"expected a hello frame of version {frames.PROTOCOL_VERSION}, got {hello!r}"
                )
            self.metrics.spawn_seconds.observe(w.spawn_seconds + loop.time() - w.started)
            if w.state == STARTING:
                w.state = IDLE
                self.dispatch(s)
            async with asyncio.timeout(None) as scope:
                w.read_scope = scope
                while True:  # ends at EOF, a bad frame, or a second after the worker died
                    frame = await frames.read_frame_async(reader, decoder, self.max_frame)
                    if frame is None:
                        break
                    await self.on_frame(s, w, frame)
        except frames.FrameError as e:
            self.stop(w, PROTOCOL_ERROR, f"the worker broke the protocol ({e})")
        except TimeoutError:
            if not w.dead.is_set():
                self.stop(w, PROTOCOL_ERROR, f"the worker sent no hello within {HELLO_TIMEOUT:g}s")
        except OSError as e:
            log.debug("session %s: worker socket: %s", s.key, e)
        except Exception:
            # a bug or a store failure while serving this worker: end this worker only,
            # and still reap it below
            log.exception("session %s: serving worker %d failed", s.key, w.pid)
            self.stop(w, CRASHED, "an internal error in the supervisor")
        w.read_scope = None  # its block has ended: on_worker_exit must not touch it
        if not w.dead.is_set():
            try:
                async with asyncio.timeout(1.0):
                    await w.dead.wait()
            except TimeoutError:
                self.stop(w, PROTOCOL_ERROR, "the worker closed its socket but kept running")
            try:
                async with asyncio.timeout(float(self.config.supervisor.kill_grace) + 5.0):
                    await w.dead.wait()
            except TimeoutError:
                log.error("session %s: worker %d survived SIGKILL; giving up on it", s.key, w.pid)
        await self.reap(s, w)

    def on_worker_exit(self, w: Worker) -> None:
        # Frames the worker wrote before dying are still in the socket: read them for
        # a second more (a forked stray may hold the socket open forever).
        if w.read_scope is not None and not w.read_scope.expired():
            w.read_scope.reschedule(asyncio.get_running_loop().time() + 1.0)

    async def on_frame(self, s: Session, w: Worker, frame: frames.WorkerFrame) -> None:
        loop = asyncio.get_running_loop()
        t = w.turn
        if isinstance(frame, frames.Log):
            worker_log.log(
                frame.level,
                "[%s] %s: %s",
                s.key,
                frame.logger,
                frame.message,
                extra={"session": s.key},
            )
            self.count_output(w, FRAME_COST + len(frame.logger) + len(frame.message))
            return
        if isinstance(frame, frames.Hello):
            raise frames.FrameError("a second hello frame")
        if w.stop_reason:
            return  # the turn has been given up on: its reap answers it, late frames are dropped
        if t is None or frame.turn_id != t.message.id:
            raise frames.FrameError(f"{type(frame).__name__} frame for a turn that is not running")
        match frame:
            case frames.ReplyFrame(text=text):
                if not self.count_output(w, len(text.encode())):
                    return
                t.last_progress = loop.time()
                index = t.next_index
                t.next_index += 1
                # not awaited: the next frame need not wait for this commit
                self.queue_reply(t.message, index, text, REPLY)
            case frames.Progress(note=note):
                if self.count_output(w, FRAME_COST + len(note)):
                    t.last_progress = loop.time()
            case frames.Done(error=error, peak_rss=peak_rss, turn_cpu=turn_cpu):
                # A turn can cross the memory or CPU bound between two watchdog ticks and
                # end before the next. When the worker's own figures come near a bound,
                # measure once more, so the turn that crossed it is the one that is told.
                near = NEAR_BOUND * int(self.limits.rss_max) < peak_rss or (
                    NEAR_BOUND * float(self.limits.cpu_time_per_turn) < turn_cpu
                )
                if near:
                    sample = await self.in_sampler(partial(proctree.sample_tree, w.pid))
                    if sample is not None and not w.dead.is_set():
                        w.sample = sample
                        w.sampled_at = loop.time()
                        self.check_resources(w)
                if w.stop_reason is None:
                    # shielded: the read deadline after a worker's death must not cut
                    # an ending turn in half (it would be answered twice)
                    await asyncio.shield(self.end_turn(s, w, error))

    def count_output(self, w: Worker, n: int) -> bool:
        """Charge `n` bytes to the turn's output (or, between turns, to what the worker
        sent since its last turn: a background thread logging away counts too);
        False, and the worker is stopped, once over output_per_turn."""
        if w.stop_reason:
            return True
        limit = int(self.limits.output_per_turn)
        if w.turn is None:
            w.idle_output += n
            if w.idle_output > limit:
                self.stop(
                    w,
                    OUTPUT_LIMIT,
                    f"output limit exceeded (more than {_mib(limit)} between turns)",
                )
                return False
            return True
        w.turn.output += n
        if w.turn.output > limit:
            self.stop(
                w, OUTPUT_LIMIT, f"output limit exceeded (more than {_mib(limit)} in one turn)"
            )
            return False
        return True

    async def start_turn(self, s: Session, w: Worker, message: Message) -> None:
        loop = asyncio.get_running_loop()
        try:
            attempt = await self.store.start_attempt(message.id)
        except Exception:
            log.exception("session %s: cannot record the start of %s", s.key, message.id)
            s.queue.appendleft(message)
            if w.state == BUSY:
                w.state = IDLE
            return
        if w.stop_reason is not None or w.dead.is_set():
            # stopped, or dead, while we waited for the store: the message goes back to
            # the head of its session's queue (a new Session if the reap removed it)
            await self.store.start_attempt_undone(message.id)
            current = self.session(s.key)
            current.queue.appendleft(message)
            self.dispatch(current)
            return
        if attempt > MAX_STARTS:
            await self.send_reply(
                message,
                0,
                f"turn not run again: it was interrupted {attempt - 1} times [{CRASHED}]",
                ERROR,
            )
            await self.finish(message, FAILED)
            if w.state == BUSY:
                w.state = IDLE
            self.dispatch(s)
            return
        now = loop.time()
        w.idle_output = 0
        w.turn = ActiveTurn(
            message=message, attempt=attempt, started=now, last_progress=now, cpu_base=w.cpu
        )
        w.send(
            frames.TurnFrame(
                Turn(
                    id=message.id,
                    session=s.key,
                    text=message.text,
                    origin=message.origin,
                    attempt=attempt,
                )
            )
        )
        self.check_deadlines(w)

    def check_deadlines(self, w: Worker) -> None:
        """The turn's one timer: fires at the nearer of the turn and no-progress deadlines."""
        t = w.turn
        if t is None or w.stop_reason:
            return
        loop = asyncio.get_running_loop()
        now = loop.time()
        turn_deadline = t.started + float(self.limits.turn_timeout)
        progress_deadline = t.last_progress + float(self.limits.no_progress_timeout)
        if now >= turn_deadline:
            self.stop(w, TURN_TIMEOUT, f"turn took longer than {_secs(self.limits.turn_timeout)}")
        elif now >= progress_deadline:
            self.stop(w, NO_PROGRESS, f"no progress for {_secs(self.limits.no_progress_timeout)}")
        else:
            t.timer = loop.call_at(min(turn_deadline, progress_deadline), self.check_deadlines, w)

    async def end_turn(self, s: Session, w: Worker, error: str | None) -> None:
        t = w.turn
        assert t is not None
        w.turn = None  # from here on this turn is answered here, never by a reap
        if t.timer:
            t.timer.cancel()
        if error is not None:
            await self.send_reply(t.message, t.next_index, f"turn failed: {error}", ERROR)
            t.failed = True
        await self.finish(t.message, FAILED if t.failed else DONE)
        self.metrics.turn_seconds.observe(asyncio.get_running_loop().time() - t.started)
        if w.state == BUSY:
            w.state = IDLE
        s.last_used = time.monotonic()
        self._turn_ended.set()
        self.dispatch(s)

    async def send_reply(self, message: Message, index: int, text: str, kind: str) -> None:
        """Store a reply for delivery to the origin of `message`, and nowhere else."""
        await self.queue_reply(message, index, text, kind)

    def queue_reply(
        self, message: Message, index: int, text: str, kind: str
    ) -> asyncio.Future[Reply | None]:
        """Queue a reply for the store without waiting for its commit.

        The turn's finish is queued after it, so it commits no earlier; the reply is
        announced (long-polls, outbox, ?wait) once it is committed.
        """
        push = message.origin.channel in self.config.channels.webhook
        fut = self.store.add_reply(message, index, text, kind, push=push)
        fut.add_done_callback(partial(self.reply_stored, message, kind))
        return fut

    def reply_stored(self, message: Message, kind: str, fut: asyncio.Future[Reply | None]) -> None:
        if fut.cancelled():
            return
        if (error := fut.exception()) is not None:
            log.error("session %s: a reply could not be stored: %s", message.session, error)
            return
        reply = fut.result()
        if reply is None:
            return  # shown already, by an earlier run of the same turn
        if kind == ERROR:
            log.warning("session %s: %s", message.session, reply.text)
        self.reply_signals.notify(reply_key(message.session, message.origin.channel))
        if (replies := self._turn_replies.get(message.id)) is not None:
            replies.append(reply)
        for listener in self.on_reply:
            listener(reply)

    async def finish(self, message: Message, state: str) -> None:
        await self.store.finish(message.id, state)
        self.metrics.inbox_depth.dec()
        fut = self._turn_done.pop(message.id, None)
        replies = self._turn_replies.pop(message.id, None)
        if fut is not None and not fut.done():
            fut.set_result(replies)

    # ---- stopping workers

    def stop(self, w: Worker, reason: str, detail: str, polite: bool = False) -> None:
        """End a worker: Shutdown frame (polite) or SIGTERM to its tree, then SIGKILL at grace."""
        if w.stop_reason is not None or w.dead.is_set():
            return
        w.stop_reason = reason
        w.stop_detail = detail
        w.state = STOPPING
        w.cancel_timers()
        if reason not in (IDLE_EXIT, EVICTED, DRAIN):
            log.warning("session %s: stopping worker %d: %s [%s]", w.session, w.pid, detail, reason)
        # armed first: whatever happens while signalling, SIGKILL comes at kill_grace
        w.kill_timer = asyncio.get_running_loop().call_later(
            float(self.config.supervisor.kill_grace), self.kill, w
        )
        if polite:
            w.send(frames.Shutdown(reason=reason))
        else:
            self.signal_tree(w, signal.SIGTERM)

    def kill(self, w: Worker) -> None:
        if not w.dead.is_set():
            self.signal_tree(w, signal.SIGKILL)
            if self.delegation is not None:  # the whole cgroup at once, strays included
                kill = partial(cgroups.kill_cgroup, self.delegation.workers, w.pid)
                self.background(self.in_sampler(kill), f"cgroup.kill {w.session}")

    def signal_tree(self, w: Worker, sig: int) -> None:
        """Signal the worker now, and its descendants from the sampler's thread."""
        w.signal(sig)
        if sig != signal.SIGKILL:
            w.signal(signal.SIGCONT)  # a stopped worker acts on SIGTERM only once continued
        fd = w.dup_pidfd()
        if fd is None:
            return

        def walk() -> int:
            try:
                return proctree.signal_descendants(fd, w.pid, sig)
            finally:
                os.close(fd)

        self.background(self.in_sampler(walk), f"signal {w.session}")

    async def in_sampler(self, fn: Callable[[], Any]) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._sampler, fn)

    async def reap(self, s: Session, w: Worker) -> None:
        """The worker is dead: account for it, answer its turn, free its slot."""
        exited = await self.spawner.exit_status(w.pid, timeout=1.0)
        w.status = exited.status if exited else None
        own_reason, own_detail = describe_exit(exited, self.spawner.settings.memory_max)
        reason = w.stop_reason or own_reason
        detail = w.stop_detail or own_detail
        w.close()
        self.workers.pop(w.pid, None)
        self.metrics.worker_exits.labels(reason).inc()
        s.last_exit = reason
        t = w.turn
        w.turn = None
        try:
            if t is not None:
                if reason == DRAIN:
                    s.queue.appendleft(t.message)
                    await self.store.start_attempt_undone(t.message.id)
                else:
                    await self.send_reply(
                        t.message, t.next_index, f"turn stopped: {detail} [{reason}]", ERROR
                    )
                    await self.finish(t.message, FAILED)
                    self.metrics.turn_seconds.observe(asyncio.get_running_loop().time() - t.started)
            if reason in ABNORMAL_REASONS:
                s.restarts += 1
                self.history[s.key] = SessionRecord(
                    quarantined_until=s.quarantined_until, restarts=s.restarts, last_exit=reason
                )
                await self.store.record_abnormal_exit(s.key, reason)
                await self.record_abnormal_exit(s)
        except Exception:
            # the store failed: the message stays pending for the next start; the
            # bookkeeping below must happen regardless, or the session is wedged
            log.exception("session %s: recording the end of worker %d failed", s.key, w.pid)
        if s.worker is w:
            s.worker = None
        w.reaped.set()
        self._turn_ended.set()
        self.admit_waiting()
        self.dispatch(s)

    # ---- crash loops

    async def record_abnormal_exit(self, s: Session) -> None:
        now = time.monotonic()
        period = float(self.limits.restart_period)
        history = self.exit_history.setdefault(s.key, deque())
        history.append(now)
        while history and history[0] < now - period:
            history.popleft()
        if len(history) > self.limits.restart_intensity and s.quarantined_until is None:
            count = len(history)
            history.clear()
            until = time.time() + float(self.limits.quarantine)
            log.error(
                "session %s: %d abnormal exits within %s: quarantined", s.key, count, _secs(period)
            )
            await self.store.set_quarantine(s.key, until)
            self.quarantine_until(s, until)

    def forget_old_exits(self) -> None:
        """Drop exit histories older than restart_period: the dict stays as small as
        the set of sessions that failed recently."""
        horizon = time.monotonic() - float(self.limits.restart_period)
        for key in [k for k, h in self.exit_history.items() if not h or h[-1] < horizon]:
            del self.exit_history[key]

    def quarantine_until(self, s: Session, until: float) -> None:
        s.quarantined_until = until
        if s.quarantine_timer:
            s.quarantine_timer.cancel()
        delay = max(0.0, until - time.time())
        s.quarantine_timer = asyncio.get_running_loop().call_later(
            delay, lambda: self.background(self.release(s.key), f"release {s.key}")
        )
        self.dispatch(s)

    async def release(self, key: str) -> bool:
        s = self.sessions.get(key)
        if s is None or s.quarantined_until is None:
            return False
        s.quarantined_until = None
        if s.quarantine_timer:
            s.quarantine_timer.cancel()
            s.quarantine_timer = None
        self.exit_history.pop(key, None)
        await self.store.set_quarantine(key, None)
        log.info("session %s: released from quarantine", key)
        self.dispatch(s)
        return True

    async def refuse_queued(self, s: Session) -> None:
        """Answer every queued message of a quarantined session with an error."""
        when = time.strftime("%H:%M:%S UTC", time.gmtime(s.quarantined_until or 0))
        while s.queue and s.quarantined_until is not None:  # ends when the queue is empty
            message = s.queue.popleft()
            await self.send_reply(
                message,
                0,
                f"session quarantined after repeated worker failures; messages are refused "
                f"until {when} or `corral release {s.key}` [quarantined]",
                ERROR,
            )
            await self.finish(message, FAILED)

    # ---- operator actions

    async def kill_session(self, key: str, force: bool) -> KillResult:
        """Stop a session's worker for an operator; answers once it is reaped (bounded)."""
        s = self.sessions.get(key)
        if s is None or s.worker is None:
            raise UnknownSession(key)
        w = s.worker
        if force:
            self.stop(w, KILLED, "killed by an operator")
            self.kill(w)
        else:
            self.stop(w, KILLED, "stopped by an operator")
        try:
            async with asyncio.timeout(float(self.config.supervisor.kill_grace) + 3.0):
                await w.reaped.wait()
        except TimeoutError:
            pass
        return KillResult(
            session=key, pid=w.pid, reason=w.stop_reason or KILLED, reaped=w.reaped.is_set()
        )

    # ---- watching

    async def watch(self) -> None:
        """The watchdog: sample worker trees on a bounded budget and enforce rss/cpu bounds."""
        loop = asyncio.get_running_loop()
        ticks = 0
        while True:  # ends when cancelled at close
            await asyncio.sleep(SAMPLE_INTERVAL)
            ticks += 1
            # not while a zygote starts: its PID is known only once the start returns
            if ticks % STRAY_SWEEP_TICKS == 0 and not self.spawner.starting:
                keep = set(self.spawner.zygote_pids)
                killed = await self.in_sampler(partial(proctree.kill_strays, keep))
                if killed:
                    log.warning("killed %d processes orphaned by a dead zygote", len(killed))
                self.forget_old_exits()
            batch = self.pick_for_sampling()
            if not batch:
                continue
            pids = [w.pid for w in batch]
            samples = await loop.run_in_executor(self._sampler, _sample_all, pids)
            now = loop.time()
            for w, sample in zip(batch, samples, strict=True):
                if sample is None or w.dead.is_set():
                    continue
                w.sample = sample
                w.sampled_at = now
                self.check_resources(w)

    def pick_for_sampling(self) -> list[Worker]:
        """Busy workers first, then the longest unsampled; at most SAMPLE_BUDGET."""
        live = [w for w in self.workers.values() if not w.dead.is_set()]
        live.sort(key=lambda w: (w.state != BUSY, w.sampled_at))
        return live[:SAMPLE_BUDGET]

    def check_resources(self, w: Worker) -> None:
        rss_max = int(self.limits.rss_max)
        if w.rss > rss_max:
            self.stop(
                w,
                RSS_LIMIT,
                f"memory limit exceeded (rss {_mib(w.rss, up=True)} > {_mib(rss_max)})",
            )
            return
        if w.turn is not None:
            used = w.cpu - w.turn.cpu_base
            limit = float(self.limits.cpu_time_per_turn)
            if used > min(DEMOTE_CPU, limit / 2) and not w.demoted:
                self.demote(w)
            if used > limit:
                self.stop(
                    w, CPU_LIMIT, f"CPU time limit exceeded ({used:.1f}s > {limit:g}s in this turn)"
                )

    def demote(self, w: Worker) -> None:
        """Let a worker run only on CPU time nothing else wants (SCHED_IDLE), for the rest
        of its life: one whose turn burns CPU, or one of a session that recently broke a
        bound. Short, interactive turns of other sessions keep their latency on a small
        machine. The worker is replaced after idle_timeout like any other."""
        w.demoted = True
        fd = w.dup_pidfd()
        if fd is None:
            return

        def move() -> int:
            try:
                return proctree.demote_tree(fd, w.pid)
            finally:
                os.close(fd)

        self.background(self.in_sampler(move), f"demote {w.session}")

    async def measure_lag(self) -> None:
        loop = asyncio.get_running_loop()
        while True:  # ends when cancelled at close
            before = loop.time()
            await asyncio.sleep(LAG_INTERVAL)
            self.lag = max(0.0, loop.time() - before - LAG_INTERVAL)
            self.lag_history.append(self.lag)
            self.metrics.loop_lag.observe(self.lag)
            for hook in self.on_tick:
                hook()

    # ---- views

    def session_info(self, s: Session) -> SessionInfo:
        now = asyncio.get_running_loop().time()
        w = s.worker
        t = w.turn if w else None
        return SessionInfo(
            session=s.key,
            state=s.state,
            pid=w.pid if w else None,
            rss=w.rss if w else 0,
            cpu=w.cpu if w else 0.0,
            processes=w.sample.processes if w and w.sample else (1 if w else 0),
            age=now - w.started if w else None,
            turn_age=now - t.started if t else None,
            turn=t.message.id if t else None,
            attempt=t.attempt if t else None,
            queue=s.queue_depth,
            restarts=s.restarts,
            last_exit=s.last_exit,
            demoted=w.demoted if w else False,
            quarantined_until=s.quarantined_until,
        )

    def status(self) -> Status:
        by_state: dict[str, int] = dict.fromkeys(STATES, 0)
        for s in self.sessions.values():
            by_state[s.state] += 1
        return Status(
            pid=os.getpid(),
            version=VERSION,
            uptime=time.time() - self.started_wall,
            draining=self.draining,
            agent=self.config.agent.entrypoint,
            state_dir=str(self.config.state_path),
            zygote_pid=self.spawner.zygote_pid,
            sessions=len(self.sessions),
            workers=by_state,
            inbox=len(self._turn_done),
            loop_lag=self.lag,
            loop_lag_max=max(self.lag_history, default=0.0),
        )

    def session_rows(self) -> list[SessionRow]:
        return [
            SessionRow(
                s.key,
                s.state,
                s.worker.rss if s.worker else 0,
                s.worker.cpu if s.worker else 0.0,
                s.queue_depth,
                s.worker is not None,
            )
            for s in self.sessions.values()
        ]


def _sample_all(pids: list[int]) -> list[proctree.TreeSample | None]:
    return [proctree.sample_tree(pid) for pid in pids]
