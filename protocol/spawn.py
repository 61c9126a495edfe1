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


class SandboxSettings(msgspec.Struct, frozen=True, kw_only=True):
    """`[sandbox]` as the zygote needs it (worker/sandbox.py)."""

    enabled: bool = True
    read_only: list[str] = msgspec.field(default_factory=list)
    read_write: list[str] = msgspec.field(default_factory=list)
    allow_connect_ports: list[int] = msgspec.field(default_factory=list)  # empty: every port
    # corral's own TCP ports (HTTP channel, metrics, a local store), closed to every
    # worker by a layer the zygote enters once; empty: none (or allow_connect_ports rules)
    deny_connect_ports: list[int] = msgspec.field(default_factory=list)
    # corral's own files, never reachable from a worker: state_dir, the control
    # socket's directory, the config file
    hidden: list[str] = msgspec.field(default_factory=list)
    # environment variables the zygote (and so every worker) starts without: secrets
    # of corral's own (bot tokens, the store's password) and systemd's notify socket
    hidden_env: list[str] = msgspec.field(default_factory=list)


class SandboxLevel(msgspec.Struct, frozen=True, kw_only=True):
    """The sandbox in force, as the zygote found it on this kernel."""

    enabled: bool  # [sandbox] enabled
    abi: int  # the Landlock ABI the workers restrict themselves with; 0: none
    enforced: list[str]  # "filesystem", "signals", ... (worker/landlock.py features())
    missing: list[str]  # what this kernel (or the config) leaves unenforced
    why: str = ""  # with abi 0: why there is no Landlock here


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
    sandbox: SandboxSettings = msgspec.field(default_factory=SandboxSettings)


# supervisor -> zygote
class Spawn(msgspec.Struct, tag="spawn", frozen=True):
    seq: int
    session: str
    idle: bool = False  # start at SCHED_IDLE: the session broke a bound recently


class Ping(msgspec.Struct, tag="ping", frozen=True):
    """A health check: a zygote that does not answer in time is replaced."""

    seq: int


# zygote -> supervisor
class Pong(msgspec.Struct, tag="pong", frozen=True):
    seq: int


class Ready(msgspec.Struct, tag="ready", frozen=True):
    pid: int
    sandbox: SandboxLevel | None = None


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


ZygoteMessage = Ready | Spawned | SpawnFailed | Exited | Pong
Request = Spawn | Ping

encode = msgspec.msgpack.Encoder().encode
zygote_decoder = msgspec.msgpack.Decoder(ZygoteMessage)
spawn_decoder = msgspec.msgpack.Decoder(Spawn)
request_decoder = msgspec.msgpack.Decoder(Request)
settings_decoder = msgspec.msgpack.Decoder(WorkerSettings)
