"""corral.toml: typed, validated, every key with a default.

Durations are seconds or strings like "250ms", "30s", "5m", "1h"; sizes are bytes or
strings like "512MiB", "2GiB". Unknown keys and bad values are errors naming the key.
"""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

import msgspec

from corral.protocol.units import Duration, Size, parse_duration, parse_size


class ConfigError(Exception):
    pass


def _dec_hook(tp: type, obj: object) -> object:
    if tp is Duration:
        return parse_duration(obj)
    if tp is Size:
        return parse_size(obj)
    raise NotImplementedError(f"no decoder for {tp}")


PositiveInt = Annotated[int, msgspec.Meta(ge=1)]


class _Section(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    pass


class SupervisorConfig(_Section):
    state_dir: str = ""  # empty: $STATE_DIRECTORY (StateDirectory=), else ~/.local/state/corral
    control_socket: str = ""  # empty: $RUNTIME_DIRECTORY/control.sock, else in state_dir
    control_socket_mode: int = 0o600  # 0o660 lets the service's group use the CLI
    drain_timeout: Duration = Duration(30)
    kill_grace: Duration = Duration(5)
    max_workers: PositiveInt = 1000
    idle_timeout: Duration = Duration(600)
    cgroups: bool = True  # per-worker cgroups when running in a delegated cgroup v2 subtree


class AgentConfig(_Section):
    entrypoint: str = "corral.worker.agents.echo:agent"
    options: dict[str, Any] = msgspec.field(default_factory=dict)


class LimitsConfig(_Section):
    turn_timeout: Duration = Duration(600)
    no_progress_timeout: Duration = Duration(120)
    rss_max: Size = Size(1024**3)
    cpu_time_per_turn: Duration = Duration(300)
    output_per_turn: Size = Size(1024**2)
    max_queue: PositiveInt = 100
    max_text: Size = Size(64 * 1024)
    restart_intensity: PositiveInt = 5
    restart_period: Duration = Duration(60)
    quarantine: Duration = Duration(600)
    max_tasks: PositiveInt = 512  # processes + threads in a worker's tree
    # log and progress frames per second per worker; past it they are dropped and counted,
    # and a worker that keeps flooding for FLOOD_SECONDS is stopped (output_limit)
    frame_rate: PositiveInt = 100


class HttpChannelConfig(_Section):
    listen: str = "127.0.0.1:8787"
    token: str = ""
    # slow clients: a request head, a body, an idle connection each get this long
    header_timeout: Duration = Duration(10)
    body_timeout: Duration = Duration(30)
    keepalive_timeout: Duration = Duration(15)
    max_connections: PositiveInt = 512  # past it: 503 and closed


class WebhookConfig(_Section):
    url: str
    secret: str = ""


class TelegramConfig(_Section):
    """One Telegram bot, `[channels.telegram.NAME]`."""

    token_env: str = "TELEGRAM_BOT_TOKEN"  # the NAME of the variable that holds the token
    api_url: str = "https://api.telegram.org"  # or a local Bot API server
    sessions: Literal["chat", "topic"] = "chat"  # one session per chat, or per forum topic
    allowed_chats: list[int] = msgspec.field(default_factory=list)  # empty: every chat


class ChannelsConfig(_Section):
    http: HttpChannelConfig = msgspec.field(default_factory=HttpChannelConfig)
    webhook: dict[str, WebhookConfig] = msgspec.field(default_factory=dict)
    telegram: dict[str, TelegramConfig] = msgspec.field(default_factory=dict)


class DeliveryConfig(_Section):
    retry_initial: Duration = Duration(1)
    retry_max: Duration = Duration(300)
    max_attempts: PositiveInt = 10
    max_age: Duration = Duration(3600)


class MetricsConfig(_Section):
    listen: str = "127.0.0.1:9464"


class RetentionConfig(_Section):
    # finished messages and their settled replies (delivered, fetched, dead) are deleted
    # this long after the turn ended
    keep: Duration = Duration(7 * 86400)


class SandboxConfig(_Section):
    """Each worker's Landlock restriction (worker/sandbox.py), where the kernel has it."""

    enabled: bool = True
    read_only: list[str] = msgspec.field(default_factory=list)  # extra paths agents may read
    read_write: list[str] = msgspec.field(default_factory=list)  # ... and write
    # TCP ports agents may connect to (Landlock ABI >= 4); empty: every port
    allow_connect_ports: list[Annotated[int, msgspec.Meta(ge=1, le=65535)]] = msgspec.field(
        default_factory=list
    )
    # keep agents off corral's own ports: "auto" (without channels.http.token, the HTTP
    # channel refuses connections from processes corral started), "always" (that, and a
    # Landlock layer refusing connects to the HTTP, metrics and a local store's ports:
    # ~15 ms and ~4 MB per spawn), "never"
    close_corral_ports: Literal["auto", "always", "never"] = "auto"


class StoreConfig(_Section):
    # empty: SQLite in state_dir; "postgresql://user@host:5432/db": PostgreSQL (a cluster).
    # The password comes from libpq (PGPASSWORD, ~/.pgpass), so the URL needs none.
    url: str = ""


class ClusterConfig(_Section):
    """`[cluster]`: only with a PostgreSQL store."""

    node: str = ""  # this node's unique name; default: the host name
    lease_ttl: Duration = Duration(10)  # a dead node's sessions move on after about this

    @property
    def node_name(self) -> str:
        import socket

        return self.node or socket.gethostname()


class Config(_Section):
    supervisor: SupervisorConfig = msgspec.field(default_factory=SupervisorConfig)
    agent: AgentConfig = msgspec.field(default_factory=AgentConfig)
    limits: LimitsConfig = msgspec.field(default_factory=LimitsConfig)
    channels: ChannelsConfig = msgspec.field(default_factory=ChannelsConfig)
    delivery: DeliveryConfig = msgspec.field(default_factory=DeliveryConfig)
    metrics: MetricsConfig = msgspec.field(default_factory=MetricsConfig)
    store: StoreConfig = msgspec.field(default_factory=StoreConfig)
    retention: RetentionConfig = msgspec.field(default_factory=RetentionConfig)
    sandbox: SandboxConfig = msgspec.field(default_factory=SandboxConfig)
    cluster: ClusterConfig = msgspec.field(default_factory=ClusterConfig)

    @property
    def state_path(self) -> Path:
        if self.supervisor.state_dir:
            return Path(self.supervisor.state_dir).expanduser()
        if systemd := _systemd_dir("STATE_DIRECTORY"):
            return systemd
        return Path(DEFAULT_STATE_DIR).expanduser()

    @property
    def control_socket_path(self) -> Path:
        """Where `serve` binds the control socket."""
        if self.supervisor.control_socket:
            return Path(self.supervisor.control_socket).expanduser()
        if runtime := _systemd_dir("RUNTIME_DIRECTORY"):
            return runtime / CONTROL_SOCKET
        return self.state_path / CONTROL_SOCKET

    def find_control_socket(self) -> Path:
        """Where the CLI looks for it: as `serve` would bind it; with neither
        control_socket nor state_dir set and nothing there, the service unit's
        RuntimeDirectory= (an operator's shell has no $RUNTIME_DIRECTORY)."""
        path = self.control_socket_path
        if self.supervisor.control_socket or self.supervisor.state_dir or path.exists():
            return path
        unit = Path(UNIT_RUNTIME_DIR) / CONTROL_SOCKET
        return unit if unit.exists() else path


DEFAULT_STATE_DIR = "~/.local/state/corral"
CONTROL_SOCKET = "control.sock"
UNIT_RUNTIME_DIR = "/run/corral"  # RuntimeDirectory=corral in deploy/systemd/corral.service


def _systemd_dir(variable: str) -> Path | None:
    """The first of the directories systemd lists in `variable` (":"-separated)."""
    first = os.environ.get(variable, "").split(":")[0]
    return Path(first) if first else None


_HOSTNAME_RE = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)(\.(?!-)[A-Za-z0-9-]{1,63}(?<!-))*\.?")


