"""The supervisor's side of the sandbox: what the workers are told to hide, the level in
force (log, `corral status`, metric), and who may use the control socket.

Workers restrict themselves (worker/sandbox.py); the zygote reports the level its
kernel allows in its Ready message. A pathname Unix socket is not covered by Landlock
(connect() needs no file access right), so the control socket checks its peers: a
process the supervisor started, however indirectly (a zygote, a worker, anything an
agent forks, strays re-parented to a subreaper), is refused.
"""

from __future__ import annotations

import errno
import fcntl
import ipaddress
import logging
import os
import select
import socket
import struct
import sys
from collections.abc import Callable, Iterator

import msgspec
from prometheus_client.core import GaugeMetricFamily, Metric

from corral.protocol.spawn import SandboxLevel, SandboxSettings
from corral.supervisor.config import Config, find_config_path, is_loopback, split_listen

log = logging.getLogger("corral.sandbox")

# systemd's directories for the service: its state, runtime (the control socket),
# configuration and credentials (secrets) are corral's, not the agents'
_SYSTEMD_DIRS = ("STATE_DIRECTORY", "RUNTIME_DIRECTORY", "CONFIGURATION_DIRECTORY")
_SECRET_DIRS = ("CREDENTIALS_DIRECTORY",)
# never handed to agents: the store's password, systemd's sockets for the service
HIDDEN_ENV = [
    "PGPASSWORD",
    "PGPASSFILE",
    "NOTIFY_SOCKET",
    "WATCHDOG_USEC",
    "WATCHDOG_PID",
    "LISTEN_FDS",
    "LISTEN_PID",
    "LISTEN_FDNAMES",
    *_SECRET_DIRS,
]
MAX_ANCESTRY = 64  # deeper than any shell's CLI; a worker's chain deeper than this is refused
_SO_PEERPIDFD = 77  # Linux 6.5


def _serve_config_arg() -> str | None:
    """`corral serve --config PATH`'s PATH: the Config does not keep where it came from."""
    args = sys.argv[1:]
    for i, arg in enumerate(args):
        if arg == "--config" and i + 1 < len(args):
            return args[i + 1]
        if arg.startswith("--config="):
            return arg.removeprefix("--config=")
    return None


def worker_sandbox(config: Config) -> SandboxSettings:
    """`[sandbox]` plus what the workers must not reach, for WorkerSettings."""
    hidden = [str(config.state_path), str(config.control_socket_path.parent)]
    if (path := find_config_path(_serve_config_arg())) is not None:
        hidden.append(str(path.resolve()))
    for var in (*_SYSTEMD_DIRS, *_SECRET_DIRS):
        hidden += [d for d in os.environ.get(var, "").split(":") if d]
    hidden_env = [*HIDDEN_ENV, *(bot.token_env for bot in config.channels.telegram.values())]
    sb = config.sandbox
    if sb.enabled:
        for door in open_doors(config):
            log.warning("sandbox: %s", door)
    closed = corral_ports(config) if closes_corral_ports(config) else []
    if closed:
        log.info(
            "sandbox: agents may not connect to corral's own TCP ports %s (Landlock ABI >= 4, "
            '[sandbox] close_corral_ports = "always"); Landlock has no port ranges, so each '
            "spawn copies ~65,000 port rules (~15 ms, ~4 MB of kernel memory per worker)",
            ", ".join(map(str, closed)),
        )
    elif checks_http_peers(config):
        log.info(
            "sandbox: without channels.http.token, the HTTP channel refuses connections from "
            "processes corral started (agents and their children), checked once per connection"
        )
    return SandboxSettings(
        enabled=sb.enabled,
        read_only=[os.path.expanduser(p) for p in sb.read_only],
        read_write=[os.path.expanduser(p) for p in sb.read_write],
        allow_connect_ports=list(sb.allow_connect_ports),
        deny_connect_ports=closed,
        hidden=hidden,
        hidden_env=sorted(set(hidden_env)) if sb.enabled else [],
    )


def closes_corral_ports(config: Config) -> bool:
    """Whether workers get the layer that refuses connects to corral's own ports: only
    with "always" (it costs every spawn; "auto" is the HTTP channel's peer check), and
    never with allow_connect_ports, which is an allow-list of its own."""
    sb = config.sandbox
    return sb.enabled and not sb.allow_connect_ports and sb.close_corral_ports == "always"


def checks_http_peers(config: Config) -> bool:
    """Whether the HTTP channel refuses connections from processes corral started
    (supervisor/peers.py): without a token (a token suffices), unless "never"."""
    return not config.channels.http.token and config.sandbox.close_corral_ports != "never"


def corral_ports(config: Config) -> list[int]:
    """corral's own TCP ports: the HTTP channel's, the metrics', and the store's when
    store.url names this host (a server elsewhere is reached by address, and Landlock
    rules are by port only: closing its port here would close it on every host)."""
    ports = {
        split_listen(config.channels.http.listen, "channels.http.listen")[1],
        split_listen(config.metrics.listen, "metrics.listen")[1],
    }
    if config.store.url and (port := _local_store_port(config.store.url)):
        ports.add(port)
    return sorted(ports)


