"""What a freshly forked worker does to itself before it runs agent code."""

from __future__ import annotations

import os
import resource
import signal

from corral.protocol.procfs import become_subreaper, prctl

_PR_SET_PDEATHSIG = 1
_PR_SET_NO_NEW_PRIVS = 38


def die_with_parent(sig: int = signal.SIGKILL) -> None:
    """Get `sig` when the parent dies; exit at once if it already has."""
    parent = os.getppid()
    prctl(_PR_SET_PDEATHSIG, sig)
    if os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(1)


def no_new_privs() -> None:
    prctl(_PR_SET_NO_NEW_PRIVS, 1)


def set_cpu_backstop(seconds: float) -> None:
    """Let the kernel end this process (SIGXCPU) after `seconds` more CPU time.

    The supervisor's sampling is the primary CPU bound; this catches a worker the
    sampler cannot see in time. Only the soft limit moves, so it can be raised again.
    """
    used = sum(os.times()[:2])
    soft = int(used + seconds) + 1
    _, hard = resource.getrlimit(resource.RLIMIT_CPU)
    if hard != resource.RLIM_INFINITY:
        soft = min(soft, hard)
    resource.setrlimit(resource.RLIMIT_CPU, (soft, hard))


def join_cgroup(workers: str, memory_max: int, pids_max: int, cpu_max: str) -> None:
    """Move this process into a cgroup of its own under `workers`, with kernel limits.

    Everything it forks from now on, strays included, is in there too.
    """
    cg = os.path.join(workers, str(os.getpid()))
    os.mkdir(cg)
    limits = {
        "memory.max": str(memory_max) if memory_max else "",
        "memory.oom.group": "1" if memory_max else "",
        "memory.swap.max": "0" if memory_max else "",
        "pids.max": str(pids_max) if pids_max else "",
        "cpu.max": cpu_max,
    }
    for name, value in limits.items():
        path = os.path.join(cg, name)
        if value and os.path.exists(path):  # a controller the service was not given
            with open(path, "w") as f:
                f.write(value)
    with open(os.path.join(cg, "cgroup.procs"), "w") as f:
        f.write("0")  # "0": the writing process


def confine(nice: int) -> None:
    """Own process group, lower priority, no core files, no privilege gain.

    A process group of its own keeps the terminal's Ctrl-C away from workers. Not a
    session of its own: with the kernel's autogroup scheduling (on by default on
    desktops and many servers) every session is a scheduling group with an equal
    share, so a setsid'd worker spinning at nice 10 would take as much CPU as the
    whole supervisor; in the supervisor's session, nice and SCHED_IDLE do their job.
    """
    os.setpgid(0, 0)
    die_with_parent()
    become_subreaper()
    no_new_privs()
    os.nice(nice)
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    # the zygote handles some of these itself; the worker starts from the defaults
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD):
        signal.signal(sig, signal.SIG_DFL)
