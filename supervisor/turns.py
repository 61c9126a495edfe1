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
from corral.protocol.types import MARKUPS, REPLY, ExitReason, SessionState, Turn
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
FRAME_BURST = 2.0  # seconds of frame_rate a worker may send at once before frames are dropped
FLOOD_SECONDS = 10.0  # a worker dropping frames this long without a break is stopped
FLOOD_BREAK = 1.0  # seconds without a drop that end a flood
# A deadline timer that runs this late ran on a loop that was stalled (SIGSTOP, a swapped-out
# host): what the worker wrote meanwhile is still unread, so the deadline is checked again
# once the loop has read it.
STALLED = 0.5
DEADLINE_RECHECK = 0.05  # seconds between re-checks of a deadline whose worker has unread frames
DEADLINE_GRACE = 2.0  # seconds past a deadline that unread frames may hold off the stop


class FrameRate:
    """A token bucket for one worker's log and progress frames: `frame_rate` per second,
    FRAME_BURST seconds' worth at once. What goes past it is dropped and counted."""

    def __init__(self, rate: float, now: float) -> None:
        self.rate = rate
        self.tokens = rate * FRAME_BURST
        self.at = now
        self.dropped = 0
        self.flood_since: float | None = None  # first drop of the current flood
        self.last_drop = 0.0

    def admit(self, now: float) -> bool:
        self.tokens = min(self.rate * FRAME_BURST, self.tokens + (now - self.at) * self.rate)
        self.at = now
        if self.flood_since is not None and now - self.last_drop > FLOOD_BREAK:
            self.flood_since = None
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        self.dropped += 1
        self.last_drop = now
        if self.flood_since is None:
            self.flood_since = now
        return False

    @property
    def flooding(self) -> bool:
        return self.flood_since is not None

    def flooding_for(self, now: float) -> float:
        return 0.0 if self.flood_since is None else now - self.flood_since


