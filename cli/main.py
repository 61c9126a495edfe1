"""The `corral` command."""

from __future__ import annotations

import asyncio
import contextlib
import faulthandler
import json
import logging
import logging.handlers
import os
import queue
import sys
from typing import Any

import click

from corral.supervisor.config import Config, ConfigError, load_config, split_listen

DEFAULT_TIMEOUT = 5.0


def _load(config_path: str | None) -> Config:
    try:
        return load_config(config_path)
    except ConfigError as e:
        raise click.ClickException(str(e)) from None


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="corral")
def main() -> None:
    """corral: every AI-agent chat session in its own bounded worker process."""


@main.command()
@click.option(
    "--config",
    "config_path",
    metavar="PATH",
    help="corral.toml (default: $CORRAL_CONFIG, ./corral.toml)",
)
@click.option(
    "--log-level",
    default="INFO",
    show_default=True,
    type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"]),
)
def serve(config_path: str | None, log_level: str) -> None:
    """Run the supervisor."""
    from corral.supervisor.app import serve as run

    config = _load(config_path)
    # a watchdog kill (SIGABRT) then leaves every thread's stack in the journal
    faulthandler.enable()
    stderr = logging.StreamHandler(sys.stderr)
    stderr.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    # Records are written by a thread of their own: a slow terminal or journald must
    # not hold the event loop. Past LOG_QUEUE records waiting, new ones are dropped.
    records: queue.Queue[logging.LogRecord] = queue.Queue(LOG_QUEUE)
    listener = logging.handlers.QueueListener(records, stderr)
    handler = DroppingQueueHandler(records)
    handler.setFormatter(logging.Formatter("%(message)s"))  # the listener's adds the rest
    logging.basicConfig(level=log_level, handlers=[handler])
    listener.start()
    try:
        code = asyncio.run(run(config))
    finally:
        listener.stop()
    sys.exit(code)


LOG_QUEUE = 10_000


class DroppingQueueHandler(logging.handlers.QueueHandler):
    """A QueueHandler that drops a record when the queue is full instead of blocking."""

    def enqueue(self, record: logging.LogRecord) -> None:
        with contextlib.suppress(queue.Full):
            self.queue.put_nowait(record)


def _http_base(config: Config) -> str:
    host, port = split_listen(config.channels.http.listen, "channels.http.listen")
    if host in ("0.0.0.0", "::"):
        host = "127.0.0.1"
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{port}"


async def _post_message(
    config: Config, body: dict[str, Any], wait: float | None, timeout: float
) -> tuple[int, Any]:
    import aiohttp

    url = _http_base(config) + "/v1/messages"
    params = {"wait": str(wait)} if wait is not None else {}
    headers = {}
    token = os.environ.get("CORRAL_TOKEN") or config.channels.http.token
    if token:
        headers["Authorization"] = f"Bearer {token}"
    client_timeout = aiohttp.ClientTimeout(total=timeout + (wait or 0))
    async with aiohttp.ClientSession(timeout=client_timeout) as http:
        async with http.post(url, json=body, params=params, headers=headers) as resp:
            return resp.status, await resp.json(content_type=None)


@main.command()
@click.argument("session")
@click.argument("text")
@click.option(
    "--wait",
    type=float,
    metavar="SECONDS",
    help="Wait up to SECONDS for the replies and print them.",
)
@click.option(
    "--id", "message_id", metavar="ID", help="Idempotency key: the same id twice is one message."
)
@click.option("--json", "as_json", is_flag=True, help="Print the response body as JSON.")
@click.option(
    "--timeout",
    type=float,
    default=DEFAULT_TIMEOUT,
    show_default=True,
    help="Seconds to wait for corral to answer (on top of --wait).",
)
@click.option("--config", "config_path", metavar="PATH")
def send(
    session: str,
    text: str,
    wait: float | None,
    message_id: str | None,
    as_json: bool,
    timeout: float,
    config_path: str | None,
) -> None:
    """Send TEXT to SESSION over the HTTP channel."""
    import aiohttp

    config = _load(config_path)
    body: dict[str, Any] = {"session": session, "text": text}
    if message_id:
        body["id"] = message_id
    try:
        status, data = asyncio.run(_post_message(config, body, wait, timeout))
    except (aiohttp.ClientConnectionError, OSError) as e:
        raise click.ClickException(
            f"cannot reach corral at {_http_base(config)}: {e}. Is 'corral serve' running?"
        ) from None
    except TimeoutError:
        raise click.ClickException(
            f"corral did not answer within {timeout + (wait or 0):g}s"
        ) from None
    if as_json:
        click.echo(json.dumps(data))
    if status >= 400:
        if not as_json:
            click.echo(f"error {status}: {data.get('error', data)}", err=True)
        sys.exit(1)
    if as_json:
        sys.exit(1 if data.get("status") == "error" else 0)
    if wait is None:
        click.echo(f"accepted {data['id']}")
        return
    for reply in data.get("replies", []):
        click.echo(reply["text"], err=reply["kind"] == "error")
    if data.get("status") == "pending":
        click.echo(
            f"no reply within {wait:g}s (message {data['id']} is still queued or running)", err=True
        )
        sys.exit(3)
    if data.get("status") == "error":
        sys.exit(1)


