"""Bodies of the control API (HTTP+JSON on the control socket), shared by the
supervisor that serves them and the CLI that reads them; and the HTTP channel's answer
to a message, which `corral send` reads."""

from __future__ import annotations

import msgspec

from corral.protocol.spawn import SandboxLevel


class SessionInfo(msgspec.Struct, kw_only=True):
    session: str
    state: str  # starting | idle | busy | stopping | quarantined | inactive (no worker)
    pid: int | None
    rss: int  # bytes, the worker's whole process tree, as last sampled
    cpu: float  # seconds of CPU of the worker's tree
    processes: int  # processes in the worker's tree
    tasks: int = 0  # processes and threads in the worker's tree (bounded by max_tasks)
    age: float | None  # seconds since the worker was spawned
    turn_age: float | None  # seconds since the current turn started
    turn: str | None  # id of the message being handled
    attempt: int | None
    queue: int
    restarts: int  # workers of this session that ended abnormally (kept across restarts)
    last_exit: str | None
    demoted: bool  # runs SCHED_IDLE since one of its turns burned CPU
    quarantined_until: float | None  # unix time
    # from the store: with `ls --all` and `show` (None where not asked)
    messages: int | None = None  # messages accepted for the session, all time
    last_message_at: float | None = None  # unix time of the last one
    progress: str | None = None  # the running turn's last progress note
    node: str = ""  # in a cluster: the node that runs it


class SessionList(msgspec.Struct):
    sessions: list[SessionInfo]


class HistoryEntry(msgspec.Struct, kw_only=True):
    """A message or one of its replies, as `corral history` shows it."""

    id: str
    kind: str  # message | reply | error
    at: float  # unix time: accepted (a message) or stored (a reply)
    text: str
    in_reply_to: str | None  # a reply's message
    channel: str
    state: str  # a message: pending | done | error; a reply: fetched | pending | delivered | dead


class History(msgspec.Struct):
    session: str
    entries: list[HistoryEntry]  # oldest first


class DeadLetterInfo(msgspec.Struct, kw_only=True):
    id: str  # the reply's id
    channel: str
    session: str
    in_reply_to: str
    kind: str
    text: str
    attempts: int
    last_error: str | None
    created_at: float  # unix time


class DeadLetterList(msgspec.Struct):
    dead_letters: list[DeadLetterInfo]  # oldest first


class RetryRequest(msgspec.Struct, forbid_unknown_fields=True):
    ids: list[str] = []
    all: bool = False


class RetryResult(msgspec.Struct):
    retried: list[str]  # back in delivery, due now, with fresh attempts
    not_retried: list[str]  # asked for, but not dead-lettered or of no configured channel


class PollerHealth(msgspec.Struct, kw_only=True):
    """A polling channel's receiver (one Telegram bot): what `corral status` shows."""

    bot: str
    state: str = "starting"  # starting | polling | retrying | failed | standby
    username: str = ""
    last_poll: float | None = None  # wall time of the last completed poll
    last_error: str = ""
    errors: int = 0  # failed calls, all time
    conflicts: int = 0  # 409s: another poller, or a webhook
    restarts: int = 0  # by the watchdog
    updates: int = 0
    offset: int | None = None


class NodeInfo(msgspec.Struct, kw_only=True):
    """A node of a cluster, as `corral status` shows it."""

    name: str
    heartbeat_at: float  # unix time of its last lease renewal
    started_at: float
    sessions: int  # leases it holds
    draining: bool
    alive: bool
    pid: int | None = None


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
    kill_grace: float | None = None  # seconds from SIGTERM to SIGKILL in `corral kill`
    fds: int = 0  # file descriptors the supervisor has open
    fds_limit: int = 0  # its RLIMIT_NOFILE; new sessions are refused near it
    zygotes_replaced: int = 0  # zygotes killed for not answering a health ping
    spawn_failures: int = 0  # spawns that failed in a row (the supervisor's trouble)
    pollers: list[PollerHealth] = msgspec.field(default_factory=list)  # Telegram bots
    config: str = ""  # the config file serve read; "": none, the built-in defaults
    store: str = "ok"  # or why the store cannot write (a full disk), or is lost
    sandbox: SandboxLevel | None = None  # as the zygote found it; None before it is ready
    node: str = ""  # in a cluster: this node's name
    nodes: list[NodeInfo] = msgspec.field(default_factory=list)  # in a cluster: the live nodes


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


class Health(msgspec.Struct):
    """GET /healthz on the HTTP channel and the metrics listener."""

    status: str  # ok (200) | draining (503)


# The HTTP channel's answer to POST /v1/messages, written by supervisor/channels/http.py
# and read by `corral send`.


class ReplyOut(msgspec.Struct, omit_defaults=True):
    text: str
    kind: str  # reply | error
    markup: str = ""  # "html" or "markdown" when the agent asked; absent: plain text


class MessageResult(msgspec.Struct):
    id: str
    session: str
    status: str  # accepted (no ?wait) | pending | done | error
    replies: list[ReplyOut] | msgspec.UnsetType = msgspec.UNSET  # only with ?wait


class ReloadResult(msgspec.Struct, kw_only=True):
    """`corral reload` (and SIGHUP): what changed, or why nothing did."""

    path: str  # the config file re-read
    changed: list[str] = msgspec.field(default_factory=list)  # dotted keys now in effect
    error: str | None = None  # the reload was refused: the old config stays
