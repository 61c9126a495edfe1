"""The zygote: a small single-threaded process that forks workers.

The supervisor runs threads (the store, executors) and an event loop, so it must
never fork itself. It starts this process once; the zygote imports the worker
runtime and the agent up front, then forks a worker per spawn request in a few
milliseconds. It is a child subreaper: whatever a dead worker leaves behind is
re-parented here and killed at once, with everything below it; so is anything
that turns up as its child without being a worker (see `sweep`). When the
supervisor goes away, it kills every worker and descendant before it exits.

Run as: python -m corral.worker.zygote FD   (FD: a SOCK_SEQPACKET socket)
"""

from __future__ import annotations

import gc
import os
import selectors
import signal
import socket
import struct
import sys
import threading
import time
import traceback
from collections.abc import Iterator
from pathlib import Path

from corral.protocol import cgroupfs, spawn
from corral.protocol.procfs import become_subreaper, kill_strays, set_title
from corral.protocol.types import InvalidSessionKey, check_session_key
from corral.worker import sandbox
from corral.worker.agentcheck import check_agent
from corral.worker.confine import confine, die_with_parent
from corral.worker.runtime import Agent, AgentLoadError, Runtime, prepare_fork, warm_up

# seconds between sweeps for strays while workers live: reading our one children file
# costs microseconds, and a stray lives at most this long
SWEEP_INTERVAL = 0.1


def _reaped() -> Iterator[tuple[int, int]]:
    """(pid, wait status) of every child that has exited, without blocking."""
    while True:  # ends when no exited child is left
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        yield pid, status


class Zygote:
    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.workers: set[int] = set()
        self.settings: spawn.WorkerSettings | None = None
        self.agent: Agent | None = None
        self.workers_cgroup: Path | None = None  # the supervisor's workers/, if delegated
        self.dying_cgroups: set[Path] = set()  # of dead workers, killed, not yet removed
        self.sandbox: sandbox.Plan | None = None  # what every worker restricts itself to
        self.swept_at = 0.0  # monotonic time of the last sweep for strays

    def send(self, msg: object, fds: list[int] | None = None) -> None:
        data = spawn.encode(msg)
        if fds:
            socket.send_fds(self.sock, [data], fds)
        else:
            self.sock.send(data)

    def run(self) -> None:
        if not _from_parent(self.sock):
            return
        data = self.sock.recv(spawn.MAX_PACKET)
        if not data:
            return
        self.settings = settings = spawn.settings_decoder.decode(data)
        if settings.cgroup_workers:
            self.workers_cgroup = Path(settings.cgroup_workers)
        try:
            # options too: a bad one fails `serve` at start, not the first turn
            self.agent = check_agent(settings.entrypoint, settings.options)
        except AgentLoadError as e:
            self.send(spawn.SpawnFailed(seq=0, error=str(e)))
            return
        if (error := warm_up_agent(settings)) is not None:
            self.send(spawn.SpawnFailed(seq=0, error=f"agent.entrypoint: {error}"))
            return
        try:
            # after the agent and its warm-up: the modules they imported count
            self.sandbox = sandbox.plan(
                settings.sandbox, os.path.join(settings.state_dir, "tmp", str(os.getpid()))
            )
        except OSError as e:
            self.send(spawn.SpawnFailed(seq=0, error=f"sandbox: {e}"))
            return
        prepare_fork()
        gc.freeze()  # keep preloaded objects out of the collector, so forks share their pages
        self.send(spawn.Ready(pid=os.getpid(), sandbox=self.sandbox.level()))

        wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        signal.set_wakeup_fd(wake_w)
        signal.signal(signal.SIGCHLD, lambda *_: None)
        sel = selectors.DefaultSelector()
        sel.register(self.sock, selectors.EVENT_READ, "request")
        sel.register(wake_r, selectors.EVENT_READ, "child")
        self.sweep()  # whatever the agent's import forked is no worker
        while True:  # ends when the supervisor closes its socket (or SIGTERM)
            for key, _ in sel.select(self.sweep_timeout()):
                if key.data == "child":
                    while len(os.read(wake_r, 512)) == 512:
                        pass
                    self.reap()
                    continue
                accepted = self.accept()
                if accepted is None:
                    return
                if accepted:
                    request, fd = accepted
                    self.fork_worker(request, fd, closing=[self.sock.fileno(), wake_r, wake_w])
            self.sweep_if_due()

    def accept(self) -> tuple[spawn.Spawn, int] | tuple[()] | None:
        """The next spawn request and its socket; () if refused or a ping (answered here);
        None: the supervisor is gone.

        Only the supervisor can send: the socket is one end of a socketpair it made (the
        peer was checked at start), and every worker closes its copy before anything else.
        """
        msg, fds, _, _ = socket.recv_fds(self.sock, spawn.MAX_PACKET, 1)
        if not msg:
            return None
        request = spawn.request_decoder.decode(msg)
        if isinstance(request, spawn.Ping):  # the supervisor's health check
            for fd in fds:
                os.close(fd)
            self.send(spawn.Pong(seq=request.seq))
            return ()
        error = "" if len(fds) == 1 else "no socket attached"
        try:
            check_session_key(request.session)  # it becomes paths the worker may write
        except InvalidSessionKey as e:
            error = str(e)
        if error:
            for fd in fds:
                os.close(fd)
            self.send(spawn.SpawnFailed(seq=request.seq, error=error))
            return ()
        return request, fds[0]

    def fork_worker(self, request: spawn.Spawn, fd: int, closing: list[int]) -> None:
        try:
            pid = os.fork()
        except OSError as e:
            os.close(fd)
            self.send(spawn.SpawnFailed(seq=request.seq, error=f"fork failed: {e}"))
            return
        if pid == 0:
            code = os.EX_SOFTWARE  # what the worker exits with if it fails before serving
            try:
                signal.set_wakeup_fd(-1)
                for other in closing:
                    os.close(other)
                s, agent = self.settings, self.agent
                assert s is not None and agent is not None  # run() set both before any spawn
                confine(s, idle=request.idle)
                set_title(f"corral: worker {request.session}")
                sock = socket.socket(fileno=fd)
                code = Runtime(sock, request.session, s, agent, self.sandbox).serve()
            except BaseException:
                traceback.print_exc()
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        os.close(fd)
        self.workers.add(pid)
        try:
            # Opened before we could possibly reap it, so this pidfd names our worker.
            pidfd = os.pidfd_open(pid)
        except OSError as e:
            os.kill(pid, signal.SIGKILL)
            self.send(spawn.SpawnFailed(seq=request.seq, error=f"pidfd_open failed: {e}"))
            return
        try:
            self.send(spawn.Spawned(seq=request.seq, pid=pid), [pidfd])
        finally:
            os.close(pidfd)

    def reap(self) -> None:
        for pid, status in _reaped():
            if pid in self.workers:
                self.workers.discard(pid)
                sandbox.forget(self.sandbox, pid)
                oom = self.release_cgroup(pid)
                self.send(spawn.Exited(pid=pid, status=status, oom_killed=oom))
        # what a dead worker left behind, and what a dead stray left behind in turn: each
        # death of a child of ours is a SIGCHLD, so the sweep repeats until none is left
        self.sweep()
        self.dying_cgroups = cgroupfs.remove_all(self.dying_cgroups)

    def sweep(self) -> None:
        """Kill every child of ours that is not a worker, with everything below it.

        Workers are subreapers, so a worker's orphans stay in its tree; a child of ours
        that is not a worker got here because its worker died, or because the agent
        cleared its subreaper flag or forked with CLONE_PARENT (which the worker's
        seccomp filter refuses). Either way it belongs to no session: it must not live.
        """
        self.swept_at = time.monotonic()
        kill_strays(keep=self.workers)

    def sweep_timeout(self) -> float | None:
        """How long the zygote may block: until the next sweep is due while it has workers.

        A process re-parented to us by the death of a process that was not our child
        sends us no SIGCHLD, so while workers live we also sweep on a timer."""
        if not self.workers:
            return None
        return max(0.0, self.swept_at + SWEEP_INTERVAL - time.monotonic())

    def sweep_if_due(self) -> None:
        if self.workers and time.monotonic() >= self.swept_at + SWEEP_INTERVAL:
            self.sweep()

    def release_cgroup(self, pid: int) -> bool:
        """Kill what is left in a dead worker's cgroup; whether the kernel OOM-killed it."""
        if self.workers_cgroup is None:
            return False
        cg = cgroupfs.worker_cgroup(self.workers_cgroup, pid)
        oom = cgroupfs.oom_kills(cg) > 0
        cgroupfs.kill(cg)
        self.dying_cgroups.add(cg)  # removed once the kernel has emptied it
        return oom

    def kill_everything(self, timeout: float = 5.0) -> None:
        """Kill every worker and every descendant, and remove their cgroups."""
        if self.workers_cgroup is not None:
            for cg in cgroupfs.subgroups(self.workers_cgroup):
                cgroupfs.kill(cg)
                self.dying_cgroups.add(cg)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:  # bounded: each round kills what it finds
            killed = kill_strays(keep=set())  # all our children: workers and their strays
            for _ in _reaped():
                pass
            self.dying_cgroups = cgroupfs.remove_all(self.dying_cgroups)
            if not killed and not self.dying_cgroups:
                return
            time.sleep(0.01)


