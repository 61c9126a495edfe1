"""The supervisor's file descriptors: the limit raised at start, the count kept in view.

Each worker costs the supervisor a pidfd and a socket (and, while it starts, a socketpair
and a pidfd in flight); each HTTP connection one more. Running out makes innocent sessions
fail to spawn, so new sessions are refused (429) while a reserve is still free.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import resource
import time

from corral.supervisor.logs import Burst

log = logging.getLogger("corral.supervisor")

RESERVE_SHARE = 0.1  # of the limit, kept free for the sessions already running
RESERVE_MIN = 64
PER_NEW_SESSION = 4  # descriptors a new session is assumed to take until the next count
RECOUNT = 0.1  # seconds a count is reused for
WATCH_EVERY = 1.0  # seconds between the watch's probes


def raise_limit() -> int:
    """Raise RLIMIT_NOFILE's soft limit to the hard limit; the limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        hard = max(soft, 1 << 20) if soft != resource.RLIM_INFINITY else 1 << 20
    if soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError) as e:
            log.warning("cannot raise the descriptor limit from %d to %d: %s", soft, hard, e)
    return soft


def count(limit: int) -> int:
    """Descriptors open in this process (`limit` when there is none left to count with)."""
    try:
        return len(os.listdir("/proc/self/fd")) - 1  # less the one listdir itself opened
    except OSError as e:
        return limit if e.errno in (errno.EMFILE, errno.ENFILE) else 0


class Descriptors:
    """What `corral status` shows and `accept` asks before a new session takes a worker."""

    def __init__(self) -> None:
        self.limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        self._count = 0
        self._counted_at = -RECOUNT

    def raise_limit(self) -> None:
        self.limit = raise_limit()

    @property
    def reserve(self) -> int:
        return max(RESERVE_MIN, int(self.limit * RESERVE_SHARE))

    def in_use(self) -> int:
        now = time.monotonic()
        if now - self._counted_at >= RECOUNT:
            # read first: an operator may have changed it (prlimit) since the start
            self.limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
            self._count, self._counted_at = count(self.limit), now
        return self._count

    async def watch(self) -> None:
        """Say when the descriptors have run out, whatever the event loop: asyncio reports
        each accept() that fails (the HTTP channel logs that too), but uvloop's libuv
        closes such connections itself and tells no one, and a spawn or a store file
        fails on its own path. One line a burst. A probe, not a count: listing
        /proc/self/fd takes 1.7 ms at 3,000 descriptors, opening one takes microseconds."""
        burst = Burst(log, logging.ERROR)
        while True:  # a permanent service: ends when cancelled at stop
            try:
                os.close(os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC))
            except OSError as e:  # anything but running out is not this watch's to say
                if e.errno in (errno.EMFILE, errno.ENFILE):
                    burst.report(
                        "out of file descriptors (%s; the limit is %d): new connections, "
                        "workers and files fail until some are freed (raise LimitNOFILE, "
                        "or see what holds them: corral status, ls /proc/%d/fd)",
                        "this process's" if e.errno == errno.EMFILE else "the system's",
                        resource.getrlimit(resource.RLIMIT_NOFILE)[0],
                        os.getpid(),
                    )
            await asyncio.sleep(WATCH_EVERY)

    def take_new_session(self) -> str | None:
        """None if a new session may start a worker (counted until the next count), else
        why not."""
        used = self.in_use()
        if used + PER_NEW_SESSION > self.limit - self.reserve:
            return (
                f"corral is short of file descriptors ({used} of {self.limit} in use, "
                f"{self.reserve} kept for running sessions): no new sessions now"
            )
        self._count += PER_NEW_SESSION
        return None
