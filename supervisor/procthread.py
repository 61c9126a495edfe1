"""The supervisor's one thread for blocking process I/O: /proc walks, signalling a tree,
cgroup writes. The loop hands work over and never waits on it unless it needs the answer."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

log = logging.getLogger("corral.supervisor")
T = TypeVar("T")


class ProcThread:
    def __init__(self) -> None:
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="corral-proc")

    async def run(self, fn: Callable[[], T]) -> T:
        """Run `fn` on the thread and await its result."""
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn)

    def submit(self, fn: Callable[[], object], what: str) -> None:
        """Run `fn` on the thread without waiting; a failure is logged."""

        def done(fut: Future[object]) -> None:
            if not fut.cancelled() and (error := fut.exception()) is not None:
                log.error("%s failed: %s", what, error)

        try:
            self._pool.submit(fn).add_done_callback(done)
        except RuntimeError:  # shut down: the supervisor is closing
            pass

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
