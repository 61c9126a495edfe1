"""The zygote: a small single-threaded process that forks workers.

The supervisor runs threads (the store, executors) and an event loop, so it must
never fork itself. It starts this process once; the zygote imports the worker
runtime and the agent up front, then forks a worker per spawn request in a few
milliseconds. It is a child subreaper: whatever a dead worker leaves behind is
re-parented here and killed. When the supervisor goes away, it kills every worker
and descendant before it exits.

Run as: python -m corral.worker.zygote FD   (FD: a SOCK_SEQPACKET socket)
"""

from __future__ import annotations

import gc
import os
import selectors
import signal
import socket
import sys
import time
import traceback
from collections.abc import Iterator

from corral.protocol import spawn
from corral.protocol.procfs import children, set_title
from corral.worker.process import become_subreaper, confine, die_with_parent, join_cgroup
from corral.worker.runtime import AgentLoadError, Runtime, load_agent


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
        self.empty_cgroups: set[str] = set()
        self.settings: spawn.WorkerSettings | None = None

    def send(self, msg: object, fds: list[int] | None = None) -> None:
        data = spawn.encode(msg)
        if fds:
            socket.send_fds(self.sock, [data], fds)
        else:
            self.sock.send(data)

    def run(self) -> None:
        data = self.sock.recv(spawn.MAX_PACKET)
        if not data:
            return
        self.settings = settings = spawn.settings_decoder.decode(data)
        try:
            self.agent = load_agent(settings.entrypoint)
        except AgentLoadError as e:
            self.send(spawn.SpawnFailed(seq=0, error=f"agent.entrypoint: {e}"))
            return
        gc.freeze()  # keep preloaded objects out of the collector, so forks share their pages
        self.send(spawn.Ready(pid=os.getpid()))

        wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        signal.set_wakeup_fd(wake_w)
        signal.signal(signal.SIGCHLD, lambda *_: None)
        sel = selectors.DefaultSelector()
        sel.register(self.sock, selectors.EVENT_READ, "request")
        sel.register(wake_r, selectors.EVENT_READ, "child")
        while True:  # ends when the supervisor closes its socket (or SIGTERM)
            for key, _ in sel.select():
                if key.data == "child":
                    while os.read(wake_r, 512) == 512:
                        pass
                    self.reap()
                    continue
                msg, fds, _, _ = socket.recv_fds(self.sock, spawn.MAX_PACKET, 1)
                if not msg:
                    return
                request = spawn.spawn_decoder.decode(msg)
                if len(fds) != 1:
                    for fd in fds:
                        os.close(fd)
                    self.send(spawn.SpawnFailed(seq=request.seq, error="no socket attached"))
                    continue
                self.fork_worker(request, fds[0], closing=[self.sock.fileno(), wake_r, wake_w])

    def fork_worker(self, request: spawn.Spawn, fd: int, closing: list[int]) -> None:
        try:
            pid = os.fork()
        except OSError as e:
            os.close(fd)
            self.send(spawn.SpawnFailed(seq=request.seq, error=f"fork failed: {e}"))
            return
        if pid == 0:
            code = 70
            try:
                signal.set_wakeup_fd(-1)
                for other in closing:
                    os.close(other)
                s = self.settings
                assert s is not None
                if s.cgroup_workers:
                    join_cgroup(s.cgroup_workers, s.memory_max, s.pids_max, s.cpu_max)
                confine(s.nice)
                if request.idle:
                    os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
                set_title(f"corral: worker {request.session}")
                sock = socket.socket(fileno=fd)
                code = Runtime(sock, request.session, s, self.agent).serve()
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
        worker_exited = False
        for pid, status in _reaped():
            if pid in self.workers:
                self.workers.discard(pid)
                worker_exited = True
                oom = self.release_cgroup(pid)
                self.send(spawn.Exited(pid=pid, status=status, oom_killed=oom))
        if worker_exited:
            self.kill_strays()
        self.remove_cgroups()

    def release_cgroup(self, pid: int) -> bool:
        """Kill what is left in a dead worker's cgroup; whether the kernel OOM-killed it."""
        if self.settings is None or not self.settings.cgroup_workers:
            return False
        cg = os.path.join(self.settings.cgroup_workers, str(pid))
        oom = False
        try:
            with open(os.path.join(cg, "memory.events")) as f:
                counts = dict(line.split() for line in f if line.strip())
            oom = counts.get("oom_kill", "0") != "0"
        except OSError:
            pass
        try:
            with open(os.path.join(cg, "cgroup.kill"), "w") as f:
                f.write("1")
        except OSError:
            pass
        self.empty_cgroups.add(cg)
        return oom

    def remove_cgroups(self) -> None:
        """rmdir the cgroups of dead workers once the kernel has emptied them."""
        for cg in list(self.empty_cgroups):
            try:
                os.rmdir(cg)
            except FileNotFoundError:
                pass
            except OSError:
                continue  # still busy: its killed processes are on their way out
            self.empty_cgroups.discard(cg)

    def kill_strays(self) -> None:
        """Kill what a dead worker left behind: our children that are not workers."""
        for pid in children() - self.workers:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def kill_everything(self, timeout: float = 5.0) -> None:
        """Kill every worker and every descendant; wait until none is left."""
        workers_cg = self.settings.cgroup_workers if self.settings else ""
        if workers_cg:
            for name in os.listdir(workers_cg):
                self.empty_cgroups.add(os.path.join(workers_cg, name))
                try:
                    with open(os.path.join(workers_cg, name, "cgroup.kill"), "w") as f:
                        f.write("1")
                except OSError:
                    pass
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:  # bounded: each round kills what it finds
            left = children()
            if not left:
                return
            for pid in left:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.01)
            for _ in _reaped():
                pass
            self.remove_cgroups()


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


if __name__ == "__main__":
    main()
