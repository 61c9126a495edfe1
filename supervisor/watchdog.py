"""What is sampled rather than timed: workers' memory and CPU, strays of a dead zygote,
and the supervisor's own loop lag.

The watchdog samples worker trees on a bounded budget per tick (busy workers first,
then the longest unsampled), off the loop on the process thread, and stops a worker
over rss_max or cpu_time_per_turn. Turn deadlines are not here: they are loop timers
in Turns.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable
from functools import partial

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
                samples = await self.procs.run(partial(sample_all, [w.pid for w in batch]))
                for w, sample in zip(batch, samples, strict=True):
                    self.record(w, sample)

    async def sweep_strays(self) -> None:
        keep = set(self.spawner.zygote_pids)
        killed = await self.procs.run(lambda: proctree.kill_strays(keep))
        if killed:
            log.warning("killed %d processes orphaned by a dead zygote", len(killed))

    def pick_for_sampling(self) -> list[Worker]:
        """Busy workers first, then the longest unsampled; at most SAMPLE_BUDGET."""
        live = [w for w in self.workers() if not w.dead.is_set()]
        live.sort(key=lambda w: (w.state is not SessionState.BUSY, w.sampled_at))
        return live[:SAMPLE_BUDGET]

    async def measure(self, w: Worker) -> None:
        """Sample one worker's tree now and check its bounds (a turn ending near one)."""
        self.record(w, await self.procs.run(lambda: proctree.sample_tree(w.pid)))

    def record(self, w: Worker, sample: proctree.TreeSample | None) -> None:
        if sample is None or w.dead.is_set():
            return
        w.sample = sample
        w.sampled_at = asyncio.get_running_loop().time()
        self.check(w)

    def check(self, w: Worker) -> None:
        rss_max = int(self.limits.rss_max)
        if w.rss > rss_max:
            detail = f"memory limit exceeded (rss {mib(w.rss, up=True)} > {mib(rss_max)})"
            w.stop(ExitReason.RSS_LIMIT, detail)
            return
        if w.turn is not None:
            used = w.cpu - w.turn.cpu_base
            limit = float(self.limits.cpu_time_per_turn)
            if used > min(DEMOTE_CPU, limit / 2) and not w.demoted:
                w.demote()  # a CPU-heavy turn gives way to every interactive one
            if used > limit:
                detail = f"CPU time limit exceeded ({used:.1f}s > {limit:g}s in this turn)"
                w.stop(ExitReason.CPU_LIMIT, detail)


def sample_all(pids: list[int]) -> list[proctree.TreeSample | None]:
    return [proctree.sample_tree(pid) for pid in pids]


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
