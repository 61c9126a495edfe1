"""The supervisor's file descriptors: the limit raised at start, the count kept in view.

Each worker costs the supervisor a pidfd and a socket (and, while it starts, a socketpair
and a pidfd in flight); each HTTP connection one more. Running out makes innocent sessions
fail to spawn, so new sessions are refused (429) while a reserve is still free.
"""

from __future__ import annotations

import logging
import os
import resource
import time

log = logging.getLogger("corral.supervisor")

RESERVE_SHARE = 0.1  # of the limit, kept free for the sessions already running
RESERVE_MIN = 64
PER_NEW_SESSION = 4  # descriptors a new session is assumed to take until the next count
RECOUNT = 0.1  # seconds a count is reused for


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


def count() -> int:
    """Descriptors open in this process."""
    try:
        return len(os.listdir("/proc/self/fd")) - 1  # less the one listdir itself opened
    except OSError:
        return 0


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
            self._count, self._counted_at = count(), now
            # read again: an operator may have changed it (prlimit) since the start
            self.limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        return self._count

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
