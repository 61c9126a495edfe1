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
The cgroupfs reads and writes themselves are in corral.protocol.cgroupfs, which the
zygote and the workers share.
"""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path

import msgspec

from corral.protocol import cgroupfs
from corral.protocol.spawn import WorkerSettings

log = logging.getLogger("corral.cgroups")

CONTROLLERS = ("memory", "pids", "cpu")
PIDS_MAX = 1024  # processes per worker: stops a fork bomb
PIDS_HEADROOM = 64  # pids.max above max_tasks: the sampler names the bound first
CPU_PERIOD = 100_000  # microseconds
MEMORY_HEADROOM = 16 * 2**20  # at least this much of memory.max above rss_max


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
                cgroupfs.write(leaf / "cgroup.procs", pid)
        available = (base / "cgroup.controllers").read_text().split()
        controllers = tuple(c for c in CONTROLLERS if c in available)
        enable = " ".join(f"+{c}" for c in controllers)
        if controllers:
            cgroupfs.write(base / "cgroup.subtree_control", enable)
        workers = base / "workers"
        workers.mkdir(exist_ok=True)
        if controllers:
            cgroupfs.write(workers / "cgroup.subtree_control", enable)
        if "cpu" in controllers:
            # all workers together: the supervisor's share
            cgroupfs.write(workers / "cpu.weight", "100")
        removed = remove_stale(workers)
    except OSError as e:
        return None, f"cannot set up cgroups under {base}: {e}"
    if removed:
        log.warning("removed %d worker cgroups left by an earlier run", removed)
    return Delegation(base=base, workers=workers, controllers=controllers), ""


def remove_stale(workers: Path, timeout: float = 5.0) -> int:
    """Kill and remove every worker cgroup (a SIGKILLed run leaves them behind)."""
    stale = cgroupfs.subgroups(workers)
    return len(stale) - len(cgroupfs.destroy(stale, timeout))


def kill_cgroup(workers: Path, pid: int) -> bool:
    """SIGKILL everything in a worker's cgroup at once; False if it has none."""
    return cgroupfs.kill(cgroupfs.worker_cgroup(workers, pid))


def worker_limits(rss_max: int, cpus: float = 1.0, pids_max: int = PIDS_MAX) -> cgroupfs.Limits:
    """The kernel limits of each worker's cgroup, for a worker bound to `rss_max` bytes."""
    return cgroupfs.Limits(
        # above rss_max: the sampler names the figure first; the kernel stops what
        # grows faster than it samples
        memory_max=rss_max + max(MEMORY_HEADROOM, rss_max // 8),
        pids_max=pids_max,
        cpu_max=f"{round(cpus * CPU_PERIOD)} {CPU_PERIOD}",
    )


def with_cgroups(
    settings: WorkerSettings, delegation: Delegation, limits: cgroupfs.Limits
) -> WorkerSettings:
    """`settings` telling each worker to join a cgroup of its own with `limits`."""
    return msgspec.structs.replace(
        settings,
        cgroup_workers=str(delegation.workers),
        memory_max=limits.memory_max,
        pids_max=limits.pids_max,
        cpu_max=limits.cpu_max,
    )