def _from_parent(sock: socket.socket) -> bool:
    """Whether the other end of our socket is the supervisor that started us (SO_PEERCRED)."""
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, _, _ = struct.unpack("3i", creds)
    return pid == os.getppid()


def warm_up_agent(settings: spawn.WorkerSettings) -> str | None:
    """Run the agent's warm-up (runtime.warm_up) before the first fork; why the zygote
    cannot fork safely after it, if it cannot.

    A warm-up that raises costs only memory (every worker builds what it would have
    shared): the error is printed and the zygote goes on. A thread left running (by
    the warm-up, or by the agent's import) is refused: a fork copies the locks that
    thread may hold, held, and a worker would hang on one of them.
    """
    try:
        warm_up(settings.entrypoint, settings.options)
    except Exception:
        print("corral zygote: the agent's warm_up failed; workers start cold:", file=sys.stderr)
        traceback.print_exc()
    others = [t.name for t in threading.enumerate() if t is not threading.main_thread()]
    if others:
        return (
            f"threads are running after its import and warm_up ({', '.join(others)}): "
            "a fork would copy the locks they hold; start them in the worker instead"
        )
    return None


def _terminate(signum: int, frame: object) -> None:
    raise SystemExit(0)


def main() -> None:
    sock = socket.socket(fileno=int(sys.argv[1]))
    set_title("corral: zygote")
    signal.signal(signal.SIGTERM, _terminate)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C goes to the supervisor, which stops us
    die_with_parent(signal.SIGTERM)
    become_subreaper()
    zygote = Zygote(sock)
    try:
        zygote.run()
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        zygote.kill_everything()
        sandbox.remove_all(zygote.sandbox)


if __name__ == "__main__":
    main()
