"""The running turn of each worker: its start, its frames, its deadlines, its output
count, and its end, whichever way it ends.

`Turns` is the only writer of `Worker.turn` and of the busy/idle state: `start` marks
the worker busy before it returns (a second dispatch must not pop another message),
`end` and `abandon` answer the turn exactly once.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from corral.protocol import frames
from corral.protocol.types import REPLY, ExitReason, SessionState, Turn
from corral.supervisor.config import LimitsConfig
from corral.supervisor.crashloop import secs
from corral.supervisor.inbox import Inbox
from corral.supervisor.metrics import Metrics
from corral.supervisor.services import Tasks
from corral.supervisor.sessions import Session
from corral.supervisor.store import DONE, Message
from corral.supervisor.worker import Exit, Worker, mib

log = logging.getLogger("corral.supervisor")
worker_log = logging.getLogger("corral.worker")

FRAME_COST = 16  # bytes charged per log or progress frame, so empty ones are not free
NEAR_BOUND = 0.8  # a turn whose own figures pass this share of a bound is measured at its end
MAX_STARTS = 2  # a message whose turn was started this often without ending is not run again


@dataclass(eq=False)
class ActiveTurn:
    session: Session
    message: Message
    attempt: int
    started: float  # loop time
    last_progress: float  # loop time of the last reply or progress frame
    cpu_base: float  # the tree's CPU time when the turn began
    output: int = 0  # bytes of frames received during the turn
    next_index: int = 0  # index of the next reply
    timer: asyncio.TimerHandle | None = None


class Turns:
    def __init__(
        self,
        limits: LimitsConfig,
        inbox: Inbox,
        metrics: Metrics,
        tasks: Tasks,
        measure: Callable[[Worker], Awaitable[None]],
        requeue: Callable[[Message], None],
        on_ended: Callable[[Session], None],
    ) -> None:
        self.limits = limits
        self.inbox = inbox
        self.metrics = metrics
        self.tasks = tasks
        self.measure = measure  # samples the worker's tree now and checks its bounds
        self.requeue = requeue  # puts a message back at the head of its session's queue
        self.on_ended = on_ended  # the session can move on

    def start(self, s: Session, w: Worker, message: Message) -> None:
        """Run `message` on the idle worker `w`: busy now, the turn begins in a task."""
        w.state = SessionState.BUSY
        self.tasks.start(self._begin(s, w, message), f"turn {message.id}")

    async def _begin(self, s: Session, w: Worker, message: Message) -> None:
        try:
            attempt = await self.inbox.start_attempt(message)
        except Exception:
            log.exception("session %s: cannot record the start of %s", s.key, message.id)
            s.queue.appendleft(message)
            self._idle(w)
            return
        if w.exit is not None or w.dead.is_set():
            # stopped, or dead, while we waited for the store: the message goes back
            await self.inbox.undo_start(message)
            self.requeue(message)
            return
        if attempt > MAX_STARTS:
            text = (
                f"turn not run again: it was interrupted {attempt - 1} times [{ExitReason.CRASHED}]"
            )
            await self.inbox.fail(message, 0, text)
            self._idle(w)
            self.on_ended(s)
            return
        now = asyncio.get_running_loop().time()
        w.idle_output = 0
        w.turn = ActiveTurn(s, message, attempt, started=now, last_progress=now, cpu_base=w.cpu)
        turn = Turn(
            id=message.id, session=s.key, text=message.text, origin=message.origin, attempt=attempt
        )
        w.send(frames.TurnFrame(turn))
        self._arm_deadline(w)

    async def on_frame(self, w: Worker, frame: frames.WorkerFrame) -> None:
        """One frame from the worker, during a turn or between turns."""
        t = w.turn
        match frame:
            case frames.Log(level=level, logger=logger, message=text):
                worker_log.log(
                    level, "[%s] %s: %s", w.session, logger, text, extra={"session": w.session}
                )
                self.charge(w, FRAME_COST + len(logger) + len(text))
                return
            case frames.Hello():
                raise frames.FrameError("a second hello frame")
        if w.exit is not None:
            return  # the turn is given up on: abandon answers it, late frames are dropped
        if t is None or frame.turn_id != t.message.id:
            raise frames.FrameError(f"{type(frame).__name__} frame for a turn that is not running")
        loop = asyncio.get_running_loop()
        match frame:
            case frames.ReplyFrame(text=text):
                if self.charge(w, len(text.encode())):
                    t.last_progress = loop.time()
                    t.next_index += 1
                    self.inbox.reply(t.message, t.next_index - 1, text, REPLY)
            case frames.Progress(note=note):
                if self.charge(w, FRAME_COST + len(note)):
                    t.last_progress = loop.time()
            case frames.Done(error=error, peak_rss=peak_rss, turn_cpu=turn_cpu):
                # A turn can cross the memory or CPU bound between two watchdog ticks and
                # end before the next. When the worker's own figures come near a bound,
                # measure once more, so the turn that crossed it is the one that is told.
                if NEAR_BOUND * int(self.limits.rss_max) < peak_rss or (
                    NEAR_BOUND * float(self.limits.cpu_time_per_turn) < turn_cpu
                ):
                    await self.measure(w)
                if w.exit is None:
                    # shielded: the read deadline after a worker's death must not cut an
                    # ending turn in half (it would be answered twice)
                    await asyncio.shield(self.end(w, error))

    def charge(self, w: Worker, n: int) -> bool:
        """Charge `n` bytes to the turn's output (between turns, to what the worker sent
        since its last turn: a background thread logging away counts too). Past
        output_per_turn the worker is stopped and False returned."""
        if w.exit is not None:
            return True
        limit = int(self.limits.output_per_turn)
        if w.turn is None:
            w.idle_output += n
            if w.idle_output <= limit:
                return True
            detail = f"output limit exceeded (more than {mib(limit)} between turns)"
        else:
            w.turn.output += n
            if w.turn.output <= limit:
                return True
            detail = f"output limit exceeded (more than {mib(limit)} in one turn)"
        w.stop(ExitReason.OUTPUT_LIMIT, detail)
        return False

    def _arm_deadline(self, w: Worker) -> None:
        """Stop the worker if a deadline has passed; else arm the turn's one timer for the
        nearer of the turn and no-progress deadlines (re-checked when it fires, so
        progress in between moves it on)."""
        t = w.turn
        if t is None or w.exit is not None:
            return
        loop = asyncio.get_running_loop()
        now = loop.time()
        turn_deadline = t.started + float(self.limits.turn_timeout)
        progress_deadline = t.last_progress + float(self.limits.no_progress_timeout)
        if now >= turn_deadline:
            w.stop(
                ExitReason.TURN_TIMEOUT, f"turn took longer than {secs(self.limits.turn_timeout)}"
            )
        elif now >= progress_deadline:
            w.stop(
                ExitReason.NO_PROGRESS, f"no progress for {secs(self.limits.no_progress_timeout)}"
            )
        else:
            t.timer = loop.call_at(min(turn_deadline, progress_deadline), self._arm_deadline, w)

    async def end(self, w: Worker, error: str | None) -> None:
        """The worker said the turn is done (with an error, or not)."""
        t = self._take(w)
        if t is None:
            return
        if error is not None:
            await self.inbox.fail(t.message, t.next_index, f"turn failed: {error}")
        else:
            await self.inbox.finish(t.message, DONE)
        self._ended(t)
        self._idle(w)
        self.on_ended(t.session)

    async def abandon(self, w: Worker, exit: Exit) -> None:
        """The worker is gone mid-turn: answer the turn with the reason, or, if the
        supervisor is draining, put it back for the next start, its attempt not counted."""
        t = self._take(w)
        if t is None:
            return
        if exit.reason is ExitReason.LEASE_LOST:
            return  # another node holds the session now and runs the turn again
        if exit.reason is ExitReason.DRAIN:
            t.session.queue.appendleft(t.message)
            await self.inbox.undo_start(t.message)
            return
        text = f"turn stopped: {exit.detail} [{exit.reason}]"
        await self.inbox.fail(t.message, t.next_index, text)
        self._ended(t)

    def _take(self, w: Worker) -> ActiveTurn | None:
        """Take the turn off the worker: from here on it is answered by the taker only."""
        t, w.turn = w.turn, None
        if t is not None and t.timer is not None:
            t.timer.cancel()
        return t

    def _ended(self, t: ActiveTurn) -> None:
        self.metrics.turn_seconds.observe(asyncio.get_running_loop().time() - t.started)
        t.session.last_used = time.monotonic()

    def _idle(self, w: Worker) -> None:
        if w.state is SessionState.BUSY:
            w.state = SessionState.IDLE
