"""Crash loops: what the supervisor remembers of a session past its worker.

Per session key: the abnormal exits within `restart_period` (OTP's restart intensity),
the durable record (restarts, last exit, quarantine end) and the quarantine's timer.
The policy is small on purpose: `record` an exit and learn whether the session is now
quarantined; `backoff` before its next worker; `release` it early. The owner of the
sessions is told of a quarantine's end through `on_release`; it never keeps timelines.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from corral.protocol.types import ABNORMAL_REASONS
from corral.supervisor.config import LimitsConfig
from corral.supervisor.services import window
from corral.supervisor.store import SessionRecord
from corral.supervisor.stores import AnyStore
from corral.supervisor.storethread import StoreError

log = logging.getLogger("corral.supervisor")

RESTART_BACKOFF = 0.1  # seconds before the next worker after one abnormal exit; doubles
RESTART_BACKOFF_MAX = 5.0


def secs(s: float) -> str:
    return f"{s * 1000:.0f}ms" if s < 1 else f"{s:g}s"


class CrashLoops:
    def __init__(
        self, store: AnyStore, limits: LimitsConfig, on_release: Callable[[str], None]
    ) -> None:
        self.store = store
        self.limits = limits
        self.on_release = on_release
        self.records: dict[str, SessionRecord] = {}  # sessions that ever failed
        self._exits: dict[str, list[float]] = {}  # monotonic times within restart_period
        self._timers: dict[str, asyncio.TimerHandle] = {}

    async def restore(self) -> list[str]:
        """Load the records of the last run; the keys of sessions still quarantined."""
        self.records = await self.store.session_records()
        now = time.time()
        held = [k for k, r in self.records.items() if (r.quarantined_until or 0) > now]
        for key in held:
            self._arm(key, self.records[key].quarantined_until or now)
        return held

    def adopt(self, key: str, record: SessionRecord | None) -> None:
        """The session's record as the store has it now (a cluster node took it over)."""
        if record is None:
            return
        self.records[key] = record
        if (record.quarantined_until or 0) > time.time():
            self._arm(key, record.quarantined_until or 0.0)

    def quarantined(self, key: str) -> float | None:
        """The wall-clock end of the session's quarantine, or None."""
        record = self.records.get(key)
        return record.quarantined_until if record is not None else None

    def recent(self, key: str) -> int:
        """Abnormal exits of the session within restart_period."""
        return len(self._exits.get(key, ()))

    def backoff(self, key: str) -> float:
        """Seconds to wait before the session's next worker: a session whose workers keep
        failing is restarted ever more slowly, so a crash loop below restart_intensity
        does not keep the machine busy."""
        recent = self.recent(key)
        return min(RESTART_BACKOFF_MAX, RESTART_BACKOFF * 2 ** (recent - 1)) if recent else 0.0

    async def record(self, key: str, reason: str) -> float | None:
        """Account for a worker's exit; the quarantine end if this one started it."""
        old = self._record(key)
        if reason not in ABNORMAL_REASONS:
            self.records[key] = SessionRecord(
                quarantined_until=old.quarantined_until, restarts=old.restarts, last_exit=reason
            )
            return None
        self.records[key] = SessionRecord(
            quarantined_until=old.quarantined_until, restarts=old.restarts + 1, last_exit=reason
        )
        try:
            await self.store.record_abnormal_exit(key, reason)
            return await self.count_failure(key)
        except StoreError as e:  # counted in memory; the turn must still be answered
            log.error("session %s: its worker's exit could not be stored: %s", key, e)
            return None

    async def count_failure(self, key: str) -> float | None:
        """One more failure in the session's window (an abnormal exit; a worker that could
        not start is the supervisor's trouble and never counted); the quarantine end if the
        window passed restart_intensity."""
        period = float(self.limits.restart_period)
        exits = self._exits[key] = window(self._exits.get(key, []), time.monotonic(), period)
        if len(exits) <= self.limits.restart_intensity or self.quarantined(key) is not None:
            return None
        del self._exits[key]
        until = time.time() + float(self.limits.quarantine)
        log.error(
            "session %s: %d abnormal exits within %s: quarantined", key, len(exits), secs(period)
        )
        await self.store.set_quarantine(key, until)
        self._set_quarantine(key, until)
        self._arm(key, until)
        return until

    async def release(self, key: str) -> bool:
        """Lift a quarantine now; False if the session is not quarantined."""
        if self.quarantined(key) is None:
            return False
        self._set_quarantine(key, None)
        self._exits.pop(key, None)
        if (timer := self._timers.pop(key, None)) is not None:
            timer.cancel()
        await self.store.set_quarantine(key, None)
        log.info("session %s: released from quarantine", key)
        return True

    def forget_old(self) -> None:
        """Drop exit windows older than restart_period: the dict stays as small as the set
        of sessions that failed recently."""
        horizon = time.monotonic() - float(self.limits.restart_period)
        for key in [k for k, times in self._exits.items() if not times or times[-1] < horizon]:
            del self._exits[key]

    def close(self) -> None:
        for timer in self._timers.values():
            timer.cancel()
        self._timers.clear()

    def _record(self, key: str) -> SessionRecord:
        return self.records.get(key) or SessionRecord(
            quarantined_until=None, restarts=0, last_exit=None
        )

    def _set_quarantine(self, key: str, until: float | None) -> None:
        old = self._record(key)
        self.records[key] = SessionRecord(
            quarantined_until=until, restarts=old.restarts, last_exit=old.last_exit
        )

    def _arm(self, key: str, until: float) -> None:
        if (timer := self._timers.pop(key, None)) is not None:
            timer.cancel()

        def expire() -> None:
            self._timers.pop(key, None)
            self._set_quarantine(key, None)
            self._exits.pop(key, None)
            log.info("session %s: quarantine over", key)
            self.on_release(key)

        delay = max(0.0, until - time.time())
        self._timers[key] = asyncio.get_running_loop().call_later(delay, expire)