def split_listen(value: str, key: str) -> tuple[str, int]:
    """ "host:port" -> (host, port); "[::1]:80" for IPv6; ":80" for every address."""
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f'{key}: expected "HOST:PORT" with a port 1-65535, got {value!r}')
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ConfigError(f"{key}: {host!r} in brackets is not an IPv6 address") from None
    elif ":" in host:
        raise ConfigError(f'{key}: write an IPv6 address in brackets, "[{host}]:{port}"')
    elif host and not _is_ip(host) and not _HOSTNAME_RE.fullmatch(host):
        raise ConfigError(f"{key}: {host!r} is neither an IP address nor a host name")
    return host or "0.0.0.0", int(port)


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


_ENTRYPOINT_RE = re.compile(r"[A-Za-z_][\w.]*:[A-Za-z_]\w*")
_WEBHOOK_NAME_RE = re.compile(r"[A-Za-z0-9_-]{1,64}")
_ENV_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
# what BotFather hands out: the bot's numeric id, a colon, a key
_BOT_TOKEN_RE = re.compile(r"[0-9]{1,20}:[A-Za-z0-9_-]{20,200}")
TELEGRAM_CHANNEL = "telegram"  # the origin channel of every bot; NAME is its account


_USERINFO_RE = re.compile(r"(^|://)([^/@:\s]*):[^/@\s]*@")
_PASSWORD_PARAM_RE = re.compile(r"(^|[?&\s])password\s*=\s*('(?:[^'\\]|\\.)*'|[^&\s]*)")


