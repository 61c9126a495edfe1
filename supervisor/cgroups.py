"""Per-worker cgroups, when the service runs in a delegated cgroup v2 subtree.

Under systemd with `Delegate=yes` the service owns its cgroup. corral then moves
itself into a leaf (`supervisor/`; cgroup v2 lets only leaves hold processes once
controllers are enabled below) and puts every worker into `workers/<pid>/`, where
the kernel enforces what sampling can only observe after the fact:

- `memory.max` a little above `rss_max` (the sampler usually reports the precise
  figure first; the kernel stops a balloon that grows faster than it samples),
  with `memory.oom.group` so an OOM kill takes the worker's whole tree;
- `pids.max` against fork bombs;
- `cpu.max` of one CPU per worker, and `cpu.weight` on `workers/` equal to the
  supervisor's, so all workers together cannot take the supervisor's share;
- `cgroup.kill`, which kills a worker's whole tree at once, strays included.

Without a delegated subtree (the default outside systemd, or cgroup v1) nothing
here is used and the portable path (sampling, RLIMIT_CPU, tree walks) does it all.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from pathlib import Path

import msgspec

log = logging.getLogger("corral.cgroups")

CONTROLLERS = ("memory", "pids", "cpu")


class Delegation(msgspec.Struct, frozen=True):
    base: Path  # the service's own cgroup
    workers: Path  # parent of the per-worker cgroups
    controllers: tuple[str, ...]  # enabled for the workers


def cgroup2_mount() -> Path | None:
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            sep = fields.index("-")
            if fields[sep + 1] == "cgroup2":
                return Path(fields[4])
    return None


def own_cgroup() -> tuple[Path, Path] | None:
    """(mount point, our cgroup directory) in the cgroup v2 hierarchy, if any."""
    mount = cgroup2_mount()
    if mount is None:
        return None
    with open("/proc/self/cgroup") as f:
        for line in f:
            if line.startswith("0::"):
                return mount, mount / line[3:].strip().lstrip("/")
    return None


def _write(path: Path, value: str) -> None:
    with open(path, "w") as f:
        f.write(value)


def delegate(enabled: bool) -> tuple[Delegation | None, str]:
    """Set up per-worker cgroups if we own a cgroup v2 subtree; (delegation, why not)."""
    if not enabled:
        return None, "disabled by supervisor.cgroups = false"
    found = own_cgroup()
    if found is None:
        return None, "no cgroup v2 hierarchy"
    mount, base = found
    if base == mount:
        return None, "corral runs in the root cgroup, not in a delegated subtree"
    if not all(os.access(base / f, os.W_OK) for f in ("cgroup.procs", "cgroup.subtree_control")):
        return None, f"{base} is not delegated to us (systemd: Delegate=yes)"
    try:
        leaf = base / "supervisor"
        leaf.mkdir(exist_ok=True)
        # every process in our cgroup moves to the leaf: ourselves, and whatever
        # else the service manager started there
        for pid in (base / "cgroup.procs").read_text().split():
            with contextlib.suppress(ProcessLookupError, OSError):
                _write(leaf / "cgroup.procs", pid)
        available = (base / "cgroup.controllers").read_text().split()
        controllers = tuple(c for c in CONTROLLERS if c in available)
        if controllers:
            _write(base / "cgroup.subtree_control", " ".join(f"+{c}" for c in controllers))
        workers = base / "workers"
        workers.mkdir(exist_ok=True)
        if controllers:
            _write(workers / "cgroup.subtree_control", " ".join(f"+{c}" for c in controllers))
        if "cpu" in controllers:
            _write(workers / "cpu.weight", "100")  # all workers together: the supervisor's share
        removed = remove_stale(workers)
    except OSError as e:
        return None, f"cannot set up cgroups under {base}: {e}"
    if removed:
        log.warning("removed %d worker cgroups left by an earlier run", removed)
    return Delegation(base=base, workers=workers, controllers=controllers), ""


def remove_stale(workers: Path, timeout: float = 5.0) -> int:
    """Kill and remove every worker cgroup (a SIGKILLed run leaves them behind)."""
    stale = [d for d in workers.iterdir() if d.is_dir()]
    for d in stale:
        with contextlib.suppress(OSError):
            _write(d / "cgroup.kill", "1")
    deadline = time.monotonic() + timeout
    left = stale
    while left and time.monotonic() < deadline:  # bounded: killed processes leave quickly
        left = [d for d in left if not _rmdir(d)]
        if left:
            time.sleep(0.02)
    return len(stale) - len(left)


def _rmdir(d: Path) -> bool:
    try:
        d.rmdir()
        return True
    except FileNotFoundError:
        return True
    except OSError:
        return False


def kill_cgroup(workers: Path, pid: int) -> bool:
    """SIGKILL everything in a worker's cgroup at once; False if it has none."""
    try:
        _write(workers / str(pid) / "cgroup.kill", "1")
        return True
    except OSError:
        return False
