"""One worker process as the supervisor sees it, and how it ends.

A `Worker` is the handle (pid, pidfd, socket), its state, and the verbs that end it:
`retire` (a Shutdown frame: idle, evicted, drain), `stop` (SIGTERM to its tree) and
`kill` (SIGKILL, and cgroup.kill). Either way SIGKILL follows at kill_grace. `serve`
reads its frames until it ends and waits, bounded, for its death. Signals go by pidfd,
so a recycled PID is never hit.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import signal
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

from corral.protocol import frames, spawn
from corral.protocol.types import ExitReason, SessionState
from corral.supervisor import cgroups, proctree
from corral.supervisor.frameread import FrameStream
from corral.supervisor.procthread import ProcThread
from corral.supervisor.proctree import TreeSample
from corral.supervisor.services import within
from corral.supervisor.spawner import Spawned

if TYPE_CHECKING:
    from corral.supervisor.turns import ActiveTurn, FrameRate

log = logging.getLogger("corral.supervisor")

HELLO_TIMEOUT = 30.0
AFTER_DEATH = 1.0  # seconds to read what a dead worker wrote (a stray may hold the socket)
# seconds for a worker that closed its socket to be gone: a dying worker at SCHED_IDLE on a
# busy machine can take over a second, and must not be reported as a protocol error
DEATH_AFTER_EOF = 3.0
SURVIVE_SIGKILL = 5.0  # seconds past kill_grace after which a worker is given up on
QUIET_REASONS = (ExitReason.IDLE, ExitReason.EVICTED, ExitReason.DRAIN, ExitReason.RELOAD)
FRAMES_PER_PASS = 64  # frames of one worker handled before the loop is yielded
PASS_SECONDS = 0.002  # or this much time, whichever comes first
# a worker flooding past its frame_rate waits this long between passes, and handles frames
# at twice its frame_rate (FLOOD_FRAMES_PER_PASS at least): the excess is still seen
# (dropped, counted, and at length the worker stopped), while the rest of its flood stays
# in its socket (it blocks writing) instead of costing the loop
FLOOD_PAUSE = 0.04
FLOOD_FRAMES_PER_PASS = 8


def mib(n: float, up: bool = False) -> str:
    """Bytes in MiB (KiB below one MiB); rounded up for a figure compared with a limit."""
    unit, size = ("MiB", 1024**2) if n >= 1024**2 else ("KiB", 1024)
    value = n / size
    return f"{math.ceil(value) if up else round(value)} {unit}"


@dataclass(frozen=True)
class Exit:
    """Why a worker ended, in a token and in plain words."""

    reason: ExitReason
    detail: str


def describe_exit(exited: spawn.Exited | None, memory_max: int) -> Exit:
    """Why a worker that died on its own died."""
    if exited is None:
        return Exit(ExitReason.CRASHED, "the worker died")
    if exited.oom_killed:
        return Exit(
            ExitReason.RSS_LIMIT,
            f"memory limit exceeded (the kernel stopped it at {mib(memory_max)})",
        )
    status = exited.status
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        if sig == signal.SIGXCPU:
            return Exit(ExitReason.CPU_LIMIT, "CPU time limit exceeded (kernel backstop)")
        return Exit(ExitReason.CRASHED, f"the worker was killed by {signal.Signals(sig).name}")
    code = os.WEXITSTATUS(status) if os.WIFEXITED(status) else status
    if code == frames.FENCE_EXIT:
        return Exit(
            ExitReason.LEASE_LOST,
            "the worker ended itself: its node did not renew the session's lease in time",
        )
    if code == 0:
        return Exit(ExitReason.CRASHED, "the worker exited in the middle of the turn")
    return Exit(ExitReason.CRASHED, f"the worker crashed (exit code {code})")


class Worker:
    def __init__(
        self,
        session: str,
        spawned: Spawned,
        procs: ProcThread,
        kill_grace: float,
        cgroup_workers: Path | None,
    ) -> None:
        loop = asyncio.get_running_loop()
        self.session = session
        self.pid = spawned.pid
        self.pidfd: int | None = spawned.pidfd
        self.sock = spawned.sock
        self.spawn_seconds = spawned.seconds
        self.zygote = spawned.zygote  # the generation of the zygote that forked it
        self.procs = procs
        self.kill_grace = kill_grace
        self.cgroup_workers = cgroup_workers
        self.state = SessionState.STARTING  # IDLE on hello (serve); BUSY and IDLE by Turns
        self.started = loop.time()
        self.dead = asyncio.Event()
        self.reaped = asyncio.Event()
        self.exit: Exit | None = None  # set when the supervisor ends it
        self.turn: ActiveTurn | None = None  # written by Turns only
        self.frame_rate: FrameRate | None = None  # written by Turns only
        self.sample: TreeSample | None = None
        self.sampled_at = 0.0
        self.between_cpu_base: float | None = None  # the tree's CPU when last seen idle
        self.idle_output = 0  # bytes of frames since the last turn began
        self.demoted = False  # runs SCHED_IDLE
        self.writer: asyncio.WriteTransport | None = None
        self.stream: FrameStream | None = None  # set by serve
        self._kill_timer: asyncio.TimerHandle | None = None
        self._read_scope: asyncio.Timeout | None = None
        loop.add_reader(self.pidfd, self._exited)

    @property
    def rss(self) -> int:
        return self.sample.rss if self.sample else 0

    @property
    def cpu(self) -> float:
        return self.sample.cpu if self.sample else 0.0

    def send(self, frame: frames.TurnFrame | frames.Shutdown | frames.Fence) -> None:
        """Queue a frame for the worker; never waits (the worker reads when idle)."""
        if self.writer is not None and not self.writer.is_closing():
            self.writer.write(frames.encode(frame))

    def retire(self, reason: ExitReason) -> None:
        """End an idle worker politely: a Shutdown frame, SIGKILL at kill_grace."""
        if self._ending(reason, str(reason)):
            self.send(frames.Shutdown(reason=reason))

    def stop(self, reason: ExitReason, detail: str) -> None:
        """End the worker: SIGTERM to its tree, SIGKILL at kill_grace."""
        if self._ending(reason, detail):
            if reason not in QUIET_REASONS:
                log.warning(
                    "session %s: stopping worker %d: %s [%s]",
                    self.session,
                    self.pid,
                    detail,
                    reason,
                )
            self.signal_tree(signal.SIGTERM)

    def kill(self) -> None:
        """SIGKILL to the tree now, and the whole cgroup at once, strays included."""
        if self.dead.is_set():
            return
        self.signal_tree(signal.SIGKILL)
        if self.cgroup_workers is not None:
            kill = partial(cgroups.kill_cgroup, self.cgroup_workers, self.pid)
            self.procs.submit(kill, f"cgroup.kill {self.session}")

    def _ending(self, reason: ExitReason, detail: str) -> bool:
        """Mark the worker stopping; False if it already is (the first reason stands)."""
        if self.exit is not None or self.dead.is_set():
            return False
        self.exit = Exit(reason, detail)
        self.state = SessionState.STOPPING
        # armed first: whatever happens while signalling, SIGKILL comes at kill_grace
        self._kill_timer = asyncio.get_running_loop().call_later(self.kill_grace, self.kill)
        return True

    def signal_tree(self, sig: int) -> None:
        """Signal the worker's descendants, leaves first, then the worker (the process
        thread walks the tree while its root still holds it together). SIGKILL also
        goes to the worker at once: what a dead worker leaves, the zygote kills."""
        if sig == signal.SIGKILL:
            self.signal(sig)
        walk = partial(proctree.signal_tree, pid=self.pid, sig=sig)
        if not self._on_proc_thread(lambda fd: walk(fd), f"signal {self.session}"):
            self.signal(sig)
            if sig != signal.SIGKILL:
                self.signal(signal.SIGCONT)  # a stopped worker acts on SIGTERM once continued

    def demote(self) -> None:
        """Let the worker's tree run only on CPU time nothing else wants (SCHED_IDLE), for
        the rest of its life: short, interactive turns of other sessions keep their
        latency on a small machine."""
        self.demoted = True
        self._on_proc_thread(
            lambda fd: proctree.demote_tree(fd, self.pid), f"demote {self.session}"
        )

    def signal(self, sig: int) -> bool:
        """Signal the worker itself by pidfd; False if it is gone."""
        if self.pidfd is None:
            return False
        try:
            signal.pidfd_send_signal(self.pidfd, sig)
            return True
        except ProcessLookupError:
            return False

    def _on_proc_thread(self, fn: Callable[[int], object], what: str) -> bool:
        """Run fn(pidfd) on the process thread with a pidfd of its own; False if it
        cannot be (the worker is gone, or descriptors ran out)."""
        if self.pidfd is None:
            return False
        try:
            fd = os.dup(self.pidfd)
        except OSError:
            return False

        def run() -> object:
            try:
                return fn(fd)
            finally:
                os.close(fd)

        self.procs.submit(run, what)
        return True

    def _exited(self) -> None:
        if self.pidfd is not None:
            asyncio.get_running_loop().remove_reader(self.pidfd)
        self.dead.set()
        # frames it wrote before dying are still in the socket: read them a second more
        if self._read_scope is not None and not self._read_scope.expired():
            self._read_scope.reschedule(asyncio.get_running_loop().time() + AFTER_DEATH)

    def close(self) -> None:
        if self._kill_timer is not None:
            self._kill_timer.cancel()
            self._kill_timer = None
        if self.pidfd is not None:
            if not self.dead.is_set():
                asyncio.get_running_loop().remove_reader(self.pidfd)
            os.close(self.pidfd)
            self.pidfd = None
        if self.writer is not None:
            self.writer.close()
        else:
            self.sock.close()


async def serve(
    w: Worker,
    max_frame: int,
    on_ready: Callable[[], None],
    on_frame: Callable[[frames.WorkerFrame], Awaitable[None]],
) -> None:
    """Read the worker's frames until it ends, then wait (bounded) for its death."""
    decoder = frames.decoder_for_worker_frames()
    loop = asyncio.get_running_loop()
    try:
        stream = w.stream = await FrameStream.connect(w.sock, decoder, max_frame)
        w.writer = stream.transport
        try:
            async with asyncio.timeout(HELLO_TIMEOUT) as scope:
                w._read_scope = scope
                hello = await stream.next_frame()
        except TimeoutError:
            if w.dead.is_set() or not stream.pending():
                raise
            # the loop was stalled (SIGSTOP) with the hello unread: read it now
            async with asyncio.timeout(AFTER_DEATH) as scope:
                w._read_scope = scope
                hello = await stream.next_frame()
        if not isinstance(hello, frames.Hello) or hello.version != frames.PROTOCOL_VERSION:
            raise frames.FrameError(
                f"expected a hello frame of version {frames.PROTOCOL_VERSION}, got {hello!r}"
            )
        if w.state is SessionState.STARTING:
            w.state = SessionState.IDLE
            on_ready()
        async with asyncio.timeout(None) as scope:
            w._read_scope = scope
            handled, budget, pass_end = 0, FRAMES_PER_PASS, loop.time() + PASS_SECONDS
            while True:  # ends at EOF, a bad frame, or a second after the worker died
                frame = await stream.next_frame()
                if frame is None:
                    break
                await on_frame(frame)
                handled += 1
                # a worker's buffered frames are handled a budget at a time, then every
                # other task gets the loop: a flood delays the flooder only
                if handled >= budget or loop.time() >= pass_end:
                    rate = w.frame_rate
                    if rate is not None and rate.flooding:
                        await asyncio.sleep(FLOOD_PAUSE)
                        budget = max(FLOOD_FRAMES_PER_PASS, math.ceil(2 * rate.rate * FLOOD_PAUSE))
                    else:
                        await asyncio.sleep(0)
                        budget = FRAMES_PER_PASS
                    handled, pass_end = 0, loop.time() + PASS_SECONDS
    except frames.FrameError as e:
        w.stop(ExitReason.PROTOCOL_ERROR, f"the worker broke the protocol ({e})")
    except TimeoutError:
        if not w.dead.is_set():
            w.stop(ExitReason.PROTOCOL_ERROR, f"the worker sent no hello within {HELLO_TIMEOUT:g}s")
    except OSError as e:
        log.debug("session %s: worker socket: %s", w.session, e)
    except Exception:
        # a bug or a store failure while serving this worker: end this worker only
        log.exception("session %s: serving worker %d failed", w.session, w.pid)
        w.stop(ExitReason.CRASHED, "an internal error in the supervisor")
    finally:
        w._read_scope = None  # its block has ended: a death must not touch it
    if not await within(DEATH_AFTER_EOF, w.dead.wait()):
        w.stop(ExitReason.PROTOCOL_ERROR, "the worker closed its socket but kept running")
        if not await within(w.kill_grace + SURVIVE_SIGKILL, w.dead.wait()):
            log.error("session %s: worker %d survived SIGKILL; giving up on it", w.session, w.pid)