def redact_url(url: str) -> str:
    """A store URL (or libpq key=value string) as it may be shown: passwords made ***."""
    url = _USERINFO_RE.sub(lambda m: f"{m[1]}{m[2]}:***@", url)
    return _PASSWORD_PARAM_RE.sub(lambda m: f"{m[1]}password=***", url)


def _validate_store(store: StoreConfig) -> None:
    url = store.url
    if url and not re.fullmatch(r"postgres(ql)?://[^\s]*", url):
        raise ConfigError(
            'store.url: expected "" (SQLite in supervisor.state_dir) or '
            f'"postgresql://user@host:5432/db", got {redact_url(url)!r}'
        )
    if url:
        from psycopg.conninfo import conninfo_to_dict  # only a PostgreSQL store needs it

        try:
            conninfo_to_dict(url)
        except Exception:  # libpq's message may quote the password: not shown
            raise ConfigError(
                f"store.url: libpq cannot parse {redact_url(url)!r} "
                "(check its %-escapes and ?key=value parameters)"
            ) from None


def _validate_sandbox(sandbox: SandboxConfig) -> None:
    for key in ("read_only", "read_write"):
        for path in getattr(sandbox, key):
            if not os.path.isabs(os.path.expanduser(path)):
                raise ConfigError(f"sandbox.{key}: expected absolute paths, got {path!r}")


_NODE_RE = re.compile(r"[A-Za-z0-9._:@-]{1,100}")


def _validate_cluster(cfg: Config) -> None:
    if cfg.cluster.node and not _NODE_RE.fullmatch(cfg.cluster.node):
        raise ConfigError(
            f"cluster.node: expected 1-100 characters of A-Za-z0-9._:@-, got {cfg.cluster.node!r}"
        )
    if float(cfg.cluster.lease_ttl) < 1.0:
        raise ConfigError("cluster.lease_ttl: must be at least 1s")


