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
from dataclasses import dataclass

from corral.protocol import spawn
from corral.protocol.spawn import Exited, SandboxLevel
from corral.supervisor.sandbox import LevelLog, zygote_environ

log = logging.getLogger("corral.spawner")

ZYGOTE_START_TIMEOUT = 60.0  # preloading a heavy agent (an SDK, a model client) takes a while
SPAWN_TIMEOUT = 10.0
ZYGOTE_STOP_TIMEOUT = 10.0


class SpawnError(Exception):
    pass


@dataclass
class Spawned:
    pid: int
    pidfd: int
    sock: socket.socket  # the supervisor's end of the worker's frame socket
    seconds: float  # request to answer


class Spawner:
    def __init__(self, settings: spawn.WorkerSettings) -> None:
        self.settings = settings
        self._sock: socket.socket | None = None
        self._proc: asyncio.subprocess.Process | None = None
        self._seq = 0
        self._pending: dict[int, asyncio.Future[tuple[int, int]]] = {}
        self._exits: dict[int, asyncio.Future[Exited]] = {}
        self._ready: asyncio.Future[int] | None = None
        self._starting: asyncio.Lock = asyncio.Lock()
        self.zygote_pids: set[int] = set()  # every zygote started: the supervisor's own children
        self.sandbox: SandboxLevel | None = None  # as the running zygote reported it
        self._sandbox_log = LevelLog()

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
                case spawn.Spawned(seq=seq, pid=pid):
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
            asyncio.get_running_loop().remove_reader(self._sock.fileno())
            self._sock.close()
            self._sock = None
        error = SpawnError(why)
        if self._ready and not self._ready.done():
            self._ready.set_exception(error)
        for fut in self._pending.values():
            if not fut.done():
                fut.set_exception(error)
        self._pending.clear()

    def _exit_future(self, pid: int) -> asyncio.Future[Exited]:
        fut = self._exits.get(pid)
        if fut is None:
            fut = self._exits[pid] = asyncio.get_running_loop().create_future()
        return fut

    async def spawn(self, session: str, idle: bool = False) -> Spawned:
        await self.ensure_started()
        assert self._sock is not None
        started = time.monotonic()
        self._seq += 1
        seq = self._seq
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        fut: asyncio.Future[tuple[int, int]] = asyncio.get_running_loop().create_future()
        self._pending[seq] = fut
        try:
            socket.send_fds(
                self._sock,
                [spawn.encode(spawn.Spawn(seq=seq, session=session, idle=idle))],
                [theirs.fileno()],
            )
        except OSError as e:
            self._pending.pop(seq, None)
            ours.close()
            raise SpawnError(f"cannot reach the zygote: {e}") from None
        finally:
            theirs.close()
        try:
            async with asyncio.timeout(SPAWN_TIMEOUT):
                pid, pidfd = await fut
        except BaseException:
            self._pending.pop(seq, None)
            ours.close()
            raise
        return Spawned(pid=pid, pidfd=pidfd, sock=ours, seconds=time.monotonic() - started)

    async def exit_status(self, pid: int, timeout: float) -> Exited | None:
        """How a dead worker ended, as reported by the zygote that reaped it."""
        fut = self._exit_future(pid)
        try:
            async with asyncio.timeout(timeout):
                return await asyncio.shield(fut)
        except TimeoutError:
            return None
        finally:
            self._exits.pop(pid, None)

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