def _local_store_port(url: str) -> int:
    """The TCP port of a PostgreSQL store on this host; 0: elsewhere, or a unix socket."""
    from psycopg.conninfo import conninfo_to_dict

    try:
        info = conninfo_to_dict(url)
    except Exception:  # checked at config load; nothing to close if it cannot be read
        return 0
    host = str(info.get("host") or "")
    if not host or host.startswith("/"):
        return 0  # libpq's default: a unix socket, which no port rule covers
    first = host.split(",")[0]
    if not (is_loopback(first) or first == socket.gethostname() or _local_address(first)):
        return 0
    try:
        return int(str(info.get("port") or 5432).split(",")[0])
    except ValueError:
        return 0


def _local_address(host: str) -> bool:
    """Whether `host` is an IP address of this machine (binding to it works); no lookup."""
    try:
        family = socket.AF_INET6 if ipaddress.ip_address(host).version == 6 else socket.AF_INET
    except ValueError:
        return False  # a name: resolving it would ask DNS
    try:
        with socket.socket(family, socket.SOCK_STREAM) as s:
            s.bind((host, 0))
        return True
    except OSError:
        return False


def open_doors(config: Config) -> list[str]:
    """What a sandboxed agent can still reach with this config, to be said at start.

    Landlock (up to ABI 7) does not police TCP by address or connect() to a pathname
    socket; the channels that trust "this machine" trust the agents too.
    """
    doors = []
    _, port = split_listen(config.channels.http.listen, "channels.http.listen")
    ports = config.sandbox.allow_connect_ports
    if (
        not config.channels.http.token
        and (not ports or port in ports)
        and not closes_corral_ports(config)
        and not checks_http_peers(config)
    ):
        doors.append(
            f"the HTTP channel on {config.channels.http.listen} has no token and "
            '[sandbox] close_corral_ports = "never": agents can reach it like any local '
            "process (post as and read replies of any session); set channels.http.token, "
            'or close_corral_ports = "auto"'
        )
    if config.store.url:
        doors.append(
            "with a PostgreSQL store, agents run as corral's OS user: a server that trusts "
            "that user (peer or trust authentication) lets them in; use password or "
            "certificate authentication for corral's role"
        )
    return doors


def zygote_environ(settings: SandboxSettings) -> dict[str, str]:
    """The environment the zygote (and so every worker) starts with."""
    hidden = set(settings.hidden_env)
    return {k: v for k, v in os.environ.items() if k not in hidden}


HTTP_PEER_CHECK = "http_peer_check"  # the feature's name in `corral status` and metrics


def with_peer_check(level: SandboxLevel | None, config: Config) -> SandboxLevel | None:
    """The zygote's level plus the supervisor's own part: the HTTP channel's peer check."""
    if level is None or not checks_http_peers(config):
        return level
    return msgspec.structs.replace(level, enforced=[*level.enforced, HTTP_PEER_CHECK])


def describe(level: SandboxLevel) -> str:
    if not level.enabled:
        return "off ([sandbox] enabled = false): workers can read and write whatever corral can"
    if level.abi == 0:
        text = (
            f"none: {level.why or 'no Landlock here'}: workers can read and write whatever "
            "corral can; the control socket still refuses them"
        )
    else:
        text = f"Landlock ABI {level.abi}: {', '.join(level.enforced)}"
        if level.missing:
            text += f"; not enforced on this kernel: {', '.join(level.missing)}"
    if "corral_ports" in level.missing:
        text += (
            " (Landlock before ABI 4 has no TCP rules: corral's ports stay open to agents; "
            "the HTTP channel without a token still refuses their connections, unless "
            '[sandbox] close_corral_ports = "never")'
        )
    return text


class LevelLog:
    """Logs the level in force once, and again only if a new zygote finds another."""

    def __init__(self) -> None:
        self.level: SandboxLevel | None = None

    def report(self, level: SandboxLevel | None) -> None:
        if level is None or level == self.level:
            return
        self.level = level
        weak = not level.enabled or level.abi == 0 or level.missing
        log.log(logging.WARNING if weak else logging.INFO, "sandbox: %s", describe(level))


def peer(sock: socket.socket) -> tuple[int, int, int]:
    """(pid, uid, pidfd or -1) of the process that connected `sock` (SO_PEERCRED,
    SO_PEERPIDFD)."""
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, _ = struct.unpack("3i", creds)
    try:
        pidfd = struct.unpack("i", sock.getsockopt(socket.SOL_SOCKET, _SO_PEERPIDFD, 4))[0]
    except OSError:  # a kernel before 6.5
        pidfd = -1
    return pid, uid, pidfd


def _parent(pid: int) -> int:
    with open(f"/proc/{pid}/stat", "rb") as f:
        stat = f.read()
    return int(stat[stat.rindex(b")") + 2 :].split()[1])  # the comm may hold ")" and spaces


