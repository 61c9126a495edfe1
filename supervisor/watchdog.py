"""What is sampled rather than timed: workers' memory and CPU, strays of a dead zygote,
and the supervisor's own loop lag.

The watchdog samples worker trees on a bounded budget per tick (busy workers first,
then the longest unsampled; at most SAMPLE_BUDGET trees and PROCESS_BUDGET processes),
off the loop on the process thread, and stops a worker over rss_max (its tree's PSS),
max_tasks, or cpu_time_per_turn, which bounds a turn and, just the same, the time
between two turns (a child left spinning after its turn). Turn deadlines are not here:
they are loop timers in Turns.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable
from functools import partial

from corral.protocol.spawn import cpu_lifetime
from corral.protocol.types import ExitReason, SessionState
from corral.supervisor import proctree
from corral.supervisor.config import LimitsConfig
from corral.supervisor.metrics import Metrics
from corral.supervisor.procthread import ProcThread
from corral.supervisor.spawner import Spawner
from corral.supervisor.worker import Worker, mib

log = logging.getLogger("corral.supervisor")

SAMPLE_INTERVAL = 0.1  # seconds between watchdog ticks
SAMPLE_BUDGET = 64  # worker trees sampled per tick, at most: a tick's cost is bounded
# processes read per tick, at most (a tree bigger than this is sampled alone): a lone
# worker costs about 10 us of the process thread, a process of a tree 0.1-1 ms (its PSS)
PROCESS_BUDGET = 128
# a tree is sampled again only after this many times what its last sample cost, so a
# big tree takes at most a fifth of the process thread, however busy it is
SAMPLE_DUTY = 5.0
STRAY_SWEEP_TICKS = 10  # ticks between sweeps for what a dead zygote left
DEMOTE_CPU = 0.5  # CPU seconds in one turn after which a worker's tree runs SCHED_IDLE
LAG_INTERVAL = 0.1


class Watchdog:
    def __init__(
        self,
        limits: LimitsConfig,
        workers: Callable[[], list[Worker]],
        spawner: Spawner,
        procs: ProcThread,
        on_sweep: Callable[[], None],
    ) -> None:
        self.limits = limits
        self.workers = workers
        self.spawner = spawner
        self.procs = procs
        self.on_sweep = on_sweep  # housekeeping at each stray sweep

    async def run(self) -> None:
        ticks = 0
        while True:  # ends when cancelled at close
            await asyncio.sleep(SAMPLE_INTERVAL)
            ticks += 1
            # not while a zygote starts: its PID is known only once the start returns
            if ticks % STRAY_SWEEP_TICKS == 0 and not self.spawner.starting:
                await self.sweep_strays()
                self.on_sweep()
            batch = self.pick_for_sampling()
            if batch:
                pids = [w.pid for w in batch]
                samples = await self.procs.run(partial(sample_all, pids, self.limits.max_tasks))
                for w, sample in zip(batch, samples, strict=True):
                    self.record(w, sample)

    async def sweep_strays(self) -> None:
        keep = set(self.spawner.zygote_pids)
        killed = await self.procs.run(lambda: proctree.kill_strays(keep))
        if killed:
            log.warning("killed %d processes orphaned by a dead zygote", len(killed))

    def pick_for_sampling(self) -> list[Worker]:
        """Busy workers first, then the longest unsampled; at most SAMPLE_BUDGET trees
        and, after the first, PROCESS_BUDGET processes (as many as each had last time)."""
        now = asyncio.get_running_loop().time()
        live = [w for w in self.workers() if not w.dead.is_set() and now >= self.due(w)]
        live.sort(key=lambda w: (w.state is not SessionState.BUSY, w.sampled_at))
        batch: list[Worker] = []
        processes = 0
        for w in live[:SAMPLE_BUDGET]:
            processes += w.sample.processes if w.sample else 1
            if batch and processes > PROCESS_BUDGET:
                break
            batch.append(w)
        return batch

    @staticmethod
    def due(w: Worker) -> float:
        """When a worker's tree may be sampled again (loop time)."""
        return w.sampled_at + SAMPLE_DUTY * w.sample.cost if w.sample else 0.0

    async def measure(self, w: Worker) -> None:
        """Sample one worker's tree now and check its bounds (a turn ending near one)."""
        max_tasks = self.limits.max_tasks
        self.record(w, await self.procs.run(lambda: proctree.sample_tree(w.pid, max_tasks)))

    def record(self, w: Worker, sample: proctree.TreeSample | None) -> None:
        if sample is None or w.dead.is_set():
            return
        w.sample = sample
        w.sampled_at = asyncio.get_running_loop().time()
        if w.turn is not None or w.state is not SessionState.IDLE:
            w.between_cpu_base = None
        elif w.between_cpu_base is None:  # the first sample since its turn ended
            w.between_cpu_base = sample.cpu
        self.check(w)

    def check(self, w: Worker) -> None:
        # a running turn keeps the bounds it started with (a reload applies from the next)
        limits = w.turn.limits if w.turn is not None else self.limits
        rss_max = int(limits.rss_max)
        if w.rss > rss_max:
            detail = f"memory limit exceeded (rss {mib(w.rss, up=True)} > {mib(rss_max)})"
            w.stop(ExitReason.RSS_LIMIT, detail)
            return
        tasks = w.sample.tasks if w.sample else 0
        if tasks > limits.max_tasks:
            detail = f"too many processes and threads ({tasks} > {limits.max_tasks} in its tree)"
            w.stop(ExitReason.TASKS_LIMIT, detail)
            return
        limit = float(limits.cpu_time_per_turn)
        if w.turn is not None:
            self.check_cpu(w, w.cpu - w.turn.cpu_base, limit, "in this turn")
        elif w.between_cpu_base is not None:
            # an idle worker's tree gets a turn's worth of CPU until its next turn
            self.check_cpu(w, w.cpu - w.between_cpu_base, limit, "between turns")
            if w.sample and w.sample.root_cpu + limit + 2 > cpu_lifetime(limit):
                # its next turn could run into the RLIMIT_CPU hard limit: start afresh
                log.info("session %s: retiring worker %d at its CPU lifetime", w.session, w.pid)
                w.retire(ExitReason.IDLE)

    def check_cpu(self, w: Worker, used: float, limit: float, when: str) -> None:
        if used > min(DEMOTE_CPU, limit / 2) and not w.demoted:
            w.demote()  # a CPU-heavy tree gives way to every interactive one
        if used > limit:
            detail = f"CPU time limit exceeded ({used:.1f}s > {limit:g}s {when})"
            w.stop(ExitReason.CPU_LIMIT, detail)