@dataclass(eq=False)
class ActiveTurn:
    session: Session
    message: Message
    attempt: int
    started: float  # loop time
    last_progress: float  # loop time of the last reply or progress frame
    cpu_base: float  # the tree's CPU time when the turn began
    limits: LimitsConfig  # as the turn began: a reload applies from the next turn
    output: int = 0  # bytes of frames received during the turn
    next_index: int = 0  # index of the next reply
    note: str | None = None  # the last progress note (`corral send --wait` shows it)
    timer: asyncio.TimerHandle | None = None
    deadline_passed: float | None = None  # loop time a deadline was first found passed


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
        """Run `message` on the idle worker `w`: busy now, the turn begins in a task (at
        once, without one, when its start was committed with its accept)."""
        w.state = SessionState.BUSY
        if w.exit is None and not w.dead.is_set():
            attempt = self.inbox.counted_start(message)
            if attempt is not None:
                return self._send(s, w, message, attempt)
        self.tasks.start(self._begin(s, w, message), f"turn {message.id}")

    async def _begin(self, s: Session, w: Worker, message: Message) -> None:
        try:
            attempt = await self.inbox.start_attempt(message)
        except Exception:
            log.exception("session %s: cannot record the start of %s", s.key, message.id)
            self._idle(w)
            self.requeue(message)  # dispatched again (the inbox waited out a full disk)
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
        self._send(s, w, message, attempt)

    def _send(self, s: Session, w: Worker, message: Message, attempt: int) -> None:
        """The turn begins: its frame goes to the worker, its deadlines are armed."""
        now = asyncio.get_running_loop().time()
        w.idle_output = 0
        w.turn = ActiveTurn(
            s, message, attempt, started=now, last_progress=now, cpu_base=w.cpu, limits=self.limits
        )
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
                if self.charge(w, FRAME_COST + len(logger) + len(text)) and self._admit(w, "log"):
                    worker_log.log(
                        level, "[%s] %s: %s", w.session, logger, text, extra={"session": w.session}
                    )
                return
            case frames.Hello():
                raise frames.FrameError("a second hello frame")
        if w.exit is not None:
            return  # the turn is given up on: abandon answers it, late frames are dropped
        if t is None or frame.turn_id != t.message.id:
            raise frames.FrameError(f"{type(frame).__name__} frame for a turn that is not running")
        loop = asyncio.get_running_loop()
        match frame:
            case frames.ReplyFrame(text=text, markup=markup):
                if self.charge(w, len(text.encode())):
                    t.last_progress = loop.time()
                    t.next_index += 1
                    markup = markup if markup in MARKUPS else ""  # a worker is not trusted
                    self.inbox.reply(t.message, t.next_index - 1, text, REPLY, markup)
            case frames.Progress(note=note):
                if self.charge(w, FRAME_COST + len(note)) and self._admit(w, "progress"):
                    t.last_progress = loop.time()
                    t.note = note or t.note
            case frames.Done(error=error, peak_rss=peak_rss, turn_cpu=turn_cpu):
                # A turn can cross the memory or CPU bound between two watchdog ticks and
                # end before the next. When the worker's own figures come near a bound,
                # measure once more, so the turn that crossed it is the one that is told.
                if NEAR_BOUND * int(t.limits.rss_max) < peak_rss or (
                    NEAR_BOUND * float(t.limits.cpu_time_per_turn) < turn_cpu
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
        limit = int((w.turn.limits if w.turn else self.limits).output_per_turn)
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

    def _admit(self, w: Worker, kind: str) -> bool:
        """Whether a log or progress frame is within the worker's frame_rate; a frame past
        it is dropped and counted, and a flood that does not let up stops the worker."""
        now = asyncio.get_running_loop().time()
        if w.frame_rate is None:
            w.frame_rate = FrameRate(float(self.limits.frame_rate), now)
        rate = w.frame_rate
        if rate.admit(now):
            return True
        self.metrics.frames_dropped.labels(kind).inc()
        if rate.dropped == 1 or rate.flood_since == now:
            log.warning(
                "session %s: worker %d sends more than %d log and progress frames a second; "
                "dropping the excess",
                w.session,
                w.pid,
                self.limits.frame_rate,
            )
        if rate.flooding_for(now) >= FLOOD_SECONDS:
            w.stop(
                ExitReason.OUTPUT_LIMIT,
                f"output limit exceeded (more than {self.limits.frame_rate} log and progress "
                f"frames a second for {FLOOD_SECONDS:g}s; {rate.dropped} dropped)",
            )
        return False

    def _arm_deadline(self, w: Worker, when: float | None = None) -> None:
        """Stop the worker if a deadline has passed; else arm the turn's one timer for the
        nearer of the turn and no-progress deadlines (re-checked when it fires, so
        progress in between moves it on)."""
        t = w.turn
        if t is None or w.exit is not None:
            return
        loop = asyncio.get_running_loop()
        now = loop.time()
        limits = t.limits
        turn_deadline = t.started + float(limits.turn_timeout)
        progress_deadline = t.last_progress + float(limits.no_progress_timeout)
        if now >= min(turn_deadline, progress_deadline) and self._hold_off(w, t, now, when):
            t.timer = loop.call_at(now + DEADLINE_RECHECK, self._arm_deadline, w, None)
        elif now >= turn_deadline:
            w.stop(ExitReason.TURN_TIMEOUT, f"turn took longer than {secs(limits.turn_timeout)}")
        elif now >= progress_deadline:
            w.stop(ExitReason.NO_PROGRESS, f"no progress for {secs(limits.no_progress_timeout)}")
        else:
            t.deadline_passed = None
            at = min(turn_deadline, progress_deadline)
            t.timer = loop.call_at(at, self._arm_deadline, w, at)

    @staticmethod
    def _hold_off(w: Worker, t: ActiveTurn, now: float, when: float | None) -> bool:
        """Whether a passed deadline waits for a re-check: the loop itself was stalled when
        it fired, or the worker wrote frames not read yet (its Done may be among them). A
        deadline must not end a turn whose end is already in the socket; but it is held
        off DEADLINE_GRACE at most, so a worker cannot keep it away by writing."""
        if t.deadline_passed is None:
            t.deadline_passed = now
        if now - t.deadline_passed >= DEADLINE_GRACE:
            return False
        stalled = when is not None and now - when >= STALLED
        return stalled or (w.stream is not None and w.stream.pending())

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
        if exit.reason is ExitReason.ZYGOTE_LOST:
            # not the session's doing: the turn runs again on a new worker. Its attempt
            # counts, so a message that takes the zygote down each time is answered with
            # an error after MAX_STARTS instead of running forever.
            log.warning(
                "session %s: its worker died with the zygote; its turn runs again", w.session
            )
            t.session.queue.appendleft(t.message)
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
