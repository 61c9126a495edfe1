"""The worker runtime: one process, one session, one turn at a time.

The frame loop reads a turn, calls the agent, and sends replies, progress, log
records and a final Done frame back over the worker's own socket. Nothing here
reports progress on the agent's behalf: a stuck agent looks stuck.
"""

from __future__ import annotations

import asyncio
import importlib
import inspect
import logging
import os
import queue
import resource
import signal
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec

from corral.protocol import frames, procfs
from corral.protocol.spawn import WorkerSettings
from corral.protocol.types import MARKUPS, HistoryEntry, Turn
from corral.worker import sandbox
from corral.worker.confine import set_cpu_backstop
from corral.worker.transcript import Transcript

Agent = Callable[[Turn, "Context"], Any]


class AgentLoadError(Exception):
    pass


class TurnError(Exception):
    """Raise from an agent to end the turn with exactly this message as the error reply.

    For failures the user should read as they are ("the model endpoint refused the
    API key"); any other exception is reported as "the agent raised <type>: <text>".
    """


def load_agent(entrypoint: str) -> Agent:
    module_name, _, attr = entrypoint.partition(":")
    try:
        module = importlib.import_module(module_name)
    except Exception as e:
        raise AgentLoadError(f"cannot import {module_name!r}: {type(e).__name__}: {e}") from e
    agent = getattr(module, attr, None)
    if not callable(agent):
        raise AgentLoadError(f"{entrypoint!r}: {module_name} has no callable {attr!r}")
    return agent  # type: ignore[no-any-return]


def warm_up(entrypoint: str, options: dict[str, Any]) -> None:
    """Run the warm-up of the agent's module, if it has one: `warm_up(options)`.

    The zygote calls this once, after importing the agent and before forking any
    worker, with the `[agent.options]` table. What it builds (imports, caches, parsed
    certificates, code paths run once) every worker then shares copy-on-write instead
    of building again. It must leave nothing that cannot cross a fork: no thread still
    running, no open connection, no event loop, no lock held. Raises what it raises.
    """
    module = importlib.import_module(entrypoint.partition(":")[0])
    hook = getattr(module, "warm_up", None)
    if callable(hook):
        hook(options)


def prepare_fork() -> None:
    """What every worker would do the same way on its start, done once by the zygote
    before it forks, so that workers share it instead of each copying the pages it
    touches: the root logger's level (setting it visits every logger of the process)."""
    logging.getLogger().setLevel(logging.INFO)


# made at import, in the zygote, like the other module-level objects below: a worker
# that made them itself would run (and copy the pages of) all the code that does
_MESSAGE_ONLY = logging.Formatter("%(message)s")  # the workers' log handler's format
_AGENT_LOG = logging.getLogger("corral.agent")  # Context.log
# building a decoder evaluates the frames' annotations (code compiled and run)
_SUPERVISOR_FRAMES = frames.decoder_for_supervisor_frames()


class Connection:
    """The worker's end of its frame socket; writes are serialised across threads."""

    def __init__(self, sock: socket.socket, max_frame: int) -> None:
        self.sock = sock
        self.max_frame = max_frame
        self._lock = threading.Lock()
        self._decoder = _SUPERVISOR_FRAMES

    def send(self, frame: msgspec.Struct) -> None:
        data = frames.encode(frame)
        with self._lock:
            try:
                self.sock.sendall(data)
            except OSError:
                # The supervisor is gone or has dropped us: nobody is left to serve.
                os._exit(1)

    def receive(self) -> frames.SupervisorFrame | None:
        return frames.read_frame(self.sock, self._decoder, self.max_frame)  # type: ignore[no-any-return]


class Fence:
    """The worker's side of its node's lease (a cluster only): a daemon thread that
    sleeps until the last Fence frame's `until`, and past it kills every process below
    the worker and exits the worker with FENCE_EXIT. Started by the first Fence frame;
    each later one moves the deadline on."""

    def __init__(self) -> None:
        self._cond: threading.Condition | None = None  # made by the first Fence frame
        self._until: float | None = None

    def extend(self, until: float) -> None:
        if self._cond is None:  # only the reader thread calls extend
            self._cond = threading.Condition()
        with self._cond:
            first = self._until is None
            self._until = until if first else max(until, self._until or until)
            self._cond.notify()
        if first:
            threading.Thread(target=self._watch, name="corral-fence", daemon=True).start()

    def _watch(self) -> None:
        assert self._cond is not None  # started by extend
        with self._cond:
            while True:  # ends when the deadline passes without a later one
                assert self._until is not None
                left = self._until - time.monotonic()  # CLOCK_MONOTONIC, as the sender's
                if left <= 0:
                    break
                self._cond.wait(left)
        me = os.getpid()
        for _ in range(3):  # what forks while the tree is killed is caught next round
            if not procfs.signal_below(me, signal.SIGKILL):
                break
        os._exit(frames.FENCE_EXIT)


class FrameLogHandler(logging.Handler):
    """Carries log records to the supervisor, which re-emits them tagged with the session."""

    def __init__(self, conn: Connection) -> None:
        super().__init__()
        self.conn = conn

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = self.format(record)
        except Exception:
            message = str(record.msg)
        self.conn.send(frames.Log(level=record.levelno, logger=record.name, message=message))


