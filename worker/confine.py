"""What a freshly forked worker does to itself before it runs agent code."""

from __future__ import annotations

import os
import resource
import signal
from pathlib import Path

from corral.protocol import cgroupfs
from corral.protocol.procfs import become_subreaper, prctl
from corral.protocol.spawn import WorkerSettings

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


def confine(settings: WorkerSettings, idle: bool = False) -> None:
    """Own cgroup, own process group, lower priority, no core files, no privilege gain.

    The cgroup (when the supervisor has a delegated subtree) comes first, so that
    everything the worker forks, strays included, is in it and under its limits.
    `idle` starts the worker at SCHED_IDLE: its session broke a bound recently.

    A process group of its own keeps the terminal's Ctrl-C away from workers. Not a
    session of its own: with the kernel's autogroup scheduling (on by default on
    desktops and many servers) every session is a scheduling group with an equal
    share, so a setsid'd worker spinning at nice 10 would take as much CPU as the
    whole supervisor; in the supervisor's session, nice and SCHED_IDLE do their job.
    """
    if settings.cgroup_workers:
        limits = cgroupfs.Limits(
            memory_max=settings.memory_max, pids_max=settings.pids_max, cpu_max=settings.cpu_max
        )
        cgroupfs.join(cgroupfs.worker_cgroup(Path(settings.cgroup_workers), os.getpid()), limits)
    os.setpgid(0, 0)
    die_with_parent()
    become_subreaper()
    no_new_privs()
    os.nice(settings.nice)
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    # the zygote handles some of these itself; the worker starts from the defaults
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD):
        signal.signal(sig, signal.SIG_DFL)
    if idle:
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