# ---- control socket client


class ControlClient:
    """Talks to `corral serve` over its control socket, with a hard deadline."""

    def __init__(self, config: Config, timeout: float) -> None:
        self.path = config.control_socket_path
        self.timeout = timeout

    def call(
        self, method: str, path: str, params: dict[str, str] | None = None, extra_time: float = 0.0
    ) -> Any:
        """The decoded JSON body; exits with a clear message on any failure."""
        import aiohttp

        if not self.path.exists():
            raise click.ClickException(
                f"control socket {self.path} not found: is 'corral serve' running?"
            )

        async def go() -> tuple[int, Any]:
            connector = aiohttp.UnixConnector(path=str(self.path))
            timeout = aiohttp.ClientTimeout(total=self.timeout + extra_time)
            async with aiohttp.ClientSession(connector=connector, timeout=timeout) as http:
                async with http.request(method, f"http://corral{path}", params=params) as resp:
                    return resp.status, await resp.json(content_type=None)

        try:
            status, body = asyncio.run(go())
        except TimeoutError:
            raise click.ClickException(
                f"corral did not answer within {self.timeout + extra_time:g}s on {self.path}"
            ) from None
        except (aiohttp.ClientError, OSError) as e:
            raise click.ClickException(
                f"cannot talk to corral on {self.path}: {e}. Is 'corral serve' running?"
            ) from None
        if status >= 400:
            raise click.ClickException(
                body.get("error", str(body)) if isinstance(body, dict) else str(body)
            )
        return body


def _client_options(f: Any) -> Any:
    f = click.option(
        "--config",
        "config_path",
        metavar="PATH",
        help="corral.toml (default: $CORRAL_CONFIG, ./corral.toml)",
    )(f)
    f = click.option(
        "--timeout",
        type=float,
        default=DEFAULT_TIMEOUT,
        show_default=True,
        help="Seconds to wait for an answer.",
    )(f)
    return f


def _json_option(f: Any) -> Any:
    return click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")(f)


