"""Live sessions and worker slots.

A `Session` is what is live about a session key: its queue, its worker, whether a
worker is being started for it, and its idle timer. It exists while any of those does
(or while it is quarantined) and is forgotten after; what outlives it is in
CrashLoops. At most `max_workers` workers are live: a session takes a slot before its
worker is spawned and frees it when the worker is reaped; a session that finds no slot
waits in line for the next one freed.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from corral.protocol.types import SessionState
from corral.supervisor.store import Message
from corral.supervisor.worker import Worker


@dataclass(eq=False)
class Session:
    key: str
    queue: deque[Message] = field(default_factory=deque)
    worker: Worker | None = None
    has_slot: bool = False  # from the slot's taking to the worker's reap
    waiting: bool = False  # in line for a slot
    refusing: bool = False  # its queue is being answered with the quarantine error
    last_used: float = field(default_factory=time.monotonic)
    idle_timer: asyncio.TimerHandle | None = None

    @property
    def worker_state(self) -> SessionState:
        return self.worker.state if self.worker is not None else SessionState.STARTING

    def is_empty(self) -> bool:
        return not self.has_slot and not self.queue and not self.waiting and not self.refusing


class SessionTable:
    def __init__(self, max_workers: int) -> None:
        self.max_workers = max_workers
        self._sessions: dict[str, Session] = {}
        self._waiting: deque[Session] = deque()
        self.slots_used = 0

    def __iter__(self) -> Iterator[Session]:
        return iter(list(self._sessions.values()))

    def __len__(self) -> int:
        return len(self._sessions)

    def get(self, key: str) -> Session | None:
        return self._sessions.get(key)

    def get_or_create(self, key: str) -> Session:
        s = self._sessions.get(key)
        if s is None:
            s = self._sessions[key] = Session(key)
        return s

    def forget(self, s: Session) -> None:
        if self._sessions.get(s.key) is s:
            del self._sessions[s.key]

    def workers(self) -> list[Worker]:
        return [s.worker for s in self._sessions.values() if s.worker is not None]

    @property
    def waiting(self) -> bool:
        """Some session waits for a slot."""
        return bool(self._waiting)

    def take_slot(self, s: Session) -> bool:
        """A worker slot for `s`; if none is free, `s` waits in line for one."""
        if s.has_slot:
            return True
        if self.slots_used < self.max_workers:
            self.slots_used += 1
            s.has_slot = True
            return True
        if not s.waiting:
            s.waiting = True
            self._waiting.append(s)
        return False

    def free_slot(self, s: Session) -> None:
        """Give back the slot of `s` (its worker is reaped, or was never spawned)."""
        if s.has_slot:
            s.has_slot = False
            self.slots_used -= 1

    def next_waiting(self) -> Session | None:
        """The next session in line for a slot, if a slot is free."""
        while self._waiting and self.slots_used < self.max_workers:  # ends: the line shrinks
            nxt = self._waiting.popleft()
            nxt.waiting = False
            if self._sessions.get(nxt.key) is nxt:
                return nxt
        return None

    def lru_idle(self) -> Session | None:
        """The least recently used session whose worker is idle with nothing queued."""
        idle = [
            s
            for s in self._sessions.values()
            if s.worker is not None and s.worker.state is SessionState.IDLE and not s.queue
        ]
        return min(idle, key=lambda s: s.last_used, default=None)

    def arm_idle(self, s: Session, after: float, on_idle: Callable[[], None]) -> None:
        if s.idle_timer is None:
            s.idle_timer = asyncio.get_running_loop().call_later(after, on_idle)

    def disarm_idle(self, s: Session) -> None:
        if s.idle_timer is not None:
            s.idle_timer.cancel()
            s.idle_timer = None