def _validate(cfg: Config) -> None:
    _validate_store(cfg.store)
    _validate_sandbox(cfg.sandbox)
    _validate_cluster(cfg)
    if not _ENTRYPOINT_RE.fullmatch(cfg.agent.entrypoint):
        raise ConfigError(
            f'agent.entrypoint: expected "package.module:callable", got {cfg.agent.entrypoint!r}'
        )
    if cfg.supervisor.control_socket_mode not in (0o600, 0o660):
        raise ConfigError("supervisor.control_socket_mode: must be 0o600 or 0o660")
    host, _ = split_listen(cfg.channels.http.listen, "channels.http.listen")
    if not cfg.channels.http.token and not is_loopback(host):
        raise ConfigError(
            "channels.http.token: required when channels.http.listen is not a loopback address"
        )
    metrics = split_listen(cfg.metrics.listen, "metrics.listen")
    if metrics == split_listen(cfg.channels.http.listen, "channels.http.listen"):
        raise ConfigError(
            f"metrics.listen: {cfg.metrics.listen} is also channels.http.listen: "
            "give each its own port"
        )
    _validate_socket_path(cfg)
    for name, hook in cfg.channels.webhook.items():
        if not _WEBHOOK_NAME_RE.fullmatch(name) or name == "http":
            raise ConfigError(
                f"channels.webhook.{name}: names are 1-64 characters of A-Z a-z 0-9 _ - "
                'and not "http"'
            )
        if not hook.url.startswith(("http://", "https://")):
            raise ConfigError(f"channels.webhook.{name}.url: expected an http(s) URL")
    _validate_telegram(cfg)


# sockaddr_un.sun_path is 108 bytes on Linux, its NUL included: bind() fails past it
SOCKET_PATH_MAX = 107


def _validate_socket_path(cfg: Config) -> None:
    path = os.fsencode(os.path.abspath(cfg.control_socket_path))
    if len(path) <= SOCKET_PATH_MAX:
        return
    key = "supervisor.control_socket" if cfg.supervisor.control_socket else "supervisor.state_dir"
    raise ConfigError(
        f"{key}: the control socket {os.fsdecode(path)} is {len(path)} bytes long, "
        f"more than a Unix socket path can be ({SOCKET_PATH_MAX}): use a shorter "
        + (
            "path"
            if cfg.supervisor.control_socket
            else "state_dir, or set supervisor.control_socket to a short path"
        )
    )


def _validate_telegram(cfg: Config) -> None:
    if cfg.channels.telegram and TELEGRAM_CHANNEL in cfg.channels.webhook:
        raise ConfigError(
            f"channels.webhook.{TELEGRAM_CHANNEL}: the name is taken by the Telegram channel"
        )
    envs: dict[str, str] = {}
    for name, bot in cfg.channels.telegram.items():
        key = f"channels.telegram.{name}"
        if not _WEBHOOK_NAME_RE.fullmatch(name):
            raise ConfigError(f"{key}: names are 1-64 characters of A-Z a-z 0-9 _ -")
        if not _ENV_NAME_RE.fullmatch(bot.token_env):
            raise ConfigError(
                f"{key}.token_env: expected the name of an environment variable, "
                f"got {bot.token_env!r} (the token itself belongs in that variable)"
            )
        if bot.token_env in envs:
            raise ConfigError(
                f"{key}.token_env: {bot.token_env} is also the token of "
                f"channels.telegram.{envs[bot.token_env]}: one poller per bot token"
            )
        envs[bot.token_env] = name
        if not bot.api_url.startswith(("http://", "https://")):
            raise ConfigError(f"{key}.api_url: expected an http(s) URL")