class Context:
    """What an agent gets besides the turn."""

    def __init__(
        self,
        conn: Connection,
        turn: Turn,
        transcript: Transcript,
        options: dict[str, Any],
        state_dir: Path,
    ) -> None:
        self._conn = conn
        self._turn = turn
        self._transcript = transcript
        self._lock = threading.Lock()
        self.options = options
        self.state_dir = state_dir
        self.session = turn.session
        self.log = _AGENT_LOG

    def reply(self, text: str, markup: str = "") -> None:
        """Send one reply to the user; also resets the no-progress deadline. `markup`:
        "html" or "markdown" asks a channel that formats (Telegram) to show it so; a text
        the channel cannot parse is shown as typed."""
        if not isinstance(text, str):
            raise TypeError(f"reply text must be str, not {type(text).__name__}")
        if markup not in MARKUPS:
            raise ValueError(f"reply markup must be one of {MARKUPS[1:]} or empty, not {markup!r}")
        with self._lock:  # transcript order matches the order the supervisor numbers them
            self._transcript.append("assistant", text, self._turn.id)
            self._conn.send(frames.ReplyFrame(turn_id=self._turn.id, text=text, markup=markup))

    def progress(self, note: str = "") -> None:
        """Tell the supervisor the turn is still moving (resets the no-progress deadline)."""
        self._conn.send(frames.Progress(turn_id=self._turn.id, note=str(note)))

    def history(self) -> list[HistoryEntry]:
        """The session's transcript, oldest first, without the current turn's lines.

        A turn run again after a supervisor crash is listed once.
        """
        seen: set[tuple[str, str]] = set()
        entries = []
        for entry in self._transcript.read():
            if entry.turn_id == self._turn.id:
                continue
            if entry.role == "user":
                if (entry.role, entry.turn_id) in seen:
                    continue
                seen.add((entry.role, entry.turn_id))
            entries.append(entry)
        return entries


class Runtime:
    def __init__(
        self,
        sock: socket.socket,
        session: str,
        settings: WorkerSettings,
        agent: Agent,
        plan: sandbox.Plan | None = None,
    ):
        self.conn = Connection(sock, settings.max_frame)
        self.session = session
        self.settings = settings
        self.agent = agent
        self.plan = plan  # the sandbox to enter before the first turn (None: none)
        # os.path, and one Path for the agent: pathlib runs a dozen functions per `/`
        self.state_dir = Path(os.path.join(settings.state_dir, "agents", session))
        self._loop: asyncio.AbstractEventLoop | None = None
        self.fence = Fence()
        self._frames: queue.SimpleQueue[frames.SupervisorFrame | None] = queue.SimpleQueue()
        self._error: BaseException | None = None  # what ended the reader thread

    def _read_frames(self) -> None:
        """The reader thread: Fence frames are acted on at once, even mid-turn; the
        others go to the frame loop. None (the end of the stream) ends it; a broken
        frame ends it too, after handing the error on."""
        try:
            while True:  # ends at the end of the stream
                frame = self.conn.receive()
                if isinstance(frame, frames.Fence):
                    self.fence.extend(frame.until)
                    continue
                self._frames.put(frame)
                if frame is None:
                    return
        except BaseException as e:
            self._error = e
            self._frames.put(None)

    def _next_frame(self) -> frames.SupervisorFrame | None:
        frame = self._frames.get()
        if frame is None and self._error is not None:
            raise self._error
        return frame

    def serve(self) -> int:
        """Run turns until the supervisor says stop or goes away; the exit code."""
        self.conn.send(
            frames.Hello(version=frames.PROTOCOL_VERSION, pid=os.getpid(), session=self.session)
        )
        handler = FrameLogHandler(self.conn)
        handler.setFormatter(_MESSAGE_ONLY)
        root = logging.getLogger()
        root.handlers[:] = [handler]
        if root.level != logging.INFO:  # else set by prepare_fork: setLevel visits every logger
            root.setLevel(logging.INFO)
        os.makedirs(self.state_dir, mode=0o700, exist_ok=True)
        transcript = Transcript(
            Path(self.settings.state_dir) / "sessions" / f"{self.session}.jsonl"
        )
        if self.plan is not None:
            # from here on the transcript is reached through its open descriptor only
            sandbox.enter(self.plan, [self.state_dir])
        # started inside the sandbox, so the thread is as confined as the agent
        threading.Thread(target=self._read_frames, name="corral-frames", daemon=True).start()
        while True:  # ends when the supervisor sends Shutdown or closes the socket
            frame = self._next_frame()
            if frame is None or isinstance(frame, frames.Shutdown):
                return 0
            assert isinstance(frame, frames.TurnFrame)  # Fence frames stay in the reader
            self.run_turn(frame.turn, transcript)

    def run_turn(self, turn: Turn, transcript: Transcript) -> None:
        transcript.append("user", turn.text, turn.id)
        ctx = Context(self.conn, turn, transcript, self.settings.options, self.state_dir)
        set_cpu_backstop(self.settings.cpu_time_per_turn + 2)
        cpu_before = _cpu_seconds()
        error = None
        try:
            result = self.agent(turn, ctx)
            # a sync agent returns None: isawaitable(None) would run the ABC machinery
            if result is not None and inspect.isawaitable(result):
                if self._loop is None:
                    self._loop = asyncio.new_event_loop()
                self._loop.run_until_complete(result)
        except TurnError as e:
            ctx.log.warning("turn %s failed: %s", turn.id, e)
            error = str(e)
        except Exception as e:
            ctx.log.exception("agent raised on turn %s", turn.id)
            error = f"the agent raised {type(e).__name__}: {e}"
        if error is not None:
            transcript.append("error", error, turn.id)
        self.conn.send(
            frames.Done(
                turn_id=turn.id,
                error=error,
                peak_rss=_peak_rss(),
                turn_cpu=_cpu_seconds() - cpu_before,
            )
        )


def _cpu_seconds() -> float:
    own = resource.getrusage(resource.RUSAGE_SELF)
    reaped = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + reaped.ru_utime + reaped.ru_stime


def _peak_rss() -> int:
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    reaped = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return (own + reaped) * 1024  # ru_maxrss is in KiB on Linux
