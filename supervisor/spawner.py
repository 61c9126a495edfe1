"""The supervisor's side of the zygote: ask for a worker, get its socket and pidfd.

See corral/worker/zygote.py for the other side. Requests and answers are single
SOCK_SEQPACKET packets; the worker's socket goes to the zygote and the worker's
pidfd comes back as SCM_RIGHTS attachments.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import sys
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from corral.protocol import spawn
from corral.protocol.spawn import Exited, SandboxLevel
from corral.supervisor.sandbox import LevelLog, zygote_environ
from corral.supervisor.services import within

log = logging.getLogger("corral.spawner")

ZYGOTE_START_TIMEOUT = 60.0  # preloading a heavy agent (an SDK, a model client) takes a while
SPAWN_TIMEOUT = 10.0  # from the request reaching the zygote's socket to its answer
SPAWN_QUEUE_TIMEOUT = 60.0  # a request waiting for its turn to be sent: a burst of 1,000
WORKER_SNDBUF = 32 * 1024  # the kernel doubles it
MAX_IN_FLIGHT = 16  # requests sent and not answered: the rest wait here, not in the socket
ZYGOTE_STOP_TIMEOUT = 10.0
PING_INTERVAL = 2.0
PING_TIMEOUT = 5.0
# a ping unanswered at PING_TIMEOUT is given this much more once the loop has run again: a
# supervisor that was itself stopped has the answer in its socket, unread
PING_GRACE = 1.0
FAILURE_BACKOFF = 0.1  # seconds before the next spawn after one that failed; doubles
FAILURE_BACKOFF_MAX = 5.0


class SpawnError(Exception):
    """A worker could not be started for the supervisor's own reasons (the zygote is
    gone, frozen or slow, descriptors or processes ran out): never the session's fault."""


@dataclass
class Spawned:
    pid: int
    pidfd: int
    sock: socket.socket  # the supervisor's end of the worker's frame socket
    seconds: float  # request to answer
    zygote: int = 0  # the generation of the zygote that forked it


@dataclass(eq=False)
class _Request:
    seq: int
    data: bytes
    fd: socket.socket | None  # the worker's end, sent along; None for a ping
    answer: asyncio.Future[tuple[int, int]]
    sent: asyncio.Event = field(default_factory=asyncio.Event)