def started_by_us(pid: int, uid: int, pidfd: int = -1, me: int | None = None) -> bool:
    """Whether `pid` (of `uid`; `pidfd` names it, if the kernel gave one) descends from
    this process (`me`): a zygote, a worker, or anything they started. Blocking calls:
    run it on the proc thread.

    Everything we start keeps our uid (no_new_privs, no capabilities), and so does every
    process between us and it: a peer, or an ancestor, of another uid is not ours.
    Fails closed: a peer gone before it could be checked, or an ancestry deeper than
    MAX_ANCESTRY, counts as ours.
    """
    me = os.getpid() if me is None else me
    if pid == me or pid == 0:  # ourselves; a peer in a PID namespace we cannot see
        return False
    if uid != os.geteuid():
        return False
    if pidfd >= 0:
        try:
            return _walk_pidfds(pidfd, uid, me)
        except _NoPidfdInfo:
            pass
    return _walk_proc(pid, me, pidfd)


class _NoPidfdInfo(Exception):
    pass


_PIDFD_GET_INFO = 0xC040FF0B  # _IOWR(0xFF, 11, struct pidfd_info), Linux 6.13
_PIDFD_INFO_PID = 1 << 0
_PIDFD_INFO_CREDS = 1 << 1


def _pidfd_info(pidfd: int) -> tuple[int, int]:
    """(parent pid, euid) of the process `pidfd` names; ProcessLookupError once it exited."""
    buf = bytearray(64)
    struct.pack_into("Q", buf, 0, _PIDFD_INFO_PID | _PIDFD_INFO_CREDS)
    try:
        fcntl.ioctl(pidfd, _PIDFD_GET_INFO, buf)
    except OSError as e:
        if e.errno in (errno.ENOTTY, errno.EINVAL, errno.EOPNOTSUPP):
            raise _NoPidfdInfo from None
        raise
    _, _, _, _, ppid, _, _, euid = struct.unpack_from("QQIIIIII", buf)
    return ppid, euid


def _walk_pidfds(pidfd: int, uid: int, me: int) -> bool:
    """The ancestry by pidfds (PIDFD_GET_INFO): what /proc hides (ProtectProc=invisible
    hides a same-uid process that made itself non-dumpable) cannot break the chain."""
    opened: list[int] = []
    try:
        current = pidfd
        for _ in range(MAX_ANCESTRY):  # ends at us, at an init, at someone else's, or the bound
            ppid, euid = _pidfd_info(current)
            if euid != uid:
                return False
            if ppid == me:
                return True
            if ppid <= 1:
                return False
            parent = os.pidfd_open(ppid)
            opened.append(parent)
            # the parent may have exited (its PID reused) before we opened it: then
            # `current` was re-parented, and is looked at again
            if _pidfd_info(current)[0] == ppid:
                current = parent
        return True
    except OSError:  # one of them exited while we looked
        return True
    finally:
        for fd in opened:
            os.close(fd)


def _walk_proc(pid: int, me: int, pidfd: int) -> bool:
    """The ancestry through /proc, for kernels before 6.13. An ancestor we cannot see
    (another user's, under ProtectProc=invisible, like `sudo` in `sudo -u corral corral
    status`) ends the walk: not ours. A parent that exited while we looked leaves its
    child re-parented, which we see and follow."""
    chain = [pid]
    try:
        parent = _parent(pid)
    except OSError:
        return True  # the peer itself is gone
    for _ in range(MAX_ANCESTRY):  # ends at us, at an init, at someone else's, or the bound
        if parent == me:
            return True
        if parent <= 1:
            break
        try:
            grandparent = _parent(parent)
        except OSError:
            try:
                again = _parent(chain[-1])
            except OSError:
                return True  # the chain is moving under us
            if again == parent:
                break  # alive, and not ours to see
            parent = again  # it exited and its child was re-parented: follow
            continue
        chain.append(parent)
        parent = grandparent
    else:
        return True
    if pidfd >= 0:
        readable, _, _ = select.select([pidfd], [], [], 0)
        if readable:  # it exited while we walked: the chain we read may be another's
            return True
    return False


class LevelCollector:
    """corral_sandbox_abi (the Landlock ABI workers restrict themselves with, 0: none) and
    corral_sandbox_enforced{feature} (1 enforced, 0 not), from the zygote's report."""

    def __init__(self, level: Callable[[], SandboxLevel | None]) -> None:
        self.level = level

    def describe(self) -> list[Metric]:
        return []  # collected at scrape time only: the level is known once the zygote is up

    def collect(self) -> Iterator[Metric]:
        level = self.level()
        abi = GaugeMetricFamily(
            "corral_sandbox_abi",
            "Landlock ABI the workers restrict themselves with (0: not sandboxed)",
        )
        abi.add_metric([], level.abi if level is not None else 0)
        yield abi
        enforced = GaugeMetricFamily(
            "corral_sandbox_enforced",
            "Whether the sandbox enforces this feature on this kernel",
            labels=["feature"],
        )
        if level is not None:
            for name in level.enforced:
                enforced.add_metric([name], 1)
            for name in level.missing:
                enforced.add_metric([name], 0)
        yield enforced
