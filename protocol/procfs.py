"""Reading a process's children from /proc, for both the zygote and the supervisor.

/proc/<pid>/task/<tid>/children lists the children each thread forked (or was handed
as a subreaper); reading it costs the size of the tree, where psutil's children()
scans every process on the machine.
"""

from __future__ import annotations

import os


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
