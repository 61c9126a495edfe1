"""Reads and writes of cgroup v2 interface files, for the supervisor and the zygote.

The supervisor sets up `workers/` (supervisor/cgroups.py) and kills a worker's
cgroup; a fresh worker creates and joins `workers/<pid>/`; the zygote reads a dead
worker's OOM count, kills what is left and removes the directory. The layout and the
kernel's file formats are the contract between them, so they are written down once,
here. The worker never imports the supervisor.

These functions do file I/O: from the supervisor, call them on the sampler's thread.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import msgspec


class Limits(msgspec.Struct, frozen=True, kw_only=True):
    """Kernel limits for one worker's cgroup; 0 or "" leaves a limit unset."""

    memory_max: int = 0  # bytes; with memory.oom.group, an OOM kill takes the whole tree
    pids_max: int = 0
    cpu_max: str = ""  # "<quota> <period>" in microseconds, as cpu.max reads


def write(path: Path, value: str) -> None:
    with open(path, "w") as f:
        f.write(value)


def worker_cgroup(workers: Path, pid: int) -> Path:
    """The cgroup of the worker `pid` under the service's `workers/` cgroup."""
    return workers / str(pid)


def subgroups(cg: Path) -> list[Path]:
    """The cgroups directly below `cg`; none if `cg` is gone."""
    try:
        return [d for d in cg.iterdir() if d.is_dir()]
    except FileNotFoundError:
        return []


def join(cg: Path, limits: Limits) -> None:
    """Create `cg` with `limits` and move this process into it.

    Everything the process forks from then on, strays included, is in there too.
    """
    cg.mkdir()
    files = {
        "memory.max": str(limits.memory_max) if limits.memory_max else "",
        "memory.oom.group": "1" if limits.memory_max else "",
        # swap would let a balloon outgrow memory.max on a host that has any
        "memory.swap.max": "0" if limits.memory_max else "",
        "pids.max": str(limits.pids_max) if limits.pids_max else "",
        "cpu.max": limits.cpu_max,
    }
    for name, value in files.items():
        path = cg / name
        if value and path.exists():  # absent: a controller the service was not given
            write(path, value)
    write(cg / "cgroup.procs", "0")  # "0": the writing process


def kill(cg: Path) -> bool:
    """SIGKILL every process in `cg` and below at once; False if `cg` is gone."""
    try:
        write(cg / "cgroup.kill", "1")
        return True
    except OSError:
        return False


def oom_kills(cg: Path) -> int:
    """How many processes in `cg` the kernel's OOM killer took (0 without memory.events)."""
    try:
        with open(cg / "memory.events") as f:
            counts = dict(line.split() for line in f if line.strip())
    except OSError:
        return 0
    return int(counts.get("oom_kill", "0"))


def remove(cg: Path) -> bool:
    """rmdir `cg` once the kernel has emptied it; True when it is gone.

    Cgroups below it go first, deepest first: a worker owns its cgroup's directory,
    so its agent may have made some, and rmdir refuses a cgroup that has children.
    """
    for d, _, _ in os.walk(cg, topdown=False):  # nothing at all if `cg` is gone
        try:
            os.rmdir(d)
        except FileNotFoundError:
            continue
        except OSError:
            return False  # still busy: its killed processes are on their way out
    return True


def remove_all(cgs: set[Path]) -> set[Path]:
    """rmdir each of `cgs` that is empty; the ones still busy."""
    return {cg for cg in cgs if not remove(cg)}


def destroy(cgs: list[Path], timeout: float = 5.0) -> set[Path]:
    """Kill everything in `cgs` and remove them; the ones left after `timeout` seconds."""
    for cg in cgs:
        kill(cg)
    deadline = time.monotonic() + timeout
    left = set(cgs)
    while left and time.monotonic() < deadline:  # bounded: killed processes leave quickly
        left = remove_all(left)
        if left:
            time.sleep(0.02)
    return left
