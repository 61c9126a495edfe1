"""A worker's process tree, read from /proc, and signals to it by pidfd.

Workers are child subreapers, so every descendant, even one that double-forked
and called setsid, stays below the worker while it lives. The walk reads
/proc/<pid>/task/<tid>/children (corral.protocol.procfs), which costs the size of
the tree; psutil's children() scans every process on the machine, which with
1,000 workers is a thousand times more work per sample.
These functions do file I/O: call them from the sampler's thread, not the loop.
"""

from __future__ import annotations

import os
import signal
import time
from typing import NamedTuple

import msgspec

from corral.protocol.procfs import descendants, parent_of, signal_below
from corral.protocol.procfs import kill_strays as kill_strays  # shared with the zygote

__all__ = ["descendants", "kill_strays", "parent_of"]

CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")


class TreeSample(msgspec.Struct, frozen=True):
    rss: int  # bytes: a lone worker's RSS, or its tree's PSS (shared pages counted once)
    cpu: float  # seconds of user+system CPU, including reaped children
    processes: int
    tasks: int = 0  # processes and threads, zombies included (each holds a PID)
    root_cpu: float = 0.0  # seconds of the worker process's own CPU (what RLIMIT_CPU counts)
    cost: float = 0.0  # seconds the sample took to read


class Stat(NamedTuple):
    cpu: float  # user+system seconds, its own and its reaped children's
    own_cpu: float  # user+system seconds, its own
    threads: int
    rss: int  # bytes


def read_stat(pid: int) -> Stat | None:
    """CPU, threads and RSS of one process from /proc/<pid>/stat; None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return None
    # after the command name: state ppid ... utime(14) stime cutime cstime ...
    # num_threads(20) ... rss(24), counted from 1 with the pid and the name
    fields = stat[stat.rindex(b")") + 2 :].split()
    own = int(fields[11]) + int(fields[12])
    ticks = own + int(fields[13]) + int(fields[14])
    return Stat(
        cpu=ticks / CLK_TCK,
        own_cpu=own / CLK_TCK,
        threads=int(fields[17]),
        rss=int(fields[21]) * PAGE_SIZE,
    )


def pss(pid: int) -> int | None:
    """Proportional set size in bytes from /proc/<pid>/smaps_rollup: each page shared
    by n processes counts 1/n, so a tree of forks sharing pages sums to what it really
    holds. None if unreadable (gone, or a kernel before 4.14)."""
    try:
        with open(f"/proc/{pid}/smaps_rollup", "rb") as f:
            rollup = f.read()
    except OSError:
        return None
    at = rollup.find(b"\nPss:")
    if at < 0:
        return None  # a zombie, or a kernel thread: no memory of its own
    return int(rollup[at + 5 : rollup.index(b"kB", at)]) * 1024


def sample_tree(pid: int, max_tasks: int = 100_000) -> TreeSample | None:
    """Memory, CPU and tasks of `pid` and its descendants; None if `pid` is gone.

    A lone worker's memory is its RSS (one small read of /proc/<pid>/stat); a tree's
    is the sum of its processes' PSS, so pages its forks share count once. PSS costs
    the kernel a walk of each process's page tables (0.5-1 ms for a 40 MiB process
    on a loaded 2-core machine), which only trees pay. A tree of more than
    `max_tasks` processes is counted only that far: it is over its bound whatever the
    rest holds.
    """
    started = time.perf_counter()
    memory = 0
    cpu = root_cpu = 0.0
    count = 0
    tasks = 0
    tree = [pid, *descendants(pid, limit=max_tasks + 1)]
    for i, p in enumerate(tree):
        stat = read_stat(p)
        if stat is None:
            if i == 0:
                return None
            continue
        if i == 0:
            root_cpu = stat.own_cpu
        own = pss(p) if len(tree) > 1 else None
        memory += stat.rss if own is None else own
        cpu += stat.cpu
        tasks += max(1, stat.threads)
        count += 1
    return TreeSample(
        rss=memory,
        cpu=cpu,
        processes=count,
        tasks=tasks,
        root_cpu=root_cpu,
        cost=time.perf_counter() - started,
    )


def demote_tree(root_pidfd: int, pid: int) -> int:
    """Move `pid` and its descendants to SCHED_IDLE: they run only on CPU time that
    nothing else wants. Children forked later inherit it. How many were moved."""
    moved = 0
    idle = os.sched_param(0)
    our_session = os.getsid(0)
    for p in [pid, *descendants(pid)]:
        try:
            signal.pidfd_send_signal(root_pidfd, 0)  # the root is still ours: pids are too
            os.sched_setscheduler(p, os.SCHED_IDLE, idle)
            if os.getsid(p) != our_session:
                # a descendant that called setsid is a scheduling group of its own under
                # autogroup, where its policy counts for little: lower the group instead
                with open(f"/proc/{p}/autogroup", "w") as f:
                    f.write("19")
            moved += 1
        except (ProcessLookupError, PermissionError, FileNotFoundError):
            continue
    return moved


def signal_descendants(root_pidfd: int, pid: int, sig: int) -> int:
    """Send `sig` (and SIGCONT) to every descendant of the live process `pid`, leaves
    first, by pidfd (corral.protocol.procfs.signal_below); how many were signalled.

    `root_pidfd` must be a descriptor the caller owns for this call: it proves `pid`
    is still the worker. A root already gone has left its descendants to the zygote,
    which kills them.
    """
    try:
        signal.pidfd_send_signal(root_pidfd, 0)
    except ProcessLookupError:
        return 0
    return signal_below(pid, sig)


def signal_tree(root_pidfd: int, pid: int, sig: int) -> int:
    """Signal the descendants of `pid` (leaves first), then `pid` itself by its pidfd:
    while the root lives its tree stays below it, so the walk finds every descendant
    whatever the tree's shape. How many descendants were signalled."""
    sent = signal_descendants(root_pidfd, pid, sig)
    try:
        signal.pidfd_send_signal(root_pidfd, sig)
        if sig != signal.SIGKILL:
            signal.pidfd_send_signal(root_pidfd, signal.SIGCONT)
    except ProcessLookupError:
        pass
    return sent
