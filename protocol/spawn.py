"""Messages between the supervisor and the zygote that forks workers.

They travel as single SOCK_SEQPACKET packets (msgpack), so file descriptors (the
worker's frame socket one way, its pidfd the other) ride along with SCM_RIGHTS.
"""

from __future__ import annotations

from typing import Any

import msgspec

MAX_PACKET = 64 * 1024


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


class Ping(msgspec.Struct, tag="ping", frozen=True):
    """A health check: a zygote that does not answer in time is replaced."""

    seq: int


# zygote -> supervisor
class Pong(msgspec.Struct, tag="pong", frozen=True):
    seq: int


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


ZygoteMessage = Ready | Spawned | SpawnFailed | Exited | Pong
Request = Spawn | Ping

encode = msgspec.msgpack.Encoder().encode
zygote_decoder = msgspec.msgpack.Decoder(ZygoteMessage)
spawn_decoder = msgspec.msgpack.Decoder(Spawn)
request_decoder = msgspec.msgpack.Decoder(Request)
settings_decoder = msgspec.msgpack.Decoder(WorkerSettings)
