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


def kill_strays(keep: set[int]) -> list[int]:
    """SIGKILL and reap this process's children other than `keep`; the PIDs killed.

    We are a subreaper, so what a dead child leaves behind is re-parented to us: the
    supervisor keeps its zygotes, a zygote its workers. Our own children's PIDs
    cannot be recycled before we reap them, so signalling them by PID is safe. A
    stray not dead yet when reaped here is reaped later: by the next call, or by the
    caller's own wait loop.
    """
    killed = []
    for pid in children() - keep:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        killed.append(pid)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)
    return killed
