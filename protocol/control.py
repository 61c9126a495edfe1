"""Bodies of the control API (HTTP+JSON on the control socket), shared by the
supervisor that serves them and the CLI that reads them; and the HTTP channel's answer
to a message, which `corral send` reads."""

from __future__ import annotations

import msgspec


class SessionInfo(msgspec.Struct, kw_only=True):
    session: str
    state: str  # starting | idle | busy | stopping | quarantined
    pid: int | None
    rss: int  # bytes, the worker's whole process tree, as last sampled
    cpu: float  # seconds of CPU of the worker's tree
    processes: int  # processes in the worker's tree
    age: float | None  # seconds since the worker was spawned
    turn_age: float | None  # seconds since the current turn started
    turn: str | None  # id of the message being handled
    attempt: int | None
    queue: int
    restarts: int  # workers of this session that ended abnormally (kept across restarts)
    last_exit: str | None
    demoted: bool  # runs SCHED_IDLE since one of its turns burned CPU
    quarantined_until: float | None  # unix time


class SessionList(msgspec.Struct):
    sessions: list[SessionInfo]


class PollerHealth(msgspec.Struct, kw_only=True):
    """A polling channel's receiver (one Telegram bot): what `corral status` shows."""

    bot: str
    state: str = "starting"  # starting | polling | retrying | failed
    username: str = ""
    last_poll: float | None = None  # wall time of the last completed poll
    last_error: str = ""
    errors: int = 0  # failed calls, all time
    conflicts: int = 0  # 409s: another poller, or a webhook
    restarts: int = 0  # by the watchdog
    updates: int = 0
    offset: int | None = None


class Status(msgspec.Struct, kw_only=True):
    pid: int
    version: str
    uptime: float
    draining: bool
    agent: str
    state_dir: str
    zygote_pid: int | None
    sessions: int
    workers: dict[str, int]  # by state
    inbox: int  # accepted messages whose turn has not ended
    loop_lag: float  # seconds, the last measurement
    loop_lag_max: float  # seconds, the largest in the last minute
    pollers: list[PollerHealth] = msgspec.field(default_factory=list)  # Telegram bots


class KillResult(msgspec.Struct):
    session: str
    pid: int
    reason: str
    reaped: bool


class DrainResult(msgspec.Struct):
    draining: bool
    drain_timeout: float


class ErrorBody(msgspec.Struct):
    error: str


# The HTTP channel's answer to POST /v1/messages, written by supervisor/channels/http.py
# and read by `corral send`.


class ReplyOut(msgspec.Struct):
    text: str
    kind: str  # reply | error


class MessageResult(msgspec.Struct):
    id: str
    session: str
    status: str  # accepted (no ?wait) | pending | done | error
    replies: list[ReplyOut] | msgspec.UnsetType = msgspec.UNSET  # only with ?wait
