"""Retention: the store does not grow forever. Finished messages whose replies are all
settled (delivered, fetched or dead) are deleted with those replies once `[retention]
keep` has passed since their turn ended, in small batches, each one store operation on
the store's thread, so the loop and other operations go on in between. Freed pages are
reused, so under steady load the SQLite file levels off instead of growing.

A pending message, or one with a reply still waiting for delivery, is never pruned. A
client id of a pruned message is free again: reusing it makes a new message."""

from __future__ import annotations

import asyncio
import logging
import time

from corral.supervisor.stores import AnyStore
from corral.supervisor.storethread import StoreError

log = logging.getLogger("corral.store")

BATCH = 500  # messages per delete (one store operation)
PAUSE = 0.05  # seconds between batches, so a long backlog does not hog the store
EVERY_MAX = 60.0  # seconds between passes, at most (keep / 4 when keep is short)
EVERY_MIN = 0.5


class Retention:
    def __init__(self, store: AnyStore, keep: float) -> None:
        self.store = store
        self.keep = float(keep)
        self.every = min(max(self.keep / 4, EVERY_MIN), EVERY_MAX)
        self.pruned = 0  # messages deleted since start

    async def run(self) -> None:
        """A service: one pass every `every` seconds."""
        while True:  # ends when cancelled at close
            try:
                await self.prune()
            except StoreError as e:  # a full disk refuses deletes too: the next pass retries
                log.warning("retention: pass skipped: %s", e)
            await asyncio.sleep(self.every)

    async def prune(self) -> int:
        """Delete what is older than `keep`, batch by batch; how many messages."""
        before = time.time() - self.keep
        total = 0
        while True:  # ends with a batch that is not full
            n = await self.store.prune(before, BATCH)
            total += n
            if n < BATCH:
                break
            await asyncio.sleep(PAUSE)
        if total:
            self.pruned += total
            log.info("retention: pruned %d messages finished before %s", total, _ts(before))
        return total


def _ts(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(t))
