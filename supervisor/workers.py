"""One worker process as the supervisor sees it: its socket, pidfd, state and bounds."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from corral.protocol import frames
from corral.supervisor.proctree import TreeSample
from corral.supervisor.spawner import Spawned
from corral.supervisor.store import Message

STARTING = "starting"
IDLE = "idle"
BUSY = "busy"
STOPPING = "stopping"
QUARANTINED = "quarantined"
STATES = (STARTING, IDLE, BUSY, STOPPING, QUARANTINED)


@dataclass
class ActiveTurn:
    message: Message
    attempt: int
    started: float  # loop time
    last_progress: float  # loop time of the last reply or progress frame
    started_wall: float = field(default_factory=time.time)
    output: int = 0  # bytes of frames received during the turn
    next_index: int = 0  # index of the next reply
    failed: bool = False  # an error reply was sent
    cpu_base: float = 0.0
    timer: asyncio.TimerHandle | None = None


class Worker:
    def __init__(self, session: str, spawned: Spawned, on_exit: Callable[[Worker], None]) -> None:
        loop = asyncio.get_running_loop()
        self.session = session
        self.pid = spawned.pid
        self.pidfd: int | None = spawned.pidfd
        self.sock = spawned.sock
        self.spawn_seconds = spawned.seconds
        self.state = STARTING
        self.started = loop.time()
        self.started_wall = time.time()
        self.dead = asyncio.Event()
        self.reaped = asyncio.Event()
        self.status: int | None = None
        self.stop_reason: str | None = None
        self.stop_detail = ""
        self.turn: ActiveTurn | None = None
        self.sample: TreeSample | None = None
        self.sampled_at = 0.0
        self.idle_timer: asyncio.TimerHandle | None = None
        self.idle_output = 0  # bytes of frames since the last turn began
        self.demoted = False  # runs SCHED_IDLE since a CPU-heavy turn
        self.kill_timer: asyncio.TimerHandle | None = None
        self.read_scope: asyncio.Timeout | None = None
        self.writer: asyncio.StreamWriter | None = None
        self._on_exit = on_exit
        loop.add_reader(self.pidfd, self._exited)

    def _exited(self) -> None:
        loop = asyncio.get_running_loop()
        if self.pidfd is not None:
            loop.remove_reader(self.pidfd)
        self.dead.set()
        self._on_exit(self)

    def send(self, frame: frames.TurnFrame | frames.Shutdown) -> None:
        """Queue a frame for the worker; never waits (the worker reads when idle)."""
        if self.writer is not None and not self.writer.is_closing():
            self.writer.write(frames.encode(frame))

    def signal(self, sig: int) -> bool:
        """Signal the worker itself by pidfd (never a recycled PID); False if it is gone."""
        if self.pidfd is None:
            return False
        try:
            signal.pidfd_send_signal(self.pidfd, sig)
            return True
        except ProcessLookupError:
            return False

    def dup_pidfd(self) -> int | None:
        """A pidfd for a helper thread to own; None if gone or out of descriptors."""
        if self.pidfd is None:
            return None
        try:
            return os.dup(self.pidfd)
        except OSError:
            return None

    def cancel_timers(self) -> None:
        for handle in (self.idle_timer, self.turn.timer if self.turn else None):
            if handle is not None:
                handle.cancel()
        self.idle_timer = None
        if self.turn:
            self.turn.timer = None

    def close(self) -> None:
        self.cancel_timers()
        if self.kill_timer is not None:
            self.kill_timer.cancel()
            self.kill_timer = None
        if self.pidfd is not None:
            if not self.dead.is_set():
                asyncio.get_running_loop().remove_reader(self.pidfd)
            os.close(self.pidfd)
            self.pidfd = None
        if self.writer is not None:
            self.writer.close()
        else:
            self.sock.close()

    @property
    def rss(self) -> int:
        return self.sample.rss if self.sample else 0

    @property
    def cpu(self) -> float:
        return self.sample.cpu if self.sample else 0.0