def sample_all(pids: list[int], max_tasks: int) -> list[proctree.TreeSample | None]:
    return [proctree.sample_tree(pid, max_tasks) for pid in pids]


class LoopLag:
    """How late the loop runs a 100 ms timer. Each tick also runs the `on_tick` hooks
    (the systemd watchdog ping), but only while `healthy()`: a loop that is stuck, or
    whose services are down, stops feeding systemd."""

    def __init__(self, metrics: Metrics, healthy: Callable[[], bool]) -> None:
        self.metrics = metrics
        self.healthy = healthy
        self.lag = 0.0
        self.last_minute: deque[float] = deque(maxlen=int(60 / LAG_INTERVAL))
        self.on_tick: list[Callable[[], None]] = []

    @property
    def lag_max(self) -> float:
        return max(self.last_minute, default=0.0)

    async def run(self) -> None:
        while True:  # ends when cancelled at close
            # the clock, not loop.time(): uvloop's is cached per iteration, to the millisecond
            before = time.monotonic()
            await asyncio.sleep(LAG_INTERVAL)
            self.lag = max(0.0, time.monotonic() - before - LAG_INTERVAL)
            self.last_minute.append(self.lag)
            self.metrics.loop_lag.observe(self.lag)
            if self.healthy():
                for hook in self.on_tick:
                    hook()