def telegram_tokens(cfg: Config, environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """Every configured bot's token, read from its token_env variable at start.

    A missing, empty or malformed variable is a ConfigError naming
    channels.telegram.NAME.token_env; the token itself is never in the message.
    """
    env = os.environ if environ is None else environ
    tokens: dict[str, str] = {}
    for name, bot in cfg.channels.telegram.items():
        key = f"channels.telegram.{name}.token_env"
        token = env.get(bot.token_env, "").strip()
        if not token:
            raise ConfigError(
                f"{key}: the environment variable {bot.token_env} is not set "
                "(it must hold the bot token from BotFather)"
            )
        if not _BOT_TOKEN_RE.fullmatch(token):
            raise ConfigError(
                f"{key}: the value of {bot.token_env} does not look like a bot token "
                '(BotFather gives "DIGITS:KEY")'
            )
        for other, seen in tokens.items():
            if seen == token:
                raise ConfigError(
                    f"{key}: channels.telegram.{other} has the same token: one poller per bot"
                )
        tokens[name] = token
    return tokens


def parse_config(data: bytes | str, source: str = "<config>") -> Config:
    """Decode and validate TOML text; ConfigError names the source and the key."""
    try:
        cfg = msgspec.toml.decode(data, type=Config, dec_hook=_dec_hook)
    except msgspec.ValidationError as e:
        raise ConfigError(f"{source}: {_named_entry(data, str(e)) or _keyed(str(e))}") from None
    except msgspec.DecodeError as e:
        raise ConfigError(f"{source}: not valid TOML: {e}") from None
    try:
        _validate(cfg)
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None
    return cfg


# tables of named entries: msgspec's error says `channels.webhook[...]`, not which one
_NAMED_TABLES: dict[tuple[str, str], type[msgspec.Struct]] = {
    ("channels", "webhook"): WebhookConfig,
    ("channels", "telegram"): TelegramConfig,
}


def _named_entry(data: bytes | str, message: str) -> str | None:
    """The error of the first bad entry of a named table, keyed by its name."""
    if "[...]" not in message:
        return None
    try:
        raw = msgspec.toml.decode(data)
    except msgspec.DecodeError:
        return None
    for (section, table), kind in _NAMED_TABLES.items():
        entries = raw.get(section, {}).get(table, {}) if isinstance(raw, dict) else {}
        if not isinstance(entries, dict):
            continue
        for name, entry in entries.items():
            try:
                msgspec.convert(entry, kind, dec_hook=_dec_hook)
            except msgspec.ValidationError as e:
                text, _, where = str(e).rpartition(" - at `")
                field = where.rstrip("`").removeprefix("$").lstrip(".") if text else ""
                text = text or str(e)
                key = f"{section}.{table}.{name}" + (f".{field}" if field else "")
                if m := re.fullmatch(r"Object contains unknown field `(.+)`", text):
                    return f"{key}.{m[1]}: unknown key"
                if m := re.fullmatch(r"Object missing required field `(.+)`", text):
                    return f"{key}.{m[1]}: required, not set"
                return f"{key}: {text}"
    return None


def _keyed(message: str) -> str:
    """msgspec says "... - at `$.limits.rss_max`"; lead with the key instead."""
    text, sep, where = message.rpartition(" - at `")
    if not sep:
        text, where = message, ""
    key = where.rstrip("`").removeprefix("$").lstrip(".")
    if m := re.fullmatch(r"Object contains unknown field `(.+)`", text):
        return f"{key + '.' if key else ''}{m[1]}: unknown key"
    return f"{key}: {text}" if key else text


def find_config_path(explicit: str | None) -> Path | None:
    """--config, then $CORRAL_CONFIG, then ./corral.toml; None means embedded defaults."""
    if explicit:
        return Path(explicit)
    if env := os.environ.get("CORRAL_CONFIG"):
        return Path(env)
    local = Path("corral.toml")
    return local if local.exists() else None


def load_config(explicit: str | None = None) -> Config:
    path = find_config_path(explicit)
    if path is None:
        return Config()
    try:
        data = path.read_bytes()
    except OSError as e:
        raise ConfigError(f"cannot read config {path}: {e.strerror}") from None
    return parse_config(data, str(path))
