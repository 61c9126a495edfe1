"""Process plumbing both the zygote and the supervisor need: a process's children
from /proc, killing the strays among them, and prctl.

/proc/<pid>/task/<tid>/children lists the children each thread forked (or was handed
as a subreaper); reading it costs the size of the tree, where psutil's children()
scans every process on the machine.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal

_PR_SET_CHILD_SUBREAPER = 36
_libc = ctypes.CDLL(None, use_errno=True)


def prctl(option: int, arg: int) -> None:
    if _libc.prctl(option, arg, 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def become_subreaper() -> None:
    """Orphaned descendants are re-parented to us instead of init.

    Workers, the zygote and the supervisor all are: a worker's double-forked,
    setsid'd grandchild stays in the worker's tree, where sampling counts it and the
    kill path finds it; what a dead worker, or a dead zygote, leaves behind lands one
    level up, where it is killed.
    """
    prctl(_PR_SET_CHILD_SUBREAPER, 1)


def set_title(title: str) -> None:
    """What `ps` and `top` show for this process, e.g. "corral: worker alice".

    SPT_NOENV keeps the environment block intact (setproctitle would otherwise
    reuse it for a longer title, and /proc/<pid>/environ would show the title); the
    title is cut to the length of the original command line instead.
    """
    os.environ["SPT_NOENV"] = "1"
    from setproctitle import setproctitle

    setproctitle(title)


def children(pid: int | str = "self") -> set[int]:
    """Direct children of `pid` (default: this process); empty if it is gone."""
    found: set[int] = set()
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return found
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                found.update(int(p) for p in f.read().split())
        except OSError:
            continue
    return found


def descendants(pid: int, limit: int = 100_000) -> list[int]:
    """Every process below `pid`, parents before children; at most `limit` of them
    (a fork bomb cannot keep the walk going forever)."""
    found: list[int] = []
    frontier = [pid]
    while frontier and len(found) < limit:  # ends at the leaves or at the limit
        nxt: list[int] = []
        for p in frontier:
            nxt.extend(children(p))
        found.extend(nxt)
        frontier = nxt
    return found[:limit]


def parent_of(pid: int) -> int | None:
    """The parent's PID from /proc/<pid>/stat; None if `pid` is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return None
    # the command name, in parentheses, may itself hold spaces and parentheses
    return int(stat[stat.rindex(b")") + 2 :].split(maxsplit=2)[1])


def signal_below(pid: int, sig: int, tree: set[int] | None = None) -> int:
    """Send `sig` to every descendant of `pid`, leaves first; how many were signalled.

    Each one is opened as a pidfd and its parent checked to be in the tree after
    opening, so a PID recycled mid-walk is never signalled. Leaves go first so that a
    parent is still alive (and the child still its) when the child is checked. The
    caller makes sure `pid` itself is still the process it means (its own child, or
    a pidfd it holds). A stopped process does not act on SIGTERM until continued, so
    any signal but SIGKILL is followed by SIGCONT.
    """
    below = descendants(pid)
    tree = {pid, *below} if tree is None else tree | {pid, *below}
    sent = 0
    for child in reversed(below):
        try:
            fd = os.pidfd_open(child)
        except OSError:
            continue
        try:
            if parent_of(child) not in tree:
                continue
            signal.pidfd_send_signal(fd, sig)
            if sig != signal.SIGKILL:
                signal.pidfd_send_signal(fd, signal.SIGCONT)
            sent += 1
        except OSError:
            continue
        finally:
            os.close(fd)
    return sent


def kill_strays(keep: set[int]) -> list[int]:
    """SIGKILL and reap this process's children other than `keep`, each with everything
    below it; the PIDs of the children killed.

    We are a subreaper, so what a dead child leaves behind is re-parented to us: the
    supervisor keeps its zygotes, a zygote its workers. Our own children's PIDs
    cannot be recycled before we reap them, so signalling them by PID is safe; what is
    below them is signalled by pidfd. A process that forks between the walk and its
    kill leaves a child that is re-parented to us when its parent dies: the caller
    sweeps again (on SIGCHLD, and on a timer) until nothing is left. A stray not dead
    yet when reaped here is reaped by the next call, or by the caller's own wait loop.
    """
    killed = []
    for pid in children() - keep:
        signal_below(pid, signal.SIGKILL)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        killed.append(pid)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)
    return killed