def _fmt_bytes(n: int | None) -> str:
    if not n:
        return "-"
    for unit, size in (("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if n >= size:
            return f"{n / size:.1f}{unit}"
    return f"{n}B"


def _fmt_secs(s: float | None) -> str:
    if s is None:
        return "-"
    if s < 60:
        return f"{s:.1f}s"
    if s < 3600:
        return f"{int(s // 60)}m{int(s % 60):02d}s"
    return f"{int(s // 3600)}h{int(s % 3600 // 60):02d}m"


def _fmt_until(t: float | None) -> str:
    import time

    return "-" if t is None else time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(t))


@main.command(name="ls")
@_client_options
@_json_option
def ls(config_path: str | None, timeout: float, as_json: bool) -> None:
    """List sessions with a worker or queued messages."""
    body = ControlClient(_load(config_path), timeout).call("GET", "/v1/sessions")
    if as_json:
        click.echo(json.dumps(body))
        return
    header = (
        "SESSION",
        "STATE",
        "PID",
        "RSS",
        "CPU",
        "AGE",
        "TURN",
        "QUEUE",
        "RESTARTS",
        "LAST-EXIT",
    )
    rows = [header] + [
        (
            s["session"],
            s["state"],
            str(s["pid"] or "-"),
            _fmt_bytes(s["rss"]),
            f"{s['cpu']:.1f}s" if s["pid"] else "-",
            _fmt_secs(s["age"]),
            _fmt_secs(s["turn_age"]),
            str(s["queue"]),
            str(s["restarts"]),
            s["last_exit"] or "-",
        )
        for s in body["sessions"]
    ]
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    for r in rows:
        click.echo("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())


@main.command()
@click.argument("session")
@_client_options
@_json_option
def show(session: str, config_path: str | None, timeout: float, as_json: bool) -> None:
    """Show one session in detail."""
    body = ControlClient(_load(config_path), timeout).call("GET", f"/v1/sessions/{_quote(session)}")
    if as_json:
        click.echo(json.dumps(body))
        return
    shown = {
        "session": body["session"],
        "state": body["state"],
        "pid": body["pid"] or "-",
        "rss": _fmt_bytes(body["rss"]),
        "cpu": f"{body['cpu']:.2f}s",
        "processes": body["processes"],
        "age": _fmt_secs(body["age"]),
        "turn": body["turn"] or "-",
        "turn age": _fmt_secs(body["turn_age"]),
        "attempt": body["attempt"] or "-",
        "queue": body["queue"],
        "restarts": body["restarts"],
        "last exit": body["last_exit"] or "-",
        "scheduling": "idle (since a CPU-heavy turn or a broken bound)"
        if body["demoted"]
        else "normal",
        "quarantined until": _fmt_until(body["quarantined_until"]),
    }
    for key, value in shown.items():
        click.echo(f"{key + ':':<19}{value}")


def _quote(session: str) -> str:
    from urllib.parse import quote

    return quote(session, safe="")


@main.command()
@click.argument("session")
@click.option(
    "--force",
    is_flag=True,
    help="SIGKILL at once instead of SIGTERM, then SIGKILL after kill_grace.",
)
@_client_options
@_json_option
def kill(session: str, force: bool, config_path: str | None, timeout: float, as_json: bool) -> None:
    """Stop a session's worker (its running turn gets an error reply)."""
    config = _load(config_path)
    body = ControlClient(config, timeout).call(
        "POST",
        f"/v1/sessions/{_quote(session)}/kill",
        {"force": "1"} if force else None,
        extra_time=float(config.supervisor.kill_grace) + 3,
    )
    if as_json:
        click.echo(json.dumps(body))
    elif body["reaped"]:
        click.echo(f"killed {body['session']} (worker {body['pid']})")
    else:
        click.echo(f"worker {body['pid']} of {body['session']} is still stopping", err=True)
        sys.exit(1)


@main.command()
@click.argument("session")
@_client_options
@_json_option
def release(session: str, config_path: str | None, timeout: float, as_json: bool) -> None:
    """Lift a session's quarantine."""
    body = ControlClient(_load(config_path), timeout).call(
        "POST", f"/v1/sessions/{_quote(session)}/release"
    )
    click.echo(json.dumps(body) if as_json else f"released {body['session']}")


@main.command()
@_client_options
@_json_option
def status(config_path: str | None, timeout: float, as_json: bool) -> None:
    """Show the supervisor's state."""
    body = ControlClient(_load(config_path), timeout).call("GET", "/v1/status")
    if as_json:
        click.echo(json.dumps(body))
        return
    workers = ", ".join(f"{n} {state}" for state, n in body["workers"].items() if n) or "none"
    for key, value in {
        "pid": body["pid"],
        "version": body["version"],
        "uptime": _fmt_secs(body["uptime"]),
        "state": "draining" if body["draining"] else "serving",
        "agent": body["agent"],
        "state dir": body["state_dir"],
        "zygote pid": body["zygote_pid"] or "-",
        "sessions": f"{body['sessions']} ({workers})",
        "inbox": body["inbox"],
        "loop lag": f"{body['loop_lag'] * 1000:.1f}ms "
        f"(max {body['loop_lag_max'] * 1000:.1f}ms in the last minute)",
    }.items():
        click.echo(f"{key + ':':<12}{value}")


@main.command()
@click.option(
    "--timeout",
    "drain_timeout",
    type=float,
    metavar="SECONDS",
    help="Time running turns get to finish (default: drain_timeout).",
)
@click.option(
    "--no-wait", is_flag=True, help="Return at once instead of waiting for the supervisor to exit."
)
@click.option("--config", "config_path", metavar="PATH")
@_json_option
def drain(
    drain_timeout: float | None, no_wait: bool, config_path: str | None, as_json: bool
) -> None:
    """Stop intake, let running turns finish, stop every worker, and exit."""
    import time

    config = _load(config_path)
    client = ControlClient(config, DEFAULT_TIMEOUT)
    body = client.call(
        "POST", "/v1/drain", {"timeout": str(drain_timeout)} if drain_timeout is not None else None
    )
    if as_json:
        click.echo(json.dumps(body))
    if no_wait:
        return
    bound = body["drain_timeout"] + float(config.supervisor.kill_grace) + 10
    deadline = time.monotonic() + bound
    while client.path.exists() and time.monotonic() < deadline:  # ends at the deadline
        time.sleep(0.1)
    if client.path.exists():
        raise click.ClickException(f"corral has not stopped within {bound:g}s")
    if not as_json:
        click.echo("drained")


@main.group()
def config() -> None:
    """Configuration tools."""


@config.command(name="check")
@click.argument("path", type=click.Path(dir_okay=False))
def config_check(path: str) -> None:
    """Check a corral.toml: every key known, every value valid."""
    cfg = _load(path)
    click.echo(f"{path}: ok (agent {cfg.agent.entrypoint}, state in {cfg.state_path})")


if __name__ == "__main__":
    main()
