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

import msgspec
import psutil

from corral.protocol.procfs import children
from corral.protocol.procfs import kill_strays as kill_strays  # shared with the zygote


def descendants(pid: int) -> list[int]:
    """Every process below `pid`, parents before children."""
    found: list[int] = []
    frontier = [pid]
    while frontier and len(found) < 100_000:  # bounded: a fork bomb cannot loop us forever
        nxt: list[int] = []
        for p in frontier:
            nxt.extend(children(p))
        found.extend(nxt)
        frontier = nxt
    return found


class TreeSample(msgspec.Struct, frozen=True):
    rss: int  # bytes, summed over the tree
    cpu: float  # seconds of user+system CPU, including reaped children
    processes: int


def sample_tree(pid: int) -> TreeSample | None:
    """RSS and CPU of `pid` and its descendants; None if `pid` is gone."""
    rss = 0
    cpu = 0.0
    count = 0
    for i, p in enumerate([pid, *descendants(pid)]):
        try:
            proc = psutil.Process(p)
            with proc.oneshot():
                rss += proc.memory_info().rss
                t = proc.cpu_times()
                cpu += t.user + t.system + t.children_user + t.children_system
            count += 1
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            if i == 0:
                return None
    return TreeSample(rss=rss, cpu=cpu, processes=count)


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
    """Send `sig` (and SIGCONT) to every descendant of the live process `pid`.

    Each descendant is opened as a pidfd and its parent checked to be in the tree
    after opening, so a PID recycled mid-walk is never signalled. `root_pidfd` must
    be a descriptor the caller owns for this call. Returns how many were signalled.
    """
    try:
        signal.pidfd_send_signal(root_pidfd, 0)
    except ProcessLookupError:
        return 0  # the root is gone: the zygote kills what it left behind
    tree = {pid}
    sent = 0
    for child in descendants(pid):
        try:
            fd = os.pidfd_open(child)
        except OSError:
            continue
        try:
            if psutil.Process(child).ppid() not in tree:
                continue
            tree.add(child)
            signal.pidfd_send_signal(fd, sig)
            if sig != signal.SIGKILL:
                # a stopped process does not act on SIGTERM until continued
                signal.pidfd_send_signal(fd, signal.SIGCONT)
            sent += 1
        except (OSError, psutil.Error):
            continue
        finally:
            os.close(fd)
    return sent
