"""Messages between the supervisor and the zygote that forks workers.

They travel as single SOCK_SEQPACKET packets (msgpack), so file descriptors (the
worker's frame socket one way, its pidfd the other) ride along with SCM_RIGHTS.
"""

from __future__ import annotations

from typing import Any

import msgspec

MAX_PACKET = 64 * 1024
# a worker process's lifetime CPU, in turns' worth of cpu_time_per_turn (+2 s each): its
# RLIMIT_CPU hard limit, which the agent cannot raise; the supervisor retires an idle
# worker before a turn could run into it
CPU_LIFETIME_TURNS = 20


def cpu_lifetime(cpu_time_per_turn: float) -> float:
    """CPU seconds a worker process may use in its life (the RLIMIT_CPU hard limit)."""
    return CPU_LIFETIME_TURNS * (cpu_time_per_turn + 2)


class WorkerSettings(msgspec.Struct, frozen=True, kw_only=True):
    """What every worker needs to know, sent once when the zygote starts."""

    entrypoint: str
    options: dict[str, Any]
    state_dir: str
    max_frame: int
    cpu_time_per_turn: float
    nice: int = 10
    # per-worker cgroups (supervisor/cgroups.py); empty when not delegated
    cgroup_workers: str = ""
    memory_max: int = 0
    pids_max: int = 0
    cpu_max: str = ""


# supervisor -> zygote
class Spawn(msgspec.Struct, tag="spawn", frozen=True):
    seq: int
    session: str
    idle: bool = False  # start at SCHED_IDLE: the session broke a bound recently


# zygote -> supervisor
class Ready(msgspec.Struct, tag="ready", frozen=True):
    pid: int


class Spawned(msgspec.Struct, tag="spawned", frozen=True):
    seq: int
    pid: int  # the pidfd rides along as the packet's one file descriptor


class SpawnFailed(msgspec.Struct, tag="spawn_failed", frozen=True):
    seq: int
    error: str


class Exited(msgspec.Struct, tag="exited", frozen=True):
    pid: int
    status: int  # as from os.waitpid
    oom_killed: bool = False  # the kernel killed it at its cgroup's memory.max


ZygoteMessage = Ready | Spawned | SpawnFailed | Exited

encode = msgspec.msgpack.Encoder().encode
zygote_decoder = msgspec.msgpack.Decoder(ZygoteMessage)
spawn_decoder = msgspec.msgpack.Decoder(Spawn)
settings_decoder = msgspec.msgpack.Decoder(WorkerSettings)