class Spawner:
    def __init__(self, settings: spawn.WorkerSettings) -> None:
        self.settings = settings
        self._sock: socket.socket | None = None
        self._proc: asyncio.subprocess.Process | None = None
        self._seq = 0
        self._pending: dict[int, asyncio.Future[tuple[int, int]]] = {}
        self._queue: deque[_Request] = deque()  # not yet sent, oldest first
        self._in_flight: set[int] = set()  # seqs of spawn requests sent and not answered
        self._writing = False  # a writer callback waits for the socket to take more
        self._exits: dict[int, asyncio.Future[Exited | None]] = {}
        self._ready: asyncio.Future[int] | None = None
        self._starting: asyncio.Lock = asyncio.Lock()
        self.zygote_pids: set[int] = set()  # every zygote started: the supervisor's own children
        self.sandbox: SandboxLevel | None = None  # as the running zygote reported it
        self._sandbox_log = LevelLog()
        self.generation = 0  # of the current zygote; a worker knows the one that forked it
        self.lost_generations: set[int] = set()
        self.failures = 0  # spawns failed in a row, for the backoff
        self.replaced = 0  # zygotes replaced because they stopped answering
        self.retired = False  # replaced by a reload: never started again

    @property
    def starting(self) -> bool:
        return self._starting.locked()

    @property
    def zygote_pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    async def start(self) -> None:
        """Start the zygote and wait until it has loaded the agent."""
        loop = asyncio.get_running_loop()
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            self._proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "corral.worker.zygote",
                str(theirs.fileno()),
                pass_fds=(theirs.fileno(),),
                stdin=asyncio.subprocess.DEVNULL,
                env=zygote_environ(self.settings.sandbox),
            )
        finally:
            theirs.close()
        self.zygote_pids.add(self._proc.pid)
        self.generation += 1
        ours.setblocking(False)
        self._sock = ours
        self._ready = loop.create_future()
        loop.add_reader(ours.fileno(), self._on_readable)
        ours.send(spawn.encode(self.settings))
        try:
            async with asyncio.timeout(ZYGOTE_START_TIMEOUT):
                await self._ready
        except BaseException:
            await self.stop()
            raise

    async def start_guarded(self) -> None:
        """start(), seen as `starting` meanwhile (the stray sweep waits for its PID)."""
        async with self._starting:
            await self.start()

    async def ensure_started(self) -> None:
        async with self._starting:
            if self.retired:  # a reload replaced it: its zygote is not started again
                raise SpawnError("this zygote was replaced by a reload")
            if self._sock is None:
                log.warning("zygote is gone; starting a new one")
                await self.start()

    def _on_readable(self) -> None:
        assert self._sock is not None
        while True:  # ends when the socket has nothing more to read
            try:
                data, fds, _, _ = socket.recv_fds(self._sock, spawn.MAX_PACKET, 1)
            except BlockingIOError:
                return
            except OSError as e:
                log.error("zygote socket failed: %s", e)
                data, fds = b"", []
            if not data:
                self._lost("the zygote exited")
                return
            msg = spawn.zygote_decoder.decode(data)
            match msg:
                case spawn.Pong(seq=seq):
                    fut = self._pending.pop(seq, None)
                    if fut is not None and not fut.done():
                        fut.set_result((0, -1))
                case spawn.Spawned(seq=seq, pid=pid):
                    self._answered(seq)
                    fut = self._pending.pop(seq, None)
                    if fut is not None and not fut.done() and fds:
                        fut.set_result((pid, fds[0]))
                    else:
                        for fd in fds:
                            os.close(fd)
                case spawn.SpawnFailed(seq=0, error=error):
                    if self._ready and not self._ready.done():
                        self._ready.set_exception(SpawnError(error))
                case spawn.SpawnFailed(seq=seq, error=error):
                    self._answered(seq)
                    fut = self._pending.pop(seq, None)
                    if fut is not None and not fut.done():
                        fut.set_exception(SpawnError(error))
                case spawn.Ready(pid=pid, sandbox=level):
                    self.sandbox = level
                    self._sandbox_log.report(level)
                    if self._ready and not self._ready.done():
                        self._ready.set_result(pid)
                case spawn.Exited(pid=pid):
                    exit_fut = self._exit_future(pid)
                    if exit_fut.done():  # an unclaimed report for an earlier process with this PID
                        exit_fut = self._exits[pid] = asyncio.get_running_loop().create_future()
                    exit_fut.set_result(msg)

    def _lost(self, why: str) -> None:
        if self._sock is not None:
            loop = asyncio.get_running_loop()
            loop.remove_reader(self._sock.fileno())
            if self._writing:
                loop.remove_writer(self._sock.fileno())
                self._writing = False
            self._sock.close()
            self._sock = None
        self.lost_generations.add(self.generation)
        error = SpawnError(why)
        if self._ready and not self._ready.done():
            self._ready.set_exception(error)
        for fut in self._pending.values():
            if not fut.done():
                fut.set_exception(error)
        self._pending.clear()
        while self._queue:
            request = self._queue.popleft()
            if request.fd is not None:
                request.fd.close()
                request.fd = None
            if not request.answer.done():
                request.answer.set_exception(error)
            request.sent.set()
        self._in_flight.clear()
        # its workers die with it (parent-death signal) and nobody will report how: their
        # reaps learn it now, not after a timeout
        for exit_fut in self._exits.values():
            if not exit_fut.done():
                exit_fut.set_result(None)

    def lost(self, generation: int) -> bool:
        """Whether the zygote of this generation is gone (died, or was replaced)."""
        return generation in self.lost_generations

    def _exit_future(self, pid: int) -> asyncio.Future[Exited | None]:
        fut = self._exits.get(pid)
        if fut is None:
            fut = self._exits[pid] = asyncio.get_running_loop().create_future()
        return fut

    def _answered(self, seq: int) -> None:
        self._in_flight.discard(seq)
        self._send_queued()

    def _send_queued(self) -> None:
        """Send queued requests while the zygote's socket takes them and fewer than
        MAX_IN_FLIGHT spawns are unanswered; else wait for the socket to drain."""
        if self._sock is None:
            return
        while self._queue:  # ends when the queue is empty, the socket full, or enough in flight
            request = self._queue[0]
            if request.fd is not None and len(self._in_flight) >= MAX_IN_FLIGHT:
                break
            try:
                if request.fd is not None:
                    socket.send_fds(self._sock, [request.data], [request.fd.fileno()])
                else:
                    self._sock.send(request.data)
            except BlockingIOError:  # the zygote is behind: wait for its socket to drain
                if not self._writing:
                    self._writing = True
                    asyncio.get_running_loop().add_writer(self._sock.fileno(), self._writable)
                return
            except OSError as e:
                self._pending.pop(request.seq, None)
                if not request.answer.done():
                    request.answer.set_exception(SpawnError(f"cannot reach the zygote: {e}"))
            else:
                if request.fd is not None:
                    self._in_flight.add(request.seq)
            request.sent.set()  # sent, or failed: either way its answer is what to wait for
            self._queue.popleft()
            if request.fd is not None:
                request.fd.close()  # the zygote has its own copy now
                request.fd = None
        if self._writing and self._sock is not None:
            self._writing = False
            asyncio.get_running_loop().remove_writer(self._sock.fileno())

    def _writable(self) -> None:
        self._writing = False
        if self._sock is not None:
            asyncio.get_running_loop().remove_writer(self._sock.fileno())
        self._send_queued()

    def _request(self, data_of: Callable[[int], bytes], fd: socket.socket | None) -> _Request:
        self._seq += 1
        answer: asyncio.Future[tuple[int, int]] = asyncio.get_running_loop().create_future()
        request = _Request(self._seq, data_of(self._seq), fd, answer)
        self._pending[request.seq] = answer
        if fd is None:
            self._queue.appendleft(request)  # a ping does not wait behind a burst
        else:
            self._queue.append(request)
        self._send_queued()
        return request

    def _withdraw(self, request: _Request) -> None:
        """The requester is done with it (answered, timed out, cancelled)."""
        self._pending.pop(request.seq, None)
        if request.seq in self._in_flight:
            # unanswered: a late answer is dropped (its worker finds its socket closed)
            self._in_flight.discard(request.seq)
            self._send_queued()
        try:
            self._queue.remove(request)
        except ValueError:
            return
        if request.fd is not None:
            request.fd.close()
            request.fd = None

    def backoff(self) -> float:
        """Seconds to wait before the next spawn: spawns keep failing (the zygote is
        restarting, descriptors ran out), so the sessions waiting do not spin."""
        if not self.failures:
            return 0.0
        return min(FAILURE_BACKOFF_MAX, FAILURE_BACKOFF * 2 ** (self.failures - 1))

    async def spawn(self, session: str, idle: bool = False) -> Spawned:
        """A new worker for `session`. Requests queue here under a burst; raises
        SpawnError (or TimeoutError) for anything that is not the session's doing."""
        try:
            spawned = await self._spawn(session, idle)
        except (SpawnError, OSError, TimeoutError):
            self.failures += 1
            raise
        self.failures = 0
        return spawned

    async def _spawn(self, session: str, idle: bool) -> Spawned:
        await self.ensure_started()
        started = time.monotonic()
        generation = self.generation
        try:
            ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        except OSError as e:  # EMFILE, ENFILE: ours to fix, not the session's
            raise SpawnError(f"cannot make a socket for the worker: {e}") from None
        # a small send buffer on the worker's end: a worker that writes faster than the
        # supervisor reads blocks soon, instead of spinning a CPU to fill 200 KiB of frames
        theirs.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, WORKER_SNDBUF)
        request = self._request(
            lambda seq: spawn.encode(spawn.Spawn(seq=seq, session=session, idle=idle)), theirs
        )
        try:
            if not await within(SPAWN_QUEUE_TIMEOUT, request.sent.wait()):
                raise SpawnError(
                    f"the spawn request waited more than {SPAWN_QUEUE_TIMEOUT:g}s to be sent"
                )
            if not await within(SPAWN_TIMEOUT, asyncio.shield(request.answer)):
                raise SpawnError(f"the zygote did not answer within {SPAWN_TIMEOUT:g}s")
            pid, pidfd = request.answer.result()
        except BaseException:
            ours.close()
            raise
        finally:
            self._withdraw(request)
        return Spawned(
            pid=pid, pidfd=pidfd, sock=ours, seconds=time.monotonic() - started, zygote=generation
        )

    async def ping(self) -> bool:
        """Whether the zygote answers a health ping in time."""
        if self._sock is None:
            return True  # nothing to check: the next spawn starts one
        request = self._request(lambda seq: spawn.encode(spawn.Ping(seq=seq)), None)
        try:
            if await within(PING_TIMEOUT, asyncio.shield(request.answer)):
                return True
            # the loop may have been stalled itself: give the answer a pass to be read
            return await within(PING_GRACE, asyncio.shield(request.answer))
        except SpawnError:
            return True  # the zygote is lost already; the next spawn starts another
        finally:
            self._withdraw(request)

    @staticmethod
    async def watch(current: Callable[[], Spawner]) -> None:
        """Ping the `current()` zygote (a reload replaces it); one that does not answer
        (dead, SIGSTOPped, wedged) is killed, and a new one started. Its workers die with
        it: their turns run again."""
        while True:  # ends when cancelled at close
            await asyncio.sleep(PING_INTERVAL + current().backoff())
            await current().check()

    async def check(self) -> None:
        if self.starting or self.retired:
            return
        if self._sock is not None and not await self.ping() and self._sock is not None:
            self.replace(f"the zygote did not answer a health ping within {PING_TIMEOUT:g}s")
        if self._sock is None:  # dead or replaced: a new one now, not at the next spawn
            try:
                await self.ensure_started()
            except (SpawnError, OSError, TimeoutError) as e:
                self.failures += 1
                log.error("cannot start a new zygote: %s", e)

    def replace(self, why: str) -> None:
        """Give up on the current zygote: SIGKILL it (a stopped one too); the next spawn
        starts a new one."""
        log.error("%s; replacing it", why)
        self.replaced += 1
        proc = self._proc
        self._lost(why)
        if proc is not None and proc.returncode is None:
            proc.kill()

    async def exit_status(self, pid: int, timeout: float) -> Exited | None:
        """How a dead worker ended, as reported by the zygote that reaped it; None if it
        did not say in time, or is gone."""
        fut = self._exit_future(pid)
        try:
            async with asyncio.timeout(timeout):
                return await asyncio.shield(fut)
        except TimeoutError:
            return None
        finally:
            self._exits.pop(pid, None)

    async def retire(self) -> None:
        """Stop for good: a reload replaced this spawner, so its zygote is not started again."""
        self.retired = True
        await self.stop()

    async def stop(self) -> None:
        """Close the zygote's socket: it kills every worker and descendant, then exits."""
        if self._sock is not None:
            self._lost("the spawner is stopping")
        proc, self._proc = self._proc, None
        if proc is None:
            return
        try:
            async with asyncio.timeout(ZYGOTE_STOP_TIMEOUT):
                await proc.wait()
        except TimeoutError:
            log.error(
                "zygote %d did not exit within %.0fs; killing it", proc.pid, ZYGOTE_STOP_TIMEOUT
            )
            proc.kill()
            await proc.wait()
