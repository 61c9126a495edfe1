"""Tasks the supervisor owns: children whose failure is contained, and permanent services
whose failure is restarted.

A child (one worker's life, one turn) that raises is logged and ends; nothing else
depends on it. A permanent service (the watchdog, the loop-lag tick, a delivery loop)
is what keeps a promise for every session, so like OTP's permanent child it is
restarted with backoff, and past `intensity` failures within `period` the supervisor
gives up: it logs why and asks to stop with a non-zero exit, so systemd restarts the
whole service. While any service is down, `healthy()` is False and the systemd
watchdog is not fed.

A transient service (OTP's `transient` child: a Telegram poller) is restarted the
same way when it fails, but one that returns has ended for good: it gave up on
something only the operator can fix (a refused token), said so, and the rest of the
supervisor keeps serving. `stop(name)` ends a service early (pollers at the drain).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

log = logging.getLogger("corral.supervisor")

RESTART_BACKOFF = 0.1  # seconds before a failed service runs again; doubles per failure
RESTART_BACKOFF_MAX = 5.0
INTENSITY = 5  # failures of one service within PERIOD that end the supervisor
PERIOD = 60.0
CLOSE_TIMEOUT = 2.0


def window(times: list[float], now: float, period: float) -> list[float]:
    """The restart window after an event at `now`: the events of the last `period`
    seconds, `now` included (OTP's add_restart). Compare its length with an intensity."""
    return [t for t in times if t >= now - period] + [now]


class Tasks:
    """Children of the supervisor: kept, logged if they fail, cancelled at close."""

    def __init__(self) -> None:
        self._tasks: set[asyncio.Task[Any]] = set()

    def start(self, coro: Coroutine[Any, Any, Any], what: str) -> asyncio.Task[Any]:
        async def contained() -> None:
            try:
                await coro
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("%s failed", what)

        task = asyncio.get_running_loop().create_task(contained(), name=what)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=CLOSE_TIMEOUT)


class Services:
    """Permanent services, each restarted when it fails (see the module docstring)."""

    def __init__(
        self,
        on_fatal: Callable[[str], None],
        intensity: int = INTENSITY,
        period: float = PERIOD,
        backoff: float = RESTART_BACKOFF,
    ) -> None:
        self.on_fatal = on_fatal
        self.intensity = intensity
        self.period = period
        self.backoff = backoff
        self.down: set[str] = set()
        self.restarts: dict[str, int] = {}
        self._tasks = Tasks()
        self._running: dict[str, asyncio.Task[Any]] = {}

    def start(
        self, name: str, run: Callable[[], Coroutine[Any, Any, None]], transient: bool = False
    ) -> None:
        """Run `run()` for the life of the supervisor; `run` makes a fresh coroutine.
        A `transient` service that returns is not restarted."""
        self.restarts.setdefault(name, 0)
        task = self._tasks.start(self._supervise(name, run, transient), f"service {name}")
        self._running[name] = task
        task.add_done_callback(lambda t: self._running.get(name) is t and self._running.pop(name))

    def stop(self, name: str) -> None:
        """End a service now (it is not restarted, and not counted as down)."""
        task = self._running.pop(name, None)
        if task is not None:
            task.cancel()
        self.down.discard(name)

    def healthy(self) -> bool:
        return not self.down

    async def _supervise(
        self, name: str, run: Callable[[], Coroutine[Any, Any, None]], transient: bool
    ) -> None:
        failures: list[float] = []
        while True:  # ends when cancelled at close, or past the intensity limit
            try:
                await run()
                if transient:
                    log.info("service %s ended", name)
                    return
                log.error("service %s returned; it should run until the supervisor stops", name)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("service %s failed", name)
            self.down.add(name)
            failures = window(failures, time.monotonic(), self.period)
            if len(failures) > self.intensity:
                why = f"service {name} failed {len(failures)} times within {self.period:g}s"
                log.critical("%s: giving up, so that the whole service is restarted", why)
                self.on_fatal(why)
                return
            delay = min(RESTART_BACKOFF_MAX, self.backoff * 2 ** (len(failures) - 1))
            await asyncio.sleep(delay)
            self.restarts[name] += 1
            self.down.discard(name)
            log.warning("service %s restarted (%d so far)", name, self.restarts[name])

    async def close(self) -> None:
        await self._tasks.close()


async def within(timeout: float, aw: Awaitable[object]) -> bool:
    """Await `aw` for at most `timeout` seconds: True if it finished, False if cut off.
    The one bounded wait: anything a worker or a peer controls is awaited through it."""
    try:
        async with asyncio.timeout(timeout):
            await aw
    except TimeoutError:
        return False
    return True


class Changes:
    """Something the supervisor waits on changed (a turn ended, a worker was reaped):
    `wait_until(predicate, timeout)` is the one bounded wait for such a condition."""

    def __init__(self) -> None:
        self._next: asyncio.Future[None] | None = None

    def notify(self) -> None:
        if self._next is not None and not self._next.done():
            self._next.set_result(None)
        self._next = None

    async def wait_until(self, predicate: Callable[[], bool], timeout: float) -> bool:
        """True once `predicate()` holds; False if `timeout` seconds pass first."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not predicate():  # ends at the deadline
            remaining = deadline - loop.time()
            if remaining <= 0:
                return False
            if self._next is None:
                self._next = loop.create_future()
            if not await within(remaining, asyncio.shield(self._next)):
                return predicate()
        return True
